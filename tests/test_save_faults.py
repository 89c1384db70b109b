"""A full disk or a read-only folder while saving: a training checkpoint, a model, a retrieval index.

Each save fails after a good copy exists. Every case asserts: a clear error (it says "failed" and names the
destination), no partial file left behind, the previous copy unchanged (same bytes) and still loadable, and for
training that resume continues from the previous checkpoint.

Faults are injected the way a full disk shows up (measured on a 256 KiB tmpfs): the writer leaves part of its file,
then raises — safetensors a ``SafetensorError`` ("I/O error: No space left on device"), ``torch.save`` and faiss a
``RuntimeError``, plain file writes ``OSError(ENOSPC)``. Where a tmpfs can be mounted (root), the model and index
cases also run on a really full one.
"""
from __future__ import annotations

import builtins
import errno
import gc
import hashlib
import io
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

import xmodal.training.resume
from test_engine import tiny, weights
from test_service import tiny_model
from xmodal.training.checkpoint import CheckpointError, latest_checkpoint
from xmodal.training.engine import pretrain
from xmodal.model import XModalModel
from xmodal.retrieval.index import EmbeddingIndex

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
REAL_OPEN = io.open


def full_disk(real, targets, error, scratch: Path):
    """``real`` (a writer called as ``real(obj, path, ...)``), except that for a path containing one of ``targets``
    it writes the first half of the real bytes and raises ``error``."""
    def writer(obj, path, *args, **kwargs):
        if not any(t in str(path) for t in targets):
            return real(obj, path, *args, **kwargs)
        real(obj, str(scratch), *args, **kwargs)
        data = scratch.read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise error
    return writer


