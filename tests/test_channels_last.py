"""Channels-last layout in the conv towers' inference (eval mode; training stays NCHW) changes speed only: outputs equal
the NCHW tower's within float tolerance, and the weights stay NCHW (so state dicts and safetensors files are
unchanged)."""
import copy

import pytest
import torch

from xmodal.config import TowerConfig
from xmodal.modalities import build_encoder

torch.set_num_threads(2)

CASES = [("image", TowerConfig(kind="cnn", image_size=32, options={"channels": [8, 16, 24]}), (3, 32, 32)),
         ("image", TowerConfig(kind="efficientnet_lite0", image_size=64), (3, 64, 64)),
         ("audio", TowerConfig(kind="cnn", options={"sample_rate": 16000, "n_mels": 32, "max_seconds": 1.0,
                                                    "channels": [8, 16, 32]}), (32, 101))]


@pytest.mark.parametrize("modality,cfg,shape", CASES, ids=[f"{m}-{c.kind}" for m, c, _ in CASES])
def test_channels_last_inference_equals_nchw(modality, cfg, shape):
    fast, _ = build_encoder(modality, cfg)
    assert fast.channels_last
    slow = copy.deepcopy(fast)
    slow.channels_last = False
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    seen = []
    hook = conv.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    with torch.no_grad():
        torch.testing.assert_close(fast.eval()(x), slow.eval()(x), atol=1e-5, rtol=1e-5)
        fast.train()(x)
    hook.remove()
    assert seen == [True, False]  # a multi-channel conv ran channels-last in eval, NCHW in training
    for name, t in fast.state_dict().items():
        assert t.is_contiguous(), name
