//! Weight-only int8 quantisation (w8a16): each output channel of a `[out, in]` weight is scaled
//! by its largest magnitude / 127 and rounded. Activations stay in bf16/f32; products are summed
//! in f32 and scaled at the end — on the GPU by the `w8a16` kernel, on the CPU by the reference
//! here, which computes the same thing. The temporal transformer's keys and values may be kept
//! the same way, one scale per cached entry (`KvQuant`).

use super::Result;
use candle_core::{D, DType, Tensor};

/// How the language model's large matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quant {
    /// As in the checkpoint (bf16 on the GPU, f32 on the CPU).
    #[default]
    None,
    /// Weight-only int8 per output channel.
    Int8,
}

/// How the temporal transformer's ring of keys and values is stored.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum KvQuant {
    /// In the model's dtype.
    #[default]
    None,
    /// 8-bit codes with one f32 scale per (slot, head, entry), for the keys and for the values:
    /// half the bytes a step reads over a long history.
    Int8,
}

/// An int8 weight: `q` holds two's-complement bytes `[out, in]` (candle has no i8 dtype), `scale`
/// one f32 per output row.
#[derive(Debug, Clone)]
pub struct Int8Weight {
    pub q: Tensor,
    pub scale: Tensor,
}

impl Int8Weight {
    pub fn out_features(&self) -> Result<usize> {
        self.q.dim(0)
    }

    pub fn in_features(&self) -> Result<usize> {
        self.q.dim(1)
    }

    /// The quantised values as f32 `[out, in]`.
    pub fn values_f32(&self) -> Result<Tensor> {
        let bytes: Vec<u8> = self.q.flatten_all()?.to_vec1()?;
        let values: Vec<f32> = bytes.iter().map(|&b| f32::from(b as i8)).collect();
        Tensor::from_vec(values, self.q.shape(), self.q.device())
    }

    /// `q · scale` in `dtype`, `[out, in]`.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        self.values_f32()?
            .broadcast_mul(&self.scale.unsqueeze(1)?)?
            .to_dtype(dtype)
    }
}

/// Quantises a PyTorch-style `[out, in]` weight per output channel, on the weight's own device
/// (a 7B model quantises in seconds on the GPU instead of a minute through host memory).
pub fn quantize(weight: &Tensor) -> Result<Int8Weight> {
    weight.dims2()?;
    let (q, scale) = quantize_rows(weight)?;
    Ok(Int8Weight { q, scale })
}

/// Int8 codes of `xs` along its last dim: each row's scale is its largest magnitude / 127 (1 for
/// an all-zero row), each code `x / scale` rounded half away from zero. Returns the codes as
/// two's-complement bytes (candle has no i8 dtype; -1 is 255), `xs`'s shape, and the scales
/// (f32, the last dim dropped). `rope_kv_write_int8` quantises ring entries the same way.
pub fn quantize_rows(xs: &Tensor) -> Result<(Tensor, Tensor)> {
    let xs = xs.to_dtype(DType::F32)?;
    let max = xs.abs()?.max_keepdim(D::Minus1)?;
    let scale = max
        .eq(0f64)?
        .where_cond(&max.ones_like()?, &(max / 127.0)?)?;
    let values = xs.broadcast_div(&scale)?.round()?.clamp(-127f32, 127f32)?;
    let wrapped = (values.lt(0f64)?.to_dtype(DType::F32)? * 256.0)?.add(&values)?;
    Ok((wrapped.to_dtype(DType::U8)?, scale.squeeze(D::Minus1)?))
}

/// `quantize_rows` undone: codes (two's-complement bytes) times their row's scale, in `dtype`.
pub fn dequantize_rows(codes: &Tensor, scales: &Tensor, dtype: DType) -> Result<Tensor> {
    let codes = codes.to_dtype(DType::F32)?;
    let signed = (codes.ge(128f64)?.to_dtype(DType::F32)? * -256.0)?.add(&codes)?;
    signed
        .broadcast_mul(&scales.unsqueeze(D::Minus1)?)?
        .to_dtype(dtype)
}

