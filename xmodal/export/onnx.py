"""``xmodal export RUN --format onnx``: one ONNX graph per tower (raw preprocessed input → L2-normalised embedding,
dynamic batch; with the model's pair memory, its look-up too, so a graph returns what ``encode`` returns), plus
what a torch-free server needs to prepare inputs: ``preprocess.json`` (image size, resize mode, interpolation,
mean/std; the text context length and pad id) and ``tokenizer.json`` (loadable by the ``tokenizers`` package
alone). ``examples/onnx_search.py`` serves text→image search from such a folder with numpy, PIL,
onnxruntime and tokenizers only.

Every graph is checked before the folder is kept: onnxruntime's output on a batch of another size than the traced
one must equal torch's (atol 1e-4). Graphs are traced (``torch.onnx.export(dynamo=False)``): the dynamo exporter
needs onnxscript, which is not a dependency.
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..model import XModalModel
from ..model import load as load_run
from .hub import staging

ONNX_ATOL = 1e-4
OPSET = 17
INPUT_NAMES = {"image": "pixels", "text": "ids"}


def _example(model: XModalModel, modality: str) -> torch.Tensor:
    """Three preprocessed inputs: the first two are traced, all three checked (another batch size)."""
    tf = model.transform(modality)
    if modality == "image":
        from PIL import Image

        size = model.cfg.towers["image"].image_size
        images = [Image.new("RGB", (size + 9, size), (200, 40, 40)), Image.new("RGB", (size, size + 5), (20, 90, 200)),
                  Image.effect_noise((size * 2, size), 60).convert("RGB")]
        return torch.stack([tf(im) for im in images])
    if modality == "text":
        long = " ".join(["a photo of a small red bird on a snowy branch"] * 20)  # fills the context: no trimming
        return torch.stack([tf(t) for t in (long, "a cat", "two dogs playing in the park at dusk")])
    raise ValueError(f"export --format onnx: a {modality} tower has no example input to trace (ONNX export covers "
                     f"image and text towers)")


class _Embedder(nn.Module):
    """One tower as ``encode`` runs it (:meth:`XModalModel.embed_batch`): encoder, projection and, where the model
    has a pair memory covering the modality, the memory's move towards its nearest pairs' partners (its features and
    partners become constants of the graph). Without it a served graph's embeddings would not be the ones an xmodal
    index holds."""

    def __init__(self, model: XModalModel, modality: str):
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed_batch(self.modality, x)


def _export_tower(model: XModalModel, modality: str, path: Path) -> None:
    import onnxruntime as ort

    tower, kind = _Embedder(model, modality).eval(), model.cfg.towers[modality].kind
    x = _example(model, modality)
    name = INPUT_NAMES[modality]
    try:
        # The tracer warns about every Python branch and deprecated option it meets (TracerWarning, UserWarning,
        # DeprecationWarning). Those say "the graph may differ from the module"; we check exactly that below, on
        # inputs of another batch size, so the warnings are noise to a user and are silenced here.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(tower, (x[:2],), str(path), input_names=[name], output_names=["embedding"],
                              dynamic_axes={name: {0: "batch"}, "embedding": {0: "batch"}}, opset_version=OPSET,
                              dynamo=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many kinds for unsupported operators
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"export --format onnx: the {modality} tower (kind {kind}) cannot be exported to ONNX "
                         f"({type(e).__name__}: {first[:300]})") from None
    _store_exact_halves(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    with torch.no_grad():
        want = tower(x)
    err = float((got - want).abs().max())
    if got.shape != want.shape or err > ONNX_ATOL:
        raise ValueError(f"export --format onnx: the {modality} tower (kind {kind})'s ONNX graph differs from torch "
                         f"(max |diff| {err:.2e} > {ONNX_ATOL:g} on a batch of 3); not exported")


def _store_exact_halves(path: Path, min_elements: int = 1 << 16) -> None:
    """Rewrite the graph's large float32 constants whose every value is a float16 — the pair memory's features,
    which the model stores as float16 and the trace captured converted — as float16 with a ``Cast`` back to float32
    in front of their users: the same numbers reach the same nodes, in half the bytes (5,783 Open Clip Art pairs:
    29.6 → 14.8 MB in the image graph, 8.9 → 4.4 MB in the text graph)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    inputs = {i.name for i in graph.input}
    kept, casts = [], []
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT and init.name not in inputs and \
                int(np.prod(init.dims)) >= min_elements:
            values = numpy_helper.to_array(init)
            half = values.astype(np.float16)
            if np.array_equal(half.astype(np.float32), values):
                kept.append(numpy_helper.from_array(half, f"{init.name}.float16"))
                casts.append(helper.make_node("Cast", [f"{init.name}.float16"], [init.name],
                                              to=onnx.TensorProto.FLOAT, name=f"{init.name}.cast"))
                continue
        kept.append(init)
    if not casts:
        return
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    graph.ClearField("node")
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(path))


