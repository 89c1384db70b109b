"""``xmodal.cli`` under FSDP2 on CPU processes (launched by tests/test_fsdp.py through `accelerate launch`).

Accelerate turns FSDP on only for GPU-like devices: with CPU processes it silently runs DDP. This shim switches its
state to FSDP2 right after the engine builds its ``Accelerator`` — the same plugin settings
configs/accelerate/fsdp.yaml gives on GPUs — so that the engine's FSDP paths (sharded parameters, evaluation in step
on every rank, gathered final weights, FSDP checkpoints and resume) run here, with gloo.
"""
import sys

from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

import xmodal.training.engine as engine

_make_accelerator = engine.make_accelerator


def make_fsdp_accelerator(cfg, find_unused=False):
    accelerator = _make_accelerator(cfg, find_unused)
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["ResidualAttentionBlock"], reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT")
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP  # every AcceleratorState() re-copies PartialState's fields
    return accelerator


engine.make_accelerator = make_fsdp_accelerator

if __name__ == "__main__":
    from xmodal.cli import main
    sys.exit(main(sys.argv[1:]))
