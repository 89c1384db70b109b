"""Multi-task loss weighting: static sums, Kendall et al.'s closed-form optimum, PCGrad on hand examples."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xmodal.losses.multitask import StaticWeighting, UncertaintyWeighting, pcgrad, pcgrad_backward


def test_static_weighting():
    w = StaticWeighting({"cls": 0.5, "ret": 2.0})
    assert w({"cls": torch.tensor(3.0), "ret": torch.tensor(0.25)}).item() == pytest.approx(2.0)
    assert w({"ret": torch.tensor(1.0)}).item() == pytest.approx(2.0)  # a task-sampled step: just its loss
    with pytest.raises(KeyError):
        w({"sent": torch.tensor(1.0)})


def test_uncertainty_weighting_value_and_closed_form():
    losses = {"a": torch.tensor(0.5), "b": torch.tensor(2.0), "c": torch.tensor(0.01)}
    uw = UncertaintyWeighting(losses)
    # init s = 0: plain sum
    assert uw(losses).item() == pytest.approx(2.51, rel=1e-6)
    # at s_i = log L_i the gradient is zero and the value is Σ (1 + log L_i)
    with torch.no_grad():
        uw.log_vars.copy_(torch.log(torch.stack(list(losses.values()))))
    total = uw(losses)
    total.backward()
    assert total.item() == pytest.approx(sum(1 + math.log(v.item()) for v in losses.values()), rel=1e-6)
    assert uw.log_vars.grad.abs().max().item() < 1e-6
    assert uw.weights()["b"] == pytest.approx(0.5)
    # a task absent from this step leaves its s untouched
    uw.zero_grad()
    uw({"a": torch.tensor(3.0)}).backward()
    assert uw.log_vars.grad[1] == 0 and uw.log_vars.grad[0] != 0


def test_uncertainty_weighting_converges_to_log_loss():
    losses = {"a": torch.tensor(0.5), "b": torch.tensor(4.0), "c": torch.tensor(0.01)}
    uw = UncertaintyWeighting(losses)
    opt = torch.optim.SGD(uw.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        uw(losses).backward()
        opt.step()
    expected = torch.log(torch.stack(list(losses.values())))
    torch.testing.assert_close(uw.log_vars.detach(), expected, rtol=0, atol=1e-4)
    with pytest.raises(KeyError):
        uw({"d": torch.tensor(1.0)})


def test_pcgrad_hand_example():
    # g1 = (1, 0), g2 = (-1, 1): g1·g2 = -1 < 0.
    # g1' = g1 - (-1/2) g2 = (0.5, 0.5); g2' = g2 - (-1/1) g1 = (0, 1); sum = (0.5, 1.5)
    g1, g2 = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])]
    out = pcgrad([g1, g2], torch.Generator().manual_seed(0))
    torch.testing.assert_close(out[0], torch.tensor([0.5, 1.5]))
    # gradients split over parameters, one of them used by task 2 only (None for task 1 = zeros)
    out = pcgrad([[torch.tensor([1.0]), torch.tensor([0.0]), None], [torch.tensor([-1.0]), torch.tensor([1.0]),
                                                                      torch.tensor([2.0])]])
    # now g1 = (1, 0, 0), g2 = (-1, 1, 2), g1·g2 = -1, ‖g2‖² = 6: g1' = g1 + g2/6 = (5/6, 1/6, 1/3),
    # g2' = g2 + g1 = (0, 1, 2) → sum = (5/6, 7/6, 7/3)
    torch.testing.assert_close(torch.cat(out), torch.tensor([5 / 6, 7 / 6, 7 / 3]))
    assert pcgrad([[None], [None]]) == [None]


def test_pcgrad_no_conflict_is_plain_sum():
    g = [[torch.tensor([1.0, 2.0])], [torch.tensor([0.5, 0.1])], [torch.tensor([3.0, 0.0])]]
    torch.testing.assert_close(pcgrad(g)[0], torch.tensor([4.5, 2.1]))


def test_pcgrad_two_tasks_never_conflicts_with_either():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        g1, g2 = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
        out = pcgrad([[g1[:2], g1[2:]], [g2[:2], g2[2:]]], gen)
        total = torch.cat(out)
        assert total @ g1 >= -1e-6 and total @ g2 >= -1e-6
        if g1 @ g2 >= 0:
            torch.testing.assert_close(total, g1 + g2)


def test_pcgrad_three_tasks_seeded():
    """With 3 tasks the order matters: a seeded generator gives one result, and it is one of the hand-enumerated
    outcomes of Algorithm 1 over all orders."""
    gs = [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]), torch.tensor([0.0, -1.0])]

    def project(i, order):
        g = gs[i].clone()
        for j in order:
            if j != i and g @ gs[j] < 0:
                g = g - (g @ gs[j]) / (gs[j] @ gs[j]) * gs[j]
        return g
    orders = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    a = pcgrad([[g] for g in gs], torch.Generator().manual_seed(3))[0]
    b = pcgrad([[g] for g in gs], torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(a, b)
    candidates = [project(0, o0) + project(1, o1) + project(2, o2) for o0 in orders for o1 in orders for o2 in orders]
    assert any(torch.allclose(a, c) for c in candidates)


def test_pcgrad_backward_writes_grads():
    torch.manual_seed(0)
    shared, head_a = nn.Linear(3, 2), nn.Linear(2, 1)
    x = torch.randn(4, 3)
    h = shared(x)
    losses = {"a": head_a(h).pow(2).mean(), "b": -h.sum()}  # b ignores head_a (allow_unused)
    params = list(shared.parameters()) + list(head_a.parameters())
    per_task = [list(torch.autograd.grad(losses[t], params, retain_graph=True, allow_unused=True)) for t in losses]
    expected = pcgrad(per_task, torch.Generator().manual_seed(1))
    total = pcgrad_backward(losses, params, torch.Generator().manual_seed(1))
    assert total.item() == pytest.approx(sum(v.item() for v in losses.values()))
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)
