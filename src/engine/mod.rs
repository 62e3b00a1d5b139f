//! The step loop: one OS thread per model steps every admitted session one 80 ms frame at a
//! time on an absolute clock, moving audio between the sessions' rings and an [`Engine`].
//!
//! `clock` holds the timing and drop policy as pure functions, `step_loop` the sans-IO loop
//! state (`join`, `leave`, `tick(now)`), `driver` the thread and the [`EngineHandle`] that
//! transports use to open sessions, `session` the handle they get back, `persona` the check of
//! what a client asked for, and `echo` the engine that stands in for the model.

pub mod clock;
mod driver;
pub mod echo;
pub mod persona;
pub mod personaplex;
pub mod session;
pub mod step_loop;

pub use driver::{EngineConfig, EngineHandle, OpenError};
pub use echo::EchoEngine;
pub use persona::{Persona, PersonaCatalog, PersonaError, PersonaRequest};
pub use session::{SessionEvent, SessionHandle, SessionId, SessionStats, StatsSnapshot};
pub use step_loop::REAL_TIME_STEP;

use std::time::{Duration, Instant};

/// What an engine is, for logs, `/api/info` and latency reports.
#[derive(Debug, Clone)]
pub struct EngineInfo {
    /// Short name: `echo`, `personaplex`.
    pub name: &'static str,
    /// The model it runs, if any.
    pub model: Option<String>,
    /// Frames between an input frame and the output frame it first affects.
    pub delay_frames: usize,
    /// Something users must know (e.g. that no weights are loaded), shown in the log and the page.
    pub notice: Option<String>,
    pub catalog: PersonaCatalog,
}

/// One tick's audio for every slot. Slot `i` reads `input[i * FRAME_SAMPLES..][..FRAME_SAMPLES]`
/// and writes the same range of `output`; inactive slots must be left alone.
pub struct StepIo<'a> {
    pub active: &'a [bool],
    pub input: &'a [f32],
    pub output: &'a mut [f32],
    /// Text pieces produced this tick, as `(slot_idx, piece)`.
    pub text: &'a mut Vec<(usize, String)>,
}

/// Time spent in an engine's own stages during one step (zero where a stage does not exist).
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    pub encode: Duration,
    pub temporal: Duration,
    pub depformer: Duration,
    pub decode: Duration,
}

/// An engine failure, with a message meant for logs and users.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct EngineError(pub String);

/// How a slot just opened stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opening {
    /// Its persona is in place: the slot runs from the next frame.
    Ready,
    /// Its persona is still being prefilled; `Engine::prepare` finishes it between frames.
    Preparing,
}

/// A speech model (or a stand-in) that advances a fixed set of slots one frame per call.
pub trait Engine: Send + 'static {
    fn info(&self) -> EngineInfo;
    /// How many sessions the engine can step at once.
    fn slots(&self) -> usize;
    /// Resets slot `slot_idx` and puts `persona` in place, before its first frame, or starts
    /// doing so (`Opening::Preparing`).
    fn open_slot(&mut self, slot_idx: usize, persona: &Persona) -> Result<Opening, EngineError>;
    /// Advances the openings still preparing, a piece of work at a time while the next is
    /// expected to end before `deadline` (and one piece whatever the time when `must_progress`).
    /// Returns the slots whose opening ended, in place (`Ok`) or failed.
    fn prepare(
        &mut self,
        _deadline: Instant,
        _must_progress: bool,
    ) -> Vec<(usize, Result<(), EngineError>)> {
        Vec::new()
    }
    /// Releases slot `slot_idx` (also one still preparing).
    fn close_slot(&mut self, slot_idx: usize);
    /// Advances every active slot by one frame.
    fn step(&mut self, io: StepIo<'_>) -> Result<StageTimes, EngineError>;
}
