"""Frozen-tower features on disk: a later command reads them instead of embedding again, exactly; a changed file or
tower is embedded again; a damaged shard is rebuilt, never served; a pass killed half-way keeps its shards; two
processes share one cache."""
import csv
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xmodal.config import ModelConfig, TowerConfig
from xmodal.feature_cache import disk_cache, precompute_features, tower_settings
from xmodal.model import XModalModel, load

ROOT = Path(__file__).resolve().parent.parent


def frozen_model():
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=16, towers={
        "image": TowerConfig(kind="cnn", image_size=32, freeze=True, augment=False, options={"channels": [8, 16]}),
        "text": TowerConfig(kind="lstm", context_length=16, freeze=True, options={"embed_dim": 16, "hidden": 16})})
    return XModalModel(cfg).eval()


def count_rows(module):
    calls = []
    module.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    return calls


@pytest.fixture()
def rows(clipart):
    """Real Open Clip Art drawings (absolute paths) and their titles: 20 of the test split."""
    found = [r for r in csv.DictReader(open(clipart, encoding="utf-8")) if r["split"] == "test"][:20]
    return [str(clipart.parent / r["image"]) for r in found], [r["text"] for r in found]


def test_a_second_command_reads_every_feature_from_disk(rows, tmp_path):
    images, texts = rows
    first = frozen_model()
    plain = first.encode("image", images), first.encode("text", texts)
    run = first.save(tmp_path / "run")
    with disk_cache(tmp_path / "cache"):
        calls = count_rows(first.towers["image"].encoder), count_rows(first.towers["text"].encoder)
        cached = first.encode("image", images), first.encode("text", texts)
        assert [sum(c) for c in calls] == [len(set(images)), len(set(texts))]
        second = load(run)  # another command: a new process would load the same saved model
        calls = count_rows(second.towers["image"].encoder), count_rows(second.towers["text"].encoder)
        again = second.encode("image", images[::-1]), second.encode("text", texts)
    assert [sum(c) for c in calls] == [0, 0]  # nothing embedded: every feature came from the shards
    assert torch.equal(again[0], cached[0].flip(0)) and torch.equal(again[1], cached[1])  # bit for bit
    for a, b in zip(cached, plain):  # and what the towers compute without any cache
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert len(list((tmp_path / "cache").glob("*/*.safetensors"))) == 2  # one shard per tower


