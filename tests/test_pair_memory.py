"""Pair memory (model.pair_memory): the formula against a NumPy hand computation, the memory a run saves against
the saved towers' own embeddings of its training pairs, partial loading, and the config's checks."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import xmodal
from test_engine import tiny
from xmodal.config import ConfigError, TaskConfig, config_from_dict
from xmodal.data import read_manifest
from xmodal.model import Tower, XModalModel
from xmodal.pair_memory import PairMemory, whitening
from xmodal.training.engine import pretrain


def _numpy_whitening(x):
    """``U diag((λ + mean λ) ** -1/2) U^T`` of the rows' covariance, in NumPy."""
    lam, u = np.linalg.eigh(x.T @ x / len(x))
    lam = np.maximum(lam, 0)
    return u @ np.diag(1 / np.sqrt(lam + lam.mean())) @ u.T


def _numpy_memory(feats, emb, bank_raw, partners, k, power, weight, whiten=False):
    """The module docstring's formula, written out in float64 NumPy."""
    mean = bank_raw.mean(0)
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    bank, queries = unit(bank_raw - mean), unit(feats - mean)
    if whiten:
        w = _numpy_whitening(bank)
        bank, queries = unit(bank @ w), unit(queries @ w)
    bank = bank.astype(np.float16).astype(np.float64)  # stored as float16
    sims = queries @ bank.T
    out = []
    for i in range(len(feats)):
        top = np.argsort(-sims[i], kind="stable")[:k]
        w = np.maximum(sims[i, top], 0) ** power
        w = w / max(w.sum(), 1e-12)
        near = unit(w @ partners[top])
        out.append(unit((1 - weight) * emb[i] + weight * near))
    return np.stack(out)


def test_memory_formula_by_hand():
    g = torch.Generator().manual_seed(0)
    towers = torch.nn.ModuleDict({m: Tower(torch.nn.Identity(), d, 8, "linear", freeze=True)
                                  for m, d in (("image", 12), ("text", 6))})
    raw = {"image": torch.randn(40, 12, generator=g), "text": torch.randn(40, 6, generator=g)}
    memory = PairMemory(["image", "text"], {"image": 12, "text": 6}, 8, k=5, power=3.0, weight=0.3)
    memory.fill(raw)
    memory.refresh(towers)
    with torch.no_grad():  # a caption's partner is its pair's image, and the other way round
        images, texts = towers["image"].project(raw["image"]), towers["text"].project(raw["text"])
    assert torch.allclose(memory.text_partners, images, atol=1e-6)
    assert torch.allclose(memory.image_partners, texts, atol=1e-6)
    q = torch.randn(7, 6, generator=g)
    with torch.no_grad():
        emb = towers["text"].project(q)
        got = memory("text", q, emb)
    want = _numpy_memory(q.double().numpy(), emb.double().numpy(), raw["text"].double().numpy(),
                         images.double().numpy(), k=5, power=3.0, weight=0.3)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(7), atol=1e-6)
    # the projections change (a training step): the joint embeddings follow them
    with torch.no_grad():
        towers["image"].projection.weight.mul_(2).add_(1)
    memory.refresh(towers)
    with torch.no_grad():
        moved = towers["image"].project(raw["image"])
    assert torch.allclose(memory.text_partners, moved, atol=1e-6) and not torch.allclose(moved, images, atol=1e-3)


def test_whitening_by_hand():
    """Rows ±(3, 0), ±(0, 1): covariance diag(4.5, 0.5), mean eigenvalue 2.5, so W = diag(1/√7, 1/√3); rotated
    rows give the rotated W (ZCA: symmetric), and rows without variance the identity."""
    x = torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    want = torch.diag(torch.tensor([7.0, 3.0]).rsqrt())
    assert torch.allclose(whitening(x), want, atol=1e-6)
    c, s = math.cos(0.3), math.sin(0.3)
    rot = torch.tensor([[c, -s], [s, c]])
    assert torch.allclose(whitening(x @ rot.T), rot @ want @ rot.T, atol=1e-6)
    assert torch.equal(whitening(torch.zeros(5, 3)), torch.eye(3))


