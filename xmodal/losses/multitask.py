"""Combining the losses of several tasks: static weights, homoscedastic-uncertainty weights, PCGrad, GradNorm.

Weightings take ``{task: scalar loss}`` for the tasks in this step (a task-sampled step may hold just one) and return
the scalar to back-propagate. PCGrad works on gradients instead: :func:`pcgrad_backward` replaces ``loss.backward()``;
so does GradNorm (:func:`gradnorm_backward`), which needs each task's gradient norm to update its weights.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

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
                    generator: torch.Generator | None = None, mean: Callable[[Tensor], Tensor] | None = None,
                    scale: float = 1.0) -> Tensor:
    """Replace ``sum(losses).backward()`` by PCGrad: one ``torch.autograd.grad`` per task (graph retained), the
    combined gradient :func:`pcgrad` ADDED to ``p.grad`` (accumulating, as ``backward`` does). → the detached sum of
    the losses (for logging).

    ``mean``: with several processes, averages a gradient across them. ``torch.autograd.grad`` bypasses DDP's gradient
    all-reduce, so each task's gradients are averaged before the surgery, or the ranks' projections diverge.
    ``scale``: the fp16 loss scale (1 without a scaler), applied as ``accelerator.backward`` would; the surgery is
    linear in a common factor, and the gradient scaler unscales every ``.grad`` before the step.
    """
    params = [p for p in params if p.requires_grad]
    names = list(losses)
    per_task = []
    for i, t in enumerate(names):
        grads = torch.autograd.grad(losses[t] * scale, params, retain_graph=i < len(names) - 1, allow_unused=True)
        per_task.append([mean(g) if mean is not None and g is not None else g for g in grads])
    for p, g in zip(params, pcgrad(per_task, generator)):
        if g is None:
            continue
        p.grad = g.clone() if p.grad is None else p.grad + g
    return sum(loss.detach() for loss in losses.values())


class GradNormWeighting(nn.Module):
    """GradNorm, Chen, Badrinarayanan, Lee & Rabinovich 2018, "GradNorm: Gradient Normalization for Adaptive Loss
    Balancing in Deep Multitask Networks", https://arxiv.org/abs/1711.02257, Algorithm 1.

    Learnable weights ``w_i`` (init 1); the network is trained on ``Σ_i w_i L_i`` as usual, and the weights on

        G_i = ||∇_W (w_i L_i)||₂ = w_i ||∇_W L_i||₂          (W: the shared parameters)
        L̃_i = L_i(t) / L_i(0),   r_i = L̃_i / mean_j L̃_j     (L_i(0): the task's first recorded loss)
        L_grad = Σ_i |G_i - mean_j G_j · r_i^α|               (the target is a constant: no gradient through it)

    differentiated w.r.t. the ``w_i`` only (``∂L_grad/∂w_i = sign(G_i - target_i) ||∇_W L_i||``). A task that has
    learnt less (higher ``r_i``) is given a larger gradient share; α sets how hard; α = 0 equalises the ``G_i``.
    After each update the weights are renormalised to ``Σ_i w_i = T`` (the number of tasks).

    Every step must hold every task's loss (``mean_j`` is over all tasks). The weights must be in the optimiser, without
    weight decay; their gradient comes from :meth:`weight_grad` only (:meth:`forward` detaches them), and
    :meth:`renormalise` must follow each optimiser step. ``L_i(0)`` is a buffer, so a checkpoint keeps it.
    """

    min_weight = 1e-3  # a weight a step pushed to (or below) 0 restarts here before the rescale: never switched off

    def __init__(self, tasks: Iterable[str], alpha: float = 1.5):
        super().__init__()
        self.tasks = list(tasks)
        self.index = {t: i for i, t in enumerate(self.tasks)}
        self.alpha = float(alpha)
        self.task_weights = nn.Parameter(torch.ones(len(self.tasks)))
        # NaN = not recorded yet (a first loss that is not finite is recorded at the task's next finite one)
        self.register_buffer("initial_losses", torch.full((len(self.tasks),), math.nan))

    def weights(self) -> dict[str, float]:
        """Current ``w_i`` per task (for logging)."""
        return {t: float(w) for t, w in zip(self.tasks, self.task_weights.detach())}

    def _check(self, losses: dict[str, Tensor]) -> None:
        if set(losses) != set(self.tasks):
            raise KeyError(f"GradNormWeighting: needs the losses of exactly its tasks {self.tasks} in every step, "
                           f"got {sorted(losses)}")

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        """``Σ_i w_i L_i`` with the weights detached: the network's loss (the weights learn from ``L_grad``)."""
        self._check(losses)
        w = self.task_weights.detach()
        return sum(w[self.index[t]] * loss for t, loss in losses.items())

    def weight_grad(self, losses: dict[str, Tensor], grad_norms: dict[str, Tensor]) -> Tensor:
        """Record ``L_i(0)`` where not yet recorded, ADD ``∂L_grad/∂w`` to the weights' ``.grad`` (accumulating, as
        ``backward`` does). ``grad_norms[t]`` = ``||∇_W L_t||₂`` of the UNWEIGHTED loss. → ``L_grad`` (detached)."""
        self._check(losses)
        self._check(grad_norms)
        w = self.task_weights
        loss = torch.stack([losses[t].detach().float() for t in self.tasks]).to(w.device)
        norm = torch.stack([torch.as_tensor(grad_norms[t]).detach().float() for t in self.tasks]).to(w.device)
        with torch.no_grad():
            first = torch.isnan(self.initial_losses) & torch.isfinite(loss)
            self.initial_losses.copy_(torch.where(first, loss, self.initial_losses))
        ratio = loss / self.initial_losses.clamp_min(torch.finfo(loss.dtype).tiny)  # L̃_i
        r = ratio / ratio.mean()
        g = w * norm  # G_i: ||∇_W (w_i L_i)|| = w_i ||∇_W L_i|| for w_i > 0
        target = (g.mean() * r ** self.alpha).detach()
        l_grad = (g - target).abs().sum()
        (grad,) = torch.autograd.grad(l_grad, w)
        w.grad = grad if w.grad is None else w.grad + grad
        return l_grad.detach()

    @torch.no_grad()
    def renormalise(self) -> None:
        """``w ← T · w / Σ w`` after clamping to ``min_weight``: positive, and the total loss scale stays that of
        ``T`` unit weights (the weights only shift the balance between tasks, not the learning rate)."""
        w = self.task_weights.clamp_(min=self.min_weight)
        w.mul_(len(self.tasks) / w.sum())


def gradnorm_backward(weighting: GradNormWeighting, losses: dict[str, Tensor], params: Iterable[nn.Parameter],
                      shared: Iterable[nn.Parameter], mean: Callable[[Tensor], Tensor] | None = None,
                      scale: float = 1.0) -> Tensor:
    """Replace ``weighting(losses).backward()`` by GradNorm's step: one ``torch.autograd.grad`` per task (graph
    retained) over ``params``; the network's gradient ``Σ_i w_i ∇L_i`` ADDED to ``p.grad``, and ``∂L_grad/∂w`` (from
    the norms of each task's gradient over the ``shared`` ones, the W of the paper) to the weights' ``.grad``. → the
    detached sum of the losses (for logging).

    ``mean``: with several processes, averages a tensor across them. ``torch.autograd.grad`` bypasses DDP's gradient
    all-reduce, so each task's gradients are averaged before the norms, and the losses before the ratios, or the ranks'
    weights diverge; a parameter unused on one process but used on another joins the average as zeros there (every
    rank must make the same collective calls). ``scale``: the fp16 loss scale (1 without a scaler), applied as
    ``accelerator.backward`` would; it multiplies every ``G_i``, target and so the weights' gradient alike, and the
    gradient scaler unscales those with the rest of the optimiser's parameters.
    """
    weighting._check(losses)
    params = [p for p in params if p.requires_grad]
    shared_ids = {id(p) for p in shared}
    is_shared = [id(p) in shared_ids for p in params]
    names = list(losses)
    w = weighting.task_weights.detach()
    total: list[Tensor | None] = [None] * len(params)
    norms = {}
    for i, t in enumerate(names):
        grads = list(torch.autograd.grad(losses[t] * scale, params, retain_graph=i < len(names) - 1,
                                         allow_unused=True))
        if mean is not None:
            used = mean(torch.tensor([float(g is not None) for g in grads], device=losses[t].device)) > 0
            grads = [mean(g if g is not None else torch.zeros_like(p)) if u else None
                     for p, g, u in zip(params, grads, used.tolist())]
        sq = [g.float().pow(2).sum() for g, s in zip(grads, is_shared) if g is not None and s]
        norms[t] = torch.stack(sq).sum().sqrt() if sq else torch.zeros((), device=losses[t].device)
        for k, g in enumerate(grads):
            if g is not None:
                g = g * w[weighting.index[t]].to(g.device, g.dtype)
                total[k] = g if total[k] is None else total[k] + g
    for p, g in zip(params, total):
        if g is not None:
            p.grad = g if p.grad is None else p.grad + g
    values = {t: loss.detach() for t, loss in losses.items()}
    weighting.weight_grad({t: mean(v) for t, v in values.items()} if mean is not None else values, norms)
    return sum(values.values())
