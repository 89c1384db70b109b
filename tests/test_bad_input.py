"""Bad input found before training, named as the user sees it (file, 1-based data row in the FILE, id, field), rows
lacking a task's modalities left out (never predicted from zeros), and run folders that are never silently
overwritten or resumed into a model of another shape."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import xmodal
from xmodal.config import ConfigError, config_from_dict, load_config
from xmodal.data import ManifestError, read_manifest
from xmodal.training.engine import train
from xmodal.training.task_data import read_task_data, task_configs

ROOT = Path(__file__).resolve().parent.parent
TOWERS = {
    "image": {"kind": "cnn", "image_size": 16, "augment": False, "options": {"channels": [4]}},
    "text": {"kind": "lstm", "context_length": 8, "options": {"embed_dim": 8, "hidden": 8}},
}
CLASSES = ["zero", "one", "two"]


def make_manifest(folder: Path, n: int = 48) -> Path:
    """``n`` digit-like rows: 4 distinct tiny PNGs, a caption, a class label, a numeric score; every 4th row is in
    the test split, so a row's position within its split differs from its row in the file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{k}.png")
    path = folder / "digits.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "text", "label", "score", "split"])
        w.writeheader()
        for i in range(n):
            w.writerow({"id": f"dig{i:04d}", "image": f"{i % 4}.png", "text": f"digit number {CLASSES[i % 3]}",
                        "label": CLASSES[i % 3], "score": f"{(i % 7) / 7:.3f}",
                        "split": "test" if i % 4 == 3 else "train"})
    return path


