"""The one training loop (Accelerate) for pretraining and fine-tuning: CPU, DDP, mixed precision, exact large-batch
contrastive accumulation, clipping, warmup + cosine LR, task sampling and loss weighting, atomic checkpoints with
exact resume, JSON-lines metrics, a progress bar.

Pretraining is the special case of one task: contrastive alignment of every tower on ``data.train``. Read
``train`` top to bottom: it builds everything, then runs one ``while`` loop over optimiser steps.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ..config import Config, ModelConfig, TaskConfig, _from_dict, check_task_modalities, save_config
from ..batch import FEATURES, MASK, batch_size, collate, drop_modalities, split
from ..data import ManifestDataset
from ..feature_cache import is_cacheable, precompute_features
from .gradcache import gradcache_step
from ..tasks.heads import RegressionHead
from ..losses import build_loss, contrastive_loss
from ..losses.multitask import (GradNormWeighting, StaticWeighting, UncertaintyWeighting, gradnorm_backward,
                                pcgrad_backward)
from ..model import WEIGHTS_NAME, XModalModel
from .run_folder import config_changes, finished, refuse_existing_run
from .run_log import LossWindow, MetricsLog
from .sampling import TaskSampler
from .task_data import PRETRAIN_TASK, read_task_manifests, task_configs
from ..tasks.head import targets

log = logging.getLogger("xmodal")


# ------------------------------------------------------------------------------------------------ small pieces

def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at ``total_steps`` (open_clip's ``cosine_lr``)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def param_groups(model: torch.nn.Module, cfg: Config, extra: list[torch.nn.Parameter] = ()) -> list[dict]:
    """AdamW groups: no weight decay on gains, biases, the temperature and loss weights (as open_clip excludes
    them); encoders take ``train.encoder_lr``. Frozen encoders are included when they will be unfrozen later."""
    t = cfg.train
    encoder_lr = t.encoder_lr if t.encoder_lr is not None else t.lr
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and not (t.unfreeze_at_step and ".encoder." in name):
            continue
        no_decay = p.ndim < 2 or "logit_" in name or ".bn" in name or ".ln" in name or "norm" in name
        lr = encoder_lr if ".encoder." in name else t.lr
        groups.setdefault((no_decay, lr), []).append(p)
    for p in extra:
        groups.setdefault((True, t.lr), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": 0.0 if nd else t.weight_decay}
            for (nd, lr), ps in groups.items()]


def collate_renamed(rename: dict[str, str], items: list[dict]) -> dict:
    """``collate``, then rename keys (``image`` → ``image:features`` for cached modalities)."""
    return {rename.get(k, k): v for k, v in collate(items).items()}


def make_accelerator(cfg: Config, find_unused: bool = False):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs

    trackers = None if cfg.log.backend == "none" else cfg.log.backend
    if cfg.log.backend == "wandb":
        os.environ.setdefault("WANDB_MODE", cfg.log.wandb_mode)  # offline by default: no key, no network
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        log_with=trackers,
        project_dir=cfg.output_dir,
        # A sampler seeded by (seed, epoch) makes the data order a function of the position, which exact resume
        # (skip the batches already seen) relies on.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
    )


# ------------------------------------------------------------------------------------------------ tasks and data

@dataclass
class TaskRun:
    """One task's training state: its config, data loader and position in its data."""
    name: str
    cfg: TaskConfig
    dataset: Any  # datasets.Dataset of the train split
    eval_data: Any = None
    loader: Any = None
    steps_per_epoch: int = 0
    epoch: int = 0
    batch: int = 0
    iterator: Iterator | None = None
    seen: dict = field(default_factory=dict)
    source: str | None = None  # the train manifest, and each train row's 1-based row in it: for row errors
    row_numbers: list[int] = field(default_factory=list)


