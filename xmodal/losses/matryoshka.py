"""Matryoshka representation learning: every prefix of the embedding trained to be an embedding of its own.

Kusupati et al., "Matryoshka Representation Learning", NeurIPS 2022 (arXiv:2205.13147): the loss is a weighted sum,
over a set of nested dimensions ``m_1 < m_2 < ... < d``, of the task loss on the first ``m_i`` coordinates, so that
truncating an embedding to any of those prefixes leaves a usable one. For the contrastive losses here (their
ALIGN experiment) the prefix of each L2-normalised embedding is renormalised before the loss, since the losses take
cosine similarities:

    L = Σ_i c_i · loss(normalize(a[:, :m_i]), normalize(b[:, :m_i]), logit_scale, logit_bias) / Σ_i c_i

The weights default to 1 (the paper's choice); dividing by their sum keeps the loss on the scale of the plain one,
so learning rates and loss curves stay comparable. The full dimension is always one of the ``m_i``.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn


class MatryoshkaLoss(nn.Module):
    """Wrap a pairwise contrastive loss (``loss(a, b, logit_scale, logit_bias)``) into its Matryoshka form over
    ``dims`` (prefix sizes; the embedding's full size is added when missing), with optional ``weights``."""

    def __init__(self, loss: nn.Module, dims: Sequence[int], weights: Sequence[float] | None = None):
        super().__init__()
        if not dims or any(int(d) < 1 for d in dims) or list(dims) != sorted(set(int(d) for d in dims)):
            raise ValueError(f"matryoshka dims must be increasing positive integers, got {list(dims)}")
        if weights is not None and len(weights) != len(dims):
            raise ValueError(f"matryoshka: {len(weights)} weights for {len(dims)} dims")
        self.loss = loss
        self.dims = [int(d) for d in dims]
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(self.dims)

    def forward(self, a: Tensor, b: Tensor, logit_scale: Tensor, logit_bias: Tensor | None = None) -> Tensor:
        full = a.shape[-1]
        if self.dims[-1] > full:
            raise ValueError(f"matryoshka dims {self.dims} exceed the embedding size {full}")
        dims, weights = list(self.dims), list(self.weights)
        if dims[-1] != full:
            dims.append(full)
            weights.append(1.0)
        total = 0.0
        for m, w in zip(dims, weights):
            total = total + w * self.loss(F.normalize(a[:, :m], dim=-1), F.normalize(b[:, :m], dim=-1),
                                          logit_scale, logit_bias)
        return total / sum(weights)


def with_matryoshka(loss: nn.Module, dims: Sequence[int] | None) -> nn.Module:
    """``loss`` itself without ``dims``; else :class:`MatryoshkaLoss` over them."""
    return MatryoshkaLoss(loss, dims) if dims else loss
