#!/usr/bin/env python3
"""Regenerate every file under tests/fixtures/ from the PyTorch reference (PyPI `moshi`).

Run (see tests/reference/README.md for the pinned versions):

    HF_HUB_OFFLINE=1 /work/venv-ref/bin/python tests/reference/make_fixtures.py

Everything is random, tiny and deterministic (fixed seeds, one CPU thread, float32).
Nothing is downloaded. The PersonaPlex-specific step semantics (16-step depformer with
teacher forcing, 4-slot token cache, system prompts, voice presets) are not in PyPI `moshi`;
`PersonaGen` below is our own implementation of them, written from reading NVIDIA/personaplex
`moshi/moshi/models/lm.py`, and is cross-checked here against PyPI `LMGen`.

Tensors with a `_pp` suffix use PersonaPlex's ring-KV-cache positions (inherited from moshi
0.1.0, see `personaplex_ring`); the others use PyPI moshi 0.2.x's. They differ only once a
ring is full. See tests/reference/README.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import wave
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_TORCH_COMPILE", "1")
os.environ.setdefault("NO_CUDA_GRAPH", "1")

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import moshi.models.lm as moshi_lm  # noqa: E402
from moshi.models import loaders  # noqa: E402
from moshi.models.lm import LMGen, LMModel  # noqa: E402
from moshi.modules import transformer as moshi_transformer  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
TINY = FIXTURES / "tiny"

SR = 24000
FRAME = 1920  # samples per 80 ms frame
CARD = 64  # audio vocabulary = Mimi bins
VOCAB = 256  # SentencePiece vocabulary = LM text_card
NUM_CODEBOOKS = 8  # Mimi codebooks used per stream
DELAYS = [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1]
PAD, EPAD = 3, 0  # text padding / end-of-padding ids
SYSTEM_PROMPT = "<system> You are a wise and friendly teacher. <system>"
SILENCE_FRAMES = 6  # int(0.5 * 12.5), PersonaPlex's spacer after each prompt part
VOICE_FRAMES = 5  # a 5-frame voice prompt gives 4 embedding frames in the .pt
LIVE_FRAMES = 40  # live frames of the end-to-end PersonaPlex run
GREEDY_FRAMES = 50  # frames of the PyPI LMGen greedy run

SEED_MIMI, SEED_LM, SEED_DATA = 2002, 3003, 4004

MIMI_NAME = "tokenizer-e351c8d8-checkpoint125.safetensors"
LM_NAME = "model.safetensors"
SPM_NAME = "tokenizer_spm_32k_3.model"


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------

def lm_kwargs(text_card: int) -> dict:
    """Tiny PersonaPlex LM config, spelled like `loaders._lm_kwargs` (dep_q already 16)."""
    return {
        "dim": 32,
        "text_card": text_card,
        "existing_text_padding_id": PAD,
        "n_q": 16,
        "dep_q": 16,
        "card": CARD,
        "num_heads": 2,
        "num_layers": 2,
        "hidden_scale": 4.125,
        "causal": True,
        "layer_scale": None,
        "context": 40,
        "max_period": 10000,
        "gating": "silu",
        "norm": "rms_norm_f32",
        "positional_embedding": "rope",
        "depformer_dim": 16,
        "depformer_dim_feedforward": int(4.125 * 16),
        "depformer_num_heads": 2,
        "depformer_num_layers": 2,
        "depformer_causal": True,
        "depformer_layer_scale": None,
        "depformer_multi_linear": True,
        "depformer_context": 8,
        "depformer_max_period": 10000,
        "depformer_gating": "silu",
        "depformer_pos_emb": "none",
        "depformer_weights_per_step": True,
        "delays": list(DELAYS),
    }


def mimi_config() -> dict:
    """Tiny Mimi config in the layout of `loaders._mimi_config` (usable as `get_mimi(.., mimi_config)`)."""
    dim = 32
    seanet = dict(loaders._seanet_kwargs, dimension=dim, n_filters=4)
    quantizer = dict(loaders._quantizer_kwargs, dimension=16, n_q=10, bins=CARD,
                     input_dimension=dim, output_dimension=dim)
    transformer = dict(loaders._transformer_kwargs, d_model=dim, num_heads=2, num_layers=2,
                       dim_feedforward=64, context=25, input_dimension=dim,
                       output_dimensions=[dim])
    return {"sample_rate": SR, "channels": 1, "frame_rate": 12.5, "seanet": seanet,
            "quantizer": quantizer, "transformer": transformer}


def pypi_lm_kwargs(config: dict, dep_q: int) -> dict:
    kw = {k: v for k, v in config.items() if k in lm_kwargs(0)}
    kw.pop("depformer_causal")  # deprecated in PyPI moshi (`get_moshi_lm` pops it too)
    kw["dep_q"] = dep_q
    return kw


# --------------------------------------------------------------------------------------
# Ring KV cache semantics
# --------------------------------------------------------------------------------------

@contextlib.contextmanager
def personaplex_ring(depformer: bool = True):
    """Emulate the RingKVCache of moshi 0.1.0, which NVIDIA/personaplex still uses.

    PyPI moshi 0.2.x gives the oldest ring slot its true position, so once the ring is full a
    query attends the last `capacity` keys. In 0.1.0 / PersonaPlex the positions are computed
    from the *updated* end offset E: slot i gets E + (i - E % C) if that is <= E, else that
    minus C. The oldest slot (i == E % C) therefore gets position E (in the future) and is
    masked: once full, the window is one key shorter. Writes are unchanged.

    The depformer caches (capacity = number of depformer steps) fill exactly at the last step,
    whose query then misses step 0's key. With `depformer=False` they keep PyPI semantics,
    which is what an 8-step depformer inside PersonaPlex's 16-slot cache sees.
    """
    original = moshi_transformer.RingKVCache.complete

    def complete(self, k, v, exec_mask):
        result = original(self, k, v, exec_mask)
        if not depformer and not self.respect_exec_mask:  # PyPI: depformer caches only
            return result
        end = self.end_offset.view(-1, 1)
        index = torch.arange(self.capacity, dtype=torch.long).view(1, -1)
        delta = index - end % self.capacity
        positions = torch.where(delta <= 0, end + delta, end + delta - self.capacity)
        positions = torch.where(index >= end, torch.full_like(positions, -1), positions)
        return moshi_transformer.KVCacheResult(result.keys, result.values, positions)

    moshi_transformer.RingKVCache.complete = complete
    try:
        yield
    finally:
        moshi_transformer.RingKVCache.complete = original


def ring(pp: bool, depformer: bool = True):
    return personaplex_ring(depformer) if pp else contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# Text tokenizer
# --------------------------------------------------------------------------------------

_BASE_SENTENCES = """\
Hello, how are you doing today?
I'm doing well, thank you for asking.
Could you tell me a little more about that?
That sounds really interesting.
I was thinking about going for a walk later.
What do you usually do on the weekend?
We could meet at the cafe near the station.
Sorry, I didn't quite catch that.
Can you say that again, a bit slower please?
Sure, no problem at all.
You are a wise and friendly teacher.
Answer questions or provide advice in a clear and engaging way.
You enjoy having a good conversation.
Have a deep conversation about technology.
Your name is Jane and you work at the bank.
You work for a company which is a medical office.
Information: the office opens at nine and closes at five.
I would like to book an appointment for next Tuesday.
The doctor is available in the morning.
Is there anything else I can help you with?
Thanks so much, have a great day!
Yeah, I know what you mean.
Right, right, that makes sense.
Hmm, let me think about it for a second.
Well, to be honest, I'm not sure.
Oh wow, that's amazing!
Okay, so what happens next?
My favorite food is pasta with tomato sauce.
The weather has been lovely this week.
It rained all day yesterday, so we stayed inside.
Do you like music? I play the guitar a little.
We watched a movie about a cafe in Paris.
She ordered a croissant and a coffee at the café.
The résumé was naïve but charming.
Learning a new language takes patience and practice.
Science is about asking good questions.
The teacher explained the lesson with a simple example.
Why is the sky blue during the day?
Light from the sun is scattered by the air.
Plants need water, light and good soil to grow.
How many planets are there in the solar system?
There are eight planets orbiting the sun.
My brother lives in a small town by the sea.
We used to play football every afternoon.
I'm looking forward to the holidays.
Please remember to bring your notebook tomorrow.
Can I ask you a question about the homework?
Of course, go ahead and ask.
I think the answer is forty two.
Let's start with the first chapter.
Reading every day will help you a lot.
It was nice talking to you.
See you later, take care.
Good morning! Did you sleep well?
Good evening, welcome back.
I need help with my account, please.
Your order will be shipped tomorrow morning.
The replacement part should arrive on Friday.
We can't promise a specific time, but we will try.
Thank you for calling, how can I help?
Hi there, thanks for calling the office.
Could you spell your last name for me?
My phone number ends in three four five.
The meeting starts at half past ten.
I'll send you an email with the details.
<system> You are a wise and friendly teacher. <system>
<system> You enjoy having a good conversation. <system>
<system> You work for a bank and your name is Sam. <system>
""".splitlines()

_SUBJECTS = ["I", "You", "We", "They", "My friend", "The teacher", "Our neighbor", "The student"]
_VERBS = ["like", "want", "need", "enjoy", "remember", "prefer", "found", "forgot"]
_OBJECTS = ["the book", "a cup of tea", "the new phone", "that song", "the old bicycle",
            "a quiet place", "the train ticket", "some fresh bread", "the answer", "the map"]
_TAILS = ["today.", "yesterday.", "every morning.", "at the weekend.", "after school.",
          "before dinner.", "right now.", "last year."]


def corpus_lines() -> list[str]:
    """About three hundred lines of conversational English (deterministic)."""
    lines = [s for s in _BASE_SENTENCES if s]
    i = 0
    for subj in _SUBJECTS:
        for verb in _VERBS:
            for shift in (0, 5):
                obj = _OBJECTS[(i + shift) % len(_OBJECTS)]
                tail = _TAILS[(i * 3 + shift) % len(_TAILS)]
                lines.append(f"{subj} {verb} {obj} {tail}")
            i += 1
    for obj in _OBJECTS:
        lines.append(f"Do you know where {obj} is?")
        lines.append(f"Yes, {obj} is over there, next to the window.")
        lines.append(f"Could you pass me {obj}, please?")
        lines.append(f"Sorry, I left {obj} at home {_TAILS[len(obj) % len(_TAILS)]}")
    return lines


def train_tokenizer(path: Path) -> spm.SentencePieceProcessor:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines()),
        model_writer=buf,
        vocab_size=VOCAB,
        model_type="unigram",
        character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    path.write_bytes(buf.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path))


def make_spm_parity(sp: spm.SentencePieceProcessor) -> dict:
    strings = [
        SYSTEM_PROMPT,
        "Hello, how are you doing today?",
        "",
        " ",
        "  leading spaces",
        "trailing spaces   ",
        "  both sides  ",
        "café naïve résumé",
        "日本語 and emoji 🙂",
        "Tabs\tand\nnewlines",
        "UPPER lower MiXeD 123",
        "<system>",
        "don't won't can't",
    ]
    cases = [{"text": s, "ids": sp.encode(s), "pieces": sp.encode(s, out_type=str)} for s in strings]
    return {
        "vocab_size": sp.vocab_size(),
        "special": {"unk": sp.unk_id(), "bos": sp.bos_id(), "eos": sp.eos_id(), "pad": sp.pad_id()},
        "id_to_piece": {str(i): sp.id_to_piece(i) for i in range(11)},
        "cases": cases,
    }


# --------------------------------------------------------------------------------------
# Deterministic parameter initialisation
# --------------------------------------------------------------------------------------

def _normal(shape, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def _init_param(name: str, p: torch.Tensor, gen: torch.Generator, head_scale: float) -> torch.Tensor:
    """Variance-preserving random init by parameter role, independent of module init order."""
    shape = tuple(p.shape)
    if name.endswith(".alpha"):  # RMSNorm (1, 1, d)
        return 1.0 + _normal(shape, 0.1, gen)
    if name.endswith("layer_scale_1.scale") or name.endswith("layer_scale_2.scale"):
        return 0.1 + 0.2 * torch.rand(shape, generator=gen)
    if ".norm" in name and name.endswith(".weight") and p.dim() == 1:  # LayerNorm
        return 1.0 + _normal(shape, 0.1, gen)
    if name.endswith(".bias"):
        return _normal(shape, 0.05, gen)
    if "emb" in name and p.dim() == 2 and "linear" not in name:  # embeddings (rows, dim)
        return _normal(shape, 1.0 / math.sqrt(shape[1]), gen)
    if "convtr" in name:  # ConvTranspose1d weight (in, out/groups, k)
        return _normal(shape, 1.0 / math.sqrt(max(1, shape[0] * shape[2] // 2)), gen)
    fan_in = p[0].numel()
    std = 1.0 / math.sqrt(fan_in)
    if name.startswith("linears.") or name.startswith("text_linear."):
        std *= head_scale
    return _normal(shape, std, gen)


def randomize_(module: torch.nn.Module, seed: int, head_scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            p.copy_(_init_param(name, p, gen, head_scale))


# --------------------------------------------------------------------------------------
# Mimi
# --------------------------------------------------------------------------------------

def mimi_official_names(state: dict) -> dict:
    """PyPI names -> names of the official Kyutai Mimi checkpoint (single-weight attention)."""
    out = {}
    for k, v in state.items():
        k = k.replace(".self_attn.in_projs.0.weight", ".self_attn.in_proj_weight")
        k = k.replace(".self_attn.out_projs.0.weight", ".self_attn.out_proj.weight")
        out[k] = v.detach().clone().contiguous()
    return out


def calibrate_codebooks_(mimi, seed: int) -> None:
    """Random Mimi codebooks are all zero; fit them to the latent statistics instead.

    Each layer's codebook is drawn from a Gaussian matching the residual it quantizes
    (computed on calibration audio), so that codes are diverse. `embedding_sum` and
    `cluster_usage` are both set, so that embedding = embedding_sum / cluster_usage.
    """
    gen = torch.Generator().manual_seed(seed)
    pcm = calibration_pcm()
    with torch.no_grad():
        latent = mimi._encode_to_unquantized_latent(pcm)  # [1, D, T]
        for rvq in (mimi.quantizer.rvq_first, mimi.quantizer.rvq_rest):
            residual = rvq.input_proj(latent)[0].T  # [T, d]
            for layer in rvq.vq.layers:
                cb = layer._codebook
                mean, std = residual.mean(0), residual.std(0)
                emb = mean + std * torch.randn(cb.embedding_sum.shape, generator=gen)
                usage = 0.5 + torch.rand(cb.cluster_usage.shape, generator=gen)
                cb.embedding_sum.copy_(emb * usage[:, None])
                cb.cluster_usage.copy_(usage)
                cb._initialized.fill_(1.0)
                cb.register_buffer("_embedding", None, persistent=False)  # drop the cache
                codes = torch.cdist(residual[None], cb.embedding[None])[0].argmin(-1)
                residual = residual - cb.embedding[codes]


def build_mimi():
    cfg = mimi_config()
    mimi = loaders.get_mimi(None, cfg, num_codebooks=NUM_CODEBOOKS)
    randomize_(mimi, SEED_MIMI)
    calibrate_codebooks_(mimi, SEED_MIMI + 1)
    return mimi


def load_mimi(path: Path):
    return loaders.get_mimi(str(path), mimi_config(), num_codebooks=NUM_CODEBOOKS)


# --------------------------------------------------------------------------------------
# LM
# --------------------------------------------------------------------------------------

def lm_official_names(state: dict) -> dict:
    """PyPI names -> PersonaPlex names: per-step attention weights stacked along dim 0."""
    out, stacks = {}, {}
    for k, v in state.items():
        for pypi, official in ((".self_attn.in_projs.", ".self_attn.in_proj_weight"),
                               (".self_attn.out_projs.", ".self_attn.out_proj.weight")):
            if pypi in k:
                prefix, rest = k.split(pypi)
                step = int(rest.split(".")[0])
                stacks.setdefault(prefix + official, {})[step] = v
                break
        else:
            out[k] = v.detach().clone().contiguous()
    for k, steps in stacks.items():
        out[k] = torch.cat([steps[i] for i in range(len(steps))], 0).contiguous()
    return out


def slice_to_dep_q(state: dict, dep_q: int, full_dep_q: int) -> dict:
    """Keep only the first `dep_q` depformer steps (what serving needs; Moshi layout)."""
    out = {}
    for k, v in state.items():
        if k.startswith("depformer.") and ".self_attn." in k:
            v = v[: v.shape[0] // full_dep_q * dep_q]
        else:
            parts = k.split(".")
            for group, limit in (("gating", dep_q), ("linears", dep_q),
                                 ("depformer_in", dep_q), ("depformer_emb", dep_q - 1)):
                if group in parts:
                    idx = parts[parts.index(group) + 1]
                    if idx.isdigit() and int(idx) >= limit:
                        v = None
                    break
        if v is not None:
            out[k] = v
    return out


def build_lm(config: dict) -> LMModel:
    lm = LMModel(device="cpu", dtype=torch.float32, **pypi_lm_kwargs(config, 16))
    randomize_(lm, SEED_LM, head_scale=3.0)
    return lm.eval()


def load_lm(path: Path, config: dict, dep_q: int = 16) -> LMModel:
    state = load_file(str(path))
    if dep_q != config["dep_q"]:
        state = slice_to_dep_q(state, dep_q, config["dep_q"])
    lm = LMModel(device="cpu", dtype=torch.float32, **pypi_lm_kwargs(config, dep_q))
    lm.load_state_dict(state, strict=True)  # the pre-hook maps in_proj_weight -> in_projs.{i}
    return lm.eval()


def initial_column(lm) -> torch.Tensor:
    return lm._get_initial_token()[0, :, 0].clone()  # [17]


def embed_column(lm, column: torch.Tensor) -> torch.Tensor:
    """Summed input embedding of one 17-token column (audio streams first, then text,
    the order of `LMModel.forward_text` / PersonaPlex `embed_codes`) -> [1, 1, dim]."""
    x = None
    for q in range(lm.n_q):
        e = lm.emb[q](column[1 + q].view(1, 1))
        x = e if x is None else x + e
    return x + lm.text_emb(column[0].view(1, 1))


# --------------------------------------------------------------------------------------
# PersonaPlex step semantics (our implementation of NVIDIA/personaplex LMGen, greedy only)
# --------------------------------------------------------------------------------------

class PersonaGen:
    """Greedy PersonaPlex `LMGen` on a PyPI `LMModel`: 4-slot token cache + `provided` mask,
    16-step depformer with teacher forcing, voice/silence/text prompts, `.pt` voice presets.

    Stream k of the cache holds frame (position - delay[k]). Call t writes forced tokens at
    position t + delay[k]; it runs the temporal model on column (t-1) and fills column t.
    """

    AGENT = range(1, 9)
    USER = range(9, 17)

    def __init__(self, lm: LMModel, silence: torch.Tensor, sine: torch.Tensor):
        self.lm = lm
        self.delays = list(lm.delays)
        self.max_delay = max(self.delays)
        self.ct = self.max_delay + 3
        self.initial = initial_column(lm)
        self.silence, self.sine = silence, sine
        self.text_logits: list[torch.Tensor] = []
        self.margins: list[list[float]] = []  # per model call: text, then depformer steps
        self.reset()

    def reset(self) -> None:
        self.cache = torch.full((17, self.ct), -2, dtype=torch.long)
        self.provided = torch.zeros((17, self.ct), dtype=torch.bool)
        self.offset = 0

    # -- model pieces --
    def temporal(self, emb: torch.Tensor):
        lm = self.lm
        hidden = lm.out_norm(lm.transformer(emb))
        return hidden, lm.text_linear(hidden)[0, 0]

    def depformer(self, text: int, hidden, forced: torch.Tensor, provided: torch.Tensor):
        lm, prev, out = self.lm, torch.tensor([text]), []
        with lm.depformer.streaming(1):
            for k in range(lm.dep_q):
                logits = lm.forward_depformer(k, prev.view(1, 1, 1), hidden)[0, 0, 0]
                tok = self.argmax(logits)
                out.append(tok)
                prev = forced[k].view(1) if provided[k] else torch.tensor([tok])
        return torch.tensor(out)

    def argmax(self, logits: torch.Tensor) -> int:
        top = torch.topk(logits.float(), 2).values
        self.margins[-1].append(float(top[0] - top[1]))
        return int(torch.argmax(logits.float()))

    # -- LMGen.prepare_step_input / process_transformer_output --
    def _force(self, k: int, token: int) -> None:
        pos = (self.offset + self.delays[k]) % self.ct
        self.cache[k, pos] = int(token)
        self.provided[k, pos] = True

    def prepare(self, user=None, agent=None, text=None):
        if user is not None:
            for q, k in enumerate(self.USER):
                self._force(k, user[q])
        if agent is not None:
            for q, k in enumerate(self.AGENT):
                self._force(k, agent[q])
        if text is not None:
            self._force(0, text)
        for k, delay in enumerate(self.delays):
            if self.offset <= delay:
                self.cache[k, self.offset % self.ct] = self.initial[k]
                self.provided[k, self.offset % self.ct] = True
        if self.offset == 0:
            self.cache[:, 0] = self.initial
            self.offset += 1
            return None
        return (self.offset - 1) % self.ct, self.offset % self.ct

    def finish(self, hidden, text_logits, inp: int, tgt: int):
        self.text_logits.append(text_logits.detach().clone())
        self.margins.append([])
        sampled_text = self.argmax(text_logits)
        text = int(self.cache[0, tgt]) if self.provided[0, tgt] else sampled_text
        audio = self.depformer(text, hidden, self.cache[1:, tgt], self.provided[1:, tgt])
        self.provided[:, inp] = False
        sampled = torch.cat([torch.tensor([sampled_text]), audio])
        self.cache[:, tgt] = torch.where(self.provided[:, tgt], self.cache[:, tgt], sampled)
        if self.offset <= self.max_delay:
            self.offset += 1
            return None
        idx = [(self.offset - self.max_delay + d) % self.ct for d in self.delays]
        out = torch.stack([self.cache[k, i] for k, i in enumerate(idx)])
        self.offset += 1
        return out  # [17]

    def step(self, user=None, agent=None, text=None, embeddings_out: list | None = None):
        prepared = self.prepare(user, agent, text)
        if prepared is None:
            return None
        inp, tgt = prepared
        emb = embed_column(self.lm, self.cache[:, inp])
        if embeddings_out is not None:
            embeddings_out.append(emb.detach().clone())
        return self.finish(*self.temporal(emb), inp, tgt)

    def step_embeddings(self, emb: torch.Tensor):
        dummy = self.initial
        while True:
            prepared = self.prepare(user=dummy[1:9], agent=dummy[9:17], text=PAD)
            if prepared is not None:
                break
        return self.finish(*self.temporal(emb.view(1, 1, -1)), *prepared)

    # -- system prompts --
    def voice_prompt_from_codes(self, codes: torch.Tensor) -> dict:
        """`.wav` path: step every voice frame; returns what `save_voice_prompt_embeddings` saves."""
        embeddings: list[torch.Tensor] = []
        for t in range(codes.shape[1]):
            self.step(user=self.sine, agent=codes[:, t], text=PAD, embeddings_out=embeddings)
        return {"embeddings": torch.stack(embeddings, 0), "cache": self.cache.clone()[None]}

    def voice_prompt_from_preset(self, preset: dict) -> None:
        """`.pt` path: replay the embeddings, then overwrite the token cache."""
        for emb in preset["embeddings"]:
            self.step_embeddings(emb.float())
        self.cache.copy_(preset["cache"][0])

    def silence_frames(self, n: int = SILENCE_FRAMES) -> None:
        for _ in range(n):
            self.step(user=self.sine, agent=self.silence, text=PAD)

    def text_prompt(self, tokens: list[int]) -> None:
        for tok in tokens:
            self.step(user=self.sine, agent=self.silence, text=tok)


# --------------------------------------------------------------------------------------
# Synthetic audio
# --------------------------------------------------------------------------------------

def _t(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64) / SR


def parity_pcm() -> torch.Tensor:
    """1.92 s: 0.8 s chirp 100 Hz -> 4 kHz, 0.56 s noise, 0.56 s silence."""
    n_chirp, n_noise = 8 * FRAME, 7 * FRAME
    n_sil = 24 * FRAME - n_chirp - n_noise
    t = _t(n_chirp)
    f0, f1, dur = 100.0, 4000.0, n_chirp / SR
    chirp = 0.5 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) * t * t / (2 * dur)))
    noise = np.clip(0.3 * np.random.default_rng(SEED_DATA).standard_normal(n_noise), -0.95, 0.95)
    pcm = np.concatenate([chirp, noise, np.zeros(n_sil)]).astype(np.float32)
    return torch.from_numpy(pcm).view(1, 1, -1)


def voice_pcm(f0: float, n: int, seed: int) -> torch.Tensor:
    """Crude voiced sound: harmonics of f0 with vibrato, syllable envelope and breath noise."""
    t = _t(n)
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))) / SR
    x = sum(np.sin(h * phase) / h for h in range(1, 8))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    noise = 0.02 * np.random.default_rng(seed).standard_normal(n)
    x = 0.25 * x * env + noise
    return torch.from_numpy(x.astype(np.float32)).view(1, 1, -1)


def user_pcm(n_frames: int) -> torch.Tensor:
    """User side: two 'utterances' (voice_pcm at 150/180 Hz) separated by silence."""
    x = torch.zeros(1, 1, n_frames * FRAME)
    length = (3 * n_frames // 10) * FRAME
    for i, (start, f0) in enumerate(((3, 150.0), (n_frames // 2 + 3, 180.0))):
        x[..., start * FRAME:start * FRAME + length] = voice_pcm(f0, length, SEED_DATA + 1 + i)
    return x


def calibration_pcm() -> torch.Tensor:
    parts = [voice_pcm(f, 20 * FRAME, SEED_DATA + 10 + i) for i, f in enumerate((110, 160, 220))]
    noise = torch.from_numpy(
        (0.2 * np.random.default_rng(SEED_DATA + 20).standard_normal(20 * FRAME)).astype(np.float32))
    return torch.cat(parts + [noise.view(1, 1, -1)], -1)


def sine_frame() -> torch.Tensor:
    """PersonaPlex `create_sinewave(frame/sr, sr)`: 440 Hz, amplitude 0.5, one frame."""
    t = np.linspace(0.0, FRAME / SR, FRAME, endpoint=False)
    return torch.from_numpy((0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)).view(1, 1, -1)


# --------------------------------------------------------------------------------------
# Mimi helpers
# --------------------------------------------------------------------------------------

@torch.no_grad()
def stream_encode(mimi, pcm: torch.Tensor) -> torch.Tensor:
    """Fresh streaming state, one 1920-sample chunk at a time -> codes [8, T]."""
    with mimi.streaming(1):
        codes = [mimi.encode(pcm[..., i:i + FRAME]) for i in range(0, pcm.shape[-1], FRAME)]
    return torch.cat(codes, -1)[0]


@torch.no_grad()
def stream_decode(mimi, codes: torch.Tensor) -> torch.Tensor:
    with mimi.streaming(1):
        pcm = [mimi.decode(codes[None, :, t:t + 1]) for t in range(codes.shape[1])]
    return torch.cat(pcm, -1)


@torch.no_grad()
def code_margins(mimi, latent: torch.Tensor) -> torch.Tensor:
    """Distance gap between the best and second-best codebook entry, per code [8, T]."""
    q = mimi.quantizer
    rows = []
    for rvq, n in ((q.rvq_first, 1), (q.rvq_rest, NUM_CODEBOOKS - 1)):
        residual = rvq.input_proj(latent)[0].T
        for layer in rvq.vq.layers[:n]:
            emb = layer._codebook.embedding
            d = torch.cdist(residual[None], emb[None])[0]
            top = torch.topk(d, 2, largest=False).values
            rows.append(top[:, 1] - top[:, 0])
            residual = residual - emb[d.argmin(-1)]
    return torch.stack(rows)


@torch.no_grad()
def make_mimi_parity(mimi) -> tuple[dict, dict]:
    pcm = parity_pcm()
    codes_stream = stream_encode(mimi, pcm)
    codes_batch = mimi.encode(pcm)[0]
    seanet = mimi.encoder(pcm)
    (enc_tr,) = mimi.encoder_transformer(seanet)
    latent = mimi._to_framerate(enc_tr)
    quantized = mimi.decode_latent(codes_stream[None])
    upsampled = mimi._to_encoder_framerate(quantized)
    (dec_tr,) = mimi.decoder_transformer(upsampled)
    pcm_stream = stream_decode(mimi, codes_stream)
    pcm_batch = mimi.decode(codes_stream[None])
    with personaplex_ring():
        codes_stream_pp = stream_encode(mimi, pcm)
        pcm_stream_pp = stream_decode(mimi, codes_stream_pp)
    tensors = {
        "pcm_in": pcm,
        "codes_stream": codes_stream,
        "codes_batch": codes_batch,
        "code_margin": code_margins(mimi, latent),
        "enc_seanet_out": seanet,
        "enc_transformer_out": enc_tr,
        "enc_latent": latent,
        "dec_quantized_latent": quantized,
        "dec_upsampled": upsampled,
        "dec_transformer_out": dec_tr,
        "pcm_decoded_stream": pcm_stream,
        "codes_stream_pp": codes_stream_pp,
        "pcm_decoded_stream_pp": pcm_stream_pp,
    }
    meta = {
        "first_frame_stream_ne_batch": first_diff(codes_stream, codes_batch),
        "first_frame_stream_pp_ne_batch": first_diff(codes_stream_pp, codes_batch),
        "first_frame_stream_pp_ne_stream": first_diff(codes_stream_pp, codes_stream),
        "pcm_stream_vs_batch_decode_max_abs_diff_per_frame": [
            float(x) for x in (pcm_stream - pcm_batch).abs().view(-1, FRAME).amax(1)],
        "min_code_margin": float(tensors["code_margin"].min()),
        "distinct_codes_per_codebook": [len(set(r.tolist())) for r in codes_stream],
    }
    return tensors, meta


def first_diff(a: torch.Tensor, b: torch.Tensor) -> int | None:
    cols = (a != b).reshape(-1, a.shape[-1]).any(0).nonzero().flatten()
    return int(cols[0]) if len(cols) else None


# --------------------------------------------------------------------------------------
# LM fixtures
# --------------------------------------------------------------------------------------

def teacher_tokens(lm, steps: int, gen: torch.Generator) -> torch.Tensor:
    """Input columns [17, steps]: initial column, PersonaPlex-like delays, PAD/EPAD, -1 zeros."""
    cols = torch.empty(17, steps, dtype=torch.long)
    cols[0] = torch.randint(0, lm.text_card, (steps,), generator=gen)
    cols[1:] = torch.randint(0, lm.card, (16, steps), generator=gen)
    special = torch.rand(steps, generator=gen)
    cols[0, special < 0.3] = PAD
    cols[0, (special >= 0.3) & (special < 0.4)] = EPAD
    init = initial_column(lm)
    for k, d in enumerate(DELAYS):
        cols[k, :d + 1] = init[k]
    zero = torch.rand(17, steps, generator=gen) < 0.05
    zero[:, :2] = False
    cols[zero] = -1
    cols[9:, 20:24] = -1  # a stretch with no user input at all
    return cols


def temporal_teacher_forced(lm, cols: torch.Tensor, pp: bool):
    """Feed each column through `LMModel.forward_text` in streaming mode."""
    layer_out: list[list[torch.Tensor]] = [[] for _ in lm.transformer.layers]
    hooks = [layer.register_forward_hook(lambda m, i, o, li=li: layer_out[li].append(o[0, 0].clone()))
             for li, layer in enumerate(lm.transformer.layers)]
    hidden, text_logits = [], []
    with ring(pp), lm.streaming(1):
        for s in range(cols.shape[1]):
            h, tl = lm.forward_text(cols[:, s].view(1, 17, 1))
            hidden.append(h[0, 0])
            text_logits.append(tl[0, 0, 0])
    for hk in hooks:
        hk.remove()
    return torch.stack(hidden), torch.stack(text_logits), torch.stack([torch.stack(lo) for lo in layer_out])


def depformer_forced_logits(lm, text: int, hidden: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """All depformer steps; step k > 0 gets forced[k - 1] as its previous token -> [dep_q, card]."""
    logits, prev = [], torch.tensor([text])
    with lm.depformer.streaming(1):
        for k in range(lm.dep_q):
            logits.append(lm.forward_depformer(k, prev.view(1, 1, 1), hidden.view(1, 1, -1))[0, 0, 0])
            prev = forced[k].view(1)
    return torch.stack(logits)


@torch.no_grad()
def make_lm_parity(lm, steps: int = 52, dep_every: int = 4) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(SEED_DATA + 100)
    cols = teacher_tokens(lm, steps, gen)
    dep_steps = torch.arange(0, steps, dep_every)
    dep_text = torch.randint(0, lm.text_card, (len(dep_steps),), generator=gen)
    dep_forced = torch.randint(0, lm.card, (len(dep_steps), lm.dep_q), generator=gen)
    hidden, text_logits, layer_out = temporal_teacher_forced(lm, cols, pp=False)
    hidden_pp, text_logits_pp, _ = temporal_teacher_forced(lm, cols, pp=True)
    dep_args = list(zip(dep_steps.tolist(), dep_text, dep_forced))
    dep_logits = torch.stack([depformer_forced_logits(lm, int(t), hidden[s], f) for s, t, f in dep_args])
    with personaplex_ring():
        dep_logits_pp = torch.stack([depformer_forced_logits(lm, int(t), hidden[s], f)
                                     for s, t, f in dep_args])
    assert torch.equal(dep_logits_pp[:, :-1], dep_logits[:, :-1])  # only the last step differs
    tensors = {
        "input_tokens": cols,
        "emb_sum": torch.stack([embed_column(lm, cols[:, s])[0, 0] for s in range(steps)]),
        "layer_out": layer_out,
        "temporal_hidden": hidden,
        "text_logits": text_logits,
        "temporal_hidden_pp": hidden_pp,
        "text_logits_pp": text_logits_pp,
        "dep_steps": dep_steps,
        "dep_text_token": dep_text,
        "dep_forced_tokens": dep_forced,
        "dep_logits": dep_logits,
        "dep_logits_pp_last": dep_logits_pp[:, -1],
    }
    meta = {"steps": steps, "context": lm.context,
            "first_step_pp_ne_pypi": first_diff(text_logits_pp.T, text_logits.T)}
    return tensors, meta


@contextlib.contextmanager
def record_margins(rows: list[list[float]]):
    """Wrap `sample_token` inside PyPI `moshi.models.lm` to log greedy top-2 margins."""
    original = moshi_lm.sample_token

    def sample_token(logits, *args, **kwargs):
        top = torch.topk(logits.float(), 2, dim=-1).values
        rows[-1].append(float((top[..., 0] - top[..., 1]).min()))
        return original(logits, *args, **kwargs)

    moshi_lm.sample_token = sample_token
    try:
        yield
    finally:
        moshi_lm.sample_token = original


@torch.no_grad()
def run_pypi_lmgen(lm8, user_codes: torch.Tensor, pp: bool):
    """PyPI `LMGen` (greedy) on the 8-step depformer; returns tokens [9, T], valid [T], margins [9, T]."""
    gen = LMGen(lm8, use_sampling=False, temp=0.0, temp_text=0.0)
    outs, valid, margins = [], [], []
    with ring(pp, depformer=False), record_margins(margins), gen.streaming(1):
        for t in range(user_codes.shape[1]):
            margins.append([])
            out = gen.step(user_codes[None, :, t:t + 1])
            valid.append(out is not None)
            outs.append(out[0, :, 0] if out is not None else torch.full((9,), -2, dtype=torch.long))
    return torch.stack(outs, 1), torch.tensor(valid), torch.tensor(margins).T


@torch.no_grad()
def run_persona_live(pg: PersonaGen, user_codes: torch.Tensor):
    outs, valid = [], []
    for t in range(user_codes.shape[1]):
        out = pg.step(user=user_codes[:, t])
        valid.append(out is not None)
        outs.append(out if out is not None else torch.full((17,), -2, dtype=torch.long))
    return torch.stack(outs, 1), torch.tensor(valid)


@torch.no_grad()
def make_lm_greedy(config, lm, silence, sine, user_codes) -> tuple[dict, dict]:
    lm8 = load_lm(TINY / LM_NAME, config, dep_q=8)
    out, valid, margins = run_pypi_lmgen(lm8, user_codes, pp=False)
    out_pp, valid_pp, margins_pp = run_pypi_lmgen(lm8, user_codes, pp=True)
    assert torch.equal(valid, valid_pp)
    meta = {"frames": user_codes.shape[1],
            "first_frame_pp_ne_pypi": first_diff(out_pp, out),
            "min_margin": float(margins.min()), "min_margin_pp": float(margins_pp.min())}
    for pp, ref in ((False, out), (True, out_pp)):  # cross-check our PersonaGen on the same input
        pg = PersonaGen(lm, silence, sine)
        with ring(pp), lm.streaming(1):
            out17, valid17 = run_persona_live(pg, user_codes)
        meta["persona_gen_matches" + ("_pp" if pp else "")] = check_persona_vs_pypi(ref, valid, out17, valid17)
    tensors = {"user_codes": user_codes, "out_valid": valid,
               "out_tokens": out, "margins": margins,
               "out_tokens_pp": out_pp, "margins_pp": margins_pp}
    return tensors, meta


def check_persona_vs_pypi(out8, valid8, out17, valid17) -> dict:
    """PersonaGen call t+1 must return what PyPI LMGen call t returns (rows 0..8)."""
    a, b = out8[:, valid8], out17[:9, valid17]
    n = min(a.shape[1], b.shape[1])
    return {"frames_compared": n, "equal_with_one_call_shift": bool(torch.equal(a[:, :n], b[:, :n]))}


# --------------------------------------------------------------------------------------
# Voice presets and the end-to-end PersonaPlex run
# --------------------------------------------------------------------------------------

@torch.no_grad()
def make_voice_preset(lm, mimi, silence, sine, f0: float, seed: int) -> tuple[dict, torch.Tensor]:
    """The `.wav` voice-prompt path with `save_voice_prompt_embeddings=True`."""
    codes = stream_encode(mimi, voice_pcm(f0, VOICE_FRAMES * FRAME, seed))
    pg = PersonaGen(lm, silence, sine)
    with personaplex_ring(), lm.streaming(1):  # 5 frames: the ring never fills here
        saved = pg.voice_prompt_from_codes(codes)
    preset = {"embeddings": saved["embeddings"].to(torch.bfloat16).contiguous(),
              "cache": saved["cache"].contiguous()}
    return preset, codes


@torch.no_grad()
def run_persona(lm, mimi, preset: dict, silence, sine, prompt: list[int], pcm, pp: bool):
    """What `offline.py` does (greedy) with a `.pt` voice preset and a user WAV."""
    pg = PersonaGen(lm, silence, sine)
    with ring(pp):
        with lm.streaming(1):
            pg.voice_prompt_from_preset(preset)
            pg.silence_frames()
            pg.text_prompt(prompt)
            pg.silence_frames()
            prompt_calls, n_prompt = pg.offset, len(pg.text_logits)
            cache_after_prompt = pg.cache.clone()
            user_codes = stream_encode(mimi, pcm)
            out, valid = run_persona_live(pg, user_codes)
        agent_pcm = stream_decode(mimi, out[1:9, valid])
    return {
        "user_codes": user_codes,
        "prompt_calls": prompt_calls,
        "cache_after_prompt": cache_after_prompt,
        "out_tokens": out,
        "out_valid": valid,
        "live_text_logits": torch.stack(pg.text_logits[n_prompt:]),
        "live_margins": torch.tensor(pg.margins[n_prompt:]).T,
        "agent_pcm": agent_pcm,
    }


@torch.no_grad()
def make_persona_greedy(lm, mimi, preset, silence, sine, prompt: list[int]) -> tuple[dict, dict]:
    pcm = read_wav(FIXTURES / "persona_user.wav")
    pypi = run_persona(lm, mimi, preset, silence, sine, prompt, pcm, pp=False)
    pp = run_persona(lm, mimi, preset, silence, sine, prompt, pcm, pp=True)
    tensors = {
        "user_codes": pp["user_codes"],
        "prompt_text_tokens": torch.tensor(prompt, dtype=torch.long),
        "cache_after_prompt": pp["cache_after_prompt"],
        "out_valid": pp["out_valid"],
        "out_tokens_pp": pp["out_tokens"],
        "live_text_logits_pp": pp["live_text_logits"],
        "live_margins_pp": pp["live_margins"],
        "agent_pcm_pp": pp["agent_pcm"],
        "out_tokens": pypi["out_tokens"],
        "live_text_logits": pypi["live_text_logits"],
        "live_margins": pypi["live_margins"],
    }
    meta = {"prompt_calls": pp["prompt_calls"], "live_calls": int(pp["user_codes"].shape[1]),
            "cache_after_prompt_equal_between_rings": bool(
                torch.equal(pp["cache_after_prompt"], pypi["cache_after_prompt"])),
            "first_live_frame_pp_ne_pypi": first_diff(pp["out_tokens"], pypi["out_tokens"]),
            "min_live_margin": float(pypi["live_margins"].min()),
            "min_live_margin_pp": float(pp["live_margins"].min())}
    return tensors, meta


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------

def save(tensors: dict, path: Path) -> None:
    out = {}
    for k, v in tensors.items():
        v = v.detach().contiguous()
        out[k] = v.to(torch.int64) if v.dtype == torch.bool else v
    save_file(out, str(path))


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_wav(path: Path, pcm: torch.Tensor) -> None:
    """Mono 16-bit PCM WAV at 24 kHz."""
    samples = (pcm.flatten().clamp(-1, 1) * 32767).round().to(torch.int16).numpy()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(samples.tobytes())


def read_wav(path: Path) -> torch.Tensor:
    """As `sphn.read` does for 16-bit PCM: int16 / 32768 -> [1, 1, N] float32."""
    with wave.open(str(path), "rb") as w:
        data = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    return torch.from_numpy(data.astype(np.float32) / 32768.0).view(1, 1, -1)


def versions() -> dict:
    import importlib.metadata as md
    import platform
    return {"python": platform.python_version(),
            **{p: md.version(p) for p in ("moshi", "torch", "sentencepiece", "safetensors", "numpy")}}


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------

def main() -> None:
    if FIXTURES.exists():
        shutil.rmtree(FIXTURES)
    (TINY / "voices").mkdir(parents=True)
    meta: dict = {"versions": versions()}

    sp = train_tokenizer(TINY / SPM_NAME)
    write_json(make_spm_parity(sp), FIXTURES / "spm_parity.json")

    save_file(mimi_official_names(build_mimi().state_dict()), str(TINY / MIMI_NAME))
    mimi = load_mimi(TINY / MIMI_NAME)
    silence = stream_encode(mimi, torch.zeros(1, 1, FRAME))[:, 0]
    sine = stream_encode(mimi, sine_frame())[:, 0]

    config = lm_kwargs(sp.vocab_size())
    save_file(lm_official_names(build_lm(config).state_dict()), str(TINY / LM_NAME))
    write_json(dict(config, mimi=dict(mimi_config(), num_codebooks=NUM_CODEBOOKS),
                    silence_tokens=silence.tolist(), sine_tokens=sine.tolist()),
               TINY / "config.json")
    lm = load_lm(TINY / LM_NAME, config)

    tensors, meta["mimi_parity"] = make_mimi_parity(mimi)
    save(tensors, FIXTURES / "mimi_parity.safetensors")

    tensors, meta["lm_parity"] = make_lm_parity(lm)
    save(tensors, FIXTURES / "lm_parity.safetensors")

    greedy_codes = stream_encode(mimi, user_pcm(GREEDY_FRAMES))
    tensors, meta["lm_greedy"] = make_lm_greedy(config, lm, silence, sine, greedy_codes)
    save(tensors, FIXTURES / "lm_greedy.safetensors")

    presets = {}
    for name, f0, seed in (("NATF0", 210.0, SEED_DATA + 30), ("NATM0", 110.0, SEED_DATA + 31)):
        presets[name], codes = make_voice_preset(lm, mimi, silence, sine, f0, seed)
        torch.save(presets[name], str(TINY / "voices" / f"{name}.pt"))
        meta.setdefault("voice_prompt_codes", {})[name] = codes.tolist()

    write_wav(FIXTURES / "persona_user.wav", user_pcm(LIVE_FRAMES))
    tensors, meta["persona_greedy"] = make_persona_greedy(
        lm, mimi, presets["NATF0"], silence, sine, sp.encode(SYSTEM_PROMPT))
    save(tensors, FIXTURES / "persona_greedy.safetensors")

    write_json(meta, FIXTURES / "meta.json")
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:>9}  {p.relative_to(ROOT)}")
    print(json.dumps({k: v for k, v in meta.items() if k != "voice_prompt_codes"}, indent=1))


if __name__ == "__main__":
    main()
