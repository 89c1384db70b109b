"""An encoder's blocks, bottom to top, for ``model.towers.<m>.train_blocks`` (train only the last k of them) and
``train.layer_lr_decay`` (a smaller learning rate the lower a block sits).

Known encoders: ``hf`` text towers (the transformer layers of a BERT-style ``encoder.layer``, a DistilBERT-style
``transformer.layer`` or an ``encoder.layers`` list) and timm EfficientNets, the packaged ``efficientnet_lite0``
among them (the inverted-residual blocks of every stage, in order, with ``conv_head`` and ``bn2`` — the 1×1
convolution and its norm after the last block — training with the top block).
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EncoderBlocks", "MemoTransform", "PrefixCache", "block_depths", "can_split", "encoder_blocks", "trainable_part"]


class EncoderBlocks:
    """``blocks``: bottom to top; ``head``: the modules after the top block, trained whenever it is."""

    def __init__(self, blocks: list[nn.Module], head: list[nn.Module]):
        self.blocks, self.head = blocks, head


def _hf_layers(model: nn.Module) -> nn.ModuleList | None:
    for outer, inner in (("encoder", "layer"), ("transformer", "layer"), ("encoder", "layers")):
        layers = getattr(getattr(model, outer, None), inner, None)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return layers
    return None


def encoder_blocks(encoder: nn.Module) -> EncoderBlocks | None:
    """The blocks of ``encoder``, or None when xmodal does not know how it is built."""
    from .text import HFTextEncoder

    if isinstance(encoder, HFTextEncoder):
        layers = _hf_layers(encoder.model)
        return EncoderBlocks(list(layers), []) if layers is not None else None
    stages = getattr(encoder, "blocks", None)
    if isinstance(stages, nn.Sequential) and hasattr(encoder, "conv_head") and hasattr(encoder, "conv_stem"):
        blocks = [b for stage in stages for b in (stage if isinstance(stage, nn.Sequential) else [stage])]
        return EncoderBlocks(blocks, [m for m in (encoder.conv_head, getattr(encoder, "bn2", None)) if m is not None])
    return None


def trainable_part(encoder: nn.Module, k: int, where: str) -> list[tuple[int, nn.Module]]:
    """The modules that train when only the last ``k`` blocks do, each with its depth below the top block (0: the
    top block and the head after it). ValueError, naming ``<where>.train_blocks``, for an unknown encoder or a ``k``
    larger than its number of blocks."""
    found = encoder_blocks(encoder)
    if found is None:
        raise ValueError(f"{where}.train_blocks: xmodal does not know the blocks of this encoder "
                         f"({type(encoder).__name__}); it knows hf text towers and EfficientNets (efficientnet_lite0, "
                         f"timm efficientnet*) — leave train_blocks unset (every block trains)")
    n = len(found.blocks)
    if k > n:
        raise ValueError(f"{where}.train_blocks: this encoder has {n} blocks, got {k}")
    top = [(n - 1 - i, b) for i, b in enumerate(found.blocks)][n - k:]
    return top + [(0, m) for m in found.head]


def block_depths(encoder: nn.Module) -> dict[int, int]:
    """``id(parameter)`` → its depth below the top block (the head: 0; parameters in no block, such as embeddings
    or the stem: one below the lowest block), for layer-wise LR decay; empty for an encoder of unknown blocks."""
    found = encoder_blocks(encoder)
    if found is None:
        return {}
    n = len(found.blocks)
    depths = {id(p): n for p in encoder.parameters()}
    for i, b in enumerate(found.blocks):
        depths.update({id(p): n - 1 - i for p in b.parameters()})
    for m in found.head:
        depths.update({id(p): 0 for p in m.parameters()})
    return depths


class PrefixCache:
    """The frozen lower part of a partly trained encoder, run once per distinct input: ``features(encoder, x)``
    equals ``encoder(x)``, but each row's output of the frozen blocks below the trained ones (a text row's hidden
    states over its tokens, an image's feature map) is kept by the row's content and reused, so a later step runs
    only the trained top blocks. Exact as long as the frozen blocks are deterministic (eval mode: they are) and
    unchanged (:meth:`clear` after loading weights); a tower that augments its inputs gets no cache (every view
    would be new). Holds at most ``max_bytes`` of features; rows past that are computed each time.

    Encoders it can split: ``hf`` text towers with ``pool_layers`` 1 and timm EfficientNets (:func:`can_split`)."""

    def __init__(self, k: int, max_bytes: int = 2 << 30):
        self.k, self.max_bytes = k, max_bytes
        self.memo: dict[bytes, torch.Tensor] = {}
        self.bytes = 0

    def __deepcopy__(self, memo) -> "PrefixCache":  # a copied model starts with an empty cache
        return PrefixCache(self.k, self.max_bytes)

    def clear(self) -> None:
        self.memo.clear()
        self.bytes = 0

    def features(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        from .text import HFTextEncoder

        text = isinstance(encoder, HFTextEncoder)
        keys = [_row_key(r) for r in x]
        todo = list(dict.fromkeys(i for i, key in enumerate(keys) if key not in self.memo))
        fresh: dict[bytes, torch.Tensor] = {}
        if todo:
            with torch.no_grad():
                rows = (_hf_prefix if text else _timm_prefix)(encoder, x[todo], self.k)
            for i, r in zip(todo, rows):
                fresh[keys[i]] = r
                if self.bytes + r.numel() * r.element_size() <= self.max_bytes:
                    self.memo[keys[i]] = r
                    self.bytes += r.numel() * r.element_size()
        rows = [fresh[key] if key in fresh else self.memo[key] for key in keys]
        return (_hf_suffix if text else _timm_suffix)(encoder, rows, self.k)


def can_split(encoder: nn.Module) -> bool:
    """Whether :class:`PrefixCache` knows where this encoder's blocks can be cut."""
    from .text import HFTextEncoder

    if isinstance(encoder, HFTextEncoder):
        return encoder.pool_layers == 1 and _hf_layers(encoder.model) is not None
    return encoder_blocks(encoder) is not None and hasattr(encoder, "forward_head") and hasattr(encoder, "bn1")


