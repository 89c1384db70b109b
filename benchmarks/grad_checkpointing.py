"""Gradient checkpointing (``TowerConfig.grad_checkpointing``): peak memory and step time of a contrastive training
step with and without it, per pair of towers.

The step: ``XModalModel`` forward of both towers, CLIP loss (``xmodal.losses.contrastive_loss``), backward, gradient
clipping, fused AdamW -- the engine's step body without Accelerate. Peak memory: each (pair, variant) in a fresh
subprocess, 2 steps in a peak-memory window opened after the model, optimiser and batch are built (the 2nd step is
the first with AdamW state), measured as in benchmarks/_common.py (CPU: peak RSS via /proc/self/clear_refs + VmHWM,
with ``MALLOC_MMAP_THRESHOLD_=65536`` so RSS follows the live tensors; CUDA: max_memory_allocated). Step time: both
variants in this process, interleaved (random order each round) on the same batch; ratio = median of per-round
ratios. Both variants start from the same weights.

    python benchmarks/grad_checkpointing.py --threads 1
    python benchmarks/grad_checkpointing.py --quick
    python benchmarks/grad_checkpointing.py --device cuda --pairs vit-tiny --batch 256
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402

AUDIO = {"sample_rate": 16000, "n_mels": 64, "max_seconds": 5.0}  # 501 frames

# name -> (towers as TowerConfig kwargs, default batch). Every encoder trainable (checkpointing is off when frozen).
PAIRS: dict[str, tuple[dict[str, dict], int]] = {
    "vit-tiny": ({"image": dict(kind="open_clip", name="xmodal-vit-tiny", image_size=64),
                  "text": dict(kind="open_clip", name="xmodal-vit-tiny", context_length=32)}, 64),
    "cnn+lstm": ({"image": dict(kind="cnn", image_size=64),
                  "text": dict(kind="lstm", context_length=32, options={"layers": 2})}, 64),
    "lite0+minilm": ({"image": dict(kind="efficientnet_lite0", image_size=128),
                      "text": dict(kind="hf", name="minilm", context_length=32)}, 32),
    "audio-transformer+lstm": ({"audio": dict(kind="transformer", options=AUDIO),
                                "text": dict(kind="lstm", context_length=32)}, 32),
    "audio-cnn+lstm": ({"audio": dict(kind="cnn", options=AUDIO), "text": dict(kind="lstm", context_length=32)}, 32),
}


def build(pair: str, ckpt: bool, device: str, seed: int = 0):
    from xmodal.config import ModelConfig, TowerConfig
    from xmodal.model import XModalModel
    towers = {m: TowerConfig(**kw, grad_checkpointing=ckpt, augment=False) for m, kw in PAIRS[pair][0].items()}
    torch.manual_seed(seed)
    return XModalModel(ModelConfig(embed_dim=256, towers=towers)).to(device).train()


def make_batch(pair: str, batch: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, kw in PAIRS[pair][0].items():
        if m == "image":
            out[m] = torch.randn(batch, 3, kw["image_size"], kw["image_size"], generator=g)
        elif m == "audio":
            out[m] = torch.randn(batch, AUDIO["n_mels"], 501, generator=g)
        else:  # right-padded ids, lengths 3..L; [CLS]/[SEP]-like ends for hf, SOT/EOT for BPE
            L = kw["context_length"]
            sot, eot, hi = (101, 102, 30000) if kw["kind"] == "hf" else (C.SOT, C.EOT, C.SOT)
            ids = torch.zeros(batch, L, dtype=torch.long)
            for i, n in enumerate(torch.randint(1, L - 1, (batch,), generator=g).tolist()):
                ids[i, 0], ids[i, n + 1] = sot, eot
                ids[i, 1:n + 1] = torch.randint(1000, hi, (n,), generator=g)
            out[m] = ids
    return {k: v.to(device) for k, v in out.items()}


class Step:
    def __init__(self, model):
        from xmodal.losses import build_loss
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=C.LR, betas=C.BETAS, eps=C.EPS, weight_decay=C.WD,
                                     fused=True)
        self.loss_fn = build_loss("clip")

    def __call__(self, batch, args):
        from xmodal.losses import contrastive_loss
        with C.autocast(args):
            loss = contrastive_loss(self.loss_fn, self.model(batch), list(self.model.towers))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), C.CLIP_NORM)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()


def child(spec: dict) -> None:
    import argparse
    args = argparse.Namespace(device=spec["device"], precision=spec["precision"], threads=spec["threads"], seed=0)
    C.setup(args)
    step = Step(build(spec["pair"], spec["ckpt"], args.device))
    batch = make_batch(spec["pair"], spec["batch"], args.device)
    base = C.mem_reset(args.device)
    for _ in range(spec["steps"]):
        step(batch, args)
    peak = C.mem_peak(args.device)
    print(json.dumps({"delta_mib": peak - base}))


def measure(spec: dict) -> float:
    env = dict(os.environ)
    if not spec["device"].startswith("cuda"):
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # RSS follows the live tensors (see _common.measure_in_subprocess)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True, cwd=str(C.ROOT), env=env, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({spec}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["delta_mib"]


def main() -> None:
    p = C.common_parser(__doc__.split("\n")[0])
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated subset of {', '.join(PAIRS)}")
    p.add_argument("--batch", type=int, default=None, help="batch for every pair (default: per pair)")
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument("--no-time", action="store_true", help="peak memory only")
    args = p.parse_args()
    C.setup(args)
    rounds = args.steps or (2 if args.quick else 4)
    pairs = args.pairs.split(",")
    print(C.header(args, "gradient checkpointing"))
    rows = []
    for pair in pairs:
        batch = args.batch or (PAIRS[pair][1] // (4 if args.quick else 1))
        spec = dict(pair=pair, batch=batch, steps=args.mem_steps, device=args.device, precision=args.precision,
                    threads=args.threads)
        off, on = measure({**spec, "ckpt": False}), measure({**spec, "ckpt": True})
        # In the window, besides activations: gradients + AdamW's two moments, 3x the parameters (fp32).
        state = 3 * 4 * C.n_params(build(pair, False, "cpu")) / 2 ** 20
        row = [pair, batch, off, on, on / off, state, (on - state) / (off - state)]
        if not args.no_time:
            data = make_batch(pair, batch, args.device)
            plain, ckpt = Step(build(pair, False, args.device)), Step(build(pair, True, args.device))
            t = C.interleave({"off": lambda: plain(data, args), "on": lambda: ckpt(data, args)}, rounds, 1,
                             args.device)
            row += [C.median(t["off"]) * 1e3, C.median(t["on"]) * 1e3,
                    C.median([b / a for a, b in zip(t["off"], t["on"])])]
            del plain, ckpt
        else:
            row += [float("nan")] * 3
        rows.append(row)
        print(f"  measured {pair}", flush=True)
    print()
    print(C.table(["towers", "batch", "peak MiB off", "peak MiB on", "memory on/off", "of which grads+AdamW MiB",
                   "rest on/off", "step ms off", "step ms on", "time on/off"], rows))
    print(f"\npeak = growth of peak RSS (CPU, live tensors) / max_memory_allocated (CUDA) over {args.mem_steps} "
          f"steps in a fresh process; time: median of {rounds} interleaved rounds, ratio = median per-round ratio.")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
    else:
        main()
