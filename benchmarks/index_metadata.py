"""Index metadata at scale: the memory and load time of an index's row metadata, old format vs new, 100k vs 1M rows.

    .venv/bin/python benchmarks/index_metadata.py                       # 100k and 1M rows, 3 rounds
    .venv/bin/python benchmarks/index_metadata.py --sizes 20000 --rounds 1 --no-sqlite   # a quick look

Rows: the real Open Clip Art manifest (``data/openclipart/manifest.csv``: id, image path, caption, label, split,
title), repeated with a copy number appended to ``id`` and ``value`` until ``--sizes`` rows — the metadata
``xmodal index`` stores for an image index of it (``id``, ``modality``, ``value``, then the manifest's other
columns). The vectors are 4-d (the faiss part is kept small: what is measured is the metadata).

Formats, each an index folder loaded by ``EmbeddingIndex.load`` in a fresh process:

* ``jsonl`` — format version 1 (``metadata.jsonl``, one dict per row once loaded), what every index was before;
* ``arrow`` — format version 2 (``metadata.arrow``, memory-mapped Arrow columns).

Per process: load time (the whole ``EmbeddingIndex.load``, checksums included, and the metadata part alone), RSS
after loading (``/proc/self/status`` VmRSS; anonymous and file-backed parts), and RSS after a filtered search
(``label=...``) and 100 searches (what touching the columns maps in). ``RSS above the codes`` subtracts a process
that loads only the faiss file. The formats alternate (``--rounds`` rounds, order rotated); medians are printed.

``--sqlite`` (default on) also times the same rows in SQLite (one table, ``id`` primary key, an index on ``label``),
the alternative the issue named: file size, open time, RSS, a label filter, fetching 10 rows by id.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1])
    return out


def records(manifest: Path, n: int) -> list[dict]:
    with open(manifest, newline="", encoding="utf-8") as f:
        base = list(csv.DictReader(f))
    out = []
    for i in range(n):
        r = base[i % len(base)]
        copy = i // len(base)
        out.append({"id": f"{r['id']}#{copy}", "modality": "image", "value": f"/data/c{copy}/{r['image']}",
                    "text": r["text"], "label": r["label"], "split": r["split"], "title": r["title"]})
    return out


def write_folders(out: Path, rows: list[dict]) -> dict[str, Path]:
    """The same index as a version-2 folder (this xmodal's save) and as a version-1 folder (the old writer's
    bytes: metadata.jsonl, index.json version 1 with its checksums)."""
    from xmodal.integrity import ALGORITHM, file_record, seal
    from xmodal.retrieval.index import EmbeddingIndex

    x = np.random.default_rng(0).normal(size=(len(rows), 4)).astype("float32")
    index = EmbeddingIndex(4)
    index.add(x, rows)
    arrow = index.save(out / "arrow")
    old = out / "jsonl"
    old.mkdir()
    shutil.copy(arrow / "index.faiss", old / "index.faiss")
    with open(old / "metadata.jsonl", "w", encoding="utf-8") as f:
        for i, m in enumerate(rows):
            f.write(json.dumps({"index_id": i, "meta": m}, ensure_ascii=False) + "\n")
    info = json.loads((arrow / "index.json").read_text())
    info.pop("checksum")
    recs = {name: file_record(old / name) for name in ("index.faiss", "metadata.jsonl")}
    info.update(version=1, files={k: r["size"] for k, r in recs.items()},
                checksums={k: {ALGORITHM: r[ALGORITHM]} for k, r in recs.items()})
    (old / "index.json").write_text(json.dumps(seal(info), indent=2))
    return {"jsonl": old, "arrow": arrow}


def warm_up() -> None:
    """Pay the libraries' one-time costs (imports, Arrow's memory pool and IPC reader, faiss) before the baseline,
    in every kind of child alike, so that what is measured is the rows."""
    import faiss  # noqa: F401

    from xmodal.retrieval.index import EmbeddingIndex
    with tempfile.TemporaryDirectory() as d:
        tiny = EmbeddingIndex(4)
        tiny.add(np.eye(4, dtype="float32"), [{"id": str(i), "label": "a", "n": i} for i in range(4)])
        tiny.save(Path(d) / "i")
        tiny = EmbeddingIndex.load(Path(d) / "i")
        tiny.search(np.eye(4, dtype="float32"), 2, filter={"label": "a"})


def child(folder: str, what: str, label: str) -> None:  # what: faiss | meta | jsonl | arrow
    """One measurement in this fresh process; prints a JSON line."""
    import faiss

    from xmodal.retrieval.index import EmbeddingIndex
    from xmodal.retrieval.index_files import read_metadata
    warm_up()
    before = rss_kb()
    t0 = time.perf_counter()
    if what == "faiss":
        index = faiss.read_index(str(Path(folder) / "index.faiss"))
        out = {"load_s": time.perf_counter() - t0, "after_load": rss_kb()}
    elif what == "meta":  # the metadata part alone, no checksums: what the format itself costs to open
        path = Path(folder)
        meta = read_metadata(path, path, json.loads((path / "index.json").read_text()))
        out = {"load_s": time.perf_counter() - t0, "after_load": rss_kb(), "rows": len(meta)}
    else:
        index = EmbeddingIndex.load(folder, repair=False)
        out = {"load_s": time.perf_counter() - t0, "after_load": rss_kb()}
        q = np.random.default_rng(1).normal(size=(100, 4)).astype("float32")
        t1 = time.perf_counter()
        hits = index.search(q[:1], 10, filter={"label": label})
        out["filter_s"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        for row in q:
            index.search(row, 10)
        out["search100_s"] = time.perf_counter() - t1
        out["after_search"] = rss_kb()
        out["hits"] = [h.metadata["id"] for h in hits[0]]
    out["before"] = before
    print(json.dumps(out))


def sqlite_child(db: str, label: str) -> None:
    warm_up()
    sqlite3.connect(":memory:").execute("SELECT 1").fetchall()
    before = rss_kb()
    t0 = time.perf_counter()
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    cols = [r[1] for r in con.execute("PRAGMA table_info(meta)")]
    out = {"load_s": time.perf_counter() - t0, "after_load": rss_kb(), "before": before}
    t1 = time.perf_counter()
    ids = [r[0] for r in con.execute("SELECT index_id FROM meta WHERE label = ?", (label,))]
    out["filter_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    for i in range(100):
        wanted = [(i * 7919 + j * 104729) % len(ids or [1]) for j in range(10)]
        rows = con.execute(f"SELECT * FROM meta WHERE index_id IN ({','.join('?' * 10)})", wanted).fetchall()
        [dict(zip(cols, r)) for r in rows]
    out["search100_s"] = time.perf_counter() - t1
    out["after_search"] = rss_kb()
    out["matches"] = len(ids)
    print(json.dumps(out))


def arrow_ops_child(folder: str, label: str) -> None:
    """The same two operations as ``sqlite_child`` on the Arrow store (no faiss, no checksums)."""
    from xmodal.retrieval.metadata_store import MetadataStore
    warm_up()
    before = rss_kb()
    t0 = time.perf_counter()
    store = MetadataStore.open(Path(folder) / "metadata.arrow", "metadata.arrow")
    out = {"load_s": time.perf_counter() - t0, "after_load": rss_kb(), "before": before}
    t1 = time.perf_counter()
    ids = store.select({"label": label})
    out["filter_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    for i in range(100):
        store.rows([(i * 7919 + j * 104729) % len(store) for j in range(10)])
    out["search100_s"] = time.perf_counter() - t1
    out["after_search"] = rss_kb()
    out["matches"] = len(ids)
    print(json.dumps(out))


def write_sqlite(path: Path, rows: list[dict]) -> None:
    keys = list(rows[0])
    con = sqlite3.connect(path)
    con.execute(f"CREATE TABLE meta (index_id INTEGER PRIMARY KEY, {', '.join(f'{k!r} TEXT' for k in keys)})")
    con.executemany(f"INSERT INTO meta VALUES ({', '.join('?' * (len(keys) + 1))})",
                    ([i, *(r[k] for k in keys)] for i, r in enumerate(rows)))
    con.execute("CREATE INDEX meta_label ON meta(label)")
    con.commit()
    con.close()


def run_child(args: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env,
                         timeout=1800)
    if res.returncode:
        raise SystemExit(f"child {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def delta_kb(m: dict, at: str, field: str = "VmRSS") -> int:
    return m[at][field] - m["before"][field]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--manifest", default=str(ROOT / "data" / "openclipart" / "manifest.csv"))
    p.add_argument("--no-sqlite", dest="sqlite", action="store_false")
    p.add_argument("--workdir", default=None, help="where the index folders go (default: a temp folder)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        kind, *rest = a.child
        if kind == "sqlite":
            sqlite_child(*rest)
        elif kind == "arrow_ops":
            arrow_ops_child(*rest)
        else:
            child(*rest[:1], kind, *rest[1:])
        return
    work = Path(a.workdir or tempfile.mkdtemp(prefix="xmodal-meta-"))
    print(f"# index metadata: sizes {a.sizes}, {a.rounds} rounds, rows from {a.manifest}; work in {work}")
    label = "animals"
    results: dict = {}
    for n in a.sizes:
        t = time.perf_counter()
        rows = records(Path(a.manifest), n)
        folders = write_folders(work / str(n), rows)
        if a.sqlite:
            write_sqlite(work / str(n) / "meta.sqlite", rows)
        del rows
        sizes = {f: sum(p.stat().st_size for p in folders[f].iterdir() if p.name.startswith("metadata"))
                 for f in folders}
        if a.sqlite:
            sizes["sqlite"] = (work / str(n) / "meta.sqlite").stat().st_size
        print(f"# {n} rows written in {time.perf_counter() - t:.0f} s; metadata file bytes per row: "
              + ", ".join(f"{k} {v / n:.0f}" for k, v in sizes.items()), flush=True)
        runs: dict[str, list] = {k: [] for k in ("faiss", "jsonl", "arrow", "meta:jsonl", "meta:arrow")}
        if a.sqlite:
            runs.update({"sqlite": [], "arrow_ops": []})
        for r in range(a.rounds):
            order = list(runs)
            order = order[r % len(order):] + order[:r % len(order)]
            for k in order:
                if k == "faiss":
                    runs[k].append(run_child(["faiss", str(folders["arrow"]), label]))
                elif k.startswith("meta:"):
                    runs[k].append(run_child(["meta", str(folders[k[5:]]), label]))
                elif k == "sqlite":
                    runs[k].append(run_child(["sqlite", str(work / str(n) / "meta.sqlite"), label]))
                elif k == "arrow_ops":
                    runs[k].append(run_child(["arrow_ops", str(folders["arrow"]), label]))
                else:
                    runs[k].append(run_child([k, str(folders[k]), label]))
            print(f"#   round {r + 1}/{a.rounds} done", flush=True)
        assert runs["jsonl"][0]["hits"] == runs["arrow"][0]["hits"], "the two formats answered differently"
        results[n] = {"runs": runs, "sizes": sizes}
    report(results, a)
    (work / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    print(f"# raw figures: {work / 'results.json'}")


def med(xs):
    return statistics.median(xs)


def spread(xs):
    return f"{min(xs):.3g}–{max(xs):.3g}"


def report(results: dict, a) -> None:
    print("\n| rows | format | load s (whole index) | metadata open s | RSS after load, B/row above the codes "
          "(anon + file) | after a filter + 100 searches, B/row (anon + file) | filter s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n, res in results.items():
        runs = res["runs"]
        codes_kb = med([delta_kb(m, "after_load") for m in runs["faiss"]])
        for f in ("jsonl", "arrow"):
            load = [m["load_s"] for m in runs[f]]
            meta = [m["load_s"] for m in runs[f"meta:{f}"]]
            above = med([delta_kb(m, "after_load") for m in runs[f]]) - codes_kb
            anon = med([delta_kb(m, "after_load", "RssAnon") for m in runs[f]]) - \
                med([delta_kb(m, "after_load", "RssAnon") for m in runs["faiss"]])
            filef = med([delta_kb(m, "after_load", "RssFile") for m in runs[f]]) - \
                med([delta_kb(m, "after_load", "RssFile") for m in runs["faiss"]])
            after = med([delta_kb(m, "after_search") for m in runs[f]]) - codes_kb
            after_anon = med([delta_kb(m, "after_search", "RssAnon") for m in runs[f]]) - \
                med([delta_kb(m, "after_load", "RssAnon") for m in runs["faiss"]])
            print(f"| {n:,} | {f} | {med(load):.3f} ({spread(load)}) | {med(meta):.4f} ({spread(meta)}) | "
                  f"{above * 1024 / n:.0f} ({anon * 1024 / n:.0f} + {filef * 1024 / n:.0f}) | "
                  f"{after * 1024 / n:.0f} ({after_anon * 1024 / n:.0f} + {(after - after_anon) * 1024 / n:.0f}) | "
                  f"{med([m['filter_s'] for m in runs[f]]):.3f} |")
    sizes = list(results)
    if len(sizes) >= 2:
        lo, hi = sizes[0], sizes[-1]
        print(f"\nratios {hi:,} / {lo:,} rows (1.0 = independent of the row count; {hi / lo:.0f} = linear):")
        for f in ("jsonl", "arrow"):
            meta = [med([m["load_s"] for m in results[s]["runs"][f"meta:{f}"]]) for s in (lo, hi)]
            load = [med([m["load_s"] for m in results[s]["runs"][f]]) for s in (lo, hi)]
            print(f"  {f}: metadata open time {meta[1] / meta[0]:.2f}x, whole load {load[1] / load[0]:.2f}x")
        for s in sizes:
            r = results[s]["runs"]
            j = med([m["load_s"] for m in r["meta:jsonl"]]) / med([m["load_s"] for m in r["meta:arrow"]])
            mj = med([delta_kb(m, "after_load") for m in r["jsonl"]]) - med([delta_kb(m, "after_load") for m in r["faiss"]])
            ma = med([delta_kb(m, "after_load") for m in r["arrow"]]) - med([delta_kb(m, "after_load") for m in r["faiss"]])
            print(f"  {s:,} rows: jsonl / arrow metadata open time {j:.0f}x, RSS above the codes "
                  f"{mj / max(ma, 1):.0f}x")
    if any("sqlite" in res["runs"] for res in results.values()):
        print("\n| rows | store | file B/row | open ms | RSS after open KiB | label filter ms (matches) | "
              "100 × fetch 10 rows ms | RSS after, KiB |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        for n, res in results.items():
            for f, size in (("arrow_ops", res["sizes"]["arrow"]), ("sqlite", res["sizes"]["sqlite"])):
                runs = res["runs"][f]
                print(f"| {n:,} | {'arrow' if f == 'arrow_ops' else f} | {size / n:.0f} | "
                      f"{med([m['load_s'] for m in runs]) * 1e3:.2f} | {med([delta_kb(m, 'after_load') for m in runs])} | "
                      f"{med([m['filter_s'] for m in runs]) * 1e3:.1f} ({runs[0]['matches']}) | "
                      f"{med([m['search100_s'] for m in runs]) * 1e3:.1f} | "
                      f"{med([delta_kb(m, 'after_search') for m in runs])} |")


if __name__ == "__main__":
    main()
