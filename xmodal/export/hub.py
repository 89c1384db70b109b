"""The hub-ready folder of a run, its upload, and reading a hub repo back.

Layout of ``xmodal export RUN --format hf --out DIR``::

    DIR/README.md                      model card (hub metadata: licence, datasets, model-index with the run's metrics)
    DIR/open_clip_config.json + open_clip_model.safetensors      towers from open_clip: open_clip loads DIR itself
    DIR/config.json + model.safetensors + tokenizer + processor  towers from transformers: AutoModel loads DIR
    DIR/xmodal/model.json + model.safetensors                    the whole xmodal model (heads included)

The folder is written under a temporary name and renamed into place at the end: an export that fails leaves nothing.
In the xmodal card the towers' source is rewritten to the export itself (``hf-hub:ORG/NAME`` / ``ORG/NAME`` with
``--repo``, else the folder's absolute path), so the export needs nothing of the machine it came from.
"""
from __future__ import annotations

import copy
import logging
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..model import XModalModel
from ..model import load as load_run
from ..model_files import EXPORT_SUBFOLDER as XMODAL_SUBFOLDER
from ..model_files import HUB_PREFIX, model_folder
from .peer_formats import open_clip_files, peer_library, transformers_files


@contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temporary sibling folder renamed to ``out`` when the block succeeds, removed when it fails."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"export: {out} already exists and is not empty; choose another --out (nothing was "
                              f"written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp (mode 0700): the export is a folder to share, with the mode the user's umask gives
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _self_contained(model: XModalModel, library: str | None, out: Path, repo: str | None):
    """The model config with the towers' source pointing at the export (see the module docstring)."""
    cfg = copy.deepcopy(model.cfg)
    if library is None:
        return cfg
    if library == "open_clip":
        name = f"{HUB_PREFIX}{repo}" if repo else f"local-dir:{out.resolve()}"
    else:
        name = repo or str(out.resolve())
    for m in ("image", "text"):
        cfg.towers[m].name, cfg.towers[m].pretrained = name, None
    if cfg.pretrained is not None:
        cfg.pretrained.name, cfg.pretrained.weights = name, None
    return cfg


def export_hf(run: str | os.PathLike, out: str | os.PathLike, repo: str | None = None,
              license: str | None = None) -> Path:
    """Write the hub-ready folder of ``run`` into ``out`` (which must not hold anything); returns ``out``."""
    from .model_card import model_card, training_data

    model = load_run(run)
    out = Path(out)
    library = peer_library(model)
    if library is not None and model.pair_memory is not None and len(model.pair_memory):
        logging.getLogger(__name__).warning(
            "export: the %s files embed plainly: this model's pair memory (%d training pairs, model.pair_memory) has "
            "no place in that format; it is in the %s/ subfolder, which xmodal.load reads (and in ONNX graphs)",
            library, len(model.pair_memory), XMODAL_SUBFOLDER)
    card = getattr(model, "card", {}) or {}
    with staging(out) as tmp:
        if library == "open_clip":
            open_clip_files(model, tmp)
        elif library == "transformers":
            transformers_files(model, tmp)
        model.cfg = _self_contained(model, library, out, repo)
        keep = {k: v for k, v in card.items() if k not in ("format", "version", "model", "tasks")}
        keep["datasets"] = training_data(Path(run), card)  # an export keeps no config.yaml: re-exports read this
        model.save(tmp / XMODAL_SUBFOLDER, extra=keep)
        (tmp / "README.md").write_text(model_card(model, card, run, library, repo, license, out), encoding="utf-8")
    return out


def push(run: str | os.PathLike, repo: str, private: bool = False, license: str | None = None) -> str:
    """Export ``run`` for ``repo`` and upload it with huggingface_hub (needs the network and a token:
    ``huggingface-cli login`` or ``HF_TOKEN``). Returns the repo's URL."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise OSError("push: HF_HUB_OFFLINE is set (xmodal's default); run with HF_HUB_OFFLINE=0 to upload")
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory(prefix="xmodal-push-") as tmp:
        folder = export_hf(run, Path(tmp) / "export", repo=repo, license=license)
        api = HfApi()
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message=f"xmodal push {Path(run).name}")
    return str(url)


def load(path: str | os.PathLike, map_location: str = "cpu") -> XModalModel:
    """``xmodal.load``: a run folder, an exported folder, or ``hf-hub:ORG/NAME`` (downloaded, or read from the local
    Hugging Face cache when offline). A folder holding only a peer library's files (an open_clip or transformers
    CLIP, e.g. one exported by xmodal without its own files, or any such hub repo) loads as ``model.pretrained``."""
    folder = model_folder(path)
    if not (folder / "model.json").is_file():
        from ..config import ModelConfig, PretrainedConfig

        if (folder / "open_clip_config.json").is_file():
            source = PretrainedConfig(library="open_clip", name=f"local-dir:{folder}")
        elif (folder / "config.json").is_file():
            source = PretrainedConfig(library="transformers", name=str(folder))
        else:
            source = None
        if source is not None:
            return XModalModel(ModelConfig(pretrained=source)).to(map_location).eval()
    return load_run(folder, map_location=map_location)
