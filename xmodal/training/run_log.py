"""What a run records as it trains: ``metrics.jsonl`` (one JSON object per record, main process only) and, for
each record, every task's mean loss over the steps since the previous one."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import write_text
from .run_folder import METRICS_NAME


class MetricsLog:
    """Append-only JSON lines (``metrics.jsonl``) on the main process; one object per record. A resumed run first
    drops the records a crashed launch wrote after its checkpoint (:meth:`drop_after`): it writes them again."""

    NAME = METRICS_NAME

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def drop_after(self, step: int, drop_eval_at_step: bool = False) -> int:
        """Rewrite the file (atomically) without the records of steps after ``step`` — and, with
        ``drop_eval_at_step``, without the evaluation records at ``step`` — and without a torn last line (a kill
        in mid-write). Returns how many lines were dropped."""
        if not self.enabled or not self.path.is_file():
            return 0
        text = self.path.read_text(encoding="utf-8")
        kept, dropped = [], 0
        for line in text.splitlines():
            try:
                record = json.loads(line)
                at = int(record["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            evaluation = any(k.startswith(("eval/", "val/", "selection/")) for k in record)  # redone at the end
            if at > step or (drop_eval_at_step and at == step and evaluation):
                dropped += 1
            else:
                kept.append(line + "\n")
        if dropped or not text.endswith("\n"):
            write_text(self.path, "".join(kept))
        return dropped


class LossWindow:
    """Each task's loss summed over the optimiser steps since the last record, so that a record holds, for every
    task that had steps in its window, the mean over them (with sampled tasks, not only the task of the logged step).
    Steps skipped as non-finite are left out: they have records of their own.

    The sums stay on the device (no host sync per step). :meth:`means` and :meth:`state` average them over processes
    (per-rank losses differ with local_loss): collectives, so every rank calls them at the same step. ``state`` goes
    into each checkpoint, so a resumed run logs the same means as an uninterrupted one."""

    def __init__(self, tasks, device):
        self.index = {n: i for i, n in enumerate(tasks)}
        self.sums = torch.zeros(len(self.index), device=device)
        self.counts = [0] * len(self.index)

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for n, v in losses.items():
            self.sums[self.index[n]] += v.detach().float()
            self.counts[self.index[n]] += 1

    def _sums(self, accelerator) -> list[float]:
        return accelerator.reduce(self.sums, "mean").tolist()

    def means(self, accelerator) -> dict[str, float]:
        """``{task: mean loss}`` over the window (tasks without steps in it left out); starts the next window."""
        sums = self._sums(accelerator)
        out = {n: sums[i] / self.counts[i] for n, i in self.index.items() if self.counts[i]}
        self.sums.zero_()
        self.counts = [0] * len(self.index)
        return out

    def state(self, accelerator) -> dict[str, list]:
        sums = self._sums(accelerator)
        return {n: [sums[i], self.counts[i]] for n, i in self.index.items() if self.counts[i]}

    def load(self, state: dict[str, list]) -> None:
        """Every rank takes the process-mean sums: the next mean over processes adds only the new steps' spread."""
        for n, (total, count) in state.items():
            if n in self.index:
                self.sums[self.index[n]], self.counts[self.index[n]] = total, count
