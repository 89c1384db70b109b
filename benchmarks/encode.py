"""Encode throughput: xmodal ``model.encode`` and xmodal's towers vs open_clip's ``encode_image`` / ``encode_text``.

Same towers (same open_clip config), same preprocessed tensors (images ``[N, 3, H, W]``, BPE ids ``[N, L]``), same
chunking (``--batch`` rows per forward), same precision (bf16: autocast around both), same threads; all variants
timed interleaved in one run (random order each round). Variants per modality:

* ``open_clip``: ``model.encode_image(x, normalize=True)`` per chunk under ``torch.no_grad()`` (open_clip's README
  usage), results concatenated;
* ``open_clip inference_mode``: the same under ``torch.inference_mode()``;
* ``xmodal.encode``: ``model.encode(modality, tensor, batch_size=B)`` (inference_mode inside; returns float32 on
  the CPU, so on CUDA it includes the device-to-host copy of the ``[N, embed_dim]`` result);
* ``xmodal tower``: ``model.towers[modality](chunk)`` under ``torch.no_grad()``.

Ratio = open_clip time / xmodal time (>= 1.0: xmodal is at least as fast), median of per-round ratios.

Then the per-call latency of one row (a retrieval query), where fixed per-call costs show: open_clip's
``encode_*`` under no_grad vs ``xmodal.encode`` vs the xmodal tower, ``--latency-rounds`` interleaved rounds.

    python benchmarks/encode.py --threads 1
    python benchmarks/encode.py --quick
    python benchmarks/encode.py --device cuda --precision bf16 --batch 256
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402


def main() -> None:
    p = C.common_parser(__doc__.split("\n")[0])
    p.add_argument("--models", default=None, help="comma-separated open_clip configs "
                                                  "(default xmodal-vit-tiny,bench-vit-small)")
    p.add_argument("--batch", type=int, default=64, help="rows per forward (default 64)")
    p.add_argument("--chunks", type=int, default=None, help="forwards per timed call (default 4; --quick 2)")
    p.add_argument("--latency-rounds", type=int, default=None,
                   help="interleaved rounds of the one-row latency test (default 200; --quick 50)")
    args = p.parse_args()
    C.setup(args)
    models = (args.models or ("xmodal-vit-tiny" if args.quick else "xmodal-vit-tiny,bench-vit-small")).split(",")
    steps = args.steps or (3 if args.quick else 10)
    chunks = args.chunks or (2 if args.quick else 4)
    n = args.batch * chunks
    print(C.header(args, f"encode {n} rows in chunks of {args.batch}, xmodal vs open_clip"))
    rows, ratio_rows, latency_rows = [], [], []
    latency_rounds = args.latency_rounds or (50 if args.quick else 200)
    for name in models:
        oc = C.build_open_clip(name, args.device).eval()
        xm = C.build_xmodal(name, args.device).eval()
        images, texts = C.make_batch(name, n, args.device, seed=args.seed)
        amp = lambda: C.autocast(args)  # noqa: E731

        def peer(fn, x, mode):
            def run():
                with mode(), amp():
                    return torch.cat([fn(c, normalize=True) for c in x.split(args.batch)])
            return run

        def xm_encode(modality, x):
            def run():
                with amp():
                    return xm.encode(modality, x, batch_size=args.batch)
            return run

        def xm_tower(modality, x):
            def run():
                with torch.no_grad(), amp():
                    return torch.cat([xm.towers[modality](c) for c in x.split(args.batch)])
            return run

        for modality, x, fn in (("image", images, oc.encode_image), ("text", texts, oc.encode_text)):
            fns = {"open_clip": peer(fn, x, torch.no_grad),
                   "open_clip inference_mode": peer(fn, x, torch.inference_mode),
                   "xmodal.encode": xm_encode(modality, x),
                   "xmodal tower": xm_tower(modality, x)}
            times = C.interleave(fns, steps, args.warmup, args.device)
            for variant, ts in times.items():
                rows.append([name, modality, variant, C.median(ts) * 1e3, n / C.median(ts)])
            ref = times["open_clip"]
            ratio_rows.append([name, modality] + [C.median([o / v for o, v in zip(ref, times[k])])
                                                  for k in ("xmodal.encode", "xmodal tower")]
                              + [C.median([o / v for o, v in zip(times["open_clip inference_mode"],
                                                                  times["xmodal.encode"])]),
                                 min(ref) / min(times["xmodal.encode"])])
        # Per-call latency: one row per call (a retrieval query), where fixed per-call costs show.
        one_image, one_text = images[:1], texts[:1]
        for modality, x, fn in (("image", one_image, oc.encode_image), ("text", one_text, oc.encode_text)):
            def peer_one(fn=fn, x=x):
                with torch.no_grad(), amp():
                    return fn(x, normalize=True)

            def xm_one(modality=modality, x=x):
                with amp():
                    return xm.encode(modality, x)

            def tower_one(modality=modality, x=x):
                with torch.no_grad(), amp():
                    return xm.towers[modality](x)
            times = C.interleave({"open_clip": peer_one, "xmodal.encode": xm_one, "xmodal tower": tower_one},
                                 latency_rounds, 5, args.device)
            med = {k: C.median(v) * 1e3 for k, v in times.items()}
            latency_rows.append([name, modality, med["open_clip"], med["xmodal.encode"], med["xmodal tower"],
                                 med["xmodal.encode"] - med["xmodal tower"],
                                 C.median([o / v for o, v in zip(times["open_clip"], times["xmodal.encode"])])])
        oc = xm = None  # free both before the next model is built
    print()
    print(C.table(["model", "modality", "variant", "ms (median)", "rows/s"], rows))
    print()
    print(C.table(["model", "modality", "ratio xmodal.encode / open_clip", "ratio xmodal tower / open_clip",
                   "ratio xmodal.encode / open_clip inference_mode", "xmodal.encode / open_clip, best times"],
                  ratio_rows))
    print()
    print(C.table(["model", "modality", "1 row: open_clip ms", "xmodal.encode ms", "xmodal tower ms",
                   "encode overhead ms", "ratio xmodal.encode / open_clip"], latency_rows))
    print(f"\ntarget: encode ratio >= 1.0 (ratio = open_clip time / xmodal time, median over {steps} interleaved "
          f"rounds after {args.warmup} warm-up rounds).")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
