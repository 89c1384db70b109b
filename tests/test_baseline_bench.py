"""benchmarks/baseline.py: the twenty-line peer learns an alignment it can learn, and the table's means, spreads and
ratios are the hand-computed ones."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import SimpleNamespace

import torch
from _benchmarks import load_benchmark


def test_train_baseline_aligns_paired_features():
    bench = load_benchmark("baseline")
    g = torch.Generator().manual_seed(0)
    n, di, dt = 600, 48, 24
    image = torch.randn(n, di, generator=g)
    text = image @ torch.randn(di, dt, generator=g) + 0.05 * torch.randn(n, dt, generator=g)  # text = A·image
    model = SimpleNamespace(towers={"image": SimpleNamespace(projection=torch.nn.Linear(di, 32)),
                                    "text": SimpleNamespace(projection=torch.nn.Linear(dt, 32))},
                            logit_scale=torch.nn.Parameter(torch.zeros(1)))
    loss = bench.train_baseline(image[:500], text[:500], seed=0, model=model)
    assert loss < 0.5  # ln(256) = 5.5 for an untrained pair of maps at batch 256
    with torch.no_grad():  # held-out pairs: each text's nearest image is its own
        ei = torch.nn.functional.normalize(model.towers["image"].projection(image[500:]), dim=-1)
        et = torch.nn.functional.normalize(model.towers["text"].projection(text[500:]), dim=-1)
    assert ((et @ ei.T).argmax(1) == torch.arange(100)).float().mean() > 0.9
    assert model.logit_scale.item() <= torch.log(torch.tensor(100.0)).item() + 1e-6  # the temperature, clamped


def test_table_from_saved_results(tmp_path: Path, capsys):
    bench = load_benchmark("baseline")
    runs = []
    for seed, (x, b) in enumerate([(0.30, 0.20), (0.34, 0.22), (0.35, 0.24)]):
        runs.append({"corpus": "c", "system": "xmodal", "seed": seed,
                     "metrics": {"text->image/R@1": x, "image->text/R@1": x}})
        runs.append({"corpus": "c", "system": "baseline", "seed": seed,
                     "metrics": {"text->image/R@1": b, "image->text/R@1": b}})
    s = bench.summary({"runs": runs}, "c")
    assert s["xmodal"]["text->image/R@1"][0] == statistics.fmean([0.30, 0.34, 0.35])
    assert abs(s["baseline"]["text->image/R@1"][1] - 0.02) < 1e-12  # sample std of 0.20, 0.22, 0.24
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"meta": {"commit": "abc", "config": "configs/pretrain.yaml", "config_sha1": "f00"},
                               "runs": runs}))
    assert bench.main(["--out", str(out), "--table"]) == 0
    table = capsys.readouterr().out
    ratio = f"{statistics.fmean([0.30, 0.34, 0.35]) / 0.22:.2f}x"  # 1.50x
    assert "text->image/R@1" in table and ratio in table and "xmodal (n=3)" in table
