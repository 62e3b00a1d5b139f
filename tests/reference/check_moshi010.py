#!/usr/bin/env python3
"""Optional cross-check: recompute the `_pp` fixtures with moshi 0.1.0, the Kyutai release that
NVIDIA/personaplex forked (same transformer / RingKVCache / Mimi module code and tensor names).

    /work/venv-ref/bin/pip download moshi==0.1.0 --no-deps -d /tmp/m010
    /work/venv-ref/bin/pip install --no-deps --target /tmp/m010/site /tmp/m010/moshi-0.1.0.tar.gz
    PYTHONPATH=/tmp/m010/site /work/venv-ref/bin/python tests/reference/check_moshi010.py

Every line should say `equal` or `max abs diff 0`. Run make_fixtures.py first.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

import moshi  # noqa: E402
from moshi.models.compression import MimiModel  # noqa: E402
from moshi.models.lm import LMModel  # noqa: E402
from moshi.modules import SEANetDecoder, SEANetEncoder, transformer  # noqa: E402
from moshi.quantization import SplitResidualVectorQuantizer  # noqa: E402

assert moshi.__version__ == "0.1.0", moshi.__version__
F = mf.FIXTURES


def load_models(cfg: dict):
    mc = cfg["mimi"]
    enc, dec = SEANetEncoder(**mc["seanet"]), SEANetDecoder(**mc["seanet"])
    mimi = MimiModel(
        enc, dec, SplitResidualVectorQuantizer(**mc["quantizer"]), channels=1,
        sample_rate=mc["sample_rate"], frame_rate=mc["frame_rate"],
        encoder_frame_rate=mc["sample_rate"] / enc.hop_length, causal=True, resample_method="conv",
        encoder_transformer=transformer.ProjectedTransformer(**mc["transformer"]),
        decoder_transformer=transformer.ProjectedTransformer(**mc["transformer"])).eval()
    mimi.load_state_dict(load_file(str(F / "tiny" / mf.MIMI_NAME)), strict=True)
    mimi.set_num_codebooks(mc["num_codebooks"])
    kw = {k: v for k, v in cfg.items() if k not in ("mimi", "silence_tokens", "sine_tokens")}
    lm = LMModel(device="cpu", dtype=torch.float32, **kw).eval()
    lm.load_state_dict(load_file(str(F / "tiny" / mf.LM_NAME)), strict=True)
    return mimi, lm


def report(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype.is_floating_point:
        print(f"{name}: max abs diff {(a.float() - b.float()).abs().max().item():.2e}")
    else:
        print(f"{name}: {'equal' if torch.equal(a, b) else 'DIFFERENT'}")


@torch.no_grad()
def main() -> None:
    cfg = json.loads((F / "tiny" / "config.json").read_text())
    mimi, lm = load_models(cfg)
    t = load_file(str(F / "mimi_parity.safetensors"))
    codes = mf.stream_encode(mimi, t["pcm_in"])
    report("mimi codes_batch", mimi.encode(t["pcm_in"])[0], t["codes_batch"])
    report("mimi codes_stream_pp", codes, t["codes_stream_pp"])
    report("mimi pcm_decoded_stream_pp", mf.stream_decode(mimi, codes), t["pcm_decoded_stream_pp"])

    p = load_file(str(F / "lm_parity.safetensors"))
    hidden, logits = [], []
    with lm.streaming(1):
        for s in range(p["input_tokens"].shape[1]):
            h, tl = lm.forward_text(p["input_tokens"][:, s].view(1, 17, 1))
            hidden.append(h[0, 0])
            logits.append(tl[0, 0, 0])
    report("lm temporal_hidden_pp", torch.stack(hidden), p["temporal_hidden_pp"])
    report("lm text_logits_pp", torch.stack(logits), p["text_logits_pp"])
    dep = torch.stack([mf.depformer_forced_logits(lm, int(tt), p["temporal_hidden"][s], f) for s, tt, f in
                       zip(p["dep_steps"].tolist(), p["dep_text_token"], p["dep_forced_tokens"])])
    report("lm dep_logits (steps 0..14)", dep[:, :-1], p["dep_logits"][:, :-1])
    report("lm dep_logits_pp_last", dep[:, -1], p["dep_logits_pp_last"])

    silence, sine = torch.tensor(cfg["silence_tokens"]), torch.tensor(cfg["sine_tokens"])
    meta = json.loads((F / "meta.json").read_text())
    for name in ("NATF0", "NATM0"):
        preset = torch.load(str(F / "tiny" / "voices" / f"{name}.pt"), weights_only=True)
        pg = mf.PersonaGen(lm, silence, sine)
        with lm.streaming(1):
            saved = pg.voice_prompt_from_codes(torch.tensor(meta["voice_prompt_codes"][name]))
        report(f"{name}.pt embeddings", saved["embeddings"].to(torch.bfloat16), preset["embeddings"])
        report(f"{name}.pt cache", saved["cache"], preset["cache"])

    g = load_file(str(F / "persona_greedy.safetensors"))
    preset = torch.load(str(F / "tiny" / "voices" / "NATF0.pt"), weights_only=True)
    out = mf.run_persona(lm, mimi, preset, silence, sine, g["prompt_text_tokens"].tolist(),
                         mf.read_wav(F / "persona_user.wav"), pp=False)  # 0.1.0 is natively "pp"
    report("persona cache_after_prompt", out["cache_after_prompt"], g["cache_after_prompt"])
    report("persona out_tokens_pp", out["out_tokens"], g["out_tokens_pp"])
    report("persona live_text_logits_pp", out["live_text_logits"], g["live_text_logits_pp"])
    report("persona agent_pcm_pp", out["agent_pcm"], g["agent_pcm_pp"])


if __name__ == "__main__":
    main()
