"""Compressed index kinds side by side: recall@10, query time and bytes per vector, xmodal vs raw faiss, one process.

    .venv/bin/python benchmarks/compressed_index.py                               # 100k x 256-d clustered vectors
    .venv/bin/python benchmarks/compressed_index.py --vectors emb.npy --queries q.npy   # your own embeddings

For each kind (flat, int8, binary, ivfpq) an :class:`~xmodal.retrieval.index.EmbeddingIndex` is built; the
approximate kinds are tuned with :func:`xmodal.retrieval.tuning.tune` (the smallest search setting reaching
``--target-recall`` on ``--tune-queries`` held-out queries), then recall@10 against exact search is measured on
other queries through ``EmbeddingIndex.search``. Query time, per round and in rotating order: ``xmodal`` =
``EmbeddingIndex.search`` and ``faiss`` = the faiss object inside it searched directly with the same parameters
(for ``binary`` that is the Hamming search alone, without the float re-ranking, so its ratio is the cost of
rescoring). Bytes per vector = the serialized faiss index / n (codes, ids, lists).

Without ``--vectors`` the collection is synthetic: unit vectors around ``--clusters`` random centres (real
embeddings are clustered; uniform random ones are the worst case for every approximate kind). Say which you ran.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from xmodal.retrieval import kinds as K  # noqa: E402
from xmodal.retrieval.index import EmbeddingIndex  # noqa: E402
from xmodal.retrieval.tuning import exact_top, recall_at, tune  # noqa: E402


def clustered(rng, n: int, d: int, clusters: int, spread: float) -> np.ndarray:
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        x = centres[rng.integers(0, clusters, m)] + spread * rng.standard_normal((m, d)).astype(np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def file_bytes(index) -> int:
    with tempfile.NamedTemporaryFile(suffix=".faiss") as f:
        faiss.write_index(index, f.name)
        return os.path.getsize(f.name)


def timed(peers: dict, q: np.ndarray, batch: int, rounds: int) -> dict:
    times = {name: [] for name in peers}
    for name in peers:
        peers[name](q[:batch])  # warm-up
    for r in range(rounds):
        names = list(peers)[r % len(peers):] + list(peers)[:r % len(peers)]
        chunk = q[(r * batch) % max(1, len(q) - batch):][:batch]
        for name in names:
            t0 = time.perf_counter()
            peers[name](chunk)
            times[name].append(time.perf_counter() - t0)
    out = {name: statistics.median(ts) / len(chunk) * 1e3 for name, ts in times.items()}  # ms per query
    if "faiss" in times:
        out["ratio"] = statistics.median(a / b for a, b in zip(times["xmodal"], times["faiss"]))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.5, help="noise around each centre (per coordinate)")
    p.add_argument("--vectors", default=None, help=".npy of your own embeddings (rows)")
    p.add_argument("--queries", default=None, help=".npy of held-out query embeddings (default: synthetic)")
    p.add_argument("--kinds", nargs="+", default=["flat", "int8", "binary", "ivfpq"], choices=list(K.KINDS))
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--tune-queries", type=int, default=200)
    p.add_argument("--test-queries", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    if args.vectors:
        x = np.ascontiguousarray(np.load(args.vectors).astype(np.float32))
        q = np.load(args.queries).astype(np.float32) if args.queries else x[rng.choice(len(x), 700)] + 0.05 * \
            rng.standard_normal((700, x.shape[1])).astype(np.float32)
        source = f"{args.vectors} ({len(x):,} x {x.shape[1]})"
    else:
        x = clustered(rng, args.n + args.tune_queries + args.test_queries, args.dim, args.clusters, args.spread)
        x, q = x[:args.n], x[args.n:]
        source = f"synthetic: {args.n:,} unit vectors x {args.dim}-d around {args.clusters} centres, spread " \
                 f"{args.spread}"
    q = np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True))
    q_tune, q_test = q[:args.tune_queries], q[args.tune_queries:args.tune_queries + args.test_queries]
    print(f"compressed index benchmark: {platform.machine()}, {os.cpu_count()} cores, faiss {faiss.__version__}; "
          f"threads {args.threads}; {source}; target recall@10 {args.target_recall}", flush=True)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    ids = np.arange(len(x))
    truth = exact_top(x, ids, q_test, 10)
    rows = []
    for kind in args.kinds:
        t0 = time.perf_counter()
        index = EmbeddingIndex(x.shape[1], kind)
        index.add(x)
        build_s = time.perf_counter() - t0
        tuned = tune(index, x, q_tune, args.target_recall) if kind in K.KNOB else None
        rec = recall_at([[h.id for h in row] for row in index.search(q_test, 10)], truth)
        params = index._params(None, 10, None, None)
        raw = index._index
        peers = {"xmodal": lambda qq: index.search(qq, 10),
                 "faiss": (lambda qq: raw.search(qq, 10, params=params)) if kind != "binary" else
                 (lambda qq: raw.search(qq, 10 * index.options["rescore"]))}
        single, batch = timed(peers, q_test, 1, args.rounds * 4), timed(peers, q_test, args.batch, args.rounds)
        size = file_bytes(raw)
        setting = f"{tuned['knob']}={tuned['value']}" if tuned else "-"
        row = dict(kind=kind, setting=setting, recall=rec, bytes=size / len(x), code=K.code_bytes(kind, x.shape[1],
                   index.options), build_s=build_s, single=single, batch=batch)
        rows.append(row)
        print(f"{kind:7s} {setting:12s} recall@10 {rec:.3f}  {row['bytes']:7.1f} B/vector (codes "
              f"{row['code']:.0f})  build {build_s:5.1f} s  1 query: xmodal {single['xmodal']:.3f} ms, faiss "
              f"{single['faiss']:.3f} ms (x{single['ratio']:.2f})  batch {args.batch}: xmodal {batch['xmodal']:.3f} "
              f"ms/q, faiss {batch['faiss']:.3f} ms/q (x{batch['ratio']:.2f})", flush=True)
        del index, raw
    flat = next((r for r in rows if r["kind"] == "flat"), None)
    if flat:
        for r in rows:
            print(f"{r['kind']:7s} speed vs flat: 1 query {flat['single']['xmodal'] / r['single']['xmodal']:.1f}x, "
                  f"batch {flat['batch']['xmodal'] / r['batch']['xmodal']:.1f}x; bytes {r['bytes']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
