//! The step loop's thread and the handle transports use to reach it.

use super::persona::{PersonaError, PersonaRequest};
use super::session::{SessionCloser, SessionHandle, SessionId, SessionStats, SlotSession};
use super::step_loop::{Health, LoopHealth, REAL_TIME_STEP, StepLoop};
use super::{Engine, EngineInfo, Persona};
use crate::audio::ring::ring;
use crate::audio::{FRAME_SAMPLES, PACKET_SAMPLES};
use crate::metrics::Metrics;
use crossbeam_channel::{RecvTimeoutError, Sender, TryRecvError, bounded};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Messages to the step loop; each applies at the next frame boundary.
pub enum Command {
    Join {
        session: SlotSession,
        persona: Persona,
    },
    Leave(SessionId),
    Shutdown,
}

/// Tuning of the loop and the session rings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sessions admitted at once (capped by the engine's slots).
    pub max_sessions: usize,
    /// Input allowed to wait behind a complete frame before the oldest is dropped.
    pub max_wait_samples: usize,
    /// Capacity of each session's input ring.
    pub input_ring_samples: usize,
    /// Capacity of each session's output ring.
    pub output_ring_samples: usize,
    /// How long after a tick the transports take the first packet of its output.
    pub output_phase: Duration,
    /// The longest tick that keeps real time: while too many recent ticks take longer, new
    /// sessions are refused (`OpenError::Behind`), unless `overload`.
    pub step_budget: Duration,
    /// Admit sessions up to `max_sessions` even while the loop is behind real time.
    pub overload: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_sessions: 64,
            max_wait_samples: PACKET_SAMPLES,
            input_ring_samples: 6 * FRAME_SAMPLES,
            output_ring_samples: 4 * FRAME_SAMPLES,
            output_phase: Duration::from_millis(2),
            step_budget: REAL_TIME_STEP,
            overload: false,
        }
    }
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("all {max} session slots are in use")]
    Full { max: usize },
    #[error(transparent)]
    Persona(#[from] PersonaError),
    #[error("the engine is shutting down")]
    Stopped,
    #[error("the model is failing ({0}); retry later")]
    Failing(String),
    #[error(
        "the server is behind real time: {slow} of its last 32 steps took too long, with {sessions} in; retry later"
    )]
    Behind { sessions: usize, slow: u32 },
}

struct Shared {
    commands: Sender<Command>,
    info: EngineInfo,
    config: EngineConfig,
    max_sessions: usize,
    occupancy: Arc<AtomicUsize>,
    next_id: AtomicU64,
    origin: Instant,
    thread: Mutex<Option<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    health: Arc<LoopHealth>,
}

