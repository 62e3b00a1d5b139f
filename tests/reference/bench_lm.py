#!/usr/bin/env python3
"""The PyTorch reference's frame time on a GPU: PyPI `moshi`'s LMGen (temporal transformer, then
the depformer with sampling, with its CUDA graphs) on the 7B config with random bf16 weights, one
frame at a time, as NVIDIA's server runs it. The counterpart of

    duplex bench step --device cuda --config personaplex-7b --random-weights --dep-steps N

which times the same config (plus Mimi, reported separately). Run on the GPU machine:

    python3 tests/reference/bench_lm.py --dep-q 8  --batch 1     # Moshiko's depformer
    python3 tests/reference/bench_lm.py --dep-q 16 --batch 1     # PersonaPlex's depformer

and on a CPU, against `duplex bench step --config mid` (d 1024, 8 layers, f32):

    python3 tests/reference/bench_lm.py --device cpu --dtype float32 --dim 1024 --num-heads 16 \
        --num-layers 8 --dep-q 8 --frames 50

It needs torch with CUDA and `moshi` (0.2.x; `pip install --no-deps moshi` is enough: the LM path
imports only torch, numpy and einops). Prints one JSON line: p50/p95/p99/max ms per frame after
warm-up frames that also capture the graphs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
from moshi.models import loaders
from moshi.models.lm import LMGen, LMModel


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.ceil(q * len(ordered))) - 1)]


def mark_profile_span(device: str, open_span: bool) -> None:
    """Opens or closes the span a profiler records (cudaProfilerStart/Stop: .ci/kprof.cpp, Nsight
    Systems), as `duplex bench step` marks its own timed frames. A failure only costs the profile."""
    if device != "cuda":
        return
    try:
        (torch.cuda.profiler.start if open_span else torch.cuda.profiler.stop)()
    except Exception as error:  # noqa: BLE001 - the timing must not depend on the profiler
        print(f"profile span not marked: {error}", file=sys.stderr)


def build(args: argparse.Namespace) -> LMModel:
    kwargs = dict(loaders._lm_kwargs)
    kwargs.update(dep_q=args.dep_q, num_layers=args.num_layers, dim=args.dim, num_heads=args.num_heads)
    torch.manual_seed(0)
    model = LMModel(device=args.device, dtype=getattr(torch, args.dtype), **kwargs)
    # Activations in range, as our random checkpoints are: N(0, 1/fan_in) for matrices.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 1.0 / math.sqrt(param.shape[-1]))
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dep-q", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--warm-up", type=int, default=5)
    parser.add_argument("--num-layers", type=int, default=32)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", help="float32 on a CPU")
    args = parser.parse_args()

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    model = build(args)
    user_codebooks = model.num_codebooks - model.dep_q - 1
    lm_gen = LMGen(model, temp=0.8, temp_text=0.7, top_k=250, top_k_text=25)
    times = []
    with torch.no_grad(), lm_gen.streaming(args.batch):
        for frame in range(args.frames + args.warm_up):
            codes = torch.randint(0, model.card, (args.batch, user_codebooks, 1), device=args.device)
            sync()
            if frame == args.warm_up:
                mark_profile_span(args.device, open_span=True)
            started = time.perf_counter()
            lm_gen.step(codes)
            sync()
            if frame >= args.warm_up:
                times.append((time.perf_counter() - started) * 1000.0)
        mark_profile_span(args.device, open_span=False)
    print(
        json.dumps(
            {
                "impl": "pytorch-moshi",
                "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
                "dep_q": args.dep_q,
                "num_layers": args.num_layers,
                "dim": args.dim,
                "dtype": args.dtype,
                "threads": torch.get_num_threads(),
                "batch": args.batch,
                "frames": args.frames,
                "p50": statistics.median(times),
                "p95": percentile(times, 0.95),
                "p99": percentile(times, 0.99),
                "max": max(times),
            }
        )
    )


if __name__ == "__main__":
    main()
