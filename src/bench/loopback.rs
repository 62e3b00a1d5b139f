//! `duplex bench loopback`: an in-process echo server and N client peers on 127.0.0.1, each
//! sending chirp probes; the echoed probes are found by cross-correlation and timed.
//!
//! Latency of a probe = when its echo would play on the client (packet arrival, no playout
//! buffer) − when its first sample was captured (20 ms before its packet was sent). The
//! floor of a frame-based server is 80 ms to gather a frame plus the engine's delay; what is
//! left is the tick phase, the output pacing phase, the Opus lookahead of both directions and
//! scheduling.

use super::client::{ClientOptions, ClientPeer, Recording};
use crate::audio::opus::{EncoderConfig, OpusEncoder};
use crate::audio::{FRAME_MS, FRAME_SAMPLES, PACKET_MS, PACKET_SAMPLES, SAMPLE_RATE, signal};
use crate::engine::{EchoEngine, EngineConfig, EngineHandle};
use crate::gateway::{AppState, GatewayConfig, PeerSettings, Server};
use crate::metrics::Metrics;
use anyhow::{Context, Result};
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
    pub echo_delay_frames: usize,
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
    /// Opus algorithmic delay, client encoder + server encoder.
    pub codec_lookahead_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoopbackReport {
    pub sessions: usize,
    pub sessions_connected: usize,
    pub seconds: f64,
    /// Mouth-to-ear latency of every echoed probe.
    pub latency_ms: Percentiles,
    /// Latency beyond frame gathering and the engine's own delay.
    pub added_ms: Percentiles,
    pub parts: LatencyParts,
    pub probes_sent: usize,
    pub probes_found: usize,
    pub frames_total: u64,
    /// Frames dropped for latency (input or output) or skipped by missed ticks.
    pub frames_dropped: f64,
    pub dropped_percent: f64,
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
    pub real_time: bool,
}

