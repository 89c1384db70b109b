"""The float vectors of a compressed index's rows, kept on disk for re-ranking: ``vectors.npy``, memory-mapped.

An ``ivfpq`` index with ``rescore=R`` keeps only its PQ codes in RAM and re-ranks the ``R·k`` best candidates of
each query by their exact inner product with the float vectors. Those live in ``vectors.npy`` (float32 ``[rows,
dim]``, the live rows in id order: row ``i`` of the file is row ``i`` of ``metadata.arrow``), opened with
``numpy.load(mmap_mode="r")``: a query reads the ``R·k`` rows it re-ranks through the page cache, and nothing else
of the file is resident unless the kernel keeps it cached. Rows added since loading stay in RAM until the next
save; removed rows are dropped by the metadata store's live mask (the file keeps its rows until then).
"""
from __future__ import annotations

import numpy as np

from .metadata_store import MetadataStore

VECTORS_NAME = "vectors.npy"
_WRITE_ROWS = 65536  # rows copied at a time when saving


class FloatRows:
    """Float vectors by row id: a memory-mapped base (aligned with a :class:`MetadataStore`'s base rows) plus the
    rows added since it was opened."""

    def __init__(self, dim: int, base: np.ndarray | None = None):
        self.dim = dim
        self._base = base if base is not None else np.empty((0, dim), np.float32)
        self._blocks: list[tuple[np.ndarray, np.ndarray]] = []  # (ids ascending, vectors) of each add since
        self._gone: set[int] = set()  # added since, then removed
        self._joined: tuple[np.ndarray, np.ndarray] | None = None

    def _added(self) -> tuple[np.ndarray, np.ndarray]:
        """Every row added since opening: (ids ascending, vectors), removed ones included."""
        if self._joined is None:
            ids = np.concatenate([i for i, _ in self._blocks]) if self._blocks else np.empty(0, np.int64)
            x = np.concatenate([v for _, v in self._blocks]) if self._blocks else np.empty((0, self.dim), np.float32)
            self._blocks, self._joined = ([(ids, x)] if len(ids) else []), (ids, x)
        return self._joined

    @classmethod
    def open(cls, path, dim: int, rows: int, what: str) -> "FloatRows":
        """``vectors.npy`` memory-mapped, checked to hold ``rows`` float32 rows of ``dim`` (ValueError naming
        ``what`` otherwise)."""
        try:
            base = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{what} is not a readable .npy file ({e})") from None
        if base.dtype != np.float32 or base.ndim != 2 or base.shape != (rows, dim):
            raise ValueError(f"{what} holds {base.dtype} {base.shape}, expected float32 ({rows}, {dim})")
        return cls(dim, base.view(np.ndarray))  # still the mapped file; plain indexing, no memmap wrapper

    def add(self, ids, x: np.ndarray) -> None:
        self._blocks.append((np.asarray(ids, np.int64), np.array(x, dtype=np.float32)))
        self._joined = None

    def remove(self, ids) -> None:
        self._gone.update(int(i) for i in ids)

    def get(self, meta: MetadataStore, ids: np.ndarray) -> np.ndarray:
        """The vectors of the live rows ``ids`` ``[n, dim]`` (reads only those rows of the file)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if meta.ids_are_rows and not self._blocks:  # ids are rows of the file (the caller passes live ids)
            return self._base[ids]
        out = np.empty((len(ids), self.dim), np.float32)
        pos = meta.base_positions(ids)
        in_base = pos >= 0
        if in_base.all() and (len(pos) < 2 or (pos[1:] > pos[:-1]).all()):  # ascending: read straight in
            return self._base[pos]
        if in_base.any():
            order = np.argsort(pos[in_base], kind="stable")  # ascending offsets: sequential-ish reads
            rows = np.flatnonzero(in_base)[order]
            out[rows] = self._base[pos[in_base][order]]
        if not in_base.all():
            added, x = self._added()
            rest = np.flatnonzero(~in_base)
            out[rest] = x[np.searchsorted(added, ids[rest])]  # ids the caller knows to be live
        return out

    def write(self, f, meta: MetadataStore) -> None:
        """Every live row, in id order (the metadata file's order), as a float32 ``.npy`` into the binary file
        ``f``, a block at a time."""
        live = meta.base_live_positions()
        added, x = self._added()
        if self._gone:
            x = x[~np.isin(added, np.fromiter(self._gone, np.int64, len(self._gone)))]
        n = (len(self._base) if live is None else len(live)) + len(x)
        np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                 "fortran_order": False, "shape": (n, self.dim)})
        total = len(self._base) if live is None else len(live)
        for s in range(0, total, _WRITE_ROWS):
            block = self._base[s:s + _WRITE_ROWS] if live is None else self._base[live[s:s + _WRITE_ROWS]]
            f.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
        for s in range(0, len(x), _WRITE_ROWS):
            f.write(np.ascontiguousarray(x[s:s + _WRITE_ROWS]).tobytes())
