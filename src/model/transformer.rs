//! The temporal transformer: pre-norm layers of packed-QKV attention with interleaved RoPE over a
//! ring KV cache, and a SwiGLU feed-forward, all stepped for a batch of slots at once.

use super::Result;
use super::checkpoint::lm::TemporalLayerWeights;
use super::kv::{RingKv, RingPositions, SlotKv, attention};
use super::nn::{Linear, RmsNorm, Rope, SwiGlu};
use super::quant::Quant;
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

/// Streaming state: one ring cache per layer, one row per slot.
#[derive(Clone)]
pub struct TransformerState {
    kv: Vec<RingKv>,
}

/// One slot's state, copied out (a persona prefill snapshot).
#[derive(Clone)]
pub struct TransformerSlot {
    kv: Vec<SlotKv>,
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

    /// Fresh state for `batch` slots with a ring of `capacity` frames.
    pub fn state(
        &self,
        batch: usize,
        capacity: usize,
        positions: RingPositions,
        dtype: DType,
        device: &Device,
    ) -> Result<TransformerState> {
        let kv = (0..self.layers.len())
            .map(|_| {
                let kv = RingKv::new(
                    batch,
                    self.heads,
                    capacity,
                    self.head_dim,
                    dtype,
                    device,
                    positions,
                )?;
                Ok(kv.with_pinning(self.rope.clone()))
            })
            .collect::<Result<_>>()?;
        Ok(TransformerState { kv })
    }

    /// Runs `xs` `[batch, time, dim]` through every layer; each active slot advances by `time`.
    pub fn forward(
        &self,
        xs: &Tensor,
        state: &mut TransformerState,
        active: &[bool],
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("temporal").entered();
        let (_, time, _) = xs.dims3()?;
        let positions: Vec<Vec<u64>> = (0..active.len())
            .map(|b| (0..time as u64).map(|t| state.position(b) + t).collect())
            .collect();
        let mut xs = xs.clone();
        for (layer, kv) in self.layers.iter().zip(state.kv.iter_mut()) {
            let attended =
                self.attend(layer, &layer.norm1.forward(&xs)?, kv, &positions, active)?;
            xs = (xs + attended)?;
            xs = (&xs + layer.ffn.forward(&layer.norm2.forward(&xs)?)?)?;
        }
        Ok(xs)
    }

    fn attend(
        &self,
        layer: &Layer,
        xs: &Tensor,
        kv: &mut RingKv,
        positions: &[Vec<u64>],
        active: &[bool],
    ) -> Result<Tensor> {
        let (batch, time, dim) = xs.dims3()?;
        // b, t, (3 h d) -> 3 × (b, h, t, d)
        let qkv =
            layer
                .in_proj
                .forward(xs)?
                .reshape((batch, time, 3, self.heads, self.head_dim))?;
        let split = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
        let q = self.rope.apply(&split(0)?, positions)?;
        let k = self.rope.apply(&split(1)?, positions)?;
        let v = split(2)?.contiguous()?;
        let attend = kv.append(&k, &v, active)?;
        let out = attention(&q, &attend)?
            .transpose(1, 2)?
            .reshape((batch, time, dim))?;
        layer.out_proj.forward(&out)
    }
}

impl TransformerState {
    /// Frames slot `slot_idx` has seen (the position of its next frame).
    pub fn position(&self, slot_idx: usize) -> u64 {
        self.kv.first().map_or(0, |kv| kv.end(slot_idx))
    }

    pub fn reset_slot(&mut self, slot_idx: usize) {
        self.kv.iter_mut().for_each(|kv| kv.reset_slot(slot_idx));
    }

    /// Keeps everything slot `slot_idx` has seen so far (its persona) in attention for good.
    pub fn pin_prefix(&mut self, slot_idx: usize) -> Result<()> {
        let len = self.position(slot_idx) as usize;
        self.kv
            .iter_mut()
            .try_for_each(|kv| kv.pin_prefix(slot_idx, len))
    }

    pub fn save_slot(&self, slot_idx: usize) -> Result<TransformerSlot> {
        Ok(TransformerSlot {
            kv: self
                .kv
                .iter()
                .map(|kv| kv.save_slot(slot_idx))
                .collect::<Result<_>>()?,
        })
    }

    pub fn restore_slot(&mut self, slot_idx: usize, saved: &TransformerSlot) -> Result<()> {
        for (kv, layer) in self.kv.iter_mut().zip(&saved.kv) {
            kv.restore_slot(slot_idx, layer)?;
        }
        Ok(())
    }
}
