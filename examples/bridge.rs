//! The embedding API in a few lines: a WAV file goes into a session on a running engine in real
//! time, 20 ms at a time, and the agent's audio comes back into another WAV file, with its text
//! pieces printed as they arrive.
//!
//! ```sh
//! cargo run --example bridge -- in.wav out.wav
//! ```
//!
//! It runs the echo engine (the agent repeats you one frame later); a program serving
//! PersonaPlex would start `EngineHandle` with `duplex::engine::personaplex::PersonaPlexEngine`
//! instead and use the session exactly the same way.

use duplex::audio::resample::resample;
use duplex::audio::{PACKET_PERIOD, PACKET_SAMPLES, SAMPLE_RATE, wav};
use duplex::engine::{EchoEngine, EngineConfig, EngineHandle, PersonaRequest, SessionEvent};
use duplex::metrics::Metrics;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1).map(PathBuf::from);
    let (Some(input), Some(output)) = (args.next(), args.next()) else {
        return Err("usage: bridge IN.wav OUT.wav".into());
    };
    let (pcm, rate) = wav::read_mono(&input)?;
    let pcm = resample(&pcm, rate, SAMPLE_RATE)?;

    let engine = EngineHandle::start(
        EchoEngine::new(1, 1),
        EngineConfig::default(),
        Arc::new(Metrics::new()),
    )?;
    let mut session = engine.open_session(&PersonaRequest::default())?;
    match session.events.recv_timeout(Duration::from_secs(10))? {
        SessionEvent::Ready => {}
        other => return Err(format!("the session did not start: {other:?}").into()),
    }

    // 20 ms in and out per step of an absolute clock, plus half a second for the last reply.
    let mut packet = vec![0.0; PACKET_SAMPLES];
    let mut recorded = Vec::with_capacity(pcm.len() + SAMPLE_RATE as usize);
    let packets = pcm.len().div_ceil(PACKET_SAMPLES) + 25;
    let started = Instant::now();
    for idx in 0..packets {
        let chunk = pcm.get(idx * PACKET_SAMPLES..).unwrap_or(&[]);
        let len = chunk.len().min(PACKET_SAMPLES);
        packet[..len].copy_from_slice(&chunk[..len]);
        packet[len..].fill(0.0);
        session.input.push(&packet);
        while session.output.pop_exact(&mut packet) {
            recorded.extend_from_slice(&packet);
        }
        while let Ok(event) = session.events.try_recv() {
            match event {
                SessionEvent::Text(piece) => print!("{piece}"),
                SessionEvent::Error(message) => return Err(message.into()),
                SessionEvent::Ready => {}
            }
        }
        let next = started + PACKET_PERIOD * (idx as u32 + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    println!();
    let stats = session.stats.snapshot();
    drop(session);
    engine.shutdown();
    wav::write_pcm16(&output, SAMPLE_RATE, &[&recorded])?;
    eprintln!(
        "{} frames, {} underruns; wrote {}",
        stats.frames,
        stats.input_underruns,
        output.display()
    );
    Ok(())
}
