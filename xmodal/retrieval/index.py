"""A faiss index of shared-space embeddings with one metadata record per row, atomic save/load, and queries.

* :class:`EmbeddingIndex` — exact inner product (``kind="flat"``: ``IndexIDMap2(IndexFlatIP)``, the default),
  ``kind="hnsw"`` (``IndexHNSWFlat``, inner-product metric) or ``kind="ivf"`` (``IndexIVFFlat``, trained on the first
  vectors added). Embeddings are L2-normalised, so inner product = cosine similarity. Every row gets an ``int64`` id
  from the index (``0, 1, 2, ...``, never reused, stable across add / remove / save / load) and a JSON metadata record
  (for an index built from a manifest: the row's ``id``, ``modality``, ``value`` (path or text), ``label`` and any
  other scalar columns).
(:mod:`xmodal.retrieval.retriever` builds an index from a model and a manifest and queries it with the model.)

On disk an index is a folder of three files::

    index.faiss      the faiss index (faiss.write_index)
    metadata.jsonl   one line per live row: {"index_id": 12, "meta": {...}}, in id order
    index.json       kind, dim, options, next_id, counts, file sizes, HNSW tombstones and the model fingerprint
                     {"run_dir", "sha256" (of model.safetensors), "embed_dim", "modality"}

See :meth:`EmbeddingIndex.save` for the crash-safe swap and :meth:`EmbeddingIndex.load` for what happens to the
leftovers of an interrupted save.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import faiss
import numpy as np

from . import IndexCorruptError, RetrievalError

log = logging.getLogger(__name__)

FAISS_NAME = "index.faiss"
META_NAME = "metadata.jsonl"
INFO_NAME = "index.json"
FILES = (FAISS_NAME, META_NAME, INFO_NAME)
FORMAT = "xmodal-index"
VERSION = 1
KINDS = ("flat", "hnsw", "ivf")
PATH_MODALITIES = ("image", "audio")  # query values are file paths (as in xmodal.data.MODALITY_COLUMNS)
EXACT_SUBSET = 2048  # a filter that leaves at most this many rows is answered by exact search over those rows

Filter = Mapping[str, Any] | Callable[[dict], bool] | None


# Keys of a hit's dict (:meth:`Hit.to_dict`, the CLI's ``query --json``, ``POST /api/search``) that xmodal itself
# fills; a metadata field of the same name (a manifest column called ``score``, ``rank``, ...) never replaces them.
RESERVED_HIT_KEYS = ("rank", "index_id", "score", "thumb", "metadata")


@dataclass
class Hit:
    """One search result: the index's row id, the inner-product score (cosine for normalised vectors), metadata."""

    id: int
    score: float
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """``{"index_id", "score", ...metadata, "metadata": {...}}``.

        ``index_id`` and ``score`` are always the row id and the similarity. The metadata fields are copied to the
        top level for convenience, except those named like a reserved key (:data:`RESERVED_HIT_KEYS`: ``rank``,
        ``index_id``, ``score``, ``thumb``, ``metadata``); ``"metadata"`` holds the row's complete metadata record
        as stored, so a manifest column called ``score`` is ``hit["metadata"]["score"]``.
        """
        out: dict = {"index_id": self.id, "score": self.score}
        out.update((k, v) for k, v in self.metadata.items() if k not in RESERVED_HIT_KEYS)
        out["metadata"] = dict(self.metadata)
        return out


# ------------------------------------------------------------------------------------------------------- helpers

def _as_matrix(x: Any, dim: int | None, what: str = "embeddings") -> np.ndarray:
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


def _value_matches(have: Any, want: Any) -> bool:
    if isinstance(want, (list, tuple, set, frozenset)):
        return any(_value_matches(have, w) for w in want)
    if have == want:
        return True
    return have is not None and want is not None and str(have) == str(want)  # "3" from the CLI matches 3


def _predicate(filter: Filter) -> Callable[[dict], bool] | None:
    """``None``; a callable ``meta -> bool``; or a dict: every key must match (a list value means any of them)."""
    if filter is None:
        return None
    if callable(filter):
        return filter
    if isinstance(filter, Mapping):
        if not filter:
            return None
        items = list(filter.items())
        return lambda meta: all(_value_matches(meta.get(k), v) for k, v in items)
    raise TypeError(f"filter must be a dict, a callable or None, got {type(filter).__name__}")


