//! The depth transformer: per frame, one small transformer step per codebook, each step with its
//! own weights, fed the temporal hidden state and the previous codebook's token.

use super::Result;
use super::checkpoint::lm::DepformerWeights;
use super::decode::DecodeAttention;
use super::kv::{RingCache, RingPositions, RingShape, attention, split_qkv};
use super::nn::{Linear, RmsNorm, RopeTables, SwiGlu};
use super::quant::Quant;
use super::transformer::RMS_EPS;
use candle_core::{DType, Device, Tensor};

struct StepLayer {
    in_proj: Linear,
    out_proj: Linear,
    ffn: SwiGlu,
}

struct Step {
    input: Linear,
    emb: Tensor,
    head: Linear,
    layers: Vec<StepLayer>,
}

pub struct Depformer {
    norms: Vec<(RmsNorm, RmsNorm)>,
    steps: Vec<Step>,
    heads: usize,
    head_dim: usize,
    /// Steps the checkpoint holds (the cache capacity, as in the reference).
    cache_steps: usize,
}

/// The per-frame KV state of the depformer, one row per slot; reset at every frame.
pub struct DepformerState {
    cache: RingCache,
    /// RoPE tables that rotate nothing, by rows: the depformer has no positions, but the
    /// attention kernels rotate as they write the ring.
    identity_rope: Vec<(usize, RopeTables)>,
}

