"""One metadata column of an index (:mod:`~xmodal.retrieval.metadata_store`): its type from the values, its Arrow
array, reading values at given rows from the buffers, and which int64 values a filter value stands for."""
from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

TYPES = {"string": pa.large_string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
         "json": pa.large_string()}


def _type_of(value: Any) -> str:
    t = type(value)
    if t is str:
        return "string"
    if t is bool:
        return "bool"
    if t is int:
        return "int" if -2 ** 63 <= value < 2 ** 63 else "json"
    if t is float:
        return "float"
    return "json"


def flatten(want: Any) -> list:
    """The values a filter value stands for (a list means any of its items, nested lists too)."""
    if isinstance(want, (list, tuple, set, frozenset)):
        return [x for w in want for x in flatten(w)]
    return [want]


def _column(values: list, kind: str) -> pa.Array:
    """``values`` (None where a row lacks the key) as an Arrow array of column type ``kind``."""
    if kind == "json":
        values = [None if v is _MISSING else json.dumps(v, ensure_ascii=False) for v in values]
    else:
        values = [None if v is _MISSING else v for v in values]
    return pa.array(values, type=TYPES[kind])


_MISSING = object()


def columns_of(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, pa.Array]]:
    """``[(key, type, array)]`` for ``records``, keys in order of first appearance."""
    keys: dict[str, None] = {}
    for r in records:
        keys.update(dict.fromkeys(r))
    out = []
    for key in keys:
        values = [r.get(key, _MISSING) for r in records]
        kinds = {_type_of(v) for v in values if v is not _MISSING}
        kind = kinds.pop() if len(kinds) == 1 else "json"
        out.append((key, kind, _column(values, kind)))
    return out


class ColumnReader:
    """Values of one Arrow column at given rows, read from its buffers (no Arrow call per read: a hit's metadata
    costs about a microsecond per value). A few rows are read by plain memoryview indexing, many through numpy."""

    SMALL = 64  # rows up to which per-row indexing beats numpy's per-call cost

    def __init__(self, arr: pa.Array, kind: str):
        bufs, self.offset, self.kind = arr.buffers(), arr.offset, kind
        self.valid = None if arr.null_count == 0 or bufs[0] is None else memoryview(bufs[0])
        self.data = memoryview(bufs[-1] if bufs[-1] is not None else b"")  # strings' bytes, numbers, bits
        if kind in ("string", "json"):
            self.offsets = memoryview(bufs[1]).cast("q")
        elif kind in ("int", "float"):
            self.data = self.data.cast("q" if kind == "int" else "d")

    def values(self, rows: np.ndarray) -> list:
        if len(rows) > self.SMALL:
            return self._many(rows + self.offset)
        ps, data, kind = (rows + self.offset).tolist(), self.data, self.kind
        if kind in ("string", "json"):
            off = self.offsets
            out = [str(data[off[p]:off[p + 1]], "utf-8") for p in ps]
        elif kind == "bool":
            out = [bool((data[p >> 3] >> (p & 7)) & 1) for p in ps]
        else:
            out = [data[p] for p in ps]
        valid = self.valid
        if valid is not None:
            out = [v if (valid[p >> 3] >> (p & 7)) & 1 else None for v, p in zip(out, ps)]
        return out

    @staticmethod
    def _bits(buf: memoryview, at: np.ndarray) -> np.ndarray:
        bits = np.frombuffer(buf, np.uint8)
        return ((bits[at >> 3] >> (at & 7).astype(np.uint8)) & 1).astype(bool)

    def _many(self, at: np.ndarray) -> list:
        if self.kind in ("string", "json"):
            offsets = np.frombuffer(self.offsets, np.int64)
            data = self.data
            out = [str(data[a:b], "utf-8") for a, b in zip(offsets[at].tolist(), offsets[at + 1].tolist())]
        elif self.kind == "bool":
            out = self._bits(self.data, at).tolist()
        else:
            out = np.frombuffer(self.data, np.int64 if self.kind == "int" else np.float64)[at].tolist()
        if self.valid is not None:
            out = [v if ok else None for v, ok in zip(out, self._bits(self.valid, at).tolist())]
        return out


def ints_equal_to(wants: list) -> set[int]:
    """The int64 values ``v`` for which ``v == w or str(v) == str(w)`` for some ``w`` in ``wants``."""
    out = set()
    for w in wants:
        if isinstance(w, (bool, int)):
            out.add(int(w))
        elif isinstance(w, float) and w == w and abs(w) != float("inf") and w == int(w):
            out.add(int(w))
        elif isinstance(w, str):
            try:
                v = int(w)
            except ValueError:
                continue
            if str(v) == w:
                out.add(v)
        else:
            s = str(w)  # another type: only its string form can equal an int's
            try:
                if str(int(s)) == s:
                    out.add(int(s))
            except ValueError:
                pass
    return {v for v in out if -2 ** 63 <= v < 2 ** 63}


def as_kind(arr: pa.Array, have: str, kind: str) -> pa.Array:
    """A column of type ``have`` as type ``kind`` (the same, or its values as JSON text)."""
    if have == kind:
        return arr
    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in arr.to_pylist()],
                    pa.large_string())