/// The CPU reference of the w8a16 kernel: `y[.., n] = scale[n] · Σ_k x[.., k] · q[n, k]`,
/// summed in f32, returned in `x`'s dtype. `q_t` is `values_f32()` transposed (`[in, out]`).
pub fn w8a16_reference(xs: &Tensor, q_t: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let dtype = xs.dtype();
    let dims = xs.dims().to_vec();
    let in_features = dims[dims.len() - 1];
    let rows = xs.elem_count() / in_features;
    let flat = xs.reshape((rows, in_features))?.to_dtype(DType::F32)?;
    let out = flat.matmul(q_t)?.broadcast_mul(&scale.unsqueeze(0)?)?;
    let mut out_dims = dims;
    *out_dims.last_mut().expect("a linear input has dims") = out.dim(D::Minus1)?;
    out.reshape(out_dims)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn quantisation_round_trips_within_half_a_step() -> Result<()> {
        let w = Tensor::randn(0f32, 0.05, (16, 64), &Device::Cpu)?;
        let q = quantize(&w)?;
        let back = q.dequantize(DType::F32)?;
        let step = q.scale.unsqueeze(1)?.broadcast_as(w.shape())?;
        let err = ((back - &w)?.abs()? / step)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(err <= 0.5 + 1e-4, "{err}");
        Ok(())
    }

    /// Ring entries (`[rows, heads, entries, head_dim]`) quantise along their last dim the way
    /// weights do along their rows, and scale back within half a step.
    #[test]
    fn entries_round_trip_within_half_a_step_along_their_last_dim() -> Result<()> {
        let xs = Tensor::randn(0f32, 1.0, (2, 3, 5, 16), &Device::Cpu)?;
        let (codes, scales) = quantize_rows(&xs)?;
        assert_eq!(codes.dims(), xs.dims());
        assert_eq!(scales.dims(), [2, 3, 5]);
        let back = dequantize_rows(&codes, &scales, DType::F32)?;
        let step = scales.unsqueeze(3)?.broadcast_as(xs.shape())?;
        let err = ((back - &xs)?.abs()? / step)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(err <= 0.5 + 1e-4, "{err}");
        let weight = quantize(&xs.reshape((30, 16))?)?;
        let as_rows = dequantize_rows(&weight.q, &weight.scale, DType::F32)?;
        let diff = (weight.dequantize(DType::F32)? - as_rows)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    #[test]
    fn the_reference_matches_a_dequantised_matmul() -> Result<()> {
        let w = Tensor::randn(0f32, 0.05, (8, 32), &Device::Cpu)?;
        let x = Tensor::randn(0f32, 1.0, (3, 32), &Device::Cpu)?;
        let q = quantize(&w)?;
        let got = w8a16_reference(&x, &q.values_f32()?.t()?.contiguous()?, &q.scale)?;
        let want = x.matmul(&q.dequantize(DType::F32)?.t()?)?;
        let err = (got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(err < 1e-5, "{err}");
        Ok(())
    }

    #[test]
    fn bytes_are_rounded_twos_complement_with_the_row_maximum_at_127() -> Result<()> {
        let rows = [[-2.0f32, -1.0, 0.25, 2.0], [0.5, -0.5, 0.251, -0.749]];
        let q = quantize(&Tensor::new(&rows, &Device::Cpu)?)?;
        let bytes: Vec<Vec<u8>> = q.q.to_vec2()?;
        // Row 0: scale 2/127, so -1 → -63.5 → -64 (half away from zero) → 192.
        assert_eq!(bytes[0], [129, 192, 16, 127]);
        // Row 1: scale 0.749/127; ±0.5 → ±84.78 → ±85; -0.749 → -127 → 129.
        assert_eq!(bytes[1], [85, 171, 43, 129]);
        assert_eq!(q.scale.to_vec1::<f32>()?, [2.0 / 127.0, 0.749 / 127.0]);
        Ok(())
    }

    #[test]
    fn zero_rows_do_not_divide_by_zero() -> Result<()> {
        let q = quantize(&Tensor::zeros((2, 16), DType::F32, &Device::Cpu)?)?;
        assert!(
            q.dequantize(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| *v == 0.0)
        );
        Ok(())
    }
}
