//! The `duplex` command line: `serve` and `bench`.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use duplex::bench::loopback::{self, LoopbackOptions};
use duplex::engine::{EchoEngine, EngineConfig, EngineHandle};
use duplex::gateway::{AppState, GatewayConfig, PeerSettings, Server, ports};
use duplex::metrics::Metrics;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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
    Serve(ServeArgs),
    /// Measure the server: `duplex bench loopback --sessions N --seconds S`.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Clone, Copy, ValueEnum)]
enum EngineChoice {
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
    /// Which engine answers. Until the speech model is built in, only the echo engine exists.
    #[arg(long, value_enum, default_value = "echo")]
    engine: EngineChoice,
    /// Frames (80 ms each) the echo engine waits before returning the audio.
    #[arg(long, default_value_t = 1)]
    echo_delay_frames: usize,
    /// Sessions served at once; further offers get 503 with Retry-After.
    #[arg(long, default_value_t = 64, env = "DUPLEX_MAX_SESSIONS")]
    max_sessions: usize,
    #[command(flatten)]
    network: NetworkArgs,
    /// Bearer token required on POST /api/offer and DELETE /api/sessions/* (also read from DUPLEX_TOKEN).
    #[arg(long, env = "DUPLEX_TOKEN", hide_env_values = true)]
    token: Option<String>,
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
        })
    }
}

#[derive(Subcommand)]
enum BenchCommand {
    /// End-to-end latency and capacity: an in-process server with N WebRTC client peers on loopback.
    Loopback(LoopbackArgs),
}

#[derive(Args)]
struct LoopbackArgs {
    /// Client peers talking at once.
    #[arg(long, default_value_t = 1)]
    sessions: usize,
    /// Seconds each client talks.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Frames the echo engine waits before returning the audio.
    #[arg(long, default_value_t = 1)]
    echo_delay_frames: usize,
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
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Bench(BenchCommand::Loopback(args)) => runtime.block_on(bench_loopback(args)),
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,webrtc=warn,rtc=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

async fn serve(args: ServeArgs) -> Result<()> {
    let metrics = Arc::new(Metrics::new());
    let engine = match args.engine {
        EngineChoice::Echo => EchoEngine::new(args.max_sessions, args.echo_delay_frames),
    };
    let config = EngineConfig {
        max_sessions: args.max_sessions,
        ..Default::default()
    };
    let engine = EngineHandle::start(engine, config, metrics).context("starting the step loop")?;
    if let Some(notice) = &engine.info().notice {
        tracing::warn!("{notice}");
    }
    let gateway = GatewayConfig {
        token: args.token.clone(),
        peer: args.network.peer_settings()?,
    };
    let state = AppState::new(engine.clone(), gateway);
    let addr = SocketAddr::new(args.host, args.port);
    let server = Server::bind(addr, state)
        .await
        .with_context(|| format!("binding HTTP on {addr}"))?;
    let local = server.local_addr()?;
    let shown = if local.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), local.port())
    } else {
        local
    };
    tracing::info!(
        "serving on http://{shown}/ (engine: {}, up to {} sessions)",
        engine.info().name,
        engine.max_sessions()
    );
    server.run(shutdown_signal()).await?;
    engine.shutdown();
    tracing::info!("stopped");
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

async fn bench_loopback(args: LoopbackArgs) -> Result<()> {
    let options = LoopbackOptions {
        sessions: args.sessions,
        seconds: args.seconds,
        echo_delay_frames: args.echo_delay_frames,
    };
    let report = loopback::run(options).await?;
    println!("{}", report.table());
    let json = serde_json::to_string_pretty(&report)?;
    println!("{json}");
    if let Some(path) = args.json {
        std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