impl LoopbackReport {
    /// A human-readable table.
    pub fn table(&self) -> String {
        let l = &self.latency_ms;
        let a = &self.added_ms;
        let p = &self.parts;
        let cpu = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.1} %"));
        [
            format!("loopback: {} sessions ({} connected), {:.0} s each", self.sessions, self.sessions_connected, self.seconds),
            format!("{:<34} {:>8} {:>8} {:>8} {:>8}", "", "p50", "p95", "p99", "max"),
            format!("{:<34} {:>8.1} {:>8.1} {:>8.1} {:>8.1}", "end-to-end latency (ms)", l.p50, l.p95, l.p99, l.max),
            format!("{:<34} {:>8.1} {:>8.1} {:>8.1} {:>8.1}", "added beyond frame + engine (ms)", a.p50, a.p95, a.p99, a.max),
            format!(
                "parts (ms): client playout {:.0}, frame gathering {:.0}, engine delay {:.0}, opus lookahead {:.1}",
                p.client_playout_ms, p.frame_gathering_ms, p.engine_delay_ms, p.codec_lookahead_ms
            ),
            format!("probes found: {}/{}", self.probes_found, self.probes_sent),
            format!(
                "frames: {} total, {:.1} dropped ({:.3} %; packets in {:.0} / out {:.0}), underruns in {} / out {}, ticks overrun {} missed {}",
                self.frames_total,
                self.frames_dropped,
                self.dropped_percent,
                self.input_dropped_packets,
                self.output_dropped_packets,
                self.input_underruns,
                self.output_underruns,
                self.ticks_overrun,
                self.ticks_missed
            ),
            format!("cpu: {} per session, {} total", cpu(self.cpu_percent_per_session), cpu(self.cpu_percent_total)),
            format!("real time: {}", if self.real_time { "yes" } else { "NO" }),
        ]
        .join("\n")
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

/// CPU seconds this process has used (Linux; `None` elsewhere).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
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

/// Runs the benchmark.
pub async fn run(options: LoopbackOptions) -> Result<LoopbackReport> {
    let metrics = Arc::new(Metrics::new());
    let engine = EchoEngine::new(options.sessions, options.echo_delay_frames);
    let config = EngineConfig {
        max_sessions: options.sessions,
        ..Default::default()
    };
    let engine = EngineHandle::start(engine, config, metrics.clone())?;
    let peer = PeerSettings {
        bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        ..Default::default()
    };
    let state = AppState::new(engine.clone(), GatewayConfig { token: None, peer });
    let server = Server::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), state).await?;
    let base_url = format!("http://{}", server.local_addr()?);
    let stop = CancellationToken::new();
    let server_task = tokio::spawn(server.run(stop.clone().cancelled_owned()));

    let mut clients = Vec::with_capacity(options.sessions);
    for _ in 0..options.sessions {
        let client = ClientPeer::connect(ClientOptions {
            base_url: base_url.clone(),
            ..Default::default()
        })
        .await;
        match client {
            Ok(client) => clients.push(client),
            Err(err) => tracing::warn!(%err, "a client could not connect"),
        }
    }
    let connected = clients.len();
    let (pcm, starts, probe) = probe_signal(options.seconds);
    // Let every session settle into its tick phase before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = counters(&metrics);
    let cpu_before = process_cpu_seconds();
    let wall_start = Instant::now();
    let players: Vec<_> = clients
        .into_iter()
        .map(|mut client| {
            let pcm = pcm.clone();
            tokio::spawn(async move {
                let sent = client.play(&pcm).await;
                (client, sent)
            })
        })
        .collect();
    let mut finished = Vec::with_capacity(players.len());
    for player in players {
        let (client, sent) = player.await.context("client task")?;
        finished.push((client, sent?));
    }
    let wall = wall_start.elapsed().as_secs_f64();
    let cpu = cpu_before.zip(process_cpu_seconds()).map(|(a, b)| b - a);
    let after = counters(&metrics);
    // The last probe's echo is already back (probes stop four frames before the end); this
    // only lets in-flight packets land.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut latencies = Vec::new();
    for (client, sent) in &finished {
        latencies.extend(probe_latencies(&client.recording(), sent, &starts, &probe));
    }
    for (client, _) in finished {
        let _ = client.close().await;
    }
    stop.cancel();
    let _ = server_task.await;
    engine.shutdown();

    let engine_delay_ms = (options.echo_delay_frames as u64 * FRAME_MS) as f64;
    let floor = FRAME_MS as f64 + engine_delay_ms;
    let added: Vec<f64> = latencies.iter().map(|l| l - floor).collect();
    let lookahead_ms = OpusEncoder::new(EncoderConfig::default())?.lookahead_samples()? as f64
        * 1000.0
        / SAMPLE_RATE as f64;
    let frames_total = (connected as f64 * options.seconds * 1000.0 / FRAME_MS as f64) as u64;
    let input_dropped = after.input_dropped - before.input_dropped;
    let output_dropped = after.output_dropped - before.output_dropped;
    let dropped_samples = input_dropped + output_dropped;
    let missed = after.missed - before.missed;
    let frames_dropped =
        dropped_samples as f64 / FRAME_SAMPLES as f64 + (missed * connected as u64) as f64;
    let dropped_percent = if frames_total == 0 {
        0.0
    } else {
        100.0 * frames_dropped / frames_total as f64
    };
    let probes_sent = starts.len() * connected;
    let real_time = connected == options.sessions
        && dropped_percent <= 0.1
        && latencies.len() * 100 >= probes_sent * 99;
    Ok(LoopbackReport {
        sessions: options.sessions,
        sessions_connected: connected,
        seconds: options.seconds,
        latency_ms: Percentiles::of(&latencies),
        added_ms: Percentiles::of(&added),
        parts: LatencyParts {
            client_playout_ms: 0.0,
            frame_gathering_ms: FRAME_MS as f64,
            engine_delay_ms,
            codec_lookahead_ms: 2.0 * lookahead_ms,
        },
        probes_sent,
        probes_found: latencies.len(),
        frames_total,
        frames_dropped,
        dropped_percent,
        input_dropped_packets: input_dropped as f64 / PACKET_SAMPLES as f64,
        output_dropped_packets: output_dropped as f64 / PACKET_SAMPLES as f64,
        input_underruns: after.input_underruns - before.input_underruns,
        output_underruns: after.output_underruns - before.output_underruns,
        ticks_overrun: after.overrun - before.overrun,
        ticks_missed: missed,
        cpu_percent_per_session: cpu.map(|c| 100.0 * c / wall / connected.max(1) as f64),
        cpu_percent_total: cpu.map(|c| 100.0 * c / wall),
        real_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_set() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = Percentiles::of(&values);
        assert_eq!((p.count, p.p50, p.p99, p.max), (100, 51.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(&[]).count, 0);
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
