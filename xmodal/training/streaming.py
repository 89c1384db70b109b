"""Pretraining on a sharded corpus (``data.shards``): the task over the shards, its stream loader, and what each of
its batches goes through before a step — bad samples counted and named, the stop past ``data.max_bad_fraction``, the
sample ids recorded (``data.record_ids``), the move to the device — and its part of a checkpoint's position.

The shard loader is never given to ``accelerator.prepare``: each rank's stream already holds only its own batches
(:mod:`xmodal.data.shard_plan`). Prepared, an iterable would either be read on rank 0 and its batches dispatched
(Accelerate's default for iterables, ``dispatch_batches``) or be split a second time (``IterableDatasetShard``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path

import torch

from ..config import Config, TaskConfig
from ..data.shard_plan import Layout, epoch_steps, position
from ..data.hf_source import HFSource, hf_shards
from ..data.shards import SampleDecoder, parse_columns, shard_list
from ..data.stream import BAD, ShardCorpus, ShardStream, StreamLoader
from ..data.stream_features import StreamFeatures
from ..feature_cache import cached_towers, resolve_root, tower_settings, tower_store
from .checkpoint import latest_checkpoint
from .report import sharded
from .run_log import MetricsLog
from .state import TaskRun
from .task_data import _read, usable_rows

log = logging.getLogger("xmodal")

_SHOWN = 5  # bad samples named per log line


class BadDataError(ValueError):
    """More bad samples in an epoch than ``data.max_bad_fraction`` allows."""


def shard_corpus(cfg: Config, world: int) -> ShardCorpus:
    """The run's shards with their sample counts, and how an epoch is cut across ``world`` processes."""
    d, t = cfg.data, cfg.train
    layout = Layout(world=world, workers=max(1, d.num_workers), batch=t.batch_size * t.grad_accum_steps,
                    seed=cfg.seed, resampled=d.resampled, samples_per_epoch=t.samples_per_epoch)
    corpus = ShardCorpus(stream_shards(cfg), layout)
    if epoch_steps(corpus.shards, layout) == 0:
        per_step = layout.batch * world
        raise ValueError(f"data.shards: {len(corpus)} samples {'per epoch ' if d.resampled else ''}is less than one "
                         f"step's batch of {per_step} (train.batch_size × train.grad_accum_steps × {world} "
                         f"process(es)): lower train.batch_size or give more samples")
    return corpus


def stream_shards(cfg: Config) -> list:
    """``data.shards`` with their counts, or the shards of ``data.hf_dataset`` (its columns checked first)."""
    d = cfg.data
    if d.hf_dataset is None:
        return shard_list(d.shards, d.shard_sizes)
    files = [d.hf_data_files] if isinstance(d.hf_data_files, str) else d.hf_data_files
    src = HFSource(d.hf_dataset, d.hf_split, d.hf_config, tuple(files) if files else None)
    return hf_shards(src, parse_columns(d.columns, list(cfg.model.towers)), d.shard_sizes)


def shard_task(cfg: Config, name: str, tc: TaskConfig, world: int) -> TaskRun:
    """The pretraining task over ``data.shards`` (its eval rows from ``data.eval``, a manifest, when given)."""
    d = cfg.data
    corpus = shard_corpus(cfg, world)
    eval_data = None
    if d.eval is not None:
        m = _read(d.eval, split=d.eval_split, modalities=tc.modalities, root=d.root, on_bad_row=d.on_bad_row,
                  require_all=False, allow_outside_root=d.allow_outside_root)
        eval_data = (usable_rows(m, name, tc, d.eval_split) if len(tc.modalities) == 2 else m).rows
    log.info("data.shards: %d shards, %d samples; %d steps per epoch on each of %d process(es)", len(corpus.shards),
             len(corpus), epoch_steps(corpus.shards, corpus.layout), world)
    return TaskRun(name, tc, corpus, eval_data, source=str(d.shards if d.hf_dataset is None else d.hf_dataset))


def attach_stream(cfg: Config, accelerator, model, r: TaskRun, metrics: MetricsLog) -> None:
    """The task's stream loader (its transforms the model's training transforms; a cached frozen tower's its
    evaluation transform, as on the manifest path) and its batch monitor."""
    corpus: ShardCorpus = r.dataset
    columns = parse_columns(cfg.data.columns, r.cfg.modalities)
    features = {} if sharded(accelerator) else stream_features(cfg, model, columns)
    decoder = SampleDecoder(columns, {m: model.transform(m, train=m not in features) for m in r.cfg.modalities},
                            features, augment_seed=cfg.seed)
    stream = ShardStream(corpus, accelerator.process_index, decoder, cfg.data.shuffle_block)
    r.loader = StreamLoader(stream, cfg.data.num_workers)
    ids = Path(cfg.output_dir) / "ids" / f"rank{accelerator.process_index}.jsonl" if cfg.data.record_ids else None
    r.monitor = BatchMonitor(accelerator, metrics, cfg.data.max_bad_fraction, len(corpus), r.name,
                             Path(cfg.output_dir), ids, list(features.values()))


def stream_features(cfg: Config, model, columns: list) -> dict[str, StreamFeatures]:
    """The frozen towers whose features the stream caches on disk (:mod:`xmodal.data.stream_features`), by column.
    Not under FSDP: a sharded encoder cannot be run on its own for the samples the cache lacks."""
    root = resolve_root(cfg.train.feature_cache_dir)
    if root is None:
        return {}
    out = {}
    for col in columns:
        if col.name not in cached_towers(cfg, [col.name]):
            continue
        encoder = model.towers[col.name].encoder
        store = tower_store(root, encoder, tower_settings(col.name, cfg.model.towers[col.name]),
                            f"frozen {col.name} features are computed at every step")
        if store is not None:
            out[col.name] = StreamFeatures(col, store, encoder, chunk=cfg.train.batch_size)
    return out


