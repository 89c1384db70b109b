"""Which task each multi-task step trains on: proportional, temperature or round-robin sampling, exactly resumable.

Temperature sampling draws task i with ``p_i ∝ n_i^(1/T)`` (``n_i`` its training-set size): ``T = 1`` is
proportional sampling, ``T → ∞`` uniform, values in between up-weight small tasks — the convention of multilingual
BERT's language sampling (there written ``α = 1/T``) and of T5 (Raffel et al. 2020, "Exploring the Limits of
Transfer Learning with a Unified Text-to-Text Transformer", https://arxiv.org/abs/1910.10683, §3.5.2).
Round-robin cycles through the tasks in the order of ``sizes``.

The i-th draw is a pure function of ``(seed, i)``: draws come in blocks of :data:`BLOCK`, block b from a generator
seeded with ``(seed, b)``. The state is therefore just the position, and a sampler restored from ``state_dict()``
(or built with ``position=``) continues the interrupted sequence exactly.
"""
from __future__ import annotations

import math

import numpy as np

BLOCK = 4096


class TaskSampler:
    """Infinite iterator of task names. ``sizes``: ``{task: number of training examples}``."""

    def __init__(self, sizes: dict[str, int], strategy: str = "proportional", temperature: float = 1.0,
                 seed: int = 0, position: int = 0):
        if not sizes:
            raise ValueError("TaskSampler: no tasks")
        bad = {t: n for t, n in sizes.items() if not n > 0}
        if bad:
            raise ValueError(f"TaskSampler: task sizes must be positive, got {bad}")
        if strategy not in ("proportional", "round_robin", "temperature"):
            raise ValueError(f"TaskSampler: unknown strategy {strategy!r}: expected 'proportional', 'round_robin' "
                             "or 'temperature'")
        if not temperature > 0:
            raise ValueError(f"TaskSampler: temperature must be > 0 (math.inf = uniform), got {temperature}")
        self.tasks = list(sizes)
        self.sizes = dict(sizes)
        self.strategy, self.temperature, self.seed = strategy, float(temperature), int(seed)
        self.position = int(position)
        self._p = np.array([self.probabilities()[t] for t in self.tasks])
        self._block: tuple[int, np.ndarray] | None = None

    def probabilities(self) -> dict[str, float]:
        """The probability of each task per draw (round-robin: its long-run frequency, 1/k)."""
        if self.strategy == "round_robin":
            return {t: 1.0 / len(self.tasks) for t in self.tasks}
        inv_t = 1.0 if self.strategy == "proportional" else (0.0 if math.isinf(self.temperature)
                                                             else 1.0 / self.temperature)
        # Normalise sizes first so n^(1/T) cannot overflow for large corpora and small T.
        n = np.array([self.sizes[t] for t in self.tasks], dtype=np.float64)
        w = (n / n.max()) ** inv_t
        w = w / w.sum()
        return {t: float(p) for t, p in zip(self.tasks, w)}

    def task_at(self, i: int) -> str:
        """The task of draw ``i`` (0-based), whatever the current position."""
        if self.strategy == "round_robin":
            return self.tasks[i % len(self.tasks)]
        b = i // BLOCK
        if self._block is None or self._block[0] != b:
            rng = np.random.default_rng([self.seed, b])
            self._block = (b, rng.choice(len(self.tasks), size=BLOCK, p=self._p))
        return self.tasks[int(self._block[1][i % BLOCK])]

    def __iter__(self) -> "TaskSampler":
        return self

    def __next__(self) -> str:
        task = self.task_at(self.position)
        self.position += 1
        return task

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "strategy": self.strategy,
                "probabilities": self.probabilities()}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["position"]``; refuses a state saved with other tasks, sizes, strategy or seed."""
        mine = self.state_dict()
        for key in ("seed", "strategy", "probabilities"):
            if key in state and state[key] != mine[key]:
                raise ValueError(f"TaskSampler: saved {key} {state[key]!r} differs from this sampler's {mine[key]!r}")
        self.position = int(state["position"])
