"""OpenMoji (the npm package ``openmoji``, CC BY-SA 4.0): 4,495 hand-drawn emoji SVGs, each with its Unicode
CLDR name and keywords and OpenMoji's own tags → PNGs + an image-text manifest with category labels (docs/data.md).

    from xmodal.data.corpora.openmoji import prepare_openmoji
    manifest = prepare_openmoji("data/openmoji", source="openmoji-17.0.0.tgz")   # npm pack openmoji
    # columns: id (hexcode), image (images/<hexcode>.png), text, label (category name, empty for the extras),
    # split, group, subgroup, annotation

A different kind of image–text data than Open Clip Art: flat, uniformly drawn pictograms (one designer team, one
palette, 72-unit grid) named by short human-written phrases, where Open Clip Art is heterogeneous drawings by
thousands of authors with free-form titles.

* **Source**: ``data/openmoji.json`` and ``color/svg/<hexcode>.svg`` of the package, read from the tarball that
  ``npm pack openmoji`` downloads (4.3 MB, no Node.js runtime needed) or from an unpacked package folder
  (``npm install openmoji`` → ``node_modules/openmoji``). Nothing is imported or run from it.
* **Rows**: one per emoji; the ``component`` group (skin-tone swatches, hair parts) is left out. Skin-tone variants
  (2,030 of the 4,495, e.g. "baby: medium skin tone") are left out by default — they differ from their base emoji
  only in colour, and would make half of the corpus a skin-colour test; ``skin_tones=True`` keeps them.
* **Text**: ``"<annotation>. keywords: a, b, c"`` — the CLDR name, then the CLDR keywords and OpenMoji's tags
  (deduplicated, at most 10; a skin-tone variant borrows its base emoji's). The group and subgroup are never in the
  text (they are the zero-shot labels).
* **Label**: the Unicode group as a noun phrase (``smileys-emotion`` → "smiley or emotion", ``travel-places`` →
  "place or vehicle", ..., :data:`CATEGORY_NAMES`, chosen before any result was seen); empty for OpenMoji's and
  Unicode's ``extras-*`` groups, which are mixtures, not categories (zero-shot skips rows without a label).
  ``group`` and ``subgroup`` keep the raw names.
* **Split**: 80/10/10 train/val/test by a hash of a group key (:func:`group_key`): the hexcode with skin-tone,
  gender, person, hair-style and facing-right code points removed, so "man running", "woman running", "person
  running", their skin tones and their mirror images ("person running: facing right") always land in one split, as
  do "man" and "man: red hair".
* **Images**: rendered at ``image_size`` px (square) onto white, RGB PNG, with rsvg-convert (librsvg2-bin) when
  installed, else cairosvg — as Open Clip Art.
* **Idempotent**: returns at once when ``manifest.csv`` and ``prepare.json`` exist with the same parameters;
  otherwise existing PNGs of the right size are reused.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from ._output import MANIFEST_COLUMNS, up_to_date, write_info, write_manifest

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the facing-right direction (27A1) and the hair styles are variants too
COLUMNS = [*MANIFEST_COLUMNS, "group", "subgroup", "annotation"]
INSTALL_HINT = ("get it with `npm pack openmoji` (downloads openmoji-<version>.tgz, 4.3 MB, into the current "
                "folder) and pass that file: xmodal prepare openmoji --source openmoji-17.0.0.tgz")
# Unicode's emoji groups as class names a prompt can hold ("a drawing of a {}."); the extras groups are mixtures.
CATEGORY_NAMES = {
    "smileys-emotion": "smiley or emotion", "people-body": "person or body part",
    "animals-nature": "animal or plant", "food-drink": "food or drink", "travel-places": "place or vehicle",
    "activities": "activity or sport", "objects": "object", "symbols": "symbol", "flags": "flag",
}
LEFT_OUT_GROUPS = frozenset({"component"})
# Code points that vary a person emoji without changing what it shows: skin tones, man/woman/person, the gender
# signs, the facing-right direction (a mirror image: "person running: facing right"), the hair styles ("man: red
# hair" is the man with other hair), the zero-width joiner and the emoji presentation selector.
_VARIANT_CODES = frozenset({"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF", "1F468", "1F469", "1F9D1", "2640", "2642",
                            "27A1", "1F9B0", "1F9B1", "1F9B2", "1F9B3", "200D", "FE0F"})
_HEXCODE = re.compile(r"^[0-9A-F]{2,6}(-[0-9A-F]{2,6})*$")
_MAX_KEYWORDS = 10


def group_key(hexcode: str) -> str:
    """The hexcode without skin-tone/gender/person/hair/direction code points: near-identical emoji share it (and so a
    split).
    ``1F3C3-1F3FD-200D-2642-FE0F`` (man running: medium skin tone) → ``1F3C3``; a code made only of those points
    (``1F468`` man) keeps its first."""
    parts = hexcode.split("-")
    kept = [p for p in parts if p not in _VARIANT_CODES]
    return "-".join(kept) if kept else parts[0]


def split_of(hexcode: str) -> str:
    h = int.from_bytes(hashlib.sha1(group_key(hexcode).encode("ascii")).digest()[:8], "big") / 2**64
    return "train" if h < 0.8 else ("val" if h < 0.9 else "test")


def keywords(*tag_fields: str) -> list[str]:
    out: dict[str, str] = {}
    for field in tag_fields:
        for k in (field or "").split(","):
            k = " ".join(k.split())
            if sum(c.isalpha() for c in k) >= 2:
                out.setdefault(k.lower(), k)
    return list(out.values())[:_MAX_KEYWORDS]


def make_caption(annotation: str, kws: list[str]) -> str:
    """``"grinning face. keywords: cheerful, face, grin"``."""
    text = " ".join(annotation.split())
    text = text if text[-1:] in ".!?" else text + "."
    kws = [k for k in kws if k.lower() != annotation.lower()]
    return f"{text} keywords: {', '.join(kws)}" if kws else text


# ------------------------------------------------------------------------------------------------------------ source

def find_source(source: str | os.PathLike | None = None) -> Path:
    """The package: ``source`` (a ``.tgz`` from ``npm pack`` or an unpacked package folder), else the first of
    ``./node_modules/openmoji``, ``./openmoji-*.tgz``, the global npm folders; a clear error when none is there."""
    if source is not None:
        p = Path(source).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such file or folder (the openmoji npm package: {INSTALL_HINT})")
        return p
    candidates = [Path("node_modules/openmoji"), *sorted(Path(".").glob("openmoji-*.tgz"), reverse=True),
                  Path("/usr/local/lib/node_modules/openmoji"), Path("/usr/lib/node_modules/openmoji")]
    for p in candidates:
        if p.exists():
            return p
    raise FileNotFoundError(f"the openmoji npm package was not found (looked for ./node_modules/openmoji, "
                            f"./openmoji-*.tgz and the global npm folders); {INSTALL_HINT}")


class _Package:
    """Read access to the package's files, from a tarball (members under ``package/``) or a folder."""

    def __init__(self, path: Path):
        self.path = path
        self._tar = None
        if path.is_file():
            try:
                self._tar = tarfile.open(path, "r:gz")
            except (tarfile.TarError, OSError) as e:
                raise ValueError(f"{path}: not a readable npm package tarball ({e}); {INSTALL_HINT}") from None
            self._members = {m.name.split("/", 1)[-1]: m for m in self._tar.getmembers() if m.isfile()}
        elif not (path / "data" / "openmoji.json").is_file():
            raise FileNotFoundError(f"{path}: no data/openmoji.json in this folder (not the openmoji package); "
                                    f"{INSTALL_HINT}")

    def read(self, rel: str) -> bytes | None:
        if self._tar is None:
            p = self.path / rel
            return p.read_bytes() if p.is_file() else None
        member = self._members.get(rel)
        f = self._tar.extractfile(member) if member is not None else None
        return f.read() if f is not None else None

    def version(self) -> str:
        raw = self.read("package.json")
        try:
            return str(json.loads(raw)["version"]) if raw else "unknown"
        except (ValueError, KeyError):
            return "unknown"

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def _entries(pkg: _Package, where: Path) -> list[dict[str, Any]]:
    raw = pkg.read("data/openmoji.json")
    if raw is None:
        raise FileNotFoundError(f"{where}: no data/openmoji.json in the package; {INSTALL_HINT}")
    try:
        entries = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{where}: data/openmoji.json is not valid JSON ({e})") from None
    if not isinstance(entries, list):
        raise ValueError(f"{where}: data/openmoji.json: expected a list of emoji records")
    for i, e in enumerate(entries):
        for field in ("hexcode", "group", "subgroups", "annotation"):
            if not isinstance(e, dict) or not isinstance(e.get(field), str):
                raise ValueError(f"{where}: data/openmoji.json: record {i}: field {field!r} missing or not text")
        if not _HEXCODE.match(e["hexcode"]):
            raise ValueError(f"{where}: data/openmoji.json: record {i}: hexcode {e['hexcode']!r} is not "
                             f"hex code points joined by '-'")
    return entries