def _row_key(row: torch.Tensor) -> bytes:
    data = row.detach().cpu().contiguous().numpy().tobytes()
    return data if len(data) <= 1024 else hashlib.blake2b(data, digest_size=20).digest() + str(row.shape).encode()


def _hf_prefix(encoder, ids: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Each row's hidden states over its own tokens, as they enter the first of the last ``k`` layers."""
    mask = ids != encoder.pad_id
    used = max(1, int(mask.sum(dim=1).max()))
    ids, mask = ids[:, :used], mask[:, :used]
    layers = _hf_layers(encoder.model)
    with torch.random.fork_rng(devices=[]):  # the trained layers run here too (unused): their dropout draws no RNG
        out = encoder.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
    hidden = out.hidden_states[len(layers) - k]
    return [h[: max(1, int(m.sum()))].clone() for h, m in zip(hidden, mask)]


def _hf_suffix(encoder, rows: list[torch.Tensor], k: int, chunk: int = 32) -> torch.Tensor:
    """The last ``k`` layers over the rows, then the masked mean (as :class:`HFTextEncoder` pools). Rows go through
    in chunks of similar length, each right-padded to its own longest: a batch padded to its longest caption does
    2-4x the work on the bundled corpora (a row's output does not depend on the padding)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    parts = [_hf_suffix_padded(encoder, [rows[i] for i in order[j:j + chunk]], k)
             for j in range(0, len(order), chunk)]
    back = torch.empty(len(order), dtype=torch.long)
    back[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[back.to(parts[0].device)]


def _hf_suffix_padded(encoder, rows: list[torch.Tensor], k: int) -> torch.Tensor:
    n = max(len(r) for r in rows)
    dev = next(encoder.parameters()).device
    hidden = torch.stack([F.pad(r, (0, 0, 0, n - len(r))) for r in rows]).to(dev)
    mask = torch.tensor([[j < len(r) for j in range(n)] for r in rows], device=dev)
    # additive mask over the keys, [B, 1, 1, n]: what eager and sdpa attention both take
    ext = (~mask)[:, None, None, :].to(hidden.dtype) * torch.finfo(hidden.dtype).min
    for layer in _hf_layers(encoder.model)[-k:]:
        out = layer(hidden, attention_mask=ext)
        hidden = out[0] if isinstance(out, tuple) else out
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)


def _timm_prefix(encoder, x: torch.Tensor, k: int) -> list[torch.Tensor]:
    blocks = encoder_blocks(encoder).blocks
    h = encoder.bn1(encoder.conv_stem(x))
    for b in blocks[: len(blocks) - k]:
        h = b(h)
    return list(h.contiguous())


def _timm_suffix(encoder, rows: list[torch.Tensor], k: int) -> torch.Tensor:
    blocks = encoder_blocks(encoder).blocks
    h = torch.stack(rows).to(next(encoder.parameters()).device)
    for b in blocks[len(blocks) - k:]:
        h = b(h)
    return encoder.forward_head(encoder.bn2(encoder.conv_head(h)))


class MemoTransform:
    """A deterministic per-sample transform whose outputs are kept by input value (up to ``max_bytes``), for a
    partly trained tower that does not augment: decoding an image (~50 ms for a 618-px PNG) would otherwise cost
    more than the trained blocks' step. A copy for a DataLoader worker starts empty."""

    def __init__(self, transform, max_bytes: int = 2 << 30):
        self.transform, self.max_bytes = transform, max_bytes
        self.memo: dict = {}
        self.bytes = 0

    def __call__(self, value):
        try:
            return self.memo[value]
        except (KeyError, TypeError):  # TypeError: an unhashable value (a PIL image) is never kept
            pass
        out = self.transform(value)
        size = out.numel() * out.element_size() if isinstance(out, torch.Tensor) else None
        if size is not None and self.bytes + size <= self.max_bytes:
            try:
                self.memo[value] = out
                self.bytes += size
            except TypeError:
                pass
        return out

    def __getstate__(self):
        return {"transform": self.transform, "max_bytes": self.max_bytes, "memo": {}, "bytes": 0}

    def __repr__(self) -> str:
        return f"MemoTransform({self.transform!r})"
