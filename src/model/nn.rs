//! Small building blocks shared by Mimi and the language model.

use super::Result;
use super::kernel_plan;
use super::kernel_plan::Sublayer;
use super::quant::{Int8Weight, Quant, quantize, w8a16_reference};
use candle_core::{D, DType, Device, Tensor};

/// `x · wᵀ` for a weight stored PyTorch-style as `[out, in]`; `x` may have any leading dims.
pub fn linear(xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let dims = xs.dims();
    let in_features = dims[dims.len() - 1];
    let rows = xs.elem_count() / in_features;
    let out = xs.reshape((rows, in_features))?.matmul(&weight.t()?)?;
    let mut out_dims = dims.to_vec();
    *out_dims
        .last_mut()
        .expect("a tensor fed to a linear layer has at least one dim") = weight.dim(0)?;
    out.reshape(out_dims)
}

/// A bias-free linear layer. Dense weights are held as `[in, out]`, so a step's few rows read
/// the weight contiguously (the PyTorch `[out, in]` layout through a transposed view is several
/// times slower on the CPU); int8 weights keep `[out, in]` bytes for the w8a16 kernel.
#[derive(Debug, Clone)]
pub enum Linear {
    Dense {
        weight_t: Tensor,
    },
    /// bf16 on a GPU where the kernel plan (`kernel_plan`) measured our split-K kernel
    /// (kernels/gemv.cu) faster for one row, or with `DUPLEX_GEMV_BF16=1`: PyTorch's `[out,
    /// in]`, read by that kernel for up to 4 rows where it won them and by cuBLAS, transposed,
    /// elsewhere.
    OutIn {
        weight: Tensor,
    },
    Int8 {
        weight: Int8Weight,
        /// The int8 values as f32 `[in, out]` for the CPU reference path (absent on the GPU).
        values_t: Option<Tensor>,
    },
}

impl Linear {
    /// From a PyTorch-style `[out, in]` weight.
    pub fn new(weight: &Tensor) -> Result<Self> {
        if out_in_requested(weight)? {
            return Ok(Self::OutIn {
                weight: weight.contiguous()?,
            });
        }
        Ok(Self::Dense {
            weight_t: weight.t()?.contiguous()?,
        })
    }

    /// From a PyTorch-style `[out, in]` weight, quantised as asked.
    pub fn with_quant(weight: &Tensor, quant: Quant) -> Result<Self> {
        match quant {
            Quant::None => Self::new(weight),
            Quant::Int8 => {
                let weight = quantize(weight)?;
                let values_t = if weight.q.device().is_cpu() {
                    Some(weight.values_f32()?.t()?.contiguous()?)
                } else {
                    None
                };
                Ok(Self::Int8 { weight, values_t })
            }
        }
    }

    /// `residual + self.forward(xs)` (a transformer's skip connection), added inside the
    /// split-K kernels where they run the product (one rounding, one launch fewer).
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match fused_device(self, xs, Some(residual), None, false)? {
            Some(ys) => Ok(ys),
            None => residual + self.forward_in(xs, Sublayer::Skip)?,
        }
    }

    /// `self.forward(norm.forward(xs))` (a transformer's pre-norm), the norm computed inside
    /// the split-K kernels where they run the product (one launch fewer).
    pub fn forward_normed(&self, xs: &Tensor, norm: &RmsNorm) -> Result<Tensor> {
        match fused_device(self, xs, None, Some(norm), false)? {
            Some(ys) => Ok(ys),
            None => self.forward_in(&norm.forward(xs)?, Sublayer::Norm),
        }
    }

    /// `forward_normed` followed by a gated FFN's gate (`silu(a) · u` of the output's halves),
    /// the gate also inside the split-K kernel where one runs the product; `None` where none
    /// does (the caller composes them).
    fn forward_normed_gated(&self, xs: &Tensor, norm: &RmsNorm) -> Result<Option<Tensor>> {
        fused_device(self, xs, None, Some(norm), true)
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_in(xs, Sublayer::Plain)
    }

    /// The product alone where `sublayer`'s ends are composed around it: an int8 weight's
    /// kernel is the one the kernel plan measured for that sublayer.
    fn forward_in(&self, xs: &Tensor, sublayer: Sublayer) -> Result<Tensor> {
        match self {
            Self::Dense { weight_t } => {
                let dims = xs.dims();
                let in_features = dims[dims.len() - 1];
                let rows = xs.elem_count() / in_features;
                let out = xs.reshape((rows, in_features))?.matmul(weight_t)?;
                let mut out_dims = dims.to_vec();
                *out_dims
                    .last_mut()
                    .expect("a tensor fed to a linear layer has at least one dim") =
                    weight_t.dim(1)?;
                out.reshape(out_dims)
            }
            Self::OutIn { weight } => out_in_device(xs, weight, sublayer),
            Self::Int8 {
                weight,
                values_t: Some(values_t),
            } => w8a16_reference(xs, values_t, &weight.scale),
            Self::Int8 {
                weight,
                values_t: None,
            } => w8a16_device(xs, weight, sublayer),
        }
    }
}

