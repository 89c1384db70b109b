"""Sharded corpora (issue #15): memory and start-up at 10k vs 1M samples, and data-pipeline throughput against
open_clip_train's webdataset pipeline on the same shards.

Shards: ``xmodal shard`` of the Open Clip Art train rows (``data/openclipart/manifest.csv``) at 1,000 samples per
shard, then a corpus of ``N`` samples as ``N / 1000`` shard names that are symbolic links to those real shards (the
same images repeated, as the issue allows), with a ``sizes.json`` listing them all.

Sections (``--sections``):
  scale       ``xmodal pretrain`` on ``configs/pretrain_openclip_vit.yaml`` with ``data.shards`` for 3 steps, at each
              ``--sizes`` (and, for reference, on an in-memory manifest of ``--manifest-sizes`` rows: the same
              images repeated), each in a fresh process, ``--rounds`` interleaved rounds: peak RSS of the training
              process (``ru_maxrss``) and the time from the start of ``train()`` to the first batch in hand (the
              run's set-up: shard list, model, loader, first batch). ``--workers`` DataLoader workers (their
              memory is not in the main process's figure).
  throughput  samples/s of the two pipelines over the same shards with the same transforms (open_clip's
              ``image_transform(64, is_train=True)`` and its BPE tokenizer, context 32) and the same number of
              workers, batch ``--batch``: xmodal's ``StreamLoader`` (its epoch plan, block shuffle, decode through the
              modality registry, collate) vs ``open_clip_train.data.get_wds_dataset`` (ResampledShards2 off:
              SimpleShardList + detshuffle2 + split_by_node/worker + tarfile_to_samples_nothrow + shuffle + decode +
              batched). Both timed over the same number of samples, workers' start-up included: open_clip's pass
              (whole batches per worker). Interleaved rounds (seeded order); the ratio is the median of per-round
              ratios, printed with its quartiles and range.

    python benchmarks/shard_stream.py --sections scale --sizes 10000 1000000
    python benchmarks/shard_stream.py --sections throughput --workers 2 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_base_shards(manifest: str, out: Path) -> list[str]:
    if not (out / "sizes.json").is_file():
        from xmodal.cli import main
        assert main(["shard", "--manifest", manifest, "--split", "train", "--out", str(out),
                     "--samples-per-shard", "1000", "--on-bad-row", "skip"]) == 0
    sizes = json.loads((out / "sizes.json").read_text())
    return [str(out / name) for name, n in sizes.items() if n == 1000]  # whole shards only


def make_corpus(base: list[str], samples: int, out: Path) -> str:
    """``samples // 1000`` shard names linking to the base shards in turn; returns the brace pattern."""
    n = samples // 1000
    out.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for i in range(n):
        link = out / f"{i:06d}.tar"
        if not link.exists():
            link.symlink_to(base[i % len(base)])
        sizes[link.name] = 1000
    (out / "sizes.json").write_text(json.dumps(sizes))
    return str(out / f"{{000000..{n - 1:06d}}}.tar")


def make_manifest(manifest: str, samples: int, out: Path) -> str:
    """The train rows repeated to ``samples`` rows (unique ids, absolute image paths): the in-memory reference."""
    import csv

    path = out / f"manifest_{samples}.csv"
    if path.is_file():
        return str(path)
    with open(manifest, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    base = Path(manifest).parent
    out.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "text"])
        w.writeheader()
        for i in range(samples):
            r = rows[i % len(rows)]
            w.writerow({"id": f"{i}", "image": str(base / r["image"]), "text": r["text"]})
    return str(path)


