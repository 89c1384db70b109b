"""Retrieval levers of issue #17, measured on VALIDATION splits: each lever is configs/pretrain.yaml plus a few
overrides, trained on the train split of every corpus given, with model selection on a slice held out of the train
split (so the val split stays unseen until it is scored), then scored on the val split. The test split is never
read here.

    python benchmarks/levers.py --corpus openclipart=data/openclipart/manifest.csv \\
        --corpus openmoji=data-local/openmoji/manifest.csv --seeds 0 1 2 --out runs/levers \\
        --lever default= --lever "wd0=train.weight_decay=0" --lever "linear=model.towers.image.projection=linear \\
        model.towers.text.projection=linear"

One process runs everything: frozen towers' features are embedded once (in memory across runs, and on disk in the
feature cache for later processes). Each run appends one JSON line to ``<out>/levers.jsonl`` (lever, corpus, seed,
overrides, selected step, val R@1/R@5/R@10 both ways); ``--table`` prints the table of means over seeds from that
file, with each lever's ratio to ``default``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

DIRECTIONS = ("text->image", "image->text")
# selection on a slice of the train split: a split name no manifest has makes the run hold one out
PROTOCOL = ["data.train_split=train", "data.val_split=__held_out__", "data.eval_split=val", "log.backend=none",
            "train.progress=false", "train.save_every=0", "train.select_best=true"]


def run_baseline(manifest: str, image_size: int, seed: int) -> dict:
    """benchmarks/baseline.py's peer (linear projections, open_clip ClipLoss, 300 steps, no selection), trained on
    the whole train split and scored on the val split."""
    from baseline import Baseline
    from xmodal.data.manifest import read_manifest

    peer = Baseline(manifest, image_size)
    peer.test = read_manifest(manifest, split="val", modalities=None, require_all=False).dataset
    got = peer.run(seed)
    rec = {"seconds": got["seconds"], "selected": None, "of": 300}
    rec.update({f"{d}/R@{k}": got["metrics"][f"{d}/R@{k}"] for d in DIRECTIONS for k in (1, 5, 10)})
    return rec


def run_one(config: str, manifest: str, lever: list[str], seed: int, out: Path, common: list[str],
            hubness: bool = True) -> dict:
    from xmodal.config import load_config
    from xmodal.training.engine import train

    overrides = [f"data.train={manifest}", f"output_dir={out}", f"seed={seed}", *PROTOCOL, *common, *lever]
    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    run = train(cfg)
    card = json.loads((run / "model.json").read_text())
    ev = card["eval"]
    rec = {"seconds": round(time.perf_counter() - t0, 1), "selected": card.get("selection", {}).get("step"),
           "of": card.get("selection", {}).get("of", card.get("step"))}
    for d in DIRECTIONS:
        for k in (1, 5, 10):
            rec[f"{d}/R@{k}"] = ev[f"{d}/R@{k}"]
    if hubness:
        rec.update(hubness_figures(run, manifest))
    return rec


def hubness_figures(run: Path, manifest: str) -> dict:
    """The selected model's val R@1/R@10 with each hubness reduction, the query bank being the train split's."""
    from xmodal.data import read_manifest
    from xmodal.evaluation.evaluate import evaluate_retrieval, query_banks
    from xmodal.model import load
    from xmodal.retrieval.hubness import Hubness

    model = load(run).eval()
    mods = list(model.towers)
    train = read_manifest(manifest, split="train", modalities=mods).dataset
    val = read_manifest(manifest, split="val", modalities=mods).dataset
    banks = query_banks(model, train, batch_size=256)
    out = {}
    for how in (Hubness("is"), Hubness("csls")):
        res = evaluate_retrieval(model, val, batch_size=256, hubness=how, banks=banks)
        out.update({f"{how.method}:{d}/R@{k}": res[f"{d}/R@{k}"] for d in DIRECTIONS for k in (1, 10)})
    return out


def table(path: Path, hubness_of: tuple[str, ...] = ("default", "selR1")) -> str:
    """Means over seeds per lever and corpus (``n``: seeds), each with its ratio to ``default`` over the same
    seeds; the query-time hubness variants of the levers in ``hubness_of`` as rows of their own."""
    rows = list({(r["lever"], r["corpus"], r["seed"]): r for r in reversed(
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()])}.values())[::-1]  # first kept
    rows += [{**r, "lever": f"{r['lever']} + {m}", "overrides": f"{r['overrides']} (query time: {m})".strip(),
              **{f"{d}/R@{k}": r[f"{m}:{d}/R@{k}"] for d in DIRECTIONS for k in (1, 10)}}
             for m in ("is", "csls") for r in list(rows) if f"{m}:text->image/R@1" in r and r["lever"] in hubness_of]
    corpora = sorted({r["corpus"] for r in rows})
    levers = list(dict.fromkeys(r["lever"] for r in rows))
    keys = [f"{d}/R@{k}" for k in (1, 10) for d in DIRECTIONS]
    by = {(r["lever"], r["corpus"], r["seed"]): r for r in rows}
    head = "| lever | overrides | " + " | ".join(
        f"{c} n | {c} t→i R@1 | {c} i→t R@1 | {c} t→i R@10 | {c} i→t R@10" for c in corpora) + " |"
    lines = [head, "|" + "---|" * (2 + 5 * len(corpora))]
    for lv in levers:
        over = next(r["overrides"] for r in rows if r["lever"] == lv)
        over = "benchmarks/baseline.py's peer" if lv == "baseline" else (over or "configs/pretrain.yaml")
        cells = []
        for c in corpora:
            seeds = sorted(s for (l2, c2, s) in by if l2 == lv and c2 == c)
            if not seeds:
                cells += ["—"] * 5
                continue
            cells.append(str(len(seeds)))
            base_seeds = [s for s in seeds if ("default", c, s) in by]
            for k in keys:
                v = statistics.mean(by[lv, c, s][k] for s in seeds)
                ratio = ""
                if lv != "default" and base_seeds:
                    b = statistics.mean(by["default", c, s][k] for s in base_seeds)
                    same = statistics.mean(by[lv, c, s][k] for s in base_seeds)
                    ratio = f" ({same / b:.2f}×)" if b else ""
                cells.append(f"{v:.3f}{ratio}")
        lines.append(f"| {lv} | `{over}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs/pretrain.yaml"))
    ap.add_argument("--corpus", action="append", default=[], help="name=manifest (train/val splits)")
    ap.add_argument("--lever", action="append", default=[], help="name=override override ... (empty: the config)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--image-size", type=int, default=128,
                    help="the image tower's input size (128: the corpora's rendering, as benchmarks/baseline.py)")
    ap.add_argument("--out", default="runs/levers")
    ap.add_argument("--table", action="store_true", help="print the table of <out>/levers.jsonl and stop")
    ap.add_argument("--no-hubness", action="store_true",
                    help="skip the query-time hubness figures (they embed the train split's queries again, minutes "
                         "for a tower that is not frozen)")
    args = ap.parse_args()
    out = Path(args.out)
    results = out / "levers.jsonl"
    if args.table:
        print(table(results))
        return
    logging.basicConfig(level=logging.WARNING)
    from xmodal.feature_cache import disk_cache, reuse_frozen_features
    from xmodal.feature_store import resolve_root

    out.mkdir(parents=True, exist_ok=True)
    done = {(r["lever"], r["corpus"], r["seed"]) for r in map(json.loads, results.read_text().splitlines())} \
        if results.is_file() else set()
    with reuse_frozen_features(), disk_cache(resolve_root(None)):
        for spec in args.lever:
            name, _, over = spec.partition("=")
            for corpus in args.corpus:
                cname, _, manifest = corpus.partition("=")
                for seed in args.seeds:
                    if (name, cname, seed) in done:
                        continue
                    if name == "baseline":
                        rec = run_baseline(manifest, args.image_size, seed)
                    else:
                        rec = run_one(args.config, manifest, shlex.split(over), seed, out / f"{name}-{cname}-{seed}",
                                      [f"model.towers.image.image_size={args.image_size}"],
                                      hubness=not args.no_hubness)
                    rec = {"lever": name, "corpus": cname, "seed": seed, "overrides": over, **rec}
                    with results.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    print(json.dumps(rec), flush=True)
    print(table(results))


if __name__ == "__main__":
    main()
