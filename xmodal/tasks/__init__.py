"""Task heads on the shared space: what a task predicts from the embeddings, and how it is scored.

* :mod:`.head`: ``TaskHead`` (fusion of the task's modalities + a classification/regression head), targets and
  class names read from manifest cells;
* :mod:`.heads`: the heads themselves (classification, multi-label, regression, retrieval);
* :mod:`.fusion`: feature-level and late fusion over a dict of modality embeddings with presence masks.
"""
from .head import TaskHead, label_names, num_outputs, resolve_classes, targets

__all__ = ["TaskHead", "targets", "label_names", "resolve_classes", "num_outputs"]
