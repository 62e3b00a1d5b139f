//! The step loop's clock and drop policy, as pure functions of time and queue lengths.
//!
//! Ticks sit on an absolute grid `origin + k * 80 ms`, so scheduling jitter never accumulates
//! into drift. A tick that finishes late lets the next due tick start at once (counted as an
//! overrun); ticks that fell entirely behind are skipped (counted as missed) rather than queued.

use crate::audio::{FRAME_SAMPLES, PACKET_SAMPLES};
use std::time::{Duration, Instant};

/// Position on the absolute tick grid.
#[derive(Debug, Clone)]
pub struct TickClock {
    origin: Instant,
    period: Duration,
    next_idx: u64,
}

/// What happened to the schedule when a tick finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TickOutcome {
    /// The next tick is already due (this one ran past its slot).
    pub overrun: bool,
    /// Grid ticks skipped because the loop fell a whole period or more behind.
    pub missed: u64,
}

impl TickClock {
    pub fn new(origin: Instant, period: Duration) -> Self {
        Self {
            origin,
            period,
            next_idx: 0,
        }
    }

    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Index of the next tick to run.
    pub fn next_idx(&self) -> u64 {
        self.next_idx
    }

    /// When the next tick is due.
    pub fn deadline(&self) -> Instant {
        self.at(self.next_idx)
    }

    fn at(&self, idx: u64) -> Instant {
        self.origin + self.period * idx as u32
    }

    /// Records that the tick at `next_idx` finished at `now` and moves to the next one.
    pub fn complete(&mut self, now: Instant) -> TickOutcome {
        self.next_idx += 1;
        if now < self.deadline() {
            return TickOutcome::default();
        }
        let latest_due =
            (now.duration_since(self.origin).as_nanos() / self.period.as_nanos()) as u64;
        let missed = latest_due - self.next_idx;
        self.next_idx = latest_due;
        TickOutcome {
            overrun: true,
            missed,
        }
    }
}

/// How many of the oldest input samples to drop at a tick so that, after popping one frame,
/// at most `max_wait_samples` remain queued: a complete frame then waits no more than about
/// one packet for its tick, and a backlog never turns into delay.
pub fn input_excess(queued: usize, max_wait_samples: usize) -> usize {
    queued.saturating_sub(FRAME_SAMPLES + max_wait_samples)
}

/// How many of the oldest output samples to drop before sending a packet so that at most one
/// frame plus one packet stays queued for playout.
pub fn output_excess(queued: usize) -> usize {
    queued.saturating_sub(FRAME_SAMPLES + PACKET_SAMPLES)
}

/// Ticks over which the input backlog is watched before a standing surplus is trimmed (2 s).
pub const TRIM_WINDOW_TICKS: u32 = 25;
/// The same window counted in 20 ms packets, for the output side.
pub const TRIM_WINDOW_PACKETS: u32 = 100;

/// Watches a ring's slack each time it is read: how many samples could have been missing
/// without an underrun (output: the backlog left after a packet is taken; input: the backlog
/// left after a tick pops its frame plus how long the newest audio has waited). When even the
/// smallest slack over a window held whole packets, those packets are delay that no jitter
/// needed: they are trimmed, so in steady state a frame waits less than one packet, while a
/// backlog that jitter does use is left alone.
///
/// A window in which the slack ran out (an underrun) doubles the next one, up to
/// `MAX_WINDOW_GROWTH` times the first, and a window without one halves it back: a backlog that
/// jitter once needed is kept longer before it is judged again, so jitter rarer than a window
/// does not make a session swing between underruns and trims.
#[derive(Debug, Clone)]
pub struct BacklogTrim {
    base_window: u32,
    window: u32,
    min_slack: usize,
    observed: u32,
}

/// How far an underrun can lengthen a trim window (16 × 2 s for the input).
const MAX_WINDOW_GROWTH: u32 = 16;

impl BacklogTrim {
    /// Trims after `window` observations.
    pub fn new(window: u32) -> Self {
        Self {
            base_window: window,
            window,
            min_slack: usize::MAX,
            observed: 0,
        }
    }

