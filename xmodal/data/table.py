"""The checked rows of a manifest read from a file: an Arrow table behind the part of ``datasets.Dataset``'s reading
API that xmodal's training, evaluation and indexing use.

A CSV, JSON or plain Parquet manifest holds strings only, which need none of ``datasets``' feature decoding, and
importing ``datasets`` costs every command ~0.2 s of CPU before its first step (issue #19: the whole of xmodal's
start-up gap to ``open_clip_train``). :class:`Rows` answers ``len``, row and column indexing, ``column_names``,
``select_columns``, iteration, ``to_dict`` and ``data`` (the Arrow table) the way a ``datasets.Dataset`` does, so code
that reads rows takes either. :attr:`xmodal.data.Manifest.dataset` still gives a real ``datasets.Dataset`` (made on
first use) for users who want the rest of that API.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import pyarrow as pa


class Rows:
    """Read-only rows over a ``pyarrow.Table`` (its chunks combined once, so a row is a constant-time look-up)."""

    def __init__(self, table: pa.Table):
        self._table = table.combine_chunks()
        self._columns = {name: (col.chunk(0) if col.num_chunks == 1 else col)
                         for name, col in zip(self._table.column_names, self._table.columns)}

    def __len__(self) -> int:
        return self._table.num_rows

    def __repr__(self) -> str:
        return f"Rows(num_rows={len(self)}, columns={self.column_names})"

    @property
    def column_names(self) -> list[str]:
        return self._table.column_names

    @property
    def data(self) -> pa.Table:
        """The Arrow table (``datasets.Dataset.data`` is its table too: ``.column(name)`` works on both)."""
        return self._table

    def select_columns(self, columns: str | Sequence[str]) -> "Rows":
        columns = [columns] if isinstance(columns, str) else list(columns)
        missing = [c for c in columns if c not in self._columns]
        if missing:
            raise ValueError(f"columns {missing} not in the rows (columns: {self.column_names})")
        return Rows(self._table.select(columns))

    def _row(self, i: int) -> dict[str, Any]:
        return {name: col[i].as_py() for name, col in self._columns.items()}

    def __getitem__(self, key):
        """``rows["text"]``: the column as a list; ``rows[3]``: the row as a dict; a slice or a list of row
        numbers: a dict of lists (as ``datasets.Dataset`` answers each)."""
        if isinstance(key, str):
            if key not in self._columns:
                raise KeyError(f"column {key!r} not in the rows (columns: {self.column_names})")
            return self._columns[key].to_pylist()
        n = len(self)
        if isinstance(key, slice):
            if key.step not in (None, 1):
                return self._take(range(n)[key])
            start, stop, _ = key.indices(n)
            return self._table.slice(start, max(0, stop - start)).to_pydict()
        if isinstance(key, (list, tuple, range)):
            return self._take(key)
        try:
            i = int(key)  # ints and numpy integers
        except TypeError:
            raise TypeError(f"rows are indexed by a column name, a row number, a slice or a list of row numbers, "
                            f"not {type(key).__name__}") from None
        if not -n <= i < n:
            raise IndexError(f"index {i} is out of range for {n} rows")
        return self._row(i + n if i < 0 else i)

    def _take(self, indices) -> dict[str, list]:
        n = len(self)
        idx = [int(i) + n if int(i) < 0 else int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise IndexError(f"index {bad[0]} is out of range for {n} rows")
        return self._table.take(pa.array(idx, type=pa.int64())).to_pydict()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self._table.to_batches(max_chunksize=1024):
            yield from batch.to_pylist()

    def to_dict(self) -> dict[str, list]:
        return self._table.to_pydict()
