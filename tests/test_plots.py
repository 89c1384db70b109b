import json

import datasets
import pytest
import torch
from PIL import Image

from xmodal.config import ModelConfig, TaskConfig, TowerConfig
from xmodal.evaluation.metrics import classification_metrics, confusion_matrix
from xmodal.model import XModalModel
from xmodal.evaluation.plots import write_plots


def test_confusion_matrix_and_macro_f1_by_hand():
    target = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0])
    assert confusion_matrix(pred, target, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    m = classification_metrics(pred, target, 3)
    # per-class F1: class 0: tp1 fp1 fn1 → 0.5; class 1: tp2 fp1 fn0 → 0.8; class 2: tp0 fp0 fn1 → 0
    assert abs(m["accuracy"] - 0.6) < 1e-6 and abs(m["macro_f1"] - (0.5 + 0.8 + 0) / 3) < 1e-6
    # always answering the targets' most frequent class (0 or 1, twice each of 5) — not the predictions' (1, 3 of 5)
    assert m["majority_accuracy"] == pytest.approx(2 / 5)


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
    from xmodal.evaluation.evaluate import evaluate_retrieval
    results = evaluate_retrieval(model, data)
    written = write_plots(run, model, data, run / "plots", results)
    names = sorted(p.name for p in written)
    assert names == ["confusion_colour.png", "recall_matrix.png", "space_map.png", "training_curves.png"]
    assert {"image->text/R@10", "text->image/R@10"} <= set(results)
    for p in written:
        with Image.open(p) as im:
            assert im.size[0] > 300 and im.size[1] > 200


def _curves_figure(tmp_path, monkeypatch, records):
    """Draw training_curves from these metrics.jsonl records; return the matplotlib figure it saved."""
    from matplotlib.figure import Figure

    from xmodal.evaluation.plots import training_curves

    saved = []
    real_savefig = Figure.savefig

    def savefig(self, *a, **kw):
        saved.append(self)
        return real_savefig(self, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", savefig)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert training_curves(metrics, tmp_path / "curves.png") == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").is_file() and len(saved) == 1
    return saved[0]


def test_training_curves_show_a_single_point(tmp_path, monkeypatch):
    fig = _curves_figure(tmp_path, monkeypatch, [{"step": 3, "loss": 2.5}])  # fewer steps than log_every
    (line,) = fig.axes[0].get_lines()
    assert list(line.get_xdata()) == [3] and list(line.get_ydata()) == [2.5]
    assert line.get_marker() not in (None, "None", "", " ")  # a lone point is a marker, not an invisible line


def test_training_curves_draw_chance_as_a_reference_line(tmp_path, monkeypatch):
    records = [{"step": s, "loss": 3.0 - s / 10} for s in range(1, 41)]
    records += [{"step": s, "eval/zero_shot/image/top1": 0.2 + s / 100, "eval/zero_shot/image/chance_top1": 0.1}
                for s in (20, 40)]
    fig = _curves_figure(tmp_path, monkeypatch, records)
    loss, evals = fig.axes[:2]
    (loss_line,) = loss.get_lines()
    assert len(loss_line.get_xdata()) == 40 and loss_line.get_marker() in (None, "None", "")  # many points: a line
    curves = {ln.get_label(): ln for ln in evals.get_lines()}
    top1 = curves.pop("zero_shot/image/top1")
    assert list(top1.get_xdata()) == [20, 40] and list(top1.get_ydata()) == pytest.approx([0.4, 0.6])
    (chance,) = curves.values()  # the only other line: chance, flat across the axes, dashed
    assert "chance" in chance.get_label() and chance.get_linestyle() == "--"
    assert list(chance.get_ydata()) == [0.1, 0.1] and list(chance.get_xdata()) == [0, 1]  # axhline: axes coords


def test_training_curves_draw_the_majority_rate_as_a_reference_line(tmp_path, monkeypatch):
    records = [{"step": s, "loss": 1.0} for s in (1, 2)]
    records += [{"step": s, "eval/zero_shot/text/top1": 0.6, "eval/zero_shot/text/chance_top1": 0.5,
                 "eval/zero_shot/text/majority_top1": 0.55} for s in (1, 2)]
    fig = _curves_figure(tmp_path, monkeypatch, records)
    lines = {ln.get_label(): ln for ln in fig.axes[1].get_lines()}
    assert len(lines) == 3 and "zero_shot/text/top1" in lines  # one curve, two reference lines
    (majority,) = [ln for label, ln in lines.items() if label.startswith("majority")]
    assert list(majority.get_ydata()) == [0.55, 0.55] and majority.get_linestyle() == ":"


def test_write_plots_draws_only_the_heads_it_is_given(tmp_path):
    images = []
    for i, colour in enumerate(["red", "blue"] * 2):
        images.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (16, 16), colour).save(images[-1])
    # `label` holds values that are not the head's classes: a head not asked for must not be drawn (or fail)
    data = datasets.Dataset.from_dict({"image": images, "label": ["x", "y"] * 2})
    cfg = ModelConfig(embed_dim=8, towers={"image": TowerConfig(kind="cnn", image_size=16,
                                                                options={"channels": [4, 8]})})
    model = XModalModel(cfg, {"colour": TaskConfig(kind="classification", modalities=["image"],
                                                   classes=["cool", "warm"])}).eval()
    assert write_plots(tmp_path, model, data, tmp_path / "plots", tasks={}, shared_space=False) == []
    warm = data.map(lambda r: {"label": "warm"})
    written = write_plots(tmp_path, model, data, tmp_path / "plots", tasks={"colour": warm}, shared_space=False)
    assert [p.name for p in written] == ["confusion_colour.png"]


def test_space_map_names_every_one_of_22_labels_in_its_own_colour(tmp_path, monkeypatch):
    """Open Clip Art has 22 labels: the label panel's legend lists each (sorted), each entry in the colour of that
    label's points, no two labels sharing one."""
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure

    from xmodal.evaluation.plots import space_map

    saved = []
    real_savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **kw: (saved.append(self), real_savefig(self, *a, **kw)))
    names = [f"category {i:02d}" for i in range(22)]
    g = torch.Generator().manual_seed(0)
    emb = {m: torch.nn.functional.normalize(torch.randn(88, 8, generator=g), dim=1) for m in ("image", "text")}
    labels = {m: [names[i % 22] for i in range(88)] for m in emb}
    space_map(emb, labels, tmp_path / "map.png")
    panel = saved[0].axes[1]
    legend = panel.get_legend()
    assert legend is not None and [t.get_text() for t in legend.get_texts()] == names
    entry_colours = [tuple(h.get_facecolor()[0]) for h in legend.legend_handles]
    assert len(set(entry_colours)) == 22
    image_points = panel.collections[0]  # the image modality's points, in row order
    for row in range(22):  # row i has label i: its point is drawn in the legend colour of label i
        assert tuple(image_points.get_facecolors()[row][:3]) == pytest.approx(to_rgba(entry_colours[row])[:3])
