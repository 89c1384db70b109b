"""Sharded indexes: every shard's top-k merged exactly equals the single index's top-k (ids and scores, ties
included); adding and replacing a shard commit atomically; a Retriever (and so `xmodal serve`) opens one."""
from __future__ import annotations

import json

import numpy as np
import pytest

from xmodal.retrieval import RetrievalError
from xmodal.retrieval.index import EmbeddingIndex
from xmodal.retrieval.retriever import Retriever
from xmodal.retrieval.sharded import SLOT_BITS, ShardedIndex, open_index


@pytest.fixture
def corpus():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6000, 24)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[[10, 2600, 4000, 5999, 3300]] = x[2]  # exact ties spread over the shards
    meta = [{"part": "a" if i % 3 else "b", "i": i} for i in range(len(x))]
    q = np.vstack([x[[2, 700]], rng.standard_normal((62, 24)).astype(np.float32)])
    return x, meta, q


def build(x, meta, cuts, path, model_info=None):
    sharded = ShardedIndex.create(path)
    offsets = {}
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        part = EmbeddingIndex(x.shape[1], model_info=model_info)
        part.add(x[lo:hi], meta[lo:hi])
        offsets[sharded.add_shard(part)] = lo
    return sharded, offsets


def as_rows(hits, offsets):
    """Sharded ids → the row numbers of the single index over the concatenated shards."""
    return [[offsets[h.id >> SLOT_BITS] + (h.id & ((1 << SLOT_BITS) - 1)) for h in row] for row in hits]


@pytest.mark.parametrize("k", [1, 10, 60])
def test_sharded_equals_single_index(tmp_path, corpus, k):
    x, meta, q = corpus
    single = EmbeddingIndex(24)
    single.add(x, meta)
    sharded, offsets = build(x, meta, [0, 2500, 3500, 6000], tmp_path / "s")
    for queries in (q, q[:1], q[:5]):  # the batch path (64 queries) and faiss's scan
        want = single.search(queries, k)
        got = sharded.search(queries, k)
        assert as_rows(got, offsets) == [[h.id for h in row] for row in want]
        assert [[h.score for h in row] for row in got] == [[h.score for h in row] for row in want]
        assert [[h.metadata for h in row] for row in got] == [[h.metadata for h in row] for row in want]
    want = single.search(q, k, filter={"part": "b"})
    got = open_index(tmp_path / "s").search(q, k, filter={"part": "b"})
    assert as_rows(got, offsets) == [[h.id for h in row] for row in want]
    with pytest.raises(RetrievalError, match="no item in the index has it"):
        sharded.search(q, k, filter={"prat": "b"})


def test_add_and_replace_are_atomic(tmp_path, corpus, monkeypatch):
    x, meta, q = corpus
    sharded, offsets = build(x, meta, [0, 3000, 6000], tmp_path / "s")
    before = json.loads((tmp_path / "s" / "shards.json").read_text())
    new = EmbeddingIndex(24)
    new.add(x[3000:3100], meta[3000:3100])

    import xmodal.retrieval.sharded as sh

    def crash(*a, **kw):
        raise OSError("disk full")
    monkeypatch.setattr(sh, "write_text", crash)  # the new shard folder is written, the commit never happens
    with pytest.raises(OSError):
        sharded.replace_shard(1, new)
    monkeypatch.undo()
    assert json.loads((tmp_path / "s" / "shards.json").read_text()) == before
    reloaded = ShardedIndex.load(tmp_path / "s")
    assert len(reloaded) == 6000 and reloaded.search(q[:3], 5) == ShardedIndex.load(tmp_path / "s").search(q[:3], 5)
    reloaded.replace_shard(1, new)
    folders = sorted(p.name for p in (tmp_path / "s").iterdir() if p.is_dir())
    assert folders == ["shard-0-1", "shard-1-3"]  # the orphan of the crashed replace (shard-1-2) is gone
    again = ShardedIndex.load(tmp_path / "s")
    assert len(again) == 3100 and (1 << SLOT_BITS) + 99 in again and (1 << SLOT_BITS) + 100 not in again
    single = EmbeddingIndex(24)
    single.add(x[:3100], meta[:3100])
    assert as_rows(again.search(q, 10), {0: 0, 1: 3000}) == [[h.id for h in r] for r in single.search(q, 10)]
    other = EmbeddingIndex(12)
    other.add(x[:5, :12])
    with pytest.raises(RetrievalError, match="shards disagree"):
        again.add_shard(other)


