//! The split residual vector quantizer: `rvq_first` (semantic) and `rvq_rest` (acoustic) each
//! project the same latent with their own 1×1 conv and quantize it residually; decoding sums both
//! output projections.

use super::transformer::Linear;
use crate::model::Result;
use crate::model::checkpoint::mimi::RvqWeights;
use candle_core::{D, DType, Tensor};

/// The reference's `epsilon` in `embedding_sum / clamp(cluster_usage, min=epsilon)`.
const USAGE_EPS: f64 = 1e-5;

#[derive(Debug, Clone)]
struct Codebook {
    /// `[bins, dim]`, f32.
    entries: Tensor,
    /// `[dim, bins]`, f32 (contiguous, for the distance matmul).
    entries_t: Tensor,
    /// `[1, bins]`: ‖entry‖², f32.
    norms: Tensor,
}

#[derive(Debug, Clone)]
struct Rvq {
    /// `d → dim`.
    input_proj: Linear,
    /// `dim → d`.
    output_proj: Linear,
    codebooks: Vec<Codebook>,
}

impl Rvq {
    fn new(w: &RvqWeights) -> Result<Self> {
        let codebooks = w
            .codebooks
            .iter()
            .map(|c| {
                let usage = c
                    .cluster_usage
                    .to_dtype(DType::F32)?
                    .clamp(USAGE_EPS, f64::INFINITY)?;
                let entries = c
                    .embedding_sum
                    .to_dtype(DType::F32)?
                    .broadcast_div(&usage.unsqueeze(1)?)?;
                let norms = entries.sqr()?.sum_keepdim(1)?.t()?.contiguous()?;
                Ok(Codebook {
                    entries_t: entries.t()?.contiguous()?,
                    entries,
                    norms,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            input_proj: Linear::new(&w.input_proj.squeeze(2)?)?,
            output_proj: Linear::new(&w.output_proj.squeeze(2)?)?,
            codebooks,
        })
    }

    /// `xs` `[n, d]` → codes `[n, codebooks]` (u32).
    fn encode(&self, xs: &Tensor) -> Result<Tensor> {
        let mut residual = self.input_proj.forward(xs)?.to_dtype(DType::F32)?;
        let mut codes = Vec::with_capacity(self.codebooks.len());
        for cb in &self.codebooks {
            // argmin ‖r − c‖² = argmin ‖c‖² − 2 r·c
            let dots = residual.matmul(&cb.entries_t)?;
            let dist = cb.norms.broadcast_sub(&(dots * 2.0)?)?;
            let idx = dist.argmin(D::Minus1)?;
            residual = (residual - cb.entries.index_select(&idx, 0)?)?;
            codes.push(idx);
        }
        Tensor::stack(&codes, 1)
    }

    /// codes `[n, codebooks]` → `[n, d]` in `dtype`.
    fn decode(&self, codes: &Tensor, dtype: DType) -> Result<Tensor> {
        let mut sum: Option<Tensor> = None;
        for (i, cb) in self.codebooks.iter().enumerate() {
            let idx = codes.narrow(1, i, 1)?.squeeze(1)?.contiguous()?;
            let q = cb.entries.index_select(&idx, 0)?;
            sum = Some(match sum {
                None => q,
                Some(s) => (s + q)?,
            });
        }
        let sum = sum.expect("an RVQ in use has at least one codebook (checked at load)");
        self.output_proj.forward(&sum.to_dtype(dtype)?)
    }
}

/// Both quantizers; `codes` are `[semantic..., acoustic...]`.
#[derive(Debug, Clone)]
pub(super) struct SplitRvq {
    first: Rvq,
    rest: Option<Rvq>,
    span_encode: tracing::Span,
    span_decode: tracing::Span,
}

impl SplitRvq {
    pub fn new(first: &RvqWeights, rest: &RvqWeights) -> Result<Self> {
        Ok(Self {
            first: Rvq::new(first)?,
            rest: if rest.codebooks.is_empty() {
                None
            } else {
                Some(Rvq::new(rest)?)
            },
            span_encode: tracing::span!(tracing::Level::TRACE, "mimi_quantize"),
            span_decode: tracing::span!(tracing::Level::TRACE, "mimi_dequantize"),
        })
    }

    pub fn num_codebooks(&self) -> usize {
        self.first.codebooks.len() + self.rest.as_ref().map_or(0, |r| r.codebooks.len())
    }

    /// Latent `[b, d, t]` → codes `[b, codebooks, t]` (u32).
    pub fn encode(&self, latent: &Tensor) -> Result<Tensor> {
        let _enter = self.span_encode.enter();
        let (b, d, t) = latent.dims3()?;
        let xs = latent.transpose(1, 2)?.reshape((b * t, d))?;
        let mut codes = self.first.encode(&xs)?;
        if let Some(rest) = &self.rest {
            codes = Tensor::cat(&[&codes, &rest.encode(&xs)?], 1)?;
        }
        codes
            .reshape((b, t, self.num_codebooks()))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Codes `[b, codebooks, t]` (u32 or i64) → latent `[b, d, t]` in `dtype`.
    pub fn decode(&self, codes: &Tensor, dtype: DType) -> Result<Tensor> {
        let _enter = self.span_decode.enter();
        let (b, n, t) = codes.dims3()?;
        if n != self.num_codebooks() {
            candle_core::bail!(
                "mimi decode: got {n} codebooks, the model uses {}",
                self.num_codebooks()
            );
        }
        // An out-of-range code fails in `index_select` (no device sync here to check it first).
        let codes = codes
            .to_dtype(DType::U32)?
            .transpose(1, 2)?
            .reshape((b * t, n))?;
        let semantic = self.first.codebooks.len();
        let mut latent = self.first.decode(&codes.narrow(1, 0, semantic)?, dtype)?;
        if let Some(rest) = &self.rest {
            latent = (latent + rest.decode(&codes.narrow(1, semantic, n - semantic)?, dtype)?)?;
        }
        let d = latent.dim(1)?;
        latent.reshape((b, t, d))?.transpose(1, 2)?.contiguous()
    }
}
