"""Recall@K / mAP of an index through `Retriever.search` (xmodal.evaluation.index_eval).

mAP is checked against a hand computation; Recall@K against `xmodal.evaluation.metrics.retrieval_ranks` on the same embeddings
(the queries' model embeddings and the vectors stored in the index).
"""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from xmodal.cli import main
from xmodal.evaluation.metrics import ranked_average_precision as average_precision
from xmodal.evaluation.metrics import recall_at_k, retrieval_ranks
from xmodal.retrieval import RetrievalError
from xmodal.evaluation.index_eval import evaluate_index, evaluate_index_manifest, manifest_queries
from xmodal.retrieval.index import EmbeddingIndex
from xmodal.retrieval.retriever import Retriever, build_index


# ------------------------------------------------------------------------------------------------ hand computation

def test_average_precision_by_hand():
    # relevant at ranks 1, 3 and 6: (1/1 + 2/3 + 3/6) / 3
    assert average_precision([1, 0, 1, 0, 0, 1], 3) == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    # a fourth relevant item never retrieved adds precision 0
    assert average_precision([1, 0, 1, 0, 0, 1], 4) == pytest.approx((1 + 2 / 3 + 3 / 6) / 4)
    assert average_precision([0, 0, 0, 0, 1], 1) == pytest.approx(1 / 5)
    assert average_precision([0, 0], 2) == 0.0
    assert average_precision([1, 1, 1], 3) == 1.0
    with pytest.raises(ValueError):
        average_precision([1, 1], 1)
    with pytest.raises(ValueError):
        average_precision([1], 0)


