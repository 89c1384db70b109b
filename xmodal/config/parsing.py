"""YAML → typed config: values coerced to each field's type with the dotted path in every error, unknown keys
named with a suggestion, dotted overrides, and the way back (``save_config``)."""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from .checks import validate
from .schema import Config, ConfigError, TaskConfig, TowerConfig

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
