//! Which kernel runs each of the language model's matrix products on the GPU at hand.
//!
//! The fastest kernel depends on the card: HBM3 at 3 TB/s on an H100 and LPDDR5x at 273 GB/s
//! on DGX Spark reward different shapes of work. So every candidate for every matrix of the
//! model and every row bucket is timed on the card itself, its output compared with the
//! built-in kernel's, and the fastest one that agrees is kept (`measure`, run by `duplex tune`).
//! A plan is installed once, before the model loads; `nn` and `cuda` ask it, and without one
//! they use the built-in kernels.

#[cfg(feature = "cuda")]
pub mod measure;

use super::config::LmConfig;
use super::quant::Quant;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::sync::OnceLock;

/// The most rows the split-K kernels (kernels/gemv.cu) take.
pub const GEMV_MAX_ROWS: usize = 4;
/// Rows from which the tensor-core w8a16 kernel is a candidate.
pub const W8A16_MMA_MIN_ROWS: usize = 4;
/// The row counts a plan is measured at: the step loop runs a power of two of rows.
pub const ROW_BUCKETS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];
/// A candidate whose output differs from the baseline's by more than this fraction of the
/// baseline's largest magnitude is wrong, not merely summed in another order.
pub const TOLERANCE: f64 = 0.02;
/// A candidate replaces the built-in kernel only when its median is at most this fraction of
/// the built-in one's: closer than that is timing noise.
pub const MARGIN: f64 = 0.97;
/// With bf16 weights held `[out, in]` for the split-K kernel, the products beyond its rows go
/// to cuBLAS transposed; that layout is kept only when those stay within this factor.
pub const OUT_IN_SLACK: f64 = 1.05;

/// Whether the split-K kernels take `rows` rows of `k` inputs with weights of `weight_bytes`:
/// 1 to 4 rows, and rows in whole 16-byte loads.
pub fn gemv_takes(rows: usize, k: usize, weight_bytes: usize) -> bool {
    (1..=GEMV_MAX_ROWS).contains(&rows) && k.is_multiple_of(16 / weight_bytes)
}

/// How a matrix's weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightKind {
    Bf16,
    Int8,
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
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cublas => "cublas",
            Self::CublasOutIn => "cublas-out-in",
            Self::SplitK => "split-k",
            Self::Rows => "rows",
            Self::TensorCores => "tensor-cores",
        }
    }
}

/// One matrix of the model: `[out_features, in_features]`, as PyTorch holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Matrix {
    pub weights: WeightKind,
    pub out_features: usize,
    pub in_features: usize,
}

impl Matrix {
    /// The built-in kernel, every candidate's reference.
    pub fn baseline(&self) -> Kernel {
        match self.weights {
            WeightKind::Bf16 => Kernel::Cublas,
            WeightKind::Int8 => Kernel::Rows,
        }
    }

    /// The kernels that can run `rows` rows of this matrix, the baseline first.
    pub fn candidates(&self, rows: usize) -> Vec<Kernel> {
        let k = self.in_features;
        match self.weights {
            WeightKind::Bf16 => {
                let mut kernels = vec![Kernel::Cublas, Kernel::CublasOutIn];
                if gemv_takes(rows, k, 2) {
                    kernels.push(Kernel::SplitK);
                }
                kernels
            }
            WeightKind::Int8 => {
                let mut kernels = vec![Kernel::Rows];
                if gemv_takes(rows, k, 1) {
                    kernels.push(Kernel::SplitK);
                }
                if rows >= W8A16_MMA_MIN_ROWS {
                    kernels.push(Kernel::TensorCores);
                }
                kernels
            }
        }
    }

    /// `bf16 12288x4096`.
    pub fn label(&self) -> String {
        let kind = match self.weights {
            WeightKind::Bf16 => "bf16",
            WeightKind::Int8 => "int8",
        };
        format!("{kind} {}x{}", self.out_features, self.in_features)
    }