def test_retriever_opens_a_sharded_folder(tmp_path, corpus):
    x, meta, q = corpus
    fingerprint = {"run_dir": str(tmp_path / "run"), "sha256": "0" * 64, "embed_dim": 24, "modality": "image"}
    build(x, meta, [0, 100, 200], tmp_path / "s", fingerprint)
    r = Retriever(tmp_path / "s")  # the model is loaded on the first query; embeddings need none
    assert isinstance(r.index, ShardedIndex) and len(r.index) == 200 and r.index.kind == "flat"
    hits = r.search_embeddings(x[150:151], 1)
    assert hits[0][0].metadata == {"part": "b", "i": 150} and r.index.metadata(hits[0][0].id)["i"] == 150


def test_cli_shard_verb(tmp_path, corpus, capsys):
    from xmodal.cli import main

    x, meta, q = corpus
    for i, (lo, hi) in enumerate([(0, 50), (50, 120), (120, 130)]):
        part = EmbeddingIndex(24)
        part.add(x[lo:hi], meta[lo:hi])
        part.save(tmp_path / f"part{i}")
    out = tmp_path / "all"
    assert main(["index-shards", "--index", str(out), "--add", str(tmp_path / "part0"), str(tmp_path / "part1")]) == 0
    assert "2 shards, 120 rows; slots 0, 1" in capsys.readouterr().out
    assert main(["index-shards", "--index", str(out), "--replace", "1", str(tmp_path / "part2")]) == 0
    assert "2 shards, 60 rows" in capsys.readouterr().out
    assert main(["index-shards", "--index", str(out), "--remove", "7"]) == 2
    assert "has no shard 7 (slots: [0, 1])" in capsys.readouterr().err
    rows = np.vstack([x[:50], x[120:130]])  # what the shards now hold, in slot order
    assert as_rows(ShardedIndex.load(out).search(q[5:6], 60), {0: 0, 1: 50})[0] == np.lexsort(
        (-np.arange(60), -(rows @ q[5]))).tolist()  # rows 2 and 10 tie: listed as faiss lists ties


def test_cli_shard_changes_are_all_or_nothing_and_refuse_a_row_in_two_shards(tmp_path, corpus, capsys):
    """A missing part, or an index whose manifest ids another shard holds (the same index added twice), changes
    nothing: shards.json and the rows stay as they were, and no half of the parts is added."""
    from xmodal.cli import main

    x, _, _ = corpus
    meta = [{"id": f"row-{i}"} for i in range(len(x))]
    for name, (lo, hi) in {"p0": (0, 40), "p1": (40, 70), "p1copy": (40, 70), "p2": (65, 90)}.items():
        part = EmbeddingIndex(24)
        part.add(x[lo:hi], meta[lo:hi])
        part.save(tmp_path / name)
    out = tmp_path / "all"
    assert main(["index-shards", "--index", str(out), "--add", str(tmp_path / "p0"), str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err and not out.exists()  # nothing created, p0 not half-added
    assert main(["index-shards", "--index", str(out), "--add", str(tmp_path / "p0"), str(tmp_path / "p1")]) == 0
    capsys.readouterr()
    before = (out / "shards.json").read_bytes()
    for again in (["p1copy"], ["p2"], ["nope"]):  # p1 twice; p2 overlaps p1 on rows 65-69; a missing folder
        assert main(["index-shards", "--index", str(out), "--add", *(str(tmp_path / p) for p in again)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and (again == ["nope"] or "each item belongs to one shard" in err), err
    assert (out / "shards.json").read_bytes() == before and len(ShardedIndex.load(out)) == 70
