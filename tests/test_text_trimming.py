"""open_clip text towers drop the columns that are padding in every row before the transformer runs.

The truth is open_clip's own ``TextTransformer.forward`` over all ``context_length`` positions, on the same weights:
the trimmed forward's outputs and every parameter's gradient must equal it (float64), wherever trimming is exact, and
the tower must run all positions wherever it is not (CLS token, ``last`` pooling, bi-directional attention over pads).
"""
import copy
import pickle

import pytest
import torch

from xmodal.config import TowerConfig
from xmodal.modalities import build_encoder, build_transform

torch.set_num_threads(2)

CAPTIONS = ["a cat", "clip art of a red house with a long chimney and two windows, keywords: house, red", "",
            "! ! ! !", "bird"]  # "!" is BPE id 0, the pad id: real tokens that equal the pad id must stay


def _ids(context_length=40):
    tok = build_transform("text", TowerConfig(kind="open_clip", name="xmodal-vit-tiny",
                                              context_length=context_length), train=False)
    return torch.stack([tok(c) for c in CAPTIONS])


def _pair(**kw):
    """(open_clip's TextTransformer, the same weights as xmodal's class), float64, non-trivial weights."""
    from open_clip.transformer import TextTransformer

    from xmodal.modalities.text import _trimming_class

    torch.manual_seed(0)
    ref = TextTransformer(context_length=40, vocab_size=49408, width=32, heads=2, layers=2, output_dim=16, **kw)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref = ref.double()
    ours = copy.deepcopy(ref)
    ours.__class__ = _trimming_class()
    return ref, ours


def _lengths_seen(model, ids):
    seen = []
    hook = model.transformer.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].shape[1]),
                                                       with_kwargs=True)
    try:
        out = model(ids)
    finally:
        hook.remove()
    return out, seen


def _assert_same_forward_and_grads(ref, ours, ids):
    a = ref(ids)
    b = ours(ids)
    torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-12)
    weights = torch.randn_like(a)
    (a * weights).sum().backward()
    (b * weights).sum().backward()
    for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-12, rtol=1e-12, msg=name)


def test_causal_argmax_is_trimmed_and_exact():
    ref, ours = _pair()
    ids = _ids()
    longest = int(max((row != 0).nonzero().max() for row in ids if (row != 0).any())) + 1
    _, seen = _lengths_seen(ours, ids)
    assert seen == [longest] and longest < ids.shape[1]
    _, seen = _lengths_seen(ref, ids)
    assert seen == [ids.shape[1]]
    _assert_same_forward_and_grads(ref, ours, ids)
    # the position embedding's rows past the longest caption get no gradient in either
    assert ref.positional_embedding.grad[longest:].abs().max() == 0


def test_padding_mask_first_pooling_is_trimmed_and_exact():
    ref, ours = _pair(no_causal_mask=True, use_pad_mask=True, pool_type="first")
    ids = _ids()
    _, seen = _lengths_seen(ours, ids)
    assert seen[0] < ids.shape[1]
    _assert_same_forward_and_grads(ref, ours, ids)


@pytest.mark.parametrize("kw", [{"pool_type": "last"}, {"embed_cls": True}, {"no_causal_mask": True},
                                {"output_tokens": True}])
def test_where_padding_reaches_the_output_all_positions_run(kw):
    ref, ours = _pair(**kw)
    ids = _ids()
    out, seen = _lengths_seen(ours, ids)
    assert seen == [ids.shape[1] + (1 if kw.get("embed_cls") else 0)]
    expected = ref(ids)
    for got, want in zip(out if isinstance(out, tuple) else (out,), expected if isinstance(out, tuple) else (expected,)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_trace_keeps_the_full_length():
    """A traced graph (ONNX export traces) must not freeze the trace input's length into the graph."""
    _, ours = _pair()
    ids = _ids()
    traced = torch.jit.trace(ours.eval(), ids[:1])  # one short caption: trimmed, it would trace 3 positions
    with torch.no_grad():
        torch.testing.assert_close(traced(ids), ours(ids), atol=1e-12, rtol=1e-12)


def test_built_tower_is_trimming_and_keeps_keys_and_pickles():
    from open_clip.model import _build_text_tower

    from xmodal.modalities.text import TrimmedTextTransformer

    cfg = TowerConfig(kind="open_clip", name="xmodal-vit-tiny", context_length=32, options={"text_cfg": {"layers": 2}})
    tower, _ = build_encoder("text", cfg)
    assert type(tower) is TrimmedTextTransformer
    plain = _build_text_tower(256, {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2})
    assert list(tower.state_dict()) == list(plain.state_dict())
    again = pickle.loads(pickle.dumps(tower))
    assert type(again) is TrimmedTextTransformer
    ids = _ids(32)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids), tower.eval()(ids), atol=0, rtol=0)
