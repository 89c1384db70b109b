"""Frozen-tower features on disk: immutable, memory-mapped shard files, reused across runs and commands.

One folder per tower (``ROOT/<tower key>/``); the tower key hashes the encoder's weights, the settings its transform
reads and the cache format, so another tower, new weights or other preprocessing never meet these features. Each
input has its own key (:func:`input_key`): a file's resolved path, size and mtime (so a rewritten or touched file
is a new input), a string's content. A shard holds ``features`` (``[rows, ...]`` float32) and ``keys``
(``[rows, 16]`` uint8) in one safetensors file named by the SHA-256 of its bytes:

* written once and atomically (temporary sibling, fsync, rename: :mod:`xmodal.atomic`), so a reader sees a whole
  shard or none, and a pass killed half-way keeps every shard it finished;
* checked before its rows are used: its size against its header (always), its bytes against its name (once per
  process), the tower it was written for (its metadata) against its folder — the inputs' keys do not depend on the
  tower, so another tower's shard copied in would otherwise serve that tower's features; a damaged or foreign shard
  is reported in one warning line, removed, and its inputs are embedded again;
* read through ``np.memmap`` of its data region: features live in the page cache, not in each process's heap
  (safetensors for a self-describing file a peer library reads, and no pickle; benchmarks/feature_cache_formats.py
  measured ``safe_open().get_slice`` per row 6x slower than a memmap of the same bytes).

Several processes share a folder safely: a pass over one tower holds an exclusive ``flock`` on its folder's lock
file, so the first process embeds and writes while the others wait and then read (on file systems without
``flock`` each writes its own shards: duplicates, never torn files).
"""
from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .atomic import fsync_dir, replacing

log = logging.getLogger(__name__)

FORMAT = 1  # part of every tower key: a new layout never reads an old one
KEY_BYTES = 16
SUFFIX = ".safetensors"
ENV = "XMODAL_CACHE"
OFF = ("off", "none", "0", "false", "no")


def default_root() -> Path | None:
    """``$XMODAL_CACHE`` (``off`` disables), else ``$XDG_CACHE_HOME/xmodal/features``, else
    ``~/.cache/xmodal/features``."""
    env = os.environ.get(ENV)
    if env is not None and env.strip():
        return None if env.strip().lower() in OFF else Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "xmodal" / "features"


def resolve_root(setting: str | bool | None) -> Path | None:
    """A config value (``train.feature_cache_dir``) → the cache root: None or True = :func:`default_root`, False or
    ``"off"`` (YAML reads a bare ``off`` as false) = no disk cache, else that folder."""
    if setting is None or setting is True:
        return default_root()
    if setting is False:
        return None
    return None if setting.strip().lower() in OFF else Path(setting).expanduser()


def input_key(value, path_valued: bool | None) -> bytes | None:
    """The 16-byte identity of one input, or None when it has none (a missing file: left to the transform to
    report). ``path_valued``: the modality's cells are files (True), strings (False), or unknown (None: a value
    naming an existing file is keyed by the file and the string both)."""
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    if isinstance(value, bytes):
        h.update(b"bytes\0" + value)
    elif not isinstance(value, str):
        return None
    elif path_valued is False:
        h.update(b"str\0" + value.encode("utf-8", "surrogatepass"))
    else:
        try:
            st = os.stat(value)
        except (OSError, ValueError):
            st = None
        if st is None or not os.path.isfile(value):
            if path_valued:
                return None
            h.update(b"str\0" + value.encode("utf-8", "surrogatepass"))
        else:
            real = os.path.realpath(value)
            h.update(f"file\0{real}\0{st.st_size}\0{st.st_mtime_ns}\0".encode("utf-8", "surrogatepass"))
            if path_valued is None:
                h.update(value.encode("utf-8", "surrogatepass"))
    return h.digest()


def tower_key(fingerprint: str, settings: str) -> str:
    return hashlib.sha256(f"xmodal-features/{FORMAT}\0{fingerprint}\0{settings}".encode()).hexdigest()[:32]


