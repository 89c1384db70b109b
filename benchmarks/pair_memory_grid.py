"""The pair memory's k / power / weight, re-scored on VALIDATION splits without training again (issue #17).

The memory acts only where a model embeds (``encode``): the training steps never see it. So runs that
``benchmarks/levers.py`` trained with the memory on (its run folders, each scored on its corpus's ``val`` split) can
be scored again at any other setting: one pass embeds each distinct val input and keeps its frozen-tower features and
plain embedding, then the memory's formula (``PairMemory.forward``, the saved partners) runs once per setting. The
comparison is paired — the same models, the same queries — so it separates settings far more finely than seeds
do. The runs' model selection used the setting they were trained with. The test split is never read.

    python benchmarks/levers.py --corpus openclipart=data/openclipart/manifest.csv --seeds 0 1 2 \\
        --out runs/levers --no-hubness --lever "pm=model.pair_memory={}"          # (and openmoji): the runs
    python benchmarks/pair_memory_grid.py runs/levers/pm-openclipart-{0,1,2} runs/levers/pm-openmoji-{0,1,2} \\
        --reference 8,3,0.3 --out runs/levers/pair_memory_grid.jsonl

Prints each setting's mean val R@1 / R@10 per corpus as a ratio to ``--reference``, best first by the geometric
mean of all those ratios (both corpora, both directions, R@1 and R@10 alike).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(var, "1")

METRICS = ("text->image/R@1", "image->text/R@1", "text->image/R@10", "image->text/R@10")


class Rescored:
    """Enough of a model for ``evaluate_retrieval``: ``encode`` applies the memory at the current setting to inputs
    embedded once (their frozen features and plain embeddings, recorded as ``model.encode`` computed them)."""

    def __init__(self, model, dataset, batch_size: int = 256):
        import torch
        self.model, self.modalities, self.towers, self.cfg = model, model.modalities, model.towers, model.cfg
        self.memory, self.inputs = model.pair_memory, {}
        for m in self.modalities:
            values = list(dict.fromkeys(v for v in dataset[m] if v not in (None, "")))
            # encode sorts strings by length before batching; given them sorted (stably), its order is theirs
            ordered = sorted(values, key=len)
            chunks = []
            self.memory.forward = lambda mod, feats, emb: (chunks.append((feats.float(), emb.float())), emb)[1]
            try:
                model.encode(m, ordered, batch_size=batch_size)
            finally:
                del self.memory.forward  # the class's forward again
            feats, emb = (torch.cat(part) for part in zip(*chunks))
            self.inputs[m] = ({v: i for i, v in enumerate(ordered)}, feats, emb)

    def encode(self, modality, values, **kw):
        index, feats, emb = self.inputs[modality]
        rows = [index[v] for v in values]
        return self.memory(modality, feats[rows], emb[rows])


def ranked(rows: list[dict], settings: list, reference, key) -> list[tuple]:
    """Each setting's mean per corpus and metric over the runs, its ratio to ``reference``'s, the geometric mean and
    the smallest of those ratios: ``[(geo_mean, min_ratio, setting, {(corpus, metric): (mean, ratio)})]``, best
    first. ``key(row)`` is a row's setting."""
    corpora = sorted({r["corpus"] for r in rows})

    def mean(corpus, setting, metric):
        return statistics.mean(r[metric] for r in rows if r["corpus"] == corpus and key(r) == setting)

    table = []
    for s in settings:
        cells = {(c, m): (mean(c, s, m), mean(c, s, m) / mean(c, reference, m)) for c in corpora for m in METRICS}
        ratios = [r for _, r in cells.values()]
        table.append((math.exp(statistics.mean(math.log(x) for x in ratios)), min(ratios), s, cells))
    return sorted(table, key=lambda t: -t[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders trained with model.pair_memory (benchmarks/levers.py's)")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--power", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    ap.add_argument("--weight", type=float, nargs="+", default=[0.0, 0.2, 0.3, 0.4, 0.5, 0.6])
    ap.add_argument("--reference", default="8,3,0.3", help="k,power,weight the ratios are to")
    ap.add_argument("--out", default=None, help="JSON lines: one per run and setting")
    ap.add_argument("--top", type=int, default=15, help="settings printed")
    args = ap.parse_args()

    import xmodal
    from xmodal.config import load_config
    from xmodal.data.manifest import read_manifest
    from xmodal.evaluation.evaluate import evaluate_retrieval

    ref = tuple(float(x) for x in args.reference.split(","))
    settings = sorted(set(itertools.product(args.k, args.power, args.weight)) | {(int(ref[0]), ref[1], ref[2])})
    rows = []
    for run in args.runs:
        model = xmodal.load(run)
        if model.pair_memory is None or not len(model.pair_memory):
            raise SystemExit(f"{run}: no pair memory in this model (train it with model.pair_memory)")
        manifest = load_config(Path(run) / "config.yaml").data.train  # relative paths: from the repository root
        corpus = Path(manifest).parent.name
        val = read_manifest(manifest, split="val", modalities=model.modalities).dataset
        rescored = Rescored(model, val)
        for k, power, weight in settings:
            model.pair_memory.k, model.pair_memory.power, model.pair_memory.weight = k, power, weight
            r = evaluate_retrieval(rescored, val)
            rows.append({"run": str(run), "corpus": corpus, "k": k, "power": power, "weight": weight,
                         **{m: r[m] for m in METRICS}})
        print(f"{run}: {len(settings)} settings scored ({corpus}, {len(val)} val rows)", file=sys.stderr, flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))

    reference = (int(ref[0]), ref[1], ref[2])
    table = ranked(rows, settings, reference, key=lambda r: (r["k"], r["power"], r["weight"]))
    corpora = sorted({r["corpus"] for r in rows})
    head = " | ".join(f"{c} {m}" for c in corpora for m in METRICS)
    print(f"| k | power | weight | geo-mean ratio | {head} |")
    print("|" + "---:|" * (4 + len(corpora) * len(METRICS)))
    for g, _, (k, p, w), cells in table[:args.top] + [t for t in table[args.top:] if t[2] == reference]:
        print(f"| {k} | {p:g} | {w:g} | {g:.3f} | "
              + " | ".join(f"{v:.3f} ({r:.3f})" for v, r in cells.values()) + " |")


if __name__ == "__main__":
    main()