def test_a_changed_file_or_changed_weights_are_embedded_again(rows, tmp_path):
    images = [str(tmp_path / Path(p).name) for p in rows[0][:6]]
    for src, dst in zip(rows[0], images):
        Path(dst).write_bytes(Path(src).read_bytes())
    model = frozen_model()
    enc = model.towers["image"].encoder
    calls = count_rows(enc)
    with disk_cache(tmp_path / "cache"):
        model.encode("image", images)
        st = os.stat(images[0])
        os.utime(images[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: same bytes, new mtime
        Path(images[1]).write_bytes(Path(rows[0][10]).read_bytes())  # rewritten with another drawing
        del calls[:]
        after = model.encode("image", images)
        assert sum(calls) == 2  # only the two changed files
        torch.testing.assert_close(after[1], model.encode("image", [rows[0][10]])[0], atol=1e-6, rtol=0)
        with torch.no_grad():
            next(enc.parameters()).mul_(0.5)  # new weights: another tower, nothing of the old one is served
        del calls[:]
        new = model.encode("image", images)
        assert sum(calls) == len(images)
    torch.testing.assert_close(new, model.encode("image", images), atol=1e-6, rtol=0)
    assert not torch.allclose(new, after)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_shard_is_rebuilt_with_one_warning(rows, tmp_path, caplog, damage):
    texts = rows[1]
    model = frozen_model()
    calls = count_rows(model.towers["text"].encoder)
    with disk_cache(tmp_path / "cache"):
        good = model.encode("text", texts)
        (shard,) = (tmp_path / "cache").glob("*/*.safetensors")
        data = bytearray(shard.read_bytes())
        if damage == "flip":
            data[-3] ^= 0x40  # one bit of the last feature: same size, a wrong value if it were served
        else:
            data = data[:-100]
        shard.write_bytes(bytes(data))
        from xmodal.feature_store import FeatureStore
        FeatureStore._verified.clear()  # a new process has verified nothing
        del calls[:]
        with caplog.at_level(logging.WARNING, logger="xmodal.feature_store"):
            rebuilt = model.encode("text", texts)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and str(shard) in warned[0] and "damaged" in warned[0], warned
    assert sum(calls) == len(set(texts))  # embedded again ...
    assert torch.equal(rebuilt, good)  # ... to the right values
    (again,) = (tmp_path / "cache").glob("*/*.safetensors")  # written anew: the same bytes, so the same name
    assert hashlib.sha256(again.read_bytes()).hexdigest().startswith(again.stem)


def test_a_pass_killed_half_way_keeps_the_shards_it_wrote(rows, tmp_path, monkeypatch):
    import xmodal.feature_cache as fc
    texts = [f"{t} {i}" for i, t in enumerate(rows[1])]
    model = frozen_model()
    enc, tf = model.towers["text"].encoder, model.transform("text")
    monkeypatch.setattr(fc, "SHARD_BYTES", 4 * 16 * 4)  # a shard every 4 rows of 16 floats
    calls = count_rows(enc)

    def killed(m, i, o):
        if sum(calls) > 8:
            raise KeyboardInterrupt  # a Ctrl-C in the third batch of 4
    handle = enc.register_forward_hook(killed)
    key = tower_settings("text", model.cfg.towers["text"])
    with pytest.raises(KeyboardInterrupt):
        precompute_features(enc, tf, texts, batch_size=4, progress=False, memo_key=key, cache_dir=tmp_path / "c")
    handle.remove()
    assert len(list((tmp_path / "c").glob("*/*.safetensors"))) == 2  # two whole batches, two shards
    assert not list((tmp_path / "c").glob("*/.*.tmp"))  # no half-written file left behind
    del calls[:]
    cached = precompute_features(enc, tf, texts, batch_size=4, progress=False, memo_key=key,
                                 cache_dir=tmp_path / "c")
    assert sum(calls) == len(texts) - 8
    truth = precompute_features(enc, tf, texts, batch_size=4, progress=False)
    for t in texts:
        torch.testing.assert_close(cached(t), truth(t), atol=1e-6, rtol=0)


WORKER = """
import sys, torch
from xmodal.feature_cache import precompute_features
torch.manual_seed(0)
enc = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Flatten())
n = []
enc.register_forward_hook(lambda m, i, o: n.append(len(i[0])))
tf = lambda s: torch.tensor([sum(map(ord, s)) % 100])
values = [f"caption {i}" for i in range(64)]
got = precompute_features(enc, tf, values, batch_size=8, progress=False, memo_key=("text", "toy"),
                          cache_dir=sys.argv[1])
print(sum(n), float(torch.stack([got(v) for v in values]).sum()))
"""


def test_two_processes_share_one_cache(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path / "c")], stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    out = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(int(o[0]) for o in out) == [0, 64]  # one embedded everything, the other waited and read it
    assert out[0][1] == out[1][1]  # the same features


def test_pretrain_finetune_evaluate_over_the_same_inputs_embed_nothing_again(clipart, tmp_path, monkeypatch):
    import yaml

    import xmodal.feature_cache as fc
    from xmodal.cli import main

    embedded = []
    embed = fc._embed

    def counting(encoder, transform, todo, *a, **kw):
        embedded.extend(todo)
        return embed(encoder, transform, todo, *a, **kw)
    monkeypatch.setattr(fc, "_embed", counting)
    from xmodal.feature_store import FeatureStore
    found, find = [], FeatureStore.find

    def finding(self, keys):
        out = find(self, keys)
        found.append(len(out[2]))
        return out
    monkeypatch.setattr(FeatureStore, "find", finding)
    towers = {"image": {"kind": "cnn", "image_size": 32, "freeze": True, "augment": False,
                        "options": {"channels": [8, 16]}},
              "text": {"kind": "lstm", "context_length": 16, "freeze": True,
                       "options": {"embed_dim": 16, "hidden": 16}}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"embed_dim": 16, "towers": towers},
        "data": {"train": str(clipart), "train_split": "train"},
        "train": {"batch_size": 16, "max_steps": 2, "progress": False}, "log": {"backend": "none"}}))
    argv = ["pretrain", "--config", str(config)]
    assert main(argv + [f"output_dir={tmp_path / 'a'}"]) == 0
    train_rows = [r for r in csv.DictReader(open(clipart, encoding="utf-8")) if r["split"] == "train"]
    first = len(embedded)
    assert first == len({r["image"] for r in train_rows}) + len({r["text"] for r in train_rows})
    assert main(argv + [f"output_dir={tmp_path / 'b'}"]) == 0  # another run over the same inputs
    assert len(embedded) == first  # the second run embedded nothing
    finetune = tmp_path / "f.yaml"
    finetune.write_text(yaml.safe_dump({
        "init_from": str(tmp_path / "a"), "output_dir": str(tmp_path / "f"), "log": {"backend": "none"},
        "tasks": {"category": {"kind": "classification", "train": str(clipart), "modalities": ["image", "text"],
                               "target": "label", "train_split": "train", "eval_split": None}},
        "train": {"batch_size": 16, "max_steps": 2, "progress": False}}))
    del found[:]
    assert main(["finetune", "--config", str(finetune)]) == 0
    assert len(embedded) == first  # fine-tuning over the pretrained run's frozen towers: nothing embedded either
    assert sum(found) == first  # ... because every input was found on disk
    evaluate = ["evaluate", "--run", str(tmp_path / "a"), "--manifest", str(clipart), "--split", "train"]
    assert main(evaluate) == 0
    images = {str(clipart.parent / r["image"]) for r in train_rows}
    assert not set(embedded[first:]) & (images | {r["text"] for r in train_rows})  # only zero-shot's prompts
    prompts = len(embedded)
    assert main(evaluate) == 0
    assert len(embedded) == prompts  # evaluating again embeds nothing at all
    assert main(argv + [f"output_dir={tmp_path / 'c'}", "train.feature_cache_dir=off"]) == 0
    assert len(embedded) == prompts + first  # the disk cache off: embedded again, in memory


def test_a_cache_folder_that_cannot_be_made_falls_back_to_memory_with_one_warning(rows, tmp_path, caplog):
    texts = rows[1]
    model = frozen_model()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING), disk_cache(blocker / "cache"):
        got = model.encode("text", texts)
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "features are kept in memory" in warned[0], warned
    torch.testing.assert_close(got, model.encode("text", texts), atol=1e-6, rtol=0)


def test_a_writer_killed_mid_shard_leaves_no_temporary_for_long(rows, tmp_path):
    model = frozen_model()
    with disk_cache(tmp_path / "cache"):
        model.encode("text", rows[1][:3])
        (folder,) = (tmp_path / "cache").iterdir()
        old, young = folder / ".dead.safetensors.1.tmp", folder / ".busy.safetensors.2.tmp"
        for f in (old, young):
            f.write_bytes(b"half a shard")
        os.utime(old, (os.stat(old).st_atime, os.stat(old).st_mtime - 7200))  # a SIGKILLed writer, 2 hours ago
        model.encode("text", rows[1][:3])
    assert not old.exists() and young.exists()  # a young one may be another process's write in progress
