"""One rank of the 2-process loss check (launched by tests/test_distributed_losses.py through `accelerate launch`).

Each rank takes its half of a fixed global batch, computes each loss, backpropagates, and saves the loss and the
gradients (``rank{r}.pt`` in the output folder); open_clip's losses run on the same inputs as the peer. A tiny
DDP-wrapped model checks the end-to-end claim: after DDP averages, parameter gradients equal the 1-process ones.
"""
from __future__ import annotations

import sys
from pathlib import Path

import open_clip.loss as oc_loss
import torch
import torch.distributed as dist
from accelerate import Accelerator

from xmodal.losses import ClipLoss, SigLipLoss
from xmodal.losses.distributed import dist_info

GLOBAL_BATCH, DIM, RAW_DIM = 8, 16, 12
UNEVEN = {"uneven": 3, "empty": 0}  # where the global batch is cut between rank 0 and rank 1


def global_inputs() -> dict[str, torch.Tensor]:
    """Same on every rank and in the 1-process reference (fixed seed, built on CPU)."""
    g = torch.Generator().manual_seed(1234)
    img = torch.nn.functional.normalize(torch.randn(GLOBAL_BATCH, DIM, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img + torch.randn(GLOBAL_BATCH, DIM, generator=g), dim=-1)
    return {
        "image": img, "text": txt, "logit_scale": torch.tensor(7.5), "logit_bias": torch.tensor(-3.0),
        "raw_image": torch.randn(GLOBAL_BATCH, RAW_DIM, generator=g),
        "raw_text": torch.randn(GLOBAL_BATCH, RAW_DIM, generator=g),
    }


class TinyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = torch.nn.Linear(RAW_DIM, DIM)
        self.text = torch.nn.Linear(RAW_DIM, DIM)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, raw_image, raw_text):
        return (torch.nn.functional.normalize(self.image(raw_image), dim=-1),
                torch.nn.functional.normalize(self.text(raw_text), dim=-1), self.logit_scale.exp())


def losses(rank: int, world_size: int) -> dict:
    """name → (ours, open_clip peer, uses logit_bias). Ours take rank/world_size from the process group (the
    default); open_clip needs them given."""
    kw: dict = {}
    oc_kw = {"rank": rank, "world_size": world_size}
    return {
        "clip_global": (ClipLoss(local_loss=False, gather_with_grad=True, **kw),
                        oc_loss.ClipLoss(local_loss=False, gather_with_grad=True, **oc_kw), False),
        "clip_local": (ClipLoss(local_loss=True, gather_with_grad=True, **kw),
                       oc_loss.ClipLoss(local_loss=True, gather_with_grad=True, **oc_kw), False),
        "clip_global_nograd": (ClipLoss(local_loss=False, gather_with_grad=False, **kw),
                               oc_loss.ClipLoss(local_loss=False, gather_with_grad=False, **oc_kw), False),
        "siglip": (SigLipLoss(**kw), oc_loss.SigLipLoss(**oc_kw), True),
    }


def run_loss(loss, image, text, logit_scale, logit_bias, with_bias: bool) -> dict[str, torch.Tensor]:
    leaves = [t.clone().requires_grad_(True) for t in (image, text, logit_scale, logit_bias)]
    args = leaves if with_bias else leaves[:3]
    value = loss(*args)
    value.backward()
    out = {"loss": value.detach(), "image": leaves[0].grad, "text": leaves[1].grad, "logit_scale": leaves[2].grad}
    if with_bias:
        out["logit_bias"] = leaves[3].grad
    return out


def main(out_dir: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank, world_size = dist_info()
    assert world_size == 2, f"expected 2 processes, got world_size={world_size}"
    assert accelerator.num_processes == 2 and accelerator.process_index == rank
    assert dist.get_backend() == "gloo", dist.get_backend()

    data = global_inputs()
    n = GLOBAL_BATCH // world_size
    local = {k: (v[rank * n:(rank + 1) * n] if v.ndim else v) for k, v in data.items()}
    results: dict = {"rank": rank, "world_size": world_size}
    for name, (ours, peer, with_bias) in losses(rank, world_size).items():
        args = (local["image"], local["text"], local["logit_scale"], local["logit_bias"], with_bias)
        results[name] = run_loss(ours, *args)
        results[name + "/open_clip"] = run_loss(peer, *args)

    # Unequal shares (rows missing a modality leave processes with different numbers of pairs): rank 0 holds 3
    # pairs and rank 1 five; then rank 0 none at all.
    for tag, cut in UNEVEN.items():
        bounds = [(0, cut), (cut, GLOBAL_BATCH)][rank]
        for name, (ours, _, with_bias) in losses(rank, world_size).items():
            results[f"{name}/{tag}"] = run_loss(ours, data["image"][slice(*bounds)], data["text"][slice(*bounds)],
                                                data["logit_scale"], data["logit_bias"], with_bias)

    # End to end: DDP-wrapped model, ClipLoss (gather_with_grad) and SigLipLoss; parameter grads after DDP averaging.
    for name, loss in (("ddp_clip_global", ClipLoss()), ("ddp_clip_local", ClipLoss(local_loss=True)),
                       ("ddp_siglip", SigLipLoss())):
        model = accelerator.prepare(TinyModel())
        assert isinstance(model, torch.nn.parallel.DistributedDataParallel), type(model)
        img, txt, scale = model(local["raw_image"], local["raw_text"])
        value = loss(img, txt, scale, local["logit_bias"]) if isinstance(loss, SigLipLoss) else loss(img, txt, scale)
        accelerator.backward(value)
        results[name] = {"loss": value.detach(),
                         **{p: t.grad.clone() for p, t in accelerator.unwrap_model(model).named_parameters()}}
    torch.save(results, out_dir / f"rank{rank}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
