"""Sharded corpora without training: `xmodal shard` on the real Open Clip Art rows (read back by webdataset and by
open_clip_train's size reader), shards written by webdataset's own TarWriter, pipe: URLs, bad samples named by shard
and key, the epoch plan (disjoint, equal steps on uneven shards, unbiased resampling) and exact mid-epoch positions
through a real 2-worker DataLoader."""
from __future__ import annotations

import collections
import io
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from xmodal.cli import main
from xmodal.data import read_manifest
from xmodal.data.shard_plan import Layout, epoch_steps, worker_batches, worker_segments
from xmodal.data.shards import SampleDecoder, Shard, parse_columns, read_samples, shard_list
from xmodal.data.stream import BAD, ShardCorpus, ShardStream, StreamLoader

wds = pytest.importorskip("webdataset")


@pytest.fixture(scope="module")
def shards(clipart, tmp_path_factory):
    """The clipart rows as shards of 13 samples (the last one shorter), through the CLI."""
    out = tmp_path_factory.mktemp("shards")
    assert main(["shard", "--manifest", str(clipart), "--out", str(out), "--samples-per-shard", "13"]) == 0
    return out


def _spec(folder: Path) -> str:
    """``folder/{00000..000NN}.tar`` for the shards its sizes.json lists."""
    return str(folder / f"{{00000..{len(json.loads((folder / 'sizes.json').read_text())) - 1:05d}}}.tar")


def _ids(manifest) -> list[str]:
    return [str(i) for i in read_manifest(manifest, check_files=False).dataset["id"]]


def test_xmodal_shard_round_trips_through_webdataset_and_open_clip(clipart, shards):
    rows = read_manifest(clipart, check_files=False).dataset
    sizes = json.loads((shards / "sizes.json").read_text())
    assert sum(sizes.values()) == len(rows) and set(sizes.values()) <= {13, len(rows) % 13 or 13}
    spec = _spec(shards)
    from open_clip_train.data import get_dataset_size  # the peer reads the same index
    assert get_dataset_size(spec) == (len(rows), len(sizes))
    seen = list(wds.WebDataset(spec, shardshuffle=False))  # the peer's reader: same samples, same bytes
    assert [json.loads(s["json"])["id"] for s in seen] == _ids(clipart)
    first = Path(rows[0]["image"])
    assert seen[0][first.suffix.lstrip(".")] == first.read_bytes()
    assert seen[0]["txt"].decode() == rows[0]["text"]
    assert json.loads(seen[0]["json"])["label"] == rows[0]["label"]