# --------------------------------------------------------------------------------------------------------- rendering

def _render(task: tuple) -> dict[str, Any]:
    """Worker: SVG bytes → a white-backed RGB PNG (or reuse one of the right size). Never raises."""
    from .openclipart import _existing_ok, _render_cairosvg, _render_rsvg, _to_white_rgb_png

    hexcode, svg_path, out, size, engine = task
    if _existing_ok(out, size):
        return {"hexcode": hexcode, "status": "ok", "reused": True}
    errors = []
    for name in (["rsvg", "cairosvg"] if engine == "rsvg" else ["cairosvg"]):
        try:
            png = (_render_rsvg if name == "rsvg" else _render_cairosvg)(svg_path, size, 60.0)
            if not _to_white_rgb_png(png, out):
                return {"hexcode": hexcode, "status": "blank"}
            return {"hexcode": hexcode, "status": "ok", "reused": False}
        except Exception as e:  # noqa: BLE001 - a broken SVG raises anything; record it and go on
            errors.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
    return {"hexcode": hexcode, "status": "failed", "error": "; ".join(errors)}


def _render_all(tasks: list[tuple], workers: int, progress: bool) -> list[dict[str, Any]]:
    from ...progress import tqdm

    bar = tqdm(total=len(tasks), desc="openmoji", unit="svg", disable=not progress)
    try:
        if workers <= 1:
            out = []
            for t in tasks:
                out.append(_render(t))
                bar.update()
            return out
        with mp.get_context().Pool(workers) as pool:
            out = []
            for r in pool.imap_unordered(_render, tasks, chunksize=16):
                out.append(r)
                bar.update()
            return out
    finally:
        bar.close()


