//! The whole speech-to-speech stack for a batch of conversations: user PCM → Mimi codes →
//! language model call → agent codes → Mimi → agent PCM, one 80 ms frame per step.

use super::Result;
use super::checkpoint::Checkpoint;
use super::config::LmConfig;
use super::files::ModelFiles;
use super::generate::{CallInput, Forced, Generator, SamplingConfig, Snapshot, rows_to_run};
use super::kv::RingPositions;
use super::lm::{Column, LmModel};
use super::mimi::{DecoderState, EncoderState, Mimi, MimiConfig};
use super::persona::{PromptRun, VoicePrompt, prompt_calls};
use super::quant::{KvQuant, Quant};
use super::tokenizer::{TextTokenizer, wrap_system_prompt};
use super::voice::{VoiceLibrary, VoicePreset};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;

/// How to run the stack.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub device: Device,
    /// The language model's compute dtype (f32 on the CPU).
    pub dtype: DType,
    /// Depformer steps per frame: 8 serve the agent; 16 reproduce the reference's RNG use.
    pub dep_steps: usize,
    pub positions: RingPositions,
    /// How the language model's large matrices are stored.
    pub quant: Quant,
    /// How the temporal transformer's keys and values are stored.
    pub kv_quant: KvQuant,
    /// Replay each frame's temporal step and depformer half as CUDA graphs when the model runs
    /// in bf16 on a GPU (each capture is checked against an eager frame; a refused one logs why
    /// and runs eagerly).
    pub cuda_graphs: bool,
    /// Keep each conversation's persona (its prefilled prompt) in attention for good, after the
    /// window slides past it (`Generator::pin_prefix`).
    pub pin_persona: bool,
}

impl PipelineConfig {
    /// Where and how the model runs, for the log: `bf16 on the GPU, int8 weights`.
    pub fn describe(&self) -> String {
        let place = if self.device.is_cuda() { "GPU" } else { "CPU" };
        let dtype = format!("{:?}", self.dtype).to_lowercase();
        let weights = match self.quant {
            Quant::None => dtype.clone(),
            Quant::Int8 => "int8".to_string(),
        };
        let kv = match self.kv_quant {
            KvQuant::None => "",
            KvQuant::Int8 => ", int8 keys and values",
        };
        let graphs = if self.graphs_apply() {
            ", CUDA graphs"
        } else {
            ""
        };
        format!("{dtype} on the {place}, {weights} weights{kv}{graphs}")
    }

    /// Whether frames replay CUDA graphs: asked for, and bf16 on a GPU (the path whose
    /// captures the GPU tests check).
    fn graphs_apply(&self) -> bool {
        self.cuda_graphs && self.device.is_cuda() && self.dtype == DType::BF16
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            dep_steps: 8,
            positions: RingPositions::PersonaPlex,
            quant: Quant::None,
            kv_quant: KvQuant::None,
            cuda_graphs: true,
            pin_persona: false,
        }
    }
}

/// The stages of a step, reported as each one ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Encode,
    Temporal,
    Depformer,
    Decode,
}

/// The loaded models and their data.
pub struct Pipeline {
    pub lm: LmModel,
    pub mimi: Mimi,
    /// `None` for random weights.
    tokenizer: Option<TextTokenizer>,
    pub voices: VoiceLibrary,
    /// Every voice preset, read once at load: a join reads no `.pt` file on the step thread.
    presets: BTreeMap<String, VoicePreset>,
    /// Model calls each voice preset's prompt takes.
    voice_calls: BTreeMap<String, usize>,
    positions: RingPositions,
    cuda_graphs: bool,
    pin_persona: bool,
}

