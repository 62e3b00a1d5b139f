//! Mimi's encoder/decoder transformer: pre-norm layers with LayerNorm, causal RoPE attention over
//! a window of `context` frames, a GELU FFN and layer scales, in conv layout (`[b, d, t]`).
//!
//! Streaming runs over a `RingCache` (capacity = context); the non-streaming path
//! attends over the whole sequence with the same window, like the reference without a cache.

use crate::model::Result;
use crate::model::checkpoint::mimi::TransformerLayerWeights;
use crate::model::kv::{
    Attend, RingCache, RingPositions, RingShape, RingStep, attention_merged, split_qkv,
};
use crate::model::mimi::MimiConfig;
use crate::model::nn::{LayerNorm, Rope, RopeTables};
use candle_core::{Device, Tensor};
use std::ops::Range;

const LAYER_NORM_EPS: f32 = 1e-5;

/// A bias-free linear layer stored as `[in, out]` (the transpose of PyTorch's `[out, in]`): with
/// the one or two rows of a streaming step, candle's CPU matmul is about 4× faster reading a
/// contiguous right-hand side than a transposed view of it. On a GPU it also keeps `[out, in]`
/// (the checkpoint's tensor: about 200 MB more for Mimi's transformers and quantizer), which
/// the split-K kernel reads for a step's 1 to 4 rows (`cuda::gemv_f32`); more stay on cuBLAS.
#[derive(Debug, Clone)]
pub(super) struct Linear {
    weight_t: Tensor,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    out_in: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: &Tensor) -> Result<Self> {
        let on_gpu = cfg!(feature = "cuda") && weight.device().is_cuda();
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            out_in: on_gpu.then(|| weight.contiguous()).transpose()?,
        })
    }

    pub fn out_features(&self) -> usize {
        self.weight_t.dims()[1]
    }

    /// `xs` `[.., in]` → `[.., out]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims();
        let (rows, in_features) = (xs.elem_count() / dims[dims.len() - 1], dims[dims.len() - 1]);
        let mut out_dims = dims.to_vec();
        *out_dims
            .last_mut()
            .expect("a linear input has at least one dim") = self.out_features();
        let xs = xs.reshape((rows, in_features))?;
        #[cfg(feature = "cuda")]
        if let Some(out_in) = &self.out_in
            && xs.dtype() == candle_core::DType::F32
            && crate::model::cuda::gemv_takes(rows, in_features, 4)
            && !crate::model::nn::candle_ops_requested()
        {
            return crate::model::cuda::gemv_f32(&xs, out_in)?.reshape(out_dims);
        }
        xs.matmul(&self.weight_t)?.reshape(out_dims)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    in_proj: Linear,
    out_proj: Linear,
    norm1: LayerNorm,
    norm2: LayerNorm,
    linear1: Linear,
    linear2: Linear,
    scale1: Option<Tensor>,
    scale2: Option<Tensor>,
}

/// One stack of layers (the encoder's or the decoder's).
#[derive(Debug, Clone)]
pub(super) struct Transformer {
    layers: Vec<Layer>,
    rope: Rope,
    heads: usize,
    context: usize,
    positions: RingPositions,
    span: tracing::Span,
}

/// The ring caches of one transformer, a row per slot.
#[derive(Debug)]
pub(super) struct TransformerState {
    /// `None` for a stack without layers.
    cache: Option<RingCache>,
}

impl TransformerState {
    pub fn reset(&mut self, slots: Range<usize>) {
        let Some(cache) = &mut self.cache else {
            return;
        };
        for slot_idx in slots {
            cache.reset_slot(slot_idx);
        }
    }
}

