"""The whole run, as a user meets it: ``xmodal pretrain`` (the real CLI, a subprocess) vs open_clip's own training
entry point ``python -m open_clip_train.main`` on the same real data, model, batch, steps, workers and threads.

Both sides read the same rows of Open Clip Art (``data/openclipart/manifest.csv``): ``--steps × --batch`` train rows
(seeded draw) written to one CSV per side with absolute image paths (xmodal: ``image,text,split``; open_clip:
``image,text``), and ``--eval-rows`` test rows as the held-out set (xmodal's final retrieval evaluation,
open_clip's ``--val-data`` pass: both run once at the end). The model is an open_clip config written as
``<work>/models/<name>/open_clip_config.json`` and named ``local-dir:<that folder>`` on both sides (open_clip 3 and
xmodal's ``kind: open_clip`` both read it); xmodal's towers use ``projection: none`` so both train exactly the same
parameters (the count is checked). One epoch; AdamW lr 1e-3, betas (0.9, 0.98), eps 1e-6, weight decay 0.1, warmup
``--warmup-lr-steps``, gradient clipping at norm 1.0, fp32, the same seed; each side logs every step (xmodal
``train.log_every: 1``; open_clip ``--log-every-n-steps 1``), saves its final checkpoint and model, no tracker.
Threads: ``OMP_NUM_THREADS=--threads`` for both; everything else in the environment is left as each tool sets it
(xmodal's CLI sets ``OMP_WAIT_POLICY=PASSIVE`` itself; ``--omp-wait-policy`` sets it for both).

Measured per run, from outside the process and from each side's own log:
  samples/s   steady state: each side's own per-step times (xmodal's ``metrics.jsonl`` ``samples_per_s`` per step;
              open_clip's ``Batch (t)`` line, its ``N/s``), the first ``--skip-steps`` steps left out; the figure is
              samples over the summed step times.
  TTFS        time to the first step: from the launch until the first step's record appears (xmodal's
              ``metrics.jsonl``, open_clip's ``out.log``; polled every 50 ms): imports, data checks, model build,
              loader start and the first step.
  wall        from the launch to the process's exit (the model saved).
  peak RSS    ``tree``: the largest sum of RSS over the process and its descendants (DataLoader workers), polled
              every 0.1 s (shared pages of forked workers are counted in each, on both sides alike); ``main``: the
              largest peak of the main process and of each child it reaped (``ru_maxrss`` from ``wait4``: Linux
              counts reaped children there, so a DataLoader worker forked from a large main process can be the
              figure); ``main own``: the main process's own peak (``VmHWM``, polled every 0.1 s).

Rounds interleave the sides (a seeded random order per round and model) and each ratio is the median over rounds of
the per-round xmodal/open_clip ratio, with the min-max spread. A fast-path trial (``--trial KEY=VALUE``, repeatable)
adds a third side, ``xmodal-trial``: the same xmodal run with those config values, in the same rounds; the summary
then also gives its ratios to plain xmodal and to open_clip (compile time, where the trial compiles, is inside its
TTFS and wall, as a user meets it; ``--cold-compile-cache``: with none of the compiled code earlier runs cached).
The machine may be shared: ratios from alternating runs, never absolute figures from different moments, are what
to read.

    python benchmarks/end_to_end.py                                   # both sizes, 3 rounds
    python benchmarks/end_to_end.py --models xmodal-vit-tiny --rounds 1 --steps 12   # a smoke run
    python benchmarks/end_to_end.py --from-json a.json b.json     # the summary of earlier runs (--json), joined
    python benchmarks/end_to_end.py --models xmodal-vit-tiny --trial 'model.plugins=[benchmarks._compile_towers]'
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "data" / "openclipart" / "manifest.csv"
SIDES = ("xmodal", "open_clip")
TRIAL = "xmodal-trial"  # xmodal with --trial's config values

# The sizes (open_clip's JSON schema). xmodal-vit-tiny is xmodal's own 9M-parameter config; bench-vit-small is
# benchmarks/_common.py's wider, deeper one at the same image size; ViT-B-32 is open_clip's.
MODELS: dict[str, dict] = {
    "xmodal-vit-tiny": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 192, "layers": 4, "head_width": 64},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4},
    },
    "bench-vit-small": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 6, "head_width": 64},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
    },
    # open_clip's own model_configs/ViT-B-32.json (151M parameters; 224 px, 77 tokens): not in the default --models
    # (a step of 32 takes seconds on 2 cores)
    "ViT-B-32": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    },
}

# open_clip_train's per-step line: "Train Epoch: 0 [ 64/1920 ( 3%)] Data (t): 0.012 Batch (t): 0.456, 140.3/s, ..."
OC_STEP = re.compile(r"Train Epoch: \d+ \[.*?\] Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+), ([\d.eE+-]+)/s")


# ------------------------------------------------------------------------------------------------------ inputs

def write_inputs(work: Path, steps: int, batch: int, eval_rows: int, seed: int) -> dict[str, Path]:
    """The shared rows as each side's CSV (absolute image paths): xmodal's manifest with a split column, open_clip's
    train and val CSVs."""
    with open(MANIFEST, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    base = MANIFEST.parent
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    need = steps * batch
    if need > len(train) or eval_rows > len(test):
        raise SystemExit(f"{MANIFEST}: {len(train)} train / {len(test)} test rows; asked for {need} / {eval_rows}")
    rng = random.Random(seed)
    train, test = rng.sample(train, need), rng.sample(test, eval_rows)
    work.mkdir(parents=True, exist_ok=True)
    paths = {"xmodal": work / "xmodal_manifest.csv", "oc_train": work / "oc_train.csv", "oc_val": work / "oc_val.csv"}
    with open(paths["xmodal"], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "text", "split"])
        for split, part in (("train", train), ("test", test)):
            for r in part:
                w.writerow([str(base / r["image"]), r["text"], split])
    for key, part in (("oc_train", train), ("oc_val", test)):
        with open(paths[key], "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", "text"])
            for r in part:
                w.writerow([str(base / r["image"]), r["text"]])
    return paths


def model_cfg(name: str, context_length: int | None = None) -> dict:
    """``MODELS[name]``, its text context set to ``context_length`` where given (77 is open_clip's CLIP configs')."""
    cfg = json.loads(json.dumps(MODELS[name]))
    if context_length is not None:
        cfg["text_cfg"]["context_length"] = context_length
    return cfg


def write_model(work: Path, name: str, context_length: int | None = None) -> Path:
    folder = work / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg(name, context_length)}),
                                                  encoding="utf-8")
    return folder


def xmodal_config(args, paths: dict, model_dir: Path, name: str, out: Path, trial: bool = False) -> Path:
    import yaml  # PyYAML: xmodal's own config reader needs it anyway
    cfg = model_cfg(name, args.context_length)
    tower = f"local-dir:{model_dir}"
    doc = {
        "output_dir": str(out), "seed": args.seed,
        "model": {"embed_dim": cfg["embed_dim"], "loss": "clip", "towers": {
            "image": {"kind": "open_clip", "name": tower, "image_size": cfg["vision_cfg"]["image_size"],
                      "projection": "none", "augment": True},
            "text": {"kind": "open_clip", "name": tower, "context_length": cfg["text_cfg"]["context_length"],
                     "projection": "none"}}},
        "data": {"train": str(paths["xmodal"]), "train_split": "train", "eval_split": "test",
                 "num_workers": args.workers},
        "train": {"batch_size": args.batch, "epochs": 1, "lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-6,
                  "weight_decay": 0.1, "warmup_steps": args.warmup_lr_steps, "max_grad_norm": 1.0,
                  "log_every": 1},
        "log": {"backend": "none"},
    }
    for override in list(args.xmodal_set) + (list(args.trial) if trial else []):
        key, _, value = override.partition("=")
        node = doc
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def commands(args, side: str, paths: dict, model_dir: Path, name: str, out: Path) -> tuple[list[str], Path]:
    """(argv, the file whose first step record marks the first step)."""
    py = sys.executable
    if side != "open_clip":
        cfg = xmodal_config(args, paths, model_dir, name, out, trial=side == TRIAL)
        return [py, "-m", "xmodal.cli", "pretrain", "--config", str(cfg)], out / "metrics.jsonl"
    logs, run_name = out.parent, out.name
    argv = [py, "-m", "open_clip_train.main", "--device", "cpu", "--precision", "fp32",
            "--train-data", str(paths["oc_train"]), "--val-data", str(paths["oc_val"]), "--dataset-type", "csv",
            "--csv-img-key", "image", "--csv-caption-key", "text", "--csv-separator", ",",
            "--model", f"local-dir:{model_dir}", "--batch-size", str(args.batch), "--epochs", "1",
            "--workers", str(args.workers), "--lr", "1e-3", "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
            "--wd", "0.1", "--warmup", str(args.warmup_lr_steps), "--grad-clip-norm", "1.0",
            "--seed", str(args.seed), "--log-every-n-steps", "1", "--report-to", "", "--logs", str(logs),
            "--name", run_name, "--save-frequency", "1"] + list(args.open_clip_arg)
    return argv, out / "out.log"


# ------------------------------------------------------------------------------------------------------ one run

def _first_step_seen(side: str, marker: Path, offset: list[int]) -> bool:
    if not marker.is_file():
        return False
    with open(marker, encoding="utf-8", errors="replace") as f:
        f.seek(offset[0])
        text = f.read()
    # only whole lines; a partial one is read again next time
    cut = text.rfind("\n") + 1
    offset[0] += len(text[:cut].encode("utf-8"))
    for line in text[:cut].splitlines():
        if side != "open_clip":
            if '"samples_per_s"' in line:
                return True
        elif OC_STEP.search(line):
            return True
    return False


def _tree_rss(proc) -> int:
    import psutil
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def _own_peak_rss(pid: int) -> int:
    """The process's own peak RSS so far (Linux ``VmHWM``, bytes; 0 where unreadable): unlike ``ru_maxrss`` from
    ``wait4``, which is the largest of the process and every child it reaped, no DataLoader worker counts here."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_once(args, side: str, paths: dict, model_dir: Path, name: str, out: Path) -> dict:
    import psutil
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)  # each side's config and console log go beside its run folder
    argv, marker = commands(args, side, paths, model_dir, name, out)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT), WANDB_MODE="disabled",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if args.omp_wait_policy:
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if args.cold_compile_cache:  # a first run: TorchInductor finds none of its compiled code from earlier runs
        env["TORCHINDUCTOR_CACHE_DIR"] = str(out / "inductor-cache")
    log_path = out.parent / f"{out.name}.console.log"
    with open(log_path, "w") as console:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=console, stderr=subprocess.STDOUT, cwd=str(out.parent), env=env,
                                start_new_session=True)
        ps = psutil.Process(proc.pid)
        ttfs, peak_tree, peak_own, offset, tick = None, 0, 0, [0], 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if tick % 2 == 0:  # every 0.1 s: walking the process tree costs this process CPU the runs would use
                peak_tree = max(peak_tree, _tree_rss(ps))
                peak_own = max(peak_own, _own_peak_rss(proc.pid))
            if ttfs is None and _first_step_seen(side, marker, offset):
                ttfs = time.perf_counter() - t0
            tick += 1
            time.sleep(0.05)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{side} {name} failed (exit {proc.returncode}); its output: {log_path}\n"
                         + log_path.read_text(errors="replace")[-3000:])
    times = step_times(side, marker, args.batch)
    if len(times) != args.steps:
        raise SystemExit(f"{side} {name}: {len(times)} logged steps, expected {args.steps} ({marker})")
    if ttfs is None:  # the first step and the exit fell into one polling interval
        ttfs = wall
    steady = times[args.skip_steps:]
    return {"samples_s": args.batch * len(steady) / sum(steady), "ttfs_s": ttfs, "wall_s": wall,
            "rss_tree_mib": peak_tree / 2 ** 20, "rss_main_mib": usage.ru_maxrss / 1024,
            "hwm_main_mib": peak_own / 2 ** 20,
            "first_step_s": times[0], "params": count_params(side, out)}


