"""Fashion-MNIST (Debian ``dataset-fashion-mnist``: 60k train / 10k test 28x28 greyscale, 10 classes) → PNGs + a
manifest with a caption per image.

    from xmodal.data.corpora.fashion_mnist import prepare_fashion_mnist
    manifest = prepare_fashion_mnist("data/fashion-mnist", max_per_split=2000)

* the idx ``*-ubyte.gz`` files are read with numpy (no download code);
* PNGs (8-bit greyscale, pixel values exactly the idx bytes) go to ``images/{train,test}/<index>.png``, ``index``
  being the position in the idx file; ``id`` is ``train-<index>`` / ``test-<index>``;
* splits: the train file's first 54,000 images → ``train``, its last 6,000 → ``val``; the test file → ``test``;
  ``max_per_split`` keeps the first N of each split (the files are already shuffled);
* ``label`` is the class name (:data:`CLASS_NAMES`); ``text`` a caption from one of :data:`TEMPLATES`, chosen per
  image by a generator seeded with ``seed`` (the choice for an image does not depend on ``max_per_split``).
"""
from __future__ import annotations

import gzip
import logging
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ...atomic import replacing
from ._output import up_to_date, write_info, write_manifest

log = logging.getLogger(__name__)

ROOT = "/usr/share/datasets/fashion-mnist"
FORMAT_VERSION = 1
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
# noun phrases (with their article) used in captions
CAPTION_NAMES = {"T-shirt/top": "a t-shirt", "Trouser": "a pair of trousers", "Pullover": "a pullover",
                 "Dress": "a dress", "Coat": "a coat", "Sandal": "a sandal", "Shirt": "a shirt",
                 "Sneaker": "a sneaker", "Bag": "a bag", "Ankle boot": "an ankle boot"}
TEMPLATES = [
    "a photo of {}.",
    "a black and white photo of {}.",
    "a low resolution photo of {}.",
    "a grayscale picture of {}.",
    "a small photo of {}.",
    "a product photo of {}.",
    "a centered photo of {}.",
    "a cropped photo of {}.",
]
VAL_FRACTION = 0.1
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (optionally gzipped): magic ``00 00 <dtype> <ndim>``, big-endian int32 dims, then data."""
    path = Path(path)
    data = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic {data[:4].hex()})")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown idx data type 0x{data[2]:02x}")
    ndim = data[3]
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4))
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, found {arr.size}")
    return arr.reshape(dims)


def caption(label_index: int, template_index: int) -> str:
    return TEMPLATES[template_index].format(CAPTION_NAMES[CLASS_NAMES[label_index]])


def prepare_fashion_mnist(
    out_dir: str | os.PathLike,
    *,
    max_per_split: int | None = None,
    root: str | os.PathLike = ROOT,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Write Fashion-MNIST PNGs and ``out_dir/manifest.csv`` (id, image, text, label, split); → the manifest path.

    Idempotent: returns at once when ``manifest.csv`` and ``prepare.json`` exist with the same parameters; existing
    PNGs are reused (they are written atomically, so an existing one is complete).
    """
    t0 = time.time()
    out = Path(out_dir).expanduser().resolve()
    src = Path(root).expanduser()
    if max_per_split is not None and max_per_split <= 0:
        raise ValueError(f"max_per_split must be positive, got {max_per_split}")
    manifest, info_path = out / "manifest.csv", out / "prepare.json"
    params = {"max_per_split": max_per_split, "root": str(src.resolve()), "seed": seed,
              "format_version": FORMAT_VERSION}
    if up_to_date(manifest, info_path, params):
        log.info("%s is up to date", manifest)
        return manifest
    missing = [f for pair in _FILES.values() for f in pair if not (src / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{src}: missing {', '.join(missing)} (apt-get install dataset-fashion-mnist)")

    rng = np.random.default_rng(seed)
    data = {}
    for name, (img_file, lab_file) in _FILES.items():
        images, labels = read_idx(src / img_file), read_idx(src / lab_file)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{src}: {img_file} {images.shape} and {lab_file} {labels.shape} do not match")
        if labels.max() >= len(CLASS_NAMES):
            raise ValueError(f"{src / lab_file}: label {labels.max()} outside 0..{len(CLASS_NAMES) - 1}")
        templates = rng.integers(0, len(TEMPLATES), size=len(labels))  # drawn for every image: stable choices
        data[name] = (images, labels, templates)

    n_train_file = len(data["train"][1])
    n_val = int(round(n_train_file * VAL_FRACTION))
    selection = {  # split → (file, indices)
        "train": ("train", np.arange(0, n_train_file - n_val)),
        "val": ("train", np.arange(n_train_file - n_val, n_train_file)),
        "test": ("test", np.arange(len(data["test"][1]))),
    }
    from PIL import Image
    from ...progress import tqdm

    rows, written, reused = [], 0, 0
    total = sum(min(len(ix), max_per_split or len(ix)) for _, ix in selection.values())
    with tqdm(total=total, desc="fashion-mnist", unit="img", disable=not progress) as bar:
        for split, (file, indices) in selection.items():
            if max_per_split is not None:
                indices = indices[:max_per_split]
            images, labels, templates = data[file]
            folder = out / "images" / file
            folder.mkdir(parents=True, exist_ok=True)
            for i in indices.tolist():
                png = folder / f"{i}.png"
                if png.is_file():
                    reused += 1
                else:
                    with replacing(png, fsync=False) as tmp:  # via .{i}.png.tmp; 70k PNGs: no fsync each
                        Image.fromarray(images[i], mode="L").save(tmp, format="PNG")
                    written += 1
                label = int(labels[i])
                rows.append({"id": f"{file}-{i}", "image": f"images/{file}/{i}.png",
                             "text": caption(label, int(templates[i])), "label": CLASS_NAMES[label],
                             "split": split})
                bar.update()

    write_manifest(manifest, rows)
    splits = Counter(r["split"] for r in rows)
    info = {
        "params": params,
        "counts": {
            "rows": len(rows), "written": written, "reused": reused,
            "splits": {s: splits.get(s, 0) for s in ("train", "val", "test")},
            "labels": {s: dict(sorted(Counter(r["label"] for r in rows if r["split"] == s).items()))
                       for s in ("train", "val", "test")},
        },
        "seconds": round(time.time() - t0, 1),
    }
    write_info(info_path, info)
    log.info("fashion-mnist: %d rows (%s) in %.0f s → %s", len(rows), dict(splits), time.time() - t0, manifest)
    return manifest
