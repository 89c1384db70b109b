"""Activation (gradient) checkpointing for xmodal's own encoders: ``torch.utils.checkpoint`` (non-reentrant) that
keeps BatchNorm's running statistics exact, and stage-wise execution of a :func:`~.image.conv_stages` stack
(checkpointed and/or channels-last).

Towers switch it on with ``encoder.set_grad_checkpointing(enable)`` -- the method name open_clip and timm use, so
``xmodal.model.Tower`` drives every kind the same way.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


class _KeepBatchNormStats:
    """Context for the recomputation: the backward pass re-runs BatchNorm in train mode, which would update the
    running statistics a second time; their values before the recomputation are put back after it."""

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      and m.track_running_stats]

    def __enter__(self):
        self.saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in self.norms]

    def __exit__(self, *exc):
        with torch.no_grad():
            for m, saved in zip(self.norms, self.saved):
                for b, s in zip((m.running_mean, m.running_var, m.num_batches_tracked), saved):
                    b.copy_(s)
        return False  # also on torch's early-stop exception: let it through


def _contexts(module: nn.Module):
    return contextlib.nullcontext(), _KeepBatchNormStats(module)


def checkpoint(fn: Callable, *args, module: nn.Module | None = None):
    """``fn(*args)`` storing only its inputs; the activations are recomputed in backward (same RNG state, so
    dropout masks match). ``module``: whose BatchNorm statistics the recomputation must leave untouched."""
    context_fn = partial(_contexts, module) if module is not None else _noop_contexts
    return _torch_checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)


def _noop_contexts():
    return contextlib.nullcontext(), contextlib.nullcontext()


def stage_slices(features: nn.Sequential) -> list[nn.Sequential]:
    """A :func:`~.image.conv_stages` stack cut after each max-pool: one slice per stage (shared modules, so the
    parameter names do not change)."""
    stages, start = [], 0
    for i, m in enumerate(features):
        if isinstance(m, nn.MaxPool2d):
            stages.append(features[start:i + 1])
            start = i + 1
    if start < len(features):
        stages.append(features[start:])
    return stages


def run_stages(features: nn.Sequential, x: torch.Tensor, checkpointing: bool, channels_last: bool = False
               ) -> torch.Tensor:
    """``features(x)``, checkpointed stage by stage when ``checkpointing`` (only each stage's input is kept), with
    each stage's input in channels-last layout when ``channels_last``. Converting at every stage, not once, is what
    reaches a 1-channel input (audio): its NCHW and channels-last layouts coincide, so the first conv's output would
    stay NCHW; later stages' inputs are already channels-last and pass through uncopied."""
    if not (checkpointing or channels_last):
        return features(x)
    for stage in stage_slices(features):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = checkpoint(stage, x, module=stage) if checkpointing else stage(x)
    return x
