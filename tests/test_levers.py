"""The regularisers issue #17 measures: label smoothing of the CLIP loss's targets (against a hand computation) and
dropout on the features entering a projection (training only; no parameter, so saved models are unchanged)."""
import torch
import torch.nn.functional as F

from xmodal.config import ModelConfig, TowerConfig
from xmodal.losses import build_loss
from xmodal.model import XModalModel


def test_label_smoothing_by_hand():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    scale, eps = torch.tensor(10.0), 0.1
    logits = scale * img @ txt.T
    n = logits.shape[0]

    def smoothed(lg):  # target: 1 - eps on the pair, eps / n on every column (the pair's included)
        logp = lg.log_softmax(dim=1)
        target = torch.full((n, n), eps / n) + torch.eye(n) * (1 - eps)
        return -(target * logp).sum(dim=1).mean()

    expected = (smoothed(logits) + smoothed(logits.T)) / 2
    torch.testing.assert_close(build_loss("clip", label_smoothing=eps)(img, txt, scale), expected)
    plain = (F.cross_entropy(logits, torch.arange(n)) + F.cross_entropy(logits.T, torch.arange(n))) / 2
    torch.testing.assert_close(build_loss("clip")(img, txt, scale), plain)


def test_projection_dropout_acts_in_training_only_and_adds_no_weights():
    def model(p):
        torch.manual_seed(0)
        return XModalModel(ModelConfig(embed_dim=16, towers={
            "text": TowerConfig(kind="lstm", context_length=8, options={"embed_dim": 16, "hidden": 16},
                                projection_dropout=p),
            "image": TowerConfig(kind="cnn", image_size=16, options={"channels": [4, 8]})}))

    plain, dropped = model(0.0), model(0.5)
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    feats = torch.randn(4, plain.towers["text"].projection.in_features)
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped.towers["text"].project(feats), plain.towers["text"].project(feats))
    dropped.train()
    out = dropped.towers["text"].project(feats)
    assert not torch.allclose(out, plain.towers["text"].project(feats))
    seen = []
    dropped.towers["text"].projection.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    dropped.towers["text"].project(feats)
    kept = seen[-1] != 0  # nn.Dropout(0.5): each feature zeroed, or kept and scaled by 1 / 0.5
    torch.testing.assert_close(seen[-1][kept], 2 * feats[kept])
    assert 0 < kept.float().mean() < 1
