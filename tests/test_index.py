"""xmodal.retrieval: EmbeddingIndex (flat / hnsw / ivf), atomic save/load, Retriever, build_index, `xmodal index|query`.

Ground truth for search is numpy: exact inner products of L2-normalised random vectors, sorted (ties excluded).
"""
from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from xmodal.retrieval import FingerprintMismatchError, IndexCorruptError, RetrievalError
from xmodal.retrieval.index import EmbeddingIndex, Hit, parse_filters
from xmodal.retrieval.retriever import Retriever, build_index, format_hits, model_fingerprint

from _requires import importorskip  # skip without what bootstrap installs; fail in CI

faiss.omp_set_num_threads(1)  # keep CPU use modest; results do not depend on it


def unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(x, q, k, ids=None):
    s = q @ x.T
    order = np.argsort(-s, axis=1)[:, :k]
    ids = np.arange(len(x)) if ids is None else np.asarray(ids)
    return ids[order], np.take_along_axis(s, order, axis=1), np.sort(s, axis=1)[:, ::-1]


def state(index: EmbeddingIndex):
    return sorted(index.ids().tolist()), [index.metadata(i) for i in sorted(index.ids().tolist())]


# ----------------------------------------------------------------------------------------------------- exactness

def test_flat_search_equals_brute_force_ids_and_scores():
    rng = np.random.default_rng(0)
    x, q = unit(rng, 3000, 32), unit(rng, 40, 32)
    index = EmbeddingIndex(32)
    ids = index.add(x, [{"row": i} for i in range(len(x))])
    assert ids.tolist() == list(range(3000))
    k = 10
    true_ids, true_scores, all_sorted = brute_force(x, q, k)
    assert (all_sorted[:, :k + 1][:, :-1] - all_sorted[:, 1:k + 1]).min() > 1e-6  # no ties in the top k(+1)
    hits = index.search(q, k)
    assert [[h.id for h in row] for row in hits] == true_ids.tolist()
    np.testing.assert_allclose([[h.score for h in row] for row in hits], true_scores, rtol=0, atol=1e-5)
    assert hits[3][0].metadata == {"row": int(true_ids[3, 0])}
    # k larger than the index: every row, still in order
    small = EmbeddingIndex(32)
    small.add(x[:7])
    assert [h.id for h in small.search(q[:1], 50)[0]] == brute_force(x[:7], q[:1], 7)[0][0].tolist()


@pytest.fixture(scope="module")
def random_20k():
    rng = np.random.default_rng(1)
    x, q = unit(rng, 20000, 64), unit(rng, 200, 64)
    flat = EmbeddingIndex(64)
    flat.add(x)
    truth = [[h.id for h in row] for row in flat.search(q, 10)]
    assert truth == brute_force(x, q, 10)[0].tolist()
    return x, q, truth


def recall_at_10(index, q, truth, **kw):
    res = index.search(q, 10, **kw)
    return float(np.mean([len(set(t) & {h.id for h in r}) / 10 for t, r in zip(truth, res)]))


@pytest.mark.parametrize("kind,opts,search_opts", [
    # HNSW, M=32, efConstruction=100, efSearch=128: recall@10 ≈ 0.99 on 20k random 64-d unit vectors.
    ("hnsw", {"M": 32, "ef_construction": 100, "ef_search": 128}, {}),
    # IVF, nlist = auto (512 = min(4*sqrt(n), n/39)), nprobe=320: recall@10 ≈ 0.98. Isotropic random vectors have no
    # cluster structure, so IVF must probe a large share of the lists (nprobe=256 gives ~0.96, 128 only ~0.83);
    # on clustered data the default nprobe (nlist/8) is enough (test_ivf_defaults_on_clustered_data).
    ("ivf", {"nprobe": 320}, {}),
])
def test_approximate_recall_against_flat(random_20k, kind, opts, search_opts):
    x, q, truth = random_20k
    index = EmbeddingIndex(64, kind, **opts)
    index.add(x)
    if kind == "ivf":
        assert index.options["nlist"] == 512
    assert recall_at_10(index, q, truth, **search_opts) >= 0.95


