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

# (modality, kind) -> (encoder builder, transform builder, allowed option keys)
_IMAGE_OPTIONS = {"mean", "std"}
_TOWERS: dict[tuple[str, str], tuple[Callable, Callable, set[str]]] = {
    ("image", "open_clip"): (image.build_open_clip_vision, image.build_image_transform,
                             _IMAGE_OPTIONS | {"vision_cfg", "embed_dim", "quick_gelu"}),
    ("image", "cnn"): (image.build_cnn, image.build_image_transform, _IMAGE_OPTIONS | {"channels", "convs_per_stage"}),
    ("image", "timm"): (image.build_timm, image.build_image_transform, _IMAGE_OPTIONS | {"model_kwargs"}),
    ("image", "efficientnet_lite0"): (image.build_efficientnet_lite0, image.build_image_transform, _IMAGE_OPTIONS),
    ("text", "open_clip"): (text.build_open_clip_text, text.build_text_transform,
                            {"text_cfg", "embed_dim", "quick_gelu"}),
    ("text", "lstm"): (text.build_rnn, text.build_text_transform,
                       {"embed_dim", "hidden", "layers", "dropout", "vocab_size"}),
    ("text", "gru"): (text.build_rnn, text.build_text_transform,
                      {"embed_dim", "hidden", "layers", "dropout", "vocab_size"}),
    ("text", "hf"): (text.build_hf, text.build_text_transform, set()),
    ("audio", "cnn"): (audio.build_audio_cnn, audio.build_audio_transform, audio.CNN_OPTIONS),
    ("audio", "transformer"): (audio.build_audio_transformer, audio.build_audio_transform, audio.TRANSFORMER_OPTIONS),
    ("audio", "resemblyzer"): (audio.build_resemblyzer, audio.build_audio_transform, audio.RESEMBLYZER_OPTIONS),
}

MODALITIES = tuple(dict.fromkeys(m for m, _ in _TOWERS))
KINDS: dict[str, tuple[str, ...]] = {m: tuple(k for mm, k in _TOWERS if mm == m) for m in MODALITIES}


def _lookup(modality: str, cfg: TowerConfig) -> tuple[tuple[Callable, Callable, set[str]], str]:
    where = f"model.towers.{modality}"
    if modality not in KINDS:
        raise ValueError(f"{where}: unknown modality {modality!r} (valid modalities: {', '.join(MODALITIES)})")
    entry = _TOWERS.get((modality, cfg.kind))
    if entry is None:
        raise ValueError(f"{where}.kind: unknown {modality} kind {cfg.kind!r} "
                         f"(valid kinds: {', '.join(KINDS[modality])})")
    unknown = sorted(set(cfg.options) - entry[2])
    if unknown:
        raise ValueError(f"{where}.options.{unknown[0]}: unknown option for {modality} kind {cfg.kind} "
                         f"(valid options: {', '.join(sorted(entry[2])) or 'none'})")
    return entry, where


def build_encoder(modality: str, cfg: TowerConfig) -> tuple[nn.Module, int]:
    """Encoder for one modality; returns ``(encoder, feat_dim)``. ``encoder(x) -> [B, feat_dim]`` float."""
    (build, _, _), where = _lookup(modality, cfg)
    return build(cfg, where)


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
    (_, build, _), where = _lookup(modality, cfg)
    return build(cfg, train, where)


__all__ = ["build_encoder", "build_transform", "grad_checkpointing_unsupported", "KINDS", "MODALITIES", "XMODAL_OPEN_CLIP_CONFIGS",
           "register_open_clip_configs"]