/// What a streaming step reads besides its input, planned on the host: where each layer writes
/// and what its queries see, and the rotations of the new tokens. Its tensors are all a CUDA
/// graph of the step needs to be told each frame.
pub(super) struct TransformerPlan {
    step: RingStep,
    rope: RopeTables,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl TransformerPlan {
    /// The plan's device inputs: write index, mask, and the rotations' cos and sin.
    pub fn tensors(&self) -> Result<[&Tensor; 4]> {
        let Some([write_index, mask]) = self.step.composed_graph_inputs() else {
            candle_core::bail!("internal error: a Mimi step with a pinned prefix");
        };
        let (cos, sin) = self.rope.cos_sin();
        Ok([write_index, mask, cos, sin])
    }

    /// This plan reading its tensors from `buffers` (ordered as `tensors`).
    pub fn with_tensors(&self, buffers: &[Tensor]) -> Result<Self> {
        let [write_index, mask, cos, sin] = buffers else {
            candle_core::bail!(
                "a Mimi transformer plan has 4 tensors, not {}",
                buffers.len()
            )
        };
        Ok(Self {
            step: self
                .step
                .with_composed_graph_inputs(&[write_index.clone(), mask.clone()])?,
            rope: RopeTables::from_cos_sin(cos.clone(), sin.clone()),
        })
    }
}

impl Transformer {
    pub fn new(
        w: &[TransformerLayerWeights],
        cfg: &MimiConfig,
        positions: RingPositions,
        name: &'static str,
    ) -> Result<Self> {
        let t = &cfg.transformer;
        let layers = w
            .iter()
            .map(|l| {
                Ok(Layer {
                    in_proj: Linear::new(&l.in_proj)?,
                    out_proj: Linear::new(&l.out_proj)?,
                    norm1: LayerNorm::new(
                        l.norm1_weight.clone(),
                        l.norm1_bias.clone(),
                        LAYER_NORM_EPS,
                    ),
                    norm2: LayerNorm::new(
                        l.norm2_weight.clone(),
                        l.norm2_bias.clone(),
                        LAYER_NORM_EPS,
                    ),
                    linear1: Linear::new(&l.linear1)?,
                    linear2: Linear::new(&l.linear2)?,
                    scale1: l.layer_scale_1.clone(),
                    scale2: l.layer_scale_2.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            rope: Rope::new(t.d_model / t.num_heads, t.max_period),
            heads: t.num_heads,
            context: t
                .context
                .expect("context is checked by MimiConfig::validate"),
            positions,
            span: match name {
                "encoder" => tracing::span!(tracing::Level::TRACE, "mimi_encoder_transformer"),
                _ => tracing::span!(tracing::Level::TRACE, "mimi_decoder_transformer"),
            },
        })
    }

    pub fn state(&self, batch: usize) -> Result<TransformerState> {
        let Some(first) = self.layers.first() else {
            return Ok(TransformerState { cache: None });
        };
        let d = first.out_proj.out_features();
        let shape = RingShape {
            layers: self.layers.len(),
            batch,
            heads: self.heads,
            capacity: self.context,
            head_dim: d / self.heads,
        };
        let weight = &first.out_proj.weight_t;
        let cache = RingCache::new(shape, weight.dtype(), weight.device(), self.positions)?
            .with_fixed_shape();
        Ok(TransformerState { cache: Some(cache) })
    }

    /// Plans a streaming step of `time` tokens for the first `active.len()` slots, each active
    /// one advancing `time`; `None` for a stack without layers.
    pub fn plan(
        &self,
        state: &mut TransformerState,
        time: usize,
        active: &[bool],
    ) -> Result<Option<TransformerPlan>> {
        let Some(cache) = &mut state.cache else {
            return Ok(None);
        };
        let step = cache.begin(time, active)?;
        let weight = &self.layers[0].out_proj.weight_t;
        let rope = self
            .rope
            .tables(step.positions(), weight.dtype(), weight.device())?;
        Ok(Some(TransformerPlan { step, rope }))
    }

    /// One streaming step as `plan` planned it: `xs` `[rows, d, t]` → `[rows, d, t]`.
    pub fn step(
        &self,
        xs: &Tensor,
        state: &TransformerState,
        plan: Option<&TransformerPlan>,
    ) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (Some(cache), Some(plan)) = (&state.cache, plan) else {
            return Ok(xs.clone());
        };
        self.run(xs, &mut |layer_idx, qkv| {
            cache.append_qkv(layer_idx, &plan.step, qkv, &plan.rope, self.heads)
        })
    }

    /// The whole sequence at once from position 0: `[batch, d, t]` → `[batch, d, t]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let _enter = self.span.enter();
        let (batch, _, time) = xs.dims3()?;
        let positions = vec![(0..time as u64).collect::<Vec<_>>(); batch];
        let rope = self.rope.tables(&positions, xs.dtype(), xs.device())?;
        let mask = window_mask(time, self.context, xs.device())?;
        let head_dim = xs.dim(1)? / self.heads;
        self.run(xs, &mut |_, qkv| {
            let [q, k, v] = split_qkv(qkv, self.heads, head_dim)?;
            let (q, k, v) = (rope.apply(&q)?, rope.apply(&k)?, v.contiguous()?);
            let mask = mask.clone();
            Ok((q, Attend { k, v, mask }))
        })
    }

