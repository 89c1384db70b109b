"""Built-in corpora: Open Clip Art (rendered SVGs + captions from RDF metadata) and Fashion-MNIST (idx files)."""
from __future__ import annotations

import csv
import gzip
import json
import os
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

from xmodal.data import read_manifest

from _requires import needs  # skip without what bootstrap installs; fail in CI

SVG_ROOT = Path("/usr/share/openclipart/svg")
FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
RDF = {"rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#", "dc": "http://purl.org/dc/elements/1.1/",
       "cc": "http://web.resource.org/cc/"}
needs_svgs = needs(SVG_ROOT.is_dir(), "apt-get install openclipart-svg")
needs_fmnist = needs(FMNIST_ROOT.is_dir(), "apt-get install dataset-fashion-mnist")


def _rows(manifest: Path) -> list[dict]:
    with open(manifest, newline="") as f:
        return list(csv.DictReader(f))


def _dc_title(svg: Path) -> str:
    work = ET.parse(svg).getroot().find(".//cc:Work", RDF)
    title = work.find("dc:title", RDF)
    return " ".join((title.text or "").split()) if title is not None else ""


@needs_svgs
def test_openclipart_small(tmp_path: Path):
    from xmodal.data.corpora.openclipart import prepare_openclipart

    out = tmp_path / "oca"
    manifest = prepare_openclipart(out, limit=40, image_size=64, workers=2, progress=False)
    assert manifest == out / "manifest.csv"
    rows = _rows(manifest)
    info = json.loads((out / "prepare.json").read_text())
    counts = info["counts"]
    assert counts["selected"] == 40 and counts["rows"] == len(rows) >= 30
    assert counts["rendered"] + counts["failed"] + sum(counts["skipped"][k] for k in ("no_text", "blank")) == 40
    assert list(rows[0]) == ["id", "image", "text", "label", "split", "title"]
    # every image is a readable white-background RGB PNG, 64 px on its longer side; label = top folder
    for r in rows:
        assert not Path(r["image"]).is_absolute()
        with Image.open(out / r["image"]) as im:
            im.verify()
        with Image.open(out / r["image"]) as im:
            assert im.mode == "RGB" and max(im.size) == 64
        assert r["label"] == r["id"].split("/")[0] and r["text"].strip()
        assert r["text"].startswith(r["title"])  # the caption begins with the title column
        assert (SVG_ROOT / (r["id"] + ".svg")).is_file()
    # captions carry the drawing's real dc:title (parsed here independently) unless it names a whole collection
    collection = re.compile(r"collection|theme|icons|iconset|cliparts|signs|sibmission|gramastar|clipart by", re.I)
    checked = 0
    for r in rows:
        title = _dc_title(SVG_ROOT / (r["id"] + ".svg")).replace("_", " ")
        title = " ".join(title.split())
        if sum(c.isalpha() for c in title) >= 2 and not collection.search(title):
            assert r["text"].startswith(title), (r, title)
            checked += 1
    assert checked >= 10
    # splits: every row has one, the counts add up, and the manifest validates
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    assert sum(counts["splits"].values()) == len(rows)
    assert counts["splits"]["train"] == sum(r["split"] == "train" for r in rows)
    m = read_manifest(manifest, split="train")
    assert len(m) == counts["splits"]["train"] and m.skipped == 0

    # idempotent: same parameters → nothing is touched
    png = out / rows[0]["image"]
    mtime = png.stat().st_mtime_ns
    info_text = (out / "prepare.json").read_text()
    assert prepare_openclipart(out, limit=40, image_size=64, workers=2, progress=False) == manifest
    assert png.stat().st_mtime_ns == mtime and (out / "prepare.json").read_text() == info_text
    # a lost manifest and one lost PNG: only that PNG is rendered again
    manifest.unlink()
    png.unlink()
    prepare_openclipart(out, limit=40, image_size=64, workers=1, progress=False)
    again = json.loads((out / "prepare.json").read_text())["counts"]
    assert again["newly_rendered"] == 1 and again["reused"] == counts["rendered"] - 1
    assert _rows(manifest) == rows


