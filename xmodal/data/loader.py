"""Turn a validated manifest into batches: each tower's transform applied in DataLoader workers, then ``collate``.

    m = read_manifest("data/openclipart/manifest.csv", split="train")
    ds = ManifestDataset(m.dataset, {"image": image_tower.transform, "text": text_tower.transform})
    loader = DataLoader(ds, batch_size=64, shuffle=True, num_workers=2, collate_fn=collate)
    batch = next(iter(loader))   # {"image": float32 [64, 3, H, W], "text": int64 [64, L]}
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor


class ManifestRowError(RuntimeError):
    """A row failed at training time (e.g. its file changed or vanished after validation).

    The message names the dataset index, the row's id and the field; the original exception is chained.
    """


class ManifestDataset(torch.utils.data.Dataset):
    """Rows of a manifest's ``datasets.Dataset`` → ``{modality: transforms[modality](value), **extra_columns}``.

    ``transforms`` maps each modality column to its tower's picklable transform (raw value → Tensor);
    ``extra_columns`` (e.g. ``["id", "label"]``) are passed through as plain Python values.
    """

    def __init__(self, dataset, transforms: Mapping[str, Callable[[Any], Any]], extra_columns: Sequence[str] = ()):
        if not transforms:
            raise ValueError("ManifestDataset needs at least one modality transform")
        self.transforms = dict(transforms)
        self.extra_columns = [c for c in extra_columns if c not in self.transforms]
        columns = dataset.column_names
        missing = [c for c in [*self.transforms, *self.extra_columns] if c not in columns]
        if missing:
            raise KeyError(f"dataset has no column(s) {missing} (columns: {', '.join(columns)})")
        self._has_id = "id" in columns
        wanted = list(dict.fromkeys([*self.transforms, *self.extra_columns, *(["id"] if self._has_id else [])]))
        self.dataset = dataset.select_columns(wanted) if len(wanted) < len(columns) else dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            row = self.dataset[int(index)]
        except Exception as e:  # noqa: BLE001 - e.g. an embedded image that no longer decodes
            raise ManifestRowError(f"row {index}: cannot read the row from the dataset: "
                                   f"{type(e).__name__}: {e}") from e
        item: dict[str, Any] = {}
        for modality, transform in self.transforms.items():
            value = row[modality]
            if value is None:
                raise ManifestRowError(f"row {index}{self._id(row)}: field '{modality}': no value (this row lacks "
                                       f"the modality; rows with missing modalities cannot be batched yet)")
            try:
                item[modality] = transform(value)
            except Exception as e:  # noqa: BLE001 - name the row, keep the cause
                shown = value if isinstance(value, str) else type(value).__name__
                raise ManifestRowError(f"row {index}{self._id(row)}: field '{modality}': transform failed on "
                                       f"{shown!r:.200}: {type(e).__name__}: {e}") from e
        for c in self.extra_columns:
            item[c] = row[c]
        return item

    def _id(self, row: Mapping[str, Any]) -> str:
        return f" (id {row['id']!r})" if self._has_id else ""


def collate(items: list[dict[str, Any]]) -> dict[str, Tensor | list]:
    """Stack tensor values along dim 0 (one tensor per key); every other value becomes a list."""
    if not items:
        raise ValueError("collate got an empty batch")
    out: dict[str, Tensor | list] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if all(isinstance(v, Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise ValueError(f"collate: '{key}' values have different shapes {sorted(shapes)}; the "
                                 f"transform must return a fixed shape (resize/crop images, pad text)")
            out[key] = torch.stack(values, 0)
        else:
            out[key] = values
    return out
