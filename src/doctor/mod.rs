//! `duplex doctor`: what a deployment needs — platform, GPU and driver, the binary's kernels,
//! weights, audio devices, ports — each with the fix for a miss. Runs on any build, GPU or not.

pub mod gpu;
pub mod weights;

use serde::Serialize;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;

/// CUDA compute capabilities this binary carries kernels for (empty for a CPU build).
pub const KERNEL_ARCHS: &str = match option_env!("DUPLEX_CUDA_ARCHS") {
    Some(archs) => archs,
    None => "",
};
/// The CUDA version this binary was built against (its driver must support it).
pub const BUILT_CUDA: Option<&str> = option_env!("DUPLEX_CUDA_VERSION");

#[derive(Debug, Clone)]
pub struct DoctorOptions {
    pub host: IpAddr,
    pub port: u16,
    pub udp_ports: Option<std::ops::RangeInclusive<u16>>,
    pub model_dir: Option<PathBuf>,
    pub repo: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct System {
    pub arch: &'static str,
    pub os: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_bytes: u64,
    pub memory_available_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Binary {
    pub version: &'static str,
    pub cuda: bool,
    pub kernels: Vec<String>,
    pub cuda_version: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Audio {
    pub host: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Ports {
    pub http: SocketAddr,
    pub http_free: bool,
    pub udp_range: Option<String>,
    pub udp_free: Option<usize>,
    pub udp_busy: Vec<u16>,
}

/// Everything the doctor found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Whether the deployment can serve (no check failed).
    pub ok: bool,
    pub system: System,
    pub gpu: gpu::GpuReport,
    pub binary: Binary,
    pub weights: weights::WeightsReport,
    pub audio: Audio,
    pub ports: Ports,
    pub checks: Vec<Check>,
}

/// Examines the machine.
pub fn examine(options: &DoctorOptions) -> Report {
    let system = system();
    let gpu = gpu::probe();
    let binary = Binary {
        version: env!("CARGO_PKG_VERSION"),
        cuda: cfg!(feature = "cuda"),
        kernels: KERNEL_ARCHS
            .split(',')
            .filter(|a| !a.is_empty())
            .map(str::to_owned)
            .collect(),
        cuda_version: BUILT_CUDA,
    };
    let weights = weights::check(options.model_dir.as_deref(), &options.repo);
    let audio = audio();
    let ports = ports(options);
    let mut checks = Vec::new();
    checks.push(platform_check(&system));
    checks.extend(gpu_checks(&gpu, &binary));
    checks.push(weights_check(&weights, &gpu, &system));
    checks.push(audio_check(&audio));
    checks.extend(port_checks(&ports));
    let ok = checks.iter().all(|c| c.status != Status::Fail);
    Report {
        ok,
        system,
        gpu,
        binary,
        weights,
        audio,
        ports,
        checks,
    }
}

fn check(
    name: &'static str,
    status: Status,
    detail: impl Into<String>,
    fix: Option<String>,
) -> Check {
    Check {
        name,
        status,
        detail: detail.into(),
        fix,
    }
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn system() -> System {
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let os = os_release
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| std::env::consts::OS.to_owned());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|v| v.split(':').nth(1))
        })
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| format!("{} CPU", std::env::consts::ARCH));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    System {
        arch: std::env::consts::ARCH,
        os,
        cpu,
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory_bytes: kib("MemTotal:"),
        memory_available_bytes: kib("MemAvailable:"),
    }
}

fn audio() -> Audio {
    use cpal::traits::{DeviceTrait, HostTrait};
    let host = cpal::default_host();
    // ALSA's `null` device swallows and invents silence: it is not a sound card.
    let real = |name: &String| !name.starts_with("Discard all samples");
    let names = |devices: Result<Vec<cpal::Device>, cpal::Error>| -> Result<Vec<String>, String> {
        devices
            .map(|list| {
                list.iter()
                    .map(|d| {
                        d.description()
                            .map(|x| x.to_string())
                            .unwrap_or_else(|_| "?".into())
                    })
                    .filter(real)
                    .collect()
            })
            .map_err(|e| e.to_string())
    };
    let inputs = names(host.input_devices().map(|d| d.collect()));
    let outputs = names(host.output_devices().map(|d| d.collect()));
    let problem = match (&inputs, &outputs) {
        (Err(e), _) | (_, Err(e)) => Some(e.clone()),
        _ => None,
    };
    Audio {
        host: host.id().name().to_owned(),
        inputs: inputs.unwrap_or_default(),
        outputs: outputs.unwrap_or_default(),
        problem,
    }
}

