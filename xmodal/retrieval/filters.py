"""Metadata filters of a search: which rows of an index a query may return.

A filter is ``None`` (every row), a callable ``metadata -> bool``, or a dict ``{"label": "animals", "split":
["val", "test"]}``: every key must match, a list value matches any of its items, and values also match by their
string form (``"3"`` from the command line matches ``3``). :func:`parse_filters` turns the CLI's ``--filter
key=value`` flags (and the web service's query string) into such a dict.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from . import RetrievalError

Filter = Mapping[str, Any] | Callable[[dict], bool] | None


def _value_matches(have: Any, want: Any) -> bool:
    if isinstance(want, (list, tuple, set, frozenset)):
        return any(_value_matches(have, w) for w in want)
    if have == want:
        return True
    return have is not None and want is not None and str(have) == str(want)  # "3" from the CLI matches 3


def _predicate(filter: Filter) -> Callable[[dict], bool] | None:
    """``None``; a callable ``meta -> bool``; or a dict: every key must match (a list value means any of them)."""
    if filter is None:
        return None
    if callable(filter):
        return filter
    if isinstance(filter, Mapping):
        if not filter:
            return None
        items = list(filter.items())
        return lambda meta: all(_value_matches(meta.get(k), v) for k, v in items)
    raise TypeError(f"filter must be a dict, a callable or None, got {type(filter).__name__}")


def parse_filters(specs: Iterable[str] | None) -> dict[str, Any] | None:
    """``["label=animals", "split=test", "label=plants"]`` → ``{"label": ["animals", "plants"], "split": "test"}``."""
    out: dict[str, Any] = {}
    for spec in specs or []:
        key, sep, value = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RetrievalError(f"--filter expects key=value, got {spec!r}")
        if key in out:
            prev = out[key]
            out[key] = (prev if isinstance(prev, list) else [prev]) + [value]
        else:
            out[key] = value
    return out or None
