"""Manifests (CSV / JSONL / Parquet / saved HF datasets) → validated ``datasets.Dataset`` → batches.

``read_manifest`` needs only ``datasets``; the torch side (``ManifestDataset``, ``collate``) loads on first use.
"""
from .manifest import Manifest, ManifestError, label_text, modality_columns, read_manifest

__all__ = ["read_manifest", "Manifest", "ManifestError", "label_text", "MODALITY_COLUMNS", "modality_columns", "ManifestDataset", "collate",
           "ManifestRowError"]


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
