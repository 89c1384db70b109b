"""Frozen towers' features on a shard stream, through the disk cache (:mod:`xmodal.feature_store`): each sample's
features are written there as training computes them and read back by later epochs and later runs, so a second pass
over the same shards neither decodes the sample's member nor runs the frozen encoder.

* **Identity** (:func:`sample_key`): the shard — its recorded XXH3-128 and size where ``xmodal shard``'s
  ``checksums.json`` describes it (the same bytes anywhere, under any name), else a local file's resolved path, size
  and mtime (a rewritten shard is a new one), else its URL — then the sample's key and the column spec that read the
  value (``jpg;png``, ``json:caption``). The tower is the folder, keyed as on the manifest path (weights + transform
  settings: :func:`xmodal.feature_cache.tower_store`), so both paths share one folder per tower.
* **Workers** (:meth:`StreamFeatures.lookup`, a batch of raw samples at a time): keys looked up in the shards on disk
  (:class:`~xmodal.feature_index.FeatureIndex`, opened at the start of each epoch); a hit becomes a row of
  ``"<m>:features"``, a miss is decoded and transformed with the tower's evaluation transform as usual, its key
  carried in ``"<m>:key"``; ``"<m>:cached"`` (bool ``[B]``) says which rows are which (:func:`pack`).
* **The training process** (:meth:`StreamFeatures.fill`, before the step): the encoder (eval mode, no gradient,
  float32 — what :func:`~xmodal.feature_cache.precompute_features` computes) runs on the misses only, and the batch
  the model gets is the manifest path's: ``"<m>:features"`` for every row, in row order. The misses' features are
  queued and written as one shard (atomic, rows sorted by key) once 64 MB or 60 s are queued, at each epoch's start
  and when the run ends or stops; a run killed in between loses only the queue, embedded again later.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any, Sequence

import numpy as np
import torch

from ..batch import CACHE_KEY as KEY
from ..batch import CACHED, FEATURES
from ..feature_index import FeatureIndex
from ..feature_store import KEY_BYTES, FeatureStore
from .shards import BadSlot, Column, Shard, _is_local, _local_path

log = logging.getLogger("xmodal")

SHARD_BYTES = 64 << 20  # queued features are written as a shard at this size ...
SHARD_SECONDS = 60.0  # ... or this long after the last write


def shard_identity(shard: Shard) -> str:
    """What names a shard's bytes (see the module docstring)."""
    if shard.record is not None and shard.record.get("xxh3_128"):
        return f"xxh3_128:{shard.record['xxh3_128']}:{shard.record.get('size')}"
    if shard.source is not None:
        return f"hf:{shard.url}"  # a Hugging Face data file: its URL names a revision's file
    if _is_local(shard.url):
        path = _local_path(shard.url)
        try:
            st = os.stat(path)
            return f"file:{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            pass  # unreadable: its samples come as bad slots, never looked up
    return f"url:{shard.url}"


def sample_key(shard_id: str, key: str, column: Column) -> bytes:
    """The cache key of one sample's column."""
    spec = f"{column.name}\0{';'.join(column.extensions)}\0{column.field or ''}"
    return hashlib.blake2b(f"sample\0{shard_id}\0{key}\0{spec}".encode("utf-8", "surrogatepass"),
                           digest_size=KEY_BYTES).digest()


