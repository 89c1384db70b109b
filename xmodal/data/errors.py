"""The manifest's error type, and its hints spelt as the caller's user sets the options."""
from __future__ import annotations

import re


class ManifestError(ValueError):
    """A manifest cannot be read, or one of its rows is unusable.

    The message always names the manifest file and, for a row problem, the 1-based data row number, the row's
    ``id`` and the field, e.g. ``data/train.csv: row 12 (id '0042'): field 'image': file not found: /data/x.png``.
    """


def name_options(message: str, on_bad_row: str, skip: str, allow: str | None = None) -> str:
    """A :class:`ManifestError` message with its hints spelt as the caller's user sets them, not as
    :func:`read_manifest`'s Python arguments: ``skip`` for ``on_bad_row='skip'`` (``--on-bad-row skip``,
    ``data.on_bad_row=skip``), ``allow`` for ``allow_outside_root=True`` (None: kept). A bad row met with
    ``on_bad_row="error"`` gets the ``skip`` hint on its first line."""
    if allow is not None:
        message = re.sub(r"allow_outside_root=True(?: \(data\.allow_outside_root: true\))?", allow, message)
    message = re.sub(r"on_bad_row=(['\"]?)skip\1", skip, message)
    first, nl, rest = message.partition("\n")
    if on_bad_row == "error" and skip not in message and re.search(r": row \d+\b", first):
        first += f" ({skip} drops bad rows)"
    return first + nl + rest
