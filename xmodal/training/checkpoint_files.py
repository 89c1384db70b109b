"""What a checkpoint folder holds and how a load knows it is whole: a sealed ``manifest.json`` written last (size and
XXH3-128 checksum of every file), and slim checkpoints that reference frozen weights instead of copying them.

**Slim.** A frozen tower's encoder never changes during a run (no gradient, no optimiser update, eval mode), and a
resumed run rebuilds it from the same source (a packaged or pretrained file, or ``init_from``'s model) before the
checkpoint is read. So a checkpoint leaves those tensors out of its ``model.safetensors`` and records, in
``manifest.json``, their names, the towers' sources and one XXH3-128 checksum over the tensors (names, dtypes, shapes, bytes).
Loading recomputes that digest from the freshly built model and refuses to resume if it differs (a changed
pretrained file, another ``init_from``), naming the tower. What trains — projections, heads, unfrozen encoders,
the temperature — the optimiser state, the schedule, RNG states and the data position stay in the checkpoint as
before. The finished model (``model.safetensors`` in the run folder) always holds every weight: it is what users
share. Under FSDP, Accelerate writes sharded model files without passing them through the hook, so those
checkpoints stay whole.

**Manifest.** ``manifest.json`` = ``{"files": {name: {"size", "xxh3_128"}}, "frozen": {...} | null, "run": {"id",
"folder"} | null, "checksum"}``, written (atomically, fsynced) into the temporary folder after every other file and
before the folder's rename. A load checks every file against it first: a truncated, flipped, empty, missing or
foreign file is one line naming it; then the run (:mod:`xmodal.run_identity`): a whole checkpoint copied in from
another run folder passes its own manifest, but not this one. Checkpoints saved before manifests (or run ids)
existed load unchecked, as before.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..integrity import ALGORITHM, IntegrityError, check_file, file_record, read_sealed_json, seal, tensors_digest
from ..run_identity import other_run

MANIFEST = "manifest.json"
_WRAPPED = "module."  # DDP's prefix on state-dict keys


def _bare(key: str) -> str:
    return key[len(_WRAPPED):] if key.startswith(_WRAPPED) else key


def frozen_keys(model) -> list[str]:
    """State-dict keys of the encoders of frozen towers (``towers.<m>.encoder.*``) of an unwrapped XModalModel."""
    towers = getattr(model, "towers", {})
    prefixes = tuple(f"towers.{m}.encoder." for m, t in towers.items() if getattr(t, "frozen", False))
    return sorted(k for k in model.state_dict() if prefixes and k.startswith(prefixes))


def _sources(model, keys: list[str]) -> dict[str, str]:
    """Where each frozen tower's weights come from, as its config says (for the message when they differ)."""
    out = {}
    for m, tcfg in getattr(getattr(model, "cfg", None), "towers", {}).items():
        if any(k.startswith(f"towers.{m}.encoder.") for k in keys):
            out[m] = f"{tcfg.kind}" + (f" {tcfg.name}" if tcfg.name else "") + \
                (f", pretrained {tcfg.pretrained}" if tcfg.pretrained else "")
    return out


class SlimSave:
    """A save-state pre-hook (see ``Accelerator.register_save_state_pre_hook``): drops the frozen encoders' tensors
    from the model's state dict before Accelerate writes it; :attr:`frozen` is then the reference to record."""

    def __init__(self, accelerator):
        self.accelerator, self.frozen = accelerator, None

    def __call__(self, models, weights, output_dir) -> None:
        if not models or not weights:  # FSDP / DeepSpeed write their own files: nothing to slim
            return
        model = self.accelerator.unwrap_model(models[0])
        keys = set(frozen_keys(model))
        dropped = {k: v for k, v in weights[0].items() if _bare(k) in keys}
        if not dropped:
            return
        for k in dropped:
            del weights[0][k]
        if self.accelerator.is_main_process:
            self.frozen = {"keys": sorted(_bare(k) for k in dropped), "sources": _sources(model, list(keys)),
                           ALGORITHM: tensors_digest((_bare(k), v) for k, v in dropped.items())}


