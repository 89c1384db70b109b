"""Audio towers: loading (formats, mono, resampling, bad files), the resampler, log-mel features, the transform,
and every encoder kind on a batch."""
import glob
import math
import pickle
import warnings

import numpy as np
import pytest
import torch

from _requires import importorskip, missing  # skip without what bootstrap installs; fail in CI

sf = importorskip("soundfile", "a dependency of xmodal: pip install -e .[dev]")

from xmodal.config import TowerConfig  # noqa: E402
from xmodal.modalities import KINDS, build_encoder, build_transform  # noqa: E402
from xmodal.modalities import audio as A  # noqa: E402

torch.set_num_threads(2)
LIBRIVOX = sorted(glob.glob("/usr/share/pocketsphinx/test/data/librivox/*.wav"))


def tone(freq, sr, seconds=1.0, amp=0.5, channels=None):
    t = np.arange(int(round(sr * seconds))) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return x if channels is None else np.stack([x] * channels, axis=1)


def peak_hz(x, sr):
    x = np.asarray(x, dtype=np.float64)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()]


# ------------------------------------------------------------------------------------------------------ resampling

@pytest.mark.parametrize("orig,freq", [(44100, 1000.0), (22050, 3000.0), (8000, 1234.0), (48000, 440.0),
                                       (44101, 2500.0)])  # 44101 Hz: the direct (non-polyphase) path
def test_resample_keeps_sine_frequency_and_length(orig, freq):
    x = tone(freq, orig, seconds=1.0)
    y = A.resample(x, orig, 16000)
    assert y.dtype == torch.float32 and y.shape == (math.ceil(len(x) * 16000 / orig),)
    assert abs(peak_hz(y.numpy(), 16000) - freq) <= 2.0  # FFT bin = 1 Hz
    # amplitude kept (a band-limited interpolator, not a box filter): RMS of a 0.5 sine = 0.354
    assert np.sqrt(np.mean(y.numpy()[500:-500] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


def test_resample_removes_frequencies_above_the_new_nyquist():
    y = A.resample(tone(10000.0, 44100), 44100, 16000).numpy()  # 10 kHz > 8 kHz: would alias to 6 kHz
    assert np.sqrt(np.mean(y[500:-500] ** 2)) < 1e-3


def test_resample_identity_and_batch_shape():
    x = torch.randn(2, 3, 1000)
    assert torch.equal(A.resample(x, 16000, 16000), x)
    assert A.resample(x, 16000, 8000).shape == (2, 3, 500)
    with pytest.raises(ValueError, match="positive"):
        A.resample(x, 0, 16000)


def test_resample_matches_soxr_when_installed():
    # soxr is what librosa.resample(res_type="soxr_hq") calls, bit for bit; called directly, the test skips librosa's
    # numba start-up (~20 s in a fresh venv)
    soxr = importorskip("soxr", "installed with librosa (resemblyzer) by pip install -e .[dev]")
    x = tone(700.0, 22050, seconds=0.5) + tone(2900.0, 22050, seconds=0.5, amp=0.2)
    ours = A.resample(x, 22050, 16000).numpy()
    ref = soxr.resample(x, 22050, 16000, quality="HQ")
    n = min(len(ours), len(ref))
    assert np.abs(ours[300:n - 300] - ref[300:n - 300]).max() < 2e-4


# ---------------------------------------------------------------------------------------------------------- mel

def _textbook_mel(f, scale):  # written out again here, independently of the module
    f = np.asarray(f, dtype=np.float64)
    if scale == "htk":
        return 2595 * np.log10(1 + f / 700)
    return np.where(f < 1000, 3 * f / 200, 15 + 27 * np.log(np.maximum(f, 1) / 1000) / np.log(6.4))


@pytest.mark.parametrize("scale", ["slaney", "htk"])
def test_pure_tone_peaks_in_the_mel_band_that_contains_it(scale):
    sr, n_fft, n_mels = 16000, 400, 40
    fb = A.mel_filterbank(sr, n_fft, n_mels, mel_scale=scale)
    edges_mel = np.linspace(0, _textbook_mel(sr / 2, scale), n_mels + 2)
    for freq in (250.0, 700.0, 1500.0, 3100.0, 6000.0):
        feats = A.log_mel(torch.from_numpy(tone(freq, sr)), fb, n_fft, 160)  # [n_mels, frames]
        band = int(feats[:, 10:-10].mean(dim=1).argmax())
        centre_mel = _textbook_mel(freq, scale)
        # the band whose triangle peaks nearest to the tone (centres are edges_mel[1:-1])
        expected = int(np.abs(edges_mel[1:-1] - centre_mel).argmin())
        assert abs(band - expected) <= 1 and edges_mel[band] <= centre_mel <= edges_mel[band + 2], (freq, band)


@pytest.mark.parametrize("scale", ["slaney", "htk"])
def test_filterbank_matches_librosa(scale):
    librosa = importorskip("librosa", "installed with resemblyzer by pip install -e .[dev]")
    for sr, n_fft, n_mels, fmin, fmax in [(16000, 400, 64, 0.0, None), (22050, 2048, 128, 20.0, 8000.0)]:
        ours = A.mel_filterbank(sr, n_fft, n_mels, fmin, fmax, mel_scale=scale).numpy()
        ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=scale == "htk")
        np.testing.assert_allclose(ours, ref, atol=1e-7)


def test_filterbank_with_empty_bands_is_an_error():
    with pytest.raises(ValueError, match="contain no FFT bin"):
        A.mel_filterbank(16000, 128, 128)
    with pytest.raises(ValueError, match="f_min < f_max"):
        A.mel_filterbank(16000, 400, 40, f_min=9000)


def test_log_mel_shape_and_floor():
    fb = A.mel_filterbank(16000, 400, 32)
    out = A.log_mel(torch.zeros(2, 16000), fb, 400, 160)
    assert out.shape == (2, 32, 101)
    assert torch.allclose(out, torch.full_like(out, math.log(A.LOG_FLOOR)))


# --------------------------------------------------------------------------------------------------------- loading

def test_load_stereo_int16_at_another_rate(tmp_path):
    sr = 22050
    left, right = tone(440.0, sr, amp=0.6), tone(440.0, sr, amp=0.2)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), sr, subtype="PCM_16")
    wav = A.load_audio(path, 16000)
    assert wav.dtype == torch.float32 and wav.ndim == 1 and len(wav) == math.ceil(len(left) * 16000 / sr)
    assert abs(peak_hz(wav.numpy(), 16000) - 440.0) <= 2.0
    # mono = mean of the channels: amplitude 0.4
    assert np.abs(wav.numpy()[1000:-1000]).max() == pytest.approx(0.4, abs=0.01)


