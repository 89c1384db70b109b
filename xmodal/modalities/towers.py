"""Building a tower's parts from its config: the encoder and the per-sample transform of a ``(modality, kind)``,
looked up in the registry, with the config path named in every error."""
from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..config import TowerConfig
from .registry import TowerKind, get_modality


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
    return entry.encoder(cfg, where)


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
    return entry.transform(cfg, train, where)