    /// Records the slack in samples (0 after an underrun) and returns how many of the oldest
    /// to drop now.
    pub fn observe(&mut self, slack_samples: usize) -> usize {
        self.min_slack = self.min_slack.min(slack_samples);
        self.observed += 1;
        if self.observed < self.window {
            return 0;
        }
        let surplus = self.min_slack / PACKET_SAMPLES * PACKET_SAMPLES;
        self.window = if self.min_slack == 0 {
            (self.window * 2).min(self.base_window * MAX_WINDOW_GROWTH)
        } else {
            (self.window / 2).max(self.base_window)
        };
        self.min_slack = usize::MAX;
        self.observed = 0;
        surplus
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Duration = Duration::from_millis(80);

    #[test]
    fn on_time_ticks_follow_the_grid_without_drift() {
        let origin = Instant::now();
        let mut clock = TickClock::new(origin, P);
        for idx in 0..10_000u64 {
            assert_eq!(clock.deadline(), origin + P * idx as u32);
            // Each tick finishes 3 ms after its deadline: never late, never drifting.
            let outcome = clock.complete(clock.deadline() + Duration::from_millis(3));
            assert_eq!(outcome, TickOutcome::default());
        }
        assert_eq!(clock.deadline(), origin + P * 10_000);
    }

    #[test]
    fn a_slightly_late_tick_runs_the_next_at_once() {
        let origin = Instant::now();
        let mut clock = TickClock::new(origin, P);
        let outcome = clock.complete(origin + Duration::from_millis(85));
        assert_eq!(
            outcome,
            TickOutcome {
                overrun: true,
                missed: 0
            }
        );
        assert_eq!(clock.next_idx(), 1);
        assert!(clock.deadline() < origin + Duration::from_millis(85));
    }

    #[test]
    fn ticks_a_whole_period_behind_are_skipped_not_queued() {
        let origin = Instant::now();
        let mut clock = TickClock::new(origin, P);
        // Tick 0 took 250 ms: ticks 1 and 2 can no longer happen; tick 3 (due at 240) runs now.
        let outcome = clock.complete(origin + Duration::from_millis(250));
        assert_eq!(
            outcome,
            TickOutcome {
                overrun: true,
                missed: 2
            }
        );
        assert_eq!(clock.next_idx(), 3);
        // Back on the grid afterwards.
        assert_eq!(
            clock.complete(origin + Duration::from_millis(255)),
            TickOutcome::default()
        );
        assert_eq!(clock.deadline(), origin + P * 4);
    }

    #[test]
    fn input_excess_keeps_at_most_one_packet_behind_a_frame() {
        assert_eq!(input_excess(0, PACKET_SAMPLES), 0);
        assert_eq!(input_excess(FRAME_SAMPLES, PACKET_SAMPLES), 0);
        assert_eq!(
            input_excess(FRAME_SAMPLES + PACKET_SAMPLES, PACKET_SAMPLES),
            0
        );
        assert_eq!(
            input_excess(FRAME_SAMPLES + 3 * PACKET_SAMPLES, PACKET_SAMPLES),
            2 * PACKET_SAMPLES
        );
        assert_eq!(input_excess(10 * FRAME_SAMPLES, 0), 9 * FRAME_SAMPLES);
    }

    #[test]
    fn a_standing_packet_of_backlog_is_trimmed_after_the_window() {
        let mut trim = BacklogTrim::new(TRIM_WINDOW_TICKS);
        let drops: Vec<usize> = (0..TRIM_WINDOW_TICKS)
            .map(|_| trim.observe(PACKET_SAMPLES + 100))
            .collect();
        assert!(drops[..drops.len() - 1].iter().all(|d| *d == 0));
        assert_eq!(drops[drops.len() - 1], PACKET_SAMPLES);
    }

    #[test]
    fn a_backlog_that_jitter_uses_is_kept() {
        let mut trim = BacklogTrim::new(TRIM_WINDOW_TICKS);
        for idx in 0..10 * TRIM_WINDOW_TICKS {
            // Once per window the backlog is fully used (a late packet).
            let backlog = if idx % TRIM_WINDOW_TICKS == 7 {
                0
            } else {
                2 * PACKET_SAMPLES
            };
            assert_eq!(trim.observe(backlog), 0);
        }
    }

    #[test]
    fn an_underrun_lengthens_the_next_window_and_a_clean_one_shortens_it() {
        let window = TRIM_WINDOW_TICKS as usize;
        let mut trim = BacklogTrim::new(TRIM_WINDOW_TICKS);
        // Ticks until a standing packet is trimmed, with an underrun in the first window or not.
        let mut ticks_to_trim = |underrun: bool| {
            (1..)
                .find(|idx| {
                    let slack = if underrun && *idx == 1 {
                        0
                    } else {
                        PACKET_SAMPLES
                    };
                    trim.observe(slack) > 0
                })
                .unwrap()
        };
        assert_eq!(ticks_to_trim(false), window);
        // The window with the underrun trims nothing; the next is twice as long.
        assert_eq!(ticks_to_trim(true), window + 2 * window);
        // A clean window halves it again.
        assert_eq!(ticks_to_trim(false), window);
        // Underruns in window after window lengthen it up to 16 times.
        for _ in 0..6 {
            for _ in 0..trim.window {
                trim.observe(0);
            }
        }
        assert_eq!(trim.window, 16 * TRIM_WINDOW_TICKS);
    }

    #[test]
    fn output_excess_keeps_a_frame_and_a_packet() {
        assert_eq!(output_excess(FRAME_SAMPLES), 0);
        assert_eq!(
            output_excess(2 * FRAME_SAMPLES),
            FRAME_SAMPLES - PACKET_SAMPLES
        );
    }
}