impl Pipeline {
    pub fn load(files: &ModelFiles, cfg: &PipelineConfig) -> Result<Self> {
        let (lm_cfg, mimi_cfg) = model_configs(files)?;
        let lm = LmModel::load_quantized(
            &Checkpoint::open(&files.lm, cfg.dtype, &cfg.device)?,
            &lm_cfg,
            cfg.dep_steps,
            cfg.quant,
        )?;
        let mimi_ckpt = Checkpoint::open(&files.mimi, DType::F32, &cfg.device)?;
        let mimi = Mimi::load(&mimi_ckpt, &mimi_cfg, cfg.positions)?;
        let tokenizer = TextTokenizer::open(&files.tokenizer)?;
        if tokenizer.vocab_size() != lm_cfg.text_card {
            candle_core::bail!(
                "tokenizer has {} pieces, the model's text vocabulary is {}",
                tokenizer.vocab_size(),
                lm_cfg.text_card
            );
        }
        files.ensure_voices().map_err(candle_core::Error::wrap)?;
        let voices = VoiceLibrary::scan(&files.voices).map_err(candle_core::Error::wrap)?;
        Self::assemble(lm, mimi, Some(tokenizer), voices, cfg)
    }

    /// The `preset` language model (`LmConfig::preset`) and Mimi with random weights, to measure
    /// a server without the checkpoint. With no tokenizer it reads no role prompt and shows no
    /// text; with no voice presets every persona is the silent prompt alone.
    pub fn random(preset: &str, cfg: &PipelineConfig) -> Result<Self> {
        let lm_cfg = LmConfig::named(preset)?;
        let lm = LmModel::load_quantized(
            &Checkpoint::random(preset, cfg.dtype, &cfg.device),
            &lm_cfg,
            cfg.dep_steps,
            cfg.quant,
        )?;
        let mimi_ckpt = Checkpoint::random("mimi", DType::F32, &cfg.device);
        let mimi = Mimi::load(&mimi_ckpt, &MimiConfig::v0_1(), cfg.positions)?;
        Self::assemble(lm, mimi, None, VoiceLibrary::default(), cfg)
    }

    fn assemble(
        mut lm: LmModel,
        mimi: Mimi,
        tokenizer: Option<TextTokenizer>,
        voices: VoiceLibrary,
        cfg: &PipelineConfig,
    ) -> Result<Self> {
        lm.set_kv_quant(cfg.kv_quant);
        if mimi.num_codebooks() != lm.config().codebooks() {
            candle_core::bail!(
                "Mimi yields {} codebooks, the model expects {}",
                mimi.num_codebooks(),
                lm.config().codebooks()
            );
        }
        let mut pipeline = Self {
            lm,
            mimi,
            tokenizer,
            voices,
            presets: BTreeMap::new(),
            voice_calls: BTreeMap::new(),
            positions: cfg.positions,
            cuda_graphs: cfg.graphs_apply(),
            pin_persona: cfg.pin_persona,
        };
        let dim = pipeline.lm.config().dim;
        for name in pipeline.voices.names() {
            let path = pipeline.voices.path(&name).ok_or_else(|| {
                candle_core::Error::msg(format!("voice preset {name:?} has no file"))
            })?;
            let preset = VoicePreset::load(path, dim, pipeline.lm.device())?;
            let calls = prompt_calls(&VoicePrompt::Preset(Box::new(preset.clone())), &[])
                - prompt_calls(&VoicePrompt::None, &[]);
            pipeline.voice_calls.insert(name.clone(), calls);
            pipeline.presets.insert(name, preset);
        }
        Ok(pipeline)
    }

    /// Whether role prompts can be read (random weights come without a tokenizer).
    pub fn reads_prompts(&self) -> bool {
        self.tokenizer.is_some()
    }

    /// What text token `id` adds to the transcript (nothing without a tokenizer).
    pub fn text_piece(&self, id: u32) -> Option<String> {
        self.tokenizer.as_ref()?.text_piece(id)
    }

    /// The most role prompt tokens that fit the attention window with `voice` (the longest
    /// preset when `None`): the whole system prompt must fit before the conversation starts.
    pub fn max_prompt_tokens(&self, voice: Option<&VoicePrompt>) -> usize {
        let voice_calls = match voice {
            Some(voice) => prompt_calls(voice, &[]) - prompt_calls(&VoicePrompt::None, &[]),
            None => self.voice_calls.values().copied().max().unwrap_or(0),
        };
        let fixed = prompt_calls(&VoicePrompt::None, &[]) + voice_calls + 1;
        self.lm.config().context.saturating_sub(fixed)
    }

    /// Reads preset `name` from the voice library.
    pub fn voice_preset(&self, name: &str) -> Result<VoicePrompt> {
        let preset = self
            .presets
            .get(name)
            .ok_or_else(|| candle_core::Error::msg(format!("no voice preset {name:?}")))?;
        Ok(VoicePrompt::Preset(Box::new(preset.clone())))
    }

    /// A voice prompt from 24 kHz audio: its Mimi codes, frame by frame.
    pub fn voice_from_pcm(&self, pcm: &[f32]) -> Result<VoicePrompt> {
        let frame = self.mimi.frame_samples();
        let mut state = self.mimi.encoder_state(1)?;
        let codes = pcm
            .chunks(frame)
            .map(|chunk| {
                let mut padded = chunk.to_vec();
                padded.resize(frame, 0.0);
                let input = Tensor::from_vec(padded, (1, 1, frame), self.lm.device())?;
                let codes: Vec<u32> = self
                    .mimi
                    .encode_step(&input, &mut state, &[true])?
                    .flatten_all()?
                    .to_vec1()?;
                Ok(std::array::from_fn(|q| i64::from(codes[q])))
            })
            .collect::<Result<Vec<[i64; 8]>>>()?;
        Ok(VoicePrompt::Codes(codes))
    }

    /// The role prompt's tokens as PersonaPlex feeds them.
    pub fn prompt_tokens(&self, prompt: &str) -> Result<Vec<u32>> {
        if prompt.trim().is_empty() {
            return Ok(Vec::new());
        }
        let Some(tokenizer) = &self.tokenizer else {
            candle_core::bail!(
                "this model has no text tokenizer (random weights): it reads no role prompt"
            )
        };
        tokenizer.encode(&wrap_system_prompt(prompt))
    }

    /// Runs the system prompt once and returns the state to start conversations from.
    pub fn prefill(&self, voice: &VoicePrompt, text_tokens: &[u32]) -> Result<Snapshot> {
        let mut prefill = self.start_prefill(voice, text_tokens)?;
        loop {
            if let Some(snapshot) = prefill.advance(&self.lm, usize::MAX)? {
                return Ok(snapshot);
            }
        }
    }

    /// A prefill to run a few model calls at a time (`Prefill::advance`), between the frames of
    /// live conversations.
    pub fn start_prefill(&self, voice: &VoicePrompt, text_tokens: &[u32]) -> Result<Prefill> {
        Prefill::new(&self.lm, self.positions, voice, text_tokens)
    }

    /// Bytes one more conversation's streaming state takes.
    pub fn slot_state_bytes(&self) -> u64 {
        self.lm.slot_state_bytes() + self.mimi.slot_state_bytes()
    }

    /// How many conversations' states fit in `available` bytes, keeping a tenth and 1 GiB back
    /// for a step's activations.
    pub fn slots_that_fit(&self, available: u64) -> usize {
        let budget = (available / 10 * 9).saturating_sub(1 << 30);
        (budget / self.slot_state_bytes().max(1)) as usize
    }

    /// Streaming state for `batch` conversations (replaying CUDA graphs where the config asked
    /// for them and they apply).
    pub fn state(&self, batch: usize) -> Result<PipelineState> {
        let mut state = PipelineState::new(self.models(), batch, self.positions)?;
        if self.cuda_graphs {
            state.use_cuda_graphs(self.models())?;
        }
        state.pin_persona = self.pin_persona;
        Ok(state)
    }
}

/// A system prompt being run on a generator of its own (`Pipeline::start_prefill`).
pub struct Prefill {
    generator: Generator,
    prompt: PromptRun,
}

impl Prefill {
    /// The prompt of `voice` and `text_tokens` on a generator of its own, its ring dense
    /// whatever `lm` keeps (`Generator::for_prompt`) and just long enough for the prompt.
    pub fn new(
        lm: &LmModel,
        positions: RingPositions,
        voice: &VoicePrompt,
        text_tokens: &[u32],
    ) -> Result<Self> {
        let capacity = (prompt_calls(voice, text_tokens) + 2).min(lm.config().context);
        let mut generator = Generator::for_prompt(lm, capacity, positions)?;
        generator.open(0, 0, SamplingConfig::GREEDY);
        let prompt = PromptRun::new(lm.config(), 0, voice, text_tokens)?;
        Ok(Self { generator, prompt })
    }

