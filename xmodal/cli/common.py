"""What every verb shares: the manifest flags (``--root``, ``--allow-outside-root``, ``--on-bad-row``) defined
once, reading a manifest with them, the results table, and the one-line error a user error ends in."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_manifest_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--root``, ``--allow-outside-root`` and ``--on-bad-row``: how a verb that reads a manifest
    (:func:`read_manifest_for`) finds and checks the files its rows name."""
    p.add_argument("--root", default=None, metavar="DIR",
                   help="the folder the manifest's relative image/audio paths are read from (default: the "
                        "manifest's folder), as data.root in a config")
    p.add_argument("--allow-outside-root", action=argparse.BooleanOptionalAction, default=None,
                   help="accept image/audio paths outside the data root (--root, default the manifest's folder): "
                        "'..', absolute paths, symlinks. Default: accepted, except by `index` (an index is what "
                        "`serve` shows: there only for a manifest you trust); --no-allow-outside-root confines them")
    p.add_argument("--on-bad-row", choices=["error", "skip"], default="error",
                   help="a manifest row with a missing file or empty id, ...: error (default) stops with its row "
                        "and field; skip drops it with a warning")
    return p


# Verbs whose manifest paths stay inside the data root unless --allow-outside-root: what they write is served
# (`xmodal serve` shows an index's images), so a manifest from elsewhere must not make it name any file. The other
# verbs only read the files into the user's own model, as the peers' readers do with any path.
CONFINED_VERBS = ("index",)


def outside_root_allowed(args) -> bool:
    """``--allow-outside-root`` / ``--no-allow-outside-root`` as given, else the verb's default."""
    flag = getattr(args, "allow_outside_root", None)
    return flag if flag is not None else getattr(args, "verb", None) not in CONFINED_VERBS


def read_manifest_for(args, **kw):
    """``read_manifest(args.manifest, ...)`` with the command's ``--root`` / ``--on-bad-row`` /
    ``--allow-outside-root``; its errors name those flags (the library's messages name the Python arguments)."""
    from ..data import ManifestError, read_manifest
    from ..data.errors import name_options

    root = getattr(args, "root", None)
    try:
        return read_manifest(args.manifest, root=root, on_bad_row=args.on_bad_row,
                             allow_outside_root=outside_root_allowed(args), **kw)
    except ManifestError as e:
        message = name_options(str(e), args.on_bad_row, skip="--on-bad-row skip", allow="--allow-outside-root")
        first, nl, rest = message.partition("\n")
        if root is None and "file not found" in first:  # a manifest that trained with data.root: say how to give it
            first += " (relative paths are read from the manifest's folder; --root DIR reads them from DIR)"
        raise ManifestError(first + nl + rest) from None


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


def print_results(results: dict[str, float], as_json: bool) -> None:
    """A verb's metrics on stdout: ``--json`` as JSON, otherwise as :func:`format_table`."""
    print(json.dumps(results, indent=2) if as_json else format_table(results))


def below_majority(results: dict[str, float]) -> list[str]:
    """One line per top-1 figure (or a head's accuracy) that is below its ``majority_top1`` (``majority_accuracy``):
    always answering the most frequent label, e.g. a zero-shot top-1 whose prompts do not separate the labels: a
    number that is worse than a constant guess should not pass without a word."""
    lines = []
    for key, majority in results.items():
        metric = next((m for m in ("top1", "accuracy") if key.endswith(f"/majority_{m}")), None)
        if metric is None:
            continue
        prefix = key.removesuffix(f"majority_{metric}")
        top1 = results.get(prefix + metric)
        if top1 is not None and top1 < majority:
            lines.append(f"note: {prefix}{metric} = {top1:.4f} is below {key} = {majority:.4f}, the rate of always "
                         f"answering the most frequent label: on these labels it does worse than that constant "
                         f"guess")
    return lines


