"""What a modality is to xmodal, and the registry every other part iterates over.

A :class:`Modality` says, in one place, everything the library needs to know about one kind of input:

* ``value``: what a manifest cell (or a query) holds — ``"path"`` (a file: image, audio, ``.npy``, ...) or
  ``"string"`` (the value itself: text, a row of numbers written inline, ...). Path values are resolved against the
  data root, confined to it unless allowed, and checked before training; strings are checked for being non-empty;
* ``check_file(path) -> problem | None``: the deep check of one file (a header that parses, an image that decodes),
  run once per distinct file after the generic checks (exists, not empty, readable);
* ``kinds``: its towers — per ``kind`` a :class:`TowerKind` (encoder builder, per-sample transform builder, the
  ``options`` it accepts). The transform turns one raw value into a fixed-shape tensor, so batches stack with
  :func:`xmodal.batch.collate`;
* ``augments``: whether its training transforms can be random (then a frozen tower's features are cached only when
  ``augment: false``);
* ``hf_feature``: the ``datasets`` feature type that stores it in a saved HF dataset (``datasets.Image``), if any;
* ``read_bytes(data)``: how an uploaded query (HTTP body, base64) becomes a value its transform takes, if uploads
  make sense for it;
* ``query_help``: the help line of its ``--<name>`` flag on ``xmodal query``;
* ``shard_keys``: the member extensions that hold it in a WebDataset tar shard (``KEY.jpg``, ``KEY.txt``), the
  first one preferred; a shard member of a path-valued modality is read through ``read_bytes``, a string-valued
  one is its UTF-8 text (:mod:`xmodal.data.shards`).

Built-in: ``image``, ``text``, ``audio``. A user adds one without editing xmodal::

    from xmodal.modalities import Modality, TowerKind, register_modality
    register_modality(Modality("vector", value="path", kinds={"mlp": TowerKind(build_mlp, build_npy_transform)}))

Builders may also be ``"module:function"`` strings, imported on first use (the built-ins in :mod:`.builtin` are
declared so, which keeps ``xmodal --help`` free of torch).

and names the module in the config (``model.plugins: [my_package.vector]``; it is saved in the model card, so
``xmodal.load`` and every command on the run import it again), in ``XMODAL_PLUGINS`` (comma-separated module names),
or as an entry point in the group ``xmodal.modalities`` of an installed package. Only importable modules are named:
a model card cannot carry code, only the name of a module already installed. See docs/modalities.md.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

ENTRY_POINT_GROUP = "xmodal.modalities"
PLUGINS_ENV = "XMODAL_PLUGINS"
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def resolve(ref: Callable | str | None) -> Callable | None:
    """A function, or ``"package.module:function"`` imported on first use (declarations stay import-light)."""
    if ref is None or callable(ref):
        return ref
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class TowerKind:
    """One encoder family of a modality.

    ``build_encoder(cfg: TowerConfig, where: str) -> (nn.Module, feat_dim)``: ``encoder(x) -> [B, feat_dim]``.
    ``build_transform(cfg: TowerConfig, train: bool, where: str) -> callable``: picklable, one raw value → a
    fixed-shape tensor (it runs in DataLoader workers). ``where`` (``"model.towers.<name>"``) prefixes errors.
    Either may be a ``"module:function"`` string. ``options``: the keys ``cfg.options`` may hold (anything else is
    a config error naming the key).
    """

    build_encoder: Callable[..., Any] | str
    build_transform: Callable[..., Any] | str
    options: frozenset[str] = frozenset()

    def encoder(self, cfg, where: str):
        return resolve(self.build_encoder)(cfg, where)

    def transform(self, cfg, train: bool, where: str):
        return resolve(self.build_transform)(cfg, train, where)


@dataclass
class Modality:
    name: str
    value: Literal["path", "string"]
    kinds: dict[str, TowerKind] = field(default_factory=dict)
    check_file: Callable[[str], str | None] | str | None = None
    augments: bool = True
    hf_feature: str | None = None  # name of the ``datasets`` feature class, e.g. "Image"
    read_bytes: Callable[[bytes], Any] | str | None = None
    query_help: str = ""
    shard_keys: tuple[str, ...] = ()

    def check(self, path: str) -> str | None:
        """The modality's own check of one file (after the generic ones), or None when it has none."""
        check = resolve(self.check_file)
        return check(path) if check is not None else None

    def decode_bytes(self, data: bytes) -> Any:
        """An uploaded or embedded value's bytes → what the transform takes (``read_bytes`` must be set)."""
        return resolve(self.read_bytes)(data)

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name or ""):
            raise ValueError(f"modality name must be lower-case letters, digits and _ (a manifest column and a "
                             f"CLI flag), got {self.name!r}")
        if self.value not in ("path", "string"):
            raise ValueError(f"modality {self.name}: value must be 'path' or 'string', got {self.value!r}")


_REGISTRY: dict[str, Modality] = {}
_loaded_external = False


def register_modality(modality: Modality, *, replace: bool = False) -> Modality:
    """Add ``modality`` (its name becomes a manifest column, a batch key, a tower name and a query flag).
    Registering the same name twice is an error unless ``replace=True``; the same object again is a no-op, so a
    plugin module may be imported more than once."""
    have = _REGISTRY.get(modality.name)
    if have is not None and have is not modality and not replace:
        raise ValueError(f"modality {modality.name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[modality.name] = modality
    return modality


def unregister_modality(name: str) -> None:
    """Remove a registered modality (tests, notebooks that redefine one)."""
    _REGISTRY.pop(name, None)


def register_tower_kind(modality: str, kind: str, tower: TowerKind) -> None:
    """Add an encoder family to an existing modality (e.g. another image backbone)."""
    get_modality(modality).kinds[kind] = tower


def _load_external() -> None:
    """Entry points and ``XMODAL_PLUGINS``, once, on first use of the registry."""
    global _loaded_external
    if _loaded_external:
        return
    _loaded_external = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
    load_plugins([p for p in os.environ.get(PLUGINS_ENV, "").split(",") if p.strip()], source=PLUGINS_ENV)


def load_plugins(modules: list[str] | tuple[str, ...], source: str = "model.plugins") -> None:
    """Import each module (by name) so that it registers its modalities or tower kinds."""
    for name in modules:
        name = name.strip()
        if not _MODULE_NAME.match(name):
            raise ValueError(f"{source}: {name!r} is not a module name (dotted Python identifiers)")
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ValueError(f"{source}: cannot import plugin module {name!r} ({e}); it must be importable "
                             f"(installed, or on PYTHONPATH)") from None


def modality_names() -> list[str]:
    """Registered modality names, in registration order (built-ins first: image, text, audio)."""
    _load_external()
    return list(_REGISTRY)


def get_modality(name: str, where: str | None = None) -> Modality:
    """The registered modality ``name``; a ValueError naming ``where`` and the valid names otherwise."""
    _load_external()
    try:
        return _REGISTRY[name]
    except KeyError:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}unknown modality {name!r} (valid modalities: {', '.join(_REGISTRY)})") from None


def is_modality(name: str) -> bool:
    _load_external()
    return name in _REGISTRY


def path_modalities() -> list[str]:
    """Modalities whose values are files (their query values are paths too)."""
    return [m for m in modality_names() if _REGISTRY[m].value == "path"]
