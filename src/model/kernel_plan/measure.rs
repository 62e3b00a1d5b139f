//! Times every candidate kernel of every matrix on the GPU, on random weights of the model's
//! shapes, and checks each against the built-in kernel's output.

use super::{Choice, Kernel, KernelPlan, Matrix, Trial, WeightKind};
use crate::model::Result;
use crate::model::cuda::{self, Ends, W8a16Kernel};
use crate::model::quant::{Int8Weight, quantize};
use candle_core::{DType, Device, Tensor};
use std::time::{Duration, Instant};

/// Each timed sample runs a kernel back to back for about this long, so a launch's host cost
/// hides behind the previous launch's work as it does in a frame.
const SAMPLE: Duration = Duration::from_millis(3);
const SAMPLES: usize = 7;

/// One matrix's weights in every layout its candidates read.
struct Weights {
    /// bf16 `[out, in]` (PyTorch's layout).
    out_in: Tensor,
    /// bf16 `[in, out]`.
    in_out: Tensor,
    int8: Option<Int8Weight>,
}

impl Weights {
    fn random(matrix: &Matrix, device: &Device) -> Result<Self> {
        let (n, k) = (matrix.out_features, matrix.in_features);
        let out_in = (Tensor::randn(0f32, 1f32, (n, k), device)? * (1.0 / (k as f64).sqrt()))?
            .to_dtype(DType::BF16)?;
        let int8 = match matrix.weights {
            WeightKind::Int8 => Some(quantize(&out_in)?),
            WeightKind::Bf16 => None,
        };
        Ok(Self {
            in_out: out_in.t()?.contiguous()?,
            out_in,
            int8,
        })
    }

    fn run(&self, kernel: Kernel, xs: &Tensor) -> Result<Tensor> {
        self.run_fused(kernel, xs, &Ends::default())
    }

    /// `run` with a sublayer's `ends` inside, which only the split-K kernels take.
    fn run_fused(&self, kernel: Kernel, xs: &Tensor, ends: &Ends) -> Result<Tensor> {
        if kernel != Kernel::SplitK && !ends.is_empty() {
            candle_core::bail!("{kernel:?} fuses nothing");
        }
        let int8 = || {
            self.int8
                .as_ref()
                .ok_or_else(|| candle_core::Error::msg(format!("{kernel:?} needs int8 weights")))
        };
        match kernel {
            Kernel::Cublas => xs.matmul(&self.in_out),
            Kernel::CublasOutIn => xs.matmul(&self.out_in.t()?),
            Kernel::SplitK => match &self.int8 {
                Some(int8) => cuda::w8a16_fused(xs, int8, W8a16Kernel::SplitK, ends),
                None => cuda::gemv_bf16(xs, &self.out_in, ends),
            },
            Kernel::Rows => cuda::w8a16_on(xs, int8()?, W8a16Kernel::Rows),
            Kernel::TensorCores => cuda::w8a16_on(xs, int8()?, W8a16Kernel::TensorCores),
        }
    }
}

/// Measures `matrices` at each of `rows` on `device` into a plan named `key` for `card`.
pub fn measure(
    device: &Device,
    matrices: &[Matrix],
    rows: &[usize],
    key: String,
    card: String,
) -> Result<KernelPlan> {
    let mut choices = Vec::new();
    for (done, matrix) in matrices.iter().enumerate() {
        let weights = Weights::random(matrix, device)?;
        for &count in rows {
            choices.push(choose(&weights, matrix, count, device)?);
        }
        tracing::info!(
            "kernels timed for {} ({} of {})",
            matrix.label(),
            done + 1,
            matrices.len()
        );
    }
    Ok(KernelPlan { key, card, choices })
}

fn choose(weights: &Weights, matrix: &Matrix, rows: usize, device: &Device) -> Result<Choice> {
    let xs =
        Tensor::randn(0f32, 1f32, (rows, matrix.in_features), device)?.to_dtype(DType::BF16)?;
    let expected = weights.run(matrix.baseline(), &xs)?;
    let trials = matrix
        .candidates(rows)
        .into_iter()
        .map(|kernel| {
            trial(weights, matrix, kernel, &xs, &expected)
                .unwrap_or_else(|err| Trial::failed(kernel, err.to_string()))
        })
        .collect();
    Ok(Choice::pick(*matrix, rows, trials))
}

fn trial(
    weights: &Weights,
    matrix: &Matrix,
    kernel: Kernel,
    xs: &Tensor,
    expected: &Tensor,
) -> Result<Trial> {
    let mut error = relative_error(&weights.run(kernel, xs)?, expected)?;
    if kernel == Kernel::SplitK {
        error = error.max(ends_error(weights, matrix, xs)?);
    }
    let median = median_time(xs.device(), || weights.run(kernel, xs).map(drop))?;
    Ok(Trial::judged(kernel, median.as_secs_f64() * 1e6, error))
}

/// The largest difference of `got` from `expected` over `expected`'s largest magnitude
/// (infinite when `got` is not finite).
fn relative_error(got: &Tensor, expected: &Tensor) -> Result<f64> {
    let expected = expected.to_dtype(DType::F32)?;
    let largest = expected.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let diff = (got.to_dtype(DType::F32)? - expected)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()? as f64;
    Ok(match diff.is_finite() {
        true => diff / largest.max(f64::MIN_POSITIVE),
        false => f64::INFINITY,
    })
}

/// How far the split-K kernel with a sublayer's ends inside (the pre-norm with the skip
/// connection; with an even channel count, the pre-norm with the FFN gate) is from the same
/// sublayer composed of the built-in kernel and our separate norm, add and gate: the plan
/// turns those on wherever it keeps the split-K kernel.
fn ends_error(weights: &Weights, matrix: &Matrix, xs: &Tensor) -> Result<f64> {
    let (rows, n, k) = (xs.dim(0)?, matrix.out_features, matrix.in_features);
    let device = xs.device();
    let alpha = Tensor::rand(0.5f32, 1.5f32, k, device)?;
    let eps = 1e-5;
    let residual = Tensor::randn(0f32, 1f32, (rows, n), device)?.to_dtype(DType::BF16)?;
    let projected = weights.run(matrix.baseline(), &cuda::rms_norm(xs, &alpha, eps)?)?;
    let with_skip = Ends {
        residual: Some(residual.clone()),
        norm: Some((alpha.clone(), eps)),
        gate: false,
    };
    let mut error = relative_error(
        &weights.run_fused(Kernel::SplitK, xs, &with_skip)?,
        &(&projected + &residual)?,
    )?;
    if n.is_multiple_of(2) {
        let gated = Ends {
            residual: None,
            norm: Some((alpha, eps)),
            gate: true,
        };
        let fused = weights.run_fused(Kernel::SplitK, xs, &gated)?;
        error = error.max(relative_error(&fused, &cuda::swiglu(&projected)?)?);
    }
    Ok(error)
}

/// The median over `SAMPLES` of one call's time, each sample `SAMPLE` long of calls queued
/// back to back.
fn median_time(device: &Device, mut call: impl FnMut() -> Result<()>) -> Result<Duration> {
    call()?;
    device.synchronize()?;
    let started = Instant::now();
    call()?;
    device.synchronize()?;
    let one = started.elapsed().max(Duration::from_micros(1));
    let calls = (SAMPLE.as_secs_f64() / one.as_secs_f64()).clamp(1.0, 500.0) as u32;
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let started = Instant::now();
        for _ in 0..calls {
            call()?;
        }
        device.synchronize()?;
        samples.push(started.elapsed() / calls);
    }
    samples.sort();
    Ok(samples[SAMPLES / 2])
}
