"""The one training loop (Accelerate): CPU, DDP, mixed precision, exact large-batch contrastive accumulation,
clipping, warmup + cosine LR, atomic checkpoints with exact resume, JSON-lines metrics, a progress bar.

Read top to bottom: ``pretrain`` builds everything, then one ``for`` loop over optimiser steps.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from functools import partial
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, save_config
from .data import ManifestDataset, collate, read_manifest
from .gradcache import gradcache_step
from .losses import build_loss, pairwise_loss
from .feature_cache import is_cacheable, precompute_features
from .model import FEATURES, XModalModel

log = logging.getLogger("xmodal")


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at ``total_steps`` (open_clip's ``cosine_lr``)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def param_groups(model: XModalModel, cfg: Config) -> list[dict]:
    """AdamW groups: no weight decay on gains, biases and the temperature (as open_clip excludes them);
    unfrozen encoders may take their own learning rate (``train.encoder_lr``)."""
    t = cfg.train
    encoder_lr = t.encoder_lr if t.encoder_lr is not None else t.lr
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim < 2 or "logit_" in name or ".bn" in name or ".ln" in name or "norm" in name
        lr = encoder_lr if ".encoder." in name else t.lr
        groups.setdefault((no_decay, lr), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": 0.0 if nd else t.weight_decay}
            for (nd, lr), ps in groups.items()]


def contrastive_loss(loss_fn, out: dict[str, torch.Tensor], modalities: list[str]) -> torch.Tensor:
    """Mean of the pairwise contrastive losses over every pair of ``modalities`` (one pair for image–text)."""
    return pairwise_loss(loss_fn, {m: out[m] for m in modalities}, out["logit_scale"], out.get("logit_bias"))


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

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
    )


def _set_seed(seed: int, deterministic: bool) -> None:
    from accelerate.utils import set_seed
    set_seed(seed, deterministic=deterministic)


def _batches(accelerator, loader, epoch: int, skip: int) -> Iterator[tuple[int, int, dict]]:
    """Endless (epoch, index-in-epoch, batch) starting at a saved position."""
    while True:
        loader.set_epoch(epoch)
        it = accelerator.skip_first_batches(loader, skip) if skip else loader
        for i, batch in enumerate(it, start=skip):
            yield epoch, i, batch
        epoch, skip = epoch + 1, 0


def _split(batch: dict, k: int) -> list[dict]:
    tensors = {m: v for m, v in batch.items() if isinstance(v, torch.Tensor)}
    return [dict(zip(tensors, chunk)) for chunk in zip(*(v.chunk(k) for v in tensors.values()))]


def collate_renamed(rename: dict[str, str], items: list[dict]) -> dict:
    """``collate``, then rename keys (``image`` → ``image:features`` for cached modalities)."""
    return {rename.get(k, k): v for k, v in collate(items).items()}


class MetricsLog:
    """Append-only JSON lines (``metrics.jsonl``) on the main process; one object per record."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def pretrain(cfg: Config, resume: bool = False) -> Path:
    """Contrastive pretraining of the shared space. Returns the run folder (``cfg.output_dir``)."""
    out_dir = Path(cfg.output_dir)
    if not resume and latest_checkpoint(out_dir) is not None:
        raise FileExistsError(f"{out_dir} already holds checkpoints: pass --resume to continue that run, or choose "
                              f"another output_dir (nothing was overwritten)")
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                            handlers=[logging.StreamHandler(), logging.FileHandler(out_dir / "train.log")])
    _set_seed(cfg.seed, cfg.train.deterministic)
    t = cfg.train

    model = XModalModel(cfg.model)
    modalities = model.modalities
    if len(modalities) < 2:
        raise ValueError("pretrain: contrastive alignment needs at least two towers in model.towers")
    if cfg.data.train is None:
        raise ValueError("data.train: a training manifest is required")
    manifest = read_manifest(cfg.data.train, split=cfg.data.train_split, modalities=modalities, root=cfg.data.root,
                             on_bad_row=cfg.data.on_bad_row, max_rows=cfg.data.max_rows)
    if manifest.skipped:
        log.warning("skipped %d bad rows of %s (on_bad_row=skip); first: %s", manifest.skipped, manifest.source,
                    manifest.problems[:1])
    eval_data = _eval_dataset(cfg, modalities)

    transforms, cached = {}, {}
    for m in modalities:
        if t.cache_frozen and is_cacheable(m, cfg.model.towers[m]):
            transforms[m] = precompute_features(model.towers[m].encoder, model.transform(m, train=False),
                                                manifest.dataset[m], batch_size=t.batch_size,
                                                num_workers=cfg.data.num_workers, device=accelerator.device,
                                                desc=f"cache frozen {m} features", progress=main and t.progress)
            cached[m] = m + FEATURES
        else:
            transforms[m] = model.transform(m, train=True)
    dataset = ManifestDataset(manifest.dataset, transforms)
    step_batch = t.batch_size * t.grad_accum_steps  # per process; the contrastive batch is this × processes
    loader = DataLoader(dataset, batch_size=step_batch, shuffle=True, drop_last=True,
                        collate_fn=partial(collate_renamed, cached),
                        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)
    optimizer = torch.optim.AdamW(param_groups(model, cfg), lr=t.lr, betas=t.betas, eps=t.eps)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ValueError(f"{manifest.source}: {len(dataset)} rows is less than one step's batch "
                         f"(batch_size {t.batch_size} × grad_accum_steps {t.grad_accum_steps} × "
                         f"{accelerator.num_processes} processes)")
    total = t.max_steps or t.epochs * steps_per_epoch
    # Stepped by hand once per optimiser step: Accelerate's wrapper would step it once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t.warmup_steps, total))
    accelerator.register_for_checkpointing(scheduler)
    loss_fn = build_loss(cfg.model.loss, local_loss=t.local_loss, gather_with_grad=t.gather_with_grad)
    unwrapped: XModalModel = accelerator.unwrap_model(model)

    position = {"step": 0, "epoch": 0, "batch": 0}
    ckpt = latest_checkpoint(out_dir) if resume else None
    if ckpt is not None:
        position = load_checkpoint(accelerator, ckpt)
        log.info("resumed from %s at step %d", ckpt, position["step"])
    if main and cfg.log.backend != "none":
        accelerator.init_trackers(cfg.log.project, config=_flat_config(cfg.to_dict()),
                                  init_kwargs={"wandb": {"dir": str(out_dir), "name": out_dir.name}})
    metrics = MetricsLog(out_dir / "metrics.jsonl", main)
    samples_per_step = step_batch * accelerator.num_processes
    log.info("pretrain: %d rows, %d steps (%d per epoch), contrastive batch %d, %d process(es), device %s",
             len(dataset), total, steps_per_epoch, samples_per_step, accelerator.num_processes, accelerator.device)

    def encode(micro: dict) -> dict:
        with accelerator.autocast():
            return model(micro)

    progress = _progress(main and t.progress, total, position["step"])
    step, window_start, window_steps = position["step"], time.perf_counter(), 0
    batches = _batches(accelerator, loader, position["epoch"], position["batch"])
    model.train()
    while step < total:
        epoch, index, batch = next(batches)
        if t.grad_accum_steps == 1:
            loss = contrastive_loss(loss_fn, encode(batch), modalities)
            accelerator.backward(loss)
            loss = loss.detach()
        else:
            loss = gradcache_step(encode, _split(batch, t.grad_accum_steps),
                                  lambda feats: contrastive_loss(loss_fn, feats, modalities),
                                  backward=accelerator.backward, no_sync=lambda: accelerator.no_sync(model))
        grad_norm = (accelerator.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                     if t.max_grad_norm else None)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        unwrapped.clamp_logit_scale()
        step += 1
        window_steps += 1
        position = {"step": step, "epoch": epoch + (index + 1) // steps_per_epoch,
                    "batch": (index + 1) % steps_per_epoch}

        if step % t.log_every == 0 or step == total:
            loss_value = accelerator.reduce(loss.float(), "mean").item()  # per-rank losses differ with local_loss
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "epoch": position["epoch"], "loss": loss_value,
                      "lr": optimizer.param_groups[0]["lr"], "logit_scale": unwrapped.logit_scale.exp().item(),
                      "samples_per_s": window_steps * samples_per_step / max(elapsed, 1e-9)}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            metrics.write(record)
            if cfg.log.backend != "none":
                accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
            if progress is not None:
                progress.set_postfix(loss=f"{loss_value:.4f}", samples_s=f"{record['samples_per_s']:.0f}")
            window_start, window_steps = time.perf_counter(), 0
        if progress is not None:
            progress.update(1)
        if t.save_every and step % t.save_every == 0 and step < total:
            save_checkpoint(accelerator, out_dir, position, keep=t.keep_checkpoints)
        if eval_data is not None and t.eval_every and step % t.eval_every == 0 and step < total:
            _evaluate_and_log(accelerator, unwrapped, eval_data, step, metrics, cfg)
            model.train()

    if progress is not None:
        progress.close()
    save_checkpoint(accelerator, out_dir, position, keep=t.keep_checkpoints)
    results = _evaluate_and_log(accelerator, unwrapped, eval_data, step, metrics, cfg) if eval_data else {}
    if main:
        unwrapped.save(out_dir, extra={"step": step, "eval": results, "train_rows": len(dataset)})
    accelerator.end_training()
    return out_dir


