"""Can a fused image+text head beat the text-only head on the Open Clip Art category task (22 classes) beyond seed
noise? A fair test: every choice is made on the **val** split, only the final comparison is on **test**.

    .venv/bin/python scripts/fusion_sweep.py --run runs/quickstart --out runs/fusion_sweep

1. Val grid (one process, frozen-tower features computed once in ``reuse_frozen_features()``), starting from the
   shipped ``configs/finetune_clipart_category.yaml`` with ``tasks.category.eval_split=val``:
   * fused image+text head: ``tasks.category.fusion`` in {concat, gated, attention, late} ×
     ``tasks.category.dropout`` in {0.1, 0.3, 0.5} × ``tasks.category.modality_dropout`` in {0, 0.1};
   * text-only head (``tasks.category.modalities=[text]``, ``modality_dropout=0`` as scripts/compare_tasks.py builds
     it): the same ``dropout`` grid — both sides get the same tuning knobs (head dropout) over the same
     ``--grid-seeds``; each config is scored by its mean val accuracy over those seeds.
2. The best fused and the best text config (highest mean val accuracy; ties go to the earlier grid entry), plus the
   image-only head (shipped config, ``modalities=[image]``, ``modality_dropout=0``), are trained with ``--seeds``
   (default 0 1 2) and evaluated on test.
3. Reference: product of experts of the separately trained text and image heads of each seed,
   ``log_softmax(text) + w * log_softmax(image)``, ``w`` chosen on val from ``W_GRID`` (ties: the smaller w),
   applied to test. Logits come from ``xmodal.model.load(run).predict("category", {modality: [...]})``; class order
   is the run's ``tasks.category.classes`` (the sorted train labels).

Also reported: per-seed paired test differences fused − text with their discordant rows (fused right/text wrong vs
the reverse, exact two-sided McNemar p) and the binomial test-set sampling std sqrt(p(1-p)/n).

Everything is written under ``--out`` (``results.json``, ``tables.md``, one run folder per trained head); finished
runs are reused, so an interrupted sweep resumes. Reuses ``finetune`` / ``split`` / ``mean_std`` from
scripts/compare_tasks.py. Defaults to 1 torch thread (``--threads``): the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from compare_tasks import FUSIONS, finetune, mean_std, run_or_reload, split  # noqa: E402 - imports xmodal.cli first (environment)
import torch  # noqa: E402

from xmodal.model import load  # noqa: E402

CONFIG = "finetune_clipart_category.yaml"
DROPOUTS = (0.1, 0.3, 0.5)
MODALITY_DROPOUTS = (0.0, 0.1)
W_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)
MANIFEST = "openclipart/manifest.csv"


def fused_grid(fusions) -> dict[str, list[str]]:
    return {f"fused {f} d{d} md{md}": [f"tasks.category.fusion={f}", f"tasks.category.dropout={d}",
                                         f"tasks.category.modality_dropout={md}"]
            for f in fusions for d in DROPOUTS for md in MODALITY_DROPOUTS}


def text_grid() -> dict[str, list[str]]:
    return {f"text d{d}": ["tasks.category.modalities=[text]", "tasks.category.modality_dropout=0",
                           f"tasks.category.dropout={d}"] for d in DROPOUTS}


IMAGE = ["tasks.category.modalities=[image]", "tasks.category.modality_dropout=0"]


def slug(name: str) -> str:
    return name.replace(" ", "_")


def logits_and_labels(run_dir: Path, data, modalities: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained head's logits on ``data`` (given ``modalities``) and the class indices of its labels."""
    model = load(run_dir)
    classes = model.tasks["category"].classes
    index = {c: i for i, c in enumerate(classes)}
    logits = model.predict("category", {m: list(data[m]) for m in modalities})
    y = torch.tensor([index[str(v)] for v in data["label"]])
    return logits, y


def acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar (binomial) p-value for b vs c discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def sweep(args) -> dict:
    run, out, t_start = args.run, Path(args.out), time.perf_counter()
    manifest = Path(args.data) / MANIFEST
    res: dict = {"run": args.run, "grid_seeds": args.grid_seeds, "seeds": args.seeds, "grid": {}, "final": {},
                 "poe": {}, "paired": {}}
    grid = {**fused_grid(args.fusions), **text_grid()}
    save = lambda: (out / "results.json").write_text(json.dumps(res, indent=2))  # noqa: E731

    # 1. val grid
    print(f"val grid: {len(grid)} configs x seeds {args.grid_seeds}", flush=True)
    for seed in args.grid_seeds:  # seed-major: a cut sweep still has a complete grid for the first seed(s)
        for name, extra in grid.items():
            t0 = time.perf_counter()
            ev = finetune(CONFIG, out / "grid" / f"seed{seed}" / slug(name), seed, run,
                          ["tasks.category.eval_split=val", *extra])
            g = res["grid"].setdefault(name, {"overrides": extra, "val_acc": {}, "seconds": 0.0})
            g["val_acc"][str(seed)] = ev["category/accuracy"]
            g["seconds"] += time.perf_counter() - t0
            g["mean"] = statistics.mean(g["val_acc"].values())
            print(f"  seed {seed} {name}: val {ev['category/accuracy']:.4f}  "
                  f"[{time.perf_counter() - t_start:.0f} s total]", flush=True)
            save()

    def best(prefix: str) -> str:
        names = [n for n in grid if n.startswith(prefix)]
        return max(names, key=lambda n: (res["grid"][n]["mean"], -names.index(n)))

    winners = {"fused": best("fused "), "text": best("text ")}
    res["winners"] = winners
    print(f"winners on val: {winners}", flush=True)

    # 2. winners (and the image head) on test, several seeds
    heads = {"fused": grid[winners["fused"]], "text": grid[winners["text"]], "image": IMAGE}
    val = split(manifest, "val", ["image", "text"])
    test = split(manifest, "test", ["image", "text"])
    mods = {"fused": ["image", "text"], "text": ["text"], "image": ["image"]}
    for seed in args.seeds:
        d = out / "final" / f"seed{seed}"
        logits = {}
        for key, extra in heads.items():
            folder = d / slug(winners.get(key, key))  # named by config: a resumed sweep never reuses a stale run
            ev = finetune(CONFIG, folder, seed, run, ["tasks.category.eval_split=test", *extra])
            res["final"].setdefault(key, {})[str(seed)] = ev["category/accuracy"]
            logits[key] = {s: logits_and_labels(folder, data, mods[key]) for s, data in (("val", val),
                                                                                       ("test", test))}
            res["final"][key + " (val)"] = {**res["final"].get(key + " (val)", {}),
                                            str(seed): acc(*logits[key]["val"])}
            # the run's own test evaluation and predict() must agree
            assert abs(acc(*logits[key]["test"]) - ev["category/accuracy"]) < 1e-3, (key, seed)
        # 3. product of experts of the separate text and image heads, w chosen on val
        lsm = {k: {s: torch.log_softmax(logits[k][s][0], -1) for s in ("val", "test")} for k in ("text", "image")}
        y = {s: logits["text"][s][1] for s in ("val", "test")}
        val_curve = {w: acc(lsm["text"]["val"] + w * lsm["image"]["val"], y["val"]) for w in W_GRID}
        w = max(W_GRID, key=lambda w: (val_curve[w], -w))
        res["poe"][str(seed)] = {"w": w, "val": val_curve[w], "test": acc(lsm["text"]["test"] + w *
                                                                          lsm["image"]["test"], y["test"]),
                                 "val_curve": {str(k): v for k, v in val_curve.items()}}
        # paired comparison on the same test rows
        right = {k: logits[k]["test"][0].argmax(-1) == y["test"] for k in ("fused", "text", "image")}
        b = int((right["fused"] & ~right["text"]).sum())
        c = int((~right["fused"] & right["text"]).sum())
        res["paired"][str(seed)] = {
            "fused - text": float(right["fused"].float().mean() - right["text"].float().mean()),
            "fused right, text wrong": b, "fused wrong, text right": c, "mcnemar_p": mcnemar_p(b, c),
            "oracle text|image": float((right["text"] | right["image"]).float().mean()),
            "text wrong, image right": int((~right["text"] & right["image"]).sum())}
        print(f"seed {seed}: " + ", ".join(f"{k} {res['final'][k][str(seed)]:.4f}" for k in heads)
              + f", PoE w={w} {res['poe'][str(seed)]['test']:.4f}  [{time.perf_counter() - t_start:.0f} s total]",
              flush=True)
        save()
    res["n_test"], res["n_val"] = len(test), len(val)
    res["wall_s"] = time.perf_counter() - t_start
    save()
    return res


