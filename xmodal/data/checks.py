"""Per-row checks of a manifest's selected rows: empty or non-string values, paths resolved against the data root
and confined to it, URLs, and each distinct file checked once (the modality's own ``check_file``), all recorded by
file row, id and field in :class:`_Rows`."""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from ..modalities.registry import get_modality
from .formats import _NOT_A_STRING


class _Rows:
    """Bookkeeping of the selected rows: source row numbers, ids, and the first problem found in each row."""

    def __init__(self, source: str, row_numbers: list[int], ids: list[str | None]):
        self.source = source
        self.row_numbers = row_numbers
        self.ids = ids
        self.bad: dict[int, str] = {}  # position in the selection → message (first problem of that row)

    def where(self, i: int) -> str:
        rid = self.ids[i]
        return f"{self.source}: row {self.row_numbers[i]}" + (f" (id {rid!r})" if rid not in (None, "") else "")

    def flag(self, i: int, field_name: str, what: str) -> None:
        if i not in self.bad:
            self.bad[i] = f"{self.where(i)}: field '{field_name}': {what}"


def _check_file(kind_modality: str, path: str) -> str | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"file not found: {path}"
    except OSError as e:
        return f"cannot access file ({e.strerror}): {path}"
    import stat

    if stat.S_ISDIR(st.st_mode):
        return f"path is a directory, not a file: {path}"
    if st.st_size == 0:
        return f"file is empty: {path}"
    if not os.access(path, os.R_OK):
        return f"file is not readable (permissions): {path}"
    return get_modality(kind_modality).check(path)


def _file_checks(modality: str, paths: dict[str, list[int]], rows: _Rows, workers: int) -> None:
    """Check each distinct file once (thread pool); flag every row that points at a bad one."""
    unique = list(paths)
    if not unique:
        return
    if workers <= 1 or len(unique) < 64:
        results: Iterable[str | None] = map(lambda p: _check_file(modality, p), unique)
    else:
        pool = ThreadPoolExecutor(max_workers=workers)
        results = pool.map(lambda p: _check_file(modality, p), unique, chunksize=64)
    try:
        for p, problem in zip(unique, results):
            if problem:
                for i in paths[p]:
                    rows.flag(i, modality, problem)
    finally:
        if workers > 1 and len(unique) >= 64:
            pool.shutdown()


def _check_string_column(name: str, column: pa.ChunkedArray, rows: _Rows, require: bool, what: str) -> list[Any]:
    """Flag empty / whitespace-only / non-string values; return the values with empties normalised to None."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        values = column.to_pylist()
        for i, v in enumerate(values):
            if v is None:
                if require:
                    rows.flag(i, name, f"missing {what}")
            else:
                rows.flag(i, name, f"expected a string ({what}), got {type(v).__name__} {v!r:.60}")
        return [None] * len(values)
    blank = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(column), ""), True)  # vectorised: None/""/"  " → True
    values = column.to_pylist()
    for i in pc.indices_nonzero(blank).to_pylist() if pc.any(blank).as_py() else ():
        v = values[i]
        if require:
            if v is None:
                rows.flag(i, name, f"missing {what} (empty cell)")
            elif v == "":
                rows.flag(i, name, f"empty {what}")
            else:
                rows.flag(i, name, f"whitespace-only {what} {v!r}")
        values[i] = None
    for i, v in enumerate(values):
        if v is not None and v.startswith(_NOT_A_STRING):  # JSON value of another type (see _mixed_to_strings)
            rows.flag(i, name, f"expected a string ({what}), got {v[len(_NOT_A_STRING):]}")
            values[i] = None
    return values


def _resolve(p: str, base: str) -> str:
    p = os.path.expanduser(p.strip())
    if not os.path.isabs(p):
        p = os.path.join(base, p)
    return os.path.normpath(p)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _Confinement:
    """Refuses paths whose file lies outside the data root: ``..`` or an absolute path leading out of it, or a
    symlink (the file itself or a folder on the way) pointing out of it. ``root`` is already a real path."""

    def __init__(self, root: str):
        self.root = root
        self._real_dirs: dict[str, str] = {}  # rows share folders: one realpath() per folder, one lstat per file

    def _realpath(self, path: str) -> str:
        folder, name = os.path.split(path)
        real_folder = self._real_dirs.get(folder)
        if real_folder is None:
            real_folder = self._real_dirs[folder] = os.path.realpath(folder)
        real = os.path.join(real_folder, name)
        return os.path.realpath(real) if os.path.islink(real) else real

    def problem(self, raw: str, resolved: str) -> str | None:
        real = self._realpath(resolved)
        if _within(real, self.root):
            return None
        allow = "allow_outside_root=True (data.allow_outside_root: true) permits it"
        if _within(resolved, self.root):
            return f"path {raw!r} goes through a symlink to {real}, outside the data root {self.root}; {allow}"
        return f"path {raw!r} resolves to {resolved}, outside the data root {self.root}; {allow}"


_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]+://")  # http://, https://, s3://, gs://, hf://, ...


def _check_path_column(modality: str, values: list[Any], base: str, rows: _Rows, check_files: bool,
                       workers: int, confine: _Confinement | None) -> list[Any]:
    by_path: dict[str, list[int]] = {}
    out: list[Any] = []
    for i, v in enumerate(values):
        if v is None or i in rows.bad:
            out.append(v if v is None else _resolve(v, base))
            continue
        if _URL.match(v):  # else it would be read as a relative path and reported as a missing local file
            rows.flag(i, modality, f"{v[:80]!r} is a URL; xmodal reads local files only (download them first and "
                                   f"give their paths)")
            out.append(v)
            continue
        r = _resolve(v, base)
        out.append(r)
        outside = confine.problem(v, r) if confine is not None else None
        if outside:
            rows.flag(i, modality, outside)
            continue  # never opened, not even to check it
        by_path.setdefault(r, []).append(i)
    if check_files:
        _file_checks(modality, by_path, rows, workers)
    return out


def _check_feature_column(modality: str, column: pa.ChunkedArray, base: str, rows: _Rows, require: bool,
                          check_files: bool, workers: int, confine: _Confinement | None) -> pa.Array:
    """An ``Image``/``Audio`` feature column: structs {bytes, path}. Embedded bytes are checked in memory, paths
    are resolved and checked like path columns."""
    values = column.to_pylist()
    by_path: dict[str, list[int]] = {}
    out = []
    for i, v in enumerate(values):
        b = v.get("bytes") if isinstance(v, dict) else None
        p = v.get("path") if isinstance(v, dict) else None
        if not b and not p:
            if require:
                rows.flag(i, modality, "missing value (no bytes and no path)")
            out.append(None)
            continue
        if b:
            mod = get_modality(modality)
            if check_files and mod.read_bytes is not None:  # decoded once here, so a bad row is named before training
                try:
                    mod.decode_bytes(b)
                except Exception as e:  # noqa: BLE001
                    rows.flag(i, modality, f"embedded {modality} bytes are unreadable ({type(e).__name__}: {e})")
            out.append({"bytes": b, "path": p})
            continue
        r = _resolve(p, base)
        out.append({"bytes": None, "path": r})
        outside = confine.problem(p, r) if confine is not None else None
        if outside:
            rows.flag(i, modality, outside)
            continue
        by_path.setdefault(r, []).append(i)
    if check_files:
        _file_checks(modality, by_path, rows, workers)
    return pa.array(out, type=column.type)
