"""The training loop: exact resume, 2 processes = 1 process, GradCache accumulation = one big batch, on real data."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _requires import accelerate_launcher  # skip without it; fail in CI
from xmodal.config import config_from_dict
from xmodal.training.engine import MetricsLog, pretrain

ROOT = Path(__file__).resolve().parent.parent


def tiny(manifest, out, **train):
    """Towers with no BatchNorm and no dropout (a tiny open_clip ViT + an LSTM), so per-process batches of any size
    compute the same function; no augmentation, so every process sees the same pixels."""
    return config_from_dict({
        "output_dir": str(out), "seed": 3,
        "model": {"embed_dim": 32, "towers": {
            "image": {"kind": "open_clip", "name": "xmodal-vit-tiny", "image_size": 32, "augment": False,
                      "options": {"vision_cfg": {"width": 64, "layers": 2, "head_width": 32, "patch_size": 8}}},
            "text": {"kind": "lstm", "context_length": 16, "options": {"embed_dim": 32, "hidden": 32}}}},
        "data": {"train": str(manifest)},
        "train": {"batch_size": 16, "max_steps": 8, "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
                  "progress": False, "deterministic": True, **train},
        "log": {"backend": "none"},
    })


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = (rec["loss"], rec["lr"])
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(run / "model.safetensors"))


def test_resume_after_crash_joins_the_uninterrupted_run(clipart, tmp_path, monkeypatch):
    full = pretrain(tiny(clipart, tmp_path / "full", save_every=3))

    crash_at = 6  # after the step-6 update, before its checkpoint: the newest checkpoint is step 3
    real_write = MetricsLog.write

    def crashing_write(self, record):
        real_write(self, record)
        if record.get("step") == crash_at:
            raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(MetricsLog, "write", crashing_write)
    cfg = tiny(clipart, tmp_path / "resumed", save_every=3)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    monkeypatch.setattr(MetricsLog, "write", real_write)
    with pytest.raises(FileExistsError, match="--resume"):  # never silently overwrite a run
        pretrain(cfg)
    pretrain(cfg, resume=True)

    a, b = losses(full), losses(tmp_path / "resumed")  # b: steps 1-6 from the crashed run, then 4-8 again
    assert max(b) == max(a) == 8
    for step in range(1, 9):
        assert b[step][0] == pytest.approx(a[step][0], abs=1e-5), step
        assert b[step][1] == pytest.approx(a[step][1], rel=1e-9), step  # same LR schedule
    wa, wb = weights(full), weights(tmp_path / "resumed")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0)


def test_a_crash_before_the_first_checkpoint_leaves_no_records_behind(clipart, tmp_path, monkeypatch):
    """Killed after step 1, before its first checkpoint (step 2): ``--resume`` starts a fresh run, and metrics.jsonl
    holds each of its steps once, as an uninterrupted run's does (found by a new-user check: the killed launch's
    step-1 record stayed, so step 1 appeared twice)."""
    full = pretrain(tiny(clipart, tmp_path / "full", max_steps=4, save_every=2))
    real_write = MetricsLog.write

    def crashing_write(self, record):
        real_write(self, record)
        if record.get("step") == 1:
            raise KeyboardInterrupt("simulated kill")

    cfg = tiny(clipart, tmp_path / "killed", max_steps=4, save_every=2)
    monkeypatch.setattr(MetricsLog, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        pretrain(cfg)
    monkeypatch.setattr(MetricsLog, "write", real_write)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    assert not list((tmp_path / "killed" / "checkpoints").glob("step_*"))
    assert [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()] == [1]
    with pytest.raises(FileExistsError, match="already holds a run"):  # without --resume: refused, nothing touched
        pretrain(cfg)
    assert [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()] == [1]
    run = pretrain(cfg, resume=True)
    records = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records] == [json.loads(ln)["step"] for ln in
                                            (full / "metrics.jsonl").read_text().splitlines()]
    assert losses(run) == losses(full)


def _to_0d_scalars(ckpt: Path) -> None:
    """Rewrite a checkpoint as xmodal wrote it before learnable scalars became 1-element 1-D (for FSDP2):
    0-d ``logit_scale`` in the weights and 0-d AdamW moments for it."""
    from safetensors.torch import load_file, save_file
    w = load_file(str(ckpt / "model.safetensors"))
    names = [k for k, v in w.items() if v.shape == (1,) and k.endswith("logit_scale")]
    save_file({k: v.reshape(()) if k in names else v for k, v in w.items()}, str(ckpt / "model.safetensors"))
    opt = torch.load(ckpt / "optimizer.bin", weights_only=True)
    moments = 0
    for state in opt["state"].values():
        for key, value in state.items():
            if key != "step" and value.shape == (1,):
                state[key], moments = value.reshape(()), moments + 1
    torch.save(opt, ckpt / "optimizer.bin")
    (ckpt / "manifest.json").unlink()  # checkpoints of then had no manifest (it would name both files as changed)
    assert names and moments  # the rewrite found what it rewrites


def test_resume_from_a_checkpoint_with_0d_scalars(clipart, tmp_path):
    full = pretrain(tiny(clipart, tmp_path / "full", max_steps=6))
    cfg = tiny(clipart, tmp_path / "old", max_steps=6, save_every=3)
    pretrain(cfg)
    run = tmp_path / "old"
    shutil.rmtree(run / "checkpoints" / "step_6")
    _to_0d_scalars(run / "checkpoints" / "step_3")
    pretrain(cfg, resume=True)
    for k, v in weights(full).items():
        torch.testing.assert_close(weights(run)[k], v, atol=1e-5, rtol=0)


def test_gradcache_accumulation_equals_one_big_batch(clipart, tmp_path):
    big = pretrain(tiny(clipart, tmp_path / "big", max_steps=4))
    acc = pretrain(tiny(clipart, tmp_path / "acc", max_steps=4, batch_size=4, grad_accum_steps=4))
    a, b = losses(big), losses(acc)
    for step in range(1, 5):
        assert b[step][0] == pytest.approx(a[step][0], abs=1e-5), step


def launch_two(config: Path, verb: str = "pretrain") -> subprocess.CompletedProcess:
    """`xmodal <verb> --config <config>` in 2 real gloo processes launched through Accelerate; checks that both ran."""
    accelerate = accelerate_launcher(sys.executable)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
           "-m", "xmodal.cli", verb, "--config", str(config)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr + proc.stdout
    return proc


@pytest.mark.slow
def test_two_processes_equal_one_process(clipart, tmp_path):
    """2 real gloo processes launched through Accelerate, 8 rows each, follow the 1-process curve at batch 16. The 2
    processes log every 2 steps: each record is the mean over its window of the processes' mean losses."""
    one = pretrain(tiny(clipart, tmp_path / "one", max_steps=4))
    from xmodal.config import save_config
    save_config(tiny(clipart, tmp_path / "two", max_steps=4, batch_size=8, log_every=2), tmp_path / "two.yaml")
    launch_two(tmp_path / "two.yaml")
    a, b = losses(one), losses(tmp_path / "two")
    assert sorted(b) == [2, 4]
    for step in b:
        assert b[step][0] == pytest.approx((a[step - 1][0] + a[step][0]) / 2, abs=1e-4), step