class BatchMonitor:
    """Each stream batch before its step, on every rank at once (its counts are summed over processes)."""

    def __init__(self, accelerator, metrics: MetricsLog, max_bad_fraction: float, epoch_samples: int, task: str,
                 out_dir: Path, ids_file: Path | None, features: list[StreamFeatures] = ()):
        self.acc, self.metrics, self.task, self.out_dir = accelerator, metrics, task, out_dir
        self.features = list(features)  # frozen towers cached on disk: the batch's features completed here
        self.allowed = math.floor(max_bad_fraction * epoch_samples)
        self.max_bad_fraction, self.epoch_samples = max_bad_fraction, epoch_samples
        self.epoch, self.bad_in_epoch, self.bad_total = 0, 0, 0
        self.ids_file = ids_file
        if ids_file is not None:
            ids_file.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, batch: dict, epoch: int, index: int) -> dict:
        from accelerate.utils import gather_object, send_to_device

        if epoch != self.epoch:
            self.epoch, self.bad_in_epoch = epoch, 0
        bad = batch.pop(BAD, [])
        counts = self.acc.reduce(torch.tensor([len(bad), int(not batch["id"])], device=self.acc.device), "sum")
        n_bad, empty = (int(v) for v in counts.tolist())
        if n_bad:
            named = gather_object(bad) if self.acc.num_processes > 1 else bad
            self._report(named, epoch, index)
        if empty:
            raise BadDataError(f"data.shards: epoch {epoch}, batch {index}: no sample of a step batch could be "
                               f"read on {empty} process(es){self._last_good()}")
        if self.ids_file is not None:
            with open(self.ids_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({"epoch": epoch, "batch": index, "ids": batch["id"]}) + "\n")
        batch = send_to_device(batch, self.acc.device)
        for cached in self.features:
            cached.fill(batch, self.acc.device)
        return batch

    def close(self) -> None:
        """The run ends or stops: the frozen features computed since the last write go to the disk cache."""
        for cached in self.features:
            cached.close()

    def _report(self, named: list[str], epoch: int, index: int) -> None:
        self.bad_in_epoch += len(named)
        self.bad_total += len(named)
        if self.acc.is_main_process:
            log.warning("skipped %d bad sample(s) (epoch %d, batch %d; %d this epoch): %s%s", len(named), epoch, index,
                        self.bad_in_epoch, "; ".join(named[:_SHOWN]), " ..." if len(named) > _SHOWN else "")
            self.metrics.write({"task": self.task, "epoch": epoch, "batch": index, "bad_samples": named,
                                "bad_in_epoch": self.bad_in_epoch, "bad_total": self.bad_total})
        if self.bad_in_epoch > self.allowed:
            raise BadDataError(f"data.shards: {self.bad_in_epoch} bad samples in epoch {epoch} exceed "
                               f"data.max_bad_fraction {self.max_bad_fraction} of its {self.epoch_samples} samples "
                               f"({self.allowed} allowed); the last: {named[-1]}{self._last_good()}")

    def _last_good(self) -> str:
        ckpt = latest_checkpoint(self.out_dir)
        return f"; the last good checkpoint is {ckpt} (--resume continues from it)" if ckpt else ""

    def state(self) -> dict:
        return {"epoch": self.epoch, "bad_in_epoch": self.bad_in_epoch, "bad_total": self.bad_total}

    def load(self, state: dict) -> None:
        self.epoch, self.bad_in_epoch = state.get("epoch", 0), state.get("bad_in_epoch", 0)
        self.bad_total = state.get("bad_total", 0)


def stream_position(r: TaskRun, epoch: int, batch: int) -> dict:
    """A stream task's part of a checkpoint: the layout it was cut for, the bad-sample counts, and where every
    (rank, worker) stands (computed here for every rank: the plan is the same function everywhere)."""
    corpus: ShardCorpus = r.dataset
    lay = corpus.layout
    return {**_cut(corpus), "bad": r.monitor.state(),
            "positions": [p for rank in range(lay.world) for p in position(corpus.shards, lay, epoch, batch, rank)]}


def _cut(corpus: ShardCorpus) -> dict:
    """What a position's meaning depends on: the layout, and the shard list (its names and counts, digested)."""
    lay = corpus.layout
    listing = json.dumps([[s.url, s.samples] for s in corpus.shards]).encode()
    return {"world": lay.world, "workers": lay.workers, "batch_rows": lay.batch, "resampled": lay.resampled,
            "shards": len(corpus.shards), "shard_list_sha1": hashlib.sha1(listing).hexdigest()}


def restore_stream(r: TaskRun, saved: dict) -> None:
    """Check that the checkpoint's stream was cut as this run cuts it (else its position means other samples)."""
    now = _cut(r.dataset)
    changed = [f"{k} {saved.get(k)} -> {v}" for k, v in now.items() if saved.get(k) != v]
    if changed:
        raise ValueError(f"resume: the checkpoint's shard stream was cut differently ({', '.join(changed)}; "
                         f"processes, data.num_workers, the batch and the shard list with its counts must stay as they were for "
                         f"an exact mid-epoch resume)")
    r.monitor.load(saved.get("bad", {}))