    /// Parses `label`'s form with a colon: `int8:12288x4096`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a matrix like bf16:12288x4096 or int8:4096x4096");
        let (kind, dims) = text.split_once(':').ok_or_else(bad)?;
        let weights = match kind {
            "bf16" => WeightKind::Bf16,
            "int8" => WeightKind::Int8,
            _ => return Err(bad()),
        };
        let (out, input) = dims.split_once('x').ok_or_else(bad)?;
        let parse = |s: &str| s.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(bad);
        Ok(Self {
            weights,
            out_features: parse(out)?,
            in_features: parse(input)?,
        })
    }

    /// The form `parse` reads.
    pub fn spec(&self) -> String {
        self.label().replace(' ', ":")
    }
}

/// The distinct matrices of a language model's products with `quant` weights: the temporal
/// transformer's and the depformer's (quantised as asked) and the output heads (bf16 always).
pub fn matrices(cfg: &LmConfig, quant: Quant) -> Vec<Matrix> {
    let quantised = match quant {
        Quant::None => WeightKind::Bf16,
        Quant::Int8 => WeightKind::Int8,
    };
    let (d, h) = (cfg.dim, cfg.hidden());
    let (dd, dh) = (cfg.depformer_dim, cfg.depformer_hidden());
    let shaped = |weights, out_features, in_features| Matrix {
        weights,
        out_features,
        in_features,
    };
    let all = [
        shaped(quantised, 3 * d, d),
        shaped(quantised, d, d),
        shaped(quantised, 2 * h, d),
        shaped(quantised, d, h),
        shaped(WeightKind::Bf16, cfg.text_card, d),
        shaped(quantised, dd, d),
        shaped(quantised, 3 * dd, dd),
        shaped(quantised, dd, dd),
        shaped(quantised, 2 * dh, dd),
        shaped(quantised, dd, dh),
        shaped(WeightKind::Bf16, cfg.card, dd),
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
pub struct Trial {
    pub kernel: Kernel,
    /// Absent when it could not run.
    pub median_us: Option<f64>,
    /// The largest difference from the baseline's output over the baseline's largest magnitude
    /// (absent when it could not run, or was not finite).
    pub error: Option<f64>,
    /// Why it may not run this product (too far from the baseline, or it failed).
    pub rejected: Option<String>,
}

impl Trial {
    /// A trial that ran: rejected when its `error` is not finite or beyond `TOLERANCE`.
    pub fn judged(kernel: Kernel, median_us: f64, error: f64) -> Self {
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
    pub fn failed(kernel: Kernel, why: String) -> Self {
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

/// The kernel kept for `rows` rows of a matrix, and every trial behind the choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    pub matrix: Matrix,
    pub rows: usize,
    pub kernel: Kernel,
    pub trials: Vec<Trial>,
}

impl Choice {
    /// Keeps the fastest trial that agrees with the baseline, if it beats the baseline by the
    /// margin; else the baseline.
    pub fn pick(matrix: Matrix, rows: usize, trials: Vec<Trial>) -> Self {
        let baseline = matrix.baseline();
        let base = trials
            .iter()
            .find(|t| t.kernel == baseline)
            .and_then(Trial::accepted_median);
        let kernel = match base {
            // Without a working baseline nothing can be judged: keep the built-in kernel.
            None => baseline,
            Some(base) => trials
                .iter()
                .filter_map(|t| Some((t.kernel, t.accepted_median()?)))
                .filter(|&(kernel, median)| kernel == baseline || median <= MARGIN * base)
                .min_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(baseline, |(kernel, _)| kernel),
        };
        Self {
            matrix,
            rows,
            kernel,
            trials,
        }
    }

    fn median(&self, kernel: Kernel) -> Option<f64> {
        self.trials
            .iter()
            .find(|t| t.kernel == kernel)
            .and_then(Trial::accepted_median)
    }
}

/// Every choice measured on one card for one build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelPlan {
    /// What the plan holds for: card, driver, build and matrices (`tune::plan_key`).
    pub key: String,
    /// The card, for people: `NVIDIA H100 80GB HBM3 (sm_90)`.
    pub card: String,
    pub choices: Vec<Choice>,
}

impl KernelPlan {
    /// The choice for `rows` rows of a matrix: the smallest measured bucket that holds them.
    fn choice(&self, weights: WeightKind, n: usize, k: usize, rows: usize) -> Option<&Choice> {
        self.choices
            .iter()
            .filter(|c| c.matrix.weights == weights)
            .filter(|c| (c.matrix.out_features, c.matrix.in_features) == (n, k))
            .filter(|c| c.rows >= rows)
            .min_by_key(|c| c.rows)
    }

    /// The kernel for `rows` rows of an int8 `[n, k]` matrix, when the plan measured it.
    pub fn int8_kernel(&self, n: usize, k: usize, rows: usize) -> Option<Kernel> {
        self.choice(WeightKind::Int8, n, k, rows).map(|c| c.kernel)
    }

    /// Whether a bf16 `[n, k]` matrix is held `[out, in]` for the split-K kernel: when that
    /// kernel wins a single row, and cuBLAS over that layout stays within `OUT_IN_SLACK` of
    /// the `[in, out]` one wherever the split-K kernel cannot run.
    pub fn bf16_out_in(&self, n: usize, k: usize) -> bool {
        let Some(single) = self.choice(WeightKind::Bf16, n, k, 1) else {
            return false;
        };
        if single.rows != 1 || single.kernel != Kernel::SplitK {
            return false;
        }
        self.choices
            .iter()
            .filter(|c| c.matrix == single.matrix && c.kernel != Kernel::SplitK)
            .all(
                |c| match (c.median(Kernel::CublasOutIn), c.median(Kernel::Cublas)) {
                    (Some(out_in), Some(in_out)) => out_in <= OUT_IN_SLACK * in_out,
                    _ => false,
                },
            )
    }

    /// Whether `rows` rows of a bf16 `[n, k]` matrix held `[out, in]` go to the split-K kernel.
    pub fn bf16_split_k(&self, n: usize, k: usize, rows: usize) -> bool {
        self.choice(WeightKind::Bf16, n, k, rows)
            .is_some_and(|c| c.kernel == Kernel::SplitK)
    }

    /// The choices that leave the built-in kernel, in one line: `measured on <card>: split-k for
    /// int8 12288x4096 at 1 row, …`.
    pub fn summary(&self) -> String {
        let changed: Vec<String> = self
            .choices
            .iter()
            .filter(|c| c.kernel != c.matrix.baseline())
            .map(|c| {
                let rows = if c.rows == 1 { "row" } else { "rows" };
                format!(
                    "{} for {} at {} {rows}",
                    c.kernel.name(),
                    c.matrix.label(),
                    c.rows
                )
            })
            .collect();
        match changed.is_empty() {
            true => format!(
                "measured on {}: the built-in kernels won every product",
                self.card
            ),
            false => format!("measured on {}: {}", self.card, changed.join(", ")),
        }
    }

    /// The choices as a table: one line per matrix and rows, each trial's median in µs, the
    /// kept one starred, rejected ones with an `x`.
    pub fn table(&self) -> String {
        let mut text = format!("kernels measured on {}\n", self.card);
        let _ = writeln!(
            text,
            "{:<18} {:>4}  {:<14} trials (median µs; * kept, x rejected)",
            "matrix", "rows", "kept"
        );
        for choice in &self.choices {
            let trials: Vec<String> = choice
                .trials
                .iter()
                .map(|t| {
                    let mark = if t.rejected.is_some() {
                        "x"
                    } else if t.kernel == choice.kernel {
                        "*"
                    } else {
                        ""
                    };
                    match t.median_us {
                        Some(us) => format!("{}{mark} {us:.1}", t.kernel.name()),
                        None => format!("{}{mark} -", t.kernel.name()),
                    }
                })
                .collect();
            let _ = writeln!(
                text,
                "{:<18} {:>4}  {:<14} {}",
                choice.matrix.label(),
                choice.rows,
                choice.kernel.name(),
                trials.join(", ")
            );
        }
        for choice in &self.choices {
            for trial in &choice.trials {
                if let Some(why) = &trial.rejected {
                    let _ = writeln!(
                        text,
                        "rejected {} for {} at {} rows: {why}",
                        trial.kernel.name(),
                        choice.matrix.label(),
                        choice.rows
                    );
                }
            }
        }
        text
    }
}

static INSTALLED: OnceLock<KernelPlan> = OnceLock::new();

/// Makes `plan` the one the model's products ask, for the rest of the process. Install it
/// before the model loads: bf16 weights are laid out by it. A second plan is refused.
pub fn install(plan: KernelPlan) -> Result<(), KernelPlan> {
    INSTALLED.set(plan)
}

/// The installed plan, if any.
pub fn installed() -> Option<&'static KernelPlan> {
    INSTALLED.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    const QKV: Matrix = Matrix {
        weights: WeightKind::Int8,
        out_features: 12288,
        in_features: 4096,
    };
    const HEAD: Matrix = Matrix {
        weights: WeightKind::Bf16,
        out_features: 32000,
        in_features: 4096,
    };

    fn trial(kernel: Kernel, median_us: f64) -> Trial {
        Trial::judged(kernel, median_us, 0.001)
    }

    #[test]
    fn the_fastest_agreeing_kernel_is_kept_only_beyond_the_margin() {
        let faster = Choice::pick(
            QKV,
            1,
            vec![trial(Kernel::Rows, 100.0), trial(Kernel::SplitK, 60.0)],
        );
        assert_eq!(faster.kernel, Kernel::SplitK);
        let within_noise = Choice::pick(
            QKV,
            1,
            vec![trial(Kernel::Rows, 100.0), trial(Kernel::SplitK, 98.0)],
        );
        assert_eq!(within_noise.kernel, Kernel::Rows);
        let wrong = Choice::pick(
            QKV,
            1,
            vec![
                trial(Kernel::Rows, 100.0),
                Trial::judged(Kernel::SplitK, 10.0, 0.5),
            ],
        );
        assert_eq!(wrong.kernel, Kernel::Rows);
        let not_finite = Trial::judged(Kernel::SplitK, 10.0, f64::NAN);
        assert!(not_finite.rejected.is_some());
        let no_baseline = Choice::pick(
            QKV,
            8,
            vec![
                Trial::failed(Kernel::Rows, "launch failed".into()),
                trial(Kernel::TensorCores, 10.0),
            ],
        );
        assert_eq!(no_baseline.kernel, Kernel::Rows);
    }

    #[test]
    fn candidates_follow_each_kernels_limits() {
        assert_eq!(
            QKV.candidates(1),
            [Kernel::Rows, Kernel::SplitK],
            "no tensor cores for one row"
        );
        assert_eq!(
            QKV.candidates(4),
            [Kernel::Rows, Kernel::SplitK, Kernel::TensorCores]
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
    }

    fn plan(choices: Vec<Choice>) -> KernelPlan {
        KernelPlan {
            key: "test".into(),
            card: "test card".into(),
            choices,
        }
    }

    #[test]
    fn a_lookup_takes_the_smallest_bucket_holding_the_rows() {
        let plan = plan(vec![
            Choice::pick(
                QKV,
                1,
                vec![trial(Kernel::Rows, 9.0), trial(Kernel::SplitK, 5.0)],
            ),
            Choice::pick(QKV, 4, vec![trial(Kernel::Rows, 9.0)]),
            Choice::pick(
                QKV,
                32,
                vec![trial(Kernel::Rows, 90.0), trial(Kernel::TensorCores, 20.0)],
            ),
        ]);
        assert_eq!(plan.int8_kernel(12288, 4096, 1), Some(Kernel::SplitK));
        assert_eq!(plan.int8_kernel(12288, 4096, 3), Some(Kernel::Rows));
        assert_eq!(plan.int8_kernel(12288, 4096, 9), Some(Kernel::TensorCores));
        assert_eq!(
            plan.int8_kernel(12288, 4096, 33),
            None,
            "beyond every bucket"
        );
        assert_eq!(plan.int8_kernel(4096, 4096, 1), None, "another matrix");
    }

    #[test]
    fn bf16_weights_turn_only_when_split_k_wins_one_row_and_cublas_keeps_up() {
        let bf16 = |rows, cublas, out_in, split_k: Option<f64>| {
            let mut trials = vec![
                trial(Kernel::Cublas, cublas),
                trial(Kernel::CublasOutIn, out_in),
            ];
            trials.extend(split_k.map(|t| trial(Kernel::SplitK, t)));
            Choice::pick(HEAD, rows, trials)
        };
        let turned = plan(vec![
            bf16(1, 100.0, 110.0, Some(70.0)),
            bf16(8, 200.0, 204.0, None),
        ]);
        assert!(turned.bf16_out_in(32000, 4096));
        assert!(turned.bf16_split_k(32000, 4096, 1));
        assert!(!turned.bf16_split_k(32000, 4096, 8));
        let slow_beyond = plan(vec![
            bf16(1, 100.0, 110.0, Some(70.0)),
            bf16(8, 200.0, 260.0, None),
        ]);
        assert!(!slow_beyond.bf16_out_in(32000, 4096));
        let cublas_wins = plan(vec![bf16(1, 100.0, 110.0, Some(99.0))]);
        assert!(!cublas_wins.bf16_out_in(32000, 4096));
        assert!(!plan(vec![]).bf16_out_in(32000, 4096));
    }

    #[test]
    fn the_7b_has_eleven_distinct_matrices_and_its_heads_stay_bf16() {
        let cfg = LmConfig::personaplex_7b();
        let int8 = matrices(&cfg, Quant::Int8);
        assert_eq!(int8.len(), 11);
        assert!(int8.contains(&Matrix {
            weights: WeightKind::Int8,
            out_features: 2 * 11264,
            in_features: 4096
        }));
        let heads: Vec<_> = int8
            .iter()
            .filter(|m| m.weights == WeightKind::Bf16)
            .map(|m| m.out_features)
            .collect();
        assert_eq!(heads, [32000, 2048]);
        assert!(
            matrices(&cfg, Quant::None)
                .iter()
                .all(|m| m.weights == WeightKind::Bf16)
        );
    }

    #[test]
    fn matrices_parse_back_from_their_spec_and_bad_specs_say_why() {
        for matrix in [QKV, HEAD] {
            assert_eq!(Matrix::parse(&matrix.spec()), Ok(matrix));
        }
        for bad in ["fp8:1x2", "int8:12x", "int8:0x16", "bf16", "bf16:4096"] {
            let err = Matrix::parse(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn a_plan_reads_back_from_json_and_its_table_names_rejections() {
        let plan = plan(vec![Choice::pick(
            QKV,
            1,
            vec![
                trial(Kernel::Rows, 9.0),
                Trial::judged(Kernel::SplitK, 5.0, 0.5),
            ],
        )]);
        let json = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<KernelPlan>(&json).unwrap(), plan);
        let table = plan.table();
        assert!(table.contains("rows* 9.0"), "{table}");
        assert!(
            plan.summary()
                .ends_with("the built-in kernels won every product")
        );
        let faster = KernelPlan {
            choices: vec![Choice::pick(
                QKV,
                1,
                vec![trial(Kernel::Rows, 9.0), trial(Kernel::SplitK, 5.0)],
            )],
            ..plan.clone()
        };
        assert_eq!(
            faster.summary(),
            "measured on test card: split-k for int8 12288x4096 at 1 row"
        );
        assert!(
            table.contains("rejected split-k for int8 12288x4096 at 1 rows"),
            "{table}"
        );
    }
}