def test_whitened_memory_formula_by_hand():
    """``whiten``: the image queries' neighbours found in whitened features; the text side as before."""
    g = torch.Generator().manual_seed(1)
    towers = torch.nn.ModuleDict({m: Tower(torch.nn.Identity(), d, 8, "linear", freeze=True)
                                  for m, d in (("image", 12), ("text", 6))})
    # anisotropic image features: a few directions carry most of the variance, as a classifier's do
    raw = {"image": torch.randn(60, 12, generator=g) * torch.logspace(1, -1, 12),
           "text": torch.randn(60, 6, generator=g)}
    memory = PairMemory(["image", "text"], {"image": 12, "text": 6}, 8, k=5, power=3.0, weight=0.3, whiten=["image"])
    memory.fill(raw)
    memory.refresh(towers)
    assert memory.image_whiten.shape == (12, 12) and not hasattr(memory, "text_whiten")
    q = torch.randn(9, 12, generator=g) * torch.logspace(1, -1, 12)
    with torch.no_grad():
        emb = towers["image"].project(q)
        got = memory("image", q, emb)
        texts = towers["text"].project(raw["text"])
    want = _numpy_memory(q.double().numpy(), emb.double().numpy(), raw["image"].double().numpy(),
                         texts.double().numpy(), k=5, power=3.0, weight=0.3, whiten=True)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    plain = _numpy_memory(q.double().numpy(), emb.double().numpy(), raw["image"].double().numpy(),
                          texts.double().numpy(), k=5, power=3.0, weight=0.3)
    assert np.abs(plain - want).max() > 1e-2  # whitening changed which pairs are near


def test_ties_at_the_kth_place_go_to_the_lower_pair_index():
    """Pairs 1, 2 and 3 have the same caption features (a shared caption); pair 3's partner differs from pairs 1 and
    2's. With k = 2 a query nearest to that caption takes pairs 1 and 2, whichever order the batch or the library
    would give: its embedding moves towards their partner alone."""
    feats = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.6, 0.8, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    memory = PairMemory(["text", "image"], {"text": 3, "image": 2}, 2, k=2, power=1.0, weight=0.5)
    memory.fill({"text": feats, "image": torch.randn(5, 2)})
    memory.text_partners = torch.eye(2)[[1, 0, 0, 1, 1]]
    query, emb = torch.tensor([[0.6, 0.8, 0.1]]), F.normalize(torch.tensor([[1.0, 1.0]]), dim=-1)
    unit = lambda x: x / x.norm(dim=-1, keepdim=True)  # noqa: E731
    mean = feats.mean(0)
    sims = (unit(query - mean) @ unit(unit(feats - mean).half().float()).T)[0]
    assert sims[1] == sims[2] == sims[3] > 0 and (sims[[0, 4]] < sims[1]).all()  # the tie lies across the 2nd place
    want = unit(0.5 * emb + 0.5 * torch.tensor([[1.0, 0.0]]))  # pairs 1 and 2's partner, not pair 3's
    for batch in (query, query.repeat(7, 1)):
        torch.testing.assert_close(memory("text", batch, emb.expand(len(batch), -1)), want.expand(len(batch), -1))


def test_an_input_like_no_pair_keeps_its_embedding():
    memory = PairMemory(["text", "image"], {"text": 2, "image": 3}, 2, k=3, power=2.0, weight=0.5)
    memory.fill({"text": torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]),  # centred: -1, 0, +1 along x
                 "image": torch.randn(3, 3)})
    memory.text_partners = F.normalize(torch.randn(3, 2), dim=-1)
    emb = F.normalize(torch.tensor([[0.3, 0.7]]), dim=-1)
    # the query, centred, points along -y: cosine 0 or undefined with every pair, so no weight anywhere
    assert torch.allclose(memory("text", torch.tensor([[2.0, -1.0]]), emb), emb, atol=1e-6)


