"""``model.pretrained``: a whole CLIP / SigLIP saved by open_clip or transformers, loaded through xmodal, gives the
source library's own embeddings and zero-shot logits on real images (the clipart fixture) and their real titles."""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

import _peer_models as peers
from xmodal.config import ModelConfig, PretrainedConfig
from xmodal.data import read_manifest
from xmodal.model import XModalModel

torch.set_num_threads(2)
N = 12


@pytest.fixture(scope="module")
def rows(clipart):
    m = read_manifest(clipart, split="test")
    return list(m.dataset["image"][:N]), list(m.dataset["text"][:N])


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def _xmodal(library, name, weights=None):
    return XModalModel(ModelConfig(pretrained=PretrainedConfig(library=library, name=name, weights=weights))).eval()


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _check_open_clip(ours, ref, preprocess, paths, texts):
    import open_clip

    from xmodal.modalities._openclip import register_open_clip_configs

    register_open_clip_configs()
    tok = open_clip.get_tokenizer(peers.OPEN_CLIP_NAME)
    with torch.no_grad():
        ref_img = ref.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]), normalize=True)
        ref_txt = ref.encode_text(tok(texts), normalize=True)
    img, txt = ours.encode("image", paths), ours.encode("text", texts)
    _close(img, ref_img)
    _close(txt, ref_txt)
    assert ours.cfg.loss == "clip" and ours.logit_bias is None
    with torch.no_grad():
        scale = ours({})["logit_scale"]
    assert math.isclose(float(scale), peers.CLIP_SCALE, rel_tol=1e-6)
    with torch.no_grad():
        _close(scale * img @ txt.T, ref.logit_scale.exp() * ref_img @ ref_txt.T)  # zero-shot logits


def test_open_clip_checkpoint_file_equals_open_clip(tmp_path, rows):
    import open_clip

    ckpt = peers.open_clip_checkpoint(tmp_path)
    ours = _xmodal("open_clip", peers.OPEN_CLIP_NAME, str(ckpt))
    assert {m: t.projection for m, t in ours.cfg.towers.items()} == {"image": "none", "text": "none"}
    assert all(type(t.projection).__name__ == "Identity" for t in ours.towers.values())  # no random layer
    ref, _, preprocess = open_clip.create_model_and_transforms(peers.OPEN_CLIP_NAME, pretrained=str(ckpt))
    _check_open_clip(ours, ref.eval(), preprocess, *rows)


