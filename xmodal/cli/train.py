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
    from ..modalities.pretrained import resolve_pretrained
    from ..training.engine import train

    cfg = load_config(args.config, args.overrides)
    cfg.model = resolve_pretrained(cfg.model)  # model.pretrained: the source's towers, before tasks read them
    # One config format for both verbs; the verb says which kind of run the user meant, so a mismatch is an error.
    if args.verb == "finetune" and not cfg.tasks:
        raise ConfigError(f"{args.config}: finetune needs a `tasks:` section (pretraining is `xmodal pretrain`)")
    if args.verb == "pretrain" and cfg.tasks:
        raise ConfigError(f"{args.config}: has `tasks:`; run it with `xmodal finetune`")
    run = train(cfg, resume=args.resume)
    print(f"run folder: {run}")
    return 0
