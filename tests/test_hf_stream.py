"""Hugging Face ``datasets`` as a streaming source (``data.hf_dataset``), offline on local folders written by
``datasets`` itself from the bundled clipart rows: the epoch plan over its data files gives every (rank, worker)
disjoint rows whose values are those ``datasets`` yields (read back non-streaming: Arrow tables, an independent
path); training through the CLI sees every id once; a SIGKILLed 2-process run resumed sees exactly the unseen rows;
a dataset, split or column that does not exist is one clear line."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from test_streaming_train import _kill_after_a_checkpoint, _launch_two, _records, _with, shard_config
from xmodal.cli import main
from xmodal.config import save_config
from xmodal.data import read_manifest
from xmodal.data.hf_source import HFSource, hf_shards
from xmodal.data.shard_plan import Layout, epoch_steps, worker_segments
from xmodal.data.shards import SampleDecoder, parse_columns
from xmodal.data.stream import read_segment
from xmodal.training.checkpoint import POSITION, latest_checkpoint

datasets = pytest.importorskip("datasets")
SIZES = (9, 7, 8)  # rows per data file: uneven, 24 in all
COLUMNS = {"image": "img", "text": "caption"}


@pytest.fixture(scope="module")
def hf_folder(clipart, tmp_path_factory) -> Path:
    """A dataset folder as the hub lays it out (data/train-0000i-of-00003.parquet), written by ``datasets``
    (image bytes embedded as its Image feature), columns named unlike the modalities."""
    rows = read_manifest(clipart, check_files=False).dataset
    out = tmp_path_factory.mktemp("hf_ds")
    (out / "data").mkdir()
    first = 0
    for s, n in enumerate(SIZES):
        part = rows.select(range(first, first + n))
        _embedded(part).to_parquet(str(out / "data" / f"train-{s:05d}-of-{len(SIZES):05d}.parquet"))
        first += n
    return out


def _embedded(rows):
    """Rows as the hub stores them: id, caption, and the image's bytes in an Image feature."""
    features = datasets.Features({"id": datasets.Value("string"), "caption": datasets.Value("string"),
                                  "img": datasets.Image()})
    return datasets.Dataset.from_dict({"id": [str(i) for i in rows["id"]], "caption": rows["text"],
                                       "img": [{"bytes": Path(p).read_bytes(), "path": None} for p in rows["image"]]},
                                      features=features)


def _truth(folder: Path) -> dict[str, dict]:
    ds = datasets.load_dataset(str(folder), split="train").cast_column("img", datasets.Image(decode=False))
    return {row["id"]: row for row in ds}


def test_plan_over_a_streaming_dataset_reads_each_row_once_with_datasets_values(hf_folder):
    """2 ranks × 2 workers × batch 4 over 24 rows in 3 files: the segments (some start mid-file) cover 24 rows
    once, and each row's caption and image bytes are those of datasets' own (non-streaming) read."""
    src = HFSource(str(hf_folder))
    shards = hf_shards(src, parse_columns(COLUMNS, ["image", "text"]))
    assert [s.samples for s in shards] == list(SIZES) and [Path(s.url).name for s in shards] == \
        [f"train-{s:05d}-of-00003.parquet" for s in range(3)]
    layout = Layout(world=2, workers=2, batch=4, seed=5)
    assert epoch_steps(shards, layout) == 3
    segs = [seg for r in (0, 1) for w in (0, 1) for seg in worker_segments(shards, layout, 0, r, w)]
    assert any(seg.start > 0 for seg in segs)  # a sample-level split: a skip inside a data file
    raws = [raw for seg in segs for raw in read_segment(seg.shard, seg.start, seg.stop)]
    truth = _truth(hf_folder)
    assert len(raws) == 24 and sorted(r["__key__"] for r in raws) == sorted(truth)
    for raw in raws:
        row = truth[raw["__key__"]]
        assert raw["caption"] == row["caption"] and raw["img"]["bytes"] == row["img"]["bytes"] is not None
    decoded = SampleDecoder(parse_columns(COLUMNS, ["image", "text"]), {})(raws[0])
    assert decoded["text"] == truth[raws[0]["__key__"]]["caption"].strip()
    assert decoded["image"].size == Image.open(io.BytesIO(truth[raws[0]["__key__"]]["img"]["bytes"])).size


def test_json_lines_files_by_data_files(tmp_path):
    """``hf_dataset: json`` with data files: rows counted by one streaming pass, read from mid-file as datasets
    yields them."""
    for f, n in enumerate((3, 5)):
        (tmp_path / f"p{f}.jsonl").write_text("".join(json.dumps({"text": f"row {f}-{i}"}) + "\n" for i in range(n)))
    src = HFSource("json", data_files=(str(tmp_path / "p0.jsonl"), str(tmp_path / "p1.jsonl")))
    shards = hf_shards(src, parse_columns({}, ["text"]))
    assert [s.samples for s in shards] == [3, 5]
    got = [r["text"] for r in read_segment(shards[1], 2, 4)]
    truth = datasets.load_dataset("json", data_files=str(tmp_path / "p1.jsonl"), split="train")["text"]
    assert got == truth[2:4] == ["row 1-2", "row 1-3"]


def hf_config(clipart, folder: Path, out: Path, **data):
    cfg = shard_config(clipart, None, out, **data)
    cfg.data.shards, cfg.data.hf_dataset, cfg.data.columns = None, str(folder), dict(COLUMNS)
    return cfg


