"""Tasks on the shared space: a head (over one modality's embedding or a fusion of several), its targets, its loss.

A batch's tower outputs arrive as ``{modality: [n_present, D]}`` plus ``"<modality>:mask"`` (bool ``[B]``) for
modalities some rows lack; :func:`dense` turns them into ``[B, D]`` tensors and presence masks, which is what
fusion modules and heads take.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ..config import TaskConfig
from ..data.formats import label_text
from .fusion import LateFusion, build_fusion
from .heads import ClassificationHead, RegressionHead

def num_outputs(cfg: TaskConfig) -> int:
    return 1 if cfg.kind == "regression" else len(cfg.classes or [])


class TaskHead(nn.Module):
    """Fusion (when the task reads several modalities) followed by a classification or regression head; with
    ``fusion: late`` one head per modality, outputs averaged over the modalities each row has."""

    def __init__(self, cfg: TaskConfig, embed_dim: int, name: str | None = None):
        super().__init__()
        self.name = name  # only for messages
        if cfg.kind == "retrieval":
            raise ValueError("retrieval tasks use the contrastive loss on the shared space; they have no head")
        if cfg.kind != "regression" and not cfg.classes:
            raise ValueError(f"{cfg.kind} task needs its classes (resolved from the train split)")
        self.cfg = cfg

        def head(in_dim: int) -> nn.Module:
            if cfg.kind == "regression":
                return RegressionHead(in_dim, hidden=cfg.hidden, dropout=cfg.dropout,
                                      loss="mse" if cfg.loss == "default" else cfg.loss)
            return ClassificationHead(in_dim, len(cfg.classes), multi_label=cfg.kind == "multilabel",
                                      hidden=cfg.hidden, dropout=cfg.dropout)

        self.modalities = list(cfg.modalities)
        self.scale = math.sqrt(embed_dim)
        if cfg.fusion in ("late", "late_prob") and len(self.modalities) > 1:
            self.fusion, self.head = None, LateFusion({m: head(embed_dim) for m in self.modalities},
                                                      combine="prob_mean" if cfg.fusion == "late_prob" else "mean")
        elif len(self.modalities) == 1:
            self.fusion, self.head = None, head(embed_dim)
        else:
            # the head's dropout also regularises the attention layer (the other fusions have no dropout of their own)
            options = {"dropout": cfg.dropout} if cfg.fusion == "attention" else {}
            self.fusion = build_fusion(cfg.fusion, self.modalities, embed_dim, **options)
            self.head = head(self.fusion.out_dim)

    def forward(self, feats: dict[str, Tensor], present: dict[str, Tensor]) -> Tensor:
        # Shared-space vectors have unit norm, so each coordinate is ~1/sqrt(D): rescaled to unit variance, they
        # meet the heads' default initialisation as it assumes (otherwise logits start tiny and learn slowly).
        if not self.training:  # training rows were checked when read (task_data.usable_rows); spare the GPU a sync
            self._check_rows(feats, present)
        feats = {m: f * self.scale for m, f in feats.items()}
        if isinstance(self.head, LateFusion):
            return self.head(feats, present)
        if self.fusion is None:
            m = self.modalities[0]
            return self.head(feats[m])
        return self.head(self.fusion(feats, present))

    def _check_rows(self, feats: dict[str, Tensor], present: dict[str, Tensor]) -> None:
        """Every row must hold at least one of the head's modalities: a row without any would be predicted from the
        zeros :func:`dense` puts in absent slots, a made-up answer."""
        task = f"task {self.name!r}" if self.name else "this task head"
        reads = ", ".join(self.modalities)
        cols = []
        for m in self.modalities:
            if m not in feats:
                continue
            p = present.get(m) if present is not None else None
            cols.append(p.bool() if p is not None else torch.ones(len(feats[m]), dtype=torch.bool,
                                                                    device=feats[m].device))
        if not cols:
            raise ValueError(f"{task} reads {reads}, and no row of the batch has "
                             f"{'any of them' if len(self.modalities) > 1 else 'it'} (inputs: "
                             f"{', '.join(sorted(feats)) or 'none'})")
        empty = ~torch.stack(cols).any(0)
        if empty.any():
            rows = empty.nonzero().flatten().tolist()
            raise ValueError(f"{task} reads {reads}: row {rows[0]} of the batch has "
                             f"{'none of them' if len(self.modalities) > 1 else 'no ' + reads}"
                             + (f" (nor do {len(rows) - 1} more row(s))" if len(rows) > 1 else "")
                             + "; a row lacking every input of a head cannot be predicted")

    def _leaf_head(self) -> nn.Module:
        return next(iter(self.head.heads.values())) if isinstance(self.head, LateFusion) else self.head

    def loss(self, output: Tensor, target: Tensor) -> Tensor:
        return self._leaf_head().loss(output, target)

    def predict(self, output: Tensor, threshold: float | None = None) -> Tensor:
        """Class indices, multi-hot bool rows (sigmoid above ``threshold``, default the task's ``threshold``) or
        scores."""
        if self.cfg.kind == "multilabel":
            return self._leaf_head().predict(output, self.cfg.threshold if threshold is None else threshold)
        return self._leaf_head().predict(output)

    def probabilities(self, output: Tensor) -> Tensor:
        """``[N, classes]``: softmax over the classes (classification), each class's sigmoid (multilabel); columns
        in the order of the task's ``classes``. A regression head has none."""
        if self.cfg.kind == "multilabel":
            return output.sigmoid()
        if self.cfg.kind == "classification":
            return output.softmax(-1)
        raise ValueError(f"task {self.name!r} is {self.cfg.kind}: it has scores, not class probabilities "
                         f"(output='labels' or 'logits' gives them)")

    def labels(self, output: Tensor, threshold: float | None = None) -> list:
        """Per row: the class name (classification), the list of class names (multilabel; sigmoid above
        ``threshold``, default the task's), or the score (regression)."""
        pred = self.predict(output, threshold)
        if self.cfg.kind == "regression":
            return [float(s) for s in pred]
        classes = self.cfg.classes
        if self.cfg.kind == "multilabel":
            return [[c for c, on in zip(classes, row.tolist()) if on] for row in pred]
        return [classes[int(i)] for i in pred]


def targets(cfg: TaskConfig, values: Sequence[Any], where: str = "") -> Tensor:
    """Target column values of a batch → a tensor: class indices, multi-hot rows (``a|b``) or float scores."""
    if cfg.kind == "regression":
        try:
            return torch.tensor([float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}column '{cfg.target}': expected numbers for a regression task: {e}") from None
    index = {c: i for i, c in enumerate(cfg.classes)}
    if cfg.kind == "multilabel":
        out = torch.zeros(len(values), len(index))
        for row, v in enumerate(values):
            for name in label_names(v, multilabel=True):
                out[row, _class(index, name, cfg, where)] = 1.0
        return out
    return torch.tensor([_class(index, label_text(v), cfg, where) for v in values], dtype=torch.long)


def label_names(value: Any, multilabel: bool) -> list[str]:
    """The class names a target cell holds: one (a single-label cell), or for a multi-label cell each name of
    ``a|b`` or of a list ``["a", "b"]``; ``|`` or ``[]`` is a row with no label. Numbers as in
    :func:`~xmodal.data.manifest.label_text` (``1.0`` is class ``"1"``)."""
    if not multilabel:
        return [label_text(value)]
    return [n for n in (s.strip() for s in label_text(value).split("|")) if n]


def _class(index: dict[str, int], name: str, cfg: TaskConfig, where: str) -> int:
    try:
        return index[name]
    except KeyError:
        shown = ", ".join(list(index)[:10])
        raise ValueError(f"{where}column '{cfg.target}': label {name!r} is not one of the task's classes "
                         f"({shown}{', …' if len(index) > 10 else ''})") from None


def resolve_classes(cfg: TaskConfig, values: Sequence[Any]) -> list[str]:
    """The task's class names: as configured, else the sorted distinct labels of its train split."""
    if cfg.classes:
        return list(cfg.classes)
    names: set[str] = set()
    for v in values:
        if v is None or v == "":
            continue
        names.update(label_names(v, cfg.kind == "multilabel"))
    return sorted(n for n in names if n)
