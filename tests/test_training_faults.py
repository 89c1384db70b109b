"""Numerical faults in training: a NaN/inf loss is detected, reported with its step and batch, and handled by
``train.on_nonfinite`` (skip the step, or stop with the last good checkpoint kept); the temperature stays bounded."""
import csv
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from xmodal.training.checkpoint import latest_checkpoint
from xmodal.config import config_from_dict
from xmodal.training.engine import train

TOWERS = {"text": {"kind": "lstm", "context_length": 16, "options": {"embed_dim": 16, "hidden": 16}}}


# A finite score the reader accepts (NaN/inf targets are refused before training), whose squared error overflows
# float32: the loss of every batch holding it is inf.
HUGE = "1e30"


@pytest.fixture(autouse=True)
def raw_regression_targets(monkeypatch):
    """A finite target whose loss overflows needs a head on raw units: standardised targets bound every error
    (|z| <= sqrt(n)). Such a head is what a model saved before standardisation holds (mean 0, std 1)."""
    from xmodal.tasks.heads import RegressionHead
    monkeypatch.setattr(RegressionHead, "fit_target_scale", lambda self, target: None)


def poisoned_manifest(rotten, tmp_path, bad_row: int = 5):
    """Review snippets with a numeric score; one row's score is so large that its batch's loss is not finite."""
    rows = list(csv.DictReader(open(rotten, encoding="utf-8")))[:64]
    path = tmp_path / "scores.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "score"])
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({"id": r["id"], "text": r["text"], "score": HUGE if i == bad_row else
                        float(r["label"] == "fresh")})
    return path


def cfg(tmp_path, manifest, **train_over):
    return config_from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"embed_dim": 16, "towers": TOWERS},
        "tasks": {"score": {"kind": "regression", "train": str(manifest), "train_split": None, "eval_split": None,
                            "modalities": ["text"], "target": "score"}},
        "train": {"batch_size": 16, "max_steps": 8, "warmup_steps": 1, "log_every": 1, "progress": False,
                  "deterministic": True, **train_over},
        "log": {"backend": "none"}})


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_nonfinite_batch_is_skipped_reported_and_the_weights_stay_finite(rotten, tmp_path, capfd):
    run = train(cfg(tmp_path, poisoned_manifest(rotten, tmp_path)))
    bad = [r for r in records(run) if "nonfinite" in r]
    # 64 rows, batches of 16: the huge row is in one batch per epoch; 8 steps = 2 epochs -> 2 skipped steps.
    assert len(bad) == 2 and {r["nonfinite"].split(",")[1].strip() for r in bad} == {"epoch 0", "epoch 1"}
    assert all(r["nonfinite"].startswith("task score") and not math.isfinite(r["losses"]["score"]) for r in bad)
    assert [r for r in records(run) if "skipped_steps" in r][-1]["skipped_steps"] == 2
    weights = load_file(str(run / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert "non-finite loss or gradients (task score, epoch 0, batch" in capfd.readouterr().err


def test_stop_policy_names_the_step_and_batch_and_keeps_the_last_checkpoint(rotten, tmp_path):
    config = cfg(tmp_path, poisoned_manifest(rotten, tmp_path), on_nonfinite="stop", save_every=1)
    with pytest.raises(FloatingPointError, match=r"step \d+: non-finite loss or gradients \(task score, epoch 0, "
                                                 r"batch \d\).*Last good checkpoint: .*step_\d+"):
        train(config)
    ckpt = latest_checkpoint(tmp_path / "run")
    bad = [r for r in records(tmp_path / "run") if "nonfinite" in r][0]
    assert ckpt.name == f"step_{bad['step'] - 1}" or bad["step"] == 1
    for f in ckpt.glob("*.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(str(f)).values())


def test_repeated_bad_steps_stop_the_run_under_skip_too(rotten, tmp_path):
    manifest = poisoned_manifest(rotten, tmp_path)
    rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join(rows[:1] + [",".join(r.rsplit(",", 1)[:1] + [HUGE]) for r in rows[1:]]) + "\n")
    with pytest.raises(FloatingPointError, match="3 bad step"):
        train(cfg(tmp_path, manifest, max_nonfinite_skips=2))
