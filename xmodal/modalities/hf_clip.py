"""The two towers of a Hugging Face ``transformers`` ``CLIPModel`` or ``SiglipModel`` (tower kind ``hf_clip``).

``name`` is the model's folder (``save_pretrained``) or, for online users, its hub id. Each encoder keeps the part of
the model its modality needs -- vision (or text) transformer and, for CLIP, its projection -- and returns exactly
what ``get_image_features`` / ``get_text_features`` return, so with ``projection: none`` the shared space *is* the
source's (``model.pretrained`` sets this up; docs/pretrained.md).

Text: CLIP pools at the first end-of-text token of a causal transformer, so padding after it never changes the
result and no attention mask is needed (a CLIP tokenizer's pad token is often the end-of-text token itself, which a
mask built from the pad id would hide). SigLIP was trained on text padded to its full length without a mask and pools
the last position; its ids go in as they are.
"""
from __future__ import annotations

import torch
from torch import nn

SUPPORTED = ("clip", "siglip")  # transformers' model_type values this kind builds


def hf_source(cfg, where: str) -> str:
    if not cfg.name:
        raise ValueError(f"{where}.name: required for kind hf_clip (a CLIPModel / SiglipModel folder or hub id)")
    if cfg.pretrained is not None:
        raise ValueError(f"{where}.pretrained: kind hf_clip reads its weights from name ({cfg.name!r}); leave "
                         f"pretrained unset")
    return str(cfg.name)


def hf_config(source: str, where: str):
    """The model's ``config.json`` as transformers reads it; a folder or id that is not a CLIP/SigLIP model is named."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{where}: {source!r} is not a transformers model folder or reachable hub id ({first})") \
            from None
    if config.model_type not in SUPPORTED:
        raise ValueError(f"{where}: {source!r} is a transformers {config.model_type!r} model, not a CLIP or SigLIP "
                         f"image-text model (model_type {' or '.join(SUPPORTED)})")
    return config


def _full_model(source: str):
    """The whole pretrained model, read for each tower (each keeps its own parts: a model cached for both would
    share its weights with every other model built from the same source)."""
    from transformers import AutoModel

    from .text import _quiet_from_pretrained

    return _quiet_from_pretrained(AutoModel, source, weights_only=True).eval()  # weights_only: a .bin runs no code


def set_checkpointing(module: nn.Module, enable: bool) -> None:
    """What ``PreTrainedModel.gradient_checkpointing_enable`` does, on the parts a tower keeps (no longer a
    PreTrainedModel): every module with a ``gradient_checkpointing`` flag (transformers 5's layers, 4's encoders)
    recomputes its activations in backward, non-reentrant."""
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    for m in module.modules():
        if hasattr(m, "gradient_checkpointing"):
            m.gradient_checkpointing = enable
            if enable:
                m._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)


class HFClipVision(nn.Module):
    """``get_image_features``: the vision transformer's pooled output, projected for CLIP (SigLIP's pooling head is
    its projection)."""

    def __init__(self, full, model_type: str):
        super().__init__()
        self.model_type = model_type
        self.vision_model = full.vision_model
        self.visual_projection = full.visual_projection if model_type == "clip" else None
        self.output_dim = int(full.config.projection_dim if model_type == "clip"
                              else full.config.vision_config.hidden_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_checkpointing(self, enable)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixels).pooler_output
        return self.visual_projection(pooled) if self.visual_projection is not None else pooled


class HFClipText(nn.Module):
    """``get_text_features`` on ids padded to the context length (see the module docstring for the mask)."""

    def __init__(self, full, model_type: str, eos_id: int | None):
        super().__init__()
        self.model_type = model_type
        self.text_model = full.text_model
        self.text_projection = full.text_projection if model_type == "clip" else None
        self.eos_id = eos_id
        self.output_dim = int(full.config.projection_dim if model_type == "clip"
                              else getattr(full.config.text_config, "projection_size", None)
                              or full.config.text_config.hidden_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_checkpointing(self, enable)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # (not while tracing for ONNX: the trace would freeze one input's length into the graph)
        trim = self.model_type == "clip" and self.eos_id is not None and not torch.jit.is_tracing()
        if trim and ids.shape[1] > 1:
            # Exact trim (causal attention): keep columns up to the last row's first end-of-text token.
            is_eos = ids == self.eos_id
            first = torch.where(is_eos.any(1), is_eos.int().argmax(1), ids.shape[1] - 1)
            ids = ids[:, : int(first.max()) + 1]
        pooled = self.text_model(input_ids=ids).pooler_output
        return self.text_projection(pooled) if self.text_projection is not None else pooled


def build_hf_clip_vision(cfg, where: str = "model.towers.image") -> tuple[nn.Module, int]:
    source = hf_source(cfg, where)
    config = hf_config(source, where)
    size = int(config.vision_config.image_size)
    if cfg.image_size != size:
        raise ValueError(f"{where}.image_size: {cfg.image_size} differs from the model's {size} (set "
                         f"{where}.image_size: {size})")
    encoder = HFClipVision(_full_model(source), config.model_type)
    return encoder, encoder.output_dim


def build_hf_clip_text(cfg, where: str = "model.towers.text") -> tuple[nn.Module, int]:
    source = hf_source(cfg, where)
    config = hf_config(source, where)
    limit = int(config.text_config.max_position_embeddings)
    if cfg.context_length > limit:
        raise ValueError(f"{where}.context_length: {cfg.context_length} is longer than the model's {limit} positions")
    if config.model_type == "siglip" and cfg.context_length != limit:  # it pools the last position: pad to it
        raise ValueError(f"{where}.context_length: a SigLIP text tower reads text padded to its full {limit} "
                         f"positions (set {where}.context_length: {limit})")
    eos = getattr(config.text_config, "eos_token_id", None)
    encoder = HFClipText(_full_model(source), config.model_type, eos)
    return encoder, encoder.output_dim


class HFImageProcessorTransform:
    """Evaluation preprocessing by the model's own image processor (``preprocessor_config.json``): what
    ``get_image_features`` was given at training. Picklable; the processor is loaded lazily per process."""

    def __init__(self, source: str):
        self.source = str(source)
        self._processor = None

    def __call__(self, x) -> torch.Tensor:
        from .image import load_image

        if self._processor is None:
            self._processor = image_processor(self.source, "model.towers.image")
        return self._processor(images=load_image(x), return_tensors="pt")["pixel_values"][0]

    def __getstate__(self):
        return {"source": self.source, "_processor": None}

    def __repr__(self) -> str:
        return f"HFImageProcessorTransform({self.source!r})"


def image_processor(source: str, where: str):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{where}: {source!r} has no usable image processor (preprocessor_config.json: {first})") \
            from None


def build_hf_clip_image_transform(cfg, train: bool, where: str = "model.towers.image"):
    """Training with ``augment``: random resized crop + flip, normalised with the processor's mean/std; otherwise the
    model's own image processor."""
    from .image import ImageTransform

    source = hf_source(cfg, where)
    if train and cfg.augment:
        proc = image_processor(source, where)
        return ImageTransform(cfg.image_size, proc.image_mean, proc.image_std, augment=True)
    return HFImageProcessorTransform(source)
