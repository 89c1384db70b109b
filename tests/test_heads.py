"""Task heads: losses against hand computations, predictions, and the retrieval head against a hand InfoNCE."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xmodal.tasks.heads import ClassificationHead, RegressionHead, RetrievalHead
from xmodal.losses import ClipLoss


def test_classification_single_label_by_hand():
    head = ClassificationHead(4, 3)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]])
    target = torch.tensor([0, 1])
    # -log softmax of the target, averaged over rows
    ce = [-(2.0 - math.log(math.exp(2) + 1 + math.exp(-1))), -(1.0 - math.log(1 + math.e + math.exp(3)))]
    assert head.loss(logits, target).item() == pytest.approx(sum(ce) / 2, rel=1e-6)
    assert head.predict(logits).tolist() == [0, 2]
    assert head(torch.randn(5, 4)).shape == (5, 3) and head.out_dim == 3


def test_classification_multi_label_by_hand():
    head = ClassificationHead(4, 3, multi_label=True, hidden=6, dropout=0.1)
    logits = torch.tensor([[2.0, -1.0, 0.0]])
    target = torch.tensor([[1.0, 0.0, 1.0]])

    def bce(z, y):
        p = 1 / (1 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))
    expected = (bce(2.0, 1) + bce(-1.0, 0) + bce(0.0, 1)) / 3
    assert head.loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert head.predict(logits).tolist() == [[True, False, False]]
    assert head.predict(logits, threshold=0.4).tolist() == [[True, False, True]]
    assert head(torch.randn(2, 4)).shape == (2, 3)


@pytest.mark.parametrize("kind", ["mse", "l1", "huber"])
def test_regression_losses_by_hand(kind):
    head = RegressionHead(4, loss=kind)
    assert head(torch.randn(5, 4)).shape == (5,)
    pred, target = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([0.0, 1.0, 2.25])
    err = [0.5, -2.0, -0.25]
    expected = {"mse": sum(e * e for e in err) / 3, "l1": sum(abs(e) for e in err) / 3,
                "huber": (0.5 * 0.25 + (2.0 - 0.5) + 0.5 * 0.0625) / 3}[kind]
    assert head.loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError):
        RegressionHead(4, loss="hinge")


def test_retrieval_head_is_clip_loss_by_hand():
    head = RetrievalHead()
    assert head.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    a = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    b = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0]]), dim=-1)
    s = 1 / 0.07
    sim = [[0.8, 0.0], [0.96, 0.8]]  # a_i · b_j

    def ce(row, target):
        return -(s * row[target] - math.log(sum(math.exp(s * v) for v in row)))
    cols = [[sim[0][j], sim[1][j]] for j in range(2)]
    expected = (ce(sim[0], 0) + ce(sim[1], 1) + ce(cols[0], 0) + ce(cols[1], 1)) / 4
    loss = head(a, b)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert loss.item() == pytest.approx(ClipLoss()(a, b, torch.tensor(s)).item(), rel=1e-6)
    torch.testing.assert_close(head.logits(a, b), s * torch.tensor(sim))
    # the temperature learns; un-normalised inputs are normalised first
    loss.backward()
    assert head.logit_scale.grad is not None and head.logit_scale.grad != 0
    assert head(3 * a, 2 * b).item() == pytest.approx(loss.item(), rel=1e-6)


def test_retrieval_head_mask_and_cap():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(6, 4), dim=-1), F.normalize(torch.randn(6, 4), dim=-1)
    mask = torch.tensor([True, False, True, True, False, True])
    head = RetrievalHead(temperature=0.05)
    assert head(a, b, mask).item() == pytest.approx(head(a[mask], b[mask]).item())
    assert head(a, b, torch.zeros(6, dtype=torch.bool)).item() == 0.0
    frozen = RetrievalHead(temperature=0.001, learnable=False)
    assert not frozen.logit_scale.requires_grad and frozen.scale().item() == pytest.approx(100.0)


def test_heads_train_and_predict_on_rows_missing_modalities():
    """A fused classifier and a late-fusion regressor train on a batch where rows lack modalities: finite losses that
    fall, predictions for every row."""
    from xmodal.tasks.fusion import LateFusion, build_fusion

    torch.manual_seed(0)
    mods, D, B = ["image", "text", "audio"], 8, 12
    feats = {m: F.normalize(torch.randn(B, D), dim=-1) for m in mods}
    present = {"image": torch.arange(B) % 3 != 0, "text": torch.arange(B) % 3 != 1, "audio": torch.arange(B) < 4}
    labels, scores = torch.arange(B) % 3, torch.linspace(-1, 1, B)
    for name in ("concat", "sum", "product", "gated", "attention"):
        fusion = build_fusion(name, mods, D, **({"heads": 2} if name == "attention" else {}))
        head = ClassificationHead(fusion.out_dim, 3, hidden=16)
        opt = torch.optim.Adam(list(fusion.parameters()) + list(head.parameters()), lr=1e-2)
        losses = []
        for _ in range(30):
            loss = head.loss(head(fusion(feats, present)), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0], name
        assert head.predict(head(fusion(feats, present))).shape == (B,)
    late = LateFusion({m: RegressionHead(D) for m in mods})
    opt = torch.optim.Adam(late.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = late.heads["image"].loss(late(feats, present), scores)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first


def test_task_head_dropout_reaches_the_attention_fusion():
    from xmodal.config import TaskConfig
    from xmodal.tasks.head import TaskHead
    cfg = TaskConfig(kind="classification", modalities=["image", "text"], classes=["a", "b"], fusion="attention",
                     dropout=0.3)
    layer = TaskHead(cfg, 16).fusion.layer
    assert layer.dropout.p == layer.dropout1.p == layer.dropout2.p == 0.3
    head = TaskHead(TaskConfig(kind="classification", modalities=["image", "text"], classes=["a", "b"],
                               fusion="attention"), 16)
    assert head.fusion.layer.dropout.p == TaskConfig(kind="classification").dropout


def test_task_head_late_prob_is_the_log_of_the_mean_probability():
    from xmodal.config import TaskConfig
    from xmodal.tasks.head import TaskHead
    torch.manual_seed(0)
    cfg = TaskConfig(kind="classification", modalities=["image", "text"], classes=["a", "b", "c"], fusion="late_prob")
    head = TaskHead(cfg, 8).eval()
    feats = {"image": torch.randn(4, 8), "text": torch.randn(4, 8)}
    present = {"image": torch.tensor([True, True, False, True]), "text": torch.tensor([True, False, True, True])}
    out = head(feats, present)
    # by hand: each modality's own head on its scaled embedding, softmax, mean over the modalities a row has
    p = {m: head.head.heads[m](feats[m] * head.scale).softmax(-1) for m in feats}
    want = torch.stack([(p["image"][0] + p["text"][0]) / 2, p["image"][1], p["text"][2],
                        (p["image"][3] + p["text"][3]) / 2]).log()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(4))


@pytest.mark.parametrize("kind, expected", [("mse", (1 + 4 + 4) / 3), ("l1", (1 + 2 + 2) / 3),
                                            ("huber", (0.5 + 1.5 + 1.5) / 3)])
def test_regression_head_learns_standardised_targets_and_predicts_in_their_units(kind, expected):
    head = RegressionHead(4, loss=kind)
    head.fit_target_scale(torch.tensor([8.0, 12.0, 8.0, 12.0]))  # mean 10, population std 2
    assert (head.target_mean.item(), head.target_std.item()) == (10.0, 2.0)
    x = torch.randn(5, 4)
    torch.testing.assert_close(head(x), head.net(x).squeeze(-1) * 2 + 10)  # the target's own units
    # standardised errors (pred - target) / 2 = 1, -2, -2: the loss is in std units (Huber's δ = 1 std)
    pred, target = torch.tensor([12.0, 6.0, 10.0]), torch.tensor([10.0, 10.0, 14.0])
    assert head.loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(head.predict(pred), pred)


def test_regression_head_target_scale_of_a_constant_or_single_target():
    head = RegressionHead(4)
    head.fit_target_scale(torch.full((6,), 3.5))
    assert (head.target_mean.item(), head.target_std.item()) == (3.5, 1.0)  # no spread: an offset, unscaled
    head.fit_target_scale(torch.tensor([7.0]))
    assert (head.target_mean.item(), head.target_std.item()) == (7.0, 1.0)


def test_regression_head_state_without_target_scale_loads_as_unscaled():
    """Weights saved before targets were standardised hold no target_mean/target_std: that head learnt raw targets."""
    old = RegressionHead(4, hidden=3)
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("target_")}
    new = RegressionHead(4, hidden=3)
    new.fit_target_scale(torch.tensor([50.0, 70.0]))
    new.load_state_dict(state)  # strict
    assert (new.target_mean.item(), new.target_std.item()) == (0.0, 1.0)
    x = torch.randn(3, 4)
    torch.testing.assert_close(new(x), old.net(x).squeeze(-1))
    scaled = RegressionHead(4, hidden=3)
    scaled.load_state_dict(new.state_dict() | {"target_mean": torch.tensor([5.0]), "target_std": torch.tensor([4.0])})
    assert (scaled.target_mean.item(), scaled.target_std.item()) == (5.0, 4.0)


def test_multilabel_task_head_predicts_with_its_threshold():
    from xmodal.config import TaskConfig
    from xmodal.tasks.head import TaskHead

    cfg = TaskConfig(kind="multilabel", modalities=["text"], classes=["a", "b", "c"], threshold=0.3)
    head = TaskHead(cfg, embed_dim=4)
    logits = torch.tensor([[0.0, -0.5, -1.0], [2.0, -0.9, -0.8]])  # sigmoid: .5 .38 .27 / .88 .29 .31
    assert head.predict(logits).tolist() == [[True, True, False], [True, False, True]]
    assert head.predict(logits, threshold=0.5).tolist() == [[False, False, False], [True, False, False]]
