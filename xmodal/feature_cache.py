"""Embed each distinct input of a frozen, deterministic encoder once, then train on the cached features.

A locked tower (LiT) without augmentation maps the same input to the same features every epoch, so running it
again is pure waste: caching turns an epoch over frozen EfficientNet/MiniLM towers into an epoch over two small
projections. The cache is exact — the features are what the encoder computes in eval mode.

Given a folder (``cache_dir``, or one set for a command by :func:`disk_cache`), the features go to disk instead of
RAM, in memory-mapped shards written as they are computed and reused by every later run and command over the same
tower and inputs (:mod:`xmodal.feature_store`: keys, invalidation, damaged shards, several processes).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import weakref
from pathlib import Path
from typing import Callable, Hashable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from .config import TowerConfig
from .feature_store import FeatureStore, ShardRows, input_key, key_order, resolve_root, tower_key
from .modalities.registry import get_modality

__all__ = ["CachedFeatures", "cached_towers", "disk_cache", "is_cacheable", "pass_workers", "precompute_features",
           "resolve_root", "reuse_frozen_features", "reusing_features", "tower_settings", "tower_store",
           "weights_fingerprint"]
log = logging.getLogger(__name__)
SHARD_BYTES = 64 << 20  # a shard is written once this much is embedded ...
SHARD_SECONDS = 60.0  # ... or this long after the last one, whichever comes first (a crash loses at most that)


def is_cacheable(modality: str, cfg: TowerConfig) -> bool:
    """Frozen and deterministic: no augmentation (a modality whose transforms never augment, like text, always
    is)."""
    return cfg.freeze and (not get_modality(modality).augments or not cfg.augment)


def cached_towers(cfg, modalities) -> list[str]:
    """Which of ``modalities`` a training run (``cfg``: a :class:`~xmodal.config.Config`) reads from the cache:
    frozen, deterministic towers, with ``train.cache_frozen`` and no ``train.unfreeze_at_step``."""
    t = cfg.train
    return [m for m in modalities
            if t.cache_frozen and not t.unfreeze_at_step and is_cacheable(m, cfg.model.towers[m])]


def tower_settings(modality: str, cfg: TowerConfig) -> tuple[str, str]:
    """What a tower's eval transform and encoder are built from, apart from its weights (hashed separately): the
    ``memo_key`` of :func:`precompute_features`. Freezing, augmentation (train transform only) and the projection
    are left out, so a fine-tune over a pretrained run's frozen tower reuses the features pretraining cached."""
    used = {"kind": cfg.kind, "name": cfg.name, "pretrained": cfg.pretrained, "image_size": cfg.image_size,
            "context_length": cfg.context_length, "options": cfg.options}
    return modality, json.dumps(used, sort_keys=True, default=repr)


class CachedFeatures:
    """Picklable per-sample transform: a raw value (path, string) → its precomputed encoder features (a tensor,
    or :class:`~xmodal.feature_store.ShardRows` mapped from disk)."""

    random = False  # a look-up: nothing to seed (xmodal.data.loader.ManifestDataset)

    def __init__(self, index: dict, features: torch.Tensor | ShardRows):
        self.index, self.features = index, features

    def __call__(self, value) -> torch.Tensor:
        return self.features[self.index[value]]


# Features already computed in this process, per (encoder weights, preprocessing): active only inside
# `reuse_frozen_features()`, for studies that train and evaluate many heads over the same frozen towers.
_memo: dict | None = None
# The cache folder of `disk_cache()` (a command's default for encode/predict), None outside it.
_disk_root: Path | None = None


@contextlib.contextmanager
def reuse_frozen_features() -> Iterator[None]:
    """Within this block a frozen encoder's features for an input are computed once per process and reused by
    every training run (the cache above) and every ``model.encode`` of a frozen tower. Keys include a hash of the
    encoder's weights, so a changed encoder never gets stale features. Memory grows with the distinct inputs seen."""
    global _memo
    outer = _memo
    _memo = {} if outer is None else outer
    try:
        yield
    finally:
        _memo = outer