fn ports(options: &DoctorOptions) -> Ports {
    let http = SocketAddr::new(options.host, options.port);
    let http_free = TcpListener::bind(http).is_ok();
    let (udp_range, udp_free, udp_busy) = match &options.udp_ports {
        Some(range) => {
            let busy: Vec<u16> = range
                .clone()
                .filter(|&p| UdpSocket::bind(SocketAddr::new(options.host, p)).is_err())
                .collect();
            let total = range.clone().count();
            (
                Some(format!("{}-{}", range.start(), range.end())),
                Some(total - busy.len()),
                busy,
            )
        }
        None => (None, None, Vec::new()),
    };
    Ports {
        http,
        http_free,
        udp_range,
        udp_free,
        udp_busy,
    }
}

fn platform_check(system: &System) -> Check {
    let detail = format!(
        "{} {}, {} ({} cores), {:.1} GiB memory ({:.1} GiB free)",
        system.arch,
        system.os,
        system.cpu,
        system.cores,
        system.memory_bytes as f64 / GIB,
        system.memory_available_bytes as f64 / GIB
    );
    check("platform", Status::Ok, detail, None)
}

fn gpu_checks(gpu: &gpu::GpuReport, binary: &Binary) -> Vec<Check> {
    let mut checks = Vec::new();
    if gpu.devices.is_empty() {
        let detail = gpu
            .problem
            .clone()
            .unwrap_or_else(|| "the driver lists no GPU".into());
        let fix = "PersonaPlex runs in real time only on an NVIDIA GPU: install the NVIDIA driver (and, in Docker, \
                   the NVIDIA Container Toolkit with `--gpus all`); without one the server runs on the CPU"
            .to_owned();
        let status = if binary.cuda {
            Status::Fail
        } else {
            Status::Warn
        };
        checks.push(check("gpu", status, format!("no GPU: {detail}"), Some(fix)));
        return checks;
    }
    let listed: Vec<String> = gpu
        .devices
        .iter()
        .map(|d| {
            let memory = if d.unified {
                "unified memory".to_owned()
            } else {
                format!("{:.1} GiB", d.memory_bytes as f64 / GIB)
            };
            format!(
                "#{} {} (sm {}, {memory})",
                d.index, d.name, d.compute_capability
            )
        })
        .collect();
    let driver = format!(
        "driver {}, CUDA {}",
        gpu.driver.as_deref().unwrap_or("unknown"),
        gpu.cuda_driver_version.as_deref().unwrap_or("unknown")
    );
    checks.push(check(
        "gpu",
        Status::Ok,
        format!("{}; {driver}", listed.join(", ")),
        None,
    ));
    let wanted: Vec<String> = gpu
        .devices
        .iter()
        .map(|d| d.compute_capability.replace('.', ""))
        .collect();
    let kernels = if !binary.cuda {
        check(
            "kernels",
            Status::Warn,
            "this is a CPU build: the GPU is not used",
            Some(format!(
                "build with `CUDA_COMPUTE_CAP={} cargo build --release --features cuda`",
                wanted[0]
            )),
        )
    } else if let Some(missing) = wanted.iter().find(|cc| {
        !binary
            .kernels
            .iter()
            .any(|k| k.trim_start_matches("sm_").starts_with(cc.as_str()))
    }) {
        check(
            "kernels",
            Status::Fail,
            format!(
                "this binary carries kernels for {:?}, not for this GPU (sm_{missing})",
                binary.kernels
            ),
            Some(format!(
                "rebuild with `CUDA_COMPUTE_CAP={missing} cargo build --release --features cuda`"
            )),
        )
    } else {
        check(
            "kernels",
            Status::Ok,
            format!("kernels for {}", binary.kernels.join(", ")),
            None,
        )
    };
    checks.push(kernels);
    if let (Some(built), Some(driver)) = (binary.cuda_version, gpu.cuda_driver_version.as_deref())
        && version_number(driver) < version_number(built)
    {
        checks.push(check(
            "driver",
            Status::Fail,
            format!("the driver supports CUDA {driver}; this binary needs {built}"),
            Some("update the NVIDIA driver (CUDA 13 needs the R580 series or newer)".into()),
        ));
    }
    checks
}