def _memory_run(clipart, out, save_every=None, resume=False, **model):
    cfg = tiny(clipart, out, max_steps=6, **({"save_every": save_every} if save_every else {}))
    for t in cfg.model.towers.values():
        t.freeze = True
    from xmodal.config import PairMemoryConfig
    cfg.model.pair_memory = PairMemoryConfig(k=4, power=3.0, weight=0.4, **model)
    return pretrain(cfg, resume=resume)


def test_a_run_saves_the_memory_of_its_training_pairs(clipart, tmp_path):
    run = _memory_run(clipart, tmp_path / "run")
    model = xmodal.load(run)
    rows = read_manifest(clipart, modalities=["image", "text"]).dataset
    images, texts = list(rows["image"]), list(rows["text"])
    memory = model.pair_memory
    assert len(memory) == len(rows)
    # independent truth: the saved towers' own plain embeddings of each training pair, the caption's its image's
    with torch.no_grad():
        plain = {m: torch.cat([model.towers[m](torch.stack([model.transform(m)(v) for v in vals[i:i + 32]]))
                               for i in range(0, len(vals), 32)]) for m, vals in (("image", images), ("text", texts))}
    assert torch.allclose(memory.text_partners, plain["image"], atol=1e-5)
    assert torch.allclose(memory.image_partners, plain["text"], atol=1e-5)
    with torch.no_grad():
        feats = torch.stack([model.transform("text")(v) for v in texts])
        raw = model.towers["text"].encoder(feats)
    stored = F.normalize(raw - raw.mean(0), dim=-1)
    assert torch.allclose(memory.text_features.float(), stored, atol=2e-3)
    # encode applies it: the formula on the plain embedding, the same from a model that loads the text tower only
    queries = ["a red apple", texts[3], "an old car"]
    with torch.no_grad():
        q_raw = model.towers["text"].encoder(torch.stack([model.transform("text")(v) for v in queries]))
        want = memory("text", q_raw, model.towers["text"].project(q_raw))
    got = model.encode("text", queries)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, model.towers["text"].project(q_raw), atol=1e-3)  # it did move them
    text_only = XModalModel.from_pretrained(run, towers=["text"])
    assert text_only.pair_memory.modalities == ["text"]
    assert torch.allclose(text_only.encode("text", queries), got, atol=1e-6)
    keys = load_file(str(run / "model.safetensors"))
    assert {k for k in keys if k.startswith("pair_memory.")} == {
        "pair_memory.image_features", "pair_memory.image_mean", "pair_memory.image_partners",
        "pair_memory.text_features", "pair_memory.text_mean", "pair_memory.text_partners"}


def test_a_run_whitens_the_modalities_it_is_told_to(clipart, tmp_path):
    run = _memory_run(clipart, tmp_path / "run", whiten=["image"])
    model = xmodal.load(run)
    memory = model.pair_memory
    images = list(read_manifest(clipart, modalities=["image", "text"]).dataset["image"])
    with torch.no_grad():  # independent truth: NumPy's whitening of the saved image tower's own features
        raw = model.towers["image"].encoder(torch.stack([model.transform("image")(v) for v in images])).double()
    unit = F.normalize(raw - raw.mean(0), dim=-1).numpy()
    w = _numpy_whitening(unit)
    np.testing.assert_allclose(memory.image_whiten.numpy(), w, rtol=1e-4, atol=1e-4)
    stored = unit @ w
    stored /= np.linalg.norm(stored, axis=-1, keepdims=True)
    np.testing.assert_allclose(memory.image_features.float().numpy(), stored, atol=2e-3)
    keys = load_file(str(run / "model.safetensors"))
    assert keys["pair_memory.image_whiten"].shape == (raw.shape[1], raw.shape[1])
    assert "pair_memory.text_whiten" not in keys
    # encode finds an image's neighbours in the whitened space: the formula on its plain embedding
    with torch.no_grad():
        q_raw = model.towers["image"].encoder(torch.stack([model.transform("image")(v) for v in images[:4]]))
        want = memory("image", q_raw, model.towers["image"].project(q_raw))
    assert torch.allclose(model.encode("image", images[:4]), want, atol=1e-5)
    assert XModalModel.from_pretrained(run, towers=["text"]).pair_memory.whiten == []


