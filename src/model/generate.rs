//! PersonaPlex's generation state machine (its `LMGen`), batched over slots: a 4-column ring of
//! tokens per slot with a `provided` mask, so any stream can be forced at any call; delays
//! applied on write; the model runs from the second call; outputs from the third.
//!
//! Column arithmetic: at call `t` forced tokens of stream `k` land in column `(t + delay[k]) % 4`;
//! the model reads column `(t − 1) % 4` and fills column `t % 4` where nothing was forced; the
//! output of call `t` is column `(t − 1 + delay[k]) % 4` of every stream.

use super::Result;
use super::depformer::DepformerState;
use super::kv::RingPositions;
use super::lm::{Column, LmModel, STREAMS};
use super::sampling::{Sampler, Sampling};
use super::transformer::{TransformerSlot, TransformerState};
use candle_core::Tensor;

/// Columns in the token ring (max_delay + 3 in the reference).
pub const CACHE_COLUMNS: usize = 4;
/// A cache entry nothing has written yet; reading one is a bug.
pub const UNGENERATED: i64 = -2;
/// Text padding token (PersonaPlex's `existing_text_padding_id`).
pub const TEXT_PAD: i64 = 3;

/// Tokens forced on a call; `None` streams are generated.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Forced {
    pub text: Option<i64>,
    pub agent: Option<[i64; 8]>,
    pub user: Option<[i64; 8]>,
}

/// One slot's token ring.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotTokens {
    cache: [[i64; CACHE_COLUMNS]; STREAMS],
    provided: [[bool; CACHE_COLUMNS]; STREAMS],
    offset: u64,
}

impl Default for SlotTokens {
    fn default() -> Self {
        Self {
            cache: [[UNGENERATED; CACHE_COLUMNS]; STREAMS],
            provided: [[false; CACHE_COLUMNS]; STREAMS],
            offset: 0,
        }
    }
}

impl SlotTokens {
    /// The ring's tokens, `[stream][column]`.
    pub fn cache(&self) -> &[[i64; CACHE_COLUMNS]; STREAMS] {
        &self.cache
    }

    /// Calls made so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn col(position: u64) -> usize {
        (position % CACHE_COLUMNS as u64) as usize
    }

    fn force(&mut self, stream: usize, token: i64, delays: &[usize]) {
        let col = Self::col(self.offset + delays[stream] as u64);
        self.cache[stream][col] = token;
        self.provided[stream][col] = true;
    }

    /// Writes the forced tokens and the initial tokens; returns the (input, target) columns when
    /// this call runs the model (every call but the first).
    fn prepare(
        &mut self,
        forced: &Forced,
        delays: &[usize],
        initial: &Column,
    ) -> Option<(usize, usize)> {
        for (q, &token) in forced.user.iter().flatten().enumerate() {
            self.force(9 + q, token, delays);
        }
        for (q, &token) in forced.agent.iter().flatten().enumerate() {
            self.force(1 + q, token, delays);
        }
        if let Some(token) = forced.text {
            self.force(0, token, delays);
        }
        let col = Self::col(self.offset);
        for (stream, &delay) in delays.iter().enumerate() {
            if self.offset <= delay as u64 {
                self.cache[stream][col] = initial[stream];
                self.provided[stream][col] = true;
            }
        }
        if self.offset == 0 {
            for (stream, &token) in initial.iter().enumerate() {
                self.cache[stream][0] = token;
            }
            self.offset = 1;
            return None;
        }
        Some((Self::col(self.offset - 1), Self::col(self.offset)))
    }

    fn column(&self, col: usize) -> Result<Column> {
        let mut column = [0; STREAMS];
        for (stream, value) in column.iter_mut().enumerate() {
            *value = self.cache[stream][col];
            if *value == UNGENERATED {
                candle_core::bail!(
                    "internal error: stream {stream} read before it was generated (call {})",
                    self.offset
                );
            }
        }
        Ok(column)
    }

    /// The forced token of `stream` in column `col`, if any.
    fn forced_at(&self, stream: usize, col: usize) -> Option<i64> {
        self.provided[stream][col].then_some(self.cache[stream][col])
    }

    /// Stores the generated tokens where nothing was forced and returns the call's output.
    fn finish(
        &mut self,
        input: usize,
        target: usize,
        generated: &Column,
        delays: &[usize],
    ) -> Option<Column> {
        for ((cache, provided), &token) in self
            .cache
            .iter_mut()
            .zip(self.provided.iter_mut())
            .zip(generated)
        {
            provided[input] = false;
            if !provided[target] {
                cache[target] = token;
            }
        }
        let max_delay = delays.iter().copied().max().unwrap_or(0) as u64;
        let t = self.offset;
        self.offset += 1;
        if t <= max_delay {
            return None;
        }
        let mut out = [0; STREAMS];
        for (stream, value) in out.iter_mut().enumerate() {
            *value = self.cache[stream][Self::col(t - 1 + delays[stream] as u64)];
        }
        Some(out)
    }

    /// Overwrites the ring with a voice preset's saved cache (`[17][4]`), as the reference does
    /// after replaying the preset's embeddings.
    pub fn load_cache(&mut self, cache: &[[i64; CACHE_COLUMNS]; STREAMS]) {
        self.cache = *cache;
    }
}

