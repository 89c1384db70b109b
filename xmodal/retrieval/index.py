"""A faiss index of shared-space embeddings with one metadata record per row: add, remove, rebuild, search.

* :class:`EmbeddingIndex` — exact inner product (``kind="flat"``: ``IndexIDMap2(IndexFlatIP)``, the default),
  ``kind="hnsw"`` (``IndexHNSWFlat``, inner-product metric), ``kind="ivf"`` (``IndexIVFFlat``, trained on the first
  vectors added) or a compressed kind, ``"int8"``, ``"binary"``, ``"ivfpq"`` (:mod:`~xmodal.retrieval.kinds`). Embeddings are L2-normalised, so inner product = cosine similarity. Every row gets an ``int64`` id
  from the index (``0, 1, 2, ...``, never reused, stable across add / remove / save / load) and a JSON metadata record
  (for an index built from a manifest: the row's ``id``, ``modality``, ``value`` (path or text), ``label`` and any
  other scalar columns), kept as columns (:mod:`~xmodal.retrieval.metadata_store`: memory-mapped once loaded, dict
  filters evaluated on the columns).
* :class:`Hit` — one search result.

Beside it: :mod:`~xmodal.retrieval.index_files`, the folder an index is saved as (three files, the crash-safe swap,
the checks a load makes); :mod:`~xmodal.retrieval.filters`, the metadata filters a search takes (``parse_filters`` is
importable from here too); :mod:`~xmodal.retrieval.retriever`, which builds an index from a model and a manifest and
queries it with the model.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import faiss
import numpy as np

from . import IndexCorruptError, RetrievalError, exact, kinds
from .hits import RESERVED_HIT_KEYS, Hit, LazyHit  # noqa: F401 (xmodal.retrieval.index.Hit, as before)
from .filters import Filter, _predicate, parse_filters
from .index_files import FAISS_NAME, FORMAT, INFO_NAME, VERSION, metadata_name, open_folder, read_faiss, \
    read_metadata, read_vectors, save_folder
from .float_rows import FloatRows
from .metadata_store import MetadataStore

log = logging.getLogger(__name__)

KINDS = kinds.KINDS


def __getattr__(name):  # PATH_MODALITIES, as before 0.2: now a live view of the modality registry
    if name == "PATH_MODALITIES":
        from ..modalities.registry import path_modalities
        return tuple(path_modalities())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
EXACT_SUBSET = 2048  # a filter that leaves at most this many rows is answered by exact search over those rows

# ------------------------------------------------------------------------------------------------------- helpers

def _as_matrix(x: Any, dim: int | None, what: str = "embeddings") -> np.ndarray:
    if type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 2 and x.shape[1] == dim \
            and x.flags.c_contiguous and np.isfinite(x).all():
        return x  # already what faiss takes (a sub-ms search's common case: no copies, no more checks)
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array [n, dim], got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what}: dimension {x.shape[1]} does not match the index dimension {dim}")
    if x.size and not np.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return np.ascontiguousarray(x)



# ---------------------------------------------------------------------------------------------------------- index

class EmbeddingIndex:
    """Embeddings + metadata in a faiss index; ids are assigned here and are stable across add/remove/save/load.

    Kinds and options:

    * ``"flat"`` (default): ``IndexIDMap2(IndexFlatIP)`` — exact top-k; ``remove`` deletes rows physically.
    * ``"hnsw"``: ``IndexIDMap2(IndexHNSWFlat(dim, M, METRIC_INNER_PRODUCT))`` with ``M`` (default 32),
      ``ef_construction`` (default 200) and ``ef_search`` (default 128; at least ``k`` is used). **HNSW graphs cannot
      delete nodes**: ``remove`` records the ids in a tombstone set (saved in ``index.json``) that every search
      excludes (through a faiss ``IDSelector``); the vectors stay in the graph until :meth:`rebuild`.
    * ``"ivf"``: ``IndexIVFFlat(IndexFlatIP, dim, nlist, METRIC_INNER_PRODUCT)`` with ``nlist`` (default: chosen when
      the index is trained, ``min(4·sqrt(n), n/39)``) and ``nprobe`` (default ``max(1, nlist // 8)``). The coarse
      quantizer is trained on the vectors of the **first** :meth:`add`; later adds reuse those centroids (call
      :meth:`rebuild` to retrain after the collection has grown a lot). ``remove`` deletes physically.
    * compressed: ``"int8"`` (one byte per dimension), ``"binary"`` (one bit per dimension, Hamming candidates
      re-ranked by the float query, option ``rescore``, default 10 candidates per hit) and ``"ivfpq"`` (IVF with
      product quantisation, options ``nlist``, ``nprobe``, ``m``, ``nbits``): see :mod:`~xmodal.retrieval.kinds`.
      ``int8`` and ``ivfpq`` store decoded approximations only, so they cannot :meth:`rebuild`; a binary hit's score
      is ``q · sign(x) / sqrt(dim)``.

    A flat index answers a batch of queries by a blocked matrix product where that is faster (measured), with
    exactly faiss's result: :mod:`~xmodal.retrieval.exact`.

    Filtered search (``filter={"label": "animals"}`` or a callable on the metadata) searches only the matching rows
    through a faiss ``IDSelectorBatch``; a query for which an approximate index (HNSW / IVF) then finds fewer than
    ``min(k, matching rows)`` hits is re-answered by exact search over the matching rows, and filters matching at
    most ``EXACT_SUBSET`` rows (any number on a binary index, whose codes faiss cannot filter) are always answered
    exactly over the stored vectors, so a filtered search returns ``k`` hits whenever ``k``
    rows match.
    """

    def __init__(self, dim: int, kind: str = "flat", *, M: int | None = None, ef_construction: int | None = None,
                 ef_search: int | None = None, nlist: int | None = None, nprobe: int | None = None,
                 m: int | None = None, nbits: int | None = None, rescore: int | None = None,
                 model_info: dict | None = None):
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            if kind not in KINDS:
                raise RetrievalError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.kind = kind
        self.options: dict[str, Any] = kinds.check_options(kind, self.dim, {
            "M": M, "ef_construction": ef_construction, "ef_search": ef_search, "nlist": nlist, "nprobe": nprobe,
            "m": m, "nbits": nbits, "rescore": rescore})
        self.model_info = dict(model_info) if model_info else None
        self.tuning: dict | None = None  # what `--tune` measured (index.json's "tuning"), None if never tuned
        self._meta = MetadataStore()  # {id: metadata}: Arrow columns (memory-mapped once loaded) + rows added
        self._tombstones: set[int] = set()
        self._next_id = 0
        self._param_cache: dict = {}  # faiss SearchParameters without a selector, by their settings
        self._norm_bound: float | None = 0.0  # >= every stored vector's norm (the batch path's error bound); None: unknown
        self._index = kinds.new_faiss(kind, self.dim, self.options, self.options.get("nlist") or 1)
        # ivfpq with rescore: the float vectors, on disk once saved (vectors.npy), for re-ranking and exact answers
        self._rows = FloatRows(self.dim) if kind == "ivfpq" and self.options.get("rescore") else None

    # ------------------------------------------------------------------------------------------------ contents
    def __len__(self) -> int:
        return len(self._meta)

    def __repr__(self) -> str:
        return f"EmbeddingIndex(kind={self.kind!r}, dim={self.dim}, rows={len(self)}, options={self.options})"

    @property
    def ntotal(self) -> int:
        """Vectors held by faiss (for HNSW this includes tombstoned rows)."""
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        """The live row ids, ascending."""
        return self._meta.ids()

    def metadata(self, id: int) -> dict:
        return self._meta[int(id)]

    def __contains__(self, id: int) -> bool:
        return int(id) in self._meta

    def reconstruct(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` ``[n, dim]``."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        missing = ids[~self._meta.contains(ids)].tolist()
        if missing:
            raise KeyError(f"no rows with ids {missing[:10]}")
        if not len(ids):
            return np.empty((0, self.dim), np.float32)
        if self._rows is not None:
            return self._rows.get(self._meta, ids)
        x = np.asarray(self._index.reconstruct_batch(ids), dtype=np.float32).reshape(len(ids), self.dim)
        return x / np.float32(math.sqrt(self.dim)) if self.kind == "binary" else x  # the unit sign vectors it scores

    # ------------------------------------------------------------------------------------------------- mutation
    def add(self, embeddings: Any, metadata: Sequence[Mapping[str, Any]] | None = None) -> np.ndarray:
        """Add ``[n, dim]`` embeddings (numpy or torch) with one JSON-serialisable metadata dict each; return the
        new rows' ids (``int64 [n]``)."""
        x = _as_matrix(embeddings, self.dim)
        n = len(x)
        if metadata is None:
            metadata = [{} for _ in range(n)]
        if len(metadata) != n:
            raise ValueError(f"add: {n} embeddings but {len(metadata)} metadata records")
        metas = []
        for i, m in enumerate(metadata):
            if not isinstance(m, Mapping):
                raise TypeError(f"add: metadata[{i}] must be a dict, got {type(m).__name__}")
            m = dict(m)
            try:
                json.dumps(m)
            except (TypeError, ValueError) as e:
                raise TypeError(f"add: metadata[{i}] is not JSON-serialisable: {e}") from None
            metas.append(m)
        if n == 0:
            return np.empty(0, np.int64)
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        if self.kind in kinds.TRAINED and not self._index.is_trained:
            self._index = kinds.train(self.kind, self.dim, self.options, x)
        self._index.add_with_ids(x, ids)
        if self._norm_bound is not None:
            self._norm_bound = max(self._norm_bound, exact.max_norm(x))
        self._next_id += n
        self._meta.add(ids.tolist(), metas)
        if self._rows is not None:
            self._rows.add(ids.tolist(), x)
        return ids

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Remove rows by id; unknown (or already removed) ids are ignored. Returns how many rows were removed.

        Flat and IVF delete the vectors (faiss ``remove_ids``). HNSW cannot: the ids join a tombstone set that
        every search filters out, until :meth:`rebuild`.
        """
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).reshape(-1)
        present = np.unique(arr[self._meta.contains(arr)]).tolist() if len(arr) else []
        if not present:
            return 0
        if self.kind == "hnsw":
            self._tombstones.update(present)
        else:
            removed = self._index.remove_ids(np.asarray(present, dtype=np.int64))
            if removed != len(present):
                raise RuntimeError(f"faiss removed {removed} of {len(present)} rows")
        self._meta.remove(present)
        if self._rows is not None:
            self._rows.remove(present)
        return len(present)

    def rebuild(self, **options: Any) -> None:
        """Re-create the faiss index from the live vectors, keeping ids and metadata.

        HNSW: drops the tombstoned vectors; new ``M`` / ``ef_construction`` / ``ef_search`` may be given.
        IVF: retrains the coarse quantizer on all live vectors; ``nlist`` / ``nprobe`` not given are chosen afresh
        from the current size (see the class docstring).
        """
        unknown = set(options) - set(self.options)
        if unknown:
            raise TypeError(f"rebuild: options {sorted(unknown)} do not apply to a {self.kind!r} index")
        if self.kind in kinds.LOSSY:
            raise RetrievalError(f"rebuild: a {self.kind!r} index keeps only compressed vectors, so rebuilding it "
                                 f"would compress them twice; build it again from the manifest (`xmodal index "
                                 f"--overwrite`)")
        ids = self.ids()
        x = self.reconstruct(ids)
        if self.kind == "ivf":
            self.options = kinds.check_options("ivf", self.dim, options)
        else:
            self.options.update(kinds.check_options(self.kind, self.dim, {**self.options, **options}))
        self._index = kinds.new_faiss(self.kind, self.dim, self.options, self.options.get("nlist") or 1)
        self._tombstones = set()
        if len(ids):
            if self.kind in kinds.TRAINED:
                self._index = kinds.train(self.kind, self.dim, self.options, x)
            self._index.add_with_ids(x, ids)

    # --------------------------------------------------------------------------------------------------- search
    def _params(self, sel, k: int, ef_search: int | None, nprobe: int | None):
        if sel is not None:
            return kinds.search_params(self.kind, self._index, self.options, sel, k, ef_search, nprobe)
        # no selector: the same few parameter objects every call (building one costs a sub-ms search ~5-10 µs);
        # they hold a setting only, not the index, so they are keyed by it
        if self.kind == "hnsw":
            key: Any = ("ef", max(int(ef_search or self.options["ef_search"]), k))
        elif self.kind in ("ivf", "ivfpq"):
            key = ("nprobe", int(nprobe or self._index.nprobe))
        else:
            return None
        params = self._param_cache.get(key)
        if params is None:
            if len(self._param_cache) > 64:
                self._param_cache.clear()
            params = self._param_cache[key] = kinds.search_params(self.kind, self._index, self.options, None, k,
                                                                  ef_search, nprobe)
        return params

    def _exact(self, q: np.ndarray, ids: np.ndarray, k: int, vectors: np.ndarray | None = None):
        """Exact top-k of ``q`` over the rows ``ids`` (ties broken by id): ``(scores, ids)`` each ``[nq, k]``."""
        v = self.reconstruct(ids) if vectors is None else vectors
        s = q @ v.T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, order, axis=1), ids[order]

    def metadata_keys(self) -> list[str]:
        """Every metadata key some live row has, sorted."""
        return list(self._meta.keys_present())

    def metadata_column(self, key: str) -> list:
        """``key``'s value in every live row, in id order (None where a row lacks it): one pass over a column."""
        return self._meta.column(key)

    def _check_filter_keys(self, filter: Mapping[str, Any]) -> None:
        """A filter key that no row has (a typo: ``lable=seven``) is an error, not an empty result."""
        known = self.metadata_keys()
        unknown = [k for k in filter if k not in known]
        if unknown:
            raise RetrievalError(f"filter key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: no "
                                 f"item in the index has {'them' if len(unknown) > 1 else 'it'} (metadata keys: "
                                 f"{', '.join(known) or 'none'})")

    def search(self, queries: Any, k: int = 10, filter: Filter = None, *, ef_search: int | None = None,
               nprobe: int | None = None, rescore: int | None = None) -> list[list[Hit]]:
        """Top-``k`` rows by inner product for each query ``[nq, dim]`` → ``nq`` lists of :class:`Hit`, best first.

        ``filter``: ``{"label": "animals"}`` (all keys must match; a list value matches any of its items; values
        also match by their string form, so ``"3"`` matches ``3``) or a callable ``metadata -> bool``. Returns
        ``min(k, matching rows)`` hits per query; a dict filter naming a key that no row has raises
        :class:`RetrievalError` (listing the keys there are) instead of returning nothing. ``ef_search`` (HNSW),
        ``nprobe`` (IVF, IVF-PQ) and ``rescore`` (binary, IVF-PQ with rescoring) override the stored settings for
        this call.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise RetrievalError(f"k must be a positive integer, got {k!r}")
        q = _as_matrix(queries, self.dim, "queries")
        pred = _predicate(filter)
        nq = len(q)
        if nq == 0 or not self._meta:
            return [[] for _ in range(nq)]
        allowed: np.ndarray | None = None  # rows eligible under filter/tombstones; None = every row in faiss
        sel = None
        if pred is not None:
            allowed = self._meta.select(filter)  # a dict filter: evaluated on the metadata columns
            if not len(allowed):
                if isinstance(filter, Mapping):
                    self._check_filter_keys(filter)
                return [[] for _ in range(nq)]
            sel = faiss.IDSelectorBatch(allowed)
        elif self._tombstones:
            allowed = self.ids()
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self._tombstones, dtype=np.int64)))
        kk = int(min(k, len(self._meta) if allowed is None else len(allowed)))

        if allowed is not None and pred is not None and (len(allowed) <= EXACT_SUBSET or self.kind == "binary"):
            scores, labels = self._exact(q, allowed, kk)
        elif self.kind == "flat" and sel is None and exact.use_matmul(nq, self.ntotal, self.dim):
            if self._norm_bound is None:
                self._norm_bound = exact.max_norm(exact.flat_arrays(self._index)[0])
            scores, labels = exact.flat_search(self._index, q, kk, self._norm_bound)
        elif self._rows is not None and sel is None:  # ivfpq: PQ candidates re-ranked by the float vectors
            scores, labels = self._rescored(q, kk, int(rescore or self.options["rescore"]), nprobe)
        elif self.kind == "binary":  # Hamming candidates, re-ranked by the float query (no filter: see above)
            scores, labels = kinds.binary_search(self._index, q, kk, int(rescore or self.options["rescore"]),
                                                 self.ntotal)
        else:
            params = self._params(sel, kk, ef_search, nprobe)
            scores, labels = self._index.search(q, kk, params=params)
            # faiss pads a short result with id -1 at its end; plain Python: numpy's any() costs µs on a 1 x k array
            if any(i < 0 for i in labels[:, -1].tolist()):  # too few eligible rows found: answer those exactly
                short = labels[:, -1] < 0
                pool = allowed if allowed is not None else self.ids()
                vectors = self.reconstruct(pool)
                s2, l2 = self._exact(q[short], pool, kk, vectors)
                scores[short], labels[short] = s2, l2
        # metadata is read when a hit's is first asked for (LazyHit): a caller wanting ids and scores pays nothing
        lab, sc = labels.tolist(), scores.tolist()
        live, rows = self._meta.pending_rows([i for row in lab for i in row if i >= 0])
        flags, at = iter(live), itertools.count()
        return [[LazyHit(i, s, rows, next(at)) for s, i in zip(srow, lrow) if i >= 0 and next(flags)]
                for srow, lrow in zip(sc, lab)]

    def _rescored(self, q: np.ndarray, k: int, rescore: int, nprobe: int | None):
        """Top-``k`` of an ivfpq index with float rows: its ``rescore · k`` best candidates by PQ score, re-ranked
        by the exact inner product with their vectors (ties by id). Too few candidates: padded with id -1."""
        c = int(min(self.ntotal, max(k, rescore * k)))
        _, cand = self._index.search(q, c, params=self._params(None, c, None, nprobe))
        scores = np.full((len(q), k), -np.inf, np.float32)
        labels = np.full((len(q), k), -1, np.int64)
        for j in range(len(q)):  # one query's candidates at a time: c rows of the file, never nq x c
            ids = np.sort(cand[j][cand[j] >= 0])  # ascending: the file's rows read in order
            if not len(ids):
                continue
            s = self._rows.get(self._meta, ids) @ q[j]
            order = np.argsort(-s, kind="stable")[:k]  # ids ascending: ties go to the lower id
            scores[j, :len(order)], labels[j, :len(order)] = s[order], ids[order]
        return scores, labels

    # ---------------------------------------------------------------------------------------------- persistence
    def _info(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "kind": self.kind, "dim": self.dim,
                "metric": "inner_product", "count": len(self._meta), "ntotal": self.ntotal,
                "next_id": self._next_id, "options": self.options, "tombstones": sorted(self._tombstones),
                "model": self.model_info, **({"tuning": self.tuning} if self.tuning else {}), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def save(self, path: str | os.PathLike) -> Path:
        """Save into the folder ``path``, atomically: a crash at any moment leaves the previous index or this one.

        The new copy is written beside ``path`` as ``.NAME.new`` and renamed into place (the previous copy waits as
        ``.NAME.old`` meanwhile): see :func:`~xmodal.retrieval.index_files.save_folder` for the steps. Refuses
        (``FileExistsError``) to replace a non-empty folder that is not an xmodal index. A failure while writing (a
        full disk, a read-only folder) removes ``.NAME.new`` and raises ``OSError``.
        """
        return save_folder(Path(path), self._index, self._meta, self._info(), self._rows)

    @classmethod
    def load(cls, path: str | os.PathLike, repair: bool = True) -> "EmbeddingIndex":
        """Load an index folder written by :meth:`save`.

        Leftovers of an interrupted save are resolved first (the rename of ``.NAME.new`` onto ``NAME`` is the
        commit point of a save):

        * ``NAME`` exists → it is loaded; stale ``.NAME.old`` / ``.NAME.new`` siblings are deleted.
        * ``NAME`` missing, ``.NAME.old`` present (crash between the two renames) → ``.NAME.old`` is renamed back to
          ``NAME`` (the index before the unfinished save) and loaded; ``.NAME.new`` is deleted.
        * only ``.NAME.new`` (a first save that never committed) → ``FileNotFoundError``.

        With ``repair=False`` nothing on disk is changed (the second case reads ``.NAME.old`` in place) — use it
        when another process may be saving at the same moment.

        Raises ``FileNotFoundError`` when there is no index, :class:`IndexCorruptError` when the folder lacks any of
        ``index.faiss`` / ``metadata.arrow`` (``metadata.jsonl`` before format version 2) / ``index.json`` or they disagree (sizes, row counts, dimension).
        """
        path = Path(path).absolute()
        folder, info = open_folder(path, repair)
        try:
            self = cls(int(info["dim"]), info["kind"], model_info=info.get("model"),
                       **{k: v for k, v in (info.get("options") or {}).items() if v is not None})
            self.options.update(info.get("options") or {})
            self._next_id = int(info["next_id"])
            self._tombstones = {int(i) for i in info.get("tombstones") or []}
            self.tuning = info.get("tuning")
        except (KeyError, TypeError, ValueError) as e:
            raise IndexCorruptError(f"index {path}: bad {INFO_NAME}: {e}") from None
        self._index = read_faiss(path, folder, self.dim)
        kinds.configure_loaded(self.kind, self._index, self.options)
        self._meta = read_metadata(path, folder, info)
        self._rows = read_vectors(path, folder, self.dim, len(self._meta)) if self._rows is not None else None
        self._norm_bound = None  # computed by the first batch search that needs it
        expected = self.ntotal - len(self._tombstones)
        if len(self._meta) != expected or len(self._meta) != info.get("count", len(self._meta)):
            raise IndexCorruptError(f"index {path}: {metadata_name(info)} has {len(self._meta)} rows but {FAISS_NAME} holds "
                                    f"{expected} live vectors")
        return self


__all__ = ["EXACT_SUBSET", "KINDS", "RESERVED_HIT_KEYS", "EmbeddingIndex", "Filter", "Hit",
           "parse_filters"]
