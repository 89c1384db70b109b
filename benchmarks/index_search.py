"""Query latency / throughput of xmodal's EmbeddingIndex vs faiss called directly vs a torch matmul + topk.

    .venv/bin/python benchmarks/index_search.py                      # 100k and 1M items of 256-d (a few minutes)
    .venv/bin/python benchmarks/index_search.py --sizes 20000 --rounds 3 --hnsw-max-n 20000   # a quick look

What is compared, for each collection size (random L2-normalised vectors, inner product = cosine):

* ``torch``        — exact top-k: ``q @ x.T`` then ``topk`` (the brute force anyone can write);
* ``<kind>/faiss`` — the faiss index inside an :class:`xmodal.retrieval.index.EmbeddingIndex`, searched directly
  (``index._index.search(q, k, params=...)``, the same search parameters xmodal passes);
* ``<kind>/xmodal``— ``EmbeddingIndex.search(q, k)``: the same faiss call plus xmodal's wrapper (input checks, id →
  metadata lookup, ``Hit`` objects). ``xmodal / faiss`` is the wrapper's overhead.

Each index kind is built once per size. Approximate kinds get the smallest search setting (HNSW ``efSearch``, IVF
``nprobe``) whose recall@10 against exact search reaches ``--target-recall`` on a separate set of tuning queries;
the recall reported is then measured on the benchmark queries through ``EmbeddingIndex.search``. Random vectors are
a pessimistic case for approximate search (no cluster structure, full intrinsic dimension): real embeddings need far
smaller settings for the same recall.

Timing: the peers are interleaved because the machine is shared and noisy. Latency = one query per call: each query
goes to every peer back to back (rotating the order), ``--latency-queries`` queries per round; the ratios are medians
of the per-query paired ratios, the p50 / p90 over all queries. Throughput = one call with a batch of ``--batch``
queries per peer per round (rotated order); ratios are medians of the per-round paired ratios. Searches use
``--threads`` threads (faiss OpenMP and torch intra-op, default 1: stable figures on a shared machine); index builds
use every core.

Memory per kind: bytes per vector of the faiss index (its serialized size / n; excludes xmodal's per-row metadata)
and the process RSS growth while building it (faiss + xmodal's metadata dicts, after ``malloc_trim``).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from xmodal.retrieval.index import EmbeddingIndex  # noqa: E402

K = 10


# --------------------------------------------------------------------------------------------------------- utils

def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def unit_vectors(rng: np.random.Generator, n: int, d: int, chunk: int = 200_000) -> np.ndarray:
    x = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[s:s + len(block)] = block
    return x


def exact_topk(xt: torch.Tensor, q: np.ndarray, k: int = K) -> np.ndarray:
    out = []
    for s in range(0, len(q), 64):
        out.append((torch.from_numpy(q[s:s + 64]) @ xt.T).topk(k, dim=1).indices.numpy())
    return np.concatenate(out)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / truth.shape[1] for a, b in zip(found, truth)]))


def faiss_file_bytes(index) -> int:
    with tempfile.NamedTemporaryFile(dir=os.environ.get("TMPDIR", "/tmp"), suffix=".faiss") as f:
        faiss.write_index(index, f.name)
        return os.path.getsize(f.name)


def grid(upto: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, ... (steps of about sqrt 2) up to ``upto`` (included)."""
    vals, v = [], 1
    while v < upto:
        vals.append(v)
        v = v + 1 if v < 2 else (v * 3 // 2 if (v & (v - 1)) == 0 else v * 4 // 3)
    return vals + [upto]


# ---------------------------------------------------------------------------------------------------- build/tune

def build(kind: str, x: np.ndarray, args) -> tuple[EmbeddingIndex, dict]:
    n, d = x.shape
    trim()
    before = rss_bytes()
    t0 = time.perf_counter()
    if kind == "flat":
        index = EmbeddingIndex(d, "flat")
    elif kind == "hnsw":
        index = EmbeddingIndex(d, "hnsw", M=args.hnsw_m, ef_construction=args.ef_construction)
    else:
        nlist = args.nlist or max(1, round(math.sqrt(n)))
        index = EmbeddingIndex(d, "ivf", nlist=nlist)
    index.add(x)  # metadata {} per row, as for an index of ids only
    build_s = time.perf_counter() - t0
    trim()
    grown = rss_bytes() - before
    size = faiss_file_bytes(index._index)
    info = {"build_s": build_s, "rss_delta_bytes": grown, "faiss_bytes": size, "faiss_bytes_per_vector": size / n,
            "rss_bytes_per_vector": grown / n, "options": dict(index.options)}
    return index, info


def faiss_params(index: EmbeddingIndex):
    return index._params(None, K, None, None)


def tune(index: EmbeddingIndex, q: np.ndarray, truth: np.ndarray, target: float) -> tuple[dict, list]:
    """Smallest efSearch / nprobe with recall@10 >= target (faiss direct on the tuning queries)."""
    if index.kind == "flat":
        return {}, []
    curve = []
    if index.kind == "hnsw":
        values, name = [v for v in grid(1 << 14) if v >= K], "ef_search"
    else:
        values, name = grid(index.options["nlist"]), "nprobe"
    chosen = values[-1]
    for v in values:
        params = (faiss.SearchParametersHNSW(efSearch=v) if index.kind == "hnsw"
                  else faiss.SearchParametersIVF(nprobe=v))
        _, ids = index._index.search(q, K, params=params)
        r = recall(ids, truth)
        curve.append((v, r))
        if r >= target:
            chosen = v
            break
    if index.kind == "hnsw":
        index.options["ef_search"] = chosen
    else:
        index.options["nprobe"] = chosen
        index._index.nprobe = chosen
    return {name: chosen}, curve


# ------------------------------------------------------------------------------------------------------- timing

def with_blas_threshold(fn, threshold: int):
    """Run ``fn`` with faiss's ``distance_compute_blas_threshold`` set to ``threshold`` (then restore it)."""
    def call(q):
        old = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = threshold
        try:
            return fn(q)
        finally:
            faiss.cvar.distance_compute_blas_threshold = old
    return call


def peers_for(indexes: dict[str, EmbeddingIndex], xt: torch.Tensor) -> dict:
    peers = {"torch": lambda q: (torch.from_numpy(q) @ xt.T).topk(K, dim=1)}
    for kind, index in indexes.items():
        params = faiss_params(index)
        peers[f"{kind}/faiss"] = (lambda ix, p: lambda q: ix._index.search(q, K, params=p))(index, params)
        peers[f"{kind}/xmodal"] = (lambda ix: lambda q: ix.search(q, K))(index)
        if kind == "flat":  # faiss's flat search with its BLAS path for batches of >= 20 queries (its pre-1.9 default)
            peers["flat/xmodal+blas"] = with_blas_threshold(peers["flat/xmodal"], 20)
    return peers


def measure(peers: dict, q_lat: np.ndarray, q_batch: np.ndarray, rounds: int, per_round: int) -> dict:
    """Latency: each single query is sent to every peer back to back (the order rotating from query to query), so
    paired ratios compare calls made within milliseconds of each other. Throughput: per round, one batch call per
    peer (rotated order), ratios within the round. Ratios are medians of the paired ratios."""
    names = list(peers)
    for name in names:  # warm-up, untimed
        peers[name](q_lat[:1])
        peers[name](q_batch[:8])
    lat = {n: [] for n in names}          # one entry per query, aligned across peers (s)
    batch_s = {n: [] for n in names}      # one entry per round (s)
    j = 0
    for r in range(rounds):
        gc.collect()
        for i in range(per_round):
            qi = q_lat[(r * per_round + i) % len(q_lat)][None, :]
            order = names[j % len(names):] + names[:j % len(names)]
            j += 1
            for name in order:
                t0 = time.perf_counter()
                peers[name](qi)
                lat[name].append(time.perf_counter() - t0)
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order[::-1]:
            t0 = time.perf_counter()
            peers[name](q_batch)
            batch_s[name].append(time.perf_counter() - t0)
    out = {}
    for name in names:
        xs = sorted(lat[name])
        out[name] = {"lat_p50_ms": statistics.median(xs) * 1e3, "lat_p90_ms": xs[int(0.9 * (len(xs) - 1))] * 1e3,
                     "qps": statistics.median(len(q_batch) / t for t in batch_s[name])}

    def paired(a: list, b: list) -> float:
        return statistics.median(x / y for x, y in zip(a, b))

    for name in names:
        base = name.split("/")[0] + "/faiss"
        if "/xmodal" in name:
            out[name]["lat_vs_faiss"] = paired(lat[name], lat[base])
            out[name]["qps_vs_faiss"] = paired(batch_s[base], batch_s[name])
        if name != "torch":
            out[name]["lat_speedup_vs_torch"] = paired(lat["torch"], lat[name])
            out[name]["qps_speedup_vs_torch"] = paired(batch_s["torch"], batch_s[name])
    return out


# --------------------------------------------------------------------------------------------------------- main

def run_size(n: int, args, rng: np.random.Generator) -> dict:
    t_start = time.perf_counter()
    d = args.dim
    print(f"\n=== n={n:,} d={d} ===", flush=True)
    x = unit_vectors(rng, n, d)
    q_tune = unit_vectors(rng, args.tune_queries, d)
    q_bench = unit_vectors(rng, max(args.batch, args.latency_queries * args.rounds), d)
    xt = torch.from_numpy(x)
    torch.set_num_threads(os.cpu_count() or 1)
    truth_tune = exact_topk(xt, q_tune)
    truth_bench = exact_topk(xt, q_bench)
    kinds = [k for k in args.kinds if not (k == "hnsw" and n > args.hnsw_max_n)]
    skipped = [k for k in args.kinds if k not in kinds]
    indexes, info = {}, {}
    for kind in kinds:
        faiss.omp_set_num_threads(os.cpu_count() or 1)  # builds use every core
        index, meta = build(kind, x, args)
        faiss.omp_set_num_threads(args.threads)
        setting, curve = tune(index, q_tune, truth_tune, args.target_recall)
        found = np.array([[h.id for h in row] for row in index.search(q_bench, K)])
        meta.update(setting=setting, tune_curve=curve, recall_at_10=recall(found, truth_bench))
        indexes[kind], info[kind] = index, meta
        shown = ", ".join(f"{k}={v}" for k, v in {**meta["options"], **setting}.items())
        print(f"built {kind:5s} in {meta['build_s']:6.1f} s  ({shown})  recall@10={meta['recall_at_10']:.3f}  "
              f"faiss {meta['faiss_bytes_per_vector']:.0f} B/vector  RSS +{meta['rss_delta_bytes'] / 2**20:.0f} MiB",
              flush=True)
        if curve:
            print("   tuning (setting, recall@10): " + ", ".join(f"({v}, {r:.3f})" for v, r in curve), flush=True)
    for kind in skipped:
        print(f"skipped {kind} at n={n:,} (--hnsw-max-n {args.hnsw_max_n}): see the notes", flush=True)

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    timing = measure(peers_for(indexes, xt), q_bench, q_bench[:args.batch], args.rounds, args.latency_queries)
    print(f"\n{'peer':17s} {'setting':24s} {'recall@10':>9s} {'lat p50 ms':>10s} {'lat p90 ms':>10s} "
          f"{'QPS b=' + str(args.batch):>10s} {'lat x/faiss':>11s} {'QPS x/faiss':>11s} {'lat vs torch':>12s} "
          f"{'QPS vs torch':>12s}")
    for name, t in timing.items():
        kind = name.split("/")[0]
        setting = ", ".join(f"{k}={v}" for k, v in info.get(kind, {}).get("setting", {}).items()) or \
            ("exact" if kind in ("torch", "flat") else "")
        rec = 1.0 if name == "torch" else info[kind]["recall_at_10"]

        def fmt(key, suffix="x"):
            return f"{t[key]:.2f}{suffix}" if key in t else "-"

        print(f"{name:17s} {setting:24s} {rec:9.3f} {t['lat_p50_ms']:10.3f} {t['lat_p90_ms']:10.3f} {t['qps']:10.0f} "
              f"{fmt('lat_vs_faiss'):>11s} {fmt('qps_vs_faiss'):>11s} {fmt('lat_speedup_vs_torch'):>12s} "
              f"{fmt('qps_speedup_vs_torch'):>12s}", flush=True)
    print(f"\n{'kind':6s} {'build s':>8s} {'faiss B/vector':>14s} {'faiss MiB':>10s} {'RSS delta MiB':>13s} "
          f"{'RSS B/vector':>12s}")
    for kind, m in info.items():
        print(f"{kind:6s} {m['build_s']:8.1f} {m['faiss_bytes_per_vector']:14.1f} {m['faiss_bytes'] / 2**20:10.1f} "
              f"{m['rss_delta_bytes'] / 2**20:13.1f} {m['rss_bytes_per_vector']:12.1f}")
    total = time.perf_counter() - t_start
    print(f"(n={n:,}: {total:.0f} s in all)", flush=True)
    del indexes
    trim()
    return {"n": n, "dim": d, "kinds": info, "skipped": skipped, "timing": timing, "seconds": total}


def overhead_floor(args, rng: np.random.Generator, n: int = 1000, calls: int = 400) -> dict:
    """The wrapper's fixed cost per call, where faiss itself is fast: a flat index of ``n`` vectors, interleaved
    single-query (and batch) calls, median per-call times."""
    x, q = unit_vectors(rng, n, args.dim), unit_vectors(rng, calls, args.dim)
    index = EmbeddingIndex(args.dim, "flat")
    index.add(x)
    faiss.omp_set_num_threads(args.threads)
    peers = {"faiss": lambda qq: index._index.search(qq, K), "xmodal": lambda qq: index.search(qq, K)}
    times = {name: [] for name in peers}
    batch = {name: [] for name in peers}
    for name in peers:
        peers[name](q[:1])
    for i in range(calls):
        for name in (list(peers) if i % 2 else list(peers)[::-1]):
            t0 = time.perf_counter()
            peers[name](q[i:i + 1])
            times[name].append(time.perf_counter() - t0)
        if i % 10 == 0:
            for name in peers:
                t0 = time.perf_counter()
                peers[name](q[:args.batch])
                batch[name].append(time.perf_counter() - t0)
    out = {f"{name}_single_us": statistics.median(t) * 1e6 for name, t in times.items()}
    out.update({f"{name}_batch{args.batch}_us": statistics.median(t) * 1e6 for name, t in batch.items()})
    out["overhead_single_us"] = statistics.median(a - b for a, b in zip(times["xmodal"], times["faiss"])) * 1e6
    out["overhead_batch_us"] = statistics.median(a - b for a, b in zip(batch["xmodal"], batch["faiss"])) * 1e6
    print(f"\nwrapper fixed cost (flat, n={n:,}, k={K}): single query faiss {out['faiss_single_us']:.0f} us, xmodal "
          f"{out['xmodal_single_us']:.0f} us (+{out['overhead_single_us']:.0f} us/call); batch of {args.batch}: "
          f"faiss {out[f'faiss_batch{args.batch}_us']:.0f} us, xmodal {out[f'xmodal_batch{args.batch}_us']:.0f} us "
          f"(+{out['overhead_batch_us']:.0f} us/call)", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--kinds", nargs="+", choices=["flat", "hnsw", "ivf"], default=["flat", "hnsw", "ivf"])
    p.add_argument("--threads", type=int, default=1, help="search threads (faiss and torch; default 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--latency-queries", type=int, default=20, help="single queries per round (each to every peer)")
    p.add_argument("--batch", type=int, default=32, help="queries per call for throughput")
    p.add_argument("--tune-queries", type=int, default=100)
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--nlist", type=int, default=None, help="ivf lists (default sqrt(n))")
    p.add_argument("--hnsw-max-n", type=int, default=200_000,
                   help="skip HNSW above this size (its build is the slow part: see docs/benchmarks.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    print(f"xmodal index benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"faiss {faiss.__version__}, torch {torch.__version__}, numpy {np.__version__}; search threads "
          f"{args.threads}, k={K}, rounds={args.rounds}, latency {args.latency_queries} queries/peer/round, "
          f"batch {args.batch}", flush=True)
    print("command: " + " ".join([Path(sys.executable).name, *sys.argv]), flush=True)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    floor = overhead_floor(args, rng)
    results = [run_size(n, args, rng) for n in args.sizes]
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "overhead_floor": floor, "results": results},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
