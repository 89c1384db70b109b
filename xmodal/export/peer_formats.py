"""A run's two CLIP towers written in the format of the library they came from, so that library loads them itself:
open_clip's (``open_clip_config.json`` + ``open_clip_model.safetensors``: ``open_clip.create_model_and_transforms(
"hf-hub:ORG/NAME")`` or ``"local-dir:PATH"``) and transformers' (``save_pretrained``: ``AutoModel.from_pretrained``).

Only a model whose image and text towers are one source's own -- what ``model.pretrained`` builds: kind
``open_clip`` (same model config) or ``hf_clip`` (same folder), ``projection: none`` -- has such a form; anything
else (a new projection, another encoder, task heads) lives in xmodal's own files next to it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..model import XModalModel

PAIR = ("image", "text")


def peer_library(model: XModalModel) -> str | None:
    """``"open_clip"``, ``"transformers"`` or None: which library's own format holds this model's towers."""
    towers = model.cfg.towers
    if set(towers) != set(PAIR):
        return None
    image, text = towers["image"], towers["text"]
    if image.projection != "none" or text.projection != "none" or image.kind != text.kind or image.name != text.name:
        return None
    return {"open_clip": "open_clip", "hf_clip": "transformers"}.get(image.kind)


def _scalars(model: XModalModel) -> dict[str, torch.Tensor]:
    out = {"logit_scale": model.logit_scale.detach().reshape(())}
    if model.logit_bias is not None:
        out["logit_bias"] = model.logit_bias.detach().reshape(())
    return out


def open_clip_files(model: XModalModel, folder: Path) -> list[Path]:
    """``open_clip_config.json`` (model_cfg + the image preprocessing) and ``open_clip_model.safetensors`` in
    open_clip's CLIP naming; ``create_model_and_transforms`` rebuilds exactly these towers."""
    import json

    from safetensors.torch import save_file

    from ..modalities import _openclip
    from ..modalities.image import build_image_transform

    image, text = model.cfg.towers["image"], model.cfg.towers["text"]
    mcfg = _openclip.model_config(image.name, "model.towers.image")
    mcfg["vision_cfg"] = _openclip.merged_tower_config(mcfg, "vision_cfg", image.options.get("vision_cfg"), "")
    mcfg["text_cfg"] = _openclip.merged_tower_config(mcfg, "text_cfg", text.options.get("text_cfg"), "")
    mcfg["vision_cfg"]["image_size"] = image.image_size
    mcfg["text_cfg"]["context_length"] = text.context_length
    if image.options.get("quick_gelu"):
        mcfg["quick_gelu"] = True
    if model.logit_bias is not None:
        mcfg["init_logit_bias"] = float(model.logit_bias.detach().reshape(()))
    tf = build_image_transform(image, train=False)
    preprocess = {"mean": list(tf.mean), "std": list(tf.std), "resize_mode": tf.resize_mode,
                  "interpolation": tf.interpolation}
    sd: dict[str, torch.Tensor] = {f"visual.{k}": v for k, v in model.towers["image"].encoder.state_dict().items()}
    prefix = "text." if mcfg.get("custom_text") else ""
    sd.update({f"{prefix}{k}": v for k, v in model.towers["text"].encoder.state_dict().items()})
    sd.update(_scalars(model))
    weights, config = folder / "open_clip_model.safetensors", folder / "open_clip_config.json"
    save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, str(weights))  # (a staging folder)
    config.write_text(json.dumps({"model_cfg": mcfg, "preprocess_cfg": preprocess}, indent=2), encoding="utf-8")
    return [config, weights]


def transformers_files(model: XModalModel, folder: Path) -> list[Path]:
    """``save_pretrained`` of the source's CLIPModel / SiglipModel class with this run's weights, plus the source's
    tokenizer and image processor."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    source = model.cfg.towers["image"].name
    config = AutoConfig.from_pretrained(source)
    peer = AutoModel.from_config(config)
    image, text = model.towers["image"].encoder, model.towers["text"].encoder
    sd: dict[str, Any] = {f"vision_model.{k}": v for k, v in image.vision_model.state_dict().items()}
    sd.update({f"text_model.{k}": v for k, v in text.text_model.state_dict().items()})
    if image.visual_projection is not None:
        sd.update({f"visual_projection.{k}": v for k, v in image.visual_projection.state_dict().items()})
    if text.text_projection is not None:
        sd.update({f"text_projection.{k}": v for k, v in text.text_projection.state_dict().items()})
    own = peer.state_dict()
    sd.update({k: v.reshape(own[k].shape) for k, v in _scalars(model).items() if k in own})
    missing, unexpected = peer.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]  # a buffer transformers rebuilds
    if missing or unexpected:
        raise ValueError(f"export: the towers do not fill a {type(peer).__name__} (missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]})")
    peer.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    AutoImageProcessor.from_pretrained(source).save_pretrained(folder)
    return sorted(p for p in folder.iterdir() if p.is_file())