    /// The layers over `xs` `[batch, d, t]`; `kv` turns each layer's in-projection `[batch, t,
    /// 3 · d]` into its turned queries and what they attend to.
    fn run(
        &self,
        xs: &Tensor,
        kv: &mut dyn FnMut(usize, &Tensor) -> Result<Attending>,
    ) -> Result<Tensor> {
        let mut xs = xs.transpose(1, 2)?.contiguous()?; // b,t,d
        let Some(first) = self.layers.first() else {
            return xs.transpose(1, 2)?.contiguous();
        };
        // Each skip connection is added together with the norm after it (one kernel on a GPU).
        let mut normed = first.norm1.forward(&xs)?;
        for (layer_idx, layer) in self.layers.iter().enumerate() {
            let update = self.attend(layer, &normed, &mut |qkv| kv(layer_idx, qkv))?;
            let (sum, normed2) =
                layer
                    .norm2
                    .forward_after_skip(&xs, &update, layer.scale1.as_ref())?;
            let hidden = layer.linear1.forward(&normed2)?.gelu_erf()?;
            let update = layer.linear2.forward(&hidden)?;
            (xs, normed) = match self.layers.get(layer_idx + 1) {
                Some(next) => {
                    next.norm1
                        .forward_after_skip(&sum, &update, layer.scale2.as_ref())?
                }
                None => ((sum + scaled(update, &layer.scale2)?)?, normed),
            };
        }
        xs.transpose(1, 2)?.contiguous() // b,d,t
    }

    fn attend(
        &self,
        layer: &Layer,
        xs: &Tensor,
        kv: &mut dyn FnMut(&Tensor) -> Result<Attending>,
    ) -> Result<Tensor> {
        // 1. project; 2. split q|k|v, rotate q and k by absolute position and keep k and v (the
        // cache, or the whole sequence)
        let (q, attend) = kv(&layer.in_proj.forward(xs)?)?;
        // 3. attend
        let out = attention_merged(&q, &attend)?; // b,t,d
        // 4. project out
        layer.out_proj.forward(&out)
    }
}

/// A layer's queries, turned, and what they attend to.
type Attending = (Tensor, Attend);

fn scaled(xs: Tensor, scale: &Option<Tensor>) -> Result<Tensor> {
    match scale {
        Some(s) => xs.broadcast_mul(s),
        None => Ok(xs),
    }
}

/// `[1, 1, t, t]`: 0 where `0 <= q − k < context`, −∞ elsewhere.
fn window_mask(time: usize, context: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..time)
        .flat_map(|q| {
            (0..time).map(move |k| {
                if k <= q && q - k < context {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (1, 1, time, time), device)
}
