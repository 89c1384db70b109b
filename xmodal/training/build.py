"""Everything a training run is built from, before its first step: the run's config (with ``init_from``), the
Accelerator, the run folder, each task's rows and loader (frozen towers' features cached first), the model, the loss
weighting, the optimiser and LR schedule — gathered into one :class:`~.state.RunState`."""
from __future__ import annotations

import copy
import logging
import math
import os
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..batch import FEATURES, collate
from ..config import Config, ModelConfig, _from_dict, check_task_modalities, save_config
from ..data import ManifestDataset
from ..data.stream import StreamLoader
from ..feature_cache import cached_towers, precompute_features, resolve_root, tower_settings
from ..losses import build_loss
from ..losses.matryoshka import with_matryoshka
from ..losses.multitask import GradNormWeighting, StaticWeighting, UncertaintyWeighting
from ..modalities.pretrained import resolve_pretrained
from ..model import XModalModel
from ..run_identity import start_run
from ..tasks.head import targets
from ..tasks.heads import RegressionHead
from .checkpoint_files import recorded_run
from .run_log import LossWindow, MetricsLog
from .holdout import validation_rows
from .sampling import TaskSampler
from .selection import Selection
from .state import RunState, TaskRun
from .streaming import attach_stream, shard_task
from .task_data import PRETRAIN_TASK, read_task_manifests, task_configs