@contextlib.contextmanager
def disk_cache(root: str | os.PathLike | None) -> Iterator[None]:
    """Within this block frozen towers' features (training's cache, ``model.encode`` / ``predict``) are kept in
    ``root`` on disk and reused from there, across processes and commands; ``root=None`` changes nothing."""
    global _disk_root
    outer = _disk_root
    _disk_root = Path(root) if root is not None else outer
    try:
        yield
    finally:
        _disk_root = outer


def reusing_features() -> bool:
    return _memo is not None or _disk_root is not None


# module → (its tensors and their version counters, fingerprint): hashing a ViT's weights takes ~0.5 s, and an
# in-place change (an optimiser step, load_state_dict) bumps a tensor's version, which invalidates the entry.
_fingerprints: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-1 of a module's parameters and buffers (names, dtypes, shapes and bytes)."""
    state = module.state_dict()
    try:  # weak references: a replaced tensor (even at the same address) is a different one
        versions = [(weakref.ref(v), v._version) for v in state.values()]
    except (RuntimeError, TypeError):  # inference tensors have no version counter
        versions = None
    known = _fingerprints.get(module)
    if versions is not None and known is not None and len(known[0]) == len(versions) and all(
            r() is v and n == m for (r, n), (v, m) in zip(known[0], ((r(), n) for r, n in versions))):
        return known[1]
    h = hashlib.sha1()
    for name, v in state.items():
        v = v.detach().cpu().contiguous()
        h.update(f"{name}{v.dtype}{tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().data)
    if versions is not None:
        _fingerprints[module] = (versions, h.hexdigest())
    return h.hexdigest()


class _Apply(torch.utils.data.Dataset):
    def __init__(self, values: Sequence, transform: Callable):
        self.values, self.transform = values, transform

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.values[i])


def pass_workers(num_workers: int, device) -> int:
    """The DataLoader workers of the pass: ``num_workers`` (``data.num_workers``), but for a forward on the CPU no
    more than the cores its threads leave free. Workers decoding beside a forward that already keeps every core busy
    only take turns with it: on 2 cores, 2 workers beside the 2-thread forward put the image pass at 0.83 of the
    bare forward's rows/s instead of 0.93 (decoding between the batches), with 13% more CPU time and the first batch
    2-3 s later (docs/benchmarks.md, issue 19). On a GPU the forward leaves the cores to the workers: all are kept."""
    if num_workers <= 0 or torch.device(device).type != "cpu":
        return num_workers
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return min(num_workers, max(0, cores - torch.get_num_threads()))


def _embed(encoder: torch.nn.Module, transform: Callable, todo: list, batch_size: int, num_workers: int, device,
           desc: str, progress: bool) -> Iterator[torch.Tensor]:
    """The encoder's eval-mode features of ``todo``, one batch at a time, in order (float32, on the CPU)."""
    from .progress import tqdm  # a plain line every 30 s without a terminal

    # its own generator: making the loader's iterator draws a seed from the global one otherwise, and a run would
    # then train on another random stream (dropout, heads' initialisation) when its features were embedded than when
    # they were read from the cache
    loader = DataLoader(_Apply(todo, transform), batch_size=batch_size,
                        num_workers=pass_workers(num_workers, device), generator=torch.Generator())
    was_training = encoder.training
    encoder.eval()
    try:
        for x in tqdm(loader, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True):
            yield encoder(x.to(device)).float().cpu()
    finally:
        encoder.train(was_training)


def _by_length(todo: list) -> list:
    if todo and all(isinstance(v, str) for v in todo):
        # Batches of similar length: text encoders that trim padding (HF) then do far less work. Harmless for paths.
        return sorted(todo, key=len)
    return todo


