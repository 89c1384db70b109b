"""Gathering features across processes for contrastive losses.

A contrastive loss needs every process's features as negatives. ``torch.distributed.all_gather`` copies them but is
not differentiable, so the gradient a process's features receive from the *other* processes' losses is lost unless
the gather itself is differentiable (``torch.distributed.nn.functional.all_gather``, whose backward sums the gradient
coming back for each chunk onto the process that owns it).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather_with_grad(features: Tensor) -> list[Tensor]:
    import torch.distributed.nn.functional as dist_fn

    # Deprecated in favour of the private functional-collectives API, but still the one public, backend-agnostic
    # (gloo included) differentiable all-gather. Silence only its own FutureWarning, which otherwise fires every step.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*all_gather is deprecated", category=FutureWarning)
        return list(dist_fn.all_gather(features))


def gather_counts(n: int, device: torch.device, world_size: int) -> list[int]:
    """Every process's row count, in rank order (one tiny all-gather; ``[n]`` on one process). Rows missing a
    modality make the counts differ between processes."""
    if world_size == 1:
        return [n]
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    dist.all_gather(counts, torch.tensor([n], dtype=torch.long, device=device))
    return [int(c) for c in counts]


def gather_features(features: Tensor, local_loss: bool, gather_with_grad: bool, rank: int,
                    world_size: int, counts: list[int] | None = None) -> Tensor:
    """Concatenate ``features [n, d]`` from every process into ``[world_size * n, d]``, in rank order.

    ``gather_with_grad=True``: the gather is differentiable, so each process's features get the gradient of every
    process's loss. With each process computing its share of the loss (``local_loss=True``) or the whole loss
    (``local_loss=False``), the summed gradient is ``world_size`` times that of the one-process loss, which DDP's
    gradient averaging then divides back out: the parameter update is exactly the global-batch one.

    ``gather_with_grad=False``: a plain gather (no gradient through the copies). Unless ``local_loss`` is set, the
    process's own chunk is put back in place of its copy so that at least the local rows/columns carry gradient
    (what open_clip does; with ``local_loss`` the local features are used directly as rows by the caller).
    The gradient is then only the local part of the true one.

    ``counts`` (from :func:`gather_counts`) allows a different ``n`` on each process: the chunks are padded to the
    largest for the collective and the padding is cut away, so the result is ``[sum(counts), d]``.
    """
    if world_size == 1:
        return features
    if counts is not None and len(set(counts)) > 1:
        pad = max(counts) - features.shape[0]
        padded = torch.cat([features, features.new_zeros(pad, *features.shape[1:])]) if pad else features
        chunks = _all_gather_with_grad(padded) if gather_with_grad else _plain_gather(padded)
        if not gather_with_grad and not local_loss:
            chunks[rank] = padded
        return torch.cat([c[:k] for c, k in zip(chunks, counts)], dim=0)
    if gather_with_grad:
        return torch.cat(_all_gather_with_grad(features), dim=0)
    gathered = _plain_gather(features)
    if not local_loss:
        gathered[rank] = features
    return torch.cat(gathered, dim=0)


def _plain_gather(features: Tensor) -> list[Tensor]:
    gathered = [torch.empty_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, features.contiguous())
    return gathered
