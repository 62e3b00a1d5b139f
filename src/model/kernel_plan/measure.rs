//! Times every candidate kernel of every matrix on the GPU, in the sublayer the model calls it
//! in, on random operands of the model's shapes, and checks each against the built-in kernel.

use super::{Choice, Kernel, KernelPlan, Matrix, Sublayer, Trial, WeightKind};
use crate::model::Result;
use crate::model::cuda::{self, Ends, W8a16Kernel};
use crate::model::quant::{Int8Weight, quantize};
use candle_core::{DType, Device, Tensor};
use std::time::{Duration, Instant};

/// Each timed sample runs a kernel back to back for about this long, so a launch's host cost
/// hides behind the previous launch's work as it does in a frame.
const SAMPLE: Duration = Duration::from_millis(3);
const SAMPLES: usize = 7;
const EPS: f64 = 1e-5;

/// What a measurement runs and skips, and whom it tells before each trial.
pub struct Measurement<'a> {
    pub matrices: &'a [Matrix],
    pub rows: &'a [usize],
    /// Kernels not to run, each with the reason recorded in its trials.
    pub excluded: &'a [(Kernel, String)],
    /// Called before each trial (to leave a trace should the trial take the process down).
    pub before_trial: &'a mut dyn FnMut(&Matrix, usize, Kernel),
}

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

    /// The product alone by `kernel`, or with `ends` inside for the split-K kernels.
    fn product(&self, kernel: Kernel, xs: &Tensor, ends: &Ends) -> Result<Tensor> {
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

/// The operands of one sublayer call: its input, and the norm's weight and the skip
/// connection where the sublayer has them.
struct Operands {
    xs: Tensor,
    alpha: Tensor,
    residual: Option<Tensor>,
}

impl Operands {
    fn random(matrix: &Matrix, rows: usize, device: &Device) -> Result<Self> {
        let randn = |cols| -> Result<Tensor> {
            Tensor::randn(0f32, 1f32, (rows, cols), device)?.to_dtype(DType::BF16)
        };
        let residual = match matrix.sublayer {
            Sublayer::Skip => Some(randn(matrix.out_features)?),
            _ => None,
        };
        Ok(Self {
            xs: randn(matrix.in_features)?,
            alpha: Tensor::rand(0.5f32, 1.5f32, matrix.in_features, device)?,
            residual,
        })
    }

    /// The sublayer as the model runs it by `kernel`: the split-K kernels with its ends inside,
    /// any other kernel between our separate norm and add or gate (`nn::Linear`, `SwiGlu`).
    fn run(&self, weights: &Weights, kernel: Kernel, sublayer: Sublayer) -> Result<Tensor> {
        let normed = matches!(sublayer, Sublayer::Norm | Sublayer::NormGate);
        let gate = sublayer == Sublayer::NormGate;
        if kernel == Kernel::SplitK {
            let ends = Ends {
                residual: self.residual.clone(),
                norm: normed.then(|| (self.alpha.clone(), EPS as f32)),
                gate,
            };
            return weights.product(kernel, &self.xs, &ends);
        }
        let input = match normed {
            true => cuda::rms_norm(&self.xs, &self.alpha, EPS as f32)?,
            false => self.xs.clone(),
        };
        let out = weights.product(kernel, &input, &Ends::default())?;
        match (&self.residual, gate) {
            (Some(residual), _) => residual + out,
            (None, true) => cuda::swiglu(&out),
            (None, false) => Ok(out),
        }
    }
}

/// Measures every matrix at every row count into a plan named `key` for `card`.
pub fn measure(
    device: &Device,
    measurement: Measurement,
    key: String,
    card: String,
) -> Result<KernelPlan> {
    let Measurement {
        matrices,
        rows,
        excluded,
        before_trial,
    } = measurement;
    let mut choices = Vec::new();
    for (done, matrix) in matrices.iter().enumerate() {
        let weights = Weights::random(matrix, device)?;
        for &count in rows {
            let operands = Operands::random(matrix, count, device)?;
            let expected = operands.run(&weights, matrix.baseline(), matrix.sublayer)?;
            let trials = matrix
                .candidates(count)
                .into_iter()
                .map(|kernel| {
                    if let Some((_, why)) = excluded.iter().find(|(k, _)| *k == kernel) {
                        return Trial::failed(kernel, why.clone());
                    }
                    before_trial(matrix, count, kernel);
                    trial(&weights, matrix, kernel, &operands, &expected)
                        .unwrap_or_else(|err| Trial::failed(kernel, err.to_string()))
                })
                .collect();
            choices.push(Choice {
                matrix: *matrix,
                rows: count,
                trials,
            });
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

fn trial(
    weights: &Weights,
    matrix: &Matrix,
    kernel: Kernel,
    operands: &Operands,
    expected: &Tensor,
) -> Result<Trial> {
    let run = || operands.run(weights, kernel, matrix.sublayer);
    let error = relative_error(&run()?, expected)?;
    let median = median_time(operands.xs.device(), || run().map(drop))?;
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
