"""``torch.compile`` of every tower's encoder in a real ``xmodal pretrain`` run: the end-to-end benchmark's fast-path
trial (``benchmarks/end_to_end.py --xmodal-set 'model.plugins=[benchmarks._compile_towers]'``), not a feature.

Loaded as a model plugin (``model.plugins``), so it is imported before the model is built; it wraps
``xmodal.training.build.build_model`` so that each encoder is compiled in place (``nn.Module.compile``: the state
dict keys, hence checkpoints and the saved model, are unchanged). CPU: TorchInductor's C++ backend.
"""
from __future__ import annotations

import xmodal.training.build as _build

_plain_build_model = _build.build_model


def _compiled_build_model(*args, **kwargs):
    model = _plain_build_model(*args, **kwargs)
    for tower in model.towers.values():
        tower.encoder.compile()
    return model


if getattr(_build.build_model, "__name__", "") != "_compiled_build_model":
    _build.build_model = _compiled_build_model
