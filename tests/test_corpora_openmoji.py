"""OpenMoji preparer on a tiny package in the npm layout (package/data/openmoji.json, package/color/svg/*.svg):
rows, captions, labels, the variant-grouped split, skin tones, tarball = folder, and the missing-package error."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><rect x="10" y="20" width="40" height="30" '
       'fill="{}"/></svg>')


def _record(hexcode, group, subgroup, annotation, tags="", om_tags="", skintone="", base=""):
    return {"emoji": "", "hexcode": hexcode, "group": group, "subgroups": subgroup, "annotation": annotation,
            "tags": tags, "openmoji_tags": om_tags, "skintone": skintone, "skintone_base_hexcode": base}


RECORDS = [
    _record("1F600", "smileys-emotion", "face-smiling", "grinning face", "face, grin, Grin", "smile, happy"),
    _record("1F3C3", "people-body", "person-activity", "person running", "marathon, running"),
    _record("1F3C3-200D-2642-FE0F", "people-body", "person-activity", "man running", "man, running"),
    _record("1F3C3-1F3FD-200D-2640-FE0F", "people-body", "person-activity", "woman running: medium skin tone",
            skintone=3, base="1F3C3-200D-2640-FE0F"),
    _record("1F3C3-200D-2640-FE0F", "people-body", "person-activity", "woman running", "running, woman"),
    _record("1F3FB", "component", "skin-tone", "light skin tone", "skin, tone"),
    _record("E000", "extras-openmoji", "symbol-other", "openmoji", "", "logo"),
    _record("1F34E", "food-drink", "food-fruit", "red apple", "apple, fruit, red"),
]


def _package(root: Path) -> Path:
    """The npm package folder and its `npm pack` tarball (members under package/)."""
    folder = root / "openmoji"
    (folder / "data").mkdir(parents=True)
    (folder / "color" / "svg").mkdir(parents=True)
    (folder / "data" / "openmoji.json").write_text(json.dumps(RECORDS))
    (folder / "package.json").write_text(json.dumps({"name": "openmoji", "version": "0.0.1"}))
    for i, r in enumerate(RECORDS):
        (folder / "color" / "svg" / f"{r['hexcode']}.svg").write_text(SVG.format(["#f00", "#0a0", "#00f"][i % 3]))
    tgz = root / "openmoji-0.0.1.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                tar.add(p, arcname="package/" + p.relative_to(folder).as_posix())
    return tgz


def test_openmoji_manifest(tmp_path: Path):
    from xmodal.data.corpora.openmoji import prepare_openmoji

    tgz = _package(tmp_path)
    manifest = prepare_openmoji(tmp_path / "om", source=tgz, image_size=32, workers=1, progress=False)
    df = pd.read_csv(manifest, keep_default_na=False).set_index("id")
    # the component and the skin-tone variant are left out by default
    assert sorted(df.index) == sorted(["1F600", "1F3C3", "1F3C3-200D-2642-FE0F", "1F3C3-200D-2640-FE0F", "E000",
                                       "1F34E"])
    # annotation, then keywords deduplicated case-insensitively across the two tag fields
    assert df.loc["1F600", "text"] == "grinning face. keywords: face, grin, smile, happy"
    assert df.loc["1F34E", "text"] == "red apple. keywords: apple, fruit, red"
    assert df.loc["1F600", "label"] == "smiley or emotion" and df.loc["1F34E", "label"] == "food or drink"
    assert df.loc["E000", "label"] == "" and df.loc["E000", "group"] == "extras-openmoji"
    assert df.loc["1F3C3", "subgroup"] == "person-activity"
    # the three running people share one split (their key is 1F3C3 once gender code points are removed)
    assert df.loc[["1F3C3", "1F3C3-200D-2642-FE0F", "1F3C3-200D-2640-FE0F"], "split"].nunique() == 1
    with Image.open(tmp_path / "om" / df.loc["1F600", "image"]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
        assert im.getpixel((0, 0)) == (255, 255, 255) and im.getpixel((16, 16)) == (255, 0, 0)
    info = json.loads((tmp_path / "om" / "prepare.json").read_text())
    assert info["package_version"] == "0.0.1"
    assert info["counts"]["left_out"]["component"] == 1 and info["counts"]["left_out"]["skin_tone"] == 1

    # skin tones kept: the variant borrows its base's keywords and joins the same split
    folder = prepare_openmoji(tmp_path / "om-tones", source=tmp_path / "openmoji", image_size=32, skin_tones=True,
                              workers=1, progress=False)
    tones = pd.read_csv(folder, keep_default_na=False).set_index("id")
    variant = tones.loc["1F3C3-1F3FD-200D-2640-FE0F"]
    assert variant["text"] == "woman running: medium skin tone. keywords: running, woman"
    assert variant["split"] == df.loc["1F3C3", "split"]
    # the unpacked folder gives the same rows as the tarball
    assert tones.drop(index="1F3C3-1F3FD-200D-2640-FE0F")[["text", "label", "split"]].equals(
        df[["text", "label", "split"]])


def test_group_key_and_missing_package(tmp_path: Path, monkeypatch):
    from xmodal.data.corpora.openmoji import group_key, prepare_openmoji

    assert group_key("1F3C3-1F3FD-200D-2642-FE0F") == "1F3C3"
    assert group_key("1F468-200D-1F4BB") == "1F4BB"  # man technologist → technologist's key
    assert group_key("1F469-200D-1F9BD-200D-27A1-FE0F") == "1F9BD"  # woman in manual wheelchair: facing right
    assert group_key("1F468") == "1F468"  # a code made only of variant points keeps its first
    assert group_key("27A1-FE0F") == "27A1"  # right arrow
    assert group_key("1F468-200D-1F9B0") == group_key("1F468") == "1F468"  # man: red hair, man
    assert group_key("1F1E9-1F1EA") == "1F1E9-1F1EA"  # flags untouched
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="npm pack openmoji"):
        prepare_openmoji(tmp_path / "om", progress=False)
    bad = tmp_path / "openmoji-9.tgz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(ValueError, match="openmoji-9.tgz: not a readable npm package tarball"):
        prepare_openmoji(tmp_path / "om", source=bad, progress=False)
    assert not (tmp_path / "om" / "manifest.csv").exists()
