"""Frozen-feature reuse: exact (same outputs as running the tower), computed once, invalidated by new weights."""
import contextlib

import pytest
import torch
from PIL import Image

from xmodal.config import ModelConfig, TaskConfig, TowerConfig
from xmodal.feature_cache import precompute_features, reuse_frozen_features, weights_fingerprint
from xmodal.model import XModalModel


def frozen_model(tasks=None):
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=16, towers={
        "image": TowerConfig(kind="cnn", image_size=32, freeze=True, augment=False, options={"channels": [8, 16]}),
        "text": TowerConfig(kind="lstm", context_length=16, freeze=True, options={"embed_dim": 16, "hidden": 16})})
    return XModalModel(cfg, tasks).eval()


def count_calls(module):
    calls = []
    module.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    return calls


def test_reuse_is_exact_and_embeds_each_input_once(tmp_path):
    model = frozen_model()
    paths = []
    for i, colour in enumerate(["red", "green", "blue"]):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (40, 30), colour).save(paths[-1])
    texts = ["a red square", "green", "a blue thing", "green"]
    plain_img, plain_txt = model.encode("image", paths), model.encode("text", texts)
    calls = count_calls(model.towers["text"].encoder)
    with reuse_frozen_features():
        first = model.encode("text", texts)
        again = model.encode("text", texts[::-1], batch_size=2)
        img = model.encode("image", paths)
    torch.testing.assert_close(first, plain_txt, atol=1e-6, rtol=0)
    torch.testing.assert_close(again, plain_txt.flip(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(img, plain_img, atol=1e-6, rtol=0)
    assert sum(calls) == 3  # three distinct texts, embedded once; the second encode ran no encoder at all
    model.encode("text", texts)  # outside the block nothing is reused
    assert sum(calls) == 3 + 4


def test_new_weights_are_not_served_stale_features():
    model = frozen_model()
    enc, tf = model.towers["text"].encoder, model.transform("text")
    with reuse_frozen_features():
        before = precompute_features(enc, tf, ["a cat"], memo_key="k", progress=False).features
        old = weights_fingerprint(enc)
        with torch.no_grad():
            next(enc.parameters()).add_(1.0)
        assert weights_fingerprint(enc) != old
        after = precompute_features(enc, tf, ["a cat"], memo_key="k", progress=False).features
    enc.eval()
    with torch.no_grad():
        truth = enc(tf("a cat")[None])
    torch.testing.assert_close(after, truth, atol=1e-6, rtol=0)
    assert not torch.allclose(before, after)


def test_predict_with_reused_features_matches_and_refuses_a_row_without_input():
    task = TaskConfig(kind="classification", modalities=["text"], classes=["a", "b"])
    model = frozen_model({"t": task})
    rows = {"text": ["one", "three", "two words", "one"]}
    plain = model.predict("t", rows)
    with reuse_frozen_features():
        reused = model.predict("t", rows, batch_size=3)
    torch.testing.assert_close(reused, plain, atol=1e-6, rtol=0)
    # a row without the head's only input is not predicted from zeros: it is refused, reused features or not
    for context in (contextlib.nullcontext(), reuse_frozen_features()):
        with context, pytest.raises(ValueError, match=r"task 't' reads text, and row 1 of the inputs \(0-based\) "
                                                      r"has no text"):
            model.predict("t", {"text": ["one", "", "two words"]}, batch_size=3)



def test_the_pass_gives_the_towers_own_features_on_real_drawings(clipart):
    """The frozen-feature pass (several batches, in the order it embeds them) equals the tower's forward on the
    stacked decoded drawings; a file that cannot be read stops it with that file's own error."""
    import csv
    with open(clipart, newline="", encoding="utf-8") as f:
        paths = [str(clipart.parent / r["image"]) for r in csv.DictReader(f)][:40]
    model = frozen_model()
    enc, tf = model.towers["image"].encoder, model.transform("image")
    with torch.inference_mode():
        truth = enc(torch.stack([tf(p) for p in paths]))
    got = precompute_features(enc, tf, paths, batch_size=6, progress=False)
    torch.testing.assert_close(torch.stack([got(p) for p in paths]), truth, atol=1e-6, rtol=0)
    missing = str(clipart.parent / "no-such-drawing.png")
    with pytest.raises(FileNotFoundError, match="no-such-drawing.png"):
        precompute_features(enc, tf, paths[:25] + [missing] + paths[25:], batch_size=6, progress=False)


@pytest.mark.parametrize("cores, threads, asked, used", [
    (2, 2, 2, 0),  # the forward's 2 threads already keep both cores busy: the pass decodes between batches
    (2, 1, 2, 1),
    (8, 2, 4, 4),
    (4, 2, 4, 2),
    (2, 2, 0, 0),
])
def test_the_pass_on_the_cpu_uses_only_the_cores_its_forward_leaves(monkeypatch, cores, threads, asked, used):
    import xmodal.feature_cache as fc
    seen = []

    class Recording(torch.utils.data.DataLoader):
        def __init__(self, *args, num_workers=0, **kwargs):
            seen.append(num_workers)
            super().__init__(*args, num_workers=0, **kwargs)  # the choice is what is checked; decode here

    monkeypatch.setattr(fc, "DataLoader", Recording)
    monkeypatch.setattr(fc.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = frozen_model()
        enc, tf = model.towers["text"].encoder, model.transform("text")
        values = ["a red circle", "two blue squares", "one", "a longer line of words here"]
        got = precompute_features(enc, tf, values, batch_size=3, num_workers=asked, progress=False)
        with torch.inference_mode():
            truth = torch.cat([enc(torch.stack([tf(v) for v in sorted(values, key=len)[i:i + 3]]))
                               for i in (0, 3)])
    finally:
        torch.set_num_threads(saved)
    assert seen == [used]
    torch.testing.assert_close(torch.stack([got(v) for v in sorted(values, key=len)]), truth, atol=1e-6, rtol=0)


def test_a_pass_on_a_gpu_keeps_every_worker(monkeypatch):
    import xmodal.feature_cache as fc
    monkeypatch.setattr(fc.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert fc.pass_workers(4, "cuda") == 4
    assert fc.pass_workers(4, torch.device("cuda", 0)) == 4
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert fc.pass_workers(4, torch.device("cpu")) == 0  # the same 2 cores, a forward on the CPU
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("workers", [0, 2])
def test_embedding_leaves_the_global_generator_alone(tmp_path, workers):
    """A frozen pass draws nothing from torch's global generator, so a run trains on the same random stream (dropout,
    heads' initialisation) whether its features were embedded now or read from the cache (found in the quickstart:
    its sentiment fine-tune gave 0.7229 on a cold cache and 0.7286 on a warm one)."""
    model = frozen_model()
    enc, tf = model.towers["text"].encoder, model.transform("text")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    embedded = precompute_features(enc, tf, ["a cat", "a dog", "a red car"], batch_size=2, num_workers=workers,
                                   memo_key=("text", "k"), cache_dir=tmp_path, progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    read = precompute_features(enc, tf, ["a cat", "a dog", "a red car"], batch_size=2, num_workers=workers,
                               memo_key=("text", "k"), cache_dir=tmp_path, progress=False)  # from the disk cache
    assert torch.equal(torch.get_rng_state(), before)
    for v in ("a cat", "a dog", "a red car"):
        torch.testing.assert_close(torch.as_tensor(read(v)), torch.as_tensor(embedded(v)), atol=0, rtol=0)
