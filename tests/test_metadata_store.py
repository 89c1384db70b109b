"""Index metadata as memory-mapped Arrow columns (format version 2): an index saved by the previous format
(``metadata.jsonl``, tests/fixtures/index_v1, written by xmodal before this change) loads with the same rows and
answers the same; once saved again it answers the same from ``metadata.arrow``; filters evaluated on the columns
select what a hand computation (and pandas, on the real Open Clip Art manifest) selects."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from xmodal.retrieval import IndexCorruptError
from xmodal.retrieval.index import EmbeddingIndex, Hit

FIXTURE = Path(__file__).parent / "fixtures" / "index_v1"
VECTORS = Path(__file__).parent / "fixtures" / "index_v1_vectors.npy"
REMOVED = {5, 17, 33}  # what tests/fixtures' generator removed after adding rows 0..39
LIVE = [i for i in range(40) if i not in REMOVED]


def jsonl_rows(folder: Path) -> dict[int, dict]:
    """The old format read by hand: one JSON line per row."""
    lines = (folder / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return {rec["index_id"]: rec["meta"] for rec in map(json.loads, lines)}


def hits(results) -> list:
    return [[(h.id, round(h.score, 6), h.metadata) for h in row] for row in results]


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture()
def v1_and_v2(tmp_path):
    """(the old-format index loaded, the same saved and loaded in the new format, its folder)."""
    before = snapshot(FIXTURE)
    old = EmbeddingIndex.load(FIXTURE, repair=False)
    assert snapshot(FIXTURE) == before  # loading the old format writes nothing
    old.save(tmp_path / "v2")
    return old, EmbeddingIndex.load(tmp_path / "v2"), tmp_path / "v2"


def test_old_format_loads_and_its_resave_gives_identical_rows_and_results(v1_and_v2):
    old, new, folder = v1_and_v2
    want = jsonl_rows(FIXTURE)
    assert sorted(want) == LIVE
    for index in (old, new):
        assert index.ids().tolist() == LIVE and len(index) == len(LIVE)
        assert {i: index.metadata(i) for i in LIVE} == want
        assert index.metadata(7)["big"] == 2 ** 70 and index.metadata(0)["caption"] == "un vélo rouge ✓"
        assert index.metadata(15)["caption"] is None and "caption" not in index.metadata(1)
        assert all(type(index.metadata(i)["score"]) is float and type(index.metadata(i)["year"]) is int
                   for i in LIVE)
    assert sorted(os.listdir(folder)) == ["index.faiss", "index.json", "metadata.arrow"]
    info = json.loads((folder / "index.json").read_text())
    assert info["version"] == 2 and set(info["checksums"]) == {"index.faiss", "metadata.arrow"}

    x = np.load(VECTORS)
    q = x[[0, 3, 20]] + np.float32(0.3) * np.random.default_rng(1).normal(size=(3, 8)).astype("float32")
    truth = np.array(LIVE)[np.argsort(-(q @ x[LIVE].T), axis=1, kind="stable")[:, :10]]
    got_old, got_new = old.search(q, 10), new.search(q, 10)
    assert [[h.id for h in row] for row in got_old] == truth.tolist()
    assert hits(got_new) == hits(got_old)
    assert all(h.metadata == want[h.id] for row in got_new for h in row)


# filter → the generator's rows it selects, worked out from tests/fixtures' generator (i = 0..39):
# label = ["animals", "plants", "vehicles", "3"][i % 4], year = 2000 + i % 7, score = round(i / 7, 3),
# public = i % 3 != 0, caption = "un vélo rouge ✓" if i % 10 == 0, None if i % 10 == 5, absent otherwise,
# tags = ["red", "bike"] if i % 12 == 0, "solo" if i % 6 == 0 (and not % 12), absent otherwise; big = 2**70 at i = 7
HAND = [
    ({"label": "3"}, lambda i: i % 4 == 3),
    ({"label": 3}, lambda i: i % 4 == 3),  # the string "3" also matches the number 3
    ({"year": "2003"}, lambda i: i % 7 == 3),  # the command line's string form of an int column
    ({"year": 2003.0}, lambda i: i % 7 == 3),
    ({"year": ["2001", 2005]}, lambda i: i % 7 in (1, 5)),
    ({"public": True}, lambda i: i % 3 != 0),
    ({"public": "False"}, lambda i: i % 3 == 0),
    ({"public": 1}, lambda i: i % 3 != 0),  # True == 1 in Python, as the dict filter always compared
    ({"score": "0.143"}, lambda i: i == 1),
    ({"score": 2.0}, lambda i: i == 14),
    ({"caption": None}, lambda i: i % 10 != 0),  # absent or None
    ({"caption": "un vélo rouge ✓"}, lambda i: i % 10 == 0),
    ({"tags": "solo"}, lambda i: i % 6 == 0 and i % 12 != 0),
    ({"tags": [["red", "bike"]]}, lambda i: False),  # a list is "any of": never a whole list value
    ({"big": str(2 ** 70)}, lambda i: i == 7),
    ({"label": ["animals", "3"], "public": False}, lambda i: i % 4 in (0, 3) and i % 3 == 0),
    ({"nowhere": None}, lambda i: True),
]


@pytest.mark.parametrize("filter,rule", HAND, ids=[json.dumps(f, ensure_ascii=False) for f, _ in HAND])
def test_column_filters_select_what_a_hand_computation_selects(v1_and_v2, filter, rule):
    old, new, _ = v1_and_v2
    expected = [i for i in LIVE if rule(i)]
    q = np.load(VECTORS)[:2]
    for index in (old, new):
        assert index._meta.select(filter).tolist() == expected
        got = index.search(q, 40, filter=filter)
        assert all(sorted(h.id for h in row) == expected for row in got)
    assert hits(new.search(q, 5, filter=filter)) == hits(old.search(q, 5, filter=filter))


def test_a_callable_filter_sees_each_rows_dict(v1_and_v2):
    seen = []
    _, new, _ = v1_and_v2
    got = new.search(np.load(VECTORS)[:1], 40, filter=lambda m: seen.append(m) or m["id"] in {"oca_001", "oca_039"})
    assert sorted(h.id for h in got[0]) == [1, 39] and seen == [jsonl_rows(FIXTURE)[i] for i in LIVE]


def test_changes_after_loading_survive_a_save(v1_and_v2, tmp_path):
    _, new, folder = v1_and_v2
    x = np.load(VECTORS)
    new.remove([0, 1, 999])
    ids = new.add(x[:2], [{"id": "added", "year": "not an int"}, {"fresh": [1, {"a": None}]}])
    assert ids.tolist() == [40, 41]
    want = {i: new.metadata(i) for i in new.ids().tolist()}
    assert len(want) == len(LIVE) and want[41] == {"fresh": [1, {"a": None}]}
    assert new._meta.select({"year": "not an int"}).tolist() == [40]
    assert new._meta.select({"year": "2002"}).tolist() == [i for i in LIVE if i % 7 == 2 and i > 1]
    new.save(folder)
    again = EmbeddingIndex.load(folder)
    assert {i: again.metadata(i) for i in again.ids().tolist()} == want
    assert again._meta.select({"year": "2002"}).tolist() == [i for i in LIVE if i % 7 == 2 and i > 1]
    assert again.metadata_keys() == sorted({k for m in want.values() for k in m})


def test_filters_on_the_real_manifest_equal_pandas(clipart, tmp_path):
    df = pd.read_csv(clipart, dtype=str, keep_default_na=False)
    records = df.to_dict("records")
    x = np.random.default_rng(0).normal(size=(len(df), 16)).astype("float32")
    index = EmbeddingIndex(16)
    index.add(x, records)
    index.save(tmp_path / "idx")
    loaded = EmbeddingIndex.load(tmp_path / "idx")
    assert [loaded.metadata(i) for i in range(len(df))] == records
    labels = sorted(df["label"].unique())
    for f, mask in [({"label": labels[0]}, df["label"] == labels[0]),
                    ({"label": labels[:2], "split": "train"}, df["label"].isin(labels[:2]) & (df["split"] == "train")),
                    ({"id": df["id"].iloc[5]}, df["id"] == df["id"].iloc[5])]:
        assert loaded._meta.select(f).tolist() == np.flatnonzero(mask.to_numpy()).tolist()


def test_a_damaged_metadata_file_is_refused_by_name(v1_and_v2, tmp_path):
    _, _, folder = v1_and_v2
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    data = bytearray((bad / "metadata.arrow").read_bytes())
    data[len(data) // 2] ^= 0x10
    (bad / "metadata.arrow").write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="metadata.arrow"):
        EmbeddingIndex.load(bad)


def test_hits_read_their_metadata_on_first_access_once_per_search_as_it_was_at_search_time(v1_and_v2, monkeypatch,
                                                                                              tmp_path):
    """A search returns ids and scores without decoding metadata; the first hit asked for its metadata reads every
    hit of that search in one pass; each equals ``index.metadata(id)`` read beforehand (the eager answer), also for a
    row added since loading and after the rows are removed; a saved index with no gaps (ids are rows) too."""
    _, new, _ = v1_and_v2
    x = np.load(VECTORS)
    added = int(new.add(x[2:3] * 2, [{"id": "added", "label": "new"}])[0])  # kept as a dict until a save
    q = x[[2, 11]]
    want = {i: new.metadata(i) for i in new.ids().tolist()}
    store_type = type(new._meta)
    decode, calls = store_type._decode, []
    monkeypatch.setattr(store_type, "_decode", lambda self, pos: calls.append(len(pos)) or decode(self, pos))
    got = new.search(q, 10)
    assert calls == [] and added in {h.id for h in got[0]}
    assert got[1][3].metadata == want[got[1][3].id]
    assert calls == [19]  # 20 hits, one of them the added row (copied at search time, not decoded)
    assert all(h.metadata == want[h.id] and h == Hit(h.id, h.score, want[h.id]) for row in got for h in row)
    assert calls == [19]
    later = new.search(q, 10)
    new.remove([h.id for h in later[0]])  # the rows go; hits already returned keep what they were
    assert [[h.metadata for h in row] for row in later] == [[want[h.id] for h in row] for row in later]

    dense = EmbeddingIndex(8)
    dense.add(x, [{"row": i, "label": f"l{i % 3}"} for i in range(len(x))])
    dense.save(tmp_path / "dense")
    dense = EmbeddingIndex.load(tmp_path / "dense")
    assert dense._meta.ids_are_rows
    got = dense.search(x[:3], 7)
    exact = np.argsort(-(x[:3] @ x.T), axis=1, kind="stable")[:, :7]
    assert [[h.id for h in row] for row in got] == exact.tolist()
    assert all(h.metadata == {"row": h.id, "label": f"l{h.id % 3}"} for row in got for h in row)
