"""Zero-shot vs linear probe vs fine-tuned vs multi-task on the bundled real tasks, over several seeds: the tables
in docs/results.md. Every trained number comes from xmodal's own loop (`xmodal.training.engine.train`) started from one
pretrained run, with the shipped configs, and is measured on held-out splits (test movies, test drawings, the
Fashion-MNIST test set).

    python scripts/compare_tasks.py --run runs/quickstart --seeds 0 1 2 --out runs/compare

Needs `xmodal prepare openclipart fashion-mnist rotten-tomatoes` (data/) and scikit-learn (the logistic-regression
baselines: `pip install -e .[dev]`). Frozen towers' features are computed once for the whole study
(`reuse_frozen_features`), so the runs over cached features take seconds; `--tower-finetune` adds the one
configuration that trains a tower (MiniLM for sentiment, ~10-20 min per seed on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from xmodal.cli import main as _cli  # noqa: E402,F401 - sets the offline/threading environment first
import torch  # noqa: E402

from xmodal.config import load_config  # noqa: E402
from xmodal.data import read_manifest  # noqa: E402
from xmodal.training.engine import train  # noqa: E402
from xmodal.evaluation.evaluate import evaluate_retrieval, evaluate_task, evaluate_zero_shot  # noqa: E402
from xmodal.feature_cache import precompute_features, reuse_frozen_features  # noqa: E402
from xmodal.model import load  # noqa: E402

REVIEW_TEMPLATES = ("a {} review.", "a {} movie review.", "a {} opinion of a film.", "{}.")
FUSIONS = ("concat", "gated", "attention", "late")  # the shipped category config uses the first
PROBE = ["train.freeze_towers=true", "train.freeze_projections=true", "train.weight_decay=0", "train.lr=1e-2"]


def finetune(config: str, out: Path, seed: int, run: str, extra: list[str] = ()) -> dict:
    """Train one configuration; its held-out metrics (the run's final evaluation)."""
    if (out / "model.json").is_file():  # finished earlier: the study resumes where it stopped
        return json.loads((out / "model.json").read_text())["eval"]
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(ROOT / "configs" / config, [f"init_from={run}", f"output_dir={out}", f"seed={seed}",
                                                   "log.backend=none", "train.progress=false", *extra])
    t0 = time.perf_counter()
    train(cfg)
    shutil.rmtree(out / "checkpoints")  # only for resuming this run (which a study never does): ~120 MB each
    print(f"  {out.relative_to(out.parents[1])}: {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads((out / "model.json").read_text())["eval"]


def split(manifest: Path, name: str, modalities: list[str], max_rows: int | None = None):
    return read_manifest(manifest, split=name, modalities=modalities, max_rows=max_rows).dataset


def logistic_regression(model, modality: str, train_data, val_data, test_data, target: str) -> dict:
    """The first baseline a user would try: scikit-learn logistic regression on the frozen tower's own features
    (the packaged MiniLM's mean-pooled sentence embedding; EfficientNet's pooled features), C chosen on val."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    tower = model.towers[modality]
    key = (modality, repr(model.cfg.towers[modality]))
    feats = {}
    for name, data in (("train", train_data), ("val", val_data), ("test", test_data)):
        cached = precompute_features(tower.encoder, model.transform(modality), list(data[modality]),
                                     progress=False, memo_key=key)
        x = torch.stack([cached(v) for v in data[modality]])
        feats[name] = torch.nn.functional.normalize(x, dim=-1).numpy()
    y = {n: list(d[target]) for n, d in (("train", train_data), ("val", val_data), ("test", test_data))}
    best = max((LogisticRegression(C=c, max_iter=3000).fit(feats["train"], y["train"])
                for c in (0.01, 0.1, 1.0, 10.0, 100.0)), key=lambda m: m.score(feats["val"], y["val"]))
    pred = best.predict(feats["test"])
    return {"accuracy": float((pred == y["test"]).mean()),
            "macro_f1": float(f1_score(y["test"], pred, average="macro")), "C": float(best.C)}


def fused_by_subset(run_dir: Path, test, modalities=("image", "text")) -> dict:
    """Accuracy of a fused two-modality head given both, and given only one of them."""
    model = load(run_dir)
    out = {"both": evaluate_task(model, "category", test)["accuracy"]}
    for keep, drop in (modalities, modalities[::-1]):  # over the rows that have `keep` (all, on full data)
        alone = test.remove_columns(drop).filter(lambda value: value not in (None, ""), input_columns=keep)
        out[f"{keep} only"] = evaluate_task(model, "category", alone)["accuracy"]
    return out


def titles_manifest(manifest: Path) -> Path:
    """The clipart manifest with each caption cut to the drawing's title (``title`` column; empty where keywords
    carried the text: that row has no text), next to it so the image paths still resolve."""
    import csv
    out = manifest.with_name("manifest_titles.csv")
    with open(manifest, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "title" not in rows[0]:
        raise SystemExit(f"{manifest} has no title column: re-run `xmodal prepare openclipart` (it adds one)")
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "text", "label", "split"])
        w.writeheader()
        for r in rows:
            w.writerow({"id": r["id"], "image": r["image"], "text": r["title"], "label": r["label"],
                        "split": r["split"]})
    return out


def study(args) -> dict:
    data, out = Path(args.data), Path(args.out)
    fashion, rotten, clipart = (data / "fashion-mnist/manifest.csv", data / "rotten-tomatoes/manifest.csv",
                                data / "openclipart/manifest.csv")
    pre = load(args.run)
    res: dict = {"run": args.run, "seeds": args.seeds, "once": {}, "per_seed": {}}
    previous = out / "results.json"
    if previous.is_file() and json.loads(previous.read_text())["run"] == args.run:  # a study resumed
        res["once"] = json.loads(previous.read_text())["once"]
    once = res["once"]  # no randomness: zero-shot and sklearn baselines
    print("zero-shot and logistic-regression baselines", flush=True)
    r_test, f_test = split(rotten, "test", ["text"]), split(fashion, "test", ["image"])
    baselines = {
        "sentiment/zero-shot": lambda: evaluate_zero_shot(pre, r_test, "text", "sentiment", REVIEW_TEMPLATES),
        "sentiment/LR on frozen MiniLM": lambda: logistic_regression(
            pre, "text", split(rotten, "train", ["text"]), split(rotten, "val", ["text"]), r_test, "label"),
        "fashion/zero-shot": lambda: evaluate_zero_shot(pre, f_test, "image", "label"),
        "fashion/LR on frozen EfficientNet": lambda: logistic_regression(
            pre, "image", split(fashion, "train", ["image"], 10000), split(fashion, "val", ["image"], 2000),
            f_test, "label"),
        "clipart/zero-shot": lambda: evaluate_retrieval(pre, split(clipart, "test", ["image", "text"])),
    }
    for key, compute in baselines.items():
        if key not in once:
            once[key] = compute()
    c_test = split(clipart, "test", ["image", "text"])
    for seed in args.seeds:
        print(f"seed {seed}", flush=True)
        d, s = out / f"seed{seed}", {}
        s["sentiment/linear probe"] = finetune("finetune_sentiment.yaml", d / "sentiment_probe", seed, args.run,
                                               PROBE + ["tasks.sentiment.hidden=null", "tasks.sentiment.dropout=0"])
        s["sentiment/fine-tuned"] = finetune("finetune_sentiment.yaml", d / "sentiment", seed, args.run)
        if args.tower_finetune:
            s["sentiment/fine-tuned + MiniLM"] = finetune(
                "finetune_sentiment.yaml", d / "sentiment_tower", seed, args.run,
                ["train.freeze_towers=false", "train.encoder_lr=2e-5", "train.epochs=2", "train.batch_size=32"])
        s["fashion/linear probe"] = finetune("finetune_fashion_mnist.yaml", d / "fashion_probe", seed, args.run,
                                             PROBE)
        s["fashion/fine-tuned"] = finetune("finetune_fashion_mnist.yaml", d / "fashion", seed, args.run)
        s["clipart/fine-tuned"] = finetune("finetune_multitask.yaml", d / "clipart", seed, args.run,
                                           ["tasks={clipart: {kind: retrieval, train: "
                                            f"{clipart}, modalities: [image, text]}}}}"])
        s["multi-task"] = finetune("finetune_multitask.yaml", d / "multitask", seed, args.run)
        for mods in (["image"], ["text"]):
            s[f"category/{mods[0]} head"] = finetune(
                "finetune_clipart_category.yaml", d / f"category_{mods[0]}", seed, args.run,
                [f"tasks.category.modalities=[{mods[0]}]", "tasks.category.modality_dropout=0"])
        s["category/fused, no modality dropout"] = finetune(
            "finetune_clipart_category.yaml", d / "category_fused_nodrop", seed, args.run,
            ["tasks.category.modality_dropout=0"])
        s["category/fused"] = finetune("finetune_clipart_category.yaml", d / "category_fused", seed, args.run)
        for fusion in FUSIONS[1:]:
            s[f"category/fused {fusion}"] = finetune("finetune_clipart_category.yaml", d / f"category_{fusion}",
                                                     seed, args.run, [f"tasks.category.fusion={fusion}"])
        for name in ("category_fused_nodrop", "category_fused", *(f"category_{f}" for f in FUSIONS[1:])):
            s[f"category/{name} by subset"] = fused_by_subset(d / name, c_test)
        if args.titles:  # the same category task with the text cut to the title: both modalities carry signal
            titles = titles_manifest(clipart)
            t_test = read_manifest(titles, split="test", modalities=["image", "text"], require_all=False).dataset
            common = [f"tasks.category.train={titles}"]
            s["titles/text head"] = finetune(
                "finetune_clipart_category.yaml", d / "titles_text", seed, args.run,
                common + ["tasks.category.modalities=[text]", "tasks.category.modality_dropout=0"])
            for name, extra in (("titles_fused_nodrop", ["tasks.category.modality_dropout=0"]),
                                ("titles_fused", []),
                                ("titles_late_prob", ["tasks.category.fusion=late_prob",
                                                      "tasks.category.modality_dropout=0"])):
                s[f"titles/{name}"] = finetune("finetune_clipart_category.yaml", d / name, seed, args.run,
                                               common + extra)
                s[f"titles/{name} by subset"] = fused_by_subset(d / name, t_test)
        if args.audio_run:  # category from the drawing and its spoken title, on the image+text+audio space
            spoken = data / "spoken-clipart/manifest.csv"
            common = [f"tasks.category.train={spoken}", "data.allow_outside_root=true", "train.freeze_towers=true"]
            for mods in (["image"], ["audio"], ["image", "audio"]):
                key = "+".join(mods)
                s[f"spoken/{key}"] = finetune(
                    "finetune_clipart_category.yaml", d / f"spoken_{key}", seed, args.audio_run,
                    common + [f"tasks.category.modalities=[{', '.join(mods)}]"]
                    + ([] if len(mods) > 1 else ["tasks.category.modality_dropout=0"]))
            s_test = read_manifest(spoken, split="test", modalities=["image", "audio"],
                                   allow_outside_root=True).dataset
            s["spoken/image+audio by subset"] = fused_by_subset(d / "spoken_image+audio", s_test, ("image", "audio"))
        res["per_seed"][seed] = s
        (out / "results.json").write_text(json.dumps(res, indent=2))
    return res


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def tables(res: dict) -> str:
    """Markdown tables: mean ± standard deviation over seeds (sample std), n seeds."""
    seeds = list(res["per_seed"].values())
    once = res["once"]

    def col(key: str, metric: str) -> str:
        if key in once:
            return f"{once[key][metric]:.3f}"
        vals = [s[key][metric] for s in seeds if key in s and metric in s[key]]
        return mean_std(vals) if vals else "—"

    r10 = "text->image/R@10"
    done = [str(k) for k in res["per_seed"]]
    lines = [f"Mean ± std over {len(done)} seed(s) ({', '.join(done)}); init: `{res['run']}`.", "",
             "| task (held-out metric) | zero-shot | LR on frozen tower | linear probe | fine-tuned | multi-task |",
             "|---|---|---|---|---|---|",
             f"| sentiment, test movies (accuracy) | {once['sentiment/zero-shot']['zero_shot/top1']:.3f} | "
             f"{col('sentiment/LR on frozen MiniLM', 'accuracy')} | {col('sentiment/linear probe', 'sentiment/accuracy')}"
             f" | {col('sentiment/fine-tuned', 'sentiment/accuracy')} | {col('multi-task', 'sentiment/accuracy')} |",
             f"| Fashion-MNIST, test set (accuracy) | {once['fashion/zero-shot']['zero_shot/top1']:.3f} | "
             f"{col('fashion/LR on frozen EfficientNet', 'accuracy')} | {col('fashion/linear probe', 'fashion/accuracy')}"
             f" | {col('fashion/fine-tuned', 'fashion/accuracy')} | {col('multi-task', 'fashion/accuracy')} |",
             f"| Open Clip Art, test drawings (text→image R@10) | {once['clipart/zero-shot'][r10]:.3f} | — | — | "
             f"{col('clipart/fine-tuned', 'clipart/' + r10)} | {col('multi-task', 'clipart/' + r10)} |"]
    if any("sentiment/fine-tuned + MiniLM" in s for s in seeds):
        lines += ["", f"Sentiment with the MiniLM tower itself fine-tuned (2 epochs, encoder lr 2e-5): accuracy "
                      f"{col('sentiment/fine-tuned + MiniLM', 'sentiment/accuracy')}."]
    lines += ["", "Clipart category (22 classes) from image and text; fused heads trained with modality dropout 0.3 "
                  "unless said otherwise, evaluated with both modalities and with one removed.", "",
              "| clipart category, test drawings (accuracy) | both | image only | text only |", "|---|---|---|---|",
              f"| image head | — | {col('category/image head', 'category/accuracy')} | — |",
              f"| text head | — | — | {col('category/text head', 'category/accuracy')} |"]
    fused = [("fused: concat, no modality dropout", "category/category_fused_nodrop by subset"),
             ("fused: concat (the shipped config)", "category/category_fused by subset")]
    fused += [(f"fused: {f}", f"category/category_{f} by subset") for f in FUSIONS[1:]]
    for label, key in fused:
        lines.append(f"| {label} | {col(key, 'both')} | {col(key, 'image only')} | {col(key, 'text only')} |")
    if any("titles/text head" in s for s in seeds):
        lines += ["", "The same category task with the text cut to the drawing's **title** (no description, no "
                      "keywords; rows whose title is empty have no text): `--titles`.", "",
                  "| clipart category from image + title (accuracy) | both | image only | title only (the rows with "
                  "one) |",
                  "|---|---|---|---|",
                  f"| image head (as above) | — | {col('category/image head', 'category/accuracy')} | — |",
                  f"| title head | — | — | {col('titles/text head', 'category/accuracy')} |"]
        for label, key in (("fused: concat, no modality dropout", "titles/titles_fused_nodrop by subset"),
                           ("fused: concat (the shipped config)", "titles/titles_fused by subset"),
                           ("fused: late_prob, no modality dropout", "titles/titles_late_prob by subset")):
            lines.append(f"| {label} | {col(key, 'both')} | {col(key, 'image only')} | {col(key, 'text only')} |")
    if any("spoken/image" in s for s in seeds):
        sub = "spoken/image+audio by subset"
        lines += ["", "Category from the drawing and its *spoken* title (data/spoken-clipart, 215 test rows), on the "
                      "image+text+audio space of configs/pretrain_audio.yaml (towers frozen).", "",
                  "| spoken clipart category (accuracy) | both | image only | audio only |", "|---|---|---|---|",
                  f"| image head | — | {col('spoken/image', 'category/accuracy')} | — |",
                  f"| audio head | — | — | {col('spoken/audio', 'category/accuracy')} |",
                  f"| fused: concat + modality dropout 0.3 | {col(sub, 'both')} | {col(sub, 'image only')} | "
                  f"{col(sub, 'audio only')} |"]
    return "\n".join(lines)


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/quickstart", help="a pretrained run folder (the shared space)")
    p.add_argument("--data", default="data", help="folder holding the prepared corpora")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--tower-finetune", action="store_true", help="also fine-tune MiniLM for sentiment (slow)")
    p.add_argument("--titles", action="store_true", help="also the category task with the text cut to the title")
    p.add_argument("--audio-run", help="an image+text+audio run (configs/pretrain_audio.yaml): adds the category "
                                       "from image and spoken title (data/spoken-clipart)")
    p.add_argument("--table-only", action="store_true", help="print the tables of an earlier study's results.json")
    args = p.parse_args(argv)
    return run_or_reload(Path(args.out), args.table_only, lambda: study(args), tables)


def run_or_reload(out: Path, table_only: bool, run, tables) -> int:
    """Run a study (frozen features computed once for all its runs) or reload its ``results.json``; then write
    ``tables.md`` and print it. Shared with scripts/fusion_sweep.py."""
    if table_only:
        res = json.loads((out / "results.json").read_text())
    else:
        out.mkdir(parents=True, exist_ok=True)
        with reuse_frozen_features():
            res = run()
    table = tables(res)
    (out / "tables.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
