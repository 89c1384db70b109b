"""The frozen-feature cache's key → row lookup at 100k vs 1M cached rows: memory and time per key, for the on-disk
index xmodal uses (each shard's keys stored sorted and memory-mapped, binary-searched a batch at a time:
xmodal/feature_index.py), SQLite (a ``key → (shard, row)`` table beside the shards, the alternative weighed) and a
Python dict of every key (what the in-memory manifest path holds).

Each (method, rows) is measured in a fresh subprocess: open the index, then look up ``--queries`` keys (half of them
cached, half not) in batches of 256, as a DataLoader worker does. Reported: the heap (``RssAnon``: what the process
itself holds; file pages of a memory map are the kernel's page cache, shared and evictable), the whole RSS, and
microseconds per key looked up. The shards are written once per size through ``FeatureStore.write`` (16 float32
features a row: the features' width changes the disk, not the lookup).

    python benchmarks/feature_lookup.py --rows 100000 1000000 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

ROWS_PER_SHARD = 32768  # 64 MB of 512-d float32 features: the size FeatureStore shards reach in training
BATCH = 256


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def build(folder: Path, rows: int) -> None:
    """``rows`` random keys in shards of ROWS_PER_SHARD, and the SQLite table of the same keys."""
    from xmodal.feature_store import FeatureStore

    store = FeatureStore(folder / "tower")
    rng = np.random.default_rng(0)
    db = sqlite3.connect(folder / "index.sqlite")
    db.execute("CREATE TABLE rows (key BLOB PRIMARY KEY, shard INTEGER, row INTEGER) WITHOUT ROWID")
    for s, start in enumerate(range(0, rows, ROWS_PER_SHARD)):
        n = min(ROWS_PER_SHARD, rows - start)
        keys = [bytes(k) for k in rng.integers(0, 256, (n, 16), dtype=np.uint8)]
        store.write(keys, rng.standard_normal((n, 16), dtype=np.float32))
        db.executemany("INSERT INTO rows VALUES (?, ?, ?)", ((k, s, r) for r, k in enumerate(sorted(keys))))
    db.commit()
    db.close()


def _queries(folder: Path, n: int) -> list[bytes]:
    """Half cached keys (read from the shards), half new ones, shuffled."""
    from safetensors.numpy import load_file

    shards = sorted((folder / "tower").glob("*.safetensors"))
    rng = np.random.default_rng(1)
    keys = []
    for i in range(n // 2):
        t = load_file(str(shards[i % len(shards)]))["keys"]
        keys.append(bytes(t[rng.integers(len(t))]))
    keys += [bytes(k) for k in rng.integers(0, 256, (n - n // 2, 16), dtype=np.uint8)]
    rng.shuffle(keys)
    return keys


def child(method: str, folder: Path, queries: Path) -> dict:
    """In a fresh process: open ``method``'s index, look the queries up; memory and time."""
    from xmodal.feature_index import FeatureIndex
    from xmodal.feature_store import FeatureStore

    keys = [bytes.fromhex(k) for k in json.loads(queries.read_text())]
    anon0, rss0 = _status_kb("RssAnon"), _status_kb("VmRSS")
    t0 = time.perf_counter()
    if method == "sorted memmap":
        FeatureStore._verified.update(  # checked by the parent (SHA-256 of each shard): not part of a lookup
            (str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in (folder / "tower").glob("*.safetensors"))
        index = FeatureIndex(FeatureStore(folder / "tower"))
        index.refresh()
        look = index.lookup
    elif method == "sqlite":
        db = sqlite3.connect(folder / "index.sqlite")

        def look(batch):
            q = f"SELECT key, shard, row FROM rows WHERE key IN ({','.join('?' * len(batch))})"
            found = {k: (s, r) for k, s, r in db.execute(q, batch)}
            return [found.get(k) for k in batch]
    else:
        from safetensors.numpy import load_file
        rows: dict[bytes, int] = {}
        for p in sorted((folder / "tower").glob("*.safetensors")):
            for k in load_file(str(p))["keys"]:
                rows[k.tobytes()] = len(rows)

        def look(batch):
            return [rows.get(k) for k in batch]
    opened = time.perf_counter() - t0
    hits, t0 = 0, time.perf_counter()
    for i in range(0, len(keys), BATCH):
        hits += sum(v is not None for v in look(keys[i:i + BATCH]))
    per_key = (time.perf_counter() - t0) / len(keys)
    return {"heap_mb": (_status_kb("RssAnon") - anon0) / 1024, "rss_mb": (_status_kb("VmRSS") - rss0) / 1024,
            "open_s": opened, "us_per_key": per_key * 1e6, "hits": hits, "keys": len(keys)}


METHODS = ["sorted memmap", "sqlite", "dict"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--queries", type=int, default=50_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child[0], Path(a.child[1]), Path(a.child[2]))))
        return
    results: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="xmodal-lookup-") as tmp:
        for rows in a.rows:
            folder = Path(tmp) / str(rows)
            t0 = time.perf_counter()
            build(folder, rows)
            queries = folder / "queries.json"
            queries.write_text(json.dumps([k.hex() for k in _queries(folder, a.queries)]))
            print(f"{rows} rows: shards and SQLite table written in {time.perf_counter() - t0:.0f} s; disk "
                  f"{sum(f.stat().st_size for f in (folder / 'tower').glob('*.safetensors')) / 1e6:.0f} MB shards, "
                  f"{(folder / 'index.sqlite').stat().st_size / 1e6:.0f} MB SQLite", flush=True)
            for _ in range(a.rounds):  # interleaved: the machine is shared
                for method in METHODS:
                    out = subprocess.run([sys.executable, __file__, "--child", method, str(folder), str(queries)],
                                         capture_output=True, text=True, check=True, env={**os.environ})
                    results.setdefault((method, rows), []).append(json.loads(out.stdout))
    print(f"\n{a.queries} look-ups in batches of {BATCH} (half cached), medians of {a.rounds} fresh processes; "
          f"[min-max] of the time")
    print("| method | rows | heap MB | RSS MB | open s | µs per key |")
    print("|---|---|---|---|---|---|")
    for (method, rows), rs in results.items():
        assert all(r["hits"] == a.queries // 2 for r in rs), (method, rows, rs)
        us = [r["us_per_key"] for r in rs]
        med = {k: statistics.median(r[k] for r in rs) for k in ("heap_mb", "rss_mb", "open_s")}
        print(f"| {method} | {rows:,} | {med['heap_mb']:.1f} | {med['rss_mb']:.1f} | {med['open_s']:.2f} | "
              f"{statistics.median(us):.2f} [{min(us):.2f}-{max(us):.2f}] |")
    for method in METHODS:
        lo, hi = (statistics.median(r["heap_mb"] for r in results[(method, n)]) for n in (min(a.rows), max(a.rows)))
        print(f"{method}: heap at {max(a.rows):,} / at {min(a.rows):,} rows = {hi:.1f} / {lo:.1f} MB")


if __name__ == "__main__":
    main()
