//! `duplex bench loopback`: an in-process server and N client peers on 127.0.0.1, each sending
//! chirp probes. Behind the echo engine the echoed probes are found by cross-correlation and
//! timed; behind a model, whose answer is no echo, the run measures whether every session kept
//! real time (drops, underruns, late ticks) and how long the steps took.
//!
//! Latency of a probe = when its echo would play on the client (packet arrival, no playout
//! buffer) − when its first sample was captured (20 ms before its packet was sent). The
//! floor of a frame-based server is 80 ms to gather a frame plus the engine's delay; what is
//! left is the tick phase, the output pacing phase, the Opus lookahead of both directions and
//! scheduling.

use super::client::{ClientOptions, ClientPeer, Recording, encode_packets};
use crate::audio::opus::{EncoderConfig, OpusEncoder};
use crate::audio::{
    FRAME_MS, FRAME_SAMPLES, PACKET_MS, PACKET_PERIOD, PACKET_SAMPLES, SAMPLE_RATE, samples_to_ms,
    signal,
};
use crate::engine::{EchoEngine, EngineConfig, EngineHandle};
use crate::gateway::{AppState, GatewayConfig, PeerSettings, Server};
use crate::metrics::{HistogramSnapshot, Metrics};
use anyhow::{Context, Result};
use bytes::Bytes;
use serde::Serialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// One probe: a 50 ms chirp.
const PROBE_SAMPLES: usize = 1200;
/// Probes are this far apart, so an echo can only belong to one of them.
const PROBE_SPACING_SAMPLES: usize = SAMPLE_RATE as usize;
/// Correlation above which a received window counts as the probe.
const PROBE_MATCH: f32 = 0.6;

#[derive(Debug, Clone)]
pub struct LoopbackOptions {
    pub sessions: usize,
    pub seconds: f64,
    /// Clients join this far apart, each talking until the run ends, as callers arrive at a
    /// server; none: every client joins before the run and talks all of it.
    pub join_every: Option<Duration>,
}

/// One client's try to join, in a run where they arrive over time.
#[derive(Debug, Clone, Serialize)]
pub struct Join {
    /// Seconds into the run the caller arrived (its offer was sent).
    pub at_seconds: f64,
    /// How long the server took to answer it, in ms.
    pub answered_after_ms: f64,
    /// `admitted`, `refused_full`, `refused_behind`, or `failed: why`.
    pub outcome: String,
    /// Sessions in the server once it was answered.
    pub sessions_in: usize,
}

/// The echo engine for `config.max_sessions` sessions, answering after `delay_frames` frames.
pub fn echo_engine(config: EngineConfig, delay_frames: usize) -> Result<EngineHandle> {
    let engine = EchoEngine::new(config.max_sessions, delay_frames);
    Ok(EngineHandle::start(
        engine,
        config,
        Arc::new(Metrics::new()),
    )?)
}

/// Percentiles of a set of milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        Self {
            count: sorted.len(),
            p50: at(0.5),
            p95: at(0.95),
            p99: at(0.99),
            max: sorted[sorted.len() - 1],
        }
    }
}

/// The fixed parts of the latency, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencyParts {
    /// The test client plays each packet on arrival.
    pub client_playout_ms: f64,
    /// A frame is complete only when its last sample has arrived.
    pub frame_gathering_ms: f64,
    pub engine_delay_ms: f64,
    /// Opus algorithmic delay: the client's encoder (voice) + the server's (the agent's).
    pub codec_lookahead_ms: f64,
}

/// The step loop's ticks during the run (all sessions stepped together), in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepTimes {
    pub ticks: u64,
    pub mean_ms: Option<f64>,
    /// The bound of the metrics' bucket that holds the 99th percentile (null in JSON with no
    /// ticks, or beyond the last bucket, 500 ms).
    pub p99_at_most_ms: Option<f64>,
}

