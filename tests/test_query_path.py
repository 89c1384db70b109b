"""``xmodal query`` builds only the tower its query needs: same embeddings as the whole model, and the other
towers' libraries (open_clip for the BPE text towers) and the training stack are never imported."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from xmodal.config import ModelConfig, TowerConfig
from xmodal.model import XModalModel, load

ROOT = Path(__file__).resolve().parent.parent


def test_a_query_loads_only_its_own_tower(clipart, tmp_path):
    from xmodal.data import read_manifest
    from xmodal.retrieval import build_index

    torch.manual_seed(0)
    run = XModalModel(ModelConfig(embed_dim=16, towers={
        "image": TowerConfig(kind="efficientnet_lite0", image_size=32, freeze=True, augment=False),
        "text": TowerConfig(kind="lstm", context_length=16, options={"embed_dim": 16, "hidden": 16})})
    ).save(tmp_path / "run")
    texts = [r["text"] for r in csv.DictReader(open(clipart, encoding="utf-8"))][:12]
    text_only = load(run, towers=["text"])
    assert list(text_only.towers) == ["text"] and list(text_only.cfg.towers) == ["text"]
    assert torch.equal(text_only.encode("text", texts), load(run).encode("text", texts))

    rows = [r for r in csv.DictReader(open(clipart, encoding="utf-8")) if r["split"] == "test"]
    manifest = read_manifest(clipart, split="test", modalities=["text"], require_all=False)
    build_index(load(run), manifest, "text", tmp_path / "idx", run_dir=run)
    image = str(clipart.parent / rows[0]["image"])
    script = ("import json, sys\nfrom xmodal.cli import main\n"
              f"code = main(['query', '--index', {str(tmp_path / 'idx')!r}, '--image', {image!r}, '--json'])\n"
              "print(json.dumps([code, sorted(m for m in ('open_clip', 'accelerate', 'xmodal.training')"
              " if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    *hits, last = out.stdout.strip().splitlines()
    code, imported = json.loads(last)
    assert code == 0 and len(json.loads("\n".join(hits))["hits"]) == 5
    assert imported == []  # not the text tower's library, not the training stack
