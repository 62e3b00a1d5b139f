//! The temporal transformer: pre-norm layers of packed-QKV attention with interleaved RoPE over a
//! ring KV cache, and a SwiGLU feed-forward, all stepped for a batch of slots at once.

use super::Result;
use super::checkpoint::lm::TemporalLayerWeights;
use super::decode::DecodeAttention;
use super::kv::{RingCache, RingPositions, RingShape, RingStep, SlotKv, attention, split_qkv};
use super::nn::{Linear, RmsNorm, Rope, RopeTables, SwiGlu};
use super::quant::{KvQuant, Quant};
use candle_core::{DType, Device, Tensor};

/// RMSNorm epsilon of the Moshi language model.
pub const RMS_EPS: f32 = 1e-8;

struct Layer {
    norm1: RmsNorm,
    norm2: RmsNorm,
    in_proj: Linear,
    out_proj: Linear,
    ffn: SwiGlu,
}

/// The temporal transformer's weights.
pub struct Transformer {
    layers: Vec<Layer>,
    heads: usize,
    head_dim: usize,
    rope: Rope,
}

/// Streaming state: the ring caches of every layer, one row per slot.
#[derive(Clone)]
pub struct TransformerState {
    cache: RingCache,
}

/// One slot's state, copied out (a persona prefill snapshot).
#[derive(Clone)]
pub struct TransformerSlot {
    kv: SlotKv,
}

impl TransformerSlot {
    /// Bytes of device memory it holds.
    pub fn bytes(&self) -> u64 {
        self.kv.bytes()
    }

    /// This slot with its keys and values stored as `quant` says.
    pub fn stored_as(&self, quant: KvQuant) -> Result<Self> {
        Ok(Self {
            kv: self.kv.stored_as(quant)?,
        })
    }
}

impl Transformer {
    pub fn new(
        weights: Vec<TemporalLayerWeights>,
        dim: usize,
        heads: usize,
        max_period: f64,
        quant: Quant,
    ) -> Result<Self> {
        let layers = weights
            .into_iter()
            .map(|w| {
                Ok(Layer {
                    norm1: RmsNorm::new(w.norm1, RMS_EPS)?,
                    norm2: RmsNorm::new(w.norm2, RMS_EPS)?,
                    in_proj: Linear::with_quant(&w.in_proj, quant)?,
                    out_proj: Linear::with_quant(&w.out_proj, quant)?,
                    ffn: SwiGlu::with_quant(&w.linear_in, &w.linear_out, quant)?,
                })
            })
            .collect::<Result<_>>()?;
        let head_dim = dim / heads;
        Ok(Self {
            layers,
            heads,
            head_dim,
            rope: Rope::new(head_dim, max_period),
        })
    }

    /// Fresh state for `batch` slots with a ring of `capacity` frames, labelled and stored as
    /// `(positions, quant)` say.
    pub fn state(
        &self,
        batch: usize,
        capacity: usize,
        (positions, quant): (RingPositions, KvQuant),
        dtype: DType,
        device: &Device,
    ) -> Result<TransformerState> {
        let shape = RingShape {
            layers: self.layers.len(),
            batch,
            heads: self.heads,
            capacity,
            head_dim: self.head_dim,
        };
        let mut cache = RingCache::stored(shape, dtype, quant, device, positions)?
            .with_pinning(self.rope.clone());
        cache.set_decode(DecodeAttention::for_device(dtype, device, self.head_dim));
        Ok(TransformerState { cache })
    }

    /// Runs `xs` `[batch, time, dim]` through every layer; each active slot advances by `time`.
    pub fn forward(
        &self,
        xs: &Tensor,
        state: &mut TransformerState,
        active: &[bool],
    ) -> Result<Tensor> {
        let (_, time, _) = xs.dims3()?;
        let (step, rope) = self.plan(state, time, active, xs.device())?;
        self.forward_planned(xs, state, &step, &rope)
    }

    /// Starts a step of `time` tokens for the first `active.len()` slots: where each layer
    /// writes, what it sees, and the RoPE tables of the new tokens.
    pub fn plan(
        &self,
        state: &mut TransformerState,
        time: usize,
        active: &[bool],
        device: &Device,
    ) -> Result<(RingStep, RopeTables)> {
        let step = state.cache.begin(time, active)?;
        // In f32 for every path, as the reference rotates: the kernels take f32 tables, and the
        // composed path rotates bf16 activations in f32 (`rotated`).
        let rope = self.rope.tables(step.positions(), DType::F32, device)?;
        Ok((step, rope))
    }

