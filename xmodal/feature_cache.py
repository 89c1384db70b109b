"""Embed each distinct input of a frozen, deterministic encoder once, then train on the cached features.

A locked tower (LiT) without augmentation maps the same input to the same features every epoch, so running it
again is pure waste: caching turns an epoch over frozen EfficientNet/MiniLM towers into an epoch over two small
projections. The cache is exact — the features are what the encoder computes in eval mode.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader

from .config import TowerConfig


def is_cacheable(modality: str, cfg: TowerConfig) -> bool:
    """Frozen and deterministic: no image augmentation (text transforms are always deterministic)."""
    return cfg.freeze and (modality == "text" or not cfg.augment)


class CachedFeatures:
    """Picklable per-sample transform: a raw value (path, string) → its precomputed encoder features."""

    def __init__(self, index: dict, features: torch.Tensor):
        self.index, self.features = index, features

    def __call__(self, value) -> torch.Tensor:
        return self.features[self.index[value]]


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
                        progress: bool = True) -> CachedFeatures:
    """Run ``encoder`` (in eval mode) once over the distinct ``values``; return the lookup transform."""
    from tqdm.auto import tqdm

    unique = list(dict.fromkeys(values))
    if unique and all(isinstance(v, str) for v in unique):
        # Batches of similar length: text encoders that trim padding (HF) then do far less work. Harmless for paths.
        unique.sort(key=len)
    loader = DataLoader(_Apply(unique, transform), batch_size=batch_size, num_workers=num_workers)
    was_training = encoder.training
    encoder.eval()
    chunks = [encoder(x.to(device)).float().cpu()
              for x in tqdm(loader, desc=desc, unit="batch", disable=not progress, dynamic_ncols=True)]
    encoder.train(was_training)
    return CachedFeatures({v: i for i, v in enumerate(unique)}, torch.cat(chunks))