#[cfg(feature = "cuda")]
fn w8a16_device(xs: &Tensor, weight: &Int8Weight, sublayer: Sublayer) -> Result<Tensor> {
    super::cuda::w8a16(xs, weight, sublayer)
}

/// `linear`'s product with its sublayer's ends (`residual`, `norm`, a gated FFN's `gate`) inside
/// a split-K kernel, when one runs it (`None`: the caller composes them).
#[cfg(feature = "cuda")]
fn fused_device(
    linear: &Linear,
    xs: &Tensor,
    residual: Option<&Tensor>,
    norm: Option<&RmsNorm>,
    gate: bool,
) -> Result<Option<Tensor>> {
    use super::cuda::{self, Ends, W8a16Kernel};
    let k = xs.dim(D::Minus1)?;
    let rows = xs.elem_count() / k;
    let sublayer = Sublayer::of(residual.is_some(), norm.is_some(), gate);
    let ends = || Ends {
        residual: residual.cloned(),
        norm: norm.map(|n| (n.alpha.clone(), n.eps)),
        gate,
    };
    Ok(match linear {
        Linear::OutIn { weight } if out_in_split_k(weight, sublayer, rows)? => {
            Some(cuda::gemv_bf16(xs, weight, &ends())?)
        }
        Linear::Int8 {
            weight,
            values_t: None,
        } if cuda::w8a16_fuses(weight, sublayer, rows)? => {
            Some(cuda::w8a16_fused(xs, weight, W8a16Kernel::SplitK, &ends())?)
        }
        _ => None,
    })
}

#[cfg(not(feature = "cuda"))]
fn fused_device(
    _linear: &Linear,
    _xs: &Tensor,
    _residual: Option<&Tensor>,
    _norm: Option<&RmsNorm>,
    _gate: bool,
) -> Result<Option<Tensor>> {
    Ok(None)
}

/// Whether `DUPLEX_GEMV_BF16=1` asks for every bf16 weight `[out, in]` and the split-K kernel
/// wherever it runs, whatever the kernel plan says (to compare them by hand).
fn gemv_bf16_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("DUPLEX_GEMV_BF16").is_ok_and(|v| v == "1"))
}

/// Whether `weight` `[out, in]` is held that way for our split-K kernel: bf16 on a GPU, in a
/// build with the `cuda` feature, where the kernel plan chose it or `DUPLEX_GEMV_BF16=1`.
fn out_in_requested(weight: &Tensor) -> Result<bool> {
    if !(cfg!(feature = "cuda") && weight.device().is_cuda() && weight.dtype() == DType::BF16) {
        return Ok(false);
    }
    let (n, k) = weight.dims2()?;
    Ok(gemv_bf16_forced() || kernel_plan::installed().is_some_and(|plan| plan.bf16_out_in(n, k)))
}

