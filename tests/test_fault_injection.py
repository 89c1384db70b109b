"""Damaged files, as users meet them, through the CLI as a user runs it: {truncated, bit-flipped, zero-length,
missing, from another run} × {every file of a model folder, of a checkpoint, of an index, a frozen-feature cache
shard, a data shard ``.tar``, its ``sizes.json``}. Each case must end in one line on stderr naming the file (exit
status 2, no traceback) or in the documented recovery — never in a wrong result or a hang. The table of cases and
outcomes is in docs/reliability.md ("Damaged files").

Two real runs of a small model on the bundled Open Clip Art slice (a frozen CNN image tower, so the checkpoints are
slim; an LSTM text tower), seeds 1 and 2 (the second also with another learning rate, as another run of a user's
would differ), each with its index: the second one is "another run". A file that is still byte-identical in both
runs does not depend on the run: copying it changes nothing, and the case checks that resuming or querying then
works as with the clean folder. A whole checkpoint or model folder from another run passes its own manifest; the
run id (``run.json``) tells it apart. For the feature
cache, two such runs each with its own cache folder; for data shards, `xmodal shard` of the slice and of another
corpus (Fashion-MNIST, same shard names and sizes) and one clean streaming run over the slice's shards.
"""
from __future__ import annotations

import json
import logging
import shutil
import signal
import tarfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xmodal.cli import main
from xmodal.config import config_from_dict, save_config
from xmodal.data.shard_plan import epoch_order
from xmodal.data.shards import Shard

FAULTS = ["truncated", "bit-flipped", "zero-length", "missing", "from another run"]
CHECKPOINT_FILES = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
                    "custom_checkpoint_1.pkl", "position.json", "manifest.json"]


def _config(manifest: Path, out: Path, seed: int, max_steps: int | None, train: dict | None = None,
            data: dict | None = None) -> Path:
    cfg = config_from_dict({
        "output_dir": str(out), "seed": seed,
        "model": {"embed_dim": 16, "towers": {
            "image": {"kind": "cnn", "image_size": 16, "augment": False, "freeze": True,
                      "options": {"channels": [4, 8]}},
            "text": {"kind": "lstm", "context_length": 12, "options": {"embed_dim": 16, "hidden": 16}}}},
        "data": {"train": str(manifest), **(data or {})},
        "train": {"batch_size": 16, "max_steps": max_steps, "warmup_steps": 0, "save_every": 1,
                  "keep_checkpoints": 2, "progress": False, "deterministic": True, **(train or {})},
        "log": {"backend": "none"}})
    path = out.parent / f"{out.name}.yaml"
    save_config(cfg, path)
    return path


@contextmanager
def deadline(seconds: int = 180):
    """A hang fails the case instead of stalling the suite."""
    def expired(*_):
        raise TimeoutError(f"no answer in {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def cli_out(argv: list[str], capfd) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of the CLI run in this process."""
    capfd.readouterr()
    # as in a fresh process: log to this stderr (a training earlier in this process left handlers on its streams)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    with deadline():
        rc = main(argv)
    captured = capfd.readouterr()
    return rc, captured.out, captured.err


def cli(argv: list[str], capfd) -> tuple[int, str]:
    rc, _, err = cli_out(argv, capfd)
    return rc, err


@pytest.fixture(scope="module")
def runs(clipart, tmp_path_factory):
    """{seed: (run folder, index folder)} for seeds 1 and 2 (2 steps each, checkpoints step_1 and step_2; the
    seed-2 run also with another learning rate)."""
    out = {}
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"run{seed}")
        train = {"lr": 1e-3 if seed == 1 else 2e-3}
        assert main(["pretrain", "--config", str(_config(clipart, folder / "run", seed, 2, train))]) == 0
        assert main(["index", "--run", str(folder / "run"), "--manifest", str(clipart), "--out",
                     str(folder / "index"), "--modality", "image"]) == 0
        out[seed] = (folder / "run", folder / "index")
    return out


def damage(path: Path, fault: str, other: Path) -> bool:
    """Apply ``fault`` to ``path``; False when the "other run's" file has the same bytes (nothing to detect)."""
    data = path.read_bytes()
    if fault == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif fault == "bit-flipped":
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(flipped))
    elif fault == "zero-length":
        path.write_bytes(b"")
    elif fault == "missing":
        path.unlink()
    else:
        if other.read_bytes() == data:
            return False
        shutil.copyfile(other, path)
    return True


