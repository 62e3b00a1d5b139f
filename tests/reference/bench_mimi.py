#!/usr/bin/env python3
"""Full-size Mimi streaming speed on this CPU: the PyTorch reference and `rustymimi` (Kyutai's Rust
Mimi, PyPI) on the same random weights, one 80 ms frame at a time.

    /work/venv-ref/bin/pip install rustymimi          # once
    /work/venv-ref/bin/python tests/reference/bench_mimi.py /tmp/mimi-random.safetensors

Builds a random Mimi with the real config (`loaders._mimi_config`: SEANet 512/64, transformers
8 x 512, 32 codebooks of 2048, 8 used), initialised as `make_fixtures.py` does (role-based random
weights, codebooks fitted to the latent statistics), and saves it under the official Kyutai names
(`self_attn.in_proj_weight`, as `tokenizer-e351c8d8-checkpoint125.safetensors` spells them and as
rustymimi reads them) to the path given — keep it out of the repo (~370 MB). Then streams a 100 Hz
-> 4 kHz chirp (amplitude 0.5, `--seconds` long) through each implementation, encoding a frame and
decoding its codes right after, after one untimed warm-up frame, and prints one JSON line:
per-frame encode/decode mean and median in ms and the real-time factors (mean time / 80 ms).

The Rust side of the comparison is `cargo test --release --lib model::mimi::tests::bench --
--ignored --nocapture`, which loads the same file (`MIMI_BENCH_WEIGHTS` overrides the path).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402  (its helpers only; importing runs nothing)

torch.use_deterministic_algorithms(False)  # make_fixtures turns it on; measure the default
from moshi.models import loaders  # noqa: E402

SEED = 5005
FRAME = 1920
SR = 24000


def build_random_mimi():
    """The real Mimi with random weights and non-trivial codebooks, as the fixtures are made."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    mimi = loaders.get_mimi(None, loaders._mimi_config, num_codebooks=8)
    mf.randomize_(mimi, SEED)
    mf.calibrate_codebooks_(mimi, SEED + 1)
    return mimi


def chirp(seconds: float) -> np.ndarray:
    frames = max(1, int(seconds * SR) // FRAME)
    n = frames * FRAME
    t = np.arange(n, dtype=np.float64) / SR
    dur = n / SR
    x = 0.5 * np.sin(2 * np.pi * (100.0 * t + (4000.0 - 100.0) * t * t / (2 * dur)))
    return x.astype(np.float32)


def summary(enc_ms: list[float], dec_ms: list[float]) -> dict:
    frame_ms = FRAME * 1000 / SR
    enc, dec = statistics.fmean(enc_ms), statistics.fmean(dec_ms)
    return {
        "encode_mean_ms": enc,
        "encode_p50_ms": statistics.median(enc_ms),
        "decode_mean_ms": dec,
        "decode_p50_ms": statistics.median(dec_ms),
        "encode_rtf": enc / frame_ms,
        "decode_rtf": dec / frame_ms,
        "total_rtf": (enc + dec) / frame_ms,
    }


@torch.no_grad()
def bench_torch(mimi, pcm: np.ndarray, threads: int) -> tuple[dict, np.ndarray]:
    torch.set_num_threads(threads)
    frames = torch.from_numpy(pcm).view(1, 1, -1).split(FRAME, dim=-1)
    enc_ms, dec_ms, codes_out = [], [], []
    with mimi.streaming(1):
        mimi.decode(mimi.encode(frames[0]))  # warm-up
        mimi.reset_streaming()
        for frame in frames:
            start = time.perf_counter()
            codes = mimi.encode(frame)
            codes_np = codes.numpy()  # host copy, as a server would make
            enc_ms.append((time.perf_counter() - start) * 1e3)
            start = time.perf_counter()
            out = mimi.decode(torch.from_numpy(codes_np))
            out.numpy()
            dec_ms.append((time.perf_counter() - start) * 1e3)
            codes_out.append(codes_np[0, :, 0])
    return {"threads": threads, **summary(enc_ms, dec_ms)}, np.stack(codes_out, 1)


def bench_rustymimi(path: Path, pcm: np.ndarray) -> tuple[dict, np.ndarray]:
    import rustymimi

    tok = rustymimi.Tokenizer(str(path))
    frames = [pcm[i:i + FRAME].reshape(1, 1, FRAME) for i in range(0, len(pcm), FRAME)]
    tok.decode_step(tok.encode_step(frames[0]))  # warm-up
    tok.reset()
    enc_ms, dec_ms, codes_out = [], [], []
    for frame in frames:
        start = time.perf_counter()
        codes = tok.encode_step(frame)
        enc_ms.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        tok.decode_step(codes)
        dec_ms.append((time.perf_counter() - start) * 1e3)
        codes_out.append(np.asarray(codes)[0, :, 0])
    codes = np.stack(codes_out, 1)
    return {"codebooks": int(codes.shape[0]), **summary(enc_ms, dec_ms)}, codes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", type=Path, help="where to write the random full-size Mimi (outside the repo)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch intra-op threads (rustymimi follows RAYON_NUM_THREADS, else every core)")
    ap.add_argument("--skip-rustymimi", action="store_true")
    args = ap.parse_args()

    mimi = build_random_mimi()
    state = mf.mimi_official_names(mimi.state_dict())
    args.weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(args.weights))

    pcm = chirp(args.seconds)
    result: dict = {
        "weights": str(args.weights),
        "seconds": len(pcm) / SR,
        "frames": len(pcm) // FRAME,
        "frame_ms": FRAME * 1000 / SR,
        "cpus": os.cpu_count(),
        "rayon_num_threads": os.environ.get("RAYON_NUM_THREADS"),
        "loadavg_before": os.getloadavg()[0],
        "versions": {"torch": torch.__version__, "moshi": mf.versions().get("moshi")},
    }
    result["torch"], torch_codes = bench_torch(mimi, pcm, args.threads)
    if not args.skip_rustymimi:
        from importlib.metadata import version

        result["versions"]["rustymimi"] = version("rustymimi")
        result["rustymimi"], rust_codes = bench_rustymimi(args.weights, pcm)
        n = min(torch_codes.shape[0], rust_codes.shape[0])
        same = (torch_codes[:n] == rust_codes[:n]).all(0)
        result["rustymimi"]["frames_with_codes_equal_to_torch"] = int(same.sum())
    result["loadavg_after"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
