"""xmodal: multi-task cross-modal representation learning on one shared embedding space.

    import xmodal
    model = xmodal.load("runs/pretrain")
    img = model.encode("image", ["cat.png"])       # [1, embed_dim], L2-normalised float32
    txt = model.encode("text", ["a cat", "a dog"])
    scores = img @ txt.T
"""
__version__ = "0.1.0"

__all__ = ["load", "XModalModel", "Config", "load_config"]


def __getattr__(name):  # lazy: `import xmodal` stays cheap; torch/open_clip load on first use
    if name == "load":  # run folders, exported folders and hf-hub:ORG/NAME repos (xmodal.export.hub.load)
        from .export import hub
        return hub.load
    if name == "XModalModel":
        from . import model
        return model.XModalModel
    if name in ("Config", "load_config"):
        from . import config
        return getattr(config, name)
    raise AttributeError(f"module 'xmodal' has no attribute {name!r}")
