"""Fast paths for xmodal's towers: inference_mode vs no_grad, channels_last for conv towers, torch.compile.

Every comparison is timed interleaved in one run (random order each round) on the same inputs; speedup = baseline time /
fast-path time, median of the per-round ratios (> 1: the fast path helps). Except channels_last (adopted by the conv
towers, switched off for the baseline), the fast paths are applied from outside, to towers built by xmodal.

1. ``torch.inference_mode()`` vs ``torch.no_grad()`` for a tower forward (what ``model.encode`` runs): open_clip
   image and text towers (``--model``), the small CNN tower.
2. ``channels_last`` for the conv towers (image CNN 64 px, EfficientNet-Lite0 224 px -- random init: the speed does
   not depend on the weights -- and the audio CNN on a 64 x 501 log-mel): the towers as xmodal builds them
   (activations channels-last) vs ``encoder.channels_last = False`` (NCHW) vs model and input converted from outside;
   inference forward, and a training forward + backward.
3. AdamW: torch's default implementation (on CPU the per-tensor for-loop) vs ``foreach=True`` vs ``fused=True``
   (what ``engine.train`` would pass to ``torch.optim.AdamW``), timed against a forward + backward for scale.
4. ``torch.compile`` (default inductor) of the open_clip image tower: compile time of the first call, then eager
   vs compiled, for inference and for a training forward + backward. Runs in a subprocess with a time limit
   (``--compile-timeout``) and a fresh inductor cache (a cold compile, as a first run sees it; ``--warm-cache``
   reuses the on-disk cache); whatever finished before the limit is reported.

    python benchmarks/fast_paths.py --threads 1
    python benchmarks/fast_paths.py --quick
    python benchmarks/fast_paths.py --device cuda --precision bf16
"""
from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402


def tower(kind: str, args, name: str | None = None, image_size: int = 64, modality: str = "image"):
    from xmodal.config import TowerConfig
    from xmodal.model import Tower
    from xmodal.modalities import build_encoder
    if kind == "open_clip":
        size, ctx = C.model_dims(name)
        cfg = TowerConfig(kind="open_clip", name=name, image_size=size, context_length=ctx)
    else:
        cfg = TowerConfig(kind=kind, image_size=image_size)
    enc, feat_dim = build_encoder(modality, cfg)
    return Tower(enc, feat_dim, 256).to(args.device)


def speedup(base: list[float], fast: list[float]) -> float:
    return C.median([b / f for b, f in zip(base, fast)])


def section_inference_mode(args, steps: int, batch: int) -> list[list]:
    rows = []
    images, texts = C.make_batch(args.model, batch, args.device, seed=args.seed)
    cnn_x = torch.randn(batch, 3, 64, 64, device=args.device)
    cases = [("open_clip image", tower("open_clip", args, args.model), images),
             ("open_clip text", tower("open_clip", args, args.model, modality="text"), texts),
             ("cnn image 64px", tower("cnn", args), cnn_x)]
    for label, tw, x in cases:
        tw.eval()

        def run(mode, tw=tw, x=x):
            def f():
                with mode(), C.autocast(args):
                    return tw(x)
            return f
        t = C.interleave({"no_grad": run(torch.no_grad), "inference_mode": run(torch.inference_mode)},
                         steps, args.warmup, args.device)
        rows.append([label, batch, C.median(t["no_grad"]) * 1e3, C.median(t["inference_mode"]) * 1e3,
                     speedup(t["no_grad"], t["inference_mode"])])
    return rows


AUDIO = {"sample_rate": 16000, "n_mels": 64, "max_seconds": 5.0}  # [64, 501] log-mel


