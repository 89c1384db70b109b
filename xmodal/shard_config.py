"""Checks of the sharded-corpus fields of a config (``data.shards`` and its company, ``train.samples_per_epoch``),
called by :func:`xmodal.config.validate`; apart from it only to keep ``config.py`` small."""
from __future__ import annotations


def shard_problem(cfg) -> str | None:
    """What is wrong with the sharded-corpus fields, naming the field, or None when they agree."""
    d, n = cfg.data, cfg.train.samples_per_epoch
    bad_column = next((k for k, v in d.columns.items() if not all(p.strip() for p in v.split(";"))), None)
    for wrong, message in [
        (d.shards is not None and d.train is not None, "data.shards and data.train: give one training source"),
        (d.shards is not None and bool(cfg.tasks), "data.shards: sharded corpora train pretraining; fine-tuning "
                                                   "tasks read manifests (tasks.<name>.train)"),
        (d.resampled and d.shards is None, "data.resampled: applies to data.shards"),
        (d.resampled and n is None, "data.resampled: needs train.samples_per_epoch (no natural epoch)"),
        (n is not None and (n <= 0 or not d.resampled), f"train.samples_per_epoch: must be positive and goes "
                                                        f"with data.resampled: true, got {n}"),
        (d.shuffle_block < 1, f"data.shuffle_block: must be >= 1, got {d.shuffle_block}"),
        (not 0 <= d.max_bad_fraction < 1, f"data.max_bad_fraction: must be in [0, 1), got {d.max_bad_fraction}"),
        (bad_column is not None, f"data.columns.{bad_column}: expected member extensions such as 'jpg;png' or "
                                 f"'json:caption', got {d.columns.get(bad_column)!r}")]:
        if wrong:
            return message
    return None
