"""Model selection (train.select_best): the validation rows (a split, or a seeded grouped slice held out of train),
the saved model = the best validated step's weights, and a resumed run keeps the best-so-far."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_engine import tiny
from xmodal.config import ConfigError, config_from_dict
from xmodal.data import read_manifest
from xmodal.training import selection as selection_module
from xmodal.training.engine import MetricsLog, pretrain
from xmodal.training.holdout import duplicate_groups, holdout_rows
from xmodal.training.selection import selection_score


def test_duplicate_groups_by_hand():
    # rows 0 and 2 share an image, 2 and 3 a caption: {0, 2, 3}; row 1 alone; row 4's empty cells join nothing
    images = ["a.png", "b.png", "a.png", "c.png", ""]
    texts = ["cat", "dog", "kitten", "kitten", None]
    assert duplicate_groups([images, texts]) == [0, 1, 0, 0, 4]


def test_holdout_is_seeded_disjoint_and_keeps_duplicates_together(clipart):
    rows = read_manifest(clipart, modalities=["image", "text"]).dataset
    cols = [rows["image"], rows["text"]]
    train, held = holdout_rows(cols, 0.1, 1000, seed=0)
    assert sorted(train + held) == list(range(len(rows))) and not set(train) & set(held)
    assert len(held) >= round(0.1 * len(rows))  # whole groups: at least the fraction asked
    assert holdout_rows(cols, 0.1, 1000, seed=0) == (train, held)  # seeded
    assert holdout_rows(cols, 0.1, 1000, seed=1)[1] != held
    for values in cols:  # no image or caption on both sides
        assert not {values[i] for i in train} & {values[i] for i in held}
    assert len(holdout_rows(cols, 0.5, 7, seed=0)[1]) <= 7 + 2  # the cap (a last group may pass it by its size)


def test_selection_score_by_hand():
    res = {"text->image/R@1": 0.2, "text->image/R@5": 0.5, "text->image/R@10": 0.6, "image->text/R@1": 0.4,
           "image->text/R@5": 0.7, "image->text/R@10": 0.9, "text->image@64/R@1": 1.0, "text->image/n_queries": 9}
    assert selection_score(res, "R@1") == pytest.approx(0.3)
    assert selection_score(res, "R@10") == pytest.approx(0.75)
    assert selection_score(res, "rsum") == pytest.approx((0.2 + 0.5 + 0.6 + 0.4 + 0.7 + 0.9) / 6)


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _select(manifest, out, **train):
    return tiny(manifest, out, select_best=True, eval_every=2, save_every=2, keep_checkpoints=10, **train)


def test_saved_model_is_the_best_validated_step(clipart, tmp_path):
    run = pretrain(_select(clipart, tmp_path / "run"))
    records = _records(run)
    held = next(r for r in records if "selection/source" in r)
    n_rows = len(read_manifest(clipart, modalities=["image", "text"]))
    assert held["selection/source"] == "held_out" and held["selection/rows"] >= round(0.1 * n_rows)
    val = {r["step"]: r for r in records if "val/text->image/R@1" in r}
    assert sorted(val) == [2, 4, 6, 8]
    score = {s: (r["val/text->image/R@1"] + r["val/image->text/R@1"]) / 2 for s, r in val.items()}  # the default
    best = min(s for s in score if score[s] >= max(score.values()) - 1e-9)  # ties: the earlier step
    card = json.loads((run / "model.json").read_text())
    assert card["selection"]["step"] == best and card["selection"]["of"] == 8
    assert card["train_rows"]["contrastive"] == n_rows - held["selection/rows"] == held["selection/train_rows"]
    saved, at_best = load_file(str(run / "model.safetensors")), load_file(str(run / f"checkpoints/step_{best}/model.safetensors"))
    assert set(at_best) <= set(saved)
    for k, v in at_best.items():
        assert torch.equal(saved[k], v), k
    assert f"selected step {best} of 8" in (run / "train.log").read_text()


def test_the_manifest_val_split_is_used_when_training_reads_a_split(clipart, tmp_path):
    cfg = _select(clipart, tmp_path / "run", max_steps=2, batch_size=8)
    cfg.data.train_split = "train"
    records = _records(pretrain(cfg))
    held = next(r for r in records if "selection/source" in r)
    n_val = len(read_manifest(clipart, split="val", modalities=["image", "text"]))
    assert held["selection/source"] == "split" and held["selection/rows"] == n_val
    assert held["selection/train_rows"] == len(read_manifest(clipart, split="train", modalities=["image", "text"]))


SCRIPTED = {2: 0.3, 4: 0.8, 6: 0.5, 8: 0.6}  # validation R@1 by step: step 4 is the best, before the resume point


def _scripted(monkeypatch):
    real = selection_module.Selection.consider

    def consider(self, step, results, model):
        return real(self, step, {"text->image/R@1": SCRIPTED[step], "image->text/R@1": SCRIPTED[step]}, model)
    monkeypatch.setattr(selection_module.Selection, "consider", consider)


def test_resume_keeps_the_best_so_far(clipart, tmp_path, monkeypatch):
    _scripted(monkeypatch)
    full = pretrain(_select(clipart, tmp_path / "full", select_metric="R@1"))
    crash_at = 7  # the newest checkpoint is step 6; the best (step 4) is behind it
    real_write = MetricsLog.write

    def crashing_write(self, record):
        real_write(self, record)
        if record.get("step") == crash_at and "loss" in record:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(MetricsLog, "write", crashing_write)
    cfg = _select(clipart, tmp_path / "resumed", select_metric="R@1")
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    monkeypatch.setattr(MetricsLog, "write", real_write)
    resumed = pretrain(cfg, resume=True)
    for run in (full, resumed):
        assert json.loads((run / "model.json").read_text())["selection"]["step"] == 4
        saved, at_4 = load_file(str(run / "model.safetensors")), load_file(str(run / "checkpoints/step_4/model.safetensors"))
        for k, v in at_4.items():
            assert torch.equal(saved[k], v), (run, k)


def test_select_best_needs_eval_every_and_a_pretraining_run(clipart, tmp_path):
    with pytest.raises(ConfigError, match="train.select_best: needs train.eval_every"):
        config_from_dict({"data": {"train": str(clipart)}, "train": {"select_best": True}})
    with pytest.raises(ConfigError, match="data.holdout_fraction"):
        config_from_dict({"data": {"train": str(clipart), "holdout_fraction": 0.9}})
