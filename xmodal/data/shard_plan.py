"""Which samples each (rank, worker) reads in an epoch: a pure function of the shard list, the seed, the epoch and
the layout, so every process computes every other one's part without talking to it, and a position is one number.

**An epoch (``resampled: false``).** The shards are put in an order drawn from ``(seed, epoch)`` and read as one
sequence of ``N`` samples. With ``W`` processes of step batches of ``B`` rows, an epoch is ``S = N // (W × B)`` steps;
rank ``r`` takes the ``S × B`` samples from ``r × S × B`` on (the last ``N - W × S × B < W × B`` samples of the
order are left out, as ``drop_last`` does; the order changes each epoch, so no sample is always left out). Every
rank thus takes the same number of steps whatever the shard sizes, and no two processes share a sample. Within a
rank, the step batches ``j = 0 .. S-1`` go round-robin to the DataLoader's ``K`` workers, as PyTorch asks them
(batch ``j`` from worker ``j mod K``): worker ``w`` reads one contiguous run of samples, as many as its batches hold.
A run's ends may fall inside a shard — a *sample-level split*: two workers then read disjoint parts of one shard
(the second skips the first's part in the stream), so any number of shards serves any number of processes.

**Resampled (``resampled: true``).** Each (rank, worker) draws shards uniformly with replacement and reads each
whole (so every sample is equally likely, whatever its shard's size), from a generator seeded by
``(seed, epoch, rank, worker)`` — never the same draws on two ranks — until it has its batches' samples
(``train.samples_per_epoch`` over all processes, ``// (W × B)`` steps).

**Shuffling.** Each worker's run is cut into blocks of ``shuffle_block`` samples; a block's raw samples are
permuted by a generator seeded by ``(seed, epoch, rank, worker, block)``. To resume at batch ``c`` a worker skips
whole blocks (whole shards unopened), reads the block that holds its next sample and drops what it had yielded.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from .shards import Shard, ShardError


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` of one shard."""
    shard: Shard
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Layout:
    """How an epoch is cut: processes, DataLoader workers per process, rows per step batch per process."""
    world: int
    workers: int
    batch: int
    seed: int = 0
    resampled: bool = False
    samples_per_epoch: int | None = None  # resampled: over all processes


def epoch_steps(shards: Sequence[Shard], layout: Layout) -> int:
    """Step batches per process in one epoch (the same on every rank)."""
    total = layout.samples_per_epoch if layout.resampled else sum(s.samples for s in shards)
    return total // (layout.world * layout.batch)


def worker_batches(steps: int, workers: int, worker: int) -> int:
    """The step batches ``j < steps`` with ``j mod workers == worker``: what that worker yields in an epoch."""
    return len(range(worker, steps, max(1, workers)))


def worker_segments(shards: Sequence[Shard], layout: Layout, epoch: int, rank: int, worker: int) -> list[Segment]:
    """The samples worker ``worker`` of rank ``rank`` reads in ``epoch``, in order (before block shuffling)."""
    steps = epoch_steps(shards, layout)
    k, b = max(1, layout.workers), layout.batch
    length = worker_batches(steps, k, worker) * b
    if layout.resampled:
        return _resampled(shards, f"{layout.seed}/{epoch}/{rank}/{worker}", length)
    before = sum(worker_batches(steps, k, v) for v in range(worker)) * b
    return _cut(epoch_order(shards, layout.seed, epoch), rank * steps * b + before, length)


def epoch_order(shards: Sequence[Shard], seed: int, epoch: int) -> list[Shard]:
    order = list(shards)
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order


def _cut(order: Sequence[Shard], offset: int, length: int) -> list[Segment]:
    """Samples ``[offset, offset + length)`` of the shards read one after another."""
    out, pos, end = [], 0, offset + length
    for shard in order:
        lo, hi = max(offset, pos), min(end, pos + shard.samples)
        if lo < hi:
            out.append(Segment(shard, lo - pos, hi - pos))
        pos += shard.samples
        if pos >= end:
            break
    return out


def _resampled(shards: Sequence[Shard], seed: str, length: int) -> list[Segment]:
    """Shards drawn uniformly with replacement and read whole (as open_clip's ``ResampledShards2``): a shard twice
    the size is drawn as often and gives twice the samples, so every sample is equally likely. The last draw is cut
    to the samples still wanted, at a random offset (not always the shard's first samples)."""
    shards = [s for s in shards if s.samples]
    if not shards:
        raise ShardError("data.resampled: every shard is empty")
    rng, out, have = random.Random(f"resampled/{seed}"), [], 0
    while have < length:
        shard = rng.choice(shards)
        take = min(shard.samples, length - have)
        start = rng.randrange(shard.samples - take + 1)
        out.append(Segment(shard, start, start + take))
        have += take
    return out


def skip(segments: Sequence[Segment], n: int) -> list[Segment]:
    """``segments`` without their first ``n`` samples (whole segments dropped unopened)."""
    out = []
    for seg in segments:
        if n >= len(seg):
            n -= len(seg)
            continue
        out.append(Segment(seg.shard, seg.start + n, seg.stop))
        n = 0
    return out


def block_order(seed: int, epoch: int, rank: int, worker: int, block: int, size: int) -> list[int]:
    """The permutation of one shuffle block's ``size`` samples."""
    return random.Random(f"block/{seed}/{epoch}/{rank}/{worker}/{block}").sample(range(size), size)


def position(shards: Sequence[Shard], layout: Layout, epoch: int, batch: int, rank: int) -> list[dict]:
    """Where each worker of ``rank`` stands after the rank took ``batch`` step batches of ``epoch``: samples done, and
    the shard and sample index its next unshuffled block starts at (for a person reading a checkpoint)."""
    out = []
    for w in range(max(1, layout.workers)):
        done = worker_batches(batch, layout.workers, w) * layout.batch
        rest = skip(worker_segments(shards, layout, epoch, rank, w), done)
        out.append({"rank": rank, "worker": w, "samples_done": done,
                    "next_shard": rest[0].shard.url if rest else None, "next_sample": rest[0].start if rest else None})
    return out