/// A running step loop. Cheap to clone; every clone reaches the same thread.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Starts the step loop thread for `engine`.
    pub fn start<E: Engine>(
        engine: E,
        config: EngineConfig,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let info = engine.info();
        let max_sessions = config.max_sessions.min(engine.slots());
        let occupancy = Arc::new(AtomicUsize::new(0));
        let (commands, command_rx) = bounded::<Command>(1024);
        let origin = Instant::now() + Duration::from_millis(10);
        let step_loop = StepLoop::new(
            engine,
            origin,
            config.max_wait_samples,
            occupancy.clone(),
            metrics.clone(),
        )
        .with_step_budget(config.step_budget);
        let health = step_loop.health();
        let loop_health = health.clone();
        let thread = std::thread::Builder::new()
            .name("duplex-step".into())
            .spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(step_loop, command_rx)
                }));
                match ran {
                    Ok(()) => loop_health.stop("the engine has shut down"),
                    Err(panic) => {
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default();
                        tracing::error!(%what, "the step loop panicked: no session can be served");
                        loop_health.stop(&format!("the step loop panicked: {what}"));
                    }
                }
            })?;
        tracing::info!(engine = info.name, max_sessions, "step loop started");
        let shared = Shared {
            commands,
            info,
            config,
            max_sessions,
            occupancy,
            next_id: AtomicU64::new(1),
            origin,
            thread: Mutex::new(Some(thread)),
            metrics,
            health,
        };
        Ok(Self {
            shared: Arc::new(shared),
        })
    }

    pub fn info(&self) -> &EngineInfo {
        &self.shared.info
    }

    /// Whether the step loop serves: steps failing in a row, or the loop ended.
    pub fn health(&self) -> Health {
        self.shared.health.state()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    pub fn max_sessions(&self) -> usize {
        self.shared.max_sessions
    }

    /// Whether the recent steps keep real time (see `LoopHealth::behind`).
    pub fn keeps_real_time(&self) -> bool {
        !self.shared.health.behind()
    }

    /// Sessions admitted and not yet released.
    pub fn active_sessions(&self) -> usize {
        self.shared.occupancy.load(Ordering::Acquire)
    }

    /// The grid transports pace output on: packets go out at `origin + phase + k * 20 ms`.
    pub fn output_schedule(&self) -> (Instant, Duration) {
        (self.shared.origin, self.shared.config.output_phase)
    }

    /// Admits a session with the persona `request` asks for. The returned handle receives
    /// `SessionEvent::Ready` once the step loop has put the persona in place. The persona is
    /// checked against the engine's catalog first (a voice is a name from the list, never a
    /// path) and a slot is reserved atomically: a full engine answers [`OpenError::Full`].
    /// See [`SessionHandle`] for a complete example.
    pub fn open_session(&self, request: &PersonaRequest) -> Result<SessionHandle, OpenError> {
        let persona = self.shared.info.catalog.resolve(request)?;
        self.admits()?;
        self.reserve()?;
        let id = SessionId(self.shared.next_id.fetch_add(1, Ordering::Relaxed));
        let (input, input_cons) = ring(self.shared.config.input_ring_samples);
        let (output_prod, output) = ring(self.shared.config.output_ring_samples);
        let (events_tx, events) = bounded(256);
        let stats = Arc::new(SessionStats::default());
        let session = SlotSession {
            id,
            input: input_cons,
            output: output_prod,
            events: events_tx,
            stats: stats.clone(),
        };
        if self
            .shared
            .commands
            .send(Command::Join { session, persona })
            .is_err()
        {
            self.shared.occupancy.fetch_sub(1, Ordering::AcqRel);
            return Err(OpenError::Stopped);
        }
        self.shared.metrics.sessions_opened.inc();
        let closer = SessionCloser {
            id,
            commands: self.shared.commands.clone(),
        };
        Ok(SessionHandle {
            id,
            input,
            output,
            events,
            stats,
            closer,
        })
    }

    /// Whether a session would be admitted now: the loop serves, a slot is free (a full engine
    /// says so first, the lasting reason), and the sessions already in keep real time — while
    /// they do not, another would slow every one of them further (with none in, a slow record
    /// proves nothing; an overloaded engine takes them all). Reserves nothing: a transport that
    /// answers before it knows the persona (a telephony upgrade) asks this, and `open_session`
    /// then reserves.
    pub fn admits(&self) -> Result<(), OpenError> {
        match self.shared.health.state() {
            Health::Serving => {}
            Health::Failing { error, .. } => return Err(OpenError::Failing(error)),
            Health::Stopped(_) => return Err(OpenError::Stopped),
        }
        let (sessions, max) = (self.active_sessions(), self.shared.max_sessions);
        if sessions >= max {
            return Err(OpenError::Full { max });
        }
        let health = &self.shared.health;
        match sessions > 0 && !self.shared.config.overload && health.behind() {
            true => Err(OpenError::Behind {
                sessions,
                slow: health.slow_ticks(),
            }),
            false => Ok(()),
        }
    }

    fn reserve(&self) -> Result<(), OpenError> {
        let max = self.shared.max_sessions;
        self.shared
            .occupancy
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .map(|_| ())
            .map_err(|_| OpenError::Full { max })
    }

    /// Stops the loop after the current frame and frees every slot. Idempotent.
    pub fn shutdown(&self) {
        let _ = self.shared.commands.send(Command::Shutdown);
        let thread = self
            .shared
            .thread
            .lock()
            .map(|mut t| t.take())
            .unwrap_or(None);
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            tracing::error!("the step loop thread panicked");
        }
    }
}

/// Time kept free before the next tick when prefilling personas between frames: for the
/// commands that arrive meanwhile and a late wake-up.
const PREPARE_MARGIN: Duration = Duration::from_millis(10);

