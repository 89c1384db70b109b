"""Speech corpora: LibriVox rows against the transcription file, spoken captions synthesised for an image–text
manifest (espeak-ng / flite)."""
import csv
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _requires import importorskip, needs  # skip without what bootstrap installs; fail in CI

sf = importorskip("soundfile", "a dependency of xmodal: pip install -e .[dev]")

from xmodal.data.corpora import speech  # noqa: E402
from xmodal.data.manifest import read_manifest  # noqa: E402

LIBRIVOX = Path(speech.LIBRIVOX_ROOT)
needs_librivox = needs((LIBRIVOX / "transcription").is_file(), "apt-get install pocketsphinx-testdata")
needs_espeak = needs(shutil.which("espeak-ng") is not None, "apt-get install espeak-ng")
needs_flite = needs(shutil.which("flite") is not None, "apt-get install flite")


def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------------- LibriVox

@needs_librivox
def test_librivox_rows_match_the_transcription_file(tmp_path):
    expected = {}
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        if line.strip():
            words, fid = line.rsplit("(", 1)
            expected[fid.strip().rstrip(")")] = " ".join(w for w in words.split() if w not in ("<s>", "</s>"))
    manifest = speech.prepare_librivox(tmp_path / "lv")
    rows = _rows(manifest)
    assert len(rows) == len(expected) == 5
    assert {r["id"]: r["text"] for r in rows} == expected
    assert expected["sense_and_sensibility_01_austen_64kb-0880"] == "he was not an ill disposed young man"
    for r in rows:
        assert r["split"] == "test" and os.path.isabs(r["audio"]) and Path(r["audio"]).stem == r["id"]
        info = sf.info(r["audio"])
        assert info.samplerate == 16000 and info.channels == 1 and info.duration > 2.0
        # read speech runs at 1.5-4 words per second
        assert 1.5 < len(r["text"].split()) / info.duration < 4.0
    m = read_manifest(manifest, allow_outside_root=True)  # the installed files lie outside the manifest's folder
    assert set(m.modalities) == {"text", "audio"} and len(m) == 5


def test_parse_transcription_rejects_malformed_lines(tmp_path):
    path = tmp_path / "transcription"
    path.write_text("<s> hello world </s> (utt1)\n\nno id here\n")
    with pytest.raises(ValueError, match="line 3"):
        speech.parse_transcription(path)
    path.write_text("<s> hello world </s> (utt1)\nbye (utt2)\n")
    assert speech.parse_transcription(path) == {"utt1": "hello world", "utt2": "bye"}


# ------------------------------------------------------------------------------------------------ spoken captions

def test_spoken_text_rules():
    assert speech.spoken_text("Armadillo. keywords: architetto francesco rollandin, animal") == "Armadillo"
    assert speech.spoken_text("New Penguin. A different kind of Linux penguin. keywords: icon") == "New Penguin"
    assert speech.spoken_text("a centered photo of an ankle boot.") == "a centered photo of an ankle boot"
    assert speech.spoken_text("version 2.5 of the logo! more") == "version 2.5 of the logo"
    assert speech.spoken_text(" ".join(f"w{i}" for i in range(40)), max_words=5) == "w0 w1 w2 w3 w4"
    assert speech.spoken_label("T-shirt/top") == "T-shirt or top"
    assert speech.spoken_label("ankle_boot") == "ankle boot"


CAPTIONS = [
    "Dog.",
    "A red apple. keywords: fruit, food",
    "Two small boats on a calm lake.",
    "An old wooden house with a green door and a tall chimney beside a river.",
    "A very long caption about a yellow school bus driving slowly down a quiet street on a rainy autumn "
    "morning while children wait.",
    "...",  # says nothing: dropped and counted as failed
]


