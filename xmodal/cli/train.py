"""``xmodal pretrain`` and ``xmodal finetune``: train from a YAML config (the engine is :mod:`xmodal.training`)."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path


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
    from ..modalities.pretrained import resolve_pretrained
    from ..training.engine import train
    from ..training.interrupt import TrainingInterrupted

    cfg = load_config(args.config, args.overrides)
    cfg.model = resolve_pretrained(cfg.model)  # model.pretrained: the source's towers, before tasks read them
    # One config format for both verbs; the verb says which kind of run the user meant, so a mismatch is an error.
    if args.verb == "finetune" and not cfg.tasks:
        raise ConfigError(f"{args.config}: finetune needs a `tasks:` section (pretraining is `xmodal pretrain`)")
    if args.verb == "pretrain" and cfg.tasks:
        raise ConfigError(f"{args.config}: has `tasks:`; run it with `xmodal finetune`")
    try:
        run = _train_reporting_failures(train, cfg, args.resume)
    except TrainingInterrupted as e:  # SIGINT/SIGTERM in the loop: a checkpoint at the step it stopped
        if e.main_process:
            launcher = " (through the same launcher)" if e.num_processes > 1 else ""
            print(f"xmodal {args.verb}: {e}; resume with{launcher}: {resume_command(args)}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside the loop (reading data, building, the final save): nothing new
        from ..training.checkpoint import latest_checkpoint

        ckpt = latest_checkpoint(cfg.output_dir)
        saved = f"the newest checkpoint is {ckpt}" if ckpt is not None else "no checkpoint was saved"
        print(f"xmodal {args.verb}: interrupted outside the training loop; {saved}; resume with: "
              f"{resume_command(args)}", file=sys.stderr)
        return 130
    print(f"run folder: {run}")
    return 0


def resume_command(args) -> str:
    """The command line that started this run, with ``--resume``: ``xmodal VERB ...`` (``python train.py VERB ...``
    when it came through train.py)."""
    argv = list(getattr(args, "argv", None) or [args.verb, "--config", args.config, *args.overrides])
    prog = "python train.py" if Path(sys.argv[0]).name == "train.py" else "xmodal"
    return " ".join([prog, shlex.join(argv)] + ([] if "--resume" in argv else ["--resume"]))


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
        from ..training.interrupt import TrainingInterrupted

        if world_size <= 1 or isinstance(e, TrainingInterrupted):  # a signal is a stop every rank agreed on
            raise
        failed_at = time.time()
        with failures.sigterm_deferred():  # the launcher's SIGTERM must not cut the line short
            failures.record(cfg.output_dir, rank, e)
            failures.stop_peers()
            if rank != 0:
                line = failures.other_rank_line(cfg.output_dir, e, rank, started, failed_at, world_size)
            else:
                line = failures.explain(cfg.output_dir, e, started, failed_at, world_size)
        raise failures.RunFailed(line) from e