def tables(res: dict) -> str:
    seeds = [str(s) for s in res["seeds"]]
    gs = [str(s) for s in res["grid_seeds"]]
    lines = [f"Init `{res['run']}`; val grid over seed(s) {', '.join(gs)} (n_val = {res.get('n_val', '?')}); "
             f"test over seeds {', '.join(seeds)} (n_test = {res.get('n_test', '?')}). Mean ± sample std.", "",
             "| config (val accuracy) | " + " | ".join(f"seed {s}" for s in gs) + " | mean |",
             "|---|" + "---|" * (len(gs) + 1)]
    for name, g in sorted(res["grid"].items(), key=lambda kv: -kv[1]["mean"]):
        mark = " **(chosen)**" if name in res.get("winners", {}).values() else ""
        lines.append(f"| {name}{mark} | " + " | ".join(f"{g['val_acc'].get(s, float('nan')):.4f}" for s in gs)
                     + f" | {g['mean']:.4f} |")
    if not res["final"]:
        return "\n".join(lines)
    w = res["winners"]
    lines += ["", "| head (test accuracy) | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | "
              "val mean |", "|---|" + "---|" * (len(seeds) + 2)]
    rows = [("image head (shipped config)", "image"), (f"text head ({w['text']})", "text"),
            (f"fused head ({w['fused']})", "fused")]
    for label, key in rows:
        vals = [res["final"][key][s] for s in seeds if s in res["final"][key]]
        vvals = [res["final"][key + " (val)"][s] for s in seeds if s in res["final"][key]]
        lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {mean_std(vals)} | "
                     f"{statistics.mean(vvals):.4f} |")
    poe = [res["poe"][s] for s in seeds if s in res["poe"]]
    lines.append("| PoE: log_softmax(text) + w·log_softmax(image), w on val | " + " | ".join(
        f"{p['test']:.4f} (w={p['w']})" for p in poe) + f" | {mean_std([p['test'] for p in poe])} | "
        f"{statistics.mean(p['val'] for p in poe):.4f} |")
    lines += ["", "| paired, test | " + " | ".join(f"seed {s}" for s in seeds) + " |",
              "|---|" + "---|" * len(seeds)]
    for k in ("fused - text", "fused right, text wrong", "fused wrong, text right", "mcnemar_p",
              "text wrong, image right", "oracle text|image"):
        vals = [res["paired"][s][k] for s in seeds if s in res["paired"]]
        lines.append(f"| {k} | " + " | ".join(f"{v:+.4f}" if k == "fused - text" else
                                               (f"{v:.3f}" if isinstance(v, float) else str(v)) for v in vals) + " |")
    n = res.get("n_test", 766)
    p = statistics.mean(res["final"]["text"].values())
    lines += ["", f"Binomial test-set sampling std at p = {p:.3f}, n = {n}: sqrt(p(1-p)/n) = "
                  f"{math.sqrt(p * (1 - p) / n):.4f}. Wall time: {res.get('wall_s', float('nan')):.0f} s."]
    return "\n".join(lines)


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/quickstart", help="the pretrained run (the shared space)")
    p.add_argument("--data", default="data", help="folder holding the prepared corpora (openclipart)")
    p.add_argument("--out", default="runs/fusion_sweep")
    p.add_argument("--grid-seeds", type=int, nargs="+", default=[0, 1], help="seeds of the val grid")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the final test runs")
    p.add_argument("--fusions", nargs="+", default=list(FUSIONS), choices=list(FUSIONS))
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--table-only", action="store_true", help="print the tables of an earlier results.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return run_or_reload(Path(args.out), args.table_only, lambda: sweep(args), tables)


if __name__ == "__main__":
    sys.exit(cli())
