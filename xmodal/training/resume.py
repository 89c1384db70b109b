"""Exact resume: the checkpoint a run continues from, the position each checkpoint saves with the weights and
optimiser (the step, each task's epoch and batch, the task sampler, the loss window), and restoring it."""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import Config
from ..model import WEIGHTS_NAME
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .run_folder import config_changes
from .state import RunState
from .streaming import restore_stream, stream_position

log = logging.getLogger("xmodal")


def checkpoint_to_resume(cfg: Config, out_dir: Path, resume: bool) -> tuple[Path | None, list[str]]:
    """The latest checkpoint (None when not resuming, or none saved yet) and the config keys changed since it."""
    ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt is None and (out_dir / WEIGHTS_NAME).is_file():
        raise FileExistsError(f"{out_dir} holds a finished model ({WEIGHTS_NAME}) but no checkpoint to resume from: "
                              f"choose another output_dir, or delete the folder to train it again (nothing was "
                              f"overwritten)")
    # before anything is written: the checkpoint must fit the model this config builds
    changed = config_changes(cfg, out_dir) if ckpt is not None else []
    return ckpt, changed


def position(run: RunState) -> dict:
    """What a checkpoint saves besides Accelerate's state. The loss window's state is a collective: every rank
    calls this at the same step."""
    loss_window = run.loss_window.state(run.accelerator)
    tasks = {n: {"epoch": r.epoch, "batch": r.batch} for n, r in run.tasks.items()}
    for n, r in run.tasks.items():
        if r.monitor is not None:  # a shard stream: where every (rank, worker) stands, bad-sample counts
            tasks[n]["stream"] = stream_position(r, r.epoch, r.batch)
    saved = {"step": run.step, "tasks": tasks, "sampler": run.sampler.state_dict(), "loss_window": loss_window}
    if run.selection is not None:  # the best step so far (its weights go beside, in selection.safetensors)
        saved["selection"] = run.selection.state()
    return saved


def checkpoint(run: RunState) -> Path:
    """A checkpoint at this step: Accelerate's state, the position, and model selection's best weights so far."""
    return save_checkpoint(run.accelerator, run.out_dir, position(run), keep=run.cfg.train.keep_checkpoints,
                           extra=run.selection.save_weights if run.selection is not None else None)


def restore(run: RunState, ckpt: Path) -> None:
    """Weights, optimiser, schedule and loss weights (Accelerate's state), then the position in every task's data."""
    saved = load_checkpoint(run.accelerator, ckpt)
    run.step = saved["step"]
    for name, p in saved["tasks"].items():
        run.tasks[name].epoch, run.tasks[name].batch = p["epoch"], p["batch"]
        if run.tasks[name].monitor is not None:
            restore_stream(run.tasks[name], p.get("stream", {}))
    run.sampler.load_state_dict(saved["sampler"])
    run.loss_window.load(saved.get("loss_window", {}))  # checkpoints older than the window: it restarts
    if run.selection is not None:
        run.selection.load(saved.get("selection"), ckpt)
    log.info("resumed from %s at step %d", ckpt, run.step)
