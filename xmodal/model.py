"""The shared-space model: one ``Tower`` per modality, a learnable temperature (and SigLIP bias), ``encode()``.

Everything downstream of the towers sees ``{modality: Tensor[batch, embed_dim]}``, L2-normalised.
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .batch import FEATURES, MASK, batch_size, collate, dense
from .config import ConfigError, ModelConfig, TaskConfig, _from_dict
from ._scalar import accept_0d_scalars, scalar_parameter
from .feature_cache import CachedFeatures, precompute_features, reusing_features, tower_settings
from .modalities import load_plugins
from .modalities.registry import get_modality
from .modalities.pretrained import resolve_pretrained
from .modalities.towers import build_encoder, build_transform
from .pair_memory import PairMemory
from .model_files import CARD_NAME, WEIGHTS_NAME  # noqa: F401 - imported from here by the rest of xmodal

PREDICT_OUTPUTS = ("logits", "probs", "labels")  # what XModalModel.predict can return


def _projection(kind: str, feat_dim: int, embed_dim: int, where: str = "tower") -> nn.Module:
    if kind == "none":
        if feat_dim != embed_dim:
            raise ConfigError(f"{where}.projection: none needs the encoder's feature width ({feat_dim}) to equal "
                              f"model.embed_dim ({embed_dim}); set model.embed_dim: {feat_dim} or use projection "
                              f"linear / mlp")
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(feat_dim, embed_dim)
    # A 2-layer MLP head lets frozen pretrained features bend into the shared space (as in LiT / SimCLR heads).
    return nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.GELU(), nn.Linear(feat_dim, embed_dim))


class Tower(nn.Module):
    """encoder → projection → L2-normalise. A frozen encoder stays in eval mode and out of the optimiser.

    ``grad_checkpointing``: the encoder recomputes its activations in backward (``encoder.set_grad_checkpointing``),
    switched on only while the tower trains an unfrozen encoder -- eval and frozen forwards build no graph, so
    checkpointing would only cost time there."""

    def __init__(self, encoder: nn.Module, feat_dim: int, embed_dim: int, projection: str = "linear",
                 freeze: bool = False, grad_checkpointing: bool = False, where: str = "tower",
                 projection_dropout: float = 0.0, train_blocks: int | None = None, cache_prefix: bool = False):
        super().__init__()
        self.encoder = encoder
        self.projection = _projection(projection, feat_dim, embed_dim, where)
        # no parameters: the state dict (and every saved model) is the same with or without it
        self.feature_dropout = nn.Dropout(projection_dropout) if projection_dropout else nn.Identity()
        self.frozen = freeze
        self.grad_checkpointing = grad_checkpointing
        if grad_checkpointing:
            from .modalities.towers import grad_checkpointing_unsupported
            reason = grad_checkpointing_unsupported(encoder)
            if reason:
                raise ConfigError(f"{where}.grad_checkpointing: this tower's encoder cannot checkpoint ({reason}); "
                                  f"set {where}.grad_checkpointing: false")
        self._checkpointing = False  # what the encoder was last told
        # train_blocks: only these modules of the encoder train (its last blocks); the rest is frozen like a frozen
        # encoder (eval mode, no grad: with no parameter and no input needing grad, no activation is kept there)
        self.trainable: list[nn.Module] = []
        if freeze:
            self.encoder.requires_grad_(False)
        elif train_blocks is not None:
            from .modalities.blocks import trainable_part
            try:
                self.trainable = [m for _, m in trainable_part(encoder, train_blocks, where)]
            except ValueError as e:
                raise ConfigError(str(e)) from None
            self.encoder.requires_grad_(False)
            for m in self.trainable:
                m.requires_grad_(True)
        # cache_prefix: the frozen blocks' output per distinct input, computed once (modalities/blocks.py)
        self.prefix_cache = None
        if self.trainable and cache_prefix:
            from .modalities.blocks import PrefixCache, can_split
            if can_split(encoder):
                self.prefix_cache = PrefixCache(train_blocks)
                self.register_load_state_dict_post_hook(lambda module, keys: module.prefix_cache.clear())
        self.train(self.training)

    def train(self, mode: bool = True) -> "Tower":
        super().train(mode)
        if self.frozen:  # frozen BatchNorm statistics and no dropout, whatever the caller asks
            self.encoder.eval()
        elif self.trainable and mode:  # the frozen lower blocks as above; the trained top ones in train mode
            self.encoder.eval()
            for m in self.trainable:
                m.train(True)
        on = self.grad_checkpointing and mode and not self.frozen
        if on != self._checkpointing:
            self.encoder.set_grad_checkpointing(on)
            self._checkpointing = on
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                feats = self.encoder(x)
        elif self.prefix_cache is not None and self.training:  # training only: a served model's memory stays flat
            feats = self.prefix_cache.features(self.encoder, x)
        else:
            feats = self.encoder(x)
        return self.project(feats)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Encoder features → the shared space (used directly on cached features of a frozen encoder)."""
        return F.normalize(self.projection(self.feature_dropout(feats)).float(), dim=-1)


