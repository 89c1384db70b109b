import datasets
import pytest
import torch

from xmodal.evaluate import evaluate, evaluate_retrieval, evaluate_zero_shot, zero_shot_classifier


class TableModel:
    """A stand-in model whose embedding of each value is fixed by hand."""

    def __init__(self, table, modalities=("image", "text")):
        self.table = {k: torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float32), dim=0)
                      for k, v in table.items()}
        self.modalities = list(modalities)
        self.towers = dict.fromkeys(modalities)
        self.calls = []

    def encode(self, modality, inputs, batch_size=64, progress=False):
        self.calls.append((modality, list(inputs)))
        return torch.stack([self.table[x] for x in inputs])


def test_retrieval_with_several_captions_per_image_by_hand():
    table = {"a.png": [1, 0], "b.png": [0, 1],
             "cap a1": [1, 0.1], "cap a2": [0.2, 1],  # a2 is closer to b: a wrong caption for image a
             "cap b1": [0, 1]}
    ds = datasets.Dataset.from_dict({"image": ["a.png", "a.png", "b.png"], "text": ["cap a1", "cap a2", "cap b1"]})
    model = TableModel(table)
    r = evaluate_retrieval(model, ds)
    # text→image: a1 → a (rank 1); a2 → a but b scores higher (rank 2); b1 → b (rank 1)
    assert r["text->image/R@1"] == pytest.approx(2 / 3) and r["text->image/n_queries"] == 3
    assert r["text->image/median_rank"] == 1 and r["text->image/mean_rank"] == pytest.approx(4 / 3)
    # image→text: a's positives are {a1, a2}: its best (a1) is first; b → b1 first
    assert r["image->text/R@1"] == 1.0 and r["image->text/n_items"] == 3
    assert sorted(model.calls[0][1]) == ["a.png", "b.png"]  # each distinct image embedded once


def test_zero_shot_classifier_is_the_normalised_template_mean():
    templates = ("a {}.", "the {}.")
    table = {"a cat.": [1, 0, 0], "the cat.": [0.6, 0.8, 0], "a dog.": [0, 0, 1], "the dog.": [0, 0.6, 0.8]}
    model = TableModel(table)
    w = zero_shot_classifier(model, ["cat", "dog"], templates)
    cat = torch.tensor([1.6, 0.8, 0]) / torch.tensor([1.6, 0.8, 0]).norm()
    torch.testing.assert_close(w[:, 0], cat)
    assert w.shape == (3, 2)


def test_zero_shot_accuracy_and_full_evaluate():
    templates = ("{}",)
    table = {"cat": [1, 0], "dog": [0, 1], "c1.png": [0.9, 0.1], "c2.png": [0.2, 0.8], "d1.png": [0.1, 0.9]}
    ds = datasets.Dataset.from_dict({"image": ["c1.png", "c2.png", "d1.png"], "label": ["cat", "cat", "dog"]})
    model = TableModel(table)
    r = evaluate_zero_shot(model, ds, "image", templates=templates)
    assert r["zero_shot/top1"] == pytest.approx(2 / 3) and r["zero_shot/chance_top1"] == 0.5
    assert evaluate(model, ds, zero_shot=False) == {}  # one modality column: no retrieval pairs
