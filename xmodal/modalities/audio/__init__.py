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
from .encoders import (AudioCNN, AudioTransform, AudioTransformer, audio_settings, build_audio_cnn,
                       build_audio_transform, build_audio_transformer)
from .resemblyzer import (RESEMBLYZER_HOP, RESEMBLYZER_N_FFT, RESEMBLYZER_N_MELS, RESEMBLYZER_PARTIAL_FRAMES,
                          RESEMBLYZER_SAMPLE_RATE, ResemblyzerEncoder, ResemblyzerTransform, build_resemblyzer,
                          partial_starts)
from .signal import (AUDIO_OPTIONS, CNN_OPTIONS, DEFAULT_MAX_SECONDS, DEFAULT_N_MELS, DEFAULT_SAMPLE_RATE, LOG_FLOOR,
                     RESEMBLYZER_OPTIONS, TRANSFORMER_OPTIONS, AudioError, audio_info, check_audio_file, decode_audio,
                     fix_length, hz_to_mel, load_audio, log_mel, mel_filterbank, mel_power, mel_to_hz, read_audio_bytes,
                     resample)

__all__ = ["AUDIO_OPTIONS", "AudioCNN", "AudioError", "AudioTransform", "AudioTransformer", "CNN_OPTIONS",
           "DEFAULT_MAX_SECONDS", "DEFAULT_N_MELS", "DEFAULT_SAMPLE_RATE", "LOG_FLOOR", "RESEMBLYZER_HOP",
           "RESEMBLYZER_N_FFT", "RESEMBLYZER_N_MELS", "RESEMBLYZER_OPTIONS", "RESEMBLYZER_PARTIAL_FRAMES",
           "RESEMBLYZER_SAMPLE_RATE", "ResemblyzerEncoder", "ResemblyzerTransform", "TRANSFORMER_OPTIONS",
           "audio_info", "audio_settings", "build_audio_cnn", "build_audio_transform", "build_audio_transformer",
           "build_resemblyzer", "check_audio_file", "decode_audio", "fix_length", "hz_to_mel", "load_audio",
           "log_mel", "mel_filterbank", "mel_power", "mel_to_hz", "partial_starts", "read_audio_bytes",
           "resample"]
