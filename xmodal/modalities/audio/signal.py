"""Audio signals: loading (soundfile), band-limited resampling, length handling and log-mel features —
the numerics the audio towers' transforms are made of (see :mod:`xmodal.modalities.audio`)."""
from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

DEFAULT_SAMPLE_RATE = 16000
DEFAULT_N_MELS = 64
DEFAULT_MAX_SECONDS = 10.0
LOG_FLOOR = 1e-6  # log(max(mel, LOG_FLOOR)): silence and zero padding become log(1e-6) ~ -13.8

from ..builtin import AUDIO_OPTIONS, CNN_OPTIONS, RESEMBLYZER_OPTIONS, TRANSFORMER_OPTIONS  # noqa: F401 (re-exported)


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

def _describe(x: Any) -> str:
    if isinstance(x, dict):
        return str(x.get("path") or "<in-memory audio>")
    return _name(x)


def read_audio_bytes(data: bytes) -> dict:
    """An encoded clip's bytes (a shard member, an upload) as the ``{"bytes": ...}`` value :func:`decode_audio` and
    the audio transforms take; decoding happens in the transform, at the tower's rate."""
    return {"bytes": bytes(data), "path": None}


def check_audio_file(path: str) -> str | None:
    """The file's header must parse (libsndfile via soundfile: WAV incl. float/extensible, FLAC, OGG, MP3, AIFF,
    ...) and announce at least one frame. Only the header is read (O(1) per file); samples are decoded at training
    time, where :class:`xmodal.modalities.audio.AudioError` names a file whose data turns out to be bad. Without
    soundfile installed, only WAV files are checked (stdlib ``wave``, integer PCM only)."""
    import wave

    try:
        import soundfile as sf
    except ImportError:
        sf = None
    if sf is not None:
        try:
            info = sf.info(path)
        except Exception as e:  # noqa: BLE001 - soundfile.LibsndfileError and friends
            reason = str(e).strip() or type(e).__name__
            reason = reason.split(": ", 1)[-1] if reason.startswith("Error opening") else reason
            return f"unreadable audio file ({reason}): {path}"
        if info.frames <= 0:
            return f"audio file has no samples (0 frames): {path}"
        if info.samplerate <= 0 or info.channels <= 0:
            return f"audio file has an invalid header ({info.samplerate} Hz, {info.channels} channels): {path}"
        return None
    if path.lower().endswith(".wav"):
        try:
            with wave.open(path, "rb") as w:
                if w.getnframes() == 0:
                    return f"WAV file has no audio frames: {path}"
        except (wave.Error, EOFError) as e:
            return f"unreadable WAV file ({e}): {path}"
    return None
