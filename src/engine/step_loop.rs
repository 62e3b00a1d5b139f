//! The step loop's state, without threads or clocks: `join`/`leave` at frame boundaries and
//! `tick(clock)` once per deadline. The driver thread calls these; tests call them with made-up
//! instants to replay minutes of traffic in milliseconds.

use super::clock::{BacklogTrim, TRIM_WINDOW_TICKS, TickClock, TickOutcome, input_excess};
use super::session::{SessionEvent, SessionId, SlotSession};
use super::{Engine, Opening, Persona, StageTimes, StepIo};
use crate::audio::{FRAME_PERIOD, FRAME_SAMPLES, SAMPLE_RATE, duration_to_samples};
use crate::metrics::Metrics;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// What one tick did.
#[derive(Debug, Clone, Copy, Default)]
pub struct TickReport {
    pub active: usize,
    pub gather: Duration,
    pub step: Duration,
    pub scatter: Duration,
    pub stages: StageTimes,
    pub outcome: TickOutcome,
}

/// `StepLoop::prepare` makes the engine progress whatever the time once in this many calls.
const FORCED_PREPARE_TICKS: u64 = 8;

/// Steps failing in a row from which `/health` reports the engine failing.
pub const FAILING_STEPS: usize = 3;

/// The longest step that keeps real time: the 80 ms frame, less room for the loop's own work
/// and a late wake-up.
pub const REAL_TIME_STEP: Duration = Duration::from_millis(70);

/// Of the last 32 ticks with a conversation in them, how many may take longer than the step
/// budget before the loop counts as behind real time (and new sessions are refused): one or two
/// are a hiccup, three in 2.6 s are a load the machine does not carry. It keeps up again once
/// none of the last 32 was slow, so a load at the edge does not flip it every few ticks.
pub const BEHIND_SLOW_TICKS: u32 = 3;

/// How the step loop fares, for `/health`: steps failing in a row (each ends every session),
/// the last error, whether the loop has stopped, and which of the recent ticks were slow.
#[derive(Debug, Default)]
pub struct LoopHealth {
    failed_in_a_row: AtomicUsize,
    last_error: std::sync::Mutex<Option<String>>,
    stopped: std::sync::atomic::AtomicBool,
    /// One bit per recent tick with a conversation in it, the newest lowest: set where the
    /// tick took longer than the step budget.
    recent_slow: AtomicU32,
    behind: std::sync::atomic::AtomicBool,
}

/// What `LoopHealth` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Serving,
    /// `FAILING_STEPS` or more steps failed in a row, the last with this error.
    Failing {
        steps: usize,
        error: String,
    },
    /// The loop has ended (shutdown, or a panic), for this reason.
    Stopped(String),
}

impl LoopHealth {
    fn step_failed(&self, error: &str) {
        self.failed_in_a_row.fetch_add(1, Ordering::AcqRel);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_owned());
    }

    fn step_ok(&self) {
        self.failed_in_a_row.store(0, Ordering::Release);
    }

    /// Records whether the latest tick with a conversation took longer than the step budget;
    /// whether that changed the loop from keeping real time to behind, or back.
    fn tick_timed(&self, slow: bool) -> bool {
        let recent = (self.recent_slow.load(Ordering::Acquire) << 1) | u32::from(slow);
        self.recent_slow.store(recent, Ordering::Release);
        match (self.behind(), recent.count_ones()) {
            (false, slow) if slow >= BEHIND_SLOW_TICKS => self.set_behind(true),
            (true, 0) => self.set_behind(false),
            _ => false,
        }
    }

    /// Forgets the slow ticks once no conversation is left: what slowed them has gone. Whether
    /// the loop was behind.
    fn idle(&self) -> bool {
        self.recent_slow.store(0, Ordering::Release);
        self.set_behind(false)
    }

    /// Whether that changed it.
    fn set_behind(&self, behind: bool) -> bool {
        self.behind.swap(behind, Ordering::AcqRel) != behind
    }

    /// Slow ticks among the recent 32.
    pub fn slow_ticks(&self) -> u32 {
        self.recent_slow.load(Ordering::Acquire).count_ones()
    }

    /// Whether the loop is behind real time: `BEHIND_SLOW_TICKS` or more of the recent ticks
    /// took longer than the step budget, and some still do.
    pub fn behind(&self) -> bool {
        self.behind.load(Ordering::Acquire)
    }

    /// The loop has ended, for `why`.
    pub fn stop(&self, why: &str) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(why.to_owned());
        self.stopped.store(true, Ordering::Release);
    }

    pub fn state(&self) -> Health {
        let error = || {
            let last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
            last.clone().unwrap_or_default()
        };
        if self.stopped.load(Ordering::Acquire) {
            return Health::Stopped(error());
        }
        match self.failed_in_a_row.load(Ordering::Acquire) {
            steps if steps >= FAILING_STEPS => Health::Failing {
                steps,
                error: error(),
            },
            _ => Health::Serving,
        }
    }
}

