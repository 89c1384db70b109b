"""Publishing a run: a hub-ready folder (``xmodal export --format hf``: the towers in their source library's own
format, xmodal's files, a model card), the upload (``xmodal push``), reading a hub repo back (``xmodal.load(
"hf-hub:ORG/NAME")``) and ONNX graphs for serving without torch (``--format onnx``). docs/pretrained.md."""
from __future__ import annotations

from .hub import export_hf, load, push

__all__ = ["export_hf", "load", "push", "export_onnx"]


def __getattr__(name):  # onnx is an optional extra: imported when asked for
    if name == "export_onnx":
        from .onnx import export_onnx
        return export_onnx
    raise AttributeError(f"module 'xmodal.export' has no attribute {name!r}")
