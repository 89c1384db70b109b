"""Matryoshka loss (Kusupati et al. 2022) against a hand computation; encode(dim=); the config field."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xmodal.losses import ClipLoss
from xmodal.losses.matryoshka import MatryoshkaLoss, with_matryoshka


def clip_by_hand(a, b, scale):
    """InfoNCE both ways, written out: -log softmax of the diagonal, averaged over rows and the two directions."""
    s = scale * a @ b.T
    n = len(a)
    i2t = -sum(s[i, i] - torch.logsumexp(s[i], 0) for i in range(n)) / n
    t2i = -sum(s[i, i] - torch.logsumexp(s[:, i], 0) for i in range(n)) / n
    return (i2t + t2i) / 2


def test_matryoshka_equals_the_mean_of_prefix_losses_by_hand():
    g = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    b = F.normalize(torch.randn(6, 16, generator=g), dim=-1)
    scale = torch.tensor(10.0)
    got = MatryoshkaLoss(ClipLoss(), [4, 8])(a, b, scale)
    want = 0.0
    for m in (4, 8, 16):  # the full size joins the listed prefixes
        pa = a[:, :m] / a[:, :m].norm(dim=1, keepdim=True)
        pb = b[:, :m] / b[:, :m].norm(dim=1, keepdim=True)
        want += clip_by_hand(pa, pb, scale) / 3
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    weighted = MatryoshkaLoss(ClipLoss(), [4, 16], weights=[3.0, 1.0])(a, b, scale)
    p4 = F.normalize(a[:, :4], dim=-1), F.normalize(b[:, :4], dim=-1)
    assert weighted.item() == pytest.approx((3 * clip_by_hand(*p4, scale) + clip_by_hand(a, b, scale)).item() / 4,
                                            rel=1e-6)
    assert with_matryoshka(ClipLoss(), []).__class__ is ClipLoss
    with pytest.raises(ValueError, match="increasing"):
        MatryoshkaLoss(ClipLoss(), [8, 4])
    with pytest.raises(ValueError, match="exceed the embedding size 16"):
        MatryoshkaLoss(ClipLoss(), [32])(a, b, scale)


def test_matryoshka_pretrain_encode_evaluate_index(clipart, tmp_path, capsys, monkeypatch):
    """`model.matryoshka_dims` end to end on Open Clip Art: training goes through the nested loss; encode(dim=)
    truncates and renormalises; evaluate reports each prefix (recomputed here); an index at 8 dims answers
    queries embedded at 8 dims."""
    import json

    import numpy as np
    import yaml

    from xmodal.cli import main
    from xmodal.config import ConfigError, load_config
    from xmodal.data import read_manifest
    from xmodal.evaluation.metrics import rank_summary, retrieval_ranks
    from xmodal.losses import matryoshka
    from xmodal.model import load

    calls = []
    forward = matryoshka.MatryoshkaLoss.forward
    monkeypatch.setattr(matryoshka.MatryoshkaLoss, "forward", lambda self, *a: calls.append(self.dims) or forward(
        self, *a))
    run = tmp_path / "run"
    cfg = {"output_dir": str(run), "model": {"embed_dim": 32, "matryoshka_dims": [8, 16], "towers": {
        "image": {"kind": "cnn", "image_size": 32, "options": {"channels": [8, 16]}},
        "text": {"kind": "lstm", "context_length": 16, "options": {"embed_dim": 16, "hidden": 16}}}},
        "data": {"train": str(clipart), "train_split": "train"},
        "train": {"batch_size": 16, "max_steps": 2, "progress": False, "log_every": 1}, "log": {"backend": "none"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml")]) == 0
    assert calls and all(d == [8, 16] for d in calls)
    with pytest.raises(ConfigError, match="model.matryoshka_dims: must be increasing sizes between 1 and"):
        load_config(str(tmp_path / "c.yaml"), ["model.matryoshka_dims=[16,64]"])

    model = load(run)
    assert model.cfg.matryoshka_dims == [8, 16]
    texts = ["a red car", "a cat", "a house"]
    full, short = model.encode("text", texts), model.encode("text", texts, dim=8)
    assert short.shape == (3, 8)
    torch.testing.assert_close(short, full[:, :8] / full[:, :8].norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="dim must be an integer between 1 and embed_dim"):
        model.encode("text", texts, dim=33)
    capsys.readouterr()

    assert main(["evaluate", "--run", str(run), "--manifest", str(clipart), "--split", "test", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    test = read_manifest(clipart, split="test").dataset
    # by hand: distinct texts and images at 8 dims, each text's positive the image of its row
    t_vals, i_vals = list(dict.fromkeys(test["text"])), list(dict.fromkeys(test["image"]))
    te, ie = model.encode("text", t_vals, dim=8), model.encode("image", i_vals, dim=8)
    pos = torch.tensor(sorted({(t_vals.index(t), i_vals.index(i)) for t, i in zip(test["text"], test["image"])})).T
    assert torch.equal(torch.unique(pos[0]), torch.arange(len(t_vals)))
    want = rank_summary(retrieval_ranks(te, ie, pos))
    assert results["text->image@8/R@10"] == pytest.approx(want["R@10"])
    assert "text->image@16/R@1" in results and "text->image/R@1" in results

    out = tmp_path / "ix8"
    assert main(["index", "--run", str(run), "--manifest", str(clipart), "--split", "test", "--dim", "8",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["query", "--index", str(out), "--text", "a red car", "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    images = model.encode("image", [h["value"] for h in hits], dim=8).numpy()
    scores = images @ model.encode("text", ["a red car"], dim=8).numpy()[0]
    np.testing.assert_allclose([h["score"] for h in hits], scores, atol=1e-5)
