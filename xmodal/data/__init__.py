"""Manifests (CSV / JSONL / Parquet / saved HF datasets) → validated rows (``Manifest.rows``; ``Manifest.dataset``:
the same as a ``datasets.Dataset``) → batches.

``read_manifest`` needs only pyarrow (and pandas for CSV; ``datasets`` for saved HF datasets and HF features); the
torch side (``ManifestDataset``, ``collate``) loads on first use.
"""
from .manifest import Manifest, ManifestError, label_text, modality_columns, read_manifest
from .table import Rows

__all__ = ["read_manifest", "Manifest", "Rows", "ManifestError", "label_text", "MODALITY_COLUMNS", "modality_columns",
           "ManifestDataset", "collate", "ManifestRowError"]


def __getattr__(name):
    if name == "MODALITY_COLUMNS":  # a live view: plugins may register modalities after import
        return modality_columns()
    if name == "collate":
        from ..batch import collate
        return collate
    if name in ("ManifestDataset", "ManifestRowError"):
        from . import loader
        return getattr(loader, name)
    raise AttributeError(f"module 'xmodal.data' has no attribute {name!r}")