@needs_svgs
def test_openclipart_captions_junk_and_broken_files(tmp_path: Path):
    from xmodal.data.corpora.openclipart import prepare_openclipart

    root = tmp_path / "svg"
    (root / "animals").mkdir(parents=True)
    (root / "shapes").mkdir()
    real = sorted((SVG_ROOT / "animals").rglob("*.svg"))[0]
    body = re.sub(r"<metadata>.*</metadata>", "", real.read_text(encoding="utf-8"), flags=re.S)

    def svg(title: str, desc: str, keywords: list[str]) -> str:
        lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
        meta = (f'<metadata><rdf:RDF xmlns:rdf="{RDF["rdf"]}" xmlns:dc="{RDF["dc"]}" xmlns:cc="{RDF["cc"]}">'
                f"<cc:Work><dc:title>{title}</dc:title><dc:description>{desc}</dc:description>"
                f"<dc:subject><rdf:Bag>{lis}</rdf:Bag></dc:subject></cc:Work></rdf:RDF></metadata>")
        return re.sub(r"(<svg\b[^>]*>)", lambda m: m.group(1) + meta, body, count=1)

    (root / "animals" / "happy_cat.svg").write_text(
        svg("Happy_Cat ", "A cat that smiles.", ["unsorted", "Clip Art", "cat", "pet", "cat", "public domain"]))
    (root / "animals" / "copy_of_cat.svg").write_text((root / "animals" / "happy_cat.svg").read_text())  # duplicate
    (root / "shapes" / "no_words.svg").write_text(svg("", "", ["unsorted", "svg"]))
    broken = svg("Broken", "", ["shape"])
    (root / "shapes" / "broken.svg").write_text(broken[: len(broken) // 2])  # truncated XML: renderers fail
    (root / "shapes" / "big_star.svg").write_text(svg("Part of the Flat Icon Collection (2004)", "", ["star"]))
    out = tmp_path / "out"
    prepare_openclipart(out, svg_root=root, image_size=32, workers=1, progress=False)
    rows = {r["id"]: r for r in _rows(out / "manifest.csv")}
    counts = json.loads((out / "prepare.json").read_text())["counts"]
    assert set(rows) == {"animals/copy_of_cat", "shapes/big_star"}  # copy_of_cat sorts before happy_cat
    assert rows["animals/copy_of_cat"]["text"] == "Happy Cat. A cat that smiles. keywords: cat, pet"
    assert rows["shapes/big_star"]["text"] == "big star. keywords: star"  # collection title → file name
    assert counts["skipped"] == {"duplicates": 1, "too_large": 0, "no_text": 1, "blank": 0}
    assert counts["failed"] == 1 and counts["rows"] == 2


@needs_fmnist
def test_fashion_mnist_pixels_and_labels_match_the_idx_files(tmp_path: Path):
    from xmodal.data.corpora.fashion_mnist import CLASS_NAMES, prepare_fashion_mnist

    out = tmp_path / "fm"
    manifest = prepare_fashion_mnist(out, max_per_split=20, progress=False)
    rows = _rows(manifest)
    assert [sum(r["split"] == s for r in rows) for s in ("train", "val", "test")] == [20, 20, 20]

    def idx(name: str, offset: int) -> np.ndarray:
        return np.frombuffer(gzip.open(FMNIST_ROOT / name).read(), dtype=np.uint8, offset=offset)

    images = {"train": idx("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
              "test": idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)}
    labels = {"train": idx("train-labels-idx1-ubyte.gz", 8), "test": idx("t10k-labels-idx1-ubyte.gz", 8)}
    by_id = {r["id"]: r for r in rows}
    assert "train-0" in by_id and "train-54000" in by_id and "test-0" in by_id and "train-54020" not in by_id
    assert by_id["train-54000"]["split"] == "val"
    for rid in ("train-0", "train-7", "train-54003", "test-0", "test-19"):
        file, i = rid.split("-")
        r = by_id[rid]
        assert r["image"] == f"images/{file}/{i}.png"
        with Image.open(out / r["image"]) as im:
            assert im.mode == "L" and np.array_equal(np.asarray(im), images[file][int(i)])
    for r in rows:
        file, i = r["id"].split("-")
        assert r["label"] == CLASS_NAMES[labels[file][int(i)]]
        assert r["text"].startswith("a ") and r["text"].endswith(".")
    # the manifest validates; a second call is a no-op
    assert len(read_manifest(manifest, split="val")) == 20
    before = os.stat(manifest).st_mtime_ns
    assert prepare_fashion_mnist(out, max_per_split=20, progress=False) == manifest
    assert os.stat(manifest).st_mtime_ns == before
    # captions are drawn per image, so a bigger cap keeps the first rows' captions
    bigger = prepare_fashion_mnist(tmp_path / "fm2", max_per_split=25, progress=False)
    rows2 = {r["id"]: r for r in _rows(bigger)}
    assert all(rows2[k] == v for k, v in by_id.items())
    shutil.rmtree(tmp_path / "fm2")