    /// How many forwards of several calls the prompt has run (`Generator::forced_chunks`).
    pub fn forced_chunks(&self) -> u64 {
        self.generator.forced_chunks()
    }

    /// Runs at most `calls` more of the prompt's model calls; the state to start
    /// conversations from once the prompt is done.
    pub fn advance(&mut self, lm: &LmModel, calls: usize) -> Result<Option<Snapshot>> {
        match self.prompt.advance(lm, &mut self.generator, calls)? {
            true => Ok(Some(self.generator.snapshot(0)?.stored_as(lm.kv_quant())?)),
            false => Ok(None),
        }
    }
}

/// The language model's and Mimi's configs: from `config.json` where it has them, else the
/// PersonaPlex 7B presets (the published `config.json` carries neither).
pub fn model_configs(files: &ModelFiles) -> Result<(LmConfig, MimiConfig)> {
    let Some(path) = &files.config else {
        return Ok((LmConfig::personaplex_7b(), MimiConfig::v0_1()));
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let lm = if json.get("dim").is_some() {
        LmConfig::from_file(path)?
    } else {
        LmConfig::personaplex_7b()
    };
    let mimi = if json.get("mimi").is_some() {
        MimiConfig::from_model_config_json(&text)?
    } else {
        MimiConfig::v0_1()
    };
    Ok((lm, mimi))
}

/// The two models a step runs.
#[derive(Clone, Copy)]
pub struct Models<'a> {
    pub lm: &'a LmModel,
    pub mimi: &'a Mimi,
}

impl Pipeline {
    pub fn models(&self) -> Models<'_> {
        Models {
            lm: &self.lm,
            mimi: &self.mimi,
        }
    }
}

/// One slot's frame: what the model heard and what it said.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotFrame {
    /// The user's Mimi codes for this frame.
    pub user_codes: [i64; 8],
    /// The call's 17 tokens, once outputs have started.
    pub tokens: Option<Column>,
}

/// The streaming state of a batch of conversations.
pub struct PipelineState {
    pub generator: Generator,
    encoder: EncoderState,
    decoder: DecoderState,
    /// `open` pins the snapshot's persona (`PipelineConfig::pin_persona`).
    pin_persona: bool,
}

impl PipelineState {
    pub fn new(models: Models<'_>, batch: usize, positions: RingPositions) -> Result<Self> {
        Ok(Self {
            generator: Generator::new(models.lm, batch, models.lm.config().context, positions)?,
            encoder: models.mimi.encoder_state(batch)?,
            decoder: models.mimi.decoder_state(batch)?,
            pin_persona: false,
        })
    }

    /// Starts slot `slot_idx` from a prefill snapshot.
    pub fn open(
        &mut self,
        slot_idx: usize,
        snapshot: &Snapshot,
        seed: u64,
        sampling: SamplingConfig,
    ) -> Result<()> {
        self.generator.restore(slot_idx, snapshot, seed, sampling)?;
        if self.pin_persona {
            self.generator.pin_prefix(slot_idx)?;
        }
        self.encoder.reset_slot(slot_idx)?;
        self.decoder.reset_slot(slot_idx)
    }

    /// Starts slot `slot_idx` with no system prompt at all (benchmarks).
    pub fn open_fresh(
        &mut self,
        slot_idx: usize,
        seed: u64,
        sampling: SamplingConfig,
    ) -> Result<()> {
        self.generator.open(slot_idx, seed, sampling);
        self.encoder.reset_slot(slot_idx)?;
        self.decoder.reset_slot(slot_idx)
    }

    pub fn close(&mut self, slot_idx: usize) {
        self.generator.close(slot_idx);
    }

    /// Replays every piece of a frame as CUDA graphs: Mimi's encode and decode, the temporal
    /// step and the depformer half (each captured at its first frame and checked against it).
    pub fn use_cuda_graphs(&mut self, models: Models<'_>) -> Result<()> {
        self.generator.use_cuda_graphs(models.lm)?;
        self.encoder.use_cuda_graphs(models.mimi)?;
        self.decoder.use_cuda_graphs(models.mimi)
    }

