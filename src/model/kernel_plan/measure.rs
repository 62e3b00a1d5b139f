//! Times every candidate kernel of every matrix on the GPU, in the sublayer the model calls it
//! in, on random operands of the model's shapes, and checks each against the built-in kernel.

use super::attention::{AttentionChoice, Ring};
use super::{
    Candidate, Choice, Kernel, KernelPlan, Matrix, Sublayer, Trial, TrialTrace, WeightKind,
};
use crate::model::Result;
use crate::model::cuda::{self, Ends, W8a16Kernel};
use crate::model::decode::{AttentionLaunch, KvRing, PinnedPrefix};
use crate::model::graph::{self, FrameGraph};
use crate::model::graph_cache::largest_difference;
use crate::model::quant::{Int8Weight, quantize};
use candle_core::{DType, Device, Tensor};
use std::time::{Duration, Instant};

/// Each timed sample runs a kernel back to back for about this long, so a launch's host cost
/// hides behind the previous launch's work as it does in a frame.
const SAMPLE: Duration = Duration::from_millis(3);
const SAMPLES: usize = 7;
const EPS: f64 = 1e-5;

/// What a measurement runs and skips, and whom it tells of each trial.
pub struct Measurement<'a> {
    pub matrices: &'a [Matrix],
    /// The temporal rings whose attention launches are timed.
    pub rings: &'a [Ring],
    pub rows: &'a [usize],
    /// Kernels and launches not to run, each with the reason recorded in its trials.
    pub excluded: &'a [(Candidate, String)],
    /// Called with the trial before it starts and with `None` once it is over, to leave a
    /// trace that names the trial should it take the process down.
    pub trace: &'a mut TrialTrace<'a>,
}

/// Weight bytes a timed sample streams at least: over four times the L2 that PyTorch reported
/// on our H100 (50 MB) and H200 (60 MB), so each call reads its weights from DRAM as in a
/// frame, not from a cache the previous call filled.
const STREAMED_BYTES: usize = 256 << 20;
const MAX_COPIES: usize = 256;

/// One matrix's weights in every layout its candidates read, in copies that the timed calls
/// take in turn (`STREAMED_BYTES`).
struct Weights {
    /// bf16 `[out, in]` (PyTorch's layout); bf16 matrices only.
    out_in: Vec<Tensor>,
    /// bf16 `[in, out]`; bf16 matrices only.
    in_out: Vec<Tensor>,
    /// Int8 matrices only.
    int8: Vec<Int8Weight>,
}

impl Weights {
    fn random(matrix: &Matrix, device: &Device) -> Result<Self> {
        let (n, k) = (matrix.out_features, matrix.in_features);
        let copies = STREAMED_BYTES
            .div_ceil(matrix.weight_bytes().max(1))
            .clamp(1, MAX_COPIES);
        let out_in = (Tensor::randn(0f32, 1f32, (n, k), device)? * (1.0 / (k as f64).sqrt()))?
            .to_dtype(DType::BF16)?;
        let copy = |t: &Tensor| -> Result<Vec<Tensor>> { (0..copies).map(|_| t.copy()).collect() };
        Ok(match matrix.weights {
            WeightKind::Int8 => {
                let int8 = quantize(&out_in)?;
                let (q, scale) = (copy(&int8.q)?, copy(&int8.scale)?);
                Self {
                    out_in: Vec::new(),
                    in_out: Vec::new(),
                    int8: q
                        .into_iter()
                        .zip(scale)
                        .map(|(q, scale)| Int8Weight { q, scale })
                        .collect(),
                }
            }
            WeightKind::Bf16 => Self {
                in_out: copy(&out_in.t()?.contiguous()?)?,
                out_in: copy(&out_in)?,
                int8: Vec::new(),
            },
        })
    }

    /// How many copies the calls take in turn.
    fn copies(&self) -> usize {
        self.out_in.len().max(self.int8.len())
    }