def test_cli_trains_on_a_hf_dataset_every_id_once(clipart, hf_folder, tmp_path):
    run = tmp_path / "run"
    save_config(hf_config(clipart, hf_folder, run, num_workers=2, shuffle_block=5), tmp_path / "c.yaml")
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml")]) == 0
    seen = [i for rec in _records(run, 0) for i in rec["ids"]]
    assert len(seen) == len(set(seen)) == 24 and set(seen) == set(_truth(hf_folder))
    assert (run / "model.safetensors").is_file()


@pytest.mark.parametrize("change, message", [
    ({"hf_dataset": "/nonexistent/hf_dataset_folder"}, "no such dataset"),
    ({"hf_split": "validation"}, "Bad split: validation. Available splits: ['train']"),
    ({"columns": {"image": "img", "text": "title"}}, "data.columns.text: no column 'title' (its columns: caption, "
                                                     "id, img)")])
def test_a_missing_dataset_split_or_column_is_one_line(clipart, hf_folder, tmp_path, capsys, change, message):
    cfg = hf_config(clipart, hf_folder, tmp_path / "run")
    for k, v in change.items():
        setattr(cfg.data, k, v)
    save_config(cfg, tmp_path / "c.yaml")
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "data.hf_dataset" in line]
    assert len(err) == 1 and message in err[0], err


def test_config_names_one_training_source(clipart, hf_folder, tmp_path):
    from xmodal.config.checks import shard_problem

    cfg = hf_config(clipart, hf_folder, tmp_path)
    assert shard_problem(cfg) is None
    cfg.data.train = str(clipart)
    assert shard_problem(cfg) == "data.hf_dataset and data.train: give one training source"
    cfg.data.train, cfg.data.shards = None, "x/{0..1}.tar"
    assert shard_problem(cfg) == "data.shards and data.hf_dataset: give one training source"


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_sees_exactly_the_unseen_rows(clipart, clipart_hf_large, tmp_path):
    """2 gloo processes × 2 workers on the dataset; SIGKILL once a mid-epoch checkpoint exists and later batches
    were taken; --resume: the batches before the checkpoint and after it hold every row of the epoch once."""
    folder, total = clipart_hf_large
    run = tmp_path / "run"
    save_config(_with(hf_config(clipart, folder, run, num_workers=2, shuffle_block=7), save_every=3),
                tmp_path / "c.yaml")
    _kill_after_a_checkpoint(tmp_path / "c.yaml", run)
    resumed_at = json.loads((latest_checkpoint(run) / POSITION).read_text())["tasks"]["contrastive"]["batch"]
    before = {r: [rec for rec in _records(run, r) if rec["batch"] < resumed_at] for r in (0, 1)}
    lines = {r: len(_records(run, r)) for r in (0, 1)}
    assert resumed_at >= 3 and lines[1] > resumed_at
    _launch_two(tmp_path / "c.yaml", "--resume")
    after = {r: _records(run, r)[lines[r]:] for r in (0, 1)}
    steps = total // 8
    for r in (0, 1):
        assert [rec["batch"] for rec in before[r] + after[r]] == list(range(steps))
    seen = [i for r in (0, 1) for rec in before[r] + after[r] for i in rec["ids"]]
    assert len(seen) == len(set(seen)) == steps * 8 and set(seen) <= set(_truth(folder))


@pytest.fixture(scope="module")
def clipart_hf_large(clipart, tmp_path_factory) -> tuple[Path, int]:
    """Every clipart row in 4 Parquet files written by datasets (enough steps to kill mid-epoch)."""
    rows = read_manifest(clipart, check_files=False).dataset
    out = tmp_path_factory.mktemp("hf_large")
    (out / "data").mkdir()
    ds = _embedded(rows)
    for s in range(4):
        ds.shard(4, s, contiguous=True).to_parquet(str(out / "data" / f"train-{s:05d}-of-00004.parquet"))
    return out, len(rows)


def test_a_corrupt_image_is_one_bad_sample_named_by_file_and_id(clipart, tmp_path):
    """datasets' decoding is off: a corrupt image cell is one BadSample (file and id named); the rows after it in the
    same file still come."""
    from xmodal.data.shards import BadSample

    rows = read_manifest(clipart, check_files=False).dataset.select(range(5))
    ds = _embedded(rows)
    bad_id = ds[2]["id"]
    table = ds.data.table.to_pylist()
    table[2]["img"] = {"bytes": b"\xff\xd8 not a jpeg", "path": None}
    datasets.Dataset.from_list(table, features=ds.features).to_parquet(str(tmp_path / "part.parquet"))
    src = HFSource("parquet", data_files=(str(tmp_path / "part.parquet"),))
    [shard] = hf_shards(src, parse_columns(COLUMNS, ["image", "text"]))
    decode = SampleDecoder(parse_columns(COLUMNS, ["image", "text"]), {})
    out = [decode(raw) for raw in read_segment(shard, 1, 5)]
    assert [isinstance(o, BadSample) for o in out] == [False, True, False, False]
    assert str(out[1]).startswith(f"{shard.url}: sample '{bad_id}': ") and "cannot decode" in str(out[1])
    assert [o["id"] for o in out if not isinstance(o, BadSample)] == [ds[i]["id"] for i in (1, 3, 4)]
