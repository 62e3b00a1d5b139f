//! Which kernel runs each of the language model's matrix products on the GPU at hand.
//!
//! The fastest kernel depends on the card: HBM3 at 3 TB/s on an H100 and LPDDR5x at 273 GB/s
//! on DGX Spark reward different shapes of work. So every candidate for every matrix of the
//! model, in the sublayer it serves, at every row bucket, is timed on the card itself and its
//! output compared with the built-in kernel's (`measure`, run by `duplex tune`). From those
//! trials a plan's `routes` say what runs: a bf16 matrix's layout, and a kernel per bucket. A
//! plan is installed once, before the model loads; `nn` and `cuda` ask it, and without one they
//! use the built-in kernels.

pub mod attention;
#[cfg(feature = "cuda")]
pub mod measure;

use super::config::LmConfig;
use super::decode::AttentionLaunch;
use super::quant::Quant;
use attention::{AttentionChoice, AttentionRoute, Ring};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::OnceLock;

/// The most rows the split-K kernels (kernels/gemv.cu) take.
pub const GEMV_MAX_ROWS: usize = 4;
/// The fewest rows the tensor-core w8a16 kernel takes.
pub const W8A16_MMA_MIN_ROWS: usize = 4;
/// The inputs of a slice of the tensor-core w8a16 kernel (`W8A16_MMA_K` in kernels/w8a16.cu).
const W8A16_MMA_K: usize = 128;
/// The fewest slices a block of a split tensor-core product multiplies: with fewer, the partial
/// sums cost more than the blocks gain.
const W8A16_MMA_MIN_SLICES: usize = 2;

/// The inputs each block of the tensor-core w8a16 kernel takes for `tiles` tiles (64 channels
/// by up to 64 rows) of `k` inputs on a card of `sms` SMs: all of them unless the tiles leave
/// half the two blocks an SM the kernel fits idle, else a share, as many shares as keep tiles
/// times shares within those blocks (one wave, no tail), and no more than a share per
/// `W8A16_MMA_MIN_SLICES` slices.
pub fn mma_split_k(tiles: usize, k: usize, sms: usize) -> usize {
    let slices = k.div_ceil(W8A16_MMA_K);
    let wanted = (2 * sms) / tiles.max(1);
    let splits = wanted.min(slices / W8A16_MMA_MIN_SLICES).max(1);
    slices.div_ceil(splits) * W8A16_MMA_K
}

/// The row counts a plan is measured at. Each stands for the counts above the previous one
/// (the step loop runs a power of two of rows, or all its slots).
pub const ROW_BUCKETS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];
/// A candidate whose output differs from the baseline's by more than this fraction of the
/// baseline's largest magnitude is wrong, not merely summed in another order.
pub const TOLERANCE: f64 = 0.02;
/// A candidate replaces the built-in kernel only when its median is at most this fraction of
/// the built-in one's: closer than that is timing noise.
pub const MARGIN: f64 = 0.97;
/// bf16 weights are held `[out, in]` only when that layout's best kernel stays within this
/// factor of cuBLAS over `[in, out]` at every bucket.
pub const OUT_IN_SLACK: f64 = 1.05;

/// Whether the split-K kernels take `rows` rows of `k` inputs with weights of `weight_bytes`:
/// 1 to 4 rows, and rows in whole 16-byte loads.
pub fn gemv_takes(rows: usize, k: usize, weight_bytes: usize) -> bool {
    (1..=GEMV_MAX_ROWS).contains(&rows) && k.is_multiple_of(16 / weight_bytes)
}

/// The fewest rows a bucket of `rows` stands for.
fn bucket_floor(rows: usize) -> usize {
    rows / 2 + 1
}

/// How a matrix's weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightKind {
    Bf16,
    Int8,
}

/// What of its transformer sublayer a product takes, as the model calls it: the split-K
/// kernels take it inside; every other kernel is followed or preceded by our separate kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sublayer {
    /// The product alone (output heads).
    Plain,
    /// The RMS pre-norm of its input (attention in-projections).
    Norm,
    /// The skip connection added to its output (out-projections; the depformer's input, to
    /// which the previous token's embedding is added).
    Skip,
    /// The pre-norm, and the gate `silu(a) · u` of its output (FFN in-projections).
    NormGate,
}

impl Sublayer {
    /// The sublayer of a call with these ends, if the model makes such calls.
    pub fn of(residual: bool, norm: bool, gate: bool) -> Option<Self> {
        match (residual, norm, gate) {
            (false, false, false) => Some(Self::Plain),
            (false, true, false) => Some(Self::Norm),
            (true, false, false) => Some(Self::Skip),
            (false, true, true) => Some(Self::NormGate),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Norm => "norm",
            Self::Skip => "skip",
            Self::NormGate => "norm-gate",
        }
    }
}

/// A kernel that can run a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kernel {
    /// cuBLAS over bf16 weights held `[in, out]`: the built-in choice for bf16.
    Cublas,
    /// cuBLAS over bf16 weights held `[out, in]`, transposed.
    CublasOutIn,
    /// `gemv_splitk_*` (kernels/gemv.cu): bf16 `[out, in]` or int8, 1 to 4 rows.
    SplitK,
    /// `w8a16_bf16`: four output channels per warp, the built-in choice for int8.
    Rows,
    /// `w8a16_mma_bf16`: tiles of rows on the tensor cores.
    TensorCores,
    /// `w8a16_ahead_bf16`: `w8a16_bf16` with each warp's next weights in flight while it
    /// multiplies, 1 to 4 rows.
    RowsAhead,
}

