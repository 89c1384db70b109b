"""Typed run configuration: dataclasses loaded from YAML, overridden by dotted paths, validated on load.

Every error names the offending field by its full dotted path (and the file it came from), e.g.
``configs/pretrain.yaml: train.lr: expected float, got 'fast'``.

* :mod:`.schema`: the dataclasses, one per section, with their defaults;
* :mod:`.parsing`: YAML and overrides → dataclasses (types coerced, unknown keys named with a suggestion), and back;
* :mod:`.checks`: the cross-field checks (``validate``).
"""
from .checks import check_task_modalities, validate
from .parsing import _from_dict, apply_overrides, config_from_dict, load_config, save_config
from .schema import (Config, ConfigError, DataConfig, LogConfig, ModelConfig, MultitaskConfig, PairMemoryConfig,
                     PretrainedConfig, TaskConfig, TowerConfig, TrainConfig, _to_plain)

__all__ = ["Config", "ConfigError", "DataConfig", "LogConfig", "ModelConfig", "MultitaskConfig", "PairMemoryConfig",
           "PretrainedConfig", "TaskConfig", "TowerConfig", "TrainConfig", "apply_overrides", "check_task_modalities",
           "config_from_dict", "load_config", "save_config", "validate", "_from_dict", "_to_plain"]
