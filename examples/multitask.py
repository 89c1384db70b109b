"""Two task heads on one shared space, trained together from Python, then used for predictions.

Starts from a pretrained run (its towers and projections), adds a clothing classifier that reads images
(Fashion-MNIST) and a sentiment head that reads text (Rotten Tomatoes), trains both at once with
``xmodal.training.engine.train``, loads the result with ``xmodal.load`` and predicts on test rows it never saw.

    bash scripts/quickstart.sh && .venv/bin/xmodal prepare fashion-mnist     # once: the run and the data
    .venv/bin/python examples/multitask.py      # ~1.5 min on 2 CPU cores; --steps 1000 for a better model,
                                                # --out runs/mt to keep the run, --max-rows 300 for a quick look
"""
import argparse
import tempfile

import xmodal
from xmodal.config import config_from_dict
from xmodal.data import read_manifest
from xmodal.training import train

TEST_ROWS = 300  # test rows scored per task
MY_REVIEWS = ["A gripping, beautifully shot film.", "Two hours of my life I will never get back."]


def show(model, task, inputs, truth=None, n_show=4):
    """Predict and print accuracy (when the truth is known) and a few rows with their label and probability."""
    probs = model.predict(task, inputs).softmax(-1)  # the head returns logits: [rows, classes]; rows sum to 1
    classes = model.tasks[task].classes  # the class names, in the head's output order
    labels = [classes[k] for k in probs.argmax(-1).tolist()]
    if truth:
        accuracy = sum(a == b for a, b in zip(labels, truth)) / len(truth)
        print(f"{task}: accuracy {accuracy:.3f} on {len(truth)} test rows")
    (values,) = inputs.values()
    for i in range(min(n_show, len(values))):
        print(f"  {labels[i]:<11} p={probs[i].max():.3f}  true: {truth[i] if truth else '-':<11} {values[i][:70]}")


def config(args, out):
    """The fine-tuning config, as a dict (the same fields as a YAML config: docs/configs.md)."""
    return config_from_dict({
        "output_dir": out,
        "init_from": args.run,  # towers, projections and temperature come from the pretrained run
        "tasks": {
            # eval_split None: skip the end-of-run evaluation on the whole test split; we score test rows below.
            "fashion": {"kind": "classification", "train": args.fashion, "modalities": ["image"],
                        "max_rows": args.max_rows, "eval_split": None},
            "sentiment": {"kind": "classification", "train": args.rotten, "modalities": ["text"], "hidden": 256,
                          "dropout": 0.1, "max_rows": args.max_rows, "eval_split": None},
        },
        # round_robin: the steps alternate between the tasks. multitask.weighting "uncertainty" learns one loss weight
        # per task (Kendall et al. 2018); "gradnorm" balances the tasks' gradient norms instead (Chen et al. 2018)
        # and, like "pcgrad", needs multitask.tasks_per_step: all (every task in every step).
        "multitask": {"sampling": "round_robin", "weighting": "uncertainty"},
        # Frozen towers (LiT): only the projections and the heads learn, over encoder features computed once.
        "train": {"max_steps": args.steps, "batch_size": 64, "lr": 1e-3, "warmup_steps": args.steps // 10,
                  "freeze_towers": True},
        "log": {"backend": "none"},
    })


def main(argv=None):
    p = argparse.ArgumentParser(description="a multi-task fine-tune from Python")
    p.add_argument("--run", default="runs/quickstart", help="the pretrained run to start from")
    p.add_argument("--fashion", default="data/fashion-mnist/manifest.csv")
    p.add_argument("--rotten", default="data/rotten-tomatoes/manifest.csv")
    p.add_argument("--out", default=None, help="run folder to keep (default: a temporary one, deleted at the end)")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps (each trains one task)")
    p.add_argument("--max-rows", type=int, default=2000, help="training rows per task")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        run = train(config(args, out=args.out or f"{tmp}/run"))  # returns the run folder
        model = xmodal.load(run)  # the trained model, heads included, in eval mode
        print(f"heads: {sorted(model.heads)}")

        fashion = read_manifest(args.fashion, split="test", max_rows=TEST_ROWS).rows.to_dict()
        show(model, "fashion", {"image": fashion["image"]}, fashion["label"])
        reviews = read_manifest(args.rotten, split="test", max_rows=TEST_ROWS).rows.to_dict()
        show(model, "sentiment", {"text": reviews["text"]}, reviews["label"])
        show(model, "sentiment", {"text": MY_REVIEWS})  # any new text works, no manifest needed


if __name__ == "__main__":
    main()
