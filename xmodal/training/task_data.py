"""A task's rows, read and checked before any training step: the manifests of its splits, the rows it can use (a
head needs one of its modalities, a 2-modality contrastive task both), and its targets and classes. Every error names
the file, the row in the file, the id and the field; nothing is found mid-training."""
from __future__ import annotations

import copy
import logging
import math
from typing import Any, Iterator

import pyarrow.compute as pc

from ..config import Config, TaskConfig
from ..data import Manifest, ManifestError, read_manifest
from ..data.errors import name_options
from ..modalities import load_plugins
from ..tasks.head import label_names, resolve_classes

log = logging.getLogger("xmodal")

PRETRAIN_TASK = "contrastive"


def task_configs(cfg: Config, modalities: list[str]) -> dict[str, TaskConfig]:
    """The tasks to train: ``cfg.tasks``, or for pretraining one contrastive task over every tower on ``data``."""
    load_plugins(cfg.model.plugins)  # before any manifest is read: a plugin's modality names a column
    d = cfg.data
    if not cfg.tasks:
        return {PRETRAIN_TASK: TaskConfig(kind="retrieval", train=d.train, eval=d.eval, train_split=d.train_split,
                                          eval_split=d.eval_split, modalities=modalities, max_rows=d.max_rows)}
    out = {}
    for name, t in cfg.tasks.items():
        t = copy.deepcopy(t)
        t.train = t.train or d.train
        out[name] = t
    return out


_SHOWN_ROWS = 5  # bad (or left-out) rows listed in one message


def read_task_data(cfg: Config, name: str, t: TaskConfig) -> tuple[Any, Any]:
    """``(train dataset, eval dataset or None)`` of :func:`read_task_manifests`."""
    train, evaluate = read_task_manifests(cfg, name, t)
    return train.rows, evaluate.rows if evaluate is not None else None


def read_task_manifests(cfg: Config, name: str, t: TaskConfig) -> tuple[Manifest, Manifest | None]:
    """The task's train (and eval) rows, every one checked before training: the manifest checks, then the rows the
    task can use (see :func:`usable_rows`), then its targets. Resolves ``t.classes`` of a classification task."""
    d = cfg.data
    if t.train is None:
        raise ValueError(f"tasks.{name}.train (or data.train): a training manifest is required")
    # An empty cell means the row lacks that modality: it is read as None (a non-empty cell is still checked).
    # A 2-modality contrastive task, and every head, then leaves out the rows it cannot use (usable_rows); binding
    # 3+ modalities keeps every row (each takes part in the pairs it has).
    kw = dict(modalities=t.modalities, root=d.root, on_bad_row=d.on_bad_row, require_all=False,
              allow_outside_root=d.allow_outside_root)
    train = _read(t.train, split=t.train_split, max_rows=t.max_rows, **kw)
    if train.skipped:
        log.warning("%s: skipped %d bad rows of %s (on_bad_row=skip); first: %s", name, train.skipped,
                    train.source, train.problems[:1])
    evaluate = None
    if t.eval is not None or t.eval_split is not None:
        evaluate = _read(t.eval or t.train, split=t.eval_split, **kw)
    parts = [(train, t.train_split)] + ([(evaluate, t.eval_split)] if evaluate is not None else [])
    if t.kind != "retrieval" or len(t.modalities) == 2:
        parts = [(usable_rows(m, name, t, split), split) for m, split in parts]
    if t.kind != "retrieval":
        for m, _ in parts:
            check_targets(m, t, name)
        if t.kind in ("classification", "multilabel"):
            t.classes = resolve_classes(t, parts[0][0].rows[t.target])
            if len(t.classes) < 2:
                raise ManifestError(f"tasks.{name}: column '{t.target}' of the train split has fewer than 2 "
                                    f"classes ({t.classes})")
            _log_classes(name, t)
            for m, _ in parts:  # eval rows too: a label the head has no output for, found now, not after training
                check_classes(m, t, name)
    return parts[0][0], parts[1][0] if len(parts) > 1 else None


