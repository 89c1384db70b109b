"""Checkpoints that survive a crash: Accelerate state + data position, written to a temporary folder and renamed
into place, so a folder named ``step_N`` is always complete. The newest complete one is what ``resume`` takes."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

POSITION = "position.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / POSITION).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(output_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(accelerator, output_dir: str | os.PathLike, position: dict, keep: int = 2) -> Path:
    """Save Accelerate state (model, optimiser, RNG) plus ``position`` (step, epoch, batch) atomically.

    Every process must call this (Accelerate gathers what it needs); the main process renames and prunes.
    """
    root = Path(output_dir) / "checkpoints"
    final = root / f"step_{position['step']}"
    tmp = root / f".tmp_step_{position['step']}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / POSITION).write_text(json.dumps(position), encoding="utf-8")
        if final.exists():  # re-saving the same step (e.g. resumed at the last checkpoint): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic on POSIX: the step_N folder appears complete or not at all
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict:
    """Restore Accelerate state from ``path`` and return its data position."""
    path = Path(path)
    accelerator.load_state(str(path))
    return json.loads((path / POSITION).read_text(encoding="utf-8"))