def run_verb(args: argparse.Namespace) -> int:
    """Run the parsed verb (``args.fn``); a user error or an environment fault ends in one line on stderr and exit
    status 2 (``XMODAL_DEBUG=1`` raises it instead, traceback and all)."""
    try:
        _resolve_run(args)
        with _feature_cache_for(args.verb):
            return args.fn(args)
    except Exception as e:
        if not isinstance(e, _user_errors()) or os.environ.get("XMODAL_DEBUG"):
            raise
        # User errors and environment faults (disk full, permissions, a non-finite run): one clear line, no
        # traceback (the messages name the file, row and field, or the step and checkpoint).
        print(f"xmodal {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C in any verb: one line, the shell's exit status for SIGINT, no traceback
        if os.environ.get("XMODAL_DEBUG"):
            raise
        print(f"xmodal {args.verb}: interrupted", file=sys.stderr)
        return 130


RUN_HELP = "the model: a run folder, a folder from `xmodal export --format hf`, or such a folder on the hub " \
           "(hf-hub:ORG/NAME)"
# The verbs whose --run names a model to use, not a run to export (`export` and `push` read the run folder itself).
MODEL_VERBS = ("evaluate", "predict", "evaluate-index", "index", "query", "serve")


def _resolve_run(args: argparse.Namespace) -> None:
    """``--run`` takes a run folder, a folder written by ``xmodal export --format hf``, or such a folder on the hub
    (``hf-hub:ORG/NAME``), as ``xmodal.load`` does; the verb gets the folder that holds the model's files
    (``args.run``) and the name given (``args.run_given``)."""
    args.run_given = getattr(args, "run", None)
    if args.verb in MODEL_VERBS and args.run_given is not None:
        from ..model_files import model_folder

        args.run = str(model_folder(args.run_given))


def _user_errors() -> tuple[type[Exception], ...]:
    """What a verb's error line reports: ConfigError, ManifestError and RetrievalError are ValueErrors; a
    CheckpointError or a RunFailed (another rank's failure) can only come from a verb that imported the training
    package. Nothing is imported for this
    (the data and training packages pull in datasets and accelerate: seconds that `xmodal query` would pay)."""
    training = __package__.rpartition(".")[0] + ".training"
    checkpoint, failures = sys.modules.get(training + ".checkpoint"), sys.modules.get(training + ".failures")
    return (ValueError, OSError, FloatingPointError) + ((checkpoint.CheckpointError,) if checkpoint else ()) + (
        (failures.RunFailed,) if failures else ())


# Verbs that embed a manifest's inputs with a model's towers: frozen towers' features are read from and kept in the
# feature cache on disk ($XMODAL_CACHE, default ~/.cache/xmodal/features; off: XMODAL_CACHE=off). Training verbs take
# it from train.feature_cache_dir; a query embeds one new input, so hashing the weights would only slow it down.
CACHED_VERBS = ("evaluate", "predict", "index", "evaluate-index")


def _feature_cache_for(verb: str):
    import contextlib
    if verb not in CACHED_VERBS:
        return contextlib.nullcontext()
    from ..feature_cache import disk_cache, resolve_root
    return disk_cache(resolve_root(None))


def plugins_named_by(argv: list[str]) -> list[str]:
    """The plugin modules (``model.plugins``) that the files a command line points at name: ``--config``'s YAML,
    ``--run``'s model card, the run an ``--index`` was built from. Read before the parser is built, so that a
    plugin's modality has its ``--<name>`` query flag. Unreadable files are left to the verb to report."""
    import yaml

    def value(flag: str) -> str | None:
        for i, a in enumerate(argv):
            if a == flag and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
        return None

    def card_plugins(run: str | os.PathLike) -> list:
        from ..model_files import model_folder

        return json.loads((model_folder(run) / "model.json").read_text(encoding="utf-8"))["model"].get(
            "plugins") or []

    found: list[str] = []
    readers = {"--config": lambda v: (yaml.safe_load(Path(v).read_text(encoding="utf-8")).get("model") or {}
                                      ).get("plugins") or [],
               "--run": card_plugins,
               "--index": lambda v: card_plugins(json.loads((Path(v) / "index.json").read_text(encoding="utf-8"))
                                                 ["model"]["run_dir"])}
    for flag, read in readers.items():
        v = value(flag)
        if v is None:
            continue
        try:
            names = read(v)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):
            continue
        found += [n for n in names if isinstance(n, str) and n not in found]
    return found


def bank_rows(args, modalities: list[str]):
    """The rows whose values are the query bank of hubness reduction (``--hubness``): ``--bank-manifest`` /
    ``--bank-split`` when given, else the run's own training rows (its ``config.yaml``: ``data.train``,
    ``data.train_split``, ``data.root``)."""
    from ..config import load_config

    path, split, root = getattr(args, "bank_manifest", None), getattr(args, "bank_split", None), args.root
    if path is None:
        if not (Path(args.run) / "config.yaml").is_file():
            raise ValueError(f"--hubness: {args.run_given} holds no config.yaml naming its training rows (an exported "
                             f"model keeps only its weights and card); give the query bank with --bank-manifest and "
                             f"--bank-split: the rows the model trained on, not the rows being scored")
        cfg = load_config(Path(args.run) / "config.yaml")
        path, split, root = cfg.data.train, split or cfg.data.train_split, cfg.data.root
        if path is None:
            raise ValueError(f"--hubness: the run {args.run} names no training manifest (data.train); give "
                             f"--bank-manifest")
    rows = read_manifest_for(argparse.Namespace(**{**vars(args), "manifest": path, "root": root}), split=split,
                             modalities=modalities, require_all=False)
    print(f"hubness: query bank from {path}" + (f" (split {split})" if split else "") + f", {len(rows)} rows",
          file=sys.stderr)
    scored = getattr(args, "manifest", None)
    if args.verb == "evaluate" and scored is not None and Path(path).resolve() == Path(scored).resolve() and \
            (split is None or args.split is None or split == args.split):
        print(f"hubness: warning: the query bank holds the rows being scored ({scored}"
              + (f", split {split}" if split else ", every split") + "): the figures are not held-out ones; give "
              "--bank-split with the training split", file=sys.stderr)
    return rows.rows


def add_hubness_flags(s) -> None:
    """``--bank-manifest`` and ``--bank-split``: where a hubness query bank comes from (default: the run's training
    rows)."""
    s.add_argument("--bank-manifest", default=None, help="--hubness: the query bank's manifest (default: the run's "
                                                         "training manifest, data.train)")
    s.add_argument("--bank-split", default=None, help="--hubness: its split (default: the run's data.train_split)")