impl Depformer {
    pub fn new(
        weights: DepformerWeights,
        dim: usize,
        heads: usize,
        cache_steps: usize,
        quant: Quant,
    ) -> Result<Self> {
        let norms = weights
            .norms
            .into_iter()
            .map(|(n1, n2)| Ok((RmsNorm::new(n1, RMS_EPS)?, RmsNorm::new(n2, RMS_EPS)?)))
            .collect::<Result<_>>()?;
        let steps = weights
            .steps
            .into_iter()
            .map(|s| {
                let layers = s
                    .layers
                    .iter()
                    .map(|l| {
                        Ok(StepLayer {
                            in_proj: Linear::with_quant(&l.in_proj, quant)?,
                            out_proj: Linear::with_quant(&l.out_proj, quant)?,
                            ffn: SwiGlu::with_quant(&l.linear_in, &l.linear_out, quant)?,
                        })
                    })
                    .collect::<Result<_>>()?;
                Ok(Step {
                    input: Linear::with_quant(&s.input, quant)?,
                    emb: s.emb,
                    head: Linear::new(&s.head)?,
                    layers,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            norms,
            steps,
            heads,
            head_dim: dim / heads,
            cache_steps,
        })
    }

    /// Steps this model runs per frame.
    pub fn num_steps(&self) -> usize {
        self.steps.len()
    }

    pub fn state(
        &self,
        batch: usize,
        positions: RingPositions,
        dtype: DType,
        device: &Device,
    ) -> Result<DepformerState> {
        let shape = RingShape {
            layers: self.norms.len(),
            batch,
            heads: self.heads,
            capacity: self.cache_steps,
            head_dim: self.head_dim,
        };
        let mut cache = RingCache::new(shape, dtype, device, positions)?.with_index_memo();
        cache.set_decode(DecodeAttention::for_device(dtype, device, self.head_dim));
        Ok(DepformerState {
            cache,
            identity_rope: Vec::new(),
        })
    }

    /// Runs step `k` for every slot: `hidden` `[batch, temporal_dim]`, `prev` the previous
    /// token of each slot (the text token for step 0); returns logits `[batch, card]`.
    pub fn step(
        &self,
        k: usize,
        hidden: &Tensor,
        prev: &TokenFeed,
        state: &mut DepformerState,
        active: &[bool],
    ) -> Result<Tensor> {
        let step = &self.steps[k];
        let batch = hidden.dim(0)?;
        let mut xs = step
            .input
            .forward_add(hidden, &prev.embed(&step.emb)?)?
            .unsqueeze(1)?;
        let ring_step = state.cache.begin(1, active)?;
        let identity_rope = match ring_step.uses_kernels() {
            true => Some(state.identity_rope(active.len(), self.head_dim, hidden.device())?),
            false => None,
        };
        for (layer_idx, (layer, (norm1, norm2))) in step.layers.iter().zip(&self.norms).enumerate()
        {
            let qkv = layer.in_proj.forward_normed(&xs, norm1)?;
            let out = match &identity_rope {
                Some(rope) => state
                    .cache
                    .attend_kernels(layer_idx, &ring_step, &qkv, rope)?,
                None => {
                    let [q, k, v] = split_qkv(&qkv, self.heads, self.head_dim)?;
                    let attend = state.cache.append(layer_idx, &ring_step, &k, &v)?;
                    attention(&q.contiguous()?, &attend)?
                }
            };
            let out = out.transpose(1, 2)?.reshape((batch, 1, ()))?;
            xs = layer.out_proj.forward_add(&out, &xs)?;
            xs = layer.ffn.sublayer(&xs, norm2)?;
        }
        step.head.forward(&xs.squeeze(1)?)
    }
}

impl DepformerState {
    /// Forgets the previous frame (the depformer attends within one frame only).
    pub fn reset(&mut self) {
        self.cache.reset_all();
    }

    /// How its steps attend from now on.
    pub fn set_decode(&mut self, decode: DecodeAttention) {
        self.cache.set_decode(decode);
    }

    /// Keeps the device tensors the steps read from now on, until `take_kept`: see
    /// `RingCache::keep_indices`.
    #[cfg(feature = "cuda")]
    pub fn keep_for_capture(&mut self) {
        self.cache.keep_indices();
    }

    /// What the steps read since `keep_for_capture`, for the captured graph to own.
    #[cfg(feature = "cuda")]
    pub fn take_kept(&mut self) -> Vec<Tensor> {
        self.cache.take_kept_indices()
    }

    /// Tables that rotate nothing for `rows` rows, made once per row count (outside any CUDA
    /// graph capture: the eager frame before a capture makes them).
    fn identity_rope(
        &mut self,
        rows: usize,
        head_dim: usize,
        device: &Device,
    ) -> Result<RopeTables> {
        if let Some((_, rope)) = self.identity_rope.iter().find(|(r, _)| *r == rows) {
            return Ok(rope.clone());
        }
        let rope = RopeTables::identity(rows, head_dim, device)?;
        self.identity_rope.push((rows, rope.clone()));
        Ok(rope)
    }
}

/// One token per slot as a depformer step takes it: i64 ids `[batch]` where the model runs,
/// so a token drawn on the GPU feeds the next step without a trip to the host.
pub struct TokenFeed {
    ids: Tensor,
    /// Whether any id may be −1, the reference's "zero" token (an exact zero vector).
    has_zero: bool,
}

impl TokenFeed {
    /// Ids known on the host.
    pub fn from_host(ids: &[i64], device: &Device) -> Result<Self> {
        Ok(Self {
            ids: Tensor::new(ids, device)?,
            has_zero: ids.iter().any(|&id| id < 0),
        })
    }

    /// Ids already on the device (i64 `[batch]`); `has_zero` if any may be −1.
    pub fn on_device(ids: Tensor, has_zero: bool) -> Self {
        Self { ids, has_zero }
    }

    /// The rows of `table` for these ids (zero vectors for −1).
    pub fn embed(&self, table: &Tensor) -> Result<Tensor> {
        if !self.has_zero {
            return table.index_select(&self.ids, 0);
        }
        let rows = table.index_select(&self.ids.maximum(0i64)?, 0)?;
        let keep = self.ids.ge(0i64)?.to_dtype(rows.dtype())?.unsqueeze(1)?;
        rows.broadcast_mul(&keep)
    }
}

/// Looks up `ids` in `table`; id −1 gives an exact zero vector (the reference's "zero" token).
pub fn embed(table: &Tensor, ids: &[i64]) -> Result<Tensor> {
    TokenFeed::from_host(ids, table.device())?.embed(table)
}
