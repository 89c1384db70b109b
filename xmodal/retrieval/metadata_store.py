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
from .metadata_columns import TYPES, ColumnReader, as_kind, columns_of, flatten, ints_equal_to

FORMAT = "xmodal-index-metadata"
_SCAN_ROWS = 65536  # rows decoded at a time when a callable filter or a full pass needs dicts


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
        # ids 0..n-1 without a gap (an index saved before any removal): an id is its row, no search needed
        self._dense = not self._n_base or (self._base_ids[0] == 0 and self._base_ids[-1] == self._n_base - 1)
        self._extra: dict[int, dict] = {}  # rows added since opening, in id order
        self._key_cache: list[str] | None = None
        self._readers: list[ColumnReader] | None = None  # made on the first read

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
        pos = self._search(ids)
        found = (self._base_ids[pos] == ids) if self._n_base else np.zeros(len(ids), bool)
        if self._live is not None:
            found &= self._live[pos]
        if self._extra:
            found |= np.fromiter((i in self._extra for i in ids.tolist()), bool, len(ids))
        return found

    def _search(self, ids: np.ndarray) -> np.ndarray:
        """Where each id is or would be among the base rows, clipped to a valid row (check ``_base_ids[pos]``)."""
        top = max(self._n_base - 1, 0)
        if self._dense:
            return np.clip(ids, 0, top)
        return np.minimum(np.searchsorted(self._base_ids, ids), top)

    @property
    def ids_are_rows(self) -> bool:
        """True when every id is its row of the file and every row is live (a saved index nothing was removed from
        or added to since): a lookup needs no search."""
        return self._dense and self._live is None and not self._extra

    def base_positions(self, ids: np.ndarray) -> np.ndarray:
        """Each id's row in the opened file (-1 for a row added since, or not live)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not self._n_base:
            return np.full(len(ids), -1, np.int64)
        pos = self._search(ids)
        ok = self._base_ids[pos] == ids
        if self._live is not None:
            ok &= self._live[pos]
        return np.where(ok, pos, -1)

    def base_live_positions(self) -> np.ndarray | None:
        """The live rows of the opened file, ascending; None when every row is live."""
        return None if self._live is None else np.flatnonzero(self._live)

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

    def pending_rows(self, ids: Sequence[int]) -> tuple[list[bool], "PendingRows"]:
        """Which ``ids`` are live rows (a bool each) and their metadata, to be read when first asked for: the file's
        rows are located now (their positions never change: the mapped file is read-only), the rows added since
        opening are referenced now (a removal drops the reference from the store, never changes the dict), and
        both are read together on the first :meth:`PendingRows.get`.

        Plain Python over the few ids of a search result (a numpy call costs more than the loop at k ≈ 10)."""
        n, live, extra, base_ids = self._n_base, self._live, self._extra, self._base_ids
        if self.ids_are_rows:  # a saved index nothing was added to or removed from since: the usual case
            ok = [0 <= i < n for i in ids]
            return ok, PendingRows(self, [i for i in ids if 0 <= i < n], None)
        if not n:  # an index built in memory: every row is a dict
            got = [extra.get(i) for i in ids]
            return [m is not None for m in got], PendingRows(self, [], [m for m in got if m is not None])
        if self._dense:
            pos = [i if 0 <= i < n else -1 for i in ids]
        else:
            at = np.searchsorted(base_ids, ids).tolist() if ids else []
            pos = [p if p < n and base_ids[p] == i else -1 for p, i in zip(at, ids)]
        if live is not None:
            pos = [p if p >= 0 and live[p] else -1 for p in pos]
        refs = [None if p >= 0 else extra.get(i) for p, i in zip(pos, ids)]
        ok = [p >= 0 or m is not None for p, m in zip(pos, refs)]
        return ok, PendingRows(self, [p for p in pos if p >= 0], [m for p, m, o in zip(pos, refs, ok) if o])

    def _decode(self, positions: np.ndarray) -> list[dict]:
        n = len(positions)
        if not self._keys:
            return [{} for _ in range(n)]
        if self._readers is None:
            self._readers = [ColumnReader(self._table.column(j).chunk(0), kind)
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
        wants = flatten(want)
        match_missing = any(w is None for w in wants)
        if key not in self._keys:
            return np.full(self._n_base, match_missing)
        j = self._keys.index(key)
        arr, kind = self._table.column(j + 1).chunk(0), self._kinds[j]
        wants = [w for w in wants if w is not None]
        if kind == "string":  # a str equals w, or w's string form: either way, the row's value is str(w)
            hit = pc.is_in(arr, value_set=pa.array([str(w) for w in wants], pa.large_string()))
        elif kind == "int":
            hit = pc.is_in(arr, value_set=pa.array(sorted(ints_equal_to(wants)), pa.int64()))
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
                b_arr = pa.nulls(n_base, TYPES[kind]) if b_arr is None else as_kind(b_arr, b_kind, kind)
                a_arr = pa.nulls(n_add, TYPES[kind]) if a_arr is None else as_kind(a_arr, a_kind, kind)
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


class PendingRows:
    """The metadata of the live hits of one search, in hit order: the file's rows decoded in one read and the added
    rows' dicts copied, on the first :meth:`get` (a search whose caller wants ids and scores only reads nothing)."""

    __slots__ = ("_store", "_pos", "_refs", "_rows")

    def __init__(self, store: MetadataStore, pos: list[int], refs: list[dict | None] | None):
        # refs: per live hit, the added row's dict or None for a row of the file (None: every hit is in the file)
        self._store, self._pos, self._refs, self._rows = store, pos, refs, None

    def get(self, j: int) -> dict:
        """The ``j``-th live hit's metadata (a fresh dict, the same one on every call)."""
        if self._rows is None:
            base = self._store._decode(np.asarray(self._pos, np.int64)) if self._pos else []
            if self._refs is None:
                self._rows = base
            else:
                it = iter(base)
                self._rows = [next(it) if m is None else dict(m) for m in self._refs]
        return self._rows[j]