def assert_one_line_error(rc: int, err: str, verb: str, names: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert rc == 2 and lines, err
    assert lines[-1].startswith(f"xmodal {verb}: error: "), err
    assert sum(ln.startswith(f"xmodal {verb}: error: ") for ln in lines) == 1, err
    assert names in lines[-1], lines[-1]
    print("outcome:", lines[-1])  # `pytest -s -k ...` shows them: the table in docs/reliability.md
    return lines[-1]


# ------------------------------------------------------------------------------------------------- model folder

@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", ["model.safetensors", "model.json"])
def test_damaged_model_file_is_one_line_naming_it(runs, clipart, tmp_path, capfd, name, fault):
    run = tmp_path / "run"
    shutil.copytree(runs[1][0], run, ignore=shutil.ignore_patterns("checkpoints"))
    assert damage(run / name, fault, runs[2][0] / name)
    rc, err = cli(["evaluate", "--run", str(run), "--manifest", str(clipart), "--max-rows", "8"], capfd)
    # a card from another run is whole, and describes other weights: the weights file is the one named
    named = "model.safetensors" if (name, fault) == ("model.json", "from another run") else name
    assert_one_line_error(rc, err, "evaluate", str(run / named))


# --------------------------------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_damaged_checkpoint_file_is_named_with_the_older_checkpoint(runs, clipart, tmp_path, capfd, name, fault):
    run = tmp_path / "run"
    shutil.copytree(runs[1][0], run)
    newest = run / "checkpoints" / "step_2"
    same = not damage(newest / name, fault, runs[2][0] / "checkpoints" / "step_2" / name)
    rc, err = cli(["pretrain", "--config", str(_config(clipart, run, 1, 3)), "--resume"], capfd)
    if same:  # the file does not depend on the run (e.g. the loss weighting's state): nothing changed
        assert rc == 0 and "Traceback" not in err, err
        assert f"resumed from {newest} at step 2" in err and (run / "checkpoints" / "step_3").is_dir(), err
        print("outcome: byte-identical in both runs; resumed from step_2")
        return
    if (name, fault) == ("position.json", "missing"):
        # documented recovery: a step_N without position.json is not a checkpoint; resume takes the one before
        assert rc == 0 and "Traceback" not in err, err
        assert f"{newest} has no position.json" in err and f"resumed from {run / 'checkpoints' / 'step_1'}" in err
        return
    line = assert_one_line_error(rc, err, "pretrain", str(newest))
    if (name, fault) != ("manifest.json", "missing"):
        assert name in line or "manifest.json" in line, line  # the file, or the manifest that no longer fits
        assert f"the previous checkpoint {run / 'checkpoints' / 'step_1'} is intact" in line, line
    assert not (run / "checkpoints" / "step_3").exists()  # nothing trained on top


# -------------------------------------------------------------------------------------------------------- index

@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", ["index.faiss", "metadata.arrow", "index.json"])
def test_damaged_index_file_is_one_line_naming_it(runs, tmp_path, capfd, name, fault):
    index = tmp_path / "index"
    shutil.copytree(runs[1][1], index)
    same = not damage(index / name, fault, runs[2][1] / name)
    rc, out, err = cli_out(["query", "--index", str(index), "--run", str(runs[1][0]), "--text", "a red car"], capfd)
    if same:  # the rows of the same manifest, whichever model indexed them: the same answer as the clean index
        assert rc == 0 and "Traceback" not in err, err
        clean = cli_out(["query", "--index", str(runs[1][1]), "--run", str(runs[1][0]), "--text", "a red car"], capfd)
        assert clean[0] == 0 and out.strip() and out == clean[1], (out, clean)
        print("outcome: byte-identical in both indexes; the same hits as the clean index")
        return
    line = assert_one_line_error(rc, err, "query", name)
    assert str(index) in line, line


def assert_same_weights(run: Path, clean: Path) -> None:
    got, want = load_file(str(run / "model.safetensors")), load_file(str(clean / "model.safetensors"))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]


# ------------------------------------------------------------------------------------------ frozen-feature cache