class StreamFeatures:
    """One cached tower of a shard stream: look-ups in the workers, the encoder and the writes in the training
    process (see the module docstring). Picklable: a worker gets the column and the index, not the encoder."""

    def __init__(self, column: Column, store: FeatureStore, encoder: torch.nn.Module | None = None,
                 chunk: int = 256):
        self.column, self.modality = column, column.name
        self.store, self.index, self.encoder = store, FeatureIndex(store), encoder
        self.chunk = chunk  # rows per encoder call (a GradCache step batch may be far larger than a micro-batch)
        self._keys: list[bytes] = []
        self._rows: list[np.ndarray] = []
        self._last = time.monotonic()
        self.read = self.embedded = 0  # this process's rows since the last report
        self.writable = True

    def __getstate__(self):
        return {"column": self.column, "modality": self.modality, "store": None, "index": self.index,
                "encoder": None, "chunk": self.chunk, "_keys": [], "_rows": [], "_last": 0.0, "read": 0, "embedded": 0, "writable": False}

    # ------------------------------------------------------------------------------------------- in the workers
    def lookup(self, raws: Sequence[Any]) -> list[tuple[bytes | None, np.ndarray | None]]:
        """Each raw sample's ``(cache key, features or None)``; ``(None, None)`` for a slot a shard did not deliver."""
        keys = [None if isinstance(raw, BadSlot) else sample_key(raw["__shard__"], raw["__key__"], self.column)
                for raw in raws]
        found = self.index.lookup([k for k in keys if k is not None])
        it = iter(found)
        return [(None, None) if k is None else (k, next(it)) for k in keys]

    # ------------------------------------------------------------------------------ in the training process
    def start_epoch(self) -> None:
        """Before an epoch's workers start: write what is queued and open the shards written since (each checked
        here once, so the workers, forked from this process, need not check them again)."""
        self.close()
        self.index.refresh()

    def close(self) -> None:
        """Write what is queued; log the rows read and embedded since the last report."""
        self.flush()
        if self.read or self.embedded:
            log.info("frozen %s features: %d read from the cache, %d embedded and cached (%s)", self.modality,
                     self.read, self.embedded, self.store.folder)
            self.read = self.embedded = 0

    @torch.no_grad()
    def fill(self, batch: dict, device) -> None:
        """Replace the batch's ``"<m>"`` / ``"<m>:features"`` / ``"<m>:cached"`` / ``"<m>:key"`` with
        ``"<m>:features"`` for every row, the encoder run on the rows the cache did not hold."""
        m = self.modality
        cached = batch.pop(m + CACHED).to(device)
        keys, raw, hits = batch.pop(m + KEY, []), batch.pop(m, None), batch.pop(m + FEATURES, None)
        new = None
        if raw is not None:
            was = self.encoder.training
            self.encoder.eval()
            try:
                new = torch.cat([self.encoder(x.to(device)).float() for x in raw.split(self.chunk)])
            finally:
                self.encoder.train(was)
            self._queue(keys, new.cpu().numpy())
        some = hits if hits is not None else new
        full = torch.empty((len(cached), *some.shape[1:]), dtype=torch.float32, device=device)
        if hits is not None:
            full[cached] = hits.to(device, torch.float32)
        if new is not None:
            full[~cached] = new
        batch[m + FEATURES] = full
        self.read += int(cached.sum())
        self.embedded += len(keys)

    def _queue(self, keys: list[bytes], rows: np.ndarray) -> None:
        if not self.writable:
            return
        self._keys.extend(keys)
        self._rows.append(rows)
        if len(self._keys) * rows[0].nbytes >= SHARD_BYTES or time.monotonic() - self._last >= SHARD_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the queued features as one shard (a key queued twice, as resampling may draw, once)."""
        keys, rows = self._keys, self._rows
        self._keys, self._rows, self._last = [], [], time.monotonic()
        if not keys or not self.writable:
            return
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        keep = list(first.values())
        try:
            self.store.write([keys[i] for i in keep], np.concatenate(rows)[keep])
        except OSError as e:  # a full or read-only disk: training goes on, the encoder runs for these samples
            self.writable = False
            log.warning("feature cache: cannot write to %s (%s); frozen %s features are no longer cached",
                        self.store.folder, e, self.modality)


def pack(items: list[dict], modality: str) -> dict:
    """Take a cached modality's values out of a batch's decoded samples: ``"<m>:cached"``, ``"<m>:features"``
    (the hits), ``"<m>"`` and ``"<m>:key"`` (the misses), as :meth:`StreamFeatures.fill` takes them."""
    m, feats = modality, modality + FEATURES
    cached = [feats in it for it in items]
    out: dict[str, Any] = {m + CACHED: torch.tensor(cached, dtype=torch.bool)}
    hits = [it.pop(feats) for it, c in zip(items, cached) if c]
    misses = [(it.pop(m), it.pop(m + KEY)) for it, c in zip(items, cached) if not c]
    if hits:
        out[feats] = torch.stack(hits)
    if misses:
        out[m] = torch.stack([x for x, _ in misses])
        out[m + KEY] = [k for _, k in misses]
    return out
