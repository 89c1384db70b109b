"""Fusion of several modalities for a task head, each strategy a small module over ``{modality: Tensor[B, D]}``.

Every module is called as ``fusion(feats, present=None) -> Tensor[B, out_dim]``:

* ``feats``: embeddings in the shared space, keyed by modality (keys not in ``modalities`` are ignored, so the model's
  output dict with its ``logit_scale`` can be passed as is);
* ``present``: ``{modality: BoolTensor[B]}``, which rows have that modality. ``None`` means every row has every
  modality in ``feats``; a modality listed in ``modalities`` but missing from ``feats`` is absent for all rows; one in
  ``feats`` but not in ``present`` is present for all rows.

The values in an absent row's slot are arbitrary (zeros, a placeholder, stale features) and never reach the output:
each module selects with ``torch.where`` (not a multiply, so even ``inf`` there is harmless and gradients to those
slots are exactly zero). Every row needs at least one present modality.

Feature level: :class:`ConcatFusion`, :class:`WeightedSumFusion`, :class:`ProductFusion`, :class:`GatedFusion`,
:class:`AttentionFusion` (built by name with :func:`build_fusion`). Model level: :class:`LateFusion` (combines the
outputs of one head per modality). Data level: :class:`EarlyFusionEncoder` (one transformer over raw image patches and
text tokens; it replaces the towers instead of following them).
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn


def _presence(inputs: dict[str, Tensor], present: dict[str, Tensor] | None, modalities: list[str]) -> Tensor:
    """``mask [B, n]`` (True = present) in ``modalities`` order; raises when a row has none of them."""
    ref = next((inputs[m] for m in modalities if m in inputs), None)
    if ref is None:
        raise ValueError(f"none of the modalities {modalities} is in the inputs (keys: {sorted(inputs)})")
    B, device = ref.shape[0], ref.device
    cols = []
    for m in modalities:
        p = present.get(m) if (present is not None and m in inputs) else None
        if m not in inputs:
            cols.append(torch.zeros(B, dtype=torch.bool, device=device))
        elif p is None:
            cols.append(torch.ones(B, dtype=torch.bool, device=device))
        else:
            cols.append(p.to(device=device, dtype=torch.bool).reshape(B))
    mask = torch.stack(cols, 1)
    empty = ~mask.any(1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows[:10]}{'...' if len(rows) > 10 else ''} have none of the modalities "
                         f"{modalities} present; every row needs at least one")
    return mask


def _stack(feats: dict[str, Tensor], present: dict[str, Tensor] | None,
           modalities: list[str]) -> tuple[Tensor, Tensor]:
    """→ ``x [B, n, D]`` with absent slots zeroed and ``mask [B, n]`` (True = present), in ``modalities`` order."""
    mask = _presence(feats, present, modalities)
    ref = next(feats[m] for m in modalities if m in feats)
    for m in modalities:
        if m in feats and feats[m].shape != ref.shape:
            raise ValueError(f"{m}: shape {tuple(feats[m].shape)} differs from {tuple(ref.shape)} of the others")
    x = torch.stack([feats.get(m, ref) for m in modalities], 1)
    x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x, mask


def _masked_softmax(scores: Tensor, mask: Tensor) -> Tensor:
    """Softmax over dim 1 restricted to present modalities (absent ones get weight exactly 0)."""
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=1)


class ConcatFusion(nn.Module):
    """``[x_1; ...; x_n]`` in ``modalities`` order, an absent modality's block all zeros. ``out_dim = n·D``.

    The zero block is the only trace of absence: with L2-normalised inputs a zero vector is unambiguous (no real
    embedding has norm 0), so the head can learn what absence means.
    """

    def __init__(self, modalities: list[str], dim: int):
        super().__init__()
        self.modalities, self.out_dim = list(modalities), len(modalities) * dim

    def forward(self, feats: dict[str, Tensor], present: dict[str, Tensor] | None = None) -> Tensor:
        x, _ = _stack(feats, present, self.modalities)
        return x.flatten(1)


class WeightedSumFusion(nn.Module):
    """``Σ_i w_i x_i`` with ``w = softmax(a)`` over the present modalities, ``a`` one learned logit per modality
    (init 0: the mean of the present embeddings). ``out_dim = D``."""

    def __init__(self, modalities: list[str], dim: int):
        super().__init__()
        self.modalities, self.out_dim = list(modalities), dim
        self.logits = nn.Parameter(torch.zeros(len(modalities)))

    def forward(self, feats: dict[str, Tensor], present: dict[str, Tensor] | None = None) -> Tensor:
        x, mask = _stack(feats, present, self.modalities)
        w = _masked_softmax(self.logits.expand(mask.shape), mask)
        return (w.unsqueeze(-1).to(x.dtype) * x).sum(1)


class ProductFusion(nn.Module):
    """Element-wise product of the present modalities' embeddings (absent ones count as all-ones). ``out_dim = D``.

    Bilinear interactions at no parameter cost. Note the scale: the product of k unit vectors has entries of order
    ``D^(-k/2)``, so rows with different numbers of present modalities differ in magnitude; a head with a LayerNorm
    (or one trained on a fixed set of modalities) copes with that.
    """

    def __init__(self, modalities: list[str], dim: int):
        super().__init__()
        self.modalities, self.out_dim = list(modalities), dim

    def forward(self, feats: dict[str, Tensor], present: dict[str, Tensor] | None = None) -> Tensor:
        x, mask = _stack(feats, present, self.modalities)
        return torch.where(mask.unsqueeze(-1), x, torch.ones((), dtype=x.dtype, device=x.device)).prod(1)


class GatedFusion(nn.Module):
    """Gated sum in the manner of the Gated Multimodal Unit (Arevalo et al. 2017, "Gated Multimodal Units for
    Information Fusion", https://arxiv.org/abs/1702.01992): ``Σ_i g_i x_i`` with ``g = softmax_i(w_i·x_i + b_i)``
    over the present modalities. ``out_dim = D``.

    Unlike the GMU the gate of each modality is computed from its own embedding (one ``Linear(D, 1)`` per modality),
    not from the concatenation of all of them: that keeps the gates defined when a modality is missing and extends the
    GMU's two-way ``z / (1 - z)`` to a softmax over any number of modalities. The inputs already live in one shared
    space, so the GMU's per-modality ``tanh(W_i x_i)`` transforms are left to the head.
    """

    def __init__(self, modalities: list[str], dim: int):
        super().__init__()
        self.modalities, self.out_dim = list(modalities), dim
        self.gates = nn.ModuleList(nn.Linear(dim, 1) for _ in modalities)

    def forward(self, feats: dict[str, Tensor], present: dict[str, Tensor] | None = None) -> Tensor:
        x, mask = _stack(feats, present, self.modalities)
        scores = torch.cat([gate(x[:, i]) for i, gate in enumerate(self.gates)], dim=1)  # [B, n]
        g = _masked_softmax(scores.float(), mask)
        return (g.unsqueeze(-1).to(x.dtype) * x).sum(1)


class AttentionFusion(nn.Module):
    """Cross-modal self-attention: each modality's embedding plus a learned modality-type embedding is one token; one
    ``TransformerEncoderLayer`` attends across them with absent modalities removed by ``src_key_padding_mask``; the
    output is the mean of the present tokens. ``out_dim = D``.

    A row's output equals running the layer on its present tokens alone (tested), whatever its absent slots hold.
    """

    def __init__(self, modalities: list[str], dim: int, heads: int = 4, mlp_ratio: float = 2.0,
                 dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"AttentionFusion: dim {dim} is not divisible by heads={heads}")
        self.modalities, self.out_dim = list(modalities), dim
        self.type_embed = nn.Parameter(torch.randn(len(modalities), dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=int(dim * mlp_ratio), dropout=dropout,
                                                activation="gelu", batch_first=True, norm_first=True)

    def forward(self, feats: dict[str, Tensor], present: dict[str, Tensor] | None = None) -> Tensor:
        x, mask = _stack(feats, present, self.modalities)
        tokens = self.layer(x + self.type_embed.to(x.dtype), src_key_padding_mask=~mask)
        # Absent tokens' outputs are whatever the layer made of them; they are excluded from the mean.
        tokens = torch.where(mask.unsqueeze(-1), tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
        return tokens.sum(1) / mask.sum(1, keepdim=True).to(tokens.dtype)


class LateFusion(nn.Module):
    """Model-level (late) fusion: one head per modality on its own embedding, outputs averaged over the present
    modalities of each row.

    ``combine="mean"`` averages the raw outputs (logits for a classifier, scores for a regressor).
    ``combine="prob_mean"`` (single-label classifiers) averages the softmax probabilities and returns their log: these
    log-probabilities are valid logits (``softmax(log p) = p``), so ``ClassificationHead.loss`` on them is the
    negative log-likelihood of the mixture and ``predict`` its argmax.

    Heads see every row, absent ones as zero vectors (their outputs there are discarded), so a head must not mix
    rows (e.g. BatchNorm in training mode would let those rows into its statistics).
    """

    def __init__(self, heads: dict[str, nn.Module], combine: str = "mean"):
        super().__init__()
        if combine not in ("mean", "prob_mean"):
            raise ValueError(f"LateFusion: unknown combine {combine!r}: expected 'mean' or 'prob_mean'")
        if not heads:
            raise ValueError("LateFusion: at least one head is required")
        self.heads = nn.ModuleDict(heads)
        self.modalities, self.combine = list(heads), combine
        self.out_dim = getattr(next(iter(heads.values())), "out_dim", None)

    def forward(self, feats: dict[str, Tensor], present: dict[str, Tensor] | None = None) -> Tensor:
        x, mask = _stack(feats, present, self.modalities)  # absent slots zeroed: no NaN/inf reaches a head
        outs = []
        for i, m in enumerate(self.modalities):
            out = self.heads[m](x[:, i])
            outs.append(out.float().softmax(-1) if self.combine == "prob_mean" else out)
        y = torch.stack(outs, 1)  # [B, n, ...]
        m = mask.view(*mask.shape, *([1] * (y.dim() - 2)))
        y = torch.where(m, y, torch.zeros((), dtype=y.dtype, device=y.device)).sum(1) / m.sum(1).to(y.dtype)
        return y.log() if self.combine == "prob_mean" else y


class EarlyFusionEncoder(nn.Module):
    """Data-level (early) fusion, ViLT-style (Kim et al. 2021, "ViLT: Vision-and-Language Transformer Without
    Convolution or Region Supervision", https://arxiv.org/abs/2102.03334): one transformer over the concatenation of
    ``[CLS]``, text token embeddings and linearly embedded image patches (each with position and type embeddings);
    the output is a projection of the final ``[CLS]`` token.

    ``forward({"image": float [B, 3, H, W], "text": int64 [B, L]}, present=None) -> [B, out_dim]``. It takes RAW
    inputs (pixels and BPE ids, pad id ``pad_id`` masked), not shared-space embeddings: this is the issue's
    "data-level fusion", which replaces the separate towers rather than following them. Absent modalities are dropped
    through the attention padding mask (their pixels/ids never matter); either modality may be missing from the dict.

    Use it when the task needs fine-grained interaction between words and image regions (VQA, grounding, matching
    hard negatives) and there is enough paired data to train it; every example must be encoded jointly, so it cannot
    pre-embed a gallery for retrieval and gains nothing from contrastive pretraining of the towers — for those, use
    the towers with a feature-level fusion.
    """

    def __init__(self, out_dim: int, dim: int = 128, depth: int = 2, heads: int = 4, image_size: int = 32,
                 patch_size: int = 8, vocab_size: int | None = None, context_length: int = 32, pad_id: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"EarlyFusionEncoder: image_size {image_size} is not a multiple of patch {patch_size}")
        if vocab_size is None:
            from ..modalities.text import BPE_VOCAB_SIZE
            vocab_size = BPE_VOCAB_SIZE
        self.modalities, self.out_dim, self.pad_id = ["image", "text"], out_dim, pad_id
        self.context_length, self.image_size = context_length, image_size
        n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch_size, stride=patch_size)  # a linear map of each patch
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.text_pos = nn.Parameter(torch.randn(1, context_length, dim) * 0.02)
        self.image_pos = nn.Parameter(torch.randn(1, n_patches, dim) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(2, dim) * 0.02)  # 0 = text, 1 = image (ViLT's modality types)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, inputs: dict[str, Tensor], present: dict[str, Tensor] | None = None) -> Tensor:
        mask = _presence(inputs, present, self.modalities)
        B = mask.shape[0]
        has_image, has_text = mask[:, 0], mask[:, 1]
        tokens, keep = [self.cls.expand(B, -1, -1)], [torch.ones(B, 1, dtype=torch.bool, device=mask.device)]
        if "text" in inputs:
            ids = inputs["text"]
            if ids.shape[1] > self.context_length:
                raise ValueError(f"text: {ids.shape[1]} tokens > context_length {self.context_length}")
            ids = torch.where(has_text[:, None], ids, torch.full_like(ids, self.pad_id))  # absent rows: never looked up
            tokens.append(self.token_embed(ids) + self.text_pos[:, :ids.shape[1]] + self.type_embed[0])
            keep.append((ids != self.pad_id) & has_text[:, None])
        if "image" in inputs:
            pixels = inputs["image"]
            pixels = torch.where(has_image[:, None, None, None], pixels, torch.zeros((), dtype=pixels.dtype,
                                                                                     device=pixels.device))
            patches = rearrange(self.patch_embed(pixels), "b c h w -> b (h w) c")  # one token per patch, row-major
            if patches.shape[1] != self.image_pos.shape[1]:
                raise ValueError(f"image: expected {self.image_size}x{self.image_size} pixels, got "
                                 f"{tuple(inputs['image'].shape[-2:])}")
            tokens.append(patches + self.image_pos + self.type_embed[1])
            keep.append(has_image[:, None].expand(B, patches.shape[1]))
        x = self.encoder(torch.cat(tokens, 1), src_key_padding_mask=~torch.cat(keep, 1))
        return self.head(self.norm(x[:, 0]))


def build_fusion(name: str, modalities: list[str], dim: int, **options) -> nn.Module:
    """``"concat" | "sum" | "product" | "gated" | "attention"`` → the feature-level fusion module (``options`` go to
    :class:`AttentionFusion`: ``heads``, ``mlp_ratio``, ``dropout``). Late and early fusion are built directly."""
    if name == "concat":
        return ConcatFusion(modalities, dim, **options)
    if name == "sum":
        return WeightedSumFusion(modalities, dim, **options)
    if name == "product":
        return ProductFusion(modalities, dim, **options)
    if name == "gated":
        return GatedFusion(modalities, dim, **options)
    if name == "attention":
        return AttentionFusion(modalities, dim, **options)
    raise ValueError(f"unknown fusion {name!r}: expected one of concat, sum, product, gated, attention")
