"""Checkpoints that survive a crash: Accelerate state + data position, written to a temporary folder and renamed
into place, so a folder named ``step_N`` is always complete. The newest complete one is what ``resume`` takes.

Folders under ``output_dir/checkpoints``:

* ``step_N``: a complete checkpoint.
* ``.tmp_step_N``: a save in progress (or one a crash interrupted). Never read; removed by the next save.
* ``.old_step_N``: a complete ``step_N`` moved aside while a re-save of the same step swaps the new copy in. If a
  crash leaves it without its ``step_N``, it is read as step N and the next save renames it back.

Loading refuses any pickled file in the folder that ``torch.load(weights_only=True)`` rejects: Accelerate unpickles
``custom_checkpoint_*.pkl`` with ``weights_only=False``, which runs whatever code a crafted file names.
"""
from __future__ import annotations

import codecs
import json
import logging
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Callable

from ..integrity import IntegrityError
from ..run_identity import other_run, run_record
from .checkpoint_files import SlimSave, check_frozen, damaged_remedy, unwrapped_model, verify_files, write_manifest

POSITION = "position.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_ASIDE_DIR = re.compile(r"^\.old_step_(\d+)$")
_TMP_DIR = re.compile(r"^\.tmp_step_(\d+)$")
# Files Accelerate reads with torch.load (optimizer.bin, scheduler.bin, sampler.bin, dl_state_dict.bin, scaler.pt,
# random_states_N.pkl, custom_checkpoint_N.pkl, pytorch_model.bin); .safetensors and .json cannot hold code.
_PICKLED_SUFFIXES = {".bin", ".pkl", ".pt", ".pth"}

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, or a checkpoint folder holds a file that is unsafe to load."""


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest first (read-only: nothing is cleaned here)."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = {}
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / POSITION).is_file():
            found[int(m.group(1))] = p
    for p in root.iterdir():  # a re-save interrupted between its two renames: the old copy is the checkpoint
        m = _ASIDE_DIR.match(p.name)
        if m and int(m.group(1)) not in found and (p / POSITION).is_file():
            found[int(m.group(1))] = p
    return [found[step] for step in sorted(found)]


def _step(folder: Path) -> int:
    return int(folder.name.rsplit("_", 1)[1])


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint. A newer ``step_N`` without ``position.json`` (deleted, or damaged by hand: a
    save never leaves one) is passed over with a warning naming it."""
    dirs = checkpoint_dirs(output_dir)
    found = dirs[-1] if dirs else None
    root = Path(output_dir) / "checkpoints"
    for p in sorted(root.glob("step_*")) if root.is_dir() else []:
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and not (p / POSITION).is_file() and (found is None or int(m.group(1)) > _step(found)):
            log.warning("checkpoints: %s has no %s (incomplete or damaged); %s", p, POSITION,
                        f"using the older {found}" if found else "no complete checkpoint is left")
    return found