impl StepTimes {
    fn of(run: &HistogramSnapshot) -> Self {
        Self {
            ticks: run.count,
            mean_ms: run.mean().map(|s| s * 1000.0),
            p99_at_most_ms: run.quantile_at_most(0.99).map(|s| s * 1000.0),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LoopbackReport {
    /// The engine behind the server, and its model.
    pub engine: String,
    pub sessions: usize,
    pub sessions_connected: usize,
    /// Sessions the server refused because it was full (its warm-up admitted fewer than asked)
    /// and because its steps ran behind real time as sessions joined.
    pub sessions_refused_full: u64,
    pub sessions_refused_behind: u64,
    /// The most sessions the server admits (for a model: those its warm-up found keep real
    /// time, unless `--overload`).
    pub sessions_admitted: usize,
    pub seconds: f64,
    /// Seconds between joins when clients arrive over time (`--join-every-ms`), and each
    /// client's join; none and empty when every client joined first.
    pub join_every_seconds: Option<f64>,
    pub joins: Vec<Join>,
    /// Mouth-to-ear latency of every echoed probe (echo engine only: a model answers no echo).
    pub latency_ms: Option<Percentiles>,
    /// Latency beyond frame gathering and the engine's own delay.
    pub added_ms: Option<Percentiles>,
    pub parts: LatencyParts,
    /// How late each packet of the agent's audio reached its client against a steady 20 ms
    /// grid through the packet most ahead of it: the playout buffer a client needs to play it
    /// without a gap (every engine; a model's too).
    pub arrival_lateness_ms: Percentiles,
    /// How long after a tick its output leaves (for a model: the slowest warm-up step of the
    /// sessions it admits, plus 5 ms).
    pub output_phase_ms: f64,
    pub steps: StepTimes,
    pub probes_sent: usize,
    pub probes_found: usize,
    pub frames_total: u64,
    /// The frames the worse side lost (`FrameLoss`), and that side's share of all frames.
    pub frames_dropped: f64,
    pub dropped_percent: f64,
    /// The user's audio the step loop dropped, in percent of all frames.
    pub input_lost_percent: f64,
    /// The agent's audio that never reached a client: dropped by a transport or never made
    /// because its tick was missed, in percent of all frames.
    pub output_lost_percent: f64,
    /// The drops by side, in 20 ms packets: input the step loop dropped, output the
    /// transports dropped.
    pub input_dropped_packets: f64,
    pub output_dropped_packets: f64,
    pub input_underruns: u64,
    pub output_underruns: u64,
    pub ticks_overrun: u64,
    pub ticks_missed: u64,
    /// CPU time of the whole process (server and clients) per session, in percent of one core.
    pub cpu_percent_per_session: Option<f64>,
    pub cpu_percent_total: Option<f64>,
    /// The server's part (everything but the client peers' threads), per session.
    pub server_cpu_percent_per_session: Option<f64>,
    /// The client peers' part, all of them together.
    pub clients_cpu_percent: Option<f64>,
    pub real_time: bool,
}

impl LoopbackReport {
    /// A human-readable table.
    pub fn table(&self) -> String {
        let p = &self.parts;
        let cpu = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1} %"));
        let ms = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1} ms"));
        let p99 = match self.steps.p99_at_most_ms {
            None => "n/a".to_owned(),
            Some(v) if v.is_infinite() => "above the histogram's last bucket".to_owned(),
            Some(v) => format!("at most {v:.1} ms"),
        };
        let row = |name: &str, l: &Option<Percentiles>| match l {
            Some(l) => format!(
                "{name:<34} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
                l.p50, l.p95, l.p99, l.max
            ),
            None => format!("{name:<34} n/a: the engine answers no echo to time"),
        };
        [
            format!(
                "loopback: {} sessions ({} connected; the server admits {}; refused {} full, {} behind real time), {:.0} s {}, engine {}",
                self.sessions, self.sessions_connected, self.sessions_admitted,
                self.sessions_refused_full, self.sessions_refused_behind, self.seconds,
                if self.join_every_seconds.is_some() { "in all" } else { "each" }, self.engine
            ),
            self.arrivals_line(),
            format!("{:<34} {:>8} {:>8} {:>8} {:>8}", "", "p50", "p95", "p99", "max"),
            row("end-to-end latency (ms)", &self.latency_ms),
            row("added beyond frame + engine (ms)", &self.added_ms),
            row("agent audio late vs 20 ms grid (ms)", &Some(self.arrival_lateness_ms)),
            format!(
                "parts (ms): client playout {:.0}, frame gathering {:.0}, engine delay {:.0}, opus lookahead {:.1}; output {:.1} after the tick",
                p.client_playout_ms, p.frame_gathering_ms, p.engine_delay_ms, p.codec_lookahead_ms, self.output_phase_ms
            ),
            format!(
                "steps: {} ticks, mean {}, p99 {p99} (a frame is {FRAME_MS} ms)",
                self.steps.ticks,
                ms(self.steps.mean_ms),
            ),
            format!("probes found: {}/{}", self.probes_found, self.probes_sent),
            format!(
                "frames: {} total, {:.1} lost ({:.3} %: in {:.3} %, out {:.3} %; packets dropped in {:.0} / out {:.0}), underruns in {} / out {}, ticks overrun {} missed {}",
                self.frames_total,
                self.frames_dropped,
                self.dropped_percent,
                self.input_lost_percent,
                self.output_lost_percent,
                self.input_dropped_packets,
                self.output_dropped_packets,
                self.input_underruns,
                self.output_underruns,
                self.ticks_overrun,
                self.ticks_missed
            ),
            format!(
                "cpu: {} per session, {} total; the server {} per session, the clients {} in all",
                cpu(self.cpu_percent_per_session),
                cpu(self.cpu_percent_total),
                cpu(self.server_cpu_percent_per_session),
                cpu(self.clients_cpu_percent)
            ),
            format!("real time: {}", if self.real_time { "yes" } else { "NO" }),
        ]
        .into_iter()
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
    }

    /// When clients arrived over time: how many got in, and the first refusal.
    fn arrivals_line(&self) -> String {
        let Some(every) = self.join_every_seconds else {
            return String::new();
        };
        let admitted = self
            .joins
            .iter()
            .filter(|j| j.outcome == "admitted")
            .count();
        let first_refusal = self
            .joins
            .iter()
            .find(|j| j.outcome.starts_with("refused"))
            .map_or("none refused".to_owned(), |j| {
                format!(
                    "first refused at {:.1} s ({}), with {} in",
                    j.at_seconds, j.outcome, j.sessions_in
                )
            });
        format!(
            "arrivals: one every {every:.2} s, {} tried, {admitted} admitted; {first_refusal}",
            self.joins.len()
        )
    }
}

/// The test signal: silence with a probe every second, starting half a second in.
fn probe_signal(seconds: f64) -> (Vec<f32>, Vec<usize>, Vec<f32>) {
    let packets = (seconds * SAMPLE_RATE as f64 / PACKET_SAMPLES as f64) as usize;
    let mut pcm = vec![0.0; packets * PACKET_SAMPLES];
    let probe = signal::chirp(PROBE_SAMPLES, 500.0, 4000.0, 0.5);
    let starts: Vec<usize> = (SAMPLE_RATE as usize / 2
        ..pcm.len().saturating_sub(PROBE_SAMPLES + FRAME_SAMPLES * 4))
        .step_by(PROBE_SPACING_SAMPLES)
        .collect();
    for &start in &starts {
        pcm[start..start + PROBE_SAMPLES].copy_from_slice(&probe);
    }
    (pcm, starts, probe)
}

/// Finds probe echoes: only windows around energy bursts are correlated, so the search is
/// linear in the recording's length.
pub fn find_probes(recording: &[f32], probe: &[f32]) -> Vec<usize> {
    let hop = PACKET_SAMPLES / 4;
    let loud: Vec<usize> = recording
        .chunks(hop)
        .enumerate()
        .filter(|(_, chunk)| signal::rms(chunk) > 0.02)
        .map(|(idx, _)| idx * hop)
        .collect();
    let mut found: Vec<usize> = Vec::new();
    for start in loud {
        if found
            .last()
            .is_some_and(|last| start < last + PROBE_SPACING_SAMPLES / 2)
        {
            continue;
        }
        let from = start.saturating_sub(PROBE_SAMPLES);
        let to = (start + PROBE_SAMPLES * 2).min(recording.len());
        let hits =
            signal::find_occurrences(&recording[from..to], probe, PROBE_MATCH, PROBE_SAMPLES);
        if let Some(best) = hits.iter().max_by(|a, b| a.1.total_cmp(&b.1)) {
            found.push(from + best.0);
        }
    }
    found
}

/// Latencies (ms) of each echoed probe found in `recording`.
fn probe_latencies(
    recording: &Recording,
    sent: &[Instant],
    starts: &[usize],
    probe: &[f32],
) -> Vec<f64> {
    let capture = |sample_idx: usize| -> Option<Instant> {
        let packet_sent = *sent.get(sample_idx / PACKET_SAMPLES)?;
        let into_packet =
            Duration::from_secs_f64((sample_idx % PACKET_SAMPLES) as f64 / SAMPLE_RATE as f64);
        Some(packet_sent - Duration::from_millis(PACKET_MS) + into_packet)
    };
    let mut latencies = Vec::new();
    let mut used = vec![false; starts.len()];
    for echo_idx in find_probes(&recording.pcm, probe) {
        let Some(played) = recording.play_time(echo_idx) else {
            continue;
        };
        let candidate = starts
            .iter()
            .enumerate()
            .filter_map(|(probe_idx, &start)| {
                Some((probe_idx, played.checked_duration_since(capture(start)?)?))
            })
            .filter(|(_, latency)| *latency < Duration::from_millis(900))
            .min_by_key(|(_, latency)| *latency);
        if let Some((probe_idx, latency)) = candidate
            && !used[probe_idx]
        {
            used[probe_idx] = true;
            latencies.push(latency.as_secs_f64() * 1000.0);
        }
    }
    latencies
}

/// How late each packet of `recording` arrived (ms) against a steady 20 ms grid through the
/// packet most ahead of it; a packet's place on the grid is its RTP sequence number, so one
/// lost on the way does not move the packets after it.
fn arrival_lateness(recording: &Recording) -> Vec<f64> {
    let (Some(&(_, start)), Some(&first_number)) = (
        recording.arrivals.first(),
        recording.sequence_numbers.first(),
    ) else {
        return Vec::new();
    };
    let mut place = 0i64;
    let mut previous = first_number;
    let offsets: Vec<f64> = recording
        .arrivals
        .iter()
        .zip(&recording.sequence_numbers)
        .map(|(&(_, at), &number)| {
            place += i64::from(number.wrapping_sub(previous) as i16);
            previous = number;
            let due = place as f64 * PACKET_MS as f64;
            (at - start).as_secs_f64() * 1000.0 - due
        })
        .collect();
    let earliest = offsets.iter().copied().fold(f64::INFINITY, f64::min);
    offsets.iter().map(|offset| offset - earliest).collect()
}

/// Names the threads of the runtime the client peers run on, so their CPU time can be told
/// apart from the server's.
const CLIENT_THREADS: &str = "bench-client";

/// CPU seconds used so far: (by the whole process, by the client peers' threads). Linux only
/// (`None` elsewhere).
fn cpu_seconds() -> Option<(f64, f64)> {
    let (_, all) = thread_cpu(std::path::Path::new("/proc/self/stat"))?;
    let clients = std::fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .filter_map(|task| thread_cpu(&task.path().join("stat")))
        .filter(|(name, _)| name.starts_with(CLIENT_THREADS))
        .map(|(_, seconds)| seconds)
        .sum();
    Some((all, clients))
}

/// A thread's (or the process's) name and CPU seconds from its `stat` file.
fn thread_cpu(stat_path: &std::path::Path) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    let (head, tail) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some((name, ticks / 100.0))
}

