"""The model card (``README.md``) of an exported run, generated from the run itself: the hub's YAML metadata
(licence, library, tags, datasets, base model, a ``model-index`` holding the metrics of the run's final evaluation)
and a short body: what the model is, how to load it, what it was trained on, its intended use and limits."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..model import XModalModel
from ..model_files import EXPORT_SUBFOLDER

_PIPELINE = {"open_clip": "zero-shot-image-classification", "transformers": "zero-shot-image-classification"}


def training_data(run: Path, card: dict[str, Any]) -> list[str]:
    """The names of the manifests the model trained on: from the run's config.yaml, or, for an export (which keeps
    none), from what its card recorded when it was exported."""
    return _datasets(run) or [str(d) for d in card.get("datasets") or []]


def _datasets(run: Path) -> list[str]:
    """The manifests the run trained on (config.yaml's data.train and the tasks' train manifests), by folder name:
    ``data/openclipart/manifest.csv`` → ``openclipart``."""
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        return []
    cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8")) or {}
    paths = [(cfg.get("data") or {}).get("train")] + [t.get("train") for t in (cfg.get("tasks") or {}).values()]
    names = []
    for p in paths:
        if p:
            name = Path(p).parent.name if Path(p).suffix else Path(p).name
            if name and name not in names:
                names.append(name)
    return names


def _is_count(key: str) -> bool:
    """Sizes recorded next to the metrics (n_items, n_queries, n_classes): shown in the table, not hub metrics."""
    return key.rpartition("/")[2].startswith("n_")


def _model_index(name: str, card: dict[str, Any], datasets: list[str]) -> list[dict]:
    """One result per task of the run's final evaluation (``model.json``'s ``eval``)."""
    tasks = card.get("tasks") or {}
    metrics: dict[str, dict[str, float]] = {}
    for key, value in (card.get("eval") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not _is_count(key):
            head, _, rest = key.partition("/")  # "category/accuracy" (a task's), "text->image/R@1" (pretraining)
            task, metric = (head, rest) if head in tasks and rest else ("retrieval", key)
            metrics.setdefault(task, {})[metric] = float(value)
    dataset = {"name": datasets[0], "type": datasets[0]} if datasets else {"name": "unknown", "type": "unknown"}
    results = []
    for task, values in metrics.items():
        kind = (tasks.get(task) or {}).get("kind", "retrieval")
        results.append({"task": {"type": "text-classification" if kind != "retrieval" else "zero-shot-retrieval",
                                 "name": task},
                        "dataset": dataset,
                        "metrics": [{"type": k, "value": round(v, 6), "name": k} for k, v in sorted(values.items())]})
    return [{"name": name, "results": results}] if results else []


def model_card(model: XModalModel, card: dict[str, Any], run: str | os.PathLike, library: str | None,
               repo: str | None, license: str | None, out: str | os.PathLike | None = None) -> str:
    """The README.md of the export ``out`` of ``run``: hub metadata, how to load it, data, metrics, limits."""
    run = Path(run)
    exported = run.name == EXPORT_SUBFOLDER and not (run / "config.yaml").is_file()  # exporting an export again
    name = repo.split("/")[-1] if repo else (run.parent.name if exported else run.name)
    datasets = training_data(run, card)
    meta: dict[str, Any] = {"license": license or "other", "library_name": library or "xmodal",
                            "tags": ["xmodal", "contrastive", model.cfg.loss, *model.cfg.towers],
                            "pipeline_tag": _PIPELINE.get(library or "", "feature-extraction")}
    if license is None:  # the hub's "other" licence wants a name; the body asks the exporter to set one
        meta["license_name"] = "unspecified"
    if datasets:
        meta["datasets"] = datasets
    src = model.cfg.pretrained
    base = (card.get("model") or {}).get("pretrained") or {}  # the run's own card: the source it started from
    base_name = base.get("name") if isinstance(base, dict) else None
    if base_name and _hub_id(base_name, base.get("library")):
        meta["base_model"] = _hub_id(base_name, base.get("library"))
    index = _model_index(name, card, datasets)
    if index:
        meta["model-index"] = index
    towers = ", ".join(f"{m}: {t.kind}" + (f" {t.name}" if t.name and not os.path.isabs(t.name.split(':', 1)[-1])
                                            else "") for m, t in model.cfg.towers.items())
    # without a repo the card cannot know where the folder will live: its name, and a comment saying what it stands for
    load = f'xmodal.load("hf-hub:{repo}")' if repo else \
        f'xmodal.load("{Path(out).name if out else run.name}")  # the path of this folder'
    selection, last = card.get("selection") or {}, card.get("step", "?")
    step = f"Step {last}" if selection.get("step") is None else (
        f"Step {selection['step']} of {selection.get('of', last)}, selected by validation "
        f"{selection.get('metric', 'R@1')}")
    lines = [f"# {name}", "",
             f"Image and text embeddings in one L2-normalised {model.cfg.embed_dim}-d space, trained with xmodal "
             f"({model.cfg.loss.upper()} loss" + (f", starting from {base_name}" if base_name and src else "") + ").",
             f"Towers: {towers}. {step}; training rows: "
             f"{card.get('train_rows') or 'not recorded'}.", "",
             "## Use", "", "```python", "import xmodal", "", f"model = {load}",
             'images = model.encode("image", ["photo.jpg"])', 'texts = model.encode("text", ["a photo of a cat"])',
             "scores = texts @ images.T", "```", ""]
    if library == "open_clip":
        lines += ["open_clip reads the same folder: `open_clip.create_model_and_transforms("
                  + (f'"hf-hub:{repo}")`' if repo else '"local-dir:PATH")`') + ".", ""]
    elif library == "transformers":
        lines += ["transformers reads the same folder: `AutoModel.from_pretrained("
                  + (f'"{repo}")`' if repo else '"PATH")`') + ".", ""]
    lines += ["## Training data", "", ", ".join(datasets) if datasets else "Not recorded in the run folder.", "",
              "## Evaluation", "", _metrics_table(card.get("eval") or {}), "",
              "## Intended use and limits", "",
              "Text-to-image and image-to-text retrieval, zero-shot classification from prompts, and features for "
              "task heads, on data like the training data above. Not evaluated for decisions about people; "
              "embeddings carry the biases of the training captions and images.", "",
              "## Licence", "", license or "Not specified by the exporter: set one with `--license` before "
                                           "publishing (and respect the base model's and the data's licences).", ""]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(lines)


def _hub_id(name: str, library: str | None) -> str | None:
    """The hub repo a run started from (the card's base_model): an open_clip ``hf-hub:`` name, or a transformers
    name that is not a folder on the trainer's disk; None for a model config name or a local path."""
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:"):]
    if library == "transformers" and not os.path.isabs(name) and not os.path.exists(name) and "/" in name:
        return name
    return None


def _metrics_table(metrics: dict[str, Any]) -> str:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not rows:
        return "No evaluation recorded (the run had no evaluation split)."
    def shown(key: str, value: float) -> str:  # counts (n_queries, n_classes) are whole numbers
        return f"{int(value)}" if _is_count(key) and float(value).is_integer() else f"{value:.4f}"
    return "\n".join(["| metric | value |", "|---|---|"] + [f"| {k} | {shown(k, v)} |" for k, v in rows])
