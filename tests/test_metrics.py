import pytest
import numpy as np
import torch

from xmodal.evaluation.metrics import rank_summary, recall_at_k, retrieval_ranks, topk_accuracy

from _requires import importorskip  # skip without what bootstrap installs; fail in CI


def test_ranks_by_hand():
    # 3 queries, 4 items, scores chosen by hand.
    q = torch.eye(3)
    items = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.0, 0.3], [0.0, 0.5, 0.2], [0.0, 0.0, 0.1]])
    # sims: q0 -> [0.9, 0.8, 0.0, 0.0]; q1 -> [0.1, 0.0, 0.5, 0.0]; q2 -> [0.0, 0.3, 0.2, 0.1]
    pos = torch.tensor([[0, 1, 2, 2], [1, 1, 3, 2]])  # q2 has two positives: items 3 (0.1) and 2 (0.2)
    ranks = retrieval_ranks(q, items, pos)
    assert ranks.tolist() == [2, 3, 2]
    assert recall_at_k(ranks, (1, 2)) == pytest.approx({"R@1": 0.0, "R@2": 2 / 3})
    s = rank_summary(ranks)
    assert s["median_rank"] == 2.0 and abs(s["mean_rank"] - 7 / 3) < 1e-6


def test_ranks_match_numpy_argsort_on_random_data():
    g = torch.Generator().manual_seed(0)
    q, items = torch.randn(300, 16, generator=g), torch.randn(500, 16, generator=g)
    target = torch.randint(0, 500, (300,), generator=g)
    ranks = retrieval_ranks(q, items, torch.stack([torch.arange(300), target]), chunk=64)
    sim = (q @ items.T).numpy()
    order = np.argsort(-sim, axis=1, kind="stable")
    expected = [int(np.where(order[i] == target[i].item())[0][0]) + 1 for i in range(300)]
    assert ranks.tolist() == expected


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    acc = topk_accuracy(logits, torch.tensor([1, 2, 0]), ks=(1, 2, 5))
    assert acc == pytest.approx({"top1": 1 / 3, "top2": 1 / 3, "top5": 1.0})


def test_regression_r2_by_hand_and_against_sklearn():
    from xmodal.evaluation.metrics import regression_metrics
    target = torch.tensor([3.0, -0.5, 2.0, 7.0])
    pred = torch.tensor([2.5, 0.0, 2.0, 8.0])
    ss_res = 0.25 + 0.25 + 0.0 + 1.0
    ss_tot = sum((v - 2.875) ** 2 for v in [3.0, -0.5, 2.0, 7.0])
    m = regression_metrics(pred, target)
    assert m["r2"] == pytest.approx(1 - ss_res / ss_tot, rel=1e-12)
    assert m["mae"] == pytest.approx(0.5) and m["rmse"] == pytest.approx((1.5 / 4) ** 0.5)
    assert regression_metrics(torch.full((4,), 2.875), target)["r2"] == pytest.approx(0.0, abs=1e-12)  # the mean
    assert regression_metrics(torch.full((4,), 11.0), target)["r2"] < 0  # worse than the mean
    assert regression_metrics(torch.ones(3), torch.ones(3))["r2"] == 1.0  # constant target, exact
    assert regression_metrics(torch.zeros(3), torch.ones(3))["r2"] == 0.0  # constant target, missed (as sklearn)
    sklearn = importorskip("sklearn.metrics", "scikit-learn, installed with librosa by pip install -e .[dev]")
    rng = np.random.default_rng(0)
    y, p = rng.normal(60, 20, 50), rng.normal(60, 25, 50)
    assert regression_metrics(torch.tensor(p), torch.tensor(y))["r2"] == pytest.approx(sklearn.r2_score(y, p),
                                                                                       rel=1e-9)


def test_average_precision_by_hand_with_ties():
    from xmodal.evaluation.metrics import average_precision
    # scores 0.9 (pos), 0.8 (neg), 0.8 (pos), 0.1 (neg): thresholds 0.9 → P 1, R 1/2; 0.8 (a tie) → P 2/3, R 1
    ap = average_precision(torch.tensor([0.9, 0.8, 0.8, 0.1]), torch.tensor([True, False, True, False]))
    assert ap == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_multilabel_map_against_sklearn():
    from xmodal.evaluation.metrics import multilabel_metrics
    sklearn = importorskip("sklearn.metrics", "scikit-learn, installed with librosa by pip install -e .[dev]")
    rng = np.random.default_rng(0)
    target = rng.random((60, 5)) < 0.3
    target[:, 4] = False  # a class no row has: left out of the mean (its AP is undefined)
    scores = np.round(rng.normal(size=(60, 5)) + target, 1)  # rounded: tied scores too
    got = multilabel_metrics(torch.tensor(scores > 0), torch.tensor(target), scores=torch.tensor(scores))
    want = np.mean([sklearn.average_precision_score(target[:, c], scores[:, c]) for c in range(4)])
    assert got["mAP"] == pytest.approx(want, abs=1e-12)
    assert got["micro_f1"] == pytest.approx(sklearn.f1_score(target, scores > 0, average="micro"))
    assert "mAP" not in multilabel_metrics(torch.tensor(scores > 0), torch.tensor(target))
