"""benchmarks/sentiment_baseline.py's arithmetic and table, by hand: the majority rate, the per-seed differences in
points, and the majority rate printed beside every accuracy."""
from __future__ import annotations

import pytest
from _benchmarks import load_benchmark

sb = load_benchmark("sentiment_baseline")


def test_majority_rate_and_points_by_hand():
    assert sb.majority_rate(["pos", "neg", "pos", "pos"]) == pytest.approx(0.75)
    # per-seed differences 5 and 7 points: mean 6, sample std sqrt(2) = 1.41
    assert sb.points([0.80, 0.82], 0.75) == "+6.0 ± 1.4"
    assert sb.points([0.70], 0.75) == "-5.0 ± 0.0"
    assert sb.mean_std([0.80, 0.82]) == "0.810 ± 0.014"


def test_table_puts_the_majority_rate_beside_each_accuracy(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,text,label,split\n1,good,pos,train\n2,bad,neg,val\n3,fine,pos,val\n4,meh,neg,test\n"
                        "5,ok,neg,test\n6,great,pos,test\n", encoding="utf-8")
    rows = sb.read_rows(manifest, "label")
    assert rows["test"] == (["meh", "ok", "great"], ["neg", "neg", "pos"])
    res = {"seeds": [0, 1], "domains": {"rotten-tomatoes": {
        "rows": {"train": 1, "val": 2, "test": 3}, "lr": {"C": 1.0, "val": 0.5, "test": 0.6},
        "majority": {s: sb.majority_rate(rows[s][1]) for s in ("val", "test")},
        "configs": {"c.yaml": [{"val": 0.9, "test": 0.7}, {"val": 0.8, "test": 0.8}]}}}}
    table = sb.tables(res)
    assert "| LR on frozen MiniLM (C = 1, on val) | 0.500 (0.500) | 0.600 (0.667) | — |" in table
    assert "| `c.yaml` | 0.850 ± 0.071 (0.500) | 0.750 ± 0.071 (0.667) | +15.0 ± 7.1 |" in table
