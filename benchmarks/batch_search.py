"""Batched exact search: xmodal's flat index (blocked matmul + top-k for batches) vs raw faiss flat, in one process.

    .venv/bin/python benchmarks/batch_search.py                                  # 100k and 1M x 256-d
    .venv/bin/python benchmarks/batch_search.py --sizes 20000 --batches 1 16 256 --rounds 3   # a quick look

For each collection size (random L2-normalised vectors) and batch size, per round and in rotating order:

* ``faiss``        — ``IndexIDMap2(IndexFlatIP).search(q, k)`` called directly (faiss's default settings);
* ``matmul``       — :func:`xmodal.retrieval.exact.flat_search` on the same faiss object (the batch path alone);
* ``xmodal``       — ``EmbeddingIndex.search(q, k)``: the path xmodal picks (``exact.use_matmul``) + ``Hit`` objects.

Before timing, xmodal's result is checked against faiss's (same ids, bit-identical scores: ``xmodal==faiss``), and so
is the forced ``matmul`` path's (``matmul==faiss``: false from ``distance_compute_blas_threshold / d`` queries on,
where faiss switches to BLAS itself and its scores carry sgemm's rounding; xmodal leaves those batches to faiss). Ratios are
medians of per-round paired ratios (time of faiss / time of the peer). The crossover batch size is where ``matmul``
starts beating faiss: ``exact.MATMUL_MIN_QUERIES`` is set from it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from xmodal.retrieval import exact  # noqa: E402
from xmodal.retrieval.index import EmbeddingIndex  # noqa: E402


def unit_vectors(rng: np.random.Generator, n: int, d: int, chunk: int = 200_000) -> np.ndarray:
    x = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[s:s + len(block)] = block
    return x


def run_size(n: int, args, rng) -> list[dict]:
    x = unit_vectors(rng, n, args.dim)
    index = EmbeddingIndex(args.dim, "flat")
    index.add(x)
    del x
    raw = index._index
    bound = exact.max_norm(exact.flat_arrays(raw)[0])
    rows = []
    for b in args.batches:
        q = unit_vectors(rng, b, args.dim)
        d_ref, i_ref = raw.search(q, args.k)
        d_mm, i_mm = exact.flat_search(raw, q, args.k, bound)
        hits = index.search(q, args.k)
        d_x = np.array([[h.score for h in row] for row in hits], np.float32)
        i_x = np.array([[h.id for h in row] for row in hits])
        same = bool((i_ref == i_x).all() and (d_ref == d_x).all())           # what xmodal returns
        mm_same = bool((i_ref == i_mm).all() and (d_ref == d_mm).all())     # the matmul path forced
        path = "matmul" if exact.use_matmul(b, n, args.dim) else "faiss"
        peers = {"faiss": lambda: raw.search(q, args.k), "matmul": lambda: exact.flat_search(raw, q, args.k, bound),
                 "xmodal": lambda: index.search(q, args.k)}
        times = {name: [] for name in peers}
        rounds = args.rounds if b * n <= 64 * 1_000_000 else max(2, args.rounds // 2)
        for r in range(rounds):
            names = list(peers)[r % 3:] + list(peers)[:r % 3]
            for name in names:
                t0 = time.perf_counter()
                peers[name]()
                times[name].append(time.perf_counter() - t0)
        row = {"n": n, "batch": b, "identical": same, "matmul_identical": mm_same, "path": path}
        for name, ts in times.items():
            row[f"{name}_qps"] = b / statistics.median(ts)
            if name != "faiss":
                row[f"{name}_speedup"] = statistics.median(f / t for f, t in zip(times["faiss"], ts))
        rows.append(row)
        print(f"n={n:>9,} batch={b:>5} xmodal path={path:6s} xmodal==faiss {same!s:5} matmul==faiss {mm_same!s:5}  faiss {row['faiss_qps']:9.0f} q/s   matmul "
              f"{row['matmul_qps']:9.0f} q/s ({row['matmul_speedup']:5.2f}x)   xmodal {row['xmodal_qps']:9.0f} q/s "
              f"({row['xmodal_speedup']:5.2f}x)", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 256, 1024])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="faiss OpenMP and torch intra-op threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(f"batch search benchmark: {platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}, torch "
          f"{torch.__version__}; threads {args.threads}, k={args.k}, d={args.dim}; xmodal takes the matmul path "
          f"from {exact.MATMUL_MIN_QUERIES} queries and {exact.MATMUL_MIN_WORK:,} rows x dim", flush=True)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    rng = np.random.default_rng(args.seed)
    rows = [r for n in args.sizes for r in run_size(n, args, rng)]
    bad = [r for r in rows if not r["identical"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} configurations: xmodal identical to faiss (ids and scores)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
