"""Contrastive losses on the shared space: ``ClipLoss`` (softmax InfoNCE) and ``SigLipLoss`` (pairwise sigmoid).

Both take open_clip's arguments and give open_clip's values; both gather features across processes so the negatives
span the global batch.
"""
from __future__ import annotations

import itertools

from torch import Tensor, nn

from .clip import ClipLoss
from .distributed import dist_info, gather_features
from .siglip import SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss", "gather_features", "dist_info", "build_loss", "pairwise_loss"]


def build_loss(name: str, local_loss: bool = False, gather_with_grad: bool = True) -> nn.Module:
    """``"clip"`` → ``ClipLoss(local_loss, gather_with_grad)``; ``"siglip"`` → ``SigLipLoss()``.

    SigLIP ignores both flags: its rows are always local, and its text gather always carries gradient (without it
    the loss would lose most of its gradient, not just a correction term).
    """
    if name == "clip":
        return ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)
    if name == "siglip":
        return SigLipLoss()
    raise ValueError(f"unknown loss {name!r}: expected 'clip' or 'siglip'")


def pairwise_loss(loss: nn.Module, features: dict[str, Tensor], logit_scale: Tensor,
                  logit_bias: Tensor | None = None) -> Tensor:
    """Mean of ``loss`` over every unordered pair of modalities in ``features`` (in key order).

    With two modalities this is just ``loss(features[a], features[b], ...)``; with more, each pair of towers is pulled
    together (as ImageBind-style training does for the pairs a batch has). ClipLoss is symmetric, so the order within
    a pair does not matter; SigLIP's is symmetric too up to floating point.
    """
    names = list(features)
    if len(names) < 2:
        raise ValueError(f"a contrastive loss needs at least two modalities, got {names}")
    pairs = list(itertools.combinations(names, 2))
    total = sum(loss(features[a], features[b], logit_scale, logit_bias) for a, b in pairs)
    return total / len(pairs)
