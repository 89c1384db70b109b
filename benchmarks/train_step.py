"""Training-step throughput, peak memory and achieved FLOP/s: xmodal vs open_clip, side by side in one run.

For each model config both sides are built with the same towers (open_clip ViT + text transformer), batch,
precision and threads, then timed **interleaved** (xmodal step, open_clip step, one large matmul; random order
each round), so a neighbour stealing a core slows both alike. Reported: median step time, samples/s, the ratio
xmodal/open_clip (median of the per-round ratios, and the ratio of medians), peak memory of each side in its own
fresh subprocess (CPU: peak RSS above the pre-step RSS, via /proc/self/clear_refs + VmHWM; CUDA:
max_memory_allocated above the pre-step allocation), and the step's FLOPs (torch.utils.flop_counter over forward +
loss + backward) divided by the step time, as a fraction of the machine's measured matmul peak (same rounds).

xmodal's side is a faithful copy of the engine's optimiser-step body (see benchmarks/_common.py, XModalTrainer);
open_clip's is open_clip_train's train_one_epoch step. ``bench-vit-micro`` at batch 4 has almost no compute: its step
time is the fixed per-step cost (Python, op dispatch, the optimiser's per-tensor loop), the regime of a small model on
a GPU. Contention only adds time, so the ratio of the best (minimum) times is printed too.

    python benchmarks/train_step.py                     # xmodal-vit-tiny @64 and bench-vit-small @32, fp32, 2 threads
    python benchmarks/train_step.py --quick             # smoke run
    python benchmarks/train_step.py --profile           # + the ops whose count differs (torch.profiler)
    python benchmarks/train_step.py --models bench-vit-micro --no-memory --ablate   # + what each part costs
    python benchmarks/train_step.py --device cuda --precision bf16 --models ViT-B-32 --batch 256
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402


def op_counts(step, n: int = 2) -> dict[str, tuple[float, float]]:
    """{op: (calls per step, self CPU ms per step)} over ``n`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    return {e.key: (e.count / n, e.self_cpu_time_total / n / 1e3) for e in prof.key_averages()}


ABLATIONS = {"xmodal (engine step)": frozenset(), "xmodal, projection: none": frozenset({"no-proj"}),
             "xmodal, no Accelerate wrappers": frozenset({"no-accelerate"}),
             "xmodal, unfused AdamW (the engine before)": frozenset({"unfused"})}


def ablate(args, steps: int) -> None:
    """What each part of xmodal's step costs: variants of the step, interleaved with open_clip's."""
    rows = []
    for name in args.ablate_models.split(","):
        batch = args.batch or C.DEFAULT_BATCH.get(name, 32)
        images, texts = C.make_batch(name, batch, args.device, seed=args.seed)
        oc = C.OpenClipTrainer(name, args)
        trainers = {label: C.XModalTrainer(name, args, variant=v) for label, v in ABLATIONS.items()}
        fns = {label: (lambda t=t: t.step(images, texts)) for label, t in trainers.items()}
        fns["open_clip"] = lambda: oc.step(images, texts)
        rounds = steps * 5 if name == "bench-vit-micro" else steps
        times = C.interleave(fns, rounds, args.warmup, args.device)
        for label, ts in times.items():
            rows.append([name, batch, label, C.median(ts) * 1e3, min(ts) * 1e3,
                         C.median([o / x for o, x in zip(times["open_clip"], ts)]), min(times["open_clip"]) / min(ts)])
    print()
    print(C.table(["model", "batch", "step variant", "step ms (median)", "(best)",
                   "throughput ratio vs open_clip (median per round)", "(ratio of best)"], rows))


def main() -> None:
    p = C.common_parser(__doc__.split("\n")[0])
    p.add_argument("--models", default=None,
                   help="comma-separated open_clip config names (default xmodal-vit-tiny,bench-vit-small; "
                        "ViT-B-32 also works)")
    p.add_argument("--batch", type=int, default=None, help="batch size for every model (default: per model)")
    p.add_argument("--mem-steps", type=int, default=2,
                   help="steps in each memory subprocess (the 2nd step is the first with AdamW state: the peak)")
    p.add_argument("--profile", action="store_true",
                   help="also profile 2 steps per side (torch.profiler) and print the ops whose count differs")
    p.add_argument("--ablate", action="store_true",
                   help="also time xmodal variants (projection: none / no Accelerate wrappers / unfused AdamW) "
                        "against open_clip, interleaved, on --ablate-models")
    p.add_argument("--ablate-models", default="bench-vit-micro,xmodal-vit-tiny")
    p.add_argument("--malloc", default="live,default",
                   help="CPU peak-memory modes, comma-separated: live (MALLOC_MMAP_THRESHOLD_=65536: RSS follows "
                        "live tensors) and/or default (glibc's default, fragmentation included)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = p.parse_args()
    C.setup(args)
    models = (args.models or ("xmodal-vit-tiny" if args.quick
                              else "xmodal-vit-tiny,bench-vit-small,bench-vit-micro")).split(",")
    steps = args.steps or (3 if args.quick else 10)
    print(C.header(args, "training step, xmodal vs open_clip"))
    rows, ratio_rows, profiles = [], [], []
    mm_fn, mm_flops = C.matmul_peak_fn(args.device, args.precision)
    for name in models:
        batch = args.batch or C.DEFAULT_BATCH.get(name, 32)
        xm = C.XModalTrainer(name, args)
        oc = C.OpenClipTrainer(name, args)
        images, texts = C.make_batch(name, batch, args.device, seed=args.seed)
        flops = {"xmodal": C.count_flops(lambda: xm.forward_backward(images, texts)),
                 "open_clip": C.count_flops(lambda: oc.forward_backward(images, texts))}
        rounds = steps * 5 if name == "bench-vit-micro" else steps  # short steps: more rounds
        times = C.interleave({"xmodal": lambda: xm.step(images, texts), "open_clip": lambda: oc.step(images, texts),
                              "matmul": mm_fn}, rounds, args.warmup, args.device)
        if args.profile:
            profiles.append((name, op_counts(lambda: xm.step(images, texts)),
                             op_counts(lambda: oc.step(images, texts))))
        peak = mm_flops / C.median(times["matmul"])
        best_peak = mm_flops / min(times["matmul"])
        mem: dict[tuple[str, str], dict] = {}
        modes = [] if args.no_memory else (["live"] if args.device.startswith("cuda") else args.malloc.split(","))
        for mode in modes:
            for side in ("xmodal", "open_clip"):
                mem[side, mode] = C.measure_in_subprocess(
                    dict(side=side, model=name, batch=batch, steps=args.mem_steps, device=args.device,
                         precision=args.precision, threads=args.threads, seed=args.seed), malloc=mode)
        get = lambda side, mode: mem[side, mode]["delta_mib"] if (side, mode) in mem else float("nan")  # noqa
        for side, trainer in (("xmodal", xm), ("open_clip", oc)):
            t = C.median(times[side])
            rows.append([name, side, f"{C.n_params(trainer.model) / 1e6:.2f}M", batch, t * 1e3, batch / t,
                         get(side, "live"), get(side, "default"), flops[side] / 1e9,
                         flops[side] / t / 1e9, flops[side] / t / peak])
        per_round = [o / x for x, o in zip(times["xmodal"], times["open_clip"])]
        ratio_rows.append([name, batch, C.median(per_round),
                           C.median(times["open_clip"]) / C.median(times["xmodal"]),
                           min(times["open_clip"]) / min(times["xmodal"]),
                           get("xmodal", "live") / get("open_clip", "live"),
                           get("xmodal", "default") / get("open_clip", "default"),
                           flops["xmodal"] / flops["open_clip"], peak / 1e9, best_peak / 1e9])
        xm = oc = None  # free both before the next model is built
    print()
    print(C.table(["model", "side", "params", "batch", "step ms (median)", "samples/s", "peak mem MiB (live)",
                   "(glibc default)", "GFLOP/step", "GFLOP/s", "of matmul peak"], rows))
    print()
    print(C.table(["model", "batch", "throughput ratio xmodal/open_clip (median per round)", "ratio of medians",
                   "ratio of best times", "peak memory ratio (live)", "(glibc default)", "FLOP ratio",
                   "matmul peak GFLOP/s (median)", "(best)"], ratio_rows))
    for name, xs, os_ in profiles:
        n_x, n_o = sum(c for c, _ in xs.values()), sum(c for c, _ in os_.values())
        t_x, t_o = sum(t for _, t in xs.values()), sum(t for _, t in os_.values())
        print(f"\nprofile {name}: ops per step xmodal {n_x:.0f}, open_clip {n_o:.0f}; self CPU ms per step "
              f"xmodal {t_x:.0f}, open_clip {t_o:.0f} (profiled, so slower than above). Ops whose count differs:")
        diff = sorted((k for k in set(xs) | set(os_) if xs.get(k, (0, 0))[0] != os_.get(k, (0, 0))[0]),
                      key=lambda k: -abs(xs.get(k, (0, 0))[1] - os_.get(k, (0, 0))[1]))
        print(C.table(["op", "xmodal count", "open_clip count", "xmodal self ms", "open_clip self ms"],
                      [[k[:60], xs.get(k, (0, 0))[0], os_.get(k, (0, 0))[0], xs.get(k, (0, 0))[1],
                        os_.get(k, (0, 0))[1]] for k in diff[:15]]))
    if args.ablate:
        ablate(args, steps)
    print("\ntargets: throughput ratio >= 1.0, peak memory ratio <= 1.0. FLOPs: forward + loss + backward "
          "(FlopCounterMode; the optimiser's elementwise work is not counted). Peak memory: "
          + ("max_memory_allocated above the pre-step allocation" if args.device.startswith("cuda") else
             "peak RSS above the pre-step RSS, fresh subprocess per side, %d steps (includes gradients and AdamW "
             "state, allocated by the first step); live: MALLOC_MMAP_THRESHOLD_=65536 so RSS follows the live "
             "tensors; glibc default: heap fragmentation included" % args.mem_steps) + f"; {steps} timed rounds after "
          f"{args.warmup} warm-up rounds.")


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
