"""Concurrent searches joined into one: one embedding call and one index search for the requests that arrive together.

``xmodal serve`` answers each request in its own thread; a model forward and an index search cost much the same
for one query as for dozens (a batch is one matrix product), so a :class:`SearchBatcher` collects the requests that
arrive within ``window`` seconds of the first (at most ``max_batch``), groups them by query modality and filter,
embeds each group with one ``model.encode`` and searches it with one index call at the group's largest ``k``
(each request then keeps its own first ``k`` hits: the same hits an exact index gives for that ``k``; a filter
matching few rows is scored by numpy's matrix product, whose last bit can differ with the batch size). If a group's
batch fails (one unreadable upload), its requests are answered one by one, so only the bad one gets the error.

Each query modality has its own lane (a queue and a worker thread, started at its first request): a text batch never
waits behind an image batch's forward (an upload's EfficientNet forward costs as much as a text batch), and the two
towers' forwards run side by side. Within a lane the batches run one after another. A lane's forwards use
``threads`` intra-op threads (default 1: ``torch.set_num_threads`` in the lane's thread): the small batches of a
server under load gain little from a second thread and lose much when the cores are shared (measured in
docs/benchmarks.md). PyTorch keeps the count per thread once a thread has run an op; a thread that has run none yet
starts with the count set last.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class _Request:
    value: Any
    modality: str
    k: int
    filter: dict | None
    future: Future = field(default_factory=Future)


class _Lane:
    """One modality's queue and the worker thread that answers it in batches."""

    def __init__(self, batcher: "SearchBatcher", modality: str):
        self.batcher = batcher
        self.queue: queue.Queue[_Request | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name=f"xmodal-batcher-{modality}", daemon=True)
        self.thread.start()

    def _collect(self, first: _Request) -> list[_Request]:
        batch, deadline = [first], time.monotonic() + self.batcher.window
        while len(batch) < self.batcher.max_batch:
            left = deadline - time.monotonic()
            try:
                item = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self.queue.put(None)  # close() once the batch in hand is answered
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        if self.batcher.threads is not None:
            import torch
            torch.set_num_threads(self.batcher.threads)
        while True:
            first = self.queue.get()
            if first is None:
                return
            groups: dict[str, list[_Request]] = {}
            for r in self._collect(first):
                groups.setdefault(json.dumps(r.filter, sort_keys=True, default=str), []).append(r)
            for group in groups.values():
                self.batcher._answer([r for r in group if r.future.set_running_or_notify_cancel()])


class SearchBatcher:
    """``submit(value, modality, k, filter) -> Future[list[Hit]]``, answered in batches by one worker thread per
    query modality. ``threads``: intra-op threads of each worker's forwards (None: PyTorch's setting as it is)."""

    def __init__(self, retriever, window: float = 0.002, max_batch: int = 32, threads: int | None = 1):
        self.retriever, self.window, self.max_batch = retriever, float(window), int(max_batch)
        self.threads = threads
        self._lanes: dict[str, _Lane] = {}
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, value: Any, modality: str, k: int, filter: dict | None) -> Future:
        request = _Request(value, modality, k, filter)
        with self._lock:  # a lane is started once, and never after close()
            if self._closed:
                raise RuntimeError("the SearchBatcher is closed")
            lane = self._lanes.get(modality)
            if lane is None:
                lane = self._lanes[modality] = _Lane(self, modality)
            lane.queue.put(request)
        return request.future

    def close(self) -> None:
        """The searches already submitted are answered; then each lane's thread ends."""
        with self._lock:
            self._closed = True
            for lane in self._lanes.values():
                lane.queue.put(None)

    def _answer(self, group: list[_Request]) -> None:
        if len(group) > 1:
            try:
                results = self.retriever.search([r.value for r in group], group[0].modality,
                                                k=max(r.k for r in group), filter=group[0].filter)
            except Exception as e:  # noqa: BLE001 - answered one by one below, each with its own error
                log.debug("batch of %d %s queries failed (%s); answering them one by one", len(group),
                          group[0].modality, e)
            else:
                for r, hits in zip(group, results):
                    r.future.set_result(hits[:r.k])
                return
        for r in group:
            try:
                r.future.set_result(self.retriever.search(r.value, r.modality, k=r.k, filter=r.filter))
            except BaseException as e:  # noqa: BLE001 - the request's own error, raised where it waits
                r.future.set_exception(e)
