"""The frozen-tower feature pass against its limit: rows/s of the cache pass ``xmodal pretrain`` runs before its
first step (``xmodal.feature_cache.precompute_features``, called as ``xmodal.training.build.make_loaders`` calls it)
vs the bare tower forward on already decoded tensors (the limit: what the pass would reach if decoding were free)
and vs decoding alone.

The towers are those of ``configs/pretrain.yaml`` (frozen, packaged EfficientNet-Lite0 and all-MiniLM-L6-v2), built
from that file by ``xmodal.config.load_config`` + ``XModalModel`` as the CLI builds them, at the quickstart's image
size (``--image-size``, default 128). ``--rows`` train rows of Open Clip Art (a seeded draw); the text values are
their captions. Sections per tower:

  decode    the tower's eval transform over every row in this process (image: open, decode, resize, crop,
            normalise; text: tokenise), no forward.
  limit     the encoder's forward (eval mode, ``torch.inference_mode``, the channels-last input hook as built) over
            tensors decoded beforehand, in the pass's batches (text: sorted by length, as the pass does).
  pass      ``precompute_features`` itself (no disk cache, no in-process memo), with ``--workers`` DataLoader workers
            (``data.num_workers``: the user's setting; 0 is the default: decode a batch, then encode it, in turn).
            On the CPU the pass takes no more workers than the cores the forward's threads leave free
            (``xmodal.feature_cache.pass_workers``: here 2 cores - 2 threads = none).
  pass wN uncapped   the same with all N workers (as before that cap): what the cap is measured against.
  pass w0 read-ahead   the trial of overlapping decoding with the forward in one process: the same pass with its
            DataLoader's batches produced by a thread, 2 ahead (PIL's decoding and resizing and torch's ops release
            the GIL). Measured, not adopted (docs/benchmarks.md): on 2 busy cores it slowed the image pass
            (decoding: ~5% of the image forward's CPU time, ~1% of the text's).

Each round runs every section once, in a seeded random order; figures are medians over rounds, and pass/limit is the
median of the per-round ratios (min-max shown). CPU s: the section's CPU time (all threads, workers included),
steadier than wall time on a shared machine; limit CPU ÷ CPU is the median of the per-round ratios. Features from
the pass are checked equal to the limit's forward.

    python benchmarks/feature_pass.py                         # both towers, 512 rows, 3 rounds
    python benchmarks/feature_pass.py --towers image --rows 256 --rounds 2 --workers 0,2
"""
from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import _common as C  # noqa: E402  (sets OMP_WAIT_POLICY=PASSIVE as the CLI does, before torch loads)
import torch  # noqa: E402

MANIFEST = C.ROOT / "data" / "openclipart" / "manifest.csv"
CONFIG = C.ROOT / "configs" / "pretrain.yaml"


class ReadAhead:
    """A ``DataLoader`` whose batches a background thread produces up to 2 ahead of the consumer, in order."""

    def __init__(self, *args, **kwargs):
        from torch.utils.data import DataLoader
        self.loader = DataLoader(*args, **kwargs)

    def __iter__(self):
        import queue
        import threading
        ready: queue.Queue = queue.Queue(maxsize=2)
        end = object()

        def produce():
            try:
                for b in self.loader:
                    ready.put((b, None))
                ready.put((end, None))
            except BaseException as e:  # noqa: BLE001 - raised in the consumer
                ready.put((end, e))

        threading.Thread(target=produce, daemon=True).start()
        while True:
            b, error = ready.get()
            if b is end:
                if error is not None:
                    raise error
                return
            yield b


HEAD = ["tower", "section", "rows/s", "÷ limit rows/s (min-max)", "CPU s", "limit CPU ÷ CPU"]


def with_cpu_time(fn, into: list[float]):
    """``fn``, appending each call's CPU seconds to ``into``: this process's threads and its reaped children (the
    DataLoader workers, joined when the pass ends)."""
    def timed():
        t0 = os.times()
        try:
            return fn()
        finally:
            t1 = os.times()
            into.append(sum(t1[:4]) - sum(t0[:4]))
    return timed


def build(image_size: int):
    """The pretrain config's model, as ``xmodal pretrain`` builds it."""
    from xmodal.config import load_config
    from xmodal.model import XModalModel
    cfg = load_config(CONFIG, [f"model.towers.image.image_size={image_size}"])
    model = XModalModel(cfg.model)
    model.eval()
    return cfg, model