class FullDiskFile:
    """A text file whose writes stop halfway with ENOSPC (what ``open(...).write`` does on a full disk)."""

    def __init__(self, path, *args, **kwargs):
        self._f = REAL_OPEN(path, *args, **kwargs)

    def write(self, text):
        self._f.write(text[: len(text) // 2])
        self._f.flush()
        raise ENOSPC

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def full_disk_open(monkeypatch, targets, binary: bool = False):
    """Text files (and with ``binary``, binary files too) opened for writing at a path containing one of ``targets``
    hit a full disk (``open`` and ``Path.write_text`` alike, whichever the code under test uses)."""
    def opener(path, mode="r", *args, **kwargs):
        if "w" in mode and (binary or "b" not in mode) and any(t in str(path) for t in targets):
            return FullDiskFile(path, mode, *args, **kwargs)
        return REAL_OPEN(path, mode, *args, **kwargs)
    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder`` (hidden leftovers included)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def permissions_enforced(tmp_path: Path) -> bool:
    """False for root with CAP_DAC_OVERRIDE, which writes into read-only folders anyway."""
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        (probe / "x").write_text("x")
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(stat.S_IRWXU)


@pytest.fixture
def read_only(tmp_path):
    """Make folders read-only (restored afterwards, so pytest can delete them); skip where permissions are not
    enforced."""
    if not permissions_enforced(tmp_path):
        pytest.skip("permissions are not enforced for this user (root): cannot make a folder read-only")
    folders = []

    def make(folder: Path) -> None:
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        folders.append(folder)
    yield make
    for folder in folders:
        folder.chmod(stat.S_IRWXU)


# ------------------------------------------------------------------------------------------ training checkpoints

@pytest.fixture(scope="module")
def uninterrupted(clipart, tmp_path_factory):
    return pretrain(tiny(clipart, tmp_path_factory.mktemp("faults") / "full", max_steps=4, save_every=2))


def _check_failed_then_resume(clipart, out: Path, uninterrupted: Path, before: dict[str, str], error):
    """After the step-4 save failed: step 2 is the newest checkpoint, unchanged and loadable; resume finishes the
    run from it, as if nothing had happened."""
    ckpts = out / "checkpoints"
    assert "failed" in str(error.value) and str(ckpts / "step_4") in str(error.value), error.value
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_2"]  # no .tmp_step_4, no torn step_4
    assert latest_checkpoint(out) == ckpts / "step_2"
    assert snapshot(ckpts / "step_2") == before
    assert not (out / "model.safetensors").exists()

    pretrain(tiny(clipart, out, max_steps=4, save_every=2), resume=True)
    assert f"resumed from {ckpts / 'step_2'} at step 2" in (out / "train.log").read_text()
    final, ref = weights(out), weights(uninterrupted)
    for k in ref:
        torch.testing.assert_close(final[k], ref[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("writer", ["model.safetensors", "optimizer.bin"])
def test_checkpoint_save_on_a_full_disk(clipart, tmp_path, monkeypatch, uninterrupted, writer):
    import accelerate.utils.other as acc

    out = tmp_path / "run"
    before = {}
    if writer == "model.safetensors":  # what safetensors raises on ENOSPC
        error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        real = acc.safe_save_file
        monkeypatch.setattr(acc, "safe_save_file", full_disk(real, ["step_4"], error, tmp_path / "scratch"))
    else:  # what torch.save raises when its zip writer hits ENOSPC
        error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        monkeypatch.setattr(torch, "save", full_disk(torch.save, ["step_4"], error, tmp_path / "scratch"))
    real_save_checkpoint = xmodal.training.resume.save_checkpoint

    def save_checkpoint(accelerator, output_dir, position, keep=2, extra=None):  # step_2 just before the failing save
        if position["step"] == 4:
            before.update(snapshot(out / "checkpoints" / "step_2"))
        return real_save_checkpoint(accelerator, output_dir, position, keep=keep, extra=extra)

    monkeypatch.setattr(xmodal.training.resume, "save_checkpoint", save_checkpoint)
    with pytest.raises(CheckpointError) as e:
        pretrain(tiny(clipart, out, max_steps=4, save_every=2))
    assert e.value.__cause__ is error
    monkeypatch.undo()
    _check_failed_then_resume(clipart, out, uninterrupted, before, e)


def test_checkpoint_save_into_a_read_only_folder(clipart, tmp_path, monkeypatch, uninterrupted, read_only):
    out = tmp_path / "run"
    before = {}
    real_save_checkpoint = xmodal.training.resume.save_checkpoint

    def save_checkpoint(accelerator, output_dir, position, keep=2, extra=None):
        if position["step"] == 4:
            before.update(snapshot(out / "checkpoints" / "step_2"))
            read_only(out / "checkpoints")
        return real_save_checkpoint(accelerator, output_dir, position, keep=keep, extra=extra)

    monkeypatch.setattr(xmodal.training.resume, "save_checkpoint", save_checkpoint)
    with pytest.raises(CheckpointError) as e:
        pretrain(tiny(clipart, out, max_steps=4, save_every=2))
    assert isinstance(e.value.__cause__, PermissionError)
    monkeypatch.undo()
    (out / "checkpoints").chmod(stat.S_IRWXU)
    _check_failed_then_resume(clipart, out, uninterrupted, before, e)


# ------------------------------------------------------------------------------------------------------ models

@pytest.fixture
def saved_model(tmp_path):
    """A model saved in ``run/``, the bytes of that folder, and a different model to save over it."""
    run = tiny_model(seed=0).save(tmp_path / "run", extra={"step": 1})
    return run, snapshot(run), tiny_model(seed=1)


def _assert_model_unchanged(run: Path, before: dict[str, str], error) -> None:
    assert "failed" in str(error.value) and str(run) in str(error.value), error.value
    assert snapshot(run) == before  # same files, same bytes, no .tmp leftovers
    loaded = XModalModel.from_pretrained(run)
    assert loaded.card["step"] == 1
    for k, v in tiny_model(seed=0).state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_model_save_on_a_full_disk_while_writing_weights(saved_model, monkeypatch, tmp_path):
    import safetensors.torch

    run, before, other = saved_model
    error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file",
                        full_disk(safetensors.torch.save_file, [".tmp"], error, tmp_path / "scratch"))
    with pytest.raises(OSError) as e:
        other.save(run, extra={"step": 2})
    _assert_model_unchanged(run, before, e)


def test_model_save_on_a_full_disk_while_writing_the_card(saved_model, monkeypatch):
    """The weights were written fine: they must still not replace the old ones without their card."""
    run, before, other = saved_model
    full_disk_open(monkeypatch, ["model.json"])
    with pytest.raises(OSError) as e:
        other.save(run, extra={"step": 2})
    assert e.value.errno == errno.ENOSPC
    _assert_model_unchanged(run, before, e)


def test_model_save_into_a_read_only_folder(saved_model, read_only):
    run, before, other = saved_model
    read_only(run)
    with pytest.raises(OSError, match="Permission denied") as e:  # safetensors reports it as a SafetensorError
        other.save(run, extra={"step": 2})
    _assert_model_unchanged(run, before, e)


# ----------------------------------------------------------------------------------------------------- indexes

@pytest.fixture
def saved_index(tmp_path):
    """An index saved at ``parent/index``, its bytes, and the same index with more rows, to save over it."""
    rng = np.random.default_rng(0)
    index = EmbeddingIndex(8)
    index.add(rng.normal(size=(20, 8)).astype("float32"), [{"id": f"a{i}"} for i in range(20)])
    path = index.save(tmp_path / "parent" / "index")
    before = snapshot(path.parent)
    index.add(rng.normal(size=(30, 8)).astype("float32"), [{"id": f"b{i}"} for i in range(30)])
    return path, before, index


def _assert_index_unchanged(path: Path, before: dict[str, str], error) -> None:
    assert "failed" in str(error.value) and str(path) in str(error.value), error.value
    assert snapshot(path.parent) == before  # no .index.new / .index.old left, same bytes
    loaded = EmbeddingIndex.load(path)
    assert len(loaded) == 20
    assert sorted(m["id"] for m in loaded._meta.values()) == sorted(f"a{i}" for i in range(20))


def test_index_save_on_a_full_disk_while_writing_vectors(saved_index, monkeypatch, tmp_path):
    import faiss

    path, before, index = saved_index
    error = RuntimeError(f"Error in void faiss::write_index(...): Error: 'ret == (size * 4)' failed: write error in "
                         f"{path}: 262099 != 640000 (No space left on device)")  # faiss's words for ENOSPC
    monkeypatch.setattr(faiss, "write_index", full_disk(faiss.write_index, [".new"], error, tmp_path / "scratch"))
    with pytest.raises(OSError) as e:
        index.save(path)
    _assert_index_unchanged(path, before, e)


def test_index_save_on_a_full_disk_while_writing_metadata(saved_index, monkeypatch):
    path, before, index = saved_index
    full_disk_open(monkeypatch, ["metadata.arrow"], binary=True)
    with pytest.raises(OSError) as e:
        index.save(path)
    assert e.value.errno == errno.ENOSPC
    _assert_index_unchanged(path, before, e)


def test_index_save_into_a_read_only_folder(saved_index, read_only):
    path, before, index = saved_index
    read_only(path.parent)
    with pytest.raises(PermissionError) as e:
        index.save(path)
    _assert_index_unchanged(path, before, e)


# ------------------------------------------------------------------------------------------- a really full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs, to fill for real. Needs root and the right to mount; skipped elsewhere."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    yield disk
    gc.collect()  # an index loaded from the disk keeps its metadata memory-mapped until it is collected
    if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # still mapped somewhere: detach it now


def fill(disk: Path, leave: int) -> None:
    """Leave only ``leave`` bytes free on ``disk``."""
    st = os.statvfs(disk)
    (disk / "filler").write_bytes(bytes(st.f_bavail * st.f_frsize - leave))


def test_model_save_on_a_really_full_disk(small_disk):
    run = tiny_model(seed=0).save(small_disk / "run", extra={"step": 1})  # ~6.4 MB of weights
    before = snapshot(run)
    fill(small_disk, leave=1 << 20)
    with pytest.raises(OSError, match="No space left on device") as e:
        tiny_model(seed=1).save(run, extra={"step": 2})
    _assert_model_unchanged(run, before, e)


def test_index_save_on_a_really_full_disk(small_disk):
    rng = np.random.default_rng(0)
    index = EmbeddingIndex(8)
    index.add(rng.normal(size=(4000, 8)).astype("float32"), [{"id": i} for i in range(4000)])  # ~128 KB of vectors
    path = index.save(small_disk / "parent" / "index")
    before = snapshot(path.parent)
    index.add(rng.normal(size=(4000, 8)).astype("float32"))
    fill(small_disk, leave=32 << 10)
    with pytest.raises(OSError, match="No space left on device") as e:
        index.save(path)
    assert "failed" in str(e.value) and str(path) in str(e.value)
    assert snapshot(path.parent) == before
    assert len(EmbeddingIndex.load(path)) == 4000
