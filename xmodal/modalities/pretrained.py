"""``model.pretrained``: a whole pretrained image-text model (open_clip or transformers) as the start of a run.

:func:`resolve_pretrained` turns ``model.pretrained`` into the model config that reproduces the source: an image and
a text tower whose encoders end in the source's own projections (``projection: none``, so no random layer sits in
front of the pretrained space), the source's image preprocessing (size, mean/std, resize mode, interpolation) and
tokenizer, ``embed_dim``, the loss (SigLIP when the source has a ``logit_bias``) and its ``logit_scale`` /
``logit_bias`` as the initial temperature and bias. The towers' weights are read when the model is built.

Only configuration and the two scalars are read here; a run's model card holds the resolved config, so loading a
run never resolves again.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, ModelConfig, PretrainedConfig, TowerConfig
from . import _openclip

WHERE = "model.pretrained"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                     "open_clip_pytorch_model.bin")  # open_clip's own preference, first found


def check_pretrained(p: PretrainedConfig) -> None:
    """What ``model.pretrained`` can say about itself before its source is read."""
    if not p.name.strip():
        raise ConfigError(f"{WHERE}.name: must not be empty")
    bad = [t for t in p.freeze if t not in ("image", "text")]
    if bad:
        raise ConfigError(f"{WHERE}.freeze: {bad[0]!r} is not a tower of a pretrained image-text model (image, text)")
    prefixed = p.name.startswith(("hf-hub:", "local-dir:"))
    if p.library == "transformers" and p.weights is not None:
        raise ConfigError(f"{WHERE}.weights: a transformers model's weights are in its folder or hub repo "
                          f"({WHERE}.name); leave weights unset")
    if p.library == "open_clip" and prefixed and p.weights is not None:
        raise ConfigError(f"{WHERE}.weights: {p.name.split(':')[0]}: models carry their own weights; leave weights "
                          f"unset")
    if p.library == "open_clip" and not prefixed and p.weights is None:
        raise ConfigError(f"{WHERE}.weights: required for open_clip model {p.name!r}: an open_clip pretrained tag "
                          f"(e.g. openai) or a local checkpoint file")


def resolve_pretrained(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with ``model.pretrained`` resolved into towers, embed_dim, loss and temperature (a new object), or
    ``cfg`` itself when there is nothing to resolve: no ``model.pretrained``, or towers already filled (a model card
    of a run that started from it)."""
    p = cfg.pretrained
    if p is None or cfg.towers:
        return cfg
    check_pretrained(p)
    source = _open_clip(p) if p.library == "open_clip" else _transformers(p)
    out = copy.deepcopy(cfg)
    out.embed_dim = source["embed_dim"]
    out.loss = "siglip" if source["logit_bias"] is not None else "clip"
    out.init_logit_scale = source["logit_scale"]
    out.init_logit_bias = source["logit_bias"]
    # a trained SigLIP temperature may exceed CLIP's cap of 100: never clamp the source's own value down
    out.max_logit_scale = max(cfg.max_logit_scale, float(math.ceil(math.exp(source["logit_scale"]))))
    out.towers = {m: TowerConfig(**{**tower, "freeze": m in p.freeze, "projection": "none"})
                  for m, tower in source["towers"].items()}
    return out


def _scalar(sd: dict[str, torch.Tensor], key: str) -> float | None:
    v = sd.get(key)
    return None if v is None else float(v.reshape(-1)[0])


# ----------------------------------------------------------------------------------------------------- open_clip

