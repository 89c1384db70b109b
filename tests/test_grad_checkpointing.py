"""Gradient checkpointing (``TowerConfig.grad_checkpointing``) changes memory, not maths: for every kind that
supports it, the loss, every parameter gradient and BatchNorm's running statistics equal those of the plain tower on
the same input and RNG state -- and the encoder really recomputes (its modules run more often). Kinds that cannot
checkpoint fail at build time naming the tower; projection ``none`` is the identity, or an error naming the widths."""
import copy

import pytest
import torch

from xmodal.config import ConfigError, ModelConfig, TowerConfig
from xmodal.model import Tower, XModalModel
from xmodal.modalities import build_encoder

from _requires import importorskip  # skip without what bootstrap installs; fail in CI

torch.set_num_threads(2)

AUDIO = {"sample_rate": 16000, "n_mels": 32, "max_seconds": 1.0}  # 101 frames
# (modality, config); dropout / BatchNorm where the kind has them, so RNG replay and statistics are exercised
CASES = [
    ("image", TowerConfig(kind="open_clip", name="xmodal-vit-tiny", image_size=32,
                          options={"vision_cfg": {"layers": 2, "width": 64, "head_width": 32}})),
    ("image", TowerConfig(kind="cnn", image_size=32, options={"channels": [8, 16, 24]})),
    ("image", TowerConfig(kind="timm", name="resnet10t", image_size=32)),
    ("image", TowerConfig(kind="efficientnet_lite0", image_size=32)),
    ("text", TowerConfig(kind="open_clip", name="xmodal-vit-tiny", context_length=16,
                         options={"text_cfg": {"layers": 2, "width": 64}})),
    ("text", TowerConfig(kind="lstm", context_length=16, options={"embed_dim": 16, "hidden": 24, "dropout": 0.3})),
    ("text", TowerConfig(kind="gru", context_length=16,
                         options={"embed_dim": 16, "hidden": 24, "layers": 2, "dropout": 0.3})),
    ("text", TowerConfig(kind="hf", name="minilm", context_length=16)),
    ("audio", TowerConfig(kind="cnn", options={**AUDIO, "channels": [8, 16, 32]})),
    ("audio", TowerConfig(kind="transformer", options={**AUDIO, "patch": [16, 20], "width": 32, "layers": 2,
                                                       "heads": 2})),
]


def _inputs(modality, cfg, n=4):
    g = torch.Generator().manual_seed(0)
    if modality == "image":
        return torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g)
    if modality == "audio":
        return torch.randn(n, AUDIO["n_mels"], 101, generator=g)
    ids = torch.zeros(n, cfg.context_length, dtype=torch.long)
    for i, length in enumerate([3, 16, 9, 1][:n]):  # right-padded, one row full, one a single token
        ids[i, :length] = torch.randint(5, 1000, (length,), generator=g)
    ids[:, 0] = 101 if cfg.kind == "hf" else 49406
    return ids


def _towers(modality, cfg):
    encoder, feat_dim = build_encoder(modality, cfg)
    plain = Tower(encoder, feat_dim, 8)
    ckpt = Tower(copy.deepcopy(encoder), feat_dim, 8, grad_checkpointing=True, where=f"model.towers.{modality}")
    ckpt.load_state_dict(plain.state_dict())  # same projection too
    return plain, ckpt


def _step(tower, x):
    """Loss, gradients, buffers and the number of module forwards of one training forward + backward."""
    calls = [0]

    def count(*_):
        calls[0] += 1
    hooks = [m.register_forward_hook(count) for m in tower.encoder.modules()]
    tower.train()
    tower.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks for both towers
    out = tower(x)
    loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum() + out[:, 0].square().sum()
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}
    buffers = {n: b.clone() for n, b in tower.named_buffers()}
    return loss.detach(), grads, buffers, calls[0]


@pytest.mark.parametrize("modality,cfg", CASES, ids=[f"{m}-{c.kind}" for m, c in CASES])
def test_checkpointing_gives_the_same_loss_gradients_and_statistics(modality, cfg):
    plain, ckpt = _towers(modality, cfg)
    x = _inputs(modality, cfg)
    loss_a, grads_a, bufs_a, calls_a = _step(plain, x)
    loss_b, grads_b, bufs_b, calls_b = _step(ckpt, x)
    assert calls_b > calls_a, "checkpointing did not recompute anything"
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 2
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], atol=1e-5, rtol=0, msg=n)
    if modality != "image" or cfg.kind == "cnn":  # timm's own checkpointing re-updates BatchNorm stats (documented)
        for n in bufs_a:
            torch.testing.assert_close(bufs_b[n], bufs_a[n], atol=1e-6, rtol=0, msg=n)


