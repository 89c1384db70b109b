"""Tests that need something scripts/bootstrap.sh installs — Debian packages (chromium, chromium-driver, the data
packages, espeak-ng, flite), the pip dev/assets extras, scattertext, the venv's `accelerate` launcher — skip without
it on a developer's machine, but FAIL in CI (`CI` set, as CI runners do: CI=true), where `.ci/run` ran bootstrap
first: there a missing tool is a broken setup, and a skip would hide the untested claim.

Environment limits that bootstrap cannot change (root ignoring file permissions, no right to mount a tmpfs) still
skip everywhere (tests/test_save_faults.py).
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(what: str, allow_module_level: bool = False) -> NoReturn:
    """Skip (outside CI) or fail (in CI) the current test: ``what`` is missing."""
    if IN_CI:
        pytest.fail(f"{what}; in CI (CI={os.environ.get('CI')}) this test must run: scripts/bootstrap.sh installs it",
                    pytrace=False)
    pytest.skip(what, allow_module_level=allow_module_level)


def importorskip(module: str, install: str):
    """``pytest.importorskip`` that fails in CI. ``install``: how to get the module (shown in the message)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing(f"{module} cannot be imported ({e}): {install}", allow_module_level=True)


def needs(present: bool, what: str):
    """Decorator for a test that needs something: unchanged when ``present``, else skipped outside CI and failing in
    CI, naming ``what`` (e.g. "apt-get install flite")."""
    def decorate(test):
        if present:
            return test
        if not IN_CI:
            return pytest.mark.skip(reason=what)(test)

        @functools.wraps(test)
        def fail(*args, **kwargs):
            missing(what)
        return fail
    return decorate


def accelerate_launcher(python: str):
    """The `accelerate` launcher next to the running interpreter (the venv's; a dependency of xmodal)."""
    from pathlib import Path
    launcher = Path(python).with_name("accelerate")
    if not launcher.exists():
        missing(f"no accelerate launcher next to {python} (pip install -e .[dev] installs it)")
    return launcher
