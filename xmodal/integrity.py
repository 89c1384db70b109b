"""Knowing that a file is the one that was saved: size + sha256 records, sealed JSON, and one-line mismatch errors.

The bottom layer of xmodal (it imports nothing from the package). Whatever xmodal saves as several files records
the size and sha256 of each file it depends on in the file it writes last (the model card, a checkpoint's
``manifest.json``, an index's ``index.json``); loading checks them before anything is trusted, so a copy cut short,
a flipped bit or a file from another run is refused by name instead of failing deep inside safetensors / torch /
faiss, or worse, loading as something it is not.

* :func:`file_record` — ``{"size": bytes, "sha256": hex}`` of a file (read in 8 MiB chunks);
* :func:`check_file` — raise :class:`IntegrityError` (one line: the file, what was expected, what was found, and
  what to do) unless the file matches its record; the size is compared first, so a truncated file costs no hashing;
* :func:`seal` / :func:`check_seal` — a JSON object that records its own checksum (``"checksum"``), so a flipped
  bit in a card or manifest that still parses as JSON is noticed too;
* :func:`tensors_digest` — sha256 of named tensors (names, dtypes, shapes, bytes): what a slim checkpoint records
  of the frozen weights it does not hold.

Why sha256: a strong checksum (a file from another run of the same shape differs in bytes, not size), in the
standard library, and fast enough here: 1.2 GiB/s on one busy core of the 2-core build machine, against a load
that also builds the model (figures: docs/benchmarks.md, "Verifying files on load"). CRC32 is 3x faster but
not strong; blake2b was slower than sha256 (SHA-NI) on the same core.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["IntegrityError", "check_file", "check_seal", "file_record", "seal", "tensors_digest"]

_CHUNK = 8 << 20
SEAL_KEY = "checksum"


class IntegrityError(ValueError):
    """A file does not match the record made when it was saved (truncated, damaged, replaced or missing)."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of ``path``."""
    return {"size": os.stat(path).st_size, "sha256": sha256_file(path)}


def _short(digest: str) -> str:
    return digest[:12]


def mismatch(path: str | os.PathLike, record: Mapping[str, Any]) -> str | None:
    """What is wrong with ``path`` against ``record`` (``"is missing"``, ``"has 10 bytes, expected 20"``, a
    different sha256), or None when it matches. A record may hold only a size (older index folders)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "is missing"
    if "size" in record and size != record["size"]:
        return f"has {size} bytes, expected {record['size']}" + (" (empty)" if size == 0 else "")
    if "sha256" in record:
        found = sha256_file(path)
        if found != record["sha256"]:
            return f"has sha256 {_short(found)}…, expected {_short(record['sha256'])}… (same size, other bytes)"
    return None


def check_file(path: str | os.PathLike, record: Mapping[str, Any], *, recorded_in: str | os.PathLike,
               remedy: str) -> None:
    """Raise :class:`IntegrityError` unless ``path`` matches ``record`` (as :func:`mismatch` compares them)."""
    problem = mismatch(path, record)
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
    """sha256 of ``(name, tensor)`` pairs in name order: names, dtypes, shapes and bytes (on the CPU)."""
    import torch  # only here: the rest of this module is plain files

    h = hashlib.sha256()
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()