struct Counters {
    input_dropped: u64,
    output_dropped: u64,
    input_underruns: u64,
    output_underruns: u64,
    overrun: u64,
    missed: u64,
}

fn counters(metrics: &Metrics) -> Counters {
    Counters {
        input_dropped: metrics.input_dropped_samples.get(),
        output_dropped: metrics.output_dropped_samples.get(),
        input_underruns: metrics.input_underruns.get(),
        output_underruns: metrics.output_underruns.get(),
        overrun: metrics.ticks_overrun.get(),
        missed: metrics.ticks_missed.get(),
    }
}

/// Connects `sessions` client peers on `runtime`; those that fail are logged and left out.
async fn connect_clients(
    runtime: &tokio::runtime::Runtime,
    base_url: &str,
    sessions: usize,
) -> Result<Vec<ClientPeer>> {
    let mut clients = Vec::with_capacity(sessions);
    for _ in 0..sessions {
        let options = ClientOptions {
            base_url: base_url.to_owned(),
            ..Default::default()
        };
        match runtime.spawn(ClientPeer::connect(options)).await? {
            Ok(client) => clients.push(client),
            Err(err) => tracing::warn!(%err, "a client could not connect"),
        }
    }
    Ok(clients)
}

/// Every client sends `packets` in real time, all at once but each at its own phase.
async fn play_all(
    runtime: &tokio::runtime::Runtime,
    clients: Vec<ClientPeer>,
    packets: Arc<Vec<Bytes>>,
) -> Result<Vec<Talker>> {
    // People join at unrelated moments, so their packets reach the server at unrelated phases
    // of the 20 ms grid: client `idx` starts `idx / count` of a packet period after the first.
    let count = clients.len().max(1) as u32;
    let players: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(idx, mut client)| {
            let packets = packets.clone();
            let phase = PACKET_PERIOD * idx as u32 / count;
            runtime.spawn(async move {
                tokio::time::sleep(phase).await;
                let sent = client.play_encoded(&packets).await;
                (client, sent)
            })
        })
        .collect();
    let mut finished = Vec::with_capacity(players.len());
    for player in players {
        let (client, sent) = player.await.context("client task")?;
        finished.push(Talker {
            client,
            sent: sent?,
            first_packet: 0,
        });
    }
    Ok(finished)
}

