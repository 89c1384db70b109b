"""Built-in real corpora prepared into manifests (``xmodal prepare openclipart|fashion-mnist``)."""
from __future__ import annotations

__all__ = ["prepare_openclipart", "prepare_fashion_mnist"]


def __getattr__(name):
    if name == "prepare_openclipart":
        from .openclipart import prepare_openclipart
        return prepare_openclipart
    if name == "prepare_fashion_mnist":
        from .fashion_mnist import prepare_fashion_mnist
        return prepare_fashion_mnist
    raise AttributeError(f"module 'xmodal.data.corpora' has no attribute {name!r}")