def _image_spec(model: XModalModel) -> dict[str, Any]:
    tf = model.transform("image")
    if hasattr(tf, "resize_mode"):  # xmodal's ImageTransform
        return {"size": tf.size, "resize_mode": tf.resize_mode, "interpolation": tf.interpolation,
                "mean": list(tf.mean), "std": list(tf.std)}
    from ..modalities.hf_clip import image_processor  # a transformers model's own image processor

    proc = image_processor(tf.source, "model.towers.image")
    size = dict(proc.size)
    interpolation = {2: "bilinear", 3: "bicubic"}.get(int(getattr(proc.resample, "value", proc.resample)))
    square = size.get("height") == size.get("width") and "height" in size
    if interpolation is None or not ("shortest_edge" in size or square):
        raise ValueError(f"export --format onnx: the image processor of {tf.source} ({type(proc).__name__}, size "
                         f"{size}) has no equivalent in preprocess.json")
    if "shortest_edge" in size:
        crop = dict(getattr(proc, "crop_size", None) or {})
        if not getattr(proc, "do_center_crop", False) or crop.get("height") != crop.get("width") or \
                crop.get("height") != size["shortest_edge"]:
            raise ValueError(f"export --format onnx: the image processor of {tf.source} resizes to "
                             f"{size['shortest_edge']} and crops {crop}; preprocess.json takes a square crop of that "
                             f"size")
        spec = {"size": size["shortest_edge"], "resize_mode": "shortest"}
    else:
        spec = {"size": size["height"], "resize_mode": "squash"}
    return {**spec, "interpolation": interpolation, "mean": list(proc.image_mean), "std": list(proc.image_std)}


def _tokenizer_json(model: XModalModel, folder: Path) -> dict[str, Any]:
    """``tokenizer.json`` for the ``tokenizers`` package, and the text spec (context length, pad id)."""
    import tempfile

    tf = model.transform("text")
    with tempfile.TemporaryDirectory(prefix="xmodal-tok-") as tmp:
        if hasattr(tf, "source"):  # HFTokenize: the model's own tokenizer
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tf.source).save_pretrained(tmp)
        elif type(tf).__name__ == "BPETokenize":  # open_clip's CLIP BPE, as a transformers CLIPTokenizer
            _bpe_as_clip_tokenizer(Path(tmp))
        else:
            raise ValueError(f"export --format onnx: the text tower's tokenizer ({type(tf).__name__}) has no "
                             f"tokenizer.json form")
        if not (Path(tmp) / "tokenizer.json").is_file():
            raise ValueError("export --format onnx: the text tokenizer has no fast form (tokenizer.json)")
        (folder / "tokenizer.json").write_bytes((Path(tmp) / "tokenizer.json").read_bytes())
    return {"context_length": int(tf.context_length), "pad_id": int(tf.pad_id)}


def _bpe_as_clip_tokenizer(folder: Path) -> None:
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({special.get(k, k): v for k, v in st.encoder.items()}))
    merges = sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in merges) + "\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt")).save_pretrained(folder)


def export_onnx(run: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``image.onnx`` / ``text.onnx`` (the towers the run has), ``preprocess.json`` and ``tokenizer.json``."""
    try:
        import onnx  # noqa: F401 - torch.onnx.export needs it
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ValueError("export --format onnx: needs onnx and onnxruntime (pip install 'xmodal[deploy]')") from None
    model = load_run(run)
    unsupported = [m for m in model.towers if m not in INPUT_NAMES]
    if unsupported:
        raise ValueError(f"export --format onnx: a {unsupported[0]} tower has no example input to trace (ONNX "
                         f"export covers image and text towers)")
    if model.pair_memory is not None and len(model.pair_memory):
        logging.getLogger(__name__).info(
            "export --format onnx: the graphs carry this model's pair memory (%d training pairs, model.pair_memory)",
            len(model.pair_memory))
    out = Path(out)
    with staging(out) as tmp:
        spec: dict[str, Any] = {"format": "xmodal-onnx", "version": 1, "embed_dim": model.cfg.embed_dim,
                                "logit_scale": float(model.logit_scale.detach().exp().reshape(()))}
        if model.logit_bias is not None:
            spec["logit_bias"] = float(model.logit_bias.detach().reshape(()))
        if model.pair_memory is not None and len(model.pair_memory):
            spec["pair_memory_pairs"] = len(model.pair_memory)  # informational: the graphs apply it
        for modality in model.towers:
            _export_tower(model, modality, tmp / f"{modality}.onnx")
            spec[modality] = {"graph": f"{modality}.onnx", "input": INPUT_NAMES[modality],
                              **(_image_spec(model) if modality == "image" else _tokenizer_json(model, tmp))}
        (tmp / "preprocess.json").write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return out