def _clean_leftovers(root: Path) -> None:
    """Main process, before a save: delete the temporary folders of interrupted saves, and put back (or delete) the
    old copies that an interrupted re-save left aside. Only the saving process may do this: a reader cleaning up
    could delete a save in progress."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if _TMP_DIR.match(p.name):
            log.warning("checkpoints: removing %s left by an interrupted save", p)
            shutil.rmtree(p, ignore_errors=True)
        elif m := _ASIDE_DIR.match(p.name):
            final = root / f"step_{m.group(1)}"
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                log.warning("checkpoints: restoring %s from %s (a re-save was interrupted)", final, p.name)
                os.replace(p, final)


def save_checkpoint(accelerator, output_dir: str | os.PathLike, position: dict, keep: int = 2,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Save Accelerate state (model, optimiser, RNG) plus ``position`` (step, epoch, batch) atomically.
    ``extra(folder)``, on the main process, writes more files into the folder before its manifest seals it (model
    selection's best weights).

    Every process must call this (Accelerate gathers what it needs); the main process renames and prunes. If writing
    fails (a full disk, say), the partial folder is removed, every earlier ``step_N`` is left as it was, and a
    :class:`CheckpointError` says so.
    """
    root = Path(output_dir) / "checkpoints"
    step = position["step"]
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    aside = root / f".old_step_{step}"
    if accelerator.is_main_process:
        _clean_leftovers(root)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    slim = SlimSave(accelerator)
    hook = (accelerator.register_save_state_pre_hook(slim)
            if hasattr(accelerator, "register_save_state_pre_hook") else None)
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            (tmp / POSITION).write_text(json.dumps(position), encoding="utf-8")
            if extra is not None:
                extra(tmp)
            write_manifest(tmp, slim.frozen, run_record(output_dir))  # last: it records every other file
    except BaseException as e:  # also KeyboardInterrupt: never leave a half-written folder behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        previous = latest_checkpoint(output_dir)
        kept = (f"the previous checkpoint {previous} is intact" if previous is not None
                else "no earlier checkpoint exists")
        raise CheckpointError(f"saving checkpoint step {step} to {final} failed: {type(e).__name__}: {e}; "
                              f"{kept}") from e
    finally:
        if hook is not None:
            hook.remove()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            # Re-saving the same step (e.g. resumed at the last checkpoint). Deleting step_N before the rename
            # would leave no step N at all if we crashed in between; moved aside, it is still found (and restored).
            os.replace(final, aside)
        try:
            os.replace(tmp, final)  # atomic on POSIX: the step_N folder appears complete or not at all
        except OSError:
            if aside.exists():
                os.replace(aside, final)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        log.info("checkpoint step %d saved: %s", step, final)
        for old in checkpoint_dirs(output_dir)[:-keep]:
            # Renamed first: a kill during the delete must not leave a step_K that looks complete but is not.
            doomed = root / f".tmp_{old.name.lstrip('.').removeprefix('old_')}"
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _safe_globals() -> list:
    """What legitimate Accelerate state files need beyond tensors and plain Python values: the NumPy RNG state in
    random_states_N.pkl (an ndarray). The same list Accelerate itself allows when it loads them."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, codecs.encode]
    if hasattr(np, "dtypes"):
        allowed.append(np.dtypes.UInt32DType)
    return allowed


def _reason(e: Exception) -> str:
    """The useful line of torch's long weights-only error ("Unsupported global: GLOBAL io.open ...")."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, re.S)
    if m:
        return " ".join(m.group(1).split())
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def check_checkpoint_files(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` naming the first pickled file in ``path`` that ``torch.load`` refuses with
    ``weights_only=True`` (a pickle that would call arbitrary code, or a damaged file)."""
    import torch

    path = Path(path)
    with torch.serialization.safe_globals(_safe_globals()):
        for f in sorted(p for p in path.rglob("*") if p.suffix in _PICKLED_SUFFIXES and p.is_file()):
            try:
                # mmap: only the pickle stream is parsed; tensor data is not read into memory twice
                torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
            except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
                if "WeightsUnpickler" not in str(e):  # not a refused pickle: a file cut short or garbled
                    raise CheckpointError(f"checkpoint {path}: {f.name} is damaged (torch.load: {_reason(e).split('. ')[0]})") \
                        from None
                raise CheckpointError(
                    f"refusing to load checkpoint {path}: {f.name} does not load as plain tensors/values "
                    f"(torch.load weights_only=True: {_reason(e)}). A pickle that needs more could run code when "
                    f"loaded; if you did not write this checkpoint, delete it") from None


def load_checkpoint(accelerator, path: str | os.PathLike) -> dict:
    """Restore Accelerate state from ``path`` and return its data position. Every pickled file is checked with
    ``weights_only=True`` first (see :func:`check_checkpoint_files`)."""
    path = Path(path)
    try:
        check_checkpoint_files(path)  # first: a planted pickle is named as what it is, not as a changed file
        manifest = verify_files(path, "")
        stray = other_run((manifest or {}).get("run"), path.parent.parent)
        if stray is not None:  # whole and consistent, but another run's: its weights would continue the wrong run
            raise CheckpointError(f"checkpoint {path} {stray}: it was copied in from that run folder")
    except (IntegrityError, CheckpointError) as e:  # one line, and the older checkpoint to fall back on
        older = [p for p in checkpoint_dirs(path.parent.parent) if _step(p) < _step(path)]
        where = "" if str(path) in str(e) else f"checkpoint {path}: "
        raise CheckpointError(f"{where}{str(e).rstrip('; ')}; {damaged_remedy(path, older)}") from None
    frozen = (manifest or {}).get("frozen")
    model = unwrapped_model(accelerator)
    if model is not None:
        try:
            check_frozen(path, model, frozen)
        except IntegrityError as e:
            raise CheckpointError(str(e)) from None
    try:
        # a slim checkpoint holds all but the frozen tensors just checked to be in the model already
        accelerator.load_state(str(path), **({"strict": False} if frozen else {}))
    except RuntimeError as e:  # "Error(s) in loading state_dict ... size mismatch": a model of another shape
        if "state_dict" not in str(e) and "size mismatch" not in str(e):
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:4]) or lines[0] if lines else type(e).__name__
        raise CheckpointError(f"checkpoint {path} does not fit this model (was the run's model config changed?): "
                              f"{detail}") from None
    return json.loads((path / POSITION).read_text(encoding="utf-8"))
