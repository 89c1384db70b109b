"""Retrieval and classification metrics. Pure tensor functions: no model, no data loading."""
from __future__ import annotations

import torch


def retrieval_ranks(queries: torch.Tensor, items: torch.Tensor, positives: torch.Tensor,
                    chunk: int = 1024) -> torch.Tensor:
    """1-based rank of the best-scoring positive item for each query.

    ``queries [nq, d]`` and ``items [ni, d]`` are embeddings (scored by inner product); ``positives`` is a
    ``[2, npairs]`` long tensor of (query index, item index) pairs — a query may have several positives (one image,
    five captions). Rank = 1 + the number of items scoring strictly higher than the query's best positive, so ties
    are resolved in the query's favour (as CLIP-benchmark does with a stable sort on equal scores).
    """
    nq = queries.shape[0]
    if positives.numel() == 0:
        raise ValueError("retrieval_ranks: no positive pairs")
    q_idx, i_idx = positives
    if torch.bincount(q_idx, minlength=nq).min() == 0:
        raise ValueError("retrieval_ranks: every query needs at least one positive item")
    ranks = torch.empty(nq, dtype=torch.long)
    for start in range(0, nq, chunk):
        stop = min(start + chunk, nq)
        sim = queries[start:stop].float() @ items.float().T
        sel = (q_idx >= start) & (q_idx < stop)
        best = torch.full((stop - start,), float("-inf"))
        best.scatter_reduce_(0, q_idx[sel] - start, sim[q_idx[sel] - start, i_idx[sel]], reduce="amax")
        ranks[start:stop] = (sim > best[:, None]).sum(dim=1) + 1
    return ranks


def recall_at_k(ranks: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Fraction of queries whose best positive is within the top k."""
    return {f"R@{k}": (ranks <= k).float().mean().item() for k in ks}


def rank_summary(ranks: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    out = recall_at_k(ranks, ks)
    # torch.median returns the lower of the two middle values; the conventional median averages them.
    out["median_rank"] = ranks.float().quantile(0.5).item()
    out["mean_rank"] = ranks.float().mean().item()
    return out


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of ``logits [n, classes]`` against integer ``targets [n]`` (k capped at the class count)."""
    out = {}
    for k in ks:
        k_eff = min(k, logits.shape[1])
        top = logits.topk(k_eff, dim=1).indices
        out[f"top{k}"] = (top == targets[:, None]).any(dim=1).float().mean().item()
    return out
