"""Manifest validation of the ``audio`` column: every libsndfile format is accepted, unusable files are named."""
import numpy as np
import pytest

from _requires import importorskip  # skip without what bootstrap installs; fail in CI

sf = importorskip("soundfile", "a dependency of xmodal: pip install -e .[dev]")

from xmodal.data.manifest import ManifestError, read_manifest  # noqa: E402


def _write(tmp_path, rows):
    path = tmp_path / "manifest.csv"
    lines = ["id,audio,text"] + [f"{i},{a},caption {i}" for i, a in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _good(tmp_path):
    x = (0.3 * np.sin(np.linspace(0, 200, 8000))).astype(np.float32)
    (tmp_path / "a").mkdir()
    sf.write(tmp_path / "a" / "int16.wav", x, 16000, subtype="PCM_16")
    sf.write(tmp_path / "a" / "float.wav", x, 16000, subtype="FLOAT")  # the stdlib `wave` module rejects these
    sf.write(tmp_path / "a" / "stereo.flac", np.stack([x, x], 1), 44100)
    sf.write(tmp_path / "a" / "clip.ogg", x, 22050)
    return ["a/int16.wav", "a/float.wav", "a/stereo.flac", "a/clip.ogg"]


def test_every_readable_format_passes(tmp_path):
    files = _good(tmp_path)
    m = read_manifest(_write(tmp_path, list(enumerate(files))))
    assert set(m.modalities) == {"audio", "text"}
    assert m.dataset["audio"] == [str(tmp_path / f) for f in files]


@pytest.mark.parametrize("case,message", [
    ("empty", "file is empty"),
    ("zero", "audio file has no samples"),
    ("corrupt", "unreadable audio file"),
    ("text", "unreadable audio file"),
    ("missing", "file not found"),
])
def test_bad_audio_rows_are_named(tmp_path, case, message):
    files = _good(tmp_path)
    bad = tmp_path / f"bad_{case}.wav"
    if case == "empty":
        bad.write_bytes(b"")
    elif case == "zero":
        sf.write(bad, np.zeros(0, np.float32), 16000)
    elif case == "corrupt":
        bad.write_bytes(b"RIFF\x24\x00\x00\x00WAVE" + bytes(range(256)))
    elif case == "text":
        bad = tmp_path / "notes.flac"
        bad.write_text("definitely not audio")
    manifest = _write(tmp_path, [*enumerate(files), ("x7", bad.name)])
    with pytest.raises(ManifestError, match=rf"row 5 \(id 'x7'\): field 'audio': {message}") as e:
        read_manifest(manifest)
    assert str(bad) in str(e.value)
    m = read_manifest(manifest, on_bad_row="skip")
    assert m.skipped == 1 and len(m) == 4 and message in m.problems[0]
