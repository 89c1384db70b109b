"""Concurrent searches joined into one: one embedding call and one index search for the requests that arrive together.

``xmodal serve`` answers each request in its own thread; a model forward and an index search cost much the same
for one query as for dozens (a batch is one matrix product), so a :class:`SearchBatcher` collects the requests that
arrive within ``window`` seconds of the first (at most ``max_batch``), groups them by query modality and filter,
embeds each group with one ``model.encode`` and searches it with one index call at the group's largest ``k``
(each request then keeps its own first ``k`` hits: the same hits an exact index gives for that ``k``; a filter
matching few rows is scored by numpy's matrix product, whose last bit can differ with the batch size). If a group's
batch fails (one unreadable upload), its requests are answered one by one, so only the bad one gets the error.
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


class SearchBatcher:
    """``submit(value, modality, k, filter) -> Future[list[Hit]]``, answered by one worker thread in batches."""

    def __init__(self, retriever, window: float = 0.002, max_batch: int = 32):
        self.retriever, self.window, self.max_batch = retriever, float(window), int(max_batch)
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="xmodal-batcher", daemon=True)
        self._thread.start()

    def submit(self, value: Any, modality: str, k: int, filter: dict | None) -> Future:
        request = _Request(value, modality, k, filter)
        self._queue.put(request)
        return request.future

    def close(self) -> None:
        self._queue.put(None)

    def _collect(self, first: _Request) -> list[_Request] | None:
        batch, deadline = [first], time.monotonic() + self.window
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # close() once the batch in hand is answered
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            groups: dict[tuple, list[_Request]] = {}
            for r in self._collect(first):
                groups.setdefault((r.modality, json.dumps(r.filter, sort_keys=True, default=str)), []).append(r)
            for group in groups.values():
                self._answer([r for r in group if r.future.set_running_or_notify_cancel()])

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
