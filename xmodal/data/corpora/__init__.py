"""Built-in real corpora prepared into manifests (``xmodal prepare openclipart|openmoji|fashion-mnist``; Rotten
Tomatoes sentiment snippets via :func:`prepare_rotten_tomatoes`; Amazon phone-review sentences via
:func:`prepare_amazon_cells`)."""
from __future__ import annotations

__all__ = ["prepare_openclipart", "prepare_openmoji", "prepare_fashion_mnist", "prepare_rotten_tomatoes",
           "prepare_amazon_cells", "prepare_librivox",
           "prepare_spoken_captions"]


def __getattr__(name):
    if name == "prepare_openclipart":
        from .openclipart import prepare_openclipart
        return prepare_openclipart
    if name == "prepare_openmoji":
        from .openmoji import prepare_openmoji
        return prepare_openmoji
    if name == "prepare_fashion_mnist":
        from .fashion_mnist import prepare_fashion_mnist
        return prepare_fashion_mnist
    if name == "prepare_librivox":
        from .speech import prepare_librivox
        return prepare_librivox
    if name == "prepare_spoken_captions":
        from .speech import prepare_spoken_captions
        return prepare_spoken_captions
    if name == "prepare_rotten_tomatoes":
        from .rotten_tomatoes import prepare_rotten_tomatoes
        return prepare_rotten_tomatoes
    if name == "prepare_amazon_cells":
        from .amazon_cells import prepare_amazon_cells
        return prepare_amazon_cells
    raise AttributeError(f"module 'xmodal.data.corpora' has no attribute {name!r}")
