"""An index's row metadata as columns: one Arrow IPC file on disk, memory-mapped when loaded.

Until format version 2 an index kept one Python dict per row (``metadata.jsonl`` parsed into ``{id: dict}``):
≈ 0.5–1 KB of Python objects per manifest row and a load time that grows with the row count. Here the rows are
columns (``index_id`` first, then one column per metadata key), written as a single uncompressed Arrow record batch
(``metadata.arrow``) and opened with ``pyarrow.memory_map``: opening reads the schema and footer only, a row's
values are read from the page cache when a hit needs them, and a dict filter is evaluated on the columns by
``pyarrow.compute`` (why Arrow and not SQLite: docs/benchmarks.md, "Index metadata").

Each metadata key gets one column typed by its values: ``string``, ``int`` (int64), ``float``, ``bool``, or ``json``
(the value's JSON text) when the values mix types, are nested, are ``None`` or are integers beyond int64. A row
without the key holds a null. Decoding a row gives back exactly what a JSON round trip of its dict gives (what
``metadata.jsonl`` gave), keys in column order.

:class:`MetadataStore` is a read-only ``Mapping[int, dict]`` (``store[id]`` → a fresh dict) over the mapped rows
plus the changes since it was opened: rows added (kept as dicts until the next save) and rows removed (a mask).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .filters import _predicate, _value_matches

FORMAT = "xmodal-index-metadata"
TYPES = {"string": pa.large_string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
         "json": pa.large_string()}
_SCAN_ROWS = 65536  # rows decoded at a time when a callable filter or a full pass needs dicts


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


def _flatten(want: Any) -> list:
    """The values a filter value stands for (a list means any of its items, nested lists too)."""
    if isinstance(want, (list, tuple, set, frozenset)):
        return [x for w in want for x in _flatten(w)]
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


class MetadataStore(Mapping):
    """``{index id: metadata dict}`` kept as Arrow columns (memory-mapped once saved) plus the rows added since."""

    def __init__(self, table: pa.Table | None = None, kinds: Sequence[str] = ()):
        if table is None:
            table = pa.table({"index_id": pa.array([], pa.int64())})
        if table.num_rows == 0:  # one (empty) chunk per column, whatever the file held
            table = pa.Table.from_arrays([pa.array([], f.type) for f in table.schema], schema=table.schema)
        elif any(c.num_chunks != 1 for c in table.columns):
            table = table.combine_chunks()
        self._table = table  # column 0: index_id (ascending), then one column per key
        self._keys = [f.name for f in table.schema][1:]
        self._kinds = list(kinds)
        self._base_ids = table.column(0).chunk(0).to_numpy(zero_copy_only=False)  # a view of the mapped file
        self._live: np.ndarray | None = None  # bool per base row once one is removed
        self._n_base = len(self._base_ids)
        self._n_live = self._n_base  # live base rows
        self._extra: dict[int, dict] = {}  # rows added since opening, in id order
        self._key_cache: list[str] | None = None
        self._readers: list[_ColumnReader] | None = None  # made on the first read

    # --------------------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, path, what: str) -> "MetadataStore":
        """The store in the Arrow file ``path``, memory-mapped. ``what`` names the file in errors (ValueError)."""
        try:
            source = pa.memory_map(str(path), "r")
            table = pa.ipc.open_file(source).read_all()
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{what} is not a readable Arrow file ({str(e).strip().splitlines()[-1]})") from None
        meta = table.schema.metadata or {}
        try:
            desc = json.loads(meta[b"xmodal"].decode())
            kinds = list(desc["kinds"])
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{what}: no xmodal column description in its schema ({e})") from None
        if desc.get("format") != FORMAT or len(kinds) != table.num_columns - 1 or \
                table.schema.field(0).type != pa.int64() or any(k not in TYPES for k in kinds):
            raise ValueError(f"{what}: its columns do not match their description")
        for kind, field in zip(kinds, list(table.schema)[1:]):
            if field.type != TYPES[kind]:
                raise ValueError(f"{what}: column {field.name!r} is {field.type}, its description says {kind}")
        return cls(table, kinds)  # ids ascending as written: index.json's checksum vouches for the bytes

    @classmethod
    def from_dicts(cls, meta: Mapping[int, dict]) -> "MetadataStore":
        """A store holding ``{id: dict}`` as added rows (what an index in the old ``metadata.jsonl`` format loads
        into, and a new index starts from)."""
        store = cls()
        store._extra = dict(sorted(meta.items()))
        return store

    # -------------------------------------------------------------------------------------------- Mapping
    def __len__(self) -> int:
        return self._n_live + len(self._extra)

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids().tolist())

    def _position(self, id: int) -> int:
        """The base row holding ``id`` (live), or -1."""
        pos = int(np.searchsorted(self._base_ids, id))
        if pos < self._n_base and self._base_ids[pos] == id and (self._live is None or self._live[pos]):
            return pos
        return -1

    def __contains__(self, id: object) -> bool:
        try:
            i = int(id)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return False
        return i in self._extra or self._position(i) >= 0

    def __getitem__(self, id: int) -> dict:
        i = int(id)
        if i in self._extra:
            return self._extra[i]
        pos = self._position(i)
        if pos < 0:
            raise KeyError(i)
        return self._decode(np.array([pos]))[0]

    def values(self):  # one pass in blocks instead of a lookup per id
        return [m for _, m in self.items()]

    def items(self):
        return list(self._scan())

    def _scan(self) -> Iterator[tuple[int, dict]]:
        live = np.flatnonzero(self._live) if self._live is not None else None
        for start in range(0, self._n_base if live is None else len(live), _SCAN_ROWS):
            pos = (np.arange(start, min(start + _SCAN_ROWS, self._n_base)) if live is None
                   else live[start:start + _SCAN_ROWS])
            yield from zip(self._base_ids[pos].tolist(), self._decode(pos))
        yield from self._extra.items()

    # ----------------------------------------------------------------------------------------------- reads
    def ids(self) -> np.ndarray:
        """The live ids, ascending (int64)."""
        base = self._base_ids if self._live is None else self._base_ids[self._live]
        extra = np.fromiter(self._extra, dtype=np.int64, count=len(self._extra))
        return np.concatenate([base, extra]) if len(extra) else np.array(base, dtype=np.int64)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """A bool per id: is it a live row."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._base_ids, ids), max(self._n_base - 1, 0))
        found = (self._base_ids[pos] == ids) if self._n_base else np.zeros(len(ids), bool)
        if self._live is not None:
            found &= self._live[pos]
        if self._extra:
            found |= np.fromiter((i in self._extra for i in ids.tolist()), bool, len(ids))
        return found

    def rows(self, ids: Sequence[int] | np.ndarray) -> list[dict]:
        """Fresh metadata dicts of the live ``ids`` (KeyError for another), one table read for all."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out: list[dict | None] = [None] * len(ids)
        in_base = []
        for j, i in enumerate(ids.tolist()):
            if i in self._extra:
                out[j] = dict(self._extra[i])
            else:
                in_base.append(j)
        if in_base:
            want = ids[in_base]
            pos = np.searchsorted(self._base_ids, want)
            ok = (pos < self._n_base)
            ok[ok] &= self._base_ids[pos[ok]] == want[ok]
            if self._live is not None:
                ok[ok] &= self._live[pos[ok]]
            if not ok.all():
                raise KeyError(int(want[~ok][0]))
            for j, m in zip(in_base, self._decode(pos)):
                out[j] = m
        return out  # type: ignore[return-value]

    def _decode(self, positions: np.ndarray) -> list[dict]:
        n = len(positions)
        if not self._keys:
            return [{} for _ in range(n)]
        if self._readers is None:
            self._readers = [_ColumnReader(self._table.column(j).chunk(0), kind)
                             for j, kind in enumerate(self._kinds, 1)]
        positions = np.asarray(positions, dtype=np.int64)
        cols = [(key, kind == "json", reader.values(positions))
                for key, kind, reader in zip(self._keys, self._kinds, self._readers)]
        out = []
        for r in range(n):
            d = {}
            for key, is_json, values in cols:
                v = values[r]
                if v is not None:
                    d[key] = json.loads(v) if is_json else v
            out.append(d)
        return out

    def keys_present(self) -> list[str]:
        """Every key some live row has, sorted."""
        if self._key_cache is None:
            keys = set()
            for j, key in enumerate(self._keys, 1):
                valid = self._table.column(j).chunk(0).is_valid().to_numpy(zero_copy_only=False)
                if (valid if self._live is None else valid & self._live).any():
                    keys.add(key)
            for m in self._extra.values():
                keys.update(m)
            self._key_cache = sorted(keys)
        return self._key_cache

    def column(self, key: str) -> list:
        """``key``'s value in every live row, id order (None where a row lacks it)."""
        out: list = []
        if key in self._keys:
            j = self._keys.index(key)
            arr = self._table.column(j + 1).chunk(0)
            if self._live is not None:
                arr = arr.filter(pa.array(self._live))
            values = arr.to_pylist()
            out = [None if v is None else json.loads(v) for v in values] if self._kinds[j] == "json" else values
        else:
            out = [None] * self._n_live
        return out + [m.get(key) for m in self._extra.values()]

    # --------------------------------------------------------------------------------------------- filters
    def select(self, filter: Mapping[str, Any] | Callable[[dict], bool]) -> np.ndarray:
        """The live ids (ascending) whose metadata passes ``filter`` (see :mod:`~xmodal.retrieval.filters`): a dict
        filter is evaluated on the columns, a callable on each row's dict."""
        pred = _predicate(filter)
        if pred is None:
            return self.ids()
        if isinstance(filter, Mapping):
            mask = np.ones(self._n_base, bool) if self._live is None else self._live.copy()
            for key, want in filter.items():
                if not mask.any():
                    break
                mask &= self._matches(key, want)
            base = self._base_ids[mask]
        else:
            base = np.fromiter((i for i, m in self._scan_base() if pred(m)), dtype=np.int64)
        extra = [i for i, m in self._extra.items() if pred(m)]
        return np.concatenate([base, np.asarray(extra, np.int64)]) if extra else np.asarray(base, np.int64)

    def _scan_base(self) -> Iterator[tuple[int, dict]]:
        extra, self._extra = self._extra, {}
        try:
            yield from self._scan()
        finally:
            self._extra = extra

    def _matches(self, key: str, want: Any) -> np.ndarray:
        """A bool per base row: does ``_value_matches(row.get(key), want)`` hold (computed on the column)."""
        wants = _flatten(want)
        match_missing = any(w is None for w in wants)
        if key not in self._keys:
            return np.full(self._n_base, match_missing)
        j = self._keys.index(key)
        arr, kind = self._table.column(j + 1).chunk(0), self._kinds[j]
        wants = [w for w in wants if w is not None]
        if kind == "string":  # a str equals w, or w's string form: either way, the row's value is str(w)
            hit = pc.is_in(arr, value_set=pa.array([str(w) for w in wants], pa.large_string()))
        elif kind == "int":
            hit = pc.is_in(arr, value_set=pa.array(sorted(_ints_equal_to(wants)), pa.int64()))
        else:  # bool, float, json: Python's own comparison on each distinct value
            raw = pc.unique(arr).drop_null().to_pylist()
            decoded = [json.loads(v) for v in raw] if kind == "json" else raw
            keep = [r for r, v in zip(raw, decoded) if _value_matches(v, want)]
            hit = pc.is_in(arr, value_set=pa.array(keep, TYPES[kind]))
        out = hit.to_numpy(zero_copy_only=False)  # a null row is False here: it lacks the key
        if match_missing and arr.null_count:
            out |= ~arr.is_valid().to_numpy(zero_copy_only=False)
        return out

    # ------------------------------------------------------------------------------------------- changes
    def add(self, ids: Sequence[int], records: Sequence[dict]) -> None:
        self._extra.update(zip((int(i) for i in ids), records))
        self._key_cache = None

    def remove(self, ids: Sequence[int]) -> None:
        for i in ids:
            i = int(i)
            if self._extra.pop(i, None) is None:
                pos = self._position(i)
                if pos >= 0:
                    if self._live is None:
                        self._live = np.ones(self._n_base, bool)
                    self._live[pos] = False
                    self._n_live -= 1
        self._key_cache = None

    # ---------------------------------------------------------------------------------------------- saving
    def table(self) -> pa.Table:
        """Every live row as one table (what :meth:`write` saves)."""
        base = self._table if self._live is None else self._table.filter(pa.array(self._live))
        kinds = dict(zip(self._keys, self._kinds))
        if self._extra:
            added = columns_of(list(self._extra.values()))
            n_base, n_add = base.num_rows, len(self._extra)
            cols = {k: base.column(j + 1).combine_chunks() for j, k in enumerate(self._keys)}
            new_cols, new_kinds = {}, {}
            for key in list(cols) + [k for k, _, _ in added if k not in cols]:
                a_kind, a_arr = next(((kd, ar) for k, kd, ar in added if k == key), (None, None))
                b_kind, b_arr = kinds.get(key), cols.get(key)
                kind = b_kind if a_kind is None or a_kind == b_kind else a_kind if b_kind is None else "json"
                b_arr = pa.nulls(n_base, TYPES[kind]) if b_arr is None else _as_kind(b_arr, b_kind, kind)
                a_arr = pa.nulls(n_add, TYPES[kind]) if a_arr is None else _as_kind(a_arr, a_kind, kind)
                new_cols[key], new_kinds[key] = pa.concat_arrays([b_arr, a_arr]), kind
            ids = pa.concat_arrays([base.column(0).combine_chunks(),
                                    pa.array(list(self._extra), pa.int64())])
            arrays, names, kinds = [ids, *new_cols.values()], ["index_id", *new_cols], new_kinds
        else:
            arrays = [c.combine_chunks() for c in base.columns]
            names = ["index_id", *self._keys]
        desc = {"format": FORMAT, "version": 1, "kinds": [kinds[k] for k in names[1:]]}
        schema = pa.schema([pa.field(n, a.type) for n, a in zip(names, arrays)],
                           metadata={"xmodal": json.dumps(desc)})
        return pa.Table.from_arrays(arrays, schema=schema)

    def write(self, f) -> None:
        """Every live row into the binary file object ``f``: one record batch, uncompressed (so it maps)."""
        table = self.table()
        with pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)  # single-chunk columns: one record batch


class _ColumnReader:
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


def _ints_equal_to(wants: list) -> set[int]:
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


def _as_kind(arr: pa.Array, have: str, kind: str) -> pa.Array:
    """A column of type ``have`` as type ``kind`` (the same, or its values as JSON text)."""
    if have == kind:
        return arr
    return pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in arr.to_pylist()],
                    pa.large_string())