@pytest.mark.parametrize("modality,cfg", [CASES[1], CASES[5]], ids=["image-cnn", "text-lstm"])
def test_checkpointing_only_while_training_an_unfrozen_encoder(modality, cfg):
    plain, ckpt = _towers(modality, cfg)
    x = _inputs(modality, cfg)
    _, _, _, trained = _step(plain, x)
    for tower in (plain, ckpt):  # what freeze=True sets; the engine's _unfreeze clears it and calls train() again
        tower.frozen = True
        tower.encoder.requires_grad_(False)
    assert _step(ckpt, x)[3] == _step(plain, x)[3]  # frozen: no graph, no recomputation
    plain.frozen = False
    plain.encoder.requires_grad_(True)
    ckpt.frozen = False
    ckpt.encoder.requires_grad_(True)
    assert _step(ckpt, x)[3] > trained  # unfrozen + train(): recomputes
    ckpt.eval()
    with torch.no_grad():
        torch.testing.assert_close(ckpt(x), plain.eval()(x))
    assert not ckpt.encoder.grad_checkpointing


def test_checkpointing_with_gradcache_equals_gradcache_alone():
    """Both replay RNG (GradCache per micro-batch, checkpointing per segment): with dropout they still agree."""
    from xmodal.batch import split as _split
    from xmodal.losses import contrastive_loss
    from xmodal.training.gradcache import gradcache_step
    from xmodal.losses import build_loss

    def model(ckpt):
        torch.manual_seed(0)
        return XModalModel(ModelConfig(embed_dim=16, towers={
            "image": TowerConfig(kind="open_clip", name="xmodal-vit-tiny", image_size=32, grad_checkpointing=ckpt,
                                 options={"vision_cfg": {"layers": 2, "width": 64, "head_width": 32}}),
            "text": TowerConfig(kind="lstm", context_length=16, grad_checkpointing=ckpt,
                                options={"embed_dim": 16, "hidden": 16, "dropout": 0.5})})).train()
    batch = {"image": _inputs("image", CASES[0][1], 8),
             "text": torch.cat([_inputs("text", CASES[5][1]), _inputs("text", CASES[5][1])])}
    loss_fn = build_loss("clip")
    results = []
    for ckpt in (False, True):
        m = model(ckpt)
        torch.manual_seed(5)
        loss = gradcache_step(m, _split(batch, 2), lambda out: contrastive_loss(loss_fn, out, ["image", "text"]))
        results.append((loss, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (la, ga), (lb, gb) = results
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=0)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], atol=1e-5, rtol=0, msg=n)


def test_kinds_that_cannot_checkpoint_name_the_tower():
    rn = TowerConfig(kind="open_clip", name="RN50", image_size=64, grad_checkpointing=True,
                     options={"vision_cfg": {"layers": [1, 1, 1, 1], "width": 16}, "embed_dim": 64})
    with pytest.raises(ConfigError, match=r"model\.towers\.image\.grad_checkpointing: .*ModifiedResNet"):
        XModalModel(ModelConfig(embed_dim=8, towers={"image": rn}))
    importorskip("resemblyzer", "the assets extra: pip install -e .[dev]")
    voice = TowerConfig(kind="resemblyzer", grad_checkpointing=True, options={"max_seconds": 2.0})
    with pytest.raises(ConfigError, match=r"model\.towers\.audio\.grad_checkpointing: .*ResemblyzerEncoder"):
        XModalModel(ModelConfig(embed_dim=8, towers={"audio": voice}))


# ------------------------------------------------------------------------------------------------ projection: none

def test_projection_none_is_the_identity_when_widths_match():
    cfg = TowerConfig(kind="open_clip", name="xmodal-vit-tiny", image_size=32, projection="none",
                      options={"vision_cfg": {"layers": 1, "width": 64, "head_width": 32}, "embed_dim": 24})
    model = XModalModel(ModelConfig(embed_dim=24, towers={"image": cfg}))
    tower = model.towers["image"].eval()
    assert isinstance(tower.projection, torch.nn.Identity)
    assert not any(k.startswith("towers.image.projection") for k in model.state_dict())
    x = _inputs("image", cfg)
    with torch.no_grad():
        torch.testing.assert_close(tower(x), torch.nn.functional.normalize(tower.encoder(x), dim=-1))


def test_projection_none_with_another_width_names_tower_and_widths():
    cfg = TowerConfig(kind="lstm", projection="none", options={"embed_dim": 8, "hidden": 12})  # features: 24
    with pytest.raises(ConfigError, match=r"model\.towers\.text\.projection: none .*\(24\).*model\.embed_dim \(32\)"):
        XModalModel(ModelConfig(embed_dim=32, towers={"text": cfg}))
