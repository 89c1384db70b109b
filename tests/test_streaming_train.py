"""Training on sharded corpora through the CLI: 2 gloo processes × 2 DataLoader workers see every sample id once per
epoch with equal step counts on uneven shards; resampled mode; a SIGKILLed run resumed sees exactly the epoch's
unseen samples; shards written by webdataset's own TarWriter train unchanged; bad samples are skipped and named, and
past data.max_bad_fraction the run stops naming the shard, its last checkpoint intact. Ids come from
``data.record_ids`` (each rank's batches, as trained)."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from _requires import accelerate_launcher
from test_engine import tiny
from xmodal.cli import main
from xmodal.config import save_config
from xmodal.data import read_manifest
from xmodal.data.shard_plan import epoch_order
from xmodal.training.checkpoint import POSITION, latest_checkpoint

wds = pytest.importorskip("webdataset")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shards(clipart, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_shards")
    assert main(["shard", "--manifest", str(clipart), "--out", str(out), "--samples-per-shard", "13"]) == 0
    return out


def _spec(folder: Path) -> str:
    """``folder/{00000..000NN}.tar`` for the shards its sizes.json lists."""
    return str(folder / f"{{00000..{len(json.loads((folder / 'sizes.json').read_text())) - 1:05d}}}.tar")


def shard_config(clipart, shards: str, out: Path, **data):
    cfg = tiny(clipart, out, batch_size=4, max_steps=None, epochs=1)
    cfg.data.train = None
    cfg.data.shards = shards
    cfg.data.record_ids = True
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _launch_two(config: Path, *extra: str, wait: bool = True):
    accelerate = accelerate_launcher(sys.executable)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
           "-m", "xmodal.cli", "pretrain", "--config", str(config), *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr + proc.stdout
    return proc


def _records(run: Path, rank: int) -> list[dict]:
    path = run / "ids" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _manifest_ids(clipart) -> set[str]:
    return {str(i) for i in read_manifest(clipart, check_files=False).dataset["id"]}


@pytest.mark.slow
def test_two_processes_two_workers_see_every_sample_once_per_epoch(clipart, shards, tmp_path):
    """Shards of 13 samples and a shorter last one; 2 processes × 2 workers × batch 4: each epoch every rank takes
    the same steps and together they take each id at most once, leaving out fewer than one global batch."""
    run = tmp_path / "run"
    save_config(_with(shard_config(clipart, _spec(shards), run, num_workers=2, shuffle_block=5), epochs=2),
                tmp_path / "c.yaml")
    _launch_two(tmp_path / "c.yaml")
    total = sum(json.loads((shards / "sizes.json").read_text()).values())
    steps = total // 8
    ranks = [_records(run, r) for r in (0, 1)]
    for epoch in (0, 1):
        per_rank = [[i for rec in recs if rec["epoch"] == epoch for i in rec["ids"]] for recs in ranks]
        assert [sum(rec["epoch"] == epoch for rec in recs) for recs in ranks] == [steps, steps]
        seen = per_rank[0] + per_rank[1]
        assert len(seen) == len(set(seen)) == steps * 8 > total - 8
        assert set(seen) <= _manifest_ids(clipart)
    assert [i for rec in ranks[0] if rec["epoch"] == 0 for i in rec["ids"]] != \
        [i for rec in ranks[0] if rec["epoch"] == 1 for i in rec["ids"]]  # a new order each epoch
    assert (run / "model.safetensors").is_file()


def _with(cfg, **train):
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


@pytest.mark.slow
def test_resampled_mode_on_two_processes(clipart, shards, tmp_path):
    run = tmp_path / "run"
    cfg = _with(shard_config(clipart, _spec(shards), run, num_workers=2, resampled=True), samples_per_epoch=40)
    save_config(cfg, tmp_path / "c.yaml")
    _launch_two(tmp_path / "c.yaml")
    a, b = _records(run, 0), _records(run, 1)
    assert len(a) == len(b) == 40 // 8  # samples_per_epoch over 2 processes of batch 4
    ids_a, ids_b = [i for r in a for i in r["ids"]], [i for r in b for i in r["ids"]]
    assert ids_a != ids_b and set(ids_a + ids_b) <= _manifest_ids(clipart)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_sees_exactly_one_epoch(clipart, shards, tmp_path):
    """SIGKILL to the launcher and both processes once a mid-epoch checkpoint exists and later batches were taken;
    --resume: the batches before the checkpoint (first launch) and those after it (second launch) hold every id of
    the epoch once — nothing lost, nothing twice."""
    run = tmp_path / "run"
    save_config(_with(shard_config(clipart, _spec(shards), run, num_workers=2, shuffle_block=7), save_every=3),
                tmp_path / "c.yaml")
    _kill_after_a_checkpoint(tmp_path / "c.yaml", run)
    ckpt = latest_checkpoint(run)
    resumed_at = json.loads((ckpt / POSITION).read_text())["tasks"]["contrastive"]["batch"]
    before = {r: [rec for rec in _records(run, r) if rec["batch"] < resumed_at] for r in (0, 1)}
    lines = {r: len(_records(run, r)) for r in (0, 1)}
    assert resumed_at >= 3 and lines[1] > resumed_at  # killed mid-epoch, past its checkpoint
    _launch_two(tmp_path / "c.yaml", "--resume")
    after = {r: _records(run, r)[lines[r]:] for r in (0, 1)}
    total = sum(json.loads((shards / "sizes.json").read_text()).values())
    steps = total // 8
    for r in (0, 1):
        assert [rec["batch"] for rec in before[r] + after[r]] == list(range(steps))
    seen = [i for r in (0, 1) for rec in before[r] + after[r] for i in rec["ids"]]
    assert len(seen) == len(set(seen)) == steps * 8


def _jpeg(path: str) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def _tarwriter(clipart, folder: Path, sizes: list[int], damage=None) -> list[str]:
    """open_clip's layout (KEY.jpg, KEY.txt) written by webdataset's TarWriter; ``damage(shard, i, sample)`` may
    change a sample. No sizes.json: counts come from the tar headers."""
    rows = read_manifest(clipart, check_files=False).dataset
    folder.mkdir(parents=True, exist_ok=True)
    i, urls = 0, []
    for s, n in enumerate(sizes):
        urls.append(str(folder / f"{s:05d}.tar"))
        with wds.TarWriter(urls[-1]) as sink:
            for _ in range(n):
                sample = {"__key__": f"{i:06d}", "jpg": _jpeg(rows[i]["image"]), "txt": rows[i]["text"]}
                sink.write(damage(s, i, sample) if damage else sample)
                i += 1
    return urls


def test_tarwriter_shards_train_unchanged(clipart, tmp_path):
    """open_clip's layout from webdataset's TarWriter, no sizes.json; evaluated on the manifest's test split."""
    _tarwriter(clipart, tmp_path / "wds", [7, 9])
    run = tmp_path / "run"
    cfg = shard_config(clipart, str(tmp_path / "wds" / "{00000..00001}.tar"), run)
    cfg.data.eval, cfg.data.eval_split = str(clipart), "test"
    save_config(cfg, tmp_path / "c.yaml")
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml")]) == 0
    seen = [i for rec in _records(run, 0) for i in rec["ids"]]
    assert len(seen) == len(set(seen)) == 16 and set(seen) == {f"{i:06d}" for i in range(16)}
    card = json.loads((run / "model.json").read_text())
    test_rows = read_manifest(clipart, split="test", check_files=False)
    assert card["eval"]["text->image/n_queries"] == len(test_rows)