def edit(path: Path, row_id: str, **cells) -> int:
    """Set cells of the row with ``row_id``; return its 1-based data row in the file, counted independently of
    xmodal (by the csv module)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    fields = list(rows[0])
    number = next(n for n, r in enumerate(rows, 1) if r["id"] == row_id)
    rows[number - 1].update(cells)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return number


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def config(out: Path, manifest: Path, tasks: dict | None = None, **train_over) -> xmodal.config.Config:
    d = {"output_dir": str(out), "seed": 0, "model": {"embed_dim": 8, "towers": TOWERS},
         "data": {"train": str(manifest), "train_split": "train", "eval_split": "test"},
         "train": {"batch_size": 4, "max_steps": 2, "warmup_steps": 0, "log_every": 1, "progress": False,
                   "cache_frozen": False, **train_over},
         "log": {"backend": "none"}}
    if tasks:
        d["tasks"] = tasks
    return config_from_dict(d)


def digit_task(**over) -> dict:
    return {"digit": {"kind": "classification", "modalities": ["image"], **over}}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def nothing_trained(out: Path) -> bool:
    return not (out / "checkpoints").exists() and not (out / "model.safetensors").exists() and not (
        out / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------- 1-3: targets, before training

@pytest.mark.parametrize("row_id", ["dig0031", "dig0012"])  # a test-split row (eval), a train-split row
def test_empty_target_names_the_row_in_the_file_not_in_the_split(tmp_path, row_id):
    manifest = make_manifest(tmp_path / "data")
    number = edit(manifest, row_id, label="")
    assert number == int(row_id[3:]) + 1  # the csv module agrees: data row 32 / 13 of the file
    out = tmp_path / "run"
    with pytest.raises(ManifestError) as exc:
        train(config(out, manifest, digit_task()))
    assert str(exc.value) == f"{manifest}: row {number} (id '{row_id}'): field 'label': empty target"
    assert nothing_trained(out)


def test_unknown_eval_label_is_refused_before_training_naming_row_and_classes(tmp_path):
    manifest = make_manifest(tmp_path / "data")
    number = edit(manifest, "dig0043", label="eleven")  # test split: the eval rows
    out = tmp_path / "run"
    with pytest.raises(ManifestError) as exc:
        train(config(out, manifest, digit_task()))
    assert str(exc.value) == (f"{manifest}: row {number} (id 'dig0043'): field 'label': label 'eleven' is not one "
                              f"of task digit's classes (one, two, zero)")
    assert number == 44 and nothing_trained(out)


def test_unknown_labels_list_more_rows_and_truncate_a_long_class_list(tmp_path):
    manifest = make_manifest(tmp_path / "data")
    classes = [f"c{i:02d}" for i in range(12)] + CLASSES
    numbers = [edit(manifest, rid, label="eleven") for rid in ("dig0003", "dig0007", "dig0011")]
    c = config(tmp_path / "run", manifest, digit_task(classes=classes))
    (name, t), = task_configs(c, ["image", "text"]).items()
    with pytest.raises(ManifestError) as exc:
        read_task_data(c, name, t)
    lines = str(exc.value).splitlines()
    assert lines[0] == (f"{manifest}: row {numbers[0]} (id 'dig0003'): field 'label': label 'eleven' is not one of "
                        f"task digit's classes (c00, c01, c02, c03, c04, c05, c06, c07, c08, c09, … (15 classes))")
    assert lines[1] == f"(2 more bad row(s) in {manifest})"
    assert [ln.split(": field")[0].strip() for ln in lines[2:]] == [
        f"{manifest}: row {numbers[1]} (id 'dig0007')", f"{manifest}: row {numbers[2]} (id 'dig0011')"]


@pytest.mark.parametrize("value, what", [
    ("high", "expected a number (a regression target), got 'high'"),
    ("nan", "expected a finite number (a regression target), got 'nan'"),
    ("-inf", "expected a finite number (a regression target), got '-inf'"),
    ("1e39", "'1e39' is outside the float32 range the heads train in (|x| <= 3.4e38)"),
])
def test_bad_regression_target_is_refused_before_training(tmp_path, value, what):
    manifest = make_manifest(tmp_path / "data")
    number = edit(manifest, "dig0021", score=value)
    out = tmp_path / "run"
    tasks = {"score": {"kind": "regression", "modalities": ["text"], "target": "score"}}
    with pytest.raises(ManifestError) as exc:
        train(config(out, manifest, tasks))
    assert str(exc.value) == f"{manifest}: row {number} (id 'dig0021'): field 'score': {what}"
    assert number == 22 and nothing_trained(out)


# ----------------------------------------------------------------------- 4: rows lacking every input of a head

def test_head_leaves_out_rows_without_its_modality_and_predict_refuses_them(tmp_path, caplog, capsys):
    manifest = make_manifest(tmp_path / "data")
    lacking = ["dig0000", "dig0005", "dig0009", "dig0010", "dig0013", "dig0017", "dig0022", "dig0031"]
    numbers = {rid: edit(manifest, rid, image="") for rid in lacking}
    rows = csv_rows(manifest)
    with_image = {s: [r["id"] for r in rows if r["split"] == s and r["image"]] for s in ("train", "test")}
    c = config(tmp_path / "run", manifest, digit_task())
    (name, t), = task_configs(c, ["image", "text"]).items()
    with caplog.at_level(logging.WARNING, logger="xmodal"):
        train_data, eval_data = read_task_data(c, name, t)
    assert train_data["id"] == with_image["train"] and eval_data["id"] == with_image["test"]
    warnings = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    train_lacking = [rid for rid in lacking if rows[numbers[rid] - 1]["split"] == "train"]
    assert len(warnings) == 2  # one per manifest read (train split, test split)
    assert warnings[0].startswith(f"task digit: left out {len(train_lacking)} of "
                                  f"{len(train_lacking) + len(with_image['train'])} rows (split 'train') of "
                                  f"{manifest} that do not have the task's modality image")
    assert warnings[0].endswith(", ".join(f"row {numbers[r]} (id '{r}')" for r in train_lacking[:5]) + ", ...")

    run = train(c)  # trains on the rows that have an image, evaluates on those of the test split
    card = json.loads((run / "model.json").read_text())
    assert card["train_rows"] == {"digit": len(with_image["train"])}
    model = xmodal.load(run)
    image = str(manifest.parent / "1.png")
    assert model.predict("digit", {"image": [image]}).shape == (1, 3)
    with pytest.raises(ValueError, match=r"task 'digit' reads image, and row 1 of the inputs \(0-based\) has no "
                                         r"image"):
        model.predict("digit", {"image": [image, None]})
    with pytest.raises(ValueError, match=r"predict: task 'digit' reads image, and the inputs have none of it"):
        model.predict("digit", {"text": ["digit number one"]})  # was a bare KeyError: 'image'
    with pytest.raises(ValueError, match=r"no 'audio' tower"):
        model.predict("digit", {"audio": ["x.wav"]})
    # the head itself: a batch row without its modality is an error, not a prediction from a zero vector
    head = model.heads["digit"]
    feats = {"image": torch.randn(3, 8)}
    with pytest.raises(ValueError, match=r"task 'digit' reads image: row 2 of the batch has no image"):
        head(feats, {"image": torch.tensor([True, True, False])})
    # the CLI on the same manifest: predict and evaluate leave those rows out (one warning), as training does
    from xmodal.cli import main

    capsys.readouterr()
    assert main(["predict", "--run", str(run), "--manifest", str(manifest), "--split", "test",
                 "--out", str(tmp_path / "pred.jsonl")]) == 0
    assert main(["evaluate", "--run", str(run), "--manifest", str(manifest), "--split", "test", "--task", "digit",
                 "--out", str(tmp_path / "eval.json")]) == 0
    err = capsys.readouterr().err  # (train() has set up logging to stderr; caplog's handler is gone)
    predicted = [json.loads(line)["id"] for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert predicted == with_image["test"]
    assert json.loads((tmp_path / "eval.json").read_text())["digit/accuracy"] == pytest.approx(
        card["eval"]["digit/accuracy"])  # the same rows as the run's own evaluation
    assert err.count("task digit: left out 1 of 12 rows (split 'test')") == 2 and "row 32 (id 'dig0031')" in err


def test_head_over_two_modalities_keeps_rows_with_either_and_fails_only_when_none_is_left(tmp_path):
    manifest = make_manifest(tmp_path / "data")
    edit(manifest, "dig0004", image="")  # text only: kept
    number = edit(manifest, "dig0008", image="", text="")  # neither: left out
    c = config(tmp_path / "run", manifest, {"fused": {"kind": "classification", "modalities": ["image", "text"]}})
    (name, t), = task_configs(c, ["image", "text"]).items()
    train_data, _ = read_task_data(c, name, t)
    train_ids = [r["id"] for r in csv_rows(manifest) if r["split"] == "train"]
    assert train_data["id"] == [i for i in train_ids if i != "dig0008"] and number == 9

    head_manifest = make_manifest(tmp_path / "empty")
    for r in csv_rows(head_manifest):
        if r["split"] == "test":
            edit(head_manifest, r["id"], image="")
    c = config(tmp_path / "run2", head_manifest, digit_task())
    (name, t), = task_configs(c, ["image", "text"]).items()
    with pytest.raises(ManifestError, match=rf"^{head_manifest}: task digit: none of the 12 rows \(split 'test'\) "
                                            rf"has the task's modality image"):
        read_task_data(c, name, t)


def test_a_file_broken_after_the_checks_is_named_by_its_row_in_the_file(tmp_path, monkeypatch):
    """A file that changes between the checks and its use in training: the error still names the file's row."""
    import xmodal.training.task_data
    from xmodal.data import ManifestRowError, read_manifest

    manifest = make_manifest(tmp_path / "data")
    Image.new("RGB", (16, 16)).save(manifest.parent / "only.png")
    number = edit(manifest, "dig0030", image="only.png")  # a train row, the only one reading only.png

    def read_then_break(*args, **kw):
        m = read_manifest(*args, **kw)
        (manifest.parent / "only.png").write_bytes(b"not a png any more")
        return m

    monkeypatch.setattr(xmodal.training.task_data, "read_manifest", read_then_break)
    with pytest.raises(ManifestRowError) as exc:
        train(config(tmp_path / "run", manifest, digit_task(), max_steps=20))
    assert str(exc.value).startswith(f"{manifest}: row {number} (id 'dig0030'): field 'image': transform failed on "
                                     f"'{manifest.parent / 'only.png'}'")
    assert number == 31


