//! Acoustic echo cancellation for speaker use: the WebRTC audio processing module's AEC3, in
//! its pure-Rust port (`sonora`), on 10 ms frames of the session's 24 kHz audio. The render
//! side is the agent's audio on its way to the speaker; the capture side is the microphone.

use crate::audio::SAMPLE_RATE;
use sonora::config::EchoCanceller;
use sonora::{AudioProcessing, Config, StreamConfig};

/// Samples in one AEC frame (10 ms at 24 kHz).
pub const AEC_FRAME_SAMPLES: usize = SAMPLE_RATE as usize / 100;

/// Removes the agent's own voice from the microphone signal.
pub struct EchoCancel {
    apm: AudioProcessing,
    scratch: Vec<f32>,
}

impl std::fmt::Debug for EchoCancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoCancel").finish_non_exhaustive()
    }
}

/// The AEC refused a frame.
#[derive(Debug, thiserror::Error)]
#[error("echo cancellation: {0}")]
pub struct AecError(String);

impl EchoCancel {
    /// An AEC3 instance at 24 kHz mono; `delay_ms` is the expected speaker→microphone delay
    /// (device buffers), which AEC3 refines by itself.
    pub fn new(delay_ms: i32) -> Result<Self, AecError> {
        let stream = StreamConfig::new(SAMPLE_RATE, 1);
        let config = Config {
            echo_canceller: Some(EchoCanceller::default()),
            ..Default::default()
        };
        let mut apm = AudioProcessing::builder()
            .config(config)
            .capture_config(stream)
            .render_config(stream)
            .build();
        apm.set_stream_delay_ms(delay_ms)
            .map_err(|e| AecError(format!("{e:?}")))?;
        Ok(Self {
            apm,
            scratch: vec![0.0; AEC_FRAME_SAMPLES],
        })
    }

    /// Tells the AEC what the speaker is about to play (one 10 ms frame).
    pub fn render(&mut self, frame: &[f32]) -> Result<(), AecError> {
        self.scratch.copy_from_slice(frame);
        self.apm
            .process_render_f32(&[frame], &mut [&mut self.scratch[..]])
            .map_err(|e| AecError(format!("{e:?}")))
    }

    /// Cancels the echo in one 10 ms microphone frame, in place.
    pub fn capture(&mut self, frame: &mut [f32]) -> Result<(), AecError> {
        self.scratch.copy_from_slice(frame);
        self.apm
            .process_capture_f32(&[&self.scratch[..]], &mut [frame])
            .map_err(|e| AecError(format!("{e:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::signal;

    #[test]
    fn the_agents_voice_is_removed_from_the_microphone() {
        // The speaker plays speech; the microphone hears it 30 ms later at half level.
        let seconds = 6;
        let far = signal::speech_like(SAMPLE_RATE as usize * seconds, 3);
        let delay = SAMPLE_RATE as usize * 30 / 1000;
        let mut aec = EchoCancel::new(30).unwrap();
        let mut residual = Vec::new();
        let mut mic_all = Vec::new();
        for (idx, frame) in far.chunks_exact(AEC_FRAME_SAMPLES).enumerate() {
            aec.render(frame).unwrap();
            let start = idx * AEC_FRAME_SAMPLES;
            let mut mic: Vec<f32> = (start..start + AEC_FRAME_SAMPLES)
                .map(|i| {
                    if i >= delay {
                        0.5 * far[i - delay]
                    } else {
                        0.0
                    }
                })
                .collect();
            mic_all.extend_from_slice(&mic);
            aec.capture(&mut mic).unwrap();
            residual.extend_from_slice(&mic);
        }
        // Over the last two seconds, once converged.
        let tail = residual.len() - 2 * SAMPLE_RATE as usize;
        let before = signal::rms(&mic_all[tail..]);
        let after = signal::rms(&residual[tail..]);
        let erle_db = 20.0 * (before / after.max(1e-9)).log10();
        eprintln!("echo return loss enhancement {erle_db:.1} dB");
        assert!(erle_db > 10.0, "only {erle_db:.1} dB of echo removed");
    }
}
