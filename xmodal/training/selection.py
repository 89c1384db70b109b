"""Model selection (``train.select_best``): every ``train.eval_every`` steps and at the last step, retrieval on the
validation rows (:mod:`.holdout`) is scored, the best step's trainable weights are kept (in memory, and in each
checkpoint so a resumed run keeps them), and the model the run saves is that step's, not the last one's.

The score (``train.select_metric``): by default ``R@1``, the mean of R@1 over both retrieval directions — the
figure a user sees first (the top hit) and the one xmodal's defaults are judged by (issue #17). ``rsum``, the mean
of R@1, R@5 and R@10 (the criterion of VSE++, Faghri et al. 2018, and SCAN, Lee et al. 2018), is steadier on a
small slice but was measured to choose too early here: on held-out slices of Open Clip Art and OpenMoji, R@10 peaks
within the first fifth of the run while R@1 keeps rising to the end (docs/results.md, "Levers"), so rsum traded
R@1 for R@10. ``R@10`` can be chosen too. Ties keep the earlier step (less training, same held-out quality).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from ..model import XModalModel
from .checkpoint_files import frozen_keys
from .report import evaluate_and_log
from .state import RunState

log = logging.getLogger("xmodal")

BEST_WEIGHTS = "selection.safetensors"  # in a checkpoint folder: the best step's trainable weights
_CUTOFFS = {"rsum": ("R@1", "R@5", "R@10"), "R@1": ("R@1",), "R@10": ("R@10",)}


def selection_score(results: dict[str, float], metric: str) -> float:
    """The mean of the metric's recalls over every retrieval direction in ``results`` (``"text->image/R@1"``, ...;
    Matryoshka prefixes ``"text->image@64/..."`` are left out)."""
    keys = [k for k in results if "->" in k and "@" not in k.split("/")[0]
            and k.split("/")[-1] in _CUTOFFS[metric]]
    if not keys:
        raise ValueError(f"model selection: no retrieval recall in the validation results ({sorted(results)[:6]})")
    return sum(results[k] for k in keys) / len(keys)


class Selection:
    """The best step so far by ``metric`` on the validation rows, and its weights (every tensor of the model but
    the frozen encoders', which never change)."""

    def __init__(self, metric: str, rows: dict):
        self.metric, self.rows = metric, rows
        self.best_step: int | None = None
        self.best_score = -math.inf
        self.best_results: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] | None = None

    def consider(self, step: int, results: dict[str, float], model: XModalModel) -> bool:
        """Record step ``step``'s validation ``results``; keep its weights if it is the best so far."""
        score = selection_score(results, self.metric)
        if score <= self.best_score + 1e-9:  # recalls are counts over n: equal ones may differ in the last bit
            return False
        skip = set(frozen_keys(model))
        self.best_step, self.best_score, self.best_results = step, score, dict(results)
        self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k not in skip}
        return True

    def apply(self, model: XModalModel) -> None:
        """Load the best step's weights into ``model`` (every tensor the selection kept; the rest are frozen)."""
        if self.best_state is None:
            return
        missing, unexpected = model.load_state_dict(self.best_state, strict=False)
        if unexpected or set(missing) - set(frozen_keys(model)):
            raise RuntimeError(f"model selection: the kept weights do not fit the model (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")

    def summary(self, last_step: int) -> dict:
        """What the model card and the log say about the choice."""
        return {"metric": self.metric, "step": self.best_step, "of": last_step, "score": self.best_score,
                "validation": self.rows, "results": self.best_results}

    # ---- in a checkpoint: the scalars in position.json, the weights in their own safetensors file

    def state(self) -> dict:
        return {"metric": self.metric, "best_step": self.best_step, "best_score": self.best_score,
                "best_results": self.best_results}

    def save_weights(self, folder: Path) -> None:
        if self.best_state is not None:
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in self.best_state.items()}, str(folder / BEST_WEIGHTS))

    def load(self, saved: dict | None, folder: Path) -> None:
        """Restore the best-so-far from a checkpoint's position (``saved``) and weights file. A checkpoint saved
        before any validation step (or without selection) leaves it empty."""
        if not saved or saved.get("best_step") is None:
            return
        if saved.get("metric") != self.metric:
            log.warning("model selection: the checkpoint chose by %s, this run by %s: the best-so-far starts again",
                        saved.get("metric"), self.metric)
            return
        from safetensors.torch import load_file
        path = folder / BEST_WEIGHTS
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {folder}: position.json records a best step {saved['best_step']} "
                                    f"but {BEST_WEIGHTS} is missing; resume from an older checkpoint")
        self.best_step, self.best_score = int(saved["best_step"]), float(saved["best_score"])
        self.best_results = dict(saved.get("best_results") or {})
        self.best_state = load_file(str(path))


# ---------------------------------------------------------------------------------------------- in the loop

def record_validation_rows(run: RunState) -> None:
    """What the validation rows are (a split, or rows held out of train), in ``metrics.jsonl`` at step 0."""
    rows = run.selection.rows
    run.metrics.write({"step": 0, **{f"selection/{k}": v for k, v in rows.items()}})


def validate(run: RunState) -> None:
    """Retrieval on the validation rows at this step (logged as ``val/...``); its weights kept if the best so far.
    The main process evaluates and decides; the others keep no copy (only the main process saves)."""
    results = evaluate_and_log(run, split="val")
    if run.accelerator.is_main_process and results:
        if run.selection.consider(run.step, results, run.unwrapped):
            log.info("model selection: step %d is the best so far (%s %.4f)", run.step, run.selection.metric,
                     run.selection.best_score)


def choose_best(run: RunState) -> dict:
    """Put the best validated step's weights into the model (main process), say which step it was, and return the
    record for the model card."""
    sel = run.selection
    if run.accelerator.is_main_process:
        sel.apply(run.unwrapped)
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sel.best_results.items()
                          if "->" in k and k.split("/")[-1] in ("R@1", "R@10") and "@" not in k.split("/")[0])
        log.info("model selection: selected step %s of %d: val %s %.4f (%s)", sel.best_step, run.step, sel.metric,
                 sel.best_score, shown)
        run.metrics.write({"step": run.step, "selection/step": sel.best_step, "selection/score": sel.best_score})
    return sel.summary(run.step)
