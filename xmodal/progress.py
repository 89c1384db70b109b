"""Progress bars that suit where the output goes: a live tqdm bar on a terminal (or a notebook), and on anything
else — a log file, ``nohup``, a CI job, a cluster's job output — one plain line every ``NON_TTY_INTERVAL_S`` seconds
and at the end.

Without a terminal tqdm still redraws its bar with ``\\r`` several times a second; a file keeps every redraw, so
an hour of training became one line of hundreds of kilobytes. Here each redraw is a line of its own, and few.

The bottom layer of xmodal (it imports nothing from the package).
"""
from __future__ import annotations

import sys
from typing import Any

NON_TTY_INTERVAL_S = 30.0


class _Lines:
    """A text stream for tqdm that turns each ``\\r`` redraw into one line (ANSI cursor moves dropped)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        text = s.replace("\x1b[A", "").strip("\r\n ")
        if text:
            self.stream.write(text.split("\r")[-1].rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _interactive(stream) -> bool:
    if "ipykernel" in sys.modules:  # a notebook: tqdm.auto draws a widget there
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def tqdm(iterable: Any = None, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)`` on a terminal; elsewhere a tqdm writing a plain line at most every
    ``NON_TTY_INTERVAL_S`` seconds (and once at the end) to the same stream."""
    from tqdm.auto import tqdm as auto_tqdm

    stream = kwargs.get("file") or sys.stderr
    if kwargs.get("disable") or _interactive(stream):
        return auto_tqdm(iterable, **kwargs)
    from tqdm import tqdm as plain_tqdm

    kwargs.pop("dynamic_ncols", None)
    kwargs.update(file=_Lines(stream), mininterval=NON_TTY_INTERVAL_S, maxinterval=NON_TTY_INTERVAL_S,
                  ncols=100, ascii=True)
    return plain_tqdm(iterable, **kwargs)
