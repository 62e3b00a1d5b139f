//! The `duplex` command line: `serve`, `local`, `offline`, `fetch` and `bench`.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use duplex::bench::loopback::{self, LoopbackOptions};
use duplex::engine::REAL_TIME_STEP;
use duplex::engine::personaplex::{PersonaPlexEngine, PersonaPlexOptions};
use duplex::engine::{EchoEngine, Engine, EngineConfig, EngineHandle, PersonaRequest};
use duplex::fetch::FetchOptions;
use duplex::gateway::ice::{IceConfig, TurnAuth};
use duplex::gateway::sip::auth::CallerAuth;
use duplex::gateway::sip::offer::SipCodec;
use duplex::gateway::sip::register::RegisterSettings;
use duplex::gateway::sip::{self, SipServer, SipSettings, SipTls, Transport};
use duplex::gateway::tls::{self, TlsSource};
use duplex::gateway::{AppState, GatewayConfig, PeerSettings, Server, peer, ports};
use duplex::metrics::Metrics;
use duplex::model::config::LmConfig;
use duplex::model::files::{DEFAULT_REPO, ModelFiles};
use duplex::model::generate::SamplingConfig;
use duplex::model::kernel_plan::attention::Ring;
use duplex::model::kernel_plan::{Candidate, Matrix};
use duplex::model::kv::RingPositions;
use duplex::model::pipeline::{Pipeline, PipelineConfig, model_configs};
use duplex::offline::OfflineOptions;
use duplex::tune::TuneRequest;
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "duplex",
    version,
    about = "Real-time full-duplex voice agent server (PersonaPlex / Moshi)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the web page, WebRTC sessions and the HTTP API on one port.
    Serve(Box<ServeArgs>),
    /// Talk to the agent through this machine's microphone and speaker, or through WAV files.
    Local(LocalArgs),
    /// Run the model on a WAV file: the agent's audio as a WAV, and per-frame tokens as JSON.
    Offline(OfflineArgs),
    /// Download the model from the Hugging Face Hub into the standard cache.
    Fetch(FetchArgs),
    /// Check what a deployment needs (GPU, driver, kernels, weights, audio, ports), with fixes.
    Doctor(DoctorArgs),
    /// Measure the server: `duplex bench loopback --sessions N --seconds S`.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Time every candidate kernel of the model's matrix products on this GPU, check each
    /// against the built-in one, and keep the fastest (what `--kernels measured` uses).
    Tune(TuneArgs),
}

#[derive(Args)]
struct TuneArgs {
    /// Model preset whose matrices are measured: personaplex-7b, moshiko, mid.
    #[arg(long, default_value = "personaplex-7b")]
    config: String,
    /// The matrices of this model directory's config instead.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Weight storage of the language model's matrices.
    #[arg(long, value_enum, default_value = "none")]
    quant: QuantArg,
    /// The most sessions stepped together: rows are measured up to the power of two that holds
    /// them.
    #[arg(long, default_value_t = 64)]
    max_rows: usize,
    /// Exactly these matrices instead of a model's (`int8:12288x4096,bf16:32000x4096`).
    #[arg(long, value_delimiter = ',', value_parser = Matrix::parse)]
    matrices: Vec<Matrix>,
    /// Exactly these row counts instead.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u16).range(1..))]
    rows: Vec<u16>,
    /// Also write the plan as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Storage of the temporal keys and values whose attention is measured.
    #[arg(long, value_enum, default_value = "none")]
    kv_quant: KvQuantArg,
    /// Exactly these attention rings instead of a model's (`bf16:32x128x3000`; with
    /// `--matrices`, none unless given).
    #[arg(long, value_delimiter = ',', value_parser = Ring::parse)]
    rings: Vec<Ring>,
    /// Leave these kernels or attention launches out (each trial of theirs says so):
    /// `split-k,attention-staged-64-128`.
    #[arg(long, value_delimiter = ',', value_parser = Candidate::parse)]
    exclude: Vec<Candidate>,
    /// Append `kernel matrix rows` to this file before each trial, so that whoever started
    /// this run knows which kernel was running should it die.
    #[arg(long)]
    progress: Option<PathBuf>,
}

/// Which sessions are let in: by the model's warm-up, and while the steps run behind real time.
#[derive(Args, Clone, Copy)]
struct AdmissionArgs {
    /// Admit every session asked for even where the warm-up measured that fewer keep real time,
    /// and while the steps run behind it (every session then drops frames whenever more than
    /// those are talking); by default the rest get 503.
    #[arg(long)]
    overload: bool,
    /// The longest step, in ms, that the sessions admitted may take in the warm-up, and while
    /// serving: from 3 of the last 32 steps past it, new sessions get 503 until the steps keep
    /// it again (a frame is 80 ms; lower leaves more room for a noisy machine).
    #[arg(long, default_value_t = REAL_TIME_STEP.as_millis() as u64, env = "DUPLEX_STEP_BUDGET_MS",
          value_parser = clap::value_parser!(u64).range(10..=75))]
    step_budget_ms: u64,
}

impl AdmissionArgs {
    /// The step loop's configuration for `max_sessions`, admitted as these flags say.
    fn engine_config(&self, max_sessions: usize) -> EngineConfig {
        EngineConfig {
            max_sessions,
            step_budget: std::time::Duration::from_millis(self.step_budget_ms),
            overload: self.overload,
            ..Default::default()
        }
    }
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// A directory laid out like the Hugging Face repository (model.safetensors,
    /// tokenizer-e351c8d8-checkpoint125.safetensors, tokenizer_spm_32k_3.model, voices/).
    /// Without it the Hugging Face cache is searched (`duplex fetch` fills it).
    #[arg(long, env = "DUPLEX_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// Repository to look for in the Hugging Face cache.
    #[arg(long, default_value = DEFAULT_REPO)]
    repo: String,
    /// Always pick the most likely token instead of sampling (text 0.7/top 25, audio 0.8/top 250).
    #[arg(long)]
    greedy: bool,
    /// Attend all `context` frames once the attention window is full (PyPI moshi); by default
    /// the window matches PersonaPlex's official server, which sees one frame less.
    #[arg(long)]
    exact_window: bool,
    /// Keep the persona (voice and role prompt) in attention after the 3000-frame window slides
    /// past it; the official model forgets it after about 4 minutes.
    #[arg(long)]
    pin_persona: bool,
    /// Store the language model's matrices as weight-only int8 (half the memory and bandwidth of
    /// bf16; on the GPU the w8a16 kernel, on the CPU its reference).
    #[arg(long, value_enum, default_value = "none")]
    quant: QuantArg,
    /// Store the temporal transformer's keys and values as int8 with a scale per head and
    /// position: half the bytes each frame reads over a long conversation (what a 273 GB/s
    /// DGX Spark needs at full context), at a small cost in accuracy (docs/benchmarks.md).
    #[arg(long, value_enum, default_value = "none")]
    kv_quant: KvQuantArg,
    /// Where the model runs: the first CUDA GPU when this build has the `cuda` feature and the
    /// driver shows one (bf16), else the CPU (f32).
    #[arg(long, value_enum, default_value = "auto", env = "DUPLEX_DEVICE")]
    device: DeviceArg,
    /// Run every frame eagerly on the GPU instead of replaying it as CUDA graphs (graphs are
    /// used for bf16 on a GPU; each capture is checked against an eager frame first).
    #[arg(long)]
    no_cuda_graphs: bool,
    #[command(flatten)]
    kernel_choice: KernelChoice,
}

