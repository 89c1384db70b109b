"""The one training loop (Accelerate) for pretraining and fine-tuning: CPU, DDP, FSDP, mixed precision, exact
large-batch contrastive accumulation, clipping, warmup + cosine LR, task sampling and loss weighting, atomic
checkpoints with exact resume, JSON-lines metrics, a progress bar.

Pretraining is the special case of one task: contrastive alignment of every tower on ``data.train``. Read ``train``
top to bottom: it builds the run (:mod:`.build`), resumes it (:mod:`.resume`), then :func:`_loop` runs one ``while``
loop over optimiser steps (:mod:`.step`), reporting (:mod:`.report`) and saving checkpoints as it goes.
"""
from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

from ..config import Config
from ..feature_cache import reuse_frozen_features
from ..model import WEIGHTS_NAME, XModalModel
from ..run_identity import run_record
from .build import build_run, make_accelerator, open_run_folder, param_groups, run_config, warmup_cosine
from .interrupt import StopSignals, TrainingInterrupted
from .report import evaluate_and_log, log_training, progress_bar, sharded, start_reporting
from .resume import checkpoint, checkpoint_to_resume, restore
from .selection import choose_best, record_validation_rows, validate
from .run_folder import finished, refuse_existing_run
from .run_log import MetricsLog
from .state import RunState
from .step import all_tasks_step, apply_gradients, one_task_step

# What callers import from here (make_accelerator is also looked up here at each call, so that a test can swap it).
__all__ = ["train", "pretrain", "make_accelerator", "param_groups", "warmup_cosine", "MetricsLog"]

log = logging.getLogger("xmodal")


def train(cfg: Config, resume: bool = False) -> Path:
    """Pretrain (no ``tasks``) or fine-tune (``tasks``, usually with ``init_from``). Returns the run folder."""
    out_dir = Path(cfg.output_dir)
    if not resume:
        refuse_existing_run(out_dir)
    cfg, init_weights = run_config(cfg)
    ckpt, changed = checkpoint_to_resume(cfg, out_dir, resume)
    # Fine-tuning may leave parameters out of a step (other tasks' heads, towers a task does not read); so may
    # binding 3+ modalities, when no row of a process's batch has one of them.
    accelerator = make_accelerator(cfg, find_unused=bool(cfg.tasks) or len(cfg.model.towers) > 2)
    open_run_folder(cfg, out_dir, accelerator.is_main_process, ckpt)
    if changed:
        log.warning("resuming with changed %s", "; ".join(changed))
    if resume and ckpt is None:
        log.info("--resume: %s holds no checkpoint; starting a fresh run", out_dir)
    from accelerate.utils import set_seed
    set_seed(cfg.seed, deterministic=cfg.train.deterministic)

    run = build_run(cfg, out_dir, accelerator, init_weights)
    if ckpt is not None and finished(out_dir, ckpt, run.total):
        log.info("%s: the run already finished at step %s (%s written); nothing to do", out_dir,
                 ckpt.name.removeprefix("step_"), WEIGHTS_NAME)
        accelerator.end_training()
        return out_dir
    if ckpt is not None:
        restore(run, ckpt)
        # Records past the checkpoint come from steps this run does again (a crash or a kill after it): dropped, so
        # metrics.jsonl holds each step once. The final evaluation is done again when resuming at the last step.
        run.metrics.drop_after(run.step, drop_eval_at_step=run.step >= run.total)
    else:  # a fresh run: the records of a launch killed before its first checkpoint are not this run's
        run.metrics.drop_after(-1)
    if cfg.train.unfreeze_at_step and run.step >= cfg.train.unfreeze_at_step:  # resumed after the unfreezing
        _unfreeze(run.unwrapped)
    start_reporting(run)
    if run.selection is not None and run.step == 0:
        record_validation_rows(run)
    # Evaluations during training (train.eval_every) embed the eval rows through the frozen towers once, then only
    # project them. Not under FSDP: a sharded encoder has no whole weights on one rank to key the memo with.
    with contextlib.nullcontext() if sharded(accelerator) else reuse_frozen_features():
        _loop(run)
        _finish(run)
    return out_dir


pretrain = train  # `xmodal pretrain` and `xmodal finetune` are the same loop; the config decides


