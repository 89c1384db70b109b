"""Fine-tuning on real data through the one training loop: heads, fusion, multi-task, missing modalities, resume."""
import csv
import json
from pathlib import Path

import pytest
import torch

from _requires import accelerate_launcher  # skip without it; fail in CI

import xmodal
from xmodal.cli import main
from xmodal.config import config_from_dict
from xmodal.training.engine import MetricsLog, train

TOWERS = {
    "image": {"kind": "cnn", "image_size": 32, "augment": False, "options": {"channels": [8, 16]}},
    "text": {"kind": "lstm", "context_length": 24, "options": {"embed_dim": 32, "hidden": 32}},
}


def cfg(out, tasks, **over):
    d = {"output_dir": str(out), "seed": 1, "model": {"embed_dim": 32, "towers": TOWERS}, "tasks": tasks,
         "train": {"batch_size": 16, "max_steps": 12, "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
                   "progress": False, "deterministic": True},
         "log": {"backend": "none"}}
    for key, value in over.items():
        d.setdefault(key, {}).update(value)
    return config_from_dict(d)


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def train_crash_resume(monkeypatch, config, crash_step: int) -> Path:
    """Train ``config``, interrupted once the step ``crash_step`` record is logged, then resume it to the end."""
    real_write = MetricsLog.write

    def crash(self, record):
        real_write(self, record)
        if record.get("step") == crash_step and "lr" in record:
            raise KeyboardInterrupt

    monkeypatch.setattr(MetricsLog, "write", crash)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(MetricsLog, "write", real_write)
    return train(config, resume=True)


