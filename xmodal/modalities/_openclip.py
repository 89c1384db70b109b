"""Shared open_clip helpers for the image and text towers: model configs (stock + xmodal's small ones), checkpoint
reading, and picking one tower's keys out of a full CLIP state dict.

``import open_clip`` costs several seconds, so it happens inside the functions, never at module import.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

# Small configs registered by xmodal (open_clip's JSON schema). Sized for CPU training on small images.
XMODAL_OPEN_CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "xmodal-vit-tiny": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 4, "head_width": 64},  # 3 heads
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
    },
}

_registered = False


def register_open_clip_configs() -> None:
    """Make xmodal's configs known to open_clip itself (``open_clip.create_model("xmodal-vit-tiny")``).

    Uses the public ``open_clip.add_model_config`` on JSON files in a temporary folder; open_clip reads them at once
    and keeps them in its registry, so the folder is removed straight away. Idempotent.
    """
    global _registered
    if _registered:
        return
    add_open_clip_configs(XMODAL_OPEN_CLIP_CONFIGS)
    _registered = True


def add_open_clip_configs(configs: dict[str, dict]) -> None:
    """Register model configs with open_clip (it reads them from JSON files), skipping names it already knows."""
    import json
    import tempfile

    import open_clip

    missing = {k: v for k, v in configs.items() if k not in open_clip.list_models()}
    if missing:
        with tempfile.TemporaryDirectory(prefix="xmodal-openclip-") as tmp:
            for name, cfg in missing.items():
                (Path(tmp) / f"{name}.json").write_text(json.dumps(cfg), encoding="utf-8")
            open_clip.add_model_config(tmp)


def model_config(name: str | None, where: str) -> dict[str, Any]:
    """A deep copy of the open_clip model config ``name`` (xmodal's own first, then open_clip's)."""
    if not name:
        raise ValueError(f"{where}.name: required for kind open_clip (an open_clip model config such as "
                         f"'ViT-B-32', 'RN50' or {', '.join(repr(k) for k in XMODAL_OPEN_CLIP_CONFIGS)})")
    if name in XMODAL_OPEN_CLIP_CONFIGS:
        return copy.deepcopy(XMODAL_OPEN_CLIP_CONFIGS[name])
    if name.startswith("local-dir:"):  # read here: open_clip < 3 does not know the prefix
        import json

        path = Path(os.path.expanduser(name[len("local-dir:"):])) / "open_clip_config.json"
        try:
            full = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{where}.name: {name!r}: cannot read {path} ({e})") from None
        return copy.deepcopy(full.get("model_cfg", full))
    import open_clip

    cfg = open_clip.get_model_config(name)  # 'hf-hub:org/repo' fetches open_clip_config.json (online users)
    if cfg is None:
        raise ValueError(f"{where}.name: unknown open_clip model config {name!r} (xmodal configs: "
                         f"{', '.join(XMODAL_OPEN_CLIP_CONFIGS)}; open_clip has e.g. ViT-B-32, ViT-B-16, RN50; "
                         f"see open_clip.list_models())")
    return copy.deepcopy(cfg)


def merged_tower_config(model_cfg: dict[str, Any], section: str, overrides: Any, where: str) -> dict[str, Any]:
    tower_cfg = dict(model_cfg.get(section) or {})
    if overrides is not None:
        if not isinstance(overrides, dict):
            raise ValueError(f"{where}.options.{section}: expected a mapping, got {type(overrides).__name__}")
        tower_cfg.update(overrides)
    return tower_cfg


def is_local_file(pretrained: str | None) -> bool:
    return bool(pretrained) and os.path.isfile(os.path.expanduser(str(pretrained)))


def check_pretrained_source(name: str, pretrained: str | None, where: str) -> str | None:
    """``None`` (random init), ``"file"`` (local open_clip checkpoint) or ``"tag"`` (open_clip pretrained tag)."""
    if pretrained is None:
        return None
    if is_local_file(pretrained):
        return "file"
    import open_clip

    if name and open_clip.pretrained.is_pretrained_cfg(name, pretrained):
        return "tag"
    tags = open_clip.list_pretrained_tags_by_model(name) if name else []
    raise ValueError(f"{where}.pretrained: {pretrained!r} is neither an existing checkpoint file nor an open_clip "
                     f"pretrained tag for {name!r} (tags: {', '.join(tags) if tags else 'none'})")


def read_checkpoint(path: str | os.PathLike, where: str) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``torch.save`` file (``weights_only=True``), unwrapping
    ``{"state_dict": ...}`` / ``{"model": ...}`` and a DistributedDataParallel ``module.`` prefix."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}.pretrained: checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd: Any = load_file(path, device="cpu")
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle with arbitrary objects, a TorchScript archive, not a checkpoint at all ...
            raise ValueError(f"{where}.pretrained: cannot read {path} as a weights-only state dict: {e}") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not sd:
        raise ValueError(f"{where}.pretrained: {path} does not hold a state dict")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def state_dict_from_source(name: str, pretrained: str, source: str, where: str) -> dict[str, torch.Tensor]:
    """The full CLIP state dict from a local file, or (online users) from open_clip's pretrained tag (downloads)."""
    if source == "file":
        return read_checkpoint(pretrained, where)
    import open_clip

    register_open_clip_configs()
    full = open_clip.create_model(name, pretrained=pretrained)  # downloads / reads open_clip's cache
    return full.state_dict()


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], where: str, what: str) -> None:
    """``load_state_dict(strict=True)`` with one readable error listing missing/unexpected/mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{label} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}")
        raise ValueError(f"{where}.pretrained: {what} does not fit the tower: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)
