"""What every corpus preparer writes: ``manifest.csv`` and ``prepare.json``, each atomically (tmp + rename), so an
interrupted ``xmodal prepare`` never leaves a half-written manifest behind."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ...atomic import write_text

MANIFEST_COLUMNS = ["id", "image", "text", "label", "split"]


def atomic_write_text(path: Path, text: str) -> None:
    write_text(path, text, path.with_name(f".{path.name}.tmp{os.getpid()}"))  # pid: two preparers never share one


def write_manifest(path: Path, rows: list[dict], columns: list[str] = MANIFEST_COLUMNS) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def write_info(path: Path, info: dict) -> None:
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")


def up_to_date(manifest: Path, info_path: Path, params: dict) -> bool:
    """A manifest prepared earlier with the same parameters can be returned as is."""
    if not (manifest.is_file() and info_path.is_file()):
        return False
    try:
        return json.loads(info_path.read_text(encoding="utf-8"))["params"] == params
    except (ValueError, KeyError):
        return False


def split_counts(rows: list[dict], group: str, splits: tuple[str, ...] = ("train", "val", "test")) -> dict:
    """``prepare.json``'s counts for a labelled text corpus: rows, distinct ``group`` values (what the split keeps on
    one side: a movie, a normalised sentence) and labels, per split."""
    from collections import Counter

    return {"splits": {s: sum(r["split"] == s for r in rows) for s in splits},
            f"{group}s": {s: len({r[group] for r in rows if r["split"] == s}) for s in splits},
            "labels": {s: dict(sorted(Counter(r["label"] for r in rows if r["split"] == s).items())) for s in splits}}
