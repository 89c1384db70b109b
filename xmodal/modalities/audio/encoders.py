"""Audio transforms (path → log-mel ``float32 [n_mels, frames]``) and the trainable encoders (``cnn``,
``transformer``), with their option parsing."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from torch import nn

from .resemblyzer import ResemblyzerTransform
from .signal import (DEFAULT_MAX_SECONDS, DEFAULT_N_MELS, DEFAULT_SAMPLE_RATE, AudioError, _describe, decode_audio,
                     fix_length, log_mel, mel_filterbank)

# ------------------------------------------------------------------------------------------------------- transforms

class AudioTransform:
    """Picklable per-sample audio transform: path (or audio dict) → log-mel ``float32 [n_mels, frames]``.

    Loads at ``sample_rate`` (mono, resampled), crops to ``max_seconds`` (random window when ``train``, centre
    otherwise), zero-pads shorter clips at the end, then :func:`log_mel`. ``frames = 1 + n_samples // hop`` with
    ``n_samples = round(max_seconds * sample_rate)``, the same for every clip.
    """

    def __init__(self, sample_rate: int = DEFAULT_SAMPLE_RATE, n_mels: int = DEFAULT_N_MELS,
                 max_seconds: float = DEFAULT_MAX_SECONDS, train: bool = False, *, min_seconds: float = 0.0,
                 win_ms: float = 25.0, hop_ms: float = 10.0, f_min: float = 0.0, f_max: float | None = None,
                 mel_scale: str = "slaney"):
        self.sample_rate = int(sample_rate)
        self.n_mels = int(n_mels)
        self.max_seconds = float(max_seconds)
        self.min_seconds = float(min_seconds)
        self.train = bool(train)
        self.n_fft = int(round(self.sample_rate * win_ms / 1000))
        self.hop = int(round(self.sample_rate * hop_ms / 1000))
        self.f_min, self.f_max, self.mel_scale = float(f_min), f_max, mel_scale
        self.n_samples = int(round(self.max_seconds * self.sample_rate))
        if self.n_fft < 2 or self.hop < 1 or self.n_samples < 1:
            raise ValueError(f"audio transform: win_ms/hop_ms/max_seconds too small for {self.sample_rate} Hz "
                             f"(n_fft={self.n_fft}, hop={self.hop}, n_samples={self.n_samples})")
        self.n_frames = 1 + self.n_samples // self.hop
        self._fb = mel_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.f_min, self.f_max, self.mel_scale)

    def waveform(self, x: Any) -> torch.Tensor:
        """Decoded, cropped and padded waveform ``float32 [n_samples]``."""
        wav = decode_audio(x, self.sample_rate, max_seconds=self.max_seconds,
                           crop="random" if self.train else "center")
        if self.min_seconds > 0 and wav.shape[-1] < self.min_seconds * self.sample_rate:
            raise AudioError(f"audio is shorter than min_seconds={self.min_seconds:g} "
                             f"({wav.shape[-1] / self.sample_rate:.3f} s): {_describe(x)}")
        return fix_length(wav, self.n_samples)

    def __call__(self, x: Any) -> torch.Tensor:
        return log_mel(self.waveform(x), self._fb, self.n_fft, self.hop)

    def __repr__(self) -> str:
        return (f"AudioTransform(sample_rate={self.sample_rate}, n_mels={self.n_mels}, max_seconds={self.max_seconds}, "
                f"train={self.train}, frames={self.n_frames})")



def _number(cfg, key: str, default: float, where: str, *, positive: bool = True, integer: bool = False) -> Any:
    value = cfg.options.get(key, default)
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (positive and value <= 0) or (not positive and value < 0):
        what = "integer" if integer else "number"
        raise ValueError(f"{where}.options.{key}: expected a {'positive' if positive else 'non-negative'} {what}, "
                         f"got {value!r}")
    return value


def audio_settings(cfg, where: str = "model.towers.audio") -> dict[str, Any]:
    """The transform's keyword arguments from ``cfg.options`` (validated, defaults filled in)."""
    sr = _number(cfg, "sample_rate", DEFAULT_SAMPLE_RATE, where, integer=True)
    f_max = cfg.options.get("f_max")
    if f_max is not None:
        f_max = _number(cfg, "f_max", 0, where)
    mel_scale = cfg.options.get("mel_scale", "slaney")
    if mel_scale not in ("slaney", "htk"):
        raise ValueError(f"{where}.options.mel_scale: expected 'slaney' or 'htk', got {mel_scale!r}")
    s = {"sample_rate": sr, "n_mels": _number(cfg, "n_mels", DEFAULT_N_MELS, where, integer=True),
         "max_seconds": float(_number(cfg, "max_seconds", DEFAULT_MAX_SECONDS, where)),
         "min_seconds": float(_number(cfg, "min_seconds", 0.0, where, positive=False)),
         "win_ms": float(_number(cfg, "win_ms", 25.0, where)), "hop_ms": float(_number(cfg, "hop_ms", 10.0, where)),
         "f_min": float(_number(cfg, "f_min", 0.0, where, positive=False)), "f_max": f_max, "mel_scale": mel_scale}
    if s["min_seconds"] > s["max_seconds"]:
        raise ValueError(f"{where}.options.min_seconds ({s['min_seconds']}) exceeds max_seconds ({s['max_seconds']})")
    return s


