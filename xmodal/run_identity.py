"""Which run a run folder, a checkpoint or a model belongs to: a run id, so that files copied in from another run
are told apart even though each passes its own manifest.

A checkpoint's ``manifest.json`` proves that its files are the ones saved together, and a model card that the
weights are the ones it describes — but a whole checkpoint folder (or model folder) copied from another run folder
passes both. So a training run, when it starts afresh, writes ``run.json`` into its folder (``{"id": a random
hex id, "created": time}``); every checkpoint's manifest and the model card record ``{"id", "folder"}`` (the run
id and the folder the run was saved in, to say where a stray file came from). ``--resume`` refuses a checkpoint,
and loading refuses a model, whose recorded id differs from the folder's ``run.json``. Folders and files written
before run ids existed carry none and are not checked (a resumed older run gets a ``run.json`` for what it saves
from then on).
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from .atomic import write_text

RUN_FILE = "run.json"


def read_run_id(folder: str | os.PathLike) -> str | None:
    """The run id in ``folder``'s ``run.json``; None where there is none (an older run, a plain model folder) or it
    cannot be read (a damaged ``run.json`` disables the check rather than blocking the run)."""
    try:
        run_id = json.loads((Path(folder) / RUN_FILE).read_text(encoding="utf-8")).get("id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) and run_id else None


def start_run(folder: str | os.PathLike, fresh: bool, recorded: Any = None) -> str:
    """The run id of the run training in ``folder``: a new one for a fresh run (``run.json`` written, replacing a
    previous attempt's that left no checkpoint), else the folder's. A resumed folder without ``run.json`` takes
    the id ``recorded`` in the checkpoint it resumes from (``run.json`` lost or not copied: the run keeps its
    identity) or, for a run older than run ids, a new one for what it saves from then on."""
    folder = Path(folder)
    existing = None if fresh else read_run_id(folder)
    if existing is not None:
        return existing
    adopted = recorded.get("id") if not fresh and isinstance(recorded, dict) else None
    run_id = adopted if isinstance(adopted, str) and adopted else uuid.uuid4().hex
    write_text(folder / RUN_FILE, json.dumps({"id": run_id, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
    return run_id


def run_record(folder: str | os.PathLike) -> dict[str, Any] | None:
    """``{"id", "folder"}`` to record in a checkpoint's manifest or a model card saved for the run in ``folder``;
    None where the folder has no run id."""
    run_id = read_run_id(folder)
    return None if run_id is None else {"id": run_id, "folder": str(Path(folder).resolve())}


def other_run(recorded: Any, folder: str | os.PathLike) -> str | None:
    """What is wrong when ``recorded`` (a manifest's or card's ``"run"``) names another run than ``folder``'s
    ``run.json`` — "comes from another run (run 3f2a…, saved in /x/run2), not this run folder's (run 9c1e… in
    /x/run1/run.json)" — or None when they agree or either is absent (written before run ids)."""
    mine = read_run_id(folder)
    if mine is None or not isinstance(recorded, dict) or not isinstance(recorded.get("id"), str):
        return None
    if recorded["id"] == mine:
        return None
    return (f"comes from another run (run {recorded['id'][:12]}…, saved in {recorded.get('folder', '?')}), not this "
            f"run folder's (run {mine[:12]}… in {Path(folder) / RUN_FILE})")
