"""``xmodal.cli`` under FSDP2 on CPU processes (launched by tests/test_fsdp.py through `accelerate launch`).

Accelerate turns FSDP on only for GPU-like devices: with CPU processes it silently runs DDP. This shim switches its
state to FSDP2 right after the engine builds its ``Accelerator`` — the same plugin settings
configs/accelerate/fsdp.yaml gives on GPUs — so that the engine's FSDP paths (sharded parameters, evaluation in step
on every rank, gathered final weights, FSDP checkpoints and resume) run here, with gloo.

With ``XMODAL_FSDP_EVIDENCE=<folder>`` set, each rank also writes ``rank{r}.json`` there: what it really holds of
every parameter right after ``accelerator.prepare`` (type, placements, local and whole element counts), which
modules are FSDP units, and, at the first optimiser step, the same for the gradients (before the step) and AdamW's
moments (after it) — the evidence tests/test_fsdp.py checks that training ran sharded.
"""
import json
import os
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import xmodal.training.engine as engine

_make_accelerator = engine.make_accelerator


def _held(t) -> dict:
    """What this rank holds of a tensor: its DTensor placements (if any), whole shape, local and whole element counts."""
    from torch.distributed.tensor import DTensor
    if isinstance(t, DTensor):
        return {"dtensor": True, "placements": [repr(p) for p in t.placements], "mesh": t.device_mesh.size(),
                "shape": list(t.shape), "local": t.to_local().numel(), "whole": t.numel()}
    return {"dtensor": False, "placements": [], "mesh": 1, "shape": list(t.shape), "local": t.numel(),
            "whole": t.numel()}


def _record_sharding(accelerator, prepare, folder: str):
    """Wrap ``accelerator.prepare``: after it, write what this rank holds of the model; at the first optimiser step,
    of the gradients and of AdamW's state."""
    import torch
    from torch.distributed.fsdp import FSDPModule

    def recording_prepare(*args, **kwargs):
        prepared = prepare(*args, **kwargs)
        model = next(m for m in prepared if isinstance(m, torch.nn.Module))
        optimizer = next(o for o in prepared if hasattr(o, "optimizer") and hasattr(o.optimizer, "param_groups"))
        names = {id(p): n for n, p in model.named_parameters()}
        evidence = {
            "rank": accelerator.process_index, "processes": accelerator.num_processes,
            "distributed_type": accelerator.distributed_type.value,
            "fsdp_version": accelerator.state.fsdp_plugin.fsdp_version,
            "fsdp_units": sorted(n or "<root>" for n, m in model.named_modules() if isinstance(m, FSDPModule)),
            "unit_classes": sorted({type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)}),
            "params": {n: _held(p) for n, p in model.named_parameters()},
        }
        path = os.path.join(folder, f"rank{accelerator.process_index}.json")

        def write():
            with open(path, "w", encoding="utf-8") as f:
                json.dump(evidence, f)

        def before_step(opt, args, kwargs):
            if "grads" not in evidence:
                evidence["grads"] = {names[id(p)]: _held(p.grad) for g in opt.param_groups for p in g["params"]
                                     if p.grad is not None}

        def after_step(opt, args, kwargs):
            if "exp_avg" not in evidence:
                evidence["exp_avg"] = {names[id(p)]: _held(s["exp_avg"]) for p, s in opt.state.items()
                                       if "exp_avg" in s}
                write()

        optimizer.optimizer.register_step_pre_hook(before_step)
        optimizer.optimizer.register_step_post_hook(after_step)
        write()
        return prepared

    return recording_prepare


def make_fsdp_accelerator(cfg, find_unused=False):
    accelerator = _make_accelerator(cfg, find_unused)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["ResidualAttentionBlock"], reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT")
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # every AcceleratorState() re-copies PartialState's fields
    if os.environ.get("XMODAL_FSDP_EVIDENCE"):
        accelerator.prepare = _record_sharding(accelerator, accelerator.prepare, os.environ["XMODAL_FSDP_EVIDENCE"])
    return accelerator


engine.make_accelerator = make_fsdp_accelerator

if __name__ == "__main__":
    from xmodal.cli import main
    sys.exit(main(sys.argv[1:]))
