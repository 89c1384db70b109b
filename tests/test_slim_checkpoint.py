"""Slim checkpoints (issue 18): a checkpoint holds what trains, and references the frozen towers' weights by a
checksum instead of copying them; resuming a run with a frozen tower still ends bit-identical to an uninterrupted
run, and the finished model folder still holds every weight."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import xmodal
from test_engine import tiny, weights
from xmodal.integrity import IntegrityError
from xmodal.training.checkpoint import checkpoint_dirs
from xmodal.training.checkpoint_files import check_frozen
from xmodal.training.engine import MetricsLog, pretrain

FROZEN = "towers.image.encoder."


def frozen_tiny(manifest, out, **train):
    cfg = tiny(manifest, out, **train)
    cfg.model.towers["image"].freeze = True  # the ViT is frozen; the LSTM text tower and both projections train
    return cfg


def test_resume_from_slim_checkpoints_equals_the_uninterrupted_run(clipart, tmp_path, monkeypatch):
    full = pretrain(frozen_tiny(clipart, tmp_path / "full", save_every=3))

    real_write = MetricsLog.write

    def crashing_write(self, record):  # after the step-6 update, before its checkpoint: resume from step 3
        real_write(self, record)
        if record.get("step") == 6:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(MetricsLog, "write", crashing_write)
    cfg = frozen_tiny(clipart, tmp_path / "resumed", save_every=3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    monkeypatch.setattr(MetricsLog, "write", real_write)
    step3 = tmp_path / "resumed" / "checkpoints" / "step_3"
    held = load_file(str(step3 / "model.safetensors"))
    frozen = json.loads((step3 / "manifest.json").read_text())["frozen"]
    pretrain(cfg, resume=True)

    a, b = weights(full), weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and any(k.startswith(FROZEN) for k in a)  # the finished model is whole
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the checkpoint held everything but the frozen encoder, and its manifest names exactly what it left out
    assert not any(k.startswith(FROZEN) for k in held)
    assert set(held) | set(frozen["keys"]) == set(a) and all(k.startswith(FROZEN) for k in frozen["keys"])
    assert frozen["sources"] == {"image": "open_clip xmodal-vit-tiny"}
    for ckpt in checkpoint_dirs(tmp_path / "resumed"):
        assert not any(k.startswith(FROZEN) for k in load_file(str(ckpt / "model.safetensors")))


def test_a_changed_frozen_tower_is_refused_naming_it(clipart, tmp_path):
    run = pretrain(frozen_tiny(clipart, tmp_path / "run", max_steps=2, save_every=1, keep_checkpoints=1))
    ckpt = checkpoint_dirs(run)[-1]
    frozen = json.loads((ckpt / "manifest.json").read_text())["frozen"]
    model = xmodal.load(run)  # its frozen encoder is the one the run trained with: the reference holds
    check_frozen(ckpt, model, frozen)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.startswith(FROZEN)).view(-1)[0] += 1e-6
    with pytest.raises(IntegrityError, match=r"frozen weights of tower\(s\) image \(open_clip xmodal-vit-tiny\), "
                                             r"and the model built for this run differs \(xxh3_128 "):
        check_frozen(ckpt, model, frozen)