impl Kernel {
    pub const ALL: [Self; 6] = [
        Self::Cublas,
        Self::CublasOutIn,
        Self::SplitK,
        Self::Rows,
        Self::TensorCores,
        Self::RowsAhead,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Cublas => "cublas",
            Self::CublasOutIn => "cublas-out-in",
            Self::SplitK => "split-k",
            Self::Rows => "rows",
            Self::TensorCores => "tensor-cores",
            Self::RowsAhead => "rows-ahead",
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == text)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|k| k.name()).collect();
                format!("{text:?} is not a kernel ({})", names.join(", "))
            })
    }

    /// Whether it is a built-in kernel, which every plan falls back to.
    pub fn is_builtin(self) -> bool {
        matches!(self, Self::Cublas | Self::Rows)
    }
}

/// What a plan measures: a product's kernel, or the attention's launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Candidate {
    Product(Kernel),
    Attention(AttentionLaunch),
}

impl Candidate {
    /// `split-k`, `attention-staged-64-128`: as `duplex tune --exclude` takes it.
    pub fn name(&self) -> String {
        match self {
            Self::Product(kernel) => kernel.name().to_owned(),
            Self::Attention(launch) => launch.name(),
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        match text.starts_with("attention-") {
            true => AttentionLaunch::from_name(text).map(Self::Attention),
            false => Kernel::parse(text).map(Self::Product),
        }
    }

    /// Whether it is what runs without a plan, which every plan falls back to.
    pub fn is_builtin(&self) -> bool {
        match self {
            Self::Product(kernel) => kernel.is_builtin(),
            Self::Attention(launch) => *launch == AttentionLaunch::DEFAULT,
        }
    }

    /// What to leave out once it stopped a measurement: itself, and for an attention launch every
    /// other candidate launch likely to fault in the same code (`shares_code_with`; the default
    /// aside), so one faulty kernel does not spend every try on its launches one by one.
    pub fn with_kin(self) -> Vec<Self> {
        let Self::Attention(launch) = self else {
            return vec![self];
        };
        let kin = AttentionLaunch::candidates()
            .into_iter()
            .filter(|other| *other != launch && other.shares_code_with(&launch))
            .map(Self::Attention)
            .filter(|candidate| !candidate.is_builtin());
        std::iter::once(self).chain(kin).collect()
    }
}

/// Told of each trial of a measurement: `Some((candidate, what it runs, rows))` before it
/// starts (`what` a matrix's or a ring's spec), `None` once it is over.
pub type TrialTrace<'a> = dyn FnMut(Option<(Candidate, &str, usize)>) + 'a;

/// One matrix of the model, `[out_features, in_features]` as PyTorch holds it, in its sublayer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Matrix {
    pub weights: WeightKind,
    pub out_features: usize,
    pub in_features: usize,
    pub sublayer: Sublayer,
}

impl Matrix {
    pub const fn new(
        weights: WeightKind,
        out_features: usize,
        in_features: usize,
        sublayer: Sublayer,
    ) -> Self {
        Self {
            weights,
            out_features,
            in_features,
            sublayer,
        }
    }

    /// The built-in kernel, every candidate's reference.
    pub fn baseline(&self) -> Kernel {
        match self.weights {
            WeightKind::Bf16 => Kernel::Cublas,
            WeightKind::Int8 => Kernel::Rows,
        }
    }

    /// The kernels that can run every row count of the bucket `rows`, the baseline first.
    pub fn candidates(&self, rows: usize) -> Vec<Kernel> {
        let k = self.in_features;
        let gate_fits = self.sublayer != Sublayer::NormGate || self.out_features.is_multiple_of(2);
        let split_k = |bytes| gemv_takes(rows, k, bytes) && gate_fits;
        match self.weights {
            WeightKind::Bf16 => {
                let mut kernels = vec![Kernel::Cublas, Kernel::CublasOutIn];
                if split_k(2) {
                    kernels.push(Kernel::SplitK);
                }
                kernels
            }
            WeightKind::Int8 => {
                let mut kernels = vec![Kernel::Rows];
                if rows <= GEMV_MAX_ROWS {
                    kernels.push(Kernel::RowsAhead);
                }
                if split_k(1) {
                    kernels.push(Kernel::SplitK);
                }
                if bucket_floor(rows) >= W8A16_MMA_MIN_ROWS {
                    kernels.push(Kernel::TensorCores);
                }
                kernels
            }
        }
    }

    /// The bytes of its weights a product reads (int8: the values and a scale per channel).
    pub fn weight_bytes(&self) -> usize {
        let (n, k) = (self.out_features, self.in_features);
        match self.weights {
            WeightKind::Bf16 => 2 * n * k,
            WeightKind::Int8 => n * k + 4 * n,
        }
    }

    /// `int8 12288x4096 norm`.
    pub fn label(&self) -> String {
        let kind = match self.weights {
            WeightKind::Bf16 => "bf16",
            WeightKind::Int8 => "int8",
        };
        let (n, k) = (self.out_features, self.in_features);
        format!("{kind} {n}x{k} {}", self.sublayer.name())
    }

    /// Parses `label`'s form with colons: `int8:12288x4096:norm`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{text:?} is not a matrix like bf16:32000x4096:plain or int8:12288x4096:norm \
                 (sublayers: plain, norm, skip, norm-gate)"
            )
        };
        let mut parts = text.split(':');
        let weights = match parts.next() {
            Some("bf16") => WeightKind::Bf16,
            Some("int8") => WeightKind::Int8,
            _ => return Err(bad()),
        };
        let (out, input) = parts
            .next()
            .and_then(|d| d.split_once('x'))
            .ok_or_else(bad)?;
        let parse = |s: &str| s.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(bad);
        let sublayer = match parts.next() {
            Some("plain") => Sublayer::Plain,
            Some("norm") => Sublayer::Norm,
            Some("skip") => Sublayer::Skip,
            Some("norm-gate") => Sublayer::NormGate,
            _ => return Err(bad()),
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self {
            weights,
            out_features: parse(out)?,
            in_features: parse(input)?,
            sublayer,
        })
    }

    /// The form `parse` reads.
    pub fn spec(&self) -> String {
        self.label().replace(' ', ":")
    }
}

