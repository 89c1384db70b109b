"""Hubness reduction (inverted softmax / querybank normalisation, CSLS) against hand computations on a 2-D example."""
import math

import pytest
import torch

from xmodal.evaluation.metrics import retrieval_ranks
from xmodal.retrieval.hubness import Hubness, hub_penalty

GALLERY = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # g1, g2
BANK = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])  # bank·g1 = 1, .6, .8; bank·g2 = 0, .8, .6
QUERY = torch.tensor([[0.75, math.sqrt(1 - 0.75 ** 2)]])  # q·g1 = .75, q·g2 = .6614


def test_inverted_softmax_by_hand():
    # log(e^1 + e^.6 + e^.8) = log(6.76594) = 1.91190;  log(e^0 + e^.8 + e^.6) = log(5.04766) = 1.61893 (β = 1)
    got = hub_penalty(BANK, GALLERY, Hubness("is", beta=1.0))
    assert got.tolist() == pytest.approx([1.91190, 1.61893], abs=1e-5)
    # β = 20 approaches the max over the bank: both items have a bank query at similarity 1 and .8
    big = hub_penalty(BANK, GALLERY, Hubness("is", beta=20.0))
    assert big[0].item() == pytest.approx(1 + math.log(1 + math.exp(-4) + math.exp(-8)) / 20, abs=1e-6)


def test_csls_by_hand():
    # r_B(g1) = mean(1, .8) = .9; r_B(g2) = mean(.8, .6) = .7 (k = 2); the penalty is half of it
    assert hub_penalty(BANK, GALLERY, Hubness("csls", k=2)).tolist() == pytest.approx([0.45, 0.35], abs=1e-6)
    # CSLS as defined: 2 s(q, g) - r_G(q) - r_B(g), r_G(q) = mean of q's 2 nearest items = (.75 + .6614) / 2
    s = (QUERY @ GALLERY.T)[0]
    r_g = s.mean()
    csls = 2 * s - r_g - torch.tensor([0.9, 0.7])
    assert csls.argmax().item() == 1  # g2 overtakes the hub g1 (2·.75 − .7057 − .9 < 2·.6614 − .7057 − .7)
    penalty = hub_penalty(BANK, GALLERY, Hubness("csls", k=2))
    assert (s - penalty).argsort(descending=True).tolist() == csls.argsort(descending=True).tolist()


def test_ranks_with_the_penalty():
    positives = torch.tensor([[0], [0]])  # the query's positive is g1
    assert retrieval_ranks(QUERY, GALLERY, positives).tolist() == [1]
    for how in (Hubness("is", beta=1.0), Hubness("csls", k=2)):
        assert retrieval_ranks(QUERY, GALLERY, positives, item_penalty=hub_penalty(BANK, GALLERY, how)).tolist() == [2]
    assert hub_penalty(BANK, GALLERY, Hubness("none")).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="unknown method"):
        Hubness("qb")


def test_an_index_with_penalties_reranks_its_hits():
    from xmodal.retrieval.hubness import candidates, rerank, with_penalties
    from xmodal.retrieval.index import EmbeddingIndex

    index = EmbeddingIndex(2, "flat")
    penalty = hub_penalty(BANK, GALLERY, Hubness("csls", k=2))
    index.add(GALLERY.numpy(), with_penalties([{"id": "g1"}, {"id": "g2"}], penalty))
    plain = index.search(QUERY.numpy(), 2)[0]
    assert [h.metadata["id"] for h in plain] == ["g1", "g2"]
    hits = rerank(index.search(QUERY.numpy(), candidates(1, len(index)))[0], 1)
    assert [h.metadata["id"] for h in hits] == ["g2"]
    assert hits[0].score == pytest.approx(math.sqrt(1 - 0.75 ** 2) - 0.35, abs=1e-6)  # .6614 − .35
    bare = EmbeddingIndex(2, "flat")
    bare.add(GALLERY.numpy(), [{"id": "g1"}, {"id": "g2"}])
    with pytest.raises(ValueError, match="build the index with --hubness"):
        rerank(bare.search(QUERY.numpy(), 2)[0], 1)


def test_cli_index_and_query_with_hubness_match_a_numpy_ranking(clipart, tmp_path, capsys):
    """`xmodal index --hubness csls` + `xmodal query --hubness`: the hits are the items ranked by s − r_B/2, with
    r_B (each item's mean similarity to its 10 nearest training captions) computed here in numpy."""
    import csv
    import json

    import numpy as np

    from test_cli import _tiny_model
    from xmodal.cli import main

    run = _tiny_model().save(tmp_path / "run")
    model = _tiny_model()
    rows = list(csv.DictReader(open(clipart, encoding="utf-8")))
    test = [r for r in rows if r["split"] == "test"]
    captions = list(dict.fromkeys(r["text"] for r in rows if r["split"] == "train"))
    idx = tmp_path / "idx"
    assert main(["index", "--run", str(run), "--manifest", str(clipart), "--split", "test", "--out", str(idx),
                 "--hubness", "csls", "--bank-manifest", str(clipart), "--bank-split", "train"]) == 0
    capsys.readouterr()
    query = test[0]["text"]
    assert main(["query", "--index", str(idx), "--text", query, "-k", "5", "--json", "--hubness"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]

    images = model.encode("image", [str(clipart.parent / r["image"]) for r in test]).numpy()
    bank = model.encode("text", captions).numpy()
    q = model.encode("text", [query]).numpy()[0]
    r_b = np.sort(bank @ images.T, axis=0)[::-1][:10].mean(axis=0)
    order = np.argsort(-(images @ q - r_b / 2), kind="stable")[:5]
    assert [h["id"] for h in hits] == [test[i]["id"] for i in order]
    np.testing.assert_allclose([h["score"] for h in hits], (images @ q - r_b / 2)[order], atol=1e-4)
    assert main(["evaluate", "--run", str(run), "--manifest", str(clipart), "--split", "test", "--json",
                 "--hubness", "is", "--bank-manifest", str(clipart), "--bank-split", "train"]) == 0
    assert "text->image/R@1" in json.loads(capsys.readouterr().out)
