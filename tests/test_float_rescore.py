"""ivfpq with ``rescore``: PQ codes in RAM, float vectors memory-mapped from ``vectors.npy``; the hits are faiss's
own PQ candidates re-ranked by a numpy inner product with the original vectors."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from xmodal.retrieval import IndexCorruptError
from xmodal.retrieval.index import EmbeddingIndex

D, N, K, R = 32, 3000, 10, 8


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((30, D))
    x = centres[rng.integers(0, 30, n)] + 0.6 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype("float32")


def by_hand(index: EmbeddingIndex, x_of: dict[int, np.ndarray], q: np.ndarray, k: int, c: int):
    """faiss's c best PQ candidates, re-scored with numpy against the original vectors; ties by id."""
    _, cand = index._index.search(q, c)
    out = []
    for j in range(len(q)):
        ids = [int(i) for i in cand[j] if i >= 0]
        s = np.array([x_of[i] @ q[j] for i in ids], dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda t: (-s[t], ids[t]))[:k]
        out.append([(ids[t], float(s[t])) for t in order])
    return out


def got(index, q, k=K):
    return [[(h.id, h.score) for h in row] for row in index.search(q, k)]


def assert_same(a, b):
    assert [[i for i, _ in row] for row in a] == [[i for i, _ in row] for row in b]
    np.testing.assert_allclose([[s for _, s in row] for row in a], [[s for _, s in row] for row in b], rtol=1e-5,
                               atol=1e-6)


def test_ivfpq_rescore_reranks_pq_candidates_by_the_float_vectors(tmp_path):
    x, q = clustered(N, 0), clustered(40, 1)
    index = EmbeddingIndex(D, "ivfpq", nlist=16, nprobe=16, m=4, nbits=6, rescore=R)
    ids = index.add(x, [{"i": i} for i in range(N)])
    x_of = dict(zip(ids.tolist(), x))
    assert_same(got(index, q), by_hand(index, x_of, q, K, R * K))
    np.testing.assert_array_equal(index.reconstruct([5, 7]), x[[5, 7]])  # the floats, not PQ decodings

    exact = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :K]
    plain = EmbeddingIndex(D, "ivfpq", nlist=16, nprobe=16, m=4, nbits=6)
    plain.add(x)
    recall = lambda idx: np.mean([len({h.id for h in row} & set(e)) / K for row, e in zip(idx.search(q, K), exact)])
    assert recall(index) >= 0.7 and recall(index) > recall(plain) + 0.3, (recall(index), recall(plain))

    index.save(tmp_path / "idx")
    assert sorted(os.listdir(tmp_path / "idx")) == ["index.faiss", "index.json", "metadata.arrow", "vectors.npy"]
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert "vectors.npy" in info["checksums"] and info["options"]["rescore"] == R
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    assert isinstance(loaded._rows._base.base, np.memmap)  # on disk, mapped, not read into RAM
    assert_same(got(loaded, q), got(index, q))

    loaded.remove(list(range(0, N, 3)))
    new_ids = loaded.add(clustered(50, 2), [{"i": -1}] * 50)
    x_of = {i: v for i, v in x_of.items() if i % 3} | dict(zip(new_ids.tolist(), clustered(50, 2)))
    assert_same(got(loaded, q), by_hand(loaded, x_of, q, K, R * K))
    loaded.save(tmp_path / "idx")
    again = EmbeddingIndex.load(tmp_path / "idx")
    assert len(again) == len(x_of) and again._rows._base.shape == (len(x_of), D)
    assert_same(got(again, q), by_hand(again, x_of, q, K, R * K))
    assert [h.metadata for h in again.search(q[:1], 3, filter={"i": -1})[0]] == [{"i": -1}] * 3


def test_a_missing_or_damaged_vectors_file_is_refused_by_name(tmp_path):
    index = EmbeddingIndex(D, "ivfpq", nlist=4, m=4, nbits=4, rescore=4)
    index.add(clustered(400, 0))
    index.save(tmp_path / "idx")
    gone = tmp_path / "gone"
    shutil.copytree(tmp_path / "idx", gone)
    (gone / "vectors.npy").unlink()
    with pytest.raises(IndexCorruptError, match="incomplete: missing vectors.npy"):
        EmbeddingIndex.load(gone)
    flipped = tmp_path / "flipped"
    shutil.copytree(tmp_path / "idx", flipped)
    data = bytearray((flipped / "vectors.npy").read_bytes())
    data[len(data) // 2] ^= 0x10
    (flipped / "vectors.npy").write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="vectors.npy"):
        EmbeddingIndex.load(flipped)