/// The distinct matrices of a language model's products with `quant` weights, each in its
/// sublayer: the temporal transformer's and the depformer's (quantised as asked) and the
/// output heads (bf16 always).
pub fn matrices(cfg: &LmConfig, quant: Quant) -> Vec<Matrix> {
    use Sublayer::{Norm, NormGate, Plain, Skip};
    let quantised = match quant {
        Quant::None => WeightKind::Bf16,
        Quant::Int8 => WeightKind::Int8,
    };
    let (d, h) = (cfg.dim, cfg.hidden());
    let (dd, dh) = (cfg.depformer_dim, cfg.depformer_hidden());
    let shaped = Matrix::new;
    let all = [
        shaped(quantised, 3 * d, d, Norm),
        shaped(quantised, d, d, Skip),
        shaped(quantised, 2 * h, d, NormGate),
        shaped(quantised, d, h, Skip),
        shaped(WeightKind::Bf16, cfg.text_card, d, Plain),
        shaped(quantised, dd, d, Skip),
        shaped(quantised, 3 * dd, dd, Norm),
        shaped(quantised, dd, dd, Skip),
        shaped(quantised, 2 * dh, dd, NormGate),
        shaped(quantised, dd, dh, Skip),
        shaped(WeightKind::Bf16, cfg.card, dd, Plain),
    ];
    let mut distinct = Vec::new();
    for matrix in all {
        if !distinct.contains(&matrix) {
            distinct.push(matrix);
        }
    }
    distinct
}

/// One candidate's run: its median time and how far its output was from the baseline's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial<K = Kernel> {
    pub kernel: K,
    /// Absent when it could not run.
    pub median_us: Option<f64>,
    /// The largest difference from the baseline's output over the baseline's largest magnitude
    /// (absent when it could not run, or was not finite).
    pub error: Option<f64>,
    /// Why it may not run this product (too far from the baseline, or it failed).
    pub rejected: Option<String>,
}

impl<K> Trial<K> {
    /// A trial that ran: rejected when its `error` is not finite or beyond `TOLERANCE`.
    pub fn judged(kernel: K, median_us: f64, error: f64) -> Self {
        let rejected = if !error.is_finite() {
            Some("its output is not finite where the baseline's is".to_owned())
        } else if error > TOLERANCE {
            Some(format!(
                "its output differs from the baseline's by {error:.3} of the largest value"
            ))
        } else {
            None
        };
        Self {
            kernel,
            median_us: Some(median_us),
            error: error.is_finite().then_some(error),
            rejected,
        }
    }

    /// A trial that could not run at all.
    pub fn failed(kernel: K, why: String) -> Self {
        Self {
            kernel,
            median_us: None,
            error: None,
            rejected: Some(why),
        }
    }

    /// Its median, when it ran and agreed with the baseline.
    fn accepted_median(&self) -> Option<f64> {
        self.median_us.filter(|_| self.rejected.is_none())
    }
}

/// Every trial of one matrix at one row bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub matrix: Matrix,
    pub rows: usize,
    pub trials: Vec<Trial>,
}

impl Choice {
    fn median(&self, kernel: Kernel) -> Option<f64> {
        self.trials
            .iter()
            .find(|t| t.kernel == kernel)
            .and_then(Trial::accepted_median)
    }