fn version_number(version: &str) -> (u32, u32) {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn weights_check(weights: &weights::WeightsReport, gpu: &gpu::GpuReport, system: &System) -> Check {
    if weights.dir.is_none() {
        let detail = weights.problem.clone().unwrap_or_default();
        return check("weights", Status::Warn, format!("no PersonaPlex weights ({detail}); `serve` runs the echo engine"), Some(
            "accept the licence at https://huggingface.co/nvidia/personaplex-7b-v1, then `HF_TOKEN=hf_... duplex fetch` (or pass --model-dir DIR)".into(),
        ));
    }
    let dir = weights.dir.clone().unwrap_or_default();
    if let Some(bad) = weights.files.iter().find(|f| f.problem.is_some()) {
        return check(
            "weights",
            Status::Fail,
            format!(
                "{dir}: {}: {}",
                bad.name,
                bad.problem.clone().unwrap_or_default()
            ),
            Some("download again with `duplex fetch` (it resumes)".into()),
        );
    }
    if let Some(problem) = &weights.problem {
        return check(
            "weights",
            Status::Fail,
            format!("{dir}: {problem}"),
            Some("run `duplex fetch`".into()),
        );
    }
    let lm_bytes = weights.files.first().map(|f| f.bytes).unwrap_or(0);
    let room = gpu
        .devices
        .first()
        .map(|d| {
            if d.unified {
                system.memory_bytes
            } else {
                d.memory_bytes
            }
        })
        .unwrap_or(system.memory_bytes);
    // On the CPU the model runs in f32: twice the bf16 file.
    let needed = if gpu.devices.is_empty() {
        2 * lm_bytes
    } else {
        lm_bytes + lm_bytes / 8
    };
    let detail = format!(
        "{dir}: complete ({:.1} GiB model, {} voices)",
        lm_bytes as f64 / GIB,
        weights.voices.len()
    );
    if needed > room {
        return check(
            "weights",
            Status::Warn,
            format!(
                "{detail}; it needs about {:.1} GiB, the device has {:.1} GiB",
                needed as f64 / GIB,
                room as f64 / GIB
            ),
            Some("use a device with more memory (int8 weights halve it on the GPU)".into()),
        );
    }
    check("weights", Status::Ok, detail, None)
}

fn audio_check(audio: &Audio) -> Check {
    if audio.inputs.is_empty() && audio.outputs.is_empty() {
        let detail = audio
            .problem
            .clone()
            .unwrap_or_else(|| "no input or output device".into());
        return check(
            "audio",
            Status::Warn,
            format!(
                "no sound card ({} host: {detail}); only `duplex local` needs one",
                audio.host
            ),
            Some("use the browser page, or `duplex local --input in.wav --output out.wav`".into()),
        );
    }
    check(
        "audio",
        Status::Ok,
        format!(
            "{} host: {} inputs, {} outputs",
            audio.host,
            audio.inputs.len(),
            audio.outputs.len()
        ),
        None,
    )
}

fn port_checks(ports: &Ports) -> Vec<Check> {
    let mut checks = vec![if ports.http_free {
        check(
            "http port",
            Status::Ok,
            format!("{} is free", ports.http),
            None,
        )
    } else {
        check(
            "http port",
            Status::Fail,
            format!("{} is in use", ports.http),
            Some("stop the other server or pick another port with --port".into()),
        )
    }];
    if let (Some(range), Some(free)) = (&ports.udp_range, ports.udp_free) {
        let status = if free == 0 {
            Status::Fail
        } else if ports.udp_busy.is_empty() {
            Status::Ok
        } else {
            Status::Warn
        };
        let fix = (status != Status::Ok).then(|| {
            "free the ports or choose another --udp-ports range (one port per session)".to_owned()
        });
        checks.push(check(
            "udp ports",
            status,
            format!("{range}: {free} free, busy: {:?}", ports.udp_busy),
            fix,
        ));
    }
    checks
}

impl Report {
    /// The report for people: one line per check, with fixes.
    pub fn table(&self) -> String {
        let mut lines = vec![format!("duplex {} doctor", self.binary.version)];
        for c in &self.checks {
            let mark = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            lines.push(format!("[{mark}] {:<10} {}", c.name, c.detail));
            if let Some(fix) = &c.fix {
                lines.push(format!("       {:<10} fix: {fix}", ""));
            }
        }
        lines.push(if self.ok {
            "ready to serve".into()
        } else {
            "cannot serve: fix the FAIL lines above".into()
        });
        lines.join("\n")
    }
}
