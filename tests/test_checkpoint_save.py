"""save_checkpoint's failure windows, with a stand-in Accelerator (one process) that writes one state file: a
re-save of the same step killed between its renames, a save that fails half-way, leftovers of interrupted saves."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from xmodal.training import checkpoint
from xmodal.training.checkpoint import CheckpointError, checkpoint_dirs, latest_checkpoint, save_checkpoint


class FakeAccelerator:
    is_main_process = True

    def __init__(self, payload: str = "v1", fail: OSError | None = None):
        self.payload, self.fail = payload, fail

    def wait_for_everyone(self):
        pass

    def save_state(self, path: str, safe_serialization: bool = True):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "state.bin").write_text(self.payload[: len(self.payload) // 2] if self.fail else self.payload)
        if self.fail:
            raise self.fail


def _save(out: Path, step: int, payload: str = "v1", **kw) -> Path:
    return save_checkpoint(FakeAccelerator(payload, **kw), out, {"step": step})


def _payload(folder: Path) -> str:
    return (folder / "state.bin").read_text()


class Killed(BaseException):
    """The process dying (nothing in save_checkpoint may catch it)."""


def test_resave_killed_between_the_renames_keeps_the_old_step(tmp_path, monkeypatch):
    _save(tmp_path, 5, "old")
    real_replace = checkpoint.os.replace

    def dying_replace(src, dst):
        if Path(src).name == ".tmp_step_5":  # die just before the new copy is renamed into place
            raise Killed()
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", dying_replace)
    with pytest.raises(Killed):
        _save(tmp_path, 5, "new")
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    # step 5 is still there to resume from: the complete old copy, found where the interrupted re-save left it
    found = latest_checkpoint(tmp_path)
    assert found is not None and json.loads((found / "position.json").read_text()) == {"step": 5}
    assert _payload(found) == "old"
    # the next save puts it back as step_5 and removes the leftovers of the interrupted one
    _save(tmp_path, 6, "six")
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_5", "step_6"]
    assert _payload(root / "step_5") == "old"


def test_resave_replaces_the_step_whole(tmp_path):
    _save(tmp_path, 5, "old")
    _save(tmp_path, 5, "new")
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_5"] and _payload(root / "step_5") == "new"


def test_failed_save_removes_the_partial_folder_and_keeps_the_previous_one(tmp_path):
    _save(tmp_path, 2, "two")
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(CheckpointError) as exc:
        _save(tmp_path, 3, "three", fail=full)
    root = tmp_path / "checkpoints"
    assert str(exc.value) == (f"saving checkpoint step 3 to {root / 'step_3'} failed: OSError: [Errno 28] No space "
                              f"left on device; the previous checkpoint {root / 'step_2'} is intact")
    assert exc.value.__cause__ is full
    assert sorted(p.name for p in root.iterdir()) == ["step_2"] and _payload(root / "step_2") == "two"
    # re-saving an existing step that fails leaves that step as it was
    with pytest.raises(CheckpointError, match=r"step 2 .* failed: .*the previous checkpoint .*step_2 is intact"):
        _save(tmp_path, 2, "again", fail=full)
    assert sorted(p.name for p in root.iterdir()) == ["step_2"] and _payload(root / "step_2") == "two"


def test_leftover_tmp_folder_is_ignored_then_removed(tmp_path):
    _save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    stale = root / ".tmp_step_7"  # a save killed half-way, possibly with a position.json already written
    stale.mkdir()
    (stale / "position.json").write_text('{"step": 7}')
    assert checkpoint_dirs(tmp_path) == [root / "step_1"]
    _save(tmp_path, 2)
    assert sorted(p.name for p in root.iterdir()) == ["step_1", "step_2"]
