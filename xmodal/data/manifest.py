"""Manifests: tables whose columns are named after modalities, read into validated rows (:attr:`Manifest.rows`;
:attr:`Manifest.dataset` gives them as a ``datasets.Dataset``).

A manifest is a CSV/TSV, JSON lines (or a JSON array), Parquet file, a folder written by
``datasets.Dataset.save_to_disk`` (or a ``DatasetDict`` folder, choosing the dict entry with ``split``), or an
in-memory ``datasets.Dataset``. Columns:

* modality columns (:data:`MODALITY_COLUMNS`): ``image`` and ``audio`` hold file paths (relative paths resolve
  against ``root``, default the folder the manifest file — or the saved dataset folder — lies in; ``~`` is
  expanded), ``text`` holds a string. A saved HF dataset
  may also carry ``datasets.Image`` / ``datasets.Audio`` features (embedded bytes or paths). With
  ``allow_outside_root=False`` a path whose file lies outside that data root (``..``, an absolute path elsewhere,
  a symlink pointing out) is a bad row: a manifest from elsewhere cannot make an index (which ``xmodal serve``
  shows) name arbitrary files. By default paths may lie anywhere (absolute paths are the common case).
* optional ``id`` (made from the 1-based data row number when absent; always strings, so ``"007"`` stays ``"007"``),
  ``label`` (kept, as a string), ``split`` (filtered with ``split=``) and any other columns (kept untouched).

:func:`read_manifest` checks every row *before* training — missing or empty values, non-string text, files that
are missing, directories, unreadable or truncated images, duplicate ids — and either raises a
:class:`ManifestError` naming the file, the 1-based data row, its id and the field, or (``on_bad_row="skip"``)
drops the bad rows and reports how many in :attr:`Manifest.skipped`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from ..modalities.registry import get_modality, modality_names
from .checks import _check_feature_column, _check_path_column, _check_string_column, _Confinement, _Rows
from .errors import ManifestError, name_options  # noqa: F401  (xmodal.data.manifest.name_options, as before)
from .formats import _arrow, _hf_datasets, _load
from .formats import label_text  # noqa: F401  (xmodal.data.manifest.label_text, as before)
from .table import Rows

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)


def modality_columns() -> dict[str, str]:
    """Registered modality name → kind of value its column holds: ``path`` (a file) or ``string`` (the value
    itself); ``{"image": "path", "text": "string", "audio": "path"}`` plus any registered by a plugin."""
    return {m: get_modality(m).value for m in modality_names()}


def __getattr__(name):  # MODALITY_COLUMNS: a live view, as plugins may register modalities after import
    if name == "MODALITY_COLUMNS":
        return modality_columns()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


MAX_PROBLEMS = 100  # messages kept in Manifest.problems
_SHOWN_IN_ERROR = 5  # extra bad rows listed in a raised ManifestError


@dataclass
class Manifest:
    # only the kept rows; path columns resolved to absolute strings. A file's strings: :class:`Rows` (no `datasets`
    # import); a source with HF features (Image, Audio, ClassLabel): the ``datasets.Dataset``, which decodes them
    rows: Rows | datasets.Dataset
    source: str  # the manifest path (or "<in-memory dataset>")
    modalities: list[str]  # modality columns present (and checked)
    skipped: int = 0  # rows dropped under on_bad_row="skip"
    problems: list[str] = field(default_factory=list)  # messages of the skipped rows (first MAX_PROBLEMS)
    # the 1-based data row in the source (the file; the dict entry of a DatasetDict) of each kept row, so that a
    # later check names the row as the file numbers it, not its position after the split filter
    row_numbers: list[int] = field(default_factory=list)

    _dataset: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def dataset(self) -> datasets.Dataset:
        """The rows as a ``datasets.Dataset`` (made on first use from :attr:`rows` when they are plain)."""
        if not isinstance(self.rows, Rows):
            return self.rows
        if self._dataset is None:
            self._dataset = _as_dataset(self.rows.data)
        return self._dataset

    def __len__(self) -> int:
        return len(self.rows)

    def where(self, i: int) -> str:
        """``"<source>: row N (id '...')"`` for the ``i``-th kept row: the prefix of every row message."""
        number = self.row_numbers[i] if self.row_numbers else i + 1
        rid = self.rows.select_columns(["id"])[i]["id"] if "id" in self.rows.column_names else None
        return f"{self.source}: row {number}" + (f" (id {rid!r})" if rid not in (None, "") else "")

    def take(self, indices: Sequence[int]) -> "Manifest":
        """The manifest restricted to the kept rows at ``indices`` (their row numbers follow them)."""
        idx = pa.array(list(indices), type=pa.int64())
        table = _arrow(self.rows).take(idx)
        rows = Rows(table) if isinstance(self.rows, Rows) else _as_dataset(table, self.rows.features)
        numbers = [self.row_numbers[i] for i in idx.to_pylist()] if self.row_numbers else []
        return Manifest(rows=rows, source=self.source, modalities=self.modalities, skipped=self.skipped,
                        problems=self.problems, row_numbers=numbers)


def _as_dataset(table: pa.Table, features=None) -> datasets.Dataset:
    import datasets
    from datasets.table import InMemoryTable

    features = features if features is not None else datasets.Features.from_arrow_schema(table.schema)
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features))


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
    allow_outside_root: bool = True,
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
            manifest's folder) — through ``..``, an absolute path or a symlink (the default: your own manifest may
            name files anywhere, as the peers' readers allow). ``False`` confines them: such a row is bad (an
            error, or skipped under ``on_bad_row="skip"``) and its file is never opened — for a manifest someone
            else wrote whose files end up served (``xmodal index`` confines by default; see docs/data.md). An
            in-memory dataset without ``root`` has no data root: its paths are never confined.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if max_rows is not None and max_rows <= 0:
        raise ValueError(f"max_rows must be positive, got {max_rows}")
    table, features, source, base, split_done = _load(path, split)
    if root is not None:
        base = Path(root).expanduser()
    base_s = str(base.resolve())
    in_memory = not isinstance(path, (str, os.PathLike))  # a Dataset or DatasetDict (_load refused anything else)
    confine = None if allow_outside_root or (in_memory and root is None) else _Confinement(base_s)
    columns = table.column_names
    cols_txt = ", ".join(columns) or "none"
    if len(set(columns)) != len(columns):
        dup = sorted({c for c in columns if columns.count(c) > 1})
        raise ManifestError(f"manifest {source}: duplicate column name(s) {dup}")

    # ---- which modalities
    known = modality_columns()
    if modalities is None:
        mods = [m for m in known if m in columns]
        if not mods:
            raise ManifestError(f"manifest {source} has no modality column (expected one of "
                                f"{', '.join(known)}; columns: {cols_txt})")
    else:
        mods = list(dict.fromkeys([modalities] if isinstance(modalities, str) else modalities))
        for m in mods:
            if m not in known:
                raise ManifestError(f"manifest {source}: unknown modality {m!r} (known: "
                                    f"{', '.join(known)})")
            if m not in columns:
                raise ManifestError(f"manifest {source} has no column {m!r} (columns: {cols_txt})")

    n_total = table.num_rows
    all_row_numbers = pa.array(range(1, n_total + 1), type=pa.int64())

    # ---- ids (whole file: an id repeated in another split is a leak worth knowing about)
    dup_drop: dict[int, str] = {}  # original row index → message, for later duplicates
    if "id" in columns:
        id_col = table.column("id")
        if not (pa.types.is_string(id_col.type) or pa.types.is_large_string(id_col.type)):
            if features is not None and isinstance(features.get("id"), _hf_datasets().ClassLabel):
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
    hf = _hf_datasets() if features is not None else None  # HF features came with the source: datasets is imported
    strings = ["id"]  # the columns kept as plain strings (below: Value("string") features, or a cast to pa.string())
    for m in mods:
        col = table.column(m)
        feat = feats.get(m)
        hf_feature = getattr(hf, get_modality(m).hf_feature or "", None) if hf is not None else None
        if hf_feature is not None and isinstance(feat, hf_feature) and pa.types.is_struct(col.type):
            new_columns[m] = _check_feature_column(m, col, base_s, rows, require_all, check_files, workers,
                                                   confine)
            if isinstance(feat, hf.Image):  # rows yield PIL images, which image transforms accept
                feats[m] = hf.Image(mode=feat.mode, decode=True)
            continue
        what = "text" if known[m] == "string" else "path"
        values = _check_string_column(m, col, rows, require_all, what)
        if known[m] == "path":
            values = _check_path_column(m, values, base_s, rows, check_files, workers, confine)
        new_columns[m] = pa.array(values, type=pa.string())
        strings.append(m)

    # label: kept, as a string (ClassLabel ints become their names, a list of labels ``a|b``; see label_text)
    if "label" in table.column_names:
        lab = table.column("label")
        feat = feats.get("label")
        inner = getattr(feat, "feature", None)  # Sequence(ClassLabel): a multi-label column of class ids
        label_class = hf.ClassLabel if hf is not None else ()  # no HF features: no class names
        names = feat.names if isinstance(feat, label_class) else (
            inner.names if isinstance(inner, label_class) else None)
        if names is not None:
            name = lambda v: [names[i] for i in v] if isinstance(v, list) else names[v]  # noqa: E731
            new_columns["label"] = pa.array([None if v is None else label_text(name(v)) for v in lab.to_pylist()],
                                            type=pa.string())
        elif not pa.types.is_string(lab.type):
            new_columns["label"] = pc.cast(lab, pa.string()) if pa.types.is_integer(lab.type) else pa.array(
                [None if v is None else label_text(v) for v in lab.to_pylist()], type=pa.string())
        strings.append("label")
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

    if hf is None:  # a file's strings: plain rows, no features to decode (and no datasets import)
        schema = pa.schema([f.with_type(pa.string()) if f.name in strings else f for f in table.schema])
        rows: Rows | datasets.Dataset = Rows(table.cast(schema) if schema != table.schema else table)
    else:
        feats.update({c: hf.Value("string") for c in strings})
        final_features = hf.Features({c: feats[c] if c in feats else _infer(hf, table, c)
                                      for c in table.column_names})
        table = table.cast(final_features.arrow_schema) if table.schema != final_features.arrow_schema else table
        rows = _as_dataset(table, final_features)
    return Manifest(rows=rows, source=source, modalities=mods, skipped=len(bad), problems=problems[:MAX_PROBLEMS],
                    row_numbers=row_numbers)


def _infer(hf, table: pa.Table, column: str):
    return hf.Features.from_arrow_schema(pa.schema([table.schema.field(column)]))[column]


def split_values(path: str | os.PathLike | datasets.Dataset | datasets.DatasetDict) -> set[str]:
    """The values of a manifest's ``split`` column (for a ``DatasetDict``, its entries); empty without one. Reads
    the table only: no row is checked."""
    hf = _hf_datasets()
    if hf is not None and isinstance(path, hf.DatasetDict):
        return set(path.keys())
    if isinstance(path, (str, os.PathLike)) and Path(path).expanduser().is_dir():
        import datasets

        obj = datasets.load_from_disk(str(Path(path).expanduser()))
        if isinstance(obj, datasets.DatasetDict):
            return set(obj.keys())
    table = _load(path, None)[0]
    if "split" not in table.column_names:
        return set()
    return {str(v) for v in pc.unique(table.column("split")).to_pylist() if v is not None}
