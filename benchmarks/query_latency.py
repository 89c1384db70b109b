"""How long one text query takes: ``xmodal query`` (a fresh process: imports, model load, search) with the page
cache cold and warm, ``xmodal serve``'s per-request latency (the model loaded once, kept warm), and a fresh
``xmodal query --server URL`` process asking that server (no torch imported).

``--baseline PATH`` also times ``xmodal query`` from another checkout (``PYTHONPATH=PATH``, e.g. the main branch)
interleaved with this one, in random order each round, so both meet the same machine load.

Cold: before each cold run the run folder's files (its ``model.safetensors``), the index and the checkouts'
``xmodal/`` sources are dropped from the page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)`` — a first query
after training or after the machine has been busy with other files. The Python packages (torch, transformers) are
left cached: on a machine where other people's processes use the same environment, evicting it would slow them down
(``--cold-packages`` evicts the environment's site-packages too, for a machine of your own).

    python benchmarks/query_latency.py --index /tmp/idx --rounds 5
    python benchmarks/query_latency.py --index /tmp/idx --baseline /work/main --rounds 5 --serve-requests 200
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import resource
import socket
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUERIES = ["a red car", "a cat sleeping", "a blue star shape", "a tree in winter", "a cup of coffee",
           "a computer keyboard", "an arrow pointing left", "a smiling face", "a musical note", "a house"]


def drop_page_cache(paths: list[Path]) -> int:
    """Ask the kernel to drop these files' cached pages; the number of files asked about."""
    n = 0
    for top in paths:
        files = [top] if top.is_file() else (p for p in top.rglob("*") if p.is_file())
        for p in files:
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


def time_query(pythonpath: Path, index: str, text: str) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of one ``xmodal query`` process."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "xmodal.cli", "query", "--index", index, "--text", text, "-k", "5",
                          "--json"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise SystemExit(f"xmodal query failed ({pythonpath}): {out.stderr.strip()[-500:]}")
    json.loads(out.stdout)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def serve_latency(index: str, requests: int, cli_queries: int = 0) -> tuple[list[float], list[tuple[float, float]]]:
    """Seconds per ``POST /api/search`` of a text query against a running ``xmodal serve`` (after one warm-up), and
    (wall, CPU) seconds of ``cli_queries`` fresh ``xmodal query --server`` processes asking it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "xmodal.cli", "serve", "--index", index, "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # "xmodal serve: http://...": the model is loaded
        if not re.search(r"http://", line):
            raise SystemExit(f"xmodal serve did not start: {line}{proc.stdout.read()[-500:]}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        times = []
        for i in range(requests + 1):
            body = json.dumps({"text": QUERIES[i % len(QUERIES)], "k": 5}).encode()
            t = time.perf_counter()
            conn.request("POST", "/api/search", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise SystemExit(f"serve answered {resp.status}: {data[:300]!r}")
            if i:  # the first request warms the tokenizer and allocator
                times.append(time.perf_counter() - t)
        cli = []
        for i in range(cli_queries):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "xmodal.cli", "query", "--server", f"http://127.0.0.1:{port}",
                                  "--text", QUERIES[i % len(QUERIES)], "-k", "5", "--json"], env=env,
                                 capture_output=True, text=True)
            wall = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if out.returncode != 0:
                raise SystemExit(f"xmodal query --server failed: {out.stderr.strip()[-500:]}")
            json.loads(out.stdout)
            cli.append((wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)))
        return times, cli
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", required=True, help="an index folder written by `xmodal index` (its run is used)")
    p.add_argument("--baseline", type=Path, default=None, help="another checkout to time side by side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--serve-requests", type=int, default=100)
    p.add_argument("--server-queries", type=int, default=10, help="fresh `xmodal query --server` processes timed")
    p.add_argument("--cold-packages", action="store_true", help="also evict site-packages (your own machine only)")
    a = p.parse_args()
    info = json.loads((Path(a.index) / "index.json").read_text())
    run = Path((info.get("model") or info.get("model_info") or {}).get("run_dir", ""))
    cold_paths = [run, Path(a.index), ROOT / "xmodal"]
    if a.cold_packages:
        cold_paths.append(Path(sysconfig.get_paths()["purelib"]))
    sides = {"this checkout": ROOT, **({"baseline": a.baseline} if a.baseline else {})}
    if a.baseline:
        cold_paths.append(a.baseline / "xmodal")
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    rng = random.Random(0)
    for r in range(a.rounds):
        for name in rng.sample(list(sides), len(sides)):
            drop_page_cache(cold_paths)
            results.setdefault((name, "cold"), []).append(time_query(sides[name], a.index, QUERIES[r % 10]))
            results.setdefault((name, "warm"), []).append(time_query(sides[name], a.index, QUERIES[r % 10]))
            print(f"round {r + 1} {name}: cold {results[name, 'cold'][-1][0]:.2f} s, "
                  f"warm {results[name, 'warm'][-1][0]:.2f} s", flush=True)
    load = os.getloadavg()[0]
    print(f"xmodal query, {a.rounds} rounds, medians (load average {load:.1f} on {os.cpu_count()} CPUs)")
    print(f"{'checkout':<15} {'cache':<5} {'wall s':>7} {'cpu s':>6}")
    for (name, cache), v in results.items():
        print(f"{name:<15} {cache:<5} {statistics.median(w for w, _ in v):>7.2f} "
              f"{statistics.median(c for _, c in v):>6.2f}")
    if a.serve_requests:
        times, cli = serve_latency(a.index, a.serve_requests, a.server_queries)
        t = sorted(times)
        print(f"xmodal serve, {len(t)} text queries one after another: median {statistics.median(t) * 1e3:.1f} ms, "
              f"p90 {t[int(0.9 * (len(t) - 1))] * 1e3:.1f} ms, max {t[-1] * 1e3:.1f} ms")
        if cli:
            print(f"xmodal query --server (a fresh process asking it), {len(cli)} queries: median wall "
                  f"{statistics.median(w for w, _ in cli):.3f} s, max {max(w for w, _ in cli):.3f} s, median CPU "
                  f"{statistics.median(c for _, c in cli):.3f} s")


if __name__ == "__main__":
    main()
