"""A real crash: `xmodal pretrain` SIGKILLed at seeded-random moments (and once inside a checkpoint save, held
there until the kill), resumed with --resume until it finishes, ends with the weights of a run never interrupted,
bit for bit.

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


def _block_in_second_save(file_name: str, signal: str) -> None:
    """In this training process: once Accelerate has written ``file_name`` into the second checkpoint this process
    saves (so the launch has a checkpoint of its own), write ``signal`` (JSON: that folder) and stop there, inside
    the save, until killed. Accelerate writes its .bin/.pkl files with ``torch.save``, looked up at each call."""
    import torch as torch_in_child
    real_save, seen = torch_in_child.save, []

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if isinstance(f, (str, os.PathLike)) and Path(f).name == file_name:
            seen.append(Path(f).parent)
            if len(seen) == 2:
                Path(signal + ".part").write_text(json.dumps({"folder": str(seen[-1])}))
                os.replace(signal + ".part", signal)
                time.sleep(600)  # the test kills this process here

    torch_in_child.save = save


def _cli(argv: list[str], log: str, block: tuple[str, str] | None = None) -> None:
    """A training process: `xmodal pretrain ...`, its output appended to ``log``; ``block``: (file name, signal
    path) for :func:`_block_in_second_save`."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if block is not None:
        _block_in_second_save(*block)
    from xmodal.cli import main
    sys.exit(main(argv))


def _launch(config: Path, resume: bool, log: Path, block: tuple[str, str] | None = None):
    """Start `xmodal pretrain` in a new process. Processes are forked from a server that has imported torch and
    xmodal once: a fresh interpreter spends 12-25 s importing them on 2 busy cores, and this test starts five."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["xmodal.cli", "xmodal.training.engine", "accelerate", "open_clip"])
    argv = ["pretrain", "--config", str(config)] + ["--resume"] * resume
    proc = ctx.Process(target=_cli, args=(argv, str(log), block))
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
    # When to kill, once a launch has written a checkpoint of its own: after a seeded random delay, or inside its
    # next checkpoint save, held there right after Accelerate has written a seeded-random one of its pickled files
    # (the save's folder then holds some of the files and no position.json: where a non-atomic save tears).
    pickled = sorted(f for f in expected_files if f.endswith((".bin", ".pkl")))
    plan = [("delay", rng.uniform(0.0, 0.8)), ("mid-save", rng.choice(pickled)), ("delay", rng.uniform(0.0, 0.8))]
    kills, torn = [], []
    for launch, (how, when) in enumerate(plan):
        start = _step(latest_checkpoint(out))
        signal = tmp_path / f"launch{launch}_in_save.json"
        proc = _launch(tmp_path / "killed.yaml", resume=launch > 0, log=log,
                       block=(when, str(signal)) if how == "mid-save" else None)
        try:
            if not _wait_for(lambda: _step(latest_checkpoint(out)) > start, proc):
                pytest.fail(f"launch {launch} ended (exit code {proc.exitcode}) before its first checkpoint:\n"
                            + log.read_text()[-3000:])
            if how == "mid-save":
                if not _wait_for(signal.is_file, proc):
                    pytest.fail(f"launch {launch} ended before its second save:\n" + log.read_text()[-3000:])
                # The kill lands inside that save: its folder is there with Accelerate's file, without the
                # position.json that completes a checkpoint, and resume would not pick it.
                folder = Path(json.loads(signal.read_text())["folder"])
                assert (folder / when).is_file() and not (folder / POSITION).exists(), sorted(
                    str(p.relative_to(out)) for p in (out / "checkpoints").rglob("*"))
                assert folder not in checkpoint_dirs(out) and _step(folder) == _step(latest_checkpoint(out)) + 1
                torn.append(folder)
            else:
                time.sleep(when)
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
    assert len(torn) == 1 and kills[1][1] == _step(torn[0]) - 1, (kills, torn)  # step N-1 survived the torn save N

    proc = _launch(tmp_path / "killed.yaml", resume=True, log=log)
    proc.join(300)
    assert proc.exitcode == 0 and (out / "model.safetensors").is_file(), log.read_text()[-3000:]
    _assert_checkpoints_sound(out, expected_files)

    # each resume started from the newest complete checkpoint the kill before it left (never a .tmp_ folder)
    lines = [line for line in (out / "train.log").read_text().splitlines() if "resumed from" in line]
    assert [int(line.rsplit(" ", 1)[1]) for line in lines] == [step for _, step in kills], (lines, kills)
    assert not [line for line in lines if ".tmp_step_" in line], lines
    assert 0 < kills[0][1] < kills[1][1] < kills[2][1] < STEPS, kills

    assert not torn[0].exists()  # the torn save's folder was removed by the next save

    # metrics.jsonl: each step once, with the uninterrupted run's values (each resume dropped the records its
    # killed launch wrote after the checkpoint it resumed from)
    got, want = ([(r["step"], r["loss"], r["lr"]) for r in map(json.loads, (run / "metrics.jsonl").read_text(
        ).splitlines()) if "loss" in r] for run in (out, reference))
    assert [s for s, _, _ in got] == list(range(1, STEPS + 1)) and got == want

    # Bit for bit (train.deterministic, 1 thread in every run): not merely close.
    final, ref = weights(out), weights(reference)
    assert final.keys() == ref.keys()
    for k in ref:
        assert final[k].dtype == ref[k].dtype and torch.equal(final[k], ref[k]), (
            k, (final[k].double() - ref[k].double()).abs().max().item())