/// All sessions of one engine, stepped together.
pub struct StepLoop<E: Engine> {
    engine: E,
    slots: Vec<Option<SlotSession>>,
    /// Slots whose persona the engine is still prefilling (`Opening::Preparing`): they sit out
    /// the frames until `prepare` reports them in place.
    preparing: Vec<bool>,
    /// `prepare` calls while some slot was preparing.
    prepares: u64,
    inputs: Vec<InputPacing>,
    clock: TickClock,
    active: Vec<bool>,
    input: Vec<f32>,
    output: Vec<f32>,
    text: Vec<(usize, String)>,
    max_wait_samples: usize,
    occupancy: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    health: Arc<LoopHealth>,
    /// The longest tick that keeps real time (`REAL_TIME_STEP` unless set).
    step_budget: Duration,
}

impl<E: Engine> StepLoop<E> {
    /// `occupancy` counts admitted sessions; the loop decrements it when it lets one go.
    pub fn new(
        engine: E,
        origin: Instant,
        max_wait_samples: usize,
        occupancy: Arc<AtomicUsize>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let slots = engine.slots();
        Self {
            engine,
            slots: (0..slots).map(|_| None).collect(),
            preparing: vec![false; slots],
            prepares: 0,
            inputs: vec![InputPacing::new(); slots],
            clock: TickClock::new(origin, FRAME_PERIOD),
            active: vec![false; slots],
            input: vec![0.0; slots * FRAME_SAMPLES],
            output: vec![0.0; slots * FRAME_SAMPLES],
            text: Vec::with_capacity(slots),
            max_wait_samples,
            occupancy,
            metrics,
            health: Arc::default(),
            step_budget: REAL_TIME_STEP,
        }
    }

    /// Counts a tick longer than `budget` as slow (see `LoopHealth::behind`).
    pub fn with_step_budget(mut self, budget: Duration) -> Self {
        self.step_budget = budget;
        self
    }

    /// How the loop fares, shared with whoever reports it.
    pub fn health(&self) -> Arc<LoopHealth> {
        self.health.clone()
    }

    /// When the next tick is due.
    pub fn deadline(&self) -> Instant {
        self.clock.deadline()
    }

    pub fn active_sessions(&self) -> usize {
        self.slots.iter().flatten().count()
    }

    /// Gives an admitted session a slot and puts its persona in place.
    pub fn join(&mut self, session: SlotSession, persona: &Persona) {
        let Some(slot_idx) = self.slots.iter().position(Option::is_none) else {
            self.release(&session, "the server is full");
            return;
        };
        let opening = match self.engine.open_slot(slot_idx, persona) {
            Ok(opening) => opening,
            Err(err) => {
                tracing::warn!(session = %session.id, %err, "could not open a slot");
                self.release(&session, &err.0);
                return;
            }
        };
        tracing::info!(session = %session.id, slot_idx, ?opening, "session joined");
        self.metrics.sessions_active.inc();
        self.slots[slot_idx] = Some(session);
        self.preparing[slot_idx] = opening == Opening::Preparing;
        if opening == Opening::Ready {
            self.start(slot_idx);
        }
    }

    /// Starts slot `slot_idx`'s conversation at the next frame.
    fn start(&mut self, slot_idx: usize) {
        self.inputs[slot_idx] = InputPacing::new();
        if let Some(session) = &mut self.slots[slot_idx] {
            if std::mem::take(&mut self.preparing[slot_idx]) {
                // What the caller said while the persona was prefilled is not part of the call.
                session.input.skip(session.input.queued());
            }
            let _ = session.events.try_send(SessionEvent::Ready);
        }
    }