def test_max_rows_keeps_a_seeded_sample(clipart, tmp_path):
    run = _memory_run(clipart, tmp_path / "run", max_rows=10)
    assert len(xmodal.load(run).pair_memory) == 10


def test_a_model_without_memory_saves_no_memory(clipart, tmp_path):
    run = pretrain(tiny(clipart, tmp_path / "run", max_steps=2))
    assert xmodal.load(run).pair_memory is None
    assert not [k for k in load_file(str(run / "model.safetensors")) if k.startswith("pair_memory")]


@pytest.mark.parametrize("memory, tower, message", [
    ({}, {"freeze": False}, "model.towers.image.freeze is false"),
    ({"weight": 1.0}, {}, "model.pair_memory.weight: must be in [0, 1)"),
    ({"k": 0}, {}, "model.pair_memory.k: expected a whole number >= 1"),
    ({"power": 0}, {}, "model.pair_memory.power: must be positive"),
    ({}, None, "model.pair_memory: pairs need two towers or more"),
    ({"whiten": ["audio"]}, {}, "model.pair_memory.whiten: ['audio'] not among model.towers (image, text)"),
])
def test_config_checks(memory, tower, message):
    towers = {"image": {"kind": "cnn", "freeze": True, **(tower or {})}, "text": {"kind": "lstm", "freeze": True}}
    if tower is None:
        del towers["text"]
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"towers": towers, "pair_memory": memory}})
    assert message in str(e.value)


def test_fine_tuning_from_a_run_with_a_memory(clipart, tmp_path):
    """Its own towers without a memory: the memory is left out, not an error; the run's towers: the memory is kept."""
    run = _memory_run(clipart, tmp_path / "pre")
    task = {"cls": {"kind": "classification", "modalities": ["text"], "target": "label", "eval_split": None}}
    own = tiny(clipart, tmp_path / "own", max_steps=2)
    for t in own.model.towers.values():
        t.freeze = True
    own.init_from, own.tasks = str(run), {n: TaskConfig(**t) for n, t in task.items()}
    assert xmodal.load(pretrain(own)).pair_memory is None
    inherit = tiny(clipart, tmp_path / "inherit", max_steps=2)
    inherit.init_from, inherit.model.towers = str(run), {}
    inherit.tasks = {n: TaskConfig(**t) for n, t in task.items()}
    kept = xmodal.load(pretrain(inherit)).pair_memory
    assert torch.equal(kept.text_features, xmodal.load(run).pair_memory.text_features)


def test_a_streamed_run_fills_the_memory_from_samples_of_every_shard(clipart, tmp_path):
    """Sharded data: the first ceil(max_rows / shards) samples of each shard, in shard order — checked against the
    manifest rows those samples came from (their ids in the shards' own JSON members, read with tarfile), embedded
    by the saved towers."""
    import json
    import tarfile

    from xmodal.cli import main
    from xmodal.config import PairMemoryConfig

    shards = tmp_path / "shards"
    assert main(["shard", "--manifest", str(clipart), "--out", str(shards), "--samples-per-shard", "20"]) == 0
    n = len(json.loads((shards / "sizes.json").read_text()))
    assert n >= 3
    cfg = tiny(clipart, tmp_path / "run", max_steps=3)
    cfg.data.train, cfg.data.shards = None, str(shards / f"{{00000..{n - 1:05d}}}.tar")
    for t in cfg.model.towers.values():
        t.freeze = True
    max_rows = 2 * n + 1  # 3 a shard: the last shards' share is cut at max_rows
    cfg.model.pair_memory = PairMemoryConfig(k=4, max_rows=max_rows)
    model = xmodal.load(pretrain(cfg))
    ids = []
    for i in range(n):
        with tarfile.open(shards / f"{i:05d}.tar") as tar:
            names = sorted(m.name for m in tar.getmembers() if m.name.endswith(".json"))
            ids += [json.loads(tar.extractfile(name).read())["id"] for name in names[:3]]
    ids = ids[:max_rows]
    rows = {r["id"]: r for r in read_manifest(clipart, modalities=["image", "text"]).dataset}
    memory = model.pair_memory
    assert len(memory) == max_rows
    with torch.no_grad():
        for m in ("image", "text"):
            raw = model.towers[m].encoder(torch.stack([model.transform(m)(rows[i][m]) for i in ids]))
            stored = F.normalize(raw - raw.mean(0), dim=-1)
            assert torch.allclose(getattr(memory, f"{m}_features").float(), stored, atol=2e-3), m
            other = "text" if m == "image" else "image"
            partner = model.towers[other](torch.stack([model.transform(other)(rows[i][other]) for i in ids]))
            assert torch.allclose(getattr(memory, f"{m}_partners"), partner, atol=1e-5), m


