"""A modality of your own, outside xmodal: fixed-length numeric vectors stored as ``.npy`` files (sensor readings,
tabular rows, precomputed features), with an MLP tower.

Name this module in a config and every command knows the modality — manifest column ``vector``, tower
``model.towers.vector``, ``xmodal query --vector q.npy``, ``model.encode("vector", [...])``::

    model:
      plugins: [vector_modality]        # importable: installed, or its folder on PYTHONPATH
      towers:
        vector: {kind: mlp, options: {dim: 784, hidden: 256}}
        text: {kind: lstm}

The module only declares: how a file is checked (before training, once per file), the per-sample transform
(path or array → ``float32 [dim]``), the encoder, and how an uploaded query's bytes are read. docs/modalities.md
walks through it; tests/test_custom_modality.py pretrains, fine-tunes, evaluates, indexes and queries it.
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch
from torch import nn

from xmodal.modalities import Modality, TowerKind, register_modality


def check_npy(path: str) -> str | None:
    """Why the file cannot be a vector (read lazily: only the header and, memory-mapped, the values), or None."""
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - numpy raises ValueError/OSError/EOFError for damaged files
        return f"not a readable .npy array ({type(e).__name__}: {e}): {path}"
    if a.ndim != 1 or a.size == 0:
        return f"expected a non-empty 1-D array, got shape {tuple(a.shape)}: {path}"
    if not np.issubdtype(a.dtype, np.number):
        return f"expected numbers, got dtype {a.dtype}: {path}"
    return None


def read_npy_bytes(data: bytes) -> np.ndarray:
    """An uploaded query (``.npy`` bytes) as the array the transform takes."""
    return np.load(io.BytesIO(data), allow_pickle=False)


class NpyTransform:
    """Picklable (it runs in DataLoader workers): a ``.npy`` path or an array → ``float32 [dim]``."""

    def __init__(self, dim: int):
        self.dim = dim

    def __call__(self, x) -> torch.Tensor:
        a = np.load(x, allow_pickle=False) if isinstance(x, (str, os.PathLike)) else np.asarray(x)
        a = np.asarray(a, dtype=np.float32).reshape(-1)
        if a.shape[0] != self.dim:
            raise ValueError(f"expected {self.dim} numbers, got {a.shape[0]}")
        return torch.from_numpy(a.copy())


def _dim(cfg, where: str) -> int:
    dim = cfg.options.get("dim")
    if not isinstance(dim, int) or dim <= 0:
        raise ValueError(f"{where}.options.dim: the vectors' length (a positive integer) is required, got {dim!r}")
    return dim


def build_transform(cfg, train: bool, where: str) -> NpyTransform:
    return NpyTransform(_dim(cfg, where))


def build_mlp(cfg, where: str) -> tuple[nn.Module, int]:
    """LayerNorm first, so raw units (pixel values, volts, euros) need no scaling by hand."""
    dim, hidden = _dim(cfg, where), int(cfg.options.get("hidden", 256))
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)), hidden


VECTOR = register_modality(Modality(
    "vector", value="path", check_file=check_npy, augments=False, read_bytes=read_npy_bytes,
    kinds={"mlp": TowerKind(build_mlp, build_transform, frozenset({"dim", "hidden"}))},
    query_help="a .npy vector to search with",
))
