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


def _pretrain(args) -> int:
    from .config import load_config
    from .engine import pretrain

    cfg = load_config(args.config, args.overrides)
    run = pretrain(cfg, resume=args.resume)
    print(f"run folder: {run}")
    return 0


def _evaluate(args) -> int:
    from .data import read_manifest
    from .evaluate import evaluate
    from .model import load

    model = load(args.run)
    manifest = read_manifest(args.manifest, split=args.split, modalities=None, max_rows=args.max_rows,
                             require_all=False)
    results = evaluate(model, manifest.dataset, batch_size=args.batch_size, progress=not args.json)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


def format_table(results: dict[str, float]) -> str:
    """Group ``"a->b/metric"`` keys into one row per direction."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in results.items():
        task, _, metric = key.rpartition("/")
        rows.setdefault(task or "-", {})[metric] = value
    metrics = list(dict.fromkeys(m for r in rows.values() for m in r))
    width = max(len(r) for r in rows) + 2
    lines = ["".ljust(width) + "".join(m.rjust(12) for m in metrics)]
    for task, r in rows.items():
        cells = "".join((f"{r[m]:.4f}" if m in r and r[m] % 1 else (f"{r[m]:.0f}" if m in r else "")).rjust(12)
                        for m in metrics)
        lines.append(task.ljust(width) + cells)
    return "\n".join(lines)


def _prepare(args) -> int:
    if args.corpus == "openclipart":
        from .data.corpora.openclipart import prepare_openclipart
        path = prepare_openclipart(args.out or "data/openclipart", limit=args.limit)
    else:
        from .data.corpora.fashion_mnist import prepare_fashion_mnist
        path = prepare_fashion_mnist(args.out or "data/fashion-mnist", max_per_split=args.limit)
    print(f"manifest: {path}")
    return 0


def _index(args) -> int:
    from .data import read_manifest
    from .model import load
    from .retrieval import RetrievalError, build_index

    if args.batch_size < 1:
        raise RetrievalError(f"--batch-size must be at least 1, got {args.batch_size}")
    model = load(args.run)
    if args.modality not in model.towers:
        raise RetrievalError(f"the model in {args.run} has no {args.modality!r} tower "
                             f"(towers: {', '.join(model.towers)})")
    manifest = read_manifest(args.manifest, split=args.split, modalities=[args.modality], require_all=False)
    opts = {"M": args.hnsw_m, "ef_search": args.ef_search, "nlist": args.nlist, "nprobe": args.nprobe}
    index = build_index(model, manifest, args.modality, args.out, kind=args.kind, batch_size=args.batch_size,
                        run_dir=args.run, append=args.append, overwrite=args.overwrite, **opts)
    print(f"index: {args.out} ({len(index)} {args.modality} rows, {index.kind}, dim {index.dim})")
    return 0


def _query(args) -> int:
    from .retrieval import RetrievalError, Retriever, format_hits, parse_filters

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xmodal", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)

    s = sub.add_parser("pretrain", help="contrastive pretraining of the shared space")
    s.add_argument("--config", required=True, help="YAML config (see configs/)")
    s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    s.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config fields by dotted path")
    s.set_defaults(fn=_pretrain)

    s = sub.add_parser("evaluate", help="retrieval Recall@K (every modality pair) and zero-shot accuracy")
    s.add_argument("--run", required=True, help="run folder (holds model.safetensors + model.json)")
    s.add_argument("--manifest", required=True)
    s.add_argument("--split", default=None, help="keep rows whose `split` column equals this")
    s.add_argument("--max-rows", type=int, default=None)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--out", default=None, help="also write the results to this JSON file")
    s.set_defaults(fn=_evaluate)

    s = sub.add_parser("prepare", help="build a bundled real corpus into a manifest")
    s.add_argument("corpus", choices=["openclipart", "fashion-mnist"])
    s.add_argument("--out", default=None, help="output folder (default data/<corpus>)")
    s.add_argument("--limit", type=int, default=None, help="openclipart: max SVGs; fashion-mnist: max rows/split")
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
    s.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--hnsw-m", type=int, default=None, help="hnsw: graph degree M (default 32)")
    s.add_argument("--ef-search", type=int, default=None, help="hnsw: efSearch (default 128)")
    s.add_argument("--nlist", type=int, default=None, help="ivf: inverted lists (default ~4*sqrt(n))")
    s.add_argument("--nprobe", type=int, default=None, help="ivf: lists probed per query (default nlist/8)")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .data import ManifestError
    from .retrieval import RetrievalError
    try:
        return args.fn(args)
    except (ConfigError, ManifestError, RetrievalError, FileExistsError, FileNotFoundError) as e:
        # User errors: one clear line, no traceback (they name the file, row and field).
        print(f"xmodal {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
