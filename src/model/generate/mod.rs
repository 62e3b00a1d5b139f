//! PersonaPlex's generation state machine (its `LMGen`), batched over slots: a 4-column ring of
//! tokens per slot with a `provided` mask, so any stream can be forced at any call; delays
//! applied on write; the model runs from the second call; outputs from the third.
//!
//! Column arithmetic: at call `t` forced tokens of stream `k` land in column `(t + delay[k]) % 4`;
//! the model reads column `(t − 1) % 4` and fills column `t % 4` where nothing was forced; the
//! output of call `t` is column `(t − 1 + delay[k]) % 4` of every stream.

mod replay;

use super::graph_cache::GraphMode;

use super::Result;
use super::depformer::{DepformerState, TokenFeed};
use super::kv::RingPositions;
use super::lm::{Column, LmModel, STREAMS};
use super::quant::KvQuant;
use super::sampling::{self, DrawParams, Sampler, Sampling};
use super::transformer::{TransformerSlot, TransformerState};
use candle_core::{DType, Device, Tensor};

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

    /// `prepare` for `input`: an embedding goes with the reference's dummy forcing, prepared
    /// again when the call runs no model (the reference keeps preparing until one does).
    fn prepare_input(
        &mut self,
        input: &CallInput,
        delays: &[usize],
        initial: &Column,
    ) -> Option<(usize, usize)> {
        match input {
            CallInput::Tokens(forced) => self.prepare(forced, delays, initial),
            CallInput::Embedding(_) => {
                let forced = embedding_forcing(initial);
                self.prepare(&forced, delays, initial)
                    .or_else(|| self.prepare(&forced, delays, initial))
            }
        }
    }

    /// Whether `target` has a forced token on each of the first `streams` streams (the drawn ones).
    fn forces(&self, target: usize, streams: usize) -> bool {
        (0..streams).all(|stream| self.provided[stream][target])
    }

    /// The column a call keeps for `target` when it drew `drawn` (per stream, from the text):
    /// a stream it did not draw keeps its forced token.
    fn kept(&self, target: usize, drawn: &[u32]) -> Column {
        let mut column = [UNGENERATED; STREAMS];
        for (stream, token) in column.iter_mut().enumerate() {
            *token = match drawn.get(stream) {
                Some(&token) => i64::from(token),
                None => self.forced_at(stream, target).unwrap_or(UNGENERATED),
            };
        }
        column
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

impl Snapshot {
    /// Bytes of the model's device memory it holds (its keys and values).
    pub fn bytes(&self) -> u64 {
        self.transformer.bytes()
    }

    /// This snapshot with its keys and values stored as `quant` says (a prompt run over a dense
    /// ring, for a model that keeps int8 keys and values).
    pub fn stored_as(&self, quant: KvQuant) -> Result<Self> {
        Ok(Self {
            transformer: self.transformer.stored_as(quant)?,
            tokens: self.tokens.clone(),
        })
    }
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
    /// Whether calls copy their text logits to the host (tests; it costs a transfer a call).
    record_text_logits: bool,
    depformer_graph: GraphMode<replay::DepformerGraphKey>,
    temporal_graph: GraphMode,
    /// Calls that ran the depformer half (one whose every drawn token was forced skips it).
    depformer_calls: u64,
    /// Forwards of forced calls (`run_forced`).
    forced_chunks: u64,
}

/// The rows a call computes: the slots up to the last running one, rounded up to a power of two
/// (so idle slots past the busy ones cost nothing, and a few shapes — one CUDA graph each —
/// cover every occupancy).
pub fn rows_to_run(running: &[bool]) -> usize {
    match running.iter().rposition(|r| *r) {
        Some(last) => (last + 1).next_power_of_two().min(running.len()),
        None => 0,
    }
}

/// A call between its temporal half and its depformer half.
pub struct PendingCall {
    prepared: Vec<Option<(usize, usize)>>,
    running: Vec<bool>,
    had_input: Vec<bool>,
    /// The rows (slots from 0) the model computes (`rows_to_run`).
    rows: usize,
    /// The temporal output `[batch, dim]` and text logits `[batch, text_card]`, when the model ran.
    temporal: Option<(Tensor, Tensor)>,
}

/// What a slot feeds one call: forced tokens, or a precomputed embedding (voice presets).
#[derive(Debug, Clone)]
pub enum CallInput {
    Tokens(Forced),
    Embedding(Tensor),
}

/// The most calls `Generator::run_forced` runs as one forward.
pub const FORCED_CHUNK: usize = 64;

impl Generator {
    pub fn new(
        model: &LmModel,
        batch: usize,
        context: usize,
        positions: RingPositions,
    ) -> Result<Self> {
        Self::stored(model, batch, context, (positions, model.kv_quant()))
    }

    /// A batch-1 generator for a system prompt over `capacity` frames: its keys and values in
    /// the model's dtype whatever the model keeps, so that its calls run together
    /// (`run_forced`; an int8 ring takes one token a step). `Snapshot::stored_as` turns what it
    /// leaves into the model's storage.
    pub fn for_prompt(model: &LmModel, capacity: usize, positions: RingPositions) -> Result<Self> {
        Self::stored(model, 1, capacity, (positions, KvQuant::None))
    }

    fn stored(
        model: &LmModel,
        batch: usize,
        context: usize,
        (positions, kv_quant): (RingPositions, KvQuant),
    ) -> Result<Self> {
        Ok(Self {
            temporal: model.transformer_state_stored(batch, context, (positions, kv_quant))?,
            depformer: model.depformer_state(batch, positions)?,
            slots: (0..batch).map(|_| None).collect(),
            record_text_logits: false,
            depformer_graph: GraphMode::Off,
            temporal_graph: GraphMode::Off,
            depformer_calls: 0,
            forced_chunks: 0,
        })
    }

    /// Calls so far that ran the depformer half.
    pub fn depformer_calls(&self) -> u64 {
        self.depformer_calls
    }

    /// Forwards `run_forced` has made so far (each one for one or more calls).
    pub fn forced_chunks(&self) -> u64 {
        self.forced_chunks
    }

    /// How both transformers attend (the CPU runs the kernels' references when asked).
    pub fn set_decode_attention(&mut self, decode: super::decode::DecodeAttention) {
        self.temporal.set_decode(decode);
        self.depformer.set_decode(decode);
    }

    /// Makes every call return its text logits (`CallOutput::text_logits`).
    pub fn record_text_logits(&mut self, record: bool) {
        self.record_text_logits = record;
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

    /// Runs the first calls of `inputs` (slot `slot_idx`'s next ones, in order) that force
    /// every stream the model draws, as a system prompt's do, as one forward of the temporal
    /// transformer over all their positions: nothing they draw would be kept, so only the keys
    /// and values they leave matter, and each product then reads its weights once for all of
    /// them rather than once a call. Returns how many ran, up to `FORCED_CHUNK` and the room
    /// the ring has (`TransformerState::chunk_room`); 0 when the first cannot run so (`step`
    /// it instead), or while calls record their text logits.
    pub fn run_forced(
        &mut self,
        model: &LmModel,
        slot_idx: usize,
        inputs: &[CallInput],
    ) -> Result<usize> {
        // Only the rows up to the prompt's run: a forward of many positions is never captured,
        // so its row count need not be a graph's bucket.
        let mut running = vec![false; slot_idx + 1];
        running[slot_idx] = true;
        let Some(slot) = self.slots[slot_idx]
            .as_ref()
            .filter(|_| !self.record_text_logits)
        else {
            return Ok(0);
        };
        let room = self.temporal.chunk_room(slot_idx, running.len());
        let (delays, initial) = (&model.config().delays, model.initial_column());
        let drawn_streams = model.depformer_steps() + 1;
        let mut tokens = slot.tokens.clone();
        let (mut columns, mut embeddings) = (Vec::new(), Vec::new());
        for input in inputs.iter().take(room.min(FORCED_CHUNK)) {
            let mut next = tokens.clone();
            let Some((input_col, target)) = next.prepare_input(input, delays, &initial) else {
                break;
            };
            if !next.forces(target, drawn_streams) {
                break;
            }
            columns.push(next.column(input_col)?);
            embeddings.push(match input {
                CallInput::Tokens(_) => None,
                CallInput::Embedding(emb) => Some(emb.clone()),
            });
            let kept = next.kept(target, &[]);
            next.finish(input_col, target, &kept, delays);
            tokens = next;
        }
        if columns.is_empty() {
            return Ok(0);
        }
        // The chunk's positions embedded as a batch of one-frame rows would be, then laid along
        // time on the slot's row.
        let emb = self.input_embeddings(model, &columns, &embeddings)?;
        let emb = on_row(
            emb.reshape((1, columns.len(), ()))?,
            slot_idx,
            running.len(),
        )?;
        model.fill_temporal(&emb, &mut self.temporal, &running)?;
        let slot = self.slots[slot_idx].as_mut().expect("checked open above");
        slot.tokens = tokens;
        slot.sampler.advance((drawn_streams * columns.len()) as u64);
        self.forced_chunks += 1;
        Ok(columns.len())
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
            if let CallInput::Embedding(emb) = input {
                embeddings[slot_idx] = Some(emb.clone());
            }
            prepared[slot_idx] = slot.tokens.prepare_input(input, delays, &initial);
            if let Some((input_col, _)) = prepared[slot_idx] {
                columns[slot_idx] = slot.tokens.column(input_col)?;
            }
        }
        let running: Vec<bool> = prepared.iter().map(Option::is_some).collect();
        let rows = rows_to_run(&running);
        let mut pending = PendingCall {
            prepared,
            running,
            rows,
            temporal: None,
            had_input: inputs.iter().map(Option::is_some).collect(),
        };
        if rows > 0 {
            let emb = self.input_embeddings(model, &columns[..rows], &embeddings[..rows])?;
            let (hidden, text_logits) = self.run_temporal(model, &emb, &pending.running[..rows])?;
            pending.temporal = Some((hidden.squeeze(1)?, text_logits.squeeze(1)?));
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
        let Some((hidden, text_logits)) = &pending.temporal else {
            return Ok(outputs);
        };
        let rows = pending.rows;
        let generated = self.generate(
            model,
            hidden,
            text_logits,
            &pending.prepared[..rows],
            &pending.running[..rows],
        )?;
        let mut logits_out: Vec<Option<Vec<f32>>> = vec![None; self.slots.len()];
        if self.record_text_logits {
            let logits: Vec<Vec<f32>> = text_logits.to_dtype(DType::F32)?.to_vec2()?;
            for (slot, row) in logits_out.iter_mut().zip(logits) {
                *slot = Some(row);
            }
        }
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
            out.text_logits = logits_out[slot_idx].take();
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

    /// Draws the text token and runs the depformer, feeding forced tokens forward. Every token
    /// is drawn where the model runs; the frame's tokens reach the host in one copy at the end.
    fn generate(
        &mut self,
        model: &LmModel,
        hidden: &Tensor,
        text_logits: &Tensor,
        prepared: &[Option<(usize, usize)>],
        running: &[bool],
    ) -> Result<Vec<Column>> {
        let steps = model.depformer_steps();
        let rows = running.len();
        // A prompt forces every stream of its calls: nothing drawn would be kept, and the
        // depformer holds nothing from one call to the next, so its half is skipped.
        let drawn = if self.forces_every_draw(prepared, running, steps + 1) {
            vec![Vec::new(); rows]
        } else {
            let plan = DrawPlan::new(
                &self.slots[..rows],
                prepared,
                running,
                steps + 1,
                model.device(),
            )?;
            self.depformer_calls += 1;
            self.draw_tokens(model, hidden, text_logits, &plan, running)?
        };
        let mut generated = vec![[0i64; STREAMS]; self.slots.len()];
        for slot_idx in (0..rows).filter(|&b| running[b]) {
            let slot = self.slots[slot_idx]
                .as_mut()
                .expect("running slots are open");
            slot.sampler.advance(steps as u64 + 1);
            let target = prepared[slot_idx].expect("running slots were prepared").1;
            // Streams the depformer did not run (serving skips the user's) keep their forced
            // values.
            generated[slot_idx] = slot.tokens.kept(target, &drawn[slot_idx]);
        }
        Ok(generated)
    }
}

impl Generator {
    /// Whether every running slot has a token forced on each of the `streams` drawn streams.
    fn forces_every_draw(
        &self,
        prepared: &[Option<(usize, usize)>],
        running: &[bool],
        streams: usize,
    ) -> bool {
        (0..running.len()).filter(|&b| running[b]).all(|b| {
            match (self.slots[b].as_ref(), prepared[b]) {
                (Some(slot), Some((_, target))) => slot.tokens.forces(target, streams),
                _ => false,
            }
        })
    }

    /// The temporal step for the first `running.len()` slots: hidden states and text logits,
    /// `[rows, 1, …]`, from the graph when one replays.
    fn run_temporal(
        &mut self,
        model: &LmModel,
        emb: &Tensor,
        running: &[bool],
    ) -> Result<(Tensor, Tensor)> {
        let (step, rope) = model.plan_temporal(&mut self.temporal, running)?;
        #[cfg(feature = "cuda")]
        if let Some(out) = self.replay_temporal(model, emb, &step, &rope)? {
            return Ok(out);
        }
        model.temporal_planned(emb, &self.temporal, &step, &rope)
    }

    /// The frame's drawn tokens `[slot][stream]`, from the graph when one replays.
    fn draw_tokens(
        &mut self,
        model: &LmModel,
        hidden: &Tensor,
        text_logits: &Tensor,
        plan: &DrawPlan,
        running: &[bool],
    ) -> Result<Vec<Vec<u32>>> {
        #[cfg(feature = "cuda")]
        if let Some(drawn) = self.replay_depformer(model, hidden, text_logits, plan, running)? {
            return Ok(drawn);
        }
        draw_frame(
            model,
            &mut self.depformer,
            hidden,
            text_logits,
            plan,
            running,
        )?
        .to_vec2()
    }
}

/// `emb` `[1, time, dim]` on row `slot_idx` of `rows`, zeros on the rows that sit it out.
fn on_row(emb: Tensor, slot_idx: usize, rows: usize) -> Result<Tensor> {
    let (_, time, dim) = emb.dims3()?;
    let (dtype, device) = (emb.dtype(), emb.device().clone());
    let idle = |count: usize| Tensor::zeros((count, time, dim), dtype, &device);
    let mut parts = Vec::with_capacity(3);
    if slot_idx > 0 {
        parts.push(idle(slot_idx)?);
    }
    parts.push(emb);
    if rows > slot_idx + 1 {
        parts.push(idle(rows - slot_idx - 1)?);
    }
    Tensor::cat(&parts, 0)
}

/// Draws the text token, runs the depformer steps and draws each codebook, all on the model's
/// device: the frame's tokens `[batch, streams]` u32, still there.
fn draw_frame(
    model: &LmModel,
    depformer: &mut DepformerState,
    hidden: &Tensor,
    text_logits: &Tensor,
    plan: &DrawPlan,
    running: &[bool],
) -> Result<Tensor> {
    let mut drawn = vec![sampling::draw(text_logits, &plan.params(0)?)?];
    depformer.reset();
    for k in 0..model.depformer_steps() {
        let prev = plan.feed(k, &drawn[k])?;
        let logits = model.depformer_step(k, hidden, &prev, depformer, running)?;
        drawn.push(sampling::draw(&logits, &plan.params(k + 1)?)?);
    }
    Tensor::stack(&drawn, 1)
}

/// How one call draws its tokens: per drawn stream (text, then each depformer step) and slot,
/// the sampler's seed and counter, the sampling settings, and the token forced on that stream
/// (which then feeds the next step instead of the drawn one). Built on the host, sent in two
/// copies.
struct DrawPlan {
    /// i64 `[5, streams, batch]`: seed, counter, top-k, forced (0/1), forced token.
    ints: Tensor,
    /// f32 `[streams, batch]`.
    temperature: Tensor,
    /// Per stream: whether any slot is forced on it, and whether any forced token is −1.
    forced: Vec<(bool, bool)>,
}

impl DrawPlan {
    const SEED: usize = 0;
    const COUNTER: usize = 1;
    const TOP_K: usize = 2;
    const FORCED: usize = 3;
    const FORCED_TOKEN: usize = 4;

    fn new(
        slots: &[Option<SlotState>],
        prepared: &[Option<(usize, usize)>],
        running: &[bool],
        streams: usize,
        device: &Device,
    ) -> Result<Self> {
        let batch = slots.len();
        let mut ints = vec![0i64; 5 * streams * batch];
        let mut temperature = vec![0f32; streams * batch];
        let mut forced = vec![(false, false); streams];
        for stream in 0..streams {
            for slot_idx in 0..batch {
                let at = |field: usize| (field * streams + stream) * batch + slot_idx;
                let slot = slots[slot_idx].as_ref().filter(|_| running[slot_idx]);
                let Some((slot, (_, target))) = slot.zip(prepared[slot_idx]) else {
                    // Idle rows: a greedy draw nobody reads.
                    ints[at(Self::TOP_K)] = 1;
                    continue;
                };
                let setting = if stream == 0 {
                    slot.sampling.text
                } else {
                    slot.sampling.audio
                };
                let (top_k, temp) = setting.draw_params();
                ints[at(Self::SEED)] = slot.sampler.seed() as i64;
                ints[at(Self::COUNTER)] = (slot.sampler.counter() + stream as u64) as i64;
                ints[at(Self::TOP_K)] = top_k;
                temperature[stream * batch + slot_idx] = temp;
                if let Some(token) = slot.tokens.forced_at(stream, target) {
                    ints[at(Self::FORCED)] = 1;
                    ints[at(Self::FORCED_TOKEN)] = token;
                    forced[stream] = (true, forced[stream].1 || token < 0);
                }
            }
        }
        Ok(Self {
            ints: Tensor::from_vec(ints, (5, streams, batch), device)?,
            temperature: Tensor::from_vec(temperature, (streams, batch), device)?,
            forced,
        })
    }

    /// Streams drawn per call (text and each depformer step).
    #[cfg(feature = "cuda")]
    fn streams(&self) -> usize {
        self.forced.len()
    }

    /// This plan reading its numbers from other tensors of the same shapes (a graph's buffers).
    #[cfg(feature = "cuda")]
    fn with_buffers(&self, ints: &Tensor, temperature: &Tensor) -> Self {
        Self {
            ints: ints.clone(),
            temperature: temperature.clone(),
            forced: self.forced.clone(),
        }
    }

    fn field(&self, field: usize, stream: usize) -> Result<Tensor> {
        self.ints.get(field)?.get(stream)
    }

    /// The draw parameters of `stream`.
    fn params(&self, stream: usize) -> Result<DrawParams> {
        Ok(DrawParams {
            seeds: self.field(Self::SEED, stream)?,
            counters: self.field(Self::COUNTER, stream)?,
            top_k: self.field(Self::TOP_K, stream)?,
            temperature: self.temperature.get(stream)?,
        })
    }

    /// What the step after `stream` is fed: its forced token where there is one, else `drawn`.
    fn feed(&self, stream: usize, drawn: &Tensor) -> Result<TokenFeed> {
        let drawn = drawn.to_dtype(DType::I64)?;
        let (any_forced, has_zero) = self.forced[stream];
        if !any_forced {
            return Ok(TokenFeed::on_device(drawn, false));
        }
        let ids = self
            .field(Self::FORCED, stream)?
            .where_cond(&self.field(Self::FORCED_TOKEN, stream)?, &drawn)?;
        Ok(TokenFeed::on_device(ids, has_zero))
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

#[cfg(test)]
mod tests {
    use super::rows_to_run;

    #[test]
    fn a_call_computes_up_to_its_last_busy_slot_in_powers_of_two() {
        let busy = |slots: &[usize], batch: usize| {
            let mut running = vec![false; batch];
            slots.iter().for_each(|&s| running[s] = true);
            rows_to_run(&running)
        };
        assert_eq!(busy(&[], 64), 0);
        assert_eq!(busy(&[0], 64), 1);
        assert_eq!(busy(&[0, 2], 64), 4);
        assert_eq!(busy(&[4], 64), 8);
        assert_eq!(busy(&[6], 7), 7, "never more than the batch");
        assert_eq!(busy(&[40], 64), 64);
    }
}
