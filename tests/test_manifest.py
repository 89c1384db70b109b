"""read_manifest: formats, path resolution, split filtering, and a corpus of broken manifests."""
from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from xmodal.data import Manifest, ManifestError, read_manifest

BAD = Path(__file__).parent / "fixtures" / "bad_manifests"

ROWS = [  # ids with leading zeros must survive every format
    {"id": "007", "image": "imgs/a.png", "text": "a red square", "label": "01", "split": "train"},
    {"id": "010", "image": "imgs/b.png", "text": "a green star", "label": "02", "split": "val"},
    {"id": "3", "image": "imgs/c.png", "text": "a blue circle, with a comma", "label": "01", "split": "train"},
    {"id": "4", "image": "imgs/sub/d.png", "text": "  leading spaces stay", "label": "03", "split": "test"},
]


def _png(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(path)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    for i, r in enumerate(ROWS):
        _png(tmp_path / r["image"], i)
    return tmp_path


def _write_all_formats(folder: Path, rows: list[dict]) -> dict[str, Path]:
    cols = list(rows[0])
    out = {}
    out["csv"] = folder / "m.csv"
    import csv

    with open(out["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    out["tsv"] = folder / "m.tsv"
    out["tsv"].write_text("\t".join(cols) + "\n" + "".join("\t".join(r[c] for c in cols) + "\n" for r in rows))
    out["jsonl"] = folder / "m.jsonl"
    out["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out["json"] = folder / "m.json"
    out["json"].write_text(json.dumps(rows, indent=1))
    out["parquet"] = folder / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), out["parquet"])
    out["save_to_disk"] = folder / "m_ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(out["save_to_disk"]))
    return out


def test_every_format_reads_the_same_rows(images: Path):
    paths = _write_all_formats(images, ROWS)
    expected = [{**r, "image": str(images / r["image"])} for r in ROWS]
    for fmt, p in paths.items():
        m = read_manifest(p)
        assert isinstance(m, Manifest) and m.source == str(p), fmt
        assert m.modalities == ["image", "text"], fmt
        assert m.skipped == 0 and m.problems == [], fmt
        got = [{k: row[k] for k in ROWS[0]} for row in m.dataset]
        assert got == expected, fmt
        assert m.dataset.features["id"] == datasets.Value("string"), fmt
    # an in-memory Dataset resolves against root
    m = read_manifest(datasets.Dataset.from_list(ROWS), root=images)
    assert [r["image"] for r in m.dataset] == [str(images / r["image"]) for r in ROWS]


def test_relative_paths_resolve_against_the_manifest_folder(images: Path, tmp_path: Path, monkeypatch):
    sub = images / "manifests"
    sub.mkdir()
    rows = [{**r, "image": "../" + r["image"]} for r in ROWS]
    p = _write_all_formats(sub, rows)["csv"]
    monkeypatch.chdir(tmp_path.parent)  # the working directory must not matter
    # ("../" leads out of the manifest's folder: read by default; refused when confined, see test_paths_outside_*)
    assert read_manifest(p, allow_outside_root=True).dataset["image"] == [str(images / r["image"]) for r in ROWS]
    # root= overrides the manifest folder; ~ is expanded; absolute paths stay
    p2 = _write_all_formats(images, ROWS)["csv"]
    other = tmp_path / "elsewhere"
    for r in ROWS:
        _png(other / r["image"])
    assert read_manifest(p2, root=other).dataset["image"] == [str(other / r["image"]) for r in ROWS]
    monkeypatch.setenv("HOME", str(images))
    rows = [{**r, "image": "~/" + r["image"]} if i % 2 else {**r, "image": str(images / r["image"])}
            for i, r in enumerate(ROWS)]
    p3 = _write_all_formats(other, rows)["jsonl"]
    assert read_manifest(p3, allow_outside_root=True).dataset["image"] == [str(images / r["image"]) for r in ROWS]


def test_split_filter_max_rows_and_ids(images: Path):
    p = _write_all_formats(images, ROWS)
    m = read_manifest(p["csv"], split="train")
    assert m.dataset["id"] == ["007", "3"] and set(m.dataset["split"]) == {"train"}
    assert read_manifest(p["parquet"], split="train", max_rows=1).dataset["id"] == ["007"]
    assert read_manifest(p["csv"], max_rows=3).dataset["id"] == ["007", "010", "3"]
    # labels stay strings ("01" is not turned into 1)
    assert read_manifest(p["csv"]).dataset["label"] == ["01", "02", "01", "03"]
    # modalities: only what is asked for is required and checked
    m = read_manifest(p["jsonl"], modalities=["text"])
    assert m.modalities == ["text"] and m.dataset["image"] == [r["image"] for r in ROWS]  # untouched
    # ids made from the 1-based data row numbers when absent (and stable under split filtering)
    no_id = images / "no_id.parquet"
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("image", "text", "split")} for r in ROWS]), no_id)
    assert read_manifest(no_id).dataset["id"] == ["1", "2", "3", "4"]
    assert read_manifest(no_id, split="train").dataset["id"] == ["1", "3"]