fn run<E: Engine>(mut step_loop: StepLoop<E>, commands: crossbeam_channel::Receiver<Command>) {
    loop {
        // The commands that wait go first, also on an engine too slow for real time, whose
        // next tick is always due: otherwise no session could leave and the loop never stop.
        if apply_waiting(&mut step_loop, &commands) {
            break;
        }
        let deadline = step_loop.deadline();
        if Instant::now() >= deadline {
            let report = step_loop.tick(&mut Instant::now);
            if report.outcome.overrun {
                tracing::debug!(?report, "tick overran its frame");
            }
            // Joining sessions' personas are prefilled in what is left of the frame.
            let deadline = step_loop.deadline();
            step_loop.prepare(deadline.checked_sub(PREPARE_MARGIN).unwrap_or(deadline));
            continue;
        }
        let stop = match commands.recv_deadline(deadline) {
            Ok(command) => apply(&mut step_loop, command),
            Err(RecvTimeoutError::Disconnected) => true,
            Err(RecvTimeoutError::Timeout) => false,
        };
        if stop {
            break;
        }
    }
    step_loop.close_all();
    tracing::info!("step loop stopped");
}

/// Carries out the commands already waiting; whether the loop is to stop (a shutdown, or no
/// handle left to send one).
fn apply_waiting<E: Engine>(
    step_loop: &mut StepLoop<E>,
    commands: &crossbeam_channel::Receiver<Command>,
) -> bool {
    loop {
        let stop = match commands.try_recv() {
            Ok(command) => apply(step_loop, command),
            Err(TryRecvError::Empty) => return false,
            Err(TryRecvError::Disconnected) => true,
        };
        if stop {
            return true;
        }
    }
}

