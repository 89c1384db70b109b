"""Symmetric InfoNCE over a batch of paired embeddings (CLIP)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import dist_info, gather_counts, gather_features


class ClipLoss(nn.Module):
    """Symmetric InfoNCE (CLIP loss), Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
    Supervision", https://arxiv.org/abs/2103.00020 (InfoNCE: van den Oord et al. 2018,
    https://arxiv.org/abs/1807.03748).

    With ``N`` pairs and logits ``s * x_i . y_j``, the loss is the mean of the cross-entropy of each row ("which text
    goes with image i") and of each column ("which image goes with text j"), the matching pair being the target.

    Inputs are L2-normalised ``[n, d]`` features and the *already exponentiated* ``logit_scale`` (a scalar tensor),
    i.e. open_clip's ``ClipLoss`` signature and values. The names say image/text, but any two modalities work.

    Multi-process (torch.distributed initialised, or ``rank``/``world_size`` given): features are gathered from every
    process so the negatives span the global batch of ``world_size * n`` pairs.

    * ``local_loss=False``: every process computes the whole ``N x N`` loss (same value on all ranks).
    * ``local_loss=True``: each process computes only its own ``n`` rows and ``n`` columns (``n x N`` logits instead
      of ``N x N``); the mean over processes is the global loss.

    With ``gather_with_grad=True`` (the default), either way, the features' gradient on each process is
    ``world_size`` times that of the one-process global-batch loss, so after DDP averages parameter gradients over
    processes the update is exactly the global-batch one. ``gather_with_grad=False`` drops the gradient through the
    other processes' copies (cheaper, approximate), as open_clip's option of the same name.

    ``rank`` / ``world_size`` default to the process group's, looked up at each call (so a loss built before
    ``init_process_group`` still works).

    Processes may hold different numbers of pairs (rows missing a modality): the gather pads and trims, the targets
    are offset by the pairs of lower ranks, and a local loss is normalised by ``N / world_size`` instead of its own
    row count, so the mean over processes is still the one-process loss over all ``N`` pairs. With equal counts
    this is exactly the usual computation.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, cache_labels: bool = True,
                 rank: int | None = None, world_size: int | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing  # F.cross_entropy's: 1 - ε on the pair, ε / columns on every column
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        # Labels depend only on (device, count, offset); the batch size is fixed during training, so build them once.
        self._labels: dict[tuple[torch.device, int, int], Tensor] = {}

    def _dist(self) -> tuple[int, int]:
        rank, world_size = dist_info()
        return (rank if self.rank is None else self.rank), (world_size if self.world_size is None else self.world_size)

    def get_ground_truth(self, device: torch.device, num_logits: int, rank: int = 0, world_size: int = 1,
                         offset: int | None = None) -> Tensor:
        """Target column of each row: its own pair, offset by the rows of lower ranks when the loss is local
        (``offset``: their count, when processes hold different numbers of rows)."""
        if offset is None:
            offset = num_logits * rank
        offset = offset if (world_size > 1 and self.local_loss) else 0
        key = (device, num_logits, offset)
        labels = self._labels.get(key)
        if labels is None:
            labels = torch.arange(offset, offset + num_logits, device=device, dtype=torch.long)
            if self.cache_labels:
                self._labels = {key: labels}  # keep one entry: the batch size changes only at the epoch's tail
        return labels

    def get_logits(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                   logit_bias: Tensor | None = None, counts: list[int] | None = None) -> tuple[Tensor, Tensor]:
        """``(logits_per_image, logits_per_text)``: ``[n, N]`` each when local, ``[N, N]`` otherwise."""
        rank, world_size = self._dist()
        if world_size > 1:
            gather = dict(local_loss=self.local_loss, gather_with_grad=self.gather_with_grad, rank=rank,
                          world_size=world_size, counts=counts)
            all_image = gather_features(image_features, **gather)
            all_text = gather_features(text_features, **gather)
            if self.local_loss:
                # Local rows against global columns: each process owns a horizontal slice of both logit matrices.
                logits_per_image = logit_scale * image_features @ all_text.T
                logits_per_text = logit_scale * text_features @ all_image.T
            else:
                logits_per_image = logit_scale * all_image @ all_text.T
                logits_per_text = logits_per_image.T
        else:
            logits_per_image = logit_scale * image_features @ text_features.T
            logits_per_text = logits_per_image.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        return logits_per_image, logits_per_text

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor | None = None, *, output_dict: bool = False) -> Tensor | dict[str, Tensor]:
        """Loss (scalar) or ``{"contrastive_loss": loss}``. ``logit_bias`` is accepted for open_clip compatibility
        (open_clip's ``ClipLoss`` takes it too); a constant bias does not change a softmax cross-entropy."""
        rank, world_size = self._dist()
        counts = gather_counts(image_features.shape[0], image_features.device, world_size)
        total = sum(counts)
        if total == 0:  # no pair on any process: a zero that keeps the graph (and DDP) whole
            loss = (image_features.sum() + text_features.sum()) * 0.0 + logit_scale * 0.0
            return {"contrastive_loss": loss} if output_dict else loss
        logits_per_image, logits_per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias,
                                                            counts)
        labels = self.get_ground_truth(image_features.device, logits_per_image.shape[0], rank, world_size,
                                       offset=sum(counts[:rank]))
        # Mean over this process's rows; a local loss over unequal shares is scaled to N/world_size rows instead.
        rows = total / world_size if (world_size > 1 and self.local_loss) else logits_per_image.shape[0]
        ls = self.label_smoothing
        loss = (F.cross_entropy(logits_per_image, labels, reduction="sum", label_smoothing=ls)
                + F.cross_entropy(logits_per_text, labels, reduction="sum", label_smoothing=ls)) / (2 * rows)
        return {"contrastive_loss": loss} if output_dict else loss
