"""ClipLoss / SigLipLoss: values and gradients against open_clip (the peer), a hand-computed case, and gradcheck."""
from __future__ import annotations

import math

import open_clip.loss as oc_loss
import pytest
import torch
import torch.nn.functional as F

from xmodal.losses import ClipLoss, SigLipLoss, build_loss, gather_features, pairwise_loss
from xmodal.losses.distributed import dist_info

ATOL = 1e-5


def _inputs(n: int, d: int = 24, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(n, d, generator=g, dtype=dtype), dim=-1)  # correlated, like training
    scale = torch.tensor(1 / 0.07, dtype=dtype)
    bias = torch.tensor(-10.0, dtype=dtype)
    return img, txt, scale, bias


def _value_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("n", [1, 2, 7, 32, 128])
@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_matches_open_clip(n, local_loss):
    img, txt, scale, _ = _inputs(n, seed=n)
    ours = ClipLoss(local_loss=local_loss)
    peer = oc_loss.ClipLoss(local_loss=local_loss)
    v1, g1 = _value_and_grads(ours, img, txt, scale)
    v2, g2 = _value_and_grads(peer, img, txt, scale)
    torch.testing.assert_close(v1, v2, atol=ATOL, rtol=0)
    for a, b in zip(g1, g2):  # d/d image_features, d/d text_features, d/d logit_scale
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 7, 32, 128])
@pytest.mark.parametrize("init", [(10.0, -10.0), (1.0, 0.0), (30.0, 2.0)])
def test_siglip_matches_open_clip(n, init):
    img, txt, _, _ = _inputs(n, seed=100 + n)
    scale, bias = torch.tensor(init[0]), torch.tensor(init[1])
    v1, g1 = _value_and_grads(SigLipLoss(), img, txt, scale, bias)
    v2, g2 = _value_and_grads(oc_loss.SigLipLoss(), img, txt, scale, bias)
    torch.testing.assert_close(v1, v2, atol=ATOL, rtol=0)
    for a, b in zip(g1, g2):  # image, text, logit_scale, logit_bias
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# Hand-computed 2x2: images e1, e2; texts e1, (0.6, 0.8); scale 2 → logits [[2, 1.2], [0, 1.6]].
_IMG = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
_TXT = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_clip_hand_computed():
    # Row i (image→text) CE = log(1 + exp(other - own)); columns likewise (text→image).
    rows = _softplus(1.2 - 2.0) + _softplus(0.0 - 1.6)
    cols = _softplus(0.0 - 2.0) + _softplus(1.2 - 1.6)
    expected = (rows / 2 + cols / 2) / 2
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    loss = ClipLoss()(_IMG, _TXT, scale)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # d/ds: each CE term softplus(s*(a - b)) contributes sigmoid(s*(a - b)) * (a - b).
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    diffs = [1.2 / 2 - 1.0, 0.0 - 1.6 / 2, 0.0 - 1.0, 1.2 / 2 - 1.6 / 2]  # (other - own) similarities
    expected_grad = sum(sig(2.0 * d) * d for d in diffs) / 4
    loss.backward()
    assert scale.grad.item() == pytest.approx(expected_grad, abs=1e-12)


def test_siglip_hand_computed():
    # scale 2, bias -1 → logits [[1, 0.2], [-1, 0.6]]; labels +1 on the diagonal, -1 off it; divide by n = 2.
    expected = (_softplus(-1.0) + _softplus(0.2) + _softplus(-1.0) + _softplus(-0.6)) / 2
    scale = torch.tensor(2.0, dtype=torch.float64)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    loss = SigLipLoss()(_IMG, _TXT, scale, bias)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    # d/db of softplus(-z * l) is -z * sigmoid(-z * l).
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected_grad = (-sig(-1.0) + sig(0.2) + sig(-1.0) - sig(-0.6)) / 2
    loss.backward()
    assert bias.grad.item() == pytest.approx(expected_grad, abs=1e-12)


@pytest.mark.parametrize("loss", [ClipLoss(), SigLipLoss()], ids=["clip", "siglip"])
def test_gradcheck_float64(loss):
    # Gradients against finite differences, independent of any peer implementation.
    img, txt, _, _ = _inputs(5, d=6, seed=3, dtype=torch.float64)
    scale = torch.tensor(3.0, dtype=torch.float64)
    bias = torch.tensor(-2.0, dtype=torch.float64)
    args = [t.clone().requires_grad_(True) for t in (img, txt, scale, bias)]
    assert torch.autograd.gradcheck(lambda *a: loss(*a), args)


def test_clip_bias_does_not_change_value():
    img, txt, scale, _ = _inputs(9, seed=1)
    torch.testing.assert_close(ClipLoss()(img, txt, scale, torch.tensor(-7.0)), ClipLoss()(img, txt, scale))


def test_output_dict_and_label_cache_across_batch_sizes():
    loss = ClipLoss(cache_labels=True)
    for n in (8, 8, 5, 8):  # the epoch's short tail batch must not reuse the cached labels
        img, txt, scale, bias = _inputs(n, seed=n)
        out = loss(img, txt, scale, output_dict=True)
        torch.testing.assert_close(out["contrastive_loss"], oc_loss.ClipLoss()(img, txt, scale))
        out = SigLipLoss()(img, txt, scale, bias, output_dict=True)
        torch.testing.assert_close(out["contrastive_loss"], oc_loss.SigLipLoss()(img, txt, scale, bias))


def test_perfect_alignment_gives_small_clip_loss():
    img = torch.eye(16)
    assert ClipLoss()(img, img, torch.tensor(100.0)).item() < 1e-6
    assert ClipLoss()(img, img.roll(1, 0), torch.tensor(100.0)).item() > 50  # every pair mismatched


def test_single_process_helpers():
    assert dist_info() == (0, 1)
    x = torch.randn(3, 4)
    assert gather_features(x, local_loss=False, gather_with_grad=True, rank=0, world_size=1) is x


def test_build_loss():
    clip = build_loss("clip", local_loss=True, gather_with_grad=False)
    assert isinstance(clip, ClipLoss) and clip.local_loss and not clip.gather_with_grad
    assert isinstance(build_loss("siglip", local_loss=False, gather_with_grad=True), SigLipLoss)
    with pytest.raises(ValueError, match="unknown loss 'triplet'"):
        build_loss("triplet", local_loss=False, gather_with_grad=True)


def test_pairwise_loss():
    img, txt, scale, bias = _inputs(6, seed=4)
    audio = F.normalize(torch.randn(6, img.shape[1]), dim=-1)
    clip = ClipLoss()
    torch.testing.assert_close(pairwise_loss(clip, {"image": img, "text": txt}, scale), clip(img, txt, scale))
    three = pairwise_loss(clip, {"image": img, "text": txt, "audio": audio}, scale)
    expected = (clip(img, txt, scale) + clip(img, audio, scale) + clip(txt, audio, scale)) / 3
    torch.testing.assert_close(three, expected)
    sig = SigLipLoss()
    torch.testing.assert_close(pairwise_loss(sig, {"image": img, "text": txt}, scale, bias), sig(img, txt, scale, bias))
    with pytest.raises(ValueError, match="at least two"):
        pairwise_loss(clip, {"image": img}, scale)
