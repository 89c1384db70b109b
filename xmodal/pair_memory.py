"""Pair memory: a query's nearest training pairs, found by the frozen towers, lend it their place in the shared space.

Projections learnt on a few thousand pairs place an unseen query less well than the frozen towers judge which
training inputs it resembles: MiniLM's caption-to-caption and EfficientNet's image-to-image similarities are
pretrained on far more data than the pairs. ASIF (Norelli et al., NeurIPS 2023, "Coupled data turns unimodal models
to multimodal without training") matches two modalities through those similarities alone. The memory mixes that into
the learnt space while keeping it one L2-normalised ``embed_dim`` space (so indexes, ``encode`` and every metric work
unchanged): with the frozen features ``f`` of a query of modality ``m`` and its projected embedding ``e``,

    s_j = cos(f - mean_m, a_mj - mean_m)                      over the memory's pairs j (their modality-m features)
    w_j = max(s_j, 0) ** power   for the top ``k`` s_j (ties: the lower j), else 0;   w /= sum(w)
    n   = normalise(sum_j w_j P_mj),   P_mj = normalise(sum of pair j's projected embeddings of the OTHER modalities)
    out = normalise((1 - weight) e + weight n)

so a caption is moved towards the images paired with the training captions it resembles, and an image towards the
captions of the training images it resembles (ASIF's reading: a neighbour's partner is what the query looks for).

``whiten`` modalities find their neighbours after a whitening of those centred, normalised features, fitted on the
memory's pairs: ``x -> normalise(x W)``, ``W = U diag((λ + mean(λ)) ** -1/2) U^T`` from the eigendecomposition
``U diag(λ) U^T`` of their second-moment matrix (their covariance, but for the small mean that normalising leaves),
the eigenvalues shrunk by their mean so that directions the few pairs barely span are not blown up. Directions the
pairs do not span at all scale every similarity of a query alike, so they move no neighbour. A classifier's pooled
features (an ImageNet CNN's) spend most of their variance on a few directions
that separate classes, not drawings; whitening evens them out, as image retrieval has long done with CNN features
(Jégou & Chum, ECCV 2012; Radenović et al., TPAMI 2019). Encoders trained for cosine similarity
(sentence-transformers) gain nothing from it (docs/results.md, "Levers").

Training steps use the plain embeddings (the loss is unchanged); the memory applies wherever the model embeds for
retrieval (``encode``: evaluation, model selection, indexes, queries). ``P`` follows the projections while they train
(recomputed when their weights change) and is saved with the model, so a model that loads only one tower still
applies it. Needs frozen towers (the stored features are the encoders' outputs) and at least two modalities.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


_TIE_BREAK = 2.0 ** -52


class PairMemory(nn.Module):
    """Buffers, per modality m: ``<m>_features`` (``[N, D_m]`` float16, centred and normalised — and whitened, for a
    ``whiten`` modality), ``<m>_mean`` (``[D_m]``), ``<m>_partners`` (``[N, embed_dim]``: ``P_m``) and, for a
    ``whiten`` modality, ``<m>_whiten`` (``[D_m, D_m]``: ``W``). Empty (N = 0) until :meth:`fill` or a loaded state
    dict sets them; an empty memory changes nothing."""

    def __init__(self, modalities: list[str], feat_dims: dict[str, int], embed_dim: int, k: int, power: float,
                 weight: float, whiten: Sequence[str] = ()):
        super().__init__()
        self.modalities, self.k, self.power, self.weight = list(modalities), int(k), float(power), float(weight)
        if isinstance(whiten, str):  # "image" would read as the modalities i, m, a, g, e
            raise ValueError(f"pair memory: whiten must be a list of modality names, got the string {whiten!r}")
        # names the config checked against its towers; a model built with some of them whitens those it has
        self._configured = [m for m in self.modalities if m in set(whiten)]
        for m in self.modalities:
            self.register_buffer(f"{m}_features", torch.zeros(0, feat_dims[m], dtype=torch.float16))
            self.register_buffer(f"{m}_mean", torch.zeros(feat_dims[m]))
            self.register_buffer(f"{m}_partners", torch.zeros(0, embed_dim))
        self.whiten: list[str] = []
        self._set_whiten(self._configured)
        self._raw: dict[str, torch.Tensor] = {}  # the pairs' encoder features while training (not saved)
        self._key: tuple | None = None  # the projection weights' versions the partners were computed with
        self._floats: dict[str, tuple] = {}  # float32 copies of the feature buffers, for the queries' products

    def __len__(self) -> int:
        return int(getattr(self, f"{self.modalities[0]}_partners").shape[0])

    def covers(self, modality: str) -> bool:
        return len(self) > 0 and modality in self.modalities

    @torch.no_grad()
    def fill(self, raw: dict[str, torch.Tensor]) -> None:
        """The pairs' encoder features, one ``[N, D_m]`` tensor per modality, row j of each from pair j."""
        sizes = {len(v) for v in raw.values()}
        if set(raw) != set(self.modalities) or len(sizes) != 1 or len(raw) < 2:
            raise ValueError(f"pair memory: expected equal-length features of {self.modalities}, got "
                             f"{ {m: tuple(v.shape) for m, v in raw.items()} }")
        self._raw = {m: v.detach().float().cpu() for m, v in raw.items()}
        self._set_whiten(self._configured)  # filled here: the config's whitening (a loaded memory: its own)
        for m, v in self._raw.items():
            mean = v.mean(0)
            unit = F.normalize(v - mean, dim=-1)
            if m in self.whiten:
                w = whitening(unit)
                setattr(self, f"{m}_whiten", w)
                unit = F.normalize(unit @ w, dim=-1)
            setattr(self, f"{m}_mean", mean)
            setattr(self, f"{m}_features", unit.half())
            setattr(self, f"{m}_partners", torch.zeros(len(v), getattr(self, f"{m}_partners").shape[1]))
        self._key = None

    def refresh(self, towers: nn.ModuleDict) -> None:
        """Recompute the partners from the stored encoder features if the projections changed since (training only:
        a loaded model has no encoder features, only the saved partners)."""
        if not self._raw:
            return
        key = tuple((id(p), p._version) for m in self.modalities for p in towers[m].projection.parameters())
        if key == self._key:
            return
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor: selection and checkpoints copy it
            device = getattr(self, f"{self.modalities[0]}_mean").device
            emb = {m: towers[m].project(self._raw[m].to(device)).float() for m in self.modalities}
            for m in self.modalities:
                setattr(self, f"{m}_partners", F.normalize(sum(e for o, e in emb.items() if o != m), dim=-1))
        self._key = key

    def forward(self, modality: str, feats: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``emb`` (the plain embeddings of inputs whose encoder features are ``feats``) moved towards the partners
        of their nearest pairs, renormalised."""
        bank = self._float_bank(modality)
        unit = F.normalize(feats.float() - getattr(self, f"{modality}_mean"), dim=-1)
        if modality in self.whiten and getattr(self, f"{modality}_whiten").numel():
            unit = F.normalize(unit @ getattr(self, f"{modality}_whiten"), dim=-1)
        sims = unit @ bank.T
        # Equal similarities (duplicate drawings, shared captions) go to the lower pair index. torch.topk leaves their
        # order open, so an exported graph, or another batch, could take other tied pairs at the k-th place. The key
        # subtracts index × 2^-52 in float64: that splits exact ties and never reorders two different float32
        # similarities of 0.001 or more while there are fewer than 2^18 pairs.
        n = bank.shape[0]
        key = sims.double() - torch.arange(n, device=sims.device, dtype=torch.float64) * _TIE_BREAK
        idx = key.topk(min(self.k, n), dim=1).indices
        top = sims.gather(1, idx)
        w = top.clamp(min=0) ** self.power
        w = w / w.sum(1, keepdim=True).clamp(min=1e-12)  # no similar pair at all: w = 0, emb unchanged
        partners = getattr(self, f"{modality}_partners")
        near = F.normalize(torch.einsum("nk,nkd->nd", w, partners[idx]), dim=-1)
        return F.normalize((1 - self.weight) * emb + self.weight * near, dim=-1)

    def _float_bank(self, modality: str) -> torch.Tensor:
        """The stored float16 features as float32, converted once per buffer, not at every query (a CPU product in
        float16 is slow; converting Open Clip Art's 5,783 × 1,280 image bank took 1.0 ms a query beside the
        product's 1.9 ms, 2 threads: 3.4 → 1.9 ms an image query)."""
        buf = getattr(self, f"{modality}_features")
        key = (buf.data_ptr(), buf._version, buf.device)
        cached = self._floats.get(modality)
        if cached is None or cached[0] != key:
            with torch.inference_mode(False):
                cached = self._floats[modality] = (key, buf.float())
        return cached[1]

    def _set_whiten(self, modalities: Sequence[str]) -> None:
        """Whiten exactly ``modalities``: a ``<m>_whiten`` buffer (empty until filled or loaded) for each, none for
        the others."""
        self.whiten = [m for m in self.modalities if m in set(modalities)]
        for m in self.modalities:
            name = f"{m}_whiten"
            if m in self.whiten and name not in self._buffers:
                self.register_buffer(name, torch.zeros(0, 0, device=getattr(self, f"{m}_mean").device))
            elif m not in self.whiten and name in self._buffers:
                del self._buffers[name]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A saved memory has its own number of pairs, and its own whitening: take the saved buffers' shapes, and
        whiten the modalities it whitened (a fine-tuning config need not repeat ``whiten`` to read a run's memory
        right), before they are copied. While training (a resumed checkpoint, the selected step's weights) the
        partners are recomputed from the loaded projections."""
        if any(prefix + f"{m}_features" in state_dict for m in self.modalities):
            self._set_whiten([m for m in self.modalities if prefix + f"{m}_whiten" in state_dict])
        for name, buf in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != buf.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buf.dtype, device=buf.device)
                self._raw = {}  # another memory than the one filled here
        self._key = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def whitening(unit: torch.Tensor) -> torch.Tensor:
    """``W = U diag((λ + mean(λ)) ** -1/2) U^T`` for rows ``unit`` (centred, normalised features), from their
    second-moment matrix ``x^T x / N = U diag(λ) U^T``, in float64 (the small eigenvalues). Symmetric (ZCA),
    float32 ``[D, D]``; the identity when the rows have no variance at all."""
    x = unit.double()
    lam, u = torch.linalg.eigh(x.T @ x / max(len(x), 1))
    lam = lam.clamp(min=0)
    shrink = lam.mean()
    if not shrink > 0:
        return torch.eye(x.shape[1])
    return ((u * (lam + shrink).rsqrt()) @ u.T).float()
