"""One optimiser step: the forward and backward of one sampled task (micro-batched when ``grad_accum_steps`` > 1,
through GradCache for contrastive tasks) or of every task (their losses combined by the weighting, PCGrad or
GradNorm), then clipping, a non-finite check across processes, and the update — or a skipped one."""
from __future__ import annotations

import contextlib
import logging
import math
from functools import partial

import torch

from ..batch import drop_modalities, split
from ..losses import contrastive_loss
from ..losses.multitask import GradNormWeighting, gradnorm_backward, pcgrad_backward
from ..model import XModalModel
from ..tasks.head import targets
from .checkpoint import latest_checkpoint
from .gradcache import gradcache_step
from .state import RunState

log = logging.getLogger("xmodal")


def task_loss(run: RunState, name: str, batch: dict) -> torch.Tensor:
    """One task's loss on a batch: contrastive over its modality pairs, or its head's loss on its targets."""
    r = run.tasks[name]
    if r.cfg.modality_dropout:  # before the towers: a hidden modality costs no compute
        batch = drop_modalities(batch, r.cfg.modalities, r.cfg.modality_dropout)
    with run.accelerator.autocast():
        out = run.model(batch, task=name if r.cfg.kind != "retrieval" else None)
        if r.cfg.kind == "retrieval":
            return contrastive_loss(run.loss_fn, out, r.cfg.modalities, run.cfg.model.anchor)
        y = targets(r.cfg, batch[r.cfg.target], f"task {name}: ").to(out["head"].device)
        return run.unwrapped.heads[name].loss(out["head"], y)


def one_task_step(run: RunState, name: str) -> torch.Tensor:
    """Forward + backward of one task's step batch (micro-batched when grad_accum_steps > 1). → its loss, detached."""
    r, acc, k = run.tasks[name], run.accelerator, run.cfg.train.grad_accum_steps
    batch = r.next_batch(acc)

    def weighted(loss: torch.Tensor) -> torch.Tensor:
        return run.weighting({name: loss})

    if k == 1:
        loss = task_loss(run, name, batch)
        acc.backward(weighted(loss))
        return loss.detach()
    micro = split(batch, k)
    if r.cfg.kind == "retrieval":  # one loss over all micro-batches: the big batch's exact gradient
        def encode(mb):
            with acc.autocast():
                return run.model(mb)
        return gradcache_step(encode, micro, lambda out: weighted(
            contrastive_loss(run.loss_fn, out, r.cfg.modalities, run.cfg.model.anchor)),
            backward=acc.backward, no_sync=lambda: acc.no_sync(run.model))
    total_loss = 0.0  # mean-reduced losses over equal micro-batches: plain accumulation is exact
    for i, mb in enumerate(micro):
        with acc.no_sync(run.model) if i < len(micro) - 1 else contextlib.nullcontext():
            loss = task_loss(run, name, mb) / len(micro)
            acc.backward(weighted(loss))
        total_loss += loss.detach()
    return total_loss


def all_tasks_step(run: RunState) -> dict[str, torch.Tensor]:
    """Forward + backward of every task's next batch, combined. → each task's loss, detached."""
    losses = {n: task_loss(run, n, r.next_batch(run.accelerator)) for n, r in run.tasks.items()}
    weighting = run.cfg.multitask.weighting
    if weighting == "pcgrad":
        backward_pcgrad(run.accelerator, run.model, losses, run.cfg.seed + run.step)
    elif weighting == "gradnorm":
        backward_gradnorm(run.accelerator, run.model, run.unwrapped, run.weighting, losses)
    else:
        run.accelerator.backward(run.weighting(losses))
    return {n: v.detach() for n, v in losses.items()}


def backward_pcgrad(accelerator, model, losses: dict[str, torch.Tensor], seed: int) -> None:
    """PCGrad (Yu et al. 2020): per-task gradients (averaged over processes first, so every rank does the same
    surgery), conflicting components projected away, the sum written to ``.grad``."""
    # fp16: scale the losses as accelerator.backward does, since the scaler unscales every .grad before the step
    scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0
    pcgrad_backward(losses, model.parameters(), torch.Generator().manual_seed(seed),
                    mean=_mean_over_processes if accelerator.num_processes > 1 else None, scale=scale)


