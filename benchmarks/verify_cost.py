"""What checking a model folder costs against loading it: ``xmodal.load`` of the quickstart model
(configs/pretrain.yaml: EfficientNet-Lite0 + MiniLM + MLP projections, 108 MiB of safetensors) with the checks on
(the default: the card's own checksum, the weights' size, then their XXH3-128 computed from the tensors safetensors
mapped, in a thread while the model is built, before they are copied into it), with them switched off, and the previous way (a separate pass over
the file, hashed in a thread while the model is built), interleaved in one process (the order rotates from round
to round), the file in the page cache for all (as on any load after the first). Also times the hash alone: from
the mapped tensors (what loading does), over the file in a separate pass (what it did before), and sha256.

    .venv/bin/python benchmarks/verify_cost.py              # 15 rounds of each
    .venv/bin/python benchmarks/verify_cost.py --run RUN    # a model folder of your own
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import _common  # noqa: F401 - offline environment, thread policy, the repository on sys.path
import torch
from safetensors.torch import load_file

import xmodal
from xmodal import integrity, model_files
from xmodal.config import load_config
from xmodal.model import XModalModel

ROOT = Path(__file__).resolve().parents[1]


def quickstart_model(folder: Path) -> Path:
    cfg = load_config(ROOT / "configs" / "pretrain.yaml", [])
    return XModalModel(cfg.model).save(folder, extra={"step": 0})


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timed_both(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads): on a shared machine the CPU time is the steadier
    measure of the work a variant adds, the wall time what a user waits."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def spread(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4)
    return f"median {statistics.median(xs):.3f} s (quartiles {q[0]:.3f}-{q[2]:.3f}, min {min(xs):.3f})"


def load_variants(run: Path, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per round, in a rotating order: ``on`` (the default), ``off`` (no check), ``thread`` (the previous way: a
    separate pass hashing the file in a thread while the model is built and loaded, joined at the end)."""
    real_check = model_files.check_file
    weights = run / model_files.WEIGHTS_NAME

    def unchecked() -> None:
        model_files.check_file = lambda *a, **k: None
        try:
            xmodal.load(run)
        finally:
            model_files.check_file = real_check

    def threaded() -> None:
        t = threading.Thread(target=integrity.digest_file, args=(weights,))
        t.start()
        unchecked()
        t.join()
    variants = {"on": lambda: xmodal.load(run), "off": unchecked, "thread": threaded}
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for i in range(rounds):
        for name in names[i % 3:] + names[:i % 3]:
            wall, used = timed_both(variants[name])
            times[name].append(wall)
            cpu[name].append(used)
    return times, cpu


def hash_times(weights: Path, rounds: int) -> dict[str, float]:
    tensors = load_file(str(weights))
    out = {"mapped": [], "file": [], "sha256": []}
    for _ in range(rounds):
        out["mapped"].append(timed(lambda: integrity.mapped_safetensors_digest(weights, tensors)))
        out["file"].append(timed(lambda: integrity.digest_file(weights)))
        out["sha256"].append(timed(lambda: integrity.digest_file(weights, "sha256")))
    assert integrity.mapped_safetensors_digest(weights, tensors) == integrity.digest_file(weights)
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="model folder (default: the quickstart model, saved to a temp dir)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else quickstart_model(Path(tmp) / "run")
        weights = run / model_files.WEIGHTS_NAME
        xmodal.load(run)  # warm: page cache, imports, lazy module set-up
        times, cpu = load_variants(run, args.rounds)
        hashes = hash_times(weights, args.rounds)
        size = weights.stat().st_size
    on, off, thread = times["on"], times["off"], times["thread"]
    med_off = statistics.median(off)
    print(f"model folder {run} ({size / 2**20:.1f} MiB of weights), {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"xmodal.load, checks on        {spread(on)}")
    print(f"xmodal.load, checks off       {spread(off)}")
    print(f"a separate pass in a thread   {spread(thread)}")
    for name, xs in (("on", on), ("thread", thread)):
        diffs = [a - b for a, b in zip(xs, off)]  # per round: the two ran back to back
        q = statistics.quantiles(diffs, n=4)
        print(f"{name} - off: medians {statistics.median(xs) - med_off:+.3f} s = "
              f"{100 * (statistics.median(xs) - med_off) / med_off:+.1f}%; per round: median "
              f"{statistics.median(diffs):+.3f} s, quartiles {q[0]:+.3f} to {q[2]:+.3f}")
    cpu_off = statistics.median(cpu["off"])
    for name in ("on", "thread"):
        diffs = [a - b for a, b in zip(cpu[name], cpu["off"])]
        q = statistics.quantiles(diffs, n=4)
        print(f"CPU time, {name} - off: medians {statistics.median(cpu[name]) - cpu_off:+.3f} s = "
              f"{100 * (statistics.median(cpu[name]) - cpu_off) / cpu_off:+.1f}% of {cpu_off:.3f} s; per round: "
              f"median {statistics.median(diffs):+.3f} s, quartiles {q[0]:+.3f} to {q[2]:+.3f}")
    for name, label in (("mapped", "xxh3_128 of the mapped tensors"), ("file", "xxh3_128, a pass over the file"),
                        ("sha256", "sha256, a pass over the file")):
        t = hashes[name]
        print(f"{label:32s} {t:.4f} s ({size / 2**20 / t:.0f} MiB/s) = {100 * t / med_off:.1f}% of the load")


if __name__ == "__main__":
    main()