def test_classification_learns_fashion_mnist_and_predicts(fashion, tmp_path, capsys):
    run = train(cfg(tmp_path / "run", {"fashion": {"kind": "classification", "train": str(fashion),
                                                    "modalities": ["image"]}},
                    train={"max_steps": 60}))
    final = [r for r in records(run) if "eval/fashion/accuracy" in r][-1]
    assert final["eval/fashion/accuracy"] > 0.3  # 10 classes: chance is 0.1
    model = xmodal.load(run)
    assert model.tasks["fashion"].classes[0] == "Ankle boot" and len(model.tasks["fashion"].classes) == 10
    assert main(["predict", "--run", str(run), "--manifest", str(fashion), "--split", "test", "--max-rows", "5"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 5 and all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in lines)
    # the manifest's own label beside each prediction, to compare with
    test_rows = [r for r in csv.DictReader(open(fashion)) if r["split"] == "test"][:5]
    assert [(r["id"], r["true_label"]) for r in lines] == [(r["id"], r["label"]) for r in test_rows]
    # Python: raw logits by default (as before); class probabilities and class names on request
    images = [str(fashion.parent / r["image"]) for r in test_rows]
    logits = model.predict("fashion", {"image": images})
    assert logits.shape == (5, 10)
    probs = model.predict("fashion", {"image": images}, output="probs")
    torch.testing.assert_close(probs, torch.softmax(logits, -1))
    names = model.predict("fashion", {"image": images}, output="labels")
    assert names == [model.tasks["fashion"].classes[i] for i in logits.argmax(-1).tolist()] == [
        r["label"] for r in lines]
    assert [r["probabilities"][n] for r, n in zip(lines, names)] == pytest.approx(probs.max(-1).values.tolist())
    with pytest.raises(ValueError, match="output='scores': expected one of 'logits', 'probs', 'labels'"):
        model.predict("fashion", {"image": images}, output="scores")
    assert main(["evaluate", "--run", str(run), "--manifest", str(fashion), "--split", "test", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["fashion/accuracy"] == pytest.approx(final["eval/fashion/accuracy"])


def test_rows_missing_a_modality_train_and_predict(fashion, tmp_path):
    """Image + caption fused by a gated head; a third of the rows lack the image, another third the caption."""
    lines = fashion.read_text().splitlines()
    header = lines[0].split(",")
    gaps = [header]
    for i, line in enumerate(lines[1:]):
        row = line.split(",")
        if i % 3 == 1:
            row[header.index("image")] = ""
        elif i % 3 == 2:
            row[header.index("text")] = ""
        gaps.append(row)
    manifest = fashion.parent / "gappy.csv"
    manifest.write_text("\n".join(",".join(r) for r in gaps) + "\n")
    run = train(cfg(tmp_path / "run", {"fused": {"kind": "classification", "train": str(manifest),
                                                  "modalities": ["image", "text"], "fusion": "gated",
                                                  "modality_dropout": 0.3}}))
    model = xmodal.load(run)
    out = model.predict("fused", {"image": [None, str(fashion.parent / "images/test/0.png")],
                                  "text": ["a photo of a bag.", None]})
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_multitask_three_real_tasks_resume_exactly(fashion, rotten, clipart, tmp_path, monkeypatch):
    tasks = {
        "fashion": {"kind": "classification", "train": str(fashion), "modalities": ["image"]},
        "sentiment": {"kind": "classification", "train": str(rotten), "modalities": ["text"], "max_rows": 400,
                      "eval_split": "test"},
        "clipart": {"kind": "retrieval", "train": str(clipart), "modalities": ["image", "text"]},
    }
    common = dict(multitask={"sampling": "round_robin", "weighting": "uncertainty"},
                  train={"save_every": 4}, data={})
    full = train(cfg(tmp_path / "full", tasks, **common))
    train_crash_resume(monkeypatch, cfg(tmp_path / "resumed", tasks, **common), crash_step=6)

    def losses(run):
        out = {}
        for r in records(run):
            out.update({(r["step"], k): v for k, v in r.items() if k.startswith("loss/")})
        return out

    a, b = losses(full), losses(tmp_path / "resumed")
    assert {k[1] for k in a} == {"loss/fashion", "loss/sentiment", "loss/clipart"}  # round robin: all three
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], abs=1e-5), key
    last = records(full)[-1]
    assert {"eval/fashion/accuracy", "eval/sentiment/macro_f1", "eval/clipart/text->image/R@10"} <= set(last)
    weights = [r for r in records(full) if "weight/fashion" in r][-1]
    assert weights["weight/fashion"] != 1.0  # uncertainty weights are learned


def test_pcgrad_all_tasks_per_step_and_linear_probe_from_a_pretrained_run(fashion, rotten, clipart, tmp_path):
    pre = train(config_from_dict({
        "output_dir": str(tmp_path / "pre"), "model": {"embed_dim": 32, "towers": TOWERS},
        "data": {"train": str(clipart)}, "train": {"batch_size": 16, "max_steps": 3, "progress": False},
        "log": {"backend": "none"}}))
    before = xmodal.load(pre).towers["image"].state_dict()  # encoder and projection
    run = train(config_from_dict({
        "output_dir": str(tmp_path / "ft"), "init_from": str(pre),  # towers come from the pretrained run
        "tasks": {"fashion": {"kind": "classification", "train": str(fashion), "modalities": ["image"]},
                  "sentiment": {"kind": "classification", "train": str(rotten), "modalities": ["text"],
                                "max_rows": 200}},
        "multitask": {"tasks_per_step": "all", "weighting": "pcgrad"},
        "train": {"batch_size": 16, "max_steps": 4, "progress": False, "freeze_towers": True,
                  "freeze_projections": True},
        "log": {"backend": "none"}}))
    after = xmodal.load(run)
    for k, v in before.items():  # a linear probe leaves the pretrained shared space exactly as it was
        torch.testing.assert_close(after.towers["image"].state_dict()[k], v)
    rec = records(run)[-1]
    assert "eval/fashion/accuracy" in rec and "eval/sentiment/accuracy" in rec
    assert "shared space moves" not in (run / "train.log").read_text()  # a linear probe keeps it


def test_one_modality_task_on_frozen_pretrained_towers_caches_only_what_it_reads(rotten, clipart, tmp_path):
    """The quickstart's path: a text-only head over a pretrained image+text space with frozen (cached) towers."""
    frozen = {m: {**t, "freeze": True} for m, t in TOWERS.items()}
    pre = train(config_from_dict({
        "output_dir": str(tmp_path / "pre"), "model": {"embed_dim": 32, "towers": frozen},
        "data": {"train": str(clipart)}, "train": {"batch_size": 16, "max_steps": 2, "progress": False},
        "log": {"backend": "none"}}))
    run = train(config_from_dict({
        "output_dir": str(tmp_path / "ft"), "init_from": str(pre),
        "tasks": {"sentiment": {"kind": "classification", "train": str(rotten), "modalities": ["text"],
                                "max_rows": 100}},
        "train": {"batch_size": 16, "max_steps": 3, "progress": True}, "log": {"backend": "none"}}))
    assert "eval/sentiment/accuracy" in records(run)[-1]
    assert "the pretrained projections train with the heads" in (run / "train.log").read_text()


def test_gradnorm_two_tasks_logs_weights_and_resumes_them(fashion, rotten, tmp_path, monkeypatch):
    tasks = {"fashion": {"kind": "classification", "train": str(fashion), "modalities": ["image"]},
             "sentiment": {"kind": "classification", "train": str(rotten), "modalities": ["text"], "max_rows": 200}}
    common = dict(multitask={"tasks_per_step": "all", "weighting": "gradnorm"},
                  train={"max_steps": 6, "save_every": 3})
    full = train(cfg(tmp_path / "full", tasks, **common))
    train_crash_resume(monkeypatch, cfg(tmp_path / "resumed", tasks, **common), crash_step=5)  # after step-3 ckpt

    def weights(run):
        return {r["step"]: (r["weight/fashion"], r["weight/sentiment"]) for r in records(run) if "weight/fashion" in r}

    a, b = weights(full), weights(tmp_path / "resumed")
    assert sorted(a) == list(range(1, 7)) and a.keys() == b.keys()
    for step, (wf, ws) in a.items():
        assert wf + ws == pytest.approx(2.0, abs=1e-5)  # Σ w = T after every update
        assert b[step] == pytest.approx((wf, ws), abs=1e-5), step
    assert a[6][0] != 1.0  # learned

    def state(run):  # the weighting's checkpointed state (registered after the scheduler)
        return torch.load(run / "checkpoints" / "step_6" / "custom_checkpoint_1.pkl", weights_only=True)

    s_full, s_res = state(full), state(tmp_path / "resumed")
    assert set(s_full) == {"task_weights", "initial_losses"}
    # L(0) is the first step's loss of each task (not re-recorded at the resumed run's first step)
    first = records(full)[0]
    torch.testing.assert_close(s_full["initial_losses"],
                               torch.tensor([first["loss/fashion"], first["loss/sentiment"]]), rtol=1e-6, atol=0)
    torch.testing.assert_close(s_res["initial_losses"], s_full["initial_losses"], rtol=0, atol=0)
    torch.testing.assert_close(s_res["task_weights"], s_full["task_weights"], rtol=0, atol=1e-6)
    torch.testing.assert_close(s_full["task_weights"], torch.tensor(a[6]), rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["gradnorm", "pcgrad"])
def test_gradient_weightings_two_processes_equal_one_process(fashion, rotten, tmp_path, weighting):
    """GradNorm and PCGrad take per-task gradients with ``torch.autograd.grad``, which bypasses DDP's all-reduce: the
    engine averages them across processes itself. 2 gloo processes at 8 rows each must follow 1 process at 16 (losses
    and GradNorm's weights), or the ranks would drift apart."""
    import os
    import subprocess
    import sys

    from xmodal.config import save_config

    # no BatchNorm, no dropout (as tests/test_engine.py's tiny()): per-process batches of any size compute the same
    tasks = {"fashion": {"kind": "classification", "train": str(fashion), "modalities": ["image"], "max_rows": 256,
                         "dropout": 0},
             "sentiment": {"kind": "classification", "train": str(rotten), "modalities": ["text"], "max_rows": 256,
                           "dropout": 0}}
    vit = {"kind": "open_clip", "name": "xmodal-vit-tiny", "image_size": 32, "augment": False,
           "options": {"vision_cfg": {"width": 64, "layers": 2, "head_width": 32, "patch_size": 8}}}
    common = dict(multitask={"tasks_per_step": "all", "weighting": weighting}, train={"max_steps": 4},
                  model={"towers": {**TOWERS, "image": vit}})
    one = train(cfg(tmp_path / "one", tasks, **common))
    save_config(cfg(tmp_path / "two", tasks, **{**common, "train": {"max_steps": 4, "batch_size": 8}}),
                tmp_path / "two.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    launcher = accelerate_launcher(sys.executable)
    proc = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
                           "-m", "xmodal.cli", "finetune", "--config", str(tmp_path / "two.yaml")],
                          env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr + proc.stdout

    def curve(run):
        return {r["step"]: [r[k] for k in sorted(r) if k.startswith(("loss/", "weight/"))]
                for r in records(run) if "loss/fashion" in r}

    a, b = curve(one), curve(tmp_path / "two")
    assert sorted(a) == [1, 2, 3, 4] and a.keys() == b.keys()
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=1e-4), step
    if weighting == "gradnorm":
        assert "weight/fashion" in records(one)[0]