/// A client talking in the run, from packet `first_packet` of the signal on.
struct Talker {
    client: ClientPeer,
    sent: Vec<Instant>,
    first_packet: usize,
}

impl Talker {
    /// Where the signal's probes fall in what this talker sent, from half a second in (a
    /// session just admitted settles into its tick phase first, as before a run).
    fn probe_starts(&self, starts: &[usize]) -> Vec<usize> {
        let skipped = self.first_packet * PACKET_SAMPLES;
        starts
            .iter()
            .filter(|&&start| start >= skipped + SAMPLE_RATE as usize / 2)
            .map(|start| start - skipped)
            .collect()
    }

    /// The frames this talker's audio spans (a last one cut short counts in part).
    fn frames(&self, packets_total: usize) -> f64 {
        let packets = packets_total.saturating_sub(self.first_packet);
        (packets as u64 * PACKET_MS) as f64 / FRAME_MS as f64
    }
}

/// Clients join one every `every`, each talking from the signal's packet the run is at, so all
/// stop together; returns those admitted, and every join.
async fn arrive_and_play(
    runtime: &tokio::runtime::Runtime,
    base_url: &str,
    engine: &EngineHandle,
    sessions: usize,
    every: Duration,
    packets: Arc<Vec<Bytes>>,
) -> Result<(Vec<Talker>, Vec<Join>)> {
    let metrics = engine.metrics().clone();
    let refused = |reason| metrics.sessions_rejected.with_label_values(&[reason]).get();
    let run_length = PACKET_PERIOD * packets.len() as u32;
    let start = tokio::time::Instant::now();
    let mut joins = Vec::new();
    let mut players = Vec::new();
    for idx in 0..sessions as u32 {
        tokio::time::sleep_until(start + every * idx).await;
        // A connect slower than the interval delays the callers after it: none past the end.
        if start.elapsed() >= run_length {
            break;
        }
        let arrived = start.elapsed();
        let (full, behind) = (refused("full"), refused("behind"));
        let options = ClientOptions {
            base_url: base_url.to_owned(),
            ..Default::default()
        };
        let connected = runtime.spawn(ClientPeer::connect(options)).await?;
        let outcome = match &connected {
            Ok(_) => "admitted".to_owned(),
            Err(_) if refused("behind") > behind => "refused_behind".to_owned(),
            Err(_) if refused("full") > full => "refused_full".to_owned(),
            Err(err) => format!("failed: {err:#}"),
        };
        joins.push(Join {
            at_seconds: arrived.as_secs_f64(),
            answered_after_ms: (start.elapsed() - arrived).as_secs_f64() * 1000.0,
            outcome,
            sessions_in: engine.active_sessions(),
        });
        let Ok(mut client) = connected else {
            continue;
        };
        let first_packet = (start.elapsed().as_millis() / PACKET_MS as u128) as usize;
        if first_packet >= packets.len() {
            let _ = client.close().await;
            continue;
        }
        let packets = packets.clone();
        players.push(runtime.spawn(async move {
            let sent = client.play_encoded(&packets[first_packet..]).await;
            sent.map(|sent| Talker {
                client,
                sent,
                first_packet,
            })
        }));
    }
    let mut talkers = Vec::with_capacity(players.len());
    for player in players {
        talkers.push(player.await.context("client task")??);
    }
    Ok((talkers, joins))
}

