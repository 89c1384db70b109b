"""Big contrastive batches in small memory: GradCache (``train.grad_accum_steps``) vs a plain step.

Each configuration runs in its own fresh subprocess (peak memory is per process): ``--mem-steps`` training steps of
xmodal's engine step body (see benchmarks/_common.py) inside a peak-memory window opened after the model and
optimiser are built (CPU: peak RSS above the pre-step RSS via /proc/self/clear_refs + VmHWM; CUDA:
max_memory_allocated above the pre-step allocation). On CPU each configuration runs twice: ``live`` with
``MALLOC_MMAP_THRESHOLD_=65536`` (every tensor above 64 KiB in its own mmap, returned when freed, so the peak RSS is
the peak of live tensors -- the CPU analogue of CUDA's max_memory_allocated) and ``default`` (glibc's dynamic mmap
threshold: freed tensors stay in the heap and fragmentation adds to the peak RSS). The window includes the step's
input tensors, gradients and the AdamW state (allocated by the first step), which are the same for every
configuration except the inputs.

* ``xmodal plain B``: ``grad_accum_steps 1``, batch B;
* ``xmodal GradCache kB``: ``grad_accum_steps k``, micro-batch B, one contrastive loss over k*B pairs;
* ``xmodal plain kB`` (reference, ``--no-big`` skips it): what the same contrastive batch costs without GradCache;
* ``open_clip accum_freq k`` (peer reference): open_clip_train's own ``--accum-freq k`` (feature cache, but one loss
  per micro-batch re-computation) at micro-batch B.

Then, in this process, the step time of the kB configurations, interleaved (random order each round), and one
step's loss and parameter gradients of GradCache (k micro-batches) against one plain forward/backward over the same
k*B rows: max abs difference (tested in tests/test_gradcache.py; printed here).

    python benchmarks/gradcache_memory.py --threads 1
    python benchmarks/gradcache_memory.py --quick
    python benchmarks/gradcache_memory.py --device cuda --precision bf16 --model ViT-B-32 --micro-batch 128
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402


def equality(args, name: str, micro: int, k: int) -> tuple[float, float, float]:
    """(|loss diff|, max |grad diff|, max |grad|) between GradCache over k micro-batches and one plain step."""
    from xmodal.batch import split as _split
    from xmodal.losses import contrastive_loss
    from xmodal.training.gradcache import gradcache_step
    from xmodal.losses import build_loss
    torch.manual_seed(args.seed)
    model = C.build_xmodal(name, args.device).train()
    loss_fn = build_loss("clip")
    images, texts = C.make_batch(name, micro * k, args.device, seed=args.seed + 1)
    batch = {"image": images, "text": texts}
    mods = ["image", "text"]
    with C.autocast(args):
        plain = contrastive_loss(loss_fn, model(batch), mods)
    plain.backward()
    g_plain = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    def encode(mb):
        with C.autocast(args):
            return model(mb)
    cached = gradcache_step(encode, _split(batch, k), lambda out: contrastive_loss(loss_fn, out, mods))
    g_cache = {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
    assert g_plain.keys() == g_cache.keys()
    diff = max(float((g_plain[n] - g_cache[n]).abs().max()) for n in g_plain)
    scale = max(float(g.abs().max()) for g in g_plain.values())
    return abs(float(plain.detach()) - float(cached)), diff, scale


def main() -> None:
    p = C.common_parser(__doc__.split("\n")[0])
    p.add_argument("--model", default="xmodal-vit-tiny", help="open_clip config (default xmodal-vit-tiny)")
    p.add_argument("--micro-batch", type=int, default=None, help="B (default 32; --quick 16)")
    p.add_argument("--k", type=int, default=8, help="micro-batches per step (default 8)")
    p.add_argument("--mem-steps", type=int, default=None,
                   help="steps per subprocess (default 2: the 2nd is the first with AdamW state, the peak)")
    p.add_argument("--malloc", default="live,default",
                   help="CPU peak-memory modes, comma-separated: live (MALLOC_MMAP_THRESHOLD_=65536: RSS follows "
                        "live tensors) and/or default (glibc's default, fragmentation included)")
    p.add_argument("--no-big", action="store_true", help="skip the plain k*B reference")
    p.add_argument("--no-time", action="store_true", help="skip the interleaved step-time comparison")
    p.add_argument("--no-peer", action="store_true", help="skip open_clip's accum_freq reference")
    args = p.parse_args()
    C.setup(args)
    micro = args.micro_batch or (16 if args.quick else 32)
    k = args.k
    steps = args.mem_steps or 2
    name = args.model
    print(C.header(args, f"GradCache memory, {name}, micro-batch {micro}, k {k}"))
    base = dict(model=name, steps=steps, device=args.device, precision=args.precision, threads=args.threads,
                seed=args.seed)
    configs = [("xmodal plain B", dict(side="xmodal", batch=micro, accum=1)),
               ("xmodal GradCache kB", dict(side="xmodal", batch=micro * k, accum=k))]
    if not args.no_big:
        configs.append(("xmodal plain kB", dict(side="xmodal", batch=micro * k, accum=1)))
    if not args.no_peer:
        configs.append(("open_clip accum_freq k", dict(side="open_clip", batch=micro * k, accum=k)))
    modes = ["live"] if args.device.startswith("cuda") else args.malloc.split(",")
    results = {}
    for label, spec in configs:
        for mode in modes:
            results[label, mode] = C.measure_in_subprocess({**base, **spec}, malloc=mode)
        print(f"  measured {label}", flush=True)
    rows = []
    for label, spec in configs:
        row = [label, spec["batch"], spec["batch"] // spec["accum"]]
        for mode in modes:
            r = results[label, mode]
            row += [r["delta_mib"], r["delta_mib"] / results["xmodal plain B", mode]["delta_mib"]]
        r = results[label, modes[-1]]
        t = C.median(r["step_s"][1:] or r["step_s"])  # the first step also allocates gradients and AdamW state
        rows.append(row + [results[label, modes[0]]["input_mib"], t, spec["batch"] / t])
    cols = []
    for mode in modes:
        cols += [f"peak MiB ({mode})", f"vs plain B ({mode})"]
    print()
    print(C.table(["configuration", "contrastive batch", "micro-batch"] + cols
                  + ["inputs MiB", f"step s ({modes[-1]}, median)", "samples/s"], rows))
    if not args.no_time:
        # Step time, interleaved in this process (the subprocess times above are not): same contrastive batch kB.
        images, texts = C.make_batch(name, micro * k, args.device, seed=args.seed)
        gcache = C.XModalTrainer(name, args, grad_accum_steps=k)
        fns = {"xmodal GradCache kB": lambda: gcache.step(images, texts)}
        if not args.no_peer:
            peer = C.OpenClipTrainer(name, args)
            fns["open_clip accum_freq k"] = lambda: peer.step(images, texts, accum_freq=k)
        if not args.no_big:
            big = C.XModalTrainer(name, args)
            fns["xmodal plain kB"] = lambda: big.step(images, texts)
        rounds = args.steps or (2 if args.quick else 4)
        times = C.interleave(fns, rounds, 1, args.device)
        trow = [[n, micro * k, C.median(ts), micro * k / C.median(ts),
                 C.median([a / b for a, b in zip(times["xmodal GradCache kB"], ts)])] for n, ts in times.items()]
        print()
        print(C.table(["configuration (interleaved)", "contrastive batch", "step s (median)", "samples/s",
                       "GradCache time / this"], trow))
        del gcache, fns
    dl, dg, scale = equality(args, name, micro, k)
    print(f"\nloss equality, one step over {micro * k} rows: |loss(plain) - loss(GradCache)| = {dl:.2e}; "
          f"max |grad diff| = {dg:.2e} (largest gradient entry {scale:.2e})")
    m = modes[0]
    ref = results["xmodal plain B", m]["delta_mib"]
    gc_ratio = results["xmodal GradCache kB", m]["delta_mib"] / ref
    print(f"\nbar: an effective batch >= {k}x larger at the plain batch's memory -> GradCache {micro * k} pairs "
          f"at {gc_ratio:.2f}x the peak memory ({m}) of plain {micro}"
          + (f" (plain {micro * k}: {results['xmodal plain kB', m]['delta_mib'] / ref:.2f}x)" if not args.no_big
             else "")
          + ". Step times of the memory subprocesses are not interleaved: indicative only.")


if __name__ == "__main__":
    main()