    /// The fastest of `kernels` that ran and agreed, with its median.
    fn fastest(&self, kernels: &[Kernel]) -> Option<(Kernel, f64)> {
        kernels
            .iter()
            .filter_map(|&k| Some((k, self.median(k)?)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// The fastest accepted kernel if it beats the baseline by the margin; else the baseline.
    fn pick_int8(&self) -> Kernel {
        let baseline = self.matrix.baseline();
        let Some(base) = self.median(baseline) else {
            // Without a working baseline nothing can be judged: keep the built-in kernel.
            return baseline;
        };
        match self.fastest(&self.matrix.candidates(self.rows)) {
            Some((kernel, median)) if median <= MARGIN * base => kernel,
            _ => baseline,
        }
    }
}

/// What runs one matrix: whether its bf16 weights are held `[out, in]`, and the kernel for
/// each measured bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub out_in: bool,
    /// `(bucket, kernel)`, by bucket.
    pub kernels: Vec<(usize, Kernel)>,
}

/// What `by_bucket` (`(bucket, choice)` by bucket) holds for `rows` rows: the smallest bucket
/// holding them, else the largest.
fn for_rows<T: Copy>(by_bucket: &[(usize, T)], rows: usize) -> Option<T> {
    by_bucket
        .iter()
        .find(|(bucket, _)| *bucket >= rows)
        .or(by_bucket.last())
        .map(|(_, choice)| *choice)
}

impl Route {
    /// The kernel for `rows` rows: the smallest bucket holding them, else the largest.
    pub fn kernel(&self, rows: usize) -> Kernel {
        for_rows(&self.kernels, rows).unwrap_or(if self.out_in {
            Kernel::CublasOutIn
        } else {
            Kernel::Cublas
        })
    }

    /// The bf16 route of `choices` (one matrix, by bucket): `[out, in]` when that layout's best
    /// kernel beats cuBLAS over `[in, out]` by the margin at the smallest bucket and stays
    /// within `OUT_IN_SLACK` of it at every bucket.
    fn bf16(choices: &[&Choice]) -> Self {
        let out_in_kernels = [Kernel::CublasOutIn, Kernel::SplitK];
        let best = |c: &Choice| c.fastest(&out_in_kernels);
        let turned =
            choices
                .iter()
                .enumerate()
                .all(|(i, c)| match (best(c), c.median(Kernel::Cublas)) {
                    (Some((_, out_in)), Some(in_out)) => {
                        let factor = if i == 0 { MARGIN } else { OUT_IN_SLACK };
                        out_in <= factor * in_out
                    }
                    _ => false,
                });
        let kernels = choices
            .iter()
            .map(|c| {
                let kernel = match turned {
                    true => best(c).map_or(Kernel::CublasOutIn, |(k, _)| k),
                    false => Kernel::Cublas,
                };
                (c.rows, kernel)
            })
            .collect();
        Self {
            out_in: turned && !choices.is_empty(),
            kernels,
        }
    }
}

/// Every trial measured on one card for one build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelPlan {
    /// What the plan holds for: card, driver, build and matrices (`tune::plan_key`).
    pub key: String,
    /// The card, for people: `NVIDIA H100 80GB HBM3 (compute capability 9.0, driver …)`.
    pub card: String,
    pub choices: Vec<Choice>,
    /// The temporal attention's launches (absent from plans measured before they were).
    #[serde(default)]
    pub attention: Vec<AttentionChoice>,
}

impl KernelPlan {
    /// What runs each measured matrix.
    pub fn routes(&self) -> HashMap<Matrix, Route> {
        let mut by_matrix: HashMap<Matrix, Vec<&Choice>> = HashMap::new();
        for choice in &self.choices {
            by_matrix.entry(choice.matrix).or_default().push(choice);
        }
        by_matrix
            .into_iter()
            .map(|(matrix, mut choices)| {
                choices.sort_by_key(|c| c.rows);
                let route = match matrix.weights {
                    WeightKind::Bf16 => Route::bf16(&choices),
                    WeightKind::Int8 => Route {
                        out_in: false,
                        kernels: choices.iter().map(|c| (c.rows, c.pick_int8())).collect(),
                    },
                };
                (matrix, route)
            })
            .collect()
    }

    /// What leaves the built-in kernels, in one line: `measured on <card>: split-k for int8
    /// 12288x4096 norm at 1 row, …`.
    pub fn summary(&self) -> String {
        let routes = self.routes();
        let mut changed: Vec<(Matrix, usize, Kernel)> = routes
            .iter()
            .flat_map(|(m, r)| r.kernels.iter().map(|&(rows, k)| (*m, rows, k)))
            .filter(|(m, _, k)| *k != m.baseline())
            .collect();
        changed.sort_by_key(|(m, rows, _)| (*m, *rows));
        let unit = |rows: usize| if rows == 1 { "row" } else { "rows" };
        let mut changed: Vec<String> = changed
            .iter()
            .map(|(m, rows, k)| format!("{} for {} at {rows} {}", k.name(), m.label(), unit(*rows)))
            .collect();
        for (ring, route) in attention::routes(&self.attention) {
            for (rows, launch) in route.launches {
                if launch != AttentionLaunch::DEFAULT {
                    changed.push(format!(
                        "{} for the {} at {rows} {}",
                        launch.name(),
                        ring.label(),
                        unit(rows)
                    ));
                }
            }
        }
        match changed.is_empty() {
            true => format!(
                "measured on {}: the built-in kernels won every product",
                self.card
            ),
            false => format!("measured on {}: {}", self.card, changed.join(", ")),
        }
    }

    /// The trials as a table: one line per matrix and bucket, what runs it and the weight
    /// bytes it reads a second, and each trial's median in µs (`*` runs, `x` rejected); then
    /// why each rejected trial was.
    pub fn table(&self) -> String {
        let routes = self.routes();
        let mut text = format!("kernels measured on {}\n", self.card);
        let _ = writeln!(
            text,
            "{:<28} {:>4}  {:<14} {:>6}  trials (median µs; * runs, x rejected)",
            "matrix", "rows", "runs", "GB/s"
        );
        for choice in &self.choices {
            let runs = routes[&choice.matrix].kernel(choice.rows);
            let gb_per_s = match choice.median(runs) {
                Some(us) => format!("{:.0}", choice.matrix.weight_bytes() as f64 / us / 1e3),
                None => "-".into(),
            };
            let trials: Vec<String> = choice
                .trials
                .iter()
                .map(|t| trial_cell(t.kernel.name(), t, t.kernel == runs))
                .collect();
            let _ = writeln!(
                text,
                "{:<28} {:>4}  {:<14} {gb_per_s:>6}  {}",
                choice.matrix.label(),
                choice.rows,
                runs.name(),
                trials.join(", ")
            );
        }
        self.attention_table(&mut text);
        for choice in &self.choices {
            let what = format!("{} at {} rows", choice.matrix.label(), choice.rows);
            let names = choice.trials.iter().map(|t| t.kernel.name().to_owned());
            write_rejections(&mut text, names.zip(&choice.trials), &what);
        }
        for choice in &self.attention {
            let what = format!("the {} at {} rows", choice.ring.label(), choice.rows);
            let names = choice.trials.iter().map(|t| t.kernel.name());
            write_rejections(&mut text, names.zip(&choice.trials), &what);
        }
        text
    }

