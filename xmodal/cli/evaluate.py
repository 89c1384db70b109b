"""``xmodal evaluate``, ``xmodal predict`` and ``xmodal evaluate-index``: measure a run on a manifest (retrieval,
zero-shot, task heads), write a head's predictions, or measure a built index through its search path (the library is
:mod:`xmodal.evaluation`)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .common import (RUN_HELP, add_hubness_flags, add_manifest_flags, bank_rows, below_majority, print_results,
                     read_manifest_for)


def add_evaluate_verb(sub) -> None:
    s = sub.add_parser("evaluate", help="retrieval Recall@K (every modality pair) and zero-shot accuracy")
    s.add_argument("--run", required=True, help=RUN_HELP)
    s.add_argument("--manifest", required=True)
    s.add_argument("--split", default=None, help="keep rows whose `split` column equals this")
    s.add_argument("--max-rows", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--out", default=None, help="also write the results to this JSON file")
    s.add_argument("--task", default=None, help="only this task head (default: the shared space and every head)")
    s.add_argument("--plots", action="store_true",
                   help="also draw training curves, confusion matrices and a 2-D map of the shared space")
    s.add_argument("--plots-dir", default=None,
                   help="where the plots go (default RUN/plots for a run folder; ./plots for an export or hf-hub:)")
    s.add_argument("--hubness", choices=["none", "is", "csls"], default="none",
                   help="retrieval ranked with hubness reduction against a query bank of each query modality (is: "
                        "inverted softmax / querybank normalisation; csls); default none")
    add_hubness_flags(s)
    s.add_argument("--label-column", default=None,
                   help="zero-shot: the column holding the class names (default label)")
    s.add_argument("--templates", nargs="+", default=None, metavar="TEMPLATE",
                   help="zero-shot: prompt templates, each with one {} for the class name, e.g. 'a {} review.' "
                        "(default: generic photo/drawing templates)")
    s.add_argument("--zero-shot-modality", action="extend", nargs="+", default=None, metavar="MODALITY",
                   help="zero-shot: the modalities to classify (default: the run's non-text modalities the manifest "
                        "has values for, or text when it has no other)")
    add_manifest_flags(s)
    s.set_defaults(fn=run_evaluate)


def add_predict_verb(sub) -> None:
    s = sub.add_parser("predict", help="a task head's predictions for the rows of a manifest (JSON lines)")
    s.add_argument("--run", required=True, help=RUN_HELP)
    s.add_argument("--manifest", required=True)
    s.add_argument("--task", default=None, help="the head to use (default: the model's only head)")
    s.add_argument("--split", default=None)
    s.add_argument("--max-rows", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--out", default=None, help="write JSON lines here (default: stdout)")
    s.add_argument("--threshold", type=float, default=None,
                   help="multilabel: predict the classes whose probability exceeds this (default: the task's "
                        "threshold, 0.5 unless its config says otherwise)")
    add_manifest_flags(s)
    s.set_defaults(fn=run_predict)


def add_evaluate_index_verb(sub) -> None:
    s = sub.add_parser("evaluate-index", help="Recall@K and mAP of labelled queries through the index's search path")
    s.add_argument("--index", required=True, help="index folder written by `xmodal index`")
    s.add_argument("--manifest", required=True, help="labelled queries (the manifest the index was built from)")
    s.add_argument("--query-modality", default="text", help="manifest column holding the queries (default text)")
    s.add_argument("--split", default=None, help="keep rows whose `split` column equals this")
    s.add_argument("--relevance", choices=["pair", "label"], default="pair",
                   help="pair: the item on the query's own row is relevant (default); label: items with its label")
    s.add_argument("--depth", type=int, default=None, help="hits per query (default: all; exact mAP)")
    s.add_argument("--max-rows", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--run", default=None, help=RUN_HELP + " (default: the one recorded in the index)")
    add_manifest_flags(s)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(fn=run_evaluate_index)


def _present(values) -> int:
    return sum(1 for v in values if v is not None and not (isinstance(v, str) and not v.strip()))


def _nothing_to_evaluate(args, model, data) -> str:
    """Why ``xmodal evaluate`` found nothing to measure: what the manifest has against what the run needs."""
    from ..data import MODALITY_COLUMNS

    n = len(data)
    have, filled = [], []
    for m in MODALITY_COLUMNS:
        if m not in data.column_names:
            continue
        k = _present(data[m])
        have.append(f"{m} in {k} of {n} rows" if k else f"{m} empty in all {n} rows")
        if k:
            filled.append(m)
    where = str(args.manifest) + (f" (split {args.split!r})" if args.split else "")
    heads = ", ".join(model.heads) or "none"
    lines = [f"nothing to evaluate in {where}: the manifest has {'; '.join(have) or 'no modality column'}; the run "
             f"has towers {', '.join(model.towers)} and task heads {heads}."]
    if args.task is None:
        usable = [m for m in filled if m in model.towers]
        lines.append(f"Retrieval needs values in two of the run's modalities on the same rows (the manifest fills "
                     f"{', '.join(usable) or 'none of them'}).")
        if "text" in model.towers:
            label = args.label_column or "label"
            lines.append(f"Zero-shot needs a `{label}` column (--label-column) with at least two classes and values "
                         f"for {' or '.join(model.towers)}"
                         + ("" if label in data.column_names else f" (the manifest has no `{label}` column)") + ".")
    for name in model.heads:
        if args.task and name != args.task:
            continue
        task = model.tasks[name]
        lines.append(f"Task {name!r} needs a {task.target!r} column and values for "
                     f"{' or '.join(task.modalities)}.")
    if not model.heads:
        lines.append("(Task heads come from `xmodal finetune`.)")
    return " ".join(lines)


def _head_rows(manifest, name: str, task, split: str | None, every_head: bool):
    """``(rows, None)``: the manifest rows head ``name`` is evaluated on (those with one of its inputs), every target
    checked as finetune checks it (an error names the file, row, id and field); or ``(None, why)`` when the manifest
    is not this head's data: it lacks the target column or every input, or — when evaluating ``every_head`` — its
    target column holds none of the head's classes (another task's ``label``). Asked for by name (``--task``), a
    head is never skipped for its classes: the error names the first bad row."""
    from ..training.task_data import check_classes, check_targets, usable_rows

    data = manifest.rows
    if task.target not in data.column_names:
        return None, f"the manifest has no {task.target!r} column (its target)"
    if not any(m in data.column_names and _present(data[m]) for m in task.modalities):
        inputs = f"input{'s' if len(task.modalities) > 1 else ''} {', '.join(task.modalities)}"
        if any(m in data.column_names for m in task.modalities):
            return None, f"its {inputs}: empty in every row"
        return None, f"the manifest has no column for its {inputs}"
    rows = usable_rows(manifest, name, task, split)
    if every_head and task.kind != "regression":
        foreign = _foreign_label(rows.rows[task.target], task)
        if foreign is not None:
            shown = ", ".join(task.classes[:10]) + (", …" if len(task.classes) > 10 else "")
            return None, f"column {task.target!r} holds none of its classes (e.g. {foreign!r}; classes: {shown})"
    check_targets(rows, task, name)
    if task.kind != "regression":
        check_classes(rows, task, name)
    return rows, None


def _foreign_label(values, task) -> str | None:
    """An example label when no value of the target column names one of the task's classes, else ``None``."""
    from ..tasks.head import label_names

    known, example = set(task.classes), None
    for v in values:
        if v is None or not str(v).strip():  # empty: check_targets' "empty target", not a foreign label
            continue
        names = label_names(v, task.kind == "multilabel")
        if not names:
            continue
        if any(n in known for n in names):
            return None
        example = example or names[0]
    return example


