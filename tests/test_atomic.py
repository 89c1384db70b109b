"""xmodal.atomic: a write that fails at any point (the writer, the fsync, the rename) leaves the old file as it was
and no temporary file; a clean write fsyncs the data before the rename and gives the file the umask's mode.

(The model, the index and checkpoints have their own fault tests in test_save_faults.py; these cover the plain files
the CLI and the corpus preparers write through the same helper.)
"""
from __future__ import annotations

import os

import pytest

from xmodal import atomic


class Crash(Exception):
    """The process dying at this point."""


def _fail_at(monkeypatch, name):
    def boom(*args, **kwargs):
        raise Crash(name)
    monkeypatch.setattr(os, name, boom)


@pytest.mark.parametrize("point", ["writer", "fsync", "replace"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, point):
    path = tmp_path / "manifest.csv"
    path.write_text("old\n")
    with pytest.raises(Crash):
        if point == "writer":
            with atomic.replacing(path) as tmp:
                tmp.write_text("half of the new")
                raise Crash("writer")
        else:
            _fail_at(monkeypatch, point)
            atomic.write_text(path, "new\n", tmp_path / ".manifest.csv.tmp123")
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv"]


def test_the_data_is_fsynced_before_the_rename_and_the_mode_follows_the_umask(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(f"replace {os.path.basename(a)}"),
                                                     real_replace(a, b))[1])
    old_umask = os.umask(0o027)
    try:
        atomic.write_text(tmp_path / "out.jsonl", "{}\n")
    finally:
        os.umask(old_umask)
    assert calls == ["fsync", "replace .out.jsonl.tmp"]
    assert (tmp_path / "out.jsonl").read_text() == "{}\n"
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o640
    calls.clear()
    with atomic.replacing(tmp_path / "a.png", fsync=False) as tmp:
        tmp.write_bytes(b"png")
    assert calls == ["replace .a.png.tmp"]  # bulk writes: atomic for readers, no fsync each
