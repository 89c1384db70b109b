"""Embed each distinct input of a frozen, deterministic encoder once, then train on the cached features.

A locked tower (LiT) without augmentation maps the same input to the same features every epoch, so running it
again is pure waste: caching turns an epoch over frozen EfficientNet/MiniLM towers into an epoch over two small
projections. The cache is exact — the features are what the encoder computes in eval mode.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Callable, Hashable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader

from .config import TowerConfig
from .modalities.registry import get_modality


def is_cacheable(modality: str, cfg: TowerConfig) -> bool:
    """Frozen and deterministic: no augmentation (a modality whose transforms never augment, like text, always
    is)."""
    return cfg.freeze and (not get_modality(modality).augments or not cfg.augment)


class CachedFeatures:
    """Picklable per-sample transform: a raw value (path, string) → its precomputed encoder features."""

    def __init__(self, index: dict, features: torch.Tensor):
        self.index, self.features = index, features

    def __call__(self, value) -> torch.Tensor:
        return self.features[self.index[value]]


# Features already computed in this process, per (encoder weights, preprocessing): active only inside
# `reuse_frozen_features()`, for studies that train and evaluate many heads over the same frozen towers.
_memo: dict | None = None


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


def reusing_features() -> bool:
    return _memo is not None


def weights_fingerprint(module: torch.nn.Module) -> str:
    """SHA-1 of a module's parameters and buffers (names, dtypes, shapes and bytes)."""
    h = hashlib.sha1()
    for name, v in module.state_dict().items():
        v = v.detach().cpu().contiguous()
        h.update(f"{name}{v.dtype}{tuple(v.shape)}".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


class _Apply(torch.utils.data.Dataset):
    def __init__(self, values: Sequence, transform: Callable):
        self.values, self.transform = values, transform

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.values[i])


@torch.inference_mode()
def precompute_features(encoder: torch.nn.Module, transform: Callable, values: Sequence, batch_size: int = 128,
                        num_workers: int = 0, device: torch.device | str = "cpu", desc: str = "cache",
                        progress: bool = True, memo_key: Hashable | None = None) -> CachedFeatures:
    """Run ``encoder`` (in eval mode) once over the distinct ``values``; return the lookup transform.

    ``memo_key`` names the preprocessing (e.g. the tower's config): inside :func:`reuse_frozen_features`, values
    already embedded under the same key by the same weights are not embedded again."""
    from tqdm.auto import tqdm

    unique = list(dict.fromkeys(values))
    store = None
    if _memo is not None and memo_key is not None:
        store = _memo.setdefault((memo_key, weights_fingerprint(encoder)), {})
    todo = [v for v in unique if v not in store] if store is not None else unique
    if todo and all(isinstance(v, str) for v in todo):
        # Batches of similar length: text encoders that trim padding (HF) then do far less work. Harmless for paths.
        todo = sorted(todo, key=len)
    chunks = []
    if todo:
        loader = DataLoader(_Apply(todo, transform), batch_size=batch_size, num_workers=num_workers)
        was_training = encoder.training
        encoder.eval()
        chunks = [encoder(x.to(device)).float().cpu()
                  for x in tqdm(loader, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True)]
        encoder.train(was_training)
    if store is None:
        return CachedFeatures({v: i for i, v in enumerate(todo)}, torch.cat(chunks))
    if chunks:
        store.update(zip(todo, torch.cat(chunks)))
    return CachedFeatures({v: i for i, v in enumerate(unique)}, torch.stack([store[v] for v in unique]))