def step_times(side: str, marker: Path, batch: int) -> list[float]:
    """Each step's seconds from the side's own log."""
    times = []
    for line in marker.read_text(encoding="utf-8", errors="replace").splitlines():
        if side != "open_clip":
            rec = json.loads(line)
            if "samples_per_s" in rec:
                times.append(batch / rec["samples_per_s"])
        else:
            m = OC_STEP.search(line)
            if m:
                times.append(batch / float(m.group(3)))
    return times


def count_params(side: str, out: Path) -> int | None:
    """Trainable parameters the run saved (xmodal's model.safetensors; open_clip's final checkpoint)."""
    import torch
    if side != "open_clip":
        from safetensors.torch import load_file
        sd = load_file(str(out / "model.safetensors"))
    else:
        ckpts = sorted((out / "checkpoints").glob("epoch_*.pt"))
        if not ckpts:
            return None
        sd = torch.load(ckpts[-1], map_location="cpu", weights_only=True)["state_dict"]
    return sum(v.numel() for k, v in sd.items() if v.is_floating_point() and "attn_mask" not in k)


# ------------------------------------------------------------------------------------------------------ report

METRICS = (("samples_s", "samples/s"), ("ttfs_s", "TTFS s"), ("wall_s", "wall s"), ("rss_tree_mib", "RSS tree MiB"),
           ("rss_main_mib", "RSS main MiB"), ("hwm_main_mib", "RSS main own MiB"))