def rows(n: int, seed: int) -> dict[str, list[str]]:
    with open(MANIFEST, newline="", encoding="utf-8") as f:
        train = [r for r in csv.DictReader(f) if r["split"] == "train"]
    picked = random.Random(seed).sample(train, n)
    return {"image": [str(MANIFEST.parent / r["image"]) for r in picked], "text": [r["text"] for r in picked]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--towers", default="image,text")
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--batch", type=int, default=256, help="the pass's batch (train.batch_size; pretrain.yaml: 256)")
    p.add_argument("--workers", default="0", help="comma-separated data.num_workers values for the pass")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-read-ahead", dest="read_ahead", action="store_false",
                   help="leave out the read-ahead trial (pass w0 with its batches decoded by a thread, 2 ahead)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import xmodal.feature_cache as fc
    from xmodal.feature_cache import _by_length, precompute_features
    cfg, model = build(args.image_size)
    data = rows(args.rows, args.seed)
    workers = [int(w) for w in args.workers.split(",")]
    print(f"# feature pass: configs/pretrain.yaml towers, image {args.image_size} px, {args.rows} rows, batch "
          f"{args.batch}, {args.threads} threads, {args.rounds} rounds; torch {torch.__version__}, "
          f"{os.cpu_count()} visible cores, load {os.getloadavg()[0]:.2f}", flush=True)
    table = []
    for m in [t for t in args.towers.split(",") if t]:
        encoder, transform = model.towers[m].encoder, model.transform(m, train=False)
        values = _by_length(list(dict.fromkeys(data[m])))  # the order the pass embeds them in
        decoded = torch.stack([transform(v) for v in values])  # also warms the page cache and the transform

        @torch.inference_mode()
        def limit():
            return torch.cat([encoder(decoded[i:i + args.batch]) for i in range(0, len(values), args.batch)])

        def decode():
            return [transform(v) for v in values]

        def run_pass(w: int, read_ahead: bool = False, uncapped: bool = False):
            def go():
                saved, saved_workers = fc.DataLoader, fc.pass_workers
                fc.DataLoader = ReadAhead if read_ahead else saved
                if uncapped:
                    fc.pass_workers = lambda n, device: n
                try:
                    return precompute_features(encoder, transform, values, batch_size=args.batch, num_workers=w,
                                               progress=False)
                finally:
                    fc.DataLoader, fc.pass_workers = saved, saved_workers
            return go

        sections = {"decode": decode, "limit": limit}
        for w in workers:
            sections[f"pass w{w}"] = run_pass(w)
            if fc.pass_workers(w, "cpu") != w:
                sections[f"pass w{w} uncapped"] = run_pass(w, uncapped=True)
        if 0 in workers and args.read_ahead:
            sections["pass w0 read-ahead"] = run_pass(0, read_ahead=True)
        reference = limit()
        for name in [s for s in sections if s.startswith("pass")]:  # the pass's features are the bare forward's
            got = sections[name]()
            got = torch.stack([got(v) for v in values])
            err = (got - reference).abs().max().item()
            if not torch.allclose(got, reference, atol=1e-5, rtol=1e-4):
                raise SystemExit(f"{m}: {name} features differ from the bare forward (max |Δ| {err:.2e})")
        cpu: dict[str, list[float]] = {name: [] for name in sections}
        times = C.interleave({name: with_cpu_time(fn, cpu[name]) for name, fn in sections.items()},
                             rounds=args.rounds, warmup=1, device="cpu")
        n = len(values)
        lim, lim_cpu = times["limit"], cpu["limit"][1:]  # the warm-up round's CPU times left out, as its wall times
        for name, ts in times.items():
            ratios = [lim_t / t for lim_t, t in zip(lim, ts)]
            cpu_ratios = [a / b for a, b in zip(lim_cpu, cpu[name][1:])]
            table.append([m, name, n / statistics.median(ts),
                          f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                          f"{statistics.median(cpu[name][1:]):.2f}", f"{statistics.median(cpu_ratios):.2f}"])
        print(C.table(HEAD, table[-len(times):]), flush=True)
    print()
    print(C.table(HEAD, table))
    print(f"# load at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
