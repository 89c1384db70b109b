"""Training: the one Accelerate loop for pretraining and fine-tuning, and what it keeps on disk.

* :mod:`.engine`: ``train(cfg, resume)``, the loop;
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
