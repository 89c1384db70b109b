"""Would lowering the training loader's workers in CPU priority (``os.nice``) speed the step? One real
``xmodal pretrain`` run (the CLI's ``main``, in this process) on the end-to-end benchmark's rows and model
(``benchmarks/end_to_end.py``: same CSV, open_clip config, batch, workers, threads), whose loader workers flip
between two niceness values every ``--block`` steps (``os.setpriority`` on the worker processes; lowering a
niceness again needs root, which this script checks). Interleaving the settings inside one run, block by block,
cancels the drift of a shared machine's load that separate runs cannot; each pair of neighbouring blocks gives one
ratio.

Reported: each setting's samples/s over its steps (the first two blocks left out), and the median (min-max) over
block pairs of time(A) / time(B) (above 1: B is faster).

    sudo .venv/bin/python benchmarks/worker_priority.py --model xmodal-vit-tiny --steps 200 --block 4
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.end_to_end import MODELS, write_inputs, write_model, xmodal_config  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="xmodal-vit-tiny", choices=sorted(MODELS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--block", type=int, default=4, help="steps per block of one setting")
    p.add_argument("--nice", default="0,10", help="the two niceness values A,B (added to this process's)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=40, help="train rows = rows × batch (epochs repeat)")
    p.add_argument("--work", type=Path, default=Path("/tmp") / f"xmodal-worker-priority-{os.getuid()}")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("worker_priority.py flips a niceness back down, which needs root")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before torch loads (the CLI import below)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    a, b = (int(v) for v in args.nice.split(","))
    base = os.getpriority(os.PRIO_PROCESS, 0)

    paths = write_inputs(args.work, args.rows, args.batch, 64, seed=0)
    model_dir = write_model(args.work, args.model)
    opts = SimpleNamespace(seed=0, workers=args.workers, batch=args.batch, warmup_lr_steps=5,
                           xmodal_set=[f"train.max_steps={args.steps}", "train.progress=false"], trial=[])
    out = args.work / "run"
    if out.exists():
        import shutil
        shutil.rmtree(out)
    config = xmodal_config(opts, paths, model_dir, args.model, out)

    import psutil

    import xmodal.training.engine as engine
    one_task_step, apply_gradients = engine.one_task_step, engine.apply_gradients
    steps: list[tuple[int, float]] = []  # (niceness, seconds) per optimiser step
    now = {"nice": None, "t0": 0.0}

    def timed_step(run, name):
        i = len(steps)
        if i % args.block == 0:  # a new block: set every worker (the loader's are this process's children)
            now["nice"] = a if (i // args.block) % 2 == 0 else b
            for child in psutil.Process().children(recursive=True):
                os.setpriority(os.PRIO_PROCESS, child.pid, min(19, base + now["nice"]))
        now["t0"] = time.perf_counter()
        return one_task_step(run, name)

    def timed_apply(run, *rest, **kw):
        result = apply_gradients(run, *rest, **kw)
        steps.append((now["nice"], time.perf_counter() - now["t0"]))
        return result

    engine.one_task_step, engine.apply_gradients = timed_step, timed_apply
    from xmodal.cli import main as cli
    load = os.getloadavg()[0]
    rc = cli(["pretrain", "--config", str(config)])
    if rc:
        raise SystemExit(f"xmodal pretrain failed (exit {rc})")
    kept = steps[2 * args.block:]
    print(f"# {args.model}, batch {args.batch}, {args.workers} workers, {args.threads} threads, {args.steps} steps "
          f"in blocks of {args.block}; load {load:.2f} -> {os.getloadavg()[0]:.2f}")
    for nice in (a, b):
        ts = [t for n, t in kept if n == nice]
        print(f"workers at nice {nice:2d}: {len(ts)} steps, {args.batch * len(ts) / sum(ts):.2f} samples/s, "
              f"median step {statistics.median(ts) * 1e3:.0f} ms")
    blocks = [kept[i:i + args.block] for i in range(0, len(kept) - args.block + 1, args.block)]
    ratios = []
    for first, second in zip(blocks[0::2], blocks[1::2]):
        ta, tb = (sum(t for _, t in blk) for blk in ((first, second) if first[0][0] == a else (second, first)))
        ratios.append(ta / tb)
    print(f"block time nice {a} / nice {b}: median {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f}) over {len(ratios)} pairs")


if __name__ == "__main__":
    main()
