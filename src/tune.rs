//! The kernel plan a model on a GPU runs with (`model::kernel_plan`): measured once per card,
//! driver, build and set of matrices by `duplex tune`, run as a child process so that a kernel
//! that faults cannot take the server's CUDA context down with it, and kept as JSON under
//! `~/.cache/duplex/kernels`. Whatever goes wrong, the model runs with the built-in kernels
//! and the log says why.

use crate::doctor::{Check, Status, gpu};
use crate::model::config::LmConfig;
use crate::model::kernel_plan::attention::Ring;
use crate::model::kernel_plan::{self, Candidate, KernelPlan, Matrix, ROW_BUCKETS, TrialTrace};
use crate::model::quant::{KvQuant, Quant};
use anyhow::{Context, Result, bail};
use candle_core::Device;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long the child measuring a plan may take before it is killed.
pub const MEASURE_TIMEOUT: Duration = Duration::from_secs(300);

/// What to measure: matrices and the temporal attention's rings, each at the row counts the
/// step loop runs up to `max_rows`.
#[derive(Debug, Clone, PartialEq)]
pub struct TuneRequest {
    pub matrices: Vec<Matrix>,
    pub rings: Vec<Ring>,
    pub rows: Vec<usize>,
}

impl TuneRequest {
    /// Every matrix of a model with `quant` weights and its temporal ring of keys and values
    /// stored as `kv_quant` (over its whole context, as the replayed step reads it), at the
    /// power-of-two row counts up to `max_rows` (the step loop rounds its rows up to one).
    pub fn for_model(cfg: &LmConfig, quant: Quant, kv_quant: KvQuant, max_rows: usize) -> Self {
        let top = max_rows.clamp(1, ROW_BUCKETS[ROW_BUCKETS.len() - 1]);
        let rows = ROW_BUCKETS
            .iter()
            .copied()
            .take_while(|&r| r < top)
            .chain(ROW_BUCKETS.iter().copied().find(|&r| r >= top))
            .collect();
        let rings = crate::model::decode::head_dim_fits(cfg.head_dim())
            .then_some(Ring {
                storage: kv_quant,
                heads: cfg.num_heads,
                head_dim: cfg.head_dim(),
                capacity: cfg.context,
            })
            .into_iter()
            .collect();
        Self {
            matrices: kernel_plan::matrices(cfg, quant),
            rings,
            rows,
        }
    }

    /// The `duplex tune` arguments that measure this request.
    pub fn args(&self) -> Vec<String> {
        let matrices: Vec<String> = self.matrices.iter().map(Matrix::spec).collect();
        let rows: Vec<String> = self.rows.iter().map(usize::to_string).collect();
        let mut args = vec![
            "tune".into(),
            "--matrices".into(),
            matrices.join(","),
            "--rows".into(),
            rows.join(","),
        ];
        if !self.rings.is_empty() {
            let rings: Vec<String> = self.rings.iter().map(Ring::spec).collect();
            args.extend(["--rings".into(), rings.join(",")]);
        }
        args
    }

    fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (&self.matrices, &self.rings, &self.rows).hash(&mut hasher);
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

/// The key a plan for `request` holds for on this machine: `key_prefix`, and the request.
pub fn plan_key(request: &TuneRequest, exe: &Path) -> Result<String> {
    Ok(format!(
        "{}-matrices{:016x}",
        key_prefix(exe)?,
        request.digest()
    ))
}

/// What every plan key on this machine starts with: the card and driver, the program `exe`
/// (its size and time: any rebuild, whatever it changed) and this build's kernels.
fn key_prefix(exe: &Path) -> Result<String> {
    let (_, card) = card()?;
    let meta = std::fs::metadata(exe).with_context(|| format!("reading {}", exe.display()))?;
    let built = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let prefix = format!(
        "{card}-duplex{}-exe{:x}.{built:x}-kernels{:016x}",
        env!("CARGO_PKG_VERSION"),
        meta.len(),
        kernels_digest()?,
    );
    Ok(prefix
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

/// What `duplex doctor` says of the kernel plans kept for this card and program: the plans,
/// or a remembered failure, or none yet. `None` where no plan applies (a CPU build, no GPU).
pub fn doctor_check(exe: &Path, dir: &Path) -> Option<Check> {
    if !cfg!(feature = "cuda") {
        return None;
    }
    Some(kept_for(dir, &key_prefix(exe).ok()?))
}

/// The plans and failures kept in `dir` under keys starting with `prefix`, as a doctor's check.
fn kept_for(dir: &Path, prefix: &str) -> Check {
    let (mut plans, mut failures) = (Vec::new(), Vec::new());
    let entries = std::fs::read_dir(dir).into_iter().flatten().flatten();
    for path in entries.map(|entry| entry.path()) {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if !name.is_some_and(|n| n.starts_with(prefix)) {
            continue;
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("failed") => failures.extend(std::fs::read_to_string(&path).ok()),
            Some("json") => plans.extend(
                std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|text| serde_json::from_str::<KernelPlan>(&text).ok())
                    .map(|plan| plan.summary()),
            ),
            _ => {}
        }
    }
    let (status, detail, fix) = match (failures.first(), plans.is_empty()) {
        (Some(why), _) => (
            Status::Warn,
            format!(
                "measuring this GPU's kernels failed, so the built-in kernels run: {}",
                why.trim()
            ),
            Some(
                "run `duplex tune --quant none|int8 --kv-quant none|int8 --max-rows N` (as you \
                 serve, N your --max-sessions) to measure again"
                    .to_owned(),
            ),
        ),
        (None, true) => (
            Status::Ok,
            "none kept for this GPU and program yet: the first start on the GPU measures one"
                .into(),
            None,
        ),
        (None, false) => (Status::Ok, plans.join("; "), None),
    };
    Check {
        name: "plan",
        status,
        detail,
        fix,
    }
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
    crate::cache_dir().join("kernels")
}

fn plan_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.json"))
}

/// Where a failed measurement of `key` is remembered, so that a kernel that takes the process
/// down is not run again at every start.
fn failure_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.failed"))
}

/// The reason given in a trial of a kernel left out because it stopped an earlier measurement.
pub const EXCLUDED: &str = "left out: it stopped an earlier measurement on this card";

/// Measures `request` on `device` in this process (`duplex tune`), without the `excluded`
/// kernels, appending `kernel matrix rows` to `progress` before each trial and `done` after
/// it.
pub fn measure_here(
    device: &Device,
    request: &TuneRequest,
    excluded: &[Candidate],
    progress: Option<&Path>,
) -> Result<KernelPlan> {
    if !device.is_cuda() {
        bail!("kernels are measured on a CUDA GPU; this one is {device:?}");
    }
    let exe = std::env::current_exe().context("finding this program")?;
    let key = plan_key(request, &exe)?;
    let (card, _) = card()?;
    let mut trace = match progress {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?,
        ),
        None => None,
    };
    let mut mark = |trial: Option<(Candidate, &str, usize)>| {
        if let Some(file) = trace.as_mut() {
            use std::io::Write;
            // Unbuffered and synced: the line must survive the process dying in the trial.
            let _ = match trial {
                Some((candidate, what, rows)) => {
                    writeln!(file, "{} {what} {rows}", candidate.name())
                }
                None => writeln!(file, "{TRIAL_DONE}"),
            };
            let _ = file.sync_data();
        }
    };
    let excluded: Vec<(Candidate, String)> =
        excluded.iter().map(|&k| (k, EXCLUDED.into())).collect();
    measure(device, request, &excluded, &mut mark, key, card)
}

/// A progress line: the trial traced before it is over.
const TRIAL_DONE: &str = "done";

#[cfg(feature = "cuda")]
fn measure(
    device: &Device,
    request: &TuneRequest,
    excluded: &[(Candidate, String)],
    trace: &mut TrialTrace<'_>,
    key: String,
    card: String,
) -> Result<KernelPlan> {
    use crate::model::kernel_plan::measure::{Measurement, measure};
    let measurement = Measurement {
        matrices: &request.matrices,
        rings: &request.rings,
        rows: &request.rows,
        excluded,
        trace,
    };
    Ok(measure(device, measurement, key, card)?)
}

