"""Damaged files, as users meet them, through the CLI as a user runs it: {truncated, bit-flipped, zero-length,
missing, from another run} × {every file of a model folder, of a checkpoint, of an index}. Each case must end in
one line on stderr naming the file (exit status 2, no traceback) or in the documented recovery — never in a wrong
result or a hang. The table of cases and outcomes is in docs/reliability.md ("Damaged files").

Two real runs of a small model on the bundled Open Clip Art slice (a frozen CNN image tower, so the checkpoints are
slim; an LSTM text tower), seeds 1 and 2, each with its index: the second one is "another run".
"""
from __future__ import annotations

import logging
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

from xmodal.cli import main
from xmodal.config import config_from_dict, save_config

FAULTS = ["truncated", "bit-flipped", "zero-length", "missing", "from another run"]
CHECKPOINT_FILES = ["model.safetensors", "optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl",
                    "custom_checkpoint_1.pkl", "position.json", "manifest.json"]


def _config(manifest: Path, out: Path, seed: int, max_steps: int) -> Path:
    cfg = config_from_dict({
        "output_dir": str(out), "seed": seed,
        "model": {"embed_dim": 16, "towers": {
            "image": {"kind": "cnn", "image_size": 16, "augment": False, "freeze": True,
                      "options": {"channels": [4, 8]}},
            "text": {"kind": "lstm", "context_length": 12, "options": {"embed_dim": 16, "hidden": 16}}}},
        "data": {"train": str(manifest)},
        "train": {"batch_size": 16, "max_steps": max_steps, "warmup_steps": 0, "save_every": 1,
                  "keep_checkpoints": 2, "progress": False, "deterministic": True},
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


def cli(argv: list[str], capfd) -> tuple[int, str]:
    capfd.readouterr()
    # as in a fresh process: log to this stderr (a training earlier in this process left handlers on its streams)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    with deadline():
        rc = main(argv)
    return rc, capfd.readouterr().err


@pytest.fixture(scope="module")
def runs(clipart, tmp_path_factory):
    """{seed: (run folder, index folder)} for seeds 1 and 2 (2 steps each, checkpoints step_1 and step_2)."""
    out = {}
    for seed in (1, 2):
        folder = tmp_path_factory.mktemp(f"run{seed}")
        assert main(["pretrain", "--config", str(_config(clipart, folder / "run", seed, 2))]) == 0
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
    if not damage(newest / name, fault, runs[2][0] / "checkpoints" / "step_2" / name):
        pytest.skip(f"{name} is byte-identical in both runs: nothing to tell apart")
    rc, err = cli(["pretrain", "--config", str(_config(clipart, run, 1, 3)), "--resume"], capfd)
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
@pytest.mark.parametrize("name", ["index.faiss", "metadata.jsonl", "index.json"])
def test_damaged_index_file_is_one_line_naming_it(runs, tmp_path, capfd, name, fault):
    index = tmp_path / "index"
    shutil.copytree(runs[1][1], index)
    if not damage(index / name, fault, runs[2][1] / name):
        pytest.skip(f"{name} is byte-identical in both indexes: nothing to tell apart")
    rc, err = cli(["query", "--index", str(index), "--run", str(runs[1][0]), "--text", "a red car"], capfd)
    line = assert_one_line_error(rc, err, "query", name)
    assert str(index) in line, line
