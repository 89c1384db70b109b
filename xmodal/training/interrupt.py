"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (a cluster's preemption notice) without losing its steps.

While the loop runs, either signal only raises a flag: the step in flight finishes, every process agrees to stop at
the same step (the flag is all-reduced once per step, so a signal that reached one rank stops them all, none waiting
in a collective), the run saves a checkpoint at that step and raises :class:`TrainingInterrupted`, which the CLI
turns into one line naming the checkpoint and the command that resumes the run.

The time this takes is bounded: after ``train.stop_grace_s`` seconds (the step, an evaluation due at it, the save)
the process exits anyway, and a second signal exits at once. Either way no checkpoint is torn (saves are atomic):
resume takes the newest complete one.
"""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(Exception):
    """The run stopped on a signal after saving ``checkpoint`` at ``step``. ``exit_code``: 128 + the signal number,
    as a shell reports a process that a signal ended."""

    def __init__(self, signum: int, step: int, checkpoint: Path, main_process: bool, num_processes: int):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.main_process, self.num_processes = main_process, num_processes
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}; checkpoint saved: "
                         f"{checkpoint}")


def _say(text: str) -> None:
    """One line on stderr from a signal handler or timer thread: a raw write, no logging locks."""
    try:
        os.write(2, (text + "\n").encode())
    except OSError:
        pass


class StopSignals:
    """``with StopSignals(grace_s) as stop:`` SIGINT/SIGTERM set ``stop.signum`` instead of ending the process;
    :meth:`agreed` is the collective that tells every rank whether to stop. Outside the main thread (where Python
    cannot install handlers) the signals keep their usual behaviour."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.signum: int | None = None
        self._previous: dict = {}
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        if self._timer is not None:
            self._timer.cancel()

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:  # the user insists: stop now; the newest complete checkpoint stays
            _say(f"xmodal: second {name}: stopping now, without a checkpoint at this step")
            os._exit(128 + signum)
        self.signum = signum
        _say(f"xmodal: {name} received: finishing this step and saving a checkpoint "
             f"(at most {self.grace_s:g} s; send it again to stop at once)")
        self._timer = threading.Timer(self.grace_s, self._give_up, args=(signum,))
        self._timer.daemon = True
        self._timer.start()

    def _give_up(self, signum: int) -> None:
        _say(f"xmodal: the checkpoint after {signal.Signals(signum).name} did not finish within "
             f"{self.grace_s:g} s (train.stop_grace_s); stopping without it")
        os._exit(128 + signum)

    def agreed(self, accelerator) -> int | None:
        """The signal that stops every process at this step, or None. A collective when several processes run:
        every rank calls it once per step."""
        if accelerator.num_processes == 1:
            return self.signum
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None