#[derive(Args, Clone, Copy)]
struct KernelChoice {
    /// Which kernel runs each matrix product on a GPU: `measured` times the candidates on this
    /// card once (`duplex tune`, kept in ~/.cache/duplex/kernels) and keeps the fastest that
    /// agrees with the built-in one; `builtin` runs the built-in ones (cuBLAS for bf16).
    #[arg(
        long,
        value_enum,
        default_value = "measured",
        env = "DUPLEX_KERNEL_CHOICE"
    )]
    kernels: KernelsArg,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KernelsArg {
    Measured,
    Builtin,
}

/// With `--kernels measured`, when the model is to run on a GPU, installs the kernel plan for
/// `lm` with `quant` weights and up to `rows` sessions stepped together. Call it before this
/// process opens the GPU and before the model loads.
fn prepare_kernels(
    kernels: KernelsArg,
    device: DeviceArg,
    lm: &LmConfig,
    (quant, kv_quant): (QuantArg, KvQuantArg),
    rows: usize,
) {
    let on_gpu = match device {
        DeviceArg::Cpu => false,
        DeviceArg::Cuda | DeviceArg::Auto => {
            cfg!(feature = "cuda") && !duplex::doctor::gpu::probe().devices.is_empty()
        }
    };
    if kernels == KernelsArg::Builtin || !on_gpu {
        return;
    }
    let request = TuneRequest::for_model(lm, quant.into(), kv_quant.into(), rows);
    match std::env::current_exe() {
        Ok(exe) => duplex::tune::prepare(&request, &exe, &duplex::tune::cache_dir()),
        Err(err) => {
            tracing::warn!("no kernel plan (this program's path: {err}): the built-in kernels run")
        }
    }
}

impl ModelArgs {
    /// `prepare_kernels` for the model `source` holds.
    fn prepare_kernels(&self, source: &ModelSource, rows: usize) -> Result<()> {
        let lm = source.lm_config()?;
        prepare_kernels(
            self.kernel_choice.kernels,
            self.device,
            &lm,
            (self.quant, self.kv_quant),
            rows,
        );
        Ok(())
    }
}

/// Where PersonaPlex's weights come from.
#[derive(Clone)]
enum ModelSource {
    Files(ModelFiles),
    /// Random weights of an `LmConfig` preset, for measuring (`Pipeline::random`).
    Random(String),
}

impl ModelSource {
    fn lm_config(&self) -> Result<LmConfig> {
        Ok(match self {
            Self::Files(files) => model_configs(files)?.0,
            Self::Random(preset) => LmConfig::named(preset)?,
        })
    }

    fn load(&self, cfg: &PipelineConfig) -> Result<Pipeline> {
        let pipeline = match self {
            Self::Files(files) => Pipeline::load(files, cfg),
            Self::Random(preset) => Pipeline::random(preset, cfg),
        };
        pipeline.context("loading the model")
    }

    /// The model's name for `/api/info` (the folder, else `repo`).
    fn name(&self, repo: &str) -> String {
        match self {
            Self::Files(files) => files
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| repo.to_owned()),
            Self::Random(preset) => format!("random {preset}"),
        }
    }

    /// Where the weights are read from, for the log.
    fn origin(&self) -> String {
        match self {
            Self::Files(files) => files.dir.display().to_string(),
            Self::Random(preset) => format!("random {preset} weights"),
        }
    }
}

/// The PersonaPlex weights `engine` asks for: none for echo; for auto, none (with a warning)
/// when they are missing.
fn weights_for(engine: EngineChoice, model: &ModelArgs) -> Result<Option<ModelSource>> {
    let located = || ModelFiles::locate(model.model_dir.as_deref(), &model.repo);
    Ok(match engine {
        EngineChoice::Echo => None,
        EngineChoice::Personaplex => Some(ModelSource::Files(located()?)),
        EngineChoice::Auto => match located() {
            Ok(files) => Some(ModelSource::Files(files)),
            Err(err) => {
                tracing::warn!("no PersonaPlex weights, so the echo engine answers: {err}");
                None
            }
        },
    })
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    /// The GPU if there is one this build can use, else the CPU.
    Auto,
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

/// The first CUDA GPU, or why there is none to use.
fn cuda_device() -> Result<candle_core::Device> {
    if !cfg!(feature = "cuda") {
        anyhow::bail!(
            "this build has no CUDA support: build with `cargo build --release --features cuda`"
        );
    }
    let report = duplex::doctor::gpu::probe();
    if report.devices.is_empty() {
        anyhow::bail!(
            "no CUDA GPU: {}",
            report.problem.as_deref().unwrap_or("the driver lists none")
        );
    }
    duplex::model::open_gpu(0).context("opening CUDA GPU 0")
}

#[derive(Clone, Copy, ValueEnum)]
enum QuantArg {
    /// As in the checkpoint (bf16 on the GPU, f32 on the CPU).
    None,
    /// Weight-only int8 per output channel: half the memory; faster than bf16 at batch 1, about
    /// 2x slower from batch 8 (docs/benchmarks.md).
    Int8,
}

#[derive(Clone, Copy, ValueEnum)]
enum KvQuantArg {
    /// In the model's dtype (bf16 on the GPU, f32 on the CPU).
    None,
    /// Int8 codes with one f32 scale per head and position.
    Int8,
}

impl From<KvQuantArg> for duplex::model::quant::KvQuant {
    fn from(arg: KvQuantArg) -> Self {
        match arg {
            KvQuantArg::None => Self::None,
            KvQuantArg::Int8 => Self::Int8,
        }
    }
}

impl From<QuantArg> for duplex::model::quant::Quant {
    fn from(arg: QuantArg) -> Self {
        match arg {
            QuantArg::None => Self::None,
            QuantArg::Int8 => Self::Int8,
        }
    }
}

impl ModelArgs {
    fn pipeline_config(&self) -> Result<PipelineConfig> {
        let positions = if self.exact_window {
            RingPositions::Exact
        } else {
            RingPositions::PersonaPlex
        };
        let device = match self.device {
            DeviceArg::Cpu => candle_core::Device::Cpu,
            DeviceArg::Cuda => cuda_device()?,
            DeviceArg::Auto => cuda_device().unwrap_or_else(|why| {
                tracing::info!("the model runs on the CPU ({why:#})");
                candle_core::Device::Cpu
            }),
        };
        let dtype = if device.is_cuda() {
            candle_core::DType::BF16
        } else {
            candle_core::DType::F32
        };
        Ok(PipelineConfig {
            device,
            dtype,
            positions,
            quant: self.quant.into(),
            kv_quant: self.kv_quant.into(),
            cuda_graphs: !self.no_cuda_graphs,
            pin_persona: self.pin_persona,
            ..Default::default()
        })
    }

    fn sampling(&self) -> SamplingConfig {
        if self.greedy {
            SamplingConfig::GREEDY
        } else {
            SamplingConfig::DEFAULT
        }
    }
}

#[derive(Args)]
struct OfflineArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The user's side of the conversation (any sample rate; resampled to 24 kHz).
    #[arg(long)]
    input: PathBuf,
    /// Where to write the agent's audio (24 kHz, as long as the input).
    #[arg(long)]
    output: PathBuf,
    /// Where to write the per-frame tokens (JSON: text id and piece, 8 agent codes, 8 user codes).
    #[arg(long)]
    tokens: Option<PathBuf>,
    /// Voice preset name (e.g. NATF0), from the model's voices/ folder.
    #[arg(long, conflicts_with = "voice_wav")]
    voice: Option<String>,
    /// A recording to use as the voice prompt instead of a preset.
    #[arg(long)]
    voice_wav: Option<PathBuf>,
    /// Role prompt (wrapped in <system> tags).
    #[arg(long)]
    prompt: Option<String>,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 42424242)]
    seed: u64,
}

