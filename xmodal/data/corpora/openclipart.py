"""Open Clip Art (Debian ``openclipart-svg``): 8,121 public-domain SVG files with human-written titles,
keywords and (some) descriptions → PNGs + an image-text manifest (7,326 rows, 22 labels: docs/data.md).

    from xmodal.data.corpora.openclipart import prepare_openclipart
    manifest = prepare_openclipart("data/openclipart")      # data/openclipart/manifest.csv
    # columns: id (the SVG's path without .svg), image (images/<path>.png, relative), text, label (category), split,
    # title (the cleaned title alone; may be empty when keywords carry the text)

* **Text**: a caption built from the RDF metadata — the cleaned ``dc:title``, the ``dc:description`` when it is
  real prose (not an e-mail/URL/collection note), then ``keywords: a, b, c`` from ``dc:subject`` (junk keywords such
  as "unsorted", "clip art", "hash" dropped). Titles that name a whole icon collection ("Lemon SVG theme",
  "Part of the Flat Icon Collection (...)", "gramastar") are replaced by a name derived from the file name. Rows with
  neither a usable title nor keywords are dropped (``no_text`` in prepare.json).
* **Images**: rendered at ``image_size`` px on the longer side (aspect kept) and composited onto **white**, saved
  as RGB PNG under ``images/<category>/<sub folders>/<stem>.png`` (the sub folders are kept because 531 file names
  repeat across folders of one category). Renderer: ``rsvg-convert`` (librsvg2-bin, ~1.5x faster than cairosvg
  here) when installed, else cairosvg; a file rsvg-convert cannot read is retried with cairosvg. Single-colour
  (blank) renders are dropped. Files over ``max_bytes`` are skipped; each file has a ``timeout``.
* **Duplicates**: byte-identical SVGs (663 extra copies in the package, e.g. ``dolphin.svg`` in three folders) are
  kept once (the first by path), so one drawing never lands in two splits.
* **Split**: by a hash of the relative SVG path (80/10/10 train/val/test) — stable across ``limit``/``seed``.
  ``seed`` only chooses which files a ``limit`` keeps.
* **Idempotent**: when ``manifest.csv`` and ``prepare.json`` exist with the same parameters the manifest is
  returned at once; otherwise existing PNGs of the right size are reused and only missing ones are rendered.
"""
from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from typing import Any

from ...atomic import replacing
from ._output import MANIFEST_COLUMNS, up_to_date, write_info, write_manifest

log = logging.getLogger(__name__)

SVG_ROOT = "/usr/share/openclipart/svg"
FORMAT_VERSION = 3  # bump when the captions, rendering or layout change (forces a rebuild)

_NS = {
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "cc": "http://web.resource.org/cc/",
}
JUNK_KEYWORDS = frozenset({
    "", "unsorted", "clip art", "clipart", "clip-art", "media", "public domain", "publicdomain", "svg", "image",
    "images", "hash", "magick", "theme", "lemon theme icon", "appicon", "mimetypes", "mime-types", "mime types",
})
_COLLECTION_TITLE = re.compile(
    r"collection|\btheme\b|-theme\b|iconset|\bicons\b|\bcliparts\b|symbol signs|road signs|sibmission|submission|"
    r"^gramastar$", re.I)
_CLIPART_BY = re.compile(r"^clip ?art by [^-]{1,60}? - ", re.I)
_NOT_PROSE = re.compile(r"\S+@\S+\.\w+|https?://|www\.|eps converted from|collection|^contact\b", re.I)
_MAX_DESCRIPTION = 200
_MAX_KEYWORDS = 10


# ---------------------------------------------------------------------------------------------------- metadata/text

def _clean(s: str | None) -> str:
    return " ".join((s or "").replace("_", " ").split())


