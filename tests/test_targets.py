"""Target cells as users' files hold them: a multi-label cell written ``a|b`` in a CSV or as a list in JSONL /
Parquet / an HF ``Sequence(ClassLabel)``; integer labels that Parquet or pandas stored as floats. Each form must give
the same classes and the same target tensors as the plain CSV, counted by hand."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from xmodal.config import config_from_dict
from xmodal.data import ManifestError, label_text, read_manifest
from xmodal.training.task_data import read_task_data, task_configs
from xmodal.tasks.head import targets

TAGS = [["cat", "pet"], ["dog"], [], ["cat"], ["dog", "pet"], ["pet"]]  # the third row: no label


def images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    return [f"{i}.png" for i in range(n)]


def task_targets(manifest: Path, kind: str, target: str) -> tuple[list[str], torch.Tensor]:
    cfg = config_from_dict({
        "output_dir": str(manifest.parent / "run"), "data": {"train": str(manifest)},
        "model": {"embed_dim": 8, "towers": {"image": {"kind": "cnn", "image_size": 8, "options": {"channels": [4]}}}},
        "tasks": {"t": {"kind": kind, "modalities": ["image"], "target": target, "train_split": None,
                    "eval_split": None}}})
    (name, t), = task_configs(cfg, ["image"]).items()
    train, _ = read_task_data(cfg, name, t)
    return t.classes, targets(t, train[target])


def test_multilabel_list_cells_equal_pipe_strings(tmp_path):
    paths = images(tmp_path, len(TAGS))
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "tags"])
        w.writerows([i, p, "|".join(t) or "|"] for i, (p, t) in enumerate(zip(paths, TAGS)))
    with open(tmp_path / "m.jsonl", "w") as f:
        for i, (p, t) in enumerate(zip(paths, TAGS)):
            f.write(json.dumps({"id": str(i), "image": p, "tags": t}) + "\n")
    pq.write_table(pa.table({"id": [str(i) for i in range(len(TAGS))], "image": paths,
                             "tags": pa.array(TAGS, type=pa.list_(pa.string()))}), tmp_path / "m.parquet")
    by_hand = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.float32)
    for name in ("m.csv", "m.jsonl", "m.parquet"):
        classes, y = task_targets(tmp_path / name, "multilabel", "tags")
        assert classes == ["cat", "dog", "pet"], name
        assert torch.equal(y, by_hand), name


def test_hf_sequence_of_class_labels_becomes_label_names(tmp_path):
    paths = images(tmp_path, len(TAGS))
    names = ["cat", "dog", "pet"]
    features = datasets.Features({"image": datasets.Value("string"),
                                  "label": datasets.Sequence(datasets.ClassLabel(names=names))})
    ds = datasets.Dataset.from_dict({"image": paths, "label": [[names.index(x) for x in t] for t in TAGS]},
                                    features=features)
    got = read_manifest(ds, root=tmp_path, modalities=["image"])
    assert got.dataset["label"] == ["cat|pet", "dog", "", "cat", "dog|pet", "pet"]


def test_integer_labels_stored_as_floats_are_the_csv_classes(tmp_path):
    paths = images(tmp_path, 4)
    ys = [0, 1, 1, 0]
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "y", "label"])
        w.writerows([i, p, y, y] for i, (p, y) in enumerate(zip(paths, ys)))
    pq.write_table(pa.table({"id": [str(i) for i in range(4)], "image": paths,
                             "y": pa.array([float(y) for y in ys]), "label": pa.array([float(y) for y in ys])}),
                   tmp_path / "m.parquet")
    for target in ("y", "label"):  # a target column kept as read, and the `label` column the reader makes strings
        csv_classes, csv_y = task_targets(tmp_path / "m.csv", "classification", target)
        pq_classes, pq_y = task_targets(tmp_path / "m.parquet", "classification", target)
        assert csv_classes == pq_classes == ["0", "1"] and torch.equal(csv_y, pq_y), target
        assert csv_y.tolist() == ys


def test_a_list_for_a_single_label_task_names_the_row(tmp_path):
    paths = images(tmp_path, 3)
    with open(tmp_path / "m.jsonl", "w") as f:
        for i, (p, t) in enumerate(zip(paths, [["cat"], ["dog", "pet"], ["pet"]])):
            f.write(json.dumps({"id": f"r{i}", "image": p, "tags": t}) + "\n")
    with pytest.raises(ManifestError, match=r"m\.jsonl: row 1 \(id 'r0'\): field 'tags': a list \['cat'\] is "
                                            r"several labels.*kind: multilabel"):
        task_targets(tmp_path / "m.jsonl", "classification", "tags")


@pytest.mark.parametrize("value, text", [(1.0, "1"), (2.5, "2.5"), (3, "3"), ("1.0", "1.0"), (["a", 2.0], "a|2"),
                                         ("x", "x")])
def test_label_text(value, text):
    assert label_text(value) == text


def test_classes_are_logged_and_a_score_column_read_as_classes_is_flagged(tmp_path, caplog):
    paths = images(tmp_path, 30)
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "score", "label"])
        w.writerows([i, p, f"{i / 7:.2f}", "Cat" if i == 0 else "cat" if i % 2 else "dog"] for i, p in enumerate(paths))
    with caplog.at_level("INFO", logger="xmodal"):
        classes, _ = task_targets(tmp_path / "m.csv", "classification", "label")
    assert classes == ["Cat", "cat", "dog"]
    assert "task t: 3 classes from column 'label': Cat, cat, dog" in caplog.text and "regression" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="xmodal"):
        classes, _ = task_targets(tmp_path / "m.csv", "classification", "score")
    assert len(classes) == 30
    assert "column 'score' has 30 distinct numeric values, each made a class; if it is a score, use kind: " \
           "regression" in caplog.text