#[derive(Args)]
struct DoctorArgs {
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// The HTTP address `serve` would listen on.
    #[arg(long, default_value = "0.0.0.0", env = "DUPLEX_HOST")]
    host: IpAddr,
    #[arg(long, default_value_t = 8998, env = "DUPLEX_PORT")]
    port: u16,
    /// The UDP media range `serve` would use.
    #[arg(long, env = "DUPLEX_UDP_PORTS")]
    udp_ports: Option<String>,
    #[arg(long, env = "DUPLEX_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_REPO)]
    repo: String,
    /// The UDP address `serve` would bind its media sockets to.
    #[arg(long, default_value = "0.0.0.0", env = "DUPLEX_UDP_BIND")]
    udp_bind: IpAddr,
    #[command(flatten)]
    ice: IceArgs,
}

#[derive(Args)]
struct LocalArgs {
    /// Which engine answers.
    #[arg(long, value_enum, default_value = "auto")]
    engine: EngineChoice,
    #[command(flatten)]
    model: ModelArgs,
    /// Frames (80 ms each) the echo engine waits before returning the audio.
    #[arg(long, default_value_t = 1)]
    echo_delay_frames: usize,
    /// Voice preset name (e.g. NATF0).
    #[arg(long)]
    voice: Option<String>,
    /// Role prompt.
    #[arg(long)]
    prompt: Option<String>,
    /// Microphone (a name from --list-devices, or part of one); the default device without it.
    #[arg(long, conflicts_with = "input")]
    input_device: Option<String>,
    /// Speaker (a name from --list-devices, or part of one); the default device without it.
    #[arg(long, conflicts_with = "output")]
    output_device: Option<String>,
    /// Print the sound devices and exit.
    #[arg(long)]
    list_devices: bool,
    /// Turn echo cancellation off (use with headphones).
    #[arg(long)]
    no_aec: bool,
    /// Read the user's side from this WAV file instead of the microphone.
    #[arg(long, requires = "output")]
    input: Option<PathBuf>,
    /// Write the agent's side to this WAV file instead of the speaker (24 kHz mono).
    #[arg(long, requires = "input")]
    output: Option<PathBuf>,
    /// With files: pace the input in real time (true) or run as fast as the engine steps (false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    realtime: bool,
}