# --------------------------------------------------------------------- 5: contrastive pairs with a modality missing

def test_pretraining_leaves_out_rows_that_cannot_form_a_pair_but_refuses_bad_cells(tmp_path):
    manifest = make_manifest(tmp_path / "data")
    numbers = {"dig0005": edit(manifest, "dig0005", image=""), "dig0010": edit(manifest, "dig0010", text=""),
               "dig0016": edit(manifest, "dig0016", image="", text="")}
    rows = csv_rows(manifest)
    pairs = [r["id"] for r in rows if r["split"] == "train" and r["image"] and r["text"]]
    run = train(config(tmp_path / "run", manifest))  # was: "row 6 (id 'dig0005'): field 'image': empty path"
    assert json.loads((run / "model.json").read_text())["train_rows"] == {"contrastive": len(pairs)}
    warning, = [line.split(" ", 2)[2] for line in (run / "train.log").read_text().splitlines() if "left out" in line]
    assert warning == (f"WARNING: task contrastive: left out 3 of {len(pairs) + 3} rows (split 'train') of {manifest} "
                       f"that do not have both image and text (a contrastive pair) (an empty cell means the row lacks "
                       f"that modality): " + ", ".join(f"row {n} (id '{r}')" for r, n in numbers.items()))
    # a cell that is there but bad is still an error naming its row, as before
    number = edit(manifest, "dig0014", image="missing.png")
    with pytest.raises(ManifestError, match=rf"^{manifest}: row {number} \(id 'dig0014'\): field 'image': file not "
                                            rf"found"):
        train(config(tmp_path / "run2", manifest))


