"""``xmodal VERB`` (and ``python train.py VERB``): prepare, pretrain, evaluate, index, query.

Each verb is a small function; heavy imports (torch, open_clip) happen inside them so ``xmodal --help`` is instant.

One module per group of verbs, each with an ``add_…_verb(sub)`` that declares the verb's flags and a ``run_…(args)``
that runs it; the flags and error handling every verb shares are in :mod:`.common`:

* :mod:`.train`: ``pretrain``, ``finetune``;
* :mod:`.evaluate`: ``evaluate``, ``predict``, ``evaluate-index``;
* :mod:`.search`: ``index``, ``query``, ``serve``;
* :mod:`.prepare`: ``prepare``;
* :mod:`.export`: ``export``, ``push``.
* :mod:`.shard`: ``shard``.
"""
from __future__ import annotations

import argparse
import os

# Offline unless the user says otherwise: no hub look-ups, wandb writes locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Idle OpenMP threads sleep instead of spinning. On a machine where another process holds a core, spinning made a
# 2-thread training step ~14x slower (benchmarks/omp_wait.py, docs/benchmarks.md); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .common import plugins_named_by, run_verb  # noqa: E402 - after the environment above
from .export import add_export_verbs  # noqa: E402
from .evaluate import add_evaluate_index_verb, add_evaluate_verb, add_predict_verb  # noqa: E402
from .prepare import add_prepare_verb  # noqa: E402
from .search import add_index_shards_verb, add_index_verb, add_query_verb, add_serve_verb  # noqa: E402
from .shard import add_shard_verb  # noqa: E402
from .train import add_train_verbs  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xmodal", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)
    # The order of `xmodal --help`.
    add_train_verbs(sub)  # pretrain, finetune
    add_evaluate_verb(sub)
    add_predict_verb(sub)
    add_prepare_verb(sub)
    add_shard_verb(sub)
    add_index_verb(sub)
    add_index_shards_verb(sub)
    add_query_verb(sub)
    add_serve_verb(sub)
    add_evaluate_index_verb(sub)
    add_export_verbs(sub)  # export, push
    return p


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    plugins = plugins_named_by(argv)
    if plugins:  # a run's custom modalities: their query flags and columns must exist before parsing
        from ..modalities import load_plugins

        try:
            load_plugins(plugins)
        except ValueError as e:
            print(f"xmodal: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given: what `pretrain` repeats, with --resume, after an interruption
    return run_verb(args)
