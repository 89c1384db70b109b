"""Kept so ``from xmodal.engine import train`` (the documented entry point before 0.2) still works; the training
loop lives in :mod:`xmodal.training`."""
from .training.engine import train

__all__ = ["train"]