def test_empty_and_whitespace_captions_mean_no_text_and_their_rows_are_left_out(tmp_path, caplog):
    """An empty or whitespace-only caption is a missing text, as an empty cell is (a CSV cannot tell "" from an
    empty cell): in two-tower pretraining its row cannot form a pair, so it is left out with one warning naming it;
    the run goes on. Reading the manifest strictly (every modality required: read_manifest's default) still refuses
    it, naming the row."""
    from xmodal.training.task_data import read_task_data, task_configs

    manifest = make_manifest(tmp_path / "data")
    blank = {"dig0002": "", "dig0005": "   ", "dig0009": "\t \t"}  # all in the train split (every 4th is test)
    numbers = {r: edit(manifest, r, text=t) for r, t in blank.items()}
    cfg = config(tmp_path / "run", manifest)
    (name, task), = task_configs(cfg, ["image", "text"]).items()
    with caplog.at_level(logging.WARNING, logger="xmodal"):
        train_rows, _ = read_task_data(cfg, name, task)
    expected = [r["id"] for r in csv_rows(manifest) if r["split"] == "train" and r["text"].strip()]
    assert train_rows["id"] == expected and not set(blank) & set(train_rows["id"])
    (warning,) = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert warning.startswith(f"task contrastive: left out 3 of {len(expected) + 3} rows (split 'train')")
    assert warning.endswith(", ".join(f"row {n} (id '{r}')" for r, n in numbers.items()))
    with pytest.raises(ManifestError, match=rf"row {numbers['dig0002']} \(id 'dig0002'\): field 'text': "):
        read_manifest(manifest, split="train")


