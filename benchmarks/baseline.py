"""The bar every default must clear (issue #17): what a user writes in twenty lines — the same two frozen packaged
towers as configs/pretrain.yaml (EfficientNet-Lite0, all-MiniLM-L6-v2), one linear projection each into 256-d,
open_clip's own ``ClipLoss``, a fixed 300 steps of AdamW (lr 1e-3, batch 256), no selection — against
``xmodal pretrain --config <shipped config>`` + ``xmodal evaluate`` on the same test split, per corpus and seed.

    python benchmarks/baseline.py                                   # both corpora, seeds 0 1 2
    python benchmarks/baseline.py --corpus openmoji --seeds 0 --out runs/baseline/results.json
    python benchmarks/baseline.py --out runs/baseline/results.json --table   # print the saved table, run nothing

* **Same metric code path**: the baseline's projections are loaded into an ``XModalModel`` with linear projections
  over the same towers, and scored by :func:`xmodal.evaluation.evaluate.evaluate` — the function ``xmodal evaluate``
  calls — on the manifest's test split read by ``read_manifest`` (retrieval R@1/5/10 both ways, and zero-shot
  classification of the images into the ``label`` column with its majority-class rate, where the corpus has one).
* **Frozen features embedded once**: both sides read the towers' features from xmodal's feature cache
  (``$XMODAL_CACHE``, default ``~/.cache/xmodal/features``; the baseline uses the same keys as ``xmodal pretrain``),
  so after the first embedding each run costs only its projections.
* **xmodal's side** runs as a user would, in a subprocess: ``xmodal pretrain --config CONFIG data.train=M
  output_dir=RUN seed=S model.towers.image.image_size=SIZE log.backend=none``, then ``xmodal evaluate --run RUN
  --manifest M --split test --out RUN/eval_test.json``. Whatever the config does (its epochs, its model selection)
  is what is measured.
* ``--out``: every finished (corpus, system, seed) is saved at once (atomically) with the commit and the config's
  hash; a later call with the same ``--out`` skips what is there (``--rerun`` repeats it) and ``--table`` only
  prints it. Figures: docs/results.md ("Baseline vs default").
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the xmodal CLI: shared cores (docs/benchmarks.md)

# name → (manifest, image size): both corpora are rendered at 128 px, the size the quickstart reads them at.
CORPORA = {"openclipart": ("data/openclipart/manifest.csv", 128), "openmoji": ("data/openmoji/manifest.csv", 128)}
STEPS, BATCH, LR, EMBED_DIM = 300, 256, 1e-3, 256
METRICS = ["text->image/R@1", "image->text/R@1", "text->image/R@5", "image->text/R@5", "text->image/R@10",
           "image->text/R@10"]
SYSTEMS = ("xmodal", "baseline")


def baseline_model_config(image_size: int) -> dict:
    """The baseline's towers, fixed here (not read from the config under test, so a changed default cannot move
    the bar): the packaged EfficientNet-Lite0 and MiniLM, frozen, each with one linear projection."""
    return {"embed_dim": EMBED_DIM, "loss": "clip", "towers": {
        "image": {"kind": "efficientnet_lite0", "pretrained": "package", "freeze": True, "projection": "linear",
                  "image_size": image_size, "augment": False},
        "text": {"kind": "hf", "name": "minilm", "freeze": True, "projection": "linear", "context_length": 64}}}


# ------------------------------------------------------------------------------------------------------- baseline

def train_baseline(feats_image, feats_text, seed: int, model) -> float:
    """The twenty lines a user writes: linear projections (the model's own ``nn.Linear`` heads, re-initialised from
    ``seed``), a learnable temperature (CLIP's init 1/0.07, clamped at 100 as open_clip's loop does), open_clip's
    ``ClipLoss``, AdamW, ``STEPS`` steps of ``BATCH`` pairs drawn epoch by epoch. → the last step's loss."""
    import torch
    import torch.nn.functional as F
    from open_clip import ClipLoss

    torch.manual_seed(seed)
    proj_i, proj_t = model.towers["image"].projection, model.towers["text"].projection
    proj_i.reset_parameters()
    proj_t.reset_parameters()
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    opt = torch.optim.AdamW([*proj_i.parameters(), *proj_t.parameters(), logit_scale], lr=LR)
    loss_fn = ClipLoss()
    gen = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    for _ in range(STEPS):
        if len(order) < BATCH:
            order = torch.cat([order, torch.randperm(len(feats_image), generator=gen)])
        idx, order = order[:BATCH], order[BATCH:]
        loss = loss_fn(F.normalize(proj_i(feats_image[idx]), dim=-1), F.normalize(proj_t(feats_text[idx]), dim=-1),
                       logit_scale.exp())
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            logit_scale.clamp_(0, math.log(100))
    model.logit_scale.data.fill_(logit_scale.item())
    return float(loss.detach())


