"""Run-folder sizes of the quickstart config (configs/pretrain.yaml: frozen packaged EfficientNet-Lite0 and MiniLM
towers, MLP projections): checkpoints as xmodal wrote them before (every weight) against slim checkpoints (what
trains, plus a checksum reference to the frozen encoders), in one process, on the same data and steps.

"Before" is the same code with the slim save's hook switched off (``SlimSave.__call__`` made a no-op), which is
exactly what ``save_checkpoint`` wrote before slim checkpoints: Accelerate's whole state dict.

    .venv/bin/python benchmarks/checkpoint_size.py            # 2 optimiser steps on 64 Open Clip Art rows
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401 - offline environment, thread policy, the repository on sys.path

from xmodal.config import load_config
from xmodal.data.corpora.openclipart import prepare_openclipart
from xmodal.training import checkpoint_files, engine

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def folder_bytes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def run(manifest: Path, out: Path, slim: bool, steps: int) -> dict:
    cfg = load_config(ROOT / "configs" / "pretrain.yaml", [
        f"data.train={manifest}", f"output_dir={out}", f"train.max_steps={steps}", "train.save_every=1",
        "train.batch_size=16", "train.warmup_steps=0", "train.progress=false", "log.backend=none"])
    real_hook, saves = checkpoint_files.SlimSave.__call__, []
    real_save = engine.save_checkpoint

    def timed_save(*args, **kwargs):
        t = time.perf_counter()
        result = real_save(*args, **kwargs)
        saves.append(time.perf_counter() - t)
        return result
    engine.save_checkpoint = timed_save
    if not slim:
        checkpoint_files.SlimSave.__call__ = lambda self, models, weights, output_dir: None
    try:
        engine.train(cfg)
    finally:
        checkpoint_files.SlimSave.__call__, engine.save_checkpoint = real_hook, real_save
    newest = sorted((out / "checkpoints").glob("step_*"))[-1]
    return {"checkpoint": folder_bytes(newest), "model.safetensors": (out / "model.safetensors").stat().st_size,
            "run folder": sum(folder_bytes(out).values()), "checkpoints kept": len(list((out / "checkpoints").glob("step_*"))),
            "save seconds": sorted(saves)[len(saves) // 2]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=64, help="Open Clip Art rows to prepare (default 64)")
    p.add_argument("--steps", type=int, default=2, help="optimiser steps per run (default 2: two checkpoints kept)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = prepare_openclipart(tmp / "data", image_size=224, limit=args.rows, progress=False)
        results = {name: run(manifest, tmp / name, slim, args.steps) for name, slim in (("before", False),
                                                                                     ("slim", True))}
    print(json.dumps(results, indent=2))
    print(f"\n{'':28} {'before':>10} {'slim':>10}")
    names = sorted(set(results["before"]["checkpoint"]) | set(results["slim"]["checkpoint"]))
    for name in names:
        cells = [results[k]["checkpoint"].get(name) for k in ("before", "slim")]
        print(f"checkpoint/{name:17} " + " ".join(f"{c / MiB:>9.2f}M" if c is not None else f"{'-':>10}"
                                                  for c in cells))
    for key in ("checkpoint total", "model.safetensors", "run folder"):
        cells = [sum(results[k]["checkpoint"].values()) if key == "checkpoint total" else results[k][key]
                 for k in ("before", "slim")]
        print(f"{key:28} " + " ".join(f"{c / MiB:>9.2f}M" for c in cells))
    print(f"{'median checkpoint save':28} " + " ".join(f"{results[k]['save seconds']:>9.2f}s"
                                                       for k in ("before", "slim")))


if __name__ == "__main__":
    main()
