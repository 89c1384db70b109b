"""Audio towers: waveform loading (soundfile), resampling, log-mel features, the per-sample transform
(path → ``float32 [n_mels, frames]``) and the encoders (``cnn``, ``transformer``, the packaged ``resemblyzer``).

Every encoder maps ``[B, n_mels, frames]`` to ``[B, feat_dim]``; projection, normalisation and freezing belong to the
model's ``Tower``. Heavy imports (soundfile, resemblyzer/librosa) happen inside the functions that need them.

**Loading** (:func:`load_audio`): any format libsndfile reads (WAV incl. float/extensible, FLAC, OGG/Vorbis, MP3
with libsndfile >= 1.1, AIFF, ...) via ``soundfile``; integer PCM becomes float32 in [-1, 1); several channels are
averaged to mono; the result is resampled to the tower's rate. Problems raise :class:`AudioError` naming the file:
missing, empty (0 bytes), unreadable/corrupt, no samples (0 frames), non-finite samples (NaN/inf in a float file).

**Resampling** (:func:`resample`): band-limited windowed-sinc interpolation (Hann window, ``lowpass_filter_width``
zero crossings, cutoff ``rolloff`` × the lower Nyquist frequency), the algorithm of torchaudio's
``sinc_interp_hann`` (which is not a dependency). For a rational ratio whose reduced terms are small it runs
polyphase: one kernel per output phase applied as a strided ``conv1d``; otherwise each output sample's taps are
evaluated directly (same formula, chunked). Output length is ``ceil(len * new / old)``.

**Length**: a clip longer than ``max_seconds`` is cropped to it (a random window in training with ``augment``,
the centre window otherwise; only that window is read from disk). A shorter clip is **zero-padded at the end** to
``max_seconds`` so every sample has the same number of frames and batches stack; clips shorter than
``min_seconds`` (default 0: any clip with at least one sample) raise :class:`AudioError` instead.

**Features** (:func:`log_mel`): STFT with a periodic Hann window (``win_ms`` = 25 ms, ``hop_ms`` = 10 ms,
``n_fft`` = window length, centred frames with zero padding) → power spectrum → a mel filterbank built here
(:func:`mel_filterbank`; default the **Slaney** mel scale — linear below 1 kHz, logarithmic above — with Slaney
area normalisation, i.e. librosa's default ``librosa.filters.mel``; ``mel_scale: htk`` uses
``2595 log10(1 + f/700)``) → ``log(max(mel, 1e-6))``. Frames: ``1 + round(max_seconds * sample_rate) // hop``
(1001 for 10 s at 10 ms). The encoders normalise each mel bin with a BatchNorm first (PANNs' ``bn0``).

Options (``TowerConfig.options``) of the ``cnn`` / ``transformer`` kinds: ``sample_rate`` (16000), ``n_mels`` (64),
``max_seconds`` (10), ``min_seconds`` (0), ``win_ms`` (25), ``hop_ms`` (10), ``f_min`` (0), ``f_max`` (sample_rate/2),
``mel_scale`` (``slaney`` | ``htk``); ``cnn``: ``channels`` ([32, 64, 128, 256]), ``convs_per_stage`` (1);
``transformer``: ``patch`` (16, or [freq, time]), ``width`` (192), ``layers`` (4), ``heads`` (3).

``resemblyzer``: the pretrained speaker encoder shipped inside the ``Resemblyzer`` package (3-layer LSTM, 256-d,
trained for speaker verification; ``pretrained: package``, a local ``.pt`` in its format, or none = random init).
It keeps its own preprocessing: 16 kHz, volume normalised to -30 dBFS, long silences trimmed by WebRTC VAD, 40-bin
mel *power* spectrogram (librosa's numbers, not log; computed here by :func:`mel_power`) — see
:class:`ResemblyzerTransform`; the encoder embeds 1.6 s partial windows and averages them as
``VoiceEncoder.embed_utterance`` does (a test checks cosine 1.0 against it on real speech). Options:
``max_seconds``, ``min_seconds``.
Needs ``pip install resemblyzer "setuptools<81"`` (its ``webrtcvad`` imports ``pkg_resources``).
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

DEFAULT_SAMPLE_RATE = 16000
DEFAULT_N_MELS = 64
DEFAULT_MAX_SECONDS = 10.0
LOG_FLOOR = 1e-6  # log(max(mel, LOG_FLOOR)): silence and zero padding become log(1e-6) ~ -13.8

AUDIO_OPTIONS = {"sample_rate", "n_mels", "max_seconds", "min_seconds", "win_ms", "hop_ms", "f_min", "f_max",
                 "mel_scale"}
CNN_OPTIONS = AUDIO_OPTIONS | {"channels", "convs_per_stage"}
TRANSFORMER_OPTIONS = AUDIO_OPTIONS | {"patch", "width", "layers", "heads"}
RESEMBLYZER_OPTIONS = {"max_seconds", "min_seconds"}


class AudioError(ValueError):
    """An audio file (or in-memory waveform) cannot be used; the message names the file."""


# ------------------------------------------------------------------------------------------------------ resampling

_POLYPHASE_MAX_KERNEL = 4_000_000  # elements (new × (2 width + orig)); above it the direct evaluation is used


def _sinc_kernel_values(t: torch.Tensor, base_freq: float, orig: int, lowpass_filter_width: int) -> torch.Tensor:
    """Hann-windowed sinc evaluated at ``t`` (time in input samples); cutoff ``base_freq`` in units of 1/orig."""
    t = t * (base_freq / orig)  # now in units where the sinc's zero crossings are the integers
    t = t.clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / torch.where(t == 0, torch.ones_like(t), t))
    return sinc * window * (base_freq / orig)


@functools.lru_cache(maxsize=16)
def _polyphase_kernels(orig: int, new: int, width: int, base_freq: float, lowpass_filter_width: int) -> torch.Tensor:
    """float32 ``[new, 1, 2 width + orig]``: computed in float64, cached per rate pair (building costs more than
    applying it to a few seconds of audio)."""
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, :]
    t = idx - torch.arange(0, new, dtype=torch.float64)[:, None] * (orig / new)  # [new, K]
    return _sinc_kernel_values(t, base_freq, orig, lowpass_filter_width)[:, None, :].float()


def resample(wav: torch.Tensor | np.ndarray, orig_sr: int, new_sr: int, *, lowpass_filter_width: int = 16,
             rolloff: float = 0.945) -> torch.Tensor:
    """Band-limited resampling of ``wav`` (``[..., T]``) from ``orig_sr`` to ``new_sr`` (see the module docstring).

    Returns float32 ``[..., ceil(T * new_sr / orig_sr)]``; the same tensor (as float32) when the rates are equal.
    """
    x = torch.as_tensor(wav, dtype=torch.float32)
    orig_sr, new_sr = int(orig_sr), int(new_sr)
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return x
    shape = x.shape
    x = x.reshape(-1, shape[-1]).double()
    length = shape[-1]
    g = math.gcd(orig_sr, new_sr)
    orig, new = orig_sr // g, new_sr // g
    base_freq = min(orig, new) * rolloff  # cutoff, in units where the input rate is `orig`
    width = math.ceil(lowpass_filter_width * orig / base_freq)  # half the kernel length, in input samples
    target = math.ceil(new * length / orig)
    if new * (2 * width + orig) <= _POLYPHASE_MAX_KERNEL:
        # polyphase: output n*new + j sits at input time n*orig + j*orig/new; one kernel per phase j, stride orig
        kernels = _polyphase_kernels(orig, new, width, base_freq, lowpass_filter_width)
        padded = F.pad(x.float(), (width, width + orig))
        out = F.conv1d(padded[:, None, :], kernels, stride=orig)  # [N, new, L]
        out = out.transpose(1, 2).reshape(x.shape[0], -1)[:, :target]
    else:  # direct evaluation for awkward ratios (e.g. 44101 Hz): same formula, output samples in chunks
        out = torch.empty(x.shape[0], target, dtype=torch.float64)
        taps = torch.arange(-width, width + 1, dtype=torch.float64)
        padded = F.pad(x, (width + 1, width + 2))
        chunk = 8192
        for s in range(0, target, chunk):
            n = torch.arange(s, min(s + chunk, target), dtype=torch.float64)
            pos = n * (orig / new)  # input time of each output sample
            k0 = torch.floor(pos)
            k = k0[:, None] + taps[None, :]  # [n, taps]
            w = _sinc_kernel_values(pos[:, None] - k, base_freq, orig, lowpass_filter_width)
            gathered = padded[:, (k.long() + width + 1).clamp(0, padded.shape[1] - 1)]  # [N, n, taps]
            out[:, s:s + len(n)] = (gathered * w[None]).sum(-1)
    return out.float().reshape(*shape[:-1], target)


# --------------------------------------------------------------------------------------------------------- loading

def _name(source: Any) -> str:
    return os.fspath(source) if isinstance(source, (str, os.PathLike)) else str(source)


def audio_info(path: str | os.PathLike) -> tuple[int, int, int]:
    """``(frames, sample_rate, channels)`` from the file header; :class:`AudioError` for unusable files."""
    import soundfile as sf

    p = _name(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise AudioError(f"audio file not found: {p}") from None
    except OSError as e:
        raise AudioError(f"cannot access audio file ({e.strerror}): {p}") from None
    if os.path.isdir(p):
        raise AudioError(f"audio path is a directory, not a file: {p}")
    if st.st_size == 0:
        raise AudioError(f"audio file is empty (0 bytes): {p}")
    try:
        info = sf.info(p)
    except Exception as e:  # noqa: BLE001 - soundfile.LibsndfileError (RuntimeError) and friends
        raise AudioError(f"unreadable audio file ({_sf_reason(e)}): {p}") from None
    if info.frames <= 0:
        raise AudioError(f"audio file has no samples (0 frames): {p}")
    return int(info.frames), int(info.samplerate), int(info.channels)


def _sf_reason(e: Exception) -> str:
    msg = str(e).strip() or type(e).__name__
    return msg.split(": ", 1)[-1] if msg.startswith("Error opening") else msg


def _window(total: int, wanted: int | None, crop: str, generator: torch.Generator | None = None) -> tuple[int, int]:
    """(start, frames) of the window to read: all of it, or ``wanted`` frames at the start / centre / random."""
    if wanted is None or total <= wanted:
        return 0, total
    if crop == "random":
        start = int(torch.randint(0, total - wanted + 1, (1,), generator=generator))
    elif crop == "center":
        start = (total - wanted) // 2
    elif crop == "start":
        start = 0
    else:
        raise ValueError(f"crop must be 'random', 'center' or 'start', got {crop!r}")
    return start, wanted


def _finish(data: np.ndarray, src_sr: int, sample_rate: int, name: str) -> torch.Tensor:
    if data.ndim == 2:
        data = data.mean(axis=1)
    if data.size == 0:
        raise AudioError(f"audio has no samples: {name}")
    if not np.isfinite(data).all():
        raise AudioError(f"audio has non-finite samples (NaN or inf): {name}")
    wav = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    return resample(wav, src_sr, sample_rate) if src_sr != sample_rate else wav


def load_audio(path: str | os.PathLike, sample_rate: int = DEFAULT_SAMPLE_RATE, *, max_seconds: float | None = None,
               crop: str = "center", generator: torch.Generator | None = None) -> torch.Tensor:
    """Read an audio file → float32 mono ``Tensor[T]`` at ``sample_rate`` (channels averaged, resampled).

    ``max_seconds``: read only a window of that length (``crop`` = ``center`` | ``random`` | ``start``) from a
    longer file. Raises :class:`AudioError` naming the file when it is missing, empty, unreadable, has 0 samples or
    non-finite samples.
    """
    import soundfile as sf

    p = _name(path)
    total, src_sr, _ = audio_info(p)
    wanted = None if max_seconds is None else max(1, math.ceil(max_seconds * src_sr))
    start, frames = _window(total, wanted, crop, generator)
    try:
        data, sr = sf.read(p, start=start, frames=frames, dtype="float32", always_2d=True)
    except Exception as e:  # noqa: BLE001 - a header that parses but data that does not
        raise AudioError(f"unreadable audio file ({_sf_reason(e)}): {p}") from None
    if data.shape[0] == 0:
        raise AudioError(f"audio file has no readable samples (truncated?): {p}")
    wav = _finish(data, sr, sample_rate, p)
    if max_seconds is not None:  # resampling rounds up: never return more than asked
        wav = wav[: max(1, math.ceil(max_seconds * sample_rate))]
    return wav


def decode_audio(x: Any, sample_rate: int, *, max_seconds: float | None = None, crop: str = "center",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """A path, a Hugging Face ``datasets.Audio`` value (``{"bytes", "path"}`` or ``{"array", "sampling_rate"}``) →
    float32 mono ``Tensor[T]`` at ``sample_rate`` (see :func:`load_audio`)."""
    import io

    if isinstance(x, (str, os.PathLike)):
        return load_audio(x, sample_rate, max_seconds=max_seconds, crop=crop, generator=generator)
    if isinstance(x, dict):
        if x.get("array") is not None:
            sr = x.get("sampling_rate")
            if not isinstance(sr, int) or sr <= 0:
                raise AudioError(f"audio dict with 'array' needs a positive int 'sampling_rate', got {sr!r}")
            data = np.asarray(x["array"], dtype=np.float32)
            data = data.T if data.ndim == 2 and data.shape[0] < data.shape[1] else data  # [C, T] → [T, C]
            return _crop(_finish(data, sr, sample_rate, x.get("path") or "<array>"), max_seconds, sample_rate,
                         crop, generator)
        if x.get("bytes"):
            import soundfile as sf

            name = f"{x.get('path') or '<embedded bytes>'} (embedded)"
            try:
                data, sr = sf.read(io.BytesIO(x["bytes"]), dtype="float32", always_2d=True)
            except Exception as e:  # noqa: BLE001
                raise AudioError(f"unreadable embedded audio bytes ({_sf_reason(e)}): {name}") from None
            return _crop(_finish(data, sr, sample_rate, name), max_seconds, sample_rate, crop, generator)
        if x.get("path"):
            return load_audio(x["path"], sample_rate, max_seconds=max_seconds, crop=crop, generator=generator)
        raise AudioError(f"audio dict has neither 'array', 'bytes' nor 'path': keys {sorted(x)}")
    raise TypeError(f"audio transform: expected a path (str) or an audio dict, got {type(x).__name__}")


def _crop(wav: torch.Tensor, max_seconds: float | None, sample_rate: int, crop: str,
          generator: torch.Generator | None) -> torch.Tensor:
    if max_seconds is None:
        return wav
    start, n = _window(wav.shape[-1], max(1, math.ceil(max_seconds * sample_rate)), crop, generator)
    return wav[start:start + n]


def fix_length(wav: torch.Tensor, n_samples: int) -> torch.Tensor:
    """Zero-pad at the end (or cut) to exactly ``n_samples``."""
    if wav.shape[-1] >= n_samples:
        return wav[..., :n_samples]
    return F.pad(wav, (0, n_samples - wav.shape[-1]))


# ------------------------------------------------------------------------------------------------------ mel features

def hz_to_mel(f: np.ndarray | float, mel_scale: str = "slaney") -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if mel_scale == "htk":
        return 2595.0 * np.log10(1.0 + f / 700.0)
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'slaney' or 'htk', got {mel_scale!r}")
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def mel_to_hz(m: np.ndarray | float, mel_scale: str = "slaney") -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'slaney' or 'htk', got {mel_scale!r}")
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0, f_max: float | None = None,
                   mel_scale: str = "slaney") -> torch.Tensor:
    """Triangular mel filters ``float32 [n_mels, 1 + n_fft // 2]`` over the rfft bins, band edges equally spaced on
    the mel scale between ``f_min`` and ``f_max``, each filter scaled to unit area (``2 / bandwidth``, Slaney
    normalisation) — ``librosa.filters.mel(sr, n_fft, n_mels, fmin, fmax, htk=mel_scale == "htk")``."""
    f_max = sample_rate / 2 if f_max is None else float(f_max)
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"mel filterbank: need 0 <= f_min < f_max <= sample_rate/2, got f_min={f_min}, "
                         f"f_max={f_max}, sample_rate={sample_rate}")
    fft_freqs = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)
    edges = mel_to_hz(np.linspace(hz_to_mel(f_min, mel_scale), hz_to_mel(f_max, mel_scale), n_mels + 2), mel_scale)
    fdiff = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    empty = np.flatnonzero(weights.max(axis=1) <= 0)
    if len(empty):
        raise ValueError(f"mel filterbank: {len(empty)} of {n_mels} mel bands contain no FFT bin (n_fft={n_fft} at "
                         f"{sample_rate} Hz is too coarse); use fewer n_mels or a longer win_ms")
    return torch.from_numpy(weights.astype(np.float32))


def mel_power(wav: torch.Tensor, fb: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """``[..., T]`` waveform → ``[..., n_mels, 1 + T // hop]`` mel power: STFT (periodic Hann window of ``n_fft``,
    centred frames, zero padding), ``|X|^2``, ``fb @``. With :func:`mel_filterbank` this is
    ``librosa.feature.melspectrogram(y, sr, n_fft=n_fft, hop_length=hop, n_mels=...)``."""
    window = torch.hann_window(n_fft, periodic=True, dtype=wav.dtype, device=wav.device)
    shape = wav.shape
    spec = torch.stft(wav.reshape(-1, shape[-1]), n_fft, hop_length=hop, win_length=n_fft, window=window,
                      center=True, pad_mode="constant", return_complex=True)
    power = spec.real.square() + spec.imag.square()  # [N, n_fft//2 + 1, frames]
    return torch.matmul(fb.to(power.dtype), power).reshape(*shape[:-1], fb.shape[0], -1)


def log_mel(wav: torch.Tensor, fb: torch.Tensor, n_fft: int, hop: int, floor: float = LOG_FLOOR) -> torch.Tensor:
    """``[..., T]`` waveform → ``[..., n_mels, 1 + T // hop]`` ``log(max(mel_power, floor))``."""
    return torch.log(mel_power(wav, fb, n_fft, hop).clamp(min=floor))


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


def _describe(x: Any) -> str:
    if isinstance(x, dict):
        return str(x.get("path") or "<in-memory audio>")
    return _name(x)


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
        from .image import conv_stages
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
        from ._checkpoint import run_stages
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
        from ._checkpoint import checkpoint
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
        x = (x + self.pos[..., :gt]).flatten(2).transpose(1, 2)  # [B, gf*gt, W]
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