    /// The product alone by `kernel` on weight copy `copy`, or with `ends` inside for the
    /// split-K kernels.
    fn product(&self, kernel: Kernel, xs: &Tensor, ends: &Ends, copy: usize) -> Result<Tensor> {
        let pick = |layout: &'_ [Tensor]| -> Result<Tensor> {
            match layout.get(copy % layout.len().max(1)) {
                Some(t) => Ok(t.clone()),
                None => candle_core::bail!("{kernel:?} needs bf16 weights"),
            }
        };
        let int8 = || -> Result<&Int8Weight> {
            match self.int8.get(copy % self.int8.len().max(1)) {
                Some(w) => Ok(w),
                None => candle_core::bail!("{kernel:?} needs int8 weights"),
            }
        };
        match kernel {
            Kernel::Cublas => xs.matmul(&pick(&self.in_out)?),
            Kernel::CublasOutIn => xs.matmul(&pick(&self.out_in)?.t()?),
            Kernel::SplitK => match self.int8.is_empty() {
                false => cuda::w8a16_fused(xs, int8()?, W8a16Kernel::SplitK, ends),
                true => cuda::gemv_bf16(xs, &pick(&self.out_in)?, ends),
            },
            Kernel::Rows => cuda::w8a16_on(xs, int8()?, W8a16Kernel::Rows),
            Kernel::RowsAhead => cuda::w8a16_on(xs, int8()?, W8a16Kernel::RowsAhead),
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
    fn run(
        &self,
        weights: &Weights,
        kernel: Kernel,
        sublayer: Sublayer,
        copy: usize,
    ) -> Result<Tensor> {
        let normed = matches!(sublayer, Sublayer::Norm | Sublayer::NormGate);
        let gate = sublayer == Sublayer::NormGate;
        if kernel == Kernel::SplitK {
            let ends = Ends {
                residual: self.residual.clone(),
                norm: normed.then(|| (self.alpha.clone(), EPS as f32)),
                gate,
            };
            return weights.product(kernel, &self.xs, &ends, copy);
        }
        let input = match normed {
            true => cuda::rms_norm(&self.xs, &self.alpha, EPS as f32)?,
            false => self.xs.clone(),
        };
        let out = weights.product(kernel, &input, &Ends::default(), copy)?;
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
        rings,
        rows,
        excluded,
        trace,
    } = measurement;
    let mut choices = Vec::new();
    for (done, matrix) in matrices.iter().enumerate() {
        let weights = Weights::random(matrix, device)?;
        for &count in rows {
            let operands = Operands::random(matrix, count, device)?;
            let expected = operands.run(&weights, matrix.baseline(), matrix.sublayer, 0)?;
            let mut trials = Vec::new();
            for kernel in matrix.candidates(count) {
                if let Some(why) = excluded_why(excluded, Candidate::Product(kernel)) {
                    trials.push(Trial::failed(kernel, why));
                    continue;
                }
                trace(Some((Candidate::Product(kernel), &matrix.spec(), count)));
                let judged = match trial(&weights, matrix, kernel, &operands, &expected) {
                    Ok(judged) => judged,
                    Err(err) => {
                        usable_after(device, Candidate::Product(kernel), &err)?;
                        Trial::failed(kernel, err.to_string())
                    }
                };
                trace(None);
                trials.push(judged);
            }
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
    let mut attention = Vec::new();
    for ring in rings {
        for &count in rows {
            attention.push(measure_attention(device, ring, count, excluded, trace)?);
        }
        tracing::info!("attention launches timed for the {}", ring.label());
    }
    Ok(KernelPlan {
        key,
        card,
        choices,
        attention,
    })
}

/// Why `candidate` is left out, if it is.
fn excluded_why(excluded: &[(Candidate, String)], candidate: Candidate) -> Option<String> {
    excluded
        .iter()
        .find(|(c, _)| *c == candidate)
        .map(|(_, why)| why.clone())
}

/// After a trial of `candidate` failed with `err`: an error if the GPU is unusable now (a fault
/// leaves the context so), so that the measurement stops with this trial still the last one
/// traced, before a later one takes the blame.
fn usable_after(device: &Device, candidate: Candidate, err: &candle_core::Error) -> Result<()> {
    device.synchronize().map_err(|dead| {
        candle_core::Error::Msg(format!(
            "{} left the GPU unusable ({err}): {dead}",
            candidate.name()
        ))
    })
}

/// Every attention launch over `ring` at `rows` rows, each checked against the default's; when
/// the ring cannot be set up (too little memory, say) every launch's trial says why.
fn measure_attention(
    device: &Device,
    ring: &Ring,
    rows: usize,
    excluded: &[(Candidate, String)],
    trace: &mut TrialTrace<'_>,
) -> Result<AttentionChoice> {
    let choice = |trials| AttentionChoice {
        ring: *ring,
        rows,
        trials,
    };
    let setup = AttentionOperands::random(ring, rows, device).and_then(|operands| {
        let expected = operands.run(AttentionLaunch::DEFAULT, 0)?;
        Ok((operands, expected))
    });
    let (operands, expected) = match setup {
        Ok(setup) => setup,
        Err(err) => {
            usable_after(device, Candidate::Attention(AttentionLaunch::DEFAULT), &err)?;
            let why = format!("the ring could not be set up: {err}");
            let launches = AttentionLaunch::candidates().into_iter();
            return Ok(choice(
                launches.map(|l| Trial::failed(l, why.clone())).collect(),
            ));
        }
    };
    let mut trials = Vec::new();
    for launch in AttentionLaunch::candidates() {
        let candidate = Candidate::Attention(launch);
        if let Some(why) = excluded_why(excluded, candidate) {
            trials.push(Trial::failed(launch, why));
            continue;
        }
        trace(Some((candidate, &ring.spec(), rows)));
        let judged = match attention_trial(&operands, launch, &expected, &ring.spec()) {
            Ok(judged) => judged,
            Err(err) => {
                usable_after(device, candidate, &err)?;
                Trial::failed(launch, err.to_string())
            }
        };
        trace(None);
        trials.push(judged);
    }
    Ok(choice(trials))
}

/// `launch`'s trial: its error the larger of two calls in a row (a joined kernel's second call
/// relies on the first leaving its arrival counts at zero), and its time.
fn attention_trial(
    operands: &AttentionOperands,
    launch: AttentionLaunch,
    expected: &Tensor,
    ring: &str,
) -> Result<Trial<AttentionLaunch>> {
    let run = |copy| operands.run(launch, copy);
    let error = relative_error(&run(0)?, expected)?.max(relative_error(&run(1)?, expected)?);
    let what = format!("{} over {ring}", launch.name());
    let median = call_time(operands.q.device(), operands.rings.len(), &run, &what)?;
    Ok(Trial::judged(launch, median.as_secs_f64() * 1e6, error))
}

/// One query per row over a whole random ring, in copies the timed calls take in turn
/// (`STREAMED_BYTES`, so each call reads its ring from DRAM as a frame does), every entry
/// visible. Its rows hold the same keys and values (one row made, then copied: a full ring of
/// 64 rows is 3 GB in bf16); their queries differ.
struct AttentionOperands {
    rings: Vec<KvRing>,
    q: Tensor,
    mask: Tensor,
    prefix: PinnedPrefix,
}

impl AttentionOperands {
    fn random(ring: &Ring, rows: usize, device: &Device) -> Result<Self> {
        let dims = (1, ring.heads, ring.capacity, ring.head_dim);
        let randn = || Tensor::randn(0f32, 1f32, dims, device)?.to_dtype(DType::BF16);
        let dense = KvRing {
            k: randn()?,
            v: randn()?,
            scales: None,
        };
        let stored = dense
            .stored_as(ring.storage)?
            .map(|row| Tensor::cat(&vec![row; rows], 0))?;
        let copies = STREAMED_BYTES
            .div_ceil((ring.bytes_per_row() * rows).max(1))
            .clamp(1, MAX_COPIES);
        let mut rings = vec![stored.clone()];
        for _ in 1..copies {
            rings.push(stored.copy()?);
        }
        // A query of four times the keys' spread peaks the softmax on a few keys, so a launch
        // that misreads one shows.
        let q = Tensor::randn(0f32, 4f32, (rows, ring.heads, 1, ring.head_dim), device)?
            .to_dtype(DType::BF16)?;
        Ok(Self {
            rings,
            q,
            mask: Tensor::zeros((rows, 1, 1, ring.capacity), DType::F32, device)?,
            prefix: PinnedPrefix::none(rows, ring.head_dim, device)?,
        })
    }

    fn run(&self, launch: AttentionLaunch, copy: usize) -> Result<Tensor> {
        let ring = &self.rings[copy % self.rings.len()];
        cuda::ring_attention_launched(&self.q, ring, &self.mask, &self.prefix, Some(launch))
    }
}

fn trial(
    weights: &Weights,
    matrix: &Matrix,
    kernel: Kernel,
    operands: &Operands,
    expected: &Tensor,
) -> Result<Trial> {
    let run = |copy| operands.run(weights, kernel, matrix.sublayer, copy);
    let error = relative_error(&run(0)?, expected)?;
    let what = format!("{} for {}", kernel.name(), matrix.spec());
    let median = call_time(operands.xs.device(), weights.copies(), &run, &what)?;
    Ok(Trial::judged(kernel, median.as_secs_f64() * 1e6, error))
}

/// One call's time in a CUDA graph (`replayed_time`), else, where no graph of it can be captured,
/// launched from the host (`eager_time`), with a warning naming `what`.
fn call_time(
    device: &Device,
    copies: usize,
    run: &dyn Fn(usize) -> Result<Tensor>,
    what: &str,
) -> Result<Duration> {
    replayed_time(device, copies, run).or_else(|err| {
        tracing::warn!(
            "{what}: timed eagerly, host launches and all, as no CUDA graph of it could be \
             captured ({err})"
        );
        eager_time(device, copies, run)
    })
}

/// One call's time as the model pays it, inside a CUDA graph (no host launches): the median
/// over `SAMPLES` of back-to-back replays of a graph that makes one call per weight copy.
fn replayed_time(
    device: &Device,
    copies: usize,
    run: &dyn Fn(usize) -> Result<Tensor>,
) -> Result<Duration> {
    let calls = |copies: usize| -> Result<()> { (0..copies).try_for_each(|c| run(c).map(drop)) };
    let _uploads = graph::cached_uploads(device)?;
    // Eagerly first: candle's uploads are cached, cuBLAS has its workspace.
    calls(copies)?;
    let probe = Tensor::zeros(1, DType::F32, device)?;
    let graph = FrameGraph::capture(&[&probe], 1, DType::F32, |_| {
        calls(copies)?;
        Tensor::zeros(1, DType::F32, device)
    })?;
    let replays = |count: u32| -> Result<Duration> {
        device.synchronize()?;
        let started = Instant::now();
        for _ in 0..count {
            graph.replay(&[&probe])?;
        }
        device.synchronize()?;
        Ok(started.elapsed())
    };
    let one = replays(1)?.max(Duration::from_micros(1));
    let count = (SAMPLE.as_secs_f64() / one.as_secs_f64()).clamp(1.0, 100.0) as u32;
    let mut samples = (0..SAMPLES)
        .map(|_| Ok(replays(count)? / (count * copies as u32)))
        .collect::<Result<Vec<_>>>()?;
    samples.sort();
    Ok(samples[SAMPLES / 2])
}

/// One call's time launched from the host (`replayed_time`'s fallback): the median over
/// `SAMPLES` of one call's share of `SAMPLE` of calls queued back to back, taking the weight
/// copies in turn.
fn eager_time(
    device: &Device,
    copies: usize,
    run: &dyn Fn(usize) -> Result<Tensor>,
) -> Result<Duration> {
    run(0)?;
    device.synchronize()?;
    let started = Instant::now();
    run(0)?;
    device.synchronize()?;
    let one = started.elapsed().max(Duration::from_micros(1));
    let calls = (SAMPLE.as_secs_f64() / one.as_secs_f64()).clamp(1.0, 500.0) as usize;
    let mut samples = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let started = Instant::now();
        for call in 0..calls {
            drop(run(call % copies)?);
        }
        device.synchronize()?;
        samples.push(started.elapsed() / calls as u32);
    }
    samples.sort();
    Ok(samples[SAMPLES / 2])
}

/// The largest difference of `got` from `expected` over `expected`'s largest magnitude
/// (infinite when `got` is not finite).
fn relative_error(got: &Tensor, expected: &Tensor) -> Result<f64> {
    let largest = expected
        .to_dtype(DType::F32)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()? as f64;
    let diff = largest_difference(got, expected)? as f64;
    Ok(match diff.is_finite() {
        true => diff / largest.max(f64::MIN_POSITIVE),
        false => f64::INFINITY,
    })
}