@torch.inference_mode()
def precompute_features(encoder: torch.nn.Module, transform: Callable, values: Sequence, batch_size: int = 128,
                        num_workers: int = 0, device: torch.device | str = "cpu", desc: str = "cache",
                        progress: bool = True, memo_key: Hashable | None = None,
                        cache_dir: str | os.PathLike | None = None) -> CachedFeatures:
    """Run ``encoder`` (in eval mode) once over the distinct ``values``; return the lookup transform.

    ``memo_key`` names the preprocessing (:func:`tower_settings`): inside :func:`reuse_frozen_features`, values
    already embedded under the same key by the same weights are not embedded again. With ``cache_dir`` (or inside
    :func:`disk_cache`) and a ``memo_key``, features are read from and written to that folder on disk instead."""
    unique = list(dict.fromkeys(values))
    root = Path(cache_dir) if cache_dir is not None else _disk_root
    if root is not None and memo_key is not None and unique:
        cached = _on_disk(root, encoder, transform, unique, memo_key, batch_size, num_workers, device, desc, progress)
        if cached is not None:
            return cached
    store = None
    if _memo is not None and memo_key is not None:
        store = _memo.setdefault((memo_key, weights_fingerprint(encoder)), {})
    todo = _by_length([v for v in unique if v not in store] if store is not None else unique)
    chunks = list(_embed(encoder, transform, todo, batch_size, num_workers, device, desc, progress)) if todo else []
    if store is None:
        return CachedFeatures({v: i for i, v in enumerate(todo)}, torch.cat(chunks))
    if chunks:
        store.update(zip(todo, torch.cat(chunks)))
    return CachedFeatures({v: i for i, v in enumerate(unique)}, torch.stack([store[v] for v in unique]))


def tower_store(root: Path, encoder: torch.nn.Module, memo_key: Hashable, otherwise: str) -> FeatureStore | None:
    """The folder of a tower's features under ``root`` (keyed by its weights and ``memo_key``, its settings:
    :func:`tower_settings`) — the same for a manifest and a shard stream; None, with a warning ending in
    ``otherwise``, where it cannot be written."""
    fingerprint = weights_fingerprint(encoder)
    try:
        store = FeatureStore(root / tower_key(fingerprint, repr(memo_key)),
                             describe={"settings": repr(memo_key), "weights_sha1": fingerprint})
    except OSError as e:
        log.warning("feature cache: cannot use %s (%s); %s", root, e, otherwise)
        return None
    if not os.access(store.folder, os.W_OK):  # read-only: reading what is there would be fine, writing is not
        log.warning("feature cache: %s is not writable; %s", store.folder, otherwise)
        return None
    return store


def _on_disk(root: Path, encoder: torch.nn.Module, transform: Callable, unique: list, memo_key: Hashable,
             batch_size: int, num_workers: int, device, desc: str, progress: bool) -> CachedFeatures | None:
    """:func:`precompute_features` over a folder of shards: inputs found there are read, the rest embedded and
    written a shard at a time. None (with a warning) when the folder cannot be used: the caller keeps them in RAM."""
    modality = memo_key[0] if isinstance(memo_key, tuple) and memo_key and isinstance(memo_key[0], str) else None
    try:
        path_valued = get_modality(modality).value == "path" if modality is not None else None
    except (KeyError, ValueError):
        path_valued = None
    store = tower_store(root, encoder, memo_key, "features are kept in memory")
    if store is None:
        return None
    # A value without an identity (a missing file: its transform reports it) gets a key never looked up again.
    keys = {v: input_key(v, path_valued) or os.urandom(16) for v in unique}
    with store.locked():  # another process embedding this tower's inputs finishes first; we then read its shards
        paths, counts, rows = store.find(list(keys.values()))
        todo = _by_length([v for v in unique if keys[v] not in rows])
        pending: list[torch.Tensor] = []
        done, last = 0, time.monotonic()

        def flush() -> None:
            nonlocal done, last
            feats = torch.cat(pending).numpy()
            written = [keys[v] for v in todo[done:done + len(feats)]]
            paths.append(store.write(written, feats))
            rows.update((written[i], sum(counts) + r) for r, i in enumerate(key_order(written)))  # its row order
            counts.append(len(written))
            done, last = done + len(written), time.monotonic()
            pending.clear()

        for feats in (_embed(encoder, transform, todo, batch_size, num_workers, device, desc, progress)
                      if todo else ()):
            pending.append(feats)
            if (sum(len(f) for f in pending) * feats[0].numel() * 4 >= SHARD_BYTES
                    or time.monotonic() - last >= SHARD_SECONDS):
                flush()
        if pending:
            flush()
    # INFO: shown where logging is set up (a training run's main process, and its train.log)
    size = store.size_bytes()
    log.info("%s: %d of %d inputs read from the feature cache, %d embedded; %s holds %s", desc,
             len(unique) - len(todo), len(unique), len(todo), store.folder,
             f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.0f} kB")
    return CachedFeatures({v: rows[keys[v]] for v in unique}, ShardRows(paths, counts))
