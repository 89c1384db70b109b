"""Pick an index's search setting for a target recall, measured on held-out queries (``xmodal index --tune``).

Recall@k is measured against exact search over the float vectors the index was built from: for each query, the
fraction of its true top ``k`` that the index returns in its top ``k``. The knob of each kind
(:data:`~xmodal.retrieval.kinds.KNOB`: HNSW ``ef_search``, IVF / IVF-PQ ``nprobe``, binary ``rescore``) is swept
upwards on a ~√2 grid and the smallest value reaching the target is kept — the fastest setting that does, since
search time grows with each knob. A kind without a knob (flat, int8) is only measured. What was measured is kept in
``index.tuning`` (saved in ``index.json``).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from . import RetrievalError
from .kinds import KNOB

log = logging.getLogger(__name__)


def grid(upto: int, start: int = 1) -> list[int]:
    """``start``, then steps of about √2 (1, 2, 3, 4, 6, 8, 12, 16, 24, ...) up to ``upto`` (included)."""
    vals, v = [], 1
    while v < upto:
        if v >= start:
            vals.append(v)
        v = v + 1 if v < 2 else (v * 3 // 2 if (v & (v - 1)) == 0 else v * 4 // 3)
    return vals + [upto]


def exact_top(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The ids of each query's exact top ``k`` by inner product: a blocked matrix product + top-k (the score
    matrix never exceeds 2^24 floats, so a million rows cost no more memory than a thousand)."""
    from .exact import _candidates

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, pos = _candidates(queries, vectors, int(min(k, len(vectors))))
    return np.asarray(ids)[pos]


def recall_at(found: list[list[int]], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t.tolist())) / len(t) for f, t in zip(found, truth)]))


def _values(index) -> list[int]:
    knob = KNOB[index.kind]
    if knob == "nprobe":
        return grid(int(index.options["nlist"]))
    if knob == "ef_search":
        return grid(max(16384, 2 * len(index)), start=16)
    return grid(max(1, min(len(index) // 10, 1000)))  # rescore: up to every row (or 10,000 rows) a candidate


def tune(index, vectors: Any, queries: Any, target: float, k: int = 10, ids: Any = None) -> dict:
    """Set ``index``'s search knob to the smallest value whose recall@``k`` on ``queries`` reaches ``target``.

    ``vectors`` are the float vectors the index holds (rows in the order of ``ids``, default the index's live ids
    ascending); ``queries`` are held out (not rows of the index). Returns and stores in ``index.tuning``:
    ``{"target", "k", "queries", "knob", "value", "recall", "curve": [[value, recall], ...]}``; when no value
    reaches the target the largest is kept and a warning says so.
    """
    if not 0 < target <= 1:
        raise RetrievalError(f"the target recall must be in (0, 1], got {target}")
    vectors = np.asarray(vectors, np.float32)
    queries = np.ascontiguousarray(np.asarray(queries, np.float32))
    ids = index.ids() if ids is None else np.asarray(ids, np.int64)
    if len(vectors) != len(ids) or not len(queries):
        raise RetrievalError(f"tune: {len(vectors)} vectors for {len(ids)} rows, {len(queries)} queries")
    k = int(min(k, len(ids)))
    truth = exact_top(vectors, ids, queries, k)
    knob = KNOB.get(index.kind)
    curve: list[list[float]] = []
    value = None
    for v in (_values(index) if knob else [None]):
        found = index.search(queries, k, **({knob: v} if knob else {}))
        r = recall_at([[h.id for h in row] for row in found], truth)
        curve.append([v, round(r, 4)])
        value = v
        if r >= target:
            break
    reached = curve[-1][1] >= target
    if knob:
        index.options[knob] = int(value)
        if knob == "nprobe":
            index._index.nprobe = int(value)
    if not reached:
        log.warning("tune: recall@%d %.3f at %s=%s, below the target %.3f; kept the largest setting", k,
                    curve[-1][1], knob, value, target)
    index.tuning = {"target": target, "k": k, "queries": int(len(queries)), "knob": knob, "value": value,
                    "recall": curve[-1][1], "reached": reached, "curve": curve}
    return index.tuning