SHORT = {"xmodal": "x", "open_clip": "oc", TRIAL: "trial"}


def summarise(results: dict[str, dict[str, list[dict]]], a: str = "xmodal", b: str = "open_clip") -> str:
    """Side ``a`` against side ``b``: medians of each, and the median (min-max) of the per-round ratios a / b."""
    lines = []
    pair = f"{SHORT[a]} / {SHORT[b]}"
    runs = [r for by_side in results.values() for side in (a, b) for r in by_side.get(side, [])]
    metrics = [m for m in METRICS if all(m[0] in r for r in runs)]  # JSON files written before a metric existed
    head = ["model", "params"] + [f"{lab} {pair}" for _, lab in metrics] + [f"{lab} ratio" for _, lab in metrics]
    rows = []
    for name, by_side in results.items():
        if a not in by_side or b not in by_side:
            continue
        x, o = by_side[a], by_side[b]
        row = [name, f"{x[0]['params']:,} / {o[0]['params']:,}" if o[0]["params"] else f"{x[0]['params']:,}"]
        for key, _ in metrics:
            row.append(f"{statistics.median(r[key] for r in x):.1f} / {statistics.median(r[key] for r in o):.1f}")
        for key, _ in metrics:
            ratios = [a[key] / b[key] for a, b in zip(x, o)]
            row.append(f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="xmodal-vit-tiny,bench-vit-small", help=f"comma-separated: {', '.join(MODELS)}")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="optimiser steps (one epoch of steps × batch rows)")
    p.add_argument("--skip-steps", type=int, default=5, help="first steps left out of the steady state")
    p.add_argument("--eval-rows", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context-length", type=int, default=None,
                   help="the text context of both sides' model (default: each model's, 32; open_clip's CLIP configs: 77)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup-lr-steps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--omp-wait-policy", default=None, help="set OMP_WAIT_POLICY for both sides (default: as each sets)")
    p.add_argument("--xmodal-set", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra xmodal config value (e.g. train.compile=true), for fast-path trials")
    p.add_argument("--open-clip-arg", action="append", default=[], help="an extra open_clip_train flag")
    p.add_argument("--trial", action="append", default=[], metavar="KEY=VALUE",
                   help=f"run a third side, {TRIAL}: xmodal with this extra config value (repeatable)")
    p.add_argument("--cold-compile-cache", action="store_true",
                   help="each run gets an empty TorchInductor cache (a user's first compiled run; default: the "
                        "cache earlier runs left, as a user's later runs find it)")
    p.add_argument("--sides", default=None, help="comma-separated subset of the sides (default: all)")
    p.add_argument("--work", type=Path, default=Path("/tmp") / f"xmodal-e2e-{os.getuid()}")
    p.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    p.add_argument("--from-json", type=Path, nargs="+", default=None,
                   help="no runs: the summary of the runs saved by earlier --json files, joined")
    args = p.parse_args(argv)
    if args.from_json:
        joined: dict[str, dict[str, list[dict]]] = {}
        for f in args.from_json:
            saved = json.loads(f.read_text())
            context = saved.get("args", {}).get("context_length", "None")  # files of other contexts stay apart
            for name, by_side in saved["results"].items():
                label = name if context == "None" else f"{name} (context {context})"
                for side, runs in by_side.items():
                    joined.setdefault(label, {}).setdefault(side, []).extend(runs)
        report(joined)
        return
    if args.skip_steps >= args.steps:
        raise SystemExit("--skip-steps must be below --steps")
    models = [m for m in args.models.split(",") if m]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--models: unknown {m!r} (known: {', '.join(MODELS)})")
    sides = [s for s in (args.sides or ",".join(SIDES + ((TRIAL,) if args.trial else ()))).split(",") if s]
    if set(sides) - {*SIDES, TRIAL} or (TRIAL in sides and not args.trial):
        raise SystemExit(f"--sides: from {', '.join(SIDES)}, and {TRIAL} with --trial")
    paths = write_inputs(args.work, args.steps, args.batch, args.eval_rows, args.seed)
    print(f"# end to end: batch {args.batch}, {args.steps} steps (first {args.skip_steps} left out), "
          f"{args.workers} workers, {args.threads} threads, {args.eval_rows} eval rows, {args.rounds} rounds; "
          f"{os.cpu_count()} visible cores, load {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, dict[str, list[dict]]] = {m: {s: [] for s in sides} for m in models}
    rng = random.Random(1234)
    for r in range(args.rounds):
        for name in models:
            model_dir = write_model(args.work, name, args.context_length)
            for side in rng.sample(sides, len(sides)):
                out = args.work / "runs" / f"{side}-{name}-r{r}"
                res = run_once(args, side, paths, model_dir, name, out)
                results[name][side].append(res)
                print(f"round {r} {name:16s} {side:9s} " + " ".join(
                    f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items())
                    + f" load={os.getloadavg()[0]:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                        indent=1))
    report(results)


def report(results: dict[str, dict[str, list[dict]]]) -> None:
    """Every pair of sides that ran: xmodal / open_clip, and the trial against each."""
    ran = {s for by_side in results.values() for s in by_side}
    for a, b in (("xmodal", "open_clip"), (TRIAL, "xmodal"), (TRIAL, "open_clip")):
        if {a, b} <= ran:
            print(f"\n{a} / {b}\n" + summarise(results, a, b))


if __name__ == "__main__":
    main()