# ------------------------------------------------------------------------------------ 6-7: run folders and resume

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step pretraining run (checkpoint step_2, model.safetensors, metrics.jsonl)."""
    folder = tmp_path_factory.mktemp("finished")
    manifest = make_manifest(folder / "data")
    run = train(config(folder / "run", manifest))
    return folder, manifest, run


def copy_run(finished, tmp_path) -> Path:
    import shutil
    shutil.copytree(finished[2], tmp_path / "run")
    return tmp_path / "run"


def snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): digest(p) for p in sorted(run.rglob("*")) if p.is_file()}


def test_resume_with_a_changed_model_is_refused_before_anything_is_written(finished, tmp_path):
    _, manifest, _ = finished
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    c = config(run, manifest)
    c.model.embed_dim = 16
    c.model.towers["image"].options = {"channels": [8]}
    with pytest.raises(ConfigError) as exc:
        train(c, resume=True)
    msg = str(exc.value)
    assert msg.startswith(f"--resume: the model differs from the run's {run / 'config.yaml'}, so its checkpoints do "
                          f"not fit: ")
    assert "model.embed_dim: 8 → 16" in msg and "model.towers.image.options.channels: [4] → [8]" in msg
    assert msg.endswith("nothing was written)")
    assert snapshot(run) == before  # config.yaml still describes the weights


def test_a_checkpoint_that_does_not_fit_is_a_one_line_error_without_a_saved_config(finished, tmp_path):
    from xmodal.training.checkpoint import CheckpointError
    _, manifest, _ = finished
    run = copy_run(finished, tmp_path)
    (run / "config.yaml").unlink()  # nothing to compare with: the checkpoint itself must be refused clearly
    c = config(run, manifest, max_steps=3)  # one more step: the checkpoint is loaded
    c.model.embed_dim = 16
    with pytest.raises(CheckpointError, match=rf"^checkpoint {run / 'checkpoints' / 'step_2'} does not fit this "
                                              rf"model \(was the run's model config changed\?\): .*size mismatch"):
        train(c, resume=True)


def test_resume_with_changed_training_settings_warns_and_continues(finished, tmp_path):
    _, manifest, _ = finished
    run = copy_run(finished, tmp_path)
    train(config(run, manifest, max_steps=3, lr=2e-3), resume=True)
    log = (run / "train.log").read_text()
    assert "resuming with changed train.max_steps: 2 → 3; train.lr: 0.001 → 0.002" in log
    # a warning says so (an INFO line does not): unlabelled, a new user read it as one more INFO line
    (line,) = [ln for ln in log.splitlines() if "resuming with changed" in ln]
    assert line.split(" ", 2)[2].startswith("WARNING: resuming with changed")
    (info,) = [ln for ln in log.splitlines() if "resumed from" in ln]
    assert info.split(" ", 2)[2].startswith("resumed from")
    assert load_config(run / "config.yaml").train.max_steps == 3
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2, 3]


def test_resuming_a_finished_run_writes_nothing_twice(finished, tmp_path):
    _, manifest, _ = finished
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    train(config(run, manifest), resume=True)
    after = snapshot(run)
    written = ("train.log", "config.yaml")  # config.yaml: the same, but for output_dir (the copy's new folder)
    assert {k: v for k, v in after.items() if k not in written} == {k: v for k, v in before.items()
                                                                    if k not in written}
    assert load_config(run / "config.yaml").to_dict() == {**load_config(finished[2] / "config.yaml").to_dict(),
                                                          "output_dir": str(run)}
    assert "the run already finished at step 2 (model.safetensors written); nothing to do" in (
        run / "train.log").read_text()


@pytest.mark.parametrize("keep", ["model", "metrics"])
def test_a_folder_holding_a_run_is_never_overwritten(finished, tmp_path, keep):
    import shutil
    _, manifest, _ = finished
    run = copy_run(finished, tmp_path)
    shutil.rmtree(run / "checkpoints")  # as the study scripts do once a run is finished
    if keep == "metrics":
        (run / "model.safetensors").unlink()
    before = snapshot(run)
    held = "model.safetensors, metrics.jsonl" if keep == "model" else "metrics.jsonl"
    with pytest.raises(FileExistsError) as exc:
        train(config(run, manifest))
    assert str(exc.value) == (f"{run} already holds a run ({held}): choose another output_dir, or delete the folder "
                              f"to train it again (nothing was overwritten)")
    if keep == "model":  # --resume cannot continue it either: no checkpoint
        with pytest.raises(FileExistsError, match="holds a finished model .* but no checkpoint to resume from"):
            train(config(run, manifest), resume=True)
    assert snapshot(run) == before


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path):
    manifest = make_manifest(tmp_path / "data")
    run = train(config(tmp_path / "run", manifest, max_steps=1), resume=True)
    assert f"--resume: {run} holds no checkpoint; starting a fresh run" in (run / "train.log").read_text()


# ---------------------------------------------------------------------------------------- 8-10: config messages

def test_too_few_rows_names_the_task_and_a_batch_size_that_works(tmp_path):
    manifest = make_manifest(tmp_path / "data")  # 36 train rows
    with pytest.raises(ValueError) as exc:
        train(config(tmp_path / "run", manifest, digit_task(), batch_size=64))
    msg = str(exc.value)
    assert msg.startswith("task digit: 36 training rows is less than one step's batch of 64 (train.batch_size 64 × "
                          "train.grad_accum_steps 1 × 1 process(es)): lower train.batch_size (e.g. "
                          "train.batch_size=16)")
    assert nothing_trained(tmp_path / "run")
    suggested = int(msg.split("train.batch_size=")[1].split(")")[0])
    run = train(config(tmp_path / "run2", manifest, digit_task(), batch_size=suggested, max_steps=None))
    assert json.loads((run / "model.json").read_text())["step"] == 36 // suggested  # one epoch of the suggestion


def test_misspelled_tower_and_task_modality_are_named(tmp_path, finished):
    with pytest.raises(ConfigError, match=r"model\.towers\.imag: the config has towers \[image, text\] and 'imag' is "
                                          r"not one of them \(probably a typo for 'image'\)"):
        load_config(ROOT / "configs" / "pretrain.yaml", ["model.towers.imag.freeze=false"])
    with pytest.raises(ConfigError, match=r"tasks\.x\.modalities: 'txt' is not a tower of the model \(towers: "
                                          r"image, text, from model\.towers\); did you mean 'text'\?"):
        load_config(ROOT / "configs" / "pretrain.yaml", ["tasks.x.kind=classification", "tasks.x.modalities=[txt]"])
    # fine-tuning from a run: the towers come from its model card, checked at the start of training
    _, manifest, pre = finished
    c = config_from_dict({"output_dir": str(tmp_path / "ft"), "init_from": str(pre),
                          "tasks": {"x": {"kind": "classification", "train": str(manifest), "modalities": ["txt"]}},
                          "log": {"backend": "none"}})
    with pytest.raises(ConfigError, match=rf"tasks\.x\.modalities: 'txt' is not a tower of the model \(towers: "
                                          rf"image, text, from the init_from run {pre}\)"):
        train(c)
    assert not (tmp_path / "ft").exists()


def test_the_no_split_column_recipe_of_docs_data_md_works(tmp_path):
    """docs/data.md: no split column → data.train_split=null, data.eval=…, data.eval_split=null."""
    doc = (ROOT / "docs" / "data.md").read_text()
    assert "data.train_split=null" in doc and "data.eval_split=null" in doc
    folder = tmp_path / "data"
    manifest = make_manifest(folder)
    rows = csv_rows(manifest)
    for name, part in (("train.csv", rows[:40]), ("eval.csv", rows[40:])):
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=["id", "image", "text"])
            w.writeheader()
            w.writerows({k: r[k] for k in ("id", "image", "text")} for r in part)
    base = ["data.train=" + str(folder / "train.csv"), "data.train_split=null", "data.eval=" + str(folder / "eval.csv")]
    c = load_config(ROOT / "configs" / "pretrain.yaml", base + ["data.eval_split=null"])
    (name, t), = task_configs(c, ["image", "text"]).items()
    train_data, eval_data = read_task_data(c, name, t)
    assert len(train_data) == 40 and len(eval_data) == 8
    c = load_config(ROOT / "configs" / "pretrain.yaml", base)  # without data.eval_split=null: the config's 'test'
    (name, t), = task_configs(c, ["image", "text"]).items()
    with pytest.raises(ManifestError, match="has no column 'split' to select split='test'"):
        read_task_data(c, name, t)



@pytest.mark.parametrize("bad", [1, 2])
def test_config_run_bad_rows_name_the_config_key(tmp_path, bad):
    """A training run is driven by a config, so its bad-row hint names ``data.on_bad_row`` (the library's own
    message names the Python argument ``on_bad_row=``); with that key set, the rows are dropped instead."""
    manifest = make_manifest(tmp_path / "d")
    for rid in ("dig0000", "dig0004")[:bad]:
        edit(manifest, rid, image="missing.png")
    c = config(tmp_path / "run", manifest, digit_task())
    (name, t), = task_configs(c, ["image", "text"]).items()
    with pytest.raises(ManifestError) as exc:
        read_task_data(c, name, t)
    msg = str(exc.value)
    assert "data.on_bad_row=skip drops" in msg.splitlines()[0 if bad == 1 else 1] and "on_bad_row='skip'" not in msg
    c.data.on_bad_row = "skip"
    assert len(read_task_data(c, name, t)[0]) == 36 - bad  # 36 train rows, the bad ones dropped


def test_misspelled_task_name_and_a_loss_the_task_ignores_are_named():
    with pytest.raises(ConfigError, match=r"tasks\.sentimnt: the config has tasks \[sentiment\] and 'sentimnt' is not "
                                          r"one of them \(probably a typo for 'sentiment'\)"):
        load_config(ROOT / "configs" / "finetune_sentiment.yaml", ["tasks.sentimnt.dropout=0.2"])
    with pytest.raises(ConfigError, match=r"tasks\.sentiment\.loss: 'huber' is a regression loss; a classification "
                                          r"task uses its own"):
        load_config(ROOT / "configs" / "finetune_sentiment.yaml", ["tasks.sentiment.loss=huber"])
    cfg = load_config(ROOT / "configs" / "finetune_sentiment.yaml",
                      ["tasks.sentiment.kind=regression", "tasks.sentiment.loss=huber"])
    assert cfg.tasks["sentiment"].loss == "huber"


def test_a_threshold_is_checked_and_only_for_multilabel():
    with pytest.raises(ConfigError, match=r"tasks\.sentiment\.threshold: applies to kind multilabel, not "
                                          r"classification"):
        load_config(ROOT / "configs" / "finetune_sentiment.yaml", ["tasks.sentiment.threshold=0.3"])
    with pytest.raises(ConfigError, match=r"tasks\.sentiment\.threshold: must be in \(0, 1\), got 1\.5"):
        load_config(ROOT / "configs" / "finetune_sentiment.yaml", ["tasks.sentiment.kind=multilabel",
                                                                    "tasks.sentiment.threshold=1.5"])


def test_a_run_saved_before_a_config_field_existed_still_resumes(finished, tmp_path):
    import yaml
    from xmodal.training.run_folder import config_changes
    _, manifest, _ = finished
    run = copy_run(finished, tmp_path)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["model"]["pair_memory"], saved["model"]["towers"]["image"]["projection_dropout"]  # newer fields
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    assert config_changes(config(run, manifest), run) == []  # absent = the default it trained with
    c = config(run, manifest)
    c.model.towers["image"].projection_dropout = 0.1  # a real change is still one
    with pytest.raises(ConfigError, match=r"model\.towers\.image\.projection_dropout: 0\.0 → 0\.1"):
        config_changes(c, run)