def _frames(settings: dict[str, Any]) -> int:
    hop = int(round(settings["sample_rate"] * settings["hop_ms"] / 1000))
    return 1 + int(round(settings["max_seconds"] * settings["sample_rate"])) // hop


def build_audio_transform(cfg, train: bool, where: str = "model.towers.audio"):
    """``AudioTransform`` (kinds cnn / transformer) or ``ResemblyzerTransform`` (kind resemblyzer); random crops
    only when ``train`` and ``cfg.augment``."""
    train = bool(train and cfg.augment)
    if cfg.kind == "resemblyzer":
        return ResemblyzerTransform(max_seconds=float(_number(cfg, "max_seconds", DEFAULT_MAX_SECONDS, where)),
                                    min_seconds=float(_number(cfg, "min_seconds", 0.0, where, positive=False)),
                                    train=train)
    s = audio_settings(cfg, where)
    try:
        return AudioTransform(train=train, **s)
    except ValueError as e:
        raise ValueError(f"{where}.options: {e}") from None


# -------------------------------------------------------------------------------------------------------- encoders

class AudioCNN(nn.Module):
    """Log-mel CNN: BatchNorm over mel bins, then per stage ``convs_per_stage`` × (3x3 conv, BatchNorm, ReLU) and a
    2x2 max-pool; then mean over frequency and (max + mean) over time (PANNs' pooling). ``[B, n_mels, T] →
    [B, channels[-1]]``."""

    def __init__(self, n_mels: int, channels: Sequence[int] = (32, 64, 128, 256), convs_per_stage: int = 1):
        super().__init__()
        self.bn0 = nn.BatchNorm1d(n_mels)
        from ..image import conv_stages
        self.features = conv_stages(1, channels, convs_per_stage, ceil_mode=True)
        self.output_dim = channels[-1]
        self.grad_checkpointing = False
        # Inference in NHWC: 1.5x faster on CPU; training stays NCHW (docs/benchmarks.md, fast paths)
        self.channels_last = True
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .._checkpoint import run_stages
        x = run_stages(self.features, self.bn0(x).unsqueeze(1), self.grad_checkpointing,
                       self.channels_last and not self.training)  # [B, C, F', T']
        x = x.mean(dim=2)
        return x.amax(dim=-1) + x.mean(dim=-1)


