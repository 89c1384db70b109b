"""Manifest formats → one Arrow table: CSV/TSV (every column a string), JSON lines or a JSON array (row by row,
so a bad line is named), Parquet, folders written by ``datasets``' ``save_to_disk`` and in-memory datasets."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ..modalities.registry import get_modality, modality_names
from .errors import ManifestError
from .table import Rows

if TYPE_CHECKING:
    import datasets

_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_JSON_SUFFIXES = {".jsonl", ".json", ".ndjson"}
_PARQUET_SUFFIXES = {".parquet", ".pq"}


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
    columns_kind = {m: get_modality(m).value for m in modality_names()}  # checked per row, strictly
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
        kind = columns_kind.get(name)
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


def _hf_datasets():
    """The ``datasets`` module if something has imported it, else None: an in-memory ``Dataset`` cannot exist without
    it, so a file manifest's reading never imports it (~0.2 s of every command's start-up; see xmodal.data.table)."""
    return sys.modules.get("datasets")


def _load(path: Any, split: str | None) -> tuple[pa.Table, datasets.Features | None, str, Path, bool]:
    """→ (table, HF features or None, source name, base folder for relative paths, split_already_applied)."""
    hf = _hf_datasets()
    if hf is not None and isinstance(path, hf.DatasetDict):
        return _from_dict(path, split, "<in-memory DatasetDict>", Path.cwd())
    if hf is not None and isinstance(path, hf.Dataset):
        return _arrow(path), path.features, "<in-memory dataset>", Path.cwd(), False
    if not isinstance(path, (str, os.PathLike)):
        raise ManifestError(f"manifest must be a path or a datasets.Dataset, got {type(path).__name__}")
    p = Path(path).expanduser()
    source = str(path)
    if not p.exists():
        raise ManifestError(f"manifest {source}: file not found")
    if p.is_dir():
        import datasets

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
        if b"huggingface" in (table.schema.metadata or {}):  # written by datasets: its features (Image, ClassLabel)
            import datasets

            try:
                features = datasets.Features.from_arrow_schema(table.schema)
            except Exception:  # noqa: BLE001 - metadata datasets cannot read: the plain columns
                pass
        return table.replace_schema_metadata(None), features, source, p.parent, False
    raise ManifestError(f"manifest {source}: unknown format {suffix!r} (expected .csv, .tsv, .jsonl, .json, "
                        f".parquet or a folder written by datasets' save_to_disk)")


def _arrow(ds: datasets.Dataset | Rows) -> pa.Table:
    if isinstance(ds, Rows):
        return ds.data
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