def test_xmodal_shard_records_each_tar_as_the_reader_checks_it(shards):
    """checksums.json: each tar's size and XXH3-128 (computed here with xxhash directly) and its count (= sizes.json,
    = the samples webdataset reads); shard_list hands each shard its record."""
    import xxhash

    from xmodal.data.shards import shard_list
    records = json.loads((shards / "checksums.json").read_text())["shards"]
    sizes = json.loads((shards / "sizes.json").read_text())
    assert records.keys() == sizes.keys()
    for name, rec in records.items():
        data = (shards / name).read_bytes()
        assert rec == {"samples": sizes[name], "size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
        assert rec["samples"] == len(list(wds.WebDataset(str(shards / name), shardshuffle=False)))
    assert [s.record for s in shard_list(_spec(shards))] == [records[n] for n in sorted(records)]


def test_xmodal_shard_reports_bad_rows_by_row_and_field(clipart, tmp_path, capsys):
    """Row 2's image is replaced by an empty file: found while its shard is written, named by row, id and field."""
    import csv

    with open(clipart, newline="") as f:
        rows = list(csv.DictReader(f))
    root = Path(clipart).parent
    (root / "empty.png").write_bytes(b"")
    rows[1]["image"] = "empty.png"
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    flags = ["shard", "--manifest", str(manifest), "--out", str(tmp_path / "s"), "--root", str(root)]
    try:
        assert main(flags) == 2  # --on-bad-row error (the default): stops at the row
        assert f"row 2 (id '{rows[1]['id']}'): field 'image': empty file" in capsys.readouterr().err
        assert main(flags + ["--on-bad-row", "skip"]) == 0
        assert f"row 2 (id '{rows[1]['id']}'): field 'image': empty file" in capsys.readouterr().err
    finally:
        (root / "empty.png").unlink()
    assert sum(json.loads((tmp_path / "s" / "sizes.json").read_text()).values()) == len(rows) - 1


def _tarwriter_shards(clipart, out: Path, per_shard: int, n: int) -> list[str]:
    """open_clip's layout written by webdataset's TarWriter: KEY.jpg + KEY.txt, no sizes.json; returns the keys."""
    rows = read_manifest(clipart, check_files=False).dataset.select(range(n))
    keys = []
    for s in range(math.ceil(n / per_shard)):
        with wds.TarWriter(str(out / f"part-{s}.tar")) as sink:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                buf = io.BytesIO()
                Image.open(rows[i]["image"]).convert("RGB").save(buf, format="JPEG")
                sink.write({"__key__": f"s{s}k{i:04d}", "jpg": buf.getvalue(), "txt": rows[i]["text"]})
                keys.append(f"s{s}k{i:04d}")
    return keys


def test_tarwriter_shards_read_with_counts_from_the_tar_headers(clipart, tmp_path):
    keys = _tarwriter_shards(clipart, tmp_path, per_shard=6, n=15)
    listed = shard_list(str(tmp_path / "part-{0..2}.tar"))
    assert [s.samples for s in listed] == [6, 6, 3]
    decode = SampleDecoder(parse_columns({}, ["image", "text"]), {})
    got = [decode(raw) for s in listed for raw in read_samples(s)]
    assert [g["id"] for g in got] == keys
    assert all(isinstance(g["image"], Image.Image) and g["text"] for g in got)
    piped = [raw["__key__"] for raw in read_samples(Shard(f"pipe:cat {tmp_path / 'part-1.tar'}", 6), 2, 5)]
    assert piped == keys[8:11]  # a pipe: command (an object store's CLI) reads like the file


def test_bad_samples_are_named_by_shard_and_key(clipart, tmp_path):
    rows = read_manifest(clipart, check_files=False).dataset
    path = tmp_path / "bad.tar"
    with wds.TarWriter(str(path)) as sink:
        for i in range(6):
            sample = {"__key__": f"k{i}", "png": Path(rows[i]["image"]).read_bytes(), "txt": rows[i]["text"]}
            if i == 1:
                sample["png"] = b"\x89PNG not really"
            if i == 3:
                del sample["txt"]
            sink.write(sample)
    data = path.read_bytes()
    whole = tmp_path / "whole.tar"
    whole.write_bytes(data)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) * 2 // 3])
    decode = SampleDecoder(parse_columns({}, ["image", "text"]), {})
    got = [decode(r) for r in read_samples(Shard(str(whole), 6))]
    bad = {g.key: str(g) for g in got if not isinstance(g, dict)}
    assert set(bad) == {"k1", "k3"}
    assert bad["k1"].startswith(f"{whole}: sample 'k1': k1.png: cannot decode")
    assert "missing member k3.txt" in bad["k3"]
    got = [decode(r) for r in read_samples(Shard(str(cut), 6))]
    lost = [g for g in got if not isinstance(g, dict) and g.key.startswith("#")]
    assert len(got) == 6 and lost and all(str(cut) in str(g) and "unreadable tar after sample" in str(g)
                                          for g in lost)


SIZES = [7, 13, 5, 11, 3, 9, 1, 17]  # uneven, 66 samples


@pytest.mark.parametrize("world, workers, batch", [(2, 2, 4), (2, 3, 5), (3, 2, 2), (4, 4, 1)])
def test_epoch_plan_is_disjoint_with_equal_steps(world, workers, batch):
    shards = [Shard(f"s{i}", n) for i, n in enumerate(SIZES)]
    layout = Layout(world, workers, batch, seed=5)
    steps = epoch_steps(shards, layout)
    assert steps == sum(SIZES) // (world * batch)
    for epoch in (0, 1):
        seen = collections.Counter()
        for rank in range(world):
            taken = 0
            for w in range(workers):
                segs = worker_segments(shards, layout, epoch, rank, w)
                assert sum(len(s) for s in segs) == worker_batches(steps, workers, w) * batch
                taken += sum(len(s) for s in segs)
                seen.update((s.shard.url, i) for s in segs for i in range(s.start, s.stop))
            assert taken == steps * batch  # every rank the same steps
        assert max(seen.values()) == 1 and len(seen) == steps * batch * world


def test_resampled_plan_draws_samples_uniformly_without_rank_bias():
    """Each rank's draws over many epochs: every sample equally likely whatever its shard's size (a shard's samples
    drawn, divided by its size, is the same for every shard: chi-square against uniform), and two ranks never draw
    the same sequence (the bias of a generator seeded alike on every rank)."""
    shards = [Shard(f"s{i}", n) for i, n in enumerate(SIZES)]
    layout = Layout(2, 2, 4, seed=1, resampled=True, samples_per_epoch=400)
    for rank in (0, 1):
        counts = collections.Counter()
        for epoch in range(100):
            for w in range(2):
                for seg in worker_segments(shards, layout, epoch, rank, w):
                    counts[seg.shard.url] += len(seg)
        assert sum(counts.values()) == 100 * 200  # the epoch's samples, split evenly over the ranks
        per_sample = [counts[s.url] / s.samples for s in shards]  # ~ shard draws: multinomial, 1/8 each
        expected = sum(per_sample) / len(shards)
        chi2 = sum((x - expected) ** 2 / expected for x in per_sample)
        assert chi2 < 24.3, (rank, chi2, per_sample)  # 7 degrees of freedom: p = 0.001
    a = [(s.shard.url, s.start) for s in worker_segments(shards, layout, 0, 0, 0)]
    b = [(s.shard.url, s.start) for s in worker_segments(shards, layout, 0, 1, 0)]
    assert a != b