def run_one(spec: str, workers: int, out: str) -> dict:
    """In this (fresh) process: 3 steps of pretraining on ``spec`` (shards, or ``manifest:PATH``); peak RSS and the
    time from ``train()`` to the first batch."""
    from xmodal.config import load_config
    from xmodal.training import state
    from xmodal.training.engine import train

    first = {}
    real = state.TaskRun.next_batch

    def timed(self, accelerator):
        batch = real(self, accelerator)
        first.setdefault("t", time.perf_counter())
        return batch

    state.TaskRun.next_batch = timed
    source = ([f"data.train={spec.removeprefix('manifest:')}", "data.train_split=null", "data.allow_outside_root=true"]
              if spec.startswith("manifest:") else ["data.train=null", f"data.shards={spec}"])
    cfg = load_config(ROOT / "configs/pretrain_openclip_vit.yaml",
                      [*source, "data.eval_split=null", f"data.num_workers={workers}",
                       "train.max_steps=3", "train.progress=false", "log.backend=none", f"output_dir={out}",
                       "train.warmup_steps=1"])
    start = time.perf_counter()
    train(cfg)
    return {"first_batch_s": first["t"] - start, "total_s": time.perf_counter() - start,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _one(spec: str, args, tmp: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", spec, "--workers", str(args.workers),
                           "--out", str(tmp / f"run_{time.time_ns()}")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def section_scale(args, base: list[str], tmp: Path) -> None:
    """Each size ``--rounds`` times, interleaved in a seeded order, each run a fresh process; medians."""
    specs = {f"shards {n}": make_corpus(base, n, tmp / f"corpus_{n}") for n in args.sizes}
    specs.update({f"manifest {n}": "manifest:" + make_manifest(args.manifest, n, tmp)
                  for n in args.manifest_sizes})
    got: dict[str, list[dict]] = {k: [] for k in specs}
    rng = random.Random(0)
    for r in range(args.rounds):
        order = list(specs)
        rng.shuffle(order)
        for name in order:
            got[name].append(_one(specs[name], args, tmp))
            print(f"round {r} {name}: {got[name][-1]}", flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("peak_rss_mb", "first_batch_s")}
           for k, v in got.items()}
    for k, v in med.items():
        print(f"{k:>18}: peak RSS {v['peak_rss_mb']:.0f} MB, time to first batch {v['first_batch_s']:.2f} s "
              f"(medians of {args.rounds})")
    a, b = med[f"shards {args.sizes[0]}"], med[f"shards {args.sizes[-1]}"]
    print(f"shards {args.sizes[-1]} / {args.sizes[0]}: peak RSS {b['peak_rss_mb'] / a['peak_rss_mb']:.3f}, "
          f"time to first batch {b['first_batch_s'] / a['first_batch_s']:.3f}")


def _transforms():
    import open_clip
    image = open_clip.image_transform(64, is_train=True)
    tokenizer = open_clip.get_tokenizer("RN50")  # the CLIP BPE
    return image, lambda text: tokenizer([text], context_length=32)[0]


def xmodal_loader(spec: str, workers: int, batch: int):
    from xmodal.data.shard_plan import Layout
    from xmodal.data.shards import SampleDecoder, parse_columns, shard_list
    from xmodal.data.stream import ShardCorpus, ShardStream, StreamLoader

    image, text = _transforms()
    corpus = ShardCorpus(shard_list(spec), Layout(world=1, workers=max(1, workers), batch=batch))
    decoder = SampleDecoder(parse_columns({}, ["image", "text"]), {"image": image, "text": text})
    return StreamLoader(ShardStream(corpus, 0, decoder, shuffle_block=1000), workers)


def open_clip_loader(spec: str, workers: int, batch: int, samples: int):
    import functools

    import open_clip_train.data as oc
    from webdataset.tariterators import tar_file_expander

    # open_clip_torch[training] pins webdataset<=0.2.86; 1.0 ends each shard's stream with an EOF marker ({}) that
    # open_clip_train's group_by_keys_nothrow cannot read. Without the marker, 1.0's expander is 0.2.86's.
    oc.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    get_wds_dataset = oc.get_wds_dataset

    image, text = _transforms()
    args = argparse.Namespace(train_data=spec, val_data=None, train_num_samples=samples, dataset_resampled=False,
                              train_data_upsampling_factors=None, seed=0, batch_size=batch, workers=workers,
                              world_size=1)
    return get_wds_dataset(args, image, is_train=True, epoch=0, floor=True, tokenizer=lambda t: text(t)[None])


def _cpu_s() -> float:
    """CPU seconds (user + sys) of this process and of its children, running (psutil) or ended (rusage): the
    DataLoader workers, whether a loader shuts them down (xmodal) or keeps them (open_clip: persistent_workers)."""
    import psutil

    own, ended = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    running = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            running += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return own.ru_utime + own.ru_stime + ended.ru_utime + ended.ru_stime + running


def _rate(loader, limit: int) -> tuple[float, int, float]:
    """samples/s over the first ``limit`` samples (workers' start-up included), the count, and samples per CPU
    second of the main process and its workers (steadier than wall time on a loaded machine)."""
    cpu, start, n = _cpu_s(), time.perf_counter(), 0
    batches = iter(loader)
    for batch in batches:
        n += len(batch["id"]) if isinstance(batch, dict) else len(batch[0])
        if n >= limit:
            break
    rate, cpu = n / (time.perf_counter() - start), _cpu_s() - cpu
    if hasattr(batches, "_shutdown_workers"):  # untimed: no worker of this pass runs into the next one
        batches._shutdown_workers()
    return rate, n, n / cpu


def section_throughput(args, base: list[str]) -> None:
    spec = f"{Path(base[0]).parent}/{{00000..{len(base) - 1:05d}}}.tar"
    samples = 1000 * len(base)
    # Both timed over the same samples: open_clip's pass (whole batches per worker: its `with_epoch` floors to
    # 7 × 2 batches of 128), which is also xmodal's first 14 batches, 7 from each worker. xmodal's epoch has a 15th
    # batch (2000 // 128), which worker 0 would read alone: timed to the end of the epoch, the pass would charge
    # xmodal for an uneven last round of a 15-batch epoch, not for its pipeline (6.7% of the samples, 1/8 of a
    # worker's time).
    per_pass = samples // (args.batch * max(1, args.workers)) * args.batch * max(1, args.workers)
    rng, ratios, cpu_ratios, rates = random.Random(0), [], [], {}
    for r in range(args.rounds):
        peers = ["xmodal", "open_clip"]
        rng.shuffle(peers)
        got = {}
        for peer in peers:
            if peer == "xmodal":
                loader = xmodal_loader(spec, args.workers, args.batch)
                loader.set_position(r, 0)
            else:
                loader = open_clip_loader(spec, args.workers, args.batch, samples).dataloader
            got[peer] = _rate(loader, per_pass)
        ratios.append(got["xmodal"][0] / got["open_clip"][0])
        cpu_ratios.append(got["xmodal"][2] / got["open_clip"][2])
        for peer in got:
            rates.setdefault(peer, []).append(got[peer][0])
        print(f"round {r}: xmodal {got['xmodal'][0]:.0f} samples/s ({got['xmodal'][1]} samples, "
              f"{got['xmodal'][2]:.0f} per CPU-s), open_clip {got['open_clip'][0]:.0f} samples/s "
              f"({got['open_clip'][1]} samples, {got['open_clip'][2]:.0f} per CPU-s), ratio {ratios[-1]:.3f}, "
              f"per CPU-s {cpu_ratios[-1]:.3f}", flush=True)
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    print(f"throughput ratio xmodal/open_clip (median of {len(ratios)} rounds): {statistics.median(ratios):.3f}; "
          f"quartiles {q[0]:.3f}-{q[2]:.3f}, range {min(ratios):.3f}-{max(ratios):.3f}; rounds with xmodal ahead: "
          f"{sum(r > 1 for r in ratios)} of {len(ratios)}")
    cq = statistics.quantiles(cpu_ratios, n=4) if len(cpu_ratios) > 1 else [cpu_ratios[0]] * 3
    print(f"samples per CPU-second ratio xmodal/open_clip: median {statistics.median(cpu_ratios):.3f}; quartiles "
          f"{cq[0]:.3f}-{cq[2]:.3f}, range {min(cpu_ratios):.3f}-{max(cpu_ratios):.3f}")
    for peer in ("xmodal", "open_clip"):
        print(f"{peer}: median {statistics.median(rates[peer]):.0f} samples/s "
              f"(range {min(rates[peer]):.0f}-{max(rates[peer]):.0f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="scale,throughput")
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    p.add_argument("--manifest-sizes", type=int, nargs="*", default=[10_000],
                   help="the in-memory manifest path at these row counts, for reference")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--manifest", default=str(ROOT / "data/openclipart/manifest.csv"))
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "xmodal_shard_bench"))
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.workers, args.out)))
        return
    cache = Path(args.cache)
    base = make_base_shards(args.manifest, cache / "base")
    sections = args.sections.split(",")
    if "scale" in sections:
        section_scale(args, base, cache)
    if "throughput" in sections:
        section_throughput(args, base)


if __name__ == "__main__":
    main()
