import json

import datasets
import torch
from PIL import Image

from xmodal.config import ModelConfig, TaskConfig, TowerConfig
from xmodal.metrics import classification_metrics, confusion_matrix
from xmodal.model import XModalModel
from xmodal.plots import write_plots


def test_confusion_matrix_and_macro_f1_by_hand():
    target = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0])
    assert confusion_matrix(pred, target, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    m = classification_metrics(pred, target, 3)
    # per-class F1: class 0: tp1 fp1 fn1 → 0.5; class 1: tp2 fp1 fn0 → 0.8; class 2: tp0 fp0 fn1 → 0
    assert abs(m["accuracy"] - 0.6) < 1e-6 and abs(m["macro_f1"] - (0.5 + 0.8 + 0) / 3) < 1e-6


def test_write_plots_makes_every_picture(tmp_path):
    images = []
    for i, colour in enumerate(["red", "green", "blue", "white"] * 3):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (24, 24), colour).save(p)
        images.append(str(p))
    labels = ["warm", "cool", "cool", "warm"] * 3
    data = datasets.Dataset.from_dict({"image": images, "text": [f"a {c} square" for c in labels],
                                       "label": labels})
    cfg = ModelConfig(embed_dim=8, towers={
        "image": TowerConfig(kind="cnn", image_size=16, options={"channels": [4, 8]}),
        "text": TowerConfig(kind="lstm", context_length=8, options={"embed_dim": 8, "hidden": 8})})
    model = XModalModel(cfg, {"colour": TaskConfig(kind="classification", modalities=["image"],
                                                   classes=["cool", "warm"])}).eval()
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 1, "loss/colour": 0.9}, {"step": 2, "loss/colour": 0.7},
        {"step": 2, "eval/colour/accuracy": 0.5}]) + "\n")
    from xmodal.evaluate import evaluate_retrieval
    results = evaluate_retrieval(model, data)
    written = write_plots(run, model, data, run / "plots", results)
    names = sorted(p.name for p in written)
    assert names == ["confusion_colour.png", "recall_matrix.png", "space_map.png", "training_curves.png"]
    assert {"image->text/R@10", "text->image/R@10"} <= set(results)
    for p in written:
        with Image.open(p) as im:
            assert im.size[0] > 300 and im.size[1] > 200
