"""Two real CPU processes (gloo, launched by `accelerate launch`) against one process on the whole global batch.

The exact relations checked, with W = 2 processes of n = N/W pairs each (derivations in the loss docstrings):

* loss: with ``local_loss=False`` every rank's loss is the global loss; with ``local_loss=True`` and for SigLIP
  (per-rank loss divided by the local n, as open_clip) the *mean* over ranks is the global loss.
* feature gradients with a differentiable gather: rank r's gradient w.r.t. its own features is W times the global
  one (each of the W per-rank losses reaches every feature through the gather, and their mean is the global loss).
  Without gradient through the gather (open_clip's ``gather_with_grad=False``, ``local_loss=False``) the factor is 1.
* logit_scale / logit_bias gradients: the mean over ranks is the global one (they are not gathered).
* so once DDP has averaged parameter gradients over the ranks (dividing the factor W back out), a DDP-wrapped
  model's gradients equal the 1-process ones exactly (factor 1), which the ``ddp_*`` cases check end to end.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _requires import accelerate_launcher  # skip without it; fail in CI

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_dist_loss_worker.py")
WORLD = 2
ATOL = 1e-5

pytestmark = pytest.mark.slow


def _load_worker():
    spec = importlib.util.spec_from_file_location("_dist_loss_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist_losses")
    accelerate = accelerate_launcher(sys.executable)  # the venv's launcher, whichever venv runs the tests
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONWARNINGS": "ignore::FutureWarning"}  # open_clip's all_gather call warns on every step
    # `--cpu --num_processes 2` starts a single process; `--multi_gpu` + Accelerator(cpu=True) in the worker gives two
    # gloo processes. Every option is explicit so a user's accelerate default_config.yaml cannot change the run.
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(WORLD), "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", str(WORKER), str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [r["rank"] for r in results] == list(range(WORLD))
    assert all(r["world_size"] == WORLD for r in results)
    return results


@pytest.fixture(scope="module")
def worker():
    return _load_worker()


def _close(a, b, msg=""):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m: f"{msg}: {m}")


# name → (per-rank loss == global loss?, feature-gradient factor)
CASES = {"clip_global": (True, WORLD), "clip_local": (False, WORLD), "clip_global_nograd": (True, 1),
         "siglip": (False, WORLD)}


@pytest.mark.parametrize("tag", ["", "/uneven", "/empty"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_one_process_global_batch(ranks, worker, name, tag):
    """Also with unequal shares (3 + 5 pairs, and 0 + 8): the same relations hold, so contrastive training with
    rows missing a modality is exact on several processes too."""
    every_rank_global, factor = CASES[name]
    data = worker.global_inputs()
    ours, peer, with_bias = worker.losses(0, 1)[name]
    args = (data["image"], data["text"], data["logit_scale"], data["logit_bias"], with_bias)
    ref = worker.run_loss(ours, *args)
    ref_peer = worker.run_loss(peer, *args)  # one-process open_clip: the reference does not rest on our code alone
    for key in ref:
        _close(ref[key], ref_peer[key], f"1-process {key}")

    per_rank = [r[name + tag] for r in ranks]
    losses = torch.stack([r["loss"] for r in per_rank])
    _close(losses.mean(), ref["loss"], "mean of rank losses")
    if every_rank_global:
        for r, value in enumerate(losses):
            _close(value, ref["loss"], f"rank {r} loss")
    for key in ("image", "text"):
        reassembled = torch.cat([r[key] for r in per_rank])
        _close(reassembled, factor * ref[key], f"{key} feature gradient (factor {factor})")
    for key in ("logit_scale", "logit_bias") if with_bias else ("logit_scale",):
        _close(torch.stack([r[key] for r in per_rank]).mean(), ref[key], f"mean {key} gradient")


@pytest.mark.parametrize("name", list(CASES))
def test_each_rank_matches_open_clip(ranks, name):
    # open_clip's distributed losses on the same shards: same per-rank values and gradients (its SigLIP uses the
    # neighbour exchange, ours a gather; the numbers agree).
    for r, result in enumerate(ranks):
        ours, peer = result[name], result[name + "/open_clip"]
        assert ours.keys() == peer.keys()
        for key in ours:
            _close(ours[key], peer[key], f"rank {r} {name} {key}")


@pytest.mark.parametrize("name", ["ddp_clip_global", "ddp_clip_local", "ddp_siglip"])
def test_ddp_parameter_gradients_are_exact(ranks, worker, name):
    from xmodal.losses import ClipLoss, SigLipLoss

    data = worker.global_inputs()
    model = worker.TinyModel()
    img, txt, scale = model(data["raw_image"], data["raw_text"])
    loss = {"ddp_clip_global": ClipLoss(), "ddp_clip_local": ClipLoss(local_loss=True),
            "ddp_siglip": SigLipLoss()}[name]
    value = loss(img, txt, scale, data["logit_bias"]) if name == "ddp_siglip" else loss(img, txt, scale)
    value.backward()
    _close(torch.stack([r[name]["loss"] for r in ranks]).mean(), value.detach(), "mean of rank losses")
    for pname, param in model.named_parameters():
        for r, result in enumerate(ranks):  # DDP all-reduces: every rank holds the same, exact, gradient
            _close(result[name][pname], param.grad, f"rank {r} grad of {pname}")