@pytest.fixture(scope="module")
def cached_runs(clipart, tmp_path_factory):
    """{seed: folder} for seeds 1 and 2: ``run`` (2 steps) trained with its frozen image features in ``cache``."""
    out = {}
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"cached{seed}")
        config = _config(clipart, folder / "run", seed, 2, train={"feature_cache_dir": str(folder / "cache")})
        assert main(["pretrain", "--config", str(config)]) == 0
        out[seed] = folder
    return out


def features_by_key(shard: Path) -> dict[bytes, bytes]:
    from safetensors.numpy import load_file as load_numpy
    t = load_numpy(str(shard))
    return {k.tobytes(): f.tobytes() for k, f in zip(t["keys"], t["features"])}


@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_feature_cache_shard_is_dropped_and_embedded_again(cached_runs, clipart, tmp_path, capfd, fault):
    """Documented recovery: one warning naming the shard, the shard removed, its inputs embedded again — and the
    run ends with exactly the clean run's weights. From another run = the seed-2 run's shard (another frozen tower,
    the same inputs) put in place of this tower's, under its own name."""
    cache = tmp_path / "cache"
    shutil.copytree(cached_runs[1] / "cache", cache)
    [clean] = sorted((cached_runs[1] / "cache").glob("*/*.safetensors"))
    [shard] = sorted(cache.glob("*/*.safetensors"))
    if fault == "from another run":
        [other] = sorted((cached_runs[2] / "cache").glob("*/*.safetensors"))
        assert other.parent.name != shard.parent.name  # another tower: its features are not this tower's
        shard.unlink()
        shard = shard.parent / other.name
        shutil.copyfile(other, shard)
    else:
        damage(shard, fault, shard)
    config = _config(clipart, tmp_path / "run", 1, 2, train={"feature_cache_dir": str(cache)})
    rc, err = cli(["pretrain", "--config", str(config)], capfd)
    assert rc == 0 and "Traceback" not in err, err
    warned = [ln for ln in err.splitlines() if "feature cache:" in ln and "is damaged" in ln]
    assert len(warned) == (0 if fault == "missing" else 1), err
    assert all(str(shard) in ln and "embedded again" in ln for ln in warned), warned
    print("outcome:", warned[0] if warned else "(no shard: embedded)")
    assert " 0 of " in err and "inputs read from the feature cache" in err, err  # every input embedded again
    [rebuilt] = cache.glob(f"{clean.parent.name}/*.safetensors")  # one shard again, in this tower's folder
    assert features_by_key(rebuilt) == features_by_key(clean)  # the same features, bit for bit
    assert_same_weights(tmp_path / "run", cached_runs[1] / "run")


# -------------------------------------------------------------------------------------------------- data shards

def _stream_config(manifest: Path, shards: Path, out: Path, spec: str, **data) -> Path:
    return _config(manifest, out, 1, None, train={"epochs": 1},
                   data={"train": None, "shards": str(shards / spec), "record_ids": True,
                         "max_bad_fraction": 0.3, **data})


def _trained_ids(run: Path) -> list[str]:
    return [i for line in (run / "ids" / "rank0.jsonl").read_text().splitlines() for i in json.loads(line)["ids"]]


def _tar_ids(tar: Path) -> set[str]:
    with tarfile.open(tar) as t:
        return {json.loads(t.extractfile(m).read())["id"] for m in t.getmembers() if m.name.endswith(".json")}


@pytest.fixture(scope="module")
def data_shards(clipart, fashion, tmp_path_factory):
    """`xmodal shard` of the slice and of another corpus (25 samples a shard: the same names, 00001.tar the same
    count), the brace spec of the slice's shards, and a clean one-epoch streaming run over them."""
    out = {}
    for name, manifest in (("clipart", clipart), ("fashion", fashion)):
        folder = tmp_path_factory.mktemp(f"shards_{name}")
        assert main(["shard", "--manifest", str(manifest), "--out", str(folder), "--samples-per-shard", "25"]) == 0
        out[name] = folder
    sizes = json.loads((out["clipart"] / "sizes.json").read_text())
    out["spec"] = f"{{00000..{len(sizes) - 1:05d}}}.tar"
    out["sizes"] = sizes
    clean = tmp_path_factory.mktemp("stream_clean") / "run"
    assert main(["pretrain", "--config", str(_stream_config(clipart, out["clipart"], clean, out["spec"]))]) == 0
    out["clean"] = clean
    return out


