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


class BlockingRetriever:
    """Image searches wait for ``release``; text searches answer at once. Records each call's thread and its torch
    intra-op thread count."""

    def __init__(self):
        self.release, self.image_started = threading.Event(), threading.Event()
        self.seen = []

    def search(self, query, modality, k=10, filter=None):
        import torch

        self.seen.append((threading.current_thread().name, modality, torch.get_num_threads()))
        if modality == "image":
            self.image_started.set()
            assert self.release.wait(30)
        n = len(query) if isinstance(query, list) else None
        return [[modality]] * n if n else [modality]


def test_a_text_search_is_not_held_up_by_a_slow_image_batch():
    """Each modality has its own lane: while an image forward is still running, a text search is answered (one
    worker thread for all would answer it only after the image)."""
    retriever = BlockingRetriever()
    batcher = SearchBatcher(retriever, window=0.001, max_batch=8)
    image = batcher.submit("upload", "image", 5, None)
    assert retriever.image_started.wait(30)
    text = batcher.submit("a red star", "text", 5, None)
    assert text.result(timeout=30) == ["text"]
    assert not image.done()
    retriever.release.set()
    assert image.result(timeout=30) == ["image"]
    threads = {modality: name for name, modality, _ in retriever.seen}
    assert threads["text"] != threads["image"]
    batcher.close()


@pytest.mark.parametrize("threads", [1, 2, None])
def test_the_lanes_run_with_their_own_intra_op_thread_count(threads):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(before)  # the count set last, which a new thread starts with (threads=None keeps it)
    retriever = BlockingRetriever()
    retriever.release.set()
    batcher = SearchBatcher(retriever, window=0.001, max_batch=8, threads=threads)
    assert batcher.submit("a", "text", 1, None).result(timeout=30) == ["text"]
    assert batcher.submit("b", "image", 1, None).result(timeout=30) == ["image"]
    batcher.close()
    assert {n for _, _, n in retriever.seen} == ({threads} if threads else {before})
    assert torch.get_num_threads() == before  # the caller's own setting is left as it was


def test_close_answers_what_was_submitted_then_refuses():
    retriever = BlockingRetriever()
    batcher = SearchBatcher(retriever, window=0.001, max_batch=8)
    image = batcher.submit("upload", "image", 5, None)
    assert retriever.image_started.wait(30)
    later = [batcher.submit(f"t{i}", "text", 5, None) for i in range(3)]
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit("too late", "text", 5, None)
    retriever.release.set()
    assert image.result(timeout=30) == ["image"] and all(f.result(timeout=30) == ["text"] for f in later)
    for lane in batcher._lanes.values():
        lane.thread.join(30)
        assert not lane.thread.is_alive()
