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
            if value is None or value == "":
                item[modality] = None  # this row lacks the modality: collate masks it out
                continue
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
    """Stack tensor values along dim 0 (one tensor per key); every other value becomes a list.

    A key whose values are tensors for some rows and ``None`` for others (a modality missing from those rows) is
    stacked over the present rows only — no compute is spent on absent ones — and ``"<key>:mask"`` (bool ``[B]``)
    says which rows they are. A key that is ``None`` in every row is left out, with an all-False mask.
    """
    if not items:
        raise ValueError("collate got an empty batch")
    out: dict[str, Tensor | list] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        present = [v is not None for v in values]
        tensors = [v for v in values if v is not None]
        if tensors and all(isinstance(v, Tensor) for v in tensors):
            shapes = {tuple(v.shape) for v in tensors}
            if len(shapes) > 1:
                raise ValueError(f"collate: '{key}' values have different shapes {sorted(shapes)}; the "
                                 f"transform must return a fixed shape (resize/crop images, pad text)")
            out[key] = torch.stack(tensors, 0)
            if not all(present):
                out[f"{key}:mask"] = torch.tensor(present)
        elif not tensors:
            out[f"{key}:mask"] = torch.zeros(len(values), dtype=torch.bool)
        else:
            out[key] = values
    return out