/// Carries out `command`; whether the loop is to stop.
fn apply<E: Engine>(step_loop: &mut StepLoop<E>, command: Command) -> bool {
    match command {
        Command::Join { session, persona } => step_loop.join(session, &persona),
        Command::Leave(id) => step_loop.leave(id),
        Command::Shutdown => return true,
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EchoEngine, EngineError, Opening, SessionEvent, StageTimes, StepIo};

    fn start(max_sessions: usize) -> EngineHandle {
        let config = EngineConfig {
            max_sessions,
            ..Default::default()
        };
        EngineHandle::start(EchoEngine::new(4, 1), config, Arc::new(Metrics::new())).unwrap()
    }

    /// The echo engine, with every step taking longer than a frame; raises its flag when
    /// dropped (the loop has ended).
    struct TooSlow(EchoEngine, Arc<std::sync::atomic::AtomicBool>);

    impl Drop for TooSlow {
        fn drop(&mut self) {
            self.1.store(true, Ordering::Release);
        }
    }

    fn too_slow() -> (EngineHandle, Arc<std::sync::atomic::AtomicBool>) {
        too_slow_with(EngineConfig {
            max_sessions: 2,
            ..Default::default()
        })
    }

    fn too_slow_with(config: EngineConfig) -> (EngineHandle, Arc<std::sync::atomic::AtomicBool>) {
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let engine = TooSlow(EchoEngine::new(2, 1), dropped.clone());
        let handle = EngineHandle::start(engine, config, Arc::new(Metrics::new())).unwrap();
        (handle, dropped)
    }

    impl Engine for TooSlow {
        fn info(&self) -> EngineInfo {
            self.0.info()
        }
        fn slots(&self) -> usize {
            self.0.slots()
        }
        fn open_slot(
            &mut self,
            slot_idx: usize,
            persona: &Persona,
        ) -> Result<Opening, EngineError> {
            self.0.open_slot(slot_idx, persona)
        }
        fn close_slot(&mut self, slot_idx: usize) {
            self.0.close_slot(slot_idx)
        }
        fn step(&mut self, io: StepIo<'_>) -> Result<StageTimes, EngineError> {
            std::thread::sleep(crate::audio::FRAME_PERIOD + Duration::from_millis(40));
            self.0.step(io)
        }
    }

    /// Waits up to 5 s for `done`.
    fn within_seconds(done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        done()
    }

    #[test]
    fn an_engine_slower_than_real_time_still_takes_joins_and_leaves_and_stops() {
        let (engine, _) = too_slow();
        let session = engine.open_session(&PersonaRequest::default()).unwrap();
        assert_eq!(
            session.events.recv_timeout(Duration::from_secs(5)),
            Ok(SessionEvent::Ready),
            "the join waited behind ticks that were always due"
        );
        drop(session);
        assert!(
            within_seconds(|| engine.active_sessions() == 0),
            "the session never left"
        );
        let (stopped, stopped_rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            engine.shutdown();
            let _ = stopped.send(());
        });
        assert!(
            stopped_rx.recv_timeout(Duration::from_secs(5)).is_ok(),
            "shutdown hangs behind a late engine"
        );
    }

    #[test]
    fn an_engine_slower_than_real_time_stops_when_no_handle_is_left() {
        let (engine, dropped) = too_slow();
        drop(engine);
        assert!(
            within_seconds(|| dropped.load(Ordering::Acquire)),
            "the loop ticks on with nobody left to stop it"
        );
    }

    #[test]
    fn a_loop_behind_real_time_refuses_new_sessions_until_none_is_left() {
        let (engine, _) = too_slow();
        let first = engine.open_session(&PersonaRequest::default()).unwrap();
        assert_eq!(
            first.events.recv_timeout(Duration::from_secs(5)),
            Ok(SessionEvent::Ready)
        );
        assert!(
            within_seconds(|| !engine.keeps_real_time()),
            "steps of 120 ms never counted as behind"
        );
        let refused = engine.open_session(&PersonaRequest::default());
        assert!(
            matches!(refused, Err(OpenError::Behind { sessions: 1, slow }) if slow >= 3),
            "{:?}",
            refused.map(|s| s.id)
        );
        assert_eq!(engine.active_sessions(), 1, "a refusal takes no slot");
        assert!(matches!(engine.admits(), Err(OpenError::Behind { .. })));
        drop(first);
        assert!(within_seconds(|| engine.active_sessions() == 0));
        assert!(engine.admits().is_ok());
        assert!(
            engine.open_session(&PersonaRequest::default()).is_ok(),
            "with nobody in, a slow record proves nothing about the next session"
        );
        engine.shutdown();
    }

    #[test]
    fn a_full_loop_says_full_even_while_behind_real_time() {
        let (engine, _) = too_slow_with(EngineConfig {
            max_sessions: 1,
            ..Default::default()
        });
        let _first = engine.open_session(&PersonaRequest::default()).unwrap();
        assert!(within_seconds(|| !engine.keeps_real_time()));
        for refused in [
            engine.open_session(&PersonaRequest::default()).map(|_| ()),
            engine.admits(),
        ] {
            assert!(
                matches!(refused, Err(OpenError::Full { max: 1 })),
                "{refused:?}"
            );
        }
        engine.shutdown();
    }

    #[test]
    fn an_overloaded_loop_admits_sessions_while_behind_real_time() {
        let (engine, _) = too_slow_with(EngineConfig {
            max_sessions: 2,
            overload: true,
            ..Default::default()
        });
        let _first = engine.open_session(&PersonaRequest::default()).unwrap();
        assert!(within_seconds(|| !engine.keeps_real_time()));
        assert!(engine.open_session(&PersonaRequest::default()).is_ok());
        engine.shutdown();
    }

    #[test]
    fn sessions_beyond_the_limit_are_refused_until_one_leaves() {
        let engine = start(2);
        let first = engine.open_session(&PersonaRequest::default()).unwrap();
        let _second = engine.open_session(&PersonaRequest::default()).unwrap();
        assert!(matches!(
            engine.open_session(&PersonaRequest::default()),
            Err(OpenError::Full { max: 2 })
        ));
        assert_eq!(
            first.events.recv_timeout(Duration::from_secs(2)).unwrap(),
            SessionEvent::Ready
        );
        drop(first);
        let deadline = Instant::now() + Duration::from_secs(2);
        while engine.active_sessions() > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(engine.open_session(&PersonaRequest::default()).is_ok());
        engine.shutdown();
    }

    #[test]
    fn a_bad_persona_is_refused_before_taking_a_slot() {
        let engine = start(1);
        let request = PersonaRequest {
            voice: Some("../voices/x".into()),
            prompt: None,
        };
        assert!(matches!(
            engine.open_session(&request),
            Err(OpenError::Persona(_))
        ));
        assert_eq!(engine.active_sessions(), 0);
        engine.shutdown();
    }

    #[test]
    fn audio_comes_back_through_the_thread_in_real_time() {
        let engine = start(1);
        let mut session = engine.open_session(&PersonaRequest::default()).unwrap();
        assert_eq!(
            session.events.recv_timeout(Duration::from_secs(2)).unwrap(),
            SessionEvent::Ready
        );
        let started = Instant::now();
        session.input.push(&vec![0.25; 3 * FRAME_SAMPLES]);
        let mut out = vec![0.0; FRAME_SAMPLES];
        let mut echoed = false;
        while started.elapsed() < Duration::from_secs(2) && !echoed {
            if session.output.pop_exact(&mut out) {
                echoed = out.iter().all(|s| *s == 0.25);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(echoed, "the echoed frame never came back");
        engine.shutdown();
        assert!(matches!(
            engine.open_session(&PersonaRequest::default()),
            Err(OpenError::Stopped)
        ));
    }
}