class TableModel(nn.Module):
    """Text queries embed to fixed 2-D unit vectors at the angle (degrees) written in the query: "q@100" → 100°."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.cfg = SimpleNamespace(embed_dim=2, towers={"text": None, "image": None})

    @property
    def modalities(self):
        return ["text", "image"]

    def encode(self, modality, inputs, batch_size=64, progress=False):
        angles = [math.radians(float(str(q).split("@")[1])) for q in inputs]
        return torch.tensor([[math.cos(a), math.sin(a)] for a in angles], dtype=torch.float32)


def angle_index(kind="flat"):
    """Six items at 0°, 20°, ..., 100° named i0..i5 (label "even"/"odd" by position)."""
    index = EmbeddingIndex(2, kind)
    angles = [math.radians(20 * i) for i in range(6)]
    index.add(np.array([[math.cos(a), math.sin(a)] for a in angles], np.float32),
              [{"id": f"i{i}", "label": "even" if i % 2 == 0 else "odd"} for i in range(6)])
    return index


def test_evaluate_index_matches_a_hand_computation():
    r = Retriever(angle_index(), model=TableModel())
    # q@0 ranks i0..i5; relevant i0, i2, i5 → ranks 1, 3, 6 → AP = (1 + 2/3 + 3/6) / 3 = 13/18
    # q@100 ranks i5..i0; relevant i1 → rank 5 → AP = 1/5
    # q@45 ranks i2 (40°), i3 (60°), i1 (20°), i4, i0, i5; relevant i1 + "nope" (not in the index: dropped)
    #      → rank 3 → AP = 1/3
    # q@10: relevant only "ghost" (not in the index) → skipped
    queries = ["q@0", "q@100", "q@45", "q@10"]
    relevant = [{"i0", "i2", "i5"}, ["i1"], {"i1", "nope"}, {"ghost"}]
    out = evaluate_index(r, queries, relevant, "text", ks=(1, 3, 5))
    assert out["mAP"] == pytest.approx((13 / 18 + 1 / 5 + 1 / 3) / 3)
    assert out["R@1"] == pytest.approx(1 / 3)   # only q@0 has a relevant item first
    assert out["R@3"] == pytest.approx(2 / 3)   # q@0 (rank 1) and q@45 (rank 3)
    assert out["R@5"] == pytest.approx(1.0)     # q@100 at rank 5
    assert out["n_queries"] == 3 and out["n_queries_skipped"] == 1 and out["n_relevant_missing"] == 2
    assert out["n_items"] == 6 and out["depth"] == 6

    # relevance by label: q@0's relevant = the "even" items i0, i2, i4 → ranks 1, 3, 5 → AP = (1 + 2/3 + 3/5) / 3
    out = evaluate_index(r, ["q@0"], [["even"]], "text", ks=(1,), key="label")
    assert out["mAP"] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3) and out["R@1"] == 1.0
    # by index id
    out = evaluate_index(r, ["q@100"], [[0]], "text", ks=(1,), key="index_id")
    assert out["mAP"] == pytest.approx(1 / 6) and out["R@1"] == 0.0
    # a truncated ranking: relevant items below `depth` add 0 (q@0: ranks 1 and 3 found, 6 is not)
    out = evaluate_index(r, ["q@0"], [{"i0", "i2", "i5"}], "text", ks=(1,), depth=4)
    assert out["mAP"] == pytest.approx((1 + 2 / 3) / 3) and out["depth"] == 4
    # a filter restricts the searched rows (here the odd ones: q@0 ranks i1, i3, i5)
    out = evaluate_index(r, ["q@0"], [{"i5"}], "text", ks=(1, 3), filter={"label": "odd"})
    assert out["mAP"] == pytest.approx(1 / 3) and out["R@3"] == 1.0 and out["R@1"] == 0.0


def test_evaluate_index_rejects_bad_input():
    r = Retriever(angle_index(), model=TableModel())
    with pytest.raises(ValueError, match="2 queries but 1"):
        evaluate_index(r, ["q@0", "q@1"], [{"i0"}])
    with pytest.raises(ValueError, match="depth 3 is below"):
        evaluate_index(r, ["q@0"], [{"i0"}], ks=(1, 5), depth=3)
    with pytest.raises(ValueError, match="ks"):
        evaluate_index(r, ["q@0"], [{"i0"}], ks=(0,))
    with pytest.raises(RetrievalError, match="no query has a relevant item"):
        evaluate_index(r, ["q@0"], [{"zzz"}], ks=(1,))
    with pytest.raises(RetrievalError, match="no 'audio' tower"):
        evaluate_index(r, ["q@0"], [{"i0"}], "audio", ks=(1,))


# ---------------------------------------------------------------------------- real model: against retrieval_ranks

@pytest.fixture(scope="module")
def real(clipart, tmp_path_factory):
    from xmodal.config import ModelConfig, TowerConfig
    from xmodal.data import read_manifest
    from xmodal.model import XModalModel, load

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("index_eval")
    cfg = ModelConfig(embed_dim=32, towers={
        "image": TowerConfig(kind="cnn", image_size=32, options={"channels": [8, 16]}),
        "text": TowerConfig(kind="lstm", context_length=16, options={"embed_dim": 32, "hidden": 32})})
    run = XModalModel(cfg).save(tmp / "run")
    manifest = read_manifest(clipart, modalities=None, require_all=False)
    build_index(load(run), manifest, "image", tmp / "index", run_dir=run, batch_size=32, progress=False)
    return tmp, run, manifest.dataset


def test_recall_equals_retrieval_ranks_on_the_same_embeddings(real):
    tmp, run, ds = real
    r = Retriever(tmp / "index")
    index = r.index
    ks = (1, 5, 10)
    queries, relevant, key = manifest_queries(ds, "text", "image", "pair")
    assert key == "value" and len(queries) == len(set(queries)) > 20
    out = evaluate_index(r, queries, relevant, "text", ks, key=key, batch_size=16)

    # the same ranking problem through xmodal.evaluation.metrics: query embeddings from the model, items from the index
    q_emb = r.model.encode("text", queries)
    ids = index.ids()
    items = torch.from_numpy(index.reconstruct(ids))
    row_of = {int(i): j for j, i in enumerate(ids.tolist())}
    pairs = [(qi, row_of[i]) for qi, rel in enumerate(relevant) for i in ids.tolist()
             if index.metadata(i)["value"] in rel]
    ranks = retrieval_ranks(q_emb, items, torch.tensor(pairs).T)
    expected = recall_at_k(ranks, ks)
    for k in ks:  # the same queries hit (recall_at_k averages in float32)
        assert round(out[f"R@{k}"] * len(queries)) == int((ranks <= k).sum())
        assert out[f"R@{k}"] == pytest.approx(expected[f"R@{k}"], abs=1e-6)
    assert 0 < out["R@10"] < 1  # neither trivial nor empty
    assert out["n_queries"] == len(queries) and out["n_queries_skipped"] == 0

    # mAP against a brute-force numpy ranking of the same embeddings
    scores = q_emb.numpy() @ items.numpy().T
    aps = []
    for qi, rel in enumerate(relevant):
        order = np.argsort(-scores[qi], kind="stable")
        flags = [index.metadata(int(ids[j]))["value"] in rel for j in order]
        n_rel = sum(flags)
        hits = np.flatnonzero(flags) + 1
        aps.append(float(np.mean(np.arange(1, n_rel + 1) / hits)))
    assert out["mAP"] == pytest.approx(float(np.mean(aps)), abs=1e-6)

    # the manifest front end gives the same numbers, keyed by direction
    via_manifest = evaluate_index_manifest(r, ds, "text", ks=ks)
    assert {k.split("/", 1)[1]: v for k, v in via_manifest.items()} == pytest.approx(out)
    assert set(via_manifest) >= {"text->image/R@1", "text->image/mAP"}


def test_label_relevance_and_an_approximate_index(real):
    tmp, run, ds = real
    from xmodal.data import read_manifest
    from xmodal.model import load

    r = Retriever(tmp / "index")
    out = evaluate_index_manifest(r, ds, "text", relevance="label")
    # every item of the query's label is relevant: recall@10 is at least the pair recall, and chance mAP is around
    # the label frequency, not ~0
    pair = evaluate_index_manifest(r, ds, "text")
    assert out["text->image/R@10"] >= pair["text->image/R@10"]
    assert 0 < out["text->image/mAP"] <= 1
    # an HNSW index over the same vectors gives the same figures (all rows fit in one efSearch)
    manifest = read_manifest(ds, modalities=None, require_all=False)
    build_index(load(run), manifest, "image", tmp / "hnsw", kind="hnsw", run_dir=run, progress=False)
    approx = evaluate_index_manifest(Retriever(tmp / "hnsw"), ds, "text")
    assert approx == pytest.approx(pair)


def test_module_cli(real, capsys):
    tmp, run, ds = real
    manifest = tmp / "m.jsonl"
    with open(manifest, "w") as f:
        for row in ds:
            f.write(json.dumps(row) + "\n")
    # the rows' absolute image paths lie in the clipart fixture's folder, not next to m.jsonl
    assert main(["evaluate-index", "--index", str(tmp / "index"), "--manifest", str(manifest), "--query-modality",
                 "text", "--json", "--allow-outside-root"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0 <= res["text->image/R@1"] <= res["text->image/R@10"] <= 1 and res["text->image/n_queries"] > 0
    assert main(["evaluate-index", "--index", str(tmp / "index"), "--manifest", str(manifest), "--split", "test",
                 "--allow-outside-root"]) == 0
    table = capsys.readouterr().out
    assert "text->image" in table and "mAP" in table
    assert main(["evaluate-index", "--index", str(tmp / "index"), "--manifest", str(manifest), "--query-modality",
                 "audio", "--allow-outside-root"]) == 2
    assert "no 'audio' column" in capsys.readouterr().err


def test_manifest_paths_relative_to_another_root(real, clipart, capsys):
    """A manifest kept apart from its files (data.root in training): `root=` / `--root` says where they are."""
    tmp, run, ds = real
    moved = tmp / "elsewhere" / "m.csv"
    moved.parent.mkdir(exist_ok=True)
    moved.write_text(clipart.read_text(encoding="utf-8"), encoding="utf-8")  # relative paths: images/...
    r = Retriever(tmp / "index")
    from xmodal.data import ManifestError
    with pytest.raises(ManifestError, match="file not found"):
        evaluate_index_manifest(r, moved, "text")
    expected = evaluate_index_manifest(r, ds, "text")
    assert evaluate_index_manifest(r, moved, "text", root=clipart.parent) == pytest.approx(expected)
    assert main(["evaluate-index", "--index", str(tmp / "index"), "--manifest", str(moved), "--root",
                 str(clipart.parent), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(expected)
