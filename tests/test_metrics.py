import pytest
import numpy as np
import torch

from xmodal.metrics import rank_summary, recall_at_k, retrieval_ranks, topk_accuracy


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
