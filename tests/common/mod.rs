//! Shared pieces of the integration tests: an in-process server on loopback and test speech.

#![allow(dead_code)]

use duplex::audio::{SAMPLE_RATE, signal, wav};
use duplex::engine::{EchoEngine, EngineConfig, EngineHandle};
use duplex::gateway::ice::IceConfig;
use duplex::gateway::{AppState, GatewayConfig, PeerSettings, Server};
use duplex::metrics::Metrics;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct TestServer {
    pub base_url: String,
    pub state: Arc<AppState>,
    pub metrics: Arc<Metrics>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Which engine the test server runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum TestEngine {
    Echo,
    /// PersonaPlex on the tiny checkpoint in tests/fixtures/tiny.
    TinyPersonaPlex,
}

pub struct ServerOptions {
    pub engine: TestEngine,
    pub max_sessions: usize,
    pub token: Option<String>,
    pub ice_disconnected: Duration,
    pub ice_failed: Duration,
    pub ice: IceConfig,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            engine: TestEngine::Echo,
            max_sessions: 4,
            token: None,
            ice_disconnected: Duration::from_secs(2),
            ice_failed: Duration::from_secs(2),
            ice: IceConfig::default(),
        }
    }
}

impl TestServer {
    pub async fn start(options: ServerOptions) -> Self {
        init_logging();
        let metrics = Arc::new(Metrics::new());
        let config = EngineConfig {
            max_sessions: options.max_sessions,
            ..Default::default()
        };
        let engine = match options.engine {
            TestEngine::Echo => EngineHandle::start(
                EchoEngine::new(options.max_sessions, 1),
                config,
                metrics.clone(),
            ),
            TestEngine::TinyPersonaPlex => EngineHandle::start(
                tiny_personaplex(options.max_sessions),
                config,
                metrics.clone(),
            ),
        }
        .unwrap();
        let peer = PeerSettings {
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            ice_disconnected: options.ice_disconnected,
            ice_failed: options.ice_failed,
            ice: options.ice,
            ..Default::default()
        };
        let state = AppState::new(
            engine,
            GatewayConfig {
                token: options.token,
                peer,
            },
        );
        let server = Server::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), state.clone())
            .await
            .unwrap();
        let base_url = format!("http://{}", server.local_addr().unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(stop.clone().cancelled_owned()));
        Self {
            base_url,
            state,
            metrics,
            stop,
            task,
        }
    }

    /// Whether every session has left the engine within `limit`.
    pub async fn sessions_end_within(&self, limit: Duration) -> bool {
        self.sessions_become(0, limit).await
    }

    /// Whether `count` sessions are in the engine within `limit`.
    pub async fn sessions_become(&self, count: usize, limit: Duration) -> bool {
        eventually(limit, || self.state.engine.active_sessions() == count).await
    }

    /// Shuts down like SIGTERM would and returns how long it took.
    pub async fn stop(self) -> Duration {
        let started = std::time::Instant::now();
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
        self.state.engine.shutdown();
        started.elapsed()
    }
}

/// The PersonaPlex engine on the tiny reference checkpoint.
pub fn tiny_personaplex(slots: usize) -> duplex::engine::personaplex::PersonaPlexEngine {
    use duplex::engine::personaplex::{PersonaPlexEngine, PersonaPlexOptions};
    use duplex::model::files::ModelFiles;
    use duplex::model::generate::SamplingConfig;
    use duplex::model::pipeline::{Pipeline, PipelineConfig};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    let pipeline = Pipeline::load(
        &ModelFiles::in_dir(&dir).unwrap(),
        &PipelineConfig::default(),
    )
    .unwrap();
    let options = PersonaPlexOptions {
        slots,
        sampling: SamplingConfig::DEFAULT,
        seed: Some(7),
        model_name: "tiny".into(),
    };
    PersonaPlexEngine::new(pipeline, options).unwrap()
}

pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Speech from espeak-ng at 24 kHz, or (where espeak-ng is missing) a speech-like signal.
pub fn speech(text: &str, seconds: f64) -> Vec<f32> {
    let len = (seconds * SAMPLE_RATE as f64) as usize;
    let mut pcm = espeak(text).unwrap_or_else(|| {
        eprintln!("espeak-ng or sox not found: using a synthetic speech-like signal");
        signal::speech_like(len, 5)
    });
    pcm.resize(len, 0.0);
    pcm
}

fn espeak(text: &str) -> Option<Vec<f32>> {
    let dir = scratch_dir("speech");
    let raw = dir.join("say.wav");
    let at_24k = dir.join("say24k.wav");
    let spoke = Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "160", "-w"])
        .arg(&raw)
        .arg(text)
        .status()
        .ok()?;
    let converted = Command::new("sox")
        .args(["-R", "-D"])
        .arg(&raw)
        .args(["-r", "24000", "-c", "1", "-b", "16"])
        .arg(&at_24k)
        .status()
        .ok()?;
    let pcm = (spoke.success() && converted.success())
        .then(|| wav::read_mono_24k(&at_24k).ok())
        .flatten();
    let _ = std::fs::remove_dir_all(&dir);
    pcm
}

