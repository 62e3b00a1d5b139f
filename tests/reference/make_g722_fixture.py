#!/usr/bin/env python3
"""Regenerate tests/fixtures/g722/ with an independent G.722 implementation: Sippy's libg722
(PyPI `G722`, a C implementation derived from the ITU-T reference and spandsp), 64 kbit/s,
16 kHz, unpacked, as SIP phones and Asterisk send it.

    python3 -m venv /tmp/g722venv && /tmp/g722venv/bin/pip install G722==1.2.8 numpy
    /tmp/g722venv/bin/python tests/reference/make_g722_fixture.py

Writes `input.wav` (a 60 Hz-7.8 kHz sweep, then quiet noise: both sub-bands and the small
quantizer steps), `encoded.g722` (libg722's bytes for it) and `decoded.wav` (libg722's
decoding of those bytes). The Rust test encodes and decodes the same and compares.
"""

import wave
from pathlib import Path

import G722
import numpy as np

RATE = 16000
OUT = Path(__file__).resolve().parent.parent / "fixtures" / "g722"


def test_signal() -> np.ndarray:
    sweep_len = RATE * 3 // 10
    t = np.arange(sweep_len) / RATE
    f0, f1 = 60.0, 7800.0
    duration = sweep_len / RATE
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * duration))
    sweep = 0.5 * np.sin(phase)
    noise = np.random.default_rng(7).standard_normal(RATE // 10) * 0.01
    return np.round(np.concatenate([sweep, noise]) * 32767).astype(np.int16)


def write_wav(path: Path, samples: np.ndarray) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(samples.astype("<i2").tobytes())


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    pcm = test_signal()
    encoded = G722.G722(RATE, 64000).encode(pcm)
    decoded = np.array(G722.G722(RATE, 64000).decode(encoded), dtype=np.int16)
    write_wav(OUT / "input.wav", pcm)
    (OUT / "encoded.g722").write_bytes(encoded)
    write_wav(OUT / "decoded.wav", decoded)
    print(f"{len(pcm)} samples, {len(encoded)} bytes -> {OUT}")


if __name__ == "__main__":
    main()
