//! The session handle: what every transport (WebRTC, WebSocket, local devices, embedders) holds
//! for one conversation — the input producer, the output consumer, the event receiver and the
//! counters — and what the step loop keeps on its side of the same session.

use crate::audio::ring::{InputConsumer, InputProducer, OutputConsumer, OutputProducer};
use crossbeam_channel::{Receiver, Sender};
use serde::Serialize;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::driver::Command;

/// A server-unique session number (never reused within a process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SessionId(pub u64);

impl SessionId {
    /// Parses the form `Display` writes (`s0000002a`).
    pub fn parse(text: &str) -> Option<Self> {
        let hex = text.strip_prefix('s')?;
        if hex.is_empty() || hex.len() > 16 {
            return None;
        }
        u64::from_str_radix(hex, 16).ok().map(Self)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{:08x}", self.0)
    }
}

/// What the step loop tells a session, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionEvent {
    /// The persona is in place; the next frames are the conversation.
    Ready,
    /// A piece of the agent's text (its inner monologue), with leading space where a word starts.
    Text(String),
    /// The session cannot go on; the message is for the user.
    Error(String),
}

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Per-session counters, written by the step loop and the transport without locks.
        #[derive(Debug, Default)]
        pub struct SessionStats {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A copy of [`SessionStats`] at one moment, for the `stats` event and logs.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl SessionStats {
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Frames of real input the model consumed.
    frames,
    /// Ticks at which less than a frame of the session's flowing audio was queued: the frame
    /// was made up with silence before what had arrived.
    input_underruns,
    /// Input samples dropped because the backlog exceeded the latency bound.
    input_dropped_samples,
    /// Input samples that did not fit in the input ring.
    input_overflow_samples,
    /// Output samples that did not fit in the output ring.
    output_overflow_samples,
    /// 20 ms packets the transport sent as silence because no output was ready.
    output_underruns,
    /// Output samples the transport dropped to keep latency bounded.
    output_dropped_samples,
    /// Media packets received.
    packets_received,
    /// Media packets that never arrived.
    packets_lost,
    /// Lost packets rebuilt from the next packet's FEC data.
    packets_recovered,
    /// Packets that arrived after their slot was played (dropped).
    packets_late,
    /// Packets whose payload could not be decoded.
    packets_bad,
    /// Duration of the session's last tick in microseconds (shared by the whole batch).
    last_step_us,
}

impl SessionStats {
    pub fn add(&self, counter: &AtomicU64, amount: u64) {
        counter.fetch_add(amount, Ordering::Relaxed);
    }
}

/// Ends its session when dropped (the step loop frees the slot at the next frame boundary).
pub struct SessionCloser {
    pub(super) id: SessionId,
    pub(super) commands: Sender<Command>,
}

impl Drop for SessionCloser {
    fn drop(&mut self) {
        // The loop is gone only at shutdown, when every slot is freed anyway.
        let _ = self.commands.send(Command::Leave(self.id));
    }
}

/// One conversation as a transport sees it — and the embedding API: every transport (WebRTC,
/// `/api/chat`, telephony, local devices) ends in one of these, and so can any program.
///
/// Get one from [`EngineHandle::open_session`](super::EngineHandle::open_session), wait for
/// [`SessionEvent::Ready`], then push the user's audio (24 kHz mono `f32`) into `input` and pop
/// the agent's from `output` as the step loop produces it, one 80 ms frame per tick. Neither
/// ring blocks: `push` returns what did not fit, `pop_exact` takes nothing until a whole buffer
/// is there. Keep input flowing in real time (a transport pushes 20 ms at a time); the loop
/// drops a backlog beyond about one frame and feeds silence when input is missing, counting
/// both in `stats`. Move the fields into the tasks that need them; the session ends (its slot
/// is freed at the next frame boundary) when `closer` — or the whole handle — is dropped.
///
/// ```
/// use duplex::audio::FRAME_SAMPLES;
/// use duplex::engine::{EchoEngine, EngineConfig, EngineHandle, PersonaRequest, SessionEvent};
/// use duplex::metrics::Metrics;
/// use std::sync::Arc;
/// use std::time::{Duration, Instant};
///
/// // The echo engine answers with the user's own audio one frame (80 ms) later.
/// let engine = EngineHandle::start(
///     EchoEngine::new(4, 1),
///     EngineConfig::default(),
///     Arc::new(Metrics::new()),
/// )?;
/// let persona = PersonaRequest {
///     voice: Some("NATF2".into()),
///     prompt: Some("You are a friendly assistant.".into()),
/// };
/// let mut session = engine.open_session(&persona)?;
/// assert_eq!(session.events.recv_timeout(Duration::from_secs(2))?, SessionEvent::Ready);
///
/// // One frame of a tone (a real client pushes 20 ms every 20 ms; more than about a frame
/// // at once is a backlog the loop drops).
/// let tone: Vec<f32> = (0..FRAME_SAMPLES).map(|i| 0.3 * (i as f32 * 0.05).sin()).collect();
/// assert_eq!(session.input.push(&tone), 0, "everything fit");
///
/// // Pull the agent's audio frame by frame until the echo of the first frame arrives.
/// let mut frame = vec![0.0; FRAME_SAMPLES];
/// let deadline = Instant::now() + Duration::from_secs(2);
/// let mut echoed = false;
/// while !echoed && Instant::now() < deadline {
///     if session.output.pop_exact(&mut frame) {
///         echoed = frame == tone;
///     } else {
///         std::thread::sleep(Duration::from_millis(5));
///     }
/// }
/// assert!(echoed);
///
/// // Text pieces and errors arrive as events; counters are in `stats`.
/// while let Ok(event) = session.events.try_recv() {
///     if let SessionEvent::Text(piece) = event {
///         print!("{piece}");
///     }
/// }
/// assert_eq!(session.stats.snapshot().frames, 1);
///
/// drop(session); // ends the conversation
/// engine.shutdown();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SessionHandle {
    pub id: SessionId,
    /// Push the user's 24 kHz mono audio here.
    pub input: InputProducer,
    /// Pop the agent's 24 kHz mono audio from here.
    pub output: OutputConsumer,
    /// Events in order: `Ready`, then `Text`/`Error` as they happen.
    pub events: Receiver<SessionEvent>,
    pub stats: Arc<SessionStats>,
    pub closer: SessionCloser,
}

/// The step loop's side of a session.
pub struct SlotSession {
    pub id: SessionId,
    pub input: InputConsumer,
    pub output: OutputProducer,
    pub events: Sender<SessionEvent>,
    pub stats: Arc<SessionStats>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_copies_every_counter() {
        let stats = SessionStats::default();
        stats.add(&stats.frames, 3);
        stats.add(&stats.packets_lost, 2);
        let snap = stats.snapshot();
        assert_eq!(
            (snap.frames, snap.packets_lost, snap.input_underruns),
            (3, 2, 0)
        );
        let json = serde_json::to_value(snap).unwrap();
        assert_eq!(json["packets_lost"], 2);
    }

    #[test]
    fn session_ids_display_compactly() {
        assert_eq!(SessionId(0x2a).to_string(), "s0000002a");
        assert_eq!(SessionId::parse("s0000002a"), Some(SessionId(0x2a)));
        for bad in ["", "s", "0000002a", "sxyz", "s00000000000000000"] {
            assert_eq!(SessionId::parse(bad), None, "{bad}");
        }
    }
}
