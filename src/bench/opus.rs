//! `duplex bench opus`: what one stream's Opus costs the server, per encoder setting, on
//! speech-like audio: the CPU that decides how many sessions a core can carry.

use super::loopback::Percentiles;
use crate::audio::opus::{EncoderConfig, MAX_PACKET_SAMPLES, OpusDecoder, OpusEncoder};
use crate::audio::{PACKET_SAMPLES, SAMPLE_RATE, samples_to_ms, signal};
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

/// Timed passes over the audio; the median is reported.
const PASSES: usize = 5;

/// One encoder setting's cost.
#[derive(Debug, Clone, Serialize)]
pub struct OpusRow {
    pub setting: &'static str,
    pub config: String,
    pub lookahead_ms: f64,
    /// Median CPU time to encode a stream, in percent of one core.
    pub encode_core_percent: f64,
    /// Median CPU time to decode it again, in percent of one core.
    pub decode_core_percent: f64,
    pub mean_packet_bytes: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OpusReport {
    pub seconds: f64,
    pub rows: Vec<OpusRow>,
}

impl OpusReport {
    pub fn table(&self) -> String {
        let mut lines = vec![format!(
            "Opus, one 24 kHz mono stream of {:.0} s of speech-like audio, median of {PASSES} passes",
            self.seconds
        )];
        lines.push(format!(
            "{:<28} {:>10} {:>14} {:>14} {:>12}",
            "setting", "lookahead", "encode % core", "decode % core", "bytes/packet"
        ));
        for row in &self.rows {
            lines.push(format!(
                "{:<28} {:>8.1}ms {:>14.3} {:>14.3} {:>12.1}",
                row.setting,
                row.lookahead_ms,
                row.encode_core_percent,
                row.decode_core_percent,
                row.mean_packet_bytes
            ));
        }
        lines.join("\n")
    }
}

/// Times every setting the server uses over `seconds` of audio.
pub fn run(seconds: f64) -> Result<OpusReport> {
    let pcm = signal::speech_like((seconds * SAMPLE_RATE as f64) as usize, 11);
    let pcm = &pcm[..pcm.len() / PACKET_SAMPLES * PACKET_SAMPLES];
    let settings = [
        ("a client's voice (default)", EncoderConfig::default()),
        ("the agent's voice (agent)", EncoderConfig::agent()),
    ];
    let rows = settings
        .into_iter()
        .map(|(setting, config)| measure(setting, config, pcm))
        .collect::<Result<_>>()?;
    Ok(OpusReport { seconds, rows })
}

fn measure(setting: &'static str, config: EncoderConfig, pcm: &[f32]) -> Result<OpusRow> {
    let audio_seconds = pcm.len() as f64 / SAMPLE_RATE as f64;
    let mut encode_seconds = Vec::with_capacity(PASSES);
    let mut decode_seconds = Vec::with_capacity(PASSES);
    let mut packets = Vec::new();
    for _ in 0..PASSES {
        let mut encoder = OpusEncoder::new(config)?;
        let started = Instant::now();
        packets = pcm
            .chunks_exact(PACKET_SAMPLES)
            .map(|chunk| Ok(encoder.encode(chunk)?.to_vec()))
            .collect::<Result<Vec<_>>>()?;
        encode_seconds.push(started.elapsed().as_secs_f64());
        let mut decoder = OpusDecoder::new()?;
        let mut out = vec![0.0; MAX_PACKET_SAMPLES];
        let started = Instant::now();
        for packet in &packets {
            decoder.decode(packet, &mut out)?;
        }
        decode_seconds.push(started.elapsed().as_secs_f64());
    }
    let lookahead = OpusEncoder::new(config)?.lookahead_samples()?;
    let bytes: usize = packets.iter().map(Vec::len).sum();
    Ok(OpusRow {
        setting,
        config: format!("{config:?}"),
        lookahead_ms: samples_to_ms(lookahead as u64),
        encode_core_percent: 100.0 * Percentiles::of(&encode_seconds).p50 / audio_seconds,
        decode_core_percent: 100.0 * Percentiles::of(&decode_seconds).p50 / audio_seconds,
        mean_packet_bytes: bytes as f64 / packets.len().max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_is_measured_and_the_agent_adds_less_delay() {
        let report = run(1.0).unwrap();
        assert_eq!(report.rows.len(), 2);
        for row in &report.rows {
            assert!(
                row.encode_core_percent > 0.0 && row.mean_packet_bytes > 10.0,
                "{row:?}"
            );
        }
        assert!(report.rows[1].lookahead_ms < report.rows[0].lookahead_ms);
        assert!(report.table().contains("agent"));
    }
}
