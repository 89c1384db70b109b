"""The config's typed dataclasses: one per section (model, towers, tasks, data, train, log, multitask), with the
defaults and a comment on each field saying what it does."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass
class TowerConfig:
    """One modality's tower: encoder ``kind`` + projection into the shared space.

    image kinds: ``open_clip`` (vision tower of an open_clip model config), ``cnn`` (small conv net),
    ``timm`` (any timm model by ``name``), ``efficientnet_lite0`` (the packaged ImageNet weights).
    text kinds: ``open_clip`` (text transformer, BPE), ``lstm`` / ``gru`` (over BPE ids), ``hf`` (a local Hugging Face
    encoder folder with mean pooling; ``name: minilm`` = the packaged all-MiniLM-L6-v2).
    """

    kind: str
    name: str | None = None
    pretrained: str | None = None  # local weights file/folder, or "package" for weights shipped in a pip package
    freeze: bool = False  # freeze the encoder (projection stays trainable); frozen encoders run in eval mode
    # train only the encoder's last k blocks (hf: transformer layers; efficientnet_lite0 / timm EfficientNets:
    # inverted-residual blocks, with conv_head + bn2 after them); the rest stays frozen, in eval mode, without grad.
    # Needs freeze: false. null: every block trains (or none, with freeze: true). A partly trained tower is not cached
    train_blocks: int | None = None
    # none: the encoder's features ARE the embedding (its width must equal model.embed_dim), e.g. an open_clip tower
    # that already projects, whose pretrained alignment a random Linear would break
    projection: Literal["linear", "mlp", "none"] = "linear"
    # dropout on the encoder's features as they enter the projection, while training (0: none): a regulariser for
    # projections learnt on frozen features of few pairs
    projection_dropout: float = 0.0
    # recompute activations in backward instead of storing them (less memory, ~1 more forward); trainable towers only
    grad_checkpointing: bool = False
    image_size: int = 224
    context_length: int = 32
    augment: bool = True  # random resized crop + horizontal flip for training images
    options: dict[str, Any] = field(default_factory=dict)  # kind-specific encoder arguments


@dataclass
class TaskConfig:
    """A task head on the shared space, trained by ``xmodal finetune``.

    kinds: ``classification`` (one class per row), ``multilabel`` (``target`` holds ``|``-separated class names),
    ``regression`` (a numeric score, e.g. sentiment in [-1, 1]), ``retrieval`` (contrastive, between the first two
    ``modalities``, as in pretraining).
    """

    kind: Literal["classification", "multilabel", "regression", "retrieval"]
    train: str | None = None  # manifest; default: data.train
    eval: str | None = None  # manifest; default: this task's train manifest
    train_split: str | None = "train"
    eval_split: str | None = "test"
    modalities: list[str] = field(default_factory=lambda: ["image"])  # inputs of the head (fused when several)
    target: str = "label"  # column holding the class name(s) or score
    classes: list[str] | None = None  # default: the sorted distinct values of the train split
    # late: one head per modality, outputs averaged; late_prob: their class probabilities averaged (single-label)
    fusion: Literal["concat", "sum", "product", "gated", "attention", "late", "late_prob"] = "concat"
    hidden: int | None = None  # hidden width of an MLP head; None = linear head (a linear probe when towers are frozen)
    dropout: float = 0.0
    loss: Literal["default", "mse", "l1", "huber"] = "default"  # regression loss; default mse
    threshold: float = 0.5  # multilabel: a class is predicted when its sigmoid probability exceeds this
    weight: float = 1.0  # static loss weight
    max_rows: int | None = None
    modality_dropout: float = 0.0  # training: hide each of a row's modalities with this probability (>= 1 kept)


@dataclass
class MultitaskConfig:
    sampling: Literal["proportional", "round_robin", "temperature"] = "proportional"
    temperature: float = 2.0  # for sampling: temperature, p_i ∝ n_i^(1/T)
    weighting: Literal["static", "uncertainty", "pcgrad", "gradnorm"] = "static"
    tasks_per_step: Literal["one", "all"] = "one"  # "all" is required by pcgrad and gradnorm
    gradnorm_alpha: float = 1.5  # GradNorm's restoring-force strength α (the paper's default); 0 = equal norms


@dataclass
class PretrainedConfig:
    """A pretrained image-text model to start from, resolved into model.towers by xmodal.modalities.pretrained."""
    library: Literal["open_clip", "transformers"]
    name: str
    weights: str | None = None
    freeze: list[str] = field(default_factory=list)  # towers to lock: [image] is LiT (locked image, tuned text)
    augment: bool = False  # random crops + flips of training images (off: a locked image tower's features cached)


@dataclass
class PairMemoryConfig:
    """Queries borrow the place of their nearest training pairs, found by the frozen towers (xmodal/pair_memory.py):
    each embedding moves ``weight`` of the way towards the mean embedding of the partners (the pair's other
    modalities) of its ``k`` most similar training pairs (similarity ** ``power`` weights). Needs frozen towers; at
    most ``max_rows`` pairs (a seeded sample of the training pairs beyond that; from shards, the first samples of
    every shard), saved with the model (float16 features: N × the towers' feature widths × 2 B; float32 partners:
    N × embed_dim × 4 B per tower; a whitened tower's D × D float32 matrix)."""
    k: int = 8
    power: float = 5.0  # 3 / 0.3 until 2026-12-06: 5 / 0.4 chosen on both corpora's val splits (results.md)
    weight: float = 0.4
    max_rows: int = 20000
    # modalities whose neighbours are found in whitened features (the memory's pairs fit the whitening); for a
    # classifier's features such as an ImageNet CNN's — configs/pretrain.yaml whitens `image` (results.md, "Levers")
    whiten: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    pretrained: PretrainedConfig | None = None  # fills towers, embed_dim, loss, temperature (docs/pretrained.md)
    embed_dim: int = 256
    towers: dict[str, TowerConfig] = field(default_factory=dict)
    loss: Literal["clip", "siglip"] = "clip"
    init_logit_scale: float | None = None  # log-space; default log(1/0.07) for clip, log(10) for siglip
    init_logit_bias: float | None = None  # siglip only; default -10
    max_logit_scale: float = 100.0  # clamp exp(logit_scale) to [1, max] as open_clip does
    # CLIP loss only: each row's target puts 1 - ε on its pair and ε spread over the batch (Szegedy et al. 2016)
    label_smoothing: float = 0.0
    anchor: str | None = None  # bind every modality to this one (ImageBind); None: every pair of modalities
    # Matryoshka (Kusupati et al. 2022): also train these prefixes of the embedding as embeddings of their own
    # (e.g. [32, 64, 128]; the full embed_dim is always trained too); encode(..., dim=64) then truncates usefully
    matryoshka_dims: list[int] = field(default_factory=list)
    pair_memory: PairMemoryConfig | None = None  # null: off (docs/configs.md, "Pair memory")
    # modules that register modalities or tower kinds (xmodal.modalities.register_modality), imported before the
    # model is built; saved in the model card, so every command on the run imports them again (docs/modalities.md)
    plugins: list[str] = field(default_factory=list)


@dataclass
class DataConfig:
    train: str | None = None  # manifest path (CSV, JSONL, Parquet or a saved HF dataset folder)
    eval: str | None = None  # defaults to the train manifest when eval_split is set
    train_split: str | None = None  # keep rows whose `split` column equals this
    eval_split: str | None = None
    root: str | None = None  # base for relative paths; default: the manifest's folder
    num_workers: int = 0
    on_bad_row: Literal["error", "skip"] = "error"
    max_rows: int | None = None  # cap rows per split (quick runs)
    # Image/audio paths must lie inside the data root (root, else the manifest's folder); true also accepts `..`,
    # absolute paths and symlinks leading out of it (a manifest you trust that points at files elsewhere).
    allow_outside_root: bool = True  # a training manifest is the user's own; false confines it (docs/data.md)
    shards: str | list[str] | None = None  # tar (brace-expanded, pipe:, URLs) or .parquet shards: docs/data.md
    hf_dataset: str | None = None  # streamed with Hugging Face datasets: a folder, a builder ("json") or a hub id
    hf_config: str | None = None  # the dataset's config name, if it has several
    hf_split: str = "train"
    hf_data_files: str | list[str] | None = None  # data files for hf_dataset (e.g. hf_dataset: parquet)
    shard_sizes: str | None = None  # open_clip's sizes.json ({"00000.tar": n}); default: the one beside the shards
    columns: dict[str, str] = field(default_factory=dict)  # column -> members: "jpg;png", "json:caption"
    resampled: bool = False  # draw shards with replacement (open_clip's --dataset-resampled); train.samples_per_epoch
    shuffle_block: int = 1000  # samples shuffled together in one (rank, worker)'s slice (raw bytes in memory)
    max_bad_fraction: float = 0.01  # bad samples (undecodable, missing member) skipped per epoch before a stop
    record_ids: bool = False  # each rank appends every batch's sample ids to <output_dir>/ids/rank<R>.jsonl
    # Model selection (train.select_best): the manifest's rows with this split value; when it has none, a seeded
    # slice of the training rows (holdout_fraction of them, at most holdout_max; rows sharing an image or a caption
    # stay on one side) is held out instead
    val_split: str = "val"
    holdout_fraction: float = 0.1
    holdout_max: int = 1000

    @property
    def streamed(self) -> bool:
        """Training streams (tar/Parquet shards or a Hugging Face streaming dataset) instead of reading a manifest."""
        return self.shards is not None or self.hf_dataset is not None


@dataclass
class TrainConfig:
    batch_size: int = 64  # micro-batch per process
    grad_accum_steps: int = 1  # micro-batches per optimiser step, joined into ONE contrastive loss (GradCache)
    epochs: int = 1
    max_steps: int | None = None  # optimiser steps; overrides epochs when set
    samples_per_epoch: int | None = None  # with data.resampled: the samples one epoch draws over all processes
    lr: float = 1e-3
    encoder_lr: float | None = None  # lr for unfrozen encoders; default lr
    # layer-wise LR decay: an encoder block d blocks below the top one trains at encoder_lr * layer_lr_decay**d (the
    # top block and what follows it: d = 0; embeddings / stem: below the lowest block). 1: one lr for the encoder
    layer_lr_decay: float = 1.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 50
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    freeze_towers: bool | None = None  # override every tower's `freeze` (true: linear probe; false: full fine-tune)
    freeze_projections: bool = False  # also freeze the projections: heads learn on the fixed shared space
    unfreeze_at_step: int = 0  # > 0: towers start frozen and are unfrozen at this optimiser step
    cache_frozen: bool = True  # embed frozen, non-augmented towers' inputs once (exact; see feature_cache.py)
    # where cached features live on disk, reused by later runs and commands: a folder; null (or true) =
    # $XMODAL_CACHE, else ~/.cache/xmodal/features; off (false) = in memory, for this run only (docs/data.md)
    feature_cache_dir: str | bool | None = None
    local_loss: bool = False
    gather_with_grad: bool = True
    log_every: int = 10
    eval_every: int = 0  # steps; 0 = only at the end
    # pretraining: evaluate on the validation rows (data.val_split, or a held-out slice) every eval_every steps and
    # save the best step's weights as the model, not the last step's (docs/configs.md, "Model selection")
    select_best: bool = False
    select_metric: Literal["R@1", "rsum", "R@10"] = "R@1"  # mean over both directions; rsum: of R@1, R@5, R@10
    save_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    deterministic: bool = False
    on_nonfinite: Literal["skip", "stop"] = "skip"  # a NaN/inf loss or gradient: skip that step, or stop the run
    max_nonfinite_skips: int = 10  # consecutive skipped steps after which the run stops anyway
    progress: bool = True
    stop_grace_s: float = 120.0  # after SIGINT/SIGTERM: the most seconds to finish the step and save a checkpoint


@dataclass
class LogConfig:
    backend: Literal["wandb", "tensorboard", "none"] = "wandb"
    project: str = "xmodal"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"


@dataclass
class Config:
    output_dir: str = "runs/xmodal"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    init_from: str | None = None  # the pretrained model fine-tuning starts from: a run folder, an export, hf-hub:
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    multitask: MultitaskConfig = field(default_factory=MultitaskConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj
