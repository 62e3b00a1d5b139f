//! What every transport shares on its way out (WebRTC and the WebSocket ones): 20 ms of the
//! agent's audio per tick of the engine's packet grid, one latency bound for all, and the ticker
//! that paces it.

use crate::audio::ring::OutputConsumer;
use crate::audio::{PACKET_PERIOD, PACKET_SAMPLES, clock_grid};
use crate::engine::SessionStats;
use crate::engine::clock::{BacklogTrim, TRIM_WINDOW_PACKETS, output_excess};
use crate::metrics::Metrics;
use std::time::{Duration, Instant};
use tokio::time::{Interval, MissedTickBehavior};

/// A ticker on the engine's output grid (`origin + phase + k · 20 ms`), starting at the next
/// grid point. Late ticks burst so a brief stall does not lose packets; the drop policy keeps
/// any backlog bounded.
pub fn packet_ticker(schedule: (Instant, Duration)) -> Interval {
    let (origin, phase) = schedule;
    let first = clock_grid::next_after(origin + phase, PACKET_PERIOD, Instant::now());
    let mut ticker = tokio::time::interval_at(first.into(), PACKET_PERIOD);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    ticker
}

/// The longest a packet waits for output the engine is late with.
pub const LATE_OUTPUT_WAIT: Duration = Duration::from_millis(15);
const LATE_OUTPUT_POLL: Duration = Duration::from_millis(1);

/// Takes the session's output 20 ms at a time: silence before the first output and when the
/// engine falls behind (counted as an underrun), and drops output beyond a frame and a packet.
pub struct PacketSource {
    output: OutputConsumer,
    pcm: Vec<f32>,
    started: bool,
    trim: BacklogTrim,
}

impl PacketSource {
    pub fn new(output: OutputConsumer) -> Self {
        Self {
            output,
            pcm: vec![0.0; PACKET_SAMPLES],
            started: false,
            trim: BacklogTrim::new(TRIM_WINDOW_PACKETS),
        }
    }

    /// Waits, once the agent's audio has started, up to [`LATE_OUTPUT_WAIT`] for a packet the
    /// engine is late with (a step thread woken late, a slow step). Sending it a few
    /// milliseconds late costs the listener nothing; silence instead would cost 20 ms of the
    /// agent's voice now and, once the late frame has stood as backlog, 20 ms dropped later.
    pub async fn wait_for_late_output(&mut self) {
        let give_up = tokio::time::Instant::now() + LATE_OUTPUT_WAIT;
        while self.started
            && self.output.queued() < PACKET_SAMPLES
            && tokio::time::Instant::now() < give_up
        {
            tokio::time::sleep(LATE_OUTPUT_POLL).await;
        }
    }

    /// The next 20 ms of agent audio at 24 kHz.
    pub fn next_packet(&mut self, stats: &SessionStats, metrics: &Metrics) -> &[f32] {
        self.drop_output(output_excess(self.output.queued()), stats, metrics);
        let backlog = if self.output.pop_exact(&mut self.pcm) {
            self.started = true;
            self.output.queued()
        } else {
            self.pcm.fill(0.0);
            if self.started {
                stats.add(&stats.output_underruns, 1);
                metrics.output_underruns.inc();
            }
            0
        };
        if self.started {
            let surplus = self.trim.observe(backlog);
            self.drop_output(surplus, stats, metrics);
        }
        &self.pcm
    }

    /// Samples the engine has produced that are not sent yet.
    pub fn queued(&self) -> usize {
        self.output.queued()
    }

    fn drop_output(&mut self, count: usize, stats: &SessionStats, metrics: &Metrics) {
        if count > 0 {
            let dropped = self.output.skip(count) as u64;
            stats.add(&stats.output_dropped_samples, dropped);
            metrics.output_dropped_samples.inc_by(dropped);
        }
    }
}

/// A WebSocket close reason cut to the protocol's 123-byte limit at a character boundary.
pub fn close_reason(reason: &str) -> String {
    const MAX_REASON_BYTES: usize = 123;
    if reason.len() <= MAX_REASON_BYTES {
        return reason.to_owned();
    }
    let mut end = MAX_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// The level (RMS) of a packet, for barge-in and speech detection.
pub fn level(pcm: &[f32]) -> f32 {
    crate::audio::signal::rms(pcm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::FRAME_SAMPLES;
    use crate::audio::ring::ring;

    #[test]
    fn silence_until_output_then_underruns_are_counted() {
        let (mut prod, cons) = ring(4 * FRAME_SAMPLES);
        let mut source = PacketSource::new(cons);
        let stats = SessionStats::default();
        let metrics = Metrics::new();
        assert_eq!(source.next_packet(&stats, &metrics), [0.0; PACKET_SAMPLES]);
        assert_eq!(stats.snapshot().output_underruns, 0, "not started yet");
        prod.push(&[0.5; PACKET_SAMPLES]);
        assert!(
            source
                .next_packet(&stats, &metrics)
                .iter()
                .all(|s| *s == 0.5)
        );
        source.next_packet(&stats, &metrics);
        assert_eq!(stats.snapshot().output_underruns, 1);
        // A flood keeps one frame and one packet.
        prod.push(&[0.1; 3 * FRAME_SAMPLES]);
        source.next_packet(&stats, &metrics);
        assert_eq!(source.queued(), FRAME_SAMPLES);
        assert_eq!(
            stats.snapshot().output_dropped_samples as usize,
            3 * FRAME_SAMPLES - FRAME_SAMPLES - PACKET_SAMPLES
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_packet_the_engine_is_late_with_is_waited_for() {
        let (mut prod, cons) = ring(4 * FRAME_SAMPLES);
        let mut source = PacketSource::new(cons);
        let stats = SessionStats::default();
        let metrics = Metrics::new();
        prod.push(&[0.5; PACKET_SAMPLES]);
        source.next_packet(&stats, &metrics);
        // The next frame lands 6 ms after its packet was due.
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(6)).await;
            prod.push(&[0.25; FRAME_SAMPLES]);
            prod
        });
        let due = tokio::time::Instant::now();
        source.wait_for_late_output().await;
        let waited = due.elapsed();
        assert!(waited >= Duration::from_millis(6) && waited < LATE_OUTPUT_WAIT);
        assert_eq!(source.next_packet(&stats, &metrics), [0.25; PACKET_SAMPLES]);
        assert_eq!(stats.snapshot().output_underruns, 0);
        // A frame later than the bound is not waited for any longer: silence, counted.
        let _prod = late.await.unwrap();
        for _ in 0..3 {
            source.next_packet(&stats, &metrics);
        }
        let due = tokio::time::Instant::now();
        source.wait_for_late_output().await;
        assert!(due.elapsed() >= LATE_OUTPUT_WAIT);
        assert_eq!(source.next_packet(&stats, &metrics), [0.0; PACKET_SAMPLES]);
        assert_eq!(stats.snapshot().output_underruns, 1);
    }

    #[test]
    fn close_reasons_fit_the_frame() {
        assert_eq!(close_reason("short"), "short");
        let long = "é".repeat(100);
        let cut = close_reason(&long);
        assert!(cut.len() <= 123 && cut.chars().all(|c| c == 'é'));
    }
}
