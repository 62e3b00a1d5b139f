//! Server-wide Prometheus metrics, shared by the step loop (step times, drops, underruns) and the
//! transports (sessions, packets). A leaf module: it depends on nothing else in the crate.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use std::time::Instant;

/// Buckets for per-frame times in seconds: 2.5 ms apart where a GPU's steps fall (10–20 ms on
/// a datacenter card), 5 ms apart up to 50 ms (so a p99 can be held to 35 ms, DGX Spark's
/// goal), 10 ms apart around the 80 ms frame.
const STEP_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.025, 0.03, 0.035,
    0.04, 0.045, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12, 0.16, 0.25, 0.5,
];

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    pub sessions_active: IntGauge,
    /// 1 while the step loop is behind real time (new sessions refused), else 0.
    pub behind_real_time: IntGauge,
    pub sessions_opened: IntCounter,
    pub sessions_rejected: IntCounterVec,
    pub sessions_vanished: IntCounter,
    /// Answers sent before ICE gathering ended: a STUN or TURN server that does not answer.
    pub ice_gathering_timeouts: IntCounter,
    pub step_seconds: Histogram,
    pub stage_seconds: HistogramVec,
    pub ticks_overrun: IntCounter,
    pub ticks_missed: IntCounter,
    pub input_underruns: IntCounter,
    pub input_dropped_samples: IntCounter,
    pub output_underruns: IntCounter,
    pub output_dropped_samples: IntCounter,
    pub packets_received: IntCounter,
    pub packets_lost: IntCounter,
    pub packets_recovered: IntCounter,
    pub packets_bad: IntCounter,
    /// WebSocket transports (`/api/chat`, telephony): events by transport and kind — messages
    /// ignored, bad input, DTMF digits, marks, clears.
    pub transport_events: IntCounterVec,
    /// Calls by transport (`webrtc`, `chat`, `twilio`, …, `sip`): started, and how long each
    /// lasted once it ended.
    pub calls_started: IntCounterVec,
    pub call_seconds: HistogramVec,
    /// 1 while `--sip-register`'s registration stands, else 0.
    pub sip_registered: IntGauge,
}

/// Buckets for call lengths in seconds: a dropped call, a short question, up to an hour.
const CALL_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0,
];

/// A call in progress: counted when made, its length observed when dropped.
pub struct CallTimer {
    seconds: Histogram,
    started: Instant,
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        self.seconds.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            register(&registry, IntCounter::new(format!("duplex_{name}"), help))
        };
        let gauge = |name: &str, help: &str| {
            register(&registry, IntGauge::new(format!("duplex_{name}"), help))
        };
        let sessions_active = gauge("sessions_active", "Sessions currently holding a slot");
        let behind_real_time = gauge(
            "behind_real_time",
            "1 while 3 or more of the last 32 ticks with sessions took longer than the step budget (new sessions refused until 32 in a row keep it)",
        );
        let sessions_rejected = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "duplex_sessions_rejected_total",
                    "Session requests refused, by reason",
                ),
                &["reason"],
            ),
        );
        let step_seconds = register(
            &registry,
            Histogram::with_opts(
                HistogramOpts::new(
                    "duplex_step_seconds",
                    "Wall time of one step-loop tick (all sessions)",
                )
                .buckets(STEP_BUCKETS.to_vec()),
            ),
        );
        let stage_seconds = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new("duplex_stage_seconds", "Wall time of each stage of a tick")
                    .buckets(STEP_BUCKETS.to_vec()),
                &["stage"],
            ),
        );
        let transport_events = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "duplex_transport_events_total",
                    "WebSocket transport events (ignored messages, bad input, dtmf, marks, clears), by transport and event",
                ),
                &["transport", "event"],
            ),
        );
        let sip_registered = gauge(
            "sip_registered",
            "1 while the --sip-register registration with the PBX stands",
        );
        let calls_started = register(
            &registry,
            IntCounterVec::new(
                Opts::new("duplex_calls_total", "Calls started, by transport"),
                &["transport"],
            ),
        );
        let call_seconds = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new("duplex_call_seconds", "Length of ended calls, by transport")
                    .buckets(CALL_BUCKETS.to_vec()),
                &["transport"],
            ),
        );
        Self {
            sessions_opened: counter("sessions_opened_total", "Sessions opened"),
            sessions_vanished: counter(
                "sessions_vanished_total",
                "Sessions whose client disappeared without closing (ICE failure or no connection)",
            ),
            ice_gathering_timeouts: counter(
                "ice_gathering_timeouts_total",
                "Answers sent when ICE gathering had not ended after 3 s (a STUN or TURN server that does not answer)",
            ),
            ticks_overrun: counter(
                "ticks_overrun_total",
                "Ticks that started after their deadline",
            ),
            ticks_missed: counter(
                "ticks_missed_total",
                "Ticks skipped because the loop fell a whole frame behind",
            ),
            input_underruns: counter(
                "input_underruns_total",
                "Frames made up with silence because less than a frame of a session's input had arrived",
            ),
            input_dropped_samples: counter(
                "input_dropped_samples_total",
                "Input samples dropped to keep latency bounded (24 kHz samples)",
            ),
            output_underruns: counter(
                "output_underruns_total",
                "20 ms packets sent as silence for lack of output",
            ),
            output_dropped_samples: counter(
                "output_dropped_samples_total",
                "Output samples dropped to keep latency bounded (24 kHz samples)",
            ),
            packets_received: counter("packets_received_total", "Media packets received"),
            packets_lost: counter("packets_lost_total", "Media packets lost in transit"),
            packets_recovered: counter(
                "packets_recovered_total",
                "Lost packets rebuilt from in-band FEC",
            ),
            packets_bad: counter(
                "packets_bad_total",
                "Media packets that could not be decoded",
            ),
            registry,
            sessions_active,
            behind_real_time,
            sessions_rejected,
            step_seconds,
            stage_seconds,
            transport_events,
            calls_started,
            call_seconds,
            sip_registered,
        }
    }

    /// Counts a call on `transport` starting now; the timer observes its length when dropped.
    pub fn call(&self, transport: &str) -> CallTimer {
        self.calls_started.with_label_values(&[transport]).inc();
        CallTimer {
            seconds: self.call_seconds.with_label_values(&[transport]),
            started: Instant::now(),
        }
    }

    /// Counts one `event` on `transport` (e.g. `("twilio", "dtmf")`).
    pub fn transport_event(&self, transport: &str, event: &str) {
        self.transport_events
            .with_label_values(&[transport, event])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("encoding into a Vec cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

/// `metric`, made with a valid name and registered once in `registry`.
fn register<M: Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("metric names are valid");
    registry
        .register(Box::new(metric.clone()))
        .expect("each metric registers once");
    metric
}

/// A histogram's counts at one moment: what happened between two of them is `since`.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    pub count: u64,
    pub sum: f64,
    /// Each bucket's upper bound and how many observations were at most that.
    pub cumulative: Vec<(f64, u64)>,
}