/// Whether `rows` rows through a weight held `[out, in]`, in `sublayer`, go to the split-K
/// kernel.
#[cfg(feature = "cuda")]
fn out_in_split_k(weight: &Tensor, sublayer: Option<Sublayer>, rows: usize) -> Result<bool> {
    let (n, k) = weight.dims2()?;
    let planned = || {
        kernel_plan::installed()
            .zip(sublayer)
            .is_some_and(|(plan, sublayer)| plan.bf16_split_k(n, k, sublayer, rows))
    };
    Ok(kernel_plan::gemv_takes(rows, k, 2) && (gemv_bf16_forced() || planned()))
}

#[cfg(feature = "cuda")]
fn out_in_device(xs: &Tensor, weight: &Tensor, sublayer: Sublayer) -> Result<Tensor> {
    let k = xs.dim(D::Minus1)?;
    if out_in_split_k(weight, Some(sublayer), xs.elem_count() / k)? {
        return super::cuda::gemv_bf16(xs, weight, &Default::default());
    }
    linear(xs, weight)
}

#[cfg(not(feature = "cuda"))]
fn out_in_device(_xs: &Tensor, _weight: &Tensor, _sublayer: Sublayer) -> Result<Tensor> {
    unreachable!("`[out, in]` weights are only chosen in a build with the `cuda` feature")
}

/// Whether `DUPLEX_KERNELS=candle` asks for candle's own ops instead of our kernels (to compare
/// the two in one benchmark run).
pub fn candle_ops_requested() -> bool {
    static CANDLE_OPS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CANDLE_OPS.get_or_init(|| std::env::var("DUPLEX_KERNELS").is_ok_and(|v| v == "candle"))
}

/// Whether `xs` goes through our fused kernels (`kernels/norm.cu`): on a GPU, of the `dtype`
/// they take (bf16 for the language model's, f32 for Mimi's LayerNorm), unless candle's ops
/// are asked for.
fn fused(xs: &Tensor, dtype: DType) -> bool {
    cfg!(feature = "cuda")
        && xs.device().is_cuda()
        && xs.dtype() == dtype
        && !candle_ops_requested()
}

#[cfg(feature = "cuda")]
fn rms_norm_fused(xs: &Tensor, alpha: &Tensor, eps: f32) -> Result<Tensor> {
    super::cuda::rms_norm(xs, alpha, eps)
}

#[cfg(not(feature = "cuda"))]
fn rms_norm_fused(_xs: &Tensor, _alpha: &Tensor, _eps: f32) -> Result<Tensor> {
    unreachable!("fused kernels are only chosen in a build with the `cuda` feature")
}

#[cfg(feature = "cuda")]
fn swiglu_fused(gated: &Tensor) -> Result<Tensor> {
    super::cuda::swiglu(gated)
}

#[cfg(not(feature = "cuda"))]
fn swiglu_fused(_gated: &Tensor) -> Result<Tensor> {
    unreachable!("fused kernels are only chosen in a build with the `cuda` feature")
}

#[cfg(not(feature = "cuda"))]
fn w8a16_device(_xs: &Tensor, _weight: &Int8Weight, _sublayer: Sublayer) -> Result<Tensor> {
    candle_core::bail!("int8 weights on this device need a build with the `cuda` feature")
}

/// RMS normalisation computed in f32: `x · alpha / sqrt(mean(x²) + eps)`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    alpha: Tensor,
    eps: f32,
}

