"""``xmodal shard``: a manifest's rows written as WebDataset tar shards of N samples each, with open_clip's
``sizes.json`` sample-count index (:mod:`xmodal.data.shard_writer`), so a small manifest becomes a corpus that
streams (``data.shards`` in a config; docs/data.md)."""
from __future__ import annotations

from .common import add_manifest_flags, read_manifest_for

_SHOWN = 10  # bad rows printed in full


def add_shard_verb(sub) -> None:
    s = sub.add_parser("shard", help="write a manifest's rows as WebDataset tar shards (+ sizes.json)")
    s.add_argument("--manifest", required=True, help="CSV, JSONL, Parquet or a saved HF dataset")
    s.add_argument("--out", required=True, help="folder for 00000.tar, 00001.tar, ..., checksums.json and sizes.json")
    s.add_argument("--samples-per-shard", type=int, default=1000, metavar="N", help="samples per shard (1000)")
    s.add_argument("--split", default=None, help="only the rows whose split column equals this")
    s.add_argument("--modalities", nargs="+", default=None, metavar="NAME",
                   help="modality columns to write (default: every modality column of the manifest)")
    add_manifest_flags(s)
    s.set_defaults(fn=run_shard)


def run_shard(args) -> int:
    import sys

    from tqdm import tqdm

    from ..data import ManifestError
    from ..data.shard_writer import write_shards

    # Files are checked as each row is written (the manifest's own checks — ids, paths inside the root — first).
    manifest = read_manifest_for(args, split=args.split, modalities=args.modalities, check_files=False,
                                 require_all=False)
    with tqdm(total=len(manifest), desc="shard", unit="row", disable=None) as bar:
        report = write_shards(manifest, args.out, args.samples_per_shard, args.modalities, progress=bar.update,
                              stop_on_bad=args.on_bad_row == "error")
    if report.bad:
        more = f"\n  ... ({len(report.bad) - _SHOWN} more)" if len(report.bad) > _SHOWN else ""
        print(f"xmodal shard: left out {len(report.bad)} bad row(s) (--on-bad-row skip):\n  "
              + "\n  ".join(report.bad[:_SHOWN]) + more, file=sys.stderr)
    if not report.shards:
        raise ManifestError(f"{manifest.source}: no row could be written; nothing to shard")
    print(f"wrote {report.samples} samples in {len(report.shards)} shard(s) to {args.out} "
          f"({report.shards[0].name} .. {report.shards[-1].name}, checksums.json, sizes.json)")
    return 0