/// How each stream is sampled.
#[derive(Debug, Clone, Copy)]
pub struct SamplingConfig {
    pub text: Sampling,
    pub audio: Sampling,
}

impl SamplingConfig {
    pub const GREEDY: Self = Self {
        text: Sampling::Greedy,
        audio: Sampling::Greedy,
    };
    pub const DEFAULT: Self = Self {
        text: Sampling::TEXT,
        audio: Sampling::AUDIO,
    };
}

/// Everything one slot carries between calls.
pub struct SlotState {
    pub tokens: SlotTokens,
    pub sampler: Sampler,
    pub sampling: SamplingConfig,
}

/// A saved slot: the temporal KV and the token ring (a persona prefill).
#[derive(Clone)]
pub struct Snapshot {
    pub transformer: TransformerSlot,
    pub tokens: SlotTokens,
}

/// What one call produced for one slot.
#[derive(Debug, Clone, PartialEq)]
pub struct CallOutput {
    /// The call's 17 output tokens, once outputs start (from the third call).
    pub tokens: Option<Column>,
    /// The text logits the model produced, when it ran.
    pub text_logits: Option<Vec<f32>>,
}

/// The generator for a batch of slots sharing one model.
pub struct Generator {
    temporal: TransformerState,
    depformer: DepformerState,
    slots: Vec<Option<SlotState>>,
}

/// A call between its temporal half and its depformer half.
pub struct PendingCall {
    prepared: Vec<Option<(usize, usize)>>,
    running: Vec<bool>,
    had_input: Vec<bool>,
    hidden: Option<Tensor>,
    text_logits: Vec<Vec<f32>>,
}

/// What a slot feeds one call: forced tokens, or a precomputed embedding (voice presets).
#[derive(Debug, Clone)]
pub enum CallInput {
    Tokens(Forced),
    Embedding(Tensor),
}

impl Generator {
    pub fn new(
        model: &LmModel,
        batch: usize,
        context: usize,
        positions: RingPositions,
    ) -> Result<Self> {
        Ok(Self {
            temporal: model.transformer_state(batch, context, positions)?,
            depformer: model.depformer_state(batch, positions)?,
            slots: (0..batch).map(|_| None).collect(),
        })
    }

    pub fn batch(&self) -> usize {
        self.slots.len()
    }

    /// Starts slot `slot_idx` afresh.
    pub fn open(&mut self, slot_idx: usize, seed: u64, sampling: SamplingConfig) {
        self.temporal.reset_slot(slot_idx);
        self.slots[slot_idx] = Some(SlotState {
            tokens: SlotTokens::default(),
            sampler: Sampler::new(seed),
            sampling,
        });
    }

    pub fn close(&mut self, slot_idx: usize) {
        self.slots[slot_idx] = None;
    }

    /// Keeps slot `slot_idx`'s context so far (its system prompt) in attention after the window
    /// slides past it — beyond the reference, which forgets its persona after `context` frames.
    pub fn pin_prefix(&mut self, slot_idx: usize) -> Result<()> {
        self.temporal.pin_prefix(slot_idx)
    }

    /// Makes slot `slot_idx`'s attention read `frames` more frames of history than it has
    /// heard (benchmarks: the cache holds whatever it held; only the cost is real).
    pub fn skip_history(&mut self, slot_idx: usize, frames: u64) {
        self.temporal.skip(slot_idx, frames);
    }