def _zero_shot_options(args, model, data) -> dict:
    """``evaluate``'s zero-shot arguments from ``--label-column``, ``--templates`` and ``--zero-shot-modality``,
    checked against the run and the manifest (an explicit flag that cannot apply is an error, not a silent no-op)."""
    from ..evaluation.evaluate import PROMPT_TEMPLATES, default_zero_shot_modalities

    cols = ", ".join(data.column_names)
    if args.label_column is not None and args.label_column not in data.column_names:
        raise ValueError(f"--label-column {args.label_column}: {args.manifest} has no such column (columns: {cols})")
    for m in args.zero_shot_modality or ():
        if "text" not in model.towers:
            raise ValueError(f"--zero-shot-modality {m}: zero-shot needs the run's text tower (for the prompts); "
                             f"the run has {', '.join(model.towers)}")
        if m not in model.towers:
            raise ValueError(f"--zero-shot-modality {m}: the run has no {m} tower (towers: "
                             f"{', '.join(model.towers)})")
        if m not in data.column_names:
            raise ValueError(f"--zero-shot-modality {m}: {args.manifest} has no {m!r} column (columns: {cols})")
    modalities = args.zero_shot_modality
    if modalities is None and model.heads and args.label_column is None and args.templates is None:
        # A fine-tuned run's labelled text is its heads' data: classifying that text by generic photo prompts as
        # well would be noise in the table. Text zero-shot there is asked for (--label-column / --templates).
        modalities = [m for m in default_zero_shot_modalities(model, data) if m != "text"]
    return {"label_column": args.label_column or "label", "templates": args.templates or PROMPT_TEMPLATES,
            "zero_shot_modalities": modalities}


