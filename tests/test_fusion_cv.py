"""scripts/fusion_cv.py's bookkeeping: the stratified fold assignment (every row tested exactly once, each class
spread evenly) and the rows whose very drawing is filed under several labels, counted by hand."""
from __future__ import annotations

import csv
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import fusion_cv  # noqa: E402


def test_folds_are_stratified_and_test_each_row_once(tmp_path):
    rows = [{"id": f"r{i}", "label": "abc"[i % 3] if i < 90 else "d"} for i in range(97)]
    fold_of = fusion_cv.assign_folds(rows, 5, seed=0)
    assert set(fold_of) == {r["id"] for r in rows} and set(fold_of.values()) == set(range(5))
    for label in "abcd":
        per_fold = Counter(fold_of[r["id"]] for r in rows if r["label"] == label)
        assert max(per_fold.values()) - min(per_fold.get(k, 0) for k in range(5)) <= 1, (label, per_fold)
    assert fusion_cv.assign_folds(rows, 5, seed=0) == fold_of != fusion_cv.assign_folds(rows, 5, seed=1)


def test_same_drawing_under_several_labels(tmp_path):
    # 3 pictures: "cat.png" is copied byte for byte under two labels, "dog.png" twice under one label.
    for name, colour in (("cat", 0), ("dog", 128), ("sun", 255)):
        Image.new("RGB", (4, 4), (colour, 0, 0)).save(tmp_path / f"{name}.png")
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "cat.png").write_bytes((tmp_path / "cat.png").read_bytes())
    (tmp_path / "copy" / "dog.png").write_bytes((tmp_path / "dog.png").read_bytes())
    rows = [("animals/cat", "cat.png", "animals"), ("pets/cat", "copy/cat.png", "pets"),
            ("animals/dog", "dog.png", "animals"), ("animals/dog2", "copy/dog.png", "animals"),
            ("sky/sun", "sun.png", "sky")]
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "image", "label"])
        w.writerows(rows)
    res = {"manifest": str(manifest), "folds": 2, "split_seed": 0, "per_fold": {"0": {}, "1": {}}}
    fold_of = fusion_cv.assign_folds([{"id": i, "label": lab} for i, _, lab in rows], 2, 0)
    pooled_order = [i for k in (0, 1) for i, _, _ in rows if fold_of[i] == k]
    flags = dict(zip(pooled_order, fusion_cv.drawings_under_several_labels(res)))
    assert flags == {"animals/cat": True, "pets/cat": True, "animals/dog": False, "animals/dog2": False,
                     "sky/sun": False}
