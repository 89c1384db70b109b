"""Exact large-batch contrastive steps from micro-batches (GradCache).

Gao, Zhang, Han, Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup",
https://arxiv.org/abs/2101.06983.

A contrastive loss couples every pair in the batch, so it cannot be split into per-micro-batch losses: the average of
``k`` small-batch losses is a different, weaker objective (fewer negatives). But the loss only touches the encoders
through the features, and features are small. So:

1. encode every micro-batch without a graph (activation memory of one micro-batch at a time) and keep the features;
2. put all features through the loss once and backpropagate to them: ``g = dL/dfeatures`` (plus the gradient of
   whatever else the loss uses, e.g. ``logit_scale``);
3. re-encode each micro-batch with a graph and backpropagate ``sum(features * g)``, whose gradient w.r.t. the
   parameters is exactly that micro-batch's share of ``dL/dθ`` (chain rule); the shares add up in ``.grad``.

The re-encoding must reproduce step 1 exactly, so each micro-batch's RNG state (dropout, stochastic depth, in-model
augmentation) is saved before step 1 and restored before step 3. Layers with batch statistics in train mode
(BatchNorm) see each micro-batch twice: the features are still exact, but running statistics are updated twice.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import Tensor


class _RngState:
    """The torch CPU generator and (when CUDA is available) every CUDA device's generator."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def _default_backward(t: Tensor) -> None:
    t.backward()


def gradcache_step(encode: Callable[[dict[str, Tensor]], dict[str, Tensor]],
                   micro_batches: list[dict[str, Tensor]],
                   loss_fn: Callable[[dict[str, Tensor]], Tensor],
                   backward: Callable[[Tensor], None] = _default_backward,
                   no_sync: Callable[[], ContextManager] = contextlib.nullcontext) -> Tensor:
    """Accumulate into ``.grad`` the gradient of ``loss_fn`` over the union of ``micro_batches``; return the loss.

    ``encode(batch)`` maps ``{modality: inputs}`` to ``{modality: features [b, d]}``; ``loss_fn`` gets the features
    of all micro-batches concatenated in order (``{modality: [sum b, d]}``) and may close over parameters such as
    ``logit_scale``, which get their gradient from it. ``backward`` is the engine's (e.g. ``accelerator.backward``),
    ``no_sync`` its DDP context (``lambda: accelerator.no_sync(model)``): every re-encoding but the last runs in it,
    so DDP all-reduces once, after the last.

    The parameter gradients equal those of one forward/backward over the concatenated batch with the same
    randomness (up to float rounding), including under any *linear* ``backward`` (loss scaling, division by
    accumulation steps): every gradient goes through ``backward`` exactly once. On return the RNG state is the one
    that follows the ``len(micro_batches)`` forward passes, as in a plain step, so runs stay reproducible.
    """
    if not micro_batches:
        raise ValueError("gradcache_step: no micro-batches")

    # (1) Features of every micro-batch, no graph; remember the RNG state each forward started from.
    states: list[_RngState] = []
    cached: list[dict[str, Tensor]] = []
    with torch.no_grad():
        for batch in micro_batches:
            states.append(_RngState())
            cached.append({k: v.detach() for k, v in encode(batch).items()})
    after_forward = _RngState()
    keys = list(cached[0])
    for i, feats in enumerate(cached):
        if list(feats) != keys:
            raise ValueError(f"gradcache_step: micro-batch {i} encodes to {list(feats)}, micro-batch 0 to {keys}")

    # (2) One loss over the whole batch. The cached feature gradients are taken with autograd.grad, not read from
    # .grad after backward(loss): an engine's backward may scale the loss (fp16 loss scaling, 1/accumulation), and
    # the re-encoding backward in (3) applies that scale again, so the cache must hold the unscaled dL/dfeatures.
    # 0-dim outputs (``logit_scale`` returned by the model's forward, as DDP wants every parameter used there) are
    # the same for every micro-batch: one leaf, and their gradient goes back through the LAST re-encoding only.
    # Non-float outputs (presence masks) pass through to the loss as they are and take no gradient.
    shared = {k for k in keys if cached[0][k].ndim == 0}
    full = {k: cached[0][k].clone() if k in shared else torch.cat([feats[k] for feats in cached]) for k in keys}
    keys = [k for k in keys if full[k].is_floating_point()]
    for k in keys:
        full[k].requires_grad_(True)
    loss = loss_fn(full)
    grads = torch.autograd.grad(loss, [full[k] for k in keys], retain_graph=True, allow_unused=True)
    backward(loss)  # gradients of parameters the loss closes over (logit_scale, logit_bias)
    grads = {k: torch.zeros_like(full[k]) if g is None else g for k, g in zip(keys, grads)}
    chunks = {k: [grads[k] if i == len(cached) - 1 else torch.zeros_like(grads[k]) for i in range(len(cached))]
              if k in shared else grads[k].split([feats[k].shape[0] for feats in cached]) for k in keys}
    del full, grads

    # (3) Re-encode each micro-batch with its step-(1) randomness and push the cached gradient through it.
    last = len(micro_batches) - 1
    for i, (batch, state) in enumerate(zip(micro_batches, states)):
        with no_sync() if i < last else contextlib.nullcontext():
            state.restore()
            feats = encode(batch)
            surrogate = None
            for k in keys:
                if feats[k].shape != chunks[k][i].shape:
                    raise RuntimeError(f"gradcache_step: re-encoding micro-batch {i} gave {k} features of shape "
                                       f"{tuple(feats[k].shape)}, the first pass {tuple(chunks[k][i].shape)}")
                # A zero cached gradient (modality unused by the loss) still goes into the graph, so DDP sees a
                # gradient for every parameter, as it would in a plain step.
                term = (feats[k] * chunks[k][i].to(feats[k].dtype)).sum()
                surrogate = term if surrogate is None else surrogate + term
            backward(surrogate)
    after_forward.restore()
    return loss.detach()