def section_channels_last(args, steps: int, quick: bool) -> list[list]:
    """The conv towers as xmodal builds them (activations channels-last: the input is converted, the weights stay
    NCHW) vs the same tower with ``encoder.channels_last = False`` (NCHW throughout), and vs converting model and
    input from outside (``.to(memory_format=torch.channels_last)``, weights too). Same weights, same input."""
    rows = []
    cases = [("image", "cnn", dict(image_size=64), (3, 64, 64), 64)]
    if not quick:
        cases += [("image", "efficientnet_lite0", dict(image_size=224), (3, 224, 224), 16),
                  ("audio", "cnn", dict(options=AUDIO), (64, 501), 16)]
    from xmodal.config import TowerConfig
    from xmodal.model import Tower
    from xmodal.modalities import build_encoder
    for modality, kind, kw, shape, batch in cases:
        enc, feat_dim = build_encoder(modality, TowerConfig(kind=kind, **kw))
        xmodal_cl = Tower(enc, feat_dim, 256).to(args.device)
        nchw = copy.deepcopy(xmodal_cl)
        nchw.encoder.channels_last = False
        outside = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
        x = torch.randn(batch, *shape, device=args.device)
        x_cl = x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
        with torch.no_grad():
            diff = float((xmodal_cl.eval()(x) - nchw.eval()(x)).abs().max())
        for mode in ("inference", "train fwd+bwd"):
            def run(tw, inp, mode=mode):
                def f():
                    if mode == "inference":
                        tw.eval()
                        with torch.inference_mode(), C.autocast(args):
                            return tw(inp)
                    tw.train()
                    with C.autocast(args):
                        out = tw(inp)
                    out.float().pow(2).sum().backward()
                    tw.zero_grad(set_to_none=True)
                return f
            t = C.interleave({"nchw": run(nchw, x), "xmodal": run(xmodal_cl, x), "outside": run(outside, x_cl)},
                             steps, args.warmup, args.device)
            label = f"{modality} {kind} " + ("x".join(map(str, shape[-2:])))
            rows.append([label, mode, batch, C.median(t["nchw"]) * 1e3, C.median(t["xmodal"]) * 1e3,
                         speedup(t["nchw"], t["xmodal"]), C.median(t["outside"]) * 1e3,
                         speedup(t["nchw"], t["outside"]), diff])
    return rows


def section_optimizer(args, steps: int, batch: int) -> list[list]:
    """AdamW implementations on the parameters of an xmodal model (open_clip towers of ``--model``): the default
    (on CPU torch picks the per-tensor for-loop; on CUDA foreach), ``foreach=True`` and ``fused=True``; each timed
    as clip_grad_norm_ + step + zero_grad on fixed random gradients. A forward + backward of the same model at
    ``--batch`` is timed in the same rounds, for scale."""
    torch.manual_seed(args.seed)
    base = C.build_xmodal(args.model, args.device).train()
    images, texts = C.make_batch(args.model, batch, args.device, seed=args.seed)
    variants = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    models = {k: copy.deepcopy(base) for k in variants}
    grads = [torch.randn_like(p) * 1e-3 for p in base.parameters()]
    opts = {}
    for k, kw in variants.items():
        try:
            opts[k] = torch.optim.AdamW(models[k].parameters(), lr=C.LR, betas=C.BETAS, eps=C.EPS,
                                        weight_decay=C.WD, **kw)
        except (RuntimeError, ValueError) as e:
            print(f"AdamW {k}: not available here ({e})")

    def opt_step(k):
        def f():
            for p, g in zip(models[k].parameters(), grads):
                p.grad = g.clone()
            torch.nn.utils.clip_grad_norm_(models[k].parameters(), C.CLIP_NORM)
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
        return f

    def fwd_bwd():
        from xmodal.losses import contrastive_loss
        from xmodal.losses import build_loss
        with C.autocast(args):
            loss = contrastive_loss(build_loss("clip"), base({"image": images, "text": texts}), ["image", "text"])
        loss.backward()
        base.zero_grad(set_to_none=True)
    fns = {k: opt_step(k) for k in opts}
    fns["forward+backward"] = fwd_bwd
    t = C.interleave(fns, steps, args.warmup, args.device)
    ref = t["forward+backward"]
    return [[f"AdamW {k}", C.median(t[k]) * 1e3, C.median(t["default"]) / C.median(t[k]) if k != "default" else 1.0,
             C.median(t[k]) / C.median(ref)] for k in opts] + [[f"forward+backward (batch {batch})",
                                                               C.median(ref) * 1e3, float("nan"), 1.0]]