    /// `table`'s lines for the attention: one per ring and bucket, the launch that runs and the
    /// keys and values it reads a second, and each launch's median.
    fn attention_table(&self, text: &mut String) {
        if self.attention.is_empty() {
            return;
        }
        let routes = attention::routes(&self.attention);
        let _ = writeln!(
            text,
            "{:<28} {:>4}  {:<24} {:>6}  trials (median µs; * runs, x rejected)",
            "attention", "rows", "runs", "GB/s"
        );
        for choice in &self.attention {
            let runs = routes
                .iter()
                .find(|(ring, _)| *ring == choice.ring)
                .map_or(AttentionLaunch::DEFAULT, |(_, route)| {
                    route.launch(choice.rows)
                });
            let bytes = choice.ring.bytes_per_row() * choice.rows;
            let gb_per_s = match choice.median(runs) {
                Some(us) => format!("{:.0}", bytes as f64 / us / 1e3),
                None => "-".into(),
            };
            let trials: Vec<String> = choice
                .trials
                .iter()
                .map(|t| trial_cell(&t.kernel.name(), t, t.kernel == runs))
                .collect();
            let _ = writeln!(
                text,
                "{:<28} {:>4}  {:<24} {gb_per_s:>6}  {}",
                choice.ring.label(),
                choice.rows,
                runs.name(),
                trials.join(", ")
            );
        }
    }
}

/// `rejected NAME for WHAT: why` for each rejected one of `trials` (with their names).
fn write_rejections<'a, K: 'a>(
    text: &mut String,
    trials: impl Iterator<Item = (String, &'a Trial<K>)>,
    what: &str,
) {
    for (name, trial) in trials {
        if let Some(why) = &trial.rejected {
            let _ = writeln!(text, "rejected {name} for {what}: {why}");
        }
    }
}

/// A trial in a plan's table: `name 12.3`, marked `*` where it runs and `x` where rejected.
fn trial_cell<K>(name: &str, trial: &Trial<K>, runs: bool) -> String {
    let mark = match (trial.rejected.is_some(), runs) {
        (true, _) => "x",
        (false, true) => "*",
        (false, false) => "",
    };
    match trial.median_us {
        Some(us) => format!("{name}{mark} {us:.1}"),
        None => format!("{name}{mark} -"),
    }
}

/// An installed plan and its routes, looked up by every product and attention.
pub struct Installed {
    pub plan: KernelPlan,
    routes: HashMap<Matrix, Route>,
    attention: Vec<(Ring, AttentionRoute)>,
}

impl Installed {
    pub fn new(plan: KernelPlan) -> Self {
        let routes = plan.routes();
        let attention = attention::routes(&plan.attention);
        Self {
            plan,
            routes,
            attention,
        }
    }

    /// The attention launch for `rows` rows over a ring stored as `storage` with `heads` heads
    /// of `head_dim`, when such a ring was measured (the one of the nearest capacity: the
    /// measured ring is the model's whole context).
    pub fn attention_launch(
        &self,
        storage: super::quant::KvQuant,
        heads: usize,
        head_dim: usize,
        capacity: usize,
        rows: usize,
    ) -> Option<AttentionLaunch> {
        self.attention
            .iter()
            .filter(|(ring, _)| {
                (ring.storage, ring.heads, ring.head_dim) == (storage, heads, head_dim)
            })
            .min_by_key(|(ring, _)| ring.capacity.abs_diff(capacity))
            .map(|(_, route)| route.launch(rows))
    }

    fn route(&self, weights: WeightKind, n: usize, k: usize, sublayer: Sublayer) -> Option<&Route> {
        self.routes.get(&Matrix {
            weights,
            out_features: n,
            in_features: k,
            sublayer,
        })
    }

    /// The kernel for `rows` rows of an int8 `[n, k]` matrix in `sublayer`, when measured.
    pub fn int8_kernel(
        &self,
        n: usize,
        k: usize,
        sublayer: Sublayer,
        rows: usize,
    ) -> Option<Kernel> {
        self.route(WeightKind::Int8, n, k, sublayer)
            .map(|r| r.kernel(rows))
    }

    /// Whether a bf16 `[n, k]` weight is held `[out, in]`: every measured sublayer of that
    /// shape chose it.
    pub fn bf16_out_in(&self, n: usize, k: usize) -> bool {
        let mut routes = self
            .routes
            .iter()
            .filter(|(m, _)| m.weights == WeightKind::Bf16)
            .filter(|(m, _)| (m.out_features, m.in_features) == (n, k))
            .peekable();
        routes.peek().is_some() && routes.all(|(_, r)| r.out_in)
    }

    /// Whether `rows` rows of a bf16 `[n, k]` weight held `[out, in]` in `sublayer` go to the
    /// split-K kernel.
    pub fn bf16_split_k(&self, n: usize, k: usize, sublayer: Sublayer, rows: usize) -> bool {
        self.route(WeightKind::Bf16, n, k, sublayer)
            .is_some_and(|r| r.out_in && r.kernel(rows) == Kernel::SplitK)
    }
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Makes `plan` the one the model's products ask, for the rest of the process. Install it
/// before the model loads: bf16 weights are laid out by it. A second plan is refused.
pub fn install(plan: KernelPlan) -> Result<(), KernelPlan> {
    INSTALLED
        .set(Installed::new(plan))
        .map_err(|refused| refused.plan)
}

/// The installed plan, if any.
pub fn installed() -> Option<&'static Installed> {
    INSTALLED.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    const QKV: Matrix = Matrix {
        weights: WeightKind::Int8,
        out_features: 12288,
        in_features: 4096,
        sublayer: Sublayer::Norm,
    };
    const HEAD: Matrix = Matrix {
        weights: WeightKind::Bf16,
        out_features: 32000,
        in_features: 4096,
        sublayer: Sublayer::Plain,
    };

    fn trial(kernel: Kernel, median_us: f64) -> Trial {
        Trial::judged(kernel, median_us, 0.001)
    }

    fn choice(matrix: Matrix, rows: usize, trials: Vec<Trial>) -> Choice {
        Choice {
            matrix,
            rows,
            trials,
        }
    }

    fn plan(choices: Vec<Choice>) -> KernelPlan {
        KernelPlan {
            key: "test".into(),
            card: "test card".into(),
            choices,
            attention: Vec::new(),
        }
    }

    fn runs(plan: &KernelPlan, matrix: Matrix, rows: usize) -> Kernel {
        plan.routes()[&matrix].kernel(rows)
    }

    #[test]
    fn the_fastest_agreeing_kernel_runs_only_beyond_the_margin() {
        let int8 = |trials| plan(vec![choice(QKV, 1, trials)]);
        let faster = int8(vec![
            trial(Kernel::Rows, 100.0),
            trial(Kernel::SplitK, 60.0),
        ]);
        assert_eq!(runs(&faster, QKV, 1), Kernel::SplitK);
        let within_noise = int8(vec![
            trial(Kernel::Rows, 100.0),
            trial(Kernel::SplitK, 98.0),
        ]);
        assert_eq!(runs(&within_noise, QKV, 1), Kernel::Rows);
        let wrong = int8(vec![
            trial(Kernel::Rows, 100.0),
            Trial::judged(Kernel::SplitK, 10.0, 0.5),
        ]);
        assert_eq!(runs(&wrong, QKV, 1), Kernel::Rows);
        assert!(
            Trial::judged(Kernel::SplitK, 10.0, f64::NAN)
                .rejected
                .is_some()
        );
        let no_baseline = int8(vec![
            Trial::failed(Kernel::Rows, "launch failed".into()),
            trial(Kernel::SplitK, 10.0),
        ]);
        assert_eq!(runs(&no_baseline, QKV, 1), Kernel::Rows);
    }

    #[test]
    fn tensor_core_products_split_k_until_they_fill_two_blocks_an_sm() {
        // (tiles, k, SMs) -> inputs a block, blocks in all: an H100's 132 SMs (264 blocks at
        // once), then GB10's 48 (96).
        let cases = [
            ((64, 4096, 132), 8 * 128, 256, "out-projection: 4 shares"),
            ((64, 11264, 132), 22 * 128, 256, "the FFN's out-projection"),
            ((192, 4096, 132), 4096, 192, "in-projection: 2 need 384"),
            ((352, 4096, 132), 4096, 352, "the FFN's 352 tiles fill it"),
            ((16, 1024, 132), 256, 64, "depformer: 4 shares of 2 slices"),
            ((16, 1040, 132), 3 * 128, 48, "9 slices: 3 shares of 3"),
            ((1, 16, 132), 128, 1, "less than a slice stays whole"),
            ((40, 4096, 48), 2048, 80, "GB10: two shares"),
            ((64, 4096, 48), 4096, 64, "GB10: two shares would need 128"),
            ((0, 4096, 48), 256, 0, "no tiles: no division by zero"),
        ];
        for ((tiles, k, sms), split_k, blocks, why) in cases {
            let got = mma_split_k(tiles, k, sms);
            assert_eq!((got, tiles * k.div_ceil(got)), (split_k, blocks), "{why}");
        }
    }

    #[test]
    fn candidates_take_every_row_count_of_their_bucket() {
        assert_eq!(
            QKV.candidates(1),
            [Kernel::Rows, Kernel::RowsAhead, Kernel::SplitK]
        );
        assert_eq!(
            QKV.candidates(4),
            [Kernel::Rows, Kernel::RowsAhead, Kernel::SplitK],
            "bucket 4 holds 3 rows, too few for the tensor cores"
        );
        assert_eq!(QKV.candidates(8), [Kernel::Rows, Kernel::TensorCores]);
        assert_eq!(
            HEAD.candidates(2),
            [Kernel::Cublas, Kernel::CublasOutIn, Kernel::SplitK]
        );
        let ragged = Matrix {
            in_features: 4100,
            ..HEAD
        };
        assert_eq!(ragged.candidates(1), [Kernel::Cublas, Kernel::CublasOutIn]);
        let odd_gate = Matrix {
            out_features: 771,
            sublayer: Sublayer::NormGate,
            ..QKV
        };
        assert_eq!(odd_gate.candidates(1), [Kernel::Rows, Kernel::RowsAhead]);
    }

    #[test]
    fn a_lookup_takes_the_smallest_bucket_holding_the_rows_else_the_largest() {
        let plan = plan(vec![
            choice(
                QKV,
                1,
                vec![trial(Kernel::Rows, 9.0), trial(Kernel::SplitK, 5.0)],
            ),
            choice(QKV, 4, vec![trial(Kernel::Rows, 9.0)]),
            choice(
                QKV,
                32,
                vec![trial(Kernel::Rows, 90.0), trial(Kernel::TensorCores, 20.0)],
            ),
        ]);
        let installed = Installed::new(plan);
        let int8 = |n, k, sublayer, rows| installed.int8_kernel(n, k, sublayer, rows);
        assert_eq!(int8(12288, 4096, Sublayer::Norm, 1), Some(Kernel::SplitK));
        assert_eq!(int8(12288, 4096, Sublayer::Norm, 3), Some(Kernel::Rows));
        assert_eq!(
            int8(12288, 4096, Sublayer::Norm, 9),
            Some(Kernel::TensorCores)
        );
        assert_eq!(
            int8(12288, 4096, Sublayer::Norm, 200),
            Some(Kernel::TensorCores),
            "beyond every bucket: the largest"
        );
        assert_eq!(
            int8(12288, 4096, Sublayer::Plain, 1),
            None,
            "another sublayer"
        );
        assert_eq!(int8(4096, 4096, Sublayer::Norm, 1), None, "another matrix");
    }

    fn bf16(rows: usize, cublas: f64, out_in: f64, split_k: Option<f64>) -> Choice {
        let mut trials = vec![
            trial(Kernel::Cublas, cublas),
            trial(Kernel::CublasOutIn, out_in),
        ];
        trials.extend(split_k.map(|t| trial(Kernel::SplitK, t)));
        choice(HEAD, rows, trials)
    }

    #[test]
    fn bf16_weights_turn_when_their_layout_wins_the_smallest_bucket_and_keeps_up() {
        let turned = plan(vec![
            bf16(1, 100.0, 110.0, Some(70.0)),
            bf16(8, 200.0, 204.0, None),
        ]);
        let route = &turned.routes()[&HEAD];
        assert!(route.out_in);
        assert_eq!(route.kernel(1), Kernel::SplitK);
        assert_eq!(
            route.kernel(8),
            Kernel::CublasOutIn,
            "cuBLAS over the turned layout"
        );
        let by_cublas = plan(vec![
            bf16(1, 100.0, 90.0, Some(95.0)),
            bf16(8, 200.0, 190.0, None),
        ]);
        let route = &by_cublas.routes()[&HEAD];
        assert!(route.out_in, "cuBLAS over [out, in] wins alone");
        assert_eq!(route.kernel(1), Kernel::CublasOutIn);
        let slow_beyond = plan(vec![
            bf16(1, 100.0, 110.0, Some(70.0)),
            bf16(8, 200.0, 260.0, None),
        ]);
        let route = &slow_beyond.routes()[&HEAD];
        assert!(!route.out_in);
        assert_eq!(route.kernels, [(1, Kernel::Cublas), (8, Kernel::Cublas)]);
        let within_noise = plan(vec![bf16(1, 100.0, 110.0, Some(99.0))]);
        assert!(!within_noise.routes()[&HEAD].out_in);
        let installed = Installed::new(turned);
        assert!(installed.bf16_out_in(32000, 4096));
        assert!(installed.bf16_split_k(32000, 4096, Sublayer::Plain, 1));
        assert!(!installed.bf16_split_k(32000, 4096, Sublayer::Plain, 8));
        assert!(
            !installed.bf16_split_k(32000, 4096, Sublayer::Norm, 1),
            "not measured"
        );
        assert!(!installed.bf16_out_in(4096, 4096), "not measured");
        let mixed = Installed::new(plan(vec![
            bf16(1, 100.0, 110.0, Some(70.0)),
            choice(
                Matrix {
                    sublayer: Sublayer::Skip,
                    ..HEAD
                },
                1,
                vec![
                    trial(Kernel::Cublas, 100.0),
                    trial(Kernel::CublasOutIn, 150.0),
                ],
            ),
        ]));
        assert!(
            !mixed.bf16_out_in(32000, 4096),
            "one layout per weight: every sublayer of the shape must want it"
        );
    }

    #[test]
    fn the_7b_has_eleven_distinct_matrices_and_its_heads_stay_bf16() {
        let cfg = LmConfig::personaplex_7b();
        let int8 = matrices(&cfg, Quant::Int8);
        assert_eq!(int8.len(), 11);
        assert!(int8.contains(&Matrix {
            weights: WeightKind::Int8,
            out_features: 2 * 11264,
            in_features: 4096,
            sublayer: Sublayer::NormGate,
        }));
        let heads: Vec<_> = int8
            .iter()
            .filter(|m| m.weights == WeightKind::Bf16)
            .map(|m| (m.out_features, m.sublayer))
            .collect();
        assert_eq!(heads, [(32000, Sublayer::Plain), (2048, Sublayer::Plain)]);
        assert!(
            matrices(&cfg, Quant::None)
                .iter()
                .all(|m| m.weights == WeightKind::Bf16)
        );
    }

    #[test]
    fn matrices_and_kernels_parse_back_and_bad_ones_say_why() {
        for matrix in [QKV, HEAD] {
            assert_eq!(Matrix::parse(&matrix.spec()), Ok(matrix));
        }
        for bad in [
            "fp8:1x2:plain",
            "int8:12x:norm",
            "int8:0x16:norm",
            "bf16",
            "bf16:4096",
            "bf16:8x8",
            "bf16:8x8:fused",
            "bf16:8x8:plain:more",
        ] {
            let err = Matrix::parse(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
        for kernel in Kernel::ALL {
            assert_eq!(Kernel::parse(kernel.name()), Ok(kernel));
        }
        assert!(Kernel::parse("cutlass").unwrap_err().contains("split-k"));
    }

    #[test]
    fn a_plan_reads_back_from_json_and_its_table_says_what_runs() {
        let rejected = plan(vec![choice(
            QKV,
            1,
            vec![
                trial(Kernel::Rows, 9.0),
                Trial::judged(Kernel::SplitK, 5.0, 0.5),
            ],
        )]);
        let json = serde_json::to_string(&rejected).unwrap();
        assert_eq!(serde_json::from_str::<KernelPlan>(&json).unwrap(), rejected);
        let table = rejected.table();
        assert!(table.contains("rows* 9.0"), "{table}");
        // 12288 x 4096 bytes and 12288 scales in 9 µs.
        assert!(table.contains(" 5598  rows*"), "{table}");
        assert!(
            table.contains("rejected split-k for int8 12288x4096 norm at 1 rows"),
            "{table}"
        );
        assert!(
            rejected
                .summary()
                .ends_with("the built-in kernels won every product")
        );
        let faster = plan(vec![choice(
            QKV,
            1,
            vec![trial(Kernel::Rows, 9.0), trial(Kernel::SplitK, 5.0)],
        )]);
        assert_eq!(
            faster.summary(),
            "measured on test card: split-k for int8 12288x4096 norm at 1 row"
        );
        let failed = plan(vec![choice(
            QKV,
            1,
            vec![
                trial(Kernel::Rows, 9.0),
                Trial::failed(Kernel::SplitK, "excluded".into()),
            ],
        )]);
        let json = serde_json::to_string(&failed).unwrap();
        assert_eq!(serde_json::from_str::<KernelPlan>(&json).unwrap(), failed);
        assert!(failed.table().contains("split-kx -"), "{}", failed.table());
    }

    fn attention_plan(storage: crate::model::quant::KvQuant) -> KernelPlan {
        let ring = Ring {
            storage,
            heads: 32,
            head_dim: 128,
            capacity: 3000,
        };
        let staged = AttentionLaunch::parse("staged,64,128").unwrap();
        let trials = |staged_us| {
            vec![
                Trial::judged(AttentionLaunch::DEFAULT, 25.0, 0.0),
                Trial::judged(staged, staged_us, 0.001),
                Trial::failed(
                    AttentionLaunch::parse("s2v2,128,128").unwrap(),
                    "left out".into(),
                ),
            ]
        };
        let mut plan = plan(vec![choice(QKV, 1, vec![trial(Kernel::Rows, 9.0)])]);
        plan.attention = vec![
            AttentionChoice {
                ring,
                rows: 1,
                trials: trials(15.0),
            },
            AttentionChoice {
                ring,
                rows: 32,
                trials: trials(30.0),
            },
        ];
        plan
    }

    #[test]
    fn a_plan_routes_the_attention_by_ring_and_rows_and_says_so() {
        use crate::model::quant::KvQuant;
        let plan = attention_plan(KvQuant::None);
        let staged = AttentionLaunch::parse("staged,64,128").unwrap();
        assert_eq!(
            plan.summary(),
            "measured on test card: attention-staged-64-128 for the bf16 ring 32x128x3000 at 1 row"
        );
        let table = plan.table();
        assert!(
            table.contains("bf16 ring 32x128x3000")
                && table.contains("attention-staged-64-128* 15.0"),
            "{table}"
        );
        assert!(
            table.contains(
                "rejected attention-s2v2-128-128 for the bf16 ring 32x128x3000 at 1 rows: left out"
            ),
            "{table}"
        );
        let installed = Installed::new(plan.clone());
        let launch = |storage, heads, capacity, rows| {
            installed.attention_launch(storage, heads, 128, capacity, rows)
        };
        assert_eq!(launch(KvQuant::None, 32, 3000, 1), Some(staged));
        assert_eq!(
            launch(KvQuant::None, 32, 3064, 1),
            Some(staged),
            "the nearest ring"
        );
        assert_eq!(
            launch(KvQuant::None, 32, 3000, 9),
            Some(AttentionLaunch::DEFAULT)
        );
        assert_eq!(
            launch(KvQuant::Int8, 32, 3000, 1),
            None,
            "an int8 ring was not measured"
        );
        assert_eq!(launch(KvQuant::None, 16, 3000, 1), None);
        let json = serde_json::to_string(&plan).unwrap();
        assert!(json.contains("\"attention-staged-64-128\""), "{json}");
        assert_eq!(serde_json::from_str::<KernelPlan>(&json).unwrap(), plan);
    }

    /// A plan kept before plans measured the attention still reads, and changes no launch.
    #[test]
    fn a_plan_without_attention_reads_and_keeps_the_default_launch() {
        let mut plan = attention_plan(crate::model::quant::KvQuant::None);
        plan.attention.clear();
        let mut json: serde_json::Value = serde_json::to_value(&plan).unwrap();
        json.as_object_mut().unwrap().remove("attention");
        let read: KernelPlan = serde_json::from_value(json).unwrap();
        assert_eq!(read, plan);
        let installed = Installed::new(read);
        let launch =
            installed.attention_launch(crate::model::quant::KvQuant::None, 32, 128, 3000, 1);
        assert_eq!(launch, None);
        assert!(!installed.plan.table().contains("ring"));
    }

    #[test]
    fn a_candidate_is_a_product_kernel_or_an_attention_launch_by_name() {
        for candidate in [
            Candidate::Product(Kernel::SplitK),
            Candidate::Product(Kernel::Rows),
            Candidate::Attention(AttentionLaunch::DEFAULT),
            Candidate::Attention(AttentionLaunch::parse("staged,64,256").unwrap()),
        ] {
            assert_eq!(Candidate::parse(&candidate.name()), Ok(candidate));
        }
        assert!(Candidate::Product(Kernel::Rows).is_builtin());
        assert!(Candidate::Attention(AttentionLaunch::DEFAULT).is_builtin());
        assert!(
            !Candidate::Attention(AttentionLaunch::parse("staged,64,128").unwrap()).is_builtin()
        );
        assert_eq!(
            Candidate::Product(Kernel::SplitK).with_kin(),
            [Candidate::Product(Kernel::SplitK)]
        );
        let staged = Candidate::parse("attention-staged-64-128").unwrap();
        let kin: Vec<String> = staged.with_kin().iter().map(Candidate::name).collect();
        assert_eq!(
            kin,
            [
                "attention-staged-64-128",
                "attention-staged-32-128",
                "attention-staged-64-256",
                "attention-stagedjoined-64-128"
            ]
        );
        let joined = Candidate::parse("attention-joined-128-128").unwrap();
        assert!(
            !joined.with_kin().iter().any(Candidate::is_builtin),
            "the default is never left out"
        );
        assert!(Candidate::parse("attention-staged-512-128").is_err());
        assert!(Candidate::parse("fastest").is_err());
    }
}
