"""One contrastive loss over several modalities: the mean of a two-modality loss (CLIP or SigLIP) over modality pairs.

Training calls :func:`contrastive_loss` on a model's output, whose modalities may cover only some rows (a row missing
a modality has no features for it); :func:`pairwise_loss` is the same reduction on plain, complete feature tensors.
"""
from __future__ import annotations

from itertools import combinations

import torch
from torch import Tensor, nn

from ..batch import pair_rows


def contrastive_loss(loss_fn: nn.Module, out: dict[str, Tensor], modalities: list[str],
                     anchor: str | None = None) -> Tensor:
    """Mean contrastive loss over the modality pairs the batch has: every pair, or each modality with ``anchor``
    (ImageBind-style binding). Only rows holding both modalities of a pair take part in it."""
    # Several processes: every rank takes part in every pair's gather, whatever its own batch holds (the
    # losses handle unequal and zero counts exactly); one process: only the pairs this batch has.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    present = [m for m in modalities if m in out or distributed]
    pairs = ([(anchor, m) for m in present if m != anchor] if anchor in present else []) if anchor \
        else list(combinations(present, 2))
    terms = []
    like = next((out[m] for m in modalities if m in out), None)  # shapes an empty pair on this process
    for a, b in pairs:
        fa, fb = pair_rows(out, a, b, like)
        if fa.shape[0] >= 2 or distributed:  # one row has no negatives (unless gathered)
            terms.append(loss_fn(fa, fb, out["logit_scale"], out.get("logit_bias")))
    if not terms:  # no pair in this batch: a zero that still touches every output (DDP wants a gradient for all)
        return sum(out[m].sum() for m in present) * 0.0 + out["logit_scale"] * 0.0
    return sum(terms) / len(terms)


def pairwise_loss(loss: nn.Module, features: dict[str, Tensor], logit_scale: Tensor,
                  logit_bias: Tensor | None = None) -> Tensor:
    """Mean of ``loss`` over every unordered pair of modalities in ``features`` (in key order): every row holds every
    modality, so this is :func:`contrastive_loss` on ``features`` as a model output.

    With two modalities this is just ``loss(features[a], features[b], ...)``; with more, each pair of towers is pulled
    together (as ImageBind-style training does for the pairs a batch has). ClipLoss is symmetric, so the order within
    a pair does not matter; SigLIP's is symmetric too up to floating point. As in training, a single row (no negatives)
    adds no term on one process.
    """
    names = list(features)
    if len(names) < 2:
        raise ValueError(f"a contrastive loss needs at least two modalities, got {names}")
    out = {**features, "logit_scale": logit_scale}
    if logit_bias is not None:
        out["logit_bias"] = logit_bias
    return contrastive_loss(loss, out, names)
