"""An xmodal run as a clip_benchmark model (its TYPE2FUNC hook) on the clipart fixture (all its splits) written in clip_benchmark's
webdataset layout: clip_benchmark's own CLI gives the zero-shot and retrieval numbers xmodal's evaluation gives."""
from __future__ import annotations

import json

import pytest
import torch

import _peer_models as peers
from _requires import importorskip
from xmodal.config import ModelConfig, PretrainedConfig
from xmodal.model import XModalModel

importorskip("clip_benchmark", "pip install clip-benchmark (the dev extra)")
torch.set_num_threads(2)
TEMPLATES = ["a drawing of a {}.", "clip art of a {}."]


def _accuracy(output, target, topk=(1,)):
    """clip_benchmark 1.6.2's ``accuracy``, line for line, but for ``float(x.numpy())`` of a 1-element array, which
    numpy >= 2.4 refuses (TypeError): ``.item()`` instead."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().item() / n for k in topk]


def test_clip_benchmark_equals_xmodal_evaluate(clipart, tmp_path, monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification
    from datasets import Dataset

    from xmodal.evaluation.evaluate import evaluate
    from xmodal.export.clip_benchmark import benchmark_rows, main, write_wds

    monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy)
    ckpt = peers.open_clip_checkpoint(tmp_path / "src")
    model = XModalModel(ModelConfig(pretrained=PretrainedConfig(library="open_clip", name=peers.OPEN_CLIP_NAME,
                                                                weights=str(ckpt)))).eval()
    model.save(tmp_path / "run")
    folders = write_wds(clipart, tmp_path / "bench", split=None, templates=TEMPLATES)  # every split
    assert (folders["retrieval"] / "dataset_type.txt").read_text().strip() == "retrieval"
    assert (folders["classification"] / "zeroshot_classification_templates.txt").read_text().split("\n")[0] == \
        "a drawing of a {c}."

    def bench(task, folder):
        out = tmp_path / f"{task}.json"
        assert main(["eval", "--model_type", "xmodal", "--model", str(tmp_path / "run"), "--pretrained", "-",
                     "--dataset", "wds/clipart", "--dataset_root", str(folder), "--task", task,
                     "--recall_k", "1", "5", "10", "--batch_size", "16", "--num_workers", "0", "--no_amp",
                     "--output", str(out)]) == 0
        return json.loads(out.read_text())["metrics"]

    retrieval = bench("zeroshot_retrieval", folders["retrieval"])
    classification = bench("zeroshot_classification", folders["classification"])

    images, texts, labels = benchmark_rows(clipart, None)
    assert len(images) > 50 and len(set(labels)) > 5
    ours = evaluate(model, Dataset.from_dict({"image": images, "text": texts, "label": labels}), templates=TEMPLATES)
    for k in (1, 5, 10):
        assert retrieval[f"image_retrieval_recall@{k}"] == pytest.approx(ours[f"text->image/R@{k}"], abs=1e-6)
        assert retrieval[f"text_retrieval_recall@{k}"] == pytest.approx(ours[f"image->text/R@{k}"], abs=1e-6)
    assert classification["acc1"] == pytest.approx(ours["zero_shot/image/top1"], abs=1e-6)
    assert classification["acc5"] == pytest.approx(ours["zero_shot/image/top5"], abs=1e-6)
    assert 0 < ours["text->image/R@10"] < 1  # a comparison that could have failed, not 0 = 0