def _bad_set(clipart, folder: Path, seed: int) -> tuple[str, str]:
    """Three shards of 8, read in the epoch-0 order the plan gives (one process, one worker, no block shuffle): the
    second one read holds a corrupt image (its 3rd sample) and a sample without .txt (its 6th); the last one read
    is truncated. Returns (damaged shard, truncated shard)."""
    from xmodal.data.shards import Shard

    urls = [str(folder / f"{s:05d}.tar") for s in range(3)]
    order = [s.url for s in epoch_order([Shard(u, 8) for u in urls], seed, 0)]
    middle, last = urls.index(order[1]), urls.index(order[2])

    def damage(s, i, sample):
        if s == middle and i % 8 == 2:
            sample["jpg"] = b"\xff\xd8 not a jpeg"
        if s == middle and i % 8 == 5:
            del sample["txt"]
        return sample

    _tarwriter(clipart, folder, [8, 8, 8], damage)
    (folder / "sizes.json").write_text(json.dumps({Path(u).name: 8 for u in urls}))
    import tarfile
    with tarfile.open(urls[last]) as tar:
        member = tar.getmembers()[-5]  # inside the data of the 6th sample's image or text
        cut = member.offset_data + member.size // 2
    data = Path(urls[last]).read_bytes()
    Path(urls[last]).write_bytes(data[:cut])  # the tar ends inside a member
    return urls[middle], urls[last]