/// Runs the benchmark against `engine` (started for at least `options.sessions` sessions), and
/// shuts the engine down at the end.
pub async fn run(options: LoopbackOptions, engine: EngineHandle) -> Result<LoopbackReport> {
    let metrics = engine.metrics().clone();
    let info = engine.info().clone();
    let echoes = info.name == "echo";
    let output_phase = engine.output_schedule().1;
    let sessions_admitted = engine.max_sessions();
    let peer = PeerSettings {
        bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        ..Default::default()
    };
    let state = AppState::new(engine.clone(), GatewayConfig { token: None, peer });
    let server = Server::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), state).await?;
    let base_url = format!("http://{}", server.local_addr()?);
    let stop = CancellationToken::new();
    let server_task = tokio::spawn(server.run(stop.clone().cancelled_owned()));

    // The client peers run on their own threads, so the server's CPU time can be told apart.
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(CLIENT_THREADS)
        .enable_all()
        .build()?;
    let (pcm, starts, probe) = probe_signal(options.seconds);
    let packets = Arc::new(encode_packets(&pcm)?);
    let packets_total = packets.len();
    let clients = match options.join_every {
        Some(_) => Vec::new(),
        None => {
            let clients = connect_clients(&client_runtime, &base_url, options.sessions).await?;
            // Let every session settle into its tick phase before measuring.
            tokio::time::sleep(Duration::from_millis(500)).await;
            clients
        }
    };
    let before = counters(&metrics);
    let steps_before = HistogramSnapshot::of(&metrics.step_seconds);
    let cpu_before = cpu_seconds();
    let wall_start = Instant::now();
    let (finished, joins) = match options.join_every {
        None => (
            play_all(&client_runtime, clients, packets).await?,
            Vec::new(),
        ),
        Some(every) => {
            let sessions = options.sessions;
            arrive_and_play(
                &client_runtime,
                &base_url,
                &engine,
                sessions,
                every,
                packets,
            )
            .await?
        }
    };
    let connected = finished.len();
    let wall = wall_start.elapsed().as_secs_f64();
    let cpu = cpu_before
        .zip(cpu_seconds())
        .map(|((all, clients), (all_after, clients_after))| {
            (all_after - all, clients_after - clients)
        });
    let after = counters(&metrics);
    let steps = HistogramSnapshot::of(&metrics.step_seconds).since(&steps_before);
    // The last probe's echo is already back (probes stop four frames before the end); this
    // only lets in-flight packets land.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut latencies = Vec::new();
    let mut lateness = Vec::new();
    let mut probes_sent = 0;
    let mut frames_spanned = 0.0;
    for talker in &finished {
        let recording = talker.client.recording();
        lateness.extend(arrival_lateness(&recording));
        let own_starts = talker.probe_starts(&starts);
        frames_spanned += talker.frames(packets_total);
        if echoes {
            probes_sent += own_starts.len();
            latencies.extend(probe_latencies(
                &recording,
                &talker.sent,
                &own_starts,
                &probe,
            ));
        }
    }
    for talker in finished {
        let _ = talker.client.close().await;
    }
    client_runtime.shutdown_background();
    stop.cancel();
    let _ = server_task.await;
    engine.shutdown();

    let engine_delay_ms = (info.delay_frames as u64 * FRAME_MS) as f64;
    let floor = FRAME_MS as f64 + engine_delay_ms;
    let added: Vec<f64> = latencies.iter().map(|l| l - floor).collect();
    let lookahead_ms = |config| -> Result<f64> {
        Ok(samples_to_ms(
            OpusEncoder::new(config)?.lookahead_samples()? as u64,
        ))
    };
    let codec_lookahead_ms =
        lookahead_ms(EncoderConfig::default())? + lookahead_ms(EncoderConfig::agent())?;
    let frames_total = frames_spanned as u64;
    let input_dropped = after.input_dropped - before.input_dropped;
    let output_dropped = after.output_dropped - before.output_dropped;
    let missed = after.missed - before.missed;
    let loss = FrameLoss {
        input_dropped_samples: input_dropped,
        output_dropped_samples: output_dropped,
        ticks_missed: missed,
        sessions: connected as u64,
        frames_total,
    };
    let dropped_percent = loss.percent();
    let percent = |seconds: f64| 100.0 * seconds / wall;
    let sessions = connected.max(1) as f64;
    // Arriving callers may be refused; those admitted must keep real time.
    let everyone_in = match options.join_every {
        Some(_) => connected > 0 && !joins.iter().any(|j| j.outcome.starts_with("failed")),
        None => connected == options.sessions,
    };
    let real_time =
        everyone_in && dropped_percent <= 0.1 && latencies.len() * 100 >= probes_sent * 99;
    let refused = |reason| metrics.sessions_rejected.with_label_values(&[reason]).get();
    let engine = match &info.model {
        Some(model) => format!("{} ({model})", info.name),
        None => info.name.to_owned(),
    };
    Ok(LoopbackReport {
        engine,
        sessions: options.sessions,
        sessions_connected: connected,
        sessions_refused_full: refused("full"),
        sessions_refused_behind: refused("behind"),
        sessions_admitted,
        seconds: options.seconds,
        join_every_seconds: options.join_every.map(|every| every.as_secs_f64()),
        joins,
        latency_ms: echoes.then(|| Percentiles::of(&latencies)),
        added_ms: echoes.then(|| Percentiles::of(&added)),
        parts: LatencyParts {
            client_playout_ms: 0.0,
            frame_gathering_ms: FRAME_MS as f64,
            engine_delay_ms,
            codec_lookahead_ms,
        },
        arrival_lateness_ms: Percentiles::of(&lateness),
        output_phase_ms: output_phase.as_secs_f64() * 1000.0,
        steps: StepTimes::of(&steps),
        probes_sent,
        probes_found: latencies.len(),
        frames_total,
        frames_dropped: loss.input_frames().max(loss.output_frames()),
        dropped_percent,
        input_lost_percent: loss.share(loss.input_frames()),
        output_lost_percent: loss.share(loss.output_frames()),
        input_dropped_packets: input_dropped as f64 / PACKET_SAMPLES as f64,
        output_dropped_packets: output_dropped as f64 / PACKET_SAMPLES as f64,
        input_underruns: after.input_underruns - before.input_underruns,
        output_underruns: after.output_underruns - before.output_underruns,
        ticks_overrun: after.overrun - before.overrun,
        ticks_missed: missed,
        cpu_percent_per_session: cpu.map(|(all, _)| percent(all) / sessions),
        cpu_percent_total: cpu.map(|(all, _)| percent(all)),
        server_cpu_percent_per_session: cpu.map(|(all, clients)| percent(all - clients) / sessions),
        clients_cpu_percent: cpu.map(|(_, clients)| percent(clients)),
        real_time,
    })
}