def test_each_log_record_holds_every_sampled_tasks_mean_loss_over_its_window(fashion, clipart, tmp_path,
                                                                              monkeypatch):
    """Round robin over 3 tasks with log_every 3: each record holds all three tasks' losses, each the mean of that
    task's per-step losses since the previous record (the truth: the same seed logged every step). The windowed run
    is also interrupted at step 6 and resumed from its step-4 checkpoint, mid-window: the window is checkpointed."""
    tasks = {"img": {"kind": "classification", "train": str(fashion), "modalities": ["image"]},
             "txt": {"kind": "classification", "train": str(fashion), "modalities": ["text"]},
             "ret": {"kind": "retrieval", "train": str(clipart), "modalities": ["image", "text"]}}
    common = dict(multitask={"sampling": "round_robin"}, train={"max_steps": 9})
    truth: dict[str, dict[int, float]] = {}
    for r in records(train(cfg(tmp_path / "each", tasks, **common))):  # log_every 1: one task's loss per step
        for k, v in r.items():
            if k.startswith("loss/"):
                truth.setdefault(k, {})[r["step"]] = v
    assert {k: sorted(v) for k, v in truth.items()} == {
        "loss/img": [1, 4, 7], "loss/txt": [2, 5, 8], "loss/ret": [3, 6, 9]}

    windowed = cfg(tmp_path / "windowed", tasks, multitask=common["multitask"],
                   train={"max_steps": 9, "log_every": 3, "save_every": 2})
    run = train_crash_resume(monkeypatch, windowed, crash_step=6)
    logged = [r for r in records(run) if "lr" in r]
    assert sorted({r["step"] for r in logged}) == [3, 6, 9]
    for r in logged:  # step 6 twice: before the crash, and again by the resumed run
        window = range(r["step"] - 2, r["step"] + 1)
        assert {k for k in r if k.startswith("loss")} == set(truth)  # a sampled run has no total "loss"
        for key, steps in truth.items():
            expected = [steps[s] for s in window if s in steps]
            assert r[key] == pytest.approx(sum(expected) / len(expected), rel=1e-5, abs=1e-6), (r["step"], key)