def usable_rows(m: Manifest, name: str, t: TaskConfig, split: str | None) -> Manifest:
    """The rows the task can use: for a 2-modality contrastive task, those holding both modalities (a pair); for a
    head, those holding at least one of its modalities. The others are left out with one warning; an error only when
    no row is left."""
    pair = t.kind == "retrieval"
    mods = t.modalities
    present = [pc.is_valid(m.rows.data.column(mod)).to_pylist() for mod in mods]
    test = all if pair else any
    keep = [i for i in range(len(m)) if test(p[i] for p in present)]
    if len(keep) == len(m):
        return m
    need = (f"both {mods[0]} and {mods[1]} (a contrastive pair)" if pair
            else f"{'any of ' if len(mods) > 1 else ''}the task's modalit{'ies' if len(mods) > 1 else 'y'} "
                 f"{', '.join(mods)}")
    rows = f" (split {split!r})" if split is not None else ""
    if not keep:
        raise ManifestError(f"{m.source}: task {name}: none of the {len(m)} rows{rows} has {need}; an empty cell "
                            f"means the row lacks that modality")
    left = sorted(set(range(len(m))) - set(keep))
    shown = ", ".join(m.where(i).removeprefix(f"{m.source}: ") for i in left[:_SHOWN_ROWS])
    log.warning("task %s: left out %d of %d rows%s of %s that do not have %s (an empty cell means the row lacks that "
                "modality): %s%s", name, len(left), len(m), rows, m.source, need, shown,
                ", ..." if len(left) > _SHOWN_ROWS else "")
    return m.take(keep)


def _log_classes(name: str, t: TaskConfig) -> None:
    """Say what the head will predict, so a stray spelling (``Computer`` beside ``computer``) or a score column
    read as classes is seen before training rather than in the results."""
    shown = ", ".join(t.classes[:12]) + (", …" if len(t.classes) > 12 else "")
    log.info("task %s: %d classes from column '%s': %s", name, len(t.classes), t.target, shown)
    numeric = sum(1 for c in t.classes if _is_number(c))
    if len(t.classes) > 20 and numeric == len(t.classes) and any("." in c for c in t.classes):
        log.warning("task %s: column '%s' has %d distinct numeric values, each made a class; if it is a score, "
                    "use kind: regression", name, t.target, len(t.classes))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read(path: str, **kw) -> Manifest:
    """``read_manifest`` for a config-driven run: its hints name the config key ``data.on_bad_row``, not the Python
    argument (``xmodal.cli.read_manifest_for`` does the same for the CLI's flags)."""
    try:
        return read_manifest(path, **kw)
    except ManifestError as e:
        raise ManifestError(name_options(str(e), kw["on_bad_row"], skip="data.on_bad_row=skip")) from None


def _raise_rows(problems: list[str], source: str) -> None:
    """One ManifestError for the bad rows found: the first in full, then how many more and the next few."""
    if not problems:
        return
    msg = problems[0]
    if len(problems) > 1:
        more = "\n  ".join(problems[1:1 + _SHOWN_ROWS])
        msg += (f"\n({len(problems) - 1} more bad row(s) in {source})\n  {more}"
                + ("\n  ..." if len(problems) > 1 + _SHOWN_ROWS else ""))
    raise ManifestError(msg)


def _bad_rows(m: Manifest, field_name: str, found: Iterator[tuple[int, str]]) -> list[str]:
    """Messages ``<file>: row N (id '...'): field '<field>': <what>`` for (row index, what) pairs; only the first
    few are formatted (the rest are counted)."""
    out = []
    for i, what in found:
        out.append(f"{m.where(i)}: field '{field_name}': {what}" if len(out) <= _SHOWN_ROWS else "")
    return out


_FLOAT32_MAX = 3.4028234663852886e38


def _target_problem(v: Any, kind: str) -> str | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return "empty target"
    if isinstance(v, (list, tuple)) and kind != "multilabel":
        return f"a list {v!r} is several labels; a {kind} task takes one (kind: multilabel takes a list)"
    if kind != "regression":
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return f"expected a number (a regression target), got {v!r}"
    if not math.isfinite(x):
        return f"expected a finite number (a regression target), got {v!r}"
    if abs(x) > _FLOAT32_MAX:
        return f"{v!r} is outside the float32 range the heads train in (|x| <= 3.4e38)"
    return None


def check_targets(m: Manifest, t: TaskConfig, name: str) -> None:
    """Every row's target is present, and numeric and finite for a regression task."""
    data = m.rows
    if t.target not in data.column_names:
        raise ManifestError(f"manifest {m.source} has no column '{t.target}' (task {name}'s target; columns: "
                            f"{', '.join(data.column_names)})")
    values = data[t.target]
    found = ((i, what) for i, v in enumerate(values) if (what := _target_problem(v, t.kind)) is not None)
    _raise_rows(_bad_rows(m, t.target, found), m.source)


def check_classes(m: Manifest, t: TaskConfig, name: str) -> None:
    """Every row's label (each ``|``-separated name of a multi-label row) is one of the task's classes."""
    known = set(t.classes)
    shown = ", ".join(t.classes[:10]) + (f", … ({len(t.classes)} classes)" if len(t.classes) > 10 else "")

    def problems():
        for i, v in enumerate(m.rows[t.target]):
            bad = next((n for n in label_names(v, t.kind == "multilabel") if n not in known), None)
            if bad is not None:
                yield i, f"label {bad!r} is not one of task {name}'s classes ({shown})"
    _raise_rows(_bad_rows(m, t.target, problems()), m.source)