    pub fn slot(&self, slot_idx: usize) -> Option<&SlotState> {
        self.slots[slot_idx].as_ref()
    }

    pub fn slot_mut(&mut self, slot_idx: usize) -> Option<&mut SlotState> {
        self.slots[slot_idx].as_mut()
    }

    /// Saves an open slot's state.
    pub fn snapshot(&self, slot_idx: usize) -> Result<Snapshot> {
        let Some(slot) = &self.slots[slot_idx] else {
            candle_core::bail!("slot {slot_idx} is not open")
        };
        Ok(Snapshot {
            transformer: self.temporal.save_slot(slot_idx)?,
            tokens: slot.tokens.clone(),
        })
    }

    /// Opens slot `slot_idx` from a snapshot (possibly taken in another generator).
    pub fn restore(
        &mut self,
        slot_idx: usize,
        snapshot: &Snapshot,
        seed: u64,
        sampling: SamplingConfig,
    ) -> Result<()> {
        self.temporal
            .restore_slot(slot_idx, &snapshot.transformer)?;
        self.slots[slot_idx] = Some(SlotState {
            tokens: snapshot.tokens.clone(),
            sampler: Sampler::new(seed),
            sampling,
        });
        Ok(())
    }

    /// One call for every slot with an input (`None` = the slot sits this call out).
    pub fn step(
        &mut self,
        model: &LmModel,
        inputs: &[Option<CallInput>],
    ) -> Result<Vec<Option<CallOutput>>> {
        let pending = self.begin(model, inputs)?;
        self.complete(model, pending)
    }

    /// The first half of a call: write the forced tokens and run the temporal transformer.
    pub fn begin(&mut self, model: &LmModel, inputs: &[Option<CallInput>]) -> Result<PendingCall> {
        let cfg = model.config();
        let (delays, initial) = (&cfg.delays, model.initial_column());
        let batch = self.slots.len();
        let mut columns = vec![[0i64; STREAMS]; batch];
        let mut embeddings: Vec<Option<Tensor>> = vec![None; batch];
        let mut prepared = vec![None; batch];
        for (slot_idx, input) in inputs.iter().enumerate() {
            let (Some(input), Some(slot)) = (input, self.slots[slot_idx].as_mut()) else {
                continue;
            };
            let forced = match input {
                CallInput::Tokens(forced) => *forced,
                CallInput::Embedding(emb) => {
                    embeddings[slot_idx] = Some(emb.clone());
                    embedding_forcing(&initial)
                }
            };
            prepared[slot_idx] = slot.tokens.prepare(&forced, delays, &initial);
            if prepared[slot_idx].is_none() && embeddings[slot_idx].is_some() {
                // The reference keeps preparing until a call runs the model (the first call never does).
                prepared[slot_idx] = slot.tokens.prepare(&forced, delays, &initial);
            }
            if let Some((input_col, _)) = prepared[slot_idx] {
                columns[slot_idx] = slot.tokens.column(input_col)?;
            }
        }
        let running: Vec<bool> = prepared.iter().map(Option::is_some).collect();
        let mut pending = PendingCall {
            prepared,
            running,
            hidden: None,
            text_logits: Vec::new(),
            had_input: inputs.iter().map(Option::is_some).collect(),
        };
        if pending.running.iter().any(|r| *r) {
            let emb = self.input_embeddings(model, &columns, &embeddings)?;
            let (hidden, text_logits) =
                model.temporal(&emb, &mut self.temporal, &pending.running)?;
            pending.hidden = Some(hidden.squeeze(1)?);
            pending.text_logits = text_logits
                .squeeze(1)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec2()?;
        }
        Ok(pending)
    }