@pytest.mark.slow
def test_gradcache_on_two_processes_equals_one_process_full_batch(clipart, tmp_path):
    """GradCache across processes: 2 gloo processes, each 2 micro-batches of 4 rows (train.grad_accum_steps: 2),
    give every step's loss and the final weights of 1 process taking the same 16 rows as one plain batch (no
    GradCache). The contrastive loss spans all 16 pairs only if each process's cached micro-batch features are
    gathered from the other process too, and the weights match only if the re-run micro-batches' gradients are
    all-reduced once, whole."""
    one = pretrain(tiny(clipart, tmp_path / "one", max_steps=4))
    from xmodal.config import save_config
    save_config(tiny(clipart, tmp_path / "two", max_steps=4, batch_size=4, grad_accum_steps=2), tmp_path / "two.yaml")
    proc = launch_two(tmp_path / "two.yaml")
    assert "batch 8 × 2 process(es)" in proc.stderr + proc.stdout  # per process: 2 micro-batches of 4
    a, b = losses(one), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step][0] == pytest.approx(a[step][0], abs=1e-5), step
        assert b[step][1] == pytest.approx(a[step][1], rel=1e-9), step
    w1, w2 = weights(one), weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("backend, pattern", [("wandb", "wandb/offline-run-*"), ("tensorboard", "**/events.out.tfevents.*")])
def test_logging_backends_write_locally(clipart, tmp_path, monkeypatch, capfd, backend, pattern):
    monkeypatch.setenv("WANDB_MODE", "offline")  # what xmodal's default (log.wandb_mode: offline) sets
    cfg = tiny(clipart, tmp_path / backend, max_steps=2)
    cfg.log.backend = backend
    run = pretrain(cfg)
    assert list(run.glob(pattern)), sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert len(losses(run)) == 2
    if backend == "wandb":  # no banner, run history or summary from wandb (~40 lines a run); one line of ours
        printed = capfd.readouterr()
        assert "wandb:" not in printed.out + printed.err + (run / "train.log").read_text(), printed.err[-2000:]
        (line,) = [ln for ln in (run / "train.log").read_text().splitlines() if "wandb offline run" in ln]
        folder = line.split("wandb offline run: ")[1].split(" ")[0]
        assert Path(folder).parent == run / "wandb" and f"(upload it: wandb sync {folder})" in line


def test_evaluations_during_training_embed_frozen_eval_inputs_once(clipart, tmp_path, monkeypatch):
    """train.eval_every with a frozen image tower: the held-out images go through the encoder once for all the
    run's evaluations (4 here), the rest is projections; the weights are those of a run that never evaluates."""
    import xmodal.training.build as build

    seen = []
    real_build_model = build.build_model

    def counting_build_model(*args, **kwargs):
        model = real_build_model(*args, **kwargs)
        model.towers["image"].encoder.register_forward_hook(lambda m, inp, out: seen.append(len(out)))
        return model

    monkeypatch.setattr(build, "build_model", counting_build_model)
    runs = {}
    for every in (0, 1):
        cfg = tiny(clipart, tmp_path / f"every{every}", max_steps=4, eval_every=every)
        cfg.model.towers["image"].freeze = True
        cfg.data.eval_split = "test"
        cfg.train.feature_cache_dir = "off"  # this run's own encoder passes (the disk cache would serve the 2nd run)
        seen.clear()
        runs[every] = pretrain(cfg)
        encoded = sum(seen)
        evals = [r for r in map(json.loads, (runs[every] / "metrics.jsonl").read_text().splitlines())
                 if "eval/text->image/n_items" in r]
        assert [r["step"] for r in evals] == ([1, 2, 3, 4] if every else [4])
        n_eval = int(evals[-1]["eval/text->image/n_items"])
        n_train = json.loads((runs[every] / "model.json").read_text())["train_rows"]["contrastive"]
        assert encoded == n_train + n_eval, (encoded, n_train, n_eval)  # each image once, however many evaluations
    for k, v in weights(runs[0]).items():
        assert torch.equal(weights(runs[1])[k], v), k
