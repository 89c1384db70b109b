"""Combining the losses of several tasks: static weights, homoscedastic-uncertainty weights, PCGrad.

Weightings take ``{task: scalar loss}`` for the tasks in this step (a task-sampled step may hold just one) and return
the scalar to back-propagate. PCGrad works on gradients instead: :func:`pcgrad_backward` replaces ``loss.backward()``.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn


class StaticWeighting(nn.Module):
    """``Σ_i w_i · L_i`` over the tasks present, with fixed ``weights`` (every task must have one)."""

    def __init__(self, weights: dict[str, float]):
        super().__init__()
        self.weights = dict(weights)

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        unknown = [t for t in losses if t not in self.weights]
        if unknown:
            raise KeyError(f"StaticWeighting: no weight for tasks {unknown} (weights: {sorted(self.weights)})")
        return sum(self.weights[t] * loss for t, loss in losses.items())


class UncertaintyWeighting(nn.Module):
    """Homoscedastic-uncertainty weighting, Kendall, Gal & Cipolla 2018, "Multi-Task Learning Using Uncertainty to
    Weigh Losses for Scene Geometry and Semantics", https://arxiv.org/abs/1705.07115.

    One learnable ``s_i = log σ_i²`` per task (init 0, i.e. weight 1), and

        total = Σ_i  exp(-s_i) · L_i + s_i

    The paper's objective is ``L/(2σ²) + log σ`` for a Gaussian (regression) task and ``L/σ² + log σ`` for a softmax
    (classification) task. With ``s = log σ²`` those are ``½(exp(-s) L + s)`` and ``exp(-s) L + ½ s``; this module
    uses the common single form ``exp(-s) L + s`` for every task (= twice the regression term; for classification it
    differs only in the regulariser's factor), which optimises ``s`` to ``log L`` on a fixed loss
    (``∂/∂s = 1 - exp(-s) L = 0``), i.e. each task's weighted loss tends to 1.

    The ``s_i`` must be in the optimiser, without weight decay (decay would pull every weight towards 1).
    """

    def __init__(self, tasks: Iterable[str], init: float = 0.0):
        super().__init__()
        self.tasks = list(tasks)
        self.index = {t: i for i, t in enumerate(self.tasks)}
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init)))

    def weights(self) -> dict[str, float]:
        """Current ``exp(-s_i)`` per task (for logging)."""
        return {t: float(w) for t, w in zip(self.tasks, torch.exp(-self.log_vars.detach()))}

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        unknown = [t for t in losses if t not in self.index]
        if unknown:
            raise KeyError(f"UncertaintyWeighting: unknown tasks {unknown} (tasks: {self.tasks})")
        total = 0.0
        for t, loss in losses.items():
            s = self.log_vars[self.index[t]]
            total = total + torch.exp(-s) * loss + s
        return total


def pcgrad(grads: list[list[Tensor | None]], generator: torch.Generator | None = None) -> list[Tensor | None]:
    """Gradient surgery (PCGrad), Yu et al. 2020, "Gradient Surgery for Multi-Task Learning",
    https://arxiv.org/abs/2001.06782, Algorithm 1.

    ``grads[i][k]`` is task i's gradient for parameter k (``None`` = the task does not touch it, taken as zero). Each
    task's gradient ``g_i`` is treated as one vector over all parameters; for the other tasks j in a random order
    (drawn from ``generator``), whenever ``g_i^PC · g_j < 0`` the conflicting component is removed,
    ``g_i^PC -= (g_i^PC · g_j) / ||g_j||² · g_j`` (projecting against the ORIGINAL ``g_j``, as the paper does). Returns
    ``Σ_i g_i^PC`` per parameter (``None`` where no task has a gradient).
    """
    if not grads:
        raise ValueError("pcgrad: no task gradients")
    n_params = len(grads[0])
    if any(len(g) != n_params for g in grads):
        raise ValueError("pcgrad: every task must give one gradient (or None) per parameter")
    like = [next((g[k] for g in grads if g[k] is not None), None) for k in range(n_params)]
    used = [k for k in range(n_params) if like[k] is not None]
    if not used:
        return [None] * n_params
    flat = torch.stack([torch.cat([(g[k] if g[k] is not None else torch.zeros_like(like[k])).reshape(-1).double()
                                   for k in used]) for g in grads])  # [T, P]; float64 for the projections
    n_tasks = len(grads)
    sq_norms = (flat * flat).sum(1)
    out = flat.clone()
    for i in range(n_tasks):
        g = out[i]
        for j in torch.randperm(n_tasks, generator=generator).tolist():
            if j == i or sq_norms[j] == 0:
                continue
            dot = g @ flat[j]
            if dot < 0:
                g = g - dot / sq_norms[j] * flat[j]
        out[i] = g
    total = out.sum(0)
    result: list[Tensor | None] = [None] * n_params
    offset = 0
    for k in used:
        n = like[k].numel()
        result[k] = total[offset:offset + n].view_as(like[k]).to(like[k].dtype)
        offset += n
    return result


def pcgrad_backward(losses: dict[str, Tensor], params: Iterable[nn.Parameter],
                    generator: torch.Generator | None = None) -> Tensor:
    """Replace ``sum(losses).backward()`` by PCGrad: one ``torch.autograd.grad`` per task (graph retained), the
    combined gradient :func:`pcgrad` ADDED to ``p.grad`` (accumulating, as ``backward`` does). → the detached sum of
    the losses (for logging).

    ``torch.autograd.grad`` bypasses DDP's gradient all-reduce: with several processes, all-reduce (average) each
    task's gradients before the surgery, or the ranks' projections diverge.
    """
    params = [p for p in params if p.requires_grad]
    names = list(losses)
    per_task = []
    for i, t in enumerate(names):
        per_task.append(list(torch.autograd.grad(losses[t], params, retain_graph=i < len(names) - 1,
                                                 allow_unused=True)))
    for p, g in zip(params, pcgrad(per_task, generator)):
        if g is None:
            continue
        p.grad = g.clone() if p.grad is None else p.grad + g
    return sum(loss.detach() for loss in losses.values())
