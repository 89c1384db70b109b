"""Learnable scalars (temperatures, biases) as 1-element 1-D parameters, and loading the 0-d ones older files hold."""
from __future__ import annotations

import torch
from torch import nn


def scalar_parameter(value: float, requires_grad: bool = True) -> nn.Parameter:
    """A learnable scalar stored as a 1-element 1-D tensor, not 0-d: FSDP2's ``fully_shard`` refuses 0-d parameters
    (it shards along dim 0)."""
    return nn.Parameter(torch.full((1,), float(value)), requires_grad=requires_grad)


def accept_0d_scalars(module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook: weights saved before scalars became 1-D hold them as 0-d tensors; reshape."""
    for name, param in module.named_parameters(recurse=False):
        value = state_dict.get(prefix + name)
        if value is not None and value.ndim == 0 and param.shape == (1,):
            state_dict[prefix + name] = value.reshape(1)
