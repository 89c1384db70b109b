"""When one process of a multi-process run fails, every process stops within a bounded time, and rank 0 says which
one failed and why.

Without this, a process that raised left the others waiting in their next collective (an all-reduce in the step,
a barrier in a checkpoint save or an evaluation) for the process group's default timeout, 30 minutes, and rank 0
then reported only its own symptom (a gloo "Connection closed by peer" or a timeout), not the cause. Now:

* every collective has a timeout of :func:`collective_timeout` (``XMODAL_COLLECTIVE_TIMEOUT_S``, default 600 s: a
  hung process stops the others after that long) — :func:`process_group_kwargs` for the Accelerator;
* a process whose training raises records its rank and error in ``<output_dir>/.failures/rank_N.json``, then
  leaves the process group (:func:`stop_peers`), so the others' pending collectives fail at once instead of at the
  timeout;
* rank 0, whatever it raised, waits a few seconds for those records and raises :class:`RunFailed` naming the
  failing rank, its error, its own symptom and the last good checkpoint (:func:`explain`); a rank that reported
  nothing by a collective timeout is named as hung or killed.

Checkpoints stay as the save protocol leaves them: a save interrupted on any rank never becomes a ``step_N``, so
the newest ``step_N`` is the last good one, and ``--resume`` continues from it.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import timedelta
from pathlib import Path

from ..atomic import write_text

TIMEOUT_ENV = "XMODAL_COLLECTIVE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
FOLDER = ".failures"
REPORT_WAIT_S = 10.0  # how long rank 0 waits for the failing rank's record (it is written before the rank leaves)
SILENT_WAIT_S = 3.0  # how long another rank whose collective timed out waits for the others' records


class RunFailed(RuntimeError):
    """A multi-process run stopped because one of its processes failed or hung (one line, for the CLI)."""


def collective_timeout() -> timedelta:
    return timedelta(seconds=float(os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S))


def process_group_kwargs():
    """The Accelerator's kwargs handler that sets the collectives' timeout."""
    from accelerate.utils import InitProcessGroupKwargs
    return InitProcessGroupKwargs(timeout=collective_timeout())


def world() -> tuple[int, int]:
    """``(rank, world size)`` as the launcher (``accelerate launch``, torchrun) sets them; ``(0, 1)`` alone."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def one_line(e: BaseException, limit: int = 1000) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


def symptom(e: BaseException) -> str:
    """What a rank saw when another one left: the first sentence of the collective's error (gloo appends advice)."""
    return one_line(e, 400).split(". ")[0]


def record(out_dir: str | os.PathLike, rank: int, e: BaseException) -> None:
    folder = Path(out_dir) / FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / f"rank_{rank}.json", json.dumps({"rank": rank, "error": one_line(e), "pid": os.getpid(),
                                                            "time": time.time()}), fsync=False)
    except OSError:  # a full or read-only disk: the peers' timeout still stops them, unnamed
        pass


@contextlib.contextmanager
def sigterm_deferred():
    """SIGTERM ignored while a failing rank writes its line. When one rank dies (SIGKILL, a crash), the launcher
    (torchrun) sends SIGTERM to the others at once — just as they start waiting for the failure records — and
    would end rank 0 before it says which rank failed; it sends SIGKILL 30 s later, so the wait stays bounded."""
    import signal
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_peers() -> None:
    """Leave the process group: the other ranks' pending collectives fail now rather than at the timeout."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - already broken: nothing more to undo
            pass


def _reports(out_dir: Path, since: float, me: int, world_size: int, wait_s: float = REPORT_WAIT_S) -> list[dict]:
    """Failure records of the other ranks written since ``since``, oldest first, waiting up to ``wait_s`` for one."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for rank in range(world_size):
            path = out_dir / FOLDER / f"rank_{rank}.json"
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if rank != me and rec.get("time", 0) >= since:
                found.append(rec)
        if found or time.monotonic() >= deadline:
            return sorted(found, key=lambda r: r["time"])
        time.sleep(0.2)


