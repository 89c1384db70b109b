"""Load on `xmodal serve`: concurrent clients sending valid and invalid searches; throughput, latency, statuses, RSS.

    .venv/bin/python benchmarks/server_load.py                          # 8 clients, 2000 requests (~1 min)
    .venv/bin/python benchmarks/server_load.py --clients 16 --requests 5000 --index indexes/images

The server is the real CLI (``python -m xmodal.cli serve``) in its own process, so its RSS is its own. Without
``--index``, a tiny model (a small CNN image tower and an LSTM text tower, random weights: retrieval quality is not
the point) is saved and an index of ``--rows`` images of ``--manifest`` is built in a temporary folder.

Each client thread opens one connection per request (the server speaks HTTP/1.0) and sends, by seeded draw:

====================  =====  ============================================================  ==========
kind                  share  request                                                       expected
====================  =====  ============================================================  ==========
``text``              60%    ``{"text": "<2-6 words>", "k": 1..10}``                       200
``image``             10%    ``{"image_base64": <a 32x32 PNG>, "k": 5}``                   200
``oversized``         7.5%   a body of ``--max-upload-mb`` + 64 KiB                        413
``bad_json``          7.5%   ``{"text": "unclosed``                                         400
``unknown_modality``  7.5%   ``{"audio_base64": "AAAA"}`` (the model has no audio tower)    422
``long_query``        7.5%   a text over ``max_query_chars``                                413
====================  =====  ============================================================  ==========

Reported: requests/s over the timed phase, latency p50/p95/p99 (all requests, and valid ones), counts by status,
requests answered with a status other than expected, and the server's RSS after warm-up, after the load, and its
peak (``VmHWM``). ``--max-concurrency`` defaults to ``--clients``, so valid requests are never refused as busy; set
it lower to see 503s (the bound at work).
"""
from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

WORDS = "a red blue green small big cat dog car house tree star flower bird fish sun moon heart icon logo".split()
MIX = [("text", 0.60), ("image", 0.10), ("oversized", 0.075), ("bad_json", 0.075), ("unknown_modality", 0.075),
       ("long_query", 0.075)]
EXPECTED = {"text": 200, "image": 200, "oversized": 413, "bad_json": 400, "unknown_modality": 422,
            "long_query": 413}
VALID = ("text", "image")


