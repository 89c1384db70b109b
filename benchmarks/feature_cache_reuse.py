"""What the disk feature cache saves a second command: the frozen towers of ``configs/pretrain.yaml``
(EfficientNet-Lite0, all-MiniLM-L6-v2) over a manifest's images and texts, embedded (an empty cache: what every
command paid before) and then read back from disk (what a second pretrain / finetune / --resume / evaluate pays),
in one process, alternating, each round with a fresh cache folder for the embedding pass.

The read pass also checks every shard's SHA-256 (``FeatureStore._verified`` is cleared: a new process).

    python benchmarks/feature_cache_reuse.py --manifest data/openclipart/manifest.csv --rounds 3
"""
from __future__ import annotations

import argparse
import csv
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from xmodal.config import load_config  # noqa: E402
from xmodal.feature_cache import precompute_features, tower_settings  # noqa: E402
from xmodal.feature_store import FeatureStore  # noqa: E402
from xmodal.model import XModalModel  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", required=True, help="a manifest with image and text columns (paths relative to it)")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "pretrain.yaml"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    cfg = load_config(a.config)
    model = XModalModel(cfg.model).eval()
    rows = list(csv.DictReader(open(a.manifest, encoding="utf-8")))
    values = {"image": [str(Path(a.manifest).parent / r["image"]) for r in rows], "text": [r["text"] for r in rows]}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.rounds):
        folder = Path(tempfile.mkdtemp(prefix="xmodal-features-"))
        try:
            for m, vals in values.items():
                enc, tf, key = model.towers[m].encoder, model.transform(m), tower_settings(m, cfg.model.towers[m])
                for what in ("embed", "read from disk"):
                    FeatureStore._verified.clear()
                    t = time.perf_counter()
                    got = precompute_features(enc, tf, vals, batch_size=a.batch_size, progress=False, memo_key=key,
                                              cache_dir=folder)
                    times.setdefault((m, what), []).append(time.perf_counter() - t)
                    x = torch.stack([got(v) for v in vals[:50]])
                    if what == "embed":
                        first = x
                    else:
                        assert torch.equal(x, first)
            size = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
        finally:
            shutil.rmtree(folder)
    print(f"{len(rows)} rows ({len(set(values['image']))} images, {len(set(values['text']))} texts), "
          f"{a.rounds} rounds, medians; cache size {size / 1e6:.1f} MB")
    for (m, what), v in times.items():
        print(f"{m:<6} {what:<15} {statistics.median(v):8.2f} s")


if __name__ == "__main__":
    main()
