"""Does a fused image+text head beat the text head on the Open Clip Art category (22 classes, full captions)?
scripts/fusion_sweep.py answered "a tie within noise" on the 766 test drawings; this study asks the same question
with every one of the 7,326 drawings held out once, by stratified k-fold cross-validation.

    .venv/bin/python scripts/fusion_cv.py --out runs/fusion_cv          # ~1 h on 2 shared cores

For each fold k (rows stratified by label, shuffled with ``--split-seed``): test = fold k, val = fold k+1 (mod K),
train = the rest. Nothing is shared between folds except the packaged frozen towers:

1. A shared space is pretrained on the fold's train rows only (``configs/pretrain.yaml``, the drawings at 128 px as
   in scripts/quickstart.sh), so no test or val drawing was ever seen, not even unlabelled.
2. Heads on that space (``configs/finetune_clipart_category.yaml``, val as its eval split): the text head over the
   ``dropout`` grid, fused image+text heads over ``fusion`` × ``dropout`` (no modality dropout: every row has both),
   and the image head (shipped settings). The text and the fused config with the best **val** accuracy are chosen
   per fold; test is only read for the chosen ones' report (every config's test accuracy is kept in the JSON).
3. Reference: the product of the chosen text head's and the image head's class probabilities,
   ``log_softmax(text) + w * log_softmax(image)``, ``w`` chosen on val.

Reported: pooled test accuracy over all rows (each row tested once), per-fold fused − text, and an exact McNemar
test on the pooled paired rows. Fold manifests are written next to the clipart manifest (the image paths stay
relative); runs are kept under ``--out`` and reused, so an interrupted study resumes.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import random
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from compare_tasks import finetune, run_or_reload, split  # noqa: E402 - imports xmodal.cli first (environment)
from fusion_sweep import acc, logits_and_labels, mcnemar_p  # noqa: E402
import torch  # noqa: E402

from xmodal.config import load_config  # noqa: E402
from xmodal.training.engine import train  # noqa: E402

CONFIG = "finetune_clipart_category.yaml"
FUSIONS = ("concat", "gated", "attention", "late_prob")
DROPOUTS = (0.1, 0.3, 0.5)
W_GRID = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)


def read_rows(manifest: Path) -> tuple[list[str], list[dict]]:
    with open(manifest, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def assign_folds(rows: list[dict], k: int, seed: int) -> dict[str, int]:
    """Row id -> fold. Rows are sorted by label, shuffled within each label, and dealt round-robin, so every fold
    has each class's share (±1 row)."""
    by_label = defaultdict(list)
    for r in rows:
        by_label[r["label"]].append(r)
    rng = random.Random(seed)
    fold_of = {}
    dealt = 0
    for label in sorted(by_label):
        group = by_label[label]
        rng.shuffle(group)
        for r in group:
            fold_of[r["id"]] = dealt % k
            dealt += 1
    return fold_of


def fold_manifests(manifest: Path, k: int, seed: int) -> list[Path]:
    """K copies of ``manifest`` whose ``split`` column says train/val/test for fold 0..K-1 (:func:`assign_folds`)."""
    fields, rows = read_rows(manifest)
    fold_of = assign_folds(rows, k, seed)
    paths = []
    for fold in range(k):
        path = manifest.with_name(f"{manifest.stem}_cv{k}_seed{seed}_fold{fold}.csv")
        role = {fold: "test", (fold + 1) % k: "val"}
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            for r in rows:
                w.writerow({**r, "split": role.get(fold_of[r["id"]], "train")})
        paths.append(path)
    return paths