def test_dataset_dict_folder_with_split(images: Path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                               "test": datasets.Dataset.from_list(ROWS[2:])})
    dd.save_to_disk(str(images / "dd"))
    m = read_manifest(images / "dd", split="test")
    assert m.dataset["id"] == ["3", "4"]
    with pytest.raises(ManifestError, match=r"dd.*splits \['train', 'test'\]"):
        read_manifest(images / "dd")
    with pytest.raises(ManifestError, match=r"no split 'val' \(splits present: train, test\)"):
        read_manifest(images / "dd", split="val")


def test_hf_image_feature_and_class_label(images: Path):
    ds = datasets.Dataset.from_dict({"image": [str(images / r["image"]) for r in ROWS],
                                     "text": [r["text"] for r in ROWS], "label": [0, 1, 0, 1]})
    ds = ds.cast_column("image", datasets.Image()).cast_column("label", datasets.ClassLabel(names=["cat", "dog"]))
    ds.save_to_disk(str(images / "embedded"))  # the image bytes are embedded in the Arrow files
    m = read_manifest(images / "embedded")
    row = m.dataset[1]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (8, 8)
    assert m.dataset["label"] == ["cat", "dog", "cat", "dog"] and m.dataset["id"] == ["1", "2", "3", "4"]
    # Image feature holding relative paths: resolved, checked, decoded on access
    rel = datasets.Dataset.from_dict({"image": [r["image"] for r in ROWS], "text": [r["text"] for r in ROWS]})
    rel = rel.cast_column("image", datasets.Image(decode=False))
    assert isinstance(read_manifest(rel, root=images).dataset[0]["image"], Image.Image)
    (images / ROWS[2]["image"]).write_bytes(b"not a png")
    with pytest.raises(ManifestError, match=r"row 3 \(id '3'\): field 'image': not a readable image"):
        read_manifest(rel, root=images)


