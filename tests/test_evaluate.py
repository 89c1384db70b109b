import datasets
import pytest
import torch

from xmodal.evaluation.evaluate import evaluate, evaluate_retrieval, evaluate_zero_shot, zero_shot_classifier


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


def test_zero_shot_of_text_against_text_prompts_by_hand():
    """Reviews classified by their own text tower against review prompts; baselines counted by hand."""
    templates = ("a {} review.",)
    table = {"a good review.": [1, 0], "a bad review.": [0, 1],
             "loved it": [0.9, 0.1], "fine film": [0.6, 0.4], "dull": [0.3, 0.7], "awful": [0.1, 0.9],
             "so so": [0.7, 0.3]}  # "so so" is labelled bad but lies nearer the good prompt
    ds = datasets.Dataset.from_dict({"text": ["loved it", "fine film", "dull", "awful", "so so"],
                                     "sentiment": ["good", "good", "bad", "bad", "bad"]})
    model = TableModel(table)
    r = evaluate(model, ds, label_column="sentiment", templates=templates)  # text only: text is classified
    assert r["zero_shot/text/top1"] == pytest.approx(4 / 5)
    assert r["zero_shot/text/majority_top1"] == pytest.approx(3 / 5)  # always "bad"
    assert r["zero_shot/text/chance_top1"] == 0.5 and r["zero_shot/text/n_classes"] == 2
    assert "zero_shot/text/top5" not in r  # with 2 classes top-5 is 1 by construction: not reported
    assert evaluate_zero_shot(model, ds, "text", "sentiment", templates) == {
        k.replace("text/", ""): v for k, v in r.items()}


def test_zero_shot_default_modalities_and_top5_with_more_than_five_classes():
    names = [f"c{i}" for i in range(6)]
    table = {n: [1.0 if j == i else 0.0 for j in range(6)] for i, n in enumerate(names)}
    table.update({f"{n}.png": v for n, v in table.items()})
    table.update({f"cap {n}": v for n, v in table.items() if not n.endswith(".png")})
    labels = names + ["c0"]
    ds = datasets.Dataset.from_dict({"image": [f"{n}.png" for n in labels], "text": [f"cap {n}" for n in labels],
                                     "label": labels})
    model = TableModel(table)
    r = evaluate(model, ds, templates=("{}",))
    # images and text both present: the non-text modality is classified (text is the prompt side), as before
    assert {k.split("/")[1] for k in r if k.startswith("zero_shot/")} == {"image"}
    assert r["zero_shot/image/top1"] == 1.0 and r["zero_shot/image/top5"] == 1.0
    assert r["zero_shot/image/majority_top1"] == pytest.approx(2 / 7)
    forced = evaluate(model, ds, templates=("{}",), zero_shot_modalities=["text"])
    assert {k.split("/")[1] for k in forced if k.startswith("zero_shot/")} == {"text"}


@pytest.mark.parametrize("bad", ["no placeholder", "{} and {}", "a {0} photo", "a {name}"])
def test_templates_need_exactly_one_placeholder(bad):
    from xmodal.evaluation.evaluate import check_templates

    with pytest.raises(ValueError, match="needs exactly one"):
        check_templates([bad])
    assert check_templates("a {} review.") == ("a {} review.",)