def _open_clip_prefixed(name: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``hf-hub:org/repo`` / ``local-dir:/path``: (model config, preprocess config, local weights file)."""
    import open_clip

    loc, ident = name.split(":", 1)
    try:
        if loc == "hf-hub":
            from open_clip.factory import _get_hf_config

            full = _get_hf_config(ident)
            weights = open_clip.pretrained.download_pretrained_from_hf(ident)
        else:
            folder = Path(os.path.expanduser(ident))
            full = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
            weights = next((folder / f for f in OPEN_CLIP_WEIGHTS if (folder / f).is_file()), None)
            if weights is None:
                raise FileNotFoundError(f"no weights file (open_clip_model.safetensors, ...) in {folder}")
    except (OSError, ValueError, RuntimeError) as e:  # hub errors are OSErrors; a JSON error a ValueError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{WHERE}.name: {name!r} is not an open_clip model (open_clip_config.json and weights): "
                         f"{first}") from None
    if not isinstance(full, dict) or "model_cfg" not in full:
        raise ValueError(f"{WHERE}.name: {name!r}: its open_clip_config.json has no model_cfg (not an open_clip "
                         f"model)")
    return full["model_cfg"], full.get("preprocess_cfg") or {}, str(weights)


def _open_clip(p: PretrainedConfig) -> dict[str, Any]:
    _openclip.register_open_clip_configs()
    if p.name.startswith(("hf-hub:", "local-dir:")):
        model_cfg, preprocess, weights = _open_clip_prefixed(p.name)
        sd = _openclip.read_checkpoint(weights, WHERE)
    else:
        try:
            model_cfg = _openclip.model_config(p.name, WHERE)
            kind = _openclip.check_pretrained_source(p.name, p.weights, WHERE)
        except ValueError as e:
            raise ValueError(str(e).replace(f"{WHERE}.pretrained", f"{WHERE}.weights")) from None
        weights = p.weights
        if kind == "file":
            preprocess = {}
            sd = _openclip.read_checkpoint(weights, WHERE)
        else:  # an open_clip tag (online users): its own preprocessing statistics
            import open_clip

            preprocess = open_clip.get_pretrained_cfg(p.name, p.weights) or {}
            sd = _openclip.state_dict_from_source(p.name, p.weights, "tag", WHERE)
    text_cfg, vision_cfg = model_cfg.get("text_cfg") or {}, model_cfg.get("vision_cfg") or {}
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"{WHERE}.name: {p.name!r} has a Hugging Face text tower or tokenizer; xmodal builds "
                         f"open_clip models with the CLIP BPE tokenizer only (use its transformers release: "
                         f"library transformers)")
    _check_open_clip_keys(sd, model_cfg, p)
    scale = _scalar(sd, "logit_scale")
    if scale is None:
        raise ValueError(f"{WHERE}: {p.weights or p.name} has no logit_scale: not an open_clip CLIP checkpoint")
    size = preprocess.get("size") or vision_cfg.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"{WHERE}: {p.name!r} takes {size[0]}x{size[1]} images; xmodal's image towers are square")
        size = size[0]
    quick_gelu = bool(preprocess.get("quick_gelu", model_cfg.get("quick_gelu", False)))
    image_opts = {"mean": list(preprocess.get("mean") or _image_mean_std()[0]),
                  "std": list(preprocess.get("std") or _image_mean_std()[1]),
                  "resize_mode": preprocess.get("resize_mode", "shortest"),
                  "interpolation": preprocess.get("interpolation", "bicubic")}
    if image_opts["resize_mode"] not in ("shortest", "squash") or image_opts["interpolation"] not in (
            "bicubic", "bilinear"):
        raise ValueError(f"{WHERE}: {p.name!r} preprocesses with resize_mode {image_opts['resize_mode']!r} / "
                         f"interpolation {image_opts['interpolation']!r}; xmodal supports shortest or squash, "
                         f"bicubic or bilinear")
    common = {"kind": "open_clip", "name": p.name, "pretrained": weights}
    return {"embed_dim": int(model_cfg["embed_dim"]), "logit_scale": scale, "logit_bias": _scalar(sd, "logit_bias"),
            "towers": {"image": {**common, "image_size": int(size), "augment": p.augment,
                                 "options": {**image_opts, **({"quick_gelu": True} if quick_gelu else {})}},
                       "text": {**common, "context_length": int(text_cfg.get("context_length", 77)),
                                "options": {"quick_gelu": True} if quick_gelu else {}}}}


def _image_mean_std():
    from .image import OPENAI_MEAN, OPENAI_STD

    return OPENAI_MEAN, OPENAI_STD


def _check_open_clip_keys(sd: dict[str, torch.Tensor], model_cfg: dict[str, Any], p: PretrainedConfig) -> None:
    """The checkpoint's keys against those of the open_clip model it claims to be (built on the meta device: no
    memory, no init): every missing and unexpected key is listed before anything is built or written."""
    from open_clip.model import CLIP, CustomTextCLIP

    kwargs = {k: v for k, v in model_cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu",
                                                          "init_logit_bias")}
    if "multimodal_cfg" in model_cfg:
        raise ValueError(f"{WHERE}.name: {p.name!r} is a captioning model (CoCa), not a two-tower CLIP")
    with torch.device("meta"):
        expected = set((CustomTextCLIP if model_cfg.get("custom_text") else CLIP)(**kwargs).state_dict())
    if "logit_bias" not in expected:  # open_clip accepts (and xmodal reads) a bias in any CLIP checkpoint
        expected.add("logit_bias")
    missing = sorted(expected - set(sd) - {"logit_bias"})
    extra = sorted(set(sd) - expected)
    if missing or extra:
        parts = [f"{label} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                 for label, keys in (("missing", missing), ("unexpected", extra)) if keys]
        raise ValueError(f"{WHERE}: {p.weights or p.name} does not fit open_clip model {p.name!r}: "
                         + "; ".join(parts))


# -------------------------------------------------------------------------------------------------- transformers

def _transformers(p: PretrainedConfig) -> dict[str, Any]:
    from .hf_clip import hf_config, image_processor

    config = hf_config(p.name, WHERE + ".name")
    _check_tokenizer(p.name, int(config.text_config.vocab_size))
    image_processor(p.name, WHERE + ".name")
    scalars = _hf_tensors(p.name, ("logit_scale", "logit_bias"))
    if "logit_scale" not in scalars:
        raise ValueError(f"{WHERE}.name: {p.name!r} has no logit_scale in its weights: not a trained CLIPModel / "
                         f"SiglipModel checkpoint")
    if config.model_type == "clip":
        embed_dim = int(config.projection_dim)
    else:
        embed_dim = int(config.vision_config.hidden_size)
        text_dim = getattr(config.text_config, "projection_size", None) or config.text_config.hidden_size
        if int(text_dim) != embed_dim:
            raise ValueError(f"{WHERE}.name: {p.name!r}: its text features ({text_dim}) and image features "
                             f"({embed_dim}) differ in width; not one shared space")
    common = {"kind": "hf_clip", "name": p.name}
    return {"embed_dim": embed_dim, "logit_scale": scalars["logit_scale"],
            "logit_bias": scalars.get("logit_bias") if config.model_type == "siglip" else None,
            "towers": {"image": {**common, "image_size": int(config.vision_config.image_size), "augment": p.augment},
                       "text": {**common, "context_length": int(config.text_config.max_position_embeddings)}}}


def _check_tokenizer(source: str, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{WHERE}.name: {source!r} has no usable tokenizer (tokenizer.json / vocab files: "
                         f"{first})") from None
    if len(tok) <= len(set(tok.all_special_ids)):  # transformers 5 builds an empty one when the files are absent
        raise ValueError(f"{WHERE}.name: {source!r} has no tokenizer files (tokenizer.json, or vocab.json + "
                         f"merges.txt, or spiece.model); save the tokenizer with the model")
    if len(tok) > vocab_size:
        raise ValueError(f"{WHERE}.name: {source!r}: its tokenizer has {len(tok)} tokens, more than the text "
                         f"model's vocab_size {vocab_size} (a tokenizer of another model?)")
    if tok.pad_token_id is None:
        raise ValueError(f"{WHERE}.name: {source!r}: its tokenizer has no pad token; xmodal pads text to the "
                         f"model's context length")


def _hf_tensors(source: str, keys: tuple[str, ...]) -> dict[str, float]:
    """Named scalars of a transformers checkpoint (a local folder or hub id; one file or shards), read without
    building the model. Safetensors, else a ``pytorch_model.bin`` read with ``weights_only``."""
    from transformers.utils import cached_file

    def find(filename: str) -> str | None:
        return cached_file(source, filename, _raise_exceptions_for_missing_entries=False)

    index = find("model.safetensors.index.json")
    if index:
        weight_map = json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"]
        out = {}
        for key in keys:
            if key in weight_map:
                out.update(_safetensors_scalars(find(weight_map[key]), (key,)))
        return out
    single = find("model.safetensors")
    if single:
        return _safetensors_scalars(single, keys)
    binary = find("pytorch_model.bin")
    if binary:
        sd = _openclip.read_checkpoint(binary, WHERE)
        return {k: _scalar(sd, k) for k in keys if k in sd}
    raise ValueError(f"{WHERE}.name: {source!r} has no weights (model.safetensors or pytorch_model.bin)")


def _safetensors_scalars(path: str, keys: tuple[str, ...]) -> dict[str, float]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        names = set(f.keys())
        return {k: float(f.get_tensor(k).reshape(-1)[0]) for k in keys if k in names}