def test_stream_resumes_mid_epoch_with_two_workers(shards, clipart):
    """A real 2-worker DataLoader: the batches after position (epoch 1, batch c) are exactly the uninterrupted
    epoch's batches from c on, for every c (each worker's place from the one number)."""
    listed = shard_list(_spec(shards))
    layout = Layout(world=1, workers=2, batch=4, seed=3)
    decode = SampleDecoder(parse_columns({}, ["image", "text"]), {"image": lambda im: 0})
    corpus = ShardCorpus(listed, layout)
    loader = StreamLoader(ShardStream(corpus, 0, decode, shuffle_block=6), num_workers=2)
    loader.set_position(1, 0)
    full = [b["id"] for b in loader]
    assert len(full) == len(loader) == len(corpus) // 4
    assert len({i for b in full for i in b}) == len(loader) * 4  # no sample twice
    assert {i for b in full for i in b} <= set(_ids(clipart))
    for c in (1, 2, 5, len(full) - 1):
        loader.set_position(1, c)
        assert [b["id"] for b in loader] == full[c:], c
    loader.set_position(0, 0)
    assert [b["id"] for b in loader] != full  # another epoch, another order
    assert all(not b[BAD] for b in loader)


def test_parquet_shards_read_like_tar_shards(clipart, tmp_path):
    """Parquet shards (row groups of 4): counts from the footer, a slice starting mid-file reads only its rows, image
    bytes (an HF Image struct) and text become the same values as from a tar shard of the same rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = read_manifest(clipart, check_files=False).dataset.select(range(10))
    table = pa.table({"id": [str(i) for i in rows["id"]],
                      "image": [{"bytes": Path(p).read_bytes(), "path": None} for p in rows["image"]],
                      "text": rows["text"]})
    pq.write_table(table, tmp_path / "part-0.parquet", row_group_size=4)
    listed = shard_list(str(tmp_path / "part-0.parquet"))
    assert [s.samples for s in listed] == [10]
    decode = SampleDecoder(parse_columns({}, ["image", "text"]), {})
    got = [decode(raw) for raw in read_samples(listed[0], 5, 9)]
    assert [g["id"] for g in got] == [str(i) for i in rows["id"][5:9]]
    assert [g["text"] for g in got] == rows["text"][5:9]
    assert got[0]["image"].tobytes() == Image.open(rows["image"][5]).tobytes()


def test_audio_member_decodes_as_its_file(tmp_path):
    """An audio shard member goes through the modality's read_bytes: the transform gives what it gives on the file."""
    import numpy as np
    import soundfile as sf

    from xmodal.modalities.audio import AudioTransform

    wav = tmp_path / "a.wav"
    sf.write(wav, (0.1 * np.sin(np.arange(8000) / 5.0)).astype("float32"), 16000)
    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        sink.write({"__key__": "k0", "wav": wav.read_bytes(), "txt": "a tone"})
    transform = AudioTransform(max_seconds=1.0)
    decode = SampleDecoder(parse_columns({}, ["audio", "text"]), {"audio": transform})
    (item,) = [decode(raw) for raw in read_samples(Shard(str(tmp_path / "a.tar"), 1))]
    import torch
    torch.testing.assert_close(item["audio"], transform(str(wav)))
    assert item["text"] == "a tone"


def test_stream_resumes_augmented_crops_exactly(shards, clipart):
    """With an augmenting image transform and ``augment_seed``, the batches after position (epoch 1, batch c) hold
    the very crops of the uninterrupted epoch's (each sample's draws seeded by (seed, epoch, sample), not by the
    worker's generator), with 2 workers as with none; another epoch crops the same sample anew."""
    import torch

    from xmodal.modalities.image import ImageTransform

    listed = shard_list(_spec(shards))
    layout = Layout(world=1, workers=2, batch=4, seed=3)
    crop = ImageTransform(24, (0.5,) * 3, (0.5,) * 3, augment=True)
    decode = SampleDecoder(parse_columns({}, ["image", "text"]), {"image": crop}, augment_seed=3)
    loader = StreamLoader(ShardStream(ShardCorpus(listed, layout), 0, decode, shuffle_block=6), num_workers=2)
    loader.set_position(1, 0)
    full = [(b["id"], b["image"]) for b in loader]
    for c in (1, 4):
        loader.set_position(1, c)
        got = [(b["id"], b["image"]) for b in loader]
        assert [g[0] for g in got] == [f[0] for f in full[c:]]
        for (_, a), (_, b) in zip(got, full[c:]):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    from xmodal.modalities.text import BPETokenize
    assert not SampleDecoder(parse_columns({}, ["image", "text"]), {"text": BPETokenize(16)}, augment_seed=3)._random
    loader.set_position(0, 0)  # epoch 0: the same samples (in another order), other crops
    other = {i: x for b in loader for i, x in zip(b["id"], b["image"])}
    first = dict(zip(*full[0]))
    assert all(not torch.equal(other[i], x) for i, x in first.items() if i in other)