def parse_metadata(svg_path: str | os.PathLike) -> dict[str, Any]:
    """→ {"title", "description", "keywords"} from the SVG's ``cc:Work`` RDF block (raw, whitespace-collapsed)."""
    try:
        root = ET.parse(svg_path).getroot()
        work = next((el for el in root.iter(f"{{{_NS['cc']}}}Work")), None)
        if work is None:
            return {"title": "", "description": "", "keywords": []}
        title = work.find("dc:title", _NS)
        desc = work.find("dc:description", _NS)
        kws = [li.text or "" for li in work.findall("dc:subject/rdf:Bag/rdf:li", _NS)]
        if not kws:  # some files put comma-separated keywords straight into dc:subject
            subj = work.find("dc:subject", _NS)
            kws = (subj.text or "").split(",") if subj is not None else []
        return {"title": " ".join((title.text or "").split()) if title is not None else "",
                "description": " ".join((desc.text or "").split()) if desc is not None else "",
                "keywords": [" ".join(k.split()) for k in kws]}
    except ET.ParseError:  # fall back to a regex over the text (rare: broken XML that renderers still accept)
        text = Path(svg_path).read_text(encoding="utf-8", errors="replace")
        m = re.search(r"<cc:Work\b.*?</cc:Work>", text, re.S)
        block = m.group(0) if m else ""
        t = re.search(r"<dc:title>(.*?)</dc:title>", block, re.S)
        d = re.search(r"<dc:description>(.*?)</dc:description>", block, re.S)
        return {"title": " ".join(t.group(1).split()) if t else "",
                "description": " ".join(d.group(1).split()) if d else "",
                "keywords": [" ".join(k.split()) for k in re.findall(r"<rdf:li>(.*?)</rdf:li>", block, re.S)]}


def name_from_stem(stem: str) -> str:
    """``aiga_first_aid1`` → ``aiga first aid``; numbers-only tokens dropped."""
    tokens = [re.sub(r"\d+$", "", t) for t in re.split(r"[_\-+.\s]+", stem)]
    name = " ".join(t for t in tokens if t and not t.isdigit())
    return name if sum(c.isalpha() for c in name) >= 2 else ""


def clean_title(raw: str, stem: str) -> tuple[str, bool]:
    """→ (title, taken_from_file_name). Collection names are replaced by a name derived from the file name."""
    t = _CLIPART_BY.sub("", _clean(raw))
    if t and _COLLECTION_TITLE.search(t):
        return name_from_stem(stem), True
    if sum(c.isalpha() for c in t) < 2:
        return "", False
    return t, False


def clean_description(raw: str, title: str) -> str:
    d = " ".join((raw or "").split())
    if not d or _NOT_PROSE.search(d) or d.lower().rstrip(".") in title.lower():
        return ""
    if len(d) > _MAX_DESCRIPTION:
        d = d[:_MAX_DESCRIPTION].rsplit(" ", 1)[0].rstrip(",;:") + "..."
    return d


def clean_keywords(raw: list[str]) -> list[str]:
    out: dict[str, str] = {}
    for k in raw:
        k = _clean(k).strip(" ,;")
        low = k.lower()
        if low in JUNK_KEYWORDS or low in out or sum(c.isalpha() for c in k) < 2:
            continue
        out[low] = k
    return list(out.values())[:_MAX_KEYWORDS]


def make_caption(title: str, description: str, keywords: list[str]) -> str:
    """``"Lemon. A ripe lemon. keywords: fruit, food"`` (any part may be absent)."""
    parts = []
    if title:
        parts.append(title if title[-1] in ".!?" else title + ".")
    if description:
        parts.append(description if description[-1] in ".!?" else description + ".")
    if keywords:
        parts.append("keywords: " + ", ".join(keywords))
    return " ".join(parts)


def split_of(rel: str) -> str:
    """Deterministic 80/10/10 split from a hash of the file NAME: the collection files one drawing under several
    folders (animals/frog.svg, animals/amphibian/frog.svg) with slightly different keywords, so hashing the path
    would put copies of one picture on both sides of the train/test line."""
    name = rel.rsplit("/", 1)[-1]
    h = int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2**64
    return "train" if h < 0.8 else ("val" if h < 0.9 else "test")


# -------------------------------------------------------------------------------------------------------- rendering

class _Timeout(Exception):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _Timeout()


def _render_cairosvg(svg: str, size: int, timeout: float) -> bytes:
    import cairosvg

    use_alarm = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        png = cairosvg.svg2png(url=svg, output_width=size)
        from PIL import Image

        with Image.open(io.BytesIO(png)) as im:
            w, h = im.size
        if h > w:  # fit the longer side
            png = cairosvg.svg2png(url=svg, output_height=size)
        return png
    except _Timeout:
        raise TimeoutError(f"cairosvg took more than {timeout:g} s") from None
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def _render_rsvg(svg: str, size: int, timeout: float) -> bytes:
    try:
        r = subprocess.run(["rsvg-convert", "-w", str(size), "-h", str(size), "-a", "-f", "png", svg],
                           capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"rsvg-convert took more than {timeout:g} s") from None
    if r.returncode != 0 or not r.stdout:
        msg = r.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError(f"rsvg-convert failed: {(msg[0] if msg else 'no output')[:200]}")
    return r.stdout