def _flat_config(d: dict, prefix: str = "") -> dict:
    """``{"train.lr": 0.001, ...}`` with scalar values only: what tensorboard's hparams accept (wandb too)."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flat_config(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def _eval_dataset(cfg: Config, modalities: list[str]):
    d = cfg.data
    if d.eval is None and d.eval_split is None:
        return None
    source = d.eval or d.train
    return read_manifest(source, split=d.eval_split, modalities=modalities, root=d.root,
                         on_bad_row=d.on_bad_row, max_rows=d.max_rows).dataset


def _evaluate_and_log(accelerator, model: XModalModel, dataset, step: int, metrics: MetricsLog,
                      cfg: Config) -> dict:
    """Evaluation runs on the main process only (the eval sets are small; results are not sharded)."""
    from .evaluate import evaluate

    results: dict = {}
    if accelerator.is_main_process:
        model.eval()
        results = evaluate(model, dataset, batch_size=cfg.train.batch_size)
        metrics.write({"step": step, **{f"eval/{k}": v for k, v in results.items()}})
        if cfg.log.backend != "none":
            accelerator.log({f"eval/{k}": v for k, v in results.items()}, step=step)
        shown = {k: round(v, 4) for k, v in results.items() if "R@" in k or "top1" in k}
        log.info("eval at step %d: %s", step, shown)
    accelerator.wait_for_everyone()
    return results


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="pretrain", unit="step", dynamic_ncols=True)
