"""An index folder on disk: its three files, the crash-safe save (a folder swap) and the checks a load makes.

On disk an index is a folder of three files::

    index.faiss      the faiss index (faiss.write_index)
    metadata.arrow   the rows' metadata as Arrow columns, index_id first (xmodal.retrieval.metadata_store);
                     folders saved before format version 2 hold metadata.jsonl instead (one line per live row:
                     {"index_id": 12, "meta": {...}}, in id order), which loads as before
    vectors.npy      only an ivfpq index with rescore: the float vectors, row i = metadata.arrow's row i
    index.json       kind, dim, options, next_id, counts, file sizes and checksums, HNSW tombstones and the model
                     fingerprint {"run_dir", "sha256" (of model.safetensors), "embed_dim", "modality"}; sealed
                     with its own "checksum" (xmodal.integrity), so a flipped bit that still parses is noticed

A save writes a complete new folder beside the old one and swaps it in by renames (:func:`save_folder`); a load
first resolves whatever an interrupted save left (:func:`recover`), then checks the files against each other before
anything is trusted (:func:`open_folder`, :func:`read_faiss`, :func:`read_metadata`). This module knows files, not
searching: :class:`~xmodal.retrieval.index.EmbeddingIndex` hands it a faiss index, the metadata and ``index.json``'s
fields, and gets the same back.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import faiss

from ..atomic import fsync_dir, fsync_file
from ..integrity import ALGORITHM, IntegrityError, check_file, check_seal, file_record, seal
from . import IndexCorruptError
from .float_rows import VECTORS_NAME, FloatRows
from .metadata_store import MetadataStore

log = logging.getLogger(__name__)

FAISS_NAME = "index.faiss"
META_NAME = "metadata.jsonl"  # format version 1
ARROW_NAME = "metadata.arrow"  # format version 2
INFO_NAME = "index.json"
FILES = (FAISS_NAME, ARROW_NAME, INFO_NAME)
FORMAT = "xmodal-index"
VERSION = 2
REBUILD = "rebuild it with `xmodal index`"


def _siblings(path: Path) -> tuple[Path, Path]:
    """``(.NAME.new, .NAME.old)``: where a save writes the new copy, and where the previous copy waits during the
    swap."""
    return path.parent / f".{path.name}.new", path.parent / f".{path.name}.old"


def metadata_name(info: Mapping[str, Any] | None) -> str:
    """The metadata file of an index whose ``index.json`` says ``info``: ``metadata.arrow`` from version 2 on."""
    return META_NAME if int((info or {}).get("version", VERSION)) < 2 else ARROW_NAME


def _missing_files(path: Path) -> list[str]:
    others: list[str] = []
    try:  # which metadata file: index.json's version says (when it is there to read); other files it records
        info = json.loads((path / INFO_NAME).read_text(encoding="utf-8"))
        meta = metadata_name(info if isinstance(info, dict) else None)
        others = [str(n) for n in (info.get("files") or {}) if n not in (FAISS_NAME, META_NAME, ARROW_NAME)]
    except (OSError, ValueError, TypeError, AttributeError):
        meta = META_NAME if (path / META_NAME).is_file() and not (path / ARROW_NAME).is_file() else ARROW_NAME
    return [name for name in (FAISS_NAME, meta, *others, INFO_NAME) if not (path / name).is_file()]


def _looks_like_index(path: Path) -> bool:
    try:
        info = json.loads((path / INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == FORMAT


def recover(path: Path, repair: bool) -> Path:
    """Resolve the leftovers of an interrupted :func:`save_folder`; return the folder to read.

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
        fsync_dir(path.parent)
        if new.exists():
            shutil.rmtree(new, ignore_errors=True)
        return path
    if new.is_dir():
        raise FileNotFoundError(f"no index at {path} (the first save of it was interrupted before it completed; "
                                f"build it again)")
    raise FileNotFoundError(f"no index at {path}")


# ------------------------------------------------------------------------------------------------------- save

def _write_into(folder: Path, index, meta: MetadataStore, info: dict, rows: FloatRows | None) -> None:
    """The files into ``folder``, each fsynced, ``index.json`` last (it records the others' sizes)."""
    faiss.write_index(index, str(folder / FAISS_NAME))
    fsync_file(folder / FAISS_NAME)
    names = [FAISS_NAME, ARROW_NAME] + ([VECTORS_NAME] if rows is not None else [])
    for name, source in ((ARROW_NAME, meta), (VECTORS_NAME, rows)):
        if source is None:
            continue
        with open(folder / name, "wb") as f:
            source.write(f) if source is meta else source.write(f, meta)
            f.flush()
            os.fsync(f.fileno())
    records = {name: file_record(folder / name) for name in names}
    info = seal({**info, "files": {name: r["size"] for name, r in records.items()},
                 "checksums": {name: {ALGORITHM: r[ALGORITHM]} for name, r in records.items()}})
    with open(folder / INFO_NAME, "w", encoding="utf-8") as f:  # written last
        f.write(json.dumps(info, indent=2))
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)


