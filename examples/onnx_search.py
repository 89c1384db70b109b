"""Text→image search from an ONNX export, without torch: numpy, Pillow, onnxruntime and tokenizers only.

    xmodal export runs/mine --format onnx --out runs/mine-onnx          # image.onnx, text.onnx, preprocess.json, ...
    python examples/onnx_search.py runs/mine-onnx data/openclipart/manifest.csv "a red car" "an owl" -k 5

It embeds the manifest's images once with image.onnx (preprocessed here as xmodal does: resize, centre crop,
normalise), then ranks them for each query embedded with text.onnx; scores are cosine similarities. The manifest is a
CSV with an ``image`` column (paths relative to its folder), as ``xmodal prepare`` writes.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image
from tokenizers import Tokenizer

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


class OnnxTowers:
    """The two towers of an export, with their input preparation."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.spec = json.loads((folder / "preprocess.json").read_text(encoding="utf-8"))
        opts = ort.SessionOptions()
        self.image = ort.InferenceSession(str(folder / self.spec["image"]["graph"]), opts,
                                          providers=["CPUExecutionProvider"])
        self.text = ort.InferenceSession(str(folder / self.spec["text"]["graph"]), opts,
                                         providers=["CPUExecutionProvider"])
        t = self.spec["text"]
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.enable_truncation(t["context_length"])
        self.tokenizer.enable_padding(length=t["context_length"], pad_id=t["pad_id"])

    def pixels(self, path: str | Path) -> np.ndarray:
        """``float32 [3, size, size]``, as xmodal's evaluation transform makes it."""
        s = self.spec["image"]
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:  # transparency onto white, as xmodal
                rgba = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            im = im.convert("RGB")
        size, resample = s["size"], _RESAMPLE[s["interpolation"]]
        if s["resize_mode"] == "squash":
            im = im.resize((size, size), resample)
        else:  # shorter side to `size`, then the centre square (torchvision's Resize + CenterCrop arithmetic)
            w, h = im.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(size * long / short)
            new_w, new_h = (size, new_long) if w <= h else (new_long, size)
            if (new_w, new_h) != (w, h):
                im = im.resize((new_w, new_h), resample)
            top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
            im = im.crop((left, top, left + size, top + size))
        x = np.asarray(im, dtype=np.float32) / 255.0
        x = (x - np.asarray(s["mean"], np.float32)) / np.asarray(s["std"], np.float32)
        return x.transpose(2, 0, 1)

    def ids(self, texts: list[str]) -> np.ndarray:
        return np.asarray([e.ids for e in self.tokenizer.encode_batch(texts)], dtype=np.int64)

    def embed_images(self, paths: list, batch_size: int = 32) -> np.ndarray:
        out = [self.image.run(None, {self.spec["image"]["input"]: np.stack([self.pixels(p) for p in
                                                                           paths[i:i + batch_size]])})[0]
               for i in range(0, len(paths), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.spec["embed_dim"]), np.float32)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.text.run(None, {self.spec["text"]["input"]: self.ids(texts)})[0]


def search(towers: OnnxTowers, gallery: np.ndarray, queries: list[str], k: int) -> list[list[tuple[int, float]]]:
    """The ``k`` best gallery rows (index, cosine similarity) per query."""
    scores = towers.embed_texts(queries) @ gallery.T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[(int(j), float(scores[i, j])) for j in row] for i, row in enumerate(top)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("export", help="folder written by `xmodal export RUN --format onnx`")
    ap.add_argument("manifest", help="CSV with an image column")
    ap.add_argument("queries", nargs="+")
    ap.add_argument("-k", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print the hits as JSON")
    args = ap.parse_args()
    manifest = Path(args.manifest)
    with open(manifest, newline="", encoding="utf-8") as f:
        paths = [str(manifest.parent / row["image"]) for row in csv.DictReader(f) if row.get("image")]
    towers = OnnxTowers(args.export)
    gallery = towers.embed_images(paths)
    hits = search(towers, gallery, args.queries, args.k)
    if args.json:
        print(json.dumps({q: [{"image": paths[j], "score": s} for j, s in h] for q, h in zip(args.queries, hits)}))
        return
    for query, h in zip(args.queries, hits):
        print(query)
        for rank, (j, score) in enumerate(h, 1):
            print(f"  {rank}. {score:.3f}  {paths[j]}")


if __name__ == "__main__":
    main()
