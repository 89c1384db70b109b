"""Training only the last blocks of a tower (``model.towers.<m>.train_blocks``) and layer-wise LR decay
(``train.layer_lr_decay``), checked against what the encoders' own parameter names and plain forwards say:

- exactly the last k blocks (and, for EfficientNet, conv_head + bn2 after them) and the projection get gradients and
  change in an optimiser step; every lower parameter and BatchNorm statistic stays bit for bit;
- the frozen lower blocks run in eval mode and build no graph (their outputs need no grad), the trained ones train;
- the prefix cache (the frozen blocks' output per input, computed once) gives the plain encoder's features and
  gradients, and does not run the lower blocks again for an input it has seen;
- a partly trained tower is not read from the frozen-feature cache, the fully frozen one still is;
- config errors name the field.
"""
import copy
import re

import pytest
import torch

from xmodal.config import Config, ConfigError, ModelConfig, TowerConfig, config_from_dict
from xmodal.feature_cache import cached_towers
from xmodal.model import XModalModel
from xmodal.training.build import param_groups, run_config

torch.set_num_threads(2)

TEXT = TowerConfig(kind="hf", name="minilm", context_length=16, freeze=False)
IMAGE = TowerConfig(kind="efficientnet_lite0", image_size=64, freeze=False, augment=False)
# tf_efficientnet_lite0's stages hold 1, 2, 2, 3, 3, 4, 1 blocks: the last flat blocks are 6.0, then 5.3, 5.2
IMAGE_TOP = ["blocks.6.0.", "blocks.5.3.", "blocks.5.2."]


def _expected(modality: str, k: int) -> re.Pattern:
    if modality == "text":  # all-MiniLM-L6-v2: 6 layers, 0-5
        return re.compile(r"model\.encoder\.layer\.(%s)\." % "|".join(str(5 - i) for i in range(k)))
    return re.compile("|".join(re.escape(p) for p in IMAGE_TOP[:k] + ["conv_head.", "bn2."]))


def _model(modality: str, k: int | None, **kw) -> XModalModel:
    base = TEXT if modality == "text" else IMAGE
    return XModalModel(ModelConfig(embed_dim=8, towers={modality: TowerConfig(**{
        **base.__dict__, "options": {}, "train_blocks": k, **kw})}))


