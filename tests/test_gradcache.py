"""gradcache_step: same loss and parameter gradients as one forward/backward over the whole batch."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xmodal.training.gradcache as gradcache_mod
from xmodal.training.gradcache import gradcache_step
from xmodal.losses import ClipLoss, SigLipLoss

ATOL = 1e-5
BATCH, MICRO = 32, 4


class TwoTowers(nn.Module):
    """Two MLP towers with dropout, L2-normalised outputs, learnable log scale and bias."""

    def __init__(self, dropout: float = 0.3):
        super().__init__()
        torch.manual_seed(0)
        self.towers = nn.ModuleDict({
            "image": nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, 16)),
            "text": nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Dropout(dropout), nn.Linear(32, 16)),
        })
        self.logit_scale = nn.Parameter(torch.tensor(2.3))
        self.logit_bias = nn.Parameter(torch.tensor(-5.0))

    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: F.normalize(self.towers[k](x), dim=-1) for k, x in batch.items()}


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"image": torch.randn(BATCH, 12, generator=g), "text": torch.randn(BATCH, 10, generator=g)}


def _split(batch, parts):
    return [{k: v.chunk(parts)[i] for k, v in batch.items()} for i in range(parts)]


def _loss_fn(model, kind):
    if kind == "clip":
        loss = ClipLoss()
        return lambda f: loss(f["image"], f["text"], model.logit_scale.exp())
    loss = SigLipLoss()
    return lambda f: loss(f["image"], f["text"], model.logit_scale.exp(), model.logit_bias)


def _grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _reference(model, kind, micro_batches, seed=123, scale=1.0):
    """Plain step: forward each micro-batch in order (the same RNG draws as gradcache's first pass), one loss over the
    concatenated features, one backward. Returns loss, grads, RNG state after."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    feats = [model.encode(mb) for mb in micro_batches]
    rng_after = torch.get_rng_state()
    full = {k: torch.cat([f[k] for f in feats]) for k in feats[0]}
    loss = _loss_fn(model, kind)(full)
    (scale * loss).backward()
    return loss.detach(), _grads(model), rng_after


def _gradcache(model, kind, micro_batches, seed=123, **kw):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = gradcache_step(model.encode, micro_batches, _loss_fn(model, kind), **kw)
    return loss, _grads(model), torch.get_rng_state()


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_matches_plain_step_with_dropout(kind):
    model = TwoTowers(dropout=0.3).train()
    micro = _split(_batch(), MICRO)
    ref_loss, ref_grads, ref_rng = _reference(model, kind, micro)
    loss, grads, rng = _gradcache(model, kind, micro)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=0)
    _assert_same(grads, ref_grads)
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert torch.equal(rng, ref_rng), "the RNG state after the step must be that of a plain forward pass"


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_without_rng_replay_gradients_differ(kind, monkeypatch):
    # Negative control: dropout is active, so skipping the RNG replay in the re-encoding gives wrong gradients.
    model = TwoTowers(dropout=0.3).train()
    micro = _split(_batch(), MICRO)
    _, ref_grads, _ = _reference(model, kind, micro)
    monkeypatch.setattr(gradcache_mod._RngState, "restore", lambda self: None)
    _, grads, _ = _gradcache(model, kind, micro)
    assert max((grads[n] - ref_grads[n]).abs().max().item() for n in grads if n.startswith("towers")) > 1e-3


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_matches_single_full_batch_forward_without_dropout(kind):
    # Deterministic towers: the reference is literally one forward of all 32 examples.
    model = TwoTowers(dropout=0.0)
    batch = _batch()
    model.zero_grad(set_to_none=True)
    ref_loss = _loss_fn(model, kind)(model.encode(batch))
    ref_loss.backward()
    ref_grads = _grads(model)
    loss, grads, _ = _gradcache(model, kind, _split(batch, MICRO))
    torch.testing.assert_close(loss, ref_loss.detach(), atol=ATOL, rtol=0)
    _assert_same(grads, ref_grads)


def test_one_micro_batch():
    model = TwoTowers(dropout=0.3).train()
    micro = _split(_batch(), 1)
    ref_loss, ref_grads, ref_rng = _reference(model, "clip", micro)
    loss, grads, rng = _gradcache(model, "clip", micro)
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=0)
    _assert_same(grads, ref_grads)
    assert torch.equal(rng, ref_rng)


def test_scaled_backward_applied_once():
    # An engine's backward may scale the loss (fp16 loss scaling, 1/accumulation): every gradient, encoder and
    # logit_scale alike, must carry that scale exactly once.
    model = TwoTowers(dropout=0.3).train()
    micro = _split(_batch(), MICRO)
    _, ref_grads, _ = _reference(model, "siglip", micro, scale=64.0)
    _, grads, _ = _gradcache(model, "siglip", micro, backward=lambda t: (64.0 * t).backward())
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=64 * ATOL, rtol=0)


def test_no_sync_wraps_all_but_last_chunk():
    model = TwoTowers(dropout=0.3).train()
    calls = []
    backward_in_sync = []
    depth = [0]

    @contextlib.contextmanager
    def no_sync():
        calls.append(1)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    def backward(t):
        backward_in_sync.append(depth[0] > 0)
        t.backward()

    _gradcache(model, "clip", _split(_batch(), MICRO), backward=backward, no_sync=no_sync)
    assert len(calls) == MICRO - 1
    # loss backward (outside), then chunks 0..2 inside no_sync, the last chunk outside (DDP all-reduces there)
    assert backward_in_sync == [False, True, True, True, False]


def test_mismatched_micro_batches_rejected():
    model = TwoTowers()
    micro = _split(_batch(), 2)
    micro[1] = {"image": micro[1]["image"]}
    with pytest.raises(ValueError, match="micro-batch 1"):
        gradcache_step(model.encode, micro, _loss_fn(model, "clip"))
    with pytest.raises(ValueError, match="no micro-batches"):
        gradcache_step(model.encode, [], _loss_fn(model, "clip"))
