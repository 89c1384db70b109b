"""FSDP2 with 2 real CPU processes (gloo) against 1 process on the same global batch: the parameters, gradients and
AdamW state really are sharded while training (what each rank holds), the same loss curve, the same final weights
and held-out metrics, and an exact resume from an FSDP checkpoint.

Accelerate only enables FSDP on GPUs, so tests/_fsdp_worker.py switches it on for CPU processes (see there). The
image tower is a tiny open_clip ViT, so the transformer-block wrap policy of configs/accelerate/fsdp.yaml shards its
blocks as on GPUs; the rest (projections, the LSTM, the temperature) is sharded by the root unit.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from xmodal.config import save_config
from xmodal.training.engine import pretrain

from test_engine import losses, tiny, weights
from _requires import accelerate_launcher  # skip without it; fail in CI

ROOT = Path(__file__).resolve().parent.parent


def _fsdp(config: Path, evidence: Path, resume: bool = False) -> subprocess.CompletedProcess:
    accelerate = accelerate_launcher(sys.executable)
    evidence.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "XMODAL_FSDP_EVIDENCE": str(evidence)}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
           str(ROOT / "tests" / "_fsdp_worker.py"), "pretrain", "--config", str(config), *(["--resume"] * resume)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _assert_sharded(evidence: Path) -> None:
    """What each rank held while training (written by tests/_fsdp_worker.py): FSDP2 units for every transformer
    block and the root; every parameter a DTensor split over the 2 ranks along dim 0, the two local pieces adding up
    to the whole tensor (each rank holds its own part, not a copy); every parameter that can be split (dim 0 of 2 or
    more) smaller on each rank than whole; so for the gradients at the first step and AdamW's moments after it."""
    ranks = [json.loads((evidence / f"rank{r}.json").read_text()) for r in range(2)]
    for ev in ranks:
        assert ev["processes"] == 2 and ev["distributed_type"] == "FSDP" and ev["fsdp_version"] == 2, ev
        blocks = [u for u in ev["fsdp_units"] if u.split(".")[-2:-1] == ["resblocks"]]
        assert len(blocks) == 2 and "<root>" in ev["fsdp_units"], ev["fsdp_units"]  # the ViT's 2 blocks + the root
        assert ev["unit_classes"] == ["FSDPResidualAttentionBlock", "FSDPXModalModel"]  # FSDP2's fully_shard classes
        assert ev["grads"].keys() == ev["exp_avg"].keys() == ev["params"].keys()  # every parameter trains
    for what in ("params", "grads", "exp_avg"):
        held = {name: [ev[what][name] for ev in ranks] for name in ranks[0][what]}
        assert len(held) > 10 and held.keys() == ranks[1][what].keys(), what
        for name, (a, b) in held.items():
            for h in (a, b):
                assert h["dtensor"] and h["placements"] == ["Shard(dim=0)"] and h["mesh"] == 2, (what, name, h)
            assert a["whole"] == b["whole"] and a["local"] + b["local"] == a["whole"], (what, name, a, b)
            if a["shape"][0] >= 2:  # all but the 1-element learnable scalars (logit_scale)
                assert 0 < a["local"] < a["whole"] and 0 < b["local"] < b["whole"], (what, name, a, b)
        assert sum(a["shape"][0] >= 2 for a, _ in held.values()) >= len(held) - 2, (what, held)
        for ev in ranks:
            local = sum(ev[what][n]["local"] for n in held)
            whole = sum(ev[what][n]["whole"] for n in held)
            assert local <= 0.55 * whole, (what, ev["rank"], local, whole)  # about half of the model per rank


def _eval(run: Path) -> dict:
    return json.loads((run / "model.json").read_text())["eval"]


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_process_and_resume(clipart, tmp_path):
    kw = dict(max_steps=6, save_every=3, keep_checkpoints=5)
    ref = tiny(clipart, tmp_path / "one", batch_size=16, **kw)
    cfg = tiny(clipart, tmp_path / "two", batch_size=8, **kw)
    ref.data.eval_split = cfg.data.eval_split = "test"
    one = pretrain(ref)
    save_config(cfg, tmp_path / "two.yaml")
    proc = _fsdp(tmp_path / "two.yaml", tmp_path / "evidence")
    assert "2 process(es)" in proc.stderr + proc.stdout
    two = tmp_path / "two"

    # The parameters, gradients and AdamW state really were sharded while training (what each rank held), and the
    # checkpoint has the FSDP format, not the DDP one.
    _assert_sharded(tmp_path / "evidence")
    assert (two / "checkpoints" / "step_3" / "pytorch_model_fsdp.bin").is_file()
    a, b = losses(one), losses(two)
    for step in range(1, 7):
        assert b[step][0] == pytest.approx(a[step][0], abs=1e-4), step
    w1, w2 = weights(one), weights(two)
    assert set(w1) == set(w2)
    for k in w1:  # gathered from the shards into whole tensors of the 1-process shapes
        torch.testing.assert_close(w2[k], w1[k], atol=1e-4, rtol=1e-3, msg=k)
    e1, e2 = _eval(one), _eval(two)  # evaluated on both ranks in step; reported by the main one
    assert e1 and set(e1) == set(e2)
    for k in e1:
        assert e2[k] == pytest.approx(e1[k], abs=1e-3), k

    # Resume from the FSDP checkpoint at step 3 (as after a crash): steps 4-6 and the weights come out the same.
    final = weights(two)
    shutil.rmtree(two / "checkpoints" / "step_6")
    (two / "model.safetensors").unlink()
    _fsdp(tmp_path / "two.yaml", tmp_path / "evidence_resumed", resume=True)
    _assert_sharded(tmp_path / "evidence_resumed")
    assert "resumed from" in (two / "train.log").read_text()
    c = losses(two)  # the resumed run's records come last, so they win
    for step in range(4, 7):
        assert c[step][0] == pytest.approx(b[step][0], abs=1e-6), step
    for k, v in weights(two).items():
        torch.testing.assert_close(v, final[k], atol=1e-6, rtol=0, msg=k)