def pretrain(manifest: Path, out: Path, seed: int) -> Path:
    if not (out / "model.json").is_file():
        shutil.rmtree(out, ignore_errors=True)  # an interrupted earlier try: start it again
        cfg = load_config(ROOT / "configs" / "pretrain.yaml", [
            f"output_dir={out}", f"seed={seed}", f"data.train={manifest}", "data.eval_split=val",
            "model.towers.image.image_size=128", "log.backend=none", "train.progress=false"])
        t0 = time.perf_counter()
        train(cfg)
        shutil.rmtree(out / "checkpoints")  # only for resuming this run: ~120 MB
        print(f"  pretrained {out}: {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def grid() -> dict[str, list[str]]:
    g = {f"text d{d}": ["tasks.category.modalities=[text]", f"tasks.category.dropout={d}"] for d in DROPOUTS}
    g |= {f"fused {f} d{d}": [f"tasks.category.fusion={f}", f"tasks.category.dropout={d}"]
          for f in FUSIONS for d in DROPOUTS}
    return g


def study(args) -> dict:
    out, t_start = Path(args.out), time.perf_counter()
    manifests = fold_manifests(Path(args.data) / "openclipart" / "manifest.csv", args.folds, args.split_seed)
    res: dict = {"folds": args.folds, "split_seed": args.split_seed, "seed": args.seed, "per_fold": {},
                 "manifest": str(Path(args.data) / "openclipart" / "manifest.csv")}
    configs = grid()
    for fold, manifest in enumerate(manifests):
        if args.only_folds and fold not in args.only_folds:
            continue
        d = out / f"fold{fold}"
        print(f"fold {fold}: {manifest.name}  [{time.perf_counter() - t_start:.0f} s total]", flush=True)
        space = str(pretrain(manifest, d / "pretrain", args.seed))
        data = {s: split(manifest, s, ["image", "text"]) for s in ("val", "test")}
        common = [f"tasks.category.train={manifest}", "tasks.category.eval_split=val",
                  "tasks.category.modality_dropout=0"]
        f: dict = {"n_test": len(data["test"]), "val": {}, "test": {}}
        logits = {}
        for name, extra in {**configs, "image": ["tasks.category.modalities=[image]"]}.items():
            run = d / name.replace(" ", "_")
            finetune(CONFIG, run, args.seed, space, common + extra)
            mods = ["text"] if name.startswith("text") else ["image"] if name == "image" else ["image", "text"]
            logits[name] = {s: logits_and_labels(run, data[s], mods) for s in ("val", "test")}
            f["val"][name], f["test"][name] = (acc(*logits[name][s]) for s in ("val", "test"))
        best = lambda prefix: max((n for n in configs if n.startswith(prefix)), key=lambda n: f["val"][n])  # noqa: E731
        f["chosen"] = {"text": best("text "), "fused": best("fused ")}
        y = {s: logits["image"][s][1] for s in ("val", "test")}
        lsm = {k: {s: torch.log_softmax(logits[n][s][0], -1) for s in ("val", "test")}
               for k, n in (("text", f["chosen"]["text"]), ("image", "image"))}
        curve = {w: acc(lsm["text"]["val"] + w * lsm["image"]["val"], y["val"]) for w in W_GRID}
        f["poe_w"] = max(W_GRID, key=lambda w: (curve[w], -w))
        poe = lsm["text"]["test"] + f["poe_w"] * lsm["image"]["test"]
        right = {k: (logits[n]["test"][0].argmax(-1) == y["test"]) for k, n in
                 (("text", f["chosen"]["text"]), ("fused", f["chosen"]["fused"]), ("image", "image"))}
        right["poe"] = poe.argmax(-1) == y["test"]
        f["right"] = {k: v.int().tolist() for k, v in right.items()}  # per test row, manifest order
        res["per_fold"][str(fold)] = f
        print(f"fold {fold}: chosen {f['chosen']}, test " + ", ".join(
            f"{k} {statistics.mean(v):.4f}" for k, v in f["right"].items()) + f", PoE w={f['poe_w']}", flush=True)
        (out / "results.json").write_text(json.dumps(res, indent=2))
    res["wall_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res


def drawings_under_several_labels(res: dict) -> list[bool]:
    """Per pooled test row (fold by fold, manifest order, as in ``right``): is the very same drawing (byte-identical
    image file) also filed under another category? No head can tell such rows apart by image, and their captions
    differ by a keyword or two at most."""
    manifest = ROOT / res.get("manifest", "data/openclipart/manifest.csv")
    _, rows = read_rows(manifest)
    digest = {r["id"]: hashlib.sha256((manifest.parent / r["image"]).read_bytes()).hexdigest() for r in rows}
    labels = defaultdict(set)
    for r in rows:
        labels[digest[r["id"]]].add(r["label"])
    fold_of = assign_folds(rows, res["folds"], res["split_seed"])
    return [len(labels[digest[r["id"]]]) > 1 for k in sorted(res["per_fold"], key=int) for r in rows
            if fold_of[r["id"]] == int(k)]


def tables(res: dict) -> str:
    folds = sorted(res["per_fold"], key=int)
    pf = [res["per_fold"][k] for k in folds]
    heads = (("image head", "image"), ("text head (dropout chosen on val)", "text"),
             ("fused head (fusion and dropout chosen on val)", "fused"),
             ("PoE: log_softmax(text) + w·log_softmax(image), w on val", "poe"))
    pooled = {k: [r for f in pf for r in f["right"][k]] for _, k in heads}
    n = len(pooled["text"])
    lines = [f"Stratified {res['folds']}-fold cross-validation over the Open Clip Art manifest (split seed "
             f"{res['split_seed']}, training seed {res['seed']}); {len(folds)} fold(s) done, {n} test rows in all, "
             "each fold on its own pretrained space.", "",
             "| head (test accuracy) | " + " | ".join(f"fold {k}" for k in folds) + " | pooled |",
             "|---|" + "---|" * (len(folds) + 1)]
    for label, k in heads:
        lines.append(f"| {label} | " + " | ".join(f"{statistics.mean(f['right'][k]):.4f}" for f in pf)
                     + f" | **{statistics.mean(pooled[k]):.4f}** |")
    lines.append("| chosen text / fused config | " + " | ".join(
        f"{f['chosen']['text'][5:]} / {f['chosen']['fused'][6:]}" for f in pf) + " | |")
    lines.append("| PoE image weight w | " + " | ".join(str(f["poe_w"]) for f in pf) + " | |")
    lines += ["", "| paired on the same rows | fused vs text | PoE vs text |", "|---|---|---|"]
    stats = {}
    for k in ("fused", "poe"):
        b = sum(1 for a, t in zip(pooled[k], pooled["text"]) if a and not t)
        c = sum(1 for a, t in zip(pooled[k], pooled["text"]) if t and not a)
        diffs = [statistics.mean(f["right"][k]) - statistics.mean(f["right"]["text"]) for f in pf]
        spread = f" ± {statistics.stdev(diffs):.4f}" if len(diffs) > 1 else ""
        stats[k] = {"diff": f"{(b - c) / n:+.4f} (per fold {statistics.mean(diffs):+.4f}{spread})",
                    "b": f"{b}", "c": f"{c}", "p": f"{mcnemar_p(b, c):.3g}"}
    for label, key in (("accuracy difference, pooled", "diff"), ("right where text is wrong", "b"),
                       ("wrong where text is right", "c"), ("exact McNemar p (two-sided)", "p")):
        lines.append(f"| {label} | {stats['fused'][key]} | {stats['poe'][key]} |")
    t_wrong_i_right = sum(1 for i, t in zip(pooled["image"], pooled["text"]) if i and not t)
    lines += ["", f"Text head wrong and image head right: {t_wrong_i_right} rows (the most any fusion could gain); "
                  f"binomial sampling std of one accuracy at n = {n}: "
                  f"{math.sqrt(statistics.mean(pooled['text']) * (1 - statistics.mean(pooled['text'])) / n):.4f}. "
                  f"Wall time: {res.get('wall_s', float('nan')):.0f} s."]
    several = drawings_under_several_labels(res)
    if len(several) == n:
        lines += ["", "Where the errors are: the same drawing (a byte-identical image) filed under two or more "
                  "categories, against every other row.", "",
                  "| test rows | n | image head | text head | fused head | text wrong, image right |",
                  "|---|---|---|---|---|---|"]
        for label, keep in (("same drawing under another label too", True), ("all other rows", False)):
            idx = [i for i, s in enumerate(several) if s == keep]
            mean = {k: statistics.mean(pooled[k][i] for i in idx) for k in ("image", "text", "fused")}
            rescue = sum(1 for i in idx if pooled["image"][i] and not pooled["text"][i])
            lines.append(f"| {label} | {len(idx)} | {mean['image']:.4f} | {mean['text']:.4f} | "
                         f"{mean['fused']:.4f} | {rescue} |")
    return "\n".join(lines)


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data", help="folder holding the prepared corpora (openclipart)")
    p.add_argument("--out", default="runs/fusion_cv")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--only-folds", type=int, nargs="+", help="run these folds only (a smoke test)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the fold assignment")
    p.add_argument("--seed", type=int, default=0, help="training seed of every run")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--table-only", action="store_true", help="print the tables of an earlier results.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return run_or_reload(Path(args.out), args.table_only, lambda: study(args), tables)


if __name__ == "__main__":
    sys.exit(cli())