    /// Runs `xs` through every layer as `step` and `rope` (from `plan`) say.
    pub fn forward_planned(
        &self,
        xs: &Tensor,
        state: &TransformerState,
        step: &RingStep,
        rope: &RopeTables,
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("temporal").entered();
        let mut xs = xs.clone();
        for (layer_idx, layer) in self.layers.iter().enumerate() {
            xs = self.attend(layer_idx, &xs, &state.cache, step, rope)?;
            xs = layer.ffn.sublayer(&xs, &layer.norm2)?;
        }
        Ok(xs)
    }

    /// Layer `layer_idx`'s attention sublayer: `xs` plus the attention over `xs` normalised.
    fn attend(
        &self,
        layer_idx: usize,
        xs: &Tensor,
        cache: &RingCache,
        step: &RingStep,
        rope: &RopeTables,
    ) -> Result<Tensor> {
        let layer = &self.layers[layer_idx];
        let (batch, time, dim) = xs.dims3()?;
        let qkv = layer.in_proj.forward_normed(xs, &layer.norm1)?;
        if step.uses_kernels() {
            let out = cache
                .attend_kernels(layer_idx, step, &qkv, rope)?
                .transpose(1, 2)?
                .reshape((batch, time, dim))?;
            return layer.out_proj.forward_add(&out, xs);
        }
        let [q, k, v] = split_qkv(&qkv, self.heads, self.head_dim)?;
        let (q, k, v) = (rotated(&q, rope)?, rotated(&k, rope)?, v.contiguous()?);
        let attend = cache.append(layer_idx, step, &k, &v)?;
        let out = attention(&q, &attend)?
            .transpose(1, 2)?
            .reshape((batch, time, dim))?;
        layer.out_proj.forward_add(&out, xs)
    }
}

/// `xs` rotated by `rope`'s f32 tables, in f32, returned in `xs`'s dtype.
fn rotated(xs: &Tensor, rope: &RopeTables) -> Result<Tensor> {
    rope.apply_f32(xs)?.to_dtype(xs.dtype())
}

impl TransformerState {
    /// Frames slot `slot_idx` has seen (the position of its next frame).
    pub fn position(&self, slot_idx: usize) -> u64 {
        self.cache.end(slot_idx)
    }

    pub fn reset_slot(&mut self, slot_idx: usize) {
        self.cache.reset_slot(slot_idx);
    }

    /// The most tokens slot `slot_idx` can take in one step of the first `rows` slots that
    /// equals as many one-token steps (`RingCache::chunk_room`).
    pub fn chunk_room(&self, slot_idx: usize, rows: usize) -> usize {
        self.cache.chunk_room(slot_idx, rows)
    }

    /// How one-token steps attend (by default the kernels where they run natively).
    pub fn set_decode(&mut self, decode: DecodeAttention) {
        self.cache.set_decode(decode);
    }

    /// Makes every step read the whole ring, so its shapes never change (CUDA graphs).
    pub fn set_whole_ring(&mut self, whole: bool) {
        self.cache.set_whole_ring(whole);
    }

    /// Advances slot `slot_idx` by `frames` without computing them (benchmarks).
    pub fn skip(&mut self, slot_idx: usize, frames: u64) {
        self.cache.skip(slot_idx, frames);
    }

    /// Keeps everything slot `slot_idx` has seen so far (its persona) in attention for good.
    pub fn pin_prefix(&mut self, slot_idx: usize) -> Result<()> {
        let len = self.position(slot_idx) as usize;
        self.cache.pin_prefix(slot_idx, len)
    }

    pub fn save_slot(&self, slot_idx: usize) -> Result<TransformerSlot> {
        Ok(TransformerSlot {
            kv: self.cache.save_slot(slot_idx)?,
        })
    }

    pub fn restore_slot(&mut self, slot_idx: usize, saved: &TransformerSlot) -> Result<()> {
        self.cache.restore_slot(slot_idx, &saved.kv)
    }
}
