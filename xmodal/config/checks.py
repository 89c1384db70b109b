"""Cross-field checks of a config that types alone cannot express, each naming the dotted field it is about."""
from __future__ import annotations

import difflib

from .schema import Config, ConfigError, TaskConfig


def check_train_blocks(where: str, tower) -> None:
    """``<where>.train_blocks``: a positive whole number of blocks, on a tower that is not frozen."""
    k = tower.train_blocks
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{where}.train_blocks: expected a whole number of blocks >= 1 (or null: every block), "
                          f"got {k!r}")
    if tower.freeze:
        raise ConfigError(f"{where}.train_blocks: {k} trains the encoder's last {k} blocks, but {where}.freeze is "
                          f"true (every block locked); set {where}.freeze: false with it")


def check_pair_memory(cfg: Config) -> None:
    """``model.pair_memory``: sane numbers, and towers whose features are fixed (the memory stores them)."""
    pm, where = cfg.model.pair_memory, "model.pair_memory"
    for key in ("k", "max_rows"):
        value = getattr(pm, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{where}.{key}: expected a whole number >= 1, got {value!r}")
    if not pm.power > 0:
        raise ConfigError(f"{where}.power: must be positive, got {pm.power}")
    if not 0 <= pm.weight < 1:
        raise ConfigError(f"{where}.weight: must be in [0, 1), got {pm.weight}")
    if len(cfg.model.towers) < 2:
        raise ConfigError(f"{where}: pairs need two towers or more, model.towers has {list(cfg.model.towers)}")
    stray = [m for m in pm.whiten if m not in cfg.model.towers]
    if stray:
        raise ConfigError(f"{where}.whiten: {stray} not among model.towers ({', '.join(cfg.model.towers)})")
    for name, tower in cfg.model.towers.items():
        if not tower.freeze:
            raise ConfigError(f"{where}: needs frozen towers (it stores their features), but "
                              f"model.towers.{name}.freeze is false; set it true or {where}: null")
    if cfg.train.unfreeze_at_step:
        raise ConfigError(f"{where}: needs frozen towers, but train.unfreeze_at_step unfreezes them; set one of "
                          f"them to null / 0")


def validate(cfg: Config) -> Config:
    """Cross-field checks that types alone cannot express."""
    m, t, d = cfg.model, cfg.train, cfg.data
    if m.embed_dim <= 0:
        raise ConfigError(f"model.embed_dim: must be positive, got {m.embed_dim}")
    if not 0 <= m.label_smoothing < 1 or (m.label_smoothing and m.loss != "clip"):
        raise ConfigError(f"model.label_smoothing: must be in [0, 1) and needs model.loss clip, got "
                          f"{m.label_smoothing} with {m.loss}")
    for name, tower in m.towers.items():
        if not 0 <= tower.projection_dropout < 1:
            raise ConfigError(f"model.towers.{name}.projection_dropout: must be in [0, 1), got "
                              f"{tower.projection_dropout}")
        check_train_blocks(f"model.towers.{name}", tower)
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
    if not 0 < t.layer_lr_decay <= 1:
        raise ConfigError(f"train.layer_lr_decay: must be in (0, 1], got {t.layer_lr_decay}")
    for key in ("warmup_steps", "eval_every", "save_every"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}: must be >= 0, got {getattr(t, key)}")
    if t.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints: must be >= 1, got {t.keep_checkpoints}")
    dims = m.matryoshka_dims
    if dims and (any(not 0 < x <= m.embed_dim for x in dims) or list(dims) != sorted(set(dims))):
        raise ConfigError(f"model.matryoshka_dims: must be increasing sizes between 1 and model.embed_dim "
                          f"({m.embed_dim}), got {list(dims)}")
    if m.pair_memory is not None:
        check_pair_memory(cfg)
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
    if t.select_best and (cfg.tasks or d.streamed):
        raise ConfigError("train.select_best: model selection applies to pretraining on a manifest (data.train), "
                          "not to " + ("fine-tuning tasks" if cfg.tasks else "a streamed corpus (data.shards / "
                                       "data.hf_dataset)") + "; set train.select_best=false")
    if t.select_best and not t.eval_every:
        raise ConfigError("train.select_best: needs train.eval_every > 0 (the steps it validates and chooses "
                          "among), e.g. train.eval_every=50; or set train.select_best=false")
    if not 0 < d.holdout_fraction <= 0.5:
        raise ConfigError(f"data.holdout_fraction: must be in (0, 0.5], got {d.holdout_fraction}")
    if d.holdout_max < 1:
        raise ConfigError(f"data.holdout_max: must be >= 1, got {d.holdout_max}")
    if (problem := shard_problem(cfg)) is not None:  # the sharded-corpus fields, below
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


def shard_problem(cfg) -> str | None:
    """What is wrong with the sharded-corpus fields, naming the field, or None when they agree."""
    d, n = cfg.data, cfg.train.samples_per_epoch
    bad_column = next((k for k, v in d.columns.items() if not all(p.strip() for p in v.split(";"))), None)
    source = "data.shards" if d.shards is not None else "data.hf_dataset"  # the streamed source the user set
    for wrong, message in [
        (d.shards is not None and d.train is not None, "data.shards and data.train: give one training source"),
        (d.shards is not None and d.hf_dataset is not None, "data.shards and data.hf_dataset: give one training "
                                                            "source"),
        (d.hf_dataset is not None and d.train is not None, "data.hf_dataset and data.train: give one training "
                                                           "source"),
        (d.hf_data_files is not None and d.hf_dataset is None, "data.hf_data_files: goes with data.hf_dataset "
                                                               "(e.g. parquet, json, csv)"),
        (d.streamed and bool(cfg.tasks), f"{source}: sharded corpora train pretraining; fine-tuning "
                                         f"tasks read manifests (tasks.<name>.train)"),
        (d.resampled and not d.streamed, "data.resampled: applies to data.shards"),
        (d.resampled and n is None, "data.resampled: needs train.samples_per_epoch (no natural epoch)"),
        (n is not None and (n <= 0 or not d.resampled), f"train.samples_per_epoch: must be positive and goes "
                                                        f"with data.resampled: true, got {n}"),
        (d.shuffle_block < 1, f"data.shuffle_block: must be >= 1, got {d.shuffle_block}"),
        (not 0 <= d.max_bad_fraction < 1, f"data.max_bad_fraction: must be in [0, 1), got {d.max_bad_fraction}"),
        (bad_column is not None, f"data.columns.{bad_column}: expected member extensions such as 'jpg;png' or "
                                 f"'json:caption', got {d.columns.get(bad_column)!r}")]:
        if wrong:
            return message
    return None