def test_all_tasks_per_step_logs_window_means_and_their_mean_as_loss(fashion, tmp_path):
    tasks = {"img": {"kind": "classification", "train": str(fashion), "modalities": ["image"]},
             "txt": {"kind": "classification", "train": str(fashion), "modalities": ["text"]}}
    common = dict(multitask={"tasks_per_step": "all"})
    each = {r["step"]: r for r in records(train(cfg(tmp_path / "each", tasks, **common, train={"max_steps": 4})))
            if "lr" in r}
    windowed = [r for r in records(train(cfg(tmp_path / "w", tasks, **common, train={"max_steps": 4,
                                                                                      "log_every": 2})))
                if "lr" in r]
    assert [r["step"] for r in windowed] == [2, 4]
    for r in windowed:
        for key in ("loss/img", "loss/txt", "loss"):  # the total: the unweighted mean of the tasks' losses
            expected = (each[r["step"] - 1][key] + each[r["step"]][key]) / 2
            assert r[key] == pytest.approx(expected, rel=1e-5), (r["step"], key)


def _linear_target_manifest(fashion, base: Path, path: Path) -> tuple[Path, list[float], list[float]]:
    """The fashion captions with a score ``y`` on a 0–100 scale that is an exact linear function of the (frozen)
    shared-space text features of ``base``: a linear probe can fit it, if it can reach the target's scale."""
    import csv
    rows = list(csv.DictReader(open(fashion, encoding="utf-8")))
    feats = xmodal.load(base).encode("text", [r["text"] for r in rows])
    centred = feats - feats.mean(0)
    s = centred @ torch.linalg.svd(centred, full_matrices=False).Vh[0]  # the features' widest direction
    y = (50 + 15 * (s - s.mean()) / s.std()).tolist()
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "text", "y", "split"])
        w.writeheader()
        for r, v in zip(rows, y):
            w.writerow({"id": r["id"], "text": r["text"], "y": v, "split": r["split"]})
    split = [r["split"] for r in rows]
    return path, [v for v, s in zip(y, split) if s == "train"], [v for v, s in zip(y, split) if s == "test"]


