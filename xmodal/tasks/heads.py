"""Task heads on the shared space (or on a fused vector): classification, regression (e.g. a sentiment score) and
contrastive retrieval.

A head maps ``[B, in_dim]`` to its output; ``head.loss(output, target)`` is its training loss and
``head.predict(output)`` its prediction, so the fine-tuning loop treats every task alike. Sentiment as classes
(negative / neutral / positive) is a :class:`ClassificationHead`; sentiment as a score is a :class:`RegressionHead`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._scalar import accept_0d_scalars, scalar_parameter
from ..losses import ClipLoss


def _mlp(in_dim: int, out_dim: int, hidden: int | None, dropout: float) -> nn.Module:
    """Linear probe, or one hidden GELU layer; dropout on the head's input (and hidden layer)."""
    if hidden is None:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, out_dim))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(hidden, out_dim))


class ClassificationHead(nn.Module):
    """``[B, in_dim] → logits [B, num_classes]``.

    Single-label: ``loss`` = cross-entropy against class indices ``int64 [B]``; ``predict`` = argmax.
    Multi-label (``multi_label=True``): ``loss`` = binary cross-entropy with logits against a float multi-hot
    ``[B, num_classes]`` target, averaged over classes and rows; ``predict`` = ``sigmoid(logit) > threshold`` (bool).
    """

    def __init__(self, in_dim: int, num_classes: int, multi_label: bool = False, hidden: int | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.multi_label, self.out_dim = multi_label, num_classes
        self.net = _mlp(in_dim, num_classes, hidden, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if self.multi_label:
            return F.binary_cross_entropy_with_logits(logits.float(), target.float())
        return F.cross_entropy(logits.float(), target.long())

    @torch.no_grad()
    def predict(self, logits: Tensor, threshold: float = 0.5) -> Tensor:
        if self.multi_label:
            return logits.sigmoid() > threshold
        return logits.argmax(-1)


class RegressionHead(nn.Module):
    """``[B, in_dim] → [B]`` score (e.g. sentiment in [-1, 1]); ``loss`` = ``"mse"``, ``"l1"`` or ``"huber"``
    (δ = 1) against a float ``[B]`` target; ``predict`` = the score.

    Targets are standardised: the linear layer learns ``(y - target_mean) / target_std``, and ``forward`` returns
    ``net(x) · target_std + target_mean``, i.e. scores in the target's own units. ``loss`` standardises prediction
    and target alike, so it is in std units (Huber's δ = 1 is one standard deviation). A linear map of unit-norm
    features starts near 0 with a small spread: without this a target on a 0–100 scale is out of its reach in any
    short run. The two buffers are saved with the head's weights; :meth:`fit_target_scale` sets them from the
    training targets, and a head loaded from a file without them (saved before they existed) keeps 0 and 1, the
    raw-unit head it was trained as.
    """

    def __init__(self, in_dim: int, hidden: int | None = None, dropout: float = 0.0, loss: str = "mse"):
        super().__init__()
        if loss not in ("mse", "l1", "huber"):
            raise ValueError(f"RegressionHead: unknown loss {loss!r}: expected 'mse', 'l1' or 'huber'")
        self.loss_name, self.out_dim = loss, 1
        self.net = _mlp(in_dim, 1, hidden, dropout)
        # 1-element 1-D, not 0-d, as the learnable scalars (FSDP2 shards along dim 0); float32 under any autocast
        self.register_buffer("target_mean", torch.zeros(1))
        self.register_buffer("target_std", torch.ones(1))
        self.register_load_state_dict_pre_hook(_unscaled_if_absent)

    @torch.no_grad()
    def fit_target_scale(self, target: Tensor) -> None:
        """Set ``target_mean``/``target_std`` from the training targets (the population std; 1 when they do not
        vary, so a constant target is still learnt as an offset)."""
        y = target.detach().double().flatten()
        std = y.std(correction=0).item() if len(y) > 1 else 0.0
        self.target_mean.fill_(y.mean().item() if len(y) else 0.0)
        self.target_std.fill_(std if std > 0 and math.isfinite(std) else 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).squeeze(-1).float() * self.target_std + self.target_mean

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        pred, target = pred.float(), target.float().reshape(pred.shape)
        pred, target = (pred - self.target_mean) / self.target_std, (target - self.target_mean) / self.target_std
        if self.loss_name == "mse":
            return F.mse_loss(pred, target)
        if self.loss_name == "l1":
            return F.l1_loss(pred, target)
        return F.huber_loss(pred, target, delta=1.0)

    @torch.no_grad()
    def predict(self, pred: Tensor) -> Tensor:
        return pred


def _unscaled_if_absent(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: a regression head saved before targets were standardised has its weights but no
    ``target_mean``/``target_std``; it learnt raw targets, so it loads as mean 0, std 1 (and strict loading passes)."""
    if any(k.startswith(prefix + "net.") for k in state_dict):
        state_dict.setdefault(prefix + "target_mean", torch.zeros(1))
        state_dict.setdefault(prefix + "target_std", torch.ones(1))


class RetrievalHead(nn.Module):
    """Contrastive retrieval fine-tuning between two modalities: the CLIP loss (:class:`xmodal.losses.ClipLoss`,
    Radford et al. 2021) with its own temperature, learnable (``learnable=True``) from ``temperature`` = 0.07 as in
    CLIP; the logit scale ``1/τ`` is capped at ``max_logit_scale`` (100, as open_clip clamps).

    ``forward(a, b, mask=None) -> loss`` on ``[B, D]`` embeddings (re-normalised here, so fused vectors work too);
    ``mask`` (bool ``[B]``) keeps only the rows that have both modalities (with several processes every rank must keep
    the same number, as the features are all-gathered). ``logits(a, b)`` are the scaled
    similarities ``[B_a, B_b]`` for ranking.
    """

    def __init__(self, temperature: float = 0.07, learnable: bool = True, max_logit_scale: float = 100.0,
                 local_loss: bool = False, gather_with_grad: bool = True):
        super().__init__()
        self.logit_scale = scalar_parameter(math.log(1.0 / temperature), requires_grad=learnable)
        self.register_load_state_dict_pre_hook(accept_0d_scalars)
        self.max_log_scale = math.log(max_logit_scale)
        self.clip = ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad)

    def scale(self) -> Tensor:
        # Clamped in the forward pass (not in place after the step) so the loop needs no hook for this head.
        return self.logit_scale.clamp(max=self.max_log_scale).exp().squeeze(0)

    def logits(self, a: Tensor, b: Tensor) -> Tensor:
        return self.scale() * F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T

    def forward(self, a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            a, b = a[mask], b[mask]
        if len(a) == 0:  # no complete pair in this batch: a zero that still touches the graph
            return (a.sum() + b.sum() + self.logit_scale) * 0.0
        return self.clip(F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1), self.scale())