impl HistogramSnapshot {
    pub fn of(histogram: &Histogram) -> Self {
        use prometheus::core::Metric;
        // One reading of the histogram: a tick observed between separate reads of its count
        // and its buckets would leave the count past the last bucket.
        let metric = histogram.metric();
        let reading = metric.get_histogram();
        let cumulative = reading
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect();
        Self {
            count: reading.get_sample_count(),
            sum: reading.get_sample_sum(),
            cumulative,
        }
    }

    /// The observations made after `earlier`.
    pub fn since(&self, earlier: &Self) -> Self {
        let cumulative = self
            .cumulative
            .iter()
            .zip(&earlier.cumulative)
            .map(|(&(bound, now), &(_, then))| (bound, now - then))
            .collect();
        Self {
            count: self.count - earlier.count,
            sum: self.sum - earlier.sum,
            cumulative,
        }
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }

    /// The smallest bucket bound that at least `fraction` of the observations stay within;
    /// infinite when they lie beyond the last bucket, `None` with no observations.
    pub fn quantile_at_most(&self, fraction: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let needed = (fraction * self.count as f64).ceil() as u64;
        let bound = self.cumulative.iter().find(|(_, count)| *count >= needed);
        Some(bound.map_or(f64::INFINITY, |(bound, _)| *bound))
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_every_family() {
        let metrics = Metrics::new();
        metrics.step_seconds.observe(0.01);
        metrics.sessions_rejected.with_label_values(&["full"]).inc();
        let text = metrics.render();
        for name in [
            "duplex_sessions_active",
            "duplex_step_seconds_bucket",
            "duplex_packets_lost_total",
            "reason=\"full\"",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }

    #[test]
    fn a_snapshot_counts_what_happened_since_an_earlier_one() {
        let metrics = Metrics::new();
        metrics.step_seconds.observe(0.3);
        let before = HistogramSnapshot::of(&metrics.step_seconds);
        for seconds in [0.004, 0.004, 0.015, 0.045] {
            metrics.step_seconds.observe(seconds);
        }
        let since = HistogramSnapshot::of(&metrics.step_seconds).since(&before);
        assert_eq!(since.count, 4);
        assert!((since.mean().unwrap() - 0.017).abs() < 1e-9);
        assert_eq!(since.quantile_at_most(0.5), Some(0.005));
        assert_eq!(since.quantile_at_most(0.75), Some(0.015));
        assert_eq!(since.quantile_at_most(0.99), Some(0.045));
        metrics.step_seconds.observe(2.0);
        let slow = HistogramSnapshot::of(&metrics.step_seconds).since(&before);
        assert_eq!(slow.quantile_at_most(1.0), Some(f64::INFINITY));
        assert_eq!(before.since(&before).quantile_at_most(0.5), None);
    }
}