def test_a_run_with_a_whitened_memory_resumes_as_if_never_stopped(clipart, tmp_path, monkeypatch):
    """The memory (whitening included) of a run resumed from its step-3 checkpoint equals the uninterrupted run's."""
    from test_engine import losses, weights
    from xmodal.training.engine import MetricsLog

    full = _memory_run(clipart, tmp_path / "full", whiten=["image"], save_every=3)
    real_write = MetricsLog.write

    def crashing_write(self, record):
        real_write(self, record)
        if record.get("step") == 5:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(MetricsLog, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        _memory_run(clipart, tmp_path / "resumed", whiten=["image"], save_every=3)
    monkeypatch.setattr(MetricsLog, "write", real_write)
    _memory_run(clipart, tmp_path / "resumed", whiten=["image"], save_every=3, resume=True)
    a, b = losses(full), losses(tmp_path / "resumed")
    assert max(a) == max(b) == 6 and all(b[s][0] == pytest.approx(a[s][0], abs=1e-5) for s in a)
    wa, wb = weights(full), weights(tmp_path / "resumed")
    assert "pair_memory.image_whiten" in wa and set(wa) == set(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0)


def test_a_loaded_memory_whitens_as_it_was_saved():
    """The saved weights decide: a memory saved whitened is read whitened by a model whose config omits ``whiten``
    (a fine-tuning config reading a run's memory), and one saved plain is read plain; a new fill follows the config."""
    g = torch.Generator().manual_seed(2)
    raw = {"image": torch.randn(30, 12, generator=g) * torch.logspace(1, -1, 12),
           "text": torch.randn(30, 6, generator=g)}
    saved = PairMemory(["image", "text"], {"image": 12, "text": 6}, 8, k=4, power=3.0, weight=0.3, whiten=["image"])
    saved.fill(raw)
    saved.image_partners, saved.text_partners = (F.normalize(torch.randn(30, 8, generator=g), dim=-1) for _ in "it")
    q = torch.randn(5, 12, generator=g)
    emb = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    plain = PairMemory(["image", "text"], {"image": 12, "text": 6}, 8, k=4, power=3.0, weight=0.3)
    plain.load_state_dict(saved.state_dict())  # strict: image_whiten is taken, not unexpected
    assert plain.whiten == ["image"] and torch.equal(plain("image", q, emb), saved("image", q, emb))
    no_w = {k: v for k, v in saved.state_dict().items() if k != "image_whiten"}
    whitened = PairMemory(["image", "text"], {"image": 12, "text": 6}, 8, k=4, power=3.0, weight=0.3, whiten=["image"])
    whitened.load_state_dict(no_w)  # strict: no missing key, the saved features are compared plainly
    assert whitened.whiten == [] and not hasattr(whitened, "image_whiten")
    whitened.fill(raw)
    assert whitened.whiten == ["image"] and whitened.image_whiten.shape == (12, 12)
    with pytest.raises(ValueError, match="list of modality names"):
        PairMemory(["image", "text"], {"image": 12, "text": 6}, 8, k=4, power=3.0, weight=0.3, whiten="image")
