"""A faiss index of shared-space embeddings with one metadata record per row, atomic save/load, and queries.

* :class:`EmbeddingIndex` — exact inner product (``kind="flat"``: ``IndexIDMap2(IndexFlatIP)``, the default),
  ``kind="hnsw"`` (``IndexHNSWFlat``, inner-product metric) or ``kind="ivf"`` (``IndexIVFFlat``, trained on the first
  vectors added). Embeddings are L2-normalised, so inner product = cosine similarity. Every row gets an ``int64`` id
  from the index (``0, 1, 2, ...``, never reused, stable across add / remove / save / load) and a JSON metadata record
  (for an index built from a manifest: the row's ``id``, ``modality``, ``value`` (path or text), ``label`` and any
  other scalar columns).
* :class:`Retriever` — an index plus the model that made it (checked by fingerprint); queries of any modality the
  model has (text → images, image → images, ...).
* :func:`build_index` — embed one modality column of a manifest and save the index (or append to an existing one).

On disk an index is a folder of three files::

    index.faiss      the faiss index (faiss.write_index)
    metadata.jsonl   one line per live row: {"index_id": 12, "meta": {...}}, in id order
    index.json       kind, dim, options, next_id, counts, file sizes, HNSW tombstones and the model fingerprint
                     {"run_dir", "sha256" (of model.safetensors), "embed_dim", "modality"}

See :meth:`EmbeddingIndex.save` for the crash-safe swap and :meth:`EmbeddingIndex.load` for what happens to the
leftovers of an interrupted save.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import faiss
import numpy as np

from . import FingerprintMismatchError, IndexCorruptError, RetrievalError

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


@dataclass
class Hit:
    """One search result: the index's row id, the inner-product score (cosine for normalised vectors), metadata."""

    id: int
    score: float
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"index_id": self.id, "score": self.score, **self.metadata}


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

    def search(self, queries: Any, k: int = 10, filter: Filter = None, *, ef_search: int | None = None,
               nprobe: int | None = None) -> list[list[Hit]]:
        """Top-``k`` rows by inner product for each query ``[nq, dim]`` → ``nq`` lists of :class:`Hit`, best first.

        ``filter``: ``{"label": "animals"}`` (all keys must match; a list value matches any of its items; values
        also match by their string form, so ``"3"`` matches ``3``) or a callable ``metadata -> bool``. Returns
        ``min(k, matching rows)`` hits per query. ``ef_search`` (HNSW) and ``nprobe`` (IVF) override the stored
        settings for this call.
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


# ------------------------------------------------------------------------------------------------- fingerprints

_SHA_CACHE: dict[tuple, str] = {}


def _sha256_file(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _weights_sha256(model: Any) -> str:
    """sha256 of the ``model.safetensors`` that ``model.save()`` would write (same bytes as the run folder's file
    for a model loaded from it and unchanged since)."""
    import torch
    from safetensors.torch import save_model

    if not isinstance(model, torch.nn.Module):
        raise RetrievalError(f"cannot fingerprint a {type(model).__name__}: pass the run folder (run_dir=) instead")
    with tempfile.TemporaryDirectory(prefix="xmodal-fp-") as tmp:
        p = Path(tmp) / "model.safetensors"
        save_model(model, str(p))
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()


def _embed_dim(model: Any) -> int:
    return int(model.cfg.embed_dim)


def _model_modalities(model: Any) -> list[str]:
    mods = getattr(model, "modalities", None)
    if mods is None:
        mods = list(getattr(getattr(model, "cfg", None), "towers", {}) or [])
    return list(mods)


def model_fingerprint(model: Any, modality: str, run_dir: str | os.PathLike | None = None) -> dict:
    """``{"run_dir", "sha256", "embed_dim", "modality"}`` identifying the model that embeds an index.

    ``model`` may be a run folder (its ``model.safetensors`` is hashed, ``embed_dim`` read from ``model.json``) or a
    model object: with ``run_dir`` the run folder's weights file is hashed (the caller vouches that the object was
    loaded from it), without it the object's weights are serialised as ``model.save()`` would and hashed.
    """
    from ..model import CARD_NAME, WEIGHTS_NAME

    if isinstance(model, (str, os.PathLike)):
        run = Path(model).absolute()
        weights, card = run / WEIGHTS_NAME, run / CARD_NAME
        if not weights.is_file() or not card.is_file():
            raise FileNotFoundError(f"{run}: not an xmodal run folder (needs {CARD_NAME} and {WEIGHTS_NAME})")
        try:
            embed_dim = int(json.loads(card.read_text(encoding="utf-8"))["model"].get("embed_dim", 256))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise RetrievalError(f"{card}: cannot read embed_dim: {e}") from None
        return {"run_dir": str(run), "sha256": _sha256_file(weights), "embed_dim": embed_dim, "modality": modality}
    if run_dir is not None:
        run = Path(run_dir).absolute()
        weights = run / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{run}: no {WEIGHTS_NAME} (not an xmodal run folder)")
        return {"run_dir": str(run), "sha256": _sha256_file(weights), "embed_dim": _embed_dim(model),
                "modality": modality}
    return {"run_dir": None, "sha256": _weights_sha256(model), "embed_dim": _embed_dim(model), "modality": modality}


def _check_fingerprint(recorded: dict | None, fp: dict, where: str) -> None:
    if not recorded:
        return
    if recorded.get("sha256") != fp["sha256"] or int(recorded.get("embed_dim", -1)) != fp["embed_dim"]:
        made_by = recorded.get("run_dir") or "an in-memory model"
        given = fp.get("run_dir") or "the given in-memory model"
        raise FingerprintMismatchError(
            f"{where} was built by the model in {made_by} (weights sha256 {str(recorded.get('sha256'))[:12]}…, "
            f"embed_dim {recorded.get('embed_dim')}), but the query model {given} differs (sha256 "
            f"{fp['sha256'][:12]}…, embed_dim {fp['embed_dim']}): its embeddings live in another space. Query with "
            f"the model that built the index, or rebuild the index with `xmodal index`.")


# ------------------------------------------------------------------------------------------------- build / query

def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, bool, int, float))


def build_index(model: Any, manifest: Any, modality: str, out_dir: str | os.PathLike, kind: str | None = None,
                batch_size: int = 64, run_dir: str | os.PathLike | None = None, *, append: bool = False,
                overwrite: bool = False, progress: bool = True, **opts: Any) -> EmbeddingIndex:
    """Embed the ``modality`` column of ``manifest`` (a :class:`xmodal.data.Manifest` or a ``datasets.Dataset``)
    with ``model`` and save the index atomically to ``out_dir``.

    Rows whose ``modality`` cell is empty are skipped. Each row's metadata: ``id``, ``modality``, ``value`` (the path
    or text), ``label`` and every other scalar column. ``run_dir`` (the run folder the model was loaded from) is
    recorded with the model fingerprint so :class:`Retriever` can load the model by itself; without it the index only
    records the fingerprint of the in-memory weights.

    ``out_dir`` already holding an index: with ``append=True`` the rows whose manifest ``id`` is not yet in the index
    are embedded and added (the model must have the index's fingerprint); with ``overwrite=True`` it is replaced;
    otherwise ``FileExistsError``. ``kind`` (default ``"flat"``) and ``opts`` (``M``, ``ef_construction``,
    ``ef_search``, ``nlist``, ``nprobe``) apply to a new index.
    """
    opts = {k: v for k, v in opts.items() if v is not None}
    ds = getattr(manifest, "dataset", manifest)
    columns = list(ds.column_names)
    if modality not in columns:
        raise RetrievalError(f"the manifest has no {modality!r} column (columns: {', '.join(columns)})")
    mods = _model_modalities(model)
    if modality not in mods:
        raise RetrievalError(f"the model has no {modality!r} tower (towers: {', '.join(mods)})")
    out = Path(out_dir).absolute()
    fp = model_fingerprint(model, modality, run_dir=run_dir)

    index: EmbeddingIndex | None = None
    existing = None
    if out.is_dir() and any(out.iterdir()) and not _looks_like_index(out):
        raise FileExistsError(f"{out} is a non-empty folder that is not an xmodal index; choose another output "
                              f"folder")
    if not (out.is_dir() and not any(out.iterdir())):  # an empty folder is simply where the new index goes
        try:
            existing = EmbeddingIndex.load(out)
        except FileNotFoundError:
            pass
        except IndexCorruptError as e:
            if not overwrite:
                raise IndexCorruptError(f"{e}; or replace it with --overwrite (overwrite=True)") from None
    if existing is not None:
        if append:
            index = existing
            _check_fingerprint(index.model_info, fp, f"index {out}")
            if index.model_info and index.model_info.get("modality") not in (None, modality):
                raise RetrievalError(f"index {out} holds {index.model_info['modality']!r} embeddings; cannot append "
                                     f"{modality!r} rows")
            if kind is not None and kind != index.kind:
                raise RetrievalError(f"index {out} is a {index.kind!r} index; cannot append as {kind!r}")
            if fp.get("run_dir"):
                index.model_info = {**(index.model_info or {}), **fp}
        elif not overwrite:
            raise FileExistsError(f"{out} already holds an index ({len(existing)} rows); append to it with --append "
                                  f"(append=True) or replace it with --overwrite (overwrite=True)")
    if index is None:
        index = EmbeddingIndex(fp["embed_dim"], kind or "flat", model_info=fp, **opts)
    if fp["embed_dim"] != index.dim:
        raise FingerprintMismatchError(f"the model embeds into {fp['embed_dim']} dimensions, index {out} holds "
                                       f"{index.dim}")

    present = {str(m.get("id")) for m in index._meta.values()} if append else set()
    values = ds[modality]
    ids = [str(i) for i in ds["id"]] if "id" in columns else [str(i + 1) for i in range(len(values))]
    extra = []  # other scalar columns, in manifest order
    for c in columns:
        if c in ("id", modality):
            continue
        col = ds[c]
        if all(_scalar(v) for v in col):
            extra.append((c, col))
    inputs, metas, empty, dup = [], [], 0, 0
    for r, value in enumerate(values):
        if value is None or (isinstance(value, str) and not value.strip()):
            empty += 1
            continue
        if ids[r] in present:
            dup += 1
            continue
        shown = value
        if isinstance(value, dict):  # datasets.Image / Audio cell
            shown = value.get("path")
            value = value.get("path") or value
        elif not _scalar(value):  # a decoded PIL image: embed it, keep no value
            shown = getattr(value, "filename", None) or None
        meta = {"id": ids[r], "modality": modality, "value": shown, "label": None}
        for c, col in extra:
            meta[c] = col[r]
        metas.append(meta)
        inputs.append(value)
    if empty:
        log.info("build_index: skipped %d rows with an empty %r cell", empty, modality)
    if dup:
        log.info("build_index: %d rows already in the index", dup)
    if not inputs:
        if existing is not None and append:
            return index
        raise RetrievalError(f"no rows with a non-empty {modality!r} value to index")
    emb = model.encode(modality, inputs, batch_size=batch_size, progress=progress)
    index.add(emb, metas)
    index.save(out)
    return index


class Retriever:
    """Query an index with a model: ``Retriever("indexes/images").search("a red car", "text", k=5)``.

    ``model``: ``None`` (load the run folder recorded in ``index.json``), a run folder path, or a model object.
    Whatever the source, the model's fingerprint (sha256 of its ``model.safetensors`` and its ``embed_dim``) must
    equal the one recorded when the index was built, else :class:`FingerprintMismatchError`. A path is checked and
    loaded lazily (on the first query or ``.model`` access); an object is checked at once.

    Queries may be any modality the model has a tower for (text → images, image → images, audio → images, ...).
    """

    def __init__(self, index_dir: str | os.PathLike | EmbeddingIndex, model: Any = None, *, batch_size: int = 64):
        if isinstance(index_dir, EmbeddingIndex):
            self.index, self.index_dir = index_dir, None
        else:
            self.index_dir = Path(index_dir).absolute()
            self.index = EmbeddingIndex.load(self.index_dir)
        self.batch_size = batch_size
        self._model = None
        self._run_dir: Path | None = None
        where = f"index {self.index_dir}" if self.index_dir else "the index"
        self._where = where
        info = self.index.model_info
        if model is None:
            if not info or not info.get("run_dir"):
                raise RetrievalError(f"{where} records no run folder for its model; pass the model (model= / --run)")
            self._run_dir = Path(info["run_dir"])
        elif isinstance(model, (str, os.PathLike)):
            self._run_dir = Path(model).absolute()
        else:
            fp = model_fingerprint(model, self.modality or "", run_dir=None)
            _check_fingerprint(info, fp, where)
            self._check_dim(fp["embed_dim"])
            self._model = model
        if not info:
            log.warning("%s records no model fingerprint; cannot check that the query model made it", where)

    @property
    def modality(self) -> str | None:
        """The modality of the indexed items."""
        return (self.index.model_info or {}).get("modality")

    def _check_dim(self, embed_dim: int) -> None:
        if embed_dim != self.index.dim:
            raise FingerprintMismatchError(f"{self._where} holds {self.index.dim}-d vectors but the model embeds into "
                                           f"{embed_dim} dimensions")

    @property
    def model(self):
        if self._model is None:
            from ..model import load

            run = self._run_dir
            if not run.is_dir():
                raise FileNotFoundError(f"run folder {run} (recorded in {self._where}) does not exist; pass the "
                                        f"model's run folder (--run / model=)")
            fp = model_fingerprint(run, self.modality or "")
            _check_fingerprint(self.index.model_info, fp, self._where)
            self._check_dim(fp["embed_dim"])
            self._model = load(run)
        return self._model

    def search(self, query: Any, modality: str, k: int = 10, filter: Filter = None,
               **search_opts: Any) -> list[Hit] | list[list[Hit]]:
        """Embed ``query`` (a string / path / PIL image, or a list of them for a batch) as ``modality`` and search.

        Returns a list of hits, or a list of lists for a list of queries. ``filter`` as in
        :meth:`EmbeddingIndex.search`.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise RetrievalError(f"k must be a positive integer, got {k!r}")
        batch = isinstance(query, (list, tuple))
        items = [str(q) if isinstance(q, os.PathLike) else q for q in (query if batch else [query])]
        model = self.model
        mods = _model_modalities(model)
        if modality not in mods:
            raise RetrievalError(f"this model has no {modality!r} tower, so it cannot embed {modality} queries "
                                 f"(towers: {', '.join(mods)})")
        if modality in PATH_MODALITIES:
            for q in items:
                if isinstance(q, str) and not Path(q).expanduser().is_file():
                    raise FileNotFoundError(f"{modality} query file not found: {q}")
            items = [str(Path(q).expanduser()) if isinstance(q, str) else q for q in items]
        if not items:
            return []
        emb = model.encode(modality, items, batch_size=self.batch_size, progress=False)
        results = self.index.search(emb, k, filter, **search_opts)
        return results if batch else results[0]

    def search_embeddings(self, embeddings: Any, k: int = 10, filter: Filter = None,
                          **search_opts: Any) -> list[list[Hit]]:
        """Search with already-computed query embeddings ``[nq, dim]``."""
        return self.index.search(embeddings, k, filter, **search_opts)


def format_hits(hits: Sequence[Hit], width: int = 80) -> str:
    """A text table of hits: rank, score, id (the manifest id), label, value (path or text, shortened)."""
    if not hits:
        return "no results"
    rows = [("rank", "score", "id", "label", "value")]
    for r, h in enumerate(hits, 1):
        value = "" if h.metadata.get("value") is None else str(h.metadata.get("value")).replace("\n", " ")
        if len(value) > width:
            value = "…" + value[-(width - 1):] if h.metadata.get("modality") in PATH_MODALITIES \
                else value[:width - 1] + "…"
        label = h.metadata.get("label")
        rows.append((str(r), f"{h.score:.4f}", str(h.metadata.get("id", h.id)), "" if label is None else str(label),
                     value))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join("  ".join([row[0].rjust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2]),
                                row[3].ljust(widths[3]), row[4]]).rstrip() for row in rows)
