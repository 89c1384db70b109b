"""The batch format every part of xmodal shares, in one place.

A collated batch is a ``dict[str, Tensor | list]``:

* ``"<modality>"``: the transformed inputs of the rows holding that modality, stacked along dim 0 (raw inputs);
* ``"<modality>:features"`` instead, when a frozen tower's encoder outputs were cached (:mod:`xmodal.feature_cache`);
* ``"<modality>:mask"``: bool ``[B]``, which rows hold the modality; absent when every row does;
* any other column (``id``, targets, ...) as a list of length ``B``.

A shard stream's batch, between its DataLoader worker and the training process, may also carry ``"<m>:cached"``
(bool ``[B]``: the rows whose ``"<m>:features"`` came from the disk cache; ``"<m>"`` then holds the others) and
``"<m>:key"`` (those others' cache keys); the training process turns them into ``"<m>:features"`` for every row
before the model sees the batch (:mod:`xmodal.data.stream_features`).

Tower outputs follow the same convention: ``{modality: [n_present, D]}`` plus the masks; :func:`dense` turns them
into ``[B, D]`` tensors and presence masks for fusion and heads.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

MASK = ":mask"
FEATURES = ":features"  # ``"image:features"`` holds cached encoder outputs, not raw inputs
CACHED = ":cached"  # a stream batch's ``"image:cached"``: which rows' features came from the disk cache
CACHE_KEY = ":key"  # a stream batch's ``"image:key"``: the cache keys of the rows whose features did not


def mask_key(modality: str) -> str:
    return modality + MASK


def features_key(modality: str) -> str:
    return modality + FEATURES


def collate(items: list[dict[str, Any]]) -> dict[str, Tensor | list]:
    """Stack tensor values along dim 0 (one tensor per key); every other value becomes a list.

    A key whose values are tensors for some rows and ``None`` for others (a modality missing from those rows) is
    stacked over the present rows only — no compute is spent on absent ones — and ``"<key>:mask"`` (bool ``[B]``)
    says which rows they are. A key that is ``None`` in every row is left out, with an all-False mask.
    """
    if not items:
        raise ValueError("collate got an empty batch")
    out: dict[str, Tensor | list] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        present = [v is not None for v in values]
        tensors = [v for v in values if v is not None]
        if tensors and all(isinstance(v, Tensor) for v in tensors):
            shapes = {tuple(v.shape) for v in tensors}
            if len(shapes) > 1:
                raise ValueError(f"collate: '{key}' values have different shapes {sorted(shapes)}; the "
                                 f"transform must return a fixed shape (resize/crop images, pad text)")
            out[key] = torch.stack(tensors, 0)
            if not all(present):
                out[key + MASK] = torch.tensor(present)
        elif not tensors:
            out[key + MASK] = torch.zeros(len(values), dtype=torch.bool)
        else:
            out[key] = values
    return out


def batch_size(batch: dict[str, Any]) -> int:
    """Rows in a collated batch (masks and list columns are full length; modality tensors may be shorter)."""
    for key, v in batch.items():
        if key.endswith(MASK) or isinstance(v, list):
            return len(v)
    return next(len(v) for v in batch.values() if isinstance(v, Tensor))


def dense(out: dict[str, Tensor], modalities: Sequence[str], n: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``[n_present, D]`` tower outputs → ``[n, D]`` (zeros where absent) and bool ``[n]`` presence masks."""
    feats, present = {}, {}
    for m in modalities:
        mask = out.get(m + MASK)
        if m not in out:  # absent from every row of this batch
            continue
        if mask is None:
            feats[m], present[m] = out[m], torch.ones(n, dtype=torch.bool, device=out[m].device)
        else:
            full = out[m].new_zeros(n, out[m].shape[-1])
            full[mask] = out[m]
            feats[m], present[m] = full, mask
    return feats, present


def drop_modalities(batch: dict[str, Any], modalities: Sequence[str], p: float) -> dict[str, Any]:
    """Modality dropout: hide each present (row, modality) with probability ``p``, never a row's last one, so a
    fused head learns to predict from any subset it may meet at inference. Works on collated batches (raw or
    cached ``"<m>:features"`` tensors hold only present rows; ``"<m>:mask"`` says which)."""
    n = batch_size(batch)
    keys = {m: k for m in modalities for k in (m, m + ":features") if isinstance(batch.get(k), Tensor)}
    if len(keys) < 2:
        return batch
    present = {m: batch.get(m + MASK, torch.ones(n, dtype=torch.bool)) for m in keys}
    keep = {m: present[m] & (torch.rand(n) >= p) for m in keys}
    lost = ~torch.stack(list(keep.values())).any(0) & torch.stack(list(present.values())).any(0)
    for row in lost.nonzero().flatten().tolist():  # every modality of this row drawn: restore one of them
        have = [m for m in keys if present[m][row]]
        keep[have[int(torch.randint(len(have), ()))]][row] = True
    out = dict(batch)
    for m, key in keys.items():
        out[m + MASK] = keep[m]
        if keep[m].any():
            out[key] = batch[key][keep[m][present[m]]]
        else:  # as collate leaves out a modality no row has
            del out[key]
    return out


def split(batch: dict, k: int) -> list[dict]:
    """Cut a collated batch into ``k`` micro-batches by row ranges, keeping modality tensors (present rows only)
    aligned with their masks; list columns are sliced alike."""
    n = batch_size(batch)
    bounds = [round(i * n / k) for i in range(k + 1)]
    chunks = []
    for s, e in zip(bounds, bounds[1:]):
        chunk = {}
        for key, v in batch.items():
            base = key.removesuffix(FEATURES)
            if isinstance(v, list) or key.endswith(MASK):
                chunk[key] = v[s:e]
            elif base + MASK in batch:
                counts = batch[base + MASK].long().cumsum(0)
                lo = int(counts[s - 1]) if s else 0
                chunk[key] = v[lo:int(counts[e - 1]) if e else 0]
            else:
                chunk[key] = v[s:e]
        chunks.append(chunk)
    return chunks


def pair_rows(out: dict[str, torch.Tensor], a: str, b: str,
               like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of the rows that have both ``a`` and ``b`` (outputs hold only each modality's present rows)."""
    if a not in out or b not in out:  # no row of this batch has both: zero pairs that still belong to the graph
        empty = like[:0] * out["logit_scale"]
        return empty, empty
    ma, mb = out.get(a + MASK), out.get(b + MASK)
    if ma is None and mb is None:
        return out[a], out[b]
    n = len(ma if ma is not None else mb)
    ma = ma if ma is not None else torch.ones(n, dtype=torch.bool, device=out[a].device)
    mb = mb if mb is not None else torch.ones(n, dtype=torch.bool, device=out[b].device)
    both = ma & mb
    return out[a][both[ma]], out[b][both[mb]]
