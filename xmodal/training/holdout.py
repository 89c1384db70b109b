"""The validation rows that model selection (``train.select_best``) scores each evaluated step on: the manifest's own
``data.val_split`` rows when training reads a named split and the manifest has that one too, else a seeded slice
held out of the training rows.

The slice is drawn by groups, not rows: rows that share any modality's value (one drawing with two captions, one
caption under two drawings) are one group, so no image or caption is both trained on and scored on — a held-out
score would otherwise reward memorising it.
"""
from __future__ import annotations

import logging
import random
from typing import Sequence

from ..config import Config, TaskConfig
from ..data import Manifest
from ..data.manifest import split_values
from .task_data import _read, usable_rows

log = logging.getLogger("xmodal")


def duplicate_groups(columns: Sequence[Sequence]) -> list[int]:
    """A group id per row: rows are joined when they hold the same non-empty value in any of ``columns`` (connected
    components of the row–value graph, by union-find). Group ids are the smallest row index of each group."""
    n = len(columns[0]) if columns else 0
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for values in columns:
        first: dict = {}
        for i, v in enumerate(values):
            if v in (None, ""):
                continue
            j = first.setdefault(v, i)
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [root(i) for i in range(n)]


def holdout_rows(columns: Sequence[Sequence], fraction: float, cap: int, seed: int) -> tuple[list[int], list[int]]:
    """``(train rows, held-out rows)``, both sorted: whole duplicate groups, shuffled by ``seed``, are held out until
    ``min(cap, round(fraction × rows))`` rows (at least one group) are; the rest train."""
    groups = duplicate_groups(columns)
    n = len(groups)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    order = sorted(members)
    random.Random(seed).shuffle(order)
    want = max(1, min(cap, round(fraction * n)))
    held: list[int] = []
    for g in order:
        if len(held) >= want:
            break
        held.extend(members[g])
    kept = set(held)
    return [i for i in range(n) if i not in kept], sorted(held)


def validation_rows(cfg: Config, name: str, t: TaskConfig, train: Manifest) -> tuple[Manifest, Manifest, dict]:
    """``(train rows, validation rows, what they are)`` for model selection. ``what``: ``{"source": "split" |
    "held_out", "rows": n, "train_rows": n, ...}``, recorded in the log, ``metrics.jsonl`` and the model card."""
    d = cfg.data
    path = t.eval or t.train
    if t.train_split is not None and t.train_split != d.val_split and d.val_split in split_values(path):
        kw = dict(modalities=t.modalities, root=d.root, on_bad_row=d.on_bad_row, require_all=False,
                  allow_outside_root=d.allow_outside_root)
        val = usable_rows(_read(path, split=d.val_split, **kw), name, t, d.val_split)
        what = {"source": "split", "split": d.val_split, "rows": len(val), "train_rows": len(train)}
        log.info("model selection: %d rows of split %r of %s; the model saved is the best step's by %s", len(val),
                 d.val_split, path, cfg.train.select_metric)
        return train, val, what
    columns = [train.rows[m] for m in t.modalities if m in train.rows.column_names]
    kept, held = holdout_rows(columns, d.holdout_fraction, d.holdout_max, cfg.seed)
    if not kept:
        raise ValueError(f"model selection (train.select_best): {train.source} has {len(train)} training rows in "
                         f"{len(set(duplicate_groups(columns)))} group(s) of shared values; holding out validation "
                         f"rows leaves none to train on: give a data.val_split split, or set train.select_best=false")
    what = {"source": "held_out", "rows": len(held), "train_rows": len(kept), "fraction": d.holdout_fraction,
            "max": d.holdout_max, "seed": cfg.seed}
    log.info("model selection: %s has no %r rows for this run, so %d of its %d training rows (%.0f%%, seed %d, rows "
             "sharing an image or text kept together) are held out for validation; %d train. The model saved is the "
             "best step's by %s", train.source, d.val_split, len(held), len(train), 100 * len(held) / len(train),
             cfg.seed, len(kept), cfg.train.select_metric)
    return train.take(kept), train.take(held), what