def _last_good(out_dir: Path) -> str:
    from .checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out_dir)
    return (f"last good checkpoint: {ckpt} (continue with --resume)" if ckpt is not None
            else "no checkpoint was saved yet")


def _timed_out(e: BaseException) -> bool:
    return "timed out" in str(e).lower() or "timeout" in str(e).lower()


# How gloo (and the OS under it) says that the process at the other end of a connection is gone
_PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe", "connection refused")


def silent_cause(e: BaseException, silent: list[int]) -> str | None:
    """Why ``e`` happened when the ranks ``silent`` recorded no failure: they stopped answering (a collective timed
    out: hung, or killed on another host) or their connection closed (the process is gone without a word: SIGKILL,
    the out-of-memory killer, a crash in C code). None when ``e`` is neither (a rank's own error)."""
    if not silent:
        return None
    who = "rank " + ", ".join(str(r) for r in silent)
    if _timed_out(e):
        return (f"no answer from {who} within {collective_timeout().total_seconds():g} s ({TIMEOUT_ENV}): "
                f"it hung or was killed")
    if any(p in str(e).lower() for p in _PEER_GONE):
        return f"{who} stopped without reporting an error: it was killed (SIGKILL, out of memory) or crashed"
    return None


def _silent(out_dir: Path, since: float, me: int, world_size: int, wait_s: float) -> list[int]:
    """The ranks other than ``me`` that recorded no failure since ``since`` (waiting up to ``wait_s`` for one)."""
    reported = {r["rank"] for r in _reports(out_dir, since, me, world_size, wait_s)}
    return [r for r in range(world_size) if r != me and r not in reported]


def explain(out_dir: str | os.PathLike, e: BaseException, since: float, failed_at: float, world_size: int) -> str:
    """Rank 0's one line: who failed first (rank 0 itself if it failed before any other rank recorded a failure)
    and how — a rank that recorded nothing is named as hung or killed — what rank 0 saw, and the checkpoint to
    resume from."""
    out_dir = Path(out_dir)
    others = _reports(out_dir, since, 0, world_size)
    last = _last_good(out_dir)
    if others and others[0]["time"] <= failed_at:
        first = others[0]
        return (f"rank {first['rank']} failed: {first['error']}; every process stopped (rank 0 saw "
                f"{symptom(e)}); {last}")
    reported = {r["rank"] for r in others}
    cause = silent_cause(e, [r for r in range(1, world_size) if r not in reported])
    if cause is not None:
        seen = f"({symptom(e)})" if _timed_out(e) else f"(rank 0 saw {symptom(e)})"
        return f"{cause}; every process stopped {seen}; {last}"
    return f"rank 0 failed: {one_line(e)}; every process stopped; {last}"


def other_rank_line(out_dir: str | os.PathLike, e: BaseException, rank: int, since: float, failed_at: float,
                    world_size: int) -> str:
    """A rank other than 0: its own error, or — when another rank failed before it — that it stopped because of
    that one (rank 0 names the cause for the whole run). When the others recorded nothing and this rank's
    collective timed out or lost its peer, it names the silent ranks itself (rank 0 among them: hung or killed,
    rank 0 cannot)."""
    out_dir = Path(out_dir)
    earlier = [r for r in _reports(out_dir, since, rank, world_size, wait_s=0) if r["time"] <= failed_at]
    if earlier:
        return f"rank {rank} stopped: rank {earlier[0]['rank']} failed ({symptom(e)}); see rank 0's message"
    if silent_cause(e, [0]) is not None:  # a timeout or a lost peer: give the others a moment to record theirs
        cause = silent_cause(e, _silent(out_dir, since, rank, world_size, wait_s=SILENT_WAIT_S))
        if cause is not None:
            return f"rank {rank} stopped: {cause} (rank {rank} saw {symptom(e)}); {_last_good(out_dir)}"
    return f"rank {rank} failed: {one_line(e)}"