/// A fresh scratch directory under the target dir, its own for each call: tests of one binary
/// run on parallel threads of one process.
pub fn scratch_dir(name: &str) -> PathBuf {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{name}-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Polls `check` every 50 ms until it holds or `limit` passes.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

/// The WebSocket URL of `path` on the test server.
pub fn ws_url(server: &TestServer, path: &str) -> String {
    format!("{}{path}", server.base_url.replacen("http://", "ws://", 1))
}

/// The resident set size of this process in KiB (Linux), for leak checks.
pub fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Speech from espeak-ng converted by sox to raw G.711 at 8 kHz (`encoding` is sox's: `u-law`
/// or `a-law`) or 16-bit little-endian PCM (`signed`) at `rate`; `None` where the tools are
/// missing. sox does the conversion so the client side does not share the server's codecs.
pub fn espeak_raw(text: &str, encoding: &str, rate: u32) -> Option<Vec<u8>> {
    let dir = scratch_dir("speech-raw");
    let raw = dir.join(format!("say-{encoding}-{rate}.wav"));
    let out = dir.join(format!("say-{encoding}-{rate}.raw"));
    let spoke = Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "160", "-w"])
        .arg(&raw)
        .arg(text)
        .status()
        .ok()?;
    let bits = if encoding == "signed" { "16" } else { "8" };
    let converted = Command::new("sox")
        .args(["-R", "-D"])
        .arg(&raw)
        .args([
            "-r",
            &rate.to_string(),
            "-c",
            "1",
            "-e",
            encoding,
            "-b",
            bits,
            "-t",
            "raw",
        ])
        .arg(&out)
        .status()
        .ok()?;
    if !spoke.success() || !converted.success() {
        return None;
    }
    std::fs::read(&out).ok()
}

/// The echo's correlation with what was sent: the mean over the voiced 500 ms segments of the
/// best correlation within 0.5 s, each segment on its own lag (the input drop policy may
/// shift the echo by a packet between segments), and the median lag in ms.
pub fn echo_correlation(sent: &[f32], received: &[f32], rate: u32) -> (f32, f64) {
    let segment = rate as usize / 2;
    let max_lag = rate as usize / 2;
    let mut found = Vec::new();
    for start in (0..sent.len().saturating_sub(segment)).step_by(segment) {
        let piece = &sent[start..start + segment];
        if signal::rms(piece) < 0.02 || start >= received.len() {
            continue;
        }
        let (lag, corr) = signal::best_lag(piece, &received[start..], max_lag);
        found.push((corr, lag));
    }
    assert!(found.len() >= 3, "too little speech to compare");
    let mean = found.iter().map(|f| f.0).sum::<f32>() / found.len() as f32;
    let mut lags: Vec<usize> = found.iter().map(|f| f.1).collect();
    lags.sort();
    (mean, lags[lags.len() / 2] as f64 * 1000.0 / rate as f64)
}

/// POSTs `sdp` to the server's WHIP endpoint (`/api/offer` with `query`).
pub async fn post_whip(base_url: &str, query: &str, sdp: String) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base_url}/api/offer{query}"))
        .header("content-type", "application/sdp")
        .body(sdp)
        .send()
        .await
        .unwrap()
}

/// An SDP offer from a webrtc-rs peer (kept alive by the returned value).
pub async fn duplex_offer() -> (String, impl Drop) {
    use duplex::gateway::peer::{opus_media_engine, opus_track};
    use std::sync::Arc;
    use webrtc::peer_connection::{
        PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    };
    struct Quiet;
    #[async_trait::async_trait]
    impl PeerConnectionEventHandler for Quiet {}
    /// Keeps the offering peer alive until the test is done with it.
    struct Holder(#[allow(dead_code)] Arc<dyn PeerConnection>);
    impl Drop for Holder {
        fn drop(&mut self) {}
    }
    let (media, registry) = opus_media_engine().unwrap();
    let pc: Arc<dyn PeerConnection> = Arc::new(
        PeerConnectionBuilder::new()
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_handler(Arc::new(Quiet))
            .with_udp_addrs(vec!["127.0.0.1:0"])
            .build()
            .await
            .unwrap(),
    );
    pc.add_track(opus_track("user").unwrap().0).await.unwrap();
    let offer = pc.create_offer(None).await.unwrap();
    pc.set_local_description(offer.clone()).await.unwrap();
    (offer.sdp, Holder(pc))
}

/// Runs `duplex serve` with `args` (echo engine, loopback, any port) until it logs a line
/// containing `needle` or `limit` passes; that line, then the server is killed.
pub fn serve_until_logged(args: &[&str], needle: &str, limit: Duration) -> Option<String> {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--engine",
            "echo",
        ])
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + limit;
    let mut seen = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => break Some(line),
            Ok(line) => seen.push(line),
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    if found.is_none() {
        eprintln!("no line with {needle:?} in:\n{}", seen.join("\n"));
    }
    found
}
