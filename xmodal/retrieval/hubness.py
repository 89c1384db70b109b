"""Hubness reduction at query time: a few gallery items (hubs) are the nearest neighbour of many queries in a
high-dimensional space, and crowd out the right answers. Both methods here score a (query, item) pair by its
similarity less a per-item term measured against a **query bank** — embeddings of queries of the same modality, e.g.
the training split's captions for text→image — so an item that is close to every query is pushed down:

* ``is`` — inverted softmax (Smith et al. 2017, "Offline bilingual word vectors, orthogonal transformations and the
  inverted softmax"), the normaliser of querybank normalisation (Bogolin et al. 2022, "Cross Modal Retrieval with
  Querybank Normalisation"): ``exp(β s(q, g)) / Σ_b exp(β s(b, g))``; ranked by its log, ``s(q, g) − (1/β) log Σ_b
  exp(β s(b, g))`` after dividing by β.
* ``csls`` — cross-domain similarity local scaling (Conneau, Lample et al. 2018, "Word translation without parallel
  data"): ``2 s(q, g) − r_G(q) − r_B(g)``, ``r_B(g)`` the mean similarity of ``g`` to its ``k`` nearest bank
  queries. ``r_G(q)`` is the same for every item of one query, so the ranking is that of ``s(q, g) − r_B(g) / 2``.

Either way a query's ranking is ``s(q, g) − penalty(g)``: :func:`hub_penalty` computes the penalties once per
gallery (they do not depend on the query), and an index stores them beside its vectors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("none", "is", "csls")


@dataclass(frozen=True)
class Hubness:
    """How to reduce hubness: ``method`` (``none``, ``is``, ``csls``), the inverted softmax's inverse temperature
    ``beta`` (QB-Norm's default, 20, for cosine similarities) and CSLS's neighbourhood ``k`` (10, as Conneau et al.)."""
    method: str = "none"
    beta: float = 20.0
    k: int = 10

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"hubness: unknown method {self.method!r} (expected one of {', '.join(METHODS)})")
        if self.beta <= 0 or self.k < 1:
            raise ValueError(f"hubness: beta must be > 0 and k >= 1, got beta {self.beta}, k {self.k}")


@torch.no_grad()
def hub_penalty(bank: torch.Tensor, gallery: torch.Tensor, how: Hubness, chunk: int = 4096) -> torch.Tensor:
    """``[n_items]`` penalties of ``gallery [n_items, d]`` against the query ``bank [n_bank, d]`` (inner products of
    L2-normalised embeddings); zeros for method ``none``."""
    if how.method == "none":
        return torch.zeros(gallery.shape[0])
    if bank.shape[0] == 0:
        raise ValueError("hubness: the query bank is empty")
    bank = bank.float()
    out = torch.empty(gallery.shape[0])
    for start in range(0, gallery.shape[0], chunk):
        sims = bank @ gallery[start:start + chunk].float().T  # [n_bank, chunk]
        if how.method == "is":
            out[start:start + chunk] = torch.logsumexp(how.beta * sims, dim=0) / how.beta
        else:
            k = min(how.k, bank.shape[0])
            out[start:start + chunk] = sims.topk(k, dim=0).values.mean(dim=0) / 2
    return out


# ------------------------------------------------------------------------------------------ in an index

PENALTY_KEY = "hub_penalty"  # each indexed row's penalty, in its metadata (``xmodal index --hubness``)


def with_penalties(metas: list[dict], penalties: torch.Tensor) -> list[dict]:
    """The rows' metadata with each one's penalty (:data:`PENALTY_KEY`)."""
    return [{**m, PENALTY_KEY: float(p)} for m, p in zip(metas, penalties.tolist())]


def candidates(k: int, total: int) -> int:
    """How many nearest items a hubness-reduced search re-ranks to answer ``k``: the penalties move an item by at
    most their spread, so a wide margin of plain neighbours is re-scored (every item of a small index)."""
    return min(total, max(10 * k, 200))


def rerank(hits: list, k: int) -> list:
    """One query's hits re-scored as ``score − penalty`` and re-sorted; the best ``k``. Every hit's metadata must
    hold its penalty (an index built with ``--hubness``)."""
    missing = next((h for h in hits if PENALTY_KEY not in h.metadata), None)
    if missing is not None:
        raise ValueError(f"hubness: index row {missing.id} has no {PENALTY_KEY}; build the index with --hubness")
    for h in hits:
        h.score = h.score - h.metadata[PENALTY_KEY]
    return sorted(hits, key=lambda h: -h.score)[:k]