    /// Lets the engine prefill the personas of joining sessions while its work fits before
    /// `deadline`, and starts those now in place. With no conversation live, or every
    /// `FORCED_PREPARE_TICKS`-th call, one piece of work runs whatever the time: an engine too
    /// busy to leave room still gets its newcomers in, a frame late at most that often.
    pub fn prepare(&mut self, deadline: Instant) {
        if !self.preparing.contains(&true) {
            return;
        }
        self.prepares += 1;
        let live = self.active.contains(&true);
        let must_progress = !live || self.prepares.is_multiple_of(FORCED_PREPARE_TICKS);
        for (slot_idx, opened) in self.engine.prepare(deadline, must_progress) {
            if !self.preparing.get(slot_idx).copied().unwrap_or(false) {
                continue;
            }
            match opened {
                Ok(()) => {
                    self.start(slot_idx);
                    tracing::info!(slot_idx, "persona in place; the conversation starts");
                }
                Err(err) => {
                    if let Some(session) = &self.slots[slot_idx] {
                        let _ = session.events.try_send(SessionEvent::Error(err.0.clone()));
                    }
                    self.free(slot_idx);
                }
            }
        }
    }

    /// Finishes every opening still preparing now, however long it takes (before a run that
    /// needs no clock, or before the first frame of one that does).
    pub fn prepare_all(&mut self) {
        self.prepare(Instant::now() + Duration::from_secs(24 * 3600));
    }

    /// Frees the slot of session `id`, if it still has one.
    pub fn leave(&mut self, id: SessionId) {
        if let Some(slot_idx) = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.id == id))
        {
            self.free(slot_idx);
            tracing::info!(session = %id, slot_idx, "session left");
        }
    }

    /// Frees every slot (shutdown).
    pub fn close_all(&mut self) {
        for slot_idx in 0..self.slots.len() {
            if self.slots[slot_idx].is_some() {
                self.free(slot_idx);
            }
        }
    }

    fn free(&mut self, slot_idx: usize) {
        self.engine.close_slot(slot_idx);
        self.slots[slot_idx] = None;
        self.preparing[slot_idx] = false;
        self.occupancy.fetch_sub(1, Ordering::AcqRel);
        self.metrics.sessions_active.dec();
    }

    fn release(&self, session: &SlotSession, reason: &str) {
        let _ = session
            .events
            .try_send(SessionEvent::Error(reason.to_owned()));
        self.occupancy.fetch_sub(1, Ordering::AcqRel);
    }

    /// Runs one tick: pop a frame per session, step, push the output. `clock` reads the time
    /// (the real clock in the driver, a scripted one in tests).
    pub fn tick(&mut self, clock: &mut impl FnMut() -> Instant) -> TickReport {
        let started = clock();
        self.gather(started);
        let gathered = clock();
        let io = StepIo {
            active: &self.active,
            input: &self.input,
            output: &mut self.output,
            text: &mut self.text,
        };
        let step_result = self.engine.step(io);
        let stepped = clock();
        // A step with no conversation in it proves nothing either way.
        let live = self.active.contains(&true);
        let stages = match step_result {
            Ok(stages) => {
                if live {
                    self.health.step_ok();
                }
                stages
            }
            Err(err) => {
                if live {
                    self.health.step_failed(&err.0);
                }
                self.evict_all(&err.0);
                StageTimes::default()
            }
        };
        self.scatter(stepped.duration_since(started));
        let finished = clock();
        let report = TickReport {
            active: self.active.iter().filter(|a| **a).count(),
            gather: gathered.duration_since(started),
            step: stepped.duration_since(gathered),
            scatter: finished.duration_since(stepped),
            stages,
            outcome: self.clock.complete(finished),
        };
        let took = finished.duration_since(started);
        self.record(&report, took);
        self.note_pace(live.then_some(took), report.active);
        report
    }

    /// Counts a tick with `active` conversations that took `took` toward `LoopHealth::behind`
    /// (`None`: no conversation, and the record starts over), and says when the loop falls
    /// behind real time or catches up.
    fn note_pace(&self, took: Option<Duration>, active: usize) {
        let changed = match took {
            Some(took) => self.health.tick_timed(took > self.step_budget),
            None => self.health.idle(),
        };
        if !changed {
            return;
        }
        let budget_ms = self.step_budget.as_millis();
        let behind = self.health.behind();
        self.metrics.behind_real_time.set(i64::from(behind));
        match behind {
            true => tracing::warn!(
                active,
                "behind real time: {} of the last 32 ticks took longer than {budget_ms} ms",
                self.health.slow_ticks()
            ),
            false => tracing::info!(active, "keeping real time again"),
        }
    }

    fn gather(&mut self, now: Instant) {
        let frames = self.input.chunks_exact_mut(FRAME_SAMPLES);
        let slots = self
            .slots
            .iter_mut()
            .zip(self.inputs.iter_mut())
            .zip(self.active.iter_mut());
        let slots = slots.zip(&self.preparing);
        for ((((slot, pacing), active), &preparing), frame) in slots.zip(frames) {
            *active = slot.is_some() && !preparing;
            let Some(session) = slot.as_mut().filter(|_| *active) else {
                continue;
            };
            let excess = input_excess(session.input.queued(), self.max_wait_samples);
            drop_input(session, excess, &self.metrics);
            let slack = pacing.take_frame(session, frame, now, &self.metrics);
            let surplus = pacing
                .trim
                .observe(slack.saturating_sub(TRIM_MARGIN_SAMPLES));
            let surplus = surplus.min(session.input.queued());
            drop_input(session, surplus, &self.metrics);
        }
    }

    fn scatter(&mut self, elapsed: Duration) {
        let frames = self.output.chunks_exact(FRAME_SAMPLES);
        for ((slot, &active), frame) in self.slots.iter_mut().zip(&self.active).zip(frames) {
            let Some(session) = slot.as_mut().filter(|_| active) else {
                continue;
            };
            let overflow = session.output.push(frame) as u64;
            session
                .stats
                .add(&session.stats.output_overflow_samples, overflow);
            session
                .stats
                .last_step_us
                .store(elapsed.as_micros() as u64, Ordering::Relaxed);
        }
        for (slot_idx, piece) in self.text.drain(..) {
            if let Some(session) = &self.slots[slot_idx] {
                let _ = session.events.try_send(SessionEvent::Text(piece));
            }
        }
    }

    /// Ends every session the failed step ran (those still preparing took no part in it).
    fn evict_all(&mut self, reason: &str) {
        tracing::error!(%reason, "engine step failed; ending every session in it");
        for slot_idx in 0..self.slots.len() {
            if self.preparing[slot_idx] {
                continue;
            }
            if let Some(session) = &self.slots[slot_idx] {
                let _ = session
                    .events
                    .try_send(SessionEvent::Error(format!("the model failed: {reason}")));
                self.free(slot_idx);
            }
        }
    }

    fn record(&self, report: &TickReport, total: Duration) {
        let m = &self.metrics;
        m.step_seconds.observe(total.as_secs_f64());
        let stages = [
            ("gather", report.gather),
            ("step", report.step),
            ("scatter", report.scatter),
            ("encode", report.stages.encode),
            ("temporal", report.stages.temporal),
            ("depformer", report.stages.depformer),
            ("decode", report.stages.decode),
        ];
        for (stage, time) in stages.into_iter().filter(|(_, t)| !t.is_zero()) {
            m.stage_seconds
                .with_label_values(&[stage])
                .observe(time.as_secs_f64());
        }
        if report.outcome.overrun {
            m.ticks_overrun.inc();
        }
        m.ticks_missed.inc_by(report.outcome.missed);
    }
}

