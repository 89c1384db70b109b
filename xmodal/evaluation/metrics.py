"""Retrieval and classification metrics. Pure tensor functions: no model, no data loading."""
from __future__ import annotations

import torch


def retrieval_ranks(queries: torch.Tensor, items: torch.Tensor, positives: torch.Tensor,
                    chunk: int = 1024, item_penalty: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of the best-scoring positive item for each query.

    ``queries [nq, d]`` and ``items [ni, d]`` are embeddings (scored by inner product); ``positives`` is a
    ``[2, npairs]`` long tensor of (query index, item index) pairs — a query may have several positives (one image,
    five captions). Rank = 1 + the number of items scoring strictly higher than the query's best positive, so ties
    are resolved in the query's favour (as CLIP-benchmark does with a stable sort on equal scores).
    ``item_penalty [ni]``: subtracted from every query's score of each item (hubness reduction,
    :mod:`xmodal.retrieval.hubness`).
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
        if item_penalty is not None:
            sim = sim - item_penalty[None, :].float()
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


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``[true, predicted]`` counts."""
    return torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)


def _f1(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(denom, dtype=torch.float))


def classification_metrics(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the unweighted mean of per-class F1 over classes present in target or prediction,
    as scikit-learn's ``f1_score(average="macro")`` with its default ``labels``), and beside them
    ``majority_accuracy``: the accuracy of always answering the eval set's most frequent class, the figure an
    accuracy has to beat before it says anything (a 0.55 on a set that is 55 % one class is no classifier)."""
    cm = confusion_matrix(pred.long(), target.long(), num_classes).float()
    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    seen = (cm.sum(0) + cm.sum(1)) > 0
    return {"accuracy": (tp.sum() / cm.sum()).item(), "macro_f1": _f1(tp, fp, fn)[seen].mean().item(),
            "majority_accuracy": (cm.sum(1).max() / cm.sum()).item(), "n": float(len(target))}


def average_precision(scores: torch.Tensor, target: torch.Tensor, n_relevant: int | None = None) -> float:
    """Average precision (AP) of the items ranked by ``scores``: the area under the precision-recall curve,
    ``Σ (R_k − R_{k−1}) P_k`` over the distinct score thresholds (tied scores are one threshold), as scikit-learn's
    ``average_precision_score``. ``target``: bool, which items are relevant.

    ``n_relevant``: the number of relevant items in the whole collection when ``scores`` covers only part of it (a
    truncated ranking): recall is counted against it, so a relevant item left out adds precision 0, as trec_eval
    does. Default: the relevant items in ``target`` (then at least one is needed).
    """
    y = target.double().flatten()
    found = int(y.sum().item())
    if n_relevant is None:
        if found < 1:
            raise ValueError("average_precision: target has no relevant item")
        n_relevant = found
    elif n_relevant < 1:
        raise ValueError("average_precision: n_relevant must be at least 1")
    elif found > n_relevant:
        raise ValueError(f"average_precision: {found} relevant hits but n_relevant={n_relevant}")
    order = torch.argsort(scores.double().flatten(), descending=True, stable=True)
    s, y = scores.flatten()[order], y[order]
    last = torch.ones_like(s, dtype=torch.bool)  # the last row of each run of tied scores closes a threshold
    last[:-1] = s[1:] != s[:-1]
    tp, seen = y.cumsum(0)[last], torch.arange(1, len(y) + 1, dtype=torch.float64)[last]
    gained = tp - torch.cat([tp.new_zeros(1), tp[:-1]])  # relevant items reached at each threshold: n_relevant·ΔR
    return ((gained * tp / seen).sum() / n_relevant).item()


def ranked_average_precision(ranked_relevant, n_relevant: int) -> float:
    """:func:`average_precision` of a ranking without scores (a search's hits, best first):
    ``ranked_relevant[i]`` says whether the hit at rank ``i + 1`` is relevant; ``n_relevant`` is the number of
    relevant items in the collection. That is ``(1/n_relevant) * Σ precision@r`` over the ranks ``r`` of the
    relevant hits (one rank per hit: no ties)."""
    target = torch.as_tensor([bool(r) for r in ranked_relevant], dtype=torch.bool)
    return average_precision(-torch.arange(len(target), dtype=torch.float64), target, n_relevant)


def multilabel_metrics(pred: torch.Tensor, target: torch.Tensor, scores: torch.Tensor | None = None
                       ) -> dict[str, float]:
    """Micro- and macro-F1 over classes, and exact-match (subset) accuracy, for bool ``[n, classes]``; with the
    head's ``scores`` (logits or probabilities) also ``mAP``, the mean over classes with a positive row of their
    :func:`average_precision` — free of the 0.5 threshold the predictions use."""
    pred, target = pred.bool(), target.bool()
    tp = (pred & target).sum(0).float()
    fp = (pred & ~target).sum(0).float()
    fn = (~pred & target).sum(0).float()
    micro = _f1(tp.sum(), fp.sum(), fn.sum()).item()
    out = {"micro_f1": micro, "macro_f1": _f1(tp, fp, fn).mean().item(),
           "subset_accuracy": (pred == target).all(1).float().mean().item()}
    if scores is not None:
        aps = [average_precision(scores[:, c], target[:, c]) for c in range(target.shape[1]) if target[:, c].any()]
        if aps:
            out["mAP"] = sum(aps) / len(aps)
    return out | {"n": float(len(target))}


def regression_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """MAE, RMSE, Pearson r and R², the coefficient of determination ``1 - Σ(y - ŷ)² / Σ(y - ȳ)²`` (as
    scikit-learn's ``r2_score``): 0 = no better than predicting the mean of ``target``, negative = worse; a constant
    ``target`` gives 1 for an exact prediction and 0 otherwise, as scikit-learn does."""
    pred, target = pred.double().flatten(), target.double().flatten()
    err = pred - target
    pc, tc = pred - pred.mean(), target - target.mean()
    r = (pc * tc).sum() / (pc.norm() * tc.norm()).clamp(min=1e-12)
    ss_res, ss_tot = err.pow(2).sum().item(), tc.pow(2).sum().item()
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float(ss_res == 0)
    return {"mae": err.abs().mean().item(), "rmse": err.pow(2).mean().sqrt().item(), "pearson_r": r.item(),
            "r2": r2, "n": float(len(target))}