class Baseline:
    """One corpus: the baseline model built once, the train pairs' frozen features read from the cache once."""

    def __init__(self, manifest: str, image_size: int):
        import torch

        from xmodal.config.parsing import config_from_dict
        from xmodal.data.manifest import read_manifest
        from xmodal.feature_cache import precompute_features, tower_settings
        from xmodal.model import XModalModel

        cfg = config_from_dict({"model": baseline_model_config(image_size)}, source="benchmarks/baseline.py")
        self.model = XModalModel(cfg.model)
        train = read_manifest(manifest, split="train", modalities=["image", "text"]).dataset
        self.test = read_manifest(manifest, split="test", modalities=None, require_all=False).dataset
        feats = {}
        for m in ("image", "text"):
            values = train[m]
            cached = precompute_features(self.model.towers[m].encoder, self.model.transform(m), values,
                                         desc=f"baseline: {m} features", memo_key=tower_settings(m, cfg.model.towers[m]))
            feats[m] = torch.stack([torch.as_tensor(cached(v)) for v in values]).float()
        self.feats = feats

    def run(self, seed: int) -> dict:
        from xmodal.evaluation.evaluate import evaluate

        t0 = time.time()
        loss = train_baseline(self.feats["image"], self.feats["text"], seed, self.model)
        self.model.eval()
        metrics = evaluate(self.model, self.test)
        return {"metrics": metrics, "final_train_loss": loss, "seconds": round(time.time() - t0, 1),
                "train_pairs": len(self.feats["image"])}


# --------------------------------------------------------------------------------------------------------- xmodal

def run_xmodal(config: str, manifest: str, image_size: int, seed: int, run_dir: Path) -> dict:
    """``xmodal pretrain`` + ``xmodal evaluate --split test`` in subprocesses, on this worktree's code."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cli = [sys.executable, "-m", "xmodal.cli"]
    t0 = time.time()
    if run_dir.exists():  # this script's own folder from an earlier (unrecorded or --rerun) run: start afresh
        print(f"   replacing {run_dir} (an earlier run's folder)", flush=True)
        shutil.rmtree(run_dir)
    pretrain = [*cli, "pretrain", "--config", config, f"data.train={manifest}", f"output_dir={run_dir}",
                f"seed={seed}", f"model.towers.image.image_size={image_size}", "log.backend=none"]
    out = run_dir.with_name(run_dir.name + "-eval_test.json")
    evaluate = [*cli, "evaluate", "--run", str(run_dir), "--manifest", manifest, "--split", "test", "--json",
                "--out", str(out)]
    for cmd in (pretrain, evaluate):
        print("$ " + " ".join(cmd[1:]), flush=True)
        r = subprocess.run(cmd, env=env, cwd=ROOT)  # its progress and errors go straight to this terminal
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[2:4])} failed (exit {r.returncode}; its error is above)")
    selected = _selection_line(run_dir)
    return {"metrics": json.loads(out.read_text(encoding="utf-8")), "seconds": round(time.time() - t0, 1),
            "run": str(run_dir), **({"selection": selected} if selected else {})}


def _selection_line(run_dir: Path) -> str | None:
    """The run's own record of a model selection, if its train.log has one (the engine's wording may change)."""
    log = run_dir / "train.log"
    if not log.is_file():
        return None
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()
             if "select" in ln.lower()]
    return lines[-1][:300] if lines else None


# ---------------------------------------------------------------------------------------------------------- table

def summary(results: dict, corpus: str) -> dict[str, dict[str, tuple[float, float, int]]]:
    """system → metric → (mean, std over seeds, seeds)."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for system in SYSTEMS:
        runs = [r for r in results["runs"] if r["corpus"] == corpus and r["system"] == system]
        keys = METRICS + ["zero_shot/image/top1", "zero_shot/image/majority_top1"]
        for k in keys:
            vals = [r["metrics"][k] for r in runs if k in r["metrics"]]
            if vals:
                out.setdefault(system, {})[k] = (statistics.fmean(vals),
                                                 statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals))
    return out