def test_regression_on_a_0_to_100_scale_is_standardised_and_beats_the_mean(fashion, tmp_path):
    torch.manual_seed(0)
    base = cfg(tmp_path / "base", {})
    xmodal.XModalModel(base.model).save(tmp_path / "base")  # an init_from run folder: random frozen towers
    manifest, y_train, y_test = _linear_target_manifest(fashion, tmp_path / "base", tmp_path / "scores.csv")
    mean = sum(y_train) / len(y_train)
    std = (sum((v - mean) ** 2 for v in y_train) / len(y_train)) ** 0.5
    baseline_mae = sum(abs(v - mean) for v in y_test) / len(y_test)  # predicting the training mean

    config = cfg(tmp_path / "run", {"score": {"kind": "regression", "train": str(manifest), "modalities": ["text"],
                                              "target": "y"}},
                 train={"max_steps": 60, "lr": 5e-2, "freeze_towers": True, "freeze_projections": True})
    config.init_from = str(tmp_path / "base")
    run = train(config)
    final = records(run)[-1]
    assert final["eval/score/mae"] < 0.25 * baseline_mae, (final, baseline_mae)
    assert final["eval/score/r2"] > 0.8
    head = xmodal.load(run).heads["score"].head
    assert head.target_mean.item() == pytest.approx(mean, rel=1e-5)  # from the training rows only
    assert head.target_std.item() == pytest.approx(std, rel=1e-5)

    # a head that init_from brings keeps its own scale (here it would be fitted on targets 1000 higher)
    import csv
    rows = list(csv.DictReader(open(manifest, encoding="utf-8")))
    shifted = tmp_path / "shifted.csv"
    with open(shifted, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "y": float(r["y"]) + 1000} for r in rows)
    again = cfg(tmp_path / "again", {"score": {"kind": "regression", "train": str(shifted), "modalities": ["text"],
                                               "target": "y"}},
                train={"max_steps": 1, "freeze_towers": True, "freeze_projections": True})
    again.init_from = str(run)
    kept = xmodal.load(train(again)).heads["score"].head
    assert (kept.target_mean.item(), kept.target_std.item()) == (head.target_mean.item(), head.target_std.item())


def test_init_from_takes_an_export_as_a_run_folder_and_refuses_a_damaged_one(rotten, clipart, tmp_path):
    """``init_from`` takes what ``xmodal.load`` takes: fine-tuning from a run's export trains the very model that
    fine-tuning from the run folder trains; a model file whose bytes no longer match its card is refused, naming it."""
    from xmodal.export import export_hf
    from xmodal.integrity import IntegrityError

    frozen = {m: {**t, "freeze": True} for m, t in TOWERS.items()}
    pre = train(config_from_dict({
        "output_dir": str(tmp_path / "pre"), "model": {"embed_dim": 32, "towers": frozen},
        "data": {"train": str(clipart)}, "train": {"batch_size": 16, "max_steps": 2, "progress": False},
        "log": {"backend": "none"}}))
    export = export_hf(pre, tmp_path / "export")

    def finetune(init_from, out):
        return train(config_from_dict({
            "output_dir": str(tmp_path / out), "init_from": str(init_from), "seed": 3,
            "tasks": {"sentiment": {"kind": "classification", "train": str(rotten), "modalities": ["text"],
                                    "max_rows": 64}},
            "train": {"batch_size": 16, "max_steps": 3, "progress": False, "deterministic": True},
            "log": {"backend": "none"}}))

    want = xmodal.load(finetune(pre, "ft-run")).state_dict()
    got = xmodal.load(finetune(export, "ft-export")).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("model.json", "model.safetensors"):
        (damaged / name).write_bytes((pre / name).read_bytes())
    data = bytearray((damaged / "model.safetensors").read_bytes())
    data[-7] ^= 0x10  # one bit of the last tensor's bytes
    (damaged / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.safetensors"):
        finetune(damaged, "ft-damaged")
