"""``xmodal export --format onnx``: per-tower graphs whose onnxruntime outputs equal torch's on real clipart images
and titles (atol 1e-4) at any batch size; the torch-free example (examples/onnx_search.py) prepares the same inputs
and ranks as xmodal does; an architecture ONNX cannot take is named, with nothing written."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import _peer_models as peers
from _requires import importorskip
from xmodal.cli import main
from xmodal.config import ModelConfig, PairMemoryConfig, PretrainedConfig, TowerConfig
from xmodal.data import read_manifest
from xmodal.model import XModalModel

importorskip("onnxruntime", "the deploy extra: pip install -e .[deploy]")
torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


@pytest.fixture(scope="module")
def rows(clipart):
    m = read_manifest(clipart, split="test")
    return list(m.dataset["image"][:12]), list(m.dataset["text"][:12])


def _export(model, tmp_path, capsys=None):
    run, out = tmp_path / "run", tmp_path / "onnx"
    model.save(run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", str(run), "--format", "onnx", "--out", str(out)]) == 0
    # the tracer's warnings (TracerWarning, deprecations) are noise to a user: the graph is checked numerically
    tracer = [str(w.message)[:120] for w in caught if f"{os.sep}torch{os.sep}" in w.filename]
    assert not tracer, tracer
    return run, out


def test_open_clip_towers_equal_torch_and_the_example_needs_no_torch(tmp_path, rows, clipart):
    import onnx_search

    ckpt = peers.open_clip_checkpoint(tmp_path / "src")
    model = XModalModel(ModelConfig(pretrained=PretrainedConfig(library="open_clip", name=peers.OPEN_CLIP_NAME,
                                                                weights=str(ckpt)))).eval()
    run, out = _export(model, tmp_path)
    assert {p.name for p in out.iterdir()} == {"image.onnx", "text.onnx", "preprocess.json", "tokenizer.json"}
    paths, texts = rows
    towers = onnx_search.OnnxTowers(out)
    # the example's inputs are xmodal's own: pixels (numpy + PIL) and token ids (tokenizers)
    tf_img, tf_txt = model.transform("image"), model.transform("text")
    for p in paths[:4]:
        assert abs(towers.pixels(p) - tf_img(p).numpy()).max() < 1e-6
    assert (towers.ids(texts) == torch.stack([tf_txt(t) for t in texts]).numpy()).all()
    # graphs: batches of 5, 5 and 2 (the graph was traced with 2)
    want_img, want_txt = model.encode("image", paths), model.encode("text", texts)
    torch.testing.assert_close(torch.from_numpy(towers.embed_images(paths, batch_size=5)), want_img, atol=1e-4,
                               rtol=0)
    torch.testing.assert_close(torch.from_numpy(towers.embed_texts(texts)), want_txt, atol=1e-4, rtol=0)

    # served in a process where torch cannot be imported: the same hits as xmodal's own ranking
    code = ("import sys, runpy; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    queries = texts[:3]
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "examples" / "onnx_search.py"), str(out),
                           str(clipart), *queries, "-k", "3", "--json"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    hits = json.loads(proc.stdout)
    with open(clipart, newline="", encoding="utf-8") as f:
        manifest_paths = [str(clipart.parent / r["image"]) for r in csv.DictReader(f) if r.get("image")]
    gallery = model.encode("image", manifest_paths)
    scores = model.encode("text", queries) @ gallery.T
    for i, q in enumerate(queries):
        best = torch.argsort(-scores[i], stable=True)[:3].tolist()
        assert [h["image"] for h in hits[q]] == [manifest_paths[j] for j in best]
        assert all(abs(h["score"] - float(scores[i, j])) < 1e-4 for h, j in zip(hits[q], best))


def test_transformers_towers_equal_torch(tmp_path, rows):
    import onnx_search
    from transformers import AutoImageProcessor
    from PIL import Image

    folder = peers.hf_clip_folder(tmp_path / "clip")
    model = XModalModel(ModelConfig(pretrained=PretrainedConfig(library="transformers", name=str(folder)))).eval()
    run, out = _export(model, tmp_path)
    spec = json.loads((out / "preprocess.json").read_text())
    assert spec["image"] | {"mean": 0, "std": 0} == {"graph": "image.onnx", "input": "pixels", "size": 32,
                                                      "resize_mode": "shortest", "interpolation": "bicubic",
                                                      "mean": 0, "std": 0}
    paths, texts = rows
    towers = onnx_search.OnnxTowers(out)
    assert (towers.ids(texts) == torch.stack([model.transform("text")(t) for t in texts]).numpy()).all()
    torch.testing.assert_close(torch.from_numpy(towers.embed_texts(texts)), model.encode("text", texts), atol=1e-4,
                               rtol=0)
    # the image graph on the model's own processor output (the example's PIL resize only approximates it)
    pixels = AutoImageProcessor.from_pretrained(folder)(images=[Image.open(p).convert("RGB") for p in paths],
                                                        return_tensors="pt")["pixel_values"]
    got = towers.image.run(None, {"pixels": pixels.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), model.encode("image", paths), atol=1e-4, rtol=0)


def test_a_pair_memory_is_in_the_graphs(tmp_path, rows):
    """A model with a pair memory: each graph returns what the saved run's ``encode`` returns (the memory applied),
    not the plain embedding — an index xmodal built and queries embedded by the graphs meet in one space. The image
    side's neighbours are found in whitened features (``whiten``), the text side's not: both paths are traced."""
    import onnx_search
    import xmodal

    ckpt = peers.open_clip_checkpoint(tmp_path / "src")
    model = XModalModel(ModelConfig(pretrained=PretrainedConfig(library="open_clip", name=peers.OPEN_CLIP_NAME,
                                                                weights=str(ckpt)),
                                    pair_memory=PairMemoryConfig(k=3, whiten=["image"]))).eval()
    paths, texts = rows
    inputs = {"image": paths, "text": texts}
    # the memory: 8 pairs, the first 4 images each twice with another caption (duplicate drawings), so an image's
    # k = 3 nearest pairs end inside a tie of two pairs with different partners: the graph must break it as encode
    memory_rows = {"image": paths[:4] * 2, "text": texts[:8]}
    with torch.no_grad():
        model.pair_memory.fill({m: model.towers[m].encoder(torch.stack([model.transform(m)(v) for v in values]))
                                for m, values in memory_rows.items()})
    run, out = _export(model, tmp_path)
    assert json.loads((out / "preprocess.json").read_text())["pair_memory_pairs"] == 8
    saved = xmodal.load(run)
    towers = onnx_search.OnnxTowers(out)
    got = {"image": towers.embed_images(paths, batch_size=5), "text": towers.embed_texts(texts)}
    for m, values in inputs.items():
        want = saved.encode(m, values)
        torch.testing.assert_close(torch.from_numpy(got[m]), want, atol=1e-4, rtol=0)
        x = torch.stack([saved.transform(m)(v) for v in values])
        with torch.no_grad():
            plain = saved.towers[m](x)
        assert (want - plain).abs().max() > 1e-2, m  # the memory moved them: the check above tests it


def test_towers_onnx_cannot_take_are_named_and_nothing_is_written(tmp_path, capsys):
    lstm = XModalModel(ModelConfig(embed_dim=16, towers={
        "image": TowerConfig(kind="cnn", image_size=32, options={"channels": [8]}),
        "text": TowerConfig(kind="lstm", context_length=16, options={"embed_dim": 8, "hidden": 8})}))
    lstm.save(tmp_path / "run")
    before = set(tmp_path.iterdir())
    assert main(["export", str(tmp_path / "run"), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("xmodal export: error: export --format onnx: the text tower (kind lstm) cannot be "
                          "exported to ONNX (")
    assert set(tmp_path.iterdir()) == before


def test_constants_that_are_float16_are_stored_as_float16_and_compute_the_same(tmp_path):
    """A graph ``y = x @ A + x @ B``: A's values are all float16 numbers (as the pair memory's features are), B's
    are not. A is stored as float16 behind a Cast, B is left alone, and onnxruntime's output is bit for bit the same."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from xmodal.export.onnx import _store_exact_halves

    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 32)).astype(np.float16).astype(np.float32)
    b = rng.standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "A"], ["xa"]), helper.make_node("MatMul", ["x", "B"], ["xb"]),
         helper.make_node("Add", ["xa", "xb"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.standard_normal((5, 64)).astype(np.float32)
    before = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    size = path.stat().st_size
    _store_exact_halves(path, min_elements=1)
    stored = {i.name: i.data_type for i in onnx.load(str(path)).graph.initializer}
    assert stored == {"A.float16": TensorProto.FLOAT16, "B": TensorProto.FLOAT}
    after = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(after, before)
    assert path.stat().st_size < size - 64 * 32 * 2 + 200  # A's 8 KB became 4 KB (+ a Cast node)
