"""Fusion modules: hand-computed outputs, and absent modalities never influencing the output (every subset of 3)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xmodal.tasks.fusion import (AttentionFusion, ConcatFusion, EarlyFusionEncoder, GatedFusion, LateFusion,
                           ProductFusion, WeightedSumFusion, build_fusion)

MODS = ["image", "text", "audio"]
D, B = 8, 7
NAMES = ["concat", "sum", "product", "gated", "attention"]


def _feats(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    return {m: F.normalize(torch.randn(b, D, generator=g), dim=-1) for m in MODS}


def _module(name):
    torch.manual_seed(0)
    mod = build_fusion(name, MODS, D, heads=2) if name == "attention" else build_fusion(name, MODS, D)
    with torch.no_grad():  # non-trivial learned parameters, so masking bugs cannot hide behind a zero init
        for p in mod.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return mod.eval()


def _subsets():
    return [set(s) for r in (1, 2, 3) for s in itertools.combinations(MODS, r)]


@pytest.mark.parametrize("name", NAMES)
def test_garbage_in_absent_slots_is_ignored(name):
    """Every row pattern (each non-empty subset of 3 modalities, all in one batch): replacing the absent slots by
    random garbage changes nothing, and dropping an all-absent modality from the dict equals passing it as absent."""
    mod = _module(name)
    subsets = _subsets()
    feats = _feats(0, len(subsets))
    present = {m: torch.tensor([m in s for s in subsets]) for m in MODS}
    garbage = {m: torch.where(present[m][:, None], feats[m], torch.randn(len(subsets), D) * 5) for m in MODS}
    zeros = {m: torch.where(present[m][:, None], feats[m], torch.zeros(())) for m in MODS}
    with torch.no_grad():
        ref = mod(zeros, present)
        out = mod(garbage, present)
    assert out.shape == (len(subsets), mod.out_dim)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    # a modality missing from the dict is absent for every row
    rows = [i for i, s in enumerate(subsets) if "audio" not in s]
    sub = {m: garbage[m][rows] for m in ("image", "text")}
    with torch.no_grad():
        out2 = mod(sub, {m: present[m][rows] for m in ("image", "text")})
    torch.testing.assert_close(out2, ref[rows], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_do_not_reach_absent_slots(name):
    mod = _module(name)
    feats = {m: x.clone().requires_grad_(True) for m, x in _feats(1).items()}
    # text is present in every row (not in `present` = all rows), audio in none
    present = {"image": torch.tensor([1, 0, 1, 0, 1, 1, 0], dtype=torch.bool),
               "audio": torch.zeros(B, dtype=torch.bool)}
    mod(feats, present).square().sum().backward()
    assert feats["audio"].grad.abs().sum() == 0
    assert feats["image"].grad[~present["image"]].abs().sum() == 0
    assert feats["image"].grad[present["image"]].abs().sum() > 0


@pytest.mark.parametrize("name", NAMES + ["late"])
def test_nan_and_inf_in_absent_slots_stay_out_of_outputs_and_grads(name):
    """Stronger than the contract needs: even NaN/inf placeholders reach neither the output nor any gradient."""
    mod = LateFusion({m: nn.Linear(D, 3) for m in MODS}) if name == "late" else _module(name)
    present = {m: torch.tensor([m in s for s in _subsets()]) for m in MODS}
    f = _feats(3, len(_subsets()))
    bad = {m: torch.where(present[m][:, None], f[m], torch.tensor([float("nan"), float("inf")]).repeat(D // 2))
           .requires_grad_(True) for m in MODS}
    out = mod(bad, present)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in mod.parameters() if p.grad is not None)
    assert all(torch.isfinite(x.grad).all() for x in bad.values())


@pytest.mark.parametrize("name", NAMES)
def test_row_without_any_modality_is_an_error(name):
    mod = _module(name)
    present = {m: torch.ones(B, dtype=torch.bool) for m in MODS}
    for m in MODS:
        present[m][3] = False
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        mod(_feats(), present)
    with pytest.raises(ValueError, match="none of the modalities"):
        mod({"logit_scale": torch.tensor(1.0)})


def test_concat_by_hand():
    f = _feats()
    present = {"text": torch.tensor([True, False, True, True, True, True, True])}
    out = ConcatFusion(MODS, D)(f, present)
    assert out.shape == (B, 3 * D)
    torch.testing.assert_close(out[0], torch.cat([f["image"][0], f["text"][0], f["audio"][0]]))
    torch.testing.assert_close(out[1], torch.cat([f["image"][1], torch.zeros(D), f["audio"][1]]))
    # extra keys (the model's logit_scale) are ignored
    with_scale = {**f, "logit_scale": torch.tensor(14.3)}
    torch.testing.assert_close(ConcatFusion(MODS, D)(with_scale), ConcatFusion(MODS, D)(f))


def test_weighted_sum_by_hand():
    f = _feats()
    mod = WeightedSumFusion(MODS, D)
    with torch.no_grad():
        mod.logits.copy_(torch.tensor([0.0, 1.0, 2.0]))
    present = {"audio": torch.tensor([True, False, True, True, True, True, True])}
    out = mod(f, present)
    e = torch.exp(torch.tensor([0.0, 1.0, 2.0]))
    w = e / e.sum()
    torch.testing.assert_close(out[0], w[0] * f["image"][0] + w[1] * f["text"][0] + w[2] * f["audio"][0])
    w2 = e[:2] / e[:2].sum()  # audio absent: renormalised over image and text
    torch.testing.assert_close(out[1], w2[0] * f["image"][1] + w2[1] * f["text"][1])
    # initial logits 0: the mean of the present embeddings
    out0 = WeightedSumFusion(MODS, D)(f, present)
    torch.testing.assert_close(out0[1], (f["image"][1] + f["text"][1]) / 2)


def test_product_by_hand():
    f = _feats()
    present = {"image": torch.tensor([True, False, True, True, True, True, True])}
    out = ProductFusion(MODS, D)(f, present)
    torch.testing.assert_close(out[0], f["image"][0] * f["text"][0] * f["audio"][0])
    torch.testing.assert_close(out[1], f["text"][1] * f["audio"][1])
    torch.testing.assert_close(ProductFusion(MODS, D)({"text": f["text"]}), f["text"])


def test_gated_by_hand():
    f = _feats()
    mod = _module("gated")
    present = {"text": torch.tensor([True, False, True, True, True, True, True])}
    out = mod(f, present)
    for row, mods in ((0, MODS), (1, ["image", "audio"])):
        s = torch.stack([mod.gates[MODS.index(m)](f[m][row]).squeeze() for m in mods])
        g = s.softmax(0)
        torch.testing.assert_close(out[row], sum(g[k] * f[m][row] for k, m in enumerate(mods)))


def test_attention_equals_layer_on_present_tokens_only():
    """A row's output = the same layer run on just its present tokens (no mask), then their mean."""
    mod = _module("attention")
    subsets = _subsets()
    f = _feats(2, len(subsets))
    present = {m: torch.tensor([m in s for s in subsets]) for m in MODS}
    with torch.no_grad():
        out = mod(f, present)
        for row, s in enumerate(subsets):
            idx = [MODS.index(m) for m in MODS if m in s]
            tokens = torch.stack([f[MODS[i]][row] for i in idx])[None] + mod.type_embed[idx]
            ref = mod.layer(tokens).mean(1)[0]
            torch.testing.assert_close(out[row], ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible"):
        AttentionFusion(MODS, 10, heads=4)


def test_late_fusion_is_mean_of_head_outputs():
    torch.manual_seed(0)
    heads = {m: nn.Linear(D, 3) for m in MODS}
    late = LateFusion(heads)
    f = _feats()
    present = {"audio": torch.tensor([True, False, True, False, True, True, True]),
               "image": torch.tensor([True, True, False, False, True, True, True])}
    with torch.no_grad():
        out = late(f, present)
        outs = {m: heads[m](f[m]) for m in MODS}
        torch.testing.assert_close(out[0], (outs["image"][0] + outs["text"][0] + outs["audio"][0]) / 3)
        torch.testing.assert_close(out[1], (outs["image"][1] + outs["text"][1]) / 2)
        torch.testing.assert_close(out[2], (outs["text"][2] + outs["audio"][2]) / 2)
        torch.testing.assert_close(out[3], outs["text"][3])
        # prob_mean: log of the mean of the softmax probabilities
        pm = LateFusion(heads, combine="prob_mean")(f, present)
        p = {m: o.softmax(-1) for m, o in outs.items()}
        torch.testing.assert_close(pm[1], ((p["image"][1] + p["text"][1]) / 2).log())
        torch.testing.assert_close(pm.exp().sum(-1), torch.ones(B))
        # garbage in an absent slot is ignored; scalar-output heads work too
        g = {**f, "audio": torch.where(present["audio"][:, None], f["audio"], torch.randn(B, D) * 9)}
        torch.testing.assert_close(late(g, present), out)
        reg = LateFusion({m: nn.Sequential(nn.Linear(D, 1), nn.Flatten(0)) for m in MODS})
        assert reg(f, present).shape == (B,)
    with pytest.raises(ValueError, match="combine"):
        LateFusion(heads, combine="max")


def test_early_fusion_encoder():
    torch.manual_seed(0)
    enc = EarlyFusionEncoder(out_dim=5, dim=16, depth=1, heads=2, image_size=16, patch_size=8, vocab_size=50,
                             context_length=12).eval()
    images = torch.randn(4, 3, 16, 16)
    text = torch.tensor([[5, 6, 7, 0, 0, 0], [8, 9, 0, 0, 0, 0], [3, 4, 5, 6, 7, 8], [1, 2, 0, 0, 0, 0]])
    present = {"image": torch.tensor([True, False, True, True]), "text": torch.tensor([True, True, False, True])}
    with torch.no_grad():
        out = enc({"image": images, "text": text}, present)
        assert out.shape == (4, 5) and torch.isfinite(out).all()
        # garbage pixels / ids (even out-of-vocabulary ones) in absent rows are ignored
        g_img = torch.where(present["image"][:, None, None, None], images, torch.randn_like(images) * 3)
        g_txt = torch.where(present["text"][:, None], text, torch.randint(1, 10_000, text.shape))
        torch.testing.assert_close(enc({"image": g_img, "text": g_txt}, present), out)
        # pad tokens (id 0) are masked: more padding changes nothing
        padded = torch.cat([text, torch.zeros(4, 5, dtype=torch.long)], 1)
        torch.testing.assert_close(enc({"image": images, "text": padded}, present), out, rtol=1e-5, atol=1e-5)
        # image-only / text-only batches equal the same rows in the mixed batch
        torch.testing.assert_close(enc({"text": text[[1]]}), out[[1]], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(enc({"image": images[[2]]}), out[[2]], rtol=1e-5, atol=1e-5)
        # the text does matter when present
        other = text.clone()
        other[0, 0] = 9
        assert not torch.allclose(enc({"image": images, "text": other}, present)[0], out[0])
    with pytest.raises(ValueError, match="at least one"):
        enc({"image": images, "text": text}, {"image": torch.zeros(4, dtype=torch.bool),
                                               "text": torch.tensor([True, True, False, True])})
    # trains: gradients reach both embeddings
    out = enc.train()({"image": images, "text": text}, present)
    out.sum().backward()
    assert enc.patch_embed.weight.grad.abs().sum() > 0 and enc.token_embed.weight.grad.abs().sum() > 0


def test_build_fusion_names_and_out_dims():
    dims = {"concat": 3 * D, "sum": D, "product": D, "gated": D, "attention": D}
    for name, out_dim in dims.items():
        mod = build_fusion(name, MODS, D)
        assert mod.out_dim == out_dim
        assert mod(_feats()).shape == (B, out_dim)
    with pytest.raises(ValueError, match="unknown fusion"):
        build_fusion("bilinear", MODS, D)
    assert isinstance(build_fusion("gated", MODS, D), GatedFusion)
