"""xmodal with open_clip's own text forward (every ``context_length`` position, padding included): the end-to-end
benchmark's trial side that isolates what dropping the padding columns gives
(``benchmarks/end_to_end.py --trial 'model.plugins=[benchmarks._untrimmed_text]'``), not a feature. The script puts
the repository on ``PYTHONPATH``; a direct ``xmodal pretrain`` with this plugin needs ``PYTHONPATH=.`` too.

Loaded as a model plugin (``model.plugins``), imported before the model is built; it wraps
``xmodal.training.build.build_model`` so that an open_clip text encoder gets open_clip's ``TextTransformer`` class
back (the same weights and state-dict keys; only the forward differs).
"""
from __future__ import annotations

import xmodal.training.build as _build

_plain_build_model = _build.build_model


def _untrimmed_build_model(*args, **kwargs):
    from xmodal.modalities.text import TrimmedTextTransformer

    model = _plain_build_model(*args, **kwargs)
    for tower in model.towers.values():
        if type(tower.encoder) is TrimmedTextTransformer:
            tower.encoder.__class__ = TrimmedTextTransformer.__base__
    return model


if getattr(_build.build_model, "__name__", "") != "_untrimmed_build_model":
    _build.build_model = _untrimmed_build_model