def test_ivf_defaults_on_clustered_data():
    rng = np.random.default_rng(2)
    centres = unit(rng, 200, 64)

    def sample(n):
        v = centres[rng.integers(0, 200, n)] + 0.08 * rng.standard_normal((n, 64)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    x, q = sample(20000), sample(100)
    truth = brute_force(x, q, 10)[0].tolist()
    index = EmbeddingIndex(64, "ivf")
    index.add(x)
    assert index.options == {"nlist": 512, "nprobe": 64}
    assert recall_at_10(index, q, truth) >= 0.95


# -------------------------------------------------------------------------------------------- add / remove / io

@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_add_remove_save_load_round_trip(tmp_path, kind):
    rng = np.random.default_rng(3)
    x, q = unit(rng, 600, 16), unit(rng, 5, 16)
    index = EmbeddingIndex(16, kind, model_info={"run_dir": None, "sha256": "ab", "embed_dim": 16,
                                                 "modality": "image"})
    ids1 = index.add(x[:400], [{"id": f"r{i}", "label": "ab"[i % 2]} for i in range(400)])
    removed = list(range(0, 400, 3))
    assert index.remove(removed + [10_000]) == len(removed)  # unknown ids are ignored
    assert index.remove(removed) == 0
    ids2 = index.add(x[400:], [{"id": f"r{i}", "label": "ab"[i % 2]} for i in range(400, 600)])
    assert ids1.tolist() == list(range(400)) and ids2.tolist() == list(range(400, 600))  # never reused
    assert len(index) == 600 - len(removed)
    live = np.array(sorted(set(range(600)) - set(removed)))
    before = index.search(q, 20)
    for row in before:
        assert not {h.id for h in row} & set(removed)
        for h in row:
            assert h.metadata["id"] == f"r{h.id}"
    if kind == "flat":
        assert [[h.id for h in r] for r in before] == brute_force(x[live], q, 20, live)[0].tolist()
    if kind == "hnsw":
        assert index.ntotal == 600  # tombstoned, not deleted

    index.save(tmp_path / "idx")
    assert sorted(os.listdir(tmp_path)) == ["idx"]
    assert sorted(os.listdir(tmp_path / "idx")) == ["index.faiss", "index.json", "metadata.arrow"]
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    assert (loaded.kind, loaded.dim, loaded.options, loaded.model_info) == \
        (index.kind, index.dim, index.options, index.model_info)
    assert state(loaded) == state(index)
    after = loaded.search(q, 20)
    assert [[h.id for h in r] for r in after] == [[h.id for h in r] for r in before]
    np.testing.assert_allclose([[h.score for h in r] for r in after], [[h.score for h in r] for r in before],
                               atol=1e-6)
    np.testing.assert_allclose(loaded.reconstruct(live[:5]), x[live[:5]], atol=1e-6)
    assert loaded.add(x[:1]).tolist() == [600]  # the id counter survives save/load
    assert loaded.remove([600]) == 1

    loaded.rebuild()  # retrain IVF / drop HNSW tombstones, same ids and metadata
    assert loaded.ntotal == len(live) and state(loaded) == state(index)
    assert {h.id for h in loaded.search(q, 20)[0]} <= set(live.tolist())
    if kind == "flat":
        assert [[h.id for h in r] for r in loaded.search(q, 20)] == [[h.id for h in r] for r in before]


def test_add_validates_inputs():
    index = EmbeddingIndex(4)
    with pytest.raises(ValueError, match="dimension 3"):
        index.add(np.ones((2, 3)))
    with pytest.raises(ValueError, match="2 embeddings but 1 metadata"):
        index.add(np.ones((2, 4)), [{}])
    with pytest.raises(TypeError, match="JSON"):
        index.add(np.ones((1, 4)), [{"x": object()}])
    with pytest.raises(ValueError, match="NaN"):
        index.add(np.full((1, 4), np.nan))
    with pytest.raises(RetrievalError, match="kind"):
        EmbeddingIndex(4, "lsh")
    index.add(torch.nn.functional.normalize(torch.ones(2, 4), dim=-1))  # torch tensors are fine
    with pytest.raises(RetrievalError, match="k must be"):
        index.search(np.ones((1, 4)), 0)
    assert index.search(np.ones((1, 4)), 5)[0][0].score == pytest.approx(2.0)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_filter_returns_k_matching_hits(kind, monkeypatch):
    rng = np.random.default_rng(4)
    n = 5000
    x, q = unit(rng, n, 16), unit(rng, 8, 16)
    labels = np.array(["animals", "plants", "tools", "food"])[rng.integers(0, 4, n)]
    labels[:15] = "rare"
    meta = [{"id": str(i), "label": str(l), "n": i % 7} for i, l in enumerate(labels)]
    index = EmbeddingIndex(16, kind, M=8, ef_search=16, nprobe=1)  # deliberately weak ANN settings
    index.add(x, meta)
    index.remove(list(range(20, 40)))  # tombstones (hnsw) must also stay out of filtered results
    live = np.array([i for i in range(n) if not 20 <= i < 40])

    def exact_subset(mask):
        sub = live[mask[live]]
        return brute_force(x[sub], q, 10, sub)[0].tolist()

    for mono in (False, True):  # mono: force the faiss-selector path (and its exact refill) even for tiny subsets
        if mono:
            monkeypatch.setattr("xmodal.retrieval.index.EXACT_SUBSET", 0)
        res = index.search(q, 10, filter={"label": "rare"})
        assert all(len(r) == 10 and all(h.metadata["label"] == "rare" for h in r) for r in res)
        assert [[h.id for h in r] for r in res] == exact_subset(labels == "rare")  # 15 rows: exact
    res = index.search(q, 10, filter={"label": "animals"})  # ~1250 rows via the faiss selector
    assert all(len(r) == 10 and all(h.metadata["label"] == "animals" for h in r) for r in res)
    assert all(not 20 <= h.id < 40 for r in res for h in r)
    if kind == "flat":
        assert [[h.id for h in r] for r in res] == exact_subset(labels == "animals")
    # list values = any of; several keys = all of; CLI strings match ints; callables work
    res = index.search(q, 10, filter={"label": ["tools", "food"], "n": "3"})
    assert all(len(r) == 10 and all(h.metadata["label"] in ("tools", "food") and h.metadata["n"] == 3 for h in r)
               for r in res)
    res = index.search(q, 10, filter=lambda m: int(m["id"]) < 45)  # 25 live rows
    assert all(len(r) == 10 and all(int(h.metadata["id"]) < 45 for h in r) for r in res)
    assert [len(r) for r in index.search(q, 10, filter={"id": ["1", "2", "3"]})] == [3] * 8  # fewer than k match
    assert index.search(q, 10, filter={"label": "nothing"}) == [[]] * 8


def test_parse_filters_and_format():
    assert parse_filters(["label=a", "split=test", "label=b", "text=x=y"]) == \
        {"label": ["a", "b"], "split": "test", "text": "x=y"}
    assert parse_filters([]) is None
    with pytest.raises(RetrievalError, match="key=value"):
        parse_filters(["label"])
    table = format_hits([Hit(3, 0.91234, {"id": "cat", "label": "animals", "value": "/x/cat.png",
                                          "modality": "image"})])
    assert table.splitlines()[0].split() == ["rank", "score", "id", "label", "value"]
    assert table.splitlines()[1].split() == ["1", "0.9123", "cat", "animals", "/x/cat.png"]
    assert format_hits([]) == "no results"



def test_hit_dict_keeps_xmodal_fields_when_metadata_names_clash():
    rng = np.random.default_rng(7)
    x, q = unit(rng, 6, 8), unit(rng, 1, 8)
    index = EmbeddingIndex(8)
    clashing = {"score": "0.832", "rank": "r", "thumb": "t", "index_id": "x", "metadata": "m"}
    index.add(x, [{"id": f"row{i}", "label": "a", **clashing} for i in range(6)])
    hits = index.search(q, 3)[0]
    truth = (x @ q[0])  # inner products of unit vectors = the scores
    for h in hits:
        d = h.to_dict()
        assert d["index_id"] == h.id and isinstance(d["index_id"], int)
        assert isinstance(d["score"], float) and d["score"] == pytest.approx(float(truth[h.id]), abs=1e-6)
        assert d["id"] == f"row{h.id}" and d["label"] == "a"  # unclashing metadata stays at the top level
        assert "rank" not in d and "thumb" not in d  # the CLI / service fill these
        assert d["metadata"] == {"id": f"row{h.id}", "label": "a", **clashing}  # the whole record, as stored
    assert [h.to_dict()["score"] for h in hits] == pytest.approx(sorted(truth.tolist(), reverse=True)[:3], abs=1e-6)


def test_filter_on_a_key_no_item_has_is_an_error():
    rng = np.random.default_rng(8)
    index = EmbeddingIndex(8)
    index.add(unit(rng, 5, 8), [{"id": str(i), "label": "seven" if i % 2 else "one", "split": "test"}
                                for i in range(5)])
    q = unit(rng, 1, 8)
    with pytest.raises(RetrievalError, match=r"'lable'.*metadata keys: id, label, split"):
        index.search(q, 3, filter={"lable": "seven"})
    with pytest.raises(RetrievalError, match="'lable'"):
        index.search(q, 3, filter={"lable": "seven", "split": "test"})
    assert index.search(q, 3, filter={"label": "eight"}) == [[]]  # a known key without a match: no results
    assert {h.metadata["label"] for h in index.search(q, 5, filter={"label": "seven"})[0]} == {"seven"}
    assert EmbeddingIndex(8).search(q, 3, filter={"lable": "x"}) == [[]]  # an empty index has nothing to check


def test_build_index_keeps_its_own_fields_when_columns_clash(tmp_path):
    names = [f"cat_{i}" for i in range(8)]
    ds = stub_manifest(tmp_path, names)
    ds = ds.add_column("value", [str(i) for i in range(8)]).add_column("modality", ["x"] * 8)
    index = build_index(StubModel(), ds, "image", tmp_path / "idx", progress=False)
    meta = index.metadata(0)
    assert meta["value"] == str(tmp_path / "imgs" / "cat_0.png") and meta["modality"] == "image"
    assert meta["manifest_value"] == "0" and meta["manifest_modality"] == "x"


def test_append_reports_the_rows_it_skips(tmp_path, caplog):
    ds = stub_manifest(tmp_path, [f"cat_{i}" for i in range(8)])
    model = StubModel()
    build_index(model, ds, "image", tmp_path / "idx", progress=False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="xmodal.retrieval.retriever"):
        build_index(model, ds, "image", tmp_path / "idx", append=True, progress=False)
    assert len(EmbeddingIndex.load(tmp_path / "idx")) == 8
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "skipped 8 row(s) whose id is already in the index (cat_0, cat_1, cat_2, cat_3, cat_4, ...)" in text


# ------------------------------------------------------------------------------------------------ crash safety

class Crash(Exception):
    """Stands for the process dying at this point (not an OSError, so nothing swallows it)."""


def _flat(n, label, seed=5):
    index = EmbeddingIndex(8)
    index.add(unit(np.random.default_rng(seed), n, 8), [{"id": f"{label}{i}", "label": label} for i in range(n)])
    return index


def test_save_is_atomic_under_a_crash_at_every_step(tmp_path, monkeypatch):
    old, new = _flat(30, "old"), _flat(45, "new", seed=6)
    points = [(os, "rename"), (os, "fsync"), (shutil, "rmtree"), (faiss, "write_index"), (Path, "mkdir")]
    originals = {(m, name): getattr(m, name) for m, name in points}
    calls: list[str] = []
    crash_at = [-1]

    def patch():
        for (m, name), fn in originals.items():
            def wrapper(*a, _fn=fn, _name=name, **kw):
                calls.append(_name)
                if len(calls) - 1 == crash_at[0]:
                    raise Crash(f"crash at step {len(calls) - 1} ({_name})")
                return _fn(*a, **kw)
            monkeypatch.setattr(m, name, wrapper)

    # a clean save: count the steps
    old.save(tmp_path / "clean" / "idx")
    patch()
    new.save(tmp_path / "clean" / "idx")
    monkeypatch.undo()
    steps = list(calls)
    assert {"rename", "fsync", "rmtree", "write_index"} <= set(steps)

    outcomes = []
    for i in range(len(steps)):
        folder = tmp_path / f"crash{i}"
        old.save(folder / "idx")
        calls.clear()
        crash_at[0] = i
        patch()
        with pytest.raises(Crash):
            new.save(folder / "idx")
        monkeypatch.undo()
        got = EmbeddingIndex.load(folder / "idx")  # recovers whatever the crash left
        assert state(got) in (state(old), state(new)), f"crash at step {i} ({steps[i]})"
        outcomes.append("old" if state(got) == state(old) else "new")
        assert sorted(os.listdir(folder)) == ["idx"]  # leftovers cleaned up by load
        new.save(folder / "idx")  # and the next save succeeds
        assert state(EmbeddingIndex.load(folder / "idx")) == state(new)
    # a crash up to (and at) the commit rename leaves the old index; any later crash the new one
    commit = max(j for j, s in enumerate(steps) if s == "rename")
    assert outcomes == ["old"] * (commit + 1) + ["new"] * (len(steps) - commit - 1)


def test_load_resolves_leftover_states(tmp_path):
    old, new = _flat(30, "old"), _flat(45, "new", seed=6)
    path = tmp_path / "idx"
    new_dir, old_dir = tmp_path / ".idx.new", tmp_path / ".idx.old"

    # crashed between the two renames: NAME missing, .old complete, .new complete
    new.save(tmp_path / "staging")
    old.save(path)
    os.rename(path, old_dir)
    os.rename(tmp_path / "staging", new_dir)
    got = EmbeddingIndex.load(path, repair=False)  # read-only: reads .old in place, touches nothing
    assert state(got) == state(old) and not path.exists() and old_dir.is_dir() and new_dir.is_dir()
    got = EmbeddingIndex.load(path)  # repair: .old renamed back, .new dropped
    assert state(got) == state(old) and sorted(os.listdir(tmp_path)) == ["idx"]

    # a half-written .new next to a good NAME is ignored and removed
    new_dir.mkdir()
    (new_dir / "index.faiss").write_bytes(b"partial")
    assert state(EmbeddingIndex.load(path)) == state(old) and not new_dir.exists()

    # only a half-written .new (the first save never committed): no index
    shutil.rmtree(path)
    new_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        EmbeddingIndex.load(path)
    new.save(path)  # the next save clears it
    assert state(EmbeddingIndex.load(path)) == state(new) and sorted(os.listdir(tmp_path)) == ["idx"]


def test_load_refuses_incomplete_or_inconsistent_folders(tmp_path):
    _flat(10, "a").save(tmp_path / "idx")
    with pytest.raises(FileNotFoundError, match="no index"):
        EmbeddingIndex.load(tmp_path / "nothing")
    for name in ("metadata.arrow", "index.faiss", "index.json"):
        bad = tmp_path / f"missing-{name}"
        shutil.copytree(tmp_path / "idx", bad)
        (bad / name).unlink()
        with pytest.raises(IndexCorruptError, match=f"incomplete: missing {name}"):
            EmbeddingIndex.load(bad)
    bad = tmp_path / "truncated"
    shutil.copytree(tmp_path / "idx", bad)
    data = (bad / "index.faiss").read_bytes()
    (bad / "index.faiss").write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexCorruptError, match="truncated"):
        EmbeddingIndex.load(bad)
    bad = tmp_path / "lines"
    shutil.copytree(tmp_path / "idx", bad)
    info = json.loads((bad / "index.json").read_text())
    table = pa.ipc.open_file(pa.BufferReader((bad / "metadata.arrow").read_bytes())).read_all()
    with pa.OSFile(str(bad / "metadata.arrow"), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
        w.write_table(table.slice(0, table.num_rows - 1))  # a row short, in a well-formed file
    info["files"]["metadata.arrow"] = (bad / "metadata.arrow").stat().st_size
    del info["checksums"], info["checksum"]  # as an index saved before checksums: only the row count can tell
    (bad / "index.json").write_text(json.dumps(info))
    with pytest.raises(IndexCorruptError, match="9 rows"):
        EmbeddingIndex.load(bad)
    # save never replaces a folder that is not an index
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an xmodal index"):
        _flat(3, "a").save(tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------------------- stand-in model, Retriever

class StubModel(nn.Module):
    """A stand-in for XModalModel: text "cat_3" and image ".../cat_3.png" embed to (nearly) the same vector."""

    def __init__(self, embed_dim=16, seed=0, towers=("image", "text")):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Linear(64, embed_dim, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(embed_dim, 64, generator=g))
        self.cfg = SimpleNamespace(embed_dim=embed_dim, towers={t: None for t in towers})
        self.calls = []

    @property
    def modalities(self):
        return list(self.cfg.towers)

    def encode(self, modality, inputs, batch_size=64, progress=False):
        self.calls.append((modality, list(inputs), batch_size, progress))
        feats = []
        for v in inputs:
            token = Path(v).stem if modality == "image" else v
            g = torch.Generator().manual_seed(zlib.crc32(token.encode()))
            feats.append(torch.randn(64, generator=g) + (0.01 if modality == "image" else 0.0))
        with torch.no_grad():
            return nn.functional.normalize(self.proj(torch.stack(feats)), dim=-1)

    def save(self, path):
        from safetensors.torch import save_model
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_model(self, str(path / "model.safetensors"))
        (path / "model.json").write_text(json.dumps({"format": "xmodal", "model": {"embed_dim": self.cfg.embed_dim}}))
        return path


def stub_manifest(tmp_path, names, labels=None):
    import datasets
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    rows = {"id": [], "image": [], "text": [], "label": [], "split": []}
    for i, name in enumerate(names):
        p = folder / f"{name}.png"
        p.write_bytes(b"png")
        rows["id"].append(name)
        rows["image"].append(str(p))
        rows["text"].append(f"a picture of {name}")
        rows["label"].append(labels[i] if labels else name.split("_")[0])
        rows["split"].append("train")
    return datasets.Dataset.from_dict(rows)


def test_build_index_and_retriever_with_stub_model(tmp_path):
    names = [f"{c}_{i}" for c in ("cat", "dog", "car") for i in range(6)]
    ds = stub_manifest(tmp_path, names)
    ds = ds.add_item({"id": "blank", "image": None, "text": "no image", "label": "x", "split": "train"})
    model = StubModel()
    run = model.save(tmp_path / "run")
    index = build_index(model, ds, "image", tmp_path / "idx", run_dir=run, batch_size=4)
    assert len(index) == 18  # the row with an empty image cell is skipped
    assert model.calls[-1][0] == "image" and model.calls[-1][2:] == (4, True)  # progress bar on
    info = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert info["model"] == {"run_dir": str(run.absolute()), "embed_dim": 16, "modality": "image",
                             "sha256": model_fingerprint(run, "image")["sha256"]}
    assert index.metadata(0) == {"id": "cat_0", "modality": "image", "value": str(tmp_path / "imgs" / "cat_0.png"),
                                 "label": "cat", "text": "a picture of cat_0", "split": "train"}

    r = Retriever(tmp_path / "idx", model=model)
    hits = r.search("dog_2", "text", k=3)  # text → image
    assert isinstance(hits[0], Hit) and hits[0].metadata["id"] == "dog_2" and hits[0].score > 0.99
    batch = r.search([str(tmp_path / "imgs" / "car_1.png"), tmp_path / "imgs" / "cat_4.png"], "image", k=2)
    assert [b[0].metadata["id"] for b in batch] == ["car_1", "cat_4"]
    got = r.search("dog_2", "text", k=5, filter={"label": "car"})
    assert len(got) == 5 and {h.metadata["label"] for h in got} == {"car"}
    with pytest.raises(RetrievalError, match="no 'audio' tower"):
        r.search("x.wav", "audio")
    with pytest.raises(FileNotFoundError, match="query file not found"):
        r.search(str(tmp_path / "missing.png"), "image")
    with pytest.raises(RetrievalError, match="k must be"):
        r.search("cat", "text", k=0)

    # an existing index is never silently replaced; --append adds only new manifest ids
    with pytest.raises(FileExistsError, match="--append"):
        build_index(model, ds, "image", tmp_path / "idx", run_dir=run)
    more = stub_manifest(tmp_path, names[:4] + ["bird_0", "bird_1"])
    appended = build_index(model, more, "image", tmp_path / "idx", run_dir=run, append=True)
    assert len(appended) == 20 and model.calls[-1][1] == [str(tmp_path / "imgs" / f"bird_{i}.png") for i in (0, 1)]
    assert Retriever(tmp_path / "idx", model=model).search("bird_1", "text", k=1)[0].metadata["id"] == "bird_1"
    with pytest.raises(RetrievalError, match="cannot append as 'hnsw'"):
        build_index(model, more, "image", tmp_path / "idx", kind="hnsw", run_dir=run, append=True)
    replaced = build_index(model, more, "image", tmp_path / "idx", kind="hnsw", run_dir=run, overwrite=True)
    assert len(EmbeddingIndex.load(tmp_path / "idx")) == 6 and replaced.kind == "hnsw"
    # text → text, without a run folder: the in-memory weights are fingerprinted
    build_index(model, ds, "text", tmp_path / "tidx")
    assert Retriever(tmp_path / "tidx", model=model).search("a picture of car_3", "text", k=1)[0].metadata["id"] \
        == "car_3"
    with pytest.raises(RetrievalError, match="records no run folder"):
        Retriever(tmp_path / "tidx")
    with pytest.raises(RetrievalError, match="no 'audio' column"):
        build_index(model, ds, "audio", tmp_path / "aidx")
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    assert len(build_index(model, ds, "image", tmp_path / "empty")) == 18
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    n_calls = len(model.calls)
    with pytest.raises(FileExistsError, match="not an xmodal index"):  # refused before any embedding
        build_index(model, ds, "image", tmp_path / "busy")
    assert len(model.calls) == n_calls
    (tmp_path / "empty" / "metadata.arrow").unlink()  # a damaged index: refused, unless overwritten
    with pytest.raises(IndexCorruptError, match="--overwrite"):
        build_index(model, ds, "image", tmp_path / "empty")
    assert len(build_index(model, ds, "image", tmp_path / "empty", overwrite=True)) == 18
    assert len(EmbeddingIndex.load(tmp_path / "empty")) == 18


def test_fingerprint_mismatch_is_refused(tmp_path):
    ds = stub_manifest(tmp_path, ["cat_0", "dog_0", "car_0"])
    a, b = StubModel(seed=0), StubModel(seed=1)
    run_a, run_b = a.save(tmp_path / "run_a"), b.save(tmp_path / "run_b")
    build_index(a, ds, "image", tmp_path / "idx", run_dir=run_a)
    Retriever(tmp_path / "idx", model=a).search("cat_0", "text")  # same weights: fine
    with pytest.raises(FingerprintMismatchError, match="built by the model in .*run_a"):
        Retriever(tmp_path / "idx", model=b)  # another model object: refused at once
    lazy = Retriever(tmp_path / "idx", model=run_b)  # a run folder is checked when first needed
    with pytest.raises(FingerprintMismatchError, match="differs"):
        lazy.search("cat_0", "text")
    with pytest.raises(FingerprintMismatchError):
        build_index(b, ds, "image", tmp_path / "idx", run_dir=run_b, append=True)
    b.save(run_a)  # the recorded run folder was retrained after indexing
    with pytest.raises(FingerprintMismatchError, match="rebuild the index"):
        Retriever(tmp_path / "idx").search("cat_0", "text")
    wide = StubModel(embed_dim=8)
    with pytest.raises(FingerprintMismatchError, match="embed_dim 8"):
        Retriever(tmp_path / "idx", model=wide)
    shutil.rmtree(run_a)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Retriever(tmp_path / "idx").search("cat_0", "text")


# --------------------------------------------------------------------------------------- real model + the CLI

def _real_images(tmp_path, n=20):
    """A manifest of real images: Open Clip Art renders when available, else PNGs drawn with PIL."""
    try:
        from xmodal.data.corpora.openclipart import prepare_openclipart
        return Path(prepare_openclipart(tmp_path / "oc", limit=n, workers=1, progress=False))
    except (ImportError, FileNotFoundError, RuntimeError):
        from PIL import Image, ImageDraw
        folder = tmp_path / "pngs"
        folder.mkdir()
        lines = ["id,image,text,label,split"]
        for i in range(12):
            img = Image.new("RGB", (48, 48), "white")
            colour = ("red", "green", "blue")[i % 3]
            ImageDraw.Draw(img).ellipse((4 + i, 4, 40, 40 - i), fill=colour)
            img.save(folder / f"{i}.png")
            lines.append(f"img{i},pngs/{i}.png,a {colour} blob,{colour},{'train' if i < 9 else 'test'}")
        (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
        return tmp_path / "manifest.csv"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    importorskip("xmodal.modalities.image", "pip install -e .")
    from xmodal.config import ModelConfig, TowerConfig
    from xmodal.model import XModalModel

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("real")
    cfg = ModelConfig(embed_dim=32, towers={
        "image": TowerConfig(kind="cnn", image_size=32, options={"channels": [8, 16]}),
        "text": TowerConfig(kind="lstm", context_length=16, options={"embed_dim": 32, "hidden": 32})})
    model = XModalModel(cfg)
    model.save(tmp / "run")
    return tmp, tmp / "run", _real_images(tmp)


def test_real_model_cli_index_and_query(real_run, capsys):
    from xmodal.cli import main
    from xmodal.data import read_manifest
    from xmodal.model import load

    tmp, run, manifest = real_run
    rows = read_manifest(manifest, require_all=False).dataset
    out = tmp / "idx"
    assert main(["index", "--run", str(run), "--manifest", str(manifest), "--out", str(out),
                 "--batch-size", "8"]) == 0
    assert f"{len(rows)} image rows" in capsys.readouterr().out
    index = EmbeddingIndex.load(out)
    assert len(index) == len(rows) and index.dim == 32
    assert index.model_info["sha256"] == model_fingerprint(run, "image")["sha256"]

    # image → image: an indexed image finds itself first, with cosine 1
    first = rows[0]
    assert main(["query", "--index", str(out), "--image", first["image"], "-k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["hits"]) == 3 and res["hits"][0]["id"] == first["id"]
    assert res["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4) and res["hits"][0]["rank"] == 1
    # text → image, filtered, as a table
    label = first["label"]
    n_label = sum(1 for r in rows if r["label"] == label)
    assert main(["query", "--index", str(out), "--text", "a drawing", "-k", "50", "--filter", f"label={label}"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].split()[:4] == ["rank", "score", "id", "label"] and len(table) == 1 + n_label
    assert all(line.split()[3] == label for line in table[1:])
    # the in-memory model loaded from the run folder has the same fingerprint as its file
    model = load(run)
    hits = Retriever(out, model=model).search(first["text"], "text", k=2)
    assert len(hits) == 2
    # --append with the same manifest adds nothing
    assert main(["index", "--run", str(run), "--manifest", str(manifest), "--out", str(out), "--append"]) == 0
    assert len(EmbeddingIndex.load(out)) == len(rows)
    capsys.readouterr()

    # user errors: one line on stderr, exit status 2
    for argv, msg in [
        (["query", "--index", str(tmp / "nope"), "--text", "x"], "no index at"),
        (["query", "--index", str(out), "--text", "x", "-k", "0"], "-k must be at least 1"),
        (["query", "--index", str(out), "--audio", str(first["image"])], "no 'audio' tower"),
        (["query", "--index", str(out), "--image", str(tmp / "missing.png")], "not found"),
        (["query", "--index", str(out), "--text", "x", "--filter", "label"], "key=value"),
        (["index", "--run", str(run), "--manifest", str(manifest), "--out", str(out)], "--append"),
        (["index", "--run", str(run), "--manifest", str(manifest), "--out", str(tmp / "a"), "--modality", "audio"],
         "no 'audio' tower"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, (argv, err)