def _init_from(cfg: Config) -> tuple[ModelConfig, dict | None]:
    """The model config and weights of ``init_from`` (a run folder) — fine-tuning needs not repeat the towers."""
    if cfg.init_from is None:
        return cfg.model, None
    from safetensors.torch import load_file
    run = Path(cfg.init_from)
    card_path = run / "model.json"
    if not card_path.is_file():
        raise FileNotFoundError(f"init_from: {run} is not an xmodal run folder (no model.json)")
    card = json.loads(card_path.read_text(encoding="utf-8"))
    model_cfg = cfg.model if cfg.model.towers else _from_dict(ModelConfig, card["model"], "model")
    return model_cfg, load_file(str(run / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ the loop

def train(cfg: Config, resume: bool = False) -> Path:
    """Pretrain (no ``tasks``) or fine-tune (``tasks``, usually with ``init_from``). Returns the run folder."""
    out_dir = Path(cfg.output_dir)
    if not resume:
        refuse_existing_run(out_dir)
    cfg = copy.deepcopy(cfg)
    towers_from = f"the init_from run {cfg.init_from}" if cfg.init_from and not cfg.model.towers else "model.towers"
    cfg.model, init_weights = _init_from(cfg)
    if cfg.train.freeze_towers is not None or cfg.train.unfreeze_at_step:
        for tower in cfg.model.towers.values():
            tower.freeze = bool(cfg.train.freeze_towers) or bool(cfg.train.unfreeze_at_step)
    for name, tc in cfg.tasks.items():
        check_task_modalities(name, tc, list(cfg.model.towers), towers_from)
    ckpt = latest_checkpoint(out_dir) if resume else None
    changed: list[str] = []
    if resume and ckpt is None and (out_dir / WEIGHTS_NAME).is_file():
        raise FileExistsError(f"{out_dir} holds a finished model ({WEIGHTS_NAME}) but no checkpoint to resume from: "
                              f"choose another output_dir, or delete the folder to train it again (nothing was "
                              f"overwritten)")
    if ckpt is not None:  # before anything is written: the checkpoint must fit the model this config builds
        changed = config_changes(cfg, out_dir)
    t = cfg.train
    # Fine-tuning may leave parameters out of a step (other tasks' heads, towers a task does not read); so may
    # binding 3+ modalities, when no row of a process's batch has one of them.
    accelerator = make_accelerator(cfg, find_unused=bool(cfg.tasks) or len(cfg.model.towers) > 2)
    main = accelerator.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True,
                            handlers=[logging.StreamHandler(), logging.FileHandler(out_dir / "train.log")])
        # Accelerate logs ~7 INFO lines per checkpoint (each file it writes); xmodal logs one line per save.
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    if changed:
        log.warning("resuming with changed %s", "; ".join(changed))
    if resume and ckpt is None:
        log.info("--resume: %s holds no checkpoint; starting a fresh run", out_dir)
    from accelerate.utils import set_seed
    set_seed(cfg.seed, deterministic=t.deterministic)

    modalities = list(cfg.model.towers)
    tcfgs = task_configs(cfg, modalities)
    runs: dict[str, TaskRun] = {}
    for name, tc in tcfgs.items():
        train_m, eval_m = read_task_manifests(cfg, name, tc)
        runs[name] = TaskRun(name, tc, train_m.dataset, eval_m.dataset if eval_m is not None else None,
                             source=train_m.source, row_numbers=train_m.row_numbers)
    if not cfg.tasks and len(modalities) < 2:
        raise ValueError("pretrain: contrastive alignment needs at least two towers in model.towers")

    model = XModalModel(cfg.model, {n: r.cfg for n, r in runs.items()} if cfg.tasks else None)
    if init_weights is not None:
        missing, unexpected = model.load_state_dict(init_weights, strict=False)
        missing = [k for k in missing if not k.startswith("heads.")]
        if missing or unexpected:
            raise ValueError(f"init_from {cfg.init_from}: weights do not fit the towers (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
    _fit_target_scales(model, runs, init_weights)  # before a resumed run's checkpoint, which restores its own
    if t.freeze_projections:  # a linear probe of the shared space itself: only the heads learn
        for tower in model.towers.values():
            tower.projection.requires_grad_(False)
    for r in runs.values():  # before any feature is cached: the loaders drop an incomplete last batch
        if len(r.dataset) < t.batch_size * t.grad_accum_steps * accelerator.num_processes:
            raise ValueError(_too_few_rows(r, t, accelerator.num_processes))
    # Frozen, non-augmented towers are embedded once; training then runs on their cached features.
    used = {m for r in runs.values() for m in r.cfg.modalities}  # a tower no task reads is never run
    cached = {m: m + FEATURES for m in modalities
              if m in used and t.cache_frozen and not t.unfreeze_at_step and is_cacheable(m, cfg.model.towers[m])}
    caches = {}
    for m in cached:
        values = [v for r in runs.values() if m in r.cfg.modalities for v in r.dataset[m] if v not in (None, "")]
        caches[m] = precompute_features(model.towers[m].encoder, model.transform(m, train=False), values,
                                        batch_size=t.batch_size, num_workers=cfg.data.num_workers,
                                        device=accelerator.device, desc=f"cache frozen {m} features",
                                        progress=main and t.progress, memo_key=(m, repr(cfg.model.towers[m])))
    step_batch = t.batch_size * t.grad_accum_steps  # per process; the contrastive batch is this × processes
    for r in runs.values():
        transforms = {m: caches.get(m) or model.transform(m, train=True) for m in r.cfg.modalities}
        extra = [r.cfg.target] if r.cfg.kind != "retrieval" else []
        rows = ManifestDataset(r.dataset, transforms, extra_columns=extra, source=r.source,
                               row_numbers=r.row_numbers)
        r.loader = DataLoader(rows, batch_size=step_batch,
                              shuffle=True, drop_last=True, collate_fn=partial(collate_renamed, cached),
                              num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)

    mt = cfg.multitask
    if mt.weighting == "uncertainty":
        weighting = UncertaintyWeighting(runs)
    elif mt.weighting == "gradnorm":  # on the device: its weights meet the gradient norms there (and NCCL wants it)
        weighting = GradNormWeighting(runs, mt.gradnorm_alpha).to(accelerator.device)
    else:
        weighting = StaticWeighting({n: r.cfg.weight for n, r in runs.items()})
    groups = param_groups(model, cfg, list(weighting.parameters()))
    # The fused kernel: one op per step instead of ~55 per tensor (benchmarks/train_step.py --ablate).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, fused=fused)
    model, optimizer, *loaders = accelerator.prepare(model, optimizer, *(r.loader for r in runs.values()))
    for r, loader in zip(runs.values(), loaders):
        r.loader, r.steps_per_epoch = loader, len(loader)
        if r.steps_per_epoch == 0:
            raise ValueError(_too_few_rows(r, t, accelerator.num_processes))
    epoch_steps = (sum(r.steps_per_epoch for r in runs.values()) if mt.tasks_per_step == "one"
                   else max(r.steps_per_epoch for r in runs.values()))
    total = t.max_steps or t.epochs * epoch_steps
    # Stepped by hand once per optimiser step: Accelerate's wrapper would step it once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t.warmup_steps, total))
    accelerator.register_for_checkpointing(scheduler, weighting)
    sampler = TaskSampler({n: len(r.dataset) for n, r in runs.items()}, mt.sampling,
                          mt.temperature if mt.sampling == "temperature" else 1.0, seed=cfg.seed)
    loss_fn = build_loss(cfg.model.loss, local_loss=t.local_loss, gather_with_grad=t.gather_with_grad)
    unwrapped: XModalModel = accelerator.unwrap_model(model)

    step = 0
    loss_window = LossWindow(runs, accelerator.device)
    if ckpt is not None and finished(out_dir, ckpt, total):
        log.info("%s: the run already finished at step %s (%s written); nothing to do", out_dir,
                 ckpt.name.removeprefix("step_"), WEIGHTS_NAME)
        accelerator.end_training()
        return out_dir
    if ckpt is not None:
        position = load_checkpoint(accelerator, ckpt)
        step = position["step"]
        for name, p in position["tasks"].items():
            runs[name].epoch, runs[name].batch = p["epoch"], p["batch"]
        sampler.load_state_dict(position["sampler"])
        loss_window.load(position.get("loss_window", {}))  # checkpoints older than the window: it restarts
        log.info("resumed from %s at step %d", ckpt, step)
    if t.unfreeze_at_step and step >= t.unfreeze_at_step:  # resumed after the scheduled unfreezing
        _unfreeze(unwrapped)
    if main and cfg.log.backend != "none":
        accelerator.init_trackers(cfg.log.project, config=_flat_config(cfg.to_dict()),
                                  init_kwargs={"wandb": {"dir": str(out_dir), "name": out_dir.name}})
    metrics = MetricsLog(out_dir / MetricsLog.NAME, main)
    samples_per_step = step_batch * accelerator.num_processes
    log.info("%s: %s; %d steps, batch %d × %d process(es), device %s", "finetune" if cfg.tasks else "pretrain",
             ", ".join(f"{n} ({r.cfg.kind}, {len(r.dataset)} rows)" for n, r in runs.items()), total,
             step_batch, accelerator.num_processes, accelerator.device)
    if cfg.tasks and cfg.init_from and not t.freeze_projections and any(
            p.requires_grad for tw in unwrapped.towers.values() for p in tw.projection.parameters()):
        # users of a pretrained space often expect it to stay put: say that it will move, and how to keep it
        log.info("the pretrained projections train with the heads, so the shared space moves (retrieval in it "
                 "changes); train.freeze_projections=true keeps it fixed")

    def next_batch(r: TaskRun) -> dict:
        if r.iterator is None:
            r.iterator = _batches(accelerator, r)
        return next(r.iterator)

    def task_loss(name: str, batch: dict) -> torch.Tensor:
        r = runs[name]
        if r.cfg.modality_dropout:  # before the towers: a hidden modality costs no compute
            batch = drop_modalities(batch, r.cfg.modalities, r.cfg.modality_dropout)
        with accelerator.autocast():
            out = model(batch, task=name if r.cfg.kind != "retrieval" else None)
            if r.cfg.kind == "retrieval":
                return contrastive_loss(loss_fn, out, r.cfg.modalities, cfg.model.anchor)
            y = targets(r.cfg, batch[r.cfg.target], f"task {name}: ").to(out["head"].device)
            return unwrapped.heads[name].loss(out["head"], y)

    def one_task_step(name: str) -> torch.Tensor:
        """Forward + backward of one task's step batch (micro-batched when grad_accum_steps > 1)."""
        r, batch = runs[name], next_batch(runs[name])
        weight = lambda loss: weighting({name: loss})  # noqa: E731
        if t.grad_accum_steps == 1:
            loss = task_loss(name, batch)
            accelerator.backward(weight(loss))
            return loss.detach()
        micro = split(batch, t.grad_accum_steps)
        if r.cfg.kind == "retrieval":  # one loss over all micro-batches: the big batch's exact gradient
            def encode(mb):
                with accelerator.autocast():
                    return model(mb)
            return gradcache_step(encode, micro, lambda out: weight(
                contrastive_loss(loss_fn, out, r.cfg.modalities, cfg.model.anchor)),
                backward=accelerator.backward, no_sync=lambda: accelerator.no_sync(model))
        total_loss = 0.0  # mean-reduced losses over equal micro-batches: plain accumulation is exact
        for i, mb in enumerate(micro):
            with accelerator.no_sync(model) if i < len(micro) - 1 else contextlib.nullcontext():
                loss = task_loss(name, mb) / len(micro)
                accelerator.backward(weight(loss))
            total_loss += loss.detach()
        return total_loss

    def all_tasks_step() -> dict[str, torch.Tensor]:
        losses = {n: task_loss(n, next_batch(r)) for n, r in runs.items()}
        if mt.weighting == "pcgrad":
            _pcgrad(accelerator, model, losses, cfg.seed + step)
        elif mt.weighting == "gradnorm":
            _gradnorm(accelerator, model, unwrapped, weighting, losses)
        else:
            accelerator.backward(weighting(losses))
        return {n: v.detach() for n, v in losses.items()}

    progress = _progress(main and t.progress, total, step, "finetune" if cfg.tasks else "pretrain")
    window_start, window_steps = time.perf_counter(), 0
    skipped, skipped_in_row = 0, 0
    model.train()
    while step < total:
        if t.unfreeze_at_step and step == t.unfreeze_at_step:
            _unfreeze(unwrapped)
            model.train()
            log.info("step %d: towers unfrozen", step)
        position = {n: (r.epoch, r.batch) for n, r in runs.items()}  # the batches this step is about to read
        if mt.tasks_per_step == "one":
            name = next(sampler)
            step_losses = {name: one_task_step(name)}
        else:
            step_losses = all_tasks_step()
        if accelerator.num_processes > 1:  # loss weights live outside the DDP module: average their gradients
            _all_reduce_grads(weighting.parameters())
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm) if t.max_grad_norm else None
        if _finite(accelerator, step_losses, model, grad_norm, check_grads=t.mixed_precision != "fp16"):
            optimizer.step()
            if isinstance(weighting, GradNormWeighting):  # Σ w = T, w > 0 after every update (Algorithm 1)
                weighting.renormalise()
            skipped_in_row = 0
            loss_window.add(step_losses)
        else:  # skip the update (the schedule still advances, as with fp16's skipped steps)
            skipped, skipped_in_row = skipped + 1, skipped_in_row + 1
            where = "; ".join(f"task {n}, epoch {position[n][0]}, batch {position[n][1]}" for n in step_losses)
            metrics.write({"step": step + 1, "nonfinite": where,
                           "losses": {n: float(v) for n, v in step_losses.items()}})
            if t.on_nonfinite == "stop" or skipped_in_row > t.max_nonfinite_skips:
                last = latest_checkpoint(out_dir)
                raise FloatingPointError(
                    f"step {step + 1}: non-finite loss or gradients ({where}); stopped "
                    f"(train.on_nonfinite={t.on_nonfinite}, {skipped_in_row} bad step(s) in a row). Last good "
                    f"checkpoint: {last or 'none saved yet'}" + (" — continue with --resume" if last else ""))
            log.warning("step %d: non-finite loss or gradients (%s): step skipped", step + 1, where)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        unwrapped.clamp_logit_scale()
        step += 1
        window_steps += 1

        if step % t.log_every == 0 or step == total:
            record: dict[str, Any] = {"step": step}
            means = loss_window.means(accelerator)
            record.update({"loss" if len(runs) == 1 else f"loss/{n}": v for n, v in means.items()})
            if len(runs) > 1 and mt.tasks_per_step == "all" and means:  # every task in every step: their mean
                record["loss"] = sum(means.values()) / len(means)
            elapsed = time.perf_counter() - window_start
            record.update(epoch=step / epoch_steps, lr=optimizer.param_groups[0]["lr"],
                          logit_scale=_whole(unwrapped.logit_scale).exp().item(),
                          samples_per_s=window_steps * samples_per_step * len(step_losses) / max(elapsed, 1e-9))
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if skipped:
                record["skipped_steps"] = skipped
            if isinstance(weighting, (UncertaintyWeighting, GradNormWeighting)):
                record.update({f"weight/{n}": w for n, w in weighting.weights().items()})
            metrics.write(record)
            if cfg.log.backend != "none":
                accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
            if progress is not None:
                shown = record["loss"] if "loss" in record else next(
                    (v for k, v in record.items() if k.startswith("loss/")), math.nan)  # nan: all steps skipped
                progress.set_postfix(loss=f"{shown:.4f}", samples_s=f"{record['samples_per_s']:.0f}")
            window_start, window_steps = time.perf_counter(), 0
        if progress is not None:
            progress.update(1)
        if t.save_every and step % t.save_every == 0 and step < total:
            save_checkpoint(accelerator, out_dir, _position(step, runs, sampler, loss_window.state(accelerator)),
                            keep=t.keep_checkpoints)
        if t.eval_every and step % t.eval_every == 0 and step < total:
            _evaluate_and_log(accelerator, unwrapped, runs, step, metrics, cfg)
            model.train()

    if progress is not None:
        progress.close()
    save_checkpoint(accelerator, out_dir, _position(step, runs, sampler, loss_window.state(accelerator)),
                    keep=t.keep_checkpoints)
    results = _evaluate_and_log(accelerator, unwrapped, runs, step, metrics, cfg)
    # Under FSDP every rank holds shards: gathering the whole weights is a collective, so every rank calls it.
    state = accelerator.get_state_dict(model) if _sharded(accelerator) else None
    if main:
        unwrapped.save(out_dir, extra={"step": step, "eval": results,
                                       "train_rows": {n: len(r.dataset) for n, r in runs.items()}}, state_dict=state)
    # The ranks leave together: a rank tearing its process group down while the main one still saves aborted now
    # and then ("terminate called without an active exception", seen under FSDP on gloo).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out_dir


pretrain = train  # `xmodal pretrain` and `xmodal finetune` are the same loop; the config decides


def _fit_target_scales(model: XModalModel, runs: dict[str, TaskRun], init_weights: dict | None) -> None:
    """A regression head new to this run learns standardised targets: its mean and std come from the task's
    training targets. A head that ``init_from`` brought keeps the scale it was trained with (0/1 if it predates
    standardisation). Every process reads the whole train split, so every rank sets the same values."""
    for name, r in runs.items():
        if r.cfg.kind != "regression" or any(k.startswith(f"heads.{name}.") for k in init_weights or {}):
            continue
        y = targets(r.cfg, r.dataset[r.cfg.target], f"task {name}: ")
        for head in model.heads[name].modules():  # one per modality under late fusion
            if isinstance(head, RegressionHead):
                head.fit_target_scale(y)


def _too_few_rows(r: TaskRun, t, processes: int) -> str:
    """The error when a task's training rows do not fill one step's batch, with the fix."""
    per_step = t.batch_size * t.grad_accum_steps * processes
    fits = max(1, len(r.dataset) // (2 * t.grad_accum_steps * processes))  # about two steps per epoch at least
    suggestion = 1 << (fits.bit_length() - 1)  # a power of two
    who = "pretraining" if r.name == PRETRAIN_TASK else f"task {r.name}"
    return (f"{who}: {len(r.dataset)} training rows is less than one step's batch of {per_step} (train.batch_size "
            f"{t.batch_size} × train.grad_accum_steps {t.grad_accum_steps} × {processes} process(es)): lower "
            f"train.batch_size (e.g. train.batch_size={suggestion}), or give the task more rows")


def _batches(accelerator, r: TaskRun) -> Iterator[dict]:
    """Endless batches of one task from its saved position; ``r.epoch``/``r.batch`` always name the next batch."""
    while True:
        r.loader.set_epoch(r.epoch)
        for batch in accelerator.skip_first_batches(r.loader, r.batch) if r.batch else r.loader:
            r.batch += 1
            if r.batch == r.steps_per_epoch:
                r.epoch, r.batch = r.epoch + 1, 0
            yield batch


def _sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType
    return accelerator.distributed_type == DistributedType.FSDP


@torch.no_grad()
def _whole(param: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value on every rank: FSDP2 holds each parameter as a sharded DTensor (gathering it is a
    collective, so every rank must call this)."""
    return param.full_tensor() if hasattr(param, "full_tensor") else param


@contextlib.contextmanager
def _gathered_root(accelerator, model):
    """Under FSDP, evaluation runs on every rank in step: each FSDP block gathers its weights in its own forward,
    and the weights the root unit owns (projections, embeddings, temperature) are gathered for the whole evaluation,
    which calls towers directly rather than the root's forward."""
    if not _sharded(accelerator):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


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


def _position(step: int, runs: dict[str, TaskRun], sampler: TaskSampler, loss_window: dict) -> dict:
    return {"step": step, "tasks": {n: {"epoch": r.epoch, "batch": r.batch} for n, r in runs.items()},
            "sampler": sampler.state_dict(), "loss_window": loss_window}


def _unfreeze(model: XModalModel) -> None:
    for tower in model.towers.values():
        tower.frozen = False
        tower.encoder.requires_grad_(True)


def _all_reduce_grads(params) -> None:
    world = torch.distributed.get_world_size()
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


def _pcgrad(accelerator, model, losses: dict[str, torch.Tensor], seed: int) -> None:
    """PCGrad (Yu et al. 2020): per-task gradients (averaged over processes first, so every rank does the same
    surgery), conflicting components projected away, the sum written to ``.grad``."""
    # fp16: scale the losses as accelerator.backward does, since the scaler unscales every .grad before the step
    scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0
    pcgrad_backward(losses, model.parameters(), torch.Generator().manual_seed(seed),
                    mean=_mean_over_processes if accelerator.num_processes > 1 else None, scale=scale)


def _mean_over_processes(grad: torch.Tensor) -> torch.Tensor:
    """``grad`` averaged over every process, in place (gradients that bypass DDP's own all-reduce)."""
    torch.distributed.all_reduce(grad)
    grad /= torch.distributed.get_world_size()
    return grad


def _gradnorm(accelerator, model, unwrapped: XModalModel, weighting: GradNormWeighting,
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


def _flat_config(d: dict, prefix: str = "") -> dict:
    """``{"train.lr": 0.001, ...}`` with scalar values only: what tensorboard's hparams accept (wandb too)."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat_config(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def _evaluate_and_log(accelerator, model: XModalModel, runs: dict[str, TaskRun], step: int, metrics: MetricsLog,
                      cfg: Config) -> dict:
    """Every task's held-out metrics, on the main process only (the eval sets are small; results not sharded) —
    under FSDP on every process in step, as each forward gathers sharded weights; the main process reports."""
    from ..evaluation.evaluate import evaluate, evaluate_task

    results: dict = {}
    if accelerator.is_main_process or _sharded(accelerator):
        model.eval()
        with _gathered_root(accelerator, model):
            for name, r in runs.items():
                if r.eval_data is None:
                    continue
                if r.cfg.kind == "retrieval":
                    res = evaluate(model, r.eval_data.select_columns(
                        [c for c in r.eval_data.column_names if c in r.cfg.modalities or c == "label"]),
                        batch_size=cfg.train.batch_size)
                else:
                    res = evaluate_task(model, name, r.eval_data, batch_size=cfg.train.batch_size)
                prefix = "" if name == PRETRAIN_TASK else f"{name}/"
                results.update({f"{prefix}{k}": v for k, v in res.items()})
    if results and accelerator.is_main_process:
        metrics.write({"step": step, **{f"eval/{k}": v for k, v in results.items()}})
        if cfg.log.backend != "none":
            accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=step)
        shown = {k: round(v, 4) for k, v in results.items()
                 if any(s in k for s in ("R@", "top1", "accuracy", "macro_f1", "mae")) or k.endswith("r2")}
        log.info("eval at step %d: %s", step, shown)
    accelerator.wait_for_everyone()
    return results


def _progress(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)
