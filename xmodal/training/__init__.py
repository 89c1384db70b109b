"""Training: the one Accelerate loop for pretraining and fine-tuning, and what it keeps on disk.

Read it as build → step → loop:

* :mod:`.engine`: ``train(cfg, resume)``, the loop;
* :mod:`.build`: the run before its first step (Accelerator, model, loaders, optimiser), as a :mod:`.state`;
* :mod:`.step`: one optimiser step (losses, backward, clipping, non-finite check, update);
* :mod:`.report`: the log, metrics and evaluations; :mod:`.resume`: what a checkpoint saves and resume restores;
* :mod:`.task_data`: each task's rows, read and checked before the first step;
* :mod:`.sampling`: which task a step trains; :mod:`.gradcache`: exact big-batch contrastive steps;
* :mod:`.checkpoint`, :mod:`.run_folder`, :mod:`.run_log`: checkpoints, the run folder's guards, metrics.jsonl.
"""


def __getattr__(name):  # lazy: importing xmodal.training.checkpoint needs no accelerate
    if name == "train":
        from .engine import train
        return train
    raise AttributeError(f"module 'xmodal.training' has no attribute {name!r}")


__all__ = ["train"]
