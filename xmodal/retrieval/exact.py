"""Exact top-k for many queries at once: a blocked matrix product + top-k, with faiss flat's ids, scores and ties.

faiss-cpu (1.15) scans a flat index once per query unless a batch has ``distance_compute_blas_threshold`` (128,000)
queries, so a batch of 256 queries reads every vector 256 times; a matrix product reads each block of vectors once
for the whole batch. :func:`flat_search` takes that path and still returns **exactly** what
``IndexIDMap2(IndexFlatIP).search`` returns:

1. candidates: for each query the ``k + MARGIN`` best rows by a blocked ``torch`` matrix product (rows in blocks so
   the score matrix stays small);
2. exact scores: the candidates are re-scored with faiss's own inner-product kernel
   (``fvec_inner_products_by_idx``, the one its flat scan uses), so scores are bit-for-bit faiss's;
3. the top ``k`` by exact score, listed by (score descending, id descending): the order faiss's heap returns
   equal scores in (it pops them smallest id first and fills the list from its end);
4. checks per query, and faiss itself answers any query failing one: (a) no row outside the candidates can belong
   in the top ``k`` — a matrix product's float32 error is at most ``d · 2^-24 · |q| · max|x|`` (each of ``d``
   products and sums rounds once, Cauchy–Schwarz bounds the sum), so the weakest candidate's product score plus
   twice that bound must stay below the ``k``-th exact score; (b) no tie straddles the ``k``-th place (equal
   scores inside and outside the top ``k``): which of those rows faiss keeps depends on the order its scan meets
   them, so only faiss can say.

faiss switches to a BLAS path of its own for batches of ``distance_compute_blas_threshold / d`` queries and more;
those batches stay with faiss (see :func:`use_matmul`). Whether a batch takes this path is decided by :func:`use_matmul` from thresholds measured by
``benchmarks/batch_search.py`` (figures in docs/benchmarks.md).
"""
from __future__ import annotations

import faiss
import numpy as np

MARGIN = 16                 # candidates beyond k kept per query: room for near-ties before falling back to faiss
MATMUL_MIN_QUERIES = 32     # measured crossover (benchmarks/batch_search.py, docs/benchmarks.md): below it faiss wins
MATMUL_MIN_WORK = 1 << 20   # rows x dim: below ~4096 rows of 256-d faiss's scan takes microseconds; no gain (measured)
_SCORE_BUDGET = 1 << 24     # floats in one block of the score matrix (64 MiB)
_UNIT_ROUNDOFF = 2.0 ** -24


def use_matmul(n_queries: int, n_rows: int, dim: int) -> bool:
    """Whether a flat search of ``n_queries`` over ``n_rows`` vectors is faster by matrix product (measured).

    Not when faiss takes its own BLAS path (``n_queries · dim >= distance_compute_blas_threshold``, 500 queries of
    256-d with faiss 1.15's default): that path is a matrix product already, and its scores (sgemm's rounding) are
    what faiss flat returns for such a batch, so xmodal leaves the batch to faiss."""
    return (n_queries >= MATMUL_MIN_QUERIES and n_rows * dim >= MATMUL_MIN_WORK
            and n_queries * dim < faiss.cvar.distance_compute_blas_threshold)


def flat_arrays(index) -> tuple[np.ndarray, np.ndarray]:
    """Zero-copy views ``(vectors [n, d], ids [n])`` of an ``IndexIDMap2(IndexFlatIP)`` (valid until it changes)."""
    flat = faiss.downcast_index(index.index)
    n, d = int(flat.ntotal), int(flat.d)
    if n == 0:
        return np.empty((0, d), np.float32), np.empty(0, np.int64)
    vectors = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
    ids = faiss.rev_swig_ptr(index.id_map.data(), n)
    return vectors, ids


def _candidates(q: np.ndarray, x: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """For each query the ``c`` best rows of ``x`` by matrix product: ``(approximate scores, positions)``."""
    import torch

    xt, qt = torch.from_numpy(x), torch.from_numpy(q)
    block = max(c, _SCORE_BUDGET // max(1, len(q)))
    best_s, best_p = None, None
    for start in range(0, len(x), block):
        s = qt @ xt[start:start + block].T
        top = s.topk(min(c, s.shape[1]), dim=1)
        vals, pos = top.values, top.indices + start
        if best_s is not None:
            vals, pos = torch.cat([best_s, vals], 1), torch.cat([best_p, pos], 1)
            keep = vals.topk(min(c, vals.shape[1]), dim=1).indices
            vals, pos = vals.gather(1, keep), pos.gather(1, keep)
        best_s, best_p = vals, pos
    return best_s.numpy(), best_p.numpy()


def _exact_scores(q: np.ndarray, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """``q[i] · x[pos[i, j]]`` with faiss's kernel (bitwise what its flat scan computes)."""
    pos = np.ascontiguousarray(pos, dtype=np.int64)
    out = np.empty(pos.shape, np.float32)
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(q), faiss.swig_ptr(x),
                                     faiss.swig_ptr(pos), x.shape[1], len(q), pos.shape[1])
    return out


def _select(exact: np.ndarray, pos: np.ndarray, ids: np.ndarray, k: int):
    """The top-k of each row's candidates, listed by (score desc, id desc); among equal scores at the k-th place
    the smallest ids are kept here (:func:`flat_search` then asks faiss which it keeps)."""
    cid = ids[pos]
    keep = np.lexsort((cid, -exact), axis=1)[:, :k]
    s, i = np.take_along_axis(exact, keep, 1), np.take_along_axis(cid, keep, 1)
    order = np.lexsort((-i, -s), axis=1)
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def flat_search(index, q: np.ndarray, k: int, norm_bound: float) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(q, k)`` of an ``IndexIDMap2(IndexFlatIP)`` by blocked matrix product: the same
    ``(scores [nq, k], ids [nq, k])``, bit for bit (see the module docstring). ``k`` must not exceed the rows;
    ``norm_bound`` is at least the largest vector norm in the index (:func:`max_norm`)."""
    x, ids = flat_arrays(index)
    q = np.ascontiguousarray(q, dtype=np.float32)
    n, d = x.shape
    c = min(n, k + MARGIN)
    approx, pos = _candidates(q, x, c)
    exact = _exact_scores(q, x, pos)
    scores, labels = _select(exact, pos, ids, k)
    kth = scores[:, k - 1:k]
    unsure = (exact == kth).sum(axis=1) > (scores == kth).sum(axis=1)  # (b) a tie across the k-th place
    if c < n:  # (a) rows outside the candidates: provably below the k-th score
        bound = 2.0 * d * _UNIT_ROUNDOFF * np.linalg.norm(q, axis=1) * norm_bound
        unsure |= ~(approx.min(axis=1) + bound < scores[:, k - 1])
    if unsure.any():
        scores[unsure], labels[unsure] = index.search(q[unsure], k)
    return scores, labels



def max_norm(x: np.ndarray) -> float:
    """The largest row norm of ``x`` (in blocks: no copy of the whole matrix)."""
    if not len(x):
        return 0.0
    return float(np.sqrt(max(float(np.einsum("ij,ij->i", x[s:s + 65536], x[s:s + 65536]).max())
                             for s in range(0, len(x), 65536))))
