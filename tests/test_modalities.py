"""Modality towers: every kind builds and runs on its own transform's output; transforms; open_clip equivalence."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from xmodal.config import TowerConfig
from xmodal.modalities import KINDS, build_encoder, build_transform

torch.set_num_threads(2)

RAW = {"mean": [0, 0, 0], "std": [1, 1, 1]}  # transform output = ToTensor values in [0, 1]

# (modality, config, check gradients) -- backward only through the small towers, to keep the file fast
CASES = [
    ("image", TowerConfig(kind="open_clip", name="xmodal-vit-tiny", image_size=32,
                          options={"vision_cfg": {"layers": 2}}), True),
    ("image", TowerConfig(kind="open_clip", name="RN50", image_size=64,  # a shrunken ModifiedResNet
                          options={"vision_cfg": {"layers": [1, 1, 1, 1], "width": 16}, "embed_dim": 64}), True),
    ("image", TowerConfig(kind="cnn", image_size=32, options={"channels": [8, 16, 24]}), True),
    ("image", TowerConfig(kind="timm", name="resnet10t", image_size=32), True),
    ("image", TowerConfig(kind="efficientnet_lite0", pretrained="package", image_size=32), False),
    ("text", TowerConfig(kind="open_clip", name="xmodal-vit-tiny", context_length=16,
                         options={"text_cfg": {"layers": 2}}), True),
    ("text", TowerConfig(kind="lstm", context_length=16, options={"embed_dim": 16, "hidden": 24}), True),
    ("text", TowerConfig(kind="gru", context_length=16, options={"embed_dim": 16, "hidden": 24, "layers": 2}), True),
    ("text", TowerConfig(kind="hf", name="minilm", context_length=16), False),
]


def _samples(modality, tmp_path):
    if modality == "image":
        path = tmp_path / "clip_art.png"
        Image.new("RGBA", (50, 40), (200, 30, 30, 128)).save(path)
        return [str(path), Image.new("L", (30, 70), 90), Image.new("RGB", (64, 64), (1, 2, 3))]
    return ["a red square on a white page", "", "word " * 100]


@pytest.mark.parametrize("modality,cfg,grads", CASES, ids=[f"{m}-{c.kind}-{c.name}" for m, c, _ in CASES])
def test_every_kind_builds_and_runs(modality, cfg, grads, tmp_path):
    encoder, feat_dim = build_encoder(modality, cfg)
    for train in (True, False):
        transform = pickle.loads(pickle.dumps(build_transform(modality, cfg, train=train)))
        batch = torch.stack([transform(x) for x in _samples(modality, tmp_path)])
        if modality == "image":
            assert batch.dtype == torch.float32 and batch.shape == (3, 3, cfg.image_size, cfg.image_size)
        else:
            assert batch.dtype == torch.int64 and batch.shape == (3, cfg.context_length)
        encoder.train(train)
        with torch.set_grad_enabled(train and grads):
            out = encoder(batch)
        assert out.shape == (3, feat_dim) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        if train and grads:
            out.square().mean().backward()
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_kinds_table():
    # hf_clip needs a saved transformers model: its contract is checked in test_pretrained.py
    assert KINDS == {"image": ("open_clip", "cnn", "timm", "efficientnet_lite0", "hf_clip"),
                     "text": ("open_clip", "lstm", "gru", "hf", "hf_clip"),
                     "audio": ("cnn", "transformer", "resemblyzer")}


@pytest.mark.parametrize("modality", ["image", "text"])
def test_unknown_kind_names_field_and_valid_kinds(modality):
    cfg = TowerConfig(kind="resnet")
    for fn in (lambda: build_encoder(modality, cfg), lambda: build_transform(modality, cfg, True)):
        with pytest.raises(ValueError, match=rf"model\.towers\.{modality}\.kind: .*'resnet'") as e:
            fn()
        for kind in KINDS[modality]:
            assert kind in str(e.value)


def test_other_config_errors():
    with pytest.raises(ValueError, match=r"model\.towers\.video: unknown modality"):
        build_encoder("video", TowerConfig(kind="cnn"))
    with pytest.raises(ValueError, match=r"model\.towers\.image\.options\.chanels: unknown option.*channels"):
        build_encoder("image", TowerConfig(kind="cnn", options={"chanels": [8]}))
    with pytest.raises(ValueError, match=r"model\.towers\.image\.options\.vision_cfg\.image_size \(64\) disagrees"):
        build_encoder("image", TowerConfig(kind="open_clip", name="xmodal-vit-tiny", image_size=96,
                                           options={"vision_cfg": {"image_size": 64}}))
    with pytest.raises(ValueError, match=r"model\.towers\.image\.name: unknown open_clip model config 'ViT-Z-99'"):
        build_encoder("image", TowerConfig(kind="open_clip", name="ViT-Z-99", image_size=64))
    with pytest.raises(ValueError, match=r"image\.image_size: 60 is not a multiple of the ViT patch size 8"):
        build_encoder("image", TowerConfig(kind="open_clip", name="xmodal-vit-tiny", image_size=60))
    with pytest.raises(ValueError, match=r"image\.pretrained: 'nope' is neither an existing checkpoint file nor"):
        build_encoder("image", TowerConfig(kind="open_clip", name="xmodal-vit-tiny", image_size=64, pretrained="nope"))
    with pytest.raises(ValueError, match=r"model\.towers\.text\.name: required for kind hf"):
        build_encoder("text", TowerConfig(kind="hf"))
    with pytest.raises(ValueError, match=r"model\.towers\.image\.options\.mean: expected 3 numbers"):
        build_transform("image", TowerConfig(kind="cnn", options={"mean": [0.5]}), train=False)
    with pytest.raises(ValueError, match=r"model\.towers\.image\.name: unknown timm model 'no_such_net'"):
        build_encoder("image", TowerConfig(kind="timm", name="no_such_net"))


# ------------------------------------------------------------------------------------------------ image transforms

def test_mean_std_per_kind():
    import open_clip
    import timm

    def stats(kind, name=None):
        t = build_transform("image", TowerConfig(kind=kind, name=name), train=False)
        return t.mean, t.std

    openai = (tuple(open_clip.OPENAI_DATASET_MEAN), tuple(open_clip.OPENAI_DATASET_STD))
    assert stats("open_clip", "ViT-B-32") == openai
    assert stats("cnn") == openai
    assert stats("efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)
    pcfg = timm.models.get_pretrained_cfg("resnet18")
    assert stats("timm", "resnet18") == (tuple(pcfg.mean), tuple(pcfg.std))
    assert stats("timm", "vit_small_patch16_224.augreg_in21k") == ((0.5,) * 3, (0.5,) * 3)
    t = build_transform("image", TowerConfig(kind="cnn", options={"mean": [0.1, 0.2, 0.3]}), train=False)
    assert t.mean == (0.1, 0.2, 0.3) and t.std == openai[1]


def test_transparent_png_is_composited_onto_white(tmp_path):
    t = build_transform("image", TowerConfig(kind="cnn", image_size=16, augment=False, options=RAW), train=False)
    rgba = np.zeros((16, 16, 4), np.uint8)  # left half fully transparent (black RGB underneath!)
    rgba[:, 8:] = (0, 0, 0, 255)  # right half opaque black
    rgba[:4, 8:] = (255, 0, 0, 128)  # top-right half-transparent red
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    x = t(str(path))
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x[:, 4:, :8], torch.ones(3, 12, 8))  # transparent → white
    assert torch.allclose(x[:, 4:, 8:], torch.zeros(3, 12, 8))  # opaque black stays black
    assert torch.allclose(x[:, :4, 8:].mean((1, 2)), torch.tensor([1.0, 0.5, 0.5]), atol=0.01)  # red over white
    # the same for a PIL image, an LA image and a palette image with a transparent index
    assert torch.equal(t(Image.open(path)), x)
    la = Image.fromarray(np.stack([np.zeros((16, 16), np.uint8), np.zeros((16, 16), np.uint8)], -1), "LA")
    assert torch.allclose(t(la), torch.ones(3, 16, 16))
    p = Image.new("P", (16, 16), 3)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 3
    p.save(tmp_path / "p.png")
    assert torch.allclose(t(str(tmp_path / "p.png")), torch.ones(3, 16, 16))


def test_grayscale_and_16bit_become_three_channels(tmp_path):
    t = build_transform("image", TowerConfig(kind="cnn", image_size=8, augment=False, options=RAW), train=False)
    x = t(Image.new("L", (8, 8), 51))
    assert x.shape == (3, 8, 8) and torch.allclose(x, torch.full((3, 8, 8), 0.2))
    path = tmp_path / "g16.png"
    Image.fromarray(np.full((8, 8), 65535 // 5, np.uint16)).save(path)
    y = t(str(path))
    assert y.shape == (3, 8, 8) and torch.allclose(y, torch.full((3, 8, 8), 0.2), atol=0.01)
    with pytest.raises(TypeError, match="expected a path"):
        t(np.zeros((8, 8, 3)))


def test_eval_transform_resizes_then_center_crops():
    t = build_transform("image", TowerConfig(kind="cnn", image_size=8, options=RAW), train=False)
    img = np.zeros((8, 24, 3), np.uint8)
    img[:, 8:16] = 255  # white centre third
    assert torch.allclose(t(Image.fromarray(img)), torch.ones(3, 8, 8))
    train = build_transform("image", TowerConfig(kind="cnn", image_size=8, options=RAW), train=True)
    no_aug = build_transform("image", TowerConfig(kind="cnn", image_size=8, augment=False, options=RAW), train=True)
    assert train.augment and not no_aug.augment
    assert torch.allclose(no_aug(Image.fromarray(img)), torch.ones(3, 8, 8))


def test_transforms_work_in_dataloader_workers(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(path)
    img_t = build_transform("image", TowerConfig(kind="cnn", image_size=16), train=True)
    txt_t = build_transform("text", TowerConfig(kind="lstm", context_length=8), train=True)

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"image": img_t(str(path)), "text": txt_t(f"sample {i}")}

    ctx = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
    batches = list(torch.utils.data.DataLoader(DS(), batch_size=2, num_workers=1, multiprocessing_context=ctx))
    assert batches[0]["image"].shape == (2, 3, 16, 16) and batches[0]["text"].shape == (2, 8)


# ------------------------------------------------------------------------------------------------- BPE tokenizer

def test_bpe_transform_matches_open_clip_tokenizer():
    import open_clip

    t = build_transform("text", TowerConfig(kind="open_clip", name="xmodal-vit-tiny", context_length=12), True)
    short, long = "A cat.", " ".join(["elephant"] * 40)
    ids = t(short)
    assert ids.dtype == torch.int64 and ids.shape == (12,)
    assert torch.equal(ids, open_clip.tokenize([short], context_length=12)[0])
    n = int((ids != 0).sum())
    assert ids[0] == 49406 and ids[n - 1] == 49407 and (ids[n:] == 0).all()  # SOT ... EOT then 0-padding
    ids = t(long)
    assert torch.equal(ids, open_clip.tokenize([long], context_length=12)[0])
    assert (ids != 0).all() and ids[0] == 49406 and ids[-1] == 49407  # truncated, EOT kept
    assert torch.equal(t(""), torch.tensor([49406, 49407] + [0] * 10))
    for bad in (None, b"bytes", ["a list"], 3):
        with pytest.raises(TypeError, match="expected a str"):
            t(bad)


def test_hf_transform_pads_with_tokenizer_pad_id():
    cfg = TowerConfig(kind="hf", name="minilm", context_length=10)
    t = pickle.loads(pickle.dumps(build_transform("text", cfg, train=False)))
    encoder, _ = build_encoder("text", cfg)
    assert t.pad_id == encoder.pad_id == 0
    ids = t("hello world")
    assert ids.dtype == torch.int64 and ids.shape == (10,) and ids[0] == 101 and ids[3] == 102 and (ids[4:] == 0).all()
    long = t("word " * 50)
    assert long.shape == (10,) and (long != 0).all() and long[-1] == 102  # truncated, [SEP] kept
    with pytest.raises(TypeError, match="expected a str"):
        t(None)


# ------------------------------------------------------------------------------------------------------ LSTM / GRU

@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_rnn_pools_over_real_tokens_only(kind):
    torch.manual_seed(0)
    opts = {"embed_dim": 8, "hidden": 12, "layers": 2}
    encoder, dim = build_encoder("text", TowerConfig(kind=kind, options=opts))
    encoder.eval()
    assert dim == 24 and encoder.pad_id == 0
    texts = ["a small cat", "one two three four five six", "", "dog"]
    short = build_transform("text", TowerConfig(kind=kind, context_length=10), False)
    long = build_transform("text", TowerConfig(kind=kind, context_length=40), False)
    with torch.no_grad():
        a = encoder(torch.stack([short(s) for s in texts]))
        b = encoder(torch.stack([long(s) for s in texts]))  # more padding: same result
        c = encoder(torch.stack([long(s) for s in reversed(texts)]))  # other batch order: same rows
        d = encoder(torch.zeros(2, 10, dtype=torch.long))  # all-padding rows: no crash
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b, c.flip(0), atol=1e-6, rtol=1e-5)
    assert d.shape == (2, 24) and torch.isfinite(d).all()


# ---------------------------------------------------------------------------------------- open_clip equivalence

@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    import open_clip

    from xmodal.modalities import register_open_clip_configs

    register_open_clip_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("xmodal-vit-tiny", pretrained=None).eval()
    with torch.no_grad():  # make every parameter non-trivial (biases / LayerNorms start at 0 / 1)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path_factory.mktemp("clip") / "clip.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, path)
    return model, path


def test_open_clip_towers_equal_create_model_halves(clip_checkpoint):
    import open_clip

    model, path = clip_checkpoint
    image_cfg = TowerConfig(kind="open_clip", name="xmodal-vit-tiny", image_size=64, pretrained=str(path))
    text_cfg = TowerConfig(kind="open_clip", name="xmodal-vit-tiny", context_length=32, pretrained=str(path))
    visual, vdim = build_encoder("image", image_cfg)
    text, tdim = build_encoder("text", text_cfg)
    assert vdim == tdim == 256
    images = torch.randn(3, 3, 64, 64)
    captions = ["a photo of a cat", "clip art of a red house with a long chimney", ""]
    tok = build_transform("text", text_cfg, train=False)
    ids = torch.stack([tok(c) for c in captions])
    assert torch.equal(ids, open_clip.tokenize(captions, context_length=32))
    with torch.no_grad():
        torch.testing.assert_close(visual.eval()(images), model.encode_image(images), atol=1e-5, rtol=1e-5)
        ref = model.encode_text(ids)
        torch.testing.assert_close(text.eval()(ids), ref, atol=1e-5, rtol=1e-5)
        # a shorter context: the position embedding is cut, exact under the causal mask
        short_cfg = TowerConfig(kind="open_clip", name="xmodal-vit-tiny", context_length=16, pretrained=str(path))
        short, _ = build_encoder("text", short_cfg)
        short_tok = build_transform("text", short_cfg, train=False)
        out = short.eval()(torch.stack([short_tok(c) for c in captions]))
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # another image size: the ViT position grid is resized (as open_clip does) and the tower runs
    big, _ = build_encoder("image", TowerConfig(kind="open_clip", name="xmodal-vit-tiny", image_size=96,
                                                pretrained=str(path)))
    assert big(torch.randn(1, 3, 96, 96)).shape == (1, 256)


def test_open_clip_checkpoint_as_safetensors_and_bad_files(clip_checkpoint, tmp_path):
    from safetensors.torch import save_file

    model, _ = clip_checkpoint
    st = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(st))
    visual, _ = build_encoder("image", TowerConfig(kind="open_clip", name="xmodal-vit-tiny", image_size=64,
                                                   pretrained=str(st)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(visual.eval()(x), model.encode_image(x), atol=1e-5, rtol=1e-5)
    # a checkpoint of another architecture: one readable error
    other = {k: v for k, v in model.state_dict().items() if "resblocks.3." not in k}
    bad = tmp_path / "bad.pt"
    torch.save(other, bad)
    with pytest.raises(ValueError, match=r"model\.towers\.image\.pretrained: .* missing \(\d+\): transformer\.res"):
        build_encoder("image", TowerConfig(kind="open_clip", name="xmodal-vit-tiny", image_size=64,
                                           pretrained=str(bad)))
    with pytest.raises(ValueError, match=r"model\.towers\.text\.pretrained: .* missing"):
        build_encoder("text", TowerConfig(kind="open_clip", name="xmodal-vit-tiny", pretrained=str(bad)))


def test_open_clip_pretrained_tag_path(clip_checkpoint, monkeypatch):
    """Online users name an open_clip pretrained tag; open_clip downloads it. Simulated without network."""
    import open_clip

    model, _ = clip_checkpoint
    calls = []
    monkeypatch.setattr(open_clip.pretrained, "is_pretrained_cfg", lambda name, tag: tag == "fake_tag")
    monkeypatch.setattr(open_clip, "create_model",
                        lambda name, pretrained=None, **kw: calls.append(pretrained) or model)
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: {"mean": (0.5,) * 3, "std": (0.5,) * 3})
    cfg = TowerConfig(kind="open_clip", name="xmodal-vit-tiny", image_size=64, pretrained="fake_tag")
    visual, _ = build_encoder("image", cfg)
    text, _ = build_encoder("text", TowerConfig(kind="open_clip", name="xmodal-vit-tiny", pretrained="fake_tag"))
    assert calls == ["fake_tag", "fake_tag"]
    assert build_transform("image", cfg, train=False).mean == (0.5,) * 3
    ids = open_clip.tokenize(["a dog"], context_length=32)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(visual.eval()(x), model.encode_image(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(text.eval()(ids), model.encode_text(ids), atol=1e-5, rtol=1e-5)


def test_open_clip_options_override_config():
    visual, dim = build_encoder("image", TowerConfig(
        kind="open_clip", name="xmodal-vit-tiny", image_size=32,
        options={"vision_cfg": {"layers": 1, "width": 64, "patch_size": 16}, "embed_dim": 48}))
    assert dim == 48 and len(visual.transformer.resblocks) == 1 and visual(torch.randn(1, 3, 32, 32)).shape == (1, 48)
    text, tdim = build_encoder("text", TowerConfig(kind="open_clip", name="xmodal-vit-tiny", context_length=8,
                                                   options={"text_cfg": {"layers": 1}}))
    assert tdim == 256 and len(text.transformer.resblocks) == 1
    with pytest.raises(ValueError, match=r"options\.vision_cfg: .*unexpected keyword.*widht"):
        build_encoder("image", TowerConfig(kind="open_clip", name="xmodal-vit-tiny", image_size=64,
                                           options={"vision_cfg": {"widht": 64}}))


# ------------------------------------------------------------------------------------------------------------ timm

def test_timm_local_state_dict(tmp_path):
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("resnet10t", pretrained=False)  # with its 1000-class head
    path = tmp_path / "r.safetensors"
    save_file(ref.state_dict(), str(path))
    model, dim = build_encoder("image", TowerConfig(kind="timm", name="resnet10t", pretrained=str(path)))
    assert dim == ref.num_features
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref.eval().forward_head(ref.forward_features(x), pre_logits=True))
    sd = ref.state_dict()
    sd.pop("conv1.0.weight")
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"model\.towers\.image\.pretrained: .*missing \(1\): conv1\.0\.weight"):
        build_encoder("image", TowerConfig(kind="timm", name="resnet10t", pretrained=str(tmp_path / "bad.pth")))


def test_import_stays_light():
    """`import open_clip` / timm / torchvision cost seconds each: not at `import xmodal.modalities` time."""
    import subprocess
    import sys

    code = ("import sys, xmodal.modalities; "
            "print([m for m in ('open_clip', 'timm', 'torchvision', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
