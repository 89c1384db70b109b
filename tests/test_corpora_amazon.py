"""Amazon phone-review sentences from the npm package wink-sentiment: counts and labels against the raw file read
independently, grouped splits (no sentence on both sides), the tarball path, and one-line errors."""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from _requires import missing


@pytest.fixture(scope="module")
def raw_file() -> Path:
    from xmodal.data.corpora.amazon_cells import PACKAGE_PIN, source_file
    try:
        return source_file()
    except FileNotFoundError:
        missing(f"npm package wink-sentiment not installed: npm install -g {PACKAGE_PIN} (scripts/bootstrap.sh)")


def test_amazon_cells_real_file(raw_file: Path, tmp_path: Path):
    from xmodal.data.corpora import prepare_amazon_cells

    manifest = prepare_amazon_cells(tmp_path / "ac")
    df = pd.read_csv(manifest, keep_default_na=False)
    assert list(df.columns) == ["id", "text", "label", "sentiment", "group", "split"]
    # the raw file, read independently: 1,000 "sentence<TAB>0|1" lines, 500 of each label (the published counts)
    raw = pd.read_csv(raw_file, sep="\t", header=None, names=["text", "y"], quoting=3, keep_default_na=False)
    assert len(df) == len(raw) == 1000 and df["id"].is_unique
    assert df["label"].tolist() == raw["y"].map({0: "negative", 1: "positive"}).tolist()
    assert df["text"].tolist() == [" ".join(t.split()) for t in raw["text"]]
    assert df["label"].value_counts().to_dict() == {"negative": 500, "positive": 500}

    # grouped: every normalised sentence in exactly one split (11 sentences repeat in the file, up to case and
    # punctuation); 60/20/20 of the groups
    assert (df.groupby("group")["split"].nunique() == 1).all()
    assert df["group"].nunique() == 983
    groups = df.groupby("split")["group"].nunique().to_dict()
    assert groups == {"train": round(0.6 * 983), "val": round(0.2 * 983), "test": 983 - 590 - 197}
    works = df[df["text"].str.lower().str.startswith("works great")]
    assert works["split"].nunique() == 1 and len(works) >= 2
    info = json.loads((tmp_path / "ac" / "prepare.json").read_text())
    assert info["counts"]["splits"] == df["split"].value_counts().to_dict()

    # idempotent; another seed → another split
    mtime = os.stat(manifest).st_mtime_ns
    assert prepare_amazon_cells(tmp_path / "ac") == manifest and os.stat(manifest).st_mtime_ns == mtime
    other = pd.read_csv(prepare_amazon_cells(tmp_path / "ac1", seed=1), keep_default_na=False)
    assert set(other[other.split == "test"].id) != set(df[df.split == "test"].id)


def _tarball(path: Path, lines: list[str]) -> Path:
    data = ("\n".join(lines) + "\n").encode("utf-8")
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("package/test/data/amazon_cells_labelled.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_amazon_cells_from_npm_tarball_and_grouping(tmp_path: Path):
    from xmodal.data.corpora import prepare_amazon_cells

    lines = ["Works great!.\t1", "works  great.\t1", "Broke in a week.\t0", "Love it.\t1", "Junk.\t0"] + \
        [f"Sentence number {i} here.\t{i % 2}" for i in range(15)]
    df = pd.read_csv(prepare_amazon_cells(tmp_path / "out", source=_tarball(tmp_path / "w.tgz", lines)),
                     keep_default_na=False)
    assert len(df) == 20 and df.loc[1, "text"] == "works great." and df.loc[2, "label"] == "negative"
    # the two spellings of "works great" are one group (19 groups: 11 train, 4 val, 4 test) in one split
    assert df.loc[0, "group"] == df.loc[1, "group"] == "works great" and df.loc[0, "split"] == df.loc[1, "split"]
    assert df.groupby("split")["group"].nunique().to_dict() == {"train": 11, "val": 4, "test": 4}


def test_amazon_cells_bad_input_names_the_line(tmp_path: Path):
    from xmodal.data.corpora import prepare_amazon_cells

    bad = tmp_path / "bad.txt"
    bad.write_text("Fine.\t1\nNo tab here 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.txt: line 2: expected 'sentence<TAB>0\|1', found no tab"):
        prepare_amazon_cells(tmp_path / "o", source=bad)
    bad.write_text("Fine.\t1\nMeh.\t3\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: label must be 0 or 1, got '3'"):
        prepare_amazon_cells(tmp_path / "o", source=bad)
    with pytest.raises(FileNotFoundError, match="no package/test/data/amazon_cells_labelled.txt inside"):
        prepare_amazon_cells(tmp_path / "o", source=_tarball_without(tmp_path / "x.tgz"))
    assert not (tmp_path / "o" / "manifest.csv").exists()


def _tarball_without(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("package/README.md")
        tar.addfile(info, io.BytesIO(b""))
    return path