/// Slack the input trim leaves a session against jitter it has not seen yet (2 ms).
const TRIM_MARGIN_SAMPLES: usize = SAMPLE_RATE as usize / 500;

/// The step loop's side of one session's input stream.
#[derive(Debug, Clone)]
struct InputPacing {
    trim: BacklogTrim,
    /// Audio has arrived. Before that an empty ring is a client not sending yet (still
    /// connecting), and the frame the first audio ends is the stream's start: neither is an
    /// underrun.
    started: bool,
}

impl InputPacing {
    fn new() -> Self {
        Self {
            trim: BacklogTrim::new(TRIM_WINDOW_TICKS),
            started: false,
        }
    }

    /// Fills `frame` with the session's next frame of input and returns its slack: how much
    /// later (in samples) its last packet could have arrived and still made this tick, that is
    /// the samples left queued plus how long the newest of them has waited. A frame short of
    /// samples has no slack. It takes what has arrived at its end, after silence:
    /// nothing is lost, and the next frame starts with the next packet. (Silence for the whole
    /// frame would leave those samples to make a standing backlog, dropped later to bound the
    /// latency: 80 ms of silence and up to 60 ms of speech lost for one late packet.)
    fn take_frame(
        &mut self,
        session: &mut SlotSession,
        frame: &mut [f32],
        now: Instant,
        metrics: &Metrics,
    ) -> usize {
        let queued = session.input.queued();
        let underrun = self.started;
        self.started |= queued > 0;
        if queued >= FRAME_SAMPLES {
            session.input.pop_exact(frame);
            session.stats.add(&session.stats.frames, 1);
            let waited = session
                .input
                .last_push()
                .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
            return session.input.queued() + duration_to_samples(waited);
        }
        let (silence, arrived) = frame.split_at_mut(FRAME_SAMPLES - queued);
        silence.fill(0.0);
        session.input.pop_exact(arrived);
        if underrun {
            session.stats.add(&session.stats.input_underruns, 1);
            metrics.input_underruns.inc();
        }
        0
    }
}