def _image_text_manifest(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for i, caption in enumerate(CAPTIONS):
        Image.new("RGB", (8, 8), (30 * i, 10, 10)).save(root / "images" / f"{i}.png")
        rows.append({"id": f"r{i}", "image": f"images/{i}.png", "text": caption, "label": f"class {i % 2}",
                     "split": "train" if i % 3 else "val"})
    path = root / "manifest.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "text", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    return path


def _speech_fraction(x, sr):
    """Fraction of 20 ms frames within 35 dB of the loudest frame."""
    n = sr // 50
    frames = x[: len(x) // n * n].reshape(-1, n)
    db = 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-12)
    return float(np.mean(db > db.max() - 35))


@needs_espeak
def test_spoken_captions_one_voice(tmp_path):
    src = _image_text_manifest(tmp_path / "src")
    out = speech.prepare_spoken_captions(src, tmp_path / "speech", voice="en-us", progress=False)
    rows = _rows(out)
    info = json.loads((tmp_path / "speech" / "prepare.json").read_text())
    assert info["failed"] == 1 and len(rows) == 5 and [r["id"] for r in rows] == ["r0", "r1", "r2", "r3", "r4"]
    assert list(rows[0]) == ["id", "image", "text", "audio", "spoken_text", "voice", "label", "split"]
    durations = []
    for r, caption in zip(rows, CAPTIONS):
        assert r["text"] == caption and r["voice"] == "espeak-ng:en-us"
        wav = tmp_path / "speech" / r["audio"]
        data, sr = sf.read(wav, dtype="float32")
        assert sr == 16000 and data.ndim == 1 and sf.info(wav).subtype == "PCM_16"
        assert np.sqrt(np.mean(data ** 2)) > 0.01 and _speech_fraction(data, sr) > 0.3
        durations.append(len(data) / sr)
        # image paths stay valid: relative to the new manifest's folder, pointing at the original files
        assert (tmp_path / "speech" / r["image"]).resolve() == (tmp_path / "src" / r["image"].split("src/")[-1])
    assert rows[1]["spoken_text"] == "A red apple"
    assert durations == sorted(durations) and durations[-1] > 2.5 * durations[0]
    m = read_manifest(out, allow_outside_root=True)  # the images stay in the source corpus' folder (../src/...)
    assert set(m.modalities) == {"image", "text", "audio"} and len(m) == 5

    # idempotent: same parameters → returned at once, no file rewritten
    mtimes = {r["audio"]: (tmp_path / "speech" / r["audio"]).stat().st_mtime_ns for r in rows}
    t0 = time.time()
    assert speech.prepare_spoken_captions(src, tmp_path / "speech", voice="en-us", progress=False) == out
    assert time.time() - t0 < 1.0
    assert {a: (tmp_path / "speech" / a).stat().st_mtime_ns for a in mtimes} == mtimes
    # other parameters (a limit) reuse the existing clips
    speech.prepare_spoken_captions(src, tmp_path / "speech", voice="en-us", limit=2, progress=False)
    info = json.loads((tmp_path / "speech" / "prepare.json").read_text())
    assert len(_rows(out)) == 2 and info["reused"] == 2 and info["synthesised"] == 0


@needs_espeak
def test_spoken_captions_vary_the_voice(tmp_path):
    src = _image_text_manifest(tmp_path / "src")
    out = speech.prepare_spoken_captions(src, tmp_path / "speech", limit=4, workers=2, progress=False)
    rows = _rows(out)
    assert len(rows) == 4
    voices = [r["voice"] for r in rows]
    assert len(set(voices)) == 4 and all(v.startswith("espeak-ng:") and "speed=" in v for v in voices)
    again = speech.prepare_spoken_captions(src, tmp_path / "speech2", limit=4, progress=False)
    assert [r["voice"] for r in _rows(again)] == voices  # deterministic (hash of seed and row id)


@needs_flite
def test_spoken_class_names_with_flite(tmp_path):
    src = _image_text_manifest(tmp_path / "src")
    out = speech.prepare_spoken_captions(src, tmp_path / "labels", engine="flite", speak="label", progress=False)
    rows = _rows(out)
    assert len(rows) == len(CAPTIONS) and {r["spoken_text"] for r in rows} == {"class 0", "class 1"}
    for r in rows[:2]:
        data, sr = sf.read(tmp_path / "labels" / r["audio"], dtype="float32")
        assert sr == 16000 and 0.3 < len(data) / sr < 3.0 and np.sqrt(np.mean(data ** 2)) > 0.01


def test_spoken_captions_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="engine"):
        speech.prepare_spoken_captions(tmp_path / "m.csv", tmp_path / "o", engine="say")
    if shutil.which("espeak-ng"):
        with pytest.raises(ValueError, match="speak"):
            speech.prepare_spoken_captions(tmp_path / "m.csv", tmp_path / "o", speak="title")
