"""The documented CLI end to end on real data: pretrain → evaluate → index → query, and user errors as one line."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from xmodal.cli import main

ROOT = Path(__file__).resolve().parent.parent


def write_config(path: Path, manifest: Path, out: Path) -> Path:
    cfg = {
        "output_dir": str(out),
        "model": {"embed_dim": 32, "towers": {
            "image": {"kind": "cnn", "image_size": 32, "options": {"channels": [8, 16]}},
            "text": {"kind": "lstm", "context_length": 16, "options": {"embed_dim": 16, "hidden": 16}}}},
        "data": {"train": str(manifest), "train_split": "train", "eval_split": "test"},
        "train": {"batch_size": 16, "max_steps": 3, "progress": False, "log_every": 1},
        "log": {"backend": "none"},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_pretrain_evaluate_index_query(clipart, tmp_path, capsys):
    run = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", clipart, run)
    assert main(["pretrain", "--config", str(config), "train.max_steps=4"]) == 0
    assert (run / "model.safetensors").is_file() and (run / "config.yaml").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4  # the override took effect
    capsys.readouterr()

    assert main(["evaluate", "--run", str(run), "--manifest", str(clipart), "--split", "test", "--json"]) == 0
    out, err = capsys.readouterr()
    results = json.loads(out)
    assert 0 <= results["text->image/R@10"] <= 1 and results["text->image/n_queries"] > 0
    # a zero-shot top-1 below the majority rate gets one line saying so (and only then)
    below = results["zero_shot/image/top1"] < results["zero_shot/image/majority_top1"]
    assert ("note: zero_shot/image/top1 = " in err) == below and err.count("is below") == below, err

    assert main(["index", "--run", str(run), "--manifest", str(clipart), "--split", "test",
                 "--out", str(tmp_path / "index")]) == 0
    capsys.readouterr()
    assert main(["query", "--index", str(tmp_path / "index"), "--text", "a red car", "-k", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    hits = answer["hits"]
    assert answer["query"] == {"modality": "text", "value": "a red car"}
    assert [h["rank"] for h in hits] == [1, 2, 3] and all(Path(h["value"]).is_file() for h in hits)
    assert hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]


def test_bad_manifest_stops_before_training_with_row_and_field(clipart, tmp_path, capsys):
    lines = clipart.read_text().splitlines()
    header = lines[0].split(",")
    bad = tmp_path / "bad.csv"
    row = lines[1].split(",")
    row[header.index("image")] = str(tmp_path / "missing.png")
    bad.write_text("\n".join([lines[0], ",".join(row)] + lines[2:]) + "\n")
    config = write_config(tmp_path / "c.yaml", bad, tmp_path / "run")
    assert main(["pretrain", "--config", str(config), "data.train_split=null", "data.eval_split=null"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "row 1" in err and "'image'" in err and "missing.png" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_py_has_the_same_verbs_and_reports_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: fast}\n")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "pretrain", "--config", str(bad)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "train.lr: expected a number" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------ outputs and errors of the read-only verbs


def _tiny_model(tasks=None):
    from xmodal.config import ModelConfig, TowerConfig
    from xmodal.model import XModalModel

    torch.manual_seed(0)
    return XModalModel(ModelConfig(embed_dim=32, towers={
        "image": TowerConfig(kind="cnn", image_size=32, options={"channels": [8, 16]}),
        "text": TowerConfig(kind="lstm", context_length=16, options={"embed_dim": 32, "hidden": 32})}), tasks)


@pytest.fixture(scope="module")
def runs(clipart, tmp_path_factory):
    """(pretrain-only run, run with a classification head on images) — untrained, saved like real runs."""
    from xmodal.config import TaskConfig

    tmp = tmp_path_factory.mktemp("runs")
    labels = sorted({r["label"] for r in csv.DictReader(open(clipart, encoding="utf-8"))})
    head = {"kind": TaskConfig(kind="classification", modalities=["image"], target="label", classes=labels)}
    return _tiny_model().save(tmp / "space"), _tiny_model(head).save(tmp / "heads")


def _rows(clipart, split="test"):
    return [r for r in csv.DictReader(open(clipart, encoding="utf-8")) if split is None or r["split"] == split]


def _write(clipart, name, rows, columns=None):
    """A manifest beside the clipart one (so its relative image paths resolve)."""
    path = clipart.parent / name
    columns = columns or list(rows[0])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def test_query_score_is_the_similarity_even_with_a_score_column(clipart, runs, tmp_path, capsys):
    import torch.nn.functional as F

    from xmodal.model import load
    from xmodal.retrieval import EmbeddingIndex

    clash = {"score": "0.832", "rank": "r", "thumb": "t", "index_id": "x", "metadata": "m"}
    manifest = _write(clipart, "clash.csv", [{**r, **clash} for r in _rows(clipart)])
    run, idx = runs[0], tmp_path / "idx"
    assert main(["index", "--run", str(run), "--manifest", str(manifest), "--out", str(idx)]) == 0
    capsys.readouterr()
    assert main(["query", "--index", str(idx), "--text", "a red car", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    model = load(run)
    q = F.normalize(model.encode("text", ["a red car"]), dim=-1)
    items = F.normalize(model.encode("image", [h["value"] for h in hits]), dim=-1)
    truth = (items @ q.T).squeeze(1).tolist()  # cosine of the query and each hit
    index = EmbeddingIndex.load(idx)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    for h, cos in zip(hits, truth):
        assert isinstance(h["score"], float) and h["score"] == pytest.approx(cos, abs=1e-5)
        assert isinstance(h["index_id"], int) and index.metadata(h["index_id"])["id"] == h["id"]
        assert "thumb" not in h  # only the web API has thumbnails
        assert {k: str(h["metadata"][k]) for k in clash} == clash  # the manifest's columns, kept
    assert main(["query", "--index", str(idx), "--text", "a red car", "-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in table[1:]] == [f"{h['score']:.4f}" for h in hits]  # table and JSON agree


def test_format_table_columns_are_as_wide_as_their_content():
    from xmodal.cli.common import format_table

    table = format_table({"text->image/R@1": 0.1, "text->image/n_items": 60.0,
                          "text->image/n_queries_skipped": 0.0, "text->image/n_relevant_missing": 3.0,
                          "image->text/R@1": 0.25, "image->text/R@10": 1.0, "image->text/mAP": 0.0})
    assert table.splitlines() == [
        "                R@1  n_items  n_queries_skipped  n_relevant_missing    R@10     mAP",
        "text->image  0.1000       60                  0                   3",
        "image->text  0.2500                                                  1.0000  0.0000",
    ]
    assert format_table({}) == "(no results)"


def test_evaluate_index_table_header_names_are_separate(clipart, runs, tmp_path, capsys):
    run, idx = runs[0], tmp_path / "idx"
    assert main(["index", "--run", str(run), "--manifest", str(clipart), "--split", "test", "--out", str(idx)]) == 0
    capsys.readouterr()
    assert main(["evaluate-index", "--index", str(idx), "--manifest", str(clipart), "--split", "test"]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["R@1", "R@5", "R@10", "mAP", "n_queries", "n_items", "n_queries_skipped",
                              "n_relevant_missing", "depth"]
    assert len(row.split()) == 10 and row.split()[0] == "text->image"


def test_evaluate_with_nothing_to_evaluate_says_why(clipart, runs, capsys):
    run = runs[0]
    # text only and no labels: no pair to retrieve, nothing to classify zero-shot
    text_only = _write(clipart, "text_only.csv", _rows(clipart), ["id", "text", "split"])
    for extra in ([], ["--json"]):
        assert main(["evaluate", "--run", str(run), "--manifest", str(text_only)] + extra) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "max()" not in err, err
        n = len(_rows(clipart))
        assert f"nothing to evaluate in {text_only}" in err
        assert f"text in {n} of {n} rows" in err and "towers image, text and task heads none" in err
    rows = _rows(clipart, None)
    no_images = _write(clipart, "no_test_images.csv", [{**r, "image": "" if r["split"] == "test" else r["image"]}
                                                       for r in rows], ["id", "image", "text", "split"])
    assert main(["evaluate", "--run", str(run), "--manifest", str(no_images), "--split", "test"]) == 2
    err = capsys.readouterr().err
    n_test = sum(r["split"] == "test" for r in rows)
    assert "(split 'test')" in err and f"image empty in all {n_test} rows" in err
    assert main(["evaluate", "--run", str(run), "--manifest", str(clipart), "--task", "nope"]) == 2
    assert "--task nope: no such head (heads: none)" in capsys.readouterr().err


def test_on_bad_row_flag_and_hints_name_this_commands_flags(clipart, runs, tmp_path, capsys):
    from PIL import Image

    from xmodal.retrieval import EmbeddingIndex

    space, heads = runs
    rows = _rows(clipart)
    bad = _write(clipart, "one_missing.csv", [{**rows[0], "image": "images/missing.png"}] + rows[1:])
    cases = {"evaluate": ["evaluate", "--run", str(space), "--manifest", str(bad), "--json"],
             "predict": ["predict", "--run", str(heads), "--manifest", str(bad)],
             "index": ["index", "--run", str(space), "--manifest", str(bad), "--out", str(tmp_path / "idx")]}
    out = {}
    for verb, argv in cases.items():
        assert main(argv) == 2, verb
        err = capsys.readouterr().err
        assert "row 1" in err and "missing.png" in err and "--on-bad-row skip" in err, err
        assert "on_bad_row=" not in err
        assert main(argv + ["--on-bad-row", "skip"]) == 0, verb
        out[verb] = capsys.readouterr().out
    assert json.loads(out["evaluate"])["text->image/n_items"] == len(rows) - 1
    assert [json.loads(line)["id"] for line in out["predict"].splitlines()] == [r["id"] for r in rows[1:]]
    assert len(EmbeddingIndex.load(tmp_path / "idx")) == len(rows) - 1
    ei = ["evaluate-index", "--index", str(tmp_path / "idx"), "--manifest", str(bad), "--json"]
    assert main(ei) == 2 and "--on-bad-row skip" in capsys.readouterr().err
    assert main(ei + ["--on-bad-row", "skip"]) == 0
    assert json.loads(capsys.readouterr().out)["text->image/n_items"] == len(rows) - 1

    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8), "red").save(outside)
    far = _write(clipart, "outside.csv", [{**rows[0], "image": str(outside)}] + rows[1:])
    # An index is what `xmodal serve` shows: building one confines the manifest's paths by default...
    assert main(["index", "--run", str(space), "--manifest", str(far), "--out", str(tmp_path / "far")]) == 2
    err = capsys.readouterr().err
    assert "outside the data root" in err and "--allow-outside-root permits it" in err
    assert "allow_outside_root" not in err and not (tmp_path / "far").exists()
    # ... evaluating the user's own model on it does not (an absolute path is the common case); the flag's negation
    # confines it there too
    assert main(["evaluate", "--run", str(space), "--manifest", str(far), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text->image/n_items"] == len(rows)
    assert main(["evaluate", "--run", str(space), "--manifest", str(far), "--no-allow-outside-root"]) == 2
    assert "outside the data root" in capsys.readouterr().err
    assert main(["index", "--run", str(space), "--manifest", str(far), "--out", str(tmp_path / "far"),
                 "--allow-outside-root"]) == 0
    assert len(EmbeddingIndex.load(tmp_path / "far")) == len(rows)


def test_predict_on_a_pretrained_space_says_it_has_no_heads(clipart, runs, capsys):
    assert main(["predict", "--run", str(runs[0]), "--manifest", str(clipart)]) == 2
    err = capsys.readouterr().err
    assert "has no task heads" in err and "xmodal finetune" in err and "xmodal index" in err
    assert "heads none" not in err


def test_query_filter_on_an_unknown_key_names_the_known_keys(clipart, runs, tmp_path, capsys):
    run, idx = runs[0], tmp_path / "idx"
    assert main(["index", "--run", str(run), "--manifest", str(clipart), "--split", "test", "--out", str(idx)]) == 0
    capsys.readouterr()
    assert main(["query", "--index", str(idx), "--text", "a dog", "--filter", "lable=animals"]) == 2
    err = capsys.readouterr().err
    assert "'lable'" in err and "metadata keys: id, label, modality, split, text, title, value" in err
    assert main(["query", "--index", str(idx), "--text", "a dog", "--filter", "label=no-such-label"]) == 0
    assert capsys.readouterr().out.strip() == "no results"


def test_evaluate_embeds_each_image_once(clipart, runs, monkeypatch, capsys):
    from xmodal.data import read_manifest
    from xmodal.evaluation.evaluate import evaluate_zero_shot
    from xmodal.model import XModalModel, load

    seen = []
    encode = XModalModel.encode

    def counting(self, modality, inputs, *a, **kw):
        if modality == "image":
            seen.extend(inputs)
        return encode(self, modality, inputs, *a, **kw)

    monkeypatch.setattr(XModalModel, "encode", counting)
    plots = runs[0].parent / "plots_once"
    assert main(["evaluate", "--run", str(runs[0]), "--manifest", str(clipart), "--split", "test", "--json",
                 "--plots", "--plots-dir", str(plots)]) == 0
    results = json.loads(capsys.readouterr().out)
    monkeypatch.undo()
    assert (plots / "space_map.png").is_file()  # the map of the space, from the same embeddings
    data = read_manifest(clipart, split="test", require_all=False).dataset
    images = sorted(set(data["image"]))
    assert sorted(seen) == images  # once each: retrieval and zero-shot share the embeddings
    alone = evaluate_zero_shot(load(runs[0]), data, "image")  # zero-shot on its own, embedding by itself
    for k in ("top1", "top5", "n_classes", "chance_top1"):
        assert results[f"zero_shot/image/{k}"] == pytest.approx(alone[f"zero_shot/{k}"], abs=1e-6)
    assert results["image->text/n_queries"] == len(images)


# --------------------------------------------------------- evaluate: heads, plots, zero-shot flags, --root (audit 2)

FASHION = ["Ankle boot", "Bag", "Coat"]
TAGS = ["even", "odd", "small"]


@pytest.fixture(scope="module")
def multitask(clipart, tmp_path_factory):
    """An untrained run with three heads, as a multi-task finetune leaves: fashion (classification on image, target
    `label`, classes that are not clipart's), tags (multi-label on image+text), stars (regression on text)."""
    from xmodal.config import TaskConfig

    tasks = {"fashion": TaskConfig(kind="classification", modalities=["image"], classes=FASHION),
             "tags": TaskConfig(kind="multilabel", modalities=["image", "text"], target="tags", classes=TAGS),
             "stars": TaskConfig(kind="regression", modalities=["text"], target="score")}
    return _tiny_model(tasks).save(tmp_path_factory.mktemp("mt") / "run")


def _tagged(clipart):
    """The clipart test rows with a `tags` column (its `label` column holds clipart's categories)."""
    return [{**r, "tags": ("even" if i % 2 == 0 else "odd") + ("|small" if i % 3 == 0 else "")}
            for i, r in enumerate(_rows(clipart))]


def _predict(argv, capsys):
    assert main(["predict"] + argv) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def _skips(err):
    return {line.split()[3]: line for line in err.splitlines() if line.startswith("xmodal evaluate: task ")}


def test_evaluate_every_head_skips_the_heads_the_manifest_is_not_for(clipart, multitask, capsys):
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    rows = _tagged(clipart)
    manifest = _write(clipart, "tagged.csv", rows)
    assert main(["evaluate", "--run", str(multitask), "--manifest", str(manifest), "--json"]) == 0
    out = capsys.readouterr()
    results, skips = json.loads(out.out), _skips(out.err)
    # fashion's target `label` is another task's column: skipped, naming the task, the column and a foreign value
    assert set(skips) == {"fashion", "stars"}, out.err
    assert "column 'label' holds none of its classes" in skips["fashion"] and repr(rows[0]["label"]) in skips["fashion"]
    assert "no 'score' column" in skips["stars"]
    assert not any(k.startswith(("fashion/", "stars/")) for k in results)
    preds = _predict(["--run", str(multitask), "--manifest", str(manifest), "--task", "tags"], capsys)
    mlb = MultiLabelBinarizer(classes=TAGS)
    truth = mlb.fit_transform([r["tags"].split("|") for r in rows])
    predicted = mlb.transform([p["labels"] for p in preds])
    assert results["tags/micro_f1"] == pytest.approx(f1_score(truth, predicted, average="micro", zero_division=0),
                                                     abs=1e-6)
    assert results["tags/n"] == len(rows)
    # --threshold: the classes whose probability exceeds it, counted from predict's own probabilities
    low = _predict(["--run", str(multitask), "--manifest", str(manifest), "--task", "tags", "--threshold", "0.2"],
                   capsys)
    assert [p["labels"] for p in low] == [[c for c, q in p["probabilities"].items() if q > 0.2] for p in preds]
    assert sum(map(len, (p["labels"] for p in low))) > sum(map(len, (p["labels"] for p in preds)))
    assert main(["predict", "--run", str(multitask), "--manifest", str(manifest), "--task", "stars",
                 "--threshold", "0.2"]) == 2
    assert "--threshold 0.2: applies to a multilabel head; stars is regression" in capsys.readouterr().err

    # a text-only manifest: fashion has no input column (skipped, not an error); stars is evaluated
    scored = [{**r, "score": str(1 + i % 4)} for i, r in enumerate(rows)]
    text_only = _write(clipart, "scored.csv", scored, ["id", "text", "label", "score", "split"])
    assert main(["evaluate", "--run", str(multitask), "--manifest", str(text_only), "--json"]) == 0
    out = capsys.readouterr()
    results, skips = json.loads(out.out), _skips(out.err)
    assert set(skips) == {"fashion", "tags"} and "no column for its input image" in skips["fashion"]
    assert all(len(line) < 300 for line in skips.values())
    preds = _predict(["--run", str(multitask), "--manifest", str(text_only), "--task", "stars"], capsys)
    mae = sum(abs(p["score"] - float(r["score"])) for p, r in zip(preds, scored)) / len(scored)
    assert results["stars/mae"] == pytest.approx(mae, abs=1e-5)

    # named by --task, a foreign label column stays an error, naming the file, row, id and field
    assert main(["evaluate", "--run", str(multitask), "--manifest", str(manifest), "--task", "fashion"]) == 2
    err = capsys.readouterr().err
    assert f"{manifest}: row 1 (id {rows[0]['id']!r}): field 'label': label {rows[0]['label']!r} is not one of " \
           f"task fashion's classes" in err, err


def test_evaluate_plots_follow_task_and_never_lose_the_metrics(clipart, multitask, tmp_path, monkeypatch, capsys):
    rows = _tagged(clipart)
    manifest = _write(clipart, "tagged_plots.csv", rows)
    scored = _write(clipart, "scored_plots.csv", [{**r, "score": "2"} for r in rows], ["id", "text", "score"])
    # --task tags: only that head; fashion (its `label` is foreign) is not drawn and does not fail the command
    plots = tmp_path / "p1"
    assert main(["evaluate", "--run", str(multitask), "--manifest", str(manifest), "--task", "tags", "--json",
                 "--plots", "--plots-dir", str(plots)]) == 0
    assert set(json.loads(capsys.readouterr().out)) == {"tags/micro_f1", "tags/macro_f1", "tags/subset_accuracy",
                                                        "tags/mAP", "tags/n"}
    assert not list(plots.glob("confusion_*.png")) and not (plots / "space_map.png").exists()
    plots = tmp_path / "p2"
    assert main(["evaluate", "--run", str(multitask), "--manifest", str(scored), "--task", "stars", "--json",
                 "--plots", "--plots-dir", str(plots)]) == 0
    assert "stars/mae" in json.loads(capsys.readouterr().out)
    # every head: the confusion matrix of fashion only on a manifest whose labels are fashion's
    fashion = _write(clipart, "fashion_plots.csv", [{**r, "label": FASHION[i % 3]} for i, r in enumerate(rows)])
    plots = tmp_path / "p3"
    assert main(["evaluate", "--run", str(multitask), "--manifest", str(fashion), "--json", "--plots",
                 "--plots-dir", str(plots)]) == 0
    assert "fashion/accuracy" in json.loads(capsys.readouterr().out)
    assert [p.name for p in plots.glob("confusion_*.png")] == ["confusion_fashion.png"]

    def broken(*a, **kw):
        raise RuntimeError("no backend")

    monkeypatch.setattr("xmodal.evaluation.plots.write_plots", broken)
    saved = tmp_path / "results.json"
    assert main(["evaluate", "--run", str(multitask), "--manifest", str(manifest), "--task", "tags", "--json",
                 "--plots", "--out", str(saved)]) == 2
    out = capsys.readouterr()
    assert json.loads(out.out)["tags/n"] == len(rows) and json.loads(saved.read_text())["tags/n"] == len(rows)
    assert out.err.strip().splitlines() == ["xmodal evaluate: error: --plots: RuntimeError: no backend (the metrics "
                                            "above are complete)"]


def test_evaluate_bad_targets_name_file_row_id_and_field(clipart, runs, capsys):
    heads = runs[1]  # head "kind": classification of images into clipart's labels
    rows = _rows(clipart, None)
    test = [i for i, r in enumerate(rows) if r["split"] == "test"]
    empty = [dict(r) for r in rows]
    empty[test[2]]["label"] = ""
    path = _write(clipart, "empty_label.csv", empty)
    assert main(["evaluate", "--run", str(heads), "--manifest", str(path), "--split", "test"]) == 2
    err = capsys.readouterr().err
    # the row as the file numbers it (data rows from 1), not its place in the test split
    assert f"{path}: row {test[2] + 1} (id {rows[test[2]]['id']!r}): field 'label': empty target" in err, err
    assert "is not one of" not in err
    typo = [dict(r) for r in rows]
    typo[test[1]]["label"] = typo[test[1]]["label"].upper()
    path = _write(clipart, "typo_label.csv", typo)
    for task in ([], ["--task", "kind"]):  # one bad label among good ones: an error, --task or not
        assert main(["evaluate", "--run", str(heads), "--manifest", str(path), "--split", "test"] + task) == 2
        err = capsys.readouterr().err
        assert (f"{path}: row {test[1] + 1} (id {rows[test[1]]['id']!r}): field 'label': label "
                f"{typo[test[1]]['label']!r} is not one of task kind's classes") in err, err


def test_zero_shot_of_text_with_label_column_and_templates(clipart, runs, capsys):
    from xmodal.data import read_manifest
    from xmodal.evaluation.evaluate import evaluate_zero_shot
    from xmodal.model import load

    rows = [{**r, "sentiment": "positive" if i % 3 else "negative"} for i, r in enumerate(_rows(clipart))]
    reviews = _write(clipart, "reviews.csv", rows, ["id", "text", "sentiment", "split"])
    templates = ["a {} review.", "{}."]
    argv = ["evaluate", "--run", str(runs[0]), "--manifest", str(reviews), "--json"]
    assert main(argv + ["--label-column", "sentiment", "--templates"] + templates) == 0
    results = json.loads(capsys.readouterr().out)
    data = read_manifest(reviews, require_all=False).dataset
    alone = evaluate_zero_shot(load(runs[0]), data, "text", "sentiment", templates)
    assert {k.replace("zero_shot/text/", "zero_shot/"): v for k, v in results.items()} == pytest.approx(alone)
    n_pos = sum(r["sentiment"] == "positive" for r in rows)
    assert results["zero_shot/text/majority_top1"] == pytest.approx(n_pos / len(rows))  # by hand
    assert results["zero_shot/text/chance_top1"] == 0.5 and "zero_shot/text/top5" not in results  # 2 classes
    # explicit flags that cannot apply are errors naming the flag
    for extra, says in ((["--label-column", "stars"], "--label-column stars: "),
                        (["--templates", "a review"], "--templates: template 'a review': needs exactly one {}"),
                        (["--zero-shot-modality", "image"], "--zero-shot-modality image: "),
                        (["--zero-shot-modality", "audio"], "the run has no audio tower")):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err


def test_root_flag_reads_relative_paths_from_another_folder(clipart, runs, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    manifest = elsewhere / "m.csv"
    manifest.write_text(clipart.read_text(encoding="utf-8"), encoding="utf-8")  # relative paths, another folder
    space, heads = runs
    base = ["--manifest", str(manifest), "--split", "test"]
    assert main(["evaluate", "--run", str(space)] + base) == 2
    err = capsys.readouterr().err
    assert "file not found" in err and "--root DIR" in err
    root = ["--root", str(clipart.parent)]
    assert main(["evaluate", "--run", str(space), "--json"] + base + root) == 0
    assert json.loads(capsys.readouterr().out)["text->image/n_queries"] > 0
    n = len(_rows(clipart))
    assert len(_predict(["--run", str(heads)] + base + root, capsys)) == n
    assert main(["index", "--run", str(space), "--out", str(tmp_path / "idx")] + base + root) == 0
    capsys.readouterr()
    assert main(["evaluate-index", "--index", str(tmp_path / "idx"), "--json"] + base + root) == 0
    assert json.loads(capsys.readouterr().out)["text->image/n_items"] == n


def test_a_fine_tuned_run_gets_text_zero_shot_only_when_asked(tmp_path, capsys):
    """On a run with heads, a text-only labelled manifest is its heads' data: no generic-prompt zero-shot row unless
    a zero-shot flag asks for one (a pretrained space without heads gets it by default: the other tests)."""
    from xmodal.cli.evaluate import _zero_shot_options
    from xmodal.evaluation.evaluate import PROMPT_TEMPLATES
    import argparse
    import datasets

    data = datasets.Dataset.from_dict({"text": ["good", "bad"], "label": ["pos", "neg"]})

    class Run:  # the two facts the choice reads: towers and heads
        towers, modalities = {"image": None, "text": None}, ["image", "text"]

        def __init__(self, heads):
            self.heads = heads

    def opts(heads, **flags):
        args = argparse.Namespace(manifest="m.csv", label_column=None, templates=None, zero_shot_modality=None)
        vars(args).update(flags)
        return _zero_shot_options(args, Run(heads), data)

    assert opts({"sentiment": None})["zero_shot_modalities"] == []
    assert opts({})["zero_shot_modalities"] is None  # evaluate's default: text, the only modality here
    assert opts({"sentiment": None}, label_column="label")["zero_shot_modalities"] is None
    assert opts({"sentiment": None}, templates=["a {} review."])["templates"] == ["a {} review."]
    assert opts({"sentiment": None}, zero_shot_modality=["text"])["zero_shot_modalities"] == ["text"]
    assert opts({})["templates"] == PROMPT_TEMPLATES


def test_a_top1_below_the_majority_rate_is_named():
    from xmodal.cli.common import below_majority

    results = {"zero_shot/image/top1": 0.12, "zero_shot/image/majority_top1": 0.31, "zero_shot/image/chance_top1": 0.05,
               "zero_shot/text/top1": 0.40, "zero_shot/text/majority_top1": 0.31, "text->image/R@1": 0.01}
    (line,) = below_majority(results)  # the text one beats its majority rate; R@1 has no majority rate
    assert line.startswith("note: zero_shot/image/top1 = 0.1200 is below zero_shot/image/majority_top1 = 0.3100")
    assert below_majority({"sentiment/top1": 0.5, "sentiment/majority_top1": 0.5}) == []  # equal is not below
    # a head's accuracy against its majority_accuracy (classification_metrics reports both)
    (line,) = below_majority({"sentiment/accuracy": 0.52, "sentiment/majority_accuracy": 0.55, "sentiment/macro_f1": 0.5})
    assert line.startswith("note: sentiment/accuracy = 0.5200 is below sentiment/majority_accuracy = 0.5500")
    assert below_majority({"sentiment/accuracy": 0.80, "sentiment/majority_accuracy": 0.55}) == []


def test_ctrl_c_outside_the_training_loop_is_one_line(clipart, tmp_path, monkeypatch, capsys):
    """Ctrl-C while a run is being built (reading data, embedding frozen features): no traceback, exit 130, one line
    naming the newest checkpoint (none yet) and the command that resumes; in any other verb, one line too."""
    import xmodal.cli.evaluate
    import xmodal.training.engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    config = write_config(tmp_path / "c.yaml", clipart, tmp_path / "run")
    monkeypatch.setattr(xmodal.training.engine, "build_run", interrupted)
    assert main(["pretrain", "--config", str(config), "train.max_steps=2"]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"xmodal pretrain: interrupted outside the training loop; no checkpoint was saved; resume with: "
        f"xmodal pretrain --config {config} train.max_steps=2 --resume")
    monkeypatch.setattr(xmodal.cli.evaluate, "run_evaluate", interrupted)
    assert main(["evaluate", "--run", str(tmp_path), "--manifest", str(clipart)]) == 130
    assert capsys.readouterr().err == "xmodal evaluate: interrupted\n"
