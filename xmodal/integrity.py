"""Knowing that a file is the one that was saved: size + checksum records, sealed JSON, and one-line mismatch errors.

The bottom layer of xmodal (it imports nothing from the package). Whatever xmodal saves as several files records
the size and an XXH3-128 checksum of each file it depends on in the file it writes last (the model card, a
checkpoint's ``manifest.json``, an index's ``index.json``); loading checks them before anything is trusted, so a
copy cut short, a flipped bit or a file from another run is refused by name instead of failing deep inside
safetensors / torch / faiss, or worse, loading as something it is not.

* :func:`file_record` — ``{"size": bytes, "xxh3_128": hex}`` of a file;
* :func:`check_file` — raise :class:`IntegrityError` (one line: the file, what was expected, what was found, and
  what to do) unless the file matches its record; the size is compared first, so a truncated file costs no hashing;
  records holding ``sha256`` instead are checked with that;
* :func:`seal` / :func:`check_seal` — a JSON object that records its own checksum (``"checksum"``), so a flipped
  bit in a card or manifest that still parses as JSON is noticed too;
* :func:`tensors_digest` — XXH3-128 of named tensors (names, dtypes, shapes, bytes): what a slim checkpoint
  records of the frozen weights it does not hold;
* :func:`mapped_safetensors_digest` — the XXH3-128 of a safetensors file computed from the tensors that
  ``safetensors.torch.load_file`` mapped from it (its header, then each tensor's bytes in file order): the file is
  read once, and the pages the hash touched are the ones the model's copy then reads.

Why XXH3-128 and not sha256: hashing the quickstart model's 108 MiB of weights with sha256 costs 20-48% of its
load, with XXH3-128 3-11% (5-7x less, measured side by side: docs/benchmarks.md, "Verifying files on load"), and
the model's weights are hashed from the very mapping they are then copied from (one read of the file, not two):
+4.5% of the load's CPU time, against +9.5% for a second pass over the file in a thread. A 128-bit checksum
misses a random corruption or another run's file with probability 2^-128; what it does not resist is a deliberate
forgery — and neither would sha256 here, since whoever can replace the weights can rewrite the card beside them
(nothing is signed). ``xxhash`` is already installed with ``datasets``.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Mapping

import xxhash

__all__ = ["IntegrityError", "check_file", "check_seal", "file_record", "mapped_safetensors_digest", "seal",
           "tensors_digest"]

SEAL_KEY = "checksum"
ALGORITHM = "xxh3_128"  # what new records use; "sha256" records (if any) are still checked
_HASHERS = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}


class IntegrityError(ValueError):
    """A file does not match the record made when it was saved (truncated, damaged, replaced or missing)."""


# Files are hashed through a mapping of at most this many bytes at a time (a multiple of every platform's mmap
# granularity). Mapped pages count in the process's resident set while mapped: hashing a checkpoint's 1.8 GB
# through one mapping of each file raised a ViT-B-32 run's peak RSS by 1 GB at every save, and windows of 64 MiB
# still raised a 9M-parameter run's by up to 64 MiB (docs/benchmarks.md). Hashing a 1 GB file takes the same time
# (0.14-0.18 s here) through windows of 1, 4 or 64 MiB.
_WINDOW = 4 << 20


def digest_file(path: str | os.PathLike, algorithm: str = ALGORITHM) -> str:
    """The hex checksum of a file's bytes (mapped, not copied: the page cache is hashed in place, a window of
    ``_WINDOW`` bytes at a time, so the mapping never holds more of the file in the resident set)."""
    h = _HASHERS[algorithm]()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for offset in range(0, size, _WINDOW):
            with mmap.mmap(f.fileno(), min(_WINDOW, size - offset), access=mmap.ACCESS_READ, offset=offset) as m:
                h.update(m)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "xxh3_128": hex}`` of ``path``."""
    return {"size": os.stat(path).st_size, ALGORITHM: digest_file(path)}


def _short(digest: str) -> str:
    return digest[:12]


