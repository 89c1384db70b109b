"""The scripts in examples/, end to end on tiny settings: the real-data fixtures and a tiny pretrained run built
here (never runs/ or data/ of the working tree). Each script's printed results are checked against what the library
computes directly (model.encode, model.predict), not only that it ran."""
import json
import re
import runpy
from pathlib import Path

import pytest
import torch

import xmodal
from xmodal.config import config_from_dict
from xmodal.data import read_manifest
from xmodal.training.engine import train

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TOWERS = {  # tiny towers, as in tests/test_finetune.py
    "image": {"kind": "cnn", "image_size": 32, "augment": False, "options": {"channels": [8, 16]}},
    "text": {"kind": "lstm", "context_length": 24, "options": {"embed_dim": 32, "hidden": 32}},
}


def example(name: str):
    """The example's ``main(argv)``, imported from its file (run_path does not trigger its ``__main__`` block)."""
    return runpy.run_path(str(EXAMPLES / f"{name}.py"))


@pytest.fixture(scope="module")
def pretrained(clipart, tmp_path_factory):
    return train(config_from_dict({
        "output_dir": str(tmp_path_factory.mktemp("examples") / "pre"), "model": {"embed_dim": 32, "towers": TOWERS},
        "data": {"train": str(clipart)}, "train": {"batch_size": 16, "max_steps": 3, "progress": False},
        "log": {"backend": "none"}}))


def table_rows(out: str, title: str) -> list[list[str]]:
    """The rows of the format_hits table printed under the line ``title`` (rank, score, id, label, value...)."""
    lines = out.splitlines()
    start = lines.index(title) + 2  # the title, then the table's header
    rows = []
    for line in lines[start:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_search_top_hits_are_the_argmax_of_the_dot_products(pretrained, clipart, tmp_path, monkeypatch, capsys):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the example's scratch index must not outlive it
    ns = example("search")
    ns["main"](["--run", str(pretrained), "--manifest", str(clipart), "--max-rows", "8"])
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []

    rows = read_manifest(clipart, split="test").dataset.to_dict()
    ids, images, texts = rows["id"][::2], rows["image"][::2], rows["text"][::2]  # 16 test rows, 8 spread over them
    assert out.startswith(f"{len(ids)} test drawings -> embeddings ({len(ids)}, 32), L2 norms 1.000-1.000")
    model = xmodal.load(pretrained)
    image_emb = model.encode("image", images)
    scores = model.encode("text", ns["QUERIES"]) @ image_emb.T
    for query, row in zip(ns["QUERIES"], scores):
        best = float(row.max())
        printed = re.search(rf"^dot product\s+{re.escape(repr(query))}\s+-> (\S+)  cos (\S+)$", out, re.M)
        assert float(row[ids.index(printed[1])]) == pytest.approx(best, abs=1e-6)  # the argmax (ties allowed)
        assert float(printed[2]) == pytest.approx(best, abs=1e-4)
        hits = table_rows(out, f"text -> image: {query!r}")
        assert len(hits) == 3 and hits[0][0] == "1" and float(hits[0][1]) == pytest.approx(best, abs=1e-4)
        assert float(row[ids.index(hits[0][2])]) == pytest.approx(best, abs=1e-6)
        assert [float(h[1]) for h in hits] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)

    text_scores = image_emb[:2] @ model.encode("text", texts).T  # image -> text: the captions' index
    for i, row in enumerate(text_scores):
        title = next(line for line in out.splitlines() if line.startswith(f"image -> text: {ids[i]} "))
        hits = table_rows(out, title)
        assert float(hits[0][1]) == pytest.approx(float(row.max()), abs=1e-4)
        assert float(row[ids.index(hits[0][2])]) == pytest.approx(float(row.max()), abs=1e-6)


def test_multitask_trains_both_heads_and_predicts(pretrained, fashion, rotten, tmp_path, capsys):
    out_dir = tmp_path / "mt"
    ns = example("multitask")
    ns["main"](["--run", str(pretrained), "--fashion", str(fashion), "--rotten", str(rotten), "--steps", "6",
                "--max-rows", "100", "--out", str(out_dir)])
    out = capsys.readouterr().out

    model = xmodal.load(out_dir)
    assert set(model.heads) == {"fashion", "sentiment"}
    assert model.heads["fashion"].modalities == ["image"] and model.heads["sentiment"].modalities == ["text"]
    assert len(model.tasks["fashion"].classes) == 10 and model.tasks["sentiment"].classes == ["fresh", "rotten"]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["step"] == 6
    # uncertainty weighting: each task's learned weight exp(-s) moves only in steps that trained that task
    assert last["weight/fashion"] != 1.0 and last["weight/sentiment"] != 1.0

    for task, manifest, column in (("fashion", fashion, "image"), ("sentiment", rotten, "text")):
        rows = read_manifest(manifest, split="test", max_rows=ns["TEST_ROWS"]).dataset.to_dict()
        probs = model.predict(task, {column: rows[column]}).softmax(-1)
        torch.testing.assert_close(probs.sum(-1), torch.ones(len(probs)))
        labels = [model.tasks[task].classes[k] for k in probs.argmax(-1).tolist()]
        accuracy = sum(a == b for a, b in zip(labels, rows["label"])) / len(labels)
        assert f"{task}: accuracy {accuracy:.3f} on {len(labels)} test rows" in out
        block = out.split(f"{task}: accuracy")[1].splitlines()[1:5]
        for line, label, p in zip(block, labels, probs.max(-1).values.tolist()):
            assert line.split()[:2] == [label, f"p={p:.3f}"]
    mine = model.predict("sentiment", {"text": ns["MY_REVIEWS"]}).softmax(-1)
    for line, (k, p) in zip(out.strip().splitlines()[-2:], zip(mine.argmax(-1).tolist(), mine.max(-1).values.tolist())):
        assert line.split()[:2] == [model.tasks["sentiment"].classes[k], f"p={p:.3f}"]


def test_fused_head_answers_with_one_modality_differently(pretrained, clipart, tmp_path, capsys):
    out_dir = tmp_path / "fused"
    example("fused_head")["main"](["--run", str(pretrained), "--manifest", str(clipart), "--steps", "6",
                                   "--out", str(out_dir)])
    out = capsys.readouterr().out

    model = xmodal.load(out_dir)
    task = model.tasks["category"]
    assert model.heads["category"].modalities == ["image", "text"]
    assert task.fusion == "gated" and task.modality_dropout == 0.3
    rows = read_manifest(clipart, split="test").dataset.to_dict()  # 16 rows: all of them are predicted
    none = [None] * len(rows["id"])
    probs = {name: model.predict("category", inputs).softmax(-1) for name, inputs in {
        "image + text": {"image": rows["image"], "text": rows["text"]},
        "image only": {"image": rows["image"], "text": none},
        "text only": {"image": none, "text": rows["text"]}}.items()}
    both = probs["image + text"]
    for name, p in probs.items():
        accuracy = sum(task.classes[k] == t for k, t in zip(p.argmax(-1).tolist(), rows["label"])) / len(none)
        shift = float((p - both).abs().sum(-1).mean() / 2)
        printed = re.search(rf"^{re.escape(name)}\s+accuracy (\S+) .* probability shift (\S+)$", out, re.M)
        assert float(printed[1]) == pytest.approx(accuracy, abs=1e-3)
        assert float(printed[2]) == pytest.approx(shift, abs=1e-3)
        if name != "image + text":  # the head really answers from one modality: its probabilities move
            assert (p - both).abs().max() > 1e-3 and shift > 1e-3