def format_table(results: dict) -> str:
    lines = []
    meta = results.get("meta", {})
    lines.append(f"commit {meta.get('commit', '?')}{' (+ uncommitted changes)' if meta.get('dirty') else ''}, "
                 f"config {meta.get('config')} (sha1 {meta.get('config_sha1', '?')[:12]}), test split, mean ± std")
    for corpus in dict.fromkeys(r["corpus"] for r in results["runs"]):
        s = summary(results, corpus)
        lines.append(f"\n{corpus}")
        head = [f"{sys_} (n={next(iter(s[sys_].values()))[2]})" if sys_ in s else sys_ for sys_ in SYSTEMS]
        lines.append(f"  {'metric':<30}" + "".join(f"{h:>22}" for h in head) + f"{'xmodal/baseline':>18}")
        for k in METRICS + ["zero_shot/image/top1", "zero_shot/image/majority_top1"]:
            cells = {sys_: s.get(sys_, {}).get(k) for sys_ in SYSTEMS}
            if not any(cells.values()):
                continue
            row = f"  {k:<30}" + "".join(f"{c[0]:>14.3f} ± {c[1]:.3f}" if c else f"{'-':>22}"
                                         for c in cells.values())
            x, b = cells["xmodal"], cells["baseline"]
            row += f"{x[0] / b[0]:>17.2f}x" if x and b and b[0] > 0 else f"{'-':>18}"
            lines.append(row)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ main

def _git(*args: str) -> str:
    r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "?"


def _save(path: Path, results: dict) -> None:
    from xmodal.atomic import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(results, indent=2) + "\n", fsync=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--corpus", action="append", default=None, metavar="NAME[=MANIFEST]",
                   help=f"a corpus: {', '.join(CORPORA)} (their default manifests) or NAME=path/to/manifest.csv; "
                        f"repeatable (default: all)")
    p.add_argument("--image-size", type=int, default=None, help="image tower input size (default: the corpus's, 128)")
    p.add_argument("--config", default="configs/pretrain.yaml", help="xmodal's side (default configs/pretrain.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--out", default="runs/baseline/results.json", help="results JSON (read back, added to)")
    p.add_argument("--runs-dir", default=None, help="xmodal's run folders (default: beside --out)")
    p.add_argument("--rerun", action="store_true", help="run again what --out already holds")
    p.add_argument("--table", action="store_true", help="only print the table saved in --out")
    args = p.parse_args(argv)

    out = Path(args.out)
    if args.table:
        if not out.is_file():
            raise SystemExit(f"baseline.py: --table: {out}: no such results file")
        print(format_table(json.loads(out.read_text(encoding="utf-8"))))
        return 0
    corpora = {}
    for c in args.corpus or list(CORPORA):
        name, _, path = c.partition("=")
        if not path and name not in CORPORA:
            raise SystemExit(f"baseline.py: --corpus {c}: not one of {', '.join(CORPORA)}; give NAME=MANIFEST")
        manifest, size = (path, 128) if path else CORPORA[name]
        if not Path(manifest).is_file():
            hint = f" (xmodal prepare {name})" if name in CORPORA else ""
            raise SystemExit(f"baseline.py: --corpus {name}: {manifest}: no such manifest{hint}")
        corpora[name] = (manifest, args.image_size or size)
    config_sha1 = hashlib.sha1(Path(args.config).read_bytes()).hexdigest()
    results = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else {"runs": []}
    results["meta"] = {"commit": _git("rev-parse", "HEAD"), "dirty": bool(_git("status", "--porcelain", "-uno")),
                       "config": args.config, "config_sha1": config_sha1, "steps": STEPS, "batch": BATCH, "lr": LR}
    runs_dir = Path(args.runs_dir) if args.runs_dir else out.parent / "runs"

    import torch

    from xmodal.feature_cache import disk_cache, resolve_root

    torch.set_num_threads(int(os.environ.get("XMODAL_THREADS", "2")))
    with disk_cache(resolve_root(None)):
        for name, (manifest, size) in corpora.items():
            baseline = None
            for seed in args.seeds:
                for system in args.systems:
                    key = (name, system, seed)
                    done = [r for r in results["runs"] if (r["corpus"], r["system"], r["seed"]) == key]
                    if done and not args.rerun:
                        continue
                    print(f"== {name} / {system} / seed {seed}", flush=True)
                    if system == "baseline":
                        baseline = baseline or Baseline(manifest, size)
                        rec = baseline.run(seed)
                    else:
                        rec = run_xmodal(args.config, manifest, size, seed, runs_dir / f"{name}-xmodal-s{seed}")
                    rec.update(corpus=name, system=system, seed=seed, manifest=manifest, image_size=size,
                               commit=results["meta"]["commit"], config_sha1=config_sha1 if system == "xmodal" else None)
                    results["runs"] = [r for r in results["runs"] if (r["corpus"], r["system"], r["seed"]) != key]
                    results["runs"].append(rec)
                    _save(out, results)
                    m = rec["metrics"]
                    print(f"   t→i R@1 {m['text->image/R@1']:.3f}  i→t R@1 {m['image->text/R@1']:.3f}  "
                          f"({rec['seconds']:.0f} s)", flush=True)
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