/// Drops the `count` oldest input samples of a session and counts them.
fn drop_input(session: &mut SlotSession, count: usize, metrics: &Metrics) {
    if count == 0 {
        return;
    }
    let dropped = session.input.skip(count) as u64;
    session
        .stats
        .add(&session.stats.input_dropped_samples, dropped);
    metrics.input_dropped_samples.inc_by(dropped);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::PACKET_SAMPLES;
    use crate::audio::ring::ring;
    use crate::engine::session::{SessionHandle, SessionStats};
    use crate::engine::{EchoEngine, PersonaCatalog, SessionEvent};
    use crossbeam_channel::unbounded;

    struct Harness<E: Engine = EchoEngine> {
        step_loop: StepLoop<E>,
        now: Instant,
        occupancy: Arc<AtomicUsize>,
    }

    /// A session's transport side, minus the closer (tests call `leave` directly).
    struct Client {
        id: SessionId,
        input: crate::audio::ring::InputProducer,
        output: crate::audio::ring::OutputConsumer,
        events: crossbeam_channel::Receiver<SessionEvent>,
        stats: Arc<SessionStats>,
    }

    impl Harness {
        fn new(slots: usize, delay_frames: usize) -> Self {
            Harness::with(EchoEngine::new(slots, delay_frames))
        }
    }

    impl<E: Engine> Harness<E> {
        fn with(engine: E) -> Self {
            let occupancy = Arc::new(AtomicUsize::new(0));
            let now = Instant::now();
            let step_loop = StepLoop::new(
                engine,
                now,
                PACKET_SAMPLES,
                occupancy.clone(),
                Arc::new(Metrics::new()),
            );
            Self {
                step_loop,
                now,
                occupancy,
            }
        }

        fn join(&mut self, id: u64) -> Client {
            let (input, input_cons) = ring(8 * FRAME_SAMPLES);
            let (output_prod, output) = ring(4 * FRAME_SAMPLES);
            let (events_tx, events) = unbounded();
            let stats = Arc::new(SessionStats::default());
            self.occupancy.fetch_add(1, Ordering::AcqRel);
            let session = SlotSession {
                id: SessionId(id),
                input: input_cons,
                output: output_prod,
                events: events_tx,
                stats: stats.clone(),
            };
            let persona = PersonaCatalog::builtin()
                .resolve(&Default::default())
                .unwrap();
            self.step_loop.join(session, &persona);
            Client {
                id: SessionId(id),
                input,
                output,
                events,
                stats,
            }
        }

        /// Advances to the next deadline and runs a tick whose work takes `work`.
        fn tick_taking(&mut self, work: Duration) -> TickReport {
            self.now = self.now.max(self.step_loop.deadline());
            let start = self.now;
            let mut reads = 0u32;
            let mut clock = || {
                reads += 1;
                // gather, step and scatter each see a third of the work.
                start + work * (reads - 1).min(3) / 3
            };
            let report = self.step_loop.tick(&mut clock);
            self.now = start + work;
            report
        }

        fn tick(&mut self) -> TickReport {
            self.tick_taking(Duration::from_micros(300))
        }

        /// Pushes `samples` into a session's input as if they arrived `early` before the
        /// next tick.
        fn arrive(&self, client: &mut Client, samples: &[f32], early: Duration) {
            client
                .input
                .push_at(samples, self.step_loop.deadline() - early);
        }
    }

    /// The echo engine, whose first `failures` steps fail.
    struct Failing {
        echo: EchoEngine,
        failures: usize,
    }

    impl Engine for Failing {
        fn info(&self) -> crate::engine::EngineInfo {
            self.echo.info()
        }
        fn slots(&self) -> usize {
            self.echo.slots()
        }
        fn open_slot(
            &mut self,
            slot_idx: usize,
            persona: &Persona,
        ) -> Result<Opening, crate::engine::EngineError> {
            self.echo.open_slot(slot_idx, persona)
        }
        fn close_slot(&mut self, slot_idx: usize) {
            self.echo.close_slot(slot_idx)
        }
        fn step(&mut self, io: StepIo<'_>) -> Result<StageTimes, crate::engine::EngineError> {
            if self.failures == 0 {
                return self.echo.step(io);
            }
            self.failures -= 1;
            Err(crate::engine::EngineError("the GPU fell over".into()))
        }
    }

    #[test]
    fn steps_failing_in_a_row_report_the_engine_failing_until_one_succeeds() {
        let mut h = Harness::with(Failing {
            echo: EchoEngine::new(1, 0),
            failures: 2 * FAILING_STEPS,
        });
        let health = h.step_loop.health();
        // Steps with nobody in them say nothing of the engine.
        for _ in 0..FAILING_STEPS {
            h.tick();
        }
        assert_eq!(health.state(), Health::Serving, "failed with no session");
        for failed in 0..FAILING_STEPS {
            assert_eq!(
                health.state(),
                Health::Serving,
                "after {failed} failed steps"
            );
            let client = h.join(failed as u64);
            h.tick();
            assert!(
                client
                    .events
                    .try_iter()
                    .any(|e| matches!(e, SessionEvent::Error(_))),
                "the session in a failed step is told"
            );
        }
        let failing = Health::Failing {
            steps: FAILING_STEPS,
            error: "the GPU fell over".into(),
        };
        assert_eq!(health.state(), failing);
        let _client = h.join(99);
        h.tick();
        assert_eq!(health.state(), Health::Serving, "a step succeeded");
    }

    fn packets(value: f32, count: usize) -> Vec<f32> {
        vec![value; PACKET_SAMPLES * count]
    }

    #[test]
    fn ten_minutes_of_steady_talk_never_drops_or_underruns() {
        let mut h = Harness::new(2, 1);
        let mut client = h.join(1);
        assert_eq!(client.events.try_recv().unwrap(), SessionEvent::Ready);
        let mut out = vec![0.0; FRAME_SAMPLES];
        // 7500 ticks = 10 minutes. Four packets arrive before every tick.
        for idx in 0..7500u32 {
            h.arrive(
                &mut client,
                &packets(idx as f32, 4),
                Duration::from_millis(10),
            );
            let report = h.tick();
            assert_eq!(report.outcome, TickOutcome::default());
            assert!(client.output.pop_exact(&mut out));
            assert_eq!(
                out[0],
                idx.saturating_sub(1) as f32,
                "echo is one frame late"
            );
        }
        let stats = client.stats.snapshot();
        assert_eq!(
            (
                stats.frames,
                stats.input_underruns,
                stats.input_dropped_samples
            ),
            (7500, 0, 0)
        );
        assert_eq!(
            h.step_loop.deadline(),
            h.step_loop.clock.origin() + FRAME_PERIOD * 7500
        );
        let _ = client.id;
    }

    #[test]
    fn a_frame_short_of_input_ends_with_what_arrived_after_silence() {
        let mut h = Harness::new(1, 0);
        let mut client = h.join(1);
        let mut out = vec![1.0; FRAME_SAMPLES];
        // A client still connecting sends nothing: silence, and not an underrun.
        for _ in 0..3 {
            h.tick();
            assert!(client.output.pop_exact(&mut out));
            assert!(out.iter().all(|s| *s == 0.0));
        }
        assert_eq!(client.stats.snapshot().input_underruns, 0);
        // The stream starts with three packets before a tick: they end the frame.
        client.input.push(&packets(0.5, 3));
        h.tick();
        assert!(client.output.pop_exact(&mut out));
        assert_eq!(out, [packets(0.0, 1), packets(0.5, 3)].concat());
        assert_eq!(client.input.queued(), 0);
        // From then on every frame is whole and nothing is dropped.
        for _ in 0..(3 * TRIM_WINDOW_TICKS) {
            client.input.push(&packets(0.25, 4));
            h.tick();
            assert!(client.output.pop_exact(&mut out));
            assert!(out.iter().all(|s| *s == 0.25));
        }
        let stats = client.stats.snapshot();
        assert_eq!(stats.input_underruns, 0, "nothing was missing");
        assert_eq!(stats.input_dropped_samples, 0);
    }

    /// Runs `ticks` ticks of one session whose packets arrive `early` before each tick,
    /// except that at tick 10 the fourth comes just after it; returns the first sample of
    /// every 20 ms of output (each packet carries its number).
    fn one_late_packet(
        h: &mut Harness,
        client: &mut Client,
        early: Duration,
        ticks: u32,
    ) -> Vec<f32> {
        let mut out = vec![0.0; FRAME_SAMPLES];
        let mut sent = 0.0;
        let mut heard = Vec::new();
        for tick in 0..ticks {
            let due = match tick {
                10 => 3,
                11 => 5,
                _ => 4,
            };
            for idx in 0..due {
                sent += 1.0;
                // The late packet lands 1 ms after tick 10.
                let at = if tick == 11 && idx == 0 {
                    FRAME_PERIOD - Duration::from_millis(1)
                } else {
                    early
                };
                h.arrive(client, &packets(sent, 1), at);
            }
            h.tick();
            assert!(client.output.pop_exact(&mut out));
            heard.extend(out.chunks(PACKET_SAMPLES).map(|packet| packet[0]));
        }
        heard
    }

    #[test]
    fn a_late_packet_costs_one_packet_of_silence_and_later_one_of_audio() {
        let mut h = Harness::new(1, 0);
        let mut client = h.join(1);
        let heard = one_late_packet(
            &mut h,
            &mut client,
            Duration::from_millis(10),
            4 * TRIM_WINDOW_TICKS,
        );
        let stats = client.stats.snapshot();
        assert_eq!(
            (stats.input_underruns, stats.input_dropped_samples),
            (1, PACKET_SAMPLES as u64)
        );
        // The packets were heard in order, with one packet of silence where the late one
        // was due; the packet of backlog it left, 30 ms of slack that no jitter used, was
        // trimmed once it had stood a whole window.
        let audio: Vec<f32> = heard.iter().copied().filter(|v| *v != 0.0).collect();
        assert!(audio.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(audio[audio.len() - 1] as usize - audio.len(), 1);
        assert_eq!(heard.iter().filter(|v| **v == 0.0).count(), 1);
    }

    #[test]
    fn a_packet_of_backlog_that_jitter_needed_is_kept() {
        // Packets land 1 ms before each tick, so one 2 ms late makes a short frame. Trimming
        // the packet of backlog that follows would leave 1 ms of slack: it is kept.
        let mut h = Harness::new(1, 0);
        let mut client = h.join(1);
        let heard = one_late_packet(
            &mut h,
            &mut client,
            Duration::from_millis(1),
            10 * TRIM_WINDOW_TICKS,
        );
        let stats = client.stats.snapshot();
        assert_eq!((stats.input_underruns, stats.input_dropped_samples), (1, 0));
        assert_eq!(heard.iter().filter(|v| **v == 0.0).count(), 1);
        assert_eq!(client.input.queued(), PACKET_SAMPLES);
    }

    #[test]
    fn a_flood_is_dropped_to_one_packet_of_backlog() {
        let mut h = Harness::new(1, 0);
        let mut client = h.join(1);
        // A client that sent 7 frames at once (e.g. after a network stall).
        h.arrive(&mut client, &packets(1.0, 28), Duration::from_millis(10));
        h.tick();
        let stats = client.stats.snapshot();
        assert_eq!(
            stats.input_dropped_samples as usize,
            28 * PACKET_SAMPLES - FRAME_SAMPLES - PACKET_SAMPLES
        );
        assert_eq!(
            client.input.queued(),
            PACKET_SAMPLES,
            "one packet waits behind the popped frame"
        );
        // That standing packet is kept while the window lasts, then trimmed once.
        for _ in 1..crate::engine::clock::TRIM_WINDOW_TICKS {
            h.arrive(&mut client, &packets(1.0, 4), Duration::from_millis(10));
            h.tick();
        }
        assert_eq!(
            client.stats.snapshot().input_dropped_samples,
            stats.input_dropped_samples + PACKET_SAMPLES as u64
        );
        assert_eq!(client.input.queued(), 0);
        h.arrive(&mut client, &packets(1.0, 4), Duration::from_millis(10));
        h.tick();
        assert_eq!(client.stats.snapshot().input_underruns, 0);
    }

    #[test]
    fn slow_steps_are_counted_and_do_not_queue_ticks() {
        let mut h = Harness::new(1, 0);
        let _client = h.join(1);
        let report = h.tick_taking(Duration::from_millis(90));
        assert_eq!(
            report.outcome,
            TickOutcome {
                overrun: true,
                missed: 0
            }
        );
        let report = h.tick_taking(Duration::from_millis(250));
        assert!(report.outcome.overrun);
        assert_eq!(report.outcome.missed, 2);
        let deadline = h.step_loop.deadline();
        assert!(
            deadline <= h.now && h.now - deadline < FRAME_PERIOD,
            "next tick is the latest due one"
        );
    }

    #[test]
    fn the_loop_is_behind_while_enough_recent_ticks_are_over_budget() {
        let mut h = Harness::new(1, 0);
        let health = h.step_loop.health();
        let (fast, slow) = (Duration::from_millis(20), Duration::from_millis(71));
        for _ in 0..40 {
            h.tick_taking(slow);
        }
        assert!(!health.behind(), "ticks with no conversation prove nothing");
        let client = h.join(1);
        for _ in 1..BEHIND_SLOW_TICKS {
            h.tick_taking(slow);
            h.tick_taking(fast);
        }
        assert!(!health.behind(), "a slow tick now and then is a hiccup");
        h.tick_taking(slow);
        assert!(health.behind());
        assert_eq!(h.step_loop.metrics.behind_real_time.get(), 1);
        h.tick_taking(REAL_TIME_STEP);
        assert_eq!(
            health.slow_ticks(),
            BEHIND_SLOW_TICKS,
            "the budget itself is on time"
        );
        for _ in 0..30 {
            h.tick_taking(fast);
        }
        assert_eq!(health.slow_ticks(), 1);
        assert!(health.behind(), "behind while any of the last 32 is slow");
        h.tick_taking(fast);
        assert!(!health.behind(), "caught up once every slow tick has left");
        assert_eq!(h.step_loop.metrics.behind_real_time.get(), 0);
        h.tick_taking(slow);
        h.tick_taking(slow);
        h.step_loop.leave(client.id);
        h.tick_taking(fast);
        assert_eq!(
            health.slow_ticks(),
            0,
            "an idle loop forgets its slow ticks"
        );
        let mut strict = Harness::new(1, 0);
        strict.step_loop = strict.step_loop.with_step_budget(Duration::from_millis(10));
        let _client = strict.join(1);
        for _ in 0..BEHIND_SLOW_TICKS {
            strict.tick_taking(fast);
        }
        assert!(
            strict.step_loop.health().behind(),
            "the budget is the loop's own"
        );
    }

    #[test]
    fn leave_frees_the_slot_for_the_next_session() {
        let mut h = Harness::new(1, 1);
        let mut first = h.join(1);
        first.input.push(&packets(0.7, 4));
        h.tick();
        h.step_loop.leave(first.id);
        assert_eq!(h.occupancy.load(Ordering::Acquire), 0);
        let mut second = h.join(2);
        assert_eq!(second.events.try_recv().unwrap(), SessionEvent::Ready);
        second.input.push(&packets(0.2, 4));
        h.tick();
        let mut out = vec![1.0; FRAME_SAMPLES];
        assert!(second.output.pop_exact(&mut out));
        assert_eq!(
            out[0], 0.0,
            "the new session does not hear the old one's audio"
        );
    }

    #[test]
    fn joining_a_full_loop_reports_an_error_and_releases_occupancy() {
        let mut h = Harness::new(1, 1);
        let _first = h.join(1);
        let second = h.join(2);
        assert!(matches!(
            second.events.try_recv().unwrap(),
            SessionEvent::Error(_)
        ));
        assert_eq!(h.occupancy.load(Ordering::Acquire), 1);
        assert_eq!(h.step_loop.active_sessions(), 1);
    }

    #[test]
    fn output_that_does_not_fit_is_counted() {
        let mut h = Harness::new(1, 0);
        let client = h.join(1);
        // Nobody drains the 4-frame output ring.
        for _ in 0..6 {
            h.tick();
        }
        assert_eq!(
            client.stats.snapshot().output_overflow_samples as usize,
            2 * FRAME_SAMPLES
        );
    }

    #[allow(dead_code)]
    fn handle_is_send(handle: SessionHandle) -> impl Send {
        handle
    }
}