def compile_child(spec: dict) -> None:
    """Subprocess: one JSON line per finished measurement (so a timeout keeps what was done)."""
    args = argparse.Namespace(**spec)
    C.setup(args)
    images, _ = C.make_batch(args.model, args.batch, args.device, seed=args.seed)
    for mode in ("inference", "train fwd+bwd"):
        eager = tower("open_clip", args, args.model)
        compiled_module = copy.deepcopy(eager)
        compiled = torch.compile(compiled_module)

        def run(tw, mode=mode):
            def f():
                if mode == "inference":
                    with torch.inference_mode(), C.autocast(args):
                        return tw(images)
                with C.autocast(args):
                    out = tw(images)
                out.float().pow(2).sum().backward()
            return f
        for module in (eager, compiled_module):
            module.train(mode != "inference")
        t0 = time.perf_counter()
        run(compiled)()
        C.sync(args.device)
        compile_s = time.perf_counter() - t0
        t = C.interleave({"eager": run(eager), "compiled": run(compiled)}, args.steps, 1, args.device)
        print(json.dumps({"mode": mode, "compile_s": compile_s, "eager_ms": C.median(t["eager"]) * 1e3,
                          "compiled_ms": C.median(t["compiled"]) * 1e3,
                          "speedup": speedup(t["eager"], t["compiled"])}), flush=True)


def section_compile(args, steps: int, batch: int) -> tuple[list[list], str]:
    spec = dict(device=args.device, precision=args.precision, threads=args.threads, seed=args.seed,
                model=args.model, batch=batch, steps=steps)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-child", json.dumps(spec)]
    note = ""
    t0 = time.perf_counter()
    import os
    import tempfile
    env = dict(os.environ)
    cache = tempfile.TemporaryDirectory(prefix="xmodal-bench-inductor-")
    if not args.warm_cache:  # a cold compile, as a user's first run sees it (inductor caches on disk otherwise)
        env["TORCHINDUCTOR_CACHE_DIR"] = cache.name
        env["TRITON_CACHE_DIR"] = os.path.join(cache.name, "triton")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout, cwd=str(C.ROOT),
                              env=env)
        out, err = proc.stdout, proc.stderr
        if proc.returncode != 0:
            note = f"compile child failed (rc {proc.returncode}): {err.strip().splitlines()[-1] if err else ''}"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        note = f"stopped after the {args.compile_timeout:.0f} s limit"
    cache.cleanup()
    rows = []
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            rows.append([f"open_clip image ({args.model})", r["mode"], batch, r["compile_s"], r["eager_ms"],
                         r["compiled_ms"], r["speedup"]])
    return rows, note + f" (compile section wall time {time.perf_counter() - t0:.0f} s)"


def main() -> None:
    p = C.common_parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="xmodal-vit-tiny", help="open_clip config of the towers")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--compile-timeout", type=float, default=None, help="seconds (default 300; --quick 150)")
    p.add_argument("--warm-cache", action="store_true",
                   help="let torch.compile reuse its on-disk cache (default: a fresh cache, i.e. a cold compile)")
    p.add_argument("--sections", default="inference_mode,channels_last,optimizer,compile",
                   help="comma-separated subset of inference_mode,channels_last,optimizer,compile")
    args = p.parse_args()
    C.setup(args)
    steps = args.steps or (3 if args.quick else 8)
    args.compile_timeout = args.compile_timeout or (150 if args.quick else 300)
    print(C.header(args, "fast paths"))
    sections = set(args.sections.split(","))
    if "inference_mode" in sections:
        rows = section_inference_mode(args, steps, args.batch)
        print()
        print(C.table(["tower", "batch", "no_grad ms", "inference_mode ms", "speedup"], rows), flush=True)
    if "channels_last" in sections:
        rows = section_channels_last(args, steps, args.quick)
        print()
        print(C.table(["tower", "mode", "batch", "NCHW ms", "xmodal (channels_last input) ms", "speedup",
                       "model+input channels_last ms", "speedup", "max |out diff|"], rows), flush=True)
    if "optimizer" in sections:
        rows = section_optimizer(args, steps, args.batch)
        print()
        print(C.table(["optimizer step (clip + step + zero_grad)", "ms (median)", "speedup vs default",
                       "time / forward+backward"], rows), flush=True)
    if "compile" in sections:
        rows, note = section_compile(args, steps, args.batch)
        print()
        if rows:
            print(C.table(["tower", "mode", "batch", "compile s (first call)", "eager ms", "compiled ms",
                           "speedup"], rows))
        print(f"torch.compile: {note.strip() or 'done'}")
    print(f"\nspeedup = baseline / fast path, median of per-round ratios over {steps} interleaved rounds "
          f"after {args.warmup} warm-up rounds; > 1 helps.")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--compile-child":
        compile_child(json.loads(sys.argv[2]))
    else:
        main()
