"""Whitening the pair memory's neighbour search, screened on VALIDATION splits without training again (issue #17).

``model.pair_memory.whiten`` finds a modality's neighbours in features whitened on the memory's own pairs
(``xmodal/pair_memory.py``: ``W = U diag((λ + ε mean λ) ** -α) U^T`` with α = 1/2, ε = 1). This script is how that
was chosen: it re-scores run folders that ``benchmarks/levers.py`` trained with the memory on (un-whitened) at other
whitenings — image side, text side or both; α, the eigenvalue power; ε, the shrinkage in units of the mean
eigenvalue — fitted on the saved (centred, normalised, float16) features of the memory's pairs, as ``fill`` fits
them on the same features before they are stored. The models and queries are the same in every row (a paired
comparison); the test split is never read.

    python benchmarks/levers.py --corpus openclipart=data/openclipart/manifest.csv --seeds 0 1 2 \\
        --out runs/levers --no-hubness --lever "nowh=model.pair_memory.whiten=[]"   # (and openmoji): the runs
    python benchmarks/pair_memory_whitening.py runs/levers/nowh-openclipart-{0,1,2} \\
        runs/levers/nowh-openmoji-{0,1,2} --out runs/levers/whitening.jsonl

Prints each setting's mean val R@1 / R@10 per corpus with its ratio to no whitening, best first by the geometric
mean of all those ratios, and the smallest of them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pair_memory_grid import METRICS, ROOT, Rescored, ranked  # noqa: E402  (also puts the repository on sys.path)


def whitening(unit, alpha: float, shrink: float):
    """``U diag((λ + shrink · mean λ) ** -alpha) U^T`` of the rows' second-moment matrix (float64)."""
    import torch
    x = unit.double()
    lam, u = torch.linalg.eigh(x.T @ x / len(x))
    lam = lam.clamp(min=0)
    return ((u * (lam + shrink * lam.mean()) ** -alpha) @ u.T).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders trained with model.pair_memory, not whitened")
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.25, 0.4, 0.5],
                    help="eigenvalue powers α (0.5: plain whitening, what model.pair_memory.whiten does)")
    ap.add_argument("--shrink", type=float, nargs="+", default=[0.3, 1.0, 3.0],
                    help="shrinkages ε, in units of the mean eigenvalue (1: what model.pair_memory.whiten does)")
    ap.add_argument("--out", default=None, help="JSON lines: one per run and setting")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    import xmodal
    from xmodal.config import load_config
    from xmodal.data.manifest import read_manifest
    from xmodal.evaluation.evaluate import evaluate_retrieval

    settings = [("none", 0.0, 0.0)] + list(itertools.product(("image", "text", "both"), args.alpha, args.shrink))
    rows = []
    for run in args.runs:
        model = xmodal.load(run)
        memory = model.pair_memory
        if memory is None or not len(memory) or memory.whiten:
            raise SystemExit(f"{run}: needs a pair memory without whitening (train it with configs/pretrain.yaml's "
                             f"memory and model.pair_memory.whiten=[])")
        manifest = load_config(Path(run) / "config.yaml").data.train
        if not Path(manifest).is_absolute():
            manifest = str(ROOT / manifest)
        corpus = Path(manifest).parent.name
        val = read_manifest(manifest, split="val", modalities=model.modalities).dataset
        rescored = Rescored(model, val)
        bank = {m: getattr(memory, f"{m}_features").float() for m in memory.modalities}
        for side, alpha, shrink in settings:
            w = {m: whitening(bank[m], alpha, shrink) if side in ("both", m) else None for m in memory.modalities}

            def forward(modality, feats, emb, w=w):  # PairMemory.forward with the whitening of this setting
                unit = F.normalize(feats.float() - getattr(memory, f"{modality}_mean"), dim=-1)
                b = bank[modality]
                if w[modality] is not None:
                    unit, b = F.normalize(unit @ w[modality], dim=-1), F.normalize(b @ w[modality], dim=-1)
                top, idx = (unit @ b.T).topk(min(memory.k, len(b)), dim=1)
                weights = top.clamp(min=0) ** memory.power
                weights = weights / weights.sum(1, keepdim=True).clamp(min=1e-12)
                partners = getattr(memory, f"{modality}_partners")
                near = F.normalize(torch.einsum("nk,nkd->nd", weights, partners[idx]), dim=-1)
                return F.normalize((1 - memory.weight) * emb + memory.weight * near, dim=-1)

            memory.forward = forward
            try:
                r = evaluate_retrieval(rescored, val)
            finally:
                del memory.forward
            rows.append({"run": str(run), "corpus": corpus, "side": side, "alpha": alpha, "shrink": shrink,
                         **{m: r[m] for m in METRICS}})
        print(f"{run}: {len(settings)} settings scored ({corpus}, {len(val)} val rows)", file=sys.stderr, flush=True)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))

    table = ranked(rows, settings, settings[0], key=lambda r: (r["side"], r["alpha"], r["shrink"]))
    corpora = sorted({r["corpus"] for r in rows})
    print(f"| whitened | α | ε | geo-mean | min | {' | '.join(f'{c} {m}' for c in corpora for m in METRICS)} |")
    print("|---|---:|---:|---:|---:|" + "---:|" * (len(corpora) * len(METRICS)))
    for g, low, s, cells in table:
        print(f"| {s[0]} | {s[1]:g} | {s[2]:g} | {g:.3f} | {low:.3f} | "
              + " | ".join(f"{v:.3f} ({r:.3f})" for v, r in cells.values()) + " |")


if __name__ == "__main__":
    main()
