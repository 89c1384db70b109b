"""What checking a model folder costs against loading it: ``xmodal.load`` of the quickstart model
(configs/pretrain.yaml: EfficientNet-Lite0 + MiniLM + MLP projections, 108 MiB of safetensors) with the checks on
(the default: the card's own checksum, then the weights' size and sha256 against the card) and with them switched
off, interleaved in one process, the file in the page cache for both (as on any load after the first).

    .venv/bin/python benchmarks/verify_cost.py              # 7 rounds of each
    .venv/bin/python benchmarks/verify_cost.py --run RUN    # a model folder of your own
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401 - offline environment, thread policy, the repository on sys.path
import torch

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default=None, help="model folder (default: the quickstart model, saved to a temp dir)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else quickstart_model(Path(tmp) / "run")
        weights = run / model_files.WEIGHTS_NAME
        real_check = model_files.check_file
        xmodal.load(run)  # warm: page cache, imports, lazy module set-up
        on, off, checks = [], [], []
        for _ in range(args.rounds):
            on.append(timed(lambda: xmodal.load(run)))
            model_files.check_file = lambda *a, **k: None
            off.append(timed(lambda: xmodal.load(run)))
            model_files.check_file = real_check
            checks.append(timed(lambda: model_files.open_files(run)[2]()))  # card + seal + size + checksum
        xxh = statistics.median(timed(lambda: integrity.digest_file(weights)) for _ in range(args.rounds))
        sha = statistics.median(timed(lambda: integrity.digest_file(weights, "sha256")) for _ in range(args.rounds))
        size = weights.stat().st_size
    med = {k: statistics.median(v) for k, v in (("on", on), ("off", off), ("checks", checks))}
    print(f"model folder {run} ({size / 2**20:.1f} MiB of weights), {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"xmodal.load, checks on   median {med['on']:.3f} s  (min {min(on):.3f})")
    print(f"xmodal.load, checks off  median {med['off']:.3f} s  (min {min(off):.3f})")
    print(f"the checks alone         median {med['checks']:.3f} s  = {100 * med['checks'] / med['on']:.1f}% of "
          f"the load")
    print(f"hashing the weights      xxh3_128 {xxh:.3f} s ({size / 2**20 / xxh:.0f} MiB/s) = "
          f"{100 * xxh / med['on']:.1f}% of the load; sha256 {sha:.3f} s ({size / 2**20 / sha:.0f} MiB/s) = "
          f"{100 * sha / med['on']:.1f}%")
    print(f"on - off                 {med['on'] - med['off']:+.3f} s = "
          f"{100 * (med['on'] - med['off']) / med['off']:+.1f}%")


if __name__ == "__main__":
    main()
