"""What a training run reports: the start-up lines and trackers, the progress bar, a training record every
``train.log_every`` steps, and every task's held-out evaluation — to ``metrics.jsonl``, the log and the trackers.

Under FSDP the parameters are sharded across ranks: reading one whole, or evaluating, is a collective here.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..losses.multitask import GradNormWeighting, UncertaintyWeighting
from ..model import XModalModel
from .state import RunState
from .task_data import PRETRAIN_TASK

log = logging.getLogger("xmodal")


def start_reporting(run: RunState) -> None:
    """Trackers (with the config as hyperparameters), and the run's one-line summary in the log."""
    cfg, acc, t = run.cfg, run.accelerator, run.cfg.train
    if acc.is_main_process and cfg.log.backend != "none":
        acc.init_trackers(cfg.log.project, config=_flat_config(cfg.to_dict()),
                          init_kwargs={"wandb": _wandb_kwargs(run)})
        if cfg.log.backend == "wandb":  # its own banner is silenced: one line says where the run is
            wb = acc.get_tracker("wandb", unwrap=True)
            mode, folder = getattr(wb.settings, "mode", ""), Path(wb.dir).parent
            log.info("wandb %s run: %s%s", mode, folder, f" (upload it: wandb sync {folder})" if mode == "offline"
                     else "")
    log.info("%s: %s; %d steps, batch %d × %d process(es), device %s", "finetune" if cfg.tasks else "pretrain",
             ", ".join(f"{n} ({r.cfg.kind}, {len(r.dataset)} rows)" for n, r in run.tasks.items()), run.total,
             t.batch_size * t.grad_accum_steps, acc.num_processes, acc.device)
    if cfg.tasks and cfg.init_from and not t.freeze_projections and any(
            p.requires_grad for tw in run.unwrapped.towers.values() for p in tw.projection.parameters()):
        # users of a pretrained space often expect it to stay put: say that it will move, and how to keep it
        log.info("the pretrained projections train with the heads, so the shared space moves (retrieval in it "
                 "changes); train.freeze_projections=true keeps it fixed")


def _wandb_kwargs(run: RunState) -> dict:
    """wandb.init's arguments: the run folder, and ``silent`` — without it wandb prints ~40 lines per run (a banner,
    then every metric's history and summary) into the console and train.log. Built only when wandb is the backend."""
    kwargs: dict = {"dir": str(run.out_dir), "name": run.out_dir.name}
    if run.cfg.log.backend == "wandb":
        import wandb
        kwargs["settings"] = wandb.Settings(silent=True)
    return kwargs


def progress_bar(run: RunState):
    """A tqdm bar over the run's steps (None when off, or on processes other than the main one)."""
    if not (run.accelerator.is_main_process and run.cfg.train.progress):
        return None
    from ..progress import tqdm
    return tqdm(total=run.total, initial=run.step, desc="finetune" if run.cfg.tasks else "pretrain", unit="step",
                dynamic_ncols=True)


def log_training(run: RunState, step_losses: dict, grad_norm, steps: int, since: float, progress) -> None:
    """The record of the ``steps`` since the last one (begun at ``time.perf_counter()`` ``since``; ``step_losses``:
    the last step's tasks): each task's mean loss (their mean too when every step trains every task), LR,
    temperature, throughput."""
    acc, cfg = run.accelerator, run.cfg
    record: dict[str, Any] = {"step": run.step}
    means = run.loss_window.means(acc)
    record.update({"loss" if len(run.tasks) == 1 else f"loss/{n}": v for n, v in means.items()})
    if len(run.tasks) > 1 and cfg.multitask.tasks_per_step == "all" and means:  # every task in every step: their mean
        record["loss"] = sum(means.values()) / len(means)
    seconds = time.perf_counter() - since
    record.update(epoch=run.step / run.epoch_steps, lr=run.optimizer.param_groups[0]["lr"],
                  logit_scale=whole(run.unwrapped.logit_scale).exp().item(),
                  samples_per_s=steps * run.samples_per_step * len(step_losses) / max(seconds, 1e-9))
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    if run.skipped:
        record["skipped_steps"] = run.skipped
    if isinstance(run.weighting, (UncertaintyWeighting, GradNormWeighting)):
        record.update({f"weight/{n}": w for n, w in run.weighting.weights().items()})
    run.metrics.write(record)
    if cfg.log.backend != "none":
        acc.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=run.step)
    if progress is not None:
        shown = record["loss"] if "loss" in record else next(
            (v for k, v in record.items() if k.startswith("loss/")), math.nan)  # nan: all steps skipped
        # refresh=False: shown with the next redraw (a log file gets one line per 30 s, not one per record)
        progress.set_postfix(loss=f"{shown:.4f}", samples_s=f"{record['samples_per_s']:.0f}", refresh=False)


def evaluate_and_log(run: RunState, split: str = "eval") -> dict:
    """Every task's held-out metrics, on the main process only (the eval sets are small; results not sharded) —
    under FSDP on every process in step, as each forward gathers sharded weights; the main process reports.
    ``split``: ``"eval"`` (each task's eval rows) or ``"val"`` (the validation rows of model selection)."""
    from ..evaluation.evaluate import evaluate, evaluate_task

    acc, model, batch_size = run.accelerator, run.unwrapped, run.cfg.train.batch_size
    results: dict = {}
    if acc.is_main_process or sharded(acc):
        model.eval()
        with _gathered_root(acc, model):
            for name, r in run.tasks.items():
                data = r.eval_data if split == "eval" else r.select_data
                if data is None:
                    continue
                if r.cfg.kind == "retrieval":
                    res = evaluate(model, data.select_columns(
                        [c for c in data.column_names if c in r.cfg.modalities or c == "label"]),
                        batch_size=batch_size)
                else:
                    res = evaluate_task(model, name, data, batch_size=batch_size)
                prefix = "" if name == PRETRAIN_TASK else f"{name}/"
                results.update({f"{prefix}{k}": v for k, v in res.items()})
    if results and acc.is_main_process:
        run.metrics.write({"step": run.step, **{f"{split}/{k}": v for k, v in results.items()}})
        if run.cfg.log.backend != "none":
            acc.log({f"{split}/{k}": v for k, v in results.items()}, step=run.step)
        shown = {k: round(v, 4) for k, v in results.items()
                 if any(s in k for s in ("R@", "top1", "accuracy", "macro_f1", "mae")) or k.endswith("r2")}
        chosen = run.selection.best_step if split == "eval" and run.selection is not None else None
        log.info("%s at step %d%s: %s", "eval" if split == "eval" else "validation", run.step,
                 f" (the model of step {chosen}, selected)" if chosen not in (None, run.step) else "", shown)
    acc.wait_for_everyone()
    return results


def sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType
    return accelerator.distributed_type == DistributedType.FSDP


@torch.no_grad()
def whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value on every rank: FSDP2 holds each parameter as a sharded DTensor (gathering it is a
    collective, so every rank must call this)."""
    return param.full_tensor() if hasattr(param, "full_tensor") else param


@contextlib.contextmanager
def _gathered_root(accelerator, model: XModalModel):
    """Under FSDP, evaluation runs on every rank in step: each FSDP block gathers its weights in its own forward,
    and the weights the root unit owns (projections, embeddings, temperature) are gathered for the whole evaluation,
    which calls towers directly rather than the root's forward."""
    if not sharded(accelerator):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def _flat_config(d: dict, prefix: str = "") -> dict:
    """``{"train.lr": 0.001, ...}`` with scalar values only: what tensorboard's hparams accept (wandb too)."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat_config(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat
