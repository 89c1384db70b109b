"""Which on-disk format for the frozen-tower feature cache: NumPy ``.npy`` memmaps, safetensors, or Arrow IPC.

The cache writes shards of ``[rows, dim]`` float32 features once and then reads single rows at random (a data
loader's per-sample transform) or gathers a batch's rows. Each format is written to the same folder, the same
shards, and read the same way, timed side by side in one process:

* ``write``: serialise one shard, fsync, rename (what an atomic shard write costs);
* ``open``: open every shard for reading (a command's start);
* ``row``: one random row as a fresh ``torch`` tensor (``features[i]`` in a data-loader worker);
* ``gather``: 256 random rows of one shard as one tensor.

Formats: ``npy`` (``np.save`` + ``np.load(mmap_mode="r")``), ``safetensors`` (``safe_open(...).get_slice``, its own
mmap), ``safetensors+memmap`` (a safetensors file whose data region is mapped with ``np.memmap`` at the offset the
header names: the safetensors file, read at memmap speed), ``arrow`` (IPC file of a ``FixedSizeList`` column,
``pa.memory_map`` + zero-copy ``to_numpy``).

    python benchmarks/feature_cache_formats.py              # 8 shards × 8192 rows × 512 floats (128 MiB)
    python benchmarks/feature_cache_formats.py --quick
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _fsync_replace(tmp: Path, path: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    os.replace(tmp, path)


class Npy:
    name, ext = "npy", ".npy"

    def write(self, path: Path, a: np.ndarray) -> None:
        tmp = path.with_name("." + path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.save(f, a)
        _fsync_replace(tmp, path)

    def open(self, path: Path):
        return np.load(path, mmap_mode="r")

    def row(self, h, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(h[i]))

    def gather(self, h, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(h[idx])


class SafeTensors:
    name, ext = "safetensors", ".safetensors"

    def write(self, path: Path, a: np.ndarray) -> None:
        from safetensors.numpy import save
        tmp = path.with_name("." + path.name + ".tmp")
        tmp.write_bytes(save({"features": a}))
        _fsync_replace(tmp, path)

    def open(self, path: Path):
        from safetensors import safe_open
        return safe_open(str(path), framework="pt").get_slice("features")

    def row(self, h, i: int) -> torch.Tensor:
        return h[i:i + 1][0]

    def gather(self, h, idx: np.ndarray) -> torch.Tensor:
        return torch.stack([h[int(i):int(i) + 1][0] for i in idx])


class SafeTensorsMemmap(SafeTensors):
    name = "safetensors+memmap"

    def open(self, path: Path):
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            meta = json.loads(f.read(n))["features"]
        start, _ = meta["data_offsets"]
        return np.memmap(path, dtype=np.float32, mode="r", offset=8 + n + start, shape=tuple(meta["shape"]))

    row, gather = Npy.row, Npy.gather


class Arrow:
    name, ext = "arrow", ".arrow"

    def write(self, path: Path, a: np.ndarray) -> None:
        import pyarrow as pa
        col = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
        table = pa.table({"features": col})
        tmp = path.with_name("." + path.name + ".tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        _fsync_replace(tmp, path)

    def open(self, path: Path):
        import pyarrow as pa
        col = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all().column("features").chunk(0)
        return col.values.to_numpy(zero_copy_only=True).reshape(len(col), -1)

    row, gather = Npy.row, Npy.gather


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--reads", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.shards, a.rows, a.reads, a.rounds = 4, 2048, 5000, 2
    rng = np.random.default_rng(0)
    data = [rng.standard_normal((a.rows, a.dim), dtype=np.float32) for _ in range(a.shards)]
    formats = [Npy(), SafeTensors(), SafeTensorsMemmap(), Arrow()]
    times: dict[str, dict[str, list[float]]] = {f.name: {k: [] for k in ("write", "open", "row", "gather")}
                                                for f in formats}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        for r in range(a.rounds):
            for f in [formats[i] for i in rng.permutation(len(formats))]:  # interleaved, random order per round
                paths = [Path(d) / f"{f.name}-{r}-{s}{f.ext}" for s in range(a.shards)]
                t = time.perf_counter()
                for path, x in zip(paths, data):
                    f.write(path, x)
                times[f.name]["write"].append((time.perf_counter() - t) / a.shards)
                t = time.perf_counter()
                hs = [f.open(path) for path in paths]
                times[f.name]["open"].append((time.perf_counter() - t) / a.shards)
                picks = rng.integers(0, [a.shards, a.rows], size=(a.reads, 2))
                t = time.perf_counter()
                for s, i in picks:
                    f.row(hs[s], int(i))
                times[f.name]["row"].append((time.perf_counter() - t) / a.reads)
                idx = [np.sort(rng.integers(0, a.rows, 256)) for _ in range(50)]
                t = time.perf_counter()
                for k, ix in enumerate(idx):
                    got = f.gather(hs[k % a.shards], ix)
                times[f.name]["gather"].append((time.perf_counter() - t) / len(idx))
                assert torch.equal(got, torch.from_numpy(data[(len(idx) - 1) % a.shards][idx[-1]]))
                for path in paths:
                    path.unlink()
    mb = a.rows * a.dim * 4 / 2**20
    print(f"{a.shards} shards × {a.rows} rows × {a.dim} float32 ({mb:.0f} MiB each), {a.reads} random rows, "
          f"{a.rounds} rounds, medians")
    print(f"{'format':<20} {'write ms/shard':>15} {'open ms/shard':>14} {'row µs':>8} {'gather-256 µs':>14}")
    for f in formats:
        m = {k: statistics.median(v) for k, v in times[f.name].items()}
        print(f"{f.name:<20} {m['write'] * 1e3:>15.1f} {m['open'] * 1e3:>14.3f} {m['row'] * 1e6:>8.2f} "
              f"{m['gather'] * 1e6:>14.1f}")


if __name__ == "__main__":
    main()
