"""Modality towers: one encoder and one per-sample transform per ``(modality, kind)``.

``build_encoder(modality, cfg) -> (encoder, feat_dim)``: ``encoder(x) -> [B, feat_dim]`` float.
``build_transform(modality, cfg, train) -> callable``: picklable, for DataLoader workers;
image: path | PIL.Image → float32 ``[3, H, W]``; text: str → int64 ``[cfg.context_length]`` (pad id padded).

Projection, L2 normalisation and freezing are added by ``xmodal.model.Tower``, not here.

image kinds (``name`` / ``pretrained`` / ``options``):

* ``open_clip``: open_clip config (``ViT-B-32``, ``RN50``, ``xmodal-vit-tiny``) / local checkpoint or open_clip tag /
  ``vision_cfg``, ``embed_dim``, ``quick_gelu``
* ``cnn``: – / – / ``channels`` ([32, 64, 128, 256]), ``convs_per_stage`` (2)
* ``timm``: timm model name / local state dict or ``hub`` (downloads) / ``model_kwargs``
* ``efficientnet_lite0``: – / ``package``, a local file or none / –

text kinds:

* ``open_clip``: open_clip config / local checkpoint or open_clip tag / ``text_cfg``, ``embed_dim``, ``quick_gelu``
* ``lstm``, ``gru``: – / – / ``embed_dim`` (256), ``hidden`` (256), ``layers`` (1), ``dropout`` (0), ``vocab_size``
* ``hf``: local folder, hub id or ``minilm`` / local folder or ``package`` (= MiniLM) / –

Every image kind also takes ``options.mean`` / ``options.std`` (3 numbers) overriding its normalisation.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..config import TowerConfig
from . import audio, image, text
from ._openclip import XMODAL_OPEN_CLIP_CONFIGS, register_open_clip_configs
from .registry import (Modality, TowerKind, get_modality, is_modality, load_plugins, modality_names,
                       path_modalities, register_modality, register_tower_kind, unregister_modality)

for _builtin in (image.MODALITY, text.MODALITY, audio.MODALITY):
    register_modality(_builtin)


def __getattr__(name):  # live views of the registry (a plugin may have added modalities or kinds)
    if name == "MODALITIES":
        return tuple(modality_names())
    if name == "KINDS":
        return {m: tuple(get_modality(m).kinds) for m in modality_names()}
    raise AttributeError(f"module 'xmodal.modalities' has no attribute {name!r}")


def _lookup(modality: str, cfg: TowerConfig) -> tuple[TowerKind, str]:
    where = f"model.towers.{modality}"
    mod = get_modality(modality, where)
    entry = mod.kinds.get(cfg.kind)
    if entry is None:
        raise ValueError(f"{where}.kind: unknown {modality} kind {cfg.kind!r} "
                         f"(valid kinds: {', '.join(mod.kinds)})")
    unknown = sorted(set(cfg.options) - entry.options)
    if unknown:
        raise ValueError(f"{where}.options.{unknown[0]}: unknown option for {modality} kind {cfg.kind} "
                         f"(valid options: {', '.join(sorted(entry.options)) or 'none'})")
    return entry, where


def build_encoder(modality: str, cfg: TowerConfig) -> tuple[nn.Module, int]:
    """Encoder for one modality; returns ``(encoder, feat_dim)``. ``encoder(x) -> [B, feat_dim]`` float."""
    entry, where = _lookup(modality, cfg)
    return entry.build_encoder(cfg, where)


def grad_checkpointing_unsupported(encoder: nn.Module) -> str | None:
    """Why ``encoder`` cannot do gradient checkpointing, or None when ``encoder.set_grad_checkpointing(bool)``
    works (xmodal's encoders, open_clip transformers, timm models that support it, ``hf``)."""
    if type(encoder).__name__ == "ModifiedResNet":  # open_clip's RN50 etc.: the method exists but does nothing
        return "open_clip's ResNet towers (ModifiedResNet) do not implement it"
    probe = getattr(encoder, "trunk", encoder) if type(encoder).__name__ == "TimmModel" else encoder
    setter = getattr(probe, "set_grad_checkpointing", None)  # open_clip's TimmModel would only log a warning
    if setter is None:
        return f"{type(encoder).__name__} has no set_grad_checkpointing"
    try:  # timm models without support assert; transformers raises ValueError
        setter(True)
        setter(False)
    except (AssertionError, NotImplementedError, ValueError, RuntimeError) as e:
        return f"{type(probe).__name__}.set_grad_checkpointing failed: {e or type(e).__name__}"
    return None


def build_transform(modality: str, cfg: TowerConfig, train: bool) -> Callable:
    """Picklable per-sample transform. image: path str | PIL.Image → float32 ``[3, H, W]``;
    text: str → int64 ``[cfg.context_length]`` padded with the tokenizer's pad id."""
    entry, where = _lookup(modality, cfg)
    return entry.build_transform(cfg, train, where)


__all__ = ["build_encoder", "build_transform", "grad_checkpointing_unsupported", "KINDS", "MODALITIES", "Modality",
           "TowerKind", "register_modality", "register_tower_kind", "unregister_modality", "get_modality",
           "is_modality", "modality_names", "path_modalities", "load_plugins", "XMODAL_OPEN_CLIP_CONFIGS",
           "register_open_clip_configs"]