def mapped_safetensors_digest(path: str | os.PathLike, tensors: Mapping[str, Any]) -> str | None:
    """XXH3-128 of the safetensors file ``path`` from ``tensors``, what ``safetensors.torch.load_file(path)``
    returned (CPU tensors over its mapping of the file): the 8-byte length and the header read from the file, then
    the tensors' bytes in the order of their addresses. That equals the file's checksum only if the tensors lie back
    to back in one mapping and cover the file to its last byte; None where they do not (another safetensors
    version that copies, aliases), so the caller hashes the file itself instead."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        head += f.read(struct.unpack("<Q", head)[0])
    try:
        header = json.loads(head[8:])
    except ValueError:
        return None
    regions = sorted(((name, t) for name, t in tensors.items() if t.numel()), key=lambda kv: kv[1].data_ptr())
    base = end = regions[0][1].data_ptr() if regions else 0
    for name, t in regions:
        where = (header.get(name) or {}).get("data_offsets") if isinstance(header, dict) else None
        if (t.device.type != "cpu" or not t.is_contiguous() or t.data_ptr() != end or not where
                or where[0] != end - base):
            return None  # not the file's bytes where the header puts them: hash the file instead
        end += t.numel() * t.element_size()
    if len(head) + (end - base) != os.stat(path).st_size:
        return None
    h = xxhash.xxh3_128(head)
    if end > base:  # the tensors' bytes lie back to back in the mapping: hashed in one call, as one buffer
        h.update((ctypes.c_char * (end - base)).from_address(base))
    return h.hexdigest()


def mismatch(path: str | os.PathLike, record: Mapping[str, Any],
             tensors: Mapping[str, Any] | None = None) -> str | None:
    """What is wrong with ``path`` against ``record`` (``"is missing"``, ``"has 10 bytes, expected 20"``, a
    different checksum), or None when it matches. A record may hold only a size (older index folders).
    ``tensors``: the file's tensors as ``safetensors.torch.load_file`` mapped them, hashed in place of the file
    (:func:`mapped_safetensors_digest`) where they cover it."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if "size" in record and size != record["size"]:
        return f"has {size} bytes, expected {record['size']}" + (" (empty)" if size == 0 else "")
    for algorithm in _HASHERS:
        if algorithm in record:
            found = None
            if tensors is not None and algorithm == ALGORITHM:
                found = mapped_safetensors_digest(path, tensors)
            if found is None:
                found = digest_file(path, algorithm)
            if found != record[algorithm]:
                return (f"has {algorithm} {_short(found)}…, expected {_short(str(record[algorithm]))}… "
                        f"(same size, other bytes)")
            break
    return None


def check_file(path: str | os.PathLike, record: Mapping[str, Any], *, recorded_in: str | os.PathLike,
               remedy: str, tensors: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`IntegrityError` unless ``path`` matches ``record`` (as :func:`mismatch` compares them)."""
    problem = mismatch(path, record, tensors)
    if problem is not None:
        raise IntegrityError(f"{path} {problem} (as recorded in {recorded_in}): the file is damaged or not the one "
                             f"saved with it; {remedy}")


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in obj.items() if k != SEAL_KEY}, sort_keys=True, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


def seal(obj: Mapping[str, Any]) -> dict[str, Any]:
    """``obj`` plus ``"checksum": "sha256:<hex>"`` over its canonical JSON (sorted keys, no spaces), so the seal
    survives re-indenting but not a changed value."""
    return {**{k: v for k, v in obj.items() if k != SEAL_KEY},
            SEAL_KEY: "sha256:" + hashlib.sha256(_canonical(obj)).hexdigest()}


def check_seal(obj: Mapping[str, Any], path: str | os.PathLike, remedy: str) -> None:
    """Raise :class:`IntegrityError` if ``obj`` (read from ``path``) carries a ``checksum`` that its content does not
    match; an object without one (written before checksums) passes."""
    recorded = obj.get(SEAL_KEY)
    if recorded is None:
        return
    found = "sha256:" + hashlib.sha256(_canonical(obj)).hexdigest()
    if recorded != found:
        raise IntegrityError(f"{path}: its content does not match its own checksum ({_short(found[7:])}…, "
                             f"expected {_short(str(recorded)[7:])}…): the file is damaged or was edited; "
                             f"{remedy}")


def read_sealed_json(path: str | os.PathLike, remedy: str) -> dict[str, Any]:
    """A JSON object from ``path``, its seal checked; any damage is one :class:`IntegrityError` line."""
    try:
        obj = json.loads(Path(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"{path} is missing; {remedy}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise IntegrityError(f"{path}: not readable JSON ({type(e).__name__}: {detail}): the file is damaged; "
                             f"{remedy}") from None
    if not isinstance(obj, dict):
        raise IntegrityError(f"{path}: holds a JSON {type(obj).__name__}, not an object: the file is damaged; "
                             f"{remedy}")
    check_seal(obj, path, remedy)
    return obj


def tensors_digest(tensors: Iterable[tuple[str, Any]]) -> str:
    """XXH3-128 of ``(name, tensor)`` pairs in name order: names, dtypes, shapes and bytes (on the CPU)."""
    import torch  # only here: the rest of this module is plain files

    h = xxhash.xxh3_128()
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
