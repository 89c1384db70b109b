"""Multi-task loss weighting: static sums, Kendall et al.'s closed-form optimum, PCGrad and GradNorm by hand."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from xmodal.losses.multitask import (GradNormWeighting, StaticWeighting, UncertaintyWeighting, gradnorm_backward,
                                     pcgrad, pcgrad_backward)


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


# ------------------------------------------------------------------------------------------------ GradNorm

def _gradnorm_problem():
    """Shared θ = (1, 1) and one scalar head per task (1 each): L_a = h_a (3θ₀ + 4θ₁) = 7, ∇_θ L_a = (3, 4), norm 5;
    L_b = h_b θ₀ = 1, ∇_θ L_b = (1, 0), norm 1."""
    theta = nn.Parameter(torch.tensor([1.0, 1.0]))
    h_a, h_b = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(1.0))
    return theta, h_a, h_b, _gradnorm_losses(theta, h_a, h_b)


def _gradnorm_losses(theta, h_a, h_b):
    return {"a": h_a * (3 * theta[0] + 4 * theta[1]), "b": h_b * theta[0]}


@pytest.mark.parametrize("alpha", [1.5, 0.0])
def test_gradnorm_one_update_by_hand(alpha):
    theta, h_a, h_b, losses = _gradnorm_problem()
    gn = GradNormWeighting(["a", "b"], alpha=alpha)
    with torch.no_grad():
        gn.task_weights.copy_(torch.tensor([0.5, 1.5]))
        gn.initial_losses.copy_(torch.tensor([14.0, 4.0]))  # L(0), as if recorded at an earlier step
    total = gradnorm_backward(gn, losses, [theta, h_a, h_b], shared=[theta])
    assert total.item() == pytest.approx(8.0)  # the plain sum, for logging
    # the network's gradient is Σ w_i ∇L_i: θ: 0.5·(3, 4) + 1.5·(1, 0) = (3, 2); h_a: 0.5·7; h_b: 1.5·1
    torch.testing.assert_close(theta.grad, torch.tensor([3.0, 2.0]))
    assert h_a.grad.item() == pytest.approx(3.5) and h_b.grad.item() == pytest.approx(1.5)
    # G = w·(5, 1) = (2.5, 1.5), mean 2; L̃ = (7/14, 1/4) = (0.5, 0.25), mean 0.375 → r = (4/3, 2/3)
    g_a, g_b = 0.5 * 5, 1.5 * 1
    r_a, r_b = 0.5 / 0.375, 0.25 / 0.375
    target_a, target_b = (g_a + g_b) / 2 * r_a ** alpha, (g_a + g_b) / 2 * r_b ** alpha
    # α = 1.5: targets (3.079, 1.089) → G_a below, G_b above: ∂L_grad/∂w = (-5, +1); α = 0: targets (2, 2) → (+5, -1)
    sign = lambda x: (x > 0) - (x < 0)  # noqa: E731
    expected_grad = [sign(g_a - target_a) * 5.0, sign(g_b - target_b) * 1.0]
    assert expected_grad == ([-5.0, 1.0] if alpha else [5.0, -1.0])
    torch.testing.assert_close(gn.task_weights.grad, torch.tensor(expected_grad))
    # one SGD step (lr 0.01) and the renormalisation to Σ w = 2
    torch.optim.SGD([gn.task_weights], lr=0.01).step()
    gn.renormalise()
    stepped = [0.5 - 0.01 * expected_grad[0], 1.5 - 0.01 * expected_grad[1]]
    expected = [2 * w / sum(stepped) for w in stepped]
    torch.testing.assert_close(gn.task_weights.detach(), torch.tensor(expected))
    assert gn.weights() == pytest.approx(dict(zip("ab", expected)))
    # L(0) was already recorded: kept
    torch.testing.assert_close(gn.initial_losses, torch.tensor([14.0, 4.0]))


def test_gradnorm_records_the_first_losses_and_scales_like_backward():
    theta, h_a, h_b, losses = _gradnorm_problem()
    gn = GradNormWeighting(["a", "b"])
    assert torch.isnan(gn.initial_losses).all()  # nothing recorded yet
    l_grad = gn.weight_grad({"a": torch.tensor(7.0), "b": torch.tensor(math.nan)},
                            {"a": torch.tensor(5.0), "b": torch.tensor(1.0)})
    assert gn.initial_losses[0].item() == 7.0 and math.isnan(gn.initial_losses[1].item())  # a NaN is not L(0)
    assert not math.isfinite(l_grad.item())  # (such a step is skipped by the engine)
    gn.task_weights.grad = None
    # first finite loss of b: L(0) = (7, 1); r = (1, 1), w = 1: G = (5, 1), targets 3 → ∂/∂w = (5, -1), L_grad = 4
    total = gradnorm_backward(gn, losses, [theta, h_a, h_b], shared=[theta])
    assert total.item() == pytest.approx(8.0)  # the sum of the losses (7 + 1)
    torch.testing.assert_close(gn.initial_losses, torch.tensor([7.0, 1.0]))
    torch.testing.assert_close(gn.task_weights.grad, torch.tensor([5.0, -1.0]))
    # with a loss scale s (fp16), every gradient, the weights' included, is s times larger: unscaling restores them
    grads = [p.grad.clone() for p in (theta, h_a, h_b, gn.task_weights)]
    for p in (theta, h_a, h_b, gn.task_weights):
        p.grad = None
    gradnorm_backward(gn, _gradnorm_losses(theta, h_a, h_b), [theta, h_a, h_b], shared=[theta], scale=8.0)
    for p, g in zip((theta, h_a, h_b, gn.task_weights), grads):
        torch.testing.assert_close(p.grad / 8.0, g)
    with pytest.raises(KeyError):  # every task, every step
        gn({"a": torch.tensor(1.0)})


def test_gradnorm_renormalise_keeps_sum_and_positivity():
    gn = GradNormWeighting(["a", "b", "c"])
    with torch.no_grad():
        gn.task_weights.copy_(torch.tensor([3.0, -0.5, 0.2]))
    gn.renormalise()
    w = gn.task_weights.detach()
    clamped = [3.0, GradNormWeighting.min_weight, 0.2]  # the negative one is clamped before the rescale
    torch.testing.assert_close(w, torch.tensor([3 * v / sum(clamped) for v in clamped]))
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD([gn.task_weights], lr=0.5)
    for _ in range(100):  # large random steps: the sum stays T = 3 and every weight positive
        losses = {t: torch.rand((), generator=gen) + 0.01 for t in "abc"}
        norms = {t: torch.rand((), generator=gen) * 10 for t in "abc"}
        opt.zero_grad()
        gn.weight_grad(losses, norms)
        opt.step()
        gn.renormalise()
        assert gn.task_weights.sum().item() == pytest.approx(3.0, rel=1e-5)
        assert (gn.task_weights > 0).all()


def _run_gradnorm(alpha: float, losses: dict, norms: dict, steps: int = 400, lr: float = 2e-3) -> GradNormWeighting:
    gn = GradNormWeighting(list(losses), alpha=alpha)
    with torch.no_grad():
        gn.initial_losses.fill_(1.0)  # L(0) = 1: L̃ = L
    opt = torch.optim.SGD([gn.task_weights], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        gn.weight_grad({t: torch.tensor(v) for t, v in losses.items()}, {t: torch.tensor(v) for t, v in norms.items()})
        opt.step()
        gn.renormalise()
    return gn


def test_gradnorm_raises_the_weight_of_the_slower_task():
    # equal gradient norms; a has kept 90% of its initial loss, b only 30%: r = (1.5, 0.5)
    losses, norms = {"a": 0.9, "b": 0.3}, {"a": 2.0, "b": 2.0}
    w = {alpha: _run_gradnorm(alpha, losses, norms).weights() for alpha in (0.5, 1.0, 1.5)}
    for alpha, wa in w.items():
        assert wa["a"] > 1.2 and wa["b"] < 0.8, (alpha, wa)
    # α = 1: the balance G_i = mean G · r_i is reachable, at w ∝ r / ||∇L||: (1.5, 0.5)
    assert w[1.0]["a"] == pytest.approx(1.5, abs=0.01) and w[1.0]["b"] == pytest.approx(0.5, abs=0.01)
    # a stronger α pushes further towards the slower task
    assert w[0.5]["a"] < w[1.0]["a"] < w[1.5]["a"]


def test_gradnorm_alpha_zero_equalises_gradient_norms():
    # ||∇L|| = (1, 4, 2); the losses do not matter at α = 0; equal G_i = w_i ||∇L_i|| at w ∝ (1, 1/4, 1/2)
    norms = {"a": 1.0, "b": 4.0, "c": 2.0}
    gn = _run_gradnorm(0.0, {"a": 0.9, "b": 0.1, "c": 2.0}, norms)
    g = [w * norms[t] for t, w in gn.weights().items()]
    assert max(g) / min(g) == pytest.approx(1.0, abs=0.02)
    inv = [1.0, 0.25, 0.5]
    torch.testing.assert_close(gn.task_weights.detach(), torch.tensor([3 * v / sum(inv) for v in inv]),
                               atol=0.01, rtol=0)


def test_gradnorm_config_validation():
    from xmodal.config import ConfigError, config_from_dict

    base = {"tasks": {"t": {"kind": "classification"}}}
    cfg = config_from_dict({**base, "multitask": {"weighting": "gradnorm", "tasks_per_step": "all"}})
    assert cfg.multitask.gradnorm_alpha == 1.5  # the paper's
    assert config_from_dict({**base, "multitask": {"weighting": "gradnorm", "tasks_per_step": "all",
                                                   "gradnorm_alpha": 0}}).multitask.gradnorm_alpha == 0.0
    with pytest.raises(ConfigError, match="gradnorm needs multitask.tasks_per_step: all"):
        config_from_dict({**base, "multitask": {"weighting": "gradnorm"}})  # tasks_per_step defaults to one
    with pytest.raises(ConfigError, match="multitask.gradnorm_alpha: must be >= 0"):
        config_from_dict({**base, "multitask": {"weighting": "gradnorm", "tasks_per_step": "all",
                                                "gradnorm_alpha": -0.5}})
    with pytest.raises(ConfigError, match="multitask.gradnorm_alpha"):
        config_from_dict({**base, "multitask": {"gradnorm_alpha": "strong"}})
    with pytest.raises(ConfigError, match="multitask.weighting"):
        config_from_dict({**base, "multitask": {"weighting": "grad_norm", "tasks_per_step": "all"}})


def test_engine_pcgrad_applies_the_fp16_loss_scale():
    """Under fp16 Accelerate's GradScaler divides every .grad by its scale before the step, so gradient surgery must
    start from the scaled losses as ``accelerator.backward`` would: the written gradients are exactly ``scale``× the
    unscaled PCGrad result (surgery is linear in a common factor)."""
    from types import SimpleNamespace

    from xmodal.training.step import backward_pcgrad as _pcgrad

    def grads_with(scaler):
        torch.manual_seed(0)
        shared, head = nn.Linear(3, 2), nn.Linear(2, 1)
        model = nn.ModuleDict({"shared": shared, "head": head})
        h = shared(torch.randn(4, 3))
        losses = {"a": head(h).pow(2).mean(), "b": -h.sum()}
        _pcgrad(SimpleNamespace(scaler=scaler, num_processes=1), model, losses, seed=1)
        return [p.grad.clone() for p in model.parameters()]

    plain = grads_with(None)
    scaled = grads_with(SimpleNamespace(get_scale=lambda: 8.0))
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(b, 8.0 * a)
