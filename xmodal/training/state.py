"""A training run's state: what :mod:`.build` makes, each step (:mod:`.step`) reads and advances, and a checkpoint
(:mod:`.resume`) saves — one object instead of closures over the loop's locals."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from ..config import Config, TaskConfig
from ..model import XModalModel
from .run_log import LossWindow, MetricsLog
from .sampling import TaskSampler


@dataclass
class TaskRun:
    """One task's training state: its config, data loader and position in its data."""
    name: str
    cfg: TaskConfig
    dataset: Any  # datasets.Dataset of the train split
    eval_data: Any = None
    select_data: Any = None  # the validation rows model selection scores (train.select_best; holdout.py)
    selection_rows: dict = field(default_factory=dict)  # what they are: a split, or rows held out of train
    loader: Any = None
    steps_per_epoch: int = 0
    epoch: int = 0
    batch: int = 0
    iterator: Iterator | None = None
    seen: dict = field(default_factory=dict)
    source: str | None = None  # the train manifest, and each train row's 1-based row in it: for row errors
    row_numbers: list[int] = field(default_factory=list)
    # a sharded task's per-batch hook (bad samples, ids, device), called with (batch, epoch, batch index)
    monitor: Callable[[dict, int, int], dict] | None = None

    def next_batch(self, accelerator) -> dict:
        if self.iterator is None:
            self.iterator = self._batches(accelerator)
        return next(self.iterator)

    def _batches(self, accelerator) -> Iterator[dict]:
        """Endless batches from the saved position; ``epoch``/``batch`` always name the next batch."""
        while True:
            if hasattr(self.loader, "set_position"):  # a shard stream: it starts where the position says
                self.loader.set_position(self.epoch, self.batch)
                batches = self.loader
            else:
                self.loader.set_epoch(self.epoch)
                # the dataset's epoch seeds its random transforms (loader.py); Accelerate passes the epoch on to it
                # only where no sharded batch sampler (several processes) stands between
                if hasattr(self.loader.dataset, "set_epoch"):
                    self.loader.dataset.set_epoch(self.epoch)
                batches = accelerator.skip_first_batches(self.loader, self.batch) if self.batch else self.loader
            for batch in batches:
                if self.monitor is not None:
                    batch = self.monitor(batch, self.epoch, self.batch)
                self.batch += 1
                if self.batch == self.steps_per_epoch:
                    self.epoch, self.batch = self.epoch + 1, 0
                yield batch


@dataclass
class RunState:
    """Everything the loop and its steps use. ``model`` is what Accelerate prepared (forward and backward go through
    its DDP/FSDP wrapper); ``unwrapped`` the :class:`XModalModel` inside (heads, temperature, saving)."""
    cfg: Config
    out_dir: Path
    accelerator: Any
    model: nn.Module
    unwrapped: XModalModel
    tasks: dict[str, TaskRun]
    weighting: nn.Module  # combines the tasks' losses: static, uncertainty or GradNorm weights
    optimizer: Any
    scheduler: Any  # stepped once per optimiser step, skipped steps included
    sampler: TaskSampler  # the task of each step when multitask.tasks_per_step is "one"
    loss_fn: nn.Module  # the two-modality contrastive loss (CLIP or SigLIP)
    loss_window: LossWindow
    metrics: MetricsLog
    total: int  # optimiser steps of the whole run
    epoch_steps: int  # optimiser steps of one epoch (of every task, or of the longest with every task per step)
    samples_per_step: int  # rows per task and step, over all processes
    step: int = 0  # optimiser steps done
    skipped: int = 0  # steps skipped as non-finite, in all and in a row
    skipped_in_row: int = 0
    selection: Any = None  # a selection.Selection when train.select_best: the best validated step so far