def backward_gradnorm(accelerator, model, unwrapped: XModalModel, weighting: GradNormWeighting,
                      losses: dict[str, torch.Tensor]) -> None:
    """GradNorm (Chen et al. 2018): per-task gradients (averaged over processes first, as for PCGrad, so every rank
    computes the same norms and weights); the network's gradient ``Σ w_i ∇L_i`` and the weights' ``∂L_grad/∂w``
    written to ``.grad``. W, the shared parameters whose gradient norms are balanced, is every trainable parameter of
    the towers (encoders and projections), i.e. all but the heads and the temperature: the paper takes the last
    shared layer only, for speed, but here the per-task gradients of the whole network exist anyway."""
    scaler = accelerator.scaler  # fp16: scale the losses as accelerator.backward does; the scaler unscales all
    gradnorm_backward(weighting, losses, model.parameters(), unwrapped.towers.parameters(),
                      mean=partial(accelerator.reduce, reduction="mean") if accelerator.num_processes > 1 else None,
                      scale=scaler.get_scale() if scaler is not None else 1.0)


def apply_gradients(run: RunState, losses: dict[str, torch.Tensor], position: dict[str, tuple[int, int]]):
    """After the backward: clip, then step the optimiser, or skip a non-finite step (``position``: each task's
    epoch and batch the step read, for the report). The schedule advances either way. → the gradient norm (None
    without clipping)."""
    acc, t = run.accelerator, run.cfg.train
    if acc.num_processes > 1:  # loss weights live outside the DDP module: average their gradients
        for p in run.weighting.parameters():
            if p.grad is not None:
                _mean_over_processes(p.grad)
    grad_norm = acc.clip_grad_norm_(run.model.parameters(), t.max_grad_norm) if t.max_grad_norm else None
    if _finite(acc, losses, run.model, grad_norm, check_grads=t.mixed_precision != "fp16"):
        run.optimizer.step()
        if isinstance(run.weighting, GradNormWeighting):  # Σ w = T, w > 0 after every update (Algorithm 1)
            run.weighting.renormalise()
        run.skipped_in_row = 0
        run.loss_window.add(losses)
    else:  # skip the update (the schedule still advances, as with fp16's skipped steps)
        _skip(run, losses, position)
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.unwrapped.clamp_logit_scale()
    run.step += 1
    return grad_norm


def _skip(run: RunState, losses: dict[str, torch.Tensor], position: dict[str, tuple[int, int]]) -> None:
    """Record a non-finite step; stop when ``train.on_nonfinite`` says so or too many came in a row."""
    t, step = run.cfg.train, run.step
    run.skipped, run.skipped_in_row = run.skipped + 1, run.skipped_in_row + 1
    where = "; ".join(f"task {n}, epoch {position[n][0]}, batch {position[n][1]}" for n in losses)
    run.metrics.write({"step": step + 1, "nonfinite": where, "losses": {n: float(v) for n, v in losses.items()}})
    if t.on_nonfinite == "stop" or run.skipped_in_row > t.max_nonfinite_skips:
        last = latest_checkpoint(run.out_dir)
        raise FloatingPointError(
            f"step {step + 1}: non-finite loss or gradients ({where}); stopped "
            f"(train.on_nonfinite={t.on_nonfinite}, {run.skipped_in_row} bad step(s) in a row). Last good "
            f"checkpoint: {last or 'none saved yet'}" + (" — continue with --resume" if last else ""))
    log.warning("step %d: non-finite loss or gradients (%s): step skipped", step + 1, where)


def _finite(accelerator, losses: dict[str, torch.Tensor], model, grad_norm, check_grads: bool = True) -> bool:
    """Every process's losses, and the (already synchronised) gradients, are finite. Under fp16 the gradient
    scaler owns inf gradients (it skips those steps itself), so only the losses are checked there."""
    bad = sum(float(not torch.isfinite(v).all()) for v in losses.values())
    if check_grads:
        if grad_norm is not None:
            bad += float(not math.isfinite(float(grad_norm)))
        else:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            bad += float(bool(grads) and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(torch.tensor(bad, device=accelerator.device), "sum").item()
    return bad == 0


def _mean_over_processes(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` averaged over every process, in place (gradients that bypass DDP's own all-reduce)."""
    torch.distributed.all_reduce(grad)
    grad /= torch.distributed.get_world_size()
    return grad
