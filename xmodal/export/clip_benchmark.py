"""xmodal runs in clip_benchmark (LAION's CLIP_benchmark, ``pip install clip-benchmark``), the suite this field
reports zero-shot and retrieval numbers with.

* :func:`register` adds model type ``xmodal`` through clip_benchmark's documented hook for custom models, its
  ``clip_benchmark.models.TYPE2FUNC`` table of loaders returning ``(model, transform, tokenizer)``; the model name is
  a run folder, an exported folder or ``hf-hub:ORG/NAME``.
* :func:`write_wds` writes a manifest's rows in clip_benchmark's webdataset layout (``SPLIT/0.tar``, ``nshards.txt``,
  ``dataset_type.txt``, ``classnames.txt``, ``zeroshot_classification_templates.txt``) with clip_benchmark's own
  converters, for ``--dataset wds/NAME --dataset_root DIR``.

    python -m xmodal.export.clip_benchmark wds data/openclipart/manifest.csv bench/clipart --split test
    python -m xmodal.export.clip_benchmark eval --model_type xmodal --model runs/mine --pretrained - \\
        --dataset wds/clipart --dataset_root bench/clipart --task zeroshot_retrieval --recall_k 1 5 10
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

MODEL_TYPE = "xmodal"


class ClipBenchmarkModel(nn.Module):
    """What clip_benchmark calls: ``encode_image(pixels)`` and ``encode_text(ids)`` (it normalises them again)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.towers["image"](pixels)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.towers["text"](ids)


class Tokenize:
    """clip_benchmark's tokenizer: a list of strings → ``[n, context_length]`` ids, the run's own text transform."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.transform(t) for t in texts])


def load_xmodal(model_name: str, pretrained: str | None = None, cache_dir: str | None = None,
                device: str | torch.device = "cpu"):
    """The ``TYPE2FUNC`` loader: ``model_name`` is what ``xmodal.load`` takes; ``pretrained`` is unused."""
    from .hub import load

    model = load(model_name).to(device).eval()
    missing = [m for m in ("image", "text") if m not in model.towers]
    if missing:
        raise ValueError(f"clip_benchmark: {model_name} has no {missing[0]} tower (towers: "
                         f"{', '.join(model.towers)}); clip_benchmark evaluates image-text models")
    return ClipBenchmarkModel(model), model.transform("image"), Tokenize(model.transform("text"))


def register() -> None:
    """Make ``--model_type xmodal`` known to clip_benchmark (its CLI's choices are this same list)."""
    from clip_benchmark import models

    models.TYPE2FUNC[MODEL_TYPE] = load_xmodal
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)


def benchmark_rows(manifest: str | os.PathLike, split: str | None = "test",
                   label_column: str = "label") -> tuple[list[str], list[str], list[str] | None]:
    """(image paths, captions, labels or None) of ``split``: rows whose image and caption both appear for the first
    time. clip_benchmark scores every row's caption against only its own image, so a repeated image or caption
    would be a different benchmark from xmodal's evaluation, where each distinct value is one item."""
    from ..data import read_manifest

    m = read_manifest(manifest, split=split)
    images, texts = m.rows["image"], m.rows["text"]
    labels = m.rows[label_column] if label_column in m.rows.column_names else None
    seen_i, seen_t, keep = set(), set(), []
    for j, (i, t) in enumerate(zip(images, texts)):
        if i and t and i not in seen_i and t not in seen_t:
            keep.append(j)
        seen_i.add(i)
        seen_t.add(t)
    return ([images[j] for j in keep], [texts[j] for j in keep],
            [str(labels[j]) for j in keep] if labels is not None else None)


def write_wds(manifest: str | os.PathLike, out: str | os.PathLike, split: str | None = "test",
              templates: Sequence[str] | None = None, label_column: str = "label") -> dict[str, Path]:
    """``out/retrieval`` (captions) and, when the manifest has labels, ``out/classification`` (class ids, class
    names, prompt templates with clip_benchmark's ``{c}``), each a clip_benchmark webdataset; images are copied as
    they are (PNG bytes). Returns the folders."""
    from clip_benchmark.webdataset_builder import convert_dataset, convert_retrieval_dataset, path_to_bytes

    from ..evaluation.evaluate import PROMPT_TEMPLATES, check_templates

    images, texts, labels = benchmark_rows(manifest, split, label_column)
    if not images:
        raise ValueError(f"clip_benchmark: {manifest} has no rows with an image and a caption in split {split!r}")
    out = Path(out)
    folders = {"retrieval": out / "retrieval"}
    convert_retrieval_dataset(list(zip(images, [[t] for t in texts])), "test", str(folders["retrieval"]),
                              transform=path_to_bytes, image_format="png", verbose=False)
    if labels is not None:
        classes = sorted(set(labels))
        folder = folders["classification"] = out / "classification"
        convert_dataset([(p, classes.index(y)) for p, y in zip(images, labels)], "test", str(folder),
                        transform=path_to_bytes, image_format="png", verbose=False)
        (folder / "classnames.txt").write_text("\n".join(classes) + "\n", encoding="utf-8")
        prompts = [t.replace("{}", "{c}") for t in check_templates(templates or PROMPT_TEMPLATES)]
        (folder / "zeroshot_classification_templates.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    return folders


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["wds"]:
        import argparse

        ap = argparse.ArgumentParser(prog="python -m xmodal.export.clip_benchmark wds")
        ap.add_argument("manifest")
        ap.add_argument("out")
        ap.add_argument("--split", default="test")
        ap.add_argument("--templates", nargs="+", help="prompt templates with {} (default: xmodal evaluate's)")
        args = ap.parse_args(argv[1:])
        for task, folder in write_wds(args.manifest, args.out, args.split, args.templates).items():
            print(f"{task}: --dataset wds/{Path(args.manifest).parent.name} --dataset_root {folder}")
        return 0
    register()
    from clip_benchmark.cli import main as cb_main

    sys.argv = ["clip_benchmark", *argv]
    return cb_main() or 0


if __name__ == "__main__":
    sys.exit(main())
