"""``xmodal VERB`` (and ``python train.py VERB``): prepare, pretrain, evaluate, index, query.

Each verb is a small function; heavy imports (torch, open_clip) happen inside them so ``xmodal --help`` is instant.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Offline unless the user says otherwise: no hub look-ups, wandb writes locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning. On a machine where another process holds a core, spinning made a
# 2-thread training step ~14x slower (benchmarks/omp_wait.py, docs/benchmarks.md); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _train(args) -> int:
    from ..config import ConfigError, load_config
    from ..training.engine import train

    cfg = load_config(args.config, args.overrides)
    if args.verb == "finetune" and not cfg.tasks:
        raise ConfigError(f"{args.config}: finetune needs a `tasks:` section (pretraining is `xmodal pretrain`)")
    if args.verb == "pretrain" and cfg.tasks:
        raise ConfigError(f"{args.config}: has `tasks:`; run it with `xmodal finetune`")
    run = train(cfg, resume=args.resume)
    print(f"run folder: {run}")
    return 0


def read_manifest_for(args, **kw):
    """``read_manifest(args.manifest, ...)`` with the command's ``--root`` / ``--on-bad-row`` /
    ``--allow-outside-root``; its errors name those flags (the library's messages name the Python arguments)."""
    from ..data import ManifestError, read_manifest
    from ..data.manifest import name_options

    root = getattr(args, "root", None)
    try:
        return read_manifest(args.manifest, root=root, on_bad_row=args.on_bad_row,
                             allow_outside_root=args.allow_outside_root, **kw)
    except ManifestError as e:
        message = name_options(str(e), args.on_bad_row, skip="--on-bad-row skip", allow="--allow-outside-root")
        first, nl, rest = message.partition("\n")
        if root is None and "file not found" in first:  # a manifest that trained with data.root: say how to give it
            first += " (relative paths are read from the manifest's folder; --root DIR reads them from DIR)"
        raise ManifestError(first + nl + rest) from None


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

    data = manifest.dataset
    if task.target not in data.column_names:
        return None, f"the manifest has no {task.target!r} column (its target)"
    if not any(m in data.column_names and _present(data[m]) for m in task.modalities):
        inputs = f"input{'s' if len(task.modalities) > 1 else ''} {', '.join(task.modalities)}"
        if any(m in data.column_names for m in task.modalities):
            return None, f"its {inputs}: empty in every row"
        return None, f"the manifest has no column for its {inputs}"
    rows = usable_rows(manifest, name, task, split)
    if every_head and task.kind != "regression":
        foreign = _foreign_label(rows.dataset[task.target], task)
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


def _evaluate(args) -> int:
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
    data = manifest.dataset
    results, embedded = {}, {}  # embedded: each modality's values and embeddings, reused by the plots
    if args.task is None:  # the shared space itself: retrieval between its modalities, zero-shot on labels
        results.update(evaluate(model, data, batch_size=args.batch_size, progress=not args.json, embedded=embedded,
                                **_zero_shot_options(args, model, data)))
    evaluated = {}  # head → the rows it was evaluated on (for its plots)
    for name in [args.task] if args.task else list(model.heads):
        rows, why = _head_rows(manifest, name, model.tasks[name], args.split, every_head=args.task is None)
        if rows is None:  # named by --task: _nothing_to_evaluate below says what it needs
            if args.task is None:
                print(f"xmodal evaluate: task {name} skipped: {why}", file=sys.stderr)
            continue
        res = evaluate_task(model, name, rows.dataset, batch_size=args.batch_size, progress=not args.json)
        results.update({f"{name}/{k}": v for k, v in res.items()})
        evaluated[name] = rows.dataset
    if not results:
        raise ValueError(_nothing_to_evaluate(args, model, data))
    # The metrics first: a figure that fails to draw must not cost the numbers.
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results))
    sys.stdout.flush()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2), encoding="utf-8")
    if args.plots:
        from ..evaluation.plots import write_plots
        try:
            written = write_plots(args.run, model, data, Path(args.plots_dir or Path(args.run) / "plots"), results,
                                  embedded=embedded, tasks=evaluated, shared_space=args.task is None)
        except Exception as e:  # any plotting fault (matplotlib's own too): one line, the metrics above stand
            if os.environ.get("XMODAL_DEBUG"):
                raise
            print(f"xmodal evaluate: error: --plots: {type(e).__name__}: {e} (the metrics above are complete)",
                  file=sys.stderr)
            return 2
        print("plots: " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def _predict(args) -> int:
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
    data = usable_rows(manifest, task, model.tasks[task], args.split).dataset  # rows with none of its inputs: left out
    outputs = predict_outputs(model, task, data, batch_size=args.batch_size, progress=True)
    cfg = model.tasks[task]
    if args.threshold is not None and (cfg.kind != "multilabel" or not 0 < args.threshold < 1):
        raise ValueError(f"--threshold {args.threshold}: " + ("must be in (0, 1)" if cfg.kind == "multilabel" else
                         f"applies to a multilabel head; {task} is {cfg.kind}"))
    pred = head.predict(outputs, args.threshold)
    ids = data["id"] if "id" in data.column_names else list(range(len(data)))
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
        lines.append(json.dumps(rec))
    text = "\n".join(lines) + "\n"
    if args.out:
        from ..atomic import write_text
        write_text(args.out, text)  # via .NAME.tmp: an interrupted run never leaves half a predictions file
        print(f"{len(lines)} predictions → {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def format_table(results: dict[str, float]) -> str:
    """Group ``"a->b/metric"`` keys into one row per direction; every column as wide as its widest cell."""
    if not results:
        return "(no results)"
    rows: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        task, _, metric = key.rpartition("/")
        rows.setdefault(task or "-", {})[metric] = value
    metrics = list(dict.fromkeys(m for r in rows.values() for m in r))

    def cell(r: dict, m: str) -> str:
        if m not in r:
            return ""
        # Counts (``n``, ``n_items``, ...) are whole numbers; a score keeps its decimals even at 1.0 or 0.0.
        return f"{r[m]:.0f}" if m == "n" or m.startswith("n_") else f"{r[m]:.4f}"

    cells = {task: [cell(r, m) for m in metrics] for task, r in rows.items()}
    first = max(len(task) for task in rows)
    widths = [max(len(m), *(len(c[j]) for c in cells.values())) for j, m in enumerate(metrics)]
    lines = ["".ljust(first) + "".join("  " + m.rjust(w) for m, w in zip(metrics, widths))]
    for task, c in cells.items():
        lines.append((task.ljust(first) + "".join("  " + v.rjust(w) for v, w in zip(c, widths))).rstrip())
    return "\n".join(lines)


def _prepare(args) -> int:
    from ..data import corpora
    from ..data.corpora import speech
    prepare = {"openclipart": lambda out: corpora.prepare_openclipart(out, limit=args.limit),
               "fashion-mnist": lambda out: corpora.prepare_fashion_mnist(out, max_per_split=args.limit),
               "rotten-tomatoes": lambda out: corpora.prepare_rotten_tomatoes(out),
               "librivox": lambda out: corpora.prepare_librivox(out),
               "spoken-captions": lambda out: corpora.prepare_spoken_captions(
                   args.manifest or "data/openclipart/manifest.csv", out,
                   limit=args.limit or speech.BUNDLED_LIMIT)}[args.corpus]
    path = prepare(args.out or f"data/{args.corpus}")
    print(f"manifest: {path}")
    return 0


def _index(args) -> int:
    from ..model import load
    from ..retrieval import RetrievalError, build_index

    if args.batch_size < 1:
        raise RetrievalError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = load(args.run)
    if args.modality not in model.towers:
        raise RetrievalError(f"the model in {args.run} has no {args.modality!r} tower "
                             f"(towers: {', '.join(model.towers)})")
    manifest = read_manifest_for(args, split=args.split, modalities=[args.modality], require_all=False)
    opts = {"M": args.hnsw_m, "ef_search": args.ef_search, "nlist": args.nlist, "nprobe": args.nprobe}
    index = build_index(model, manifest, args.modality, args.out, kind=args.kind, batch_size=args.batch_size,
                        run_dir=args.run, append=args.append, overwrite=args.overwrite, **opts)
    print(f"index: {args.out} ({len(index)} {args.modality} rows, {index.kind}, dim {index.dim})")
    return 0


def _query(args) -> int:
    from ..retrieval import RetrievalError, Retriever, format_hits, parse_filters

    if args.k < 1:
        raise RetrievalError(f"-k must be at least 1, got {args.k}")
    modality, value = next((m, v) for m, v in (("text", args.text), ("image", args.image), ("audio", args.audio))
                           if v is not None)
    retriever = Retriever(args.index, model=args.run)
    hits = retriever.search(value, modality, k=args.k, filter=parse_filters(args.filter))
    if args.json:
        print(json.dumps({"index": str(retriever.index_dir), "query": {"modality": modality, "value": value},
                          "hits": [{"rank": r, **h.to_dict()} for r, h in enumerate(hits, 1)]}, indent=2))
    else:
        print(format_hits(hits))
    return 0


def _serve(args) -> int:
    from ..retrieval import RetrievalError
    from ..retrieval.service import serve

    if not 0 <= args.port <= 65535:
        raise RetrievalError(f"--port must be in 0..65535, got {args.port}")
    for flag, value in (("--max-concurrency", args.max_concurrency), ("--timeout", args.timeout),
                        ("--max-upload-mb", args.max_upload_mb)):
        if not value > 0:
            raise RetrievalError(f"{flag} must be positive, got {value}")
    serve(args.index, args.host, args.port, model=args.run, max_concurrency=args.max_concurrency,
          search_timeout=args.timeout, max_body_bytes=max(1, int(args.max_upload_mb * 1024 * 1024)))
    return 0


def _evaluate_index(args) -> int:
    from ..evaluation.index_eval import run
    return run(args)


def add_root(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--root", default=None, metavar="DIR",
                   help="the folder the manifest's relative image/audio paths are read from (default: the "
                        "manifest's folder), as data.root in a config")
    return p


def add_allow_outside_root(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--allow-outside-root", action="store_true",
                   help="accept image/audio paths outside the data root (--root, default the manifest's folder): "
                        "'..', absolute paths, symlinks; only for a manifest you trust")
    return p


def add_on_bad_row(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--on-bad-row", choices=["error", "skip"], default="error",
                   help="a manifest row with a missing file or empty id, ...: error (default) stops with its row "
                        "and field; skip drops it with a warning")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xmodal", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)

    for verb, text in (("pretrain", "contrastive pretraining of the shared space"),
                       ("finetune", "train task heads (one or many tasks) on a pretrained shared space")):
        s = sub.add_parser(verb, help=text)
        s.add_argument("--config", required=True, help="YAML config (see configs/)")
        s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
        s.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config fields by dotted path")
        s.set_defaults(fn=_train)

    s = sub.add_parser("evaluate", help="retrieval Recall@K (every modality pair) and zero-shot accuracy")
    s.add_argument("--run", required=True, help="run folder (holds model.safetensors + model.json)")
    s.add_argument("--manifest", required=True)
    s.add_argument("--split", default=None, help="keep rows whose `split` column equals this")
    s.add_argument("--max-rows", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--out", default=None, help="also write the results to this JSON file")
    s.add_argument("--task", default=None, help="only this task head (default: the shared space and every head)")
    s.add_argument("--plots", action="store_true",
                   help="also draw training curves, confusion matrices and a 2-D map of the shared space")
    s.add_argument("--plots-dir", default=None, help="where the plots go (default RUN/plots)")
    s.add_argument("--label-column", default=None,
                   help="zero-shot: the column holding the class names (default label)")
    s.add_argument("--templates", nargs="+", default=None, metavar="TEMPLATE",
                   help="zero-shot: prompt templates, each with one {} for the class name, e.g. 'a {} review.' "
                        "(default: generic photo/drawing templates)")
    s.add_argument("--zero-shot-modality", action="extend", nargs="+", default=None, metavar="MODALITY",
                   help="zero-shot: the modalities to classify (default: the run's non-text modalities the manifest "
                        "has values for, or text when it has no other)")
    add_root(s)
    add_allow_outside_root(s)
    add_on_bad_row(s)
    s.set_defaults(fn=_evaluate)

    s = sub.add_parser("predict", help="a task head's predictions for the rows of a manifest (JSON lines)")
    s.add_argument("--run", required=True)
    s.add_argument("--manifest", required=True)
    s.add_argument("--task", default=None, help="the head to use (default: the model's only head)")
    s.add_argument("--split", default=None)
    s.add_argument("--max-rows", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--out", default=None, help="write JSON lines here (default: stdout)")
    s.add_argument("--threshold", type=float, default=None,
                   help="multilabel: predict the classes whose probability exceeds this (default: the task's "
                        "threshold, 0.5 unless its config says otherwise)")
    add_root(s)
    add_allow_outside_root(s)
    add_on_bad_row(s)
    s.set_defaults(fn=_predict)

    s = sub.add_parser("prepare", help="build a bundled real corpus into a manifest")
    s.add_argument("corpus", choices=["openclipart", "fashion-mnist", "rotten-tomatoes", "librivox",
                                      "spoken-captions"])
    s.add_argument("--manifest", default=None,
                   help="spoken-captions: the image–text manifest to speak (default data/openclipart/manifest.csv)")
    s.add_argument("--out", default=None, help="output folder (default data/<corpus>)")
    s.add_argument("--limit", type=int, default=None,
                   help="openclipart: max SVGs; fashion-mnist: max rows per split; spoken-captions: max rows (2000)")
    s.set_defaults(fn=_prepare)

    s = sub.add_parser("index", help="embed one modality of a manifest into a searchable index")
    s.add_argument("--run", required=True, help="run folder (holds model.safetensors + model.json)")
    s.add_argument("--manifest", required=True)
    s.add_argument("--out", required=True, help="index folder to write (index.faiss, metadata.jsonl, index.json)")
    s.add_argument("--modality", default="image", help="manifest column to embed (default image)")
    s.add_argument("--split", default=None, help="keep rows whose `split` column equals this")
    s.add_argument("--kind", choices=["flat", "hnsw", "ivf"], default=None,
                   help="flat = exact (default); hnsw / ivf = approximate, for large collections")
    s.add_argument("--append", action="store_true",
                   help="add the manifest rows whose id is not yet in the existing index at --out")
    s.add_argument("--overwrite", action="store_true", help="replace an existing index (or a corrupt one) at --out")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--hnsw-m", type=int, default=None, help="hnsw: graph degree M (default 32)")
    s.add_argument("--ef-search", type=int, default=None, help="hnsw: efSearch (default 128)")
    s.add_argument("--nlist", type=int, default=None, help="ivf: inverted lists (default ~4*sqrt(n))")
    s.add_argument("--nprobe", type=int, default=None, help="ivf: lists probed per query (default nlist/8)")
    add_root(s)
    add_allow_outside_root(s)
    add_on_bad_row(s)
    s.set_defaults(fn=_index)

    s = sub.add_parser("query", help="search an index with a text, image or audio query")
    s.add_argument("--index", required=True, help="index folder written by `xmodal index`")
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", default=None, help="query text")
    q.add_argument("--image", default=None, help="query image file")
    q.add_argument("--audio", default=None, help="query audio file")
    s.add_argument("-k", type=int, default=5, help="number of results (default 5)")
    s.add_argument("--filter", action="extend", nargs="+", default=None, metavar="key=value",
                   help="keep items whose metadata matches (repeat a key to allow several values)")
    s.add_argument("--run", default=None, help="model run folder (default: the one recorded in the index)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.set_defaults(fn=_query)

    s = sub.add_parser("serve", help="a web page and JSON API for searching an index")
    s.add_argument("--index", required=True, help="index folder written by `xmodal index`")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    s.add_argument("--run", default=None, help="model run folder (default: the one recorded in the index)")
    s.add_argument("--max-concurrency", type=int, default=4, help="searches at once; more get 503 (default 4)")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds a search may take (default 30)")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body in MiB (default 10)")
    s.set_defaults(fn=_serve)

    from ..evaluation.index_eval import add_arguments
    s = add_arguments(sub.add_parser("evaluate-index",
                                     help="Recall@K and mAP of labelled queries through the index's search path"))
    s.set_defaults(fn=_evaluate_index)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..config import ConfigError
    from ..data import ManifestError
    from ..training.checkpoint import CheckpointError
    from ..retrieval import RetrievalError
    try:
        return args.fn(args)
    except (ConfigError, ManifestError, RetrievalError, CheckpointError, FloatingPointError, OSError,
            ValueError) as e:
        if os.environ.get("XMODAL_DEBUG"):
            raise
        # User errors and environment faults (disk full, permissions, a non-finite run): one clear line, no
        # traceback (the messages name the file, row and field, or the step and checkpoint).
        print(f"xmodal {args.verb}: error: {e}", file=sys.stderr)
        return 2