class AudioTransformer(nn.Module):
    """Patchified log-mel + a small pre-norm transformer (AST-style, from scratch): BatchNorm over mel bins,
    non-overlapping ``patch`` patches (Conv2d), learned positions for the ``[n_mels, frames]`` grid of the transform
    (a shorter input uses the first time columns), a CLS token, ``layers`` encoder layers, LayerNorm; output the CLS
    token ``[B, width]``."""

    def __init__(self, n_mels: int, n_frames: int, patch: tuple[int, int] = (16, 16), width: int = 192,
                 layers: int = 4, heads: int = 3):
        super().__init__()
        self.patch = tuple(patch)
        if n_mels < self.patch[0] or n_frames < self.patch[1]:
            raise ValueError(f"patch {self.patch} is larger than the spectrogram ({n_mels} mels x {n_frames} frames)")
        self.grid = (n_mels // self.patch[0], n_frames // self.patch[1])
        self.bn0 = nn.BatchNorm1d(n_mels)
        self.proj = nn.Conv2d(1, width, kernel_size=self.patch, stride=self.patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, width, *self.grid) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.output_dim = width
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        if not self.grad_checkpointing:
            return self.blocks(x)
        from .._checkpoint import checkpoint
        # What TransformerEncoder.forward does in training without masks (its fast path is inference-only): the
        # layers in turn; checkpointed one by one, so only each layer's input is kept.
        for layer in self.blocks.layers:
            x = checkpoint(layer, x)
        return x if self.blocks.norm is None else self.blocks.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_mels, frames = x.shape[-2:]
        if n_mels != self.bn0.num_features or frames // self.patch[1] > self.grid[1] or frames < self.patch[1]:
            raise ValueError(f"audio transformer: a [{n_mels}, {frames}] spectrogram does not fit the built grid of "
                             f"{self.grid[0]}x{self.grid[1]} patches of {self.patch} ({self.bn0.num_features} mels); "
                             f"n_mels / max_seconds differ from the config?")
        x = self.proj(self.bn0(x).unsqueeze(1))  # [B, W, gf, gt]
        gt = x.shape[-1]
        x = rearrange(x + self.pos[..., :gt], "b w f t -> b (f t) w")  # one token per patch, frequency-major
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return self.norm(self._blocks(x)[:, 0])


def _int_list(cfg, key: str, default: Sequence[int], where: str) -> list[int]:
    value = cfg.options.get(key, list(default))
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in value)):
        raise ValueError(f"{where}.options.{key}: expected a non-empty list of positive integers, got {value!r}")
    return list(value)


def _no_pretrained(cfg, where: str) -> None:
    if cfg.pretrained is not None:
        raise ValueError(f"{where}.pretrained: audio kind {cfg.kind} has no pretrained weights "
                         f"(got {cfg.pretrained!r}); kind resemblyzer has packaged ones")


def build_audio_cnn(cfg, where: str = "model.towers.audio") -> tuple[nn.Module, int]:
    _no_pretrained(cfg, where)
    s = audio_settings(cfg, where)
    model = AudioCNN(s["n_mels"], _int_list(cfg, "channels", (32, 64, 128, 256), where),
                     _number(cfg, "convs_per_stage", 1, where, integer=True))
    return model, model.output_dim


def build_audio_transformer(cfg, where: str = "model.towers.audio") -> tuple[nn.Module, int]:
    _no_pretrained(cfg, where)
    s = audio_settings(cfg, where)
    patch = cfg.options.get("patch", 16)
    patch = [patch, patch] if isinstance(patch, int) and not isinstance(patch, bool) else patch
    if (not isinstance(patch, (list, tuple)) or len(patch) != 2
            or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in patch)):
        raise ValueError(f"{where}.options.patch: expected a positive integer or [freq, time], got {patch!r}")
    width = _number(cfg, "width", 192, where, integer=True)
    heads = _number(cfg, "heads", 3, where, integer=True)
    if width % heads:
        raise ValueError(f"{where}.options.width ({width}) must be divisible by heads ({heads})")
    try:
        model = AudioTransformer(s["n_mels"], _frames(s), tuple(patch), width,
                                 _number(cfg, "layers", 4, where, integer=True), heads)
    except ValueError as e:
        raise ValueError(f"{where}.options.patch: {e}") from None
    return model, model.output_dim
