"""Hugging Face ``datasets`` as a streaming source (``data.hf_dataset``): a local dataset folder, data files given by
``data.hf_data_files`` (Parquet, JSON lines, CSV) or a hub id, opened with ``streaming=True`` and read through the
same epoch plan as tar and Parquet shards (:mod:`.shard_plan`).

The streaming dataset's own shards — for the packaged builders, one per data file, in order (``num_shards``) — are
xmodal's shards: :func:`hf_shards` gives one :class:`~.shards.Shard` per data file with its row count (a local
Parquet file's footer; else ``data.shard_sizes`` or one counting pass), and reading samples ``[start, stop)`` of
shard ``i`` is ``dataset.shard(num_shards, i).skip(start).take(stop - start)``, decoding off (image bytes come as
``{"bytes", "path"}`` and are decoded by the modality, so a corrupt image is one bad sample, not a lost shard). A
position is thus the same (shard, sample) pair as for tar shards, and mid-epoch resume, the split across
(rank, worker) and the bad-sample accounting are the ones of :mod:`.stream` — no second resume mechanism
(``IterableDataset.state_dict`` would be one per worker, and could not re-cut an epoch across processes).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from .shards import BadSlot, Column, Shard, ShardError, count_samples, is_parquet

log = logging.getLogger("xmodal")


@dataclass(frozen=True)
class HFSource:
    """What ``datasets.load_dataset(path, name, data_files=..., split=split, streaming=True)`` is called with."""
    path: str
    split: str = "train"
    name: str | None = None
    data_files: tuple[str, ...] | None = None

    def __str__(self) -> str:
        return f"data.hf_dataset {self.path!r} (split {self.split!r}" + (f", config {self.name!r})" if self.name
                                                                          else ")")


_OPEN: dict[HFSource, tuple] = {}  # per process: (streaming dataset without decoding, its data files)


def open_source(src: HFSource) -> tuple:
    """The streaming dataset of ``src`` and its data files (one load per process; workers forked later inherit it).
    A dataset, config or split that does not exist is a one-line :class:`ShardError`."""
    if src in _OPEN:
        return _OPEN[src]
    import datasets

    files = list(src.data_files) if src.data_files else None
    try:
        builder = datasets.load_dataset_builder(src.path, src.name, data_files=files)
        ds = builder.as_streaming_dataset(split=src.split)
    except (FileNotFoundError, ConnectionError, datasets.exceptions.DatasetNotFoundError) as e:
        raise ShardError(f"{src}: no such dataset ({_line(e)})") from None
    except (ValueError, KeyError) as e:  # "Bad split: x. Available splits: [...]", an unknown config name
        raise ShardError(f"{src}: {_line(e)}") from None
    data_files = builder.config.data_files.get(src.split, []) if builder.config.data_files else []
    # decoding off (IterableDataset.decode; in a datasets without it, cells come decoded and a corrupt image
    # loses the rest of its slice as bad slots instead of one sample)
    _OPEN[src] = (ds.decode(False) if hasattr(ds, "decode") else ds, [str(f) for f in data_files])
    return _OPEN[src]


def _num_shards(ds) -> int:
    return ds.num_shards if hasattr(ds, "num_shards") else ds.n_shards  # n_shards: older datasets


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def hf_shards(src: HFSource, columns: Sequence[Column], sizes: str | None = None) -> list[Shard]:
    """One shard per shard of the streaming dataset, named by its data file, with its row count; ``columns`` are
    checked against the dataset's columns first."""
    ds, files = open_source(src)
    check_columns(src, ds, columns)
    n = _num_shards(ds)
    names = files if len(files) == n else [f"{src.path}[{src.split}]#{i}" for i in range(n)]
    counts = _sizes(sizes)
    out = []
    for i, name in enumerate(names):
        rows = counts.get(name, counts.get(os.path.basename(name)))
        if rows is None:
            rows = count_samples(name) if is_parquet(name) and os.path.isfile(name) else _count(ds, n, i, name)
        out.append(Shard(name, int(rows), source=src, part=i))
    return out


def _sizes(path: str | None) -> dict:
    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ShardError(f"data.shard_sizes: {path}: not a JSON object of row counts ({e})") from None
    if not isinstance(data, dict):
        raise ShardError(f"data.shard_sizes: {path}: expected {{data file: row count}}, got {type(data).__name__}")
    return data


def _count(ds, n: int, i: int, name: str) -> int:
    """Rows of one data file, by streaming it once (give data.shard_sizes to skip this pass)."""
    log.info("counting the rows of %s (data.shard_sizes skips this)", name)
    first = ds.column_names[:1] if ds.column_names else None
    part = ds.shard(num_shards=n, index=i, contiguous=True)
    return sum(1 for _ in _rows(part.select_columns(first) if first else part))


def _rows(ds) -> Iterator[dict]:
    """A streaming dataset's rows. Through ``iter`` (batches): iterating it directly inside a DataLoader worker
    would split it again by worker (datasets' ``_iter_pytorch``) — here each worker's part is already its own."""
    for batch in ds.iter(batch_size=256):
        names = list(batch)
        for values in zip(*(batch[n] for n in names)):
            yield dict(zip(names, values))


def check_columns(src: HFSource, ds, columns: Sequence[Column]) -> None:
    """Each column a run reads must name a column the dataset has (names compare lower-cased, as data.columns)."""
    have = {c.lower() for c in ds.column_names or ()}
    if not have:  # features unknown until read: a missing column shows as bad samples instead
        return
    for col in columns:
        if col.field is not None or not any(e in have for e in col.extensions):
            wanted = f"json:{col.field}" if col.field is not None else " or ".join(repr(e) for e in col.extensions)
            raise ShardError(f"{src}: data.columns.{col.name}: no column {wanted} "
                             f"(its columns: {', '.join(sorted(have))})")


def read_hf(shard: Shard, start: int, stop: int) -> Iterator[dict | BadSlot]:
    """Rows ``[start, stop)`` of the dataset's shard ``shard.part`` as raw samples (``{column: cell}`` lower-cased,
    keyed by their ``id`` column, else ``FILE#row``); rows the shard does not deliver come as :class:`BadSlot`."""
    following = start
    try:
        ds, _ = open_source(shard.source)
        part = ds.shard(num_shards=_num_shards(ds), index=shard.part, contiguous=True).skip(start).take(stop - start)
        for cells in _rows(part):
            row = {k.lower(): v for k, v in cells.items()}
            key = row.get("id")
            name = os.path.basename(shard.url)
            yield {**row, "__key__": str(key if key not in (None, "") else f"{name}#{following}"),
                   "__url__": shard.url}
            following += 1
        reason = f"the shard holds {following} rows, its count says {shard.samples}"
    except Exception as e:  # noqa: BLE001 - an unreadable file: the rest of the slice is lost, not the run
        reason = f"unreadable after row {following - 1} ({type(e).__name__}: {_line(e)})"
    for i in range(following, stop):
        yield BadSlot(shard.url, i, reason)