class XModalModel(nn.Module):
    """Towers into one shared space plus the contrastive temperature (``logit_scale``, log-space) and SigLIP bias."""

    def __init__(self, cfg: ModelConfig, tasks: dict[str, TaskConfig] | None = None):
        super().__init__()
        cfg = resolve_pretrained(cfg)  # model.pretrained → the source's towers (unchanged when already resolved)
        if not cfg.towers:
            raise ValueError("model.towers: at least one tower is required")
        self.cfg = cfg
        load_plugins(cfg.plugins)  # a model card names the modules its custom modalities come from
        towers, feat_dims = {}, {}
        for modality, tcfg in cfg.towers.items():
            encoder, feat_dim = build_encoder(modality, tcfg)
            feat_dims[modality] = feat_dim
            towers[modality] = Tower(encoder, feat_dim, cfg.embed_dim, tcfg.projection, tcfg.freeze,
                                     tcfg.grad_checkpointing, where=f"model.towers.{modality}",
                                     projection_dropout=tcfg.projection_dropout, train_blocks=tcfg.train_blocks,
                                     cache_prefix=not (get_modality(modality).augments and tcfg.augment))
        self.towers = nn.ModuleDict(towers)
        pm = cfg.pair_memory  # filled by training (training/build.py) or by the saved weights
        self.pair_memory = PairMemory(list(towers), feat_dims, cfg.embed_dim, pm.k, pm.power, pm.weight, pm.whiten) \
            if pm is not None else None
        siglip = cfg.loss == "siglip"
        init_scale = cfg.init_logit_scale if cfg.init_logit_scale is not None else (
            math.log(10.0) if siglip else math.log(1 / 0.07))  # the SigLIP and CLIP papers' initialisations
        self.logit_scale = scalar_parameter(init_scale)
        init_bias = cfg.init_logit_bias if cfg.init_logit_bias is not None else -10.0
        self.logit_bias = scalar_parameter(init_bias) if siglip else None
        self.register_load_state_dict_pre_hook(accept_0d_scalars)
        self._transforms: dict[tuple[str, bool], Any] = {}
        # Task heads (fine-tuning): retrieval tasks have none — they use the contrastive loss on the shared space.
        from .tasks.head import TaskHead
        self.tasks = dict(tasks or {})
        self.heads = nn.ModuleDict({name: TaskHead(t, cfg.embed_dim, name=name) for name, t in self.tasks.items()
                                    if t.kind != "retrieval"})

    # ------------------------------------------------------------------------------------------------ training API
    @property
    def modalities(self) -> list[str]:
        return list(self.towers.keys())

    def forward(self, batch: dict[str, torch.Tensor], task: str | None = None) -> dict[str, torch.Tensor]:
        """Embed every modality present in ``batch`` (only the rows that have it: ``"<m>:mask"`` passes through),
        and with ``task`` also run that task's head (``out["head"]``). The exponentiated temperature (and bias) ride
        along in the output so every trainable parameter is used inside ``forward`` — what DDP needs."""
        out: dict[str, torch.Tensor] = {}
        for key, x in batch.items():
            if not isinstance(x, torch.Tensor) or key.endswith(MASK):
                continue
            if key in self.towers:
                out[key] = self.towers[key](x)
            elif key.endswith(FEATURES) and key[: -len(FEATURES)] in self.towers:
                out[key[: -len(FEATURES)]] = self.towers[key[: -len(FEATURES)]].project(x)
            else:
                continue
            m = key.removesuffix(FEATURES)
            if m + MASK in batch:
                out[m + MASK] = batch[m + MASK]
        # 0-d for the losses, and not views of the parameters (FSDP2 warns of views returned by forward)
        out["logit_scale"] = self.logit_scale[0].exp()
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias.sum()
        if task is not None and task in self.heads:
            head = self.heads[task]
            feats, present = dense(out, head.modalities, batch_size(batch))
            out["head"] = head(feats, present)
        return out

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep exp(logit_scale) in [1, max_logit_scale], as open_clip clamps to [0, ln 100]."""
        self.logit_scale.clamp_(0.0, math.log(self.cfg.max_logit_scale))

    def transform(self, modality: str, train: bool = False):
        """The per-sample preprocessing of ``modality`` (cached). A partly trained tower that caches its frozen
        blocks' output also keeps each training input's preprocessed tensor (``MemoTransform``): it is all a step
        still decodes. Neither cache is used outside training (evaluation, encode, a server: memory stays flat)."""
        key = (modality, train)
        if key not in self._transforms:
            self._transforms[key] = build_transform(modality, self.cfg.towers[modality], train=train)
            if train and self.towers[modality].prefix_cache is not None:  # the training loader's, not a server's
                from .modalities.blocks import MemoTransform
                self._transforms[key] = MemoTransform(self._transforms[key])
        return self._transforms[key]

    # ------------------------------------------------------------------------------------------------- inference
    def embed_batch(self, modality: str, x: torch.Tensor, features: bool = False) -> torch.Tensor:
        """One preprocessed batch as :meth:`encode` embeds it: the tower, then the pair memory's move where it covers
        ``modality``. ``features=True``: ``x`` is already the encoder's output (the frozen-feature cache). What
        ``encode`` runs per batch and what an ONNX export traces, so the two cannot drift apart."""
        tower = self.towers[modality]
        memory = self.pair_memory
        if memory is None or not memory.covers(modality):
            return tower.project(x) if features else tower(x)
        feats = x if features else tower.encoder(x)  # the memory needs the encoder's features too
        return memory(modality, feats, tower.project(feats))

    @torch.inference_mode()
    def encode(self, modality: str, inputs: Sequence[Any] | torch.Tensor, batch_size: int = 64,
               progress: bool = False, dim: int | None = None) -> torch.Tensor:
        """Embed raw inputs of one modality: image paths or PIL images, strings, or an already-preprocessed tensor.

        Returns L2-normalised float32 ``[n, embed_dim]`` on the CPU; with ``dim``, the first ``dim`` coordinates
        renormalised, ``[n, dim]`` (meant for models trained with ``model.matryoshka_dims``).
        """
        if dim is not None and not (isinstance(dim, int) and 0 < dim <= self.cfg.embed_dim):
            raise ValueError(f"dim must be an integer between 1 and embed_dim ({self.cfg.embed_dim}), got {dim!r}")
        if modality not in self.towers:
            raise ValueError(f"no {modality!r} tower in this model (towers: {', '.join(self.towers)})")
        if isinstance(inputs, str):
            inputs = [inputs]
        was_training = self.training
        if was_training:  # switching modes walks every module: ~1 ms per call, most of a one-row query
            self.eval()
        device = next(self.parameters()).device
        out, order, tf = [], None, None
        try:
            if isinstance(inputs, torch.Tensor):
                chunks: Iterable = inputs.split(batch_size)
            else:
                inputs = list(inputs)
                if all(isinstance(x, str) for x in inputs):
                    # Similar lengths per batch (text encoders trim shared padding); undone after encoding.
                    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
                    inputs = [inputs[i] for i in order]
                tf = self._frozen_features(modality, inputs, batch_size, device) or self.transform(modality)
                chunks = (torch.stack([tf(x) for x in inputs[i:i + batch_size]])
                          for i in range(0, len(inputs), batch_size))
            if progress:
                from .progress import tqdm
                n = len(inputs)
                chunks = tqdm(chunks, total=math.ceil(n / batch_size), desc=f"encode {modality}", unit="batch")
            cached = isinstance(tf, CachedFeatures)
            if self.pair_memory is not None and self.pair_memory.covers(modality):
                self.pair_memory.refresh(self.towers)
            for x in chunks:
                out.append(self.embed_batch(modality, x.to(device), features=cached).float())
        finally:
            if was_training:
                self.train()
        if not out:
            return torch.empty(0, dim or self.cfg.embed_dim)
        result = (out[0] if len(out) == 1 else torch.cat(out)).cpu()  # one device→host copy, not one per chunk
        if order is not None:
            result[torch.tensor(order)] = result.clone()
        if dim is not None and dim < result.shape[1]:
            result = torch.nn.functional.normalize(result[:, :dim], dim=-1)
        return result

    @torch.inference_mode()
    def predict(self, task: str, inputs: dict[str, Sequence[Any]], batch_size: int = 64,
                progress: bool = False, output: str = "logits") -> torch.Tensor | list:
        """A task head's outputs for rows given as ``{modality: [raw values]}`` (equal lengths; ``None`` or ``""``
        where a row lacks a modality — fusion uses what is there). ``output``: ``"logits"`` (default: the raw
        logits, or scores for regression, ``[N, ...]``), ``"probs"`` (``[N, classes]`` softmax, or sigmoid for
        multilabel; columns in the order of ``self.tasks[task].classes``) or ``"labels"`` (a list: each row's class
        name, its list of class names for multilabel, its score for regression)."""
        if task not in self.heads:
            raise ValueError(f"no task head {task!r} in this model (heads: {', '.join(self.heads) or 'none'})")
        if output not in PREDICT_OUTPUTS:
            raise ValueError(f"predict: output={output!r}: expected one of {', '.join(map(repr, PREDICT_OUTPUTS))}")
        head = self.heads[task]
        reads = ", ".join(head.modalities)
        unknown = [m for m in inputs if m not in self.towers]
        if unknown:
            raise ValueError(f"predict: no {unknown[0]!r} tower in this model (towers: {', '.join(self.towers)}; "
                             f"task {task!r} reads {reads})")
        inputs = {m: v for m, v in inputs.items() if m in head.modalities}  # what the head does not read is unused
        if not inputs:
            raise ValueError(f"predict: task {task!r} reads {reads}, and the inputs have none of "
                             f"{'them' if len(head.modalities) > 1 else 'it'}")
        if any(isinstance(v, (str, bytes)) for v in inputs.values()):
            raise ValueError("predict: give each modality a list of values, one per row (got a single string)")
        lengths = {len(v) for v in inputs.values()}
        if len(lengths) != 1:
            raise ValueError(f"predict: every modality needs one value per row, got lengths {sorted(lengths)}")
        n = lengths.pop()
        for j in range(n):  # before any tower runs: a row with none of the head's inputs has nothing to predict from
            if all(v[j] is None or (isinstance(v[j], str) and v[j] == "") for v in inputs.values()):
                raise ValueError(f"predict: task {task!r} reads {reads}, and row {j} of the inputs (0-based) has "
                                 f"{'none of them' if len(head.modalities) > 1 else 'no ' + reads} (None or \"\")"
                                 f"; a row lacking every input of a head cannot be predicted")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        tfs = {m: self._frozen_features(m, [x for x in v if x not in (None, "")], batch_size, device)
               or self.transform(m, train=False) for m, v in inputs.items()}
        rename = {m: m + FEATURES for m, tf in tfs.items() if isinstance(tf, CachedFeatures)}
        starts = range(0, n, batch_size)
        if progress:
            from .progress import tqdm
            starts = tqdm(starts, desc=f"predict {task}", unit="batch")
        out = []
        try:
            for i in starts:
                rows = [{m: (None if v[j] in (None, "") else tfs[m](v[j])) for m, v in inputs.items()}
                        for j in range(i, min(i + batch_size, n))]
                batch = {rename.get(k, k): v.to(device) if isinstance(v, torch.Tensor) else v
                         for k, v in collate(rows).items()}
                out.append(self(batch, task=task)["head"].float().cpu())
        finally:
            self.train(was_training)
        logits = torch.cat(out) if out else torch.empty(0)
        if output == "probs":
            return head.probabilities(logits)
        return head.labels(logits) if output == "labels" else logits

    def _frozen_features(self, modality: str, values: list, batch_size: int, device) -> CachedFeatures | None:
        """Inside ``reuse_frozen_features()``: a frozen tower's encoder features of ``values`` (computed once per
        process), as a lookup transform; otherwise None (encode from raw inputs)."""
        if not (reusing_features() and self.towers[modality].frozen and values
                and all(isinstance(v, str) for v in values)):
            return None
        return precompute_features(self.towers[modality].encoder, self.transform(modality), values,
                                   batch_size=batch_size, device=device, progress=False,
                                   memo_key=tower_settings(modality, self.cfg.towers[modality]))

    def encode_image(self, inputs, **kw) -> torch.Tensor:
        return self.encode("image", inputs, **kw)

    def encode_text(self, inputs, **kw) -> torch.Tensor:
        return self.encode("text", inputs, **kw)

    def encode_audio(self, inputs, **kw) -> torch.Tensor:
        return self.encode("audio", inputs, **kw)

    # ---------------------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike, extra: dict[str, Any] | None = None,
             state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write ``model.safetensors`` and the JSON card ``model.json`` into ``path``. ``state_dict``: the weights to
        write instead of this module's own (under FSDP, the whole weights gathered from the shards).

        The two files are replaced as one unit and the card records the weights' size and checksum
        (:mod:`xmodal.model_files`): a write that fails (a full disk, a read-only folder) raises ``OSError`` and
        leaves a previous model there unchanged, and a crash at any point leaves the old model or the new one.
        """
        from safetensors.torch import save_file, save_model

        from .config import _to_plain
        from .model_files import save_files
        card = {"format": "xmodal", "version": 1, "model": _to_plain(self.cfg),
                "tasks": {name: _to_plain(t) for name, t in self.tasks.items()}, **(extra or {})}

        if self.pair_memory is not None:  # its partner embeddings as of the projections saved
            self.pair_memory.refresh(self.towers)

        def write_weights(tmp: Path) -> None:
            if state_dict is None:
                save_model(self, str(tmp))
            else:
                save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp))
        return save_files(Path(path), write_weights, card)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str = "cpu",
                        towers: Sequence[str] | None = None) -> "XModalModel":
        """Load a model saved by :meth:`save` (a run folder). Weights come only from safetensors: no pickle. The card
        and the weights are checked against the sizes and checksums the card records before either is used.
        ``towers``: build and read only these towers (a query needs one: the others' libraries are not imported).
        The model is built on the CPU (move it with ``.to()``); ``map_location`` is accepted as before, and the
        weights are read on the CPU whatever it says, where their checksum is computed."""
        from safetensors import SafetensorError

        from .integrity import IntegrityError
        from .model_files import load_into, open_files, read_weights, unreadable
        from .run_identity import other_run
        path = Path(path)
        weights, card, record = open_files(path)
        cfg = _from_dict(ModelConfig, card.get("model"), "model")
        # The saved weights replace whatever the tower config would load; don't re-read packaged checkpoints.
        build_cfg = copy.deepcopy(cfg)
        for tcfg in build_cfg.towers.values():
            if tcfg.kind != "hf":  # an HF tower needs its folder for the architecture itself
                tcfg.pretrained = None
        tasks = {name: _from_dict(TaskConfig, t, f"tasks.{name}") for name, t in (card.get("tasks") or {}).items()}
        if towers is not None:
            build_cfg.towers = {m: t for m, t in build_cfg.towers.items() if m in towers}
            cfg.towers = {m: t for m, t in cfg.towers.items() if m in towers}
            tasks = {}
        read = read_weights(weights, path / CARD_NAME, record)  # mapped now, checked while the model is built
        model = cls(build_cfg, tasks)
        model.cfg = cfg
        tensors = read()  # checked against the card before use
        stray = other_run(card.get("run"), path)  # a whole model folder copied over a run folder's own
        if stray is not None:
            raise IntegrityError(f"{path / CARD_NAME} {stray}: this model was copied in from that run folder; load "
                                 f"it from there, or put this run's own model back (or train it again)")
        try:
            load_into(model, tensors, partial=towers is not None)
        except (SafetensorError, RuntimeError) as e:  # keys or shapes of another model
            raise unreadable(weights, path / CARD_NAME, e) from None
        del tensors  # the file's mapping closes with them
        model.card = card
        return model.eval()


def load(path: str | os.PathLike, map_location: str = "cpu", towers: Sequence[str] | None = None) -> XModalModel:
    """``xmodal.load(run_dir)``: the trained model in eval mode (``towers``: only those, and no task heads)."""
    return XModalModel.from_pretrained(path, map_location=map_location, towers=towers)

