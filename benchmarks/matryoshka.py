"""Matryoshka embeddings (issue #20): is a prefix of a Matryoshka run's embedding as good as a model trained for that
size alone, and does the nesting cost the full dimension anything? Three variants of configs/pretrain.yaml, each
trained with several seeds in one process and scored on the VALIDATION split (the test split is never read):

* ``plain``: the config as shipped (256-d, plain CLIP loss);
* ``matryoshka``: the same with ``model.matryoshka_dims=[64,128,256]`` (the loss averaged over the three prefixes);
* ``dim64``: ``model.embed_dim=64``, plain loss: a model trained for 64 dims alone.

    python benchmarks/matryoshka.py --manifest data/openclipart/manifest.csv --seeds 0 1 2 --out runs/matryoshka
    python benchmarks/matryoshka.py --out runs/matryoshka --table     # the table again, nothing trained

Protocol (as benchmarks/levers.py): trained on the train split; model selection (``train.select_best``, by the
full dimension's R@1) on a slice held out of the train split, so the val split stays unseen until it is scored.
Each selected model is then scored on the val split at its full dimension and at every prefix in ``--prefixes``
below it (truncated and renormalised, as ``encode(..., dim=)``), the plain run's prefixes included: they show what
a model not trained for truncation loses. Frozen towers' features are embedded once (in memory across runs, and in
the disk feature cache). Each run appends one JSON line to ``<out>/matryoshka.jsonl``.

The targets (issue #20): R@10 of ``matryoshka`` at 64 dims within 5% of ``dim64`` (ratio of the means over seeds
≥ 0.95), and at its full dimension within 2% of ``plain`` (≥ 0.98), each retrieval direction.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
# The lever study's protocol (selection on a slice held out of train, scored on val; its offline environment)
from levers import DIRECTIONS, PROTOCOL  # noqa: E402

VARIANTS = {"plain": [], "matryoshka": ["model.matryoshka_dims=[64,128,256]"], "dim64": ["model.embed_dim=64"]}
# (name in the table, the variant, the prefix scored (None: full), the peer it is compared with, its prefix, target)
COMPARISONS = (("matryoshka @64 vs dim64", "matryoshka", 64, "dim64", None, 0.95),
               ("matryoshka full vs plain", "matryoshka", None, "plain", None, 0.98))


def key(direction: str, dim: int | None, k: int) -> str:
    return f"{direction}/R@{k}" if dim is None else f"{direction}@{dim}/R@{k}"


def run_one(config: str, manifest: str, overrides: list[str], seed: int, out: Path, prefixes: list[int],
            image_size: int) -> dict:
    """Train one variant and seed; the selected model's val recalls, full and at each prefix below its size."""
    from xmodal.config import load_config
    from xmodal.data import read_manifest
    from xmodal.evaluation.evaluate import evaluate_retrieval
    from xmodal.model import load
    from xmodal.training.engine import train

    cfg = load_config(config, [f"data.train={manifest}", f"output_dir={out}", f"seed={seed}", *PROTOCOL,
                               f"model.towers.image.image_size={image_size}", *overrides])
    t0 = time.perf_counter()
    run = train(cfg)
    seconds = time.perf_counter() - t0
    card = json.loads((run / "model.json").read_text())
    model = load(run).eval()
    dims = [d for d in prefixes if d < model.cfg.embed_dim]
    val = read_manifest(manifest, split="val", modalities=list(model.towers)).dataset
    res = evaluate_retrieval(model, val, batch_size=256, dims=dims)
    rec = {"seconds": round(seconds, 1), "embed_dim": model.cfg.embed_dim,
           "matryoshka_dims": list(model.cfg.matryoshka_dims), "selected": card.get("selection", {}).get("step"),
           "of": card.get("selection", {}).get("of", card.get("step")),
           "n_queries": {d: res[f"{d}/n_queries"] for d in DIRECTIONS}}
    for d in DIRECTIONS:
        for dim in (None, *dims):
            for k in (1, 5, 10):
                rec[key(d, dim, k)] = res[key(d, dim, k)]
    # the run's own final evaluation (the same model, the same split): a cross-check, recorded; a query or two may
    # differ (embedding batch sizes change the last float bits, and with them a near-tie)
    rec["card_R@10"] = {d: card["eval"][f"{d}/R@10"] for d in DIRECTIONS}
    for d in DIRECTIONS:
        if abs(card["eval"][f"{d}/R@10"] - rec[f"{d}/R@10"]) * res[f"{d}/n_queries"] > 2.5:
            raise RuntimeError(f"{run}: val R@10 {rec[f'{d}/R@10']} differs from the card's {card['eval']}")
    return rec


def load_rows(path: Path) -> dict[tuple[str, int], dict]:
    """``(variant, seed) → record``; a pair recorded twice keeps its first record."""
    rows: dict[tuple[str, int], dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            rows.setdefault((r["variant"], r["seed"]), r)
    return rows


def summary(rows: dict[tuple[str, int], dict], variant: str, dim: int | None, direction: str, k: int,
            seeds: list[int] | None = None) -> tuple[float, float, int]:
    """Mean and sample std (0 for one seed) of ``variant``'s R@k in ``direction`` at ``dim`` over ``seeds``
    (default: every seed it has), and the number of seeds."""
    values = [r[key(direction, dim, k)] for (v, s), r in sorted(rows.items())
              if v == variant and (seeds is None or s in seeds)]
    if not values:
        raise KeyError(f"no {variant} run with {key(direction, dim, k)}")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def table(path: Path) -> str:
    rows = load_rows(path)
    variants = [v for v in VARIANTS if any(k[0] == v for k in rows)]
    prefixes = sorted({int(k.split("@")[1].split("/")[0]) for r in rows.values() for k in r
                       if "->" in k and "@" in k.split("/")[0]})
    lines = ["| variant | dim | seeds | t→i R@1 | i→t R@1 | t→i R@10 | i→t R@10 | selected step (of) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for v in variants:
        runs = [r for (vv, _), r in sorted(rows.items()) if vv == v]
        full = runs[0]["embed_dim"]
        for dim in (None, *[p for p in prefixes[::-1] if p < full]):  # full size, then shorter prefixes
            cells = []
            for k in (1, 10):
                for d in DIRECTIONS:
                    m, sd, n = summary(rows, v, dim, d, k)
                    cells.append(f"{m:.3f} ± {sd:.3f}")
            steps = ", ".join(f"{r['selected']} ({r['of']})" for r in runs) if dim is None else ""
            lines.append(f"| {v} | {dim or full} | {n} | " + " | ".join(cells) + f" | {steps} |")
    lines += ["", "| comparison (R@10, mean over common seeds) | direction | variant | peer | ratio | target | met |",
              "|---|---|---:|---:|---:|---:|---|"]
    for name, v, dim, peer, pdim, target in COMPARISONS:
        seeds = sorted({s for (vv, s) in rows if vv == v} & {s for (vv, s) in rows if vv == peer})
        if not seeds:
            lines.append(f"| {name} | — | — | — | — | ≥ {target:.2f} | not measured |")
            continue
        for d in DIRECTIONS:
            a = summary(rows, v, dim, d, 10, seeds)[0]
            b = summary(rows, peer, pdim, d, 10, seeds)[0]
            ratio = a / b
            lines.append(f"| {name} (seeds {', '.join(map(str, seeds))}) | {d} | {a:.3f} | {b:.3f} | {ratio:.3f} | "
                         f"≥ {target:.2f} | {'yes' if ratio >= target else '**no**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/pretrain.yaml"))
    ap.add_argument("--manifest", default="data/openclipart/manifest.csv", help="a manifest with train and val splits")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--prefixes", type=int, nargs="+", default=[64, 128], help="prefixes scored below the full size")
    ap.add_argument("--image-size", type=int, default=128,
                    help="the image tower's input size (128: the corpus' rendering, as benchmarks/levers.py)")
    ap.add_argument("--out", default="runs/matryoshka")
    ap.add_argument("--table", action="store_true", help="print the table of <out>/matryoshka.jsonl and stop")
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = out / "matryoshka.jsonl"
    if args.table:
        print(table(results))
        return 0
    logging.basicConfig(level=logging.WARNING)
    from xmodal.feature_cache import disk_cache, reuse_frozen_features
    from xmodal.feature_store import resolve_root

    out.mkdir(parents=True, exist_ok=True)
    done = set(load_rows(results)) if results.is_file() else set()
    with reuse_frozen_features(), disk_cache(resolve_root(None)):
        for seed in args.seeds:  # seed-major: an interrupted run leaves every variant with the same seeds
            for variant in args.variants:
                if (variant, seed) in done:
                    continue
                rec = run_one(args.config, args.manifest, VARIANTS[variant], seed, out / f"{variant}-{seed}",
                              args.prefixes, args.image_size)
                rec = {"variant": variant, "seed": seed, "overrides": " ".join(VARIANTS[variant]),
                       "load_average": os.getloadavg(), **rec}
                with results.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
