//! The kernel plan a model on a GPU runs with (`model::kernel_plan`): measured once per card,
//! driver, build and set of matrices by `duplex tune`, run as a child process so that a kernel
//! that faults cannot take the server's CUDA context down with it, and kept as JSON under
//! `~/.cache/duplex/kernels`. Whatever goes wrong, the model runs with the built-in kernels
//! and the log says why.

use crate::doctor::gpu;
use crate::model::config::LmConfig;
use crate::model::kernel_plan::{self, KernelPlan, Matrix, ROW_BUCKETS};
use crate::model::quant::Quant;
use anyhow::{Context, Result, bail};
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long the child measuring a plan may take before it is killed.
pub const MEASURE_TIMEOUT: Duration = Duration::from_secs(300);

/// What to measure: matrices, each at the row counts the step loop runs up to `max_rows`.
#[derive(Debug, Clone, PartialEq)]
pub struct TuneRequest {
    pub matrices: Vec<Matrix>,
    pub rows: Vec<usize>,
}

impl TuneRequest {
    /// Every matrix of a model with `quant` weights, at the power-of-two row counts up to
    /// `max_rows` (the step loop rounds its rows up to one).
    pub fn for_model(cfg: &LmConfig, quant: Quant, max_rows: usize) -> Self {
        let top = max_rows.clamp(1, ROW_BUCKETS[ROW_BUCKETS.len() - 1]);
        let rows = ROW_BUCKETS
            .iter()
            .copied()
            .take_while(|&r| r < top)
            .chain(ROW_BUCKETS.iter().copied().find(|&r| r >= top))
            .collect();
        Self {
            matrices: kernel_plan::matrices(cfg, quant),
            rows,
        }
    }

    /// The `duplex tune` arguments that measure this request.
    pub fn args(&self) -> Vec<String> {
        let matrices: Vec<String> = self.matrices.iter().map(Matrix::spec).collect();
        let rows: Vec<String> = self.rows.iter().map(usize::to_string).collect();
        vec![
            "tune".into(),
            "--matrices".into(),
            matrices.join(","),
            "--rows".into(),
            rows.join(","),
        ]
    }

    fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (&self.matrices, &self.rows).hash(&mut hasher);
        hasher.finish()
    }
}

/// The first GPU as the driver lists it: `(card for people, part of the cache key)`.
fn card() -> Result<(String, String)> {
    let report = gpu::probe();
    let Some(device) = report.devices.first() else {
        bail!(
            "no CUDA GPU: {}",
            report.problem.as_deref().unwrap_or("the driver lists none")
        );
    };
    let driver = report
        .driver
        .or(report.cuda_driver_version)
        .unwrap_or_default();
    let shown = format!(
        "{} (compute capability {}, driver {driver})",
        device.name, device.compute_capability
    );
    let key = format!(
        "{}-cc{}-driver{driver}",
        device.name, device.compute_capability
    );
    Ok((shown, key))
}

/// The key a plan for `request` holds for on this machine: card, driver, this build's kernels
/// and the request.
fn plan_key(request: &TuneRequest) -> Result<String> {
    let (_, card) = card()?;
    let key = format!(
        "{card}-duplex{}-kernels{:016x}-matrices{:016x}",
        env!("CARGO_PKG_VERSION"),
        kernels_digest()?,
        request.digest()
    );
    Ok(key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect())
}

#[cfg(feature = "cuda")]
fn kernels_digest() -> Result<u64> {
    Ok(crate::model::cuda::product_kernels_digest())
}

#[cfg(not(feature = "cuda"))]
fn kernels_digest() -> Result<u64> {
    bail!("this build has no CUDA support: build with `cargo build --release --features cuda`")
}

/// Where plans are kept: `~/.cache/duplex/kernels`.
pub fn cache_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("duplex").join("kernels")
}

fn plan_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.json"))
}

