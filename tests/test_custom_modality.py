"""A fourth modality defined outside the package (examples/vector_modality.py: ``.npy`` vectors, an MLP tower),
registered only by naming its module in the config, goes through every verb: pretrain, evaluate, fine-tune a head,
index, query (CLI and Python) — with no edit under xmodal/.

The vectors are real: each Fashion-MNIST image's 784 pixel values, paired with its caption and class.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(EXAMPLES), env.get("PYTHONPATH", "")) if p)
    env.pop("XMODAL_PLUGINS", None)  # the config alone must be enough
    return env


def xmodal(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "xmodal.cli", *args], capture_output=True, text=True, env=_env(),
                          timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def vectors(fashion, tmp_path_factory) -> Path:
    """A manifest whose ``vector`` column names one ``.npy`` file per Fashion-MNIST image (its 784 pixels)."""
    out = tmp_path_factory.mktemp("vectors")
    (out / "npy").mkdir()
    rows = list(csv.DictReader(open(fashion, encoding="utf-8")))
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["id", "vector", "text", "label", "split"])
        w.writeheader()
        for r in rows:
            pixels = np.asarray(Image.open(Path(fashion).parent / r["image"]), dtype=np.float32).reshape(-1)
            np.save(out / "npy" / f"{r['id']}.npy", pixels)
            w.writerow({"id": r["id"], "vector": f"npy/{r['id']}.npy", "text": r["text"], "label": r["label"],
                        "split": r["split"]})
    return out / "manifest.csv"


def _config(path: Path, manifest: Path, out: Path, **extra) -> Path:
    cfg = {
        "output_dir": str(out), "seed": 0,
        "model": {"embed_dim": 32, "plugins": ["vector_modality"], "towers": {
            "vector": {"kind": "mlp", "options": {"dim": 784, "hidden": 64}},
            "text": {"kind": "lstm", "context_length": 16, "options": {"embed_dim": 32, "hidden": 32}}}},
        "data": {"train": str(manifest), "train_split": "train", "eval_split": "test"},
        "train": {"batch_size": 32, "epochs": 8, "lr": 3e-3, "warmup_steps": 5, "progress": False},
        "log": {"backend": "none"},
        **extra,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def pretrained(vectors, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("runs")
    xmodal("pretrain", "--config", str(_config(tmp / "pre.yaml", vectors, tmp / "pre")))
    return tmp / "pre"


def test_pretrain_and_evaluate_retrieval(pretrained, vectors):
    card = json.loads((pretrained / "model.json").read_text())
    assert card["model"]["plugins"] == ["vector_modality"]  # what lets every later command import it again
    res = json.loads(xmodal("evaluate", "--run", str(pretrained), "--manifest", str(vectors), "--split", "test",
                            "--json").stdout)
    n = res["vector->text/n_queries"]
    assert n == 200
    # 200 candidates: chance R@10 is 0.05. Captions name the class, so a trained space ranks the right
    # caption (or its class's look-alikes) high.
    assert res["vector->text/R@10"] > 0.15 and res["text->vector/R@10"] > 0.15


def test_finetune_a_head_on_the_new_modality(pretrained, vectors, tmp_path):
    classes = sorted({r["label"] for r in csv.DictReader(open(vectors, encoding="utf-8"))})
    cfg = _config(tmp_path / "ft.yaml", vectors, tmp_path / "ft", init_from=str(pretrained),
                  tasks={"garment": {"kind": "classification", "modalities": ["vector"], "target": "label",
                                     "classes": classes, "hidden": 64}})
    xmodal("finetune", "--config", str(cfg))
    res = json.loads(xmodal("evaluate", "--run", str(tmp_path / "ft"), "--manifest", str(vectors), "--split", "test",
                            "--json").stdout)
    test_labels = [r["label"] for r in csv.DictReader(open(vectors, encoding="utf-8")) if r["split"] == "test"]
    majority = max(test_labels.count(c) for c in classes) / len(test_labels)
    assert res["garment/accuracy"] > max(0.5, 3 * majority)  # pixels of 10 garment classes: far above the majority


def test_index_and_query_by_cli(pretrained, vectors, tmp_path):
    idx = tmp_path / "index"
    xmodal("index", "--run", str(pretrained), "--manifest", str(vectors), "--split", "test", "--modality", "vector",
           "--out", str(idx))
    rows = [r for r in csv.DictReader(open(vectors, encoding="utf-8")) if r["split"] == "test"]
    probe = rows[7]
    # any→any: the query's own vector is in the index, so it is its own nearest neighbour (cosine 1)
    hit = json.loads(xmodal("query", "--index", str(idx), "--vector", str(vectors.parent / probe["vector"]),
                            "-k", "1", "--json").stdout)["hits"][0]
    assert hit["id"] == probe["id"] and hit["score"] == pytest.approx(1.0, abs=1e-4)
    # text → vector: the class named in the query dominates the top hits
    hits = json.loads(xmodal("query", "--index", str(idx), "--text", "a photo of a pair of trousers.", "-k", "5",
                             "--json").stdout)["hits"]
    assert len(hits) == 5 and sum(h["label"] == "Trouser" for h in hits) >= 3, [h["label"] for h in hits]


def test_python_api(pretrained, vectors, tmp_path, monkeypatch):
    import xmodal
    from xmodal.modalities import modality_names, unregister_modality
    from xmodal.retrieval import Retriever, build_index

    monkeypatch.syspath_prepend(str(EXAMPLES))
    try:
        model = xmodal.load(pretrained)  # imports vector_modality: the card names it
        assert "vector" in modality_names()
        rows = [r for r in csv.DictReader(open(vectors, encoding="utf-8")) if r["split"] == "test"][:20]
        paths = [str(vectors.parent / r["vector"]) for r in rows]
        emb = model.encode("vector", paths)
        assert emb.shape == (20, 32)
        np.testing.assert_allclose(np.linalg.norm(emb.numpy(), axis=1), 1.0, atol=1e-5)
        # the same vectors as arrays (no files) embed identically
        arrays = [np.load(p) for p in paths[:3]]
        np.testing.assert_allclose(model.encode("vector", arrays).numpy(), emb[:3].numpy(), atol=1e-6)

        from xmodal.data import read_manifest
        manifest = read_manifest(vectors, split="test", max_rows=20)
        build_index(model, manifest, "vector", tmp_path / "idx", run_dir=pretrained)
        hits = Retriever(tmp_path / "idx", model).search(paths[3], "vector", k=1)
        assert hits[0].metadata["id"] == rows[3]["id"]
    finally:
        unregister_modality("vector")
        sys.modules.pop("vector_modality", None)


def test_bad_vector_file_is_named_before_training(vectors, tmp_path):
    rows = list(csv.DictReader(open(vectors, encoding="utf-8")))[:40]
    (tmp_path / "npy").mkdir()
    for r in rows:
        (tmp_path / r["vector"]).write_bytes((vectors.parent / r["vector"]).read_bytes())
    (tmp_path / rows[5]["vector"]).write_bytes(b"not an array")
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cfg = _config(tmp_path / "c.yaml", bad, tmp_path / "run")
    proc = xmodal("pretrain", "--config", str(cfg), "data.train_split=null", "data.eval_split=null", ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "row 6" in proc.stderr and "'vector'" in proc.stderr and "not a readable .npy array" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
