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
        let int8 = || {
            self.int8
                .as_ref()
                .ok_or_else(|| candle_core::Error::msg(format!("{kernel:?} needs int8 weights")))
        };
        match kernel {
            Kernel::Cublas => xs.matmul(&self.in_out),
            Kernel::CublasOutIn => xs.matmul(&self.out_in.t()?),
            Kernel::SplitK => match &self.int8 {
                Some(int8) => cuda::w8a16_on(xs, int8, W8a16Kernel::SplitK),
                None => cuda::gemv_bf16(xs, &self.out_in, &Ends::default()),
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
    let expected = weights.run(matrix.baseline(), &xs)?.to_dtype(DType::F32)?;
    let largest = expected.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let trials = matrix
        .candidates(rows)
        .into_iter()
        .map(|kernel| {
            trial(weights, kernel, &xs, &expected, largest, device)
                .unwrap_or_else(|err| Trial::failed(kernel, err.to_string()))
        })
        .collect();
    Ok(Choice::pick(*matrix, rows, trials))
}

fn trial(
    weights: &Weights,
    kernel: Kernel,
    xs: &Tensor,
    expected: &Tensor,
    largest: f64,
    device: &Device,
) -> Result<Trial> {
    let got = weights.run(kernel, xs)?.to_dtype(DType::F32)?;
    let diff = (got - expected)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let error = diff / largest.max(f64::MIN_POSITIVE);
    let median = median_time(device, || weights.run(kernel, xs).map(drop))?;
    Ok(Trial::judged(kernel, median.as_secs_f64() * 1e6, error))
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