#[cfg(not(feature = "cuda"))]
fn measure(
    _: &Device,
    _: &TuneRequest,
    _: &[(Candidate, String)],
    _: &mut TrialTrace<'_>,
    _: String,
    _: String,
) -> Result<KernelPlan> {
    bail!("this build has no CUDA support: build with `cargo build --release --features cuda`")
}

/// Keeps `plan` in `dir` under its key, and forgets an earlier failure; returns the path.
pub fn keep(dir: &Path, plan: &KernelPlan) -> Result<PathBuf> {
    let path = plan_path(dir, &plan.key);
    write_whole(&path, &serde_json::to_string_pretty(plan)?)?;
    let _ = std::fs::remove_file(failure_path(dir, &plan.key));
    Ok(path)
}

/// Writes `text` to `path` whole or not at all.
pub fn write_whole(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().context("a file's path has a folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The plan at `path`, if there is one for `key`; an unreadable one is reported.
pub fn read_plan(path: &Path, key: &str) -> Option<KernelPlan> {
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str::<KernelPlan>(&text) {
        Ok(plan) if plan.key == key => Some(plan),
        Ok(plan) => {
            tracing::warn!(path = %path.display(), "the kernel plan there is for {:?}, not this machine", plan.key);
            None
        }
        Err(err) => {
            tracing::warn!(path = %path.display(), "the kernel plan there is unreadable ({err})");
            None
        }
    }
}

/// Installs the plan for `request`, kept in `dir` or measured by a child `exe tune`, so the
/// model about to load uses the kernels measured fastest on this card. Call it before this
/// process opens the GPU (a GPU in exclusive-process mode takes one process at a time). When
/// no plan can be had, the log says why and the built-in kernels run.
pub fn prepare(request: &TuneRequest, exe: &Path, dir: &Path) {
    let plan = plan_key(request, exe).and_then(|key| kept_or_measured(&key, request, exe, dir));
    match plan {
        Ok(plan) => {
            tracing::info!(
                "kernel plan: {} (`duplex tune` prints the table)",
                plan.summary()
            );
            if kernel_plan::install(plan).is_err() {
                tracing::warn!("a kernel plan was already installed: keeping it");
            }
        }
        Err(err) => tracing::warn!("no kernel plan ({err:#}): the built-in kernels run"),
    }
}

/// How many times a measurement is started, each without the kernel that stopped the last.
const ATTEMPTS: usize = 3;

/// The plan kept in `dir` under `key`, else one measured by a child `exe tune` (again without
/// a kernel that stopped it, up to `ATTEMPTS` tries) and kept; a failure is remembered.
fn kept_or_measured(
    key: &str,
    request: &TuneRequest,
    exe: &Path,
    dir: &Path,
) -> Result<KernelPlan> {
    if let Some(plan) = read_plan(&plan_path(dir, key), key) {
        return Ok(plan);
    }
    let failed = failure_path(dir, key);
    if let Ok(why) = std::fs::read_to_string(&failed) {
        bail!(
            "measuring this card's kernels failed before ({}); `duplex tune` measures again",
            why.trim()
        );
    }
    tracing::info!(
        "measuring this card's kernels once (at most {} s a try; kept in {})",
        MEASURE_TIMEOUT.as_secs(),
        dir.display()
    );
    let mut excluded: Vec<Candidate> = Vec::new();
    let mut tries = 0;
    let outcome = loop {
        tries += 1;
        match measure_in_child(request, exe, &excluded, key) {
            Ok(plan) => break Ok(plan),
            Err((err, Some(culprit)))
                if !culprit.is_builtin() && !excluded.contains(&culprit) && tries < ATTEMPTS =>
            {
                let left_out = culprit.with_kin();
                let names: Vec<String> = left_out.iter().map(Candidate::name).collect();
                tracing::warn!(
                    "{} stopped the measurement ({err:#}): measuring again without {}",
                    culprit.name(),
                    names.join(", ")
                );
                for candidate in left_out {
                    if !excluded.contains(&candidate) {
                        excluded.push(candidate);
                    }
                }
            }
            Err((err, _)) => break Err(err),
        }
    };
    match &outcome {
        Ok(plan) => {
            // The child keeps it too; this covers a child that could not write there.
            if let Err(err) = keep(dir, plan) {
                tracing::warn!(
                    "the kernel plan is not kept ({err:#}): it is measured again at the next start"
                );
            }
        }
        Err(err) => {
            let _ = write_whole(&failed, &format!("{err:#}"));
        }
    }
    outcome
}

/// Runs `exe tune` for `request` without `excluded`; on failure, also the kernel it was last
/// trying.
fn measure_in_child(
    request: &TuneRequest,
    exe: &Path,
    excluded: &[Candidate],
    key: &str,
) -> std::result::Result<KernelPlan, (anyhow::Error, Option<Candidate>)> {
    // Unique per call: measurements in one process (tests run them in parallel) must not
    // read each other's plan or progress.
    static MEASUREMENTS: AtomicUsize = AtomicUsize::new(0);
    let scratch = std::env::temp_dir().join(format!(
        "duplex-tune-{}-{}",
        std::process::id(),
        MEASUREMENTS.fetch_add(1, Ordering::Relaxed)
    ));
    let (json, progress) = (
        scratch.with_extension("json"),
        scratch.with_extension("progress"),
    );
    let mut child = Command::new(exe);
    child
        .args(request.args())
        .arg("--json")
        .arg(&json)
        .arg("--progress")
        .arg(&progress);
    if !excluded.is_empty() {
        let names: Vec<String> = excluded.iter().map(Candidate::name).collect();
        child.arg("--exclude").arg(names.join(","));
    }
    let outcome = match run_child(child, MEASURE_TIMEOUT) {
        Ok(()) => read_plan(&json, key)
            .with_context(|| {
                format!(
                    "`duplex tune` succeeded but left no plan at {}",
                    json.display()
                )
            })
            .map_err(|err| (err, None)),
        Err(err) => Err((err, last_kernel_tried(&progress))),
    };
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_file(&progress);
    outcome
}

/// The candidate of the trial a measurement's progress file shows unfinished: its last line,
/// unless that line says the last trial was over (the failure came between trials).
fn last_kernel_tried(progress: &Path) -> Option<Candidate> {
    let text = std::fs::read_to_string(progress).ok()?;
    let name = text.lines().last()?.split(' ').next()?;
    Candidate::parse(name).ok()
}

/// Runs `command` (its output goes to our standard error) and waits at most `timeout` for it
/// to succeed.
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
    use crate::model::kernel_plan::{Choice, Kernel, Sublayer, Trial, WeightKind};

    #[test]
    fn a_request_covers_the_row_buckets_up_to_the_first_holding_the_sessions() {
        let cfg = LmConfig::personaplex_7b();
        let rows = |max| TuneRequest::for_model(&cfg, Quant::Int8, KvQuant::None, max).rows;
        assert_eq!(rows(1), [1]);
        assert_eq!(rows(5), [1, 2, 4, 8]);
        assert_eq!(rows(64), [1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(rows(500), [1, 2, 4, 8, 16, 32, 64]);
        let request = TuneRequest::for_model(&cfg, Quant::Int8, KvQuant::Int8, 2);
        let args = request.args();
        assert_eq!(args[..2], ["tune", "--matrices"]);
        assert!(
            args[2].starts_with("int8:12288x4096:norm,int8:4096x4096:skip,"),
            "{}",
            args[2]
        );
        assert_eq!(args[3..], ["--rows", "1,2", "--rings", "int8:32x128x3000"]);
    }

    fn plan(key: &str) -> KernelPlan {
        let matrix = Matrix {
            weights: WeightKind::Int8,
            out_features: 64,
            in_features: 32,
            sublayer: Sublayer::Plain,
        };
        KernelPlan {
            key: key.into(),
            card: "test".into(),
            choices: vec![Choice {
                matrix,
                rows: 1,
                trials: vec![Trial::judged(Kernel::Rows, 3.0, 0.0)],
            }],
            attention: Vec::new(),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("duplex-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_kept_plan_is_used_only_for_its_own_key() {
        let dir = scratch("plan");
        let path = plan_path(&dir, "card-a");
        assert_eq!(read_plan(&path, "card-a"), None, "nothing kept yet");
        assert_eq!(keep(&dir, &plan("card-a")).unwrap(), path);
        assert_eq!(read_plan(&path, "card-a"), Some(plan("card-a")));
        assert_eq!(read_plan(&path, "card-b"), None, "another card's plan");
        std::fs::write(&path, "{\"key\": \"card-a\", \"choices\": [").unwrap();
        assert_eq!(read_plan(&path, "card-a"), None, "a truncated file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A stand-in for `duplex tune` (the real one needs a GPU): a shell script that answers
    /// the same arguments. It appends each run's `--exclude` to `runs`; unless `--exclude`
    /// holds `spared_by`, it writes the run's line of `crashes` (the last one once they run
    /// out) to the progress file and dies; else it writes the plan for `key` to `--json`.
    fn child(dir: &Path, key: &str, crashes: &[&str], spared_by: &str) -> PathBuf {
        let plan_file = dir.join("plan.json");
        std::fs::write(&plan_file, serde_json::to_string(&plan(key)).unwrap()).unwrap();
        std::fs::write(dir.join("crashes"), crashes.join("\n") + "\n").unwrap();
        let script = dir.join("duplex");
        let text = format!(
            r#"#!/bin/sh
json=""; progress=""; exclude=""
while [ $# -gt 0 ]; do
  case "$1" in
    --json) json="$2"; shift;;
    --progress) progress="$2"; shift;;
    --exclude) exclude="$2"; shift;;
  esac
  shift
done
echo "[$exclude]" >> "{runs}"
case ",$exclude," in
  *,{spared_by},*) ;;
  *)
    line=$(sed -n "$(wc -l < "{runs}")p" "{crashes}")
    [ -n "$line" ] || line=$(tail -n 1 "{crashes}")
    echo "$line" >> "$progress"
    kill -SEGV $$;;
esac
cp "{plan}" "$json"
"#,
            runs = dir.join("runs").display(),
            crashes = dir.join("crashes").display(),
            plan = plan_file.display(),
        );
        std::fs::write(&script, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    fn runs(dir: &Path) -> Vec<String> {
        let text = std::fs::read_to_string(dir.join("runs")).unwrap_or_default();
        text.lines().map(str::to_owned).collect()
    }

    fn request() -> TuneRequest {
        TuneRequest::for_model(&LmConfig::mid(), Quant::Int8, KvQuant::None, 1)
    }

    #[test]
    fn a_kernel_that_kills_the_measurement_is_left_out_and_the_plan_kept() {
        let dir = scratch("crash");
        let exe = child(&dir, "key-1", &["split-k int8:3072x1024:norm 1"], "split-k");
        let kept = dir.join("kept");
        let plan = kept_or_measured("key-1", &request(), &exe, &kept).unwrap();
        assert_eq!(plan, super::tests::plan("key-1"));
        assert_eq!(
            runs(&dir),
            ["[]", "[split-k]"],
            "measured again without split-k"
        );
        assert_eq!(read_plan(&plan_path(&kept, "key-1"), "key-1"), Some(plan));
        kept_or_measured("key-1", &request(), &exe, &kept).unwrap();
        assert_eq!(
            runs(&dir).len(),
            2,
            "the kept plan is used, nothing measured"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// An attention launch that takes the measurement down is left out like a kernel: the
    /// products' plan is not lost with it.
    #[test]
    fn an_attention_launch_that_kills_the_measurement_is_left_out() {
        let dir = scratch("attention-crash");
        let crash = "attention-staged-64-128 bf16:16x64x750 4";
        let exe = child(&dir, "key-6", &[crash], "attention-staged-64-128");
        let plan = kept_or_measured("key-6", &request(), &exe, &dir.join("kept")).unwrap();
        assert_eq!(plan, super::tests::plan("key-6"));
        let staged = "attention-staged-64-128,attention-staged-32-128,attention-staged-64-256,\
                      attention-stagedjoined-64-128";
        assert_eq!(runs(&dir), ["[]".to_owned(), format!("[{staged}]")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The default launch is what runs without a plan: no use measuring without it.
    #[test]
    fn a_failure_of_the_default_attention_launch_is_remembered() {
        let dir = scratch("attention-default-crash");
        let crash = "attention-plain-128-128 bf16:16x64x750 1";
        let exe = child(&dir, "key-7", &[crash], "never");
        let err = kept_or_measured("key-7", &request(), &exe, &dir.join("kept")).unwrap_err();
        assert!(format!("{err:#}").contains("signal: 11"), "{err:#}");
        assert_eq!(runs(&dir), ["[]"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A child that dies after its last trial was over (out of memory making the next
    /// matrix's weights, say) blames no kernel: nothing is left out, and the failure stands.
    #[test]
    fn a_failure_between_trials_blames_no_kernel() {
        let dir = scratch("between-trials");
        let exe = child(&dir, "key-5", &[TRIAL_DONE], "split-k");
        let kept = dir.join("kept");
        let err = kept_or_measured("key-5", &request(), &exe, &kept).unwrap_err();
        assert!(format!("{err:#}").contains("signal: 11"), "{err:#}");
        assert_eq!(runs(&dir), ["[]"], "measured once, nothing left out");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failure_of_a_built_in_kernel_is_remembered_and_not_measured_again() {
        let dir = scratch("builtin-crash");
        let exe = child(&dir, "key-2", &["rows int8:3072x1024:norm 1"], "never");
        let kept = dir.join("kept");
        let err = kept_or_measured("key-2", &request(), &exe, &kept).unwrap_err();
        assert!(format!("{err:#}").contains("signal: 11"), "{err:#}");
        assert_eq!(
            runs(&dir),
            ["[]"],
            "no use measuring without a built-in kernel"
        );
        let err = kept_or_measured("key-2", &request(), &exe, &kept).unwrap_err();
        assert!(format!("{err:#}").contains("failed before"), "{err:#}");
        assert_eq!(runs(&dir).len(), 1, "not measured again at the next start");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn measuring_gives_up_after_three_tries_or_the_same_culprit_twice() {
        let dir = scratch("three");
        let crashes = [
            "split-k int8:3072x1024:norm 1",
            "tensor-cores int8:3072x1024:norm 8",
            "cublas-out-in bf16:2048x1024:plain 1",
        ];
        let exe = child(&dir, "key-3", &crashes, "never");
        let err = kept_or_measured("key-3", &request(), &exe, &dir.join("kept")).unwrap_err();
        assert!(format!("{err:#}").contains("signal: 11"), "{err:#}");
        assert_eq!(runs(&dir), ["[]", "[split-k]", "[split-k,tensor-cores]"]);
        let again = scratch("again");
        let exe = child(&again, "key-4", &[crashes[0]], "never");
        kept_or_measured("key-4", &request(), &exe, &again.join("kept")).unwrap_err();
        assert_eq!(
            runs(&again),
            ["[]", "[split-k]"],
            "split-k again: no use going on"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&again).unwrap();
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
    fn the_doctor_names_kept_plans_and_a_remembered_failure() {
        let dir = scratch("doctor");
        let check = kept_for(&dir, "card-a");
        assert_eq!(check.status, Status::Ok);
        assert!(check.detail.contains("first start"), "{}", check.detail);
        keep(&dir, &plan("card-b-matrices1")).unwrap();
        assert!(
            kept_for(&dir, "card-a").detail.contains("first start"),
            "another card's"
        );
        keep(&dir, &plan("card-a-matrices1")).unwrap();
        let check = kept_for(&dir, "card-a");
        assert_eq!(check.status, Status::Ok);
        assert_eq!(
            check.detail,
            "measured on test: the built-in kernels won every product"
        );
        write_whole(&failure_path(&dir, "card-a-matrices2"), "split-k crashed\n").unwrap();
        let check = kept_for(&dir, "card-a");
        assert_eq!(check.status, Status::Warn);
        assert!(
            check.detail.ends_with("run: split-k crashed"),
            "{}",
            check.detail
        );
        assert!(check.fix.unwrap().contains("duplex tune"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nothing_is_measured_on_the_cpu() {
        let err = measure_here(&Device::Cpu, &request(), &[], None).unwrap_err();
        assert!(format!("{err}").contains("CUDA GPU"), "{err}");
    }
}
