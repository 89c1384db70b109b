"""Training from ``model.pretrained`` through the CLI: LiT (a locked image tower) from an open_clip checkpoint with a
smaller encoder LR, resumed exactly after a crash; a head on a frozen transformers CLIP whose embeddings stay the
source's."""
from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

import _peer_models as peers
import xmodal
from xmodal.cli import main
from xmodal.training.engine import MetricsLog

torch.set_num_threads(2)


def _write(path, cfg):
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _config(out, clipart, pretrained, **train):
    return {"output_dir": str(out), "seed": 0, "model": {"pretrained": pretrained},
            "data": {"train": str(clipart), "train_split": "train"},
            "train": {"batch_size": 8, "max_steps": 4, "lr": 1e-3, "warmup_steps": 1, "log_every": 1,
                      "progress": False, "deterministic": True, **train},
            "log": {"backend": "none"}}


def test_lit_from_open_clip_checkpoint_locks_image_and_resumes_exactly(clipart, tmp_path, monkeypatch):
    ckpt = peers.open_clip_checkpoint(tmp_path / "src")
    source = torch.load(ckpt, weights_only=True)["state_dict"]
    pretrained = {"library": "open_clip", "name": peers.OPEN_CLIP_NAME, "weights": str(ckpt), "freeze": ["image"]}
    straight = _write(tmp_path / "a.yaml", _config(tmp_path / "a", clipart, pretrained, encoder_lr=1e-4))
    assert main(["pretrain", "--config", straight]) == 0
    w = load_file(str(tmp_path / "a" / "model.safetensors"))
    # LiT: the image tower is the checkpoint's, bit for bit; the text tower (with its own projection) learned
    for k, v in source.items():
        if k.startswith("visual."):
            assert torch.equal(w["towers.image.encoder." + k[len("visual."):]], v), k
    assert not torch.equal(w["towers.text.encoder.text_projection"], source["text_projection"])
    assert not any(k.startswith("towers.") and ".projection." in k for k in w)  # no new layer on the towers

    _assert_resumes_exactly(tmp_path, clipart, pretrained, w, monkeypatch, encoder_lr=1e-4)


def _assert_resumes_exactly(tmp_path, clipart, pretrained, straight_weights, monkeypatch, **train):
    """The same run crashed after step 3 (checkpoints every 2 steps) and resumed ends with the same weights."""
    crashed = _write(tmp_path / "b.yaml", _config(tmp_path / "b", clipart, pretrained, save_every=2, **train))
    real_write = MetricsLog.write

    def crash(self, record):
        real_write(self, record)
        if record.get("step") == 3 and "lr" in record:
            raise RuntimeError("simulated crash after step 3")

    monkeypatch.setattr(MetricsLog, "write", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):  # a crash, not Ctrl-C (which saves a checkpoint)
        main(["pretrain", "--config", crashed])
    monkeypatch.setattr(MetricsLog, "write", real_write)
    assert main(["pretrain", "--config", crashed, "--resume"]) == 0
    resumed = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert resumed.keys() == straight_weights.keys()
    assert all(torch.equal(resumed[k], straight_weights[k]) for k in straight_weights)


def test_full_fine_tune_of_transformers_clip_with_encoder_lr_resumes_exactly(clipart, tmp_path, monkeypatch):
    from safetensors.torch import load_file as load_source

    folder = peers.hf_clip_folder(tmp_path / "clip")
    pretrained = {"library": "transformers", "name": str(folder)}
    assert main(["pretrain", "--config", _write(tmp_path / "a.yaml", _config(
        tmp_path / "a", clipart, pretrained, encoder_lr=1e-4))]) == 0
    w = load_file(str(tmp_path / "a" / "model.safetensors"))
    source = load_source(str(folder / "model.safetensors"))
    # both towers (their projections included) trained: full fine-tuning
    assert not torch.equal(w["towers.image.encoder.visual_projection.weight"], source["visual_projection.weight"])
    assert not torch.equal(w["towers.text.encoder.text_projection.weight"], source["text_projection.weight"])
    _assert_resumes_exactly(tmp_path, clipart, pretrained, w, monkeypatch, encoder_lr=1e-4)


def test_head_on_frozen_transformers_clip_keeps_the_source_space(clipart, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    folder = peers.hf_clip_folder(tmp_path / "clip")
    cfg = _config(tmp_path / "run", clipart, {"library": "transformers", "name": str(folder),
                                               "freeze": ["image", "text"]}, max_steps=3, lr=1e-2)
    cfg["train"]["freeze_projections"] = True
    cfg["tasks"] = {"category": {"kind": "classification", "train": str(clipart), "modalities": ["image", "text"],
                                 "target": "label", "train_split": "train", "eval_split": "test"}}
    assert main(["finetune", "--config", _write(tmp_path / "ft.yaml", cfg)]) == 0
    run = xmodal.load(tmp_path / "run")
    assert run.cfg.towers["text"].kind == "hf_clip" and run.cfg.pretrained.name == str(folder)
    texts = ["a red fire truck", "an owl on a branch"]
    logits = run.predict("category", {"image": [None, None], "text": texts})
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    ref, tok = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        feats = ref.get_text_features(**tok(texts, padding=True, return_tensors="pt")).pooler_output
    torch.testing.assert_close(run.encode("text", texts), torch.nn.functional.normalize(feats, dim=-1),
                               atol=1e-5, rtol=1e-5)
