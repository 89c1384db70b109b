"""``xmodal pretrain`` and ``xmodal finetune``: train from a YAML config (the engine is :mod:`xmodal.training`)."""
from __future__ import annotations


def add_train_verbs(sub) -> None:
    for verb, text in (("pretrain", "contrastive pretraining of the shared space"),
                       ("finetune", "train task heads (one or many tasks) on a pretrained shared space")):
        s = sub.add_parser(verb, help=text)
        s.add_argument("--config", required=True, help="YAML config (see configs/)")
        s.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
        s.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override config fields by dotted path")
        s.set_defaults(fn=run_train)


def run_train(args) -> int:
    from ..config import ConfigError, load_config
    from ..training.engine import train

    cfg = load_config(args.config, args.overrides)
    # One config format for both verbs; the verb says which kind of run the user meant, so a mismatch is an error.
    if args.verb == "finetune" and not cfg.tasks:
        raise ConfigError(f"{args.config}: finetune needs a `tasks:` section (pretraining is `xmodal pretrain`)")
    if args.verb == "pretrain" and cfg.tasks:
        raise ConfigError(f"{args.config}: has `tasks:`; run it with `xmodal finetune`")
    run = _train_reporting_failures(train, cfg, args.resume)
    print(f"run folder: {run}")
    return 0


def _train_reporting_failures(train, cfg, resume: bool):
    """``train``; on several processes, a failure on any rank stops them all and rank 0 names it (one line each:
    :mod:`xmodal.training.failures`)."""
    import time

    from ..training import failures

    rank, world_size = failures.world()
    started = time.time()
    try:
        return train(cfg, resume=resume)
    except Exception as e:  # not KeyboardInterrupt / SystemExit: interruption is the engine's to handle
        if world_size <= 1:
            raise
        failed_at = time.time()
        failures.record(cfg.output_dir, rank, e)
        failures.stop_peers()
        if rank != 0:
            raise failures.RunFailed(failures.other_rank_line(cfg.output_dir, e, rank, started, failed_at,
                                                              world_size)) from e
        raise failures.RunFailed(failures.explain(cfg.output_dir, e, started, failed_at, world_size)) from e