def _png() -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def make_requests(n: int, seed: int, max_body_bytes: int, max_query_chars: int = 1000) -> list[tuple[str, bytes]]:
    """``n`` (kind, JSON body) pairs drawn from ``MIX``."""
    rng = random.Random(seed)
    png = _png()
    kinds, weights = zip(*MIX)
    out = []
    for kind in rng.choices(kinds, weights, k=n):
        if kind == "text":
            body = json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(2, 6))), "k": rng.randint(1, 10)})
        elif kind == "image":
            body = json.dumps({"image_base64": png, "k": 5})
        elif kind == "oversized":
            body = json.dumps({"text": "x" * (max_body_bytes + 65536)})
        elif kind == "bad_json":
            body = '{"text": "unclosed'
        elif kind == "unknown_modality":
            body = json.dumps({"audio_base64": "AAAA"})
        else:
            body = json.dumps({"text": "word " * (max_query_chars // 5 + 1)})
        out.append((kind, body.encode()))
    return out


def post(host: str, port: int, body: bytes, timeout: float = 60.0) -> int:
    """POST /api/search; the status, or 0 when the connection failed (reset, timeout)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/api/search", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    except OSError:
        return 0
    finally:
        conn.close()


def run_load(host: str, port: int, requests: list[tuple[str, bytes]], clients: int) -> dict:
    """Send ``requests`` from ``clients`` threads (each takes the next one in turn); per-request results."""
    results: list[tuple[str, int, float]] = []
    lock, position = threading.Lock(), iter(range(len(requests)))

    def client():
        while True:
            with lock:
                i = next(position, None)
            if i is None:
                return
            kind, body = requests[i]
            t0 = time.perf_counter()
            status = post(host, port, body)
            took = time.perf_counter() - t0
            with lock:
                results.append((kind, status, took))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(results, time.perf_counter() - t0)


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] * 1000


def summarize(results: list[tuple[str, int, float]], elapsed: float) -> dict:
    lat = [t for _, _, t in results]
    valid = [t for kind, _, t in results if kind in VALID]
    wrong = Counter(f"{kind}->{status}" for kind, status, _ in results if status != EXPECTED[kind])
    return {"requests": len(results), "seconds": round(elapsed, 3), "requests_per_s": round(len(results) / elapsed, 1),
            "latency_ms": {"p50": _pct(lat, 50), "p95": _pct(lat, 95), "p99": _pct(lat, 99),
                           "mean": statistics.fmean(lat) * 1000 if lat else float("nan")},
            "valid_latency_ms": {"p50": _pct(valid, 50), "p95": _pct(valid, 95), "p99": _pct(valid, 99)},
            "by_kind": dict(Counter(kind for kind, _, _ in results)),
            "by_status": dict(sorted(Counter(status for _, status, _ in results).items())),
            "unexpected": dict(wrong), "server_errors": sum(1 for _, s, _ in results if s >= 500 or s == 0)}


def rss_kib(pid: int) -> dict[str, int]:
    """The process's resident set now (``VmRSS``) and its peak (``VmHWM``), in KiB (Linux)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def build_tiny_index(manifest: str, rows: int, folder: Path) -> Path:
    """A random-weights tiny model saved in ``folder/run`` and an image index of ``rows`` manifest rows."""
    import torch

    from xmodal.config import ModelConfig, TowerConfig
    from xmodal.data import read_manifest
    from xmodal.model import XModalModel
    from xmodal.retrieval.retriever import build_index

    torch.manual_seed(0)
    model = XModalModel(ModelConfig(embed_dim=32, towers={
        "image": TowerConfig(kind="cnn", image_size=32, options={"channels": [8, 16]}),
        "text": TowerConfig(kind="lstm", context_length=16, options={"embed_dim": 32, "hidden": 32})}))
    run = model.save(folder / "run")
    data = read_manifest(manifest, modalities=["image"], require_all=False, max_rows=rows)
    build_index(model, data, "image", folder / "index", run_dir=run, batch_size=64, progress=False)
    return folder / "index"


class Server:
    """``python -m xmodal.cli serve`` on 127.0.0.1, an ephemeral port; ``.host``, ``.port``, ``.pid``."""

    def __init__(self, index: Path, max_concurrency: int, max_upload_mb: float, extra: list[str] = ()):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "xmodal.cli", "serve", "--index", str(index), "--port", "0",
               "--max-concurrency", str(max_concurrency), "--max-upload-mb", str(max_upload_mb), *extra]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("xmodal serve: http://"):
            self.close()
            raise RuntimeError(f"xmodal serve did not start: {line!r}")
        host, port = line.split()[2].removeprefix("http://").rsplit(":", 1)
        self.host, self.port, self.pid = host, int(port), self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=2000, help="timed requests (after --warmup ones)")
    p.add_argument("--warmup", type=int, default=200, help="untimed requests first (RSS is read after them)")
    p.add_argument("--index", default=None, help="an index folder (default: build a tiny one)")
    p.add_argument("--manifest", default=str(ROOT / "data/openclipart/manifest.csv"))
    p.add_argument("--rows", type=int, default=500, help="rows of --manifest in the tiny index")
    p.add_argument("--max-concurrency", type=int, default=None, help="server search slots (default --clients)")
    p.add_argument("--max-upload-mb", type=float, default=1.0)
    p.add_argument("--max-batch", type=int, default=None,
                   help="serve's --max-batch (default: its own, 1 = every search on its own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="xmodal-load-") as tmp:
        index = Path(args.index) if args.index else build_tiny_index(args.manifest, args.rows, Path(tmp))
        max_body = int(args.max_upload_mb * 1024 * 1024)
        server = Server(index, args.max_concurrency or args.clients, args.max_upload_mb,
                        ["--max-batch", str(args.max_batch)] if args.max_batch else [])
        try:
            run_load(server.host, server.port, make_requests(args.warmup, args.seed + 1, max_body), args.clients)
            before = rss_kib(server.pid)
            stats = run_load(server.host, server.port, make_requests(args.requests, args.seed, max_body),
                             args.clients)
            after = rss_kib(server.pid)
        finally:
            server.close()
    stats.update(clients=args.clients, max_concurrency=args.max_concurrency or args.clients,
                 rss_mib={"after_warmup": round(before["VmRSS"] / 1024, 1),
                          "after_load": round(after["VmRSS"] / 1024, 1),
                          "growth": round((after["VmRSS"] - before["VmRSS"]) / 1024, 1),
                          "peak": round(after["VmHWM"] / 1024, 1)})
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        lat, val, rss = stats["latency_ms"], stats["valid_latency_ms"], stats["rss_mib"]
        print(f"{stats['requests']} requests, {args.clients} clients, {stats['seconds']:.1f} s: "
              f"{stats['requests_per_s']:.0f} requests/s")
        print(f"latency ms  all:   p50 {lat['p50']:.1f}  p95 {lat['p95']:.1f}  p99 {lat['p99']:.1f}")
        print(f"            valid: p50 {val['p50']:.1f}  p95 {val['p95']:.1f}  p99 {val['p99']:.1f}")
        print("by kind:   " + ", ".join(f"{k} {v}" for k, v in stats["by_kind"].items()))
        print("by status: " + ", ".join(f"{k} {v}" for k, v in stats["by_status"].items()))
        print(f"unexpected statuses: {stats['unexpected'] or 'none'}; 5xx / failed connections: "
              f"{stats['server_errors']}")
        print(f"server RSS MiB: {rss['after_warmup']} after warm-up, {rss['after_load']} after load "
              f"({rss['growth']:+.1f}), peak {rss['peak']}")
    return 0 if not stats["unexpected"] and not stats["server_errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