impl RmsNorm {
    /// `alpha` may be stored as `[1, 1, dim]` (Moshi) or `[dim]`.
    pub fn new(alpha: Tensor, eps: f32) -> Result<Self> {
        let dim = alpha.elem_count();
        Ok(Self {
            alpha: alpha.reshape(dim)?.to_dtype(DType::F32)?,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if fused(xs, DType::BF16) {
            return rms_norm_fused(xs, &self.alpha, self.eps);
        }
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?.contiguous()?;
        candle_nn::ops::rms_norm(&xs, &self.alpha, self.eps)?.to_dtype(dtype)
    }
}

/// Layer normalisation with weight and bias (Mimi's transformers).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f32) -> Self {
        Self { weight, bias, eps }
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if fused(xs, DType::F32) {
            return super::cuda::layer_norm(xs, &self.weight, &self.bias, self.eps);
        }
        candle_nn::ops::layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps)
    }

    /// The skip connection into this norm, then the norm: `xs + scale · update` (a scale of
    /// one when absent) and its normalisation, both returned (one kernel on a GPU).
    pub fn forward_after_skip(
        &self,
        xs: &Tensor,
        update: &Tensor,
        scale: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "cuda")]
        if fused(xs, DType::F32) {
            let (weight, bias) = (&self.weight, &self.bias);
            return super::cuda::skip_layer_norm(xs, update, scale, weight, bias, self.eps);
        }
        let sum = match scale {
            Some(scale) => (xs + update.broadcast_mul(scale)?)?,
            None => (xs + update)?,
        };
        let normed = self.forward(&sum)?;
        Ok((sum, normed))
    }
}

/// The gated feed-forward block: `linear_out(silu(a) · b)` where `[a, b] = linear_in(x)`.
#[derive(Debug, Clone)]
pub struct SwiGlu {
    linear_in: Linear,
    linear_out: Linear,
}

impl SwiGlu {
    /// From PyTorch-style `[out, in]` weights.
    pub fn new(linear_in: &Tensor, linear_out: &Tensor) -> Result<Self> {
        Self::with_quant(linear_in, linear_out, Quant::None)
    }