#[derive(Args)]
struct FetchArgs {
    /// Repository to download.
    #[arg(long, default_value = DEFAULT_REPO)]
    repo: String,
    /// Hugging Face access token (the repository is gated).
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum EngineChoice {
    /// PersonaPlex when its weights are found (--model-dir or the Hugging Face cache), else echo.
    Auto,
    /// PersonaPlex; fails when the weights are missing.
    Personaplex,
    /// Returns each user's audio after --echo-delay-frames frames (no model needed).
    Echo,
}

#[derive(Args)]
struct ServeArgs {
    /// Address the HTTP server listens on.
    #[arg(long, default_value = "0.0.0.0", env = "DUPLEX_HOST")]
    host: IpAddr,
    /// HTTP port for the page, the API and WebRTC signaling.
    #[arg(long, default_value_t = 8998, env = "DUPLEX_PORT")]
    port: u16,
    /// Which engine answers.
    #[arg(long, value_enum, default_value = "auto")]
    engine: EngineChoice,
    #[command(flatten)]
    model: ModelArgs,
    /// Frames (80 ms each) the echo engine waits before returning the audio.
    #[arg(long, default_value_t = 1)]
    echo_delay_frames: usize,
    /// Sessions served at once; further offers get 503 with Retry-After. With the model, fewer
    /// where the warm-up measures that fewer keep real time (unless --overload).
    #[arg(long, default_value_t = 64, env = "DUPLEX_MAX_SESSIONS")]
    max_sessions: usize,
    #[command(flatten)]
    admission: AdmissionArgs,
    #[command(flatten)]
    network: NetworkArgs,
    #[command(flatten)]
    sip: SipArgs,
    /// Serve HTTPS with this certificate (PEM); browsers only open the microphone on HTTPS or localhost.
    #[arg(long, requires = "tls_key", env = "DUPLEX_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert", env = "DUPLEX_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Serve HTTPS with a self-signed certificate for this machine's names and LAN address
    /// (made once, kept in --tls-dir), so a phone on the same network can open the page.
    #[arg(long, conflicts_with = "tls_cert")]
    tls_self_signed: bool,
    /// Where --tls-self-signed keeps its certificate (default ~/.cache/duplex/tls).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Bearer token required on POST /api/offer, GET /api/ice and PATCH/DELETE /api/sessions/*,
    /// the WebSocket transports (also read from DUPLEX_TOKEN).
    #[arg(long, env = "DUPLEX_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Args)]
struct SipArgs {
    /// Answer SIP calls (UDP and TCP) on this port, e.g. 5060: a PBX or SIP trunk sends its
    /// calls here, their RTP on the --udp-ports. Off without it; 0 takes any free port.
    #[arg(long, env = "DUPLEX_SIP_PORT")]
    sip_port: Option<u16>,
    /// Networks whose SIP calls are answered (repeat, or comma-separated); others get 403.
    /// Default: loopback and the private ranges. 0.0.0.0/0 answers anyone.
    #[arg(long, value_delimiter = ',', env = "DUPLEX_SIP_ALLOW", value_parser = parse_network)]
    sip_allow: Vec<IpNet>,
    /// Register with a PBX as this extension, e.g. sip:7000@pbx.example (its registrar is
    /// then allowed to call); ;transport=tcp or tls (or sips:) keeps a connection to it.
    /// Needs --sip-port and --sip-password.
    #[arg(long, env = "DUPLEX_SIP_REGISTER", requires_all = ["sip_port", "sip_password"])]
    sip_register: Option<String>,
    /// The extension's password for --sip-register (digest, MD5).
    #[arg(long, env = "DUPLEX_SIP_PASSWORD", hide_env_values = true)]
    sip_password: Option<String>,
    /// The digest user name, where it is not the extension's number.
    #[arg(long, env = "DUPLEX_SIP_AUTH_USER")]
    sip_auth_user: Option<String>,
    /// Answer SIP over TLS on this port too, e.g. 5061, with the page's certificate
    /// (--tls-cert/--tls-key or --tls-self-signed); 0 takes any free port.
    #[arg(long, env = "DUPLEX_SIP_TLS_PORT", requires = "sip_port")]
    sip_tls_port: Option<u16>,
    /// A PEM file of certificates to trust, besides the public CAs, when a call placed over
    /// TLS (POST /api/calls to a sips: URI) checks the callee's: a PBX's own CA, or its
    /// self-signed certificate.
    #[arg(long, env = "DUPLEX_SIP_TLS_CA", requires = "sip_port")]
    sip_tls_ca: Option<PathBuf>,
    /// A new call must prove it knows this account (digest, MD5): USER:PASSWORD. Callers
    /// must still come from --sip-allow's networks (0.0.0.0/0 to take them from anywhere).
    #[arg(long, env = "DUPLEX_SIP_CALLER_AUTH", hide_env_values = true)]
    sip_caller_auth: Option<String>,
    /// The codecs a call may take, the preferred first (comma-separated): a caller gets the
    /// first of these it offers. opus and G722 carry wideband speech, PCMU and PCMA 8 kHz.
    #[arg(
        long,
        value_delimiter = ',',
        env = "DUPLEX_SIP_CODECS",
        default_value = "opus,G722,PCMU,PCMA"
    )]
    sip_codecs: Vec<SipCodec>,
}

impl SipArgs {
    fn settings(
        &self,
        host: IpAddr,
        certificate: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Option<SipSettings>> {
        let Some(port) = self.sip_port else {
            return Ok(None);
        };
        let tls = match (self.sip_tls_port, certificate) {
            (None, _) => None,
            (Some(tls_port), Some(config)) => Some(SipTls {
                bind: SocketAddr::new(host, tls_port),
                config,
            }),
            (Some(_), None) => anyhow::bail!(
                "--sip-tls-port needs a certificate: --tls-cert and --tls-key, or --tls-self-signed"
            ),
        };
        let caller_auth = match &self.sip_caller_auth {
            Some(account) => {
                Some(Arc::new(CallerAuth::parse(account).map_err(|why| {
                    anyhow::anyhow!("--sip-caller-auth: {why}")
                })?))
            }
            None => None,
        };
        let allow = match self.sip_allow.is_empty() {
            true => sip::private_networks(),
            false => self.sip_allow.clone(),
        };
        let register = match &self.sip_register {
            Some(aor) => {
                let password = self.sip_password.clone().unwrap_or_default();
                let settings = RegisterSettings::parse(aor, password, self.sip_auth_user.clone())
                    .map_err(|why| anyhow::anyhow!("--sip-register: {why}"))?;
                if settings.transport == Transport::Tls && tls.is_none() {
                    anyhow::bail!(
                        "--sip-register over TLS needs --sip-tls-port: the PBX's calls come to our TLS port"
                    );
                }
                Some(settings)
            }
            None => None,
        };
        Ok(Some(SipSettings {
            bind: SocketAddr::new(host, port),
            allow,
            register,
            codecs: self
                .sip_codecs
                .iter()
                .fold(Vec::new(), |mut codecs, &codec| {
                    if !codecs.contains(&codec) {
                        codecs.push(codec);
                    }
                    codecs
                }),
            tls,
            caller_auth,
            tls_client: Some(
                sip::tls_client_config(self.sip_tls_ca.as_deref())
                    .map_err(|why| anyhow::anyhow!("--sip-tls-ca: {why}"))?,
            ),
        }))
    }
}

/// A network (`10.0.0.0/8`) or one address (`192.0.2.7`).
fn parse_network(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{text:?} is neither a network like 10.0.0.0/8 nor an address"))
}

#[derive(Args)]
struct NetworkArgs {
    /// Address WebRTC media sockets bind; 0.0.0.0 offers every interface (plus loopback).
    #[arg(long, default_value = "0.0.0.0", env = "DUPLEX_UDP_BIND")]
    udp_bind: IpAddr,
    /// UDP ports for media, e.g. 40000-40100 (one per session); publish them from Docker/NAT.
    /// Without it the OS picks any free port.
    #[arg(long, env = "DUPLEX_UDP_PORTS")]
    udp_ports: Option<String>,
    /// Public IP announced in ICE candidates instead of local addresses (1:1 NAT, Docker, cloud).
    #[arg(long, env = "DUPLEX_PUBLIC_IP")]
    public_ip: Option<IpAddr>,
    /// Seconds without traffic before a peer counts as disconnected.
    #[arg(long, default_value_t = 5.0)]
    ice_disconnected_secs: f64,
    /// Further seconds after `disconnected` before the session is dropped and its slot freed.
    #[arg(long, default_value_t = 10.0)]
    ice_failed_secs: f64,
    /// Seconds a client has to connect after receiving the answer.
    #[arg(long, default_value_t = 20.0)]
    connect_timeout_secs: f64,
    #[command(flatten)]
    ice: IceArgs,
}

/// The STUN and TURN servers, for `serve` and `doctor`.
#[derive(Args)]
struct IceArgs {
    /// A STUN or TURN server (repeat, or comma-separate in DUPLEX_ICE_SERVERS), e.g.
    /// stun:stun.example.com:3478 or turn:turn.example.com:3478. The server's peers gather from
    /// it (a public address from STUN, a relay from TURN over UDP) and so does the page.
    #[arg(
        long = "ice-server",
        value_name = "URL",
        env = "DUPLEX_ICE_SERVERS",
        value_delimiter = ','
    )]
    ice_servers: Vec<String>,
    /// The secret shared with the TURN servers (coturn: use-auth-secret, static-auth-secret):
    /// each peer, and each page asking GET /api/ice, gets its own credential, valid for
    /// --turn-credential-secs.
    #[arg(long, env = "DUPLEX_TURN_SECRET", hide_env_values = true)]
    turn_secret: Option<String>,
    /// How long a credential minted from --turn-secret is valid: at least the longest call.
    #[arg(long, default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(60..=31_536_000))]
    turn_credential_secs: u64,
    /// The username of the TURN servers (they share one), instead of --turn-secret.
    #[arg(long, env = "DUPLEX_ICE_USERNAME")]
    ice_username: Option<String>,
    /// The credential of --ice-username. GET /api/ice hands it to the page: anyone with the
    /// page (and the --token, if set) can relay through the TURN servers.
    #[arg(long, env = "DUPLEX_ICE_CREDENTIAL", hide_env_values = true)]
    ice_credential: Option<String>,
    /// Send every call's media through the TURN server: peers, the server's and the page's,
    /// gather relay candidates only.
    #[arg(long, env = "DUPLEX_ICE_RELAY_ONLY", value_parser = clap::builder::FalseyValueParser::new())]
    ice_relay_only: bool,
}

