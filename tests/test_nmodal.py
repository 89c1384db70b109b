"""Image + text + audio in one space: rows with any subset of modalities train, evaluate and get indexed."""
import json

import pytest

from xmodal.cli import main
from xmodal.config import config_from_dict
from xmodal.training.engine import train

SUBSETS = [("image", "text", "audio"), ("image", "text"), ("image", "audio"), ("text", "audio")]


@pytest.fixture(scope="module")
def spoken(clipart, tmp_path_factory):
    """Real drawings and captions, the captions spoken by espeak-ng; then cells blanked so that every subset of
    two or three modalities occurs (rows cycle through SUBSETS)."""
    from xmodal.data.corpora.speech import prepare_spoken_captions
    import pandas as pd
    out = tmp_path_factory.mktemp("spoken")
    manifest = prepare_spoken_captions(clipart, out, limit=48, progress=False)
    df = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    for i in range(len(df)):
        for m in ("image", "text", "audio"):
            if m not in SUBSETS[i % len(SUBSETS)]:
                df.loc[i, m] = ""
    gappy = out / "gappy.csv"
    df.to_csv(gappy, index=False)
    return gappy


def towers():
    return {"image": {"kind": "cnn", "image_size": 32, "augment": False, "options": {"channels": [8, 16]}},
            "text": {"kind": "lstm", "context_length": 16, "options": {"embed_dim": 16, "hidden": 16}},
            "audio": {"kind": "cnn", "augment": False,
                      "options": {"n_mels": 24, "max_seconds": 2, "channels": [8, 16]}}}


@pytest.mark.parametrize("anchor", [None, "text"])
def test_three_modalities_with_gaps_train_evaluate_index(spoken, tmp_path, capsys, anchor):
    run = train(config_from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"embed_dim": 32, "anchor": anchor, "towers": towers()},
        "data": {"train": str(spoken), "allow_outside_root": True},  # images are in the clipart folder
        "train": {"batch_size": 16, "max_steps": 4, "progress": False, "log_every": 1},
        "log": {"backend": "none"}}))
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(losses) == 4 and all(v == v and v > 0 for v in losses)  # finite, positive

    assert main(["evaluate", "--run", str(run), "--manifest", str(spoken), "--json", "--allow-outside-root"]) == 0
    results = json.loads(capsys.readouterr().out)
    for a in ("image", "text", "audio"):
        for b in ("image", "text", "audio"):
            if a != b:  # every direction, including image↔audio, which the text anchor never trains directly
                assert 0 <= results[f"{a}->{b}/R@10"] <= 1
                # queries are exactly the rows holding both: half of the 48 rows hold any given pair
                assert results[f"{a}->{b}/n_queries"] == 24

    assert main(["index", "--run", str(run), "--manifest", str(spoken), "--modality", "audio",
                 "--out", str(tmp_path / "index"), "--allow-outside-root"]) == 0
    assert "(36 audio rows" in capsys.readouterr().out  # the 3 of 4 subsets that hold audio
    assert main(["query", "--index", str(tmp_path / "index"), "--text", "a cat", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]  # text → audio through the index
    assert len(hits) == 3 and all(h["modality"] == "audio" and h["value"].endswith(".wav") for h in hits)


@pytest.mark.slow
def test_two_processes_with_gaps_equal_one_process(spoken, tmp_path):
    """Rows missing modalities leave each process with a different number of pairs per step: 2 real gloo
    processes (8 rows each) still follow the 1-process curve at batch 16. BatchNorm-free trainable towers (a tiny
    ViT, an LSTM) and a frozen audio CNN (eval mode), so both runs compute the same function."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from xmodal.config import save_config

    def config(out, batch_size):
        return config_from_dict({
            "output_dir": str(out), "seed": 3, "model": {"embed_dim": 32, "towers": {
                "image": {"kind": "open_clip", "name": "xmodal-vit-tiny", "image_size": 32, "augment": False,
                          "options": {"vision_cfg": {"width": 64, "layers": 2, "head_width": 32, "patch_size": 8}}},
                "text": {"kind": "lstm", "context_length": 16, "options": {"embed_dim": 32, "hidden": 32}},
                "audio": {**towers()["audio"], "freeze": True}}},
            "data": {"train": str(spoken), "allow_outside_root": True},
            "train": {"batch_size": batch_size, "max_steps": 4, "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
                      "progress": False, "deterministic": True},
            "log": {"backend": "none"}})

    def losses(run):
        return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    one = train(config(tmp_path / "one", 16))
    save_config(config(tmp_path / "two", 8), tmp_path / "two.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "0", "-m", "xmodal.cli", "pretrain", "--config", str(tmp_path / "two.yaml")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(one), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step


def test_every_pair_joins_the_gather_on_several_processes_even_when_absent(monkeypatch):
    """On several processes each rank must call the loss (and its collective gather) for every pair in the same
    order, even for a pair none of its rows holds: it passes zero rows that still belong to the graph."""
    import torch

    from xmodal.losses import contrastive_loss
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1).requires_grad_()
    out = {"text": text, "logit_scale": torch.tensor(10.0, requires_grad=True)}
    calls = []

    def loss_fn(fa, fb, scale, bias):
        calls.append((fa.shape[0], fb.shape[0], fa.requires_grad))
        return fa.sum() + fb.sum() + scale * 0

    contrastive_loss(loss_fn, out, ["image", "text", "audio"])
    assert calls == [(0, 0, True)] * 3  # (image, text), (image, audio), (text, audio): no rows hold both of any
    calls.clear()
    contrastive_loss(loss_fn, out, ["image", "text", "audio"], anchor="text")
    assert calls == [(0, 0, True)] * 2