    /// The second half of a call: sample, run the depformer and store the tokens.
    pub fn complete(
        &mut self,
        model: &LmModel,
        pending: PendingCall,
    ) -> Result<Vec<Option<CallOutput>>> {
        let mut outputs: Vec<Option<CallOutput>> = pending
            .had_input
            .iter()
            .map(|&had| {
                had.then_some(CallOutput {
                    tokens: None,
                    text_logits: None,
                })
            })
            .collect();
        let Some(hidden) = &pending.hidden else {
            return Ok(outputs);
        };
        let generated = self.generate(
            model,
            hidden,
            &pending.text_logits,
            &pending.prepared,
            &pending.running,
        )?;
        let delays = &model.config().delays;
        for slot_idx in (0..self.slots.len()).filter(|&b| pending.running[b]) {
            let slot = self.slots[slot_idx]
                .as_mut()
                .expect("running slots are open");
            let (input_col, target_col) =
                pending.prepared[slot_idx].expect("running slots were prepared");
            let out = outputs[slot_idx]
                .as_mut()
                .expect("running slots had an input");
            out.tokens = slot
                .tokens
                .finish(input_col, target_col, &generated[slot_idx], delays);
            out.text_logits = Some(pending.text_logits[slot_idx].clone());
        }
        Ok(outputs)
    }

    fn input_embeddings(
        &self,
        model: &LmModel,
        columns: &[Column],
        embeddings: &[Option<Tensor>],
    ) -> Result<Tensor> {
        let from_tokens = model.embed_columns(columns)?;
        if embeddings.iter().all(Option::is_none) {
            return Ok(from_tokens);
        }
        let rows = embeddings
            .iter()
            .enumerate()
            .map(|(slot_idx, emb)| match emb {
                Some(emb) => emb.reshape((1, 1, ()))?.to_dtype(from_tokens.dtype()),
                None => from_tokens.narrow(0, slot_idx, 1),
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)
    }

    /// Samples the text token and runs the depformer, feeding forced tokens forward.
    fn generate(
        &mut self,
        model: &LmModel,
        hidden: &Tensor,
        text_logits: &[Vec<f32>],
        prepared: &[Option<(usize, usize)>],
        running: &[bool],
    ) -> Result<Vec<Column>> {
        let batch = self.slots.len();
        let mut generated = vec![[0i64; STREAMS]; batch];
        let mut prev = vec![0i64; batch];
        for slot_idx in (0..batch).filter(|&b| running[b]) {
            let slot = self.slots[slot_idx]
                .as_mut()
                .expect("running slots are open");
            let target = prepared[slot_idx].expect("running slots were prepared").1;
            let sampled =
                slot.sampler
                    .sample(&text_logits[slot_idx], slot.sampling.text) as i64;
            generated[slot_idx][0] = sampled;
            prev[slot_idx] = slot.tokens.forced_at(0, target).unwrap_or(sampled);
        }
        self.depformer.reset();
        for k in 0..model.depformer_steps() {
            let logits = model.depformer_step(k, hidden, &prev, &mut self.depformer, running)?;
            let logits: Vec<Vec<f32>> = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
            for slot_idx in (0..batch).filter(|&b| running[b]) {
                let slot = self.slots[slot_idx]
                    .as_mut()
                    .expect("running slots are open");
                let target = prepared[slot_idx].expect("running slots were prepared").1;
                let sampled = slot.sampler.sample(&logits[slot_idx], slot.sampling.audio) as i64;
                generated[slot_idx][1 + k] = sampled;
                prev[slot_idx] = slot.tokens.forced_at(1 + k, target).unwrap_or(sampled);
            }
        }
        // Streams the depformer did not run (serving skips the user's) keep their forced values.
        for slot_idx in (0..batch).filter(|&b| running[b]) {
            let target = prepared[slot_idx].expect("running slots were prepared").1;
            let tokens = &self.slots[slot_idx]
                .as_ref()
                .expect("running slots are open")
                .tokens;
            let unrun = generated[slot_idx]
                .iter_mut()
                .enumerate()
                .skip(1 + model.depformer_steps());
            for (stream, token) in unrun {
                *token = tokens.forced_at(stream, target).unwrap_or(UNGENERATED);
            }
        }
        Ok(generated)
    }
}

/// The dummy forcing the reference applies while replaying voice embeddings: initial audio
/// tokens on both speakers and text padding.
fn embedding_forcing(initial: &Column) -> Forced {
    let mut agent = [0; 8];
    let mut user = [0; 8];
    agent.copy_from_slice(&initial[1..9]);
    user.copy_from_slice(&initial[9..17]);
    Forced {
        text: Some(TEXT_PAD),
        agent: Some(agent),
        user: Some(user),
    }
}