def _inputs(modality: str, n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if modality == "image":
        return torch.randn(n, 3, IMAGE.image_size, IMAGE.image_size, generator=g)
    ids = torch.zeros(n, TEXT.context_length, dtype=torch.long)
    for i, length in enumerate(([3, 16, 9, 1] + [2 + (7 * j) % 15 for j in range(n)])[:n]):  # right-padded
        ids[i, :length] = torch.randint(1000, 20000, (length,), generator=g)
    ids[:, 0] = 101
    return ids


def _loss(tower, x):
    return (tower(x) * torch.linspace(-1, 1, 8)).sum()


@pytest.mark.parametrize("modality,k", [("text", 1), ("text", 2), ("image", 1), ("image", 2)])
def test_only_the_last_blocks_get_gradients_and_change(modality, k):
    model = _model(modality, k)
    tower = model.towers[modality]
    want = _expected(modality, k)
    names = [n for n, _ in tower.encoder.named_parameters()]
    expect = {n for n in names if want.match(n)}
    assert expect and len(expect) < len(names)
    before = {n: v.clone() for n, v in tower.encoder.state_dict().items()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    _loss(tower, _inputs(modality)).backward()
    assert {n for n, p in tower.encoder.named_parameters() if p.grad is not None} == expect
    assert all(p.grad is not None for p in tower.projection.parameters())
    opt.step()
    after = tower.encoder.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # only the trained blocks change (their weights, and BatchNorm's running statistics in train mode) ...
    assert all(want.match(n) for n in changed), sorted(n for n in changed if not want.match(n))[:5]
    # ... and nearly all of their weights do (an attention key's bias gets no gradient: softmax ignores it)
    assert len(changed & expect) >= 0.9 * len(expect)


@pytest.mark.parametrize("modality,k", [("text", 2), ("image", 1)])
def test_frozen_blocks_stay_in_eval_mode_and_keep_no_graph(modality, k):
    model = _model(modality, k)
    tower = model.towers[modality]
    tower.prefix_cache = None  # the plain forward: every block runs
    model.train()
    from xmodal.modalities.blocks import encoder_blocks
    blocks = encoder_blocks(tower.encoder).blocks
    n = len(blocks)
    assert [b.training for b in blocks] == [False] * (n - k) + [True] * k
    needs_grad = []
    hooks = [b.register_forward_hook(lambda m, i, o: needs_grad.append((o[0] if isinstance(o, tuple) else o)
                                                                       .requires_grad)) for b in blocks]
    tower(_inputs(modality))
    for h in hooks:
        h.remove()
    assert needs_grad == [False] * (n - k) + [True] * k
    model.eval()
    assert not any(b.training for b in blocks)


@pytest.mark.parametrize("modality,k", [("text", 1), ("text", 2), ("image", 1), ("image", 2)])
def test_prefix_cache_equals_the_plain_encoder(modality, k):
    cached = _model(modality, k)
    plain = copy.deepcopy(cached)
    assert cached.towers[modality].prefix_cache is not None and not plain.towers[modality].prefix_cache.memo
    plain.towers[modality].prefix_cache = None
    x = _inputs(modality, 40 if modality == "text" else 4)  # text: more rows than one chunk of the trained layers
    outs = []
    for m in (cached, plain):
        m.train()  # BatchNorm of the trained blocks in train mode; dropout off (the chunks draw its masks in turn)
        for d in m.modules():
            if isinstance(d, torch.nn.Dropout):
                d.p = 0.0
        out = m.towers[modality](x)
        outs.append(out)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()  # row weights
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-4)
    for (n, p), (_, q) in zip(cached.named_parameters(), plain.named_parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-4, rtol=1e-3, msg=lambda m: f"{n}: {m}")
    # a second pass over seen inputs (another order, one repeated) runs no lower block again
    from xmodal.modalities.blocks import encoder_blocks
    lowest = encoder_blocks(cached.towers[modality].encoder).blocks[0]
    calls = []
    hook = lowest.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        got = cached.towers[modality](x[[3, 1, 1, 0]])
        assert calls == []
        want = plain.towers[modality](x[[3, 1, 1, 0]])
        assert got.shape == (4, 8)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        # outside training the cache is neither read nor grown: a served model's memory stays flat
        cached.eval()
        held = len(cached.towers[modality].prefix_cache.memo)
        calls.clear()
        cached.towers[modality](x[[3, 1]])
        assert calls == [1] and len(cached.towers[modality].prefix_cache.memo) == held
    hook.remove()
    cached.load_state_dict(plain.state_dict())  # new weights: nothing cached is kept
    assert not cached.towers[modality].prefix_cache.memo


def test_an_augmenting_image_tower_gets_no_prefix_cache():
    assert _model("image", 1, augment=True).towers["image"].prefix_cache is None


def test_partly_trained_tower_is_not_read_from_the_feature_cache():
    cfg = config_from_dict({"model": {"towers": {
        "image": {"kind": "efficientnet_lite0", "freeze": True, "augment": False},
        "text": {"kind": "hf", "name": "minilm", "freeze": False, "train_blocks": 1}}}})
    assert cached_towers(cfg, ["image", "text"]) == ["image"]
    cfg.model.towers["text"].train_blocks = None
    cfg.model.towers["text"].freeze = True
    assert cached_towers(cfg, ["image", "text"]) == ["image", "text"]


def test_layer_lr_decay_scales_each_block():
    cfg = Config(model=ModelConfig(embed_dim=8, towers={"text": TowerConfig(**{**TEXT.__dict__, "options": {}})}))
    cfg.train.lr, cfg.train.encoder_lr, cfg.train.layer_lr_decay = 1e-3, 1e-4, 0.5
    model = XModalModel(cfg.model)
    lr_of = {id(p): g["lr"] for g in param_groups(model, cfg) for p in g["params"]}
    for name, p in model.named_parameters():
        layer = re.search(r"\.layer\.(\d)\.", name)
        if name.startswith("towers.text.projection") or "logit" in name:
            want = 1e-3
        elif layer:  # layer 5 is the top one
            want = 1e-4 * 0.5 ** (5 - int(layer.group(1)))
        else:  # embeddings (and the unused pooler): below the lowest layer
            want = 1e-4 * 0.5 ** 6
        assert lr_of[id(p)] == pytest.approx(want), name


def test_freeze_towers_overrides_train_blocks():
    cfg = Config(model=ModelConfig(towers={"text": TowerConfig(kind="hf", name="minilm", train_blocks=2)}))
    cfg.train.freeze_towers = True
    got, _ = run_config(cfg)
    assert got.model.towers["text"].freeze and got.model.towers["text"].train_blocks is None


@pytest.mark.parametrize("tower,message", [
    ({"kind": "hf", "name": "minilm", "freeze": True, "train_blocks": 1}, "set model.towers.text.freeze: false"),
    ({"kind": "hf", "name": "minilm", "train_blocks": 0}, "whole number of blocks >= 1"),
    ({"kind": "hf", "name": "minilm", "train_blocks": True}, "expected an integer"),
    ({"kind": "hf", "name": "minilm", "train_blocks": 1.5}, "model.towers.text.train_blocks"),
])
def test_config_errors_name_the_field(tower, message):
    with pytest.raises(ConfigError, match="model.towers.text.train_blocks") as e:
        config_from_dict({"model": {"towers": {"text": tower}}})
    assert message in str(e.value)


@pytest.mark.parametrize("decay", [0, -0.5, 1.5])
def test_layer_lr_decay_out_of_range(decay):
    with pytest.raises(ConfigError, match=r"train.layer_lr_decay: must be in \(0, 1\]"):
        config_from_dict({"train": {"layer_lr_decay": decay}})


@pytest.mark.parametrize("tower,message", [
    (TowerConfig(kind="hf", name="minilm", train_blocks=7), "this encoder has 6 blocks, got 7"),
    (TowerConfig(kind="lstm", context_length=8, train_blocks=1), "does not know the blocks of this encoder"),
])
def test_build_errors_name_the_field(tower, message):
    with pytest.raises(ConfigError, match=f"model.towers.text.train_blocks: .*{message}"):
        XModalModel(ModelConfig(embed_dim=8, towers={"text": tower}))


def test_a_prefix_cached_tower_keeps_its_preprocessed_inputs(tmp_path):
    from PIL import Image

    from xmodal.modalities.blocks import MemoTransform
    path = str(tmp_path / "a.png")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path)
    model = _model("image", 1)
    t = model.transform("image", train=True)
    assert isinstance(t, MemoTransform)
    first = t(path)
    Image.new("RGB", (40, 30), (0, 0, 0)).save(path)  # a second call reads nothing: the kept tensor comes back
    assert t(path) is first
    import pickle
    assert pickle.loads(pickle.dumps(t)).memo == {}  # a worker's copy starts empty
    plain = _model("image", None)
    assert not isinstance(plain.transform("image", train=True), MemoTransform)