/// What a run lost, by side. A missed tick loses a frame on both sides (its input is dropped
/// later for latency, and its output is never made), so adding the sides would count it twice:
/// the run's loss is the worse side's.
struct FrameLoss {
    input_dropped_samples: u64,
    output_dropped_samples: u64,
    ticks_missed: u64,
    sessions: u64,
    frames_total: u64,
}

impl FrameLoss {
    fn input_frames(&self) -> f64 {
        self.input_dropped_samples as f64 / FRAME_SAMPLES as f64
    }

    fn output_frames(&self) -> f64 {
        self.output_dropped_samples as f64 / FRAME_SAMPLES as f64
            + (self.ticks_missed * self.sessions) as f64
    }

    /// `frames` in percent of all frames; at most 100 (a tick already late when counting
    /// began counts its missed ticks inside the run).
    fn share(&self, frames: f64) -> f64 {
        match self.frames_total {
            0 => 0.0,
            total => (100.0 * frames / total as f64).min(100.0),
        }
    }

    fn percent(&self) -> f64 {
        self.share(self.input_frames().max(self.output_frames()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missed_tick_is_lost_once_not_once_per_side() {
        // Two sessions, 100 frames each; 30 ticks missed, whose input was dropped later.
        let loss = FrameLoss {
            input_dropped_samples: 60 * FRAME_SAMPLES as u64,
            output_dropped_samples: 0,
            ticks_missed: 30,
            sessions: 2,
            frames_total: 200,
        };
        assert_eq!((loss.input_frames(), loss.output_frames()), (60.0, 60.0));
        assert_eq!(loss.percent(), 30.0);
        let output_worse = FrameLoss {
            output_dropped_samples: 10 * FRAME_SAMPLES as u64,
            ..loss
        };
        assert_eq!(output_worse.percent(), 35.0);
    }

    #[test]
    fn percentiles_of_a_known_set() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&values);
        assert_eq!((p.count, p.p50, p.p99, p.max), (100, 51.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(&[]).count, 0);
    }

    #[test]
    fn lateness_is_measured_from_the_packet_most_ahead_of_the_grid() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // Packets due every 20 ms, numbered across the u16 wrap: the second 5 ms early, the
        // fourth 12 ms late, the fifth lost, the sixth on time.
        let recording = Recording {
            pcm: vec![0.0; 5 * PACKET_SAMPLES],
            arrivals: [0, 15, 40, 72, 100]
                .into_iter()
                .enumerate()
                .map(|(k, ms)| (k * PACKET_SAMPLES, at(ms)))
                .collect(),
            sequence_numbers: vec![65534, 65535, 0, 1, 3],
            packets: 5,
        };
        let lateness = arrival_lateness(&recording);
        let expected = [5.0, 0.0, 5.0, 17.0, 5.0];
        assert!(
            lateness
                .iter()
                .zip(expected)
                .all(|(got, want)| (got - want).abs() < 1e-6),
            "{lateness:?}"
        );
        assert!(arrival_lateness(&Recording::default()).is_empty());
    }

    #[test]
    fn probes_are_found_where_they_were_echoed() {
        let (pcm, starts, probe) = probe_signal(5.0);
        let mut echoed = vec![0.0; 3000];
        echoed.extend_from_slice(&pcm);
        let found = find_probes(&echoed, &probe);
        let expected: Vec<usize> = starts.iter().map(|s| s + 3000).collect();
        assert_eq!(found, expected);
    }
}
