"""Pairwise sigmoid loss over a batch of paired embeddings (SigLIP)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import dist_info, gather_counts, gather_features


class SigLipLoss(nn.Module):
    """Sigmoid loss, Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training",
    https://arxiv.org/abs/2303.15343.

    Every (image i, text j) pair is an independent binary classification with logit ``s * x_i . y_j + b``: positive
    on the diagonal, negative elsewhere. Unlike the softmax loss no row normalisation couples the pairs, so the loss
    is a plain sum over pairs, divided by the batch size (as in the paper and open_clip):

        loss = -1/n * sum_ij log sigmoid(z_ij * (s * x_i . y_j + b)),   z_ij = +1 if i == j else -1

    ``logit_scale`` is the already exponentiated scale and ``logit_bias`` the bias (scalar tensors), open_clip's
    ``SigLipLoss`` signature and values.

    Multi-process: each process gathers every process's text features *with gradient* and scores its ``n`` local
    images against all ``N = world_size * n`` texts. Normalisation: like open_clip, the divisor is the *local* batch
    size ``n``, so a process's loss is the sum over its ``n x N`` block divided by ``n``. The mean of those over the
    processes is then the one-process loss over the global batch (sum over ``N x N`` / ``N``), and each process's
    feature gradients are ``world_size`` times the global-batch ones (the gather's backward sums all processes'
    contributions), which DDP's gradient averaging divides back out. open_clip's default exchanges text features
    with neighbouring ranks instead of gathering them; the result is the same, the gather is simpler and holds the
    same ``n x N`` logits.
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None, cache_labels: bool = True):
        super().__init__()
        self.rank = rank
        self.world_size = world_size
        self.cache_labels = cache_labels
        self._labels: dict[tuple, Tensor] = {}

    def _dist(self) -> tuple[int, int]:
        rank, world_size = dist_info()
        return (rank if self.rank is None else self.rank), (world_size if self.world_size is None else self.world_size)

    def get_ground_truth(self, device: torch.device, dtype: torch.dtype, num_rows: int, num_cols: int,
                         offset: int = 0) -> Tensor:
        """``[num_rows, num_cols]`` of -1 with +1 at ``(i, offset + i)``: row i's own text sits at column offset+i."""
        key = (device, dtype, num_rows, num_cols, offset)
        labels = self._labels.get(key)
        if labels is None:
            labels = -torch.ones(num_rows, num_cols, device=device, dtype=dtype)
            rows = torch.arange(num_rows, device=device)
            labels[rows, rows + offset] = 1
            if self.cache_labels:
                self._labels = {key: labels}
        return labels

    def get_logits(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                   logit_bias: Tensor | None = None) -> Tensor:
        logits = logit_scale * image_features @ text_features.T
        if logit_bias is not None:
            logits = logits + logit_bias
        return logits

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Tensor | None, *, output_dict: bool = False) -> Tensor | dict[str, Tensor]:
        rank, world_size = self._dist()
        n = image_features.shape[0]
        counts = gather_counts(n, image_features.device, world_size)
        if sum(counts) == 0:  # no pair on any process: a zero that keeps the graph (and DDP) whole
            loss = (image_features.sum() + text_features.sum()) * 0.0 + logit_scale * 0.0
            loss = loss + logit_bias * 0.0 if logit_bias is not None else loss
            return {"contrastive_loss": loss} if output_dict else loss
        # local_loss=True: the rows stay local, so the gather only has to bring the other processes' texts.
        all_text = gather_features(text_features, local_loss=True, gather_with_grad=True, rank=rank,
                                   world_size=world_size, counts=counts)
        logits = self.get_logits(image_features, all_text, logit_scale, logit_bias)
        offset = sum(counts[:rank])
        labels = self.get_ground_truth(image_features.device, logits.dtype, n, all_text.shape[0], offset)
        # Divided by N / world_size (= n when every process holds n pairs, as open_clip divides by n), so the mean
        # over processes is the one-process loss over all N pairs even when rows missing a modality make the
        # counts differ.
        loss = -F.logsigmoid(labels * logits).sum() / (sum(counts) / world_size)
        return {"contrastive_loss": loss} if output_dict else loss
