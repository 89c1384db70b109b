"""SearchBatcher: concurrent searches answered in batches, each with exactly its own search's hits; a bad query in
a batch fails alone. The truth is each query searched on its own through the same index."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from xmodal.retrieval import RetrievalError
from xmodal.retrieval.batcher import SearchBatcher
from xmodal.retrieval.index import EmbeddingIndex


class VectorRetriever:
    """A Retriever whose 'model' looks a query's vector up by name ("bad" has none)."""

    def __init__(self, index, vectors):
        self.index, self.vectors, self.calls = index, vectors, []

    def search(self, query, modality, k=10, filter=None):
        batch = isinstance(query, list)
        names = query if batch else [query]
        self.calls.append(len(names))
        if any(n not in self.vectors for n in names):
            raise RetrievalError(f"cannot embed {[n for n in names if n not in self.vectors]}")
        hits = self.index.search(np.stack([self.vectors[n] for n in names]), k, filter)
        return hits if batch else hits[0]


def test_concurrent_searches_are_batched_and_exact():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 16)).astype(np.float32)
    index = EmbeddingIndex(16)
    index.add(x, [{"odd": i % 2} for i in range(500)])
    vectors = {f"q{i}": rng.standard_normal(16).astype(np.float32) for i in range(24)}
    retriever = VectorRetriever(index, vectors)
    batcher = SearchBatcher(retriever, window=0.2, max_batch=64)
    start = threading.Barrier(25)
    futures = {}

    def ask(name, k, filt):
        start.wait()
        futures[name] = (batcher.submit(name, "text", k, filt), k, filt)

    jobs = [(f"q{i}", 1 + i % 7, {"odd": 1} if i % 3 == 0 else None) for i in range(24)] + [("bad", 5, None)]
    threads = [threading.Thread(target=ask, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, (future, k, filt) in futures.items():
        if name == "bad":
            with pytest.raises(RetrievalError, match="cannot embed"):
                future.result(timeout=30)
            continue
        want = index.search(vectors[name][None], k, filt)[0]
        got = future.result(timeout=30)
        assert [h.id for h in got] == [h.id for h in want]
        if filt is None:  # faiss: bit for bit; a small filtered subset is scored by numpy's BLAS (last-bit rounding)
            assert [h.score for h in got] == [h.score for h in want]
        else:
            np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=1e-6)
    # one batch per (modality, filter) group: far fewer calls than requests (a failed group goes one by one)
    batched = [n for n in retriever.calls if n > 1]
    assert batched and sum(batched) >= 20 and len(retriever.calls) < 25
    batcher.close()