def parse_filters(specs: Iterable[str] | None) -> dict[str, Any] | None:
    """``["label=animals", "split=test", "label=plants"]`` → ``{"label": ["animals", "plants"], "split": "test"}``."""
    out: dict[str, Any] = {}
    for spec in specs or []:
        key, sep, value = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RetrievalError(f"--filter expects key=value, got {spec!r}")
        if key in out:
            prev = out[key]
            out[key] = (prev if isinstance(prev, list) else [prev]) + [value]
        else:
            out[key] = value
    return out or None


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory handles (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _siblings(path: Path) -> tuple[Path, Path]:
    """``(.NAME.new, .NAME.old)``: where a save writes the new copy, and where the previous copy waits during the
    swap."""
    return path.parent / f".{path.name}.new", path.parent / f".{path.name}.old"


def _missing_files(path: Path) -> list[str]:
    return [name for name in FILES if not (path / name).is_file()]


def _looks_like_index(path: Path) -> bool:
    try:
        info = json.loads((path / INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == FORMAT


def _recover(path: Path, repair: bool) -> Path:
    """Resolve the leftovers of an interrupted :meth:`EmbeddingIndex.save`; return the folder to read.

    The commit point of a save is the rename of ``.NAME.new`` onto ``NAME``. So:

    1. ``NAME`` exists: it is the index. A ``.NAME.old`` (crash after the commit, before the old copy was deleted)
       and a ``.NAME.new`` (crash before the commit) are stale and deleted (with ``repair``).
    2. ``NAME`` is missing but ``.NAME.old`` exists: the crash came between renaming the old copy aside and renaming
       the new one in. The save never committed, so ``.NAME.old`` is renamed back to ``NAME`` and ``.NAME.new``
       deleted (with ``repair``; without it, ``.NAME.old`` is read where it lies and nothing is touched).
    3. Only ``.NAME.new`` (the first save of this folder crashed before committing): there is no index;
       :class:`FileNotFoundError` (the leftover is removed by the next save).
    """
    new, old = _siblings(path)
    if path.is_dir():
        if repair:
            for stale in (old, new):
                if stale.exists():
                    log.warning("index %s: removing %s left by an interrupted save", path, stale.name)
                    shutil.rmtree(stale, ignore_errors=True)
        return path
    if old.is_dir():
        if not repair:
            return old
        log.warning("index %s: an interrupted save left the previous index in %s; restoring it", path, old.name)
        os.rename(old, path)
        _fsync_dir(path.parent)
        if new.exists():
            shutil.rmtree(new, ignore_errors=True)
        return path
    if new.is_dir():
        raise FileNotFoundError(f"no index at {path} (the first save of it was interrupted before it completed; "
                                f"build it again)")
    raise FileNotFoundError(f"no index at {path}")


def _auto_nlist(n: int) -> int:
    """~4·sqrt(n) inverted lists, but at least 39 training points per list (faiss's k-means guideline)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


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

    Filtered search (``filter={"label": "animals"}`` or a callable on the metadata) searches only the matching rows
    through a faiss ``IDSelectorBatch``; a query for which an approximate index (HNSW / IVF) then finds fewer than
    ``min(k, matching rows)`` hits is re-answered by exact search over the matching rows, and filters matching at
    most ``EXACT_SUBSET`` rows are always answered exactly, so a filtered search returns ``k`` hits whenever ``k``
    rows match.
    """

    def __init__(self, dim: int, kind: str = "flat", *, M: int = 32, ef_construction: int = 200,
                 ef_search: int = 128, nlist: int | None = None, nprobe: int | None = None,
                 model_info: dict | None = None):
        if kind not in KINDS:
            raise RetrievalError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        self.dim = int(dim)
        self.kind = kind
        if kind == "hnsw":
            self.options: dict[str, Any] = {"M": int(M), "ef_construction": int(ef_construction),
                                            "ef_search": int(ef_search)}
        elif kind == "ivf":
            for name, v in (("nlist", nlist), ("nprobe", nprobe)):
                if v is not None and v < 1:
                    raise RetrievalError(f"{name} must be at least 1, got {v}")
            self.options = {"nlist": nlist, "nprobe": nprobe}
        else:
            self.options = {}
        self.model_info = dict(model_info) if model_info else None
        self._meta: dict[int, dict] = {}
        self._tombstones: set[int] = set()
        self._next_id = 0
        self._index = self._new_faiss(self.options.get("nlist") or 1)

    # -------------------------------------------------------------------------------------------- faiss objects
    def _new_faiss(self, nlist: int = 1):
        d = self.dim
        if self.kind == "flat":
            return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
        if self.kind == "hnsw":
            h = faiss.IndexHNSWFlat(d, self.options["M"], faiss.METRIC_INNER_PRODUCT)
            h.hnsw.efConstruction = self.options["ef_construction"]
            h.hnsw.efSearch = self.options["ef_search"]
            return faiss.IndexIDMap2(h)
        quantizer = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFFlat(quantizer, d, int(nlist), faiss.METRIC_INNER_PRODUCT)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # reconstruct(id) for arbitrary ids, with removal
        ivf.nprobe = self._nprobe(int(nlist))
        return ivf

    def _nprobe(self, nlist: int) -> int:
        nprobe = self.options.get("nprobe")
        return int(min(nlist, nprobe if nprobe else max(1, nlist // 8)))

    def _train_ivf(self, x: np.ndarray) -> None:
        nlist = self.options.get("nlist") or _auto_nlist(len(x))
        if nlist > len(x):
            log.warning("ivf index: %d inverted lists requested but only %d vectors to train on; using %d",
                        nlist, len(x), len(x))
            nlist = len(x)
        self._index = self._new_faiss(nlist)
        self._index.train(x)
        self.options["nlist"] = int(nlist)
        self.options["nprobe"] = self._nprobe(nlist)
        self._index.nprobe = self.options["nprobe"]

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
        return np.fromiter(sorted(self._meta), dtype=np.int64, count=len(self._meta))

    def metadata(self, id: int) -> dict:
        return self._meta[int(id)]

    def __contains__(self, id: int) -> bool:
        return int(id) in self._meta

    def reconstruct(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored vectors of ``ids`` ``[n, dim]``."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        missing = [int(i) for i in ids if int(i) not in self._meta]
        if missing:
            raise KeyError(f"no rows with ids {missing[:10]}")
        if not len(ids):
            return np.empty((0, self.dim), np.float32)
        return np.asarray(self._index.reconstruct_batch(ids), dtype=np.float32).reshape(len(ids), self.dim)

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
        if self.kind == "ivf" and not self._index.is_trained:
            self._train_ivf(x)
        self._index.add_with_ids(x, ids)
        self._next_id += n
        for i, m in zip(ids.tolist(), metas):
            self._meta[i] = m
        return ids

    def remove(self, ids: Iterable[int] | np.ndarray) -> int:
        """Remove rows by id; unknown (or already removed) ids are ignored. Returns how many rows were removed.

        Flat and IVF delete the vectors (faiss ``remove_ids``). HNSW cannot: the ids join a tombstone set that
        every search filters out, until :meth:`rebuild`.
        """
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).reshape(-1)
        present = sorted({int(i) for i in arr} & self._meta.keys())
        if not present:
            return 0
        if self.kind == "hnsw":
            self._tombstones.update(present)
        else:
            removed = self._index.remove_ids(np.asarray(present, dtype=np.int64))
            if removed != len(present):
                raise RuntimeError(f"faiss removed {removed} of {len(present)} rows")
        for i in present:
            del self._meta[i]
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
        ids = self.ids()
        x = self.reconstruct(ids)
        if self.kind == "ivf":
            self.options = {"nlist": options.get("nlist"), "nprobe": options.get("nprobe")}
        else:
            self.options.update(options)
        self._index = self._new_faiss(self.options.get("nlist") or 1)
        self._tombstones = set()
        if len(ids):
            if self.kind == "ivf":
                self._train_ivf(x)
            self._index.add_with_ids(x, ids)

    # --------------------------------------------------------------------------------------------------- search
    def _params(self, sel, k: int, ef_search: int | None, nprobe: int | None):
        kw: dict[str, Any] = {}
        if sel is not None:
            kw["sel"] = sel
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=max(int(ef_search or self.options["ef_search"]), k), **kw)
        if self.kind == "ivf":
            return faiss.SearchParametersIVF(nprobe=int(nprobe or self._index.nprobe), **kw)
        return faiss.SearchParameters(**kw) if kw else None

    def _exact(self, q: np.ndarray, ids: np.ndarray, k: int, vectors: np.ndarray | None = None):
        """Exact top-k of ``q`` over the rows ``ids`` (ties broken by id): ``(scores, ids)`` each ``[nq, k]``."""
        v = self.reconstruct(ids) if vectors is None else vectors
        s = q @ v.T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, order, axis=1), ids[order]

    def metadata_keys(self) -> list[str]:
        """Every metadata key some live row has, sorted."""
        keys: set[str] = set()
        for m in self._meta.values():
            keys.update(m)
        return sorted(keys)

    def _check_filter_keys(self, filter: Mapping[str, Any]) -> None:
        """A filter key that no row has (a typo: ``lable=seven``) is an error, not an empty result."""
        known = self.metadata_keys()
        unknown = [k for k in filter if k not in known]
        if unknown:
            raise RetrievalError(f"filter key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: no "
                                 f"item in the index has {'them' if len(unknown) > 1 else 'it'} (metadata keys: "
                                 f"{', '.join(known) or 'none'})")

    def search(self, queries: Any, k: int = 10, filter: Filter = None, *, ef_search: int | None = None,
               nprobe: int | None = None) -> list[list[Hit]]:
        """Top-``k`` rows by inner product for each query ``[nq, dim]`` → ``nq`` lists of :class:`Hit`, best first.

        ``filter``: ``{"label": "animals"}`` (all keys must match; a list value matches any of its items; values
        also match by their string form, so ``"3"`` matches ``3``) or a callable ``metadata -> bool``. Returns
        ``min(k, matching rows)`` hits per query; a dict filter naming a key that no row has raises
        :class:`RetrievalError` (listing the keys there are) instead of returning nothing. ``ef_search`` (HNSW) and
        ``nprobe`` (IVF) override the stored settings for this call.
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
            allowed = np.fromiter((i for i, m in sorted(self._meta.items()) if pred(m)), dtype=np.int64)
            if not len(allowed):
                if isinstance(filter, Mapping):
                    self._check_filter_keys(filter)
                return [[] for _ in range(nq)]
            sel = faiss.IDSelectorBatch(allowed)
        elif self._tombstones:
            allowed = self.ids()
            sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(np.fromiter(self._tombstones, dtype=np.int64)))
        kk = int(min(k, len(self._meta) if allowed is None else len(allowed)))

        if allowed is not None and pred is not None and len(allowed) <= EXACT_SUBSET:
            scores, labels = self._exact(q, allowed, kk)
        else:
            params = self._params(sel, kk, ef_search, nprobe)
            scores, labels = self._index.search(q, kk, params=params)
            short = (labels < 0).any(axis=1)
            if short.any():  # an approximate index found too few eligible rows: answer those queries exactly
                pool = allowed if allowed is not None else self.ids()
                vectors = self.reconstruct(pool)
                s2, l2 = self._exact(q[short], pool, kk, vectors)
                scores[short], labels[short] = s2, l2
        out = []
        for srow, lrow in zip(scores, labels):
            hits = []
            for s, i in zip(srow.tolist(), lrow.tolist()):
                if i < 0 or i not in self._meta:
                    continue
                hits.append(Hit(int(i), float(s), dict(self._meta[i])))
            out.append(hits)
        return out

    # ---------------------------------------------------------------------------------------------- persistence
    def _info(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "kind": self.kind, "dim": self.dim,
                "metric": "inner_product", "count": len(self._meta), "ntotal": self.ntotal,
                "next_id": self._next_id, "options": self.options, "tombstones": sorted(self._tombstones),
                "model": self.model_info, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def _write_into(self, folder: Path) -> None:
        faiss.write_index(self._index, str(folder / FAISS_NAME))
        _fsync_file(folder / FAISS_NAME)
        with open(folder / META_NAME, "w", encoding="utf-8") as f:
            for i in sorted(self._meta):
                f.write(json.dumps({"index_id": i, "meta": self._meta[i]}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        info = self._info()
        info["files"] = {name: (folder / name).stat().st_size for name in (FAISS_NAME, META_NAME)}
        with open(folder / INFO_NAME, "w", encoding="utf-8") as f:  # written last
            f.write(json.dumps(info, indent=2))
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(folder)

    def save(self, path: str | os.PathLike) -> Path:
        """Save into the folder ``path``, atomically: a crash at any moment leaves the previous index or this one.

        Steps (``.NAME.new`` / ``.NAME.old`` are hidden siblings of ``NAME``):

        1. resolve leftovers of an earlier interrupted save (as :meth:`load` does) and delete a stale ``.NAME.new``;
        2. write all three files into ``.NAME.new`` (``index.json`` last), fsync each file and the folder;
        3. if ``NAME`` exists, rename it to ``.NAME.old``; fsync the parent folder;
        4. rename ``.NAME.new`` to ``NAME`` — **the commit point**; fsync the parent folder;
        5. delete ``.NAME.old``.

        Refuses (``FileExistsError``) to replace a non-empty folder that is not an xmodal index. A failure while
        writing (a full disk, a read-only folder) removes ``.NAME.new`` and raises ``OSError``.
        """
        path = Path(path).absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        new, old = _siblings(path)
        try:
            _recover(path, repair=True)
        except FileNotFoundError:
            pass
        if path.exists():
            if not path.is_dir():
                raise FileExistsError(f"{path} exists and is not a folder")
            if any(path.iterdir()) and not _looks_like_index(path):
                raise FileExistsError(f"{path} is a non-empty folder that is not an xmodal index; refusing to "
                                      f"replace it")
        if new.exists():
            shutil.rmtree(new)
        try:
            new.mkdir()
            self._write_into(new)
        except (OSError, RuntimeError) as e:  # a full disk: faiss raises RuntimeError, file writes OSError
            shutil.rmtree(new, ignore_errors=True)
            message = f"saving the index to {path} failed ({e}); the index already there (if any) is unchanged"
            raise (OSError(e.errno, message) if isinstance(e, OSError) else OSError(message)) from e
        if path.exists():
            os.rename(path, old)
            _fsync_dir(path.parent)
        os.rename(new, path)
        _fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)
        return path

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
        ``index.faiss`` / ``metadata.jsonl`` / ``index.json`` or they disagree (sizes, row counts, dimension).
        """
        path = Path(path).absolute()
        if path.exists() and not path.is_dir():
            raise FileNotFoundError(f"{path} is not an index folder")
        folder = _recover(path, repair=repair)
        missing = _missing_files(folder)
        if missing:
            raise IndexCorruptError(f"index {path} is incomplete: missing {', '.join(missing)} (rebuild it with "
                                    f"`xmodal index`)")
        try:
            info = json.loads((folder / INFO_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise IndexCorruptError(f"index {path}: unreadable {INFO_NAME}: {e}") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT:
            raise IndexCorruptError(f"index {path}: {INFO_NAME} is not an xmodal index description")
        if info.get("version", 0) > VERSION:
            raise IndexCorruptError(f"index {path}: format version {info.get('version')} is newer than this xmodal "
                                    f"understands ({VERSION})")
        for name, size in (info.get("files") or {}).items():
            actual = (folder / name).stat().st_size
            if actual != size:
                raise IndexCorruptError(f"index {path}: {name} has {actual} bytes, {INFO_NAME} recorded {size} "
                                        f"(truncated or replaced)")
        try:
            self = cls(int(info["dim"]), info["kind"], model_info=info.get("model"),
                       **{k: v for k, v in (info.get("options") or {}).items() if v is not None})
            self.options.update(info.get("options") or {})
            self._next_id = int(info["next_id"])
            self._tombstones = {int(i) for i in info.get("tombstones") or []}
        except (KeyError, TypeError, ValueError) as e:
            raise IndexCorruptError(f"index {path}: bad {INFO_NAME}: {e}") from None
        try:
            self._index = faiss.read_index(str(folder / FAISS_NAME))
        except RuntimeError as e:
            raise IndexCorruptError(f"index {path}: cannot read {FAISS_NAME}: {str(e).strip().splitlines()[-1]}") \
                from None
        if self._index.d != self.dim:
            raise IndexCorruptError(f"index {path}: {FAISS_NAME} has dimension {self._index.d}, {INFO_NAME} says "
                                    f"{self.dim}")
        if self.kind == "hnsw":
            faiss.downcast_index(self._index.index).hnsw.efSearch = self.options["ef_search"]
        elif self.kind == "ivf" and self.options.get("nprobe"):
            self._index.nprobe = int(self.options["nprobe"])
        with open(folder / META_NAME, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    self._meta[int(rec["index_id"])] = rec["meta"]
                except (ValueError, KeyError, TypeError) as e:
                    raise IndexCorruptError(f"index {path}: {META_NAME} line {lineno}: {e}") from None
        expected = self.ntotal - len(self._tombstones)
        if len(self._meta) != expected or len(self._meta) != info.get("count", len(self._meta)):
            raise IndexCorruptError(f"index {path}: {META_NAME} has {len(self._meta)} rows but {FAISS_NAME} holds "
                                    f"{expected} live vectors")
        return self
