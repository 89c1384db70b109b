"""Writing files so that a crash never leaves a half-written one: write a temporary sibling, fsync, rename.

The bottom layer of xmodal (it imports nothing from the package). Every writer that must not leave a torn file
behind goes through here:

* :func:`write_text` — the whole text into ``path``, atomically (``xmodal predict --out``, corpus manifests);
* :func:`replacing` — the same for a writer that wants a file name (PIL's ``Image.save``, ``soundfile.write``):
  ``with replacing(png) as tmp: image.save(tmp)``;
* :func:`fsync_file` / :func:`fsync_dir` — the two fsyncs, for code that arranges its own renames (the model's
  weights + card pair, the retrieval index's folder swap).

What "atomic" means here: ``os.replace`` of a complete temporary file onto ``path``, so a reader (or a process
started after a crash) sees the old file or the new one, never a prefix of the new one. With ``fsync=True`` (the
default) the temporary file's bytes reach the disk *before* the rename, so a power cut cannot leave ``path`` naming an
empty file (ext4/XFS may persist a rename before the data). The rename itself is not fsynced: after a power cut
``path`` may still be the old file; call :func:`fsync_dir` on the parent when the new name must survive too.

The temporary file is a hidden sibling (same folder, so the rename never crosses file systems): ``.NAME.tmp`` unless
the caller names another (some callers add the pid, so concurrent writers of one file never share a temporary). It
is created by the writer with the process's umask (``os.replace`` keeps that mode) and is removed if writing fails.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["fsync_dir", "fsync_file", "replacing", "temp_sibling", "write_text"]


def fsync_file(path: str | os.PathLike) -> None:
    """Flush ``path``'s data to the disk (``fsync`` through a fresh read-only handle: works after the writer closed
    it, and for files written by libraries that never expose a handle: faiss, safetensors)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush a folder's entries (the renames and creations in it) to the disk; a no-op where folders cannot be
    opened or fsynced (Windows, some network file systems), since there is nothing better to do there."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_sibling(path: str | os.PathLike) -> Path:
    """``.NAME.tmp`` next to ``path``: the default temporary file of :func:`replacing` / :func:`write_text`."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def replacing(path: str | os.PathLike, tmp: str | os.PathLike | None = None, *,
              fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content into; on a clean exit fsync it (with ``fsync``) and
    rename it onto ``path``. If the block raises (anything, KeyboardInterrupt included), the temporary file is
    removed, ``path`` is untouched and the exception propagates unchanged.

    ``tmp``: the temporary file (default :func:`temp_sibling`); it must be in ``path``'s folder. ``fsync=False`` is
    for bulk writes of many small files that are cheap to make again (one fsync each would dominate): the rename is
    still atomic for readers, but after a power cut a file may exist with no data.
    """
    tmp = Path(tmp) if tmp is not None else temp_sibling(path)
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def write_text(path: str | os.PathLike, text: str, tmp: str | os.PathLike | None = None, *,
               encoding: str = "utf-8", fsync: bool = True) -> None:
    """Replace ``path`` with ``text`` atomically (see :func:`replacing` for ``tmp`` and ``fsync``)."""
    with replacing(path, tmp, fsync=fsync) as t, open(t, "w", encoding=encoding) as f:
        f.write(text)
