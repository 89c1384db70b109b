"""Writing a manifest's rows as WebDataset tar shards (``xmodal shard``), in the layout open_clip and img2dataset use.

Row ``i`` becomes sample key ``000000000i`` (9 digits, as img2dataset names them): each modality cell one member —
a file-valued modality's file as it is, under its own extension (``.jpg``, ``.png``, ``.flac``, ...; it must be one
of the modality's registered ``shard_keys``), a string-valued one as UTF-8 under its first shard key (``.txt``) —
and ``KEY.json`` holding the row's ``id`` and its other columns (``label``, ``split``, ...). Shards are
``00000.tar``, ``00001.tar``, ... of ``samples_per_shard`` samples, each written to a temporary name and renamed
when complete; ``checksums.json`` (each tar's size, XXH3-128 and sample count, sealed: what readers check a shard
against, :func:`xmodal.data.shards.shard_list`) next, and ``sizes.json`` (open_clip's sample-count index,
``{"00000.tar": n}``) last.

Rows are checked as they are written (the file still there, not empty, its modality's check): a bad row is left
out and reported with the manifest row and field; nothing is read twice.
"""
from __future__ import annotations

import io
import itertools
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..atomic import fsync_dir, replacing, write_text
from ..integrity import file_record, seal
from .errors import ManifestError
from .manifest import Manifest
from .shards import CHECKSUMS_NAME, SIZES_NAME


@dataclass
class ShardReport:
    shards: list[Path] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)  # "<manifest>: row N (id ...): field 'image': <what>"

    @property
    def samples(self) -> int:
        return sum(self.sizes.values())


def _members(row: dict[str, Any], modalities: Sequence[str]) -> dict[str, bytes]:
    """``{extension: bytes}`` of a row's modality cells; raises ``ValueError("field 'x': what")`` on a bad one."""
    from ..modalities import get_modality

    out = {}
    for name in modalities:
        value, modality = row.get(name), get_modality(name)
        if value in (None, ""):
            continue  # the row lacks this modality; a reader decides whether it needs it
        if modality.value == "string":
            out[modality.shard_keys[0] if modality.shard_keys else name] = str(value).encode("utf-8")
            continue
        ext = Path(value).suffix.lower().lstrip(".")
        if ext not in modality.shard_keys:
            raise ValueError(f"field '{name}': a .{ext} file; shards hold {name} as "
                             f"{', '.join('.' + k for k in modality.shard_keys) or '(no shard key registered)'}")
        try:
            data = Path(value).read_bytes()
        except OSError as e:
            raise ValueError(f"field '{name}': cannot read {value} ({e.strerror or e})") from None
        problem = "empty file" if not data else modality.check(value)
        if problem:
            raise ValueError(f"field '{name}': {problem}")
        out[ext] = data
    if not out:
        raise ValueError(f"no value in any of the columns {', '.join(modalities)}")
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0  # reproducible bytes for the same rows
    tar.addfile(info, io.BytesIO(data))


def write_shards(manifest: Manifest, out_dir: str | os.PathLike, samples_per_shard: int,
                 modalities: Sequence[str] | None = None,
                 progress: Callable[[int], None] | None = None, stop_on_bad: bool = False) -> ShardReport:
    """Every row of ``manifest`` into shards under ``out_dir`` (see the module docstring); ``progress(n)`` is called
    after each row. Returns the shards, their sizes and the bad rows left out; ``stop_on_bad``: the first bad row
    raises a ``ManifestError`` instead (the shards finished so far stay, complete)."""
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard: must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = ShardReport()
    samples = _samples(manifest, list(modalities or manifest.modalities), report, progress, stop_on_bad)
    while chunk := list(itertools.islice(samples, samples_per_shard)):
        path = out / f"{len(report.shards):05d}.tar"
        with replacing(path) as tmp, tarfile.open(tmp, "w") as tar:
            for sample in chunk:
                for name, blob in sample:
                    _add(tar, name, blob)
        report.shards.append(path)
        report.sizes[path.name] = len(chunk)
    records = {p.name: {"samples": report.sizes[p.name], **file_record(p)} for p in report.shards}
    write_text(out / CHECKSUMS_NAME, json.dumps(seal({"format": 1, "shards": records}), indent=1) + "\n")
    write_text(out / SIZES_NAME, json.dumps(report.sizes, indent=1) + "\n")
    fsync_dir(out)
    return report


def _samples(manifest: Manifest, modalities: list[str], report: ShardReport,
             progress: Callable[[int], None] | None, stop_on_bad: bool) -> Iterator[list[tuple[str, bytes]]]:
    """Each good row's tar members ``[(KEY.ext, bytes), ...]``; bad rows go to ``report.bad``."""
    data = manifest.rows
    meta_columns = [c for c in data.column_names if c not in modalities]
    key = 0
    for i, row in enumerate(data):
        try:
            members = _members(row, modalities)
        except ValueError as e:
            report.bad.append(f"{manifest.where(i)}: {e}")
            if stop_on_bad:
                raise ManifestError(f"{report.bad[-1]} (--on-bad-row skip leaves bad rows out)") from None
            members = None
        if progress is not None:
            progress(1)
        if members is None:
            continue
        name = f"{key:09d}"
        meta = {c: row[c] for c in meta_columns if row[c] is not None}
        meta["id"] = str(meta.get("id", name))
        key += 1
        yield ([(f"{name}.{ext}", blob) for ext, blob in sorted(members.items())]
               + [(f"{name}.json", json.dumps(meta, default=str).encode("utf-8"))])
