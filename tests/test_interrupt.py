"""Ctrl-C and SIGTERM through the CLI: `xmodal pretrain` gets a real SIGINT, is resumed, gets a real SIGTERM, is
resumed to the end — and ends with the weights of a run never interrupted, bit for bit, and a metrics.jsonl with each
step once. Each signal saves a checkpoint at the step it landed on (no periodic checkpoints here: save_every=0),
prints one line naming it and the resume command, and ends the process with 128 + the signal number, no traceback.

Also: two DDP processes (`accelerate launch`), SIGTERM to the non-main rank only: both stop at the same step, with one
checkpoint, and neither hangs in a collective.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_crash_resume import _launch
from test_engine import tiny, weights
from xmodal.config import save_config
from xmodal.training.checkpoint import checkpoint_dirs, latest_checkpoint
from xmodal.training.run_log import MetricsLog

STEPS = 30
ROOT = Path(__file__).resolve().parent.parent


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


def _last_step(run: Path) -> int:
    return max((r["step"] for r in _records(run) if "loss" in r), default=0)


def _wait_for_step(run: Path, step: int, alive, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while _last_step(run) < step:
        assert alive(), "training ended before it could be interrupted"
        assert time.monotonic() < deadline, "training made no progress"
        time.sleep(0.01)


def _interrupted(log_text: str, verb_line: str) -> re.Match:
    """The one line the CLI prints after a signal, parsed; nothing like a traceback anywhere."""
    assert "Traceback" not in log_text and "KeyboardInterrupt" not in log_text, log_text[-3000:]
    lines = [ln for ln in log_text.splitlines() if ln.startswith(verb_line)]
    assert len(lines) == 1, log_text[-3000:]
    m = re.fullmatch(r"xmodal pretrain: interrupted by (SIG\w+) at step (\d+); checkpoint saved: (\S+); "
                     r"resume with: (.+)", lines[0])
    assert m, lines[0]
    return m


@pytest.mark.slow
def test_sigint_then_sigterm_then_resume_equals_uninterrupted(clipart, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # read by the fork server's torch: every run computes alike
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    for run in (reference, out):
        save_config(tiny(clipart, run, max_steps=STEPS, save_every=0), tmp_path / f"{run.name}.yaml")
    config = tmp_path / "stopped.yaml"

    proc = _launch(tmp_path / "reference.yaml", resume=False, log=tmp_path / "reference.log")
    proc.join(300)
    assert proc.exitcode == 0, (tmp_path / "reference.log").read_text()[-3000:]

    stopped_at = []
    for launch, sig in enumerate((signal.SIGINT, signal.SIGTERM)):
        log = tmp_path / f"launch{launch}.log"
        proc = _launch(config, resume=launch > 0, log=log)
        try:
            _wait_for_step(out, (stopped_at[-1] if stopped_at else 0) + 3, proc.is_alive)
            os.kill(proc.pid, sig)  # a real signal, as Ctrl-C or a scheduler sends it
            proc.join(120)
            assert proc.exitcode == 128 + sig, (proc.exitcode, log.read_text()[-3000:])
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
        m = _interrupted(log.read_text(), "xmodal pretrain: interrupted")
        step = int(m.group(2))
        assert m.group(1) == sig.name and step < STEPS
        # the checkpoint is at the step the signal landed on, not an older one: nothing trained is lost
        assert step >= _last_step(out) and Path(m.group(3)) == latest_checkpoint(out) == out / "checkpoints" / \
            f"step_{step}", (m.group(0), checkpoint_dirs(out))
        assert json.loads((Path(m.group(3)) / "position.json").read_text())["step"] == step
        assert m.group(4) == f"xmodal pretrain --config {config} --resume"  # the run's command line + --resume
        assert not (out / "model.safetensors").exists()
        stopped_at.append(step)
    assert 0 < stopped_at[0] < stopped_at[1] < STEPS, stopped_at

    proc = _launch(config, resume=True, log=tmp_path / "last.log")
    proc.join(300)
    assert proc.exitcode == 0, (tmp_path / "last.log").read_text()[-3000:]

    final, ref = weights(out), weights(reference)
    assert final.keys() == ref.keys()
    for k in ref:
        assert torch.equal(final[k], ref[k]), (k, (final[k].double() - ref[k].double()).abs().max().item())
    # each step once, in order, with the values of the uninterrupted run (the loss window was saved mid-window)
    got, want = ([(r["step"], r["loss"], r["lr"]) for r in _records(run) if "loss" in r] for run in (out, reference))
    assert [s for s, _, _ in got] == list(range(1, STEPS + 1))
    assert got == want


def test_resume_drops_records_after_the_checkpoint_and_a_torn_line(tmp_path):
    """A killed launch wrote records past its checkpoint (and was cut in mid-line): a resume from step 2 keeps
    steps 1-2 (and the evaluation at 2, which a resumed run does not repeat), drops the rest."""
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval/R@1": 0.1},
             {"step": 3, "loss": 2.0}, {"step": 4, "loss": 1.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 5, "lo')
    assert MetricsLog(path, enabled=True).drop_after(2) == 3
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in lines[:3])
    # resumed at its last step, a run evaluates again at that step: that evaluation record goes too
    assert MetricsLog(path, enabled=True).drop_after(2, drop_eval_at_step=True) == 1
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in lines[:2])
    # on other processes (enabled=False) the file is never touched
    assert MetricsLog(path, enabled=False).drop_after(0) == 0 and len(path.read_text().splitlines()) == 2


def _rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes under an `accelerate launch` process (their RANK variable)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [v for v in env if v.startswith(b"RANK=")]
        if ppid == launcher_pid and rank:
            found[int(rank[0][5:])] = int(entry.name)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' pids through /proc")
def test_sigterm_to_one_rank_stops_both_at_one_step(clipart, tmp_path):
    from _requires import accelerate_launcher  # skip without it; fail in CI

    run = tmp_path / "two"
    save_config(tiny(clipart, run, max_steps=200, batch_size=8, save_every=0), tmp_path / "two.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [str(accelerate_launcher(sys.executable)), "launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", "0", "-m", "xmodal.cli", "pretrain", "--config", str(tmp_path / "two.yaml")]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(run, 3, lambda: proc.poll() is None, timeout=300)
        ranks = _rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGTERM)  # only the non-main rank hears it (as when one node is preempted first)
        output, _ = proc.communicate(timeout=120)  # a rank left waiting in a collective would hang here
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0, output[-3000:]
    lines = [ln for ln in output.splitlines() if "interrupted by SIGTERM" in ln]
    assert len(lines) == 1, output[-3000:]  # the main rank reports, once, though the signal reached rank 1
    m = re.fullmatch(r"xmodal pretrain: interrupted by SIGTERM at step (\d+); checkpoint saved: (\S+); resume with "
                     r"\(through the same launcher\): xmodal pretrain --config \S+ --resume", lines[0])
    assert m, lines[0]
    step = int(m.group(1))
    assert 3 <= step < 200 and latest_checkpoint(run) == Path(m.group(2)) == run / "checkpoints" / f"step_{step}"
    assert json.loads((Path(m.group(2)) / "position.json").read_text())["step"] == step
    assert not (run / "model.safetensors").exists()
