"""Typed run configuration: dataclasses loaded from YAML, overridden by dotted paths, validated on load.

Every error names the offending field by its full dotted path (and the file it came from), e.g.
``configs/pretrain.yaml: train.lr: expected float, got 'fast'``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass
class TowerConfig:
    """One modality's tower: encoder ``kind`` + projection into the shared space.

    image kinds: ``open_clip`` (vision tower of an open_clip model config), ``cnn`` (small conv net),
    ``timm`` (any timm model by ``name``), ``efficientnet_lite0`` (the packaged ImageNet weights).
    text kinds: ``open_clip`` (text transformer, BPE), ``lstm`` / ``gru`` (over BPE ids), ``hf`` (a local Hugging Face
    encoder folder with mean pooling; ``name: minilm`` = the packaged all-MiniLM-L6-v2).
    """

    kind: str
    name: str | None = None
    pretrained: str | None = None  # local weights file/folder, or "package" for weights shipped in a pip package
    freeze: bool = False  # freeze the encoder (projection stays trainable); frozen encoders run in eval mode
    # none: the encoder's features ARE the embedding (its width must equal model.embed_dim), e.g. an open_clip tower
    # that already projects, whose pretrained alignment a random Linear would break
    projection: Literal["linear", "mlp", "none"] = "linear"
    # recompute activations in backward instead of storing them (less memory, ~1 more forward); trainable towers only
    grad_checkpointing: bool = False
    image_size: int = 224
    context_length: int = 32
    augment: bool = True  # random resized crop + horizontal flip for training images
    options: dict[str, Any] = field(default_factory=dict)  # kind-specific encoder arguments


@dataclass
class TaskConfig:
    """A task head on the shared space, trained by ``xmodal finetune``.

    kinds: ``classification`` (one class per row), ``multilabel`` (``target`` holds ``|``-separated class names),
    ``regression`` (a numeric score, e.g. sentiment in [-1, 1]), ``retrieval`` (contrastive, between the first two
    ``modalities``, as in pretraining).
    """

    kind: Literal["classification", "multilabel", "regression", "retrieval"]
    train: str | None = None  # manifest; default: data.train
    eval: str | None = None  # manifest; default: this task's train manifest
    train_split: str | None = "train"
    eval_split: str | None = "test"
    modalities: list[str] = field(default_factory=lambda: ["image"])  # inputs of the head (fused when several)
    target: str = "label"  # column holding the class name(s) or score
    classes: list[str] | None = None  # default: the sorted distinct values of the train split
    # late: one head per modality, outputs averaged; late_prob: their class probabilities averaged (single-label)
    fusion: Literal["concat", "sum", "product", "gated", "attention", "late", "late_prob"] = "concat"
    hidden: int | None = None  # hidden width of an MLP head; None = linear head (a linear probe when towers are frozen)
    dropout: float = 0.0
    loss: Literal["default", "mse", "l1", "huber"] = "default"  # regression loss; default mse
    threshold: float = 0.5  # multilabel: a class is predicted when its sigmoid probability exceeds this
    weight: float = 1.0  # static loss weight
    max_rows: int | None = None
    modality_dropout: float = 0.0  # training: hide each of a row's modalities with this probability (>= 1 kept)


@dataclass
class MultitaskConfig:
    sampling: Literal["proportional", "round_robin", "temperature"] = "proportional"
    temperature: float = 2.0  # for sampling: temperature, p_i ∝ n_i^(1/T)
    weighting: Literal["static", "uncertainty", "pcgrad", "gradnorm"] = "static"
    tasks_per_step: Literal["one", "all"] = "one"  # "all" is required by pcgrad and gradnorm
    gradnorm_alpha: float = 1.5  # GradNorm's restoring-force strength α (the paper's default); 0 = equal norms


@dataclass
class PretrainedConfig:
    """A pretrained image-text model to start from, resolved into model.towers by xmodal.modalities.pretrained."""
    library: Literal["open_clip", "transformers"]
    name: str
    weights: str | None = None
    freeze: list[str] = field(default_factory=list)  # towers to lock: [image] is LiT (locked image, tuned text)
    augment: bool = False  # random crops + flips of training images (off: a locked image tower's features cached)


@dataclass
class ModelConfig:
    pretrained: PretrainedConfig | None = None  # fills towers, embed_dim, loss, temperature (docs/pretrained.md)
    embed_dim: int = 256
    towers: dict[str, TowerConfig] = field(default_factory=dict)
    loss: Literal["clip", "siglip"] = "clip"
    init_logit_scale: float | None = None  # log-space; default log(1/0.07) for clip, log(10) for siglip
    init_logit_bias: float | None = None  # siglip only; default -10
    max_logit_scale: float = 100.0  # clamp exp(logit_scale) to [1, max] as open_clip does
    anchor: str | None = None  # bind every modality to this one (ImageBind); None: every pair of modalities
    # Matryoshka (Kusupati et al. 2022): also train these prefixes of the embedding as embeddings of their own
    # (e.g. [32, 64, 128]; the full embed_dim is always trained too); encode(..., dim=64) then truncates usefully
    matryoshka_dims: list[int] = field(default_factory=list)
    # modules that register modalities or tower kinds (xmodal.modalities.register_modality), imported before the
    # model is built; saved in the model card, so every command on the run imports them again (docs/modalities.md)
    plugins: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    train: str | None = None  # manifest path (CSV, JSONL, Parquet or a saved HF dataset folder)
    eval: str | None = None  # defaults to the train manifest when eval_split is set
    train_split: str | None = None  # keep rows whose `split` column equals this
    eval_split: str | None = None
    root: str | None = None  # base for relative paths; default: the manifest's folder
    num_workers: int = 0
    on_bad_row: Literal["error", "skip"] = "error"
    max_rows: int | None = None  # cap rows per split (quick runs)
    # Image/audio paths must lie inside the data root (root, else the manifest's folder); true also accepts `..`,
    # absolute paths and symlinks leading out of it (a manifest you trust that points at files elsewhere).
    allow_outside_root: bool = True  # a training manifest is the user's own; false confines it (docs/data.md)
    shards: str | list[str] | None = None  # tar (brace-expanded, pipe:, URLs) or .parquet shards: docs/data.md
    shard_sizes: str | None = None  # open_clip's sizes.json ({"00000.tar": n}); default: the one beside the shards
    columns: dict[str, str] = field(default_factory=dict)  # column -> members: "jpg;png", "json:caption"
    resampled: bool = False  # draw shards with replacement (open_clip's --dataset-resampled); train.samples_per_epoch
    shuffle_block: int = 1000  # samples shuffled together in one (rank, worker)'s slice (raw bytes in memory)
    max_bad_fraction: float = 0.01  # bad samples (undecodable, missing member) skipped per epoch before a stop
    record_ids: bool = False  # each rank appends every batch's sample ids to <output_dir>/ids/rank<R>.jsonl


@dataclass
class TrainConfig:
    batch_size: int = 64  # micro-batch per process
    grad_accum_steps: int = 1  # micro-batches per optimiser step, joined into ONE contrastive loss (GradCache)
    epochs: int = 1
    max_steps: int | None = None  # optimiser steps; overrides epochs when set
    samples_per_epoch: int | None = None  # with data.resampled: the samples one epoch draws over all processes
    lr: float = 1e-3
    encoder_lr: float | None = None  # lr for unfrozen encoders; default lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 50
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    freeze_towers: bool | None = None  # override every tower's `freeze` (true: linear probe; false: full fine-tune)
    freeze_projections: bool = False  # also freeze the projections: heads learn on the fixed shared space
    unfreeze_at_step: int = 0  # > 0: towers start frozen and are unfrozen at this optimiser step
    cache_frozen: bool = True  # embed frozen, non-augmented towers' inputs once (exact; see feature_cache.py)
    # where cached features live on disk, reused by later runs and commands: a folder; null (or true) =
    # $XMODAL_CACHE, else ~/.cache/xmodal/features; off (false) = in memory, for this run only (docs/data.md)
    feature_cache_dir: str | bool | None = None
    local_loss: bool = False
    gather_with_grad: bool = True
    log_every: int = 10
    eval_every: int = 0  # steps; 0 = only at the end
    save_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    deterministic: bool = False
    on_nonfinite: Literal["skip", "stop"] = "skip"  # a NaN/inf loss or gradient: skip that step, or stop the run
    max_nonfinite_skips: int = 10  # consecutive skipped steps after which the run stops anyway
    progress: bool = True
    stop_grace_s: float = 120.0  # after SIGINT/SIGTERM: the most seconds to finish the step and save a checkpoint


@dataclass
class LogConfig:
    backend: Literal["wandb", "tensorboard", "none"] = "wandb"
    project: str = "xmodal"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass
class Config:
    output_dir: str = "runs/xmodal"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    init_from: str | None = None  # a pretrained run folder whose towers (and temperature) fine-tuning starts from
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


# --------------------------------------------------------------------------------------------------------- parsing

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert YAML scalars (int → float, list → tuple)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = args
        if vt in (TowerConfig, TaskConfig):
            _check_entry_names(value, path, "tower" if vt is TowerConfig else "task")
        return {_coerce(k, kt, f"{path}"): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return origin(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string: YAML 1.1's float needs a dot
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{path}: must be finite, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported annotation {tp!r}")  # a bug in the dataclasses, not in the user's YAML


def _check_entry_names(entries: dict, path: str, what: str) -> None:
    """A tower or task entry without ``kind`` next to entries that have one is almost always a misspelled name in an
    override (``model.towers.imag.freeze=false``, ``tasks.star.target=rating``): say so, rather than ask for the
    ``kind`` of a new one."""
    known = [str(k) for k, v in entries.items()
             if isinstance(v, (TowerConfig, TaskConfig)) or (isinstance(v, dict) and "kind" in v)]
    for name, v in entries.items():
        if not isinstance(v, dict) or "kind" in v or not known:
            continue
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"probably a typo for {close[0]!r}" if close else "probably a typo"
        raise ConfigError(f"{path}.{name}: the config has {what}s [{', '.join(known)}] and {str(name)!r} is not one "
                          f"of them ({hint}); to add a new {what}, give it {path}.{name}.kind")


def _from_dict(cls: type, data: Any, path: str) -> Any:
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in data if k not in fields), key=str)  # YAML keys may be ints, None, ...
    if unknown:
        where = f"{path}." if path else ""
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        raise ConfigError(f"unknown key {where}{unknown[0]} (valid keys{' of ' + path if path else ''}: "
                          f"{', '.join(sorted(fields))})" + (f"; did you mean {where}{close[0]}?" if close else ""))
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required")
    return cls(**kwargs)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key segment")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a mapping")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            problem = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ConfigError(f"override {item!r}: {key.strip()}: invalid YAML value {raw!r} ({problem})") from None
    return data


def validate(cfg: Config) -> Config:
    """Cross-field checks that types alone cannot express."""
    m, t, d = cfg.model, cfg.train, cfg.data
    if m.embed_dim <= 0:
        raise ConfigError(f"model.embed_dim: must be positive, got {m.embed_dim}")
    for name, tower in m.towers.items():
        for key in ("image_size", "context_length"):  # one message per field: each names its full path
            if getattr(tower, key) <= 0:
                raise ConfigError(f"model.towers.{name}.{key}: must be positive, got {getattr(tower, key)}")
    for key in ("batch_size", "grad_accum_steps", "epochs", "log_every", "stop_grace_s"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key}: must be positive, got {getattr(t, key)}")
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError(f"train.max_steps: must be positive, got {t.max_steps}")
    if t.lr <= 0:
        raise ConfigError(f"train.lr: must be positive, got {t.lr}")
    if t.encoder_lr is not None and t.encoder_lr < 0:
        raise ConfigError(f"train.encoder_lr: must be >= 0, got {t.encoder_lr}")
    for key in ("warmup_steps", "eval_every", "save_every"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}: must be >= 0, got {getattr(t, key)}")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints: must be >= 1, got {t.keep_checkpoints}")
    dims = m.matryoshka_dims
    if dims and (any(not 0 < x <= m.embed_dim for x in dims) or list(dims) != sorted(set(dims))):
        raise ConfigError(f"model.matryoshka_dims: must be increasing sizes between 1 and model.embed_dim "
                          f"({m.embed_dim}), got {list(dims)}")
    if m.anchor is not None and m.towers and m.anchor not in m.towers:
        raise ConfigError(f"model.anchor: {m.anchor!r} is not a tower ({', '.join(m.towers)})")
    if t.max_nonfinite_skips < 1:
        raise ConfigError(f"train.max_nonfinite_skips: must be >= 1, got {t.max_nonfinite_skips}")
    if t.unfreeze_at_step < 0:
        raise ConfigError(f"train.unfreeze_at_step: must be >= 0, got {t.unfreeze_at_step}")
    if m.max_logit_scale <= 1:
        raise ConfigError(f"model.max_logit_scale: must be > 1, got {m.max_logit_scale}")
    for name, task in cfg.tasks.items():
        where = f"tasks.{name}"
        if not task.modalities:
            raise ConfigError(f"{where}.modalities: must name at least one tower"
                              + (f" of model.towers ({', '.join(m.towers)})" if m.towers else ""))
        check_task_modalities(name, task, list(m.towers))
        if task.kind == "retrieval" and len(task.modalities) < 2:
            raise ConfigError(f"{where}.modalities: {where}.kind retrieval needs two modalities, got "
                              f"{task.modalities}")
        if task.fusion == "late" and task.kind == "retrieval":
            raise ConfigError(f"{where}.fusion: late fusion applies to classification/regression heads, not "
                              f"{where}.kind retrieval")
        if task.fusion == "late_prob" and task.kind != "classification":
            raise ConfigError(f"{where}.fusion: late_prob averages class probabilities, so it needs kind "
                              f"classification (single-label), not {task.kind}")
        if task.loss != "default" and task.kind != "regression":  # it would be silently ignored
            raise ConfigError(f"{where}.loss: {task.loss!r} is a regression loss; a {task.kind} task uses its own "
                              f"(leave loss: default)")
        if not 0 < task.threshold < 1:
            raise ConfigError(f"{where}.threshold: must be in (0, 1), got {task.threshold}")
        if task.threshold != 0.5 and task.kind != "multilabel":  # it would be silently ignored
            raise ConfigError(f"{where}.threshold: applies to kind multilabel, not {task.kind}")
        if not 0 <= task.dropout < 1:
            raise ConfigError(f"{where}.dropout: must be in [0, 1), got {task.dropout}")
        if task.weight < 0:
            raise ConfigError(f"{where}.weight: must be >= 0, got {task.weight}")
        if not 0 <= task.modality_dropout < 1:
            raise ConfigError(f"{where}.modality_dropout: must be in [0, 1), got {task.modality_dropout}")
        if task.modality_dropout and (task.kind == "retrieval" or len(task.modalities) < 2):
            raise ConfigError(f"{where}.modality_dropout: applies to heads over several modalities (a "
                              f"classification/regression task with 2+ modalities)")
    mt = cfg.multitask
    if mt.weighting == "pcgrad" and mt.tasks_per_step != "all":
        raise ConfigError("multitask.weighting: pcgrad needs multitask.tasks_per_step: all")
    if mt.weighting == "gradnorm" and mt.tasks_per_step != "all":  # its targets compare every task in one step
        raise ConfigError("multitask.weighting: gradnorm needs multitask.tasks_per_step: all")
    if mt.gradnorm_alpha < 0:
        raise ConfigError(f"multitask.gradnorm_alpha: must be >= 0, got {mt.gradnorm_alpha}")
    if mt.temperature <= 0:
        raise ConfigError(f"multitask.temperature: must be positive, got {mt.temperature}")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers: must be >= 0, got {d.num_workers}")
    if d.max_rows is not None and d.max_rows <= 0:
        raise ConfigError(f"data.max_rows: must be positive, got {d.max_rows}")
    from .shard_config import shard_problem
    if (problem := shard_problem(cfg)) is not None:  # the sharded-corpus fields, checked in shard_config.py
        raise ConfigError(problem)
    return cfg


def check_task_modalities(name: str, task: TaskConfig, towers: list[str], source: str = "model.towers") -> None:
    """Every modality a task reads must be one of the model's towers (``source`` says where the towers come from:
    the config, or an ``init_from`` run). No towers (yet): nothing to check."""
    unknown = [mod for mod in task.modalities if towers and mod not in towers]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), towers, n=1)
        raise ConfigError(f"tasks.{name}.modalities: {unknown[0]!r} is not a tower of the model (towers: "
                          f"{', '.join(towers)}, from {source})" + (f"; did you mean {close[0]!r}?" if close else ""))


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    try:
        return validate(_from_dict(Config, data, ""))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None), apply dotted overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    overrides = overrides or []
    try:
        apply_overrides(data, overrides)
    except ConfigError as e:
        raise ConfigError(f"{source} + overrides: {e}") from None
    try:
        return validate(_from_dict(Config, data, ""))
    except ConfigError as e:
        raise ConfigError(f"{_error_source(str(e), source, overrides)}: {e}") from None


def _error_source(message: str, source: str, overrides: list[str]) -> str:
    """``FILE + override KEY=VALUE`` when an override set the field an error names (or a mapping above or below
    it; the last such override holds), else ``FILE``; ``FILE + overrides`` when the message names no field."""
    m = re.match(r"^(?:unknown key )?([\w.-]+)[: ]", message)
    hits = [o for o in overrides for k in [o.split("=", 1)[0].strip()]
            if m and (f"{m.group(1)}.".startswith(f"{k}.") or k.startswith(f"{m.group(1)}."))]
    return f"{source} + override {hits[-1]}" if hits else source if m or not overrides else f"{source} + overrides"


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
