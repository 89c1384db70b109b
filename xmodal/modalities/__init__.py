"""Modalities: what each kind of input is (:mod:`.registry`), the built-in image, text and audio (:mod:`.builtin`
declares them; :mod:`.image`, :mod:`.text`, :mod:`.audio` implement them) and building their towers
(:mod:`.towers`).

``build_encoder(modality, cfg) -> (encoder, feat_dim)``: ``encoder(x) -> [B, feat_dim]`` float.
``build_transform(modality, cfg, train) -> callable``: picklable, for DataLoader workers;
image: path | PIL.Image → float32 ``[3, H, W]``; text: str → int64 ``[cfg.context_length]`` (pad id padded).

Projection, L2 normalisation and freezing are added by ``xmodal.model.Tower``, not here. Importing this package
is light (no torch): the registry and the declarations load first, the towers' code when a tower is built.
image kinds (``name`` / ``pretrained`` / ``options``):

* ``open_clip``: open_clip config (``ViT-B-32``, ``RN50``, ``xmodal-vit-tiny``) / local checkpoint or open_clip tag /
  ``vision_cfg``, ``embed_dim``, ``quick_gelu``
* ``cnn``: – / – / ``channels`` ([32, 64, 128, 256]), ``convs_per_stage`` (2)
* ``timm``: timm model name / local state dict or ``hub`` (downloads) / ``model_kwargs``
* ``efficientnet_lite0``: – / ``package``, a local file or none / –
* ``hf_clip``: a transformers CLIPModel / SiglipModel folder or hub id / – / – (its image processor preprocesses)

text kinds:

* ``open_clip``: open_clip config / local checkpoint or open_clip tag / ``text_cfg``, ``embed_dim``, ``quick_gelu``
* ``lstm``, ``gru``: – / – / ``embed_dim`` (256), ``hidden`` (256), ``layers`` (1), ``dropout`` (0), ``vocab_size``
* ``hf``: local folder, hub id or ``minilm`` / local folder or ``package`` (= MiniLM) / –
* ``hf_clip``: a transformers CLIPModel / SiglipModel folder or hub id / – / – (its own tokenizer)

``model.pretrained`` builds a whole pretrained pair from open_clip or transformers (:mod:`.pretrained`).

Every image kind but ``hf_clip`` also takes ``options.mean`` / ``options.std`` (3 numbers) overriding its
normalisation, ``options.resize_mode`` (``shortest`` | ``squash``) and ``options.interpolation`` (``bicubic`` |
``bilinear``).
"""
from __future__ import annotations

from .builtin import BUILTIN
from .registry import (Modality, TowerKind, get_modality, is_modality, load_plugins, modality_names,
                       path_modalities, register_modality, register_tower_kind, unregister_modality)

for _modality in BUILTIN:  # registered first (the package loads before any plugin can use the registry)
    register_modality(_modality)

_LAZY = {"build_encoder": "towers", "build_transform": "towers", "grad_checkpointing_unsupported": "towers",
         "XMODAL_OPEN_CLIP_CONFIGS": "_openclip", "register_open_clip_configs": "_openclip"}


def __getattr__(name):
    if name == "MODALITIES":  # live views of the registry (a plugin may have added modalities or kinds)
        return tuple(modality_names())
    if name == "KINDS":
        return {m: tuple(get_modality(m).kinds) for m in modality_names()}
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["build_encoder", "build_transform", "grad_checkpointing_unsupported", "KINDS", "MODALITIES", "Modality",
           "TowerKind", "register_modality", "register_tower_kind", "unregister_modality", "get_modality",
           "is_modality", "modality_names", "path_modalities", "load_plugins", "XMODAL_OPEN_CLIP_CONFIGS",
           "register_open_clip_configs"]