impl IceArgs {
    /// The STUN and TURN URLs given, without empty items (`a,,b`, or an empty variable).
    fn ice_urls(&self) -> Vec<String> {
        self.ice_servers
            .iter()
            .map(|url| url.trim())
            .filter(|url| !url.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The TURN credentials given; an empty value (an unset variable in Compose) is none.
    fn turn_auth(&self) -> Result<TurnAuth> {
        let given = |value: &Option<String>| value.clone().filter(|v| !v.is_empty());
        let fixed = (given(&self.ice_username), given(&self.ice_credential));
        match (given(&self.turn_secret), fixed) {
            (Some(_), (Some(_), _) | (_, Some(_))) => {
                bail!(
                    "--turn-secret mints TURN credentials: leave out --ice-username and --ice-credential"
                )
            }
            (Some(secret), _) => Ok(TurnAuth::Secret {
                secret,
                lifetime: Duration::from_secs(self.turn_credential_secs),
            }),
            (None, (Some(username), Some(credential))) => Ok(TurnAuth::Fixed {
                username,
                credential,
            }),
            (None, (None, None)) => Ok(TurnAuth::None),
            (None, _) => bail!("--ice-username and --ice-credential go together"),
        }
    }

    fn config(&self) -> Result<IceConfig> {
        Ok(IceConfig::new(
            self.ice_urls(),
            self.turn_auth()?,
            self.ice_relay_only,
        )?)
    }
}

impl NetworkArgs {
    fn peer_settings(&self) -> Result<PeerSettings> {
        let ports = match &self.udp_ports {
            Some(text) => Some(
                ports::parse_range(text)
                    .map_err(anyhow::Error::msg)
                    .context("--udp-ports")?,
            ),
            None => None,
        };
        Ok(PeerSettings {
            bind_ip: self.udp_bind,
            public_ip: self.public_ip,
            ports: ports::PortPool::new(ports),
            ice_disconnected: Duration::from_secs_f64(self.ice_disconnected_secs),
            ice_failed: Duration::from_secs_f64(self.ice_failed_secs),
            connect_timeout: Duration::from_secs_f64(self.connect_timeout_secs),
            ice: self.ice.config()?,
        })
    }
}

#[derive(Subcommand)]
enum BenchCommand {
    /// End-to-end latency and capacity: an in-process server with N WebRTC client peers on loopback.
    Loopback(LoopbackArgs),
    /// Time of one model frame by stage (Mimi encode, temporal, depformer, Mimi decode).
    Step(StepArgs),
    /// CPU one stream's Opus costs, for each encoder setting the server uses.
    Opus(OpusBenchArgs),
}

#[derive(Args)]
struct OpusBenchArgs {
    /// Seconds of speech-like audio per pass.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct StepArgs {
    /// Model preset for random weights: personaplex-7b, moshiko, mid (d 1024, 8 layers).
    #[arg(long, default_value = "mid")]
    config: String,
    /// Use random weights (the default unless --model-dir is given).
    #[arg(long)]
    random_weights: bool,
    /// Real weights from this model directory instead.
    #[arg(long, conflicts_with = "random_weights")]
    model_dir: Option<PathBuf>,
    /// cpu, or cuda (needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Sessions stepped together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Of those, how many are in a conversation (the first ones; default: all): an engine sized
    /// for many sessions with few of them busy.
    #[arg(long)]
    busy: Option<usize>,
    /// Frames to time (after 3 warm-up frames).
    #[arg(long, default_value_t = 50)]
    frames: usize,
    /// Depformer steps per frame (8 serve the agent; 16 is what the reference runs).
    #[arg(long, default_value_t = 8)]
    dep_steps: usize,
    /// Frames each session has already heard, so attention reads that much history (up to the
    /// model's context; the default, a full context, is what a session sees after its first
    /// four minutes; 0 times a fresh session).
    #[arg(long)]
    history: Option<usize>,
    /// Replay each frame's pieces as CUDA graphs (`--device cuda`).
    #[arg(long)]
    cuda_graphs: bool,
    #[command(flatten)]
    kernel_choice: KernelChoice,
    /// Weight storage of the language model's matrices.
    #[arg(long, value_enum, default_value = "none")]
    quant: QuantArg,
    /// Storage of the temporal transformer's keys and values.
    #[arg(long, value_enum, default_value = "none")]
    kv_quant: KvQuantArg,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct LoopbackArgs {
    /// Client peers talking at once.
    #[arg(long, default_value_t = 1)]
    sessions: usize,
    /// Seconds each client talks (with --join-every-ms: the whole run's length).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Clients join one every this many ms and talk until the run ends, as callers arrive at
    /// a server: shows when it starts refusing them and whether those in keep real time.
    #[arg(long, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    join_every_ms: Option<u64>,
    /// Frames the echo engine waits before returning the audio.
    #[arg(long, default_value_t = 1)]
    echo_delay_frames: usize,
    /// Which engine answers: echo times the server's own latency by its echoed probes; a model
    /// (`personaplex`) shows whether every session keeps real time and how long steps take.
    #[arg(long, value_enum, default_value = "echo")]
    engine: EngineChoice,
    /// PersonaPlex with random weights of this preset (personaplex-7b, moshiko, mid) instead of
    /// a checkpoint (a --model-dir or DUPLEX_MODEL_DIR is then left unread): no download
    /// needed, the same work per frame, noise for an answer.
    #[arg(long, value_name = "PRESET")]
    random_weights: Option<String>,
    #[command(flatten)]
    admission: AdmissionArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    init_logging();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(*args)),
        Command::Local(args) => runtime.block_on(local(args)),
        Command::Offline(args) => offline(args),
        Command::Fetch(args) => runtime.block_on(fetch(args)),
        Command::Doctor(args) => doctor(args),
        Command::Bench(BenchCommand::Loopback(args)) => runtime.block_on(bench_loopback(args)),
        Command::Bench(BenchCommand::Step(args)) => bench_step(args),
        Command::Bench(BenchCommand::Opus(args)) => bench_opus(args),
        Command::Tune(args) => tune(args),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,webrtc=warn,rtc=warn"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

/// Logs what the STUN and TURN servers give this server, once, while the rest starts.
async fn report_ice_servers(peer: PeerSettings) {
    let servers = peer.ice.urls().join(" ");
    let relay_only = peer.ice.relay_only();
    match peer::check_ice_servers(&peer).await {
        Ok(found) => tracing::info!(%servers, relay_only, "STUN/TURN servers: {found}"),
        Err(missing) => tracing::warn!(
            %servers,
            relay_only,
            "STUN/TURN servers: {missing}; calls from outside this network may not connect"
        ),
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    // Checked before the weights load: a typo in a flag should not cost minutes.
    let peer = args.network.peer_settings()?;
    let tls = match tls_source(&args) {
        Some(source) => Some(tls::setup(&source).await.context("setting up TLS")?),
        None => None,
    };
    let sip_settings = args.sip.settings(
        args.host,
        tls.as_ref().map(|setup| setup.config.get_inner()),
    )?;
    if !peer.ice.is_empty() {
        if peer.ice.has_turn() && args.token.is_none() {
            tracing::warn!(
                "GET /api/ice (and WHIP's Link headers) hand TURN credentials to anyone who can reach this port: set --token (DUPLEX_TOKEN) to keep strangers from relaying through your TURN server"
            );
        }
        tokio::spawn(report_ice_servers(peer.clone()));
    }
    let metrics = Arc::new(Metrics::new());
    let config = args.admission.engine_config(args.max_sessions);
    let engine = match weights_for(args.engine, &args.model)? {
        Some(source) => {
            let slots = args.max_sessions;
            start_personaplex(source, &args.model, slots, config, metrics).await?
        }
        None => start_engine(
            EchoEngine::new(args.max_sessions, args.echo_delay_frames),
            config,
            metrics,
        )?,
    };
    if let Some(notice) = &engine.info().notice {
        tracing::warn!("{notice}");
    }
    let gateway = GatewayConfig {
        token: args.token.clone(),
        peer,
    };
    let state = AppState::new(engine.clone(), gateway);
    let addr = SocketAddr::new(args.host, args.port);
    let server = Server::bind(addr, state)
        .await
        .with_context(|| format!("binding HTTP on {addr}"))?;
    if let Some(settings) = sip_settings {
        let sip = SipServer::bind(&settings, server.state().clone())
            .await
            .with_context(|| {
                let tls = settings
                    .tls
                    .as_ref()
                    .map(|tls| format!(" (tls {})", tls.bind));
                format!(
                    "binding SIP on {}{}",
                    settings.bind,
                    tls.unwrap_or_default()
                )
            })?;
        let allow: Vec<String> = settings.allow.iter().map(ToString::to_string).collect();
        let codecs: Vec<&str> = settings.codecs.iter().map(|c| c.name()).collect();
        let tcp = if sip.has_tcp() { " and tcp" } else { "" };
        let tls = match sip.tls_addr() {
            Some(addr) => format!(", tls {addr}"),
            None => String::new(),
        };
        let password = match settings.caller_auth {
            Some(_) => " with the --sip-caller-auth password",
            None => "",
        };
        tracing::info!(
            "answering SIP calls on udp {}{tcp}{tls} ({} over RTP) from {}{password}; \
POST /api/calls places them",
            sip.local_addr()?,
            codecs.join(", "),
            allow.join(", ")
        );
        server.state().set_dialer(sip.dialer());
        tokio::spawn(sip.run());
    }
    let local = server.local_addr()?;
    let shown = if local.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), local.port())
    } else {
        local
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let (name, sessions) = (engine.info().name, engine.max_sessions());
    tracing::info!("serving on {scheme}://{shown}/ (engine: {name}, up to {sessions} sessions)");
    match tls {
        Some(setup) => {
            if !setup.names.is_empty() {
                tracing::info!(
                    cert = %setup.cert_path.display(),
                    "self-signed certificate for {}: browsers warn once; on a phone open https://{}:{}/ and accept it",
                    setup.names.join(", "),
                    tls::lan_address().map(|ip| ip.to_string()).unwrap_or_else(|| "<this machine's address>".into()),
                    local.port()
                );
            }
            server.run_tls(setup.config, shutdown_signal()).await?;
        }
        None => server.run(shutdown_signal()).await?,
    }
    engine.shutdown();
    tracing::info!("stopped");
    Ok(())
}

/// The certificate `--tls-cert`/`--tls-key` or `--tls-self-signed` asks for.
fn tls_source(args: &ServeArgs) -> Option<TlsSource> {
    match (&args.tls_cert, &args.tls_key, args.tls_self_signed) {
        (Some(cert), Some(key), _) => Some(TlsSource::Files {
            cert: cert.clone(),
            key: key.clone(),
        }),
        (_, _, true) => Some(TlsSource::SelfSigned {
            dir: args.tls_dir.clone().unwrap_or_else(tls::default_dir),
        }),
        _ => None,
    }
}

fn start_engine(
    engine: impl Engine,
    config: EngineConfig,
    metrics: Arc<Metrics>,
) -> Result<EngineHandle> {
    EngineHandle::start(engine, config, metrics).context("starting the step loop")
}

/// Loads PersonaPlex for `slots` sessions, prefills the default persona and times steps of
/// every row bucket: the output phase follows the slowest step served, and unless overloaded
/// only as many sessions are admitted as step within the budget.
async fn start_personaplex(
    source: ModelSource,
    model: &ModelArgs,
    slots: usize,
    mut config: EngineConfig,
    metrics: Arc<Metrics>,
) -> Result<EngineHandle> {
    let model = model.clone();
    let quant = model.quant;
    let (engine, on_gpu) = tokio::task::spawn_blocking(move || -> Result<(PersonaPlexEngine, bool)> {
        model.prepare_kernels(&source, slots)?;
        let cfg = model.pipeline_config()?;
        tracing::info!(from = %source.origin(), "loading PersonaPlex ({}); this can take a while", cfg.describe());
        let started = std::time::Instant::now();
        let pipeline = source.load(&cfg)?;
        tracing::info!(seconds = started.elapsed().as_secs_f32(), "model loaded");
        let model_name = source.name(&model.repo);
        let options = PersonaPlexOptions { slots, sampling: model.sampling(), seed: None, model_name };
        Ok((PersonaPlexEngine::new(pipeline, options)?, cfg.device.is_cuda()))
    })
    .await??;
    let mut engine = engine;
    let persona = engine.info().catalog.resolve(&PersonaRequest::default())?;
    let warm = engine.warm_up(&persona, 3)?;
    let ms = |step: std::time::Duration| step.as_secs_f32() * 1000.0;
    let steps: Vec<String> = warm
        .buckets
        .iter()
        .map(|&(busy, step)| format!("{busy}: {:.1} ms", ms(step)))
        .collect();
    tracing::info!(
        "warm-up done; slowest step by sessions at once: {}",
        steps.join(", ")
    );
    let asked = config.max_sessions.min(engine.slots());
    let admission = warm.admit(asked, config.step_budget, config.overload);
    let (admitted, slowest) = (admission.sessions, admission.slowest_step);
    let budget = config.step_budget.as_millis();
    let more = more_sessions_hint(on_gpu, quant);
    if !admission.real_time {
        tracing::warn!(
            "{admitted} sessions at once take {:.1} ms a step on this machine, over the {budget} ms \
             step budget (--step-budget-ms): conversations will lag and drop frames{more}",
            ms(slowest)
        );
    }
    if admitted < asked {
        tracing::warn!(
            "admitting {admitted} of {asked} sessions at once: more would take a step past the {budget} ms \
             budget (--overload admits {asked}; --step-budget-ms sets the budget){more}"
        );
    }
    config.max_sessions = admitted;
    config.output_phase =
        (slowest + std::time::Duration::from_millis(5)).min(std::time::Duration::from_millis(75));
    start_engine(engine, config, metrics)
}

/// What would keep more sessions in real time, as the end of a warning.
fn more_sessions_hint(on_gpu: bool, quant: QuantArg) -> &'static str {
    match (on_gpu, quant) {
        (false, _) => "; a build with --features cuda on a GPU serves more",
        (true, QuantArg::Int8) => {
            "; int8 weights are about 2x slower than bf16 from 8 sessions at once \
             (docs/benchmarks.md): without --quant int8 more keep up"
        }
        (true, QuantArg::None) => "",
    }
}

async fn local(args: LocalArgs) -> Result<()> {
    if args.list_devices {
        print!("{}", duplex::local::list_devices()?);
        return Ok(());
    }
    let source = weights_for(args.engine, &args.model)?;
    let (model, delay) = (args.model.clone(), args.echo_delay_frames);
    tokio::task::spawn_blocking(move || match source {
        Some(source) => {
            model.prepare_kernels(&source, 1)?;
            let cfg = model.pipeline_config()?;
            tracing::info!(from = %source.origin(), "loading PersonaPlex ({})", cfg.describe());
            let pipeline = source.load(&cfg)?;
            let options = PersonaPlexOptions {
                slots: 1,
                sampling: model.sampling(),
                seed: None,
                model_name: model.repo.clone(),
            };
            local_with(PersonaPlexEngine::new(pipeline, options)?, args)
        }
        None => local_with(EchoEngine::new(1, delay), args),
    })
    .await?
}

fn local_with(engine: impl Engine, args: LocalArgs) -> Result<()> {
    let persona = PersonaRequest {
        voice: args.voice,
        prompt: args.prompt,
    };
    if let (Some(input), Some(output)) = (args.input, args.output) {
        let options = duplex::local::FileOptions {
            input,
            output: output.clone(),
            realtime: args.realtime,
            persona,
        };
        let report = duplex::local::run_files(engine, &options)?;
        tracing::info!(
            frames = report.frames,
            seconds = report.elapsed.as_secs_f32(),
            output = %output.display(),
            "done"
        );
        println!("{}", report.text.concat().trim());
        return Ok(());
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_on_signal = stop.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(runtime) = runtime {
            runtime.block_on(shutdown_signal());
            stop_on_signal.store(true, std::sync::atomic::Ordering::Release);
        }
    });
    let options = duplex::local::DeviceOptions {
        input_device: args.input_device,
        output_device: args.output_device,
        aec: !args.no_aec,
        persona,
    };
    let stats = duplex::local::run_devices(engine, &options, &stop, |piece| {
        print!("{piece}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    })?;
    println!();
    tracing::info!(?stats, "stopped");
    Ok(())
}

fn offline(args: OfflineArgs) -> Result<()> {
    if let Ok(files) = ModelFiles::locate(args.model.model_dir.as_deref(), DEFAULT_REPO) {
        args.model.prepare_kernels(&ModelSource::Files(files), 1)?;
    }
    let pipeline = args.model.pipeline_config()?;
    let options = OfflineOptions {
        model_dir: args.model.model_dir.clone(),
        input: args.input,
        output: args.output.clone(),
        tokens: args.tokens,
        voice: args.voice,
        voice_wav: args.voice_wav,
        prompt: args.prompt,
        seed: args.seed,
        greedy: args.model.greedy,
        pipeline,
    };
    let report = duplex::offline::run(&options)?;
    tracing::info!(frames = report.frames.len(), output = %args.output.display(), "done");
    println!("{}", report.transcript.trim());
    Ok(())
}

fn doctor(args: DoctorArgs) -> Result<()> {
    let udp_ports = match &args.udp_ports {
        Some(text) => Some(
            ports::parse_range(text)
                .map_err(anyhow::Error::msg)
                .context("--udp-ports")?,
        ),
        None => None,
    };
    let options = duplex::doctor::DoctorOptions {
        host: args.host,
        port: args.port,
        udp_ports,
        model_dir: args.model_dir,
        repo: args.repo,
    };
    let mut report = duplex::doctor::examine(&options);
    let exe = std::env::current_exe().context("finding this program")?;
    report
        .checks
        .extend(duplex::tune::doctor_check(&exe, &duplex::tune::cache_dir()));
    let ice = args.ice.config()?;
    if !ice.is_empty() {
        let check = ice_check(PeerSettings {
            bind_ip: args.udp_bind,
            ice,
            ..Default::default()
        })?;
        report.ok &= check.status != duplex::doctor::Status::Fail;
        report.checks.push(check);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.table());
    }
    if !report.ok {
        std::process::exit(1);
    }
    Ok(())
}

/// `doctor`'s line for the STUN and TURN servers: what they gave a probe peer.
fn ice_check(settings: PeerSettings) -> Result<duplex::doctor::Check> {
    use duplex::doctor::{Check, Status};
    let runtime = tokio::runtime::Runtime::new()?;
    let servers = settings.ice.urls().join(" ");
    Ok(match runtime.block_on(peer::check_ice_servers(&settings)) {
        Ok(found) => Check {
            name: "ice",
            status: Status::Ok,
            detail: format!("{servers}: {found}"),
            fix: None,
        },
        Err(missing) => Check {
            name: "ice",
            status: Status::Fail,
            detail: format!("{servers}: {missing}"),
            fix: Some(
                "check that the servers are reachable over UDP from here and that the TURN \
                 credentials (--turn-secret, or --ice-username/--ice-credential) are the ones \
                 the TURN server expects"
                    .into(),
            ),
        },
    })
}

async fn fetch(args: FetchArgs) -> Result<()> {
    let options = FetchOptions {
        repo: args.repo,
        token: args.token,
        progress: true,
    };
    let files = duplex::fetch::fetch(&options).await?;
    println!("{}", files.dir.display());
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

/// The language model config of a preset or a model directory.
fn lm_config(preset: &str, model_dir: Option<&std::path::Path>) -> Result<LmConfig> {
    let source = match model_dir {
        Some(dir) => ModelSource::Files(ModelFiles::in_dir(dir)?),
        None => ModelSource::Random(preset.to_owned()),
    };
    source.lm_config()
}

fn tune(args: TuneArgs) -> Result<()> {
    let mut request = if args.matrices.is_empty() {
        let lm = lm_config(&args.config, args.model_dir.as_deref())?;
        TuneRequest::for_model(&lm, args.quant.into(), args.kv_quant.into(), args.max_rows)
    } else {
        TuneRequest {
            matrices: args.matrices,
            rings: Vec::new(),
            rows: duplex::model::kernel_plan::ROW_BUCKETS.to_vec(),
        }
    };
    if !args.rings.is_empty() {
        request.rings = args.rings;
    }
    if !args.rows.is_empty() {
        request.rows = args.rows.iter().map(|&r| usize::from(r)).collect();
    }
    let device = cuda_device()?;
    let plan =
        duplex::tune::measure_here(&device, &request, &args.exclude, args.progress.as_deref())?;
    println!("{}", plan.table());
    match duplex::tune::keep(&duplex::tune::cache_dir(), &plan) {
        Ok(path) => tracing::info!(path = %path.display(), "kernel plan kept"),
        // The server that asked for the plan reads it from --json and keeps it itself.
        Err(err) if args.json.is_some() => tracing::warn!("the kernel plan is not kept: {err:#}"),
        Err(err) => return Err(err),
    }
    if let Some(json) = args.json {
        duplex::tune::write_whole(&json, &serde_json::to_string_pretty(&plan)?)?;
    }
    Ok(())
}

fn bench_step(args: StepArgs) -> Result<()> {
    if args.device == "cuda" {
        let lm = lm_config(&args.config, args.model_dir.as_deref())?;
        prepare_kernels(
            args.kernel_choice.kernels,
            DeviceArg::Cuda,
            &lm,
            (args.quant, args.kv_quant),
            args.batch,
        );
    }
    let device = match args.device.as_str() {
        "cpu" => candle_core::Device::Cpu,
        "cuda" => duplex::model::open_gpu(0)
            .context("--device cuda (a build with --features cuda and a GPU are needed)")?,
        other => anyhow::bail!("unknown device {other:?}: cpu or cuda"),
    };
    let dtype = if device.is_cuda() {
        candle_core::DType::BF16
    } else {
        candle_core::DType::F32
    };
    let options = duplex::bench::step::StepBenchOptions {
        config: args.config,
        model_dir: args.model_dir,
        device,
        dtype,
        batch: args.batch,
        busy: args.busy,
        frames: args.frames,
        dep_steps: args.dep_steps,
        history: args.history,
        cuda_graphs: args.cuda_graphs,
        quant: args.quant.into(),
        kv_quant: args.kv_quant.into(),
    };
    let report = duplex::bench::step::run(&options)?;
    print_report(report.table(), &report, args.json.as_deref())
}

/// A benchmark's table, then its JSON on stdout and, when asked, in a file.
fn print_report(
    table: String,
    report: &impl serde::Serialize,
    json_path: Option<&std::path::Path>,
) -> Result<()> {
    println!("{table}");
    let json = serde_json::to_string_pretty(report)?;
    println!("{json}");
    if let Some(path) = json_path {
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn bench_opus(args: OpusBenchArgs) -> Result<()> {
    if !(args.seconds > 0.0 && args.seconds <= 3600.0) {
        anyhow::bail!("--seconds must be between 0 and 3600, got {}", args.seconds);
    }
    let report = duplex::bench::opus::run(args.seconds)?;
    print_report(report.table(), &report, args.json.as_deref())
}

async fn bench_loopback(args: LoopbackArgs) -> Result<()> {
    let options = LoopbackOptions {
        sessions: args.sessions,
        seconds: args.seconds,
        join_every: args.join_every_ms.map(Duration::from_millis),
    };
    let source = match (&args.random_weights, args.engine) {
        (Some(_), EngineChoice::Echo) => {
            anyhow::bail!("--random-weights is for the model: add --engine personaplex")
        }
        (Some(preset), _) => {
            if let Some(dir) = &args.model.model_dir {
                tracing::info!(dir = %dir.display(), "random weights: the model directory is left unread");
            }
            Some(ModelSource::Random(preset.clone()))
        }
        (None, engine) => weights_for(engine, &args.model)?,
    };
    let config = args.admission.engine_config(args.sessions);
    let engine = match source {
        Some(source) => {
            let metrics = Arc::new(Metrics::new());
            start_personaplex(source, &args.model, args.sessions, config, metrics).await?
        }
        None => loopback::echo_engine(config, args.echo_delay_frames)?,
    };
    let report = loopback::run(options, engine).await?;
    print_report(report.table(), &report, args.json.as_deref())
}