# ----------------------------------------------------------------------------------------------------------- prepare

def _rows(entries: list[dict], skin_tones: bool) -> tuple[list[dict], Counter]:
    counts: Counter = Counter(records=len(entries))
    by_hex = {e["hexcode"]: e for e in entries}
    rows = []
    for e in entries:
        if e["group"] in LEFT_OUT_GROUPS:
            counts["left_out_component"] += 1
            continue
        base = by_hex.get(e.get("skintone_base_hexcode") or "") if e.get("skintone") not in (None, "") else None
        if base is not None and not skin_tones:
            counts["left_out_skin_tone"] += 1
            continue
        tags = (e.get("tags") or "", e.get("openmoji_tags") or "")
        if base is not None and not any(tags):  # a skin-tone variant: its base emoji's keywords
            tags = (base.get("tags") or "", base.get("openmoji_tags") or "")
        annotation = " ".join(e["annotation"].split())
        if sum(c.isalpha() for c in annotation) < 2:
            counts["no_text"] += 1
            continue
        hx = e["hexcode"]
        rows.append({"id": hx, "image": f"images/{hx}.png", "text": make_caption(annotation, keywords(*tags)),
                     "label": CATEGORY_NAMES.get(e["group"], ""), "split": split_of(hx), "group": e["group"],
                     "subgroup": e["subgroups"], "annotation": annotation})
    return rows, counts


