"""Manifests (CSV / JSONL / Parquet / saved HF datasets) → validated ``datasets.Dataset`` → batches.

``read_manifest`` needs only ``datasets``; the torch side (``ManifestDataset``, ``collate``) loads on first use.
"""
from .manifest import MODALITY_COLUMNS, Manifest, ManifestError, label_text, read_manifest

__all__ = ["read_manifest", "Manifest", "ManifestError", "label_text", "MODALITY_COLUMNS", "ManifestDataset", "collate",
           "ManifestRowError"]


def __getattr__(name):  # lazy: importing torch is not needed to read a manifest
    if name == "collate":
        from ..batch import collate
        return collate
    if name in ("ManifestDataset", "ManifestRowError"):
        from . import loader
        return getattr(loader, name)
    raise AttributeError(f"module 'xmodal.data' has no attribute {name!r}")