def _header(path: Path) -> tuple[dict, int]:
    """A shard's safetensors header and where its data starts; ValueError if it is not whole."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{size} bytes, shorter than a header")
        n = struct.unpack("<Q", raw)[0]
        if n > size - 8:
            raise ValueError(f"header of {n} bytes in a {size}-byte file")
        header = json.loads(f.read(n))
    start = 8 + n
    end = max(t["data_offsets"][1] for k, t in header.items() if k != "__metadata__")
    if start + end != size:
        raise ValueError(f"{size} bytes where the header describes {start + end}")
    if header["features"]["shape"][0] != header["keys"]["shape"][0]:
        raise ValueError("features and keys differ in rows")
    tower = header.get("__metadata__", {}).get("tower")
    if tower is not None and tower != path.parent.name:  # (shards written before this was recorded: unchecked)
        raise ValueError(f"written for tower {tower}, not this folder's {path.parent.name}")
    return header, start


def _mapped(path: Path, header: dict, start: int, name: str) -> np.ndarray:
    t = header[name]
    dtype = {"F32": np.float32, "U8": np.uint8}[t["dtype"]]
    shape = tuple(t["shape"])
    if 0 in shape:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=start + t["data_offsets"][0], shape=shape)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def key_order(keys: Sequence[bytes]) -> np.ndarray:
    """The row order :meth:`FeatureStore.write` stores ``keys`` in: byte-wise ascending."""
    return np.argsort(np.frombuffer(b"".join(keys), f"S{KEY_BYTES}"), kind="stable")


class ShardRows:
    """Rows of several shards as one sequence (``rows[i]`` → a float32 tensor). Picklable: data-loader workers
    get the shard paths and map them again, never a copy of the features."""

    def __init__(self, paths: Sequence[Path], counts: Sequence[int]):
        self.paths = [Path(p) for p in paths]
        self.starts = np.cumsum([0, *counts]).tolist()
        self._maps: list | None = None

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self):
        return {"paths": self.paths, "starts": self.starts, "_maps": None}

    def _shard(self, s: int) -> np.ndarray:
        if self._maps is None:
            self._maps = [None] * len(self.paths)
        if self._maps[s] is None:
            header, start = _header(self.paths[s])
            self._maps[s] = _mapped(self.paths[s], header, start, "features")
        return self._maps[s]

    def __getitem__(self, i: int) -> torch.Tensor:
        s = bisect.bisect_right(self.starts, i) - 1
        if i < 0 or s >= len(self.paths):
            raise IndexError(i)
        return torch.from_numpy(np.array(self._shard(s)[i - self.starts[s]]))

    def tensor(self) -> torch.Tensor:
        """Every row in one tensor (in memory)."""
        parts = [torch.from_numpy(np.array(self._shard(s))) for s in range(len(self.paths))]
        return torch.cat(parts) if parts else torch.empty(0)


class FeatureStore:
    """One tower's folder of shards."""

    _verified: set = set()  # (path, size, mtime_ns) whose bytes matched their name in this process

    def __init__(self, folder: str | os.PathLike, describe: dict | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        about = self.folder / "tower.json"
        if describe is not None and not about.exists():  # what the key was made of, for a person looking in
            with replacing(about, about.with_name(f".tower.json.{os.getpid()}.tmp"), fsync=False) as tmp:
                tmp.write_text(json.dumps(describe, indent=1, sort_keys=True), encoding="utf-8")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive use of the folder for one embedding pass (others wait, then find the features written)."""
        try:
            import fcntl
        except ImportError:  # Windows: no flock; concurrent writers just write duplicate shards
            yield
            return
        try:
            f = open(self.folder / ".lock", "a+b")
        except OSError:  # a read-only cache: nothing will be written, so nothing to wait for
            yield
            return
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError:  # a file system without locks (some NFS): as on Windows
                pass
            yield

    def remove_stale_temporaries(self, older_than_s: float = 3600.0) -> None:
        """Temporary shard files a killed writer left (SIGKILL skips the clean-up). Only old ones: where ``flock``
        does not work, a young one may be another process's write in progress."""
        import time
        for tmp in self.folder.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if time.time() - tmp.stat().st_mtime > older_than_s:
                    tmp.unlink()

    def shards(self) -> list[Path]:
        return sorted(p for p in self.folder.glob("*" + SUFFIX) if not p.name.startswith("."))

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.shards())

    def _damaged(self, path: Path, why: str) -> None:
        log.warning("feature cache: %s is damaged (%s); removed, its inputs will be embedded again", path, why)
        with contextlib.suppress(OSError):
            path.unlink()

    def _check(self, path: Path) -> tuple[dict, int] | None:
        """The shard's header if it is whole and its bytes match its name, else None (reported and removed)."""
        try:
            header, start = _header(path)
            st = path.stat()
            stamp = (str(path), st.st_size, st.st_mtime_ns)
            if stamp not in self._verified:
                digest = _sha256(path)
                if not digest.startswith(path.stem):
                    raise ValueError(f"content hash {digest[:len(path.stem)]} differs from the name")
                self._verified.add(stamp)
            return header, start
        except FileNotFoundError:  # removed by another process meanwhile
            return None
        except (OSError, ValueError, KeyError, TypeError, IndexError, json.JSONDecodeError) as e:
            self._damaged(path, str(e))
            return None

    def find(self, keys: Sequence[bytes]) -> tuple[list[Path], list[int], dict[bytes, int]]:
        """Which of ``keys`` are on disk: the shards holding them, their row counts, and key → row of those shards
        taken in order (as :class:`ShardRows` numbers them). Shards holding none of the keys are not read."""
        self.remove_stale_temporaries()
        wanted = np.frombuffer(b"".join(keys), f"S{KEY_BYTES}") if keys else np.empty(0, f"S{KEY_BYTES}")
        paths, counts, rows = [], [], {}
        for path in self.shards():
            header = self._check(path)
            if header is None:
                continue
            ks = np.ascontiguousarray(_mapped(path, *header, "keys"))
            hit = np.flatnonzero(np.isin(ks.view(f"S{KEY_BYTES}").reshape(-1), wanted))
            base = sum(counts)
            new = {ks[r].tobytes(): base + int(r) for r in hit}  # tobytes: numpy's S strings drop trailing NULs
            new = {k: r for k, r in new.items() if k not in rows}
            if not new:
                continue
            paths.append(path)
            counts.append(len(ks))
            rows.update(new)
        return paths, counts, rows

    def write(self, keys: Sequence[bytes], features: np.ndarray) -> Path:
        """One new shard, atomically; its name is the SHA-256 of its bytes. Its rows are stored in key order
        (:func:`key_order`), so the shard is its own on-disk index (:mod:`xmodal.feature_index`)."""
        from safetensors.numpy import save

        order = key_order(keys)
        data = save({"features": np.ascontiguousarray(np.asarray(features, dtype=np.float32)[order]),
                     "keys": np.frombuffer(b"".join(keys), np.uint8).reshape(len(keys), KEY_BYTES)[order]},
                    metadata={"format": str(FORMAT), "tower": self.folder.name, "order": "key"})
        path = self.folder / (hashlib.sha256(data).hexdigest()[:32] + SUFFIX)
        with replacing(path, path.with_name(f".{path.name}.{os.getpid()}.tmp")) as tmp:
            tmp.write_bytes(data)
        fsync_dir(self.folder)
        st = path.stat()
        self._verified.add((str(path), st.st_size, st.st_mtime_ns))
        return path