def test_open_clip_hf_hub_repo_equals_open_clip(hub_cache, rows):
    import open_clip

    name = peers.open_clip_hub_repo(hub_cache)
    ours = _xmodal("open_clip", name)
    image = ours.cfg.towers["image"]
    assert (image.options["resize_mode"], image.options["interpolation"], image.options["mean"]) == (
        "squash", "bilinear", [0.5, 0.5, 0.5])
    ref, _, preprocess = open_clip.create_model_and_transforms(name)
    _check_open_clip(ours, ref.eval(), preprocess, *rows)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_transformers_folder_equals_transformers(tmp_path, rows, kind):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    folder = (peers.hf_clip_folder if kind == "clip" else peers.hf_siglip_folder)(tmp_path / kind)
    ours = _xmodal("transformers", str(folder))
    paths, texts = rows
    ref = AutoModel.from_pretrained(folder).eval()
    proc, tok = AutoImageProcessor.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    pixels = proc(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    if kind == "clip":
        ids = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    else:  # SigLIP's documented use: padded to its full length, no attention mask
        ids = {"input_ids": tok(texts, padding="max_length", truncation=True, max_length=16,
                                return_tensors="pt")["input_ids"]}
    with torch.no_grad():
        ref_img = torch.nn.functional.normalize(ref.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        ref_txt = torch.nn.functional.normalize(ref.get_text_features(**ids).pooler_output, dim=-1)
        ref_logits = ref(pixel_values=pixels, **ids).logits_per_image
    img, txt = ours.encode("image", paths), ours.encode("text", texts)
    _close(img, ref_img)
    _close(txt, ref_txt)
    with torch.no_grad():
        out = ours({})
    logits = out["logit_scale"] * img @ txt.T + (out["logit_bias"] if kind == "siglip" else 0.0)
    _close(logits, ref_logits)
    assert ours.cfg.loss == kind
    assert math.isclose(float(out["logit_scale"]), peers.CLIP_SCALE if kind == "clip" else peers.SIGLIP_SCALE,
                        rel_tol=1e-5)


def test_hf_clip_kind_contract(tmp_path, rows):
    """The tower contract of test_modalities.py for kind hf_clip: picklable transforms of the right shape, float
    features, gradients in training, gradient checkpointing accepted."""
    import pickle

    from xmodal.config import TowerConfig
    from xmodal.modalities import build_encoder, build_transform
    from xmodal.modalities.towers import grad_checkpointing_unsupported

    folder = str(peers.hf_clip_folder(tmp_path / "clip"))
    paths, texts = rows
    for modality, cfg, values in (("image", TowerConfig(kind="hf_clip", name=folder, image_size=32), paths[:3]),
                                  ("text", TowerConfig(kind="hf_clip", name=folder, context_length=32), texts[:3])):
        encoder, dim = build_encoder(modality, cfg)
        assert dim == 48 and grad_checkpointing_unsupported(encoder) is None
        for train in (True, False):
            tf = pickle.loads(pickle.dumps(build_transform(modality, cfg, train=train)))
            batch = torch.stack([tf(v) for v in values])
            assert batch.shape == ((3, 3, 32, 32) if modality == "image" else (3, 32))
            out = encoder.train(train)(batch)
            assert out.shape == (3, dim) and out.dtype == torch.float32 and torch.isfinite(out).all()
        out.square().mean().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def _error(tmp_path, clipart, pretrained, capsys) -> str:
    """``xmodal pretrain`` from ``pretrained``: exit status 2, one line on stderr, no run folder."""
    import yaml

    from xmodal.cli import main

    cfg = {"output_dir": str(tmp_path / "run"), "model": {"pretrained": pretrained},
           "data": {"train": str(clipart)}, "log": {"backend": "none"}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()
    return err


def test_bad_sources_are_named_in_one_line(tmp_path, clipart, capsys):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    err = _error(tmp_path, clipart, {"library": "transformers", "name": str(tmp_path / "bert")}, capsys)
    assert "is a transformers 'bert' model, not a CLIP or SigLIP image-text model" in err
    err = _error(tmp_path, clipart, {"library": "transformers", "name": str(tmp_path / "nowhere")}, capsys)
    assert "is not a transformers model folder or reachable hub id" in err and "nowhere" in err

    folder = peers.hf_clip_folder(tmp_path / "clip")
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (folder / f).unlink()
    err = _error(tmp_path, clipart, {"library": "transformers", "name": str(folder)}, capsys)
    assert "has no tokenizer files" in err

    err = _error(tmp_path, clipart, {"library": "open_clip", "name": peers.OPEN_CLIP_NAME, "weights": "laion9b"},
                 capsys)
    assert "model.pretrained.weights: 'laion9b' is neither an existing checkpoint file nor an open_clip" in err
    err = _error(tmp_path, clipart, {"library": "open_clip", "name": "ViT-Q-99", "weights": "openai"}, capsys)
    assert "unknown open_clip model config 'ViT-Q-99'" in err
    err = _error(tmp_path, clipart, {"library": "open_clip", "name": "hf-hub:nobody/nothing"}, capsys)
    assert "'hf-hub:nobody/nothing' is not an open_clip model" in err


def test_checkpoint_with_missing_or_extra_keys_lists_them(tmp_path, clipart, capsys):
    sd = peers.open_clip_model().state_dict()
    torch.save({**sd, "head.weight": torch.zeros(2), "head.bias": torch.zeros(2)}, tmp_path / "extra.pt")
    err = _error(tmp_path, clipart, {"library": "open_clip", "name": peers.OPEN_CLIP_NAME,
                                     "weights": str(tmp_path / "extra.pt")}, capsys)
    assert "does not fit open_clip model 'xmodal-vit-tiny': unexpected (2): head.bias, head.weight" in err
    del sd["visual.conv1.weight"], sd["text_projection"]
    torch.save(sd, tmp_path / "missing.pt")
    err = _error(tmp_path, clipart, {"library": "open_clip", "name": peers.OPEN_CLIP_NAME,
                                     "weights": str(tmp_path / "missing.pt")}, capsys)
    assert "missing (2): text_projection, visual.conv1.weight" in err


def test_hf_clip_gradient_checkpointing_recomputes_and_changes_no_gradient(tmp_path, rows):
    from xmodal.config import TowerConfig
    from xmodal.modalities import build_encoder, build_transform

    folder = str(peers.hf_clip_folder(tmp_path / "clip"))
    cfg = TowerConfig(kind="hf_clip", name=folder, context_length=32)
    encoder, _ = build_encoder("text", cfg)
    ids = torch.stack([build_transform("text", cfg, train=False)(t) for t in rows[1][:4]])
    grads, saved = [], []
    for on in (False, True):
        encoder.zero_grad()
        encoder.set_grad_checkpointing(on)
        count = [0]

        def pack(t):
            count[0] += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = encoder.train()(ids)
        out.square().sum().backward()
        saved.append(count[0])
        grads.append([p.grad.clone() for p in encoder.parameters()])
    assert saved[1] < saved[0] / 2  # activations are recomputed in backward, not kept from the forward
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