log = logging.getLogger("xmodal")


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
    them); encoders take ``train.encoder_lr``, times ``train.layer_lr_decay`` per block below the top one.
    Frozen encoders are included when they will be unfrozen later."""
    t = cfg.train
    encoder_lr = t.encoder_lr if t.encoder_lr is not None else t.lr
    depths: dict[int, int] = {}
    if t.layer_lr_decay != 1:
        from ..modalities.blocks import block_depths
        for tower in getattr(model, "towers", {}).values():
            depths.update(block_depths(tower.encoder))
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and not (t.unfreeze_at_step and ".encoder." in name):
            continue
        no_decay = p.ndim < 2 or "logit_" in name or ".bn" in name or ".ln" in name or "norm" in name
        lr = encoder_lr * t.layer_lr_decay ** depths.get(id(p), 0) if ".encoder." in name else t.lr
        groups.setdefault((no_decay, lr), []).append(p)
    for p in extra:
        groups.setdefault((True, t.lr), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": 0.0 if nd else t.weight_decay}
            for (nd, lr), ps in groups.items()]


def make_accelerator(cfg: Config, find_unused: bool = False):
    from accelerate import Accelerator

    from .failures import process_group_kwargs
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
        # collectives time out (XMODAL_COLLECTIVE_TIMEOUT_S): a hung process stops the others (failures.py)
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused), process_group_kwargs()],
    )


def collate_renamed(rename: dict[str, str], items: list[dict]) -> dict:
    """``collate``, then rename keys (``image`` → ``image:features`` for cached modalities)."""
    return {rename.get(k, k): v for k, v in collate(items).items()}


# ---------------------------------------------------------------------------------------- before the Accelerator

def run_config(cfg: Config) -> tuple[Config, dict | None]:
    """The config this run trains (a copy: ``init_from``'s towers when the config has none, ``train.freeze_towers``
    applied, every task's modalities checked against the towers) and ``init_from``'s weights (None without it)."""
    cfg = copy.deepcopy(cfg)
    cfg.model = resolve_pretrained(cfg.model)  # model.pretrained → its towers (a no-op when the CLI did it already)
    towers_from = f"the init_from run {cfg.init_from}" if cfg.init_from and not cfg.model.towers else "model.towers"
    cfg.model, init_weights = _init_from(cfg)
    if cfg.train.freeze_towers is not None or cfg.train.unfreeze_at_step:
        for tower in cfg.model.towers.values():
            tower.freeze = bool(cfg.train.freeze_towers) or bool(cfg.train.unfreeze_at_step)
            tower.train_blocks = None  # they set every block's state: all frozen, all trained, all unfrozen later
    for name, tc in cfg.tasks.items():
        check_task_modalities(name, tc, list(cfg.model.towers), towers_from)
    return cfg, init_weights


def _init_from(cfg: Config) -> tuple[ModelConfig, dict | None]:
    """The model config and weights of ``init_from`` — a run folder, an exported folder or ``hf-hub:ORG/NAME``, as
    ``xmodal.load`` takes (the files checked as it checks them) — so that fine-tuning need not repeat the towers."""
    if cfg.init_from is None:
        return cfg.model, None
    from ..model_files import CARD_NAME, model_folder, open_files, read_weights
    run = model_folder(cfg.init_from)
    if not (run / CARD_NAME).is_file():
        raise FileNotFoundError(f"init_from: {run} is not an xmodal run folder (no model.json)")
    weights, card, record = open_files(run)
    model_cfg = cfg.model if cfg.model.towers else _from_dict(ModelConfig, card["model"], "model")
    return model_cfg, read_weights(weights, run / CARD_NAME, record)()


class _LevelFormatter(logging.Formatter):
    """The time and the message; a warning or an error also names its level (unlabelled, a warning such as
    "resuming with changed ..." read like any INFO line)."""

    _labelled = logging.Formatter("%(asctime)s %(levelname)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return self._labelled.format(record) if record.levelno >= logging.WARNING else super().format(record)


def open_run_folder(cfg: Config, out_dir: Path, main: bool, ckpt: Path | None = None) -> None:
    """On the main process: the folder, its ``config.yaml``, its run id (``run.json``: a new one for a fresh run,
    else kept, or taken from the checkpoint ``ckpt`` resumed from; what checkpoints and the model record, see
    :mod:`xmodal.run_identity`), and logging to the console and ``train.log``."""
    if not main:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    start_run(out_dir, fresh=ckpt is None, recorded=recorded_run(ckpt) if ckpt is not None else None)
    handlers = [logging.StreamHandler(), logging.FileHandler(out_dir / "train.log")]
    for h in handlers:
        h.setFormatter(_LevelFormatter("%(asctime)s %(message)s"))
    logging.basicConfig(level=logging.INFO, force=True, handlers=handlers)
    # Accelerate logs ~7 INFO lines per checkpoint (each file it writes); xmodal logs one line per save.
    logging.getLogger("accelerate").setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------------------ the run

def build_run(cfg: Config, out_dir: Path, accelerator, init_weights: dict | None) -> RunState:
    """Tasks, model, loaders, weighting, optimiser and schedule, prepared by Accelerate; the run at step 0."""
    t, mt = cfg.train, cfg.multitask
    tasks = read_tasks(cfg, accelerator.num_processes)
    model = build_model(cfg, tasks, init_weights)
    metrics = MetricsLog(out_dir / MetricsLog.NAME, accelerator.is_main_process)
    make_loaders(cfg, accelerator, model, tasks, metrics)
    weighting = make_weighting(cfg, tasks, accelerator.device)
    optimizer = make_optimizer(cfg, model, weighting)
    # A shard stream is this rank's part already: preparing it would dispatch or split it again (streaming.py).
    prepared = [r for r in tasks.values() if not isinstance(r.loader, StreamLoader)]
    model, optimizer, *loaders = accelerator.prepare(model, optimizer, *(r.loader for r in prepared))
    for r, loader in zip(prepared, loaders):
        r.loader = loader
    for r in tasks.values():
        r.steps_per_epoch = len(r.loader)
        if r.steps_per_epoch == 0:
            raise ValueError(_too_few_rows(r, t, accelerator.num_processes))
    epoch_steps = (sum(r.steps_per_epoch for r in tasks.values()) if mt.tasks_per_step == "one"
                   else max(r.steps_per_epoch for r in tasks.values()))
    total = t.max_steps or t.epochs * epoch_steps
    # Stepped by hand once per optimiser step: Accelerate's wrapper would step it once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(t.warmup_steps, total))
    accelerator.register_for_checkpointing(scheduler, weighting)
    sampler = TaskSampler({n: len(r.dataset) for n, r in tasks.items()}, mt.sampling,
                          mt.temperature if mt.sampling == "temperature" else 1.0, seed=cfg.seed)
    return RunState(
        cfg=cfg, out_dir=out_dir, accelerator=accelerator, model=model, unwrapped=accelerator.unwrap_model(model),
        tasks=tasks, weighting=weighting, optimizer=optimizer, scheduler=scheduler, sampler=sampler,
        loss_fn=with_matryoshka(build_loss(cfg.model.loss, local_loss=t.local_loss, gather_with_grad=t.gather_with_grad,
                                           label_smoothing=cfg.model.label_smoothing),
                                cfg.model.matryoshka_dims),
        loss_window=LossWindow(tasks, accelerator.device),
        metrics=metrics,
        total=total, epoch_steps=epoch_steps,
        samples_per_step=t.batch_size * t.grad_accum_steps * accelerator.num_processes,
        selection=_selection(cfg, tasks, accelerator))


def _selection(cfg: Config, tasks: dict[str, TaskRun], accelerator) -> Selection | None:
    """Model selection's state (``train.select_best``); None without it, or under FSDP (a sharded model has no
    whole weights on one rank to keep), which is said once."""
    rows = next((r.selection_rows for r in tasks.values() if r.select_data is not None), None)
    if rows is None:
        return None
    from .report import sharded
    if sharded(accelerator):
        log.warning("train.select_best: not under FSDP (no rank holds the whole weights to keep); the model "
                    "saved is the last step's")
        return None
    return Selection(cfg.train.select_metric, rows)


def read_tasks(cfg: Config, world: int = 1) -> dict[str, TaskRun]:
    """Every task's train and eval rows (pretraining: the one task of ``data.train``), read and checked — or, with
    ``data.shards``, the shard list with its sample counts (rows are checked as they stream)."""
    modalities = list(cfg.model.towers)
    tasks: dict[str, TaskRun] = {}
    for name, tc in task_configs(cfg, modalities).items():
        if cfg.data.streamed:
            tasks[name] = shard_task(cfg, name, tc, world)
            continue
        train_m, eval_m = read_task_manifests(cfg, name, tc)
        val_m = None
        if cfg.train.select_best:  # pretraining only (config checks): validation rows, perhaps held out of train
            train_m, val_m, selection_rows = validation_rows(cfg, name, tc, train_m)
        tasks[name] = TaskRun(name, tc, train_m.rows, eval_m.rows if eval_m is not None else None,
                              select_data=val_m.rows if val_m is not None else None,
                              source=train_m.source, row_numbers=train_m.row_numbers)
        if val_m is not None:
            tasks[name].selection_rows = selection_rows
    if not cfg.tasks and len(modalities) < 2:
        raise ValueError("pretrain: contrastive alignment needs at least two towers in model.towers")
    return tasks


def build_model(cfg: Config, tasks: dict[str, TaskRun], init_weights: dict | None) -> XModalModel:
    """The towers (with ``init_from``'s weights), a head per fine-tuning task, regression targets' scales."""
    model = XModalModel(cfg.model, {n: r.cfg for n, r in tasks.items()} if cfg.tasks else None)
    if init_weights is not None:
        missing, unexpected = model.load_state_dict(init_weights, strict=False)
        # a pair memory is a by-product of a run's pairs, not weights: taken where both have one, else left out
        missing = [k for k in missing if not k.startswith(("heads.", "pair_memory."))]
        unexpected = [k for k in unexpected if not k.startswith("pair_memory.")]
        if missing or unexpected:
            raise ValueError(f"init_from {cfg.init_from}: weights do not fit the towers (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
    _fit_target_scales(model, tasks, init_weights)  # before a resumed run's checkpoint, which restores its own
    if cfg.train.freeze_projections:  # a linear probe of the shared space itself: only the heads learn
        for tower in model.towers.values():
            tower.projection.requires_grad_(False)
    return model


def make_loaders(cfg: Config, accelerator, model: XModalModel, tasks: dict[str, TaskRun],
                 metrics: MetricsLog | None = None) -> None:
    """Each task's shuffled loader of whole step batches (``batch_size × grad_accum_steps`` rows per process), on
    cached features for frozen, non-augmented towers (embedded once, here). A sharded task streams instead
    (:mod:`.streaming`; its frozen towers' features are cached on disk as the stream meets its samples)."""
    t, modalities = cfg.train, list(cfg.model.towers)
    if cfg.data.streamed:
        for r in tasks.values():
            attach_stream(cfg, accelerator, model, r, metrics)
        if model.pair_memory is not None:
            fill_pair_memory_from_shards(cfg, accelerator, model, tasks)
        return
    for r in tasks.values():  # before any feature is cached: the loaders drop an incomplete last batch
        if len(r.dataset) < t.batch_size * t.grad_accum_steps * accelerator.num_processes:
            raise ValueError(_too_few_rows(r, t, accelerator.num_processes))
    used = {m for r in tasks.values() for m in r.cfg.modalities}  # a tower no task reads is never run
    cached = {m: m + FEATURES for m in cached_towers(cfg, [m for m in modalities if m in used])}
    caches = {}
    for m in cached:
        values = [v for r in tasks.values() if m in r.cfg.modalities for v in r.dataset[m] if v not in (None, "")]
        caches[m] = precompute_features(model.towers[m].encoder, model.transform(m, train=False), values,
                                        batch_size=t.batch_size, num_workers=cfg.data.num_workers,
                                        device=accelerator.device, desc=f"cache frozen {m} features",
                                        progress=accelerator.is_main_process and t.progress,
                                        memo_key=tower_settings(m, cfg.model.towers[m]),
                                        cache_dir=resolve_root(t.feature_cache_dir))
    if model.pair_memory is not None:
        fill_pair_memory(cfg, accelerator, model, tasks, caches)
    step_batch = t.batch_size * t.grad_accum_steps  # per process; the contrastive batch is this × processes
    for r in tasks.values():
        transforms = {m: caches.get(m) or model.transform(m, train=True) for m in r.cfg.modalities}
        extra = [r.cfg.target] if r.cfg.kind != "retrieval" else []
        # augment_seed: each row's crops a function of (seed, epoch, row), so that resume is exact (loader.py)
        rows = ManifestDataset(r.dataset, transforms, extra_columns=extra, source=r.source,
                               row_numbers=r.row_numbers, augment_seed=cfg.seed)
        r.loader = DataLoader(rows, batch_size=step_batch,
                              shuffle=True, drop_last=True, collate_fn=partial(collate_renamed, cached),
                              num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)


def fill_pair_memory(cfg: Config, accelerator, model: XModalModel, tasks: dict[str, TaskRun], caches: dict) -> None:
    """``model.pair_memory``: the encoder features of the training pairs (rows of a task that reads every tower and
    has them all), at most ``max_rows`` of them (a sample seeded by ``seed``)."""
    memory, t = model.pair_memory, cfg.train
    values: dict[str, list] = {m: [] for m in memory.modalities}
    for r in tasks.values():
        if set(memory.modalities) <= set(r.cfg.modalities):
            columns = [r.dataset[m] for m in memory.modalities]
            for row in zip(*columns):
                if all(v not in (None, "") for v in row):
                    for m, v in zip(memory.modalities, row):
                        values[m].append(v)
    n = len(values[memory.modalities[0]])
    if n == 0:
        kept = (f"it keeps the {len(memory)} pairs init_from brought, whose partners no longer follow projections "
                f"this run trains") if len(memory) else "it stays empty (plain embeddings)"
        log.warning("model.pair_memory: no training row of this run has all of %s; %s", ", ".join(memory.modalities),
                    kept)
        return
    keep = range(n)
    if n > cfg.model.pair_memory.max_rows:
        keep = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
                      [:cfg.model.pair_memory.max_rows].tolist())
    raw = {}
    for m in memory.modalities:
        lookup = caches.get(m) or precompute_features(
            model.towers[m].encoder, model.transform(m, train=False), values[m], batch_size=t.batch_size,
            device=accelerator.device, desc=f"pair memory: {m} features", progress=accelerator.is_main_process and
            t.progress, memo_key=tower_settings(m, cfg.model.towers[m]), cache_dir=resolve_root(t.feature_cache_dir))
        raw[m] = torch.stack([torch.as_tensor(lookup(values[m][i])) for i in keep]).float()
    memory.fill(raw)
    log.info("model.pair_memory: %d training pairs (of %d)", len(memory), n)


def fill_pair_memory_from_shards(cfg: Config, accelerator, model: XModalModel, tasks: dict[str, TaskRun]) -> None:
    """``model.pair_memory`` from a streamed corpus: the first ``ceil(max_rows / shards)`` readable samples of every
    shard that have all the memory's columns (so the pairs span the corpus, not its first shards), at most
    ``max_rows``, embedded here by the frozen towers — on every process alike (each reads the same samples: the memory
    must be the same everywhere)."""
    from ..data.shards import BadSample, SampleDecoder, parse_columns
    from ..data.stream import read_segment
    from .report import sharded

    memory, t = model.pair_memory, cfg.train
    task = next((r for r in tasks.values() if set(memory.modalities) <= set(r.cfg.modalities)), None)
    if task is None or sharded(accelerator):
        why = "no task reads all of " + ", ".join(memory.modalities) if task is None else \
            "under FSDP a sharded encoder cannot embed samples on its own"
        log.warning("model.pair_memory: not filled from the shards (%s); the model keeps plain embeddings", why)
        return
    columns = [c for c in parse_columns(cfg.data.columns, task.cfg.modalities) if c.name in memory.modalities]
    decode = SampleDecoder(columns, {m: model.transform(m, train=False) for m in memory.modalities})
    shards, max_rows = task.dataset.shards, cfg.model.pair_memory.max_rows
    per_shard = math.ceil(max_rows / len(shards))
    raw: dict[str, list] = {m: [] for m in memory.modalities}
    chunk: list[dict] = []

    def embed() -> None:  # a batch at a time: decoded inputs are not kept, only their features
        with torch.no_grad():
            for m in memory.modalities:
                x = torch.stack([item[m] for item in chunk]).to(accelerator.device)
                raw[m].append(model.towers[m].encoder(x).float().cpu())
        chunk.clear()

    from ..progress import tqdm
    n = 0
    bar = tqdm(total=min(max_rows, len(task.dataset)), desc="pair memory: shard samples", unit="pair",
               disable=not (accelerator.is_main_process and t.progress))
    for shard in shards:
        taken = 0
        for sample in read_segment(shard, 0, shard.samples):
            item = decode(sample)
            if isinstance(item, BadSample):  # the stream reports bad samples as it meets them; here they are skipped
                continue
            chunk.append(item)
            taken, n = taken + 1, n + 1
            bar.update(1)
            if len(chunk) == t.batch_size:
                embed()
            if taken == per_shard or n == max_rows:
                break
        if n == max_rows:
            break
    bar.close()
    if chunk:
        embed()
    if n == 0:
        log.warning("model.pair_memory: no readable sample in the shards has all of %s; it stays empty (plain "
                    "embeddings)", ", ".join(memory.modalities))
        return
    memory.fill({m: torch.cat(v) for m, v in raw.items()})
    log.info("model.pair_memory: %d pairs from %d shard(s) (at most %d a shard)", n, len(shards), per_shard)


def make_weighting(cfg: Config, tasks: dict[str, TaskRun], device) -> torch.nn.Module:
    mt = cfg.multitask
    if mt.weighting == "uncertainty":
        return UncertaintyWeighting(tasks)
    if mt.weighting == "gradnorm":  # on the device: its weights meet the gradient norms there (and NCCL wants it)
        return GradNormWeighting(tasks, mt.gradnorm_alpha).to(device)
    return StaticWeighting({n: r.cfg.weight for n, r in tasks.items()})


def make_optimizer(cfg: Config, model: XModalModel, weighting: torch.nn.Module) -> torch.optim.AdamW:
    t = cfg.train
    groups = param_groups(model, cfg, list(weighting.parameters()))
    # The fused kernel: one op per step instead of ~55 per tensor (benchmarks/train_step.py --ablate).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=t.lr, betas=t.betas, eps=t.eps, fused=fused)


def _fit_target_scales(model: XModalModel, tasks: dict[str, TaskRun], init_weights: dict | None) -> None:
    """A regression head new to this run learns standardised targets: its mean and std come from the task's
    training targets. A head that ``init_from`` brought keeps the scale it was trained with (0/1 if it predates
    standardisation). Every process reads the whole train split, so every rank sets the same values."""
    for name, r in tasks.items():
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
