"""Batch queries on a flat index take the matmul path (xmodal.retrieval.exact) and return exactly faiss flat's result.

The truth is faiss itself: a separate ``IndexIDMap2(IndexFlatIP)`` holding the same vectors and ids, searched one
query at a time (faiss's own scan): ids and scores must be identical, bit for bit, including the order of ties.
"""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from xmodal.retrieval import exact
from xmodal.retrieval.index import EmbeddingIndex

faiss.omp_set_num_threads(1)
D = 192


def reference(x: np.ndarray, ids: np.ndarray, q: np.ndarray, k: int):
    ref = faiss.IndexIDMap2(faiss.IndexFlatIP(x.shape[1]))
    ref.add_with_ids(x, ids)
    rows = [ref.search(q[i:i + 1], k) for i in range(len(q))]
    return np.vstack([r[0] for r in rows]), np.vstack([r[1] for r in rows])


@pytest.fixture
def tied_index():
    """6,000 rows of 192-d (above exact.MATMUL_MIN_WORK), not all unit length; row 7 copied 40 times (more ties than k + MARGIN, so faiss
    answers those queries) and row 11 copied 5 times (ties inside the top k); 500 rows removed."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6000, D)).astype(np.float32)
    x *= rng.uniform(0.5, 1.5, (6000, 1)).astype(np.float32)
    x[rng.choice(np.arange(100, 6000), 40, replace=False)] = x[7]
    x[[3000, 3001, 4500, 5999, 12]] = x[11]
    index = EmbeddingIndex(D)
    index.add(x)
    removed = rng.choice(6000, 500, replace=False)
    removed = removed[(removed != 7) & (removed != 11)]
    index.remove(removed)
    keep = np.setdiff1d(np.arange(6000), removed)
    return index, x[keep], keep.astype(np.int64), rng


@pytest.mark.parametrize("k", [1, 10, 50])
def test_batch_equals_faiss_flat_with_ties(tied_index, monkeypatch, k):
    index, x, ids, rng = tied_index
    q = np.vstack([x[[0, 7, 11]], rng.standard_normal((61, D)).astype(np.float32)])  # 64 queries, two tied
    calls = []
    original = exact.flat_search
    monkeypatch.setattr(exact, "flat_search", lambda *a: calls.append(a[1].shape) or original(*a))
    hits = index.search(q, k)
    assert calls == [(64, D)]  # the batch took the matmul path
    ref_scores, ref_ids = reference(x, ids, q, k)
    assert [[h.id for h in row] for row in hits] == ref_ids.tolist()
    assert np.array_equal(np.array([[h.score for h in row] for row in hits], np.float32), ref_scores)
    copies = [h.id for h in hits[2] if h.score == hits[2][0].score]
    assert len(copies) == min(k, 6)  # row 11 and its 5 copies tie, listed as faiss lists them


def test_batch_path_equals_faiss_when_every_query_is_checked(tied_index):
    """exact.flat_search directly, over a batch where faiss must answer nothing but the 40-copy ties."""
    index, x, ids, rng = tied_index
    q = rng.standard_normal((300, D)).astype(np.float32)
    scores, labels = exact.flat_search(index._index, q, 10, exact.max_norm(x))
    ref_scores, ref_ids = index._index.search(q, 10)
    assert np.array_equal(labels, ref_ids) and np.array_equal(scores, ref_scores)
    ref_scores, ref_ids = reference(x, ids, q[:20], 10)
    assert np.array_equal(labels[:20], ref_ids) and np.array_equal(scores[:20], ref_scores)


def test_small_batches_and_small_indexes_stay_on_faiss(monkeypatch):
    monkeypatch.setattr(exact, "flat_search", lambda *a: pytest.fail("matmul path taken"))
    rng = np.random.default_rng(0)
    index = EmbeddingIndex(16)
    index.add(rng.standard_normal((exact.MATMUL_MIN_WORK // 16 - 1, 16)).astype(np.float32))
    index.search(rng.standard_normal((64, 16)).astype(np.float32), 5)
    index.add(rng.standard_normal((10, 16)).astype(np.float32))
    index.search(rng.standard_normal((exact.MATMUL_MIN_QUERIES - 1, 16)).astype(np.float32), 5)
    assert not exact.use_matmul(exact.MATMUL_MIN_QUERIES - 1, 10 ** 6, 256) and exact.use_matmul(256, 10 ** 6, 256)


def test_batches_faiss_answers_with_blas_stay_with_faiss(monkeypatch):
    """From distance_compute_blas_threshold / d queries faiss flat multiplies matrices itself (with sgemm's
    rounding): xmodal returns faiss's result for those batches, bit for bit."""
    monkeypatch.setattr(exact, "flat_search", lambda *a: pytest.fail("matmul path taken"))
    monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 64 * 16)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5000, 16)).astype(np.float32)
    index = EmbeddingIndex(16)
    index.add(x)
    q = rng.standard_normal((64, 16)).astype(np.float32)
    hits = index.search(q, 5)
    scores, ids = index._index.search(q, 5)
    assert [[h.id for h in row] for row in hits] == ids.tolist()
    assert np.array_equal(np.array([[h.score for h in row] for row in hits], np.float32), scores)


def test_norm_bound_survives_save_and_load(tmp_path, tied_index):
    index, x, ids, rng = tied_index
    index.save(tmp_path / "ix")
    loaded = EmbeddingIndex.load(tmp_path / "ix")
    q = rng.standard_normal((64, D)).astype(np.float32)
    a = loaded.search(q, 10)
    ref_scores, ref_ids = reference(x, ids, q, 10)
    assert [[h.id for h in row] for row in a] == ref_ids.tolist()
    assert loaded._norm_bound == pytest.approx(float(np.linalg.norm(x, axis=1).max()), rel=1e-6)
