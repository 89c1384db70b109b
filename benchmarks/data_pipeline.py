"""Data pipeline: xmodal's loader vs open_clip's CsvDataset loader, workers, pinned memory, pre-tokenised text, and
whether the loader keeps a training step busy -- on the real Open Clip Art rows (data/openclipart/manifest.csv).

Every comparison is interleaved (each round runs every peer once, in a random seeded order; ratios are medians of the
per-round paired ratios), as in the other benchmarks. Loader throughput is rows/s over a whole mini-epoch of
``--rows`` fixed, randomly chosen train rows (``--batch`` rows per batch, shuffled with the same seeded generator on
both sides, ``drop_last``), through ``DataLoader`` including collate; loaders with workers are persistent (as
``engine.train`` builds them), so a mini-epoch does not pay the workers' start-up (reported once, separately). The
image files are in the page cache after the warm-up round.

Tower configurations (the per-row transforms xmodal builds for them, ``xmodal.modalities.build_transform``):
  pretrain      configs/pretrain.yaml's towers at the quickstart's size: efficientnet_lite0 at 128 px (no
                augmentation: Resize + CenterCrop) + Hugging Face all-MiniLM-L6-v2 tokenizer, context 64
  pretrain-aug  the same with ``augment: true`` (RandomResizedCrop + flip: what a trainable image tower gets)
  tiny          xmodal-vit-tiny (open_clip towers): 64 px with augmentation + CLIP BPE, context 32

Sections (``--sections``):
  loader  xmodal (``read_manifest`` -> ``ManifestDataset`` -> ``collate``; as the library builds it, text
          pre-tokenised once, and with ``pretokenize=False``: per row) vs open_clip (``open_clip_train.data.
          CsvDataset`` -> default collate, the DataLoader arguments of its ``get_csv_dataset``) with the same image
          size and normalisation: open_clip's ``image_transform(size, is_train=augment)`` and, for MiniLM, open_clip's
          own ``HFTokenizer`` on the same tokenizer folder (for BPE its ``get_tokenizer``: the same SimpleTokenizer
          xmodal wraps); at each ``--workers`` value. Throughput (wall time) and CPU time per row (this process +
          the workers: steadier than wall time on a shared machine).
  pin     pinned host memory on/off: host->device copy of a collated batch (pageable vs pinned, blocking and
          non_blocking) and the loader with ``pin_memory=False/True``. CUDA only (on CPU there is no copy).
  pretok  pre-tokenised text (the whole text column tokenised once -- by ``ManifestDataset`` itself, by
          ``datasets.map(batched=True)``, by one batched tokenizer call; the loader then only indexes the ids) vs
          tokenising per row in the loader (``pretokenize=False``): one-off cost, text-only loader (also reading
          ids from a pre-tokenised arrow column), image + text loader at each ``--workers`` value; ids checked
          identical to the per-row path on every row.
  step    a real xmodal training step (``_common.XModalTrainer``: the engine's step body; ``--step-towers``, default
          xmodal-vit-tiny, all towers trainable) fed by the loader at each ``--workers`` value (per-row and
          pre-tokenised text) vs the same step on a pre-materialised batch: data-wait fraction = time blocked in
          ``next(loader)`` / (that + step time).

    python benchmarks/data_pipeline.py --threads 1
    python benchmarks/data_pipeline.py --threads 1 --quick
    python benchmarks/data_pipeline.py --device cuda --sections pin,step
"""
from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable

# Per-row tokenisation runs in one thread anyway; the batched pre-tokenisation would otherwise use every core (the
# benchmarks run on --threads), and the Rust pool must not be live when DataLoader workers fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

MANIFEST = C.ROOT / "data" / "openclipart" / "manifest.csv"
CONFIGS = ("pretrain", "pretrain-aug", "tiny")
CONFIG_LABEL = {"pretrain": "lite0 128 px + MiniLM 64", "pretrain-aug": "lite0 128 px aug + MiniLM 64",
                "tiny": "vit-tiny 64 px aug + BPE 32"}


# ------------------------------------------------------------------------------------------------------ configs

def tower_configs(config: str):
    """(image TowerConfig, text TowerConfig) of a named configuration, trainable (freeze false)."""
    from xmodal.config import TowerConfig
    if config in ("pretrain", "pretrain-aug"):
        return (TowerConfig(kind="efficientnet_lite0", pretrained="package", freeze=False, projection="mlp",
                            image_size=128, augment=config == "pretrain-aug"),
                TowerConfig(kind="hf", name="minilm", freeze=False, projection="mlp", context_length=64))
    if config == "tiny":
        size, ctx = C.model_dims("xmodal-vit-tiny")
        return (TowerConfig(kind="open_clip", name="xmodal-vit-tiny", image_size=size),
                TowerConfig(kind="open_clip", name="xmodal-vit-tiny", context_length=ctx))
    raise ValueError(config)


def xmodal_transforms(config: str) -> dict[str, Callable]:
    from xmodal.modalities import build_transform
    icfg, tcfg = tower_configs(config)
    return {"image": build_transform("image", icfg, train=True), "text": build_transform("text", tcfg, train=True)}


def open_clip_transforms(config: str) -> tuple[Callable, Callable]:
    """open_clip's own image transform (same size, mean/std, interpolation) and its tokenizer for the same
    vocabulary: ``HFTokenizer`` on the packaged MiniLM folder, or ``get_tokenizer`` (CLIP BPE) for open_clip towers."""
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    from xmodal.modalities.image import _mean_std
    from xmodal.modalities.text import resolve_hf_source
    icfg, tcfg = tower_configs(config)
    mean, std = _mean_std(icfg, "image")
    image = open_clip.image_transform(icfg.image_size, is_train=icfg.augment, mean=mean, std=std)
    if tcfg.kind == "hf":
        text = HFTokenizer(resolve_hf_source(tcfg), context_length=tcfg.context_length)
    else:
        text = open_clip.get_tokenizer(tcfg.name, context_length=tcfg.context_length)
    return image, text


def batch_tokenizer(config: str) -> Callable[[list[str]], Any]:
    """The text transform of ``config`` applied to a list of strings at once (for pre-tokenisation): the same
    tokenizer with the same arguments as the per-row transform; returns int64 ``[n, L]`` (numpy)."""
    from xmodal.modalities.text import _hf_tokenizer, bpe_tokenizer
    _, tcfg = tower_configs(config)
    per_row = xmodal_transforms(config)["text"]
    if tcfg.kind == "hf":
        tok = _hf_tokenizer(per_row.source)
        return lambda texts: tok(texts, max_length=per_row.context_length, truncation=True, padding="max_length",
                                 return_tensors="np")["input_ids"].astype("int64")
    return lambda texts: bpe_tokenizer()(texts, context_length=per_row.context_length).numpy()


# ------------------------------------------------------------------------------------------------------ data

class Rows:
    """The train split of the manifest (validated by ``read_manifest``) and a fixed random subset of it."""

    def __init__(self, path: Path, n: int, seed: int):
        from xmodal.data import read_manifest
        t0 = time.perf_counter()
        self.manifest = read_manifest(path, split="train", modalities=["image", "text"])
        self.read_s = time.perf_counter() - t0
        self.full = self.manifest.dataset
        n = min(n, len(self.full))
        self.indices = sorted(random.Random(seed).sample(range(len(self.full)), n))
        self.subset = self.full.select(self.indices)
        self._csv: str | None = None
        self._tokens: dict[str, tuple] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="xmodal-bench-data-")

    def tokens(self, config: str) -> tuple:
        """``pretokenize(self.subset, config)``, computed once per configuration."""
        if config not in self._tokens:
            self._tokens[config] = pretokenize(self.subset, config)
        return self._tokens[config]

    def open_clip_csv(self) -> str:
        """The subset as open_clip's CSV input: a tab-separated file with absolute image paths and captions."""
        if self._csv is None:
            import pandas as pd
            path = os.path.join(self._tmp.name, "train.tsv")
            pd.DataFrame({"filepath": self.subset["image"], "title": self.subset["text"]}).to_csv(
                path, sep="\t", index=False)
            self._csv = path
        return self._csv


def _stub_missing(names: dict[str, dict[str, Any]]) -> list[str]:
    stubbed = []
    for name, attrs in names.items():
        try:
            __import__(name)
        except ModuleNotFoundError:
            mod = types.ModuleType(name)
            for k, v in attrs.items():
                setattr(mod, k, v)
            sys.modules[name] = mod
            stubbed.append(name)
    return stubbed


_OC_NOTE = ""


def open_clip_csv_dataset():
    """``open_clip_train.data.CsvDataset``, unmodified. open_clip_train's data module imports ``braceexpand`` and
    ``webdataset`` at the top for its *webdataset* pipeline; where those are not installed, empty stand-in modules
    are registered first (the CSV pipeline -- ``CsvDataset`` and ``get_csv_dataset`` -- uses neither)."""
    global _OC_NOTE
    try:
        from open_clip_train.data import CsvDataset
        return CsvDataset
    except ModuleNotFoundError as e:
        if e.name not in ("braceexpand", "webdataset"):
            raise
    stub = lambda *a, **k: None  # noqa: E731
    stubbed = _stub_missing({"braceexpand": {"braceexpand": stub}})
    if "webdataset" not in sys.modules:
        try:
            __import__("webdataset")
        except ImportError:
            wds = types.ModuleType("webdataset")
            wds.PipelineStage = type("PipelineStage", (), {})
            wds.shardlists = types.SimpleNamespace(expand_urls=stub)
            filters = types.ModuleType("webdataset.filters")
            filters._shuffle = stub
            tar = types.ModuleType("webdataset.tariterators")
            for k in ("base_plus_ext", "url_opener", "tar_file_expander", "valid_sample"):
                setattr(tar, k, stub)
            wds.filters, wds.tariterators = filters, tar
            sys.modules.update({"webdataset": wds, "webdataset.filters": filters, "webdataset.tariterators": tar})
            stubbed.append("webdataset")
    _OC_NOTE = (f"open_clip_train.data imported with stand-ins for the missing {', '.join(stubbed)} "
                f"(used only by its webdataset pipeline)") if stubbed else ""
    from open_clip_train.data import CsvDataset
    return CsvDataset


class IdsToTensor:
    """Picklable text "transform" of a pre-tokenised arrow column: a list of ids -> int64 tensor."""

    def __call__(self, ids):
        return torch.tensor(ids, dtype=torch.long)


def pretokenize(dataset, config: str) -> tuple[Any, torch.Tensor, float, float]:
    """``dataset.map`` batched over the text column -> (dataset with a ``text_ids`` column, int64 ``[N, L]``,
    seconds of the map, seconds of the column -> tensor conversion)."""
    tok = batch_tokenizer(config)
    t0 = time.perf_counter()
    mapped = dataset.map(lambda b: {"text_ids": tok(b["text"])}, batched=True, batch_size=1000,
                         load_from_cache_file=False, keep_in_memory=True)
    t1 = time.perf_counter()
    ids = mapped.with_format("torch")["text_ids"][:]
    return mapped, ids, t1 - t0, time.perf_counter() - t1


def make_loader(dataset, batch: int, workers: int, seed: int, collate_fn=None, pin: bool = False) -> DataLoader:
    """engine.train's DataLoader arguments (shuffle, drop_last, persistent workers), a seeded shuffle."""
    kw = {} if collate_fn is None else {"collate_fn": collate_fn}
    return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                      persistent_workers=workers > 0, pin_memory=pin,
                      generator=torch.Generator().manual_seed(seed), **kw)


def xmodal_loader(rows: Rows, config: str, batch: int, workers: int, seed: int, pin: bool = False,
                  text: str = "pretokenised", modalities=("image", "text")) -> DataLoader:
    """xmodal's loader as ``engine.train`` builds it. ``text``: ``pretokenised`` (the library's default:
    ``ManifestDataset`` tokenises the column once when it is built), ``per-row`` (``pretokenize=False``: the
    tokeniser runs in ``__getitem__``, the library before the fast path) or ``pretok-arrow`` (ids pre-tokenised with
    ``datasets.map`` into an arrow column and read from it per row)."""
    from xmodal.data import ManifestDataset, collate
    tf = xmodal_transforms(config)
    tf = {m: tf[m] for m in modalities}
    if text == "pretokenised":
        ds = ManifestDataset(rows.subset, tf)
    elif text == "per-row":
        ds = ManifestDataset(rows.subset, tf, pretokenize=False)
    elif text == "pretok-arrow":
        mapped, _, _, _ = rows.tokens(config)
        mapped = mapped.remove_columns("text").rename_column("text_ids", "text")
        ds = ManifestDataset(mapped, {**tf, "text": IdsToTensor()})
    else:
        raise ValueError(text)
    return make_loader(ds, batch, workers, seed, collate_fn=collate, pin=pin)


def open_clip_loader(rows: Rows, config: str, batch: int, workers: int, seed: int, pin: bool = False) -> DataLoader:
    """open_clip_train's CSV pipeline: ``CsvDataset(csv, preprocess, img_key, caption_key, sep, tokenizer)`` and the
    arguments of its ``get_csv_dataset`` (shuffle, drop_last, default collate), except ``pin_memory`` (section
    pin) and ``persistent_workers`` (as xmodal's, so that a mini-epoch does not re-spawn workers)."""
    CsvDataset = open_clip_csv_dataset()
    image, text = open_clip_transforms(config)
    ds = CsvDataset(rows.open_clip_csv(), image, img_key="filepath", caption_key="title", sep="\t", tokenizer=text)
    return make_loader(ds, batch, workers, seed, pin=pin)


def _task_cpu_s(pid: int) -> float:
    """CPU seconds a process has run so far, all its threads (``/proc/<pid>/task/*/schedstat``, ns resolution)."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return float("nan")
    for task in tasks:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def pipeline_cpu_s(loader: DataLoader) -> float:
    """CPU seconds used so far by this process and the loader's worker processes. On a shared machine this is a
    steadier measure of the pipeline's work than wall time: other jobs delay it but do not add CPU time to it."""
    it = getattr(loader, "_iterator", None)
    workers = getattr(it, "_workers", []) if it is not None else []
    return time.process_time() + sum(_task_cpu_s(w.pid) for w in workers)


class Epoch:
    """Runs one epoch of ``loader`` per call (optionally copying each batch to ``device``); remembers the time to
    the first batch of the first call (fresh workers: process start-up + the first batch) and the CPU seconds of
    every call after the first (main process + workers; ``nan`` for the first, whose workers start inside it)."""

    def __init__(self, loader: DataLoader, device: str | None = None, non_blocking: bool = False):
        self.loader, self.device, self.non_blocking = loader, device, non_blocking
        self.first_batch_s: float | None = None
        self.rows = len(loader) * loader.batch_size
        self.cpu: list[float] = []

    def __call__(self) -> None:
        fresh = self.first_batch_s is None
        cpu0 = pipeline_cpu_s(self.loader)
        t0 = time.perf_counter()
        for i, batch in enumerate(self.loader):
            if fresh and i == 0:
                self.first_batch_s = time.perf_counter() - t0
            if self.device is not None:
                tensors = batch.values() if isinstance(batch, dict) else batch
                for t in tensors:
                    if isinstance(t, torch.Tensor):
                        t.to(self.device, non_blocking=self.non_blocking)
        if self.device is not None:
            C.sync(self.device)
        self.cpu.append(float("nan") if fresh else pipeline_cpu_s(self.loader) - cpu0)

    def cpu_us_per_row(self, warmup: int) -> list[float]:
        """CPU µs per row of the timed calls (those after ``warmup``)."""
        return [c / self.rows * 1e6 for c in self.cpu[warmup:]]


def close(loaders) -> None:
    """Shut persistent workers down (between blocks, so no idle workers linger)."""
    for ld in loaders:
        it = getattr(ld, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        ld._iterator = None


def ratio(num: list[float], den: list[float]) -> float:
    return C.median([a / b for a, b in zip(num, den)])


# ------------------------------------------------------------------------------------------------------ sections

def check_same_inputs(rows: Rows, config: str, n: int = 32) -> str:
    """How close open_clip's transforms are to xmodal's on the first ``n`` subset rows."""
    from PIL import Image
    xt = xmodal_transforms(config)
    image, text = open_clip_transforms(config)
    icfg, _ = tower_configs(config)
    paths, texts = rows.subset["image"][:n], rows.subset["text"][:n]
    same_text = sum(bool(torch.equal(xt["text"](s), text([s])[0])) for s in texts)
    if icfg.augment:
        return f"text ids identical in {same_text}/{n} rows; images: random augmentation (not compared)"
    diff = max(float((xt["image"](p) - image(Image.open(p))).abs().max()) for p in paths)
    return f"text ids identical in {same_text}/{n} rows; images max |diff| {diff:.2g}"


def row_read_us(rows: Rows, n: int = 300) -> float:
    """CPU µs to read one row (image path, text, id) from the arrow dataset, as ManifestDataset does per item."""
    from xmodal.data import ManifestDataset

    class Raw:
        def __call__(self, value):
            return value
    ds = ManifestDataset(rows.subset, {"image": Raw(), "text": Raw()})
    n = min(n, len(ds))
    t0 = time.process_time()
    for i in range(n):
        ds[i]
    return (time.process_time() - t0) / n * 1e6


def section_loader(args, rows: Rows, configs: list[str], rounds: int) -> None:
    out, notes = [], []
    for config in configs:
        notes.append(f"{CONFIG_LABEL[config]}: {check_same_inputs(rows, config)}")
        for w in args.workers:
            loaders = {"xmodal": xmodal_loader(rows, config, args.batch, w, args.seed),
                       "xmodal per-row": xmodal_loader(rows, config, args.batch, w, args.seed, text="per-row"),
                       "open_clip": open_clip_loader(rows, config, args.batch, w, args.seed)}
            epochs = {k: Epoch(v) for k, v in loaders.items()}
            t = C.interleave(epochs, rounds, args.warmup, "cpu")
            n = epochs["xmodal"].rows
            cpu = {k: e.cpu_us_per_row(args.warmup) for k, e in epochs.items()}
            for k in ("xmodal", "xmodal per-row"):
                out.append([CONFIG_LABEL[config], w, k, n / C.median(t[k]), n / C.median(t["open_clip"]),
                            ratio(t["open_clip"], t[k]), C.median(cpu[k]), C.median(cpu["open_clip"]),
                            ratio(cpu["open_clip"], cpu[k]), epochs[k].first_batch_s * 1e3,
                            epochs["open_clip"].first_batch_s * 1e3])
            close(loaders.values())
            print(f"  loader {config} workers={w}: " + ", ".join(f"{k} {n / C.median(v):.0f} rows/s"
                                                                 for k, v in t.items()), flush=True)
    print()
    print(C.table(["towers", "num_workers", "xmodal text", "xmodal rows/s", "open_clip rows/s",
                   "throughput ratio xmodal/open_clip", "xmodal CPU µs/row", "open_clip CPU µs/row",
                   "CPU ratio open_clip/xmodal", "xmodal first batch ms (fresh workers)", "open_clip first batch ms"],
                  out))
    print(f"  xmodal = ManifestDataset as the library builds it (text pre-tokenised once); xmodal per-row = "
          f"pretokenize=False. Per-row arrow read of a ManifestDataset item: {row_read_us(rows):.0f} µs")
    for note in notes:
        print(f"  {note}")
    if _OC_NOTE:
        print(f"  {_OC_NOTE}")
    print(f"  {rounds} interleaved rounds of one mini-epoch ({len(rows.subset)} rows, batch {args.batch}) per peer, "
          f"after {args.warmup} warm-up round(s)", flush=True)


def section_pin(args, rows: Rows, rounds: int) -> None:
    if not args.device.startswith("cuda"):
        print("\npinned memory: does not apply on --device cpu (there is no host->device copy to speed up); "
              "run with --device cuda", flush=True)
        return
    from xmodal.data import collate
    config = "pretrain"
    tf = xmodal_transforms(config)
    items = [{m: tf[m](rows.subset[i][m]) for m in tf} for i in range(args.batch)]
    host = collate(items)
    pinned = {k: v.pin_memory() for k, v in host.items()}
    mib = sum(v.numel() * v.element_size() for v in host.values()) / 2 ** 20

    def copy(src, non_blocking):
        return lambda: [v.to(args.device, non_blocking=non_blocking) for v in src.values()]
    t = C.interleave({"pageable": copy(host, False), "pinned": copy(pinned, False),
                      "pinned non_blocking": copy(pinned, True)}, max(rounds, 20), args.warmup, args.device)
    out = [[k, mib, C.median(v) * 1e3, mib / 1024 / C.median(v), ratio(t["pageable"], v)] for k, v in t.items()]
    print()
    print(C.table([f"host->device copy of a collated batch ({CONFIG_LABEL[config]}, batch {args.batch})", "MiB",
                   "ms (median)", "GiB/s", "speedup vs pageable"], out))
    out = []
    for w in args.workers:
        loaders = {"pin_memory=False": xmodal_loader(rows, config, args.batch, w, args.seed, pin=False),
                   "pin_memory=True": xmodal_loader(rows, config, args.batch, w, args.seed, pin=True)}
        epochs = {"pin_memory=False": Epoch(loaders["pin_memory=False"], args.device, non_blocking=False),
                  "pin_memory=True": Epoch(loaders["pin_memory=True"], args.device, non_blocking=True)}
        t = C.interleave(epochs, rounds, args.warmup, args.device)
        n = epochs["pin_memory=True"].rows
        out.append([w, n / C.median(t["pin_memory=False"]), n / C.median(t["pin_memory=True"]),
                    ratio(t["pin_memory=False"], t["pin_memory=True"])])
        close(loaders.values())
    print()
    print(C.table(["num_workers", "loader + copy rows/s, pin_memory=False", "pin_memory=True (non_blocking copy)",
                   "speedup"], out), flush=True)


def section_pretok(args, rows: Rows, configs: list[str], rounds: int) -> None:
    one_off, text_only, full = [], [], []
    for config in configs:
        per_row = xmodal_transforms(config)["text"]
        # one-off cost over the whole train column, and identity with the per-row path on every row
        from xmodal.data import ManifestDataset
        texts = list(rows.full["text"])
        t0 = time.perf_counter()
        lib = ManifestDataset(rows.full, {"text": per_row})
        lib_s = time.perf_counter() - t0
        _, ids, map_s, conv_s = pretokenize(rows.full, config)
        tok = batch_tokenizer(config)
        t0 = time.perf_counter()
        direct = torch.from_numpy(tok(texts))
        direct_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = torch.stack([per_row(s) for s in texts])
        per_row_s = time.perf_counter() - t0
        lib_ids = torch.stack([lib[i]["text"] for i in range(len(lib))])
        same = torch.equal(ref, ids) and torch.equal(ref, direct) and torch.equal(ref, lib_ids)
        one_off.append([CONFIG_LABEL[config], len(texts), per_row_s, lib_s, map_s + conv_s, direct_s,
                        "yes" if same else "NO"])
        # text-only loader, no workers: the tokenisation cost alone
        variants = ("per-row", "pretok-arrow", "pretokenised")
        loaders = {v: xmodal_loader(rows, config, args.batch, 0, args.seed, text=v, modalities=("text",))
                   for v in variants}
        epochs = {k: Epoch(v) for k, v in loaders.items()}
        t = C.interleave(epochs, rounds, args.warmup, "cpu")
        n = epochs["per-row"].rows
        text_only.append([CONFIG_LABEL[config]] + [n / C.median(t[v]) for v in variants]
                         + [ratio(t["per-row"], t["pretokenised"])]
                         + [C.median(epochs[v].cpu_us_per_row(args.warmup)) for v in variants])
        # image + text loader at each worker count
        for w in args.workers:
            loaders = {v: xmodal_loader(rows, config, args.batch, w, args.seed, text=v)
                       for v in ("per-row", "pretokenised")}
            epochs = {k: Epoch(v) for k, v in loaders.items()}
            t = C.interleave(epochs, rounds, args.warmup, "cpu")
            cp, ct = (epochs[k].cpu_us_per_row(args.warmup) for k in ("per-row", "pretokenised"))
            full.append([CONFIG_LABEL[config], w, n / C.median(t["per-row"]), n / C.median(t["pretokenised"]),
                         ratio(t["per-row"], t["pretokenised"]), C.median(cp), C.median(ct), ratio(cp, ct)])
            close(loaders.values())
            print(f"  pretok {config} workers={w}: speedup {full[-1][4]:.3f} (CPU {full[-1][-1]:.3f})", flush=True)
    print()
    print(C.table(["tokenise the whole train column", "rows", "per row s", "ManifestDataset build s (the library)",
                   "datasets.map(batched) + to tensor s", "one batched tokenizer call s",
                   "ids identical (all rows)"], one_off))
    print()
    print(C.table(["text only, num_workers 0", "per-row rows/s", "pre-tokenised arrow column rows/s",
                   "pre-tokenised (library) rows/s", "speedup library vs per-row", "per-row CPU µs/row",
                   "arrow column CPU µs/row", "library CPU µs/row"], text_only))
    print()
    print(C.table(["image + text", "num_workers", "per-row rows/s", "pre-tokenised rows/s", "speedup",
                   "per-row CPU µs/row", "pre-tokenised CPU µs/row", "CPU ratio per-row/pre-tokenised"], full),
          flush=True)


def step_trainer(towers: str, args):
    """The engine's training step (``_common.XModalTrainer``) for ``towers``: ``tiny`` = xmodal-vit-tiny's open_clip
    towers; ``pretrain`` = configs/pretrain.yaml's towers (lite0 @128 + MiniLM) made trainable."""
    if towers == "tiny":
        return C.XModalTrainer("xmodal-vit-tiny", args)
    from xmodal.config import ModelConfig
    icfg, tcfg = tower_configs(towers)
    cfg = ModelConfig(embed_dim=256, loss="clip", towers={"image": icfg, "text": tcfg})
    original = C.xmodal_model_config
    C.xmodal_model_config = lambda name, projection="linear": cfg  # XModalTrainer builds its model from this
    try:
        return C.XModalTrainer("xmodal-vit-tiny", args)
    finally:
        C.xmodal_model_config = original


def section_step(args, rows: Rows, rounds: int) -> None:
    from xmodal.data import collate
    out = []
    for towers in args.step_towers:
        batch = args.step_batch or {"tiny": 64, "pretrain": 32, "pretrain-aug": 32}[towers]
        torch.manual_seed(args.seed)
        trainer = step_trainer(towers, args)
        tf = xmodal_transforms(towers)
        fixed = collate([{m: tf[m](rows.subset[i][m]) for m in tf} for i in range(batch)])
        fixed = {k: v.to(args.device) for k, v in fixed.items()}
        variants = ["materialised"] + [f"{text} w{w}" for text in ("per-row", "pretokenised") for w in args.workers]
        times: dict[str, dict[str, list[float]]] = {v: {"wait": [], "step": [], "round": [], "cpu": []}
                                                     for v in variants}
        rng = random.Random(1234)
        for r in range(args.warmup + rounds):
            for v in rng.sample(variants, len(variants)):
                loader = None
                if v != "materialised":
                    text, w = v.rsplit(" w", 1)
                    loader = xmodal_loader(rows, towers, batch, int(w), args.seed + r, text=text)
                    it = iter(loader)
                    b = next(it)  # untimed: worker start-up and the pipeline's first fill
                    trainer.step(b["image"].to(args.device), b["text"].to(args.device))
                waits, steps, step_cpu = [], [], 0.0
                cpu0 = time.process_time() if loader is None else pipeline_cpu_s(loader)
                for _ in range(args.block_steps):
                    C.sync(args.device)
                    t0 = time.perf_counter()
                    b = fixed if loader is None else next(it)
                    images, texts = b["image"].to(args.device), b["text"].to(args.device)
                    C.sync(args.device)
                    t1, c1 = time.perf_counter(), time.process_time()
                    trainer.step(images, texts)
                    C.sync(args.device)
                    waits.append(t1 - t0)
                    steps.append(time.perf_counter() - t1)
                    step_cpu += time.process_time() - c1
                # CPU the data path used per step: this process (outside the step) + the workers
                data_cpu = ((time.process_time() if loader is None else pipeline_cpu_s(loader)) - cpu0
                            - step_cpu) / args.block_steps
                if loader is not None:
                    del it
                    close([loader])
                if r >= args.warmup:
                    times[v]["wait"] += waits
                    times[v]["step"] += steps
                    times[v]["round"].append(sum(waits) + sum(steps))
                    times[v]["cpu"].append(data_cpu)
        base = times["materialised"]
        for v in variants:
            tv = times[v]
            wait, step = sum(tv["wait"]), sum(tv["step"])
            per_step = C.median([a + b for a, b in zip(tv["wait"], tv["step"])])
            out.append([f"{towers} @{batch}", v, C.median(tv["step"]) * 1e3, C.median(tv["wait"]) * 1e3,
                        wait / (wait + step), batch / per_step, ratio(base["round"], tv["round"]),
                        C.median(tv["cpu"]) * 1e3])
        print(f"  step {towers}: done", flush=True)
    print()
    print(C.table(["towers @batch", "data", "step ms (median)", "data wait ms (median)", "data-wait fraction",
                   "samples/s", "throughput vs materialised (median per round)", "data CPU ms/step (main + workers)"],
                  out))
    print(f"  {rounds} interleaved rounds; each round runs every variant as a block of {args.block_steps} timed steps "
          f"(a fresh loader per block: workers start and the first batch + step run untimed)", flush=True)


# ------------------------------------------------------------------------------------------------------ main

def main() -> None:
    p = C.common_parser(__doc__.split("\n")[0])
    p.set_defaults(warmup=1)
    p.add_argument("--manifest", default=str(MANIFEST))
    p.add_argument("--rows", type=int, default=None, help="rows per mini-epoch (default 512; --quick 256)")
    p.add_argument("--batch", type=int, default=None, help="loader batch size (default 64; --quick 32)")
    p.add_argument("--workers", default="0,1,2", help="comma-separated num_workers values")
    p.add_argument("--configs", default=None,
                   help=f"tower configurations for the loader section, of {','.join(CONFIGS)} (default all; "
                        f"--quick: pretrain)")
    p.add_argument("--step-towers", default="tiny", help="comma-separated of tiny,pretrain,pretrain-aug")
    p.add_argument("--step-batch", type=int, default=None, help="default: tiny 64, pretrain 32")
    p.add_argument("--block-steps", type=int, default=None, help="timed steps per block (default 4; --quick 2)")
    p.add_argument("--sections", default="loader,pin,pretok,step", help="comma-separated subset of "
                   "loader,pin,pretok,step")
    args = p.parse_args()
    C.setup(args)
    import datasets
    datasets.disable_progress_bars()
    rounds = args.steps or (1 if args.quick else 3)
    args.rows = args.rows or (256 if args.quick else 512)
    args.batch = args.batch or (32 if args.quick else 64)
    args.block_steps = args.block_steps or (2 if args.quick else 4)
    args.workers = [int(w) for w in args.workers.split(",")]
    args.step_towers = args.step_towers.split(",")
    configs = (args.configs or ("pretrain" if args.quick else ",".join(CONFIGS))).split(",")
    if args.quick and args.step_batch is None:
        args.step_batch = 32
    print(C.header(args, "data pipeline"))
    t_start = time.perf_counter()
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"# load average at start: {' '.join(load)}", flush=True)
    rows = Rows(Path(args.manifest), args.rows, args.seed)
    print(f"# {args.manifest}: {len(rows.full)} train rows (read_manifest {rows.read_s:.1f} s); mini-epoch "
          f"{len(rows.subset)} rows, batch {args.batch}, workers {args.workers}, {rounds} rounds", flush=True)
    sections = set(args.sections.split(","))
    if "loader" in sections:
        section_loader(args, rows, configs, rounds)
    if "pin" in sections:
        section_pin(args, rows, rounds)
    if "pretok" in sections:
        section_pretok(args, rows, [c for c in ("pretrain", "tiny") if args.quick is False or c == "pretrain"]
                       if args.configs is None else [c for c in configs if c != "pretrain-aug"], rounds)
    if "step" in sections:
        section_step(args, rows, rounds)
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(f"\n# load average at the end: {' '.join(load)}")
    print(f"# wall time {time.perf_counter() - t_start:.0f} s; rows/s = mini-epoch rows / median mini-epoch time; "
          f"ratios = medians of per-round paired ratios (> 1: xmodal / the fast path is faster)")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