@pytest.mark.parametrize("fmt,ext", [("FLAC", "flac"), ("OGG", "ogg"), ("WAV", "wav")])
def test_formats(tmp_path, fmt, ext):
    path = tmp_path / f"x.{ext}"
    kwargs = {"subtype": "FLOAT"} if fmt == "WAV" else {}
    sf.write(path, tone(1000.0, 16000), 16000, format=fmt, **kwargs)
    wav = A.load_audio(str(path), 16000)
    assert len(wav) == 16000 and abs(peak_hz(wav.numpy(), 16000) - 1000.0) <= 2.0


def test_load_reads_only_the_window(tmp_path):
    x = np.arange(48000, dtype=np.float32) / 48000  # a ramp: the values tell where the window is
    path = tmp_path / "ramp.wav"
    sf.write(path, x, 16000, subtype="FLOAT")
    centre = A.load_audio(path, 16000, max_seconds=1.0, crop="center").numpy()
    np.testing.assert_allclose(centre, x[16000:32000])
    np.testing.assert_allclose(A.load_audio(path, 16000, max_seconds=1.0, crop="start").numpy(), x[:16000])
    starts = {float(A.load_audio(path, 16000, max_seconds=1.0, crop="random")[0]) for _ in range(8)}
    assert len(starts) > 1 and all(0 <= s <= x[32000] for s in starts)


