"""A real crash: `xmodal pretrain` SIGKILLed at seeded-random moments (and once in the middle of a checkpoint
save), resumed with --resume until it finishes, ends with the same weights as a run never interrupted.

After every kill, each ``checkpoints/step_N`` folder must be complete and loadable; a leftover ``.tmp_step_N``
(a save the kill interrupted) may stay, but resume must never read it.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_engine import tiny, weights
from xmodal.training.checkpoint import POSITION, checkpoint_dirs, latest_checkpoint
from xmodal.config import save_config

STEPS = 40  # ~0.1 s a step on 2 CPU cores: 3 kills (each at most ~1 s into a launch) leave steps to finish


def _step(ckpt: Path | None) -> int:
    return -1 if ckpt is None else int(ckpt.name.rsplit("_", 1)[1])  # step_N (or .old_step_N)


def _cli(argv: list[str], log: str) -> None:
    """A training process: `xmodal pretrain ...`, its output appended to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from xmodal.cli import main
    sys.exit(main(argv))


def _launch(config: Path, resume: bool, log: Path):
    """Start `xmodal pretrain` in a new process. Processes are forked from a server that has imported torch and
    xmodal once: a fresh interpreter spends 12-25 s importing them on 2 busy cores, and this test starts five."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["xmodal.cli", "xmodal.training.engine", "accelerate", "open_clip"])
    proc = ctx.Process(target=_cli, args=(["pretrain", "--config", str(config)] + ["--resume"] * resume, str(log)))
    proc.start()
    return proc


def _wait_for(predicate, proc, timeout: float = 120) -> bool:
    """Poll ``predicate`` every 5 ms; False when the process ended first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if not proc.is_alive():
            return False
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.005)
    return True


def _being_written(out: Path) -> bool:
    """The next checkpoint's folder exists, under whatever name the save writes it first (.tmp_step_N)."""
    name = f"step_{_step(latest_checkpoint(out)) + 1}"
    return any(p.name.endswith(name) for p in (out / "checkpoints").iterdir())


def _assert_checkpoints_sound(out: Path, expected_files: set[str]) -> None:
    """Every step_N folder, and every folder resume could pick, holds every file of a checkpoint, each parsing."""
    listed = checkpoint_dirs(out)
    assert not [p for p in listed if p.name.startswith(".tmp_")], listed  # a partial save is never a candidate
    for folder in sorted(set((out / "checkpoints").glob("step_*")) | set(listed)):
        assert {p.name for p in folder.iterdir()} == expected_files, f"{folder} is incomplete"
        for f in folder.iterdir():
            if f.suffix == ".safetensors":
                load_file(str(f))
            elif f.suffix in (".bin", ".pkl"):
                torch.load(f, weights_only=False)
            else:
                json.loads(f.read_text())


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(clipart, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read by the fork server's torch: every run computes alike
    log = tmp_path / "train.log"
    reference, out = tmp_path / "reference", tmp_path / "killed"
    for run in (reference, out):
        save_config(tiny(clipart, run, max_steps=STEPS, save_every=1), tmp_path / f"{run.name}.yaml")

    proc = _launch(tmp_path / "reference.yaml", resume=False, log=log)
    proc.join(300)
    assert proc.exitcode == 0 and (reference / "model.safetensors").is_file(), log.read_text()[-3000:]
    expected_files = {p.name for p in (reference / "checkpoints" / f"step_{STEPS}").iterdir()}
    assert POSITION in expected_files and "model.safetensors" in expected_files

    rng = random.Random(7)
    # When to kill, once a launch has written a checkpoint of its own: after a seeded random delay, or 0-30 ms after
    # the next checkpoint's folder appears (its files are being written: where a non-atomic save tears).
    plan = [("delay", rng.uniform(0.0, 0.8)), ("mid-save", rng.uniform(0.0, 0.03)), ("delay", rng.uniform(0.0, 0.8))]
    kills = []
    for launch, (how, delay) in enumerate(plan):
        start = _step(latest_checkpoint(out))
        proc = _launch(tmp_path / "killed.yaml", resume=launch > 0, log=log)
        try:
            if not _wait_for(lambda: _step(latest_checkpoint(out)) > start, proc):
                pytest.fail(f"launch {launch} ended (exit code {proc.exitcode}) before its first checkpoint:\n"
                            + log.read_text()[-3000:])
            if how == "mid-save":
                _wait_for(lambda: _being_written(out), proc)
            time.sleep(delay)
            assert proc.is_alive(), "the run finished before it could be killed: raise STEPS"
            proc.kill()  # SIGKILL: no handler, no finally, no flush
            proc.join(30)
            assert proc.exitcode == -9
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
        kills.append((how, _step(latest_checkpoint(out))))
        assert not (out / "model.safetensors").exists()  # it really died mid-training
        _assert_checkpoints_sound(out, expected_files)

    proc = _launch(tmp_path / "killed.yaml", resume=True, log=log)
    proc.join(300)
    assert proc.exitcode == 0 and (out / "model.safetensors").is_file(), log.read_text()[-3000:]
    _assert_checkpoints_sound(out, expected_files)

    # each resume started from the newest complete checkpoint the kill before it left (never a .tmp_ folder)
    lines = [line for line in (out / "train.log").read_text().splitlines() if "resumed from" in line]
    assert [int(line.rsplit(" ", 1)[1]) for line in lines] == [step for _, step in kills], (lines, kills)
    assert not [line for line in lines if ".tmp_step_" in line], lines
    assert 0 < kills[0][1] < kills[1][1] < kills[2][1] < STEPS, kills

    final, ref = weights(out), weights(reference)
    assert final.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(final[k], ref[k], atol=1e-6, rtol=0, msg=k)
