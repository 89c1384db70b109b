"""A crash at every step of each multi-file save, simulated deterministically: every file operation of a save
(os-level renames, links, deletes, mkdirs, fsyncs, chmods, files opened for writing, the safetensors writer) is
counted, and for each i the i-th raises an exception nothing in xmodal catches (as a kill: no cleanup runs). What
loads afterwards must be the complete old save or the complete new one — never a mix — and the next save must
tidy whatever was left. (The index folder's save has the same test in tests/test_index.py.)"""
from __future__ import annotations

import builtins
import io
import json
import os
import shutil

import pytest
import torch

from test_checkpoint_save import FakeAccelerator
from test_service import tiny_model
from xmodal.model import XModalModel
from xmodal.training.checkpoint import checkpoint_dirs, latest_checkpoint, save_checkpoint
from xmodal.training.checkpoint_files import verify_files

OS_CALLS = ("replace", "rename", "link", "unlink", "rmdir", "mkdir", "fsync", "chmod")


class Crash(BaseException):
    """The process dying at a file operation."""


class CrashPoints:
    """Counts file operations while patched in; raises :class:`Crash` instead of the ``at``-th (0-based)."""

    def __init__(self, monkeypatch, at: int | None = None):
        import safetensors.torch
        self.at, self.ops = at, []
        for name in OS_CALLS:
            monkeypatch.setattr(os, name, self._counted(name, getattr(os, name)))
        real_open = builtins.open

        def open_(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                self._tick(f"open {os.path.basename(str(file))}")
            return real_open(file, mode, *args, **kwargs)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        for name in ("save_file", "save_model"):
            monkeypatch.setattr(safetensors.torch, name, self._counted(name, getattr(safetensors.torch, name)))

    def _tick(self, what: str) -> None:
        if self.at is not None and len(self.ops) == self.at:
            raise Crash(what)
        self.ops.append(what)

    def _counted(self, name, fn):
        def op(*args, **kwargs):
            self._tick(name)
            return fn(*args, **kwargs)
        return op


def _count(monkeypatch, save) -> list[str]:
    with monkeypatch.context() as m:
        points = CrashPoints(m)
        save()
    return points.ops


def _same(model: XModalModel, expected: XModalModel) -> bool:
    a, b = model.state_dict(), expected.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_model_save_crashed_at_every_step_loads_the_old_or_the_new_model(tmp_path, monkeypatch):
    old, new, third = tiny_model(seed=0), tiny_model(seed=1), tiny_model(seed=2)
    pristine = old.save(tmp_path / "pristine", extra={"step": 1})
    count = shutil.copytree(pristine, tmp_path / "count")
    ops = _count(monkeypatch, lambda: new.save(count, extra={"step": 2}))
    assert len(ops) >= 8, ops  # weights, card, fsyncs, chmod, link, two renames, delete
    loaded_steps = []
    for i in range(len(ops)):
        folder = shutil.copytree(pristine, tmp_path / f"crash{i}")
        with monkeypatch.context() as m:
            CrashPoints(m, at=i)
            with pytest.raises(Crash):
                new.save(folder, extra={"step": 2})
        loaded = XModalModel.from_pretrained(folder)
        step = loaded.card["step"]
        assert _same(loaded, old if step == 1 else new), f"crash before {ops[i]} (op {i}): a mixed model"
        loaded_steps.append(step)
        third.save(folder, extra={"step": 3})  # the next save tidies what the crash left
        assert sorted(os.listdir(folder)) == ["model.json", "model.safetensors"], (i, ops[i])
        assert _same(XModalModel.from_pretrained(folder), third)
    # the crash points span the commit: the old model before the card's rename, the new one after it
    commit = max(i for i, op in enumerate(ops) if op == "replace")
    assert loaded_steps == [1] * (commit + 1) + [2] * (len(ops) - commit - 1), (loaded_steps, ops)


@pytest.mark.parametrize("new_step", [6, 5], ids=["next step", "same step again"])
def test_checkpoint_save_crashed_at_every_step_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch,
                                                                                    new_step):
    # keep=1: a save of the next step also prunes the old one, so crash points follow the commit in both cases
    def saved(name: str):
        out = tmp_path / name
        save_checkpoint(FakeAccelerator("old"), out, {"step": 5})
        return out

    count = saved("count")
    ops = _count(monkeypatch, lambda: save_checkpoint(FakeAccelerator("new"), count, {"step": new_step}, keep=1))
    outcomes = set()
    for i in range(len(ops)):
        out = saved(f"crash{i}")
        with monkeypatch.context() as m:
            CrashPoints(m, at=i)
            with pytest.raises(Crash):
                save_checkpoint(FakeAccelerator("new"), out, {"step": new_step}, keep=1)
        ckpt = latest_checkpoint(out)
        assert verify_files(ckpt, "") is not None  # its manifest holds, so every file is the one saved
        got = ((ckpt / "state.bin").read_text(), json.loads((ckpt / "position.json").read_text())["step"])
        assert got in {("old", 5), ("new", new_step)}, f"crash before {ops[i]} (op {i}): {got}"
        outcomes.add(got[0])
        save_checkpoint(FakeAccelerator("seven"), out, {"step": 7})  # the next save tidies what the crash left
        names = sorted(p.name for p in (out / "checkpoints").iterdir())
        assert names == sorted(p.name for p in checkpoint_dirs(out)) and "step_7" in names, (i, ops[i], names)
    assert outcomes == {"old", "new"}  # the crash points span the commit