def _loop(run: RunState) -> None:
    """Optimiser steps until ``run.total``; SIGINT/SIGTERM stop the run after the step in flight, with a checkpoint
    at that step (:mod:`.interrupt`)."""
    try:
        with StopSignals(run.cfg.train.stop_grace_s) as stop:
            _steps(run, stop)
    finally:  # a shard stream's frozen features computed since its last write: to the disk cache, also on a stop
        for r in run.tasks.values():
            if r.monitor is not None:
                r.monitor.close()


def _steps(run: RunState, stop: StopSignals) -> None:
    """Optimiser steps until ``run.total``: a step, then (on schedule) a record, a checkpoint, an evaluation; then
    whether a signal asks every process to stop."""
    t = run.cfg.train
    progress = progress_bar(run)
    window_start, window_steps = time.perf_counter(), 0
    saved_at = run.step  # the step of the newest checkpoint (the one resumed from; at step 0, none)
    run.model.train()
    while run.step < run.total:
        if t.unfreeze_at_step and run.step == t.unfreeze_at_step:
            _unfreeze(run.unwrapped)
            run.model.train()
            log.info("step %d: towers unfrozen", run.step)
        before = {n: (r.epoch, r.batch) for n, r in run.tasks.items()}  # the batches this step is about to read
        if run.cfg.multitask.tasks_per_step == "one":
            name = next(run.sampler)
            step_losses = {name: one_task_step(run, name)}
        else:
            step_losses = all_tasks_step(run)
        grad_norm = apply_gradients(run, step_losses, before)
        window_steps += 1

        step = run.step
        if step % t.log_every == 0 or step == run.total:
            log_training(run, step_losses, grad_norm, window_steps, window_start, progress)
            window_start, window_steps = time.perf_counter(), 0
        if progress is not None:
            progress.update(1)
        evaluate_now = bool(t.eval_every) and step % t.eval_every == 0 and step < run.total
        if evaluate_now and run.selection is not None:  # first: this step's checkpoint holds its part in the choice
            validate(run)
            run.model.train()
        if t.save_every and step % t.save_every == 0 and step < run.total:
            checkpoint(run)
            saved_at = step
        if evaluate_now and run.selection is None:  # after: an evaluation that fails leaves this step's checkpoint
            evaluate_and_log(run)
            run.model.train()
        signum = stop.agreed(run.accelerator)
        if signum is not None:
            if progress is not None:
                progress.close()
            _stop(run, signum, saved_at)
    if progress is not None:
        progress.close()


def _stop(run: RunState, signum: int, saved_at: int) -> None:
    """Every process, at the same step: a checkpoint at this step (unless one was just saved), then
    :class:`TrainingInterrupted` for the CLI to report."""
    acc = run.accelerator
    ckpt = run.out_dir / "checkpoints" / f"step_{run.step}"
    if saved_at != run.step:  # the same decision on every rank (no file-system look-up: a collective follows)
        ckpt = checkpoint(run)
    acc.end_training()
    raise TrainingInterrupted(signum, run.step, ckpt, acc.is_main_process, acc.num_processes)


def _finish(run: RunState) -> None:
    """The last checkpoint, the final evaluation, and the trained model (``model.safetensors`` + ``model.json``).
    With model selection, the last step is validated too, and the model evaluated and saved is the best step's."""
    acc = run.accelerator
    if run.selection is not None:
        validate(run)
    checkpoint(run)
    extra = {}
    if run.selection is not None:
        extra["selection"] = choose_best(run)
    results = evaluate_and_log(run)
    # Under FSDP every rank holds shards: gathering the whole weights is a collective, so every rank calls it.
    state = acc.get_state_dict(run.model) if sharded(acc) else None
    if acc.is_main_process:
        run.unwrapped.save(run.out_dir, extra={"step": run.step, "eval": results, "train_rows": {
            n: len(r.dataset) for n, r in run.tasks.items()}, **extra, "run": run_record(run.out_dir)},
            state_dict=state)
    # The ranks leave together: a rank tearing its process group down while the main one still saves aborted now
    # and then ("terminate called without an active exception", seen under FSDP on gloo).
    acc.wait_for_everyone()
    acc.end_training()


def _unfreeze(model: XModalModel) -> None:
    for tower in model.towers.values():
        tower.frozen, tower.trainable, tower.prefix_cache = False, [], None
        tower.encoder.requires_grad_(True)
