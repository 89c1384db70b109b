"""Shared pieces of the benchmark scripts: flags, model builders for xmodal and its peer (open_clip), the two
training steps, synthetic batches, timing, and peak-memory measurement in a fresh subprocess.

The xmodal training step (:class:`XModalTrainer`) is a faithful copy of the body of the optimiser-step loop of
``xmodal.training.engine.train`` for one contrastive task (``tasks_per_step: one``), built from the engine's own pieces:
``make_accelerator``-equivalent ``Accelerator``, ``param_groups``, ``build_loss``, ``contrastive_loss``, ``_split``,
``gradcache_step``, ``StaticWeighting``, ``warmup_cosine`` and ``accelerator.prepare / autocast / backward /
clip_grad_norm_``. The engine's step (``xmodal.training.step``) works on a whole built run (``RunState``: loaders,
sampler, checkpoints), so its body is copied here rather than called.

The open_clip step (:class:`OpenClipTrainer`) is a copy of ``open_clip_train.train.train_one_epoch`` for
``accum_freq == 1`` (and its ``accum_freq > 1`` branch for the GradCache comparison), with open_clip_train's
``cosine_lr`` schedule and its AdamW parameter groups.

Both sides get the same tower config, batch, precision (fp32: no autocast; bf16: autocast), thread count, AdamW
hyper-parameters (lr 1e-3, betas (0.9, 0.98), eps 1e-6, weight decay 0.1) and gradient clipping (norm 1.0, xmodal's
default ``train.max_grad_norm``; open_clip's ``--grad-clip-norm 1.0``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# As the xmodal CLI does (docs/benchmarks.md, "OpenMP wait policy"): on a shared machine, spinning OpenMP threads that
# wait for a descheduled sibling make multi-thread steps 3-10x slower and erratic. Both sides run in this process,
# so the comparison stays fair; export OMP_WAIT_POLICY to override. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

LR, BETAS, EPS, WD, CLIP_NORM = 1e-3, (0.9, 0.98), 1e-6, 0.1, 1.0
SOT, EOT = 49406, 49407

# A somewhat bigger config than xmodal-vit-tiny (registered with open_clip by these scripts only).
BENCH_CONFIGS: dict[str, dict[str, Any]] = {
    "bench-vit-small": {
        "embed_dim": 256,
        "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 256, "layers": 6, "head_width": 64},  # 4 heads
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6},
    },
    # Almost no compute per row: at batch 4 the step time is the fixed per-step cost (Python, op dispatch, the
    # optimiser over every parameter tensor) -- the regime a GPU runs small models in.
    "bench-vit-micro": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 4, "head_width": 32},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 4},
    },
}
DEFAULT_BATCH = {"xmodal-vit-tiny": 64, "bench-vit-small": 32, "bench-vit-micro": 4, "ViT-B-32": 8}


# ------------------------------------------------------------------------------------------------------ flags/setup

def common_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="fp32 (no autocast) or bf16 (autocast on both sides). bf16 is ~10x slower on this CPU.")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 2 on cpu)")
    p.add_argument("--steps", type=int, default=None, help="timed rounds per configuration")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer steps, smaller configurations")
    p.add_argument("--seed", type=int, default=0)
    return p


def setup(args) -> None:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads is None:
        args.threads = 2 if args.device == "cpu" else torch.get_num_threads()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    register_configs()


def autocast(args):
    if args.precision == "bf16":
        return torch.autocast(device_type=torch.device(args.device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


_registered = False


def register_configs() -> None:
    """xmodal's own configs (xmodal-vit-tiny) and the benchmark's ones, known to open_clip by name."""
    global _registered
    if _registered:
        return
    from xmodal.modalities import register_open_clip_configs
    register_open_clip_configs()
    from xmodal.modalities._openclip import add_open_clip_configs
    add_open_clip_configs(BENCH_CONFIGS)
    _registered = True


def model_dims(name: str) -> tuple[int, int]:
    """(image_size, context_length) of an open_clip config."""
    import open_clip
    register_configs()
    cfg = open_clip.get_model_config(name)
    return int(cfg["vision_cfg"]["image_size"]), int(cfg["text_cfg"].get("context_length", 77))


# ------------------------------------------------------------------------------------------------------ data

def make_batch(name: str, batch: int, device: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Preprocessed random images ``[B, 3, H, W]`` (roughly normalised) and BPE-like ids ``[B, L]``:
    SOT, random tokens, EOT, zero padding; caption lengths vary from 3 tokens to the full context."""
    size, ctx = model_dims(name)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=g)
    texts = torch.zeros(batch, ctx, dtype=torch.long)
    lengths = torch.randint(1, ctx - 1, (batch,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        texts[i, 0] = SOT
        texts[i, 1:n + 1] = torch.randint(1, SOT, (n,), generator=g)
        texts[i, n + 1] = EOT
    return images.to(device), texts.to(device)


# ------------------------------------------------------------------------------------------------------ models

def build_open_clip(name: str, device: str):
    import open_clip
    register_configs()
    return open_clip.create_model(name, pretrained=None, output_dict=True).to(device)


def xmodal_model_config(name: str, projection: str = "linear"):
    from xmodal.config import ModelConfig, TowerConfig
    size, ctx = model_dims(name)
    import open_clip
    embed_dim = int(open_clip.get_model_config(name)["embed_dim"])
    return ModelConfig(embed_dim=embed_dim, loss="clip", towers={
        "image": TowerConfig(kind="open_clip", name=name, image_size=size, projection=projection),
        "text": TowerConfig(kind="open_clip", name=name, context_length=ctx, projection=projection)})


def build_xmodal(name: str, device: str):
    from xmodal.model import XModalModel
    register_configs()
    return XModalModel(xmodal_model_config(name)).to(device)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------ training steps

class OpenClipTrainer:
    """open_clip's own training step (``open_clip_train.train.train_one_epoch``), CPU/GPU, fp32 or bf16 autocast."""

    def __init__(self, name: str, args, total_steps: int = 1000):
        from open_clip.loss import ClipLoss
        from open_clip_train.scheduler import cosine_lr
        self.args = args
        self.model = build_open_clip(name, args.device)
        self.model.train()
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa
        named = list(self.model.named_parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
             {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": WD}],
            lr=LR, betas=BETAS, eps=EPS)
        self.scheduler = cosine_lr(self.optimizer, LR, 10, total_steps)
        self.loss = ClipLoss()
        self.step_no = 0

    def step(self, images: torch.Tensor, texts: torch.Tensor, accum_freq: int = 1) -> torch.Tensor:
        """One optimiser step over ``images``/``texts``; ``accum_freq > 1`` runs open_clip's own feature-cache
        accumulation over that many equal micro-batches (its ``--accum-freq``)."""
        model, optimizer = self.model, self.optimizer
        self.scheduler(self.step_no)
        self.step_no += 1
        optimizer.zero_grad()
        if accum_freq == 1:
            with autocast(self.args):
                model_out = model(images, texts)
                losses = self.loss(**model_out, output_dict=True)
                total_loss = sum(losses.values())
            total_loss.backward()
        else:
            accum_images, accum_texts = images.chunk(accum_freq), texts.chunk(accum_freq)
            accum_features: dict[str, list] = {}
            with torch.no_grad():
                for im, tx in zip(accum_images, accum_texts):
                    with autocast(self.args):
                        model_out = model(im, tx)
                        for f in ("logit_scale", "logit_bias"):
                            model_out.pop(f, None)
                        for key, val in model_out.items():
                            accum_features.setdefault(key, []).append(val)
            optimizer.zero_grad()
            for j in range(accum_freq):
                with autocast(self.args):
                    model_out = model(accum_images[j], accum_texts[j])
                    inputs_no_accum = {"logit_scale": model_out.pop("logit_scale")}
                    if "logit_bias" in model_out:
                        inputs_no_accum["logit_bias"] = model_out.pop("logit_bias")
                    inputs = {key: torch.cat(acc[:j] + [model_out[key]] + acc[j + 1:])
                              for key, acc in accum_features.items()}
                    total_loss = sum(self.loss(**inputs, **inputs_no_accum, output_dict=True).values())
                    del inputs
                total_loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM, norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return total_loss.detach()

    def forward_backward(self, images, texts) -> None:
        """Forward + loss + backward only (what FlopCounterMode counts)."""
        with autocast(self.args):
            out = self.model(images, texts)
            loss = sum(self.loss(**out, output_dict=True).values())
        loss.backward()
        self.optimizer.zero_grad()


class XModalTrainer:
    """xmodal's training step: a faithful copy of the optimiser-step body of ``xmodal.training.step`` (one
    contrastive task), on the engine's own helpers and an Accelerate ``Accelerator`` configured as
    ``engine.make_accelerator`` does (except ``cpu=`` follows ``--device`` instead of CUDA availability)."""

    def __init__(self, name: str, args, grad_accum_steps: int = 1, total_steps: int = 1000,
                 variant: frozenset[str] = frozenset()):
        """``variant`` (ablations): ``"no-proj"`` builds the towers with ``projection: none`` (the open_clip towers
        already project to embed_dim: a config users can choose); ``"no-accelerate"`` runs the same step without
        Accelerate's wrappers (plain torch.autocast / backward / clip_grad_norm_ / optimizer); ``"unfused"`` builds
        AdamW without ``fused=True`` (the engine before it adopted the fused kernel)."""
        from accelerate import Accelerator

        from xmodal.config import Config, TrainConfig
        from xmodal.training.engine import param_groups, warmup_cosine
        from xmodal.training.task_data import PRETRAIN_TASK
        from xmodal.losses import build_loss
        from xmodal.losses.multitask import StaticWeighting
        self.args = args
        self.grad_accum_steps = grad_accum_steps
        cfg = Config(model=xmodal_model_config(name, "none" if "no-proj" in variant else "linear"),
                     train=TrainConfig(lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, max_grad_norm=CLIP_NORM,
                                       grad_accum_steps=grad_accum_steps, warmup_steps=10,
                                       mixed_precision="bf16" if args.precision == "bf16" else "no"))
        cfg.log.backend = "none"
        self.cfg = cfg
        self.accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=cfg.train.mixed_precision)
        torch.set_num_threads(args.threads)  # whatever Accelerate did, the same threads as the peer
        from xmodal.model import XModalModel
        model = XModalModel(cfg.model).to(args.device)
        self.task = PRETRAIN_TASK
        self.weighting = StaticWeighting({PRETRAIN_TASK: 1.0})
        optimizer = torch.optim.AdamW(param_groups(model, cfg, list(self.weighting.parameters())), lr=LR,
                                      betas=BETAS, eps=EPS, fused="unfused" not in variant)  # as the engine
        if "no-accelerate" in variant:
            self.accelerator = _PlainTorch(args)
            self.model, self.optimizer = model, optimizer
        else:
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(10, total_steps))
        self.loss_fn = build_loss("clip", local_loss=False, gather_with_grad=True)
        self.modalities = ["image", "text"]
        self.model.train()

    def _task_loss(self, batch):
        from xmodal.losses import contrastive_loss
        with self.accelerator.autocast():
            out = self.model(batch, task=None)
            return contrastive_loss(self.loss_fn, out, self.modalities, self.cfg.model.anchor)

    def step(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        from xmodal.batch import split as _split
        from xmodal.losses import contrastive_loss
        from xmodal.training.gradcache import gradcache_step
        accelerator, model = self.accelerator, self.model
        batch = {"image": images, "text": texts}
        name = self.task
        weight = lambda loss: self.weighting({name: loss})  # noqa: E731
        # --- xmodal.training.step: one_task_step(run, name) ---
        if self.grad_accum_steps == 1:
            loss = self._task_loss(batch)
            accelerator.backward(weight(loss))
            loss = loss.detach()
        else:
            micro = _split(batch, self.grad_accum_steps)

            def encode(mb):
                with accelerator.autocast():
                    return model(mb)
            loss = gradcache_step(encode, micro, lambda out: weight(
                contrastive_loss(self.loss_fn, out, self.modalities, self.cfg.model.anchor)),
                backward=accelerator.backward, no_sync=lambda: accelerator.no_sync(model))
        # --- xmodal.training.step: apply_gradients(run, ...) ---
        accelerator.clip_grad_norm_(model.parameters(), CLIP_NORM)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.unwrapped.clamp_logit_scale()
        return loss

    def forward_backward(self, images, texts) -> None:
        loss = self._task_loss({"image": images, "text": texts})
        self.accelerator.backward(loss)
        self.optimizer.zero_grad(set_to_none=True)


class _PlainTorch:
    """The Accelerator methods the step uses, as plain torch calls (the ``no-accelerate`` ablation)."""

    def __init__(self, args):
        self.args = args

    def autocast(self):
        return autocast(self.args)

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, params, max_norm):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def no_sync(self, model):
        return contextlib.nullcontext()

    def unwrap_model(self, model):
        return model


# ------------------------------------------------------------------------------------------------------ timing

def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleave(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int, device: str) -> dict[str, list[float]]:
    """Run every fn once per round, in a random (seeded) order per round so no fn always follows the same
    neighbour, ``warmup`` untimed rounds first; returns the times."""
    import random
    names = list(fns)
    rng = random.Random(1234)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = rng.sample(names, len(names))
        for n in order:
            dt = timed(fns[n], device)
            if r >= warmup:
                times[n].append(dt)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def matmul_peak_fn(device: str, precision: str) -> tuple[Callable[[], Any], float]:
    """One large matmul (fp32, or bf16 for --precision bf16 on CUDA) and its FLOPs."""
    n = 2048 if device == "cpu" else 8192
    dtype = torch.bfloat16 if (precision == "bf16" and device != "cpu") else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n ** 3


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


# ------------------------------------------------------------------------------------------------------ memory

def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def mem_reset(device: str) -> float:
    """Start a peak-memory window; returns the baseline in MiB.

    CPU: the process's resident set. Writing 5 to /proc/self/clear_refs resets the kernel's peak-RSS mark (VmHWM)
    to the current RSS, so VmHWM afterwards is the peak RSS *during the window*. CUDA: allocated bytes, and
    torch.cuda.reset_peak_memory_stats()."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2 ** 20
    Path("/proc/self/clear_refs").write_text("5")
    return _proc_status_kb("VmRSS") / 1024


def mem_peak(device: str) -> float:
    """Peak (MiB) since :func:`mem_reset`: VmHWM on CPU, max_memory_allocated on CUDA."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return _proc_status_kb("VmHWM") / 1024


def child_measure(spec: dict) -> dict:
    """Run in a fresh process: build one side, make its batch, then in a peak-memory window run ``steps`` training
    steps (the first allocates gradients and AdamW state, as in any real run). Returns peak - baseline."""
    args = argparse.Namespace(device=spec["device"], precision=spec["precision"], threads=spec["threads"],
                              seed=spec.get("seed", 0))
    setup(args)
    name, batch, accum = spec["model"], spec["batch"], spec.get("accum", 1)
    if spec["side"] == "xmodal":
        trainer = XModalTrainer(name, args, grad_accum_steps=accum)
        run = lambda im, tx: trainer.step(im, tx)  # noqa: E731
    elif spec["side"] == "open_clip":
        trainer = OpenClipTrainer(name, args)
        run = lambda im, tx: trainer.step(im, tx, accum_freq=accum)  # noqa: E731
    else:
        raise ValueError(spec["side"])
    images, texts = make_batch(name, batch, args.device, seed=spec.get("seed", 0))
    input_mb = (images.numel() * images.element_size() + texts.numel() * texts.element_size()) / 2 ** 20
    base = mem_reset(args.device)
    times = []
    for _ in range(spec["steps"]):
        times.append(timed(lambda: run(images, texts), args.device))
    peak = mem_peak(args.device)
    return {"base_mib": base, "peak_mib": peak, "delta_mib": peak - base, "input_mib": input_mb,
            "step_s": times, "params": n_params(trainer.model)}


MALLOC_MODES = ("live", "default")


def measure_in_subprocess(spec: dict, malloc: str = "live", timeout: float = 900) -> dict:
    """:func:`child_measure` in a fresh Python process (peak memory is per process, so one configuration each).

    ``malloc`` (CPU only): ``"live"`` starts the child with ``MALLOC_MMAP_THRESHOLD_=65536``, so glibc serves every
    tensor above 64 KiB from its own mmap and returns it to the OS when freed: RSS then follows the live tensors and
    the peak is what the step needs (the CPU analogue of CUDA's max_memory_allocated). ``"default"`` keeps glibc's
    dynamic threshold (up to 32 MiB), under which freed tensors stay in the heap and fragmentation can raise the
    peak RSS well above the live peak -- what a default process shows, but a property of the allocator, not of
    the step. Step times in ``"live"`` mode are slower (a page fault per fresh tensor): indicative only."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = dict(os.environ)
    if malloc == "live":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    elif malloc != "default":
        raise ValueError(f"malloc: {malloc!r} (expected one of {MALLOC_MODES})")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({spec}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------ printing

def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[h for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    def line(r):
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        if math.isnan(c):
            return "-"
        if abs(c) >= 100:
            return f"{c:.0f}"
        if abs(c) >= 10:
            return f"{c:.1f}"
        return f"{c:.3f}" if abs(c) < 1 else f"{c:.2f}"
    return str(c)


def header(args, what: str) -> str:
    import platform
    return (f"# {what}: device {args.device}, precision {args.precision}, threads {args.threads}, "
            f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} visible cores")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child_measure(json.loads(sys.argv[2]))))
    else:
        raise SystemExit("internal module of the benchmarks; run benchmarks/train_step.py etc.")
