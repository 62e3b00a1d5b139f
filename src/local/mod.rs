//! Local mode (`duplex local`): one conversation with the microphone and the speaker through
//! cpal, or with WAV files, through the same session rings and the same step loop as the server.
//!
//! - Devices: [`devices`] opens the sound card; its callbacks only move samples through
//!   device-rate rings, and a bridge thread resamples to and from 24 kHz and cancels the echo
//!   of the speaker in the microphone ([`aec`], on by default; off with `--no-aec` for
//!   headphones).
//! - Files: [`run_files`] plays a WAV file into a session and records the agent. In real time
//!   it uses the step loop's own thread ([`EngineHandle`]) and pushes 20 ms of input on the
//!   engine's packet grid; faster than real time it drives the same [`StepLoop`] with a clock
//!   that jumps from deadline to deadline: push one frame of input, run the tick, take its
//!   output frame — the loop's gather, drop policy and scatter are unchanged, only the waiting
//!   is skipped.

pub mod aec;
pub mod devices;

use crate::audio::resample::resample;
use crate::audio::ring::ring;
use crate::audio::wav::{self, WavError};
use crate::audio::{FRAME_SAMPLES, PACKET_PERIOD, PACKET_SAMPLES, SAMPLE_RATE, clock_grid};
use crate::engine::session::SlotSession;
use crate::engine::step_loop::StepLoop;
use crate::engine::{
    Engine, EngineConfig, EngineHandle, OpenError, PersonaError, PersonaRequest, SessionEvent,
    SessionId, SessionStats, StatsSnapshot,
};
use crate::metrics::Metrics;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long the persona may take to be put in place.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why local mode could not run; each message names the problem and the way out.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error(
        "no {kind} sound device found: this machine has no sound card, or ALSA/PulseAudio/PipeWire \
         cannot see it (in a container, pass the device through). To run without one, use files: \
         `duplex local --input in.wav --output out.wav` (add `--realtime false` to run faster than real time)"
    )]
    NoSoundCard { kind: &'static str },
    #[error("unknown {kind} device {name:?}; available: {}", available.join(", "))]
    UnknownDevice {
        kind: &'static str,
        name: String,
        available: Vec<String>,
    },
    #[error("sound device: {0}")]
    Device(String),
    #[error(transparent)]
    Wav(#[from] WavError),
    #[error(transparent)]
    Persona(#[from] PersonaError),
    #[error("opening the session: {0}")]
    Open(#[from] OpenError),
    #[error("the engine: {0}")]
    Engine(String),
    #[error("{0}")]
    Other(String),
}

/// What a file run produced.
#[derive(Debug, Clone)]
pub struct FileReport {
    /// Frames stepped.
    pub frames: usize,
    /// Samples written to the output file (24 kHz).
    pub output_samples: usize,
    /// The agent's text pieces in order.
    pub text: Vec<String>,
    pub stats: StatsSnapshot,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// A file run's settings.
#[derive(Debug, Clone)]
pub struct FileOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Pace the input in real time through the step loop's thread, or run as fast as the
    /// engine steps.
    pub realtime: bool,
    pub persona: PersonaRequest,
}

/// Plays `options.input` (any rate; resampled to 24 kHz) into a session on `engine` and writes
/// the agent's audio to `options.output` (24 kHz mono, the input's length plus the engine's
/// delay, so the reply to the last frame is in it).
pub fn run_files<E: Engine>(engine: E, options: &FileOptions) -> Result<FileReport, LocalError> {
    let (pcm, rate) = wav::read_mono(&options.input)?;
    let pcm = resample(&pcm, rate, SAMPLE_RATE).map_err(|e| LocalError::Other(e.to_string()))?;
    let frames = pcm.len().div_ceil(FRAME_SAMPLES) + engine.info().delay_frames;
    let started = Instant::now();
    let (output, text, stats) = if options.realtime {
        files_realtime(engine, &options.persona, &pcm, frames)?
    } else {
        files_fast(engine, &options.persona, &pcm, frames)?
    };
    wav::write_pcm16(&options.output, SAMPLE_RATE, &[&output])?;
    Ok(FileReport {
        frames,
        output_samples: output.len(),
        text,
        stats,
        elapsed: started.elapsed(),
    })
}

/// The input's `idx`-th block of `len` samples, zero-padded past the end.
fn block(pcm: &[f32], idx: usize, out: &mut [f32]) {
    let start = (idx * out.len()).min(pcm.len());
    let end = (start + out.len()).min(pcm.len());
    out[..end - start].copy_from_slice(&pcm[start..end]);
    out[end - start..].fill(0.0);
}

type Recording = (Vec<f32>, Vec<String>, StatsSnapshot);

/// Faster than real time: the step loop itself, ticked on a clock that jumps to each deadline.
fn files_fast<E: Engine>(
    engine: E,
    request: &PersonaRequest,
    pcm: &[f32],
    frames: usize,
) -> Result<Recording, LocalError> {
    let persona = engine.info().catalog.resolve(request)?;
    let config = EngineConfig::default();
    let occupancy = Arc::new(AtomicUsize::new(1));
    let origin = Instant::now();
    let mut step_loop = StepLoop::new(
        engine,
        origin,
        config.max_wait_samples,
        occupancy,
        Arc::new(Metrics::new()),
    );
    let (mut input, input_cons) = ring(config.input_ring_samples);
    let (output_prod, mut output) = ring(config.output_ring_samples);
    let (events_tx, events) = crossbeam_channel::bounded(256);
    let stats = Arc::new(SessionStats::default());
    step_loop.join(
        SlotSession {
            id: SessionId(1),
            input: input_cons,
            output: output_prod,
            events: events_tx,
            stats: stats.clone(),
        },
        &persona,
    );
    // Faster than real time: the persona is prefilled before the first frame, however long.
    step_loop.prepare_all();
    let mut text = Vec::new();
    let mut frame = vec![0.0; FRAME_SAMPLES];
    let mut recorded = Vec::with_capacity(frames * FRAME_SAMPLES);
    for idx in 0..frames {
        block(pcm, idx, &mut frame);
        input.push(&frame);
        let deadline = step_loop.deadline();
        step_loop.tick(&mut || deadline);
        if !output.pop_exact(&mut frame) {
            frame.fill(0.0);
        }
        recorded.extend_from_slice(&frame);
        collect_events(&events, &mut text)?;
    }
    step_loop.close_all();
    Ok((recorded, text, stats.snapshot()))
}

/// In real time: the step loop's thread, with 20 ms of input pushed on the engine's grid.
fn files_realtime<E: Engine>(
    engine: E,
    request: &PersonaRequest,
    pcm: &[f32],
    frames: usize,
) -> Result<Recording, LocalError> {
    let config = EngineConfig {
        max_sessions: 1,
        ..Default::default()
    };
    let handle = EngineHandle::start(engine, config, Arc::new(Metrics::new()))
        .map_err(|e| LocalError::Engine(e.to_string()))?;
    let result = (|| {
        let mut session = handle.open_session(request)?;
        let mut text = Vec::new();
        wait_ready(&session.events, &mut text)?;
        let (origin, phase) = handle.output_schedule();
        let mut next = clock_grid::next_after(origin + phase, PACKET_PERIOD, Instant::now());
        let packets = frames * FRAME_SAMPLES / PACKET_SAMPLES;
        let mut packet = vec![0.0; PACKET_SAMPLES];
        let mut recorded = Vec::with_capacity(frames * FRAME_SAMPLES + FRAME_SAMPLES);
        // One frame more than the input, so the last frame's output is in.
        for idx in 0..packets + crate::audio::PACKETS_PER_FRAME {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            next += PACKET_PERIOD;
            block(pcm, idx, &mut packet);
            session.input.push(&packet);
            if session.output.pop_exact(&mut packet) {
                recorded.extend_from_slice(&packet);
            }
            collect_events(&session.events, &mut text)?;
        }
        recorded.resize(frames * FRAME_SAMPLES, 0.0);
        Ok((recorded, text, session.stats.snapshot()))
    })();
    handle.shutdown();
    result
}

fn wait_ready(
    events: &crossbeam_channel::Receiver<SessionEvent>,
    text: &mut Vec<String>,
) -> Result<(), LocalError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match events.recv_deadline(deadline) {
            Ok(SessionEvent::Ready) => return Ok(()),
            Ok(SessionEvent::Text(piece)) => text.push(piece),
            Ok(SessionEvent::Error(reason)) => return Err(LocalError::Engine(reason)),
            Err(_) => return Err(LocalError::Engine("the session never became ready".into())),
        }
    }
}

fn collect_events(
    events: &crossbeam_channel::Receiver<SessionEvent>,
    text: &mut Vec<String>,
) -> Result<(), LocalError> {
    while let Ok(event) = events.try_recv() {
        match event {
            SessionEvent::Ready => {}
            SessionEvent::Text(piece) => text.push(piece),
            SessionEvent::Error(reason) => return Err(LocalError::Engine(reason)),
        }
    }
    Ok(())
}

/// A device run's settings.
#[derive(Debug, Clone, Default)]
pub struct DeviceOptions {
    pub input_device: Option<String>,
    pub output_device: Option<String>,
    /// Cancel the speaker's echo in the microphone (off for headphones).
    pub aec: bool,
    pub persona: PersonaRequest,
}

/// Talks through the microphone and the speaker until `stop` is set; the agent's text goes to
/// `on_text` as it comes.
pub fn run_devices<E: Engine>(
    engine: E,
    options: &DeviceOptions,
    stop: &AtomicBool,
    mut on_text: impl FnMut(&str),
) -> Result<StatsSnapshot, LocalError> {
    let config = EngineConfig {
        max_sessions: 1,
        ..Default::default()
    };
    let handle = EngineHandle::start(engine, config, Arc::new(Metrics::new()))
        .map_err(|e| LocalError::Engine(e.to_string()))?;
    let result = (|| {
        let session = handle.open_session(&options.persona)?;
        let crate::engine::SessionHandle {
            input,
            output,
            events,
            stats,
            closer,
            ..
        } = session;
        let mut devices = devices::open(
            options.input_device.as_deref(),
            options.output_device.as_deref(),
            options.aec,
            input,
            output,
        )?;
        tracing::info!(aec = options.aec, "{}", devices.description);
        let mut text = Vec::new();
        wait_ready(&events, &mut text)?;
        tracing::info!("ready: talk (Ctrl-C to stop)");
        let mut next_report = Instant::now() + Duration::from_secs(10);
        while !stop.load(Ordering::Acquire) {
            devices.bridge.pump();
            text.clear();
            collect_events(&events, &mut text)?;
            for piece in &text {
                on_text(piece);
            }
            if Instant::now() >= next_report {
                next_report += Duration::from_secs(10);
                let c = &devices.counters;
                tracing::info!(
                    capture_overflow = c.capture_overflow_samples.load(Ordering::Relaxed),
                    playback_underrun = c.playback_underrun_samples.load(Ordering::Relaxed),
                    stream_errors = c.stream_errors.load(Ordering::Relaxed),
                    "devices"
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(devices);
        drop(closer);
        Ok(stats.snapshot())
    })();
    handle.shutdown();
    result
}

/// The sound devices this machine has, for `--list-devices`.
pub fn list_devices() -> Result<String, LocalError> {
    devices::list()
}