def test_bad_samples_are_skipped_named_and_bounded(clipart, tmp_path, capsys):
    damaged, truncated = _bad_set(clipart, tmp_path / "bad", seed=3)
    spec = str(tmp_path / "bad" / "{00000..00002}.tar")
    run = tmp_path / "run"
    save_config(_with(shard_config(clipart, spec, run, shuffle_block=1, max_bad_fraction=0.3), save_every=1),
                tmp_path / "ok.yaml")
    assert main(["pretrain", "--config", str(tmp_path / "ok.yaml")]) == 0  # trains to the end
    named = [n for line in (run / "metrics.jsonl").read_text().splitlines()
             for n in json.loads(line).get("bad_samples", [])]
    assert any(n.startswith(f"{damaged}: sample '") and ".jpg: cannot decode" in n for n in named)
    assert any(n.startswith(f"{damaged}: sample '") and ".txt (column 'text')" in n for n in named)
    assert any(n.startswith(f"{truncated}: sample '#") and "unreadable tar after sample" in n for n in named)
    assert "skipped 1 bad sample(s)" in (run / "train.log").read_text()
    assert (run / "model.safetensors").is_file()

    stop = tmp_path / "stop"  # no bad sample allowed: the corrupt image (samples 8-11: the 3rd step) stops it
    save_config(_with(shard_config(clipart, spec, stop, shuffle_block=1, max_bad_fraction=0.0), save_every=1),
                tmp_path / "stop.yaml")
    assert main(["pretrain", "--config", str(tmp_path / "stop.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"exceed data.max_bad_fraction 0.0 of its 24 samples (0 allowed); the last: {damaged}: sample '" in err
    last_good = latest_checkpoint(stop)
    assert last_good.name == "step_2" and f"the last good checkpoint is {last_good}" in err
    assert json.loads((last_good / POSITION).read_text())["step"] == 2
    assert not (stop / "model.safetensors").exists()


def test_parquet_shards_train(clipart, tmp_path):
    """Two Parquet shards of 8 rows (image bytes as an HF Image struct, text, id): one epoch takes each id once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_manifest(clipart, check_files=False).dataset.select(range(16))
    for s in range(2):
        part = rows.select(range(8 * s, 8 * s + 8))
        pq.write_table(pa.table({"id": [str(i) for i in part["id"]], "text": part["text"],
                                 "image": [{"bytes": Path(p).read_bytes(), "path": None} for p in part["image"]]}),
                       tmp_path / f"part-{s}.parquet", row_group_size=3)
    run = tmp_path / "run"
    save_config(shard_config(clipart, str(tmp_path / "part-{0..1}.parquet"), run, shuffle_block=4), tmp_path / "c.yaml")
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml")]) == 0
    seen = [i for rec in _records(run, 0) for i in rec["ids"]]
    assert sorted(seen) == sorted(str(i) for i in rows["id"])


def test_resume_refuses_a_differently_cut_stream(clipart, shards, tmp_path, capsys):
    """A checkpoint's position means samples only for the layout it was cut for: another worker count is refused,
    naming what changed."""
    run = tmp_path / "run"
    save_config(_with(shard_config(clipart, _spec(shards), run), max_steps=2), tmp_path / "c.yaml")
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml")]) == 0
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--resume", "train.max_steps=4",
                 "data.num_workers=2"]) == 2
    assert "the checkpoint's shard stream was cut differently (workers 1 -> 2" in capsys.readouterr().err


def _kill_after_a_checkpoint(config: Path, run: Path) -> None:
    """Launch 2 processes and SIGKILL them mid-epoch, once a checkpoint exists and rank 1 has logged 5 batches."""
    proc = _launch_two(config, wait=False)
    deadline = time.monotonic() + 300
    try:
        while not (latest_checkpoint(run) is not None and (run / "ids" / "rank1.jsonl").is_file()
                   and len(_records(run, 1)) >= 5):
            assert proc.poll() is None, "training ended before the kill"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
    finally:  # torch's launcher starts each training process in a session of its own: kill the tree, by id
        import psutil
        for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        proc.wait()