def write_manifest(folder: Path, frozen: dict | None, run: dict | None = None) -> None:
    """``manifest.json`` for every file now in ``folder`` (sizes, checksums), plus the frozen weights' reference
    and the run it was saved by (``{"id", "folder"}``, :mod:`xmodal.run_identity`; None without a run id)."""
    files = {str(p.relative_to(folder)): file_record(p) for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    write_text(folder / MANIFEST, json.dumps(seal({"format": "xmodal-checkpoint", "version": 1,
                                                   "files": files, "frozen": frozen, "run": run}), indent=2))


def recorded_run(folder: Path) -> dict | None:
    """The run a checkpoint's manifest records (``{"id", "folder"}``), read without checking anything (resume checks
    the whole checkpoint later); None where it records none or cannot be read."""
    try:
        run = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run if isinstance(run, dict) else None


def _files_ok(folder: Path) -> bool:
    """Whether ``folder``'s files match its manifest (True for a checkpoint without one: nothing to check), and
    the manifest names this run folder's run (or none)."""
    try:
        manifest = verify_files(folder, "")
    except IntegrityError:
        return False
    return other_run((manifest or {}).get("run"), folder.parent.parent) is None


def verify_files(folder: Path, remedy: str) -> dict[str, Any] | None:
    """Check every file against ``manifest.json``; the manifest (None for a checkpoint without one)."""
    if not (folder / MANIFEST).exists():
        return None
    manifest = read_sealed_json(folder / MANIFEST, remedy)
    for name, record in (manifest.get("files") or {}).items():
        check_file(folder / name, record, recorded_in=folder / MANIFEST, remedy=remedy)
    return manifest


def check_frozen(folder: Path, model, frozen: dict | None) -> None:
    """The frozen tensors a slim checkpoint left out must be in ``model`` (unwrapped, freshly built) with the
    recorded digest, and the checkpoint's weights file must hold every other tensor (``load_state`` is then not
    strict, so this is the check that it would have made)."""
    from safetensors import safe_open

    state = model.state_dict()
    weights = folder / "model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), "pt") as f:
            missing = sorted(set(state) - {_bare(k) for k in f.keys()} - set(frozen["keys"] if frozen else ()))
        if missing and frozen:
            raise IntegrityError(f"checkpoint {folder} does not fit this model (was the run's model config "
                                 f"changed?): {weights.name} lacks {len(missing)} of its tensors ({missing[0]}, ...)")
        if missing and not (folder / MANIFEST).exists() and set(missing) <= set(frozen_keys(model)):
            raise IntegrityError(f"checkpoint {folder}: {MANIFEST} is missing, and {weights.name} leaves out the "
                                 f"frozen weights that file references (a slim checkpoint); restore {MANIFEST} or "
                                 f"resume from an older checkpoint")
    if not frozen:
        return
    absent = [k for k in frozen["keys"] if k not in state]
    found = tensors_digest((k, state[k]) for k in frozen["keys"]) if not absent else None
    if absent or found != frozen.get(ALGORITHM):
        towers = "; ".join(f"{m} ({src})" for m, src in (frozen.get("sources") or {}).items())
        detail = (f"this model has no {absent[0]}" if absent
                  else f"{ALGORITHM} {found[:12]}…, expected {str(frozen.get(ALGORITHM))[:12]}…")
        raise IntegrityError(f"checkpoint {folder} references the frozen weights of tower(s) {towers}, and the "
                             f"model built for this run differs ({detail}): resume needs the same pretrained "
                             f"weights (restore the file the tower loads, or the init_from model)")


def damaged_remedy(folder: Path, older: list[Path]) -> str:
    """What to do about a damaged checkpoint: the newest older one whose files verify, with the commands."""
    good = next((p for p in reversed(older) if _files_ok(p)), None)
    aside = folder.with_name(f"damaged_{folder.name}")
    if good is None:
        return (f"no older checkpoint is intact; move it aside (mv {folder} {aside}) and train again without "
                f"--resume, or restore the run folder from a copy")
    return (f"the previous checkpoint {good} is intact: move this one aside (mv {folder} {aside}) and run the same "
            f"command with --resume again to continue from there")


def unwrapped_model(accelerator):
    """The model Accelerate prepared (its first), unwrapped; None for a stand-in without one."""
    models = getattr(accelerator, "_models", None)  # Accelerate keeps what it prepared here; no public getter
    return accelerator.unwrap_model(models[0]) if models else None


__all__ = ["MANIFEST", "SlimSave", "check_frozen", "damaged_remedy", "frozen_keys", "recorded_run",
           "unwrapped_model", "verify_files", "write_manifest"]
