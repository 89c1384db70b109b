"""benchmarks/matryoshka.py: the table's means, spreads, ratios and target verdicts are the hand-computed ones."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from _benchmarks import load_benchmark


def _record(variant: str, seed: int, full: int, r10: dict, r1: float = 0.3) -> dict:
    """``r10``: {dim or None: (text->image R@10, image->text R@10)}."""
    rec = {"variant": variant, "seed": seed, "embed_dim": full, "selected": 10 * (seed + 1), "of": 100}
    for dim, (ti, it) in r10.items():
        sfx = "" if dim is None else f"@{dim}"
        for d, v in (("text->image", ti), ("image->text", it)):
            rec.update({f"{d}{sfx}/R@1": r1, f"{d}{sfx}/R@5": (r1 + v) / 2, f"{d}{sfx}/R@10": v})
    return rec


def test_table_means_ratios_and_verdicts(tmp_path: Path, capsys):
    bench = load_benchmark("matryoshka")
    recs = []
    for seed, (p, m_full, m64, d64) in enumerate([(0.60, 0.59, 0.55, 0.56), (0.62, 0.60, 0.53, 0.58),
                                                  (0.61, 0.61, 0.54, 0.57)]):
        recs.append(_record("plain", seed, 256, {None: (p, p), 64: (0.40, 0.41), 128: (0.5, 0.5)}))
        recs.append(_record("matryoshka", seed, 256, {None: (m_full, m_full + 0.02), 64: (m64, 0.50),
                                                      128: (0.58, 0.58)}))
        recs.append(_record("dim64", seed, 64, {None: (d64, 0.50)}))
    recs.append({**recs[0], "text->image/R@10": 0.99})  # a repeated (variant, seed): the first record counts
    path = tmp_path / "matryoshka.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")

    rows = bench.load_rows(path)
    assert rows["plain", 0]["text->image/R@10"] == 0.60
    mean, sd, n = bench.summary(rows, "matryoshka", 64, "text->image", 10)
    assert n == 3 and abs(mean - 0.54) < 1e-12 and abs(sd - 0.01) < 1e-12  # 0.55, 0.53, 0.54

    assert bench.main(["--out", str(tmp_path), "--table"]) == 0
    out = capsys.readouterr().out
    # matryoshka @64 t→i: 0.54 / mean(0.56, 0.58, 0.57) = 0.947 < 0.95: not met; i→t: 0.50 / 0.50 = 1: met
    r64 = 0.54 / statistics.fmean([0.56, 0.58, 0.57])
    line = next(x for x in out.splitlines() if x.startswith("| matryoshka @64 vs dim64") and "text->image" in x)
    assert f"| {r64:.3f} |" in line and line.rstrip().endswith("**no** |")
    line = next(x for x in out.splitlines() if x.startswith("| matryoshka @64 vs dim64") and "image->text" in x)
    assert "| 1.000 |" in line and line.rstrip().endswith("yes |")
    # full vs plain t→i: 0.60 / 0.61 = 0.984 ≥ 0.98: met
    line = next(x for x in out.splitlines() if x.startswith("| matryoshka full vs plain") and "text->image" in x)
    assert f"| {0.60 / 0.61:.3f} |" in line and line.rstrip().endswith("yes |")
    # rows per variant and prefix: the plain run's truncation is reported, dim64 has no prefix below 64
    assert "| plain | 64 | 3 | 0.300 ± 0.000 | 0.300 ± 0.000 | 0.400 ± 0.000 | 0.410 ± 0.000 |  |" in out
    assert "| dim64 | 64 | 3 |" in out and "| dim64 | 128 |" not in out
    assert "| matryoshka | 256 | 3 |" in out and "10 (100), 20 (100), 30 (100)" in out