/// Measures `request` on `device` in this process (`duplex tune`) and keeps the plan in
/// `dir`; returns it and where it was written.
pub fn measure_and_keep(
    device: &Device,
    request: &TuneRequest,
    dir: &Path,
) -> Result<(KernelPlan, PathBuf)> {
    if !device.is_cuda() {
        bail!("kernels are measured on a CUDA GPU; this one is {device:?}");
    }
    let key = plan_key(request)?;
    let (card, _) = card()?;
    let plan = measure(device, request, key.clone(), card)?;
    let path = plan_path(dir, &key);
    write_plan(&path, &plan)?;
    Ok((plan, path))
}

#[cfg(feature = "cuda")]
fn measure(
    device: &Device,
    request: &TuneRequest,
    key: String,
    card: String,
) -> Result<KernelPlan> {
    Ok(kernel_plan::measure::measure(
        device,
        &request.matrices,
        &request.rows,
        key,
        card,
    )?)
}

#[cfg(not(feature = "cuda"))]
fn measure(_: &Device, _: &TuneRequest, _: String, _: String) -> Result<KernelPlan> {
    bail!("this build has no CUDA support: build with `cargo build --release --features cuda`")
}

/// Writes `plan` to `path` whole or not at all.
fn write_plan(path: &Path, plan: &KernelPlan) -> Result<()> {
    let dir = path.parent().context("a plan's path has a folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let partial = path.with_extension("json.partial");
    std::fs::write(&partial, serde_json::to_string_pretty(plan)?)
        .with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The plan kept at `path`, if there is one for `key`; an unreadable one is reported and
/// measured again.
pub fn read_plan(path: &Path, key: &str) -> Option<KernelPlan> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str::<KernelPlan>(&text) {
        Ok(plan) if plan.key == key => Some(plan),
        Ok(plan) => {
            tracing::warn!(path = %path.display(), "the kept kernel plan is for {:?}, not this machine: measuring again", plan.key);
            None
        }
        Err(err) => {
            tracing::warn!(path = %path.display(), "the kept kernel plan is unreadable ({err}): measuring again");
            None
        }
    }
}

/// Installs the plan for `request` on `device`, kept or measured by a child `duplex tune`, so
/// the model about to load uses the kernels measured fastest on this card. On the CPU this
/// does nothing; when no plan can be had, the log says why and the built-in kernels run.
pub fn prepare(device: &Device, request: &TuneRequest) {
    if !device.is_cuda() {
        return;
    }
    match kept_or_measured(request, &cache_dir()) {
        Ok(plan) => {
            let changed = plan
                .choices
                .iter()
                .filter(|c| c.kernel != c.matrix.baseline())
                .count();
            tracing::info!(
                "kernel plan for {}: {changed} of {} products leave the built-in kernel (`duplex tune` prints the table)",
                plan.card,
                plan.choices.len()
            );
            if kernel_plan::install(plan).is_err() {
                tracing::warn!("a kernel plan was already installed: keeping it");
            }
        }
        Err(err) => tracing::warn!("no kernel plan ({err:#}): the built-in kernels run"),
    }
}

fn kept_or_measured(request: &TuneRequest, dir: &Path) -> Result<KernelPlan> {
    let key = plan_key(request)?;
    let path = plan_path(dir, &key);
    if let Some(plan) = read_plan(&path, &key) {
        return Ok(plan);
    }
    tracing::info!(
        "measuring this card's kernels once (at most {} s; kept in {})",
        MEASURE_TIMEOUT.as_secs(),
        path.display()
    );
    let exe = std::env::current_exe().context("finding this program to run `duplex tune`")?;
    let mut child = Command::new(exe);
    child.args(request.args());
    run_child(child, MEASURE_TIMEOUT)?;
    read_plan(&path, &key).with_context(|| {
        format!(
            "`duplex tune` succeeded but left no plan at {}",
            path.display()
        )
    })
}

/// Runs `command` (its output goes to ours) and waits at most `timeout` for it to succeed.
pub fn run_child(mut command: Command, timeout: Duration) -> Result<()> {
    let shown = format!("{command:?}");
    let mut child = command
        .stdin(std::process::Stdio::null())
        // Its table goes to our log, not our standard output (which may carry a report).
        .stdout(std::io::stderr())
        .spawn()
        .with_context(|| format!("starting {shown}"))?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if status.success() {
                return Ok(());
            }
            bail!("{shown} failed: {status}");
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{shown} took longer than {} s and was stopped",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernel_plan::{Choice, Kernel, Trial, WeightKind};

    #[test]
    fn a_request_covers_the_row_buckets_up_to_the_first_holding_the_sessions() {
        let cfg = LmConfig::personaplex_7b();
        let rows = |max| TuneRequest::for_model(&cfg, Quant::Int8, max).rows;
        assert_eq!(rows(1), [1]);
        assert_eq!(rows(5), [1, 2, 4, 8]);
        assert_eq!(rows(64), [1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(rows(500), [1, 2, 4, 8, 16, 32, 64]);
        let request = TuneRequest::for_model(&cfg, Quant::Int8, 2);
        let args = request.args();
        assert_eq!(args[..2], ["tune", "--matrices"]);
        assert!(
            args[2].starts_with("int8:12288x4096,int8:4096x4096,"),
            "{}",
            args[2]
        );
        assert_eq!(args[3..], ["--rows", "1,2"]);
    }

    fn plan(key: &str) -> KernelPlan {
        let matrix = Matrix {
            weights: WeightKind::Int8,
            out_features: 64,
            in_features: 32,
        };
        KernelPlan {
            key: key.into(),
            card: "test".into(),
            choices: vec![Choice::pick(
                matrix,
                1,
                vec![Trial::judged(Kernel::Rows, 3.0, 0.0)],
            )],
        }
    }

    #[test]
    fn a_kept_plan_is_used_only_for_its_own_key_and_a_broken_one_is_measured_again() {
        let dir = std::env::temp_dir().join(format!("duplex-plan-{}", std::process::id()));
        let path = plan_path(&dir, "card-a");
        assert_eq!(read_plan(&path, "card-a"), None, "nothing kept yet");
        write_plan(&path, &plan("card-a")).unwrap();
        assert_eq!(read_plan(&path, "card-a"), Some(plan("card-a")));
        assert_eq!(read_plan(&path, "card-b"), None, "another card's plan");
        std::fs::write(&path, "{\"key\": \"card-a\", \"choices\": [").unwrap();
        assert_eq!(read_plan(&path, "card-a"), None, "a truncated file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_child_that_fails_or_hangs_is_an_error_and_a_hung_one_is_stopped() {
        let mut fails = Command::new("sh");
        fails.args(["-c", "exit 3"]);
        let err = run_child(fails, Duration::from_secs(10)).unwrap_err();
        assert!(format!("{err:#}").contains("exit status: 3"), "{err:#}");
        let mut hangs = Command::new("sleep");
        hangs.arg("30");
        let started = Instant::now();
        let err = run_child(hangs, Duration::from_millis(300)).unwrap_err();
        assert!(format!("{err:#}").contains("was stopped"), "{err:#}");
        assert!(started.elapsed() < Duration::from_secs(10));
        run_child(Command::new("true"), Duration::from_secs(10)).unwrap();
        let missing = Command::new("/nonexistent/duplex");
        let err = run_child(missing, Duration::from_secs(1)).unwrap_err();
        assert!(format!("{err:#}").contains("starting"), "{err:#}");
    }

    #[test]
    fn on_the_cpu_nothing_is_measured_or_installed() {
        prepare(
            &Device::Cpu,
            &TuneRequest::for_model(&LmConfig::mid(), Quant::None, 4),
        );
        assert!(kernel_plan::installed().is_none());
        let err = measure_and_keep(
            &Device::Cpu,
            &TuneRequest::for_model(&LmConfig::mid(), Quant::None, 4),
            &std::env::temp_dir(),
        )
        .unwrap_err();
        assert!(format!("{err}").contains("CUDA GPU"), "{err}");
    }
}
