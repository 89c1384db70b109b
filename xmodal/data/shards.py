"""WebDataset tar shards, the layout open_clip and img2dataset write: consecutive members ``KEY.EXT`` of one tar make
one sample (``000123.jpg``, ``000123.txt``, ``000123.json``, ``000123.cls``, ``000123.flac``) — and Parquet shards
(``.parquet``: a row is a sample, its columns the members; counts from the footer, row groups skipped unread).

* :func:`shard_list`: brace-expanded local paths, ``pipe:`` commands and ``http(s)://`` URLs (webdataset's
  ``expand_urls``), each with its sample count from open_clip's ``sizes.json`` (``{"00000.tar": 1000}``), or, for
  local shards without one, counted once from the tar headers (no member is decoded); where ``xmodal shard``'s
  ``checksums.json`` lies beside local shards, each shard carries its record (size, XXH3-128, sample count) and a
  ``sizes.json`` count that disagrees with it stops the run in one line;
* :func:`read_samples`: the raw samples ``[start, stop)`` of one shard, opened through webdataset's ``gopen`` (files,
  ``pipe:``, curl for URLs) and its streaming tar reader; a shard that ends early (truncated, or fewer samples than
  its count) yields a :class:`BadSlot` for each missing sample, so every (rank, worker) keeps its place; a shard
  with a record is checked against it before its first sample (once per process): a damaged shard, or another
  corpus's shard of the same name, gives a :class:`BadSlot` for each of its samples, never its samples;
* :class:`SampleDecoder`: raw members → ``{column: value}`` through the modality registry: a path-valued modality's
  member goes through its ``read_bytes`` (image → PIL, audio → encoded bytes), a string-valued one is its UTF-8
  text, then the tower's transform. A sample that fails is a :class:`BadSample` naming shard, key and reason.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from ..batch import CACHE_KEY, FEATURES

SIZES_NAME = "sizes.json"  # open_clip_train.data.get_dataset_size reads the same file
CHECKSUMS_NAME = "checksums.json"  # xmodal shard's record of each tar (sizes.json stays as open_clip reads it)


class ShardError(ValueError):
    """A shard list that cannot be read: no shard, no sample count, a count that is not a number."""


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int
    _: KW_ONLY  # the rest by name: two sources (tar/Parquet records, HF streaming) add their own fields
    source: Any = None  # a Hugging Face streaming source (:class:`.hf_source.HFSource`) whose shard ``part`` this is
    part: int = 0
    # what `xmodal shard` recorded of the file ({"size", "xxh3_128", "samples"}) and where; None: nothing recorded
    record: dict | None = field(default=None, compare=False, hash=False, repr=False)
    recorded_in: str | None = field(default=None, compare=False, hash=False, repr=False)


@dataclass(frozen=True)
class BadSlot:
    """A sample slot a shard did not deliver (truncated tar, fewer samples than its count)."""
    url: str
    index: int
    reason: str


@dataclass(frozen=True)
class BadSample:
    url: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.url}: sample {self.key!r}: {self.reason}"


def expand(spec: str | Sequence[str]) -> list[str]:
    """``"d/{000..009}.tar"`` (or a list of such) → the shard URLs, in order (webdataset's brace expansion)."""
    from webdataset.shardlists import expand_urls

    specs = [spec] if isinstance(spec, str) else list(spec)
    return [url for s in specs for url in expand_urls(s)]


def _is_local(url: str) -> bool:
    return not url.startswith(("pipe:", "http://", "https://", "hf:", "gs://", "s3://", "ais://"))


def _local_path(url: str) -> str:
    return url.removeprefix("file:")


def shard_list(spec: str | Sequence[str], sizes: str | None = None) -> list[Shard]:
    """Every shard of ``spec`` with its sample count (see the module docstring)."""
    urls = expand(spec)
    if not urls:
        raise ShardError(f"data.shards: {spec!r} names no shard")
    counts = _read_sizes(sizes, urls)
    out, records = [], {}
    for url in urls:
        name = os.path.basename(url.rstrip("/"))
        n = counts.get(url, counts.get(name))
        record, recorded_in = _record(url, records)
        if n is not None and record is not None and n != record.get("samples"):
            source = sizes or str(Path(_local_path(url)).parent / SIZES_NAME)
            raise ShardError(f"{source}: {name}: {n!r} samples, but {recorded_in} recorded {record.get('samples')} "
                             f"when the shard was written: one of the two is damaged or belongs to other shards; "
                             f"write the shards again (or delete {SIZES_NAME}: counts are then read from the shards)")
        if n is None:
            if not _is_local(url) and not is_parquet(url):
                raise ShardError(f"{url}: no sample count: give data.shard_sizes (a sizes.json such as "
                                 f"`xmodal shard` writes, {{\"{name}\": N}})")
            n = count_samples(url)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ShardError(f"{sizes or SIZES_NAME}: {name}: expected a sample count, got {n!r}")
        out.append(Shard(url, n, record=record, recorded_in=recorded_in))
    return out


def _record(url: str, read: dict[str, dict]) -> tuple[dict | None, str | None]:
    """What ``checksums.json`` beside a local tar shard recorded of it; (None, None) where there is none. ``read``:
    the files read so far (path → records), so a shard list reads each once."""
    if not _is_local(url) or is_parquet(url):
        return None, None
    from ..integrity import read_sealed_json

    path = str(Path(_local_path(url)).parent / CHECKSUMS_NAME)
    if not os.path.isfile(path):
        return None, None
    records = read.get(path)
    if records is None:
        data = read_sealed_json(path, "write the shards again with `xmodal shard` (or delete it: shards are then "
                                      "read unchecked)")
        records = read[path] = data.get("shards", {}) if isinstance(data.get("shards"), dict) else {}
    record = records.get(os.path.basename(url))
    return (record, path) if isinstance(record, dict) else (None, None)


_verified: set = set()  # (path, size, mtime_ns) of shards that matched their record in this process


def _unverified(shard: Shard) -> str | None:
    """Why ``shard`` does not match its record (damaged, cut short, missing, another corpus's), or None."""
    if shard.record is None:
        return None
    from ..integrity import mismatch

    path = _local_path(shard.url)
    try:
        st = os.stat(path)
        stamp = (path, st.st_size, st.st_mtime_ns)
    except OSError:
        stamp = None
    if stamp is not None and stamp in _verified:
        return None
    problem = mismatch(path, shard.record)
    if problem is None:
        if stamp is not None:
            _verified.add(stamp)
        return None
    return (f"the shard {problem} (as recorded in {shard.recorded_in}): damaged or not the shard written there; "
            f"none of its samples is used")


def _read_sizes(sizes: str | None, urls: list[str]) -> dict[str, Any]:
    """``sizes.json`` as given, else the one beside each local shard's folder (open_clip's convention)."""
    paths = [sizes] if sizes else list(dict.fromkeys(
        str(Path(_local_path(u)).parent / SIZES_NAME) for u in urls if _is_local(u)))
    counts: dict[str, Any] = {}
    for p in paths:
        if not os.path.isfile(p):
            if sizes:
                raise ShardError(f"data.shard_sizes: {p}: file not found")
            continue
        try:
            data = json.loads(Path(p).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ShardError(f"{p}: not a JSON object of sample counts ({e})") from None
        if not isinstance(data, dict):
            raise ShardError(f"{p}: expected a JSON object {{shard name: sample count}}, got {type(data).__name__}")
        counts.update(data)
    return counts


def is_parquet(url: str) -> bool:
    return url.lower().endswith(".parquet")


def count_samples(url: str) -> int:
    """Samples in a local shard: its distinct keys, from the tar headers (members are skipped, not read); a Parquet
    shard's rows, from its footer."""
    from webdataset.tariterators import base_plus_ext

    if is_parquet(url):
        import pyarrow.parquet as pq
        try:
            return pq.ParquetFile(_local_path(url)).metadata.num_rows
        except (OSError, ValueError) as e:
            raise ShardError(f"{url}: cannot read its Parquet footer ({type(e).__name__}: {e})") from None

    keys, last = 0, None
    try:
        with tarfile.open(_local_path(url), "r:*") as tar:
            for info in tar:
                prefix, _ = base_plus_ext(info.name) if info.isreg() else (None, None)
                if prefix is not None and prefix != last:
                    keys, last = keys + 1, prefix
    except (OSError, tarfile.TarError) as e:
        raise ShardError(f"{url}: cannot count its samples ({type(e).__name__}: {e})") from None
    return keys


def _members(url: str) -> Iterator[tuple[str, str, bytes]]:
    """``(key, extension, bytes)`` of each regular member, in tar order, streamed (webdataset's gopen + reader)."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext, tar_file_iterator

    stream = gopen(url)
    try:
        for member in tar_file_iterator(stream):
            key, ext = base_plus_ext(member["fname"])
            if key is not None:
                yield key, ext.lower(), member["data"]
    finally:
        stream.close()


def _parquet_rows(url: str, start: int) -> Iterator[tuple[int, dict]]:
    """``(row index, {column: cell})`` from ``start`` on; the row groups before it are not read."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(_local_path(url))
    first, row = 0, 0
    while first < pf.num_row_groups and row + pf.metadata.row_group(first).num_rows <= start:
        row += pf.metadata.row_group(first).num_rows
        first += 1
    for batch in pf.iter_batches(batch_size=256, row_groups=range(first, pf.num_row_groups)):
        for cells in batch.to_pylist():
            yield row, cells
            row += 1


def read_samples(shard: Shard, start: int = 0, stop: int | None = None) -> Iterator[dict | BadSlot]:
    """The raw samples ``[start, stop)`` of ``shard`` (``{"__key__", "__url__", ext: bytes}``; a Parquet shard's
    ``{column: cell}``, keyed by its ``id`` column or row number); earlier ones are skipped unread beyond their
    headers' stream (a Parquet shard's earlier row groups unread). Slots the shard does not deliver come as
    :class:`BadSlot`."""
    stop = shard.samples if stop is None else stop
    if is_parquet(shard.url):
        yield from _read_parquet(shard, start, stop)
        return
    problem = _unverified(shard)
    if problem is not None:
        for i in range(start, stop):
            yield BadSlot(shard.url, i, problem)
        return
    index, current, last_key = 0, None, None
    try:
        for key, ext, data in _members(shard.url):
            if current is None or key != current["__key__"]:
                if current is not None:
                    if start <= index < stop:
                        yield current
                    index += 1
                    if index >= stop:
                        return
                current = {"__key__": key, "__url__": shard.url}
                last_key = key
            if index >= start:
                current[ext] = data
        if current is not None and start <= index < stop:
            yield current
            index += 1
        reason = f"the shard holds {index} samples, its count says {shard.samples}"
    except Exception as e:  # noqa: BLE001 - a truncated or corrupt tar: the rest of the slice is lost, not the run
        reason = (f"unreadable tar after sample {last_key!r} ({type(e).__name__}: {e})" if last_key
                  else f"unreadable tar ({type(e).__name__}: {e})")
    for i in range(max(index, start), stop):
        yield BadSlot(shard.url, i, reason)


def _read_parquet(shard: Shard, start: int, stop: int) -> Iterator[dict | BadSlot]:
    following = start  # the next row index the slice wants
    try:
        for index, cells in _parquet_rows(shard.url, start):
            if index < start:
                continue
            if index >= stop:
                return
            key = cells.get("id")
            yield {**cells, "__key__": str(key if key not in (None, "") else index), "__url__": shard.url}
            following = index + 1
        reason = f"the shard holds {following} rows, its count says {shard.samples}"
    except Exception as e:  # noqa: BLE001 - a corrupt file: the rest of the slice is lost, not the run
        reason = f"unreadable Parquet after row {following - 1} ({type(e).__name__}: {e})"
    for i in range(following, stop):
        yield BadSlot(shard.url, i, reason)


@dataclass(frozen=True)
class Column:
    """Where one column of a sample lives: the first present of ``extensions``, or ``field`` of ``KEY.json``."""
    name: str
    extensions: tuple[str, ...]
    field: str | None = None


def parse_columns(columns: Mapping[str, str], modalities: Sequence[str], extra: Sequence[str] = ()) -> list[Column]:
    """``data.columns`` (column → ``"jpg;png"`` or ``"json:caption"``) for the columns a run reads; a modality not
    named takes its registered ``shard_keys``."""
    from ..modalities import get_modality

    out = []
    for name in [*modalities, *extra]:
        spec = columns.get(name)
        if spec is None:
            keys = get_modality(name).shard_keys if name in modalities else ()
            if not keys:
                raise ShardError(f"data.columns.{name}: say which shard members hold column {name!r} "
                                 f"(e.g. data.columns.{name}=cls or json:{name})")
            out.append(Column(name, (*keys, name)))  # a Parquet shard's column of that name
        elif spec.startswith("json:"):
            out.append(Column(name, ("json",), spec.removeprefix("json:")))
        else:
            out.append(Column(name, tuple(p.strip().lower() for p in spec.split(";"))))
    return out


class SampleDecoder:
    """Raw sample → ``{column: transformed value, "id": id}`` or a :class:`BadSample`. Picklable (DataLoader workers).

    ``transforms`` maps each modality column to its tower's transform; other columns come through as text (a
    ``.cls`` or a JSON field). The id is ``KEY.json``'s ``"id"`` when there is one (``xmodal shard`` keeps the
    manifest's ids there), else the key.

    ``augment_seed``: each sample's transforms run with torch's CPU generator seeded by ``(augment_seed, epoch,
    sample)`` (:func:`xmodal.data.loader.row_seed`; the sample named by its shard's file name and key), so its
    random crops do not depend on the worker that decodes it or on where a run resumed; ``epoch`` is set by the
    stream (:class:`~xmodal.data.stream.ShardStream`) in each worker. ``None``: the generator's draws as they come.
    """

    def __init__(self, columns: Sequence[Column], transforms: Mapping[str, Callable[[Any], Any]],
                 features: Mapping[str, Any] | None = None, augment_seed: int | None = None):
        self.columns, self.transforms = list(columns), dict(transforms)
        # column → its frozen tower's StreamFeatures (.stream_features): cached features instead of the member
        self.features = dict(features or {})
        self.augment_seed, self.epoch = (None if augment_seed is None else int(augment_seed)), 0
        # seeding only where a transform may draw (the `random` attribute, as ManifestDataset reads it)
        self._random = any(getattr(t, "random", True) for t in self.transforms.values())

    def decode(self, raws: Sequence[dict | BadSlot]) -> list[dict | BadSample]:
        """A batch's raw samples, their cached columns looked up in the disk cache first (one look-up a batch)."""
        found = {name: f.lookup(raws) for name, f in self.features.items()}
        return [self(raw, {name: hits[i] for name, hits in found.items()}) for i, raw in enumerate(raws)]

    def __call__(self, raw: dict | BadSlot, cached: Mapping[str, tuple] | None = None) -> dict | BadSample:
        """One raw sample; ``cached``: a cached column's ``(cache key, features or None)``."""
        if isinstance(raw, BadSlot):
            return BadSample(raw.url, f"#{raw.index}", raw.reason)
        if self.augment_seed is None or not self._random:
            return self._decode(raw, cached)
        from .loader import row_seed, seeded
        name = f"{os.path.basename(str(raw['__url__']))}/{raw['__key__']}".encode()
        sample = int.from_bytes(hashlib.blake2b(name, digest_size=8).digest(), "little")
        with seeded(row_seed(self.augment_seed, self.epoch, sample)):
            return self._decode(raw, cached)

    def _decode(self, raw: dict, cached: Mapping[str, tuple] | None) -> dict | BadSample:
        key, url = raw["__key__"], raw["__url__"]
        try:
            meta = json.loads(raw["json"]) if "json" in raw else {}
        except ValueError as e:
            return BadSample(url, key, f"{key}.json is not JSON ({e})")
        meta = meta if isinstance(meta, dict) else {}
        item: dict[str, Any] = {"id": str(meta.get("id", key))}
        for col in self.columns:
            transform = self.transforms.get(col.name)
            if cached and col.name in cached:
                cache_key, features = cached[col.name]
                if features is not None:  # the member is not even decoded
                    import torch
                    item[col.name + FEATURES] = torch.from_numpy(features)
                    continue
                item[col.name + CACHE_KEY] = cache_key
            try:
                value = _value(raw, col, meta)
                item[col.name] = transform(value) if transform is not None else value
            except _Missing as e:
                return BadSample(url, key, str(e))
            except Exception as e:  # noqa: BLE001 - an undecodable image, a text the tokeniser rejects
                return BadSample(url, key, f"column {col.name!r}: {type(e).__name__}: {e}"[:300])
        return item


class _Missing(Exception):
    """The sample does not hold a column (no member, an empty text, undecodable bytes)."""


def _value(raw: dict, col: Column, meta: dict) -> Any:
    """The value of column ``col`` in a raw sample, as its transform takes it."""
    key = raw["__key__"]
    if col.field is not None:
        v = meta.get(col.field)
        if v in (None, ""):
            raise _Missing(f"no field {col.field!r} in {key}.json")
        return v
    ext = next((e for e in col.extensions if e in raw), None)
    if ext is None:
        members = [e for e in col.extensions if e != col.name] or [col.name]  # (the name: a Parquet column)
        raise _Missing(f"missing member {' / '.join(key + '.' + e for e in members)} (column {col.name!r})")
    data = raw[ext]
    if isinstance(data, dict) and "bytes" in data:  # a Parquet cell of an HF Image/Audio feature
        data = data["bytes"] or data.get("path")
    if data is None or data == "":
        raise _Missing(f"{key}: column {ext!r} is empty")
    from ..modalities import get_modality, is_modality

    if isinstance(data, str) and is_modality(col.name) and get_modality(col.name).value == "path":
        return str(Path(_local_path(raw["__url__"])).parent / data)  # a path, relative to the shard's folder
    if not isinstance(data, (bytes, bytearray, str)):
        return data  # a Parquet cell of another type (a number, a list): the transform takes it as it is
    if is_modality(col.name) and get_modality(col.name).value == "path":
        modality = get_modality(col.name)
        if modality.read_bytes is None:
            raise _Missing(f"modality {col.name!r} declares no read_bytes: it cannot be read from a shard member")
        try:
            return modality.decode_bytes(data)
        except Exception as e:  # noqa: BLE001 - corrupt bytes
            raise _Missing(f"{key}.{ext}: cannot decode ({type(e).__name__}: {e})"[:300]) from None
    text = (data if isinstance(data, str) else data.decode("utf-8", errors="replace")).strip()
    if not text:
        raise _Missing(f"{key}.{ext} is empty")
    return text