def prepare_openmoji(
    out_dir: str | os.PathLike,
    *,
    source: str | os.PathLike | None = None,
    image_size: int = 128,
    skin_tones: bool = False,
    workers: int = 2,
    renderer: str = "auto",
    progress: bool = True,
) -> Path:
    """Render the OpenMoji SVGs into ``out_dir`` and write ``out_dir/manifest.csv``; → the manifest path.

    See the module docstring. ``prepare.json`` records the parameters, the package version and counts (rows per
    split and label, left out by reason, rendered, failed) and the time taken."""
    from .openclipart import _resolve_renderer

    t0 = time.time()
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    src = find_source(source)
    out = Path(out_dir).expanduser().resolve()
    manifest, info_path = out / "manifest.csv", out / "prepare.json"
    params = {"image_size": image_size, "skin_tones": skin_tones, "renderer": renderer,
              "source_name": src.resolve().name, "format_version": FORMAT_VERSION}
    if up_to_date(manifest, info_path, params):
        log.info("%s is up to date", manifest)
        return manifest
    engine = _resolve_renderer(renderer)
    pkg = _Package(src)
    try:
        version = pkg.version()
        rows, counts = _rows(_entries(pkg, src), skin_tones)
        svg_dir = out / "svg"  # the SVGs the renderers read (they take a path); kept for a re-render
        svg_dir.mkdir(parents=True, exist_ok=True)
        (out / "images").mkdir(exist_ok=True)
        tasks, missing = [], []
        for r in rows:
            svg = svg_dir / f"{r['id']}.svg"
            if not svg.is_file():
                data = pkg.read(f"color/svg/{r['id']}.svg")
                if data is None:
                    missing.append(r["id"])
                    continue
                tmp = svg.with_name(f".{svg.name}.tmp{os.getpid()}")
                tmp.write_bytes(data)
                os.replace(tmp, svg)
            tasks.append((r["id"], str(svg), str(out / r["image"]), image_size, engine))
    finally:
        pkg.close()
    results = {r["hexcode"]: r for r in _render_all(tasks, workers, progress)}
    failures = [f"{h}: {r['error']}" for h, r in sorted(results.items()) if r["status"] == "failed"]
    rows = [r for r in rows if results.get(r["id"], {}).get("status") == "ok"]
    if not rows:
        raise RuntimeError(f"prepare_openmoji: no usable emoji in {src} (failures: {failures[:3]})")
    write_manifest(manifest, rows, COLUMNS)
    status = Counter(r["status"] for r in results.values())
    splits = Counter(r["split"] for r in rows)
    info = {
        "params": params,
        "package_version": version,
        "licence": "CC BY-SA 4.0 (OpenMoji, https://openmoji.org)",
        "renderer_used": engine,
        "counts": {
            "records": counts["records"], "rows": len(rows),
            "left_out": {"component": counts["left_out_component"], "skin_tone": counts["left_out_skin_tone"],
                         "no_text": counts["no_text"], "no_svg": len(missing), "blank": status["blank"],
                         "failed": status["failed"]},
            "newly_rendered": sum(1 for r in results.values() if r["status"] == "ok" and not r["reused"]),
            "splits": {s: splits.get(s, 0) for s in ("train", "val", "test")},
            "labels": dict(sorted(Counter(r["label"] or "(extras: no label)" for r in rows).items())),
        },
        "missing_svg": missing[:100],
        "failures": failures[:100],
        "seconds": round(time.time() - t0, 1),
    }
    write_info(info_path, info)
    log.info("openmoji: %d rows (%s) in %.0f s → %s", len(rows), dict(splits), time.time() - t0, manifest)
    return manifest
