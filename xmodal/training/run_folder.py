"""The run folder's guards: a folder holding a run is never written into without ``--resume``; ``--resume`` refuses a
config whose model the checkpoints do not fit (before anything is written) and recognises a run that already
finished."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .checkpoint import POSITION, latest_checkpoint
from ..config import Config, ConfigError
from ..model import CARD_NAME, WEIGHTS_NAME

METRICS_NAME = "metrics.jsonl"


def refuse_existing_run(out_dir: Path) -> None:
    """Without --resume, a folder that already holds a run (checkpoints, a finished model, metrics) is never
    written into: its model would be replaced and new metrics appended to the old ones."""
    if latest_checkpoint(out_dir) is not None:
        raise FileExistsError(f"{out_dir} already holds checkpoints: pass --resume to continue that run, or choose "
                              f"another output_dir (nothing was overwritten)")
    held = [n for n in (WEIGHTS_NAME, METRICS_NAME) if (out_dir / n).is_file()]
    if held:
        raise FileExistsError(f"{out_dir} already holds a run ({', '.join(held)}): choose another output_dir, or "
                              f"delete the folder to train it again (nothing was overwritten)")


# Fields whose change makes a checkpoint not fit the model (or the state it restores): resuming with them changed
# is refused. Every other change (epochs, lr, data, ...) is allowed and logged.
_HEAD_FIELDS = ("kind", "modalities", "classes", "fusion", "hidden")


def _with_defaults(saved: dict) -> dict:
    """The saved config with the fields it predates filled in with their defaults (a run saved before a field
    existed trained as its default says), as ``config.yaml`` holds them; unchanged if it no longer parses."""
    import yaml

    from ..config import _from_dict
    try:
        full = _from_dict(Config, saved, "").to_dict()
    except (ConfigError, TypeError, ValueError):
        return saved
    return yaml.safe_load(yaml.safe_dump(full, sort_keys=False))


def config_changes(cfg: Config, out_dir: Path) -> list[str]:
    """Compare ``cfg`` with the run's saved ``config.yaml``: raise ConfigError for a change of the model (the model
    section, a task head's shape, the set of tasks, the loss weighting); return the other changes as
    ``"train.epochs: 2 → 4"`` lines. No saved config (an older run): nothing to compare."""
    import yaml

    saved_path = out_dir / "config.yaml"
    if not saved_path.is_file():
        return []
    try:
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--resume: cannot read {saved_path} ({e}); nothing was written") from None
    new = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # tuples → lists, as the file holds them
    old_flat, new_flat = _dotted(_with_defaults(saved)), _dotted(new)
    fatal, other = [], []
    for key in dict.fromkeys([*old_flat, *new_flat]):
        if key == "output_dir" or old_flat.get(key, _ABSENT) == new_flat.get(key, _ABSENT):
            continue
        line = f"{key}: {_shown(old_flat.get(key, _ABSENT))} → {_shown(new_flat.get(key, _ABSENT))}"
        parts = key.split(".")
        shape = (parts[0] == "model" or key == "multitask.weighting"
                 or (parts[0] == "tasks" and (len(parts) == 2 or parts[2] in _HEAD_FIELDS)))
        (fatal if shape else other).append(line)
    if fatal:
        raise ConfigError(f"--resume: the model differs from the run's {saved_path}, so its checkpoints do not fit: "
                          + "; ".join(fatal) + " (resume with the run's settings, or choose another output_dir; "
                          "nothing was written)")
    return other


_ABSENT = object()


def _dotted(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.epochs": 2, ...}``: mappings flattened to dotted keys (lists and scalars are leaves); an empty
    mapping is a leaf too (a task or tower added where there were none shows up)."""
    if not isinstance(d, dict) or (not d and prefix):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_dotted(v, f"{prefix}{k}."))
    return out


def _shown(v: Any) -> str:
    return "(absent)" if v is _ABSENT else json.dumps(v, ensure_ascii=False)


def finished(out_dir: Path, ckpt: Path, total: int) -> bool:
    """The run in ``out_dir`` already ended at its newest checkpoint: that step reaches ``total`` and the model
    saved at the end of training carries the same step."""
    try:
        step = json.loads((ckpt / POSITION).read_text(encoding="utf-8"))["step"]
        card = json.loads((out_dir / CARD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError):
        return False
    return step >= total and card.get("step") == step and (out_dir / WEIGHTS_NAME).is_file()
