"""Streaming a sharded corpus into training: :class:`ShardStream`, the ``IterableDataset`` each DataLoader worker runs
over its part of the epoch (:mod:`.shard_plan`), and :class:`StreamLoader`, the loader the training loop reads.

Workers decode and collate whole step batches (as open_clip's ``wds.batched`` does in its workers), so the main
process only moves them to the device. A batch carries ``"__bad__"``: the samples of its slots that were skipped,
each named by shard and key; the rows left are still one batch (the losses handle per-rank row counts).

Exact resume: the loader is told ``(epoch, batch)`` — the step batches this rank already took in the epoch. PyTorch
asks the workers round-robin from worker 0, so worker ``p`` plays the part of worker ``(p + batch) mod K``: the
next batch (``batch``) then comes first, from the worker whose turn it is, and each worker starts after the
batches its part already yielded. The position is one number per rank; :func:`.shard_plan.position` spells out
each worker's place for the checkpoint.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..batch import collate
from .shard_plan import Layout, block_order, epoch_steps, skip, worker_batches, worker_segments
from .hf_source import read_hf
from .shards import BadSample, SampleDecoder, Shard, read_samples
from .stream_features import pack, shard_identity

BAD = "__bad__"  # batch key: the skipped samples of the batch's slots, as "shard: sample 'key': reason"


class ShardCorpus:
    """The shard list of a run and its size (what a manifest's dataset is to the rest of training: ``len``)."""

    def __init__(self, shards: Sequence[Shard], layout: Layout):
        self.shards, self.layout = list(shards), layout

    def __len__(self) -> int:
        return self.layout.samples_per_epoch if self.layout.resampled else sum(s.samples for s in self.shards)


class ShardStream(IterableDataset):
    """One rank's step batches of one epoch, from ``(epoch, start)`` on; see the module docstring."""

    def __init__(self, corpus: ShardCorpus, rank: int, decoder: SampleDecoder, shuffle_block: int):
        super().__init__()
        self.corpus, self.rank, self.decoder, self.shuffle_block = corpus, rank, decoder, shuffle_block
        self.steps = epoch_steps(corpus.shards, corpus.layout)
        self.epoch, self.start = 0, 0

    def __iter__(self) -> Iterator[dict]:
        layout, info = self.corpus.layout, get_worker_info()
        k = max(1, layout.workers)
        if (info.num_workers if info else 1) != k:
            raise RuntimeError(f"ShardStream planned for {k} worker(s), run by {info.num_workers if info else 1}")
        worker = ((info.id if info else 0) + self.start) % k
        done = worker_batches(self.start, k, worker) * layout.batch
        length = worker_batches(self.steps, k, worker) * layout.batch
        segments = worker_segments(self.corpus.shards, layout, self.epoch, self.rank, worker)
        self.decoder.epoch = self.epoch  # seeds the samples' random transforms (SampleDecoder's augment_seed)
        for cached in self.decoder.features.values():
            cached.index.refresh()  # the frozen features cached when this epoch's workers start
        raws: list = []
        for raw in self._shuffled(segments, worker, done, length):
            raws.append(raw)
            if len(raws) == layout.batch:
                yield batch_of(self.decoder.decode(raws), self.decoder.features)
                raws = []

    def _shuffled(self, segments: list, worker: int, done: int, length: int) -> Iterator[Any]:
        """The worker's raw samples from position ``done`` on, block by block, each block permuted."""
        size = self.shuffle_block
        first = done // size
        raws = (raw for seg in skip(segments, first * size) for raw in _named(seg.shard, seg.start, seg.stop))
        for block in range(first, -(-length // size)):
            n = min(size, length - block * size)
            chunk = [next(raws) for _ in range(n)]
            order = block_order(self.corpus.layout.seed, self.epoch, self.rank, worker, block, n)
            drop = done - block * size if block == first else 0
            for i in order[drop:]:
                yield chunk[i]


def read_segment(shard: Shard, start: int, stop: int) -> Iterator[Any]:
    """The raw samples ``[start, stop)`` of a tar or Parquet shard, or of a Hugging Face streaming dataset's shard."""
    return read_hf(shard, start, stop) if shard.source is not None else read_samples(shard, start, stop)


def _named(shard: Shard, start: int, stop: int) -> Iterator[Any]:
    """:func:`read_segment`, each sample tagged with its shard's identity (the frozen-feature cache's key)."""
    ident = None
    for raw in read_segment(shard, start, stop):
        if isinstance(raw, dict):
            ident = ident or shard_identity(shard)
            raw["__shard__"] = ident
        yield raw


def batch_of(items: list, cached: Mapping[str, Any] = {}) -> dict:  # noqa: B006 - read only
    """Collate the good samples of a batch's slots; name the bad ones under ``"__bad__"``; a cached column's rows
    packed as :func:`.stream_features.pack` says."""
    good = [it for it in items if not isinstance(it, BadSample)]
    packed = {k: v for m in cached for k, v in pack(good, m).items()} if good else {}
    out: dict[str, Any] = {**collate(good), **packed} if good else {"id": []}
    out[BAD] = [str(it) for it in items if isinstance(it, BadSample)]
    return out


class StreamLoader:
    """What the training loop iterates for a sharded task: ``len`` is the epoch's step batches on every rank;
    :meth:`set_position` says where the next iteration starts. Not given to ``accelerator.prepare``: its batches are
    this rank's already (docs/distributed.md)."""

    def __init__(self, stream: ShardStream, num_workers: int):
        self.stream = stream
        self.loader = DataLoader(stream, batch_size=None, num_workers=num_workers,
                                 prefetch_factor=2 if num_workers else None, persistent_workers=False)

    def __len__(self) -> int:
        return self.stream.steps

    def set_position(self, epoch: int, batch: int) -> None:
        self.stream.epoch, self.stream.start = epoch, batch

    def __iter__(self) -> Iterator[dict]:
        for cached in self.stream.decoder.features.values():  # before the workers fork: see StreamFeatures
            cached.start_epoch()
        return iter(self.loader)

