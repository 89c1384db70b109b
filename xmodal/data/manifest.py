"""Manifests: tables whose columns are named after modalities, read into a validated ``datasets.Dataset``.

A manifest is a CSV/TSV, JSON lines (or a JSON array), Parquet file, a folder written by
``datasets.Dataset.save_to_disk`` (or a ``DatasetDict`` folder, choosing the dict entry with ``split``), or an
in-memory ``datasets.Dataset``. Columns:

* modality columns (:data:`MODALITY_COLUMNS`): ``image`` and ``audio`` hold file paths (relative paths resolve
  against ``root``, default the folder the manifest file — or the saved dataset folder — lies in; ``~`` is
  expanded), ``text`` holds a string. A saved HF dataset
  may also carry ``datasets.Image`` / ``datasets.Audio`` features (embedded bytes or paths). A path whose file lies
  outside that data root (``..``, an absolute path elsewhere, a symlink pointing out) is a bad row unless
  ``allow_outside_root=True``: a manifest from elsewhere cannot make training read arbitrary files.
* optional ``id`` (made from the 1-based data row number when absent; always strings, so ``"007"`` stays ``"007"``),
  ``label`` (kept, as a string), ``split`` (filtered with ``split=``) and any other columns (kept untouched).

:func:`read_manifest` checks every row *before* training — missing or empty values, non-string text, files that
are missing, directories, unreadable or truncated images, duplicate ids — and either raises a
:class:`ManifestError` naming the file, the 1-based data row, its id and the field, or (``on_bad_row="skip"``)
drops the bad rows and reports how many in :attr:`Manifest.skipped`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import wave
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import datasets
import pyarrow as pa
import pyarrow.compute as pc
from datasets.table import InMemoryTable

log = logging.getLogger(__name__)

MODALITY_COLUMNS: dict[str, str] = {"image": "path", "text": "string", "audio": "path"}
"""Modality name → kind of value its column holds: ``path`` (a file) or ``string`` (the value itself)."""

MAX_PROBLEMS = 100  # messages kept in Manifest.problems
_SHOWN_IN_ERROR = 5  # extra bad rows listed in a raised ManifestError
_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}


class ManifestError(ValueError):
    """A manifest cannot be read, or one of its rows is unusable.

    The message always names the manifest file and, for a row problem, the 1-based data row number, the row's
    ``id`` and the field, e.g. ``data/train.csv: row 12 (id '0042'): field 'image': file not found: /data/x.png``.
    """


@dataclass
class Manifest:
    dataset: datasets.Dataset  # only the kept rows; path columns resolved to absolute strings
    source: str  # the manifest path (or "<in-memory dataset>")
    modalities: list[str]  # modality columns present (and checked)
    skipped: int = 0  # rows dropped under on_bad_row="skip"
    problems: list[str] = field(default_factory=list)  # messages of the skipped rows (first MAX_PROBLEMS)
    # the 1-based data row in the source (the file; the dict entry of a DatasetDict) of each kept row, so that a
    # later check names the row as the file numbers it, not its position after the split filter
    row_numbers: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.dataset)

    def where(self, i: int) -> str:
        """``"<source>: row N (id '...')"`` for the ``i``-th kept row: the prefix of every row message."""
        number = self.row_numbers[i] if self.row_numbers else i + 1
        rid = self.dataset.select_columns(["id"])[i]["id"] if "id" in self.dataset.column_names else None
        return f"{self.source}: row {number}" + (f" (id {rid!r})" if rid not in (None, "") else "")

    def take(self, indices: Sequence[int]) -> "Manifest":
        """The manifest restricted to the kept rows at ``indices`` (their row numbers follow them)."""
        idx = pa.array(list(indices), type=pa.int64())
        table = _arrow(self.dataset).take(idx)
        ds = datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=self.dataset.features))
        numbers = [self.row_numbers[i] for i in idx.to_pylist()] if self.row_numbers else []
        return Manifest(dataset=ds, source=self.source, modalities=self.modalities, skipped=self.skipped,
                        problems=self.problems, row_numbers=numbers)


# ---------------------------------------------------------------------------------------------------------- loading

def _load_csv(path: Path, sep: str) -> pa.Table:
    """Every column as a string (ids like "007" stay intact, empty cells are ""). pandas is what
    ``Dataset.from_csv`` uses underneath; calling it directly avoids an Arrow cache copy per manifest in
    ~/.cache/huggingface and any stale-cache question when a manifest is edited in place."""
    import pandas as pd

    try:
        # header=None: pandas would rename a repeated column name ("image", "image.1") instead of reporting it
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig",
                         header=None)
    except pd.errors.EmptyDataError:
        raise ManifestError(f"manifest {path} is empty (expected a header line with column names)") from None
    except pd.errors.ParserError as e:
        fmt = "TSV" if sep == "\t" else "CSV"
        raise ManifestError(f"manifest {path}: cannot parse as {fmt}: {e}") from None
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    names = [str(c).strip() for c in df.iloc[0]]
    dup = sorted({c for c in names if names.count(c) > 1})
    if dup:  # also "text" and " text ": the same name once stripped
        raise ManifestError(f"manifest {path}: duplicate column name(s) {dup} in the header line")
    df = df.iloc[1:].reset_index(drop=True)
    df.columns = names
    return pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None)


_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(obj: Any, where: str) -> str | None:
    """The field holding a string with an unpaired surrogate (JSON can escape one: "\\ud800"), or None."""
    if isinstance(obj, str):
        return where if _SURROGATE.search(obj) else None
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _lone_surrogate(k, f"{where}key {k!r}") or _lone_surrogate(v, f"{where}{k}" if not where else
                                                                                   f"{where}.{k}")
            if found:
                return found
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            found = _lone_surrogate(v, f"{where}[{i}]")
            if found:
                return found
    return None


def _check_surrogates(path: Path, records: list[Any], where: list[str]) -> None:
    """Arrow strings are UTF-8, which cannot hold a lone surrogate: report it by row and field, not as an encoder
    crash. Only called when the raw text has a surrogate escape (emoji escapes come in valid pairs)."""
    for i, rec in enumerate(records):
        found = _lone_surrogate(rec, "")
        if found:
            raise ManifestError(f"manifest {path}: {where[i]}row {i + 1}: field {found!r}: a string holds an "
                                f"unpaired surrogate escape (\\ud800-\\udfff), which is not valid Unicode")


def _json_records(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ManifestError(f"manifest {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    stripped = text.lstrip()
    if not stripped:
        raise ManifestError(f"manifest {path} is empty")
    surrogates = _ESCAPED_SURROGATE.search(text) is not None
    if stripped[0] == "[":  # one JSON array of objects
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest {path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if surrogates and isinstance(records, list):
            _check_surrogates(path, records, [""] * len(records))
        return records
    records, linenos = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest {path}: line {lineno} (row {len(records) + 1}): invalid JSON: "
                                f"{e.msg}") from None
        linenos.append(f"line {lineno} ")
    if surrogates:
        _check_surrogates(path, records, linenos)
    return records


def _json_table(path: Path) -> pa.Table:
    """JSON lines (or one JSON array) → an Arrow table. Parsed row by row rather than with ``Dataset.from_json``
    so that a bad line is reported by number and a non-string ``text`` value becomes a row error instead of an
    Arrow type error for the whole file."""
    records = _json_records(path)
    if not records:
        raise ManifestError(f"manifest {path} has no rows")
    columns: dict[str, None] = {}
    for i, rec in enumerate(records, 1):
        if not isinstance(rec, dict):
            raise ManifestError(f"manifest {path}: row {i}: expected a JSON object, got {type(rec).__name__}")
        for k in rec:
            columns.setdefault(str(k).strip(), None)
    arrays = {}
    for name in columns:
        values = [rec.get(name) for rec in records]
        kind = MODALITY_COLUMNS.get(name)
        if kind is not None or name in ("id", "label", "split"):
            # keep what we can check per row: strings stay, anything else is recorded as a marked object
            arrays[name] = _mixed_to_strings(values, strict=kind is not None)
            continue
        try:
            arrays[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            arrays[name] = pa.array([v if v is None or isinstance(v, str) else json.dumps(v) for v in values])
    return pa.table(arrays)


_NOT_A_STRING = "\x00xmodal-not-a-string\x00"


def name_options(message: str, on_bad_row: str, skip: str, allow: str | None = None) -> str:
    """A :class:`ManifestError` message with its hints spelt as the caller's user sets them, not as
    :func:`read_manifest`'s Python arguments: ``skip`` for ``on_bad_row='skip'`` (``--on-bad-row skip``,
    ``data.on_bad_row=skip``), ``allow`` for ``allow_outside_root=True`` (None: kept). A bad row met with
    ``on_bad_row="error"`` gets the ``skip`` hint on its first line."""
    if allow is not None:
        message = re.sub(r"allow_outside_root=True(?: \(data\.allow_outside_root: true\))?", allow, message)
    message = re.sub(r"on_bad_row=(['\"]?)skip\1", skip, message)
    first, nl, rest = message.partition("\n")
    if on_bad_row == "error" and skip not in message and re.search(r": row \d+\b", first):
        first += f" ({skip} drops bad rows)"
    return first + nl + rest


def label_text(value: Any) -> str:
    """A label cell as the class name it stands for. A whole float is written as an integer, so the label ``1.0``
    that Parquet or pandas-written JSONL hold is class ``"1"``, as the same label read from a CSV; a list (a
    multi-label cell in JSONL, Parquet or an HF ``Sequence``) becomes ``a|b``."""
    if isinstance(value, (list, tuple)):
        return "|".join(label_text(v) for v in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else str(value)


def _mixed_to_strings(values: list[Any], strict: bool) -> pa.Array:
    """Strings stay; None stays. For modality columns (``strict``) other types are encoded so the row check can
    report them ('expected a string, got int 5'); for id/label/split numbers become their str()."""
    out = []
    for v in values:
        if v is None or isinstance(v, str):
            out.append(v)
        elif strict:
            out.append(f"{_NOT_A_STRING}{type(v).__name__} {json.dumps(v)[:60]}")
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float)) for x in v):
            out.append(label_text(v))  # a multi-label cell
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            out.append(json.dumps(v))
        else:
            out.append(label_text(v))
    return pa.array(out, type=pa.string())


def _load(path: Any, split: str | None) -> tuple[pa.Table, datasets.Features | None, str, Path, bool]:
    """→ (table, HF features or None, source name, base folder for relative paths, split_already_applied)."""
    if isinstance(path, datasets.DatasetDict):
        return _from_dict(path, split, "<in-memory DatasetDict>", Path.cwd())
    if isinstance(path, datasets.Dataset):
        return _arrow(path), path.features, "<in-memory dataset>", Path.cwd(), False
    if not isinstance(path, (str, os.PathLike)):
        raise ManifestError(f"manifest must be a path or a datasets.Dataset, got {type(path).__name__}")
    p = Path(path).expanduser()
    source = str(path)
    if not p.exists():
        raise ManifestError(f"manifest {source}: file not found")
    if p.is_dir():
        try:
            obj = datasets.load_from_disk(str(p))
        except FileNotFoundError as e:
            raise ManifestError(f"manifest {source}: a folder, but not one written by datasets' save_to_disk "
                                f"({e})") from None
        # relative paths resolve against the folder holding the dataset folder, as for a manifest file
        if isinstance(obj, datasets.DatasetDict):
            return _from_dict(obj, split, source, p.parent)
        return _arrow(obj), obj.features, source, p.parent, False
    suffix = p.suffix.lower()
    if suffix in _CSV_SUFFIXES:
        return _load_csv(p, _CSV_SUFFIXES[suffix]), None, source, p.parent, False
    if suffix in _JSON_SUFFIXES:
        return _json_table(p), None, source, p.parent, False
    if suffix in _PARQUET_SUFFIXES:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(p)
        except (pa.ArrowInvalid, OSError) as e:
            raise ManifestError(f"manifest {source}: cannot read as Parquet: {e}") from None
        features = None
        try:
            features = datasets.Features.from_arrow_schema(table.schema)
        except Exception:  # noqa: BLE001 - plain Parquet without HF metadata
            pass
        return table.replace_schema_metadata(None), features, source, p.parent, False
    raise ManifestError(f"manifest {source}: unknown format {suffix!r} (expected .csv, .tsv, .jsonl, .json, "
                        f".parquet or a folder written by datasets' save_to_disk)")


def _arrow(ds: datasets.Dataset) -> pa.Table:
    return ds.with_format("arrow")[:] if len(ds) else ds.data.table.slice(0, 0)


def _from_dict(dd: datasets.DatasetDict, split: str | None, source: str, base: Path):
    keys = list(dd.keys())
    if split is None:
        if len(keys) != 1:
            raise ManifestError(f"manifest {source} is a DatasetDict with splits {keys}: choose one with split=")
        split = keys[0]
    if split not in dd:
        raise ManifestError(f"manifest {source}: no split {split!r} (splits present: {', '.join(keys)})")
    ds = dd[split]
    return _arrow(ds), ds.features, source, base, True


# ------------------------------------------------------------------------------------------------------- row checks

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


def _check_image(path: str) -> str | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            fmt = im.format
            if fmt == "JPEG":
                # verify() does not look at JPEG scans. A file ending in the EOI marker is complete (O(1) check);
                # otherwise (truncated, or trailing bytes after EOI) decode at 1/8 scale to be sure.
                with open(path, "rb") as f:
                    f.seek(-2, os.SEEK_END)
                    complete = f.read(2) == b"\xff\xd9"
                if not complete:
                    im.draft("RGB", (32, 32))
                    im.load()
            else:
                im.verify()  # PNG: walks every chunk and checks its CRC (catches truncated files)
        if fmt not in ("PNG", "JPEG"):
            with Image.open(path) as im:
                im.load()
    except UnidentifiedImageError:
        return f"not a readable image: {path}"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged files
        return f"unreadable or truncated image ({type(e).__name__}: {e}): {path}"
    return None


def _check_audio(path: str) -> str | None:
    """The file's header must parse (libsndfile via soundfile: WAV incl. float/extensible, FLAC, OGG, MP3, AIFF,
    ...) and announce at least one frame. Only the header is read (O(1) per file); samples are decoded at training
    time, where :class:`xmodal.modalities.audio.AudioError` names a file whose data turns out to be bad. Without
    soundfile installed, only WAV files are checked (stdlib ``wave``, integer PCM only)."""
    try:
        import soundfile as sf
    except ImportError:
        sf = None
    if sf is not None:
        try:
            info = sf.info(path)
        except Exception as e:  # noqa: BLE001 - soundfile.LibsndfileError and friends
            reason = str(e).strip() or type(e).__name__
            reason = reason.split(": ", 1)[-1] if reason.startswith("Error opening") else reason
            return f"unreadable audio file ({reason}): {path}"
        if info.frames <= 0:
            return f"audio file has no samples (0 frames): {path}"
        if info.samplerate <= 0 or info.channels <= 0:
            return f"audio file has an invalid header ({info.samplerate} Hz, {info.channels} channels): {path}"
        return None
    if path.lower().endswith(".wav"):
        try:
            with wave.open(path, "rb") as w:
                if w.getnframes() == 0:
                    return f"WAV file has no audio frames: {path}"
        except (wave.Error, EOFError) as e:
            return f"unreadable WAV file ({e}): {path}"
    return None


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
    if kind_modality == "image":
        return _check_image(path)
    if kind_modality == "audio":
        return _check_audio(path)
    return None


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
    import io

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
            if check_files and modality == "image":
                from PIL import Image

                try:
                    with Image.open(io.BytesIO(b)) as im:
                        im.verify()
                except Exception as e:  # noqa: BLE001
                    rows.flag(i, modality, f"embedded image bytes are unreadable ({type(e).__name__}: {e})")
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


# ---------------------------------------------------------------------------------------------------------- reading

def read_manifest(
    path: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    *,
    split: str | None = None,
    modalities: Sequence[str] | None = None,
    root: str | os.PathLike | None = None,
    on_bad_row: Literal["error", "skip"] = "error",
    max_rows: int | None = None,
    check_files: bool = True,
    require_all: bool = True,
    workers: int = 8,
    allow_outside_root: bool = False,
) -> Manifest:
    """Read and validate a manifest; see the module docstring for formats and checks.

    Args:
        split: keep rows whose ``split`` column equals this (for a ``DatasetDict`` folder: the dict entry).
        modalities: modality columns required; ``None`` = every modality column present.
        root: base folder for relative paths (default: the manifest's folder; the cwd for in-memory datasets).
        on_bad_row: ``"error"`` raises on the first bad row (naming how many more there are); ``"skip"`` drops
            bad rows and counts them in ``Manifest.skipped`` (messages in ``Manifest.problems``).
        max_rows: keep the first N rows after the split filter.
        check_files: check that path values are readable files (images opened and verified) — per distinct file,
            in a thread pool of ``workers``.
        require_all: every requested modality must be present in every row; with ``False`` empty cells are
            accepted (stored as ``None``) but non-empty values are still validated.
        allow_outside_root: accept path values whose file lies outside the data root (``root``, default the
            manifest's folder) — through ``..``, an absolute path or a symlink. By default such a row is bad (an
            error, or skipped under ``on_bad_row="skip"``). An in-memory dataset without ``root`` has no data root:
            its paths are not confined.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if max_rows is not None and max_rows <= 0:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    table, features, source, base, split_done = _load(path, split)
    if root is not None:
        base = Path(root).expanduser()
    base_s = str(base.resolve())
    in_memory = isinstance(path, (datasets.Dataset, datasets.DatasetDict))
    confine = None if allow_outside_root or (in_memory and root is None) else _Confinement(base_s)
    columns = table.column_names
    cols_txt = ", ".join(columns) or "none"
    if len(set(columns)) != len(columns):
        dup = sorted({c for c in columns if columns.count(c) > 1})
        raise ManifestError(f"manifest {source}: duplicate column name(s) {dup}")

    # ---- which modalities
    if modalities is None:
        mods = [m for m in MODALITY_COLUMNS if m in columns]
        if not mods:
            raise ManifestError(f"manifest {source} has no modality column (expected one of "
                                f"{', '.join(MODALITY_COLUMNS)}; columns: {cols_txt})")
    else:
        mods = list(dict.fromkeys([modalities] if isinstance(modalities, str) else modalities))
        for m in mods:
            if m not in MODALITY_COLUMNS:
                raise ManifestError(f"manifest {source}: unknown modality {m!r} (known: "
                                    f"{', '.join(MODALITY_COLUMNS)})")
            if m not in columns:
                raise ManifestError(f"manifest {source} has no column {m!r} (columns: {cols_txt})")

    n_total = table.num_rows
    all_row_numbers = pa.array(range(1, n_total + 1), type=pa.int64())

    # ---- ids (whole file: an id repeated in another split is a leak worth knowing about)
    dup_drop: dict[int, str] = {}  # original row index → message, for later duplicates
    if "id" in columns:
        id_col = table.column("id")
        if not (pa.types.is_string(id_col.type) or pa.types.is_large_string(id_col.type)):
            if features is not None and isinstance(features.get("id"), datasets.ClassLabel):
                id_col = pa.chunked_array([pa.array(features["id"].int2str(id_col.to_pylist()))])
            id_col = pc.cast(id_col, pa.string())
        all_ids = id_col.to_pylist()
        first_seen: dict[str, int] = {}
        for i, v in enumerate(all_ids):
            if v is None or v.strip() == "":
                continue  # flagged as an empty id below
            j = first_seen.setdefault(v, i)
            if j != i:
                dup_drop[i] = (f"{source}: row {i + 1} (id {v!r}): field 'id': duplicate id {v!r} "
                               f"(first used in row {j + 1})")
        table = table.set_column(columns.index("id"), "id", id_col)
    else:
        all_ids = [str(i) for i in range(1, n_total + 1)]
        table = table.append_column("id", pa.array(all_ids, type=pa.string()))

    # ---- split filter, then max_rows
    keep_idx: pa.Array | None = None
    if split is not None and not split_done:
        if "split" not in columns:
            raise ManifestError(f"manifest {source} has no column 'split' to select split={split!r} from "
                                f"(columns: {cols_txt})")
        split_col = table.column("split")
        if not pa.types.is_string(split_col.type):
            split_col = pc.cast(split_col, pa.string())
        mask = pc.fill_null(pc.equal(split_col, split), False)
        keep_idx = pc.indices_nonzero(mask)
        if len(keep_idx) == 0:
            present = sorted(v for v in pc.unique(split_col).to_pylist() if v is not None)
            raise ManifestError(f"manifest {source}: no rows with split {split!r} (splits present: "
                                f"{', '.join(map(repr, present)) or 'none'})")
    if keep_idx is None:
        keep_idx = pa.array(range(n_total), type=pa.int64())
    if max_rows is not None:
        keep_idx = keep_idx.slice(0, max_rows)
    if len(keep_idx) != n_total:
        table = table.take(keep_idx)
    positions = keep_idx.to_pylist()
    if table.num_rows == 0:
        raise ManifestError(f"manifest {source} has no rows")
    rows = _Rows(source, pc.take(all_row_numbers, keep_idx).to_pylist(), [all_ids[k] for k in positions])

    # ---- per-row checks
    for i, k in enumerate(positions):
        if k in dup_drop:
            rows.bad[i] = dup_drop[k]
    if "id" in columns:
        for i, v in enumerate(rows.ids):
            if v is None or v.strip() == "":
                rows.flag(i, "id", "empty id")
    new_columns: dict[str, pa.Array | list] = {}
    feats = dict(features) if features is not None else {}
    for m in mods:
        col = table.column(m)
        feat = feats.get(m)
        if isinstance(feat, (datasets.Image, datasets.Audio)) and pa.types.is_struct(col.type):
            new_columns[m] = _check_feature_column(m, col, base_s, rows, require_all, check_files, workers,
                                                   confine)
            if isinstance(feat, datasets.Image):  # rows yield PIL images, which image transforms accept
                feats[m] = datasets.Image(mode=feat.mode, decode=True)
            continue
        what = "text" if MODALITY_COLUMNS[m] == "string" else "path"
        values = _check_string_column(m, col, rows, require_all, what)
        if MODALITY_COLUMNS[m] == "path":
            values = _check_path_column(m, values, base_s, rows, check_files, workers, confine)
        new_columns[m] = pa.array(values, type=pa.string())
        feats[m] = datasets.Value("string")

    # label: kept, as a string (ClassLabel ints become their names, a list of labels ``a|b``; see label_text)
    if "label" in table.column_names:
        lab = table.column("label")
        feat = feats.get("label")
        inner = getattr(feat, "feature", None)  # Sequence(ClassLabel): a multi-label column of class ids
        names = feat.names if isinstance(feat, datasets.ClassLabel) else (
            inner.names if isinstance(inner, datasets.ClassLabel) else None)
        if names is not None:
            name = lambda v: [names[i] for i in v] if isinstance(v, list) else names[v]  # noqa: E731
            new_columns["label"] = pa.array([None if v is None else label_text(name(v)) for v in lab.to_pylist()],
                                            type=pa.string())
        elif not pa.types.is_string(lab.type):
            new_columns["label"] = pc.cast(lab, pa.string()) if pa.types.is_integer(lab.type) else pa.array(
                [None if v is None else label_text(v) for v in lab.to_pylist()], type=pa.string())
        feats["label"] = datasets.Value("string")
    feats["id"] = datasets.Value("string")
    for name, arr in new_columns.items():
        table = table.set_column(table.column_names.index(name), name, arr)

    # ---- drop or raise
    bad = sorted(rows.bad)
    problems = [rows.bad[i] for i in bad]
    if bad and on_bad_row == "error":
        msg = problems[0]
        if len(problems) > 1:
            more = "\n  ".join(problems[1:1 + _SHOWN_IN_ERROR])
            msg += (f"\n({len(problems) - 1} more bad row(s) in {source}; on_bad_row='skip' drops them)"
                    f"\n  {more}" + ("\n  ..." if len(problems) > 1 + _SHOWN_IN_ERROR else ""))
        raise ManifestError(msg)
    row_numbers = rows.row_numbers
    if bad:
        good = sorted(set(range(table.num_rows)) - set(bad))
        if not good:
            raise ManifestError(f"manifest {source}: every selected row is bad ({len(bad)} rows); first: "
                                f"{problems[0]}")
        table = table.take(pa.array(good, type=pa.int64()))
        row_numbers = [row_numbers[i] for i in good]
        log.warning("%s: skipped %d bad row(s) of %d; first: %s", source, len(bad), len(positions), problems[0])

    final_features = datasets.Features({c: feats[c] if c in feats else _infer(table, c)
                                        for c in table.column_names})
    table = table.cast(final_features.arrow_schema) if table.schema != final_features.arrow_schema else table
    ds = datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=final_features))
    return Manifest(dataset=ds, source=source, modalities=mods, skipped=len(bad), problems=problems[:MAX_PROBLEMS],
                    row_numbers=row_numbers)


def _infer(table: pa.Table, column: str):
    return datasets.Features.from_arrow_schema(pa.schema([table.schema.field(column)]))[column]
