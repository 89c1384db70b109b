"""The packaged pretrained speaker encoder (Resemblyzer) as an audio tower: its own preprocessing and
its partial-window embedding, equal to ``VoiceEncoder.embed_utterance``."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .signal import (DEFAULT_MAX_SECONDS, AudioError, _crop, _describe, decode_audio, fix_length, mel_filterbank,
                     mel_power)

# ----------------------------------------------------------------------------------------------------- Resemblyzer

RESEMBLYZER_SAMPLE_RATE = 16000
RESEMBLYZER_N_MELS = 40
RESEMBLYZER_HOP = 160  # 10 ms
RESEMBLYZER_N_FFT = 400  # 25 ms
RESEMBLYZER_PARTIAL_FRAMES = 160  # 1.6 s


def _import_resemblyzer():
    """``resemblyzer`` (imports librosa, webrtcvad; the latter warns that pkg_resources is deprecated)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import resemblyzer.audio
    except ImportError as e:
        raise ImportError(f"audio kind resemblyzer needs `pip install resemblyzer \"setuptools<81\"` (xmodal[assets])"
                          f"; import failed: {e}") from None
    return resemblyzer


class ResemblyzerTransform:
    """Picklable: path (or audio dict) → ``float32 [40, frames]``, Resemblyzer's own preprocessing.

    Loaded at 16 kHz (mono, resampled by :func:`resample`), then ``resemblyzer.preprocess_wav`` (volume normalised
    to -30 dBFS, increase only; silences longer than ~0.2 s removed by WebRTC VAD — a clip in which the VAD finds no
    voice is kept untrimmed), cropped to ``max_seconds`` (random window when ``train``), zero-padded at the end,
    then the 40-bin mel power spectrogram of ``resemblyzer.wav_to_mel_spectrogram`` (librosa's melspectrogram, 25 ms
    / 10 ms, Slaney mel, no log) computed by :func:`mel_power` — the same numbers without librosa.feature's
    seconds-long import. The padding frames are exactly zero; :class:`ResemblyzerEncoder` uses that to find each
    clip's length.
    """

    def __init__(self, max_seconds: float = DEFAULT_MAX_SECONDS, min_seconds: float = 0.0, train: bool = False):
        self.max_seconds, self.min_seconds, self.train = float(max_seconds), float(min_seconds), bool(train)
        self.sample_rate = RESEMBLYZER_SAMPLE_RATE
        self.n_samples = int(round(self.max_seconds * self.sample_rate))
        self.n_frames = 1 + self.n_samples // RESEMBLYZER_HOP
        self._fb: torch.Tensor | None = None

    def __call__(self, x: Any) -> torch.Tensor:
        ra = _import_resemblyzer().audio
        # read up to 3x max_seconds: VAD trimming shortens the clip before the final crop
        wav = decode_audio(x, self.sample_rate, max_seconds=3 * self.max_seconds,
                           crop="random" if self.train else "center")
        if self.min_seconds > 0 and wav.shape[-1] < self.min_seconds * self.sample_rate:
            raise AudioError(f"audio is shorter than min_seconds={self.min_seconds:g} "
                             f"({wav.shape[-1] / self.sample_rate:.3f} s): {_describe(x)}")
        w = wav.numpy().astype(np.float32)
        w = ra.normalize_volume(w, ra.audio_norm_target_dBFS, increase_only=True)
        if len(w) >= 3 * (ra.vad_window_length * self.sample_rate // 1000):
            trimmed = ra.trim_long_silences(np.clip(w, -1.0, 1.0))
            if len(trimmed) > 0:
                w = trimmed
        w = _crop(torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)), self.max_seconds, self.sample_rate,
                  "random" if self.train else "center", None)
        w = fix_length(w, self.n_samples)
        if self._fb is None:
            self._fb = mel_filterbank(self.sample_rate, RESEMBLYZER_N_FFT, RESEMBLYZER_N_MELS)
        # = resemblyzer.wav_to_mel_spectrogram(w).T (librosa's melspectrogram), without importing librosa.feature
        return mel_power(w, self._fb, RESEMBLYZER_N_FFT, RESEMBLYZER_HOP).contiguous()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fb"] = None  # rebuilt lazily in the worker
        return state

    def __repr__(self) -> str:
        return f"ResemblyzerTransform(max_seconds={self.max_seconds}, train={self.train}, frames={self.n_frames})"


