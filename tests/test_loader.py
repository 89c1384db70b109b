"""ManifestDataset + collate: transforms applied per modality, stacked batches, DataLoader workers, row errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from xmodal.data import ManifestDataset, ManifestRowError, collate, read_manifest


class ToTensor:
    """Picklable image transform: path or PIL image → float32 [3, 8, 8]."""

    def __call__(self, value):
        im = value if isinstance(value, Image.Image) else Image.open(value)
        arr = np.asarray(im.convert("RGB").resize((8, 8)), dtype=np.float32) / 255.0
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class CharIds:
    """Picklable text transform: first 6 character codes, 0-padded → int64 [6]."""

    def __call__(self, text: str):
        ids = [ord(c) for c in text[:6]]
        return torch.tensor(ids + [0] * (6 - len(ids)), dtype=torch.int64)


@pytest.fixture
def manifest(tmp_path: Path):
    rng = np.random.default_rng(0)
    lines = ["id,image,text,label"]
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"r{i:02d},{i}.png,caption {i},{'cat' if i % 2 else 'dog'}")
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return read_manifest(tmp_path / "m.csv"), tmp_path


def test_items_and_collate(manifest):
    m, _ = manifest
    ds = ManifestDataset(m.dataset, {"image": ToTensor(), "text": CharIds()}, extra_columns=["id", "label"])
    assert len(ds) == 10
    item = ds[3]
    assert set(item) == {"image", "text", "id", "label"}
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    assert item["text"].tolist() == [ord(c) for c in "captio"]
    assert item["id"] == "r03" and item["label"] == "cat"
    batch = collate([ds[i] for i in range(4)])
    assert batch["image"].shape == (4, 3, 8, 8) and batch["text"].shape == (4, 6)
    assert batch["id"] == ["r00", "r01", "r02", "r03"] and batch["label"] == ["dog", "cat", "dog", "cat"]
    # only the requested modality is transformed
    only_text = ManifestDataset(m.dataset, {"text": CharIds()})
    assert set(only_text[0]) == {"text"}
    with pytest.raises(KeyError, match="no column"):
        ManifestDataset(m.dataset, {"audio": CharIds()})


def test_collate_rejects_ragged_tensors():
    with pytest.raises(ValueError, match="'x' values have different shapes"):
        collate([{"x": torch.zeros(3)}, {"x": torch.zeros(4)}])


def test_dataloader_with_two_workers(manifest):
    m, _ = manifest
    ds = ManifestDataset(m.dataset, {"image": ToTensor(), "text": CharIds()}, extra_columns=["id"])
    loader = DataLoader(ds, batch_size=4, shuffle=False, num_workers=2, collate_fn=collate)
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [4, 4, 2]
    assert sum((b["id"] for b in batches), []) == [f"r{i:02d}" for i in range(10)]
    ref = ToTensor()(m.dataset[5]["image"])
    assert torch.equal(batches[1]["image"][1], ref)


def test_file_deleted_after_validation_names_row_id_field(manifest):
    m, folder = manifest
    ds = ManifestDataset(m.dataset, {"image": ToTensor(), "text": CharIds()})
    (folder / "7.png").unlink()
    with pytest.raises(ManifestRowError) as exc:
        ds[7]
    msg = str(exc.value)
    assert msg.startswith("row 7 (id 'r07'): field 'image': transform failed on ") and "7.png" in msg
    assert "FileNotFoundError" in msg and isinstance(exc.value.__cause__, FileNotFoundError)
    # the same error surfaces (message intact) through DataLoader workers
    loader = DataLoader(ds, batch_size=5, num_workers=2, collate_fn=collate)
    with pytest.raises(ManifestRowError, match=r"row 7 \(id 'r07'\): field 'image'"):
        list(loader)