    pub fn with_quant(linear_in: &Tensor, linear_out: &Tensor, quant: Quant) -> Result<Self> {
        Ok(Self {
            linear_in: Linear::with_quant(linear_in, quant)?,
            linear_out: Linear::with_quant(linear_out, quant)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_out
            .forward(&self.gate(self.linear_in.forward(xs)?)?)
    }

    /// `xs + self.forward(norm.forward(xs))`, a transformer's whole feed-forward sublayer: the
    /// norm and the gate fused into the first product, the sum into the second, where they can
    /// be (`Linear::forward_normed_gated`, `Linear::forward_add`).
    pub fn sublayer(&self, xs: &Tensor, norm: &RmsNorm) -> Result<Tensor> {
        let hidden = match self.linear_in.forward_normed_gated(xs, norm)? {
            Some(hidden) => hidden,
            None => self.gate(
                self.linear_in
                    .forward_in(&norm.forward(xs)?, Sublayer::NormGate)?,
            )?,
        };
        self.linear_out.forward_add(&hidden, xs)
    }

    /// `silu(a) · b` of `gated` = `[a, b]` (the in-projection's output).
    fn gate(&self, gated: Tensor) -> Result<Tensor> {
        if fused(&gated, DType::BF16) {
            return swiglu_fused(&gated);
        }
        let hidden = gated.dim(D::Minus1)? / 2;
        let act = candle_nn::ops::silu(&gated.narrow(D::Minus1, 0, hidden)?)?;
        let up = gated.narrow(D::Minus1, hidden, hidden)?;
        act * up
    }
}

/// The hidden width of Moshi's gated FFN for a model width and a nominal feed-forward width.
pub fn gated_hidden(dim: usize, dim_feedforward: usize) -> usize {
    if dim_feedforward == 4 * dim {
        21 * dim / 8
    } else {
        2 * dim_feedforward / 3
    }
}

/// Interleaved rotary embedding (adjacent pairs `(2i, 2i+1)` rotate together).
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(head_dim: usize, max_period: f64) -> Self {
        // The reference computes the scale in f64 (a Python float), then the frequencies and
        // angles in f32; so do we, to match it.
        let scale = (-max_period.ln() * 2.0 / head_dim as f64) as f32;
        let inv_freq = (0..head_dim / 2)
            .map(|i| (i as f32 * scale).exp())
            .collect();
        Self { inv_freq }
    }

    /// Rotates `xs` `[b, h, t, d]`; `positions[b][t]` is the absolute position of each token.
    pub fn apply(&self, xs: &Tensor, positions: &[Vec<u64>]) -> Result<Tensor> {
        self.tables(positions, xs.dtype(), xs.device())?.apply(xs)
    }

    /// The cos/sin tables of `positions[b][t]`, built once and applied to any number of tensors
    /// (queries, keys, every layer).
    pub fn tables(
        &self,
        positions: &[Vec<u64>],
        dtype: DType,
        device: &Device,
    ) -> Result<RopeTables> {
        let (batch, time) = (positions.len(), positions.first().map_or(0, Vec::len));
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(batch * time * half);
        let mut sin = Vec::with_capacity(batch * time * half);
        for row in positions {
            for &pos in row {
                for &freq in &self.inv_freq {
                    let angle = freq * pos as f32;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        Ok(RopeTables {
            cos: Tensor::from_vec(cos, (batch, time, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (batch, time, half), device)?.to_dtype(dtype)?,
        })
    }
}

/// Interleaved RoPE rotations for one step's positions, `[b, t, d/2]` each.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTables {
    /// Tables from their tensors (a CUDA graph's buffers holding what `Rope::tables` built).
    pub fn from_cos_sin(cos: Tensor, sin: Tensor) -> Self {
        Self { cos, sin }
    }

    /// f32 tables that rotate nothing, `[rows, 1, head_dim / 2]` (one token per row).
    pub fn identity(rows: usize, head_dim: usize, device: &Device) -> Result<Self> {
        let shape = (rows, 1, head_dim / 2);
        Ok(Self {
            cos: Tensor::ones(shape, DType::F32, device)?,
            sin: Tensor::zeros(shape, DType::F32, device)?,
        })
    }

    /// The cos and sin tables, `[b, t, d/2]` each.
    pub fn cos_sin(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Rotates `xs` `[b, h, t, d]` (its `b` and `t` those the tables were built for).
    pub fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::rotary_emb::rope_i(&xs.contiguous()?, &self.cos, &self.sin)
    }

    /// `apply` in f32 whatever `xs`'s dtype (with f32 tables), as the reference and the kernels
    /// rotate: the result stays f32, for the caller to round once.
    pub fn apply_f32(&self, xs: &Tensor) -> Result<Tensor> {
        self.apply(&xs.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_matches_a_hand_computation() -> Result<()> {
        let x = Tensor::new(&[[[1f32, 2.0]]], &Device::Cpu)?;
        let w = Tensor::new(&[[1f32, 0.0], [0.5, 0.5], [0.0, -1.0]], &Device::Cpu)?;
        assert_eq!(
            linear(&x, &w)?.to_vec3::<f32>()?,
            vec![vec![vec![1.0, 1.5, -2.0]]]
        );
        Ok(())
    }

    #[test]
    fn rms_norm_scales_to_unit_rms() -> Result<()> {
        let norm = RmsNorm::new(Tensor::ones((1, 1, 4), DType::F32, &Device::Cpu)?, 1e-8)?;
        let x = Tensor::new(&[[[2f32, -2.0, 2.0, -2.0]]], &Device::Cpu)?;
        let y = norm.forward(&x)?.flatten_all()?.to_vec1::<f32>()?;
        assert!(y.iter().all(|v| (v.abs() - 1.0).abs() < 1e-6), "{y:?}");
        Ok(())
    }

    #[test]
    fn rope_rotates_adjacent_pairs_by_position() -> Result<()> {
        let rope = Rope::new(2, 10_000.0);
        let x = Tensor::new(&[1f32, 0.0], &Device::Cpu)?.reshape((1, 1, 1, 2))?;
        let y = rope
            .apply(&x, &[vec![1]])?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(
            (y[0] - 1f32.cos()).abs() < 1e-6 && (y[1] - 1f32.sin()).abs() < 1e-6,
            "{y:?}"
        );
        Ok(())
    }

    #[test]
    fn gated_hidden_follows_moshi() {
        assert_eq!(gated_hidden(4096, 16896), 11264);
        assert_eq!(gated_hidden(1024, 4224), 2816);
        assert_eq!(gated_hidden(32, 132), 88);
        assert_eq!(gated_hidden(16, 64), 42);
    }
}