def _bad_files(tmp_path):
    files = {}
    files["empty"] = tmp_path / "empty.wav"
    files["empty"].write_bytes(b"")
    files["zero frames"] = tmp_path / "zero.wav"
    sf.write(files["zero frames"], np.zeros(0, np.float32), 16000)
    files["corrupt"] = tmp_path / "corrupt.wav"
    files["corrupt"].write_bytes(b"RIFF\x24\x00\x00\x00WAVEnot really audio" * 4)
    files["text"] = tmp_path / "notes.flac"
    files["text"].write_text("this is not audio")
    files["nan"] = tmp_path / "nan.wav"
    sf.write(files["nan"], np.full(100, np.nan, np.float32), 16000, subtype="FLOAT")
    files["missing"] = tmp_path / "missing.wav"
    files["directory"] = tmp_path / "folder.wav"
    files["directory"].mkdir()
    return files


@pytest.mark.parametrize("case,message", [("empty", "empty"), ("zero frames", "no samples"),
                                          ("corrupt", "unreadable"), ("text", "unreadable"),
                                          ("nan", "non-finite"), ("missing", "not found"),
                                          ("directory", "directory")])
def test_bad_audio_raises_audio_error_naming_the_file(tmp_path, case, message):
    path = _bad_files(tmp_path)[case]
    with pytest.raises(A.AudioError, match=message) as e:
        A.load_audio(path, 16000)
    assert str(path) in str(e.value)
    transform = A.AudioTransform(16000, 32, 1.0)  # the transform raises the same error, not a deep crash
    with pytest.raises(A.AudioError, match=message):
        transform(str(path))
    assert isinstance(e.value, ValueError)


# ------------------------------------------------------------------------------------------------------- transform

def test_transform_pads_short_and_crops_long_clips(tmp_path):
    sr = 16000
    short, long_ = tmp_path / "short.wav", tmp_path / "long.wav"
    sf.write(short, tone(500.0, sr, seconds=0.3), sr)
    sf.write(long_, tone(500.0, 8000, seconds=5.0), 8000)  # other rate too
    one = tmp_path / "one.wav"
    sf.write(one, np.array([0.5], np.float32), sr, subtype="FLOAT")  # a single sample is still a clip
    t_eval = A.AudioTransform(sr, 40, 2.0, train=False)
    assert t_eval.n_frames == 201
    outs = [t_eval(str(p)) for p in (short, long_, one)]
    assert all(o.shape == (40, 201) and o.dtype == torch.float32 for o in outs)
    # padding is silence at the end: the log floor after the clip (0.3 s = frame 30, plus the window)
    floor = math.log(A.LOG_FLOOR)
    assert torch.allclose(outs[0][:, 35:], torch.full_like(outs[0][:, 35:], floor))
    assert (outs[0][:, 5:25] > floor + 5).any(dim=0).all()
    wav = t_eval.waveform(str(short))
    assert wav.shape == (32000,) and torch.all(wav[4800:] == 0)
    # eval crops deterministically (centre); train crops a random window
    assert torch.equal(t_eval(str(long_)), t_eval(str(long_)))
    t_train = A.AudioTransform(sr, 40, 0.5, train=True)
    ramp = tmp_path / "ramp.wav"
    sf.write(ramp, np.linspace(-0.9, 0.9, sr * 3).astype(np.float32), sr, subtype="FLOAT")
    starts = {round(float(t_train.waveform(str(ramp))[0]), 4) for _ in range(6)}
    assert len(starts) > 1


def test_transform_min_seconds_rejects_short_clips(tmp_path):
    path = tmp_path / "blip.wav"
    sf.write(path, tone(500.0, 16000, seconds=0.05), 16000)
    t = A.AudioTransform(16000, 32, 1.0, min_seconds=0.2)
    with pytest.raises(A.AudioError, match=r"shorter than min_seconds=0.2 .*blip.wav"):
        t(str(path))


def test_transform_accepts_hf_audio_dicts(tmp_path):
    path = tmp_path / "a.wav"
    x = tone(800.0, 22050, seconds=0.5)
    sf.write(path, x, 22050, subtype="FLOAT")
    t = A.AudioTransform(16000, 32, 1.0)
    ref = t(str(path))
    assert torch.allclose(t({"bytes": path.read_bytes(), "path": "a.wav"}), ref, atol=1e-4)
    assert torch.allclose(t({"path": str(path), "bytes": None}), ref)
    assert torch.allclose(t({"array": x, "sampling_rate": 22050}), ref, atol=1e-3)
    with pytest.raises(A.AudioError, match="unreadable embedded"):
        t({"bytes": b"junk", "path": "b.wav"})
    with pytest.raises(TypeError, match="expected a path"):
        t(12)