def save_folder(path: Path, index, meta: MetadataStore, info: dict, rows: FloatRows | None = None) -> Path:
    """Save into the folder ``path``, atomically: a crash at any moment leaves the previous index or this one.

    Steps (``.NAME.new`` / ``.NAME.old`` are hidden siblings of ``NAME``):

    1. resolve leftovers of an earlier interrupted save (as a load does) and delete a stale ``.NAME.new``;
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
        recover(path, repair=True)
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
        _write_into(new, index, meta, info, rows)
    except (OSError, RuntimeError) as e:  # a full disk: faiss raises RuntimeError, file writes OSError
        shutil.rmtree(new, ignore_errors=True)
        message = f"saving the index to {path} failed ({e}); the index already there (if any) is unchanged"
        raise (OSError(e.errno, message) if isinstance(e, OSError) else OSError(message)) from e
    # os.rename, not os.replace: the same call on POSIX, and tests/test_index.py counts these renames as the steps
    # a crash can interrupt
    if path.exists():
        os.rename(path, old)
        fsync_dir(path.parent)
    os.rename(new, path)
    fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


# ------------------------------------------------------------------------------------------------------- load

def open_folder(path: Path, repair: bool) -> tuple[Path, dict]:
    """Recover, then ``(folder to read, index.json)`` once the files are all there, ``index.json`` is an xmodal index
    description this version understands (and matches its own checksum) and the other two files have the sizes and
    checksums it recorded (indexes saved before checksums: sizes only).

    ``path`` names the index in every error; ``folder`` is where it is read (``.NAME.old`` with ``repair=False``
    after a crash between the swap's renames).
    """
    if path.exists() and not path.is_dir():
        raise FileNotFoundError(f"{path} is not an index folder")
    folder = recover(path, repair=repair)
    missing = _missing_files(folder)
    if missing:
        raise IndexCorruptError(f"index {path} is incomplete: missing {', '.join(missing)} (rebuild it with "
                                f"`xmodal index`)")
    try:
        info = json.loads((folder / INFO_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise IndexCorruptError(f"index {path}: unreadable {INFO_NAME}: {e} ({REBUILD})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise IndexCorruptError(f"index {path}: {INFO_NAME} is not an xmodal index description")
    try:
        check_seal(info, folder / INFO_NAME, REBUILD)
    except IntegrityError as e:
        raise IndexCorruptError(f"index {path}: {e}") from None
    if info.get("version", 0) > VERSION:
        raise IndexCorruptError(f"index {path}: format version {info.get('version')} is newer than this xmodal "
                                f"understands ({VERSION})")
    for name, size in (info.get("files") or {}).items():
        actual = (folder / name).stat().st_size
        if actual != size:
            raise IndexCorruptError(f"index {path}: {name} has {actual} bytes, {INFO_NAME} recorded {size} "
                                    f"(truncated or replaced; {REBUILD})")
    for name, record in (info.get("checksums") or {}).items():  # indexes saved before checksums have none
        try:
            check_file(folder / name, record, recorded_in=folder / INFO_NAME, remedy=REBUILD)
        except IntegrityError as e:
            raise IndexCorruptError(f"index {path}: {e}") from None
    return folder, info


def read_faiss(path: Path, folder: Path, dim: int):
    """The faiss index in ``folder``, checked to have dimension ``dim`` (``index.json``'s)."""
    try:
        index = faiss.read_index(str(folder / FAISS_NAME))
    except RuntimeError as e:
        raise IndexCorruptError(f"index {path}: cannot read {FAISS_NAME}: {str(e).strip().splitlines()[-1]}") \
            from None
    if index.d != dim:
        raise IndexCorruptError(f"index {path}: {FAISS_NAME} has dimension {index.d}, {INFO_NAME} says {dim}")
    return index


def read_vectors(path: Path, folder: Path, dim: int, rows: int) -> FloatRows:
    """``vectors.npy`` memory-mapped (an ivfpq index with rescore), checked to hold ``rows`` x ``dim``."""
    if not (folder / VECTORS_NAME).is_file():
        raise IndexCorruptError(f"index {path} is incomplete: missing {VECTORS_NAME} ({REBUILD})")
    try:
        return FloatRows.open(folder / VECTORS_NAME, dim, rows, VECTORS_NAME)
    except ValueError as e:
        raise IndexCorruptError(f"index {path}: {e} ({REBUILD})") from None


def read_metadata(path: Path, folder: Path, info: Mapping[str, Any] | None = None) -> MetadataStore:
    """The rows' metadata: ``metadata.arrow`` memory-mapped, or (an index saved before format version 2)
    ``metadata.jsonl`` read into dicts, as before — converted in memory, nothing written."""
    if metadata_name(info) == ARROW_NAME:
        try:
            return MetadataStore.open(folder / ARROW_NAME, f"{ARROW_NAME}")
        except ValueError as e:
            raise IndexCorruptError(f"index {path}: {e} ({REBUILD})") from None
    meta: dict[int, Any] = {}
    with open(folder / META_NAME, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                meta[int(rec["index_id"])] = rec["meta"]
            except (ValueError, KeyError, TypeError) as e:
                raise IndexCorruptError(f"index {path}: {META_NAME} line {lineno}: {e}") from None
    return MetadataStore.from_dicts(meta)