def _to_white_rgb_png(png: bytes, out: str) -> bool:
    """Composite onto white, save RGB PNG atomically; → False (nothing written) when the render is one colour."""
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im.load()
        rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB")
    if all(lo == hi for lo, hi in rgb.getextrema()):
        return False
    with replacing(out, f"{out}.tmp{os.getpid()}", fsync=False) as tmp:
        rgb.save(tmp, format="PNG", optimize=False)
    return True


def _existing_ok(out: str, size: int) -> bool:
    from PIL import Image

    try:
        with Image.open(out) as im:
            return max(im.size) == size and im.mode == "RGB"
    except Exception:  # noqa: BLE001
        return False


def _process(task: tuple) -> dict[str, Any]:
    """Worker: metadata → caption; render unless a good PNG exists. Never raises."""
    svg, rel, out, size, renderer, timeout = task
    res: dict[str, Any] = {"rel": rel}
    try:
        meta = parse_metadata(svg)
    except Exception as e:  # noqa: BLE001
        meta = {"title": "", "description": "", "keywords": []}
        res["meta_error"] = f"{type(e).__name__}: {e}"
    title, from_name = clean_title(meta["title"], Path(rel).stem)
    keywords = clean_keywords(meta["keywords"])
    if not title and not keywords:
        res["status"] = "no_text"
        return res
    res.update(text=make_caption(title, clean_description(meta["description"], title), keywords), title=title,
               title_from_filename=from_name)
    if _existing_ok(out, size):
        res.update(status="ok", reused=True)
        return res
    os.makedirs(os.path.dirname(out), exist_ok=True)
    errors = []
    for name in (["rsvg", "cairosvg"] if renderer == "rsvg" else ["cairosvg"]):
        try:
            png = (_render_rsvg if name == "rsvg" else _render_cairosvg)(svg, size, timeout)
            if not _to_white_rgb_png(png, out):
                res.update(status="blank", renderer=name)
                return res
            res.update(status="ok", reused=False, renderer=name)
            return res
        except Exception as e:  # noqa: BLE001 - broken SVGs raise anything; record and move on
            errors.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
    res.update(status="failed", error="; ".join(errors))
    return res


# ---------------------------------------------------------------------------------------------------------- prepare

def _resolve_renderer(renderer: str) -> str:
    if renderer not in ("auto", "rsvg", "cairosvg"):
        raise ValueError(f"renderer must be 'auto', 'rsvg' or 'cairosvg', got {renderer!r}")
    if renderer == "auto":
        return "rsvg" if shutil.which("rsvg-convert") else "cairosvg"
    if renderer == "rsvg" and not shutil.which("rsvg-convert"):
        raise FileNotFoundError("rsvg-convert not found (apt-get install librsvg2-bin), or use renderer='cairosvg'")
    return renderer


