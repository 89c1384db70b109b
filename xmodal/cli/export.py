"""``xmodal export`` (a hub-ready folder, or ONNX graphs) and ``xmodal push`` (upload to the Hugging Face hub)."""
from __future__ import annotations

from pathlib import Path


def add_export_verbs(sub) -> None:
    s = sub.add_parser("export", help="write a run as a hub-ready folder (--format hf) or ONNX graphs (--format onnx)")
    s.add_argument("run", help="run folder (holds model.json and model.safetensors), or an export to export again")
    s.add_argument("--format", required=True, choices=["hf", "onnx"],
                   help="hf: safetensors, configs, tokenizer, model card (and open_clip's / transformers' own "
                        "format when the towers came from one); onnx: one graph per tower, dynamic batch")
    s.add_argument("--out", help="folder to create (must not exist or be empty); default RUN-hf / RUN-onnx")
    s.add_argument("--repo", help="hf: the hub repo (ORG/NAME) the folder is meant for: named in the card, and "
                                  "the towers' source points at it")
    s.add_argument("--license", help="hf: the licence for the card's metadata (e.g. mit, apache-2.0)")
    s.set_defaults(fn=run_export)
    p = sub.add_parser("push", help="export a run (--format hf) and upload it to the Hugging Face hub")
    p.add_argument("run", help="run folder, or an export")
    p.add_argument("--repo", required=True, help="ORG/NAME on the hub (created when missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--license", help="the licence for the card's metadata")
    p.set_defaults(fn=run_push)


def _source(given: str) -> tuple[Path, Path]:
    """``(the folder holding the model's files, the name its default --out is made from)``: a run folder, an export
    (re-exported, e.g. with --repo or --license) or ``hf-hub:ORG/NAME``."""
    from ..model_files import HUB_PREFIX, model_folder

    base = Path(given[len(HUB_PREFIX):].rpartition("/")[2]) if given.startswith(HUB_PREFIX) else Path(given)
    return model_folder(given), base


def run_export(args) -> int:
    run, base = _source(str(args.run))
    out = Path(args.out) if args.out else base.with_name(f"{base.name}-{args.format}")
    if args.format == "hf":
        from ..export import export_hf

        folder = export_hf(run, out, repo=args.repo, license=args.license)
    else:
        if args.repo or args.license:
            raise ValueError("export --format onnx: --repo and --license belong to --format hf")
        from ..export.onnx import export_onnx

        folder = export_onnx(run, out)
    print(f"exported: {folder}")
    return 0


def run_push(args) -> int:
    from ..export import push

    print(f"pushed: {push(_source(str(args.run))[0], args.repo, private=args.private, license=args.license)}")
    return 0