def test_build_transform_uses_options_and_is_picklable():
    cfg = TowerConfig(kind="cnn", options={"sample_rate": 8000, "n_mels": 24, "max_seconds": 1.5, "hop_ms": 20})
    t = pickle.loads(pickle.dumps(build_transform("audio", cfg, train=True)))
    assert isinstance(t, A.AudioTransform) and t.train
    assert (t.sample_rate, t.n_mels, t.n_frames) == (8000, 24, 1 + 12000 // 160)
    assert not build_transform("audio", TowerConfig(kind="cnn", augment=False), train=True).train
    with pytest.raises(ValueError, match=r"model\.towers\.audio\.options\.n_mels"):
        build_transform("audio", TowerConfig(kind="cnn", options={"n_mels": 0}), train=False)
    with pytest.raises(ValueError, match=r"model\.towers\.audio\.options\.mel_scale"):
        build_transform("audio", TowerConfig(kind="cnn", options={"mel_scale": "bark"}), train=False)


# -------------------------------------------------------------------------------------------------------- encoders

SMALL = {"sample_rate": 16000, "n_mels": 32, "max_seconds": 1.0}
CASES = [
    TowerConfig(kind="cnn", options={**SMALL, "channels": [8, 16, 32]}),
    TowerConfig(kind="transformer", options={**SMALL, "patch": [16, 20], "width": 32, "layers": 2, "heads": 2}),
    TowerConfig(kind="resemblyzer", pretrained="package", options={"max_seconds": 2.0}),
]


def _clips(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i, (sr, seconds, ch) in enumerate([(16000, 0.4, None), (22050, 3.0, 2), (8000, 1.2, None)]):
        x = tone(300.0 * (i + 1), sr, seconds, channels=ch)
        x = x + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
        p = tmp_path / f"clip{i}.wav"
        sf.write(p, x, sr)
        paths.append(str(p))
    return paths


def test_kinds():
    assert KINDS["audio"] == ("cnn", "transformer", "resemblyzer")


@pytest.mark.parametrize("cfg", CASES, ids=[c.kind for c in CASES])
def test_every_audio_kind_builds_and_runs(cfg, tmp_path):
    if cfg.kind == "resemblyzer":
        importorskip("resemblyzer", "the assets extra: pip install -e .[dev]")
    encoder, feat_dim = build_encoder("audio", cfg)
    grads = cfg.kind != "resemblyzer"
    for train in (True, False):
        transform = pickle.loads(pickle.dumps(build_transform("audio", cfg, train=train)))
        batch = torch.stack([transform(p) for p in _clips(tmp_path)])
        assert batch.dtype == torch.float32 and batch.shape == (3, transform.n_mels if grads else 40,
                                                                transform.n_frames)
        encoder.train(train)
        with torch.set_grad_enabled(train and grads):
            out = encoder(batch)
        assert out.shape == (3, feat_dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
        if train and grads:
            out.square().mean().backward()
            assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)


def test_audio_tower_projects_into_the_shared_space(tmp_path):
    from xmodal.model import Tower

    cfg = CASES[0]
    encoder, feat_dim = build_encoder("audio", cfg)
    tower = Tower(encoder, feat_dim, embed_dim=16).eval()
    t = build_transform("audio", cfg, train=False)
    out = tower(torch.stack([t(p) for p in _clips(tmp_path)]))
    assert out.shape == (3, 16) and torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_encoder_option_errors():
    with pytest.raises(ValueError, match=r"model\.towers\.audio\.options\.depth: unknown option"):
        build_encoder("audio", TowerConfig(kind="cnn", options={"depth": 3}))
    with pytest.raises(ValueError, match=r"model\.towers\.audio\.pretrained: .*no pretrained"):
        build_encoder("audio", TowerConfig(kind="cnn", pretrained="package"))
    with pytest.raises(ValueError, match=r"options\.width \(30\) must be divisible by heads \(4\)"):
        build_encoder("audio", TowerConfig(kind="transformer", options={"width": 30, "heads": 4}))
    with pytest.raises(ValueError, match=r"options\.patch: .*larger than the spectrogram"):
        build_encoder("audio", TowerConfig(kind="transformer", options={"n_mels": 8, "patch": 16}))
    with pytest.raises(ValueError, match=r"options\.channels"):
        build_encoder("audio", TowerConfig(kind="cnn", options={"channels": []}))


def test_transformer_rejects_a_spectrogram_of_another_size():
    enc, _ = build_encoder("audio", CASES[1])
    with pytest.raises(ValueError, match="does not fit the built grid"):
        enc(torch.zeros(1, 48, 101))


def test_resemblyzer_matches_embed_utterance():
    importorskip("resemblyzer", "the assets extra: pip install -e .[dev]")
    if not LIBRIVOX:
        missing("apt-get install pocketsphinx-testdata")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from resemblyzer import VoiceEncoder, preprocess_wav
    files = [f for f in LIBRIVOX if f.endswith(("-0880.wav", "-0930.wav"))]  # the two short ones (3.0 s, 3.3 s)
    cfg = TowerConfig(kind="resemblyzer", pretrained="package", options={"max_seconds": 4.0})
    encoder, feat_dim = build_encoder("audio", cfg)
    transform = build_transform("audio", cfg, train=False)
    with torch.no_grad():
        ours = encoder.eval()(torch.stack([transform(f) for f in files])).numpy()
    ref_model = VoiceEncoder("cpu", verbose=False)
    ref = np.stack([ref_model.embed_utterance(preprocess_wav(f)) for f in files])
    # the features are Resemblyzer's (librosa melspectrogram), computed without librosa
    from resemblyzer import wav_to_mel_spectrogram
    wav = preprocess_wav(files[0])
    np.testing.assert_allclose(transform(files[0])[:, : (len(wav) + 198) // 160 - 2].numpy(),
                               wav_to_mel_spectrogram(wav).T[:, : (len(wav) + 198) // 160 - 2], rtol=1e-3, atol=1e-6)
    assert feat_dim == 256
    np.testing.assert_allclose((ours * ref).sum(axis=1), 1.0, atol=1e-4)
    with pytest.raises(ValueError, match="sample_rate: unknown option for audio kind resemblyzer"):
        build_encoder("audio", TowerConfig(kind="resemblyzer", options={"sample_rate": 22050}))


def test_resemblyzer_silence_and_pretrained_errors():
    importorskip("resemblyzer", "the assets extra: pip install -e .[dev]")
    enc, _ = build_encoder("audio", TowerConfig(kind="resemblyzer", pretrained="package"))
    with torch.no_grad():
        out = enc.eval()(torch.zeros(2, 40, 201))  # all padding: one silent partial each
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"model\.towers\.audio\.pretrained: .*not a file"):
        build_encoder("audio", TowerConfig(kind="resemblyzer", pretrained="hub"))


def test_resemblyzer_partials_match_the_package():
    resemblyzer = importorskip("resemblyzer", "the assets extra: pip install -e .[dev]")
    for n_samples in (100, 16000, 25600, 40000, 77777, 160000):
        _, mel_slices = resemblyzer.VoiceEncoder.compute_partial_slices(n_samples, 1.3, 0.75)
        last_frame = (n_samples + 198) // 160  # last frame that sees a sample (centred 400-sample window)
        ours = A.partial_starts(last_frame + 1)
        assert abs(len(ours) - len(mel_slices)) <= 1
        assert ours[: min(len(ours), len(mel_slices))] == [s.start for s in mel_slices][: len(ours)]


def test_real_speech_through_the_cnn_transform():
    if not LIBRIVOX:
        missing("apt-get install pocketsphinx-testdata")
    t = A.AudioTransform(16000, 64, 10.0)
    feats = t(LIBRIVOX[1])  # "he was not an ill disposed young man", 2.99 s
    assert feats.shape == (64, 1001)
    voiced = feats[:, :299].max(dim=0).values
    assert (voiced > math.log(A.LOG_FLOOR) + 5).float().mean() > 0.9
    assert torch.allclose(feats[:, 305:], torch.full_like(feats[:, 305:], math.log(A.LOG_FLOOR)))