def _used(sizes: dict[str, int], folder: Path, name: str, batch: int = 16) -> int:
    """How many of shard ``name``'s samples the clean epoch reads (seed 1, epoch 0, one process): the shards in
    their drawn order, the last ``total mod batch`` samples left out."""
    order = epoch_order([Shard(str(folder / n), c) for n, c in sizes.items()], 1, 0)
    kept, pos, used = sum(sizes.values()) // batch * batch, 0, 0
    for s in order:
        if Path(s.url).name == name:
            used = max(0, min(s.samples, kept - pos))
        pos += s.samples
    return used


@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_data_shard_is_skipped_named_and_counted(data_shards, clipart, tmp_path, capfd, fault):
    """Documented recovery (data.max_bad_fraction 0.3 allows a shard's samples): every sample of the damaged
    00001.tar the epoch reads is skipped, named by shard and slot, and counted; none of its samples is trained (a
    flipped bit or another corpus's shard of the same name is never read as data)."""
    folder, name = tmp_path / "shards", "00001.tar"
    shutil.copytree(data_shards["clipart"], folder)
    ids = _tar_ids(folder / name)
    assert damage(folder / name, fault, data_shards["fashion"] / name)
    run = tmp_path / "run"
    rc, err = cli(["pretrain", "--config", str(_stream_config(clipart, folder, run, data_shards["spec"]))], capfd)
    assert rc == 0 and "Traceback" not in err, err
    named = [n for line in (run / "metrics.jsonl").read_text().splitlines()
             for n in json.loads(line).get("bad_samples", [])]
    assert len(set(named)) == len(named) == _used(data_shards["sizes"], folder, name) > 0, named
    assert all(n.startswith(f"{folder / name}: sample '#") for n in named), named
    assert all("as recorded in" in n and "checksums.json" in n for n in named), named
    print("outcome:", named[0])
    trained = _trained_ids(run)
    assert not ids & set(trained) and set(trained) <= set(_trained_ids(data_shards["clean"])) | ids


