"""Frozen towers' features on a shard stream, cached on disk as training computes them (xmodal/data/stream_features.py):
a second epoch and a second run read them instead of running the encoder; the cached values are the encoder's own on
the real drawings; training on them gives the weights training without the cache gives; a SIGKILLed run resumed with
its cache still takes every id of the epoch once; a damaged cache shard is dropped and embedded again."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file

import xmodal.training.build as build
from test_fault_injection import FAULTS, damage
from xmodal.cli import main
from xmodal.config import config_from_dict, save_config
from xmodal.data.shards import parse_columns, shard_list
from xmodal.data.stream_features import sample_key, shard_identity
from xmodal.model import load
from xmodal.training.checkpoint import latest_checkpoint

ROOT = Path(__file__).resolve().parent.parent
BATCH = 12


def _config(shards: Path, out: Path, cache, epochs: int = 2, workers: int = 2, **train) -> Path:
    """A frozen CNN image tower (cached) and a trained LSTM text tower, on every shard of ``shards``."""
    n = len(json.loads((shards / "sizes.json").read_text()))
    cfg = config_from_dict({
        "output_dir": str(out), "seed": 1,
        "model": {"embed_dim": 16, "towers": {
            "image": {"kind": "cnn", "image_size": 16, "augment": False, "freeze": True,
                      "options": {"channels": [4, 8]}},
            "text": {"kind": "lstm", "context_length": 12, "options": {"embed_dim": 16, "hidden": 16}}}},
        "data": {"shards": str(shards / f"{{00000..{n - 1:05d}}}.tar"), "record_ids": True, "num_workers": workers,
                 "shuffle_block": 5},
        "train": {"batch_size": BATCH, "epochs": epochs, "warmup_steps": 0, "progress": False, "deterministic": True,
                  "feature_cache_dir": str(cache), **train},
        "log": {"backend": "none"}})
    path = out.parent / f"{out.name}.yaml"
    save_config(cfg, path)
    return path


@pytest.fixture(scope="module")
def shards(clipart, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache_shards")
    assert main(["shard", "--manifest", str(clipart), "--out", str(out), "--samples-per-shard", "20"]) == 0
    return out


def _ids(run: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for line in (run / "ids" / "rank0.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out.setdefault(rec["epoch"], []).extend(rec["ids"])
    return out


@pytest.fixture()
def encoded(monkeypatch) -> list[int]:
    """Rows the frozen image encoder runs on, over every model built for training in this test."""
    rows: list[int] = []
    real = build.build_model

    def counting(*a, **k):
        model = real(*a, **k)
        model.towers["image"].encoder.register_forward_hook(lambda m, i, o: rows.append(len(i[0])))
        return model
    monkeypatch.setattr(build, "build_model", counting)
    return rows


def _cached(cache: Path) -> dict[bytes, torch.Tensor]:
    """Every row of the cache, key → features, read with safetensors (not xmodal's reader)."""
    out = {}
    for shard in sorted(cache.glob("*/*.safetensors")):
        t = load_numpy(str(shard))
        for k, f in zip(t["keys"], t["features"]):
            assert k.tobytes() not in out  # one row per sample
            out[k.tobytes()] = torch.from_numpy(f.copy())
    return out


def _samples(shards: Path) -> dict[str, tuple[bytes, bytes]]:
    """id → (cache key of its image column, its .jpg/.png bytes), from the tars themselves."""
    out = {}
    [column] = parse_columns({}, ["image"])  # the run's own column spec (data.columns unset)
    for shard in shard_list(sorted(str(p) for p in shards.glob("*.tar"))):
        with tarfile.open(shard.url) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name, data in members.items():
            key, ext = name.rsplit(".", 1)
            if ext in ("jpg", "png"):
                sid = json.loads(members[f"{key}.json"])["id"]
                out[str(sid)] = (sample_key(shard_identity(shard), key, column), data)
    return out


def test_second_epoch_and_second_run_read_the_frozen_features_from_disk(shards, tmp_path, encoded):
    cache = tmp_path / "cache"
    first = tmp_path / "first"
    assert main(["pretrain", "--config", str(_config(shards, first, cache))]) == 0
    ids = _ids(first)
    assert len(ids[0]) == len(set(ids[0])) and ids[0] != ids[1]
    distinct = set(ids[0]) | set(ids[1])  # epoch 1 may hold the few samples epoch 0 left out
    assert sum(encoded) == len(distinct)  # epoch 1 ran the encoder only on those
    rows = _cached(cache)
    assert len(rows) == len(distinct) and len(list(cache.iterdir())) == 1  # one tower folder

    # The cached values are the encoder's own on each drawing (decoded from the tar, evaluation transform).
    model = load(first)
    encoder, transform = model.towers["image"].encoder.eval(), model.transform("image")
    samples = _samples(shards)
    some = sorted(distinct)[:24]
    with torch.no_grad():
        fresh = encoder(torch.stack([transform(Image.open(io.BytesIO(samples[i][1]))) for i in some]))
    torch.testing.assert_close(torch.stack([rows[samples[i][0]] for i in some]), fresh, atol=1e-5, rtol=0)

    # Another run over the same shards: nothing embedded; the same weights as a run without any cache.
    del encoded[:]
    second = tmp_path / "second"
    assert main(["pretrain", "--config", str(_config(shards, second, cache))]) == 0
    assert sum(encoded) == 0 and _ids(second) == ids
    plain = tmp_path / "plain"
    assert main(["pretrain", "--config", str(_config(shards, plain, "off"))]) == 0
    assert sum(encoded) == 2 * len(ids[0])  # without the cache: every step's batch, each epoch
    got, want = load_file(str(second / "model.safetensors")), load_file(str(plain / "model.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sigkill_in_a_cached_epoch_then_resume_sees_every_id_once(shards, tmp_path):
    """Killed (SIGKILL) in epoch 1, whose features come from the cache epoch 0 wrote, past a checkpoint; resumed:
    epoch 1's batches before the checkpoint and after it hold each of its ids once, read from the cache."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    config = _config(shards, run, cache, workers=0, save_every=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XMODAL_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "xmodal.cli", "pretrain", "--config", str(config)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps = sum(json.loads((shards / "sizes.json").read_text()).values()) // BATCH
    deadline = time.monotonic() + 300
    try:
        while True:  # a checkpoint inside epoch 1 and a batch after it
            ckpt = latest_checkpoint(run)
            at = int(ckpt.name.split("_")[1]) if ckpt else 0
            ids = run / "ids" / "rank0.jsonl"
            recs = ids.read_text().splitlines() if ids.is_file() else []
            if at > steps and len(recs) > at:
                break
            assert proc.poll() is None, "training ended before the kill"
            assert time.monotonic() < deadline, "no checkpoint in epoch 1 in time"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = latest_checkpoint(run)
    resumed_at = int(ckpt.name.split("_")[1]) - steps  # epoch 1's batches before the checkpoint
    lines = (run / "ids" / "rank0.jsonl").read_text().splitlines()
    before = [json.loads(x) for x in lines if json.loads(x)["epoch"] == 1 and json.loads(x)["batch"] < resumed_at]
    out = subprocess.run([*cmd, "--resume"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    after = [json.loads(x) for x in (run / "ids" / "rank0.jsonl").read_text().splitlines()[len(lines):]]
    assert [r["batch"] for r in before + after] == list(range(steps))
    seen = [i for r in before + after for i in r["ids"]]
    assert len(seen) == len(set(seen)) == steps * BATCH
    read = [ln for ln in out.stderr.splitlines() if "frozen image features:" in ln]
    assert read and " 0 read from the cache" not in read[-1], out.stderr[-2000:]


@pytest.fixture(scope="module")
def clean_caches(shards, tmp_path_factory) -> dict[int, Path]:
    """{seed: folder} for seeds 1 and 2 (other frozen weights): one epoch trained, its features in ``cache``."""
    out = {}
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"clean_cache{seed}")
        config = _config(shards, folder / "run", folder / "cache", epochs=1, workers=0)
        assert main(["pretrain", "--config", str(config), f"seed={seed}"]) == 0
        out[seed] = folder
    return out


@pytest.mark.parametrize("fault", FAULTS)
def test_a_damaged_cache_shard_is_dropped_and_embedded_again(shards, clean_caches, tmp_path, capfd, fault, encoded):
    """As on the manifest path (test_fault_injection.py): one warning naming the shard, the shard removed, its
    samples embedded again — and exactly the weights of the run that wrote the cache. From another run: the seed-2
    run's shard (another frozen tower, the same samples) put in place of this tower's, under its own name."""
    cache = tmp_path / "cache"
    shutil.copytree(clean_caches[1] / "cache", cache)
    clean = _cached(cache)
    [shard] = sorted(cache.glob("*/*.safetensors"))
    if fault == "from another run":
        [foreign] = sorted((clean_caches[2] / "cache").glob("*/*.safetensors"))
        assert foreign.parent.name != shard.parent.name
        shard.unlink()
        shard = shard.parent / foreign.name
        shutil.copyfile(foreign, shard)
    else:
        damage(shard, fault, shard)
    from xmodal.feature_store import FeatureStore
    FeatureStore._verified.clear()  # a new process has verified nothing
    capfd.readouterr()
    run = tmp_path / "run"
    assert main(["pretrain", "--config", str(_config(shards, run, cache, epochs=1, workers=0))]) == 0
    err = capfd.readouterr().err
    warned = [ln for ln in err.splitlines() if "feature cache:" in ln and "is damaged" in ln]
    assert len(warned) == (0 if fault == "missing" else 1), err
    assert all(str(shard) in ln and "embedded again" in ln for ln in warned), warned
    assert sum(encoded) == len(_ids(run)[0])  # every sample embedded again
    assert _cached(cache).keys() == clean.keys()
    got, want = (load_file(str(r / "model.safetensors")) for r in (run, clean_caches[1] / "run"))
    assert all(torch.equal(got[k], want[k]) for k in want)
