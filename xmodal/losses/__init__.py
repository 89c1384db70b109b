"""Contrastive losses on the shared space: ``ClipLoss`` (softmax InfoNCE) and ``SigLipLoss`` (pairwise sigmoid).

Both take open_clip's arguments and give open_clip's values; both gather features across processes so the negatives
span the global batch. :func:`contrastive_loss` (training's loss) and :func:`pairwise_loss` average
either one over a batch's modality pairs.
"""
from __future__ import annotations

from torch import nn

from .clip import ClipLoss
from .distributed import dist_info, gather_features
from .pairwise import contrastive_loss, pairwise_loss
from .siglip import SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss", "gather_features", "dist_info", "build_loss", "contrastive_loss",
           "pairwise_loss"]


def build_loss(name: str, local_loss: bool = False, gather_with_grad: bool = True,
               label_smoothing: float = 0.0) -> nn.Module:
    """``"clip"`` → ``ClipLoss(local_loss, gather_with_grad)``; ``"siglip"`` → ``SigLipLoss()``.

    SigLIP ignores both flags: its rows are always local, and its text gather always carries gradient (without it
    the loss would lose most of its gradient, not just a correction term).
    """
    if name == "clip":
        return ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, label_smoothing=label_smoothing)
    if name == "siglip":
        return SigLipLoss()
    raise ValueError(f"unknown loss {name!r}: expected 'clip' or 'siglip'")

