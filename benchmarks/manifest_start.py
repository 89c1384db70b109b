"""What reading a file manifest without ``datasets`` saves at start-up (issue #19): CPU seconds of a fresh process
that imports the training engine and reads a CSV manifest (the start of ``xmodal pretrain`` up to its model), as
xmodal is now, against the same with ``import datasets`` first — what every command paid before the manifest's rows
became :class:`xmodal.data.Rows`. Interleaved rounds in fresh interpreters; medians and the per-round differences.

    python benchmarks/manifest_start.py --manifest data/openclipart/manifest.csv --rounds 8
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import json, sys, time
c0, w0 = time.process_time(), time.perf_counter()
if {with_datasets}:
    import datasets
import xmodal.training.engine
from xmodal.data import read_manifest
m = read_manifest({manifest!r}, split="train")
print(json.dumps({{"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0, "rows": len(m),
                  "datasets_imported": "datasets" in sys.modules}}))
"""


def run(manifest: str, with_datasets: bool) -> dict:
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", CODE.format(with_datasets=with_datasets, manifest=manifest)],
                         capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", default=str(ROOT / "data" / "openclipart" / "manifest.csv"))
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    run(args.manifest, False)  # warm the page cache for both
    rows = {False: [], True: []}
    for r in range(args.rounds):
        for with_datasets in ((False, True) if r % 2 == 0 else (True, False)):
            res = run(args.manifest, with_datasets)
            assert res["datasets_imported"] == with_datasets, res  # the plain path really left datasets out
            rows[with_datasets].append(res)
            print(f"round {r} {'with datasets' if with_datasets else 'xmodal now  '} cpu {res['cpu_s']:.3f} s "
                  f"wall {res['wall_s']:.3f} s ({res['rows']} rows)", flush=True)
    for key in ("cpu_s", "wall_s"):
        now = [x[key] for x in rows[False]]
        before = [x[key] for x in rows[True]]
        diff = sorted(b - a for a, b in zip(now, before))
        print(f"{key}: xmodal now {statistics.median(now):.3f}, with datasets {statistics.median(before):.3f}, "
              f"saved per round: median {statistics.median(diff):.3f} (min {diff[0]:.3f}, max {diff[-1]:.3f})")


if __name__ == "__main__":
    main()