def run_evaluate(args) -> int:
    from ..evaluation.evaluate import check_templates, evaluate, evaluate_task
    from ..model import load

    model = load(args.run)
    if args.task is not None and args.task not in model.heads:
        raise ValueError(f"--task {args.task}: no such head (heads: {', '.join(model.heads) or 'none'})")
    if args.templates is not None:
        try:
            check_templates(args.templates)
        except ValueError as e:
            raise ValueError(f"--templates: {e}") from None
    manifest = read_manifest_for(args, split=args.split, modalities=None, max_rows=args.max_rows, require_all=False)
    data = manifest.rows
    results, embedded = {}, {}  # embedded: each modality's values and embeddings, reused by the plots
    if args.task is None:  # the shared space itself: retrieval between its modalities, zero-shot on labels
        hub = {}
        if args.hubness != "none":
            from ..evaluation.evaluate import query_banks
            from ..retrieval.hubness import Hubness
            hub = {"hubness": Hubness(args.hubness),
                   "banks": query_banks(model, bank_rows(args, list(model.towers)), batch_size=args.batch_size)}
        results.update(evaluate(model, data, batch_size=args.batch_size, progress=not args.json, embedded=embedded,
                                **_zero_shot_options(args, model, data), **hub))
    evaluated = {}  # head → the rows it was evaluated on (for its plots)
    for name in [args.task] if args.task else list(model.heads):
        rows, why = _head_rows(manifest, name, model.tasks[name], args.split, every_head=args.task is None)
        if rows is None:  # named by --task: _nothing_to_evaluate below says what it needs
            if args.task is None:
                print(f"xmodal evaluate: task {name} skipped: {why}", file=sys.stderr)
            continue
        res = evaluate_task(model, name, rows.rows, batch_size=args.batch_size, progress=not args.json)
        results.update({f"{name}/{k}": v for k, v in res.items()})
        evaluated[name] = rows.rows
    if not results:
        raise ValueError(_nothing_to_evaluate(args, model, data))
    # The metrics first: a figure that fails to draw must not cost the numbers.
    print_results(results, args.json)
    for line in below_majority(results):
        print(f"xmodal evaluate: {line}", file=sys.stderr)
    sys.stdout.flush()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2), encoding="utf-8")
    if args.plots:
        from ..evaluation.plots import write_plots
        try:
            written = write_plots(args.run, model, data, Path(args.plots_dir or _plots_dir(args)), results,
                                  embedded=embedded, tasks=evaluated, shared_space=args.task is None)
        except Exception as e:  # any plotting fault (matplotlib's own too): one line, the metrics above stand
            if os.environ.get("XMODAL_DEBUG"):
                raise
            print(f"xmodal evaluate: error: --plots: {type(e).__name__}: {e} (the metrics above are complete)",
                  file=sys.stderr)
            return 2
        print("plots: " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def run_predict(args) -> int:
    from ..evaluation.evaluate import predict_outputs
    from ..model import load

    model = load(args.run)
    if not model.heads:
        raise ValueError(f"{args.run} has no task heads: it is a pretrained shared space. Train heads on it with "
                         f"`xmodal finetune` (init_from: {args.run}), or search it with `xmodal index` / "
                         f"`xmodal query`")
    task = args.task or (next(iter(model.heads)) if len(model.heads) == 1 else None)
    if task is None:
        raise ValueError(f"--task is required: this model has heads {', '.join(model.heads)}")
    if task not in model.heads:
        raise ValueError(f"--task {task}: no such head (heads: {', '.join(model.heads)})")
    from ..training.task_data import usable_rows

    head = model.heads[task]
    manifest = read_manifest_for(args, split=args.split, modalities=[m for m in head.modalities], require_all=False,
                                 max_rows=args.max_rows)
    data = usable_rows(manifest, task, model.tasks[task], args.split).rows  # rows with none of its inputs: left out
    outputs = predict_outputs(model, task, data, batch_size=args.batch_size, progress=True)
    cfg = model.tasks[task]
    if args.threshold is not None and (cfg.kind != "multilabel" or not 0 < args.threshold < 1):
        raise ValueError(f"--threshold {args.threshold}: " + ("must be in (0, 1)" if cfg.kind == "multilabel" else
                         f"applies to a multilabel head; {task} is {cfg.kind}"))
    pred = head.predict(outputs, args.threshold)
    ids = data["id"] if "id" in data.column_names else list(range(len(data)))
    truth = data[cfg.target] if cfg.target in data.column_names else None  # the manifest's answer, to compare with
    lines = []
    for i, row_id in enumerate(ids):
        rec: dict = {"id": row_id}
        if cfg.kind == "regression":
            rec["score"] = float(pred[i])
        elif cfg.kind == "multilabel":
            rec["labels"] = [c for c, on in zip(cfg.classes, pred[i].tolist()) if on]
            rec["probabilities"] = dict(zip(cfg.classes, outputs[i].sigmoid().tolist()))
        else:
            rec["label"] = cfg.classes[int(pred[i])]
            rec["probabilities"] = dict(zip(cfg.classes, outputs[i].softmax(-1).tolist()))
        if truth is not None and truth[i] not in (None, ""):
            rec[_TRUE_KEY[cfg.kind]] = _true_value(cfg.kind, truth[i])
        lines.append(json.dumps(rec))
    text = "\n".join(lines) + "\n"
    if args.out:
        from ..atomic import write_text
        write_text(args.out, text)  # via .NAME.tmp: an interrupted run never leaves half a predictions file
        print(f"{len(lines)} predictions → {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


# ``xmodal predict``'s JSON key for the manifest's own target, beside the prediction's key (label, labels, score).
_TRUE_KEY = {"classification": "true_label", "multilabel": "true_labels", "regression": "true_score"}


def _true_value(kind: str, value):
    """A manifest target cell as ``predict`` writes it: a class name, a list of class names (``a|b`` or a list
    cell), or a number (left as written when it is not one: the row is still predicted)."""
    if kind == "multilabel":
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [
            v for v in str(value).split("|") if v]
    if kind == "regression":
        try:
            return float(value)
        except (TypeError, ValueError):
            return value
    return str(value)


def run_evaluate_index(args) -> int:
    from ..evaluation.index_eval import evaluate_index_manifest
    from ..retrieval.retriever import Retriever

    retriever = Retriever(args.index, model=args.run)
    # Read here rather than by evaluate_index_manifest: its errors then name the flags (--root, --on-bad-row, ...).
    manifest = read_manifest_for(args, split=args.split, modalities=None, max_rows=args.max_rows, require_all=False)
    results = evaluate_index_manifest(retriever, manifest, args.query_modality, relevance=args.relevance,
                                      depth=args.depth, batch_size=args.batch_size)
    print_results(results, args.json)
    return 0


def _plots_dir(args) -> Path:
    """RUN/plots for a run folder; ./plots for an export or a hub repo (nothing is written into a folder meant for
    publishing, or into the Hugging Face cache)."""
    return Path(args.run) / "plots" if Path(args.run) == Path(args.run_given) else Path("plots")