def test_truncated_jpeg_is_caught(tmp_path: Path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 3 // 4])
    (tmp_path / "tail.jpg").write_bytes(data + b"trailing bytes after EOI")  # still a good image
    (tmp_path / "m.csv").write_text("id,image,text\na,ok.jpg,x\nb,cut.jpg,y\nc,tail.jpg,z\n")
    m = read_manifest(tmp_path / "m.csv", on_bad_row="skip")
    assert m.dataset["id"] == ["a", "c"] and m.skipped == 1
    assert "row 2 (id 'b'): field 'image': unreadable or truncated image" in m.problems[0]


def test_require_all_false_accepts_empty_cells_but_checks_the_rest(images: Path):
    p = images / "partial.csv"
    p.write_text("id,image,text\n1,imgs/a.png,\n2,,only text\n3,imgs/b.png,both\n")
    with pytest.raises(ManifestError, match=r"partial\.csv: row 1 \(id '1'\): field 'text': empty text"):
        read_manifest(p)
    m = read_manifest(p, require_all=False)
    assert m.dataset["text"] == [None, "only text", "both"]
    assert m.dataset["image"] == [str(images / "imgs/a.png"), None, str(images / "imgs/b.png")]
    p.write_text("id,image,text\n1,imgs/a.png,\n2,imgs/nope.png,x\n")
    with pytest.raises(ManifestError, match=r"row 2 \(id '2'\): field 'image': file not found"):
        read_manifest(p, require_all=False)


def test_check_files_false_skips_file_checks(images: Path):
    p = images / "m.csv"
    p.write_text("id,image,text\n1,imgs/missing.png,x\n")
    assert read_manifest(p, check_files=False).dataset["image"] == [str(images / "imgs/missing.png")]


# ------------------------------------------------------------------------------------------------ broken manifests

# file → (kwargs, row, id, field, what the message says)
BROKEN = {
    "missing_file.csv": ({}, 2, "b2", "image", "file not found: " + str(BAD / "images" / "does_not_exist.png")),
    "directory_path.csv": ({}, 2, "b2", "image", "is a directory"),
    "truncated_png.csv": ({}, 2, "b2", "image", "truncated"),
    "text_renamed_png.csv": ({}, 2, "b2", "image", "not a readable image"),
    "empty_text.csv": ({}, 2, "b2", "text", "empty text"),
    "whitespace_text.csv": ({}, 2, "b2", "text", "whitespace-only text"),
    "duplicate_id.csv": ({}, 2, "a1", "id", "duplicate id 'a1' (first used in row 1)"),
    "non_string_text.jsonl": ({}, 2, "b2", "text", "expected a string (text), got int 12345"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_manifest_error_names_file_row_id_field(name: str):
    kwargs, row, rid, fld, what = BROKEN[name]
    with pytest.raises(ManifestError) as exc:
        read_manifest(BAD / name, **kwargs)
    msg = str(exc.value)
    assert msg.startswith(f"{BAD / name}: row {row} (id '{rid}'): field '{fld}': "), msg
    assert what in msg, msg


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_manifest_skip_drops_exactly_the_bad_row(name: str):
    kwargs, row, rid, fld, what = BROKEN[name]
    m = read_manifest(BAD / name, on_bad_row="skip", **kwargs)
    assert m.skipped == 1 and len(m.dataset) == 2
    assert len(m.problems) == 1 and f"row {row} (id '{rid}'): field '{fld}'" in m.problems[0]
    assert m.dataset["id"] == ["a1", "c3"]


def test_missing_column_names_file_and_column():
    with pytest.raises(ManifestError) as exc:
        read_manifest(BAD / "missing_column.csv", modalities=["image", "text"])
    assert str(exc.value) == (f"manifest {BAD / 'missing_column.csv'} has no column 'image' "
                              f"(columns: id, text, label, split)")


def test_unknown_split_lists_the_splits_present():
    with pytest.raises(ManifestError) as exc:
        read_manifest(BAD / "unknown_split.csv", split="test")
    assert str(exc.value) == f"manifest {BAD / 'unknown_split.csv'}: no rows with split 'test' (splits present: " \
                             f"'train', 'val')"
    with pytest.raises(ManifestError, match=r"has no column 'split' to select split='train'"):
        read_manifest(BAD / "non_string_text.jsonl", split="train")


def test_mixed_manifest_error_counts_the_rest_and_skip_drops_exactly_the_bad_rows():
    with pytest.raises(ManifestError) as exc:
        read_manifest(BAD / "mixed.csv")
    msg = str(exc.value)
    assert msg.startswith(f"{BAD / 'mixed.csv'}: row 2 (id 'm02'): field 'image': unreadable or truncated image")
    assert "4 more bad row(s)" in msg
    m = read_manifest(BAD / "mixed.csv", on_bad_row="skip")
    assert m.skipped == 5
    assert m.dataset["id"] == ["m01", "m03", "m06", "m08", "m10"]
    assert [re.search(r"row (\d+) \(id '(m\d+)'\): field '(\w+)'", p).groups() for p in m.problems] == [
        ("2", "m02", "image"), ("4", "m04", "text"), ("5", "m05", "image"), ("7", "m07", "image"),
        ("9", "m09", "image")]
    # the good corpus file reads cleanly
    assert read_manifest(BAD / "good.csv").dataset["id"] == ["a1", "b2", "c3"]


def test_file_level_errors(tmp_path: Path):
    with pytest.raises(ManifestError, match=r"nope\.csv: file not found"):
        read_manifest(tmp_path / "nope.csv")
    (tmp_path / "m.xlsx").write_text("x")
    with pytest.raises(ManifestError, match=r"m\.xlsx: unknown format '\.xlsx'"):
        read_manifest(tmp_path / "m.xlsx")
    (tmp_path / "e.csv").write_text("")
    with pytest.raises(ManifestError, match=r"e\.csv is empty"):
        read_manifest(tmp_path / "e.csv")
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ManifestError, match=r"b\.jsonl: line 2 \(row 2\): invalid JSON"):
        read_manifest(tmp_path / "b.jsonl")
    (tmp_path / "n.csv").write_text("id,label\n1,x\n")
    with pytest.raises(ManifestError, match=r"n\.csv has no modality column .*columns: id, label"):
        read_manifest(tmp_path / "n.csv")
    with pytest.raises(ManifestError, match=r"unknown modality 'video'"):
        read_manifest(tmp_path / "n.csv", modalities=["video"])


# ------------------------------------------------------------------------------------- paths outside the data root

@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """data/m.csv with rows 2-5 reaching outside data/ (.., absolute, a symlinked file, a symlinked folder) and
    rows 1, 6, 7 inside it (row 6 through a symlink that stays inside)."""
    data = tmp_path / "data"
    _png(data / "imgs" / "a.png")
    _png(tmp_path / "secret.png", 1)  # a readable image: only the root check can refuse it
    (data / "link.png").symlink_to(tmp_path / "secret.png")
    (data / "linkdir").symlink_to(tmp_path)
    (data / "ok_link.png").symlink_to(data / "imgs" / "a.png")
    (data / "m.csv").write_text("id,image,text\n"
                                "a,imgs/a.png,x\n"
                                "b,../secret.png,x\n"
                                f"c,{tmp_path / 'secret.png'},x\n"
                                "d,link.png,x\n"
                                "e,linkdir/secret.png,x\n"
                                "f,ok_link.png,x\n"
                                "g,imgs/../imgs/a.png,x\n")
    return data


def test_paths_outside_root_are_refused_naming_file_row_id_field(outside: Path):
    """Confined (``allow_outside_root=False``: what ``xmodal index`` reads with), paths leaving the data root are
    bad rows. By default they are read: a user's own manifest names files anywhere, absolute paths most of all."""
    m, secret, root = outside / "m.csv", outside.parent / "secret.png", outside
    assert read_manifest(m).dataset["image"][:3] == [str(root / "imgs" / "a.png"), str(secret), str(secret)]
    with pytest.raises(ManifestError) as exc:
        read_manifest(m, allow_outside_root=False)
    msg = str(exc.value)
    assert msg.startswith(f"{m}: row 2 (id 'b'): field 'image': path '../secret.png' resolves to {secret}, outside "
                          f"the data root {root}; allow_outside_root=True (data.allow_outside_root: true) permits it")
    assert "3 more bad row(s)" in msg
    skipped = read_manifest(m, on_bad_row="skip", allow_outside_root=False)
    assert skipped.dataset["id"] == ["a", "f", "g"] and skipped.skipped == 4
    assert [p.split(": field 'image': ")[0] for p in skipped.problems] == [
        f"{m}: row {n} (id '{i}')" for n, i in ((2, "b"), (3, "c"), (4, "d"), (5, "e"))]
    assert f"path {str(secret)!r} resolves to {secret}, outside" in skipped.problems[1]
    assert f"path 'link.png' goes through a symlink to {secret}, outside the data root" in skipped.problems[2]
    assert f"path 'linkdir/secret.png' goes through a symlink to {secret}, outside" in skipped.problems[3]
    assert len(read_manifest(m, allow_outside_root=True)) == 7
    # an explicit root is the data root too; a Dataset with an Image feature holding paths is confined the same way
    rel = datasets.Dataset.from_dict({"image": ["../secret.png"], "text": ["x"]})
    with pytest.raises(ManifestError, match=r"row 1 \(id '1'\): field 'image': path '\.\./secret\.png' resolves to"):
        read_manifest(rel.cast_column("image", datasets.Image(decode=False)), root=root, allow_outside_root=False)
    with pytest.raises(ManifestError, match=r"row 1 \(id '1'\): field 'image': path '\.\./secret\.png' resolves to"):
        read_manifest(rel, root=root, allow_outside_root=False)
    # an in-memory dataset without root has no data root (the caller's own code built it)
    assert read_manifest(datasets.Dataset.from_dict({"image": [str(secret)], "text": ["x"]})).dataset["image"] == [
        str(secret)]


def test_data_allow_outside_root_reaches_the_training_reader(outside: Path):
    from xmodal.config import config_from_dict
    from xmodal.training.task_data import read_task_data, task_configs

    def cfg(allow: bool):
        return config_from_dict({"data": {"train": str(outside / "m.csv"), "allow_outside_root": allow}})

    default = config_from_dict({"data": {"train": str(outside / "m.csv")}})
    assert default.data.allow_outside_root is True  # a training manifest is the user's own
    for allow in (False, True):
        c = cfg(allow)
        (name, t), = task_configs(c, ["image", "text"]).items()
        if allow:
            assert len(read_task_data(c, name, t)[0]) == 7
        else:
            with pytest.raises(ManifestError, match=r"row 2 \(id 'b'\): field 'image': path '\.\./secret\.png'"):
                read_task_data(c, name, t)


def test_a_url_is_named_as_a_url_not_a_missing_file(images: Path):
    rows = [{"id": "a", "image": str(images / "imgs" / "a.png"), "text": "x"},
            {"id": "b", "image": "https://example.com/cat.png", "text": "y"}]
    path = images / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError, match=r"m\.jsonl: row 2 \(id 'b'\): field 'image': 'https://example\.com/cat\.png' "
                                            r"is a URL; xmodal reads local files only"):
        read_manifest(path, allow_outside_root=True)


def test_rows_answer_as_a_datasets_dataset_does(images: Path):
    """Manifest.rows (plain rows over Arrow, no datasets import) against the peer it stands in for: the same rows as a
    datasets.Dataset, asked every question xmodal's readers ask."""
    from xmodal.data import Rows

    paths = _write_all_formats(images, ROWS)
    m = read_manifest(paths["csv"])
    rows, peer = m.rows, m.dataset
    assert isinstance(rows, Rows) and isinstance(peer, datasets.Dataset)
    assert len(rows) == len(peer) == 4 and rows.column_names == peer.column_names
    for key in ("id", "image", "text", "label", "split"):
        assert rows[key] == peer[key], key
    for i in (0, 3, -1, -4, np.int64(2)):
        assert rows[i] == peer[i], i
    for key in (slice(1, 3), slice(None, None, 2), slice(-2, None), [3, 0], range(2)):
        assert rows[key] == peer[key], key
    assert list(rows) == list(peer) and rows.to_dict() == peer.to_dict()
    sub, peer_sub = rows.select_columns(["text", "id"]), peer.select_columns(["text", "id"])
    assert sub.column_names == peer_sub.column_names and list(sub) == list(peer_sub)
    assert rows.data.column("text").to_pylist() == peer.data.column("text").to_pylist()
    for bad in (4, -5):
        with pytest.raises(IndexError):
            rows[bad]
        with pytest.raises(IndexError):
            peer[bad]
    with pytest.raises(KeyError, match="column 'nope' not in the rows"):
        rows["nope"]
    # take() keeps plain rows plain and their file row numbers; a saved HF dataset stays a datasets.Dataset
    part = m.take([2, 0])
    assert isinstance(part.rows, Rows) and part.rows["id"] == ["3", "007"] and part.row_numbers == [3, 1]
    assert isinstance(read_manifest(paths["save_to_disk"]).rows, datasets.Dataset)


def test_a_file_manifest_and_the_training_engine_do_not_import_datasets(images: Path):
    """`datasets` costs every command ~0.2 s of start-up (issue #19); a CSV manifest is read without it."""
    import subprocess
    import sys

    paths = _write_all_formats(images, ROWS)
    code = ("import sys, xmodal.training.engine; from xmodal.data import read_manifest\n"
            f"for p in {[str(paths[f]) for f in ('csv', 'jsonl', 'parquet')]!r}:\n"
            "    m = read_manifest(p, split='train'); assert len(m) == 2 and m.rows['id'] == ['007', '3'], p\n"
            "assert 'datasets' not in sys.modules, 'datasets was imported'\n"
            "m.dataset\nassert 'datasets' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**__import__("os").environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