def prepare_openclipart(
    out_dir: str | os.PathLike,
    *,
    image_size: int = 128,
    limit: int | None = None,
    workers: int = 2,
    svg_root: str | os.PathLike = SVG_ROOT,
    seed: int = 0,
    renderer: str = "auto",
    max_bytes: int = 2_000_000,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Render the Open Clip Art SVGs into ``out_dir`` and write ``out_dir/manifest.csv``; → the manifest path.

    See the module docstring. ``prepare.json`` records the parameters and counts (rendered, failed, skipped by
    reason, rows per split and label) and the time taken.
    """
    t0 = time.time()
    out = Path(out_dir).expanduser().resolve()
    src = Path(svg_root).expanduser()
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no Open Clip Art SVG folder (apt-get install openclipart-svg)")
    manifest = out / "manifest.csv"
    info_path = out / "prepare.json"
    params = {"image_size": image_size, "limit": limit, "seed": seed, "svg_root": str(src.resolve()),
              "renderer": renderer, "max_bytes": max_bytes, "format_version": FORMAT_VERSION}
    if up_to_date(manifest, info_path, params):
        log.info("%s is up to date", manifest)
        return manifest
    engine = _resolve_renderer(renderer)

    # ---- the file list: size filter, exact-duplicate removal (first path wins), optional subset
    counts: Counter = Counter()
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.svg") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{src}: no .svg files")
    counts["svg_files"] = len(files)
    seen: set[str] = set()
    kept = []
    for rel in files:
        p = src / rel
        if p.stat().st_size > max_bytes:
            counts["too_large"] += 1
            continue
        digest = hashlib.md5(p.read_bytes()).hexdigest()
        if digest in seen:
            counts["duplicates"] += 1
            continue
        seen.add(digest)
        kept.append(rel)
    if limit is not None and limit < len(kept):
        kept = sorted(random.Random(seed).sample(kept, limit))
    counts["selected"] = len(kept)

    images = out / "images"
    tasks = [(str(src / rel), rel, str(images / (rel[:-4] + ".png")), image_size, engine, timeout) for rel in kept]
    results = _run(tasks, workers, progress, stall_timeout=timeout * 8 + 60)  # 4 files a chunk, 2 renderers

    rows, failures, renderers = [], [], Counter()
    skipped_files: dict[str, list[str]] = {"no_text": [], "blank": []}
    for r in sorted(results, key=lambda r: r["rel"]):
        status = r["status"]
        counts[status] += 1
        if status == "failed":
            failures.append(f"{r['rel']}: {r['error']}")
            continue
        if status != "ok":
            skipped_files.setdefault(status, []).append(r["rel"])
            continue
        counts["reused" if r.get("reused") else "newly_rendered"] += 1
        counts["title_from_filename"] += bool(r.get("title_from_filename"))
        if r.get("renderer"):
            renderers[r["renderer"]] += 1
        rel = r["rel"]
        rows.append({"id": rel[:-4], "image": f"images/{rel[:-4]}.png", "text": r["text"],
                     "label": rel.split("/", 1)[0] if "/" in rel else "unsorted", "split": split_of(rel),
                     "title": r["title"]})
    if not rows:
        raise RuntimeError(f"prepare_openclipart: no usable drawings in {src} (failures: {failures[:3]})")

    out.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest, rows, [*MANIFEST_COLUMNS, "title"])
    splits = Counter(r["split"] for r in rows)
    info = {
        "params": params,
        "renderer_used": engine,
        "counts": {
            "svg_files": counts["svg_files"], "selected": counts["selected"], "rows": len(rows),
            "rendered": counts["ok"], "newly_rendered": counts["newly_rendered"], "reused": counts["reused"],
            "failed": counts["failed"],
            "skipped": {"duplicates": counts["duplicates"], "too_large": counts["too_large"],
                        "no_text": counts["no_text"], "blank": counts["blank"]},
            "title_from_filename": counts["title_from_filename"],
            "by_renderer": dict(renderers),
            "splits": {s: splits.get(s, 0) for s in ("train", "val", "test")},
            "labels": dict(sorted(Counter(r["label"] for r in rows).items())),
        },
        "failures": failures[:100],
        "skipped_files": {k: v[:200] for k, v in skipped_files.items()},
        "seconds": round(time.time() - t0, 1),
    }
    write_info(info_path, info)
    log.info("open clip art: %d rows (%s) in %.0f s → %s", len(rows), dict(splits), time.time() - t0, manifest)
    return manifest


def _process_many(tasks: list[tuple]) -> list[dict[str, Any]]:
    return [_process(t) for t in tasks]


def _run(tasks: list[tuple], workers: int, progress: bool, stall_timeout: float,
         chunksize: int = 4) -> list[dict[str, Any]]:
    """Run ``_process`` over the tasks in a process pool (``chunksize`` files per task) with a progress bar. If no
    chunk finishes for ``stall_timeout`` s (a renderer stuck in C code despite the per-file timeouts), the pool is
    killed and the unfinished files count as failed."""
    from ...progress import tqdm

    bar = tqdm(total=len(tasks), desc="open clip art", unit="svg", disable=not progress, smoothing=0.05)
    results: list[dict[str, Any]] = []
    try:
        if workers <= 1:
            for t in tasks:
                results.append(_process(t))
                bar.update()
            return results
        ctx = mp.get_context()
        chunks = [tasks[i:i + chunksize] for i in range(0, len(tasks), chunksize)]
        pool = ctx.Pool(workers)
        try:
            # chunks by hand: imap_unordered(chunksize>1) returns a plain generator without next(timeout=)
            it = pool.imap_unordered(_process_many, chunks)
            for _ in range(len(chunks)):
                try:
                    batch = it.next(timeout=stall_timeout)
                except mp.TimeoutError:
                    done = {r["rel"] for r in results}
                    log.warning("open clip art: no progress for %.0f s; stopping the workers", stall_timeout)
                    results.extend({"rel": t[1], "status": "failed", "error": "stalled (worker killed)"}
                                   for t in tasks if t[1] not in done)
                    break
                results.extend(batch)
                bar.update(len(batch))
        finally:
            pool.terminate()
            pool.join()
        return results
    finally:
        bar.close()