def test_another_corpus_shard_past_max_bad_fraction_stops_in_one_line(data_shards, clipart, tmp_path, capfd):
    """No bad sample allowed: the other corpus's 00001.tar stops the run in one line naming it, the last good
    checkpoint intact."""
    folder, name = tmp_path / "shards", "00001.tar"
    shutil.copytree(data_shards["clipart"], folder)
    assert damage(folder / name, "from another run", data_shards["fashion"] / name)
    run = tmp_path / "run"
    config = _stream_config(clipart, folder, run, data_shards["spec"], max_bad_fraction=0.0)
    rc, err = cli(["pretrain", "--config", str(config)], capfd)
    line = assert_one_line_error(rc, err, "pretrain", f"{folder / name}: sample '#")
    assert "exceed data.max_bad_fraction 0.0" in line and "as recorded in" in line, line
    steps = [int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*")]
    if steps:  # the shard's first sample may come at step 1: then there is no checkpoint yet
        last = run / "checkpoints" / f"step_{max(steps)}"
        assert f"the last good checkpoint is {last}" in line, line
        assert json.loads((last / "position.json").read_text())["step"] == max(steps)
    assert not (run / "model.safetensors").exists()


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("name", ["sizes.json", "checksums.json"])
def test_damaged_shard_index_is_one_line_or_a_fallback(data_shards, clipart, tmp_path, capfd, name, fault):
    """sizes.json / checksums.json unreadable, or from another corpus (whose 00003.tar has 25 samples, ours 19: the
    two disagree) → one line naming it; missing → documented fallback (sizes.json: counts read from the tar
    headers; checksums.json: shards read unchecked, as those of other tools): the clean run's weights exactly."""
    folder = tmp_path / "shards"
    shutil.copytree(data_shards["clipart"], folder)
    assert damage(folder / name, fault, data_shards["fashion"] / name)
    run = tmp_path / "run"
    rc, err = cli(["pretrain", "--config", str(_stream_config(clipart, folder, run, data_shards["spec"]))], capfd)
    if fault == "missing":
        assert rc == 0 and "Traceback" not in err, err
        assert_same_weights(run, data_shards["clean"])
        return
    assert_one_line_error(rc, err, "pretrain", str(folder / name))
    assert not (run / "checkpoints").exists()


# ------------------------------------------------------------------------------------- whole folders, run identity

def test_a_checkpoint_folder_from_another_run_is_refused_naming_that_run(runs, clipart, tmp_path, capfd):
    """step_2 of the seed-2 run copied over this run's step_2: every file matches the manifest beside it, but the
    manifest names the other run; resume names that run's folder and the older checkpoint of this run."""
    run = tmp_path / "run"
    shutil.copytree(runs[1][0], run)
    newest = run / "checkpoints" / "step_2"
    shutil.rmtree(newest)
    shutil.copytree(runs[2][0] / "checkpoints" / "step_2", newest)
    rc, err = cli(["pretrain", "--config", str(_config(clipart, run, 1, 3)), "--resume"], capfd)
    line = assert_one_line_error(rc, err, "pretrain", str(newest))
    other_id = json.loads((runs[2][0] / "run.json").read_text())["id"]
    assert f"comes from another run (run {other_id[:12]}…, saved in {runs[2][0].resolve()})" in line, line
    assert f"in {run / 'run.json'}" in line, line
    assert f"the previous checkpoint {run / 'checkpoints' / 'step_1'} is intact" in line, line
    assert not (run / "checkpoints" / "step_3").exists()


def test_a_model_folder_from_another_run_is_refused_naming_that_run(runs, clipart, tmp_path, capfd):
    """model.safetensors and model.json of the seed-2 run copied into this run folder: a whole, consistent pair,
    but another run's model."""
    run = tmp_path / "run"
    shutil.copytree(runs[1][0], run, ignore=shutil.ignore_patterns("checkpoints"))
    for name in ("model.safetensors", "model.json"):
        shutil.copyfile(runs[2][0] / name, run / name)
    rc, err = cli(["evaluate", "--run", str(run), "--manifest", str(clipart), "--max-rows", "8"], capfd)
    line = assert_one_line_error(rc, err, "evaluate", str(run / "model.json"))
    assert f"comes from another run (run " in line and f"saved in {runs[2][0].resolve()})" in line, line


def _as_before_run_ids(run: Path) -> None:
    """Make ``run`` a folder as saved before run ids: no run.json, no "run" in the card or the manifests (each
    sealed again, as those versions sealed them)."""
    from xmodal.integrity import seal
    (run / "run.json").unlink()
    for path in [run / "model.json", *sorted(run.glob("checkpoints/step_*/manifest.json"))]:
        obj = json.loads(path.read_text())
        assert "run" in obj
        del obj["run"]
        path.write_text(json.dumps(seal(obj), indent=2))


def test_a_run_folder_from_before_run_ids_loads_and_resumes(runs, clipart, tmp_path, capfd):
    """A run folder written before run ids: its model loads and it resumes; the resume gives it a run id, which
    the new checkpoint and the model record."""
    run = tmp_path / "run"
    shutil.copytree(runs[1][0], run)
    _as_before_run_ids(run)
    rc, err = cli(["evaluate", "--run", str(run), "--manifest", str(clipart), "--max-rows", "8"], capfd)
    assert rc == 0 and "Traceback" not in err, err
    rc, err = cli(["pretrain", "--config", str(_config(clipart, run, 1, 3)), "--resume"], capfd)
    assert rc == 0 and f"resumed from {run / 'checkpoints' / 'step_2'} at step 2" in err, err
    new_id = json.loads((run / "run.json").read_text())["id"]
    assert new_id != json.loads((runs[1][0] / "run.json").read_text())["id"]
    manifest = json.loads((run / "checkpoints" / "step_3" / "manifest.json").read_text())
    assert manifest["run"] == {"id": new_id, "folder": str(run.resolve())}
    assert json.loads((run / "model.json").read_text())["run"]["id"] == new_id


def test_a_run_folder_that_lost_its_run_json_keeps_its_identity(runs, clipart, tmp_path, capfd):
    """run.json deleted (or not copied): resume takes the id its checkpoint records, so its own checkpoints are not
    refused as another run's."""
    run = tmp_path / "run"
    shutil.copytree(runs[1][0], run)
    (run / "run.json").unlink()
    rc, err = cli(["pretrain", "--config", str(_config(clipart, run, 1, 3)), "--resume"], capfd)
    assert rc == 0 and f"resumed from {run / 'checkpoints' / 'step_2'} at step 2" in err, err
    assert json.loads((run / "run.json").read_text())["id"] == json.loads((runs[1][0] / "run.json").read_text())["id"]