    /// Which pieces replay graphs now: `[encode, temporal, depformer, decode]`.
    pub fn graphs_replayed(&self) -> [bool; 4] {
        [
            self.encoder.replays_cuda_graph(),
            self.generator.replays_temporal_graph(),
            self.generator.replays_cuda_graph(),
            self.decoder.replays_cuda_graph(),
        ]
    }

    /// One frame for every active slot: `pcm_in`/`pcm_out` hold one frame per slot, back to back.
    /// Only the slots up to the last active one are computed (`rows_to_run`). `mark` is called
    /// as each stage ends (for timing).
    pub fn step(
        &mut self,
        pipeline: Models<'_>,
        pcm_in: &[f32],
        active: &[bool],
        pcm_out: &mut [f32],
        mark: &mut impl FnMut(Stage),
    ) -> Result<Vec<Option<SlotFrame>>> {
        let (batch, frame) = (active.len(), pipeline.mimi.frame_samples());
        let rows = rows_to_run(active);
        let device = pipeline.lm.device();
        let input = Tensor::from_slice(&pcm_in[..rows * frame], (rows, 1, frame), device)?;
        let mut user: Vec<Vec<u32>> = if rows == 0 {
            Vec::new()
        } else {
            pipeline
                .mimi
                .encode_step(&input, &mut self.encoder, &active[..rows])?
                .to_vec2()?
        };
        user.resize(batch, vec![0; 8]);
        mark(Stage::Encode);
        let user: Vec<[i64; 8]> = user
            .iter()
            .map(|codes| std::array::from_fn(|q| i64::from(codes[q])))
            .collect();
        let inputs: Vec<Option<CallInput>> = (0..batch)
            .map(|b| {
                active[b].then(|| {
                    CallInput::Tokens(Forced {
                        user: Some(user[b]),
                        ..Default::default()
                    })
                })
            })
            .collect();
        let pending = self.generator.begin(pipeline.lm, &inputs)?;
        mark(Stage::Temporal);
        let outputs = self.generator.complete(pipeline.lm, pending)?;
        mark(Stage::Depformer);
        let frames: Vec<Option<SlotFrame>> = outputs
            .into_iter()
            .enumerate()
            .map(|(b, out)| {
                out.map(|out| SlotFrame {
                    user_codes: user[b],
                    tokens: out.tokens,
                })
            })
            .collect();
        self.decode(pipeline, &frames, pcm_out)?;
        mark(Stage::Decode);
        Ok(frames)
    }

    /// Decodes the agent's codes of every slot that produced some; the others get silence.
    fn decode(
        &mut self,
        pipeline: Models<'_>,
        frames: &[Option<SlotFrame>],
        pcm_out: &mut [f32],
    ) -> Result<()> {
        let frame = pipeline.mimi.frame_samples();
        let speaking: Vec<bool> = frames
            .iter()
            .map(|f| f.as_ref().is_some_and(|f| f.tokens.is_some()))
            .collect();
        let rows = rows_to_run(&speaking);
        let mut codes = vec![0u32; rows * 8];
        for (row, frame_out) in codes.chunks_exact_mut(8).zip(frames) {
            if let Some(tokens) = frame_out.as_ref().and_then(|f| f.tokens) {
                for (dst, &src) in row.iter_mut().zip(&tokens[1..9]) {
                    *dst = src.clamp(0, pipeline.lm.config().card as i64 - 1) as u32;
                }
            }
        }
        for (out, frame_out) in pcm_out.chunks_exact_mut(frame).zip(frames) {
            if frame_out.is_some() {
                out.fill(0.0);
            }
        }
        if rows == 0 {
            return Ok(());
        }
        let codes = Tensor::from_vec(codes, (rows, 8), pipeline.lm.device())?;
        let pcm = pipeline
            .mimi
            .decode_step(&codes, &mut self.decoder, &speaking[..rows])?;
        let pcm: Vec<f32> = pcm.flatten_all()?.to_vec1()?;
        for ((out, decoded), &speaks) in pcm_out
            .chunks_exact_mut(frame)
            .zip(pcm.chunks_exact(frame))
            .zip(&speaking)
        {
            if speaks {
                out.copy_from_slice(decoded);
            }
        }
        Ok(())
    }
}
