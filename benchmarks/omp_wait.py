"""Why xmodal sets OMP_WAIT_POLICY=PASSIVE: a 2-thread training step while another process holds one core.

Runs the same contrastive projection step (two MLP projections of cached tower features, CLIP loss, AdamW — the
step of the recommended config) in fresh subprocesses with the OpenMP wait policy unset (libgomp spins) and PASSIVE,
interleaved, each round with a busy-loop process pinned alongside to mimic a shared machine; prints median ms/step.

    .venv/bin/python benchmarks/omp_wait.py [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

STEP = r"""
import time, torch
from torch import nn
from xmodal.losses import ClipLoss
torch.manual_seed(0)
a = nn.Sequential(nn.Linear(1280, 1280), nn.GELU(), nn.Linear(1280, 256))
b = nn.Sequential(nn.Linear(384, 384), nn.GELU(), nn.Linear(384, 256))
s = nn.Parameter(torch.tensor(2.6))
opt = torch.optim.AdamW([*a.parameters(), *b.parameters(), s])
x, y, loss = torch.randn(256, 1280), torch.randn(256, 384), ClipLoss()
for i in range(25):
    if i == 5:
        t = time.perf_counter()
    l = loss(nn.functional.normalize(a(x), dim=-1), nn.functional.normalize(b(y), dim=-1), s.exp())
    opt.zero_grad(); l.backward(); opt.step()
print((time.perf_counter() - t) / 20 * 1000)
"""


def run(policy: str | None, threads: int) -> float:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["OMP_NUM_THREADS"] = str(threads)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # another job holding a core
    try:
        out = subprocess.run([sys.executable, "-c", STEP], env=env, capture_output=True, text=True, check=True)
    finally:
        busy.kill()
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    spin, passive = [], []
    for _ in range(args.rounds):
        spin.append(run(None, args.threads))
        passive.append(run("PASSIVE", args.threads))
    ms_spin, ms_passive = statistics.median(spin), statistics.median(passive)
    print(f"{args.threads} threads, one core busy: default (spin) {ms_spin:.0f} ms/step, PASSIVE {ms_passive:.0f} "
          f"ms/step, speed-up {ms_spin / ms_passive:.1f}x (median of {args.rounds})")


if __name__ == "__main__":
    main()