def partial_starts(n_frames: int, rate: float = 1.3, min_coverage: float = 0.75) -> list[int]:
    """Start frames of the 1.6 s partial windows of ``VoiceEncoder.compute_partial_slices`` for a clip whose last
    non-zero mel frame is ``n_frames - 1``. With centred 400-sample windows that frame index K means the clip had
    between ``160 K - 198`` and ``160 K - 39`` samples; the estimate is ``160 K - 120`` (so a slice boundary can
    differ from ``embed_utterance``'s by one frame for some lengths)."""
    n_samples = max(1, (n_frames - 1) * RESEMBLYZER_HOP - 120)
    frames = int(np.ceil((n_samples + 1) / RESEMBLYZER_HOP))
    step = max(1, int(np.round((RESEMBLYZER_SAMPLE_RATE / rate) / RESEMBLYZER_HOP)))
    steps = max(1, frames - RESEMBLYZER_PARTIAL_FRAMES + step + 1)
    starts = list(range(0, steps, step))
    last = starts[-1] * RESEMBLYZER_HOP
    coverage = (n_samples - last) / (RESEMBLYZER_PARTIAL_FRAMES * RESEMBLYZER_HOP)
    if coverage < min_coverage and len(starts) > 1:
        starts = starts[:-1]
    return starts


class ResemblyzerEncoder(nn.Module):
    """Resemblyzer's ``VoiceEncoder`` (LSTM 40→256 ×3, linear, ReLU, L2 norm) over ``[B, 40, frames]`` mel power
    from :class:`ResemblyzerTransform`: each clip's valid length is its last non-zero frame; it is cut into 1.6 s
    partial windows exactly as ``embed_utterance`` does (rate 1.3/s, last window kept at >= 75 % coverage, zero
    padded), all partials of the batch run through the LSTM at once, and each clip's partial embeddings are averaged
    and L2-normalised. → ``[B, 256]``."""

    def __init__(self, pretrained: str | None = "package"):
        super().__init__()
        resemblyzer = _import_resemblyzer()
        weights = None if pretrained in (None, "package") else str(pretrained)
        self.voice = resemblyzer.VoiceEncoder("cpu", verbose=False, weights_fpath=weights)
        if pretrained is None:  # architecture only, random init
            for m in (self.voice.lstm, self.voice.linear):
                m.reset_parameters()
        self.output_dim = int(self.voice.linear.out_features)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        x = mels.transpose(1, 2)  # [B, frames, 40]
        nonzero = (x != 0).any(dim=-1)  # [B, frames]
        idx = torch.arange(x.shape[1], device=x.device)
        valid = torch.where(nonzero, idx + 1, torch.zeros_like(idx)).amax(dim=1).tolist()
        x = F.pad(x, (0, 0, 0, RESEMBLYZER_PARTIAL_FRAMES))
        parts, owner = [], []
        for b, n in enumerate(valid):
            for s in partial_starts(max(int(n), 1)):
                parts.append(x[b, s:s + RESEMBLYZER_PARTIAL_FRAMES])
                owner.append(b)
        # VoiceEncoder.forward, with an eps in the normalisation (an all-silent partial must not give 0/0 = NaN)
        _, (hidden, _) = self.voice.lstm(torch.stack(parts))
        emb = F.normalize(self.voice.relu(self.voice.linear(hidden[-1])), dim=-1)  # [P, 256], >= 0
        owner_t = torch.tensor(owner, device=emb.device)
        total = torch.zeros(x.shape[0], emb.shape[1], dtype=emb.dtype, device=emb.device).index_add(0, owner_t, emb)
        return F.normalize(total, dim=-1)


def build_resemblyzer(cfg, where: str = "model.towers.audio") -> tuple[nn.Module, int]:
    """``pretrained``: ``package`` (the weights inside the Resemblyzer package), a local ``.pt`` in its format
    (``{"model_state": ...}``), or none (random init)."""
    p = cfg.pretrained
    if p is not None and p != "package" and not os.path.isfile(os.path.expanduser(p)):
        raise ValueError(f"{where}.pretrained: expected 'package', a local Resemblyzer .pt file or none; "
                         f"{p!r} is not a file")
    model = ResemblyzerEncoder(None if p is None else p if p == "package" else os.path.expanduser(p))
    return model, model.output_dim
