//! Audio on a phone line's wire and the session's 24 kHz: G.711 µ-law/A-law or 16-bit PCM at
//! 8, 16 or 24 kHz, converted on the way in (into the session's input ring) and on the way
//! out (one 20 ms packet per tick of the engine's grid). The telephony bridges and SIP share it.

use super::outbound::{PacketSource, level};
use crate::audio::g711::{self, Law};
use crate::audio::resample::{Downsampler3, StreamResampler, Upsampler3};
use crate::audio::ring::InputProducer;
use crate::audio::{PACKET_SAMPLES, SAMPLE_RATE};
use crate::engine::SessionStats;
use crate::metrics::Metrics;

/// How audio travels on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    G711(Law),
    /// 16-bit signed little-endian PCM.
    L16,
}

/// The wire's codec and sample rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireFormat {
    pub codec: Codec,
    pub rate: u32,
}

impl WireFormat {
    pub const MULAW_8K: Self = Self {
        codec: Codec::G711(Law::Mulaw),
        rate: 8000,
    };

    /// Bytes of one 20 ms packet.
    pub fn packet_bytes(&self) -> usize {
        let samples = self.rate as usize / 50;
        match self.codec {
            Codec::G711(_) => samples,
            Codec::L16 => 2 * samples,
        }
    }
}

/// Converts between the wire rate and 24 kHz.
enum RateIn {
    Same,
    Three(Box<Upsampler3>),
    Other(Box<StreamResampler>),
}

enum RateOut {
    Same,
    Three(Box<Downsampler3>),
    Other(Box<StreamResampler>),
}

fn check_rate(rate: u32) -> Result<(), String> {
    if matches!(rate, 8000 | 16000 | 24000) {
        Ok(())
    } else {
        Err(format!(
            "sample rate {rate} Hz; supported: 8000, 16000, 24000"
        ))
    }
}

/// Provider audio → 24 kHz → the session's input ring.
pub struct InboundAudio {
    format: WireFormat,
    rate: RateIn,
    wire: Vec<f32>,
    wide: Vec<f32>,
}

impl InboundAudio {
    pub fn new(format: WireFormat) -> Result<Self, String> {
        check_rate(format.rate)?;
        let rate = match format.rate {
            SAMPLE_RATE => RateIn::Same,
            8000 => RateIn::Three(Box::default()),
            other => RateIn::Other(Box::new(
                StreamResampler::new(other, SAMPLE_RATE).map_err(|e| e.to_string())?,
            )),
        };
        Ok(Self {
            format,
            rate,
            wire: vec![0.0; 4096],
            wide: vec![0.0; 3 * 4096],
        })
    }

    /// Decodes and queues one payload; returns its level (RMS).
    pub fn push(
        &mut self,
        payload: &[u8],
        input: &mut InputProducer,
        stats: &SessionStats,
        metrics: &Metrics,
    ) -> f32 {
        stats.add(&stats.packets_received, 1);
        metrics.packets_received.inc();
        let samples = match self.format.codec {
            Codec::G711(_) => payload.len(),
            Codec::L16 => payload.len() / 2,
        };
        if self.wire.len() < samples {
            // Only for chunks longer than 0.5 s (Telnyx allows them); 20 ms packets never grow it.
            self.wire.resize(samples, 0.0);
            self.wide.resize(3 * samples + 1024, 0.0);
        }
        let wire = &mut self.wire[..samples];
        match self.format.codec {
            Codec::G711(law) => {
                g711::decode(law, payload, wire);
            }
            Codec::L16 => {
                for (sample, bytes) in wire.iter_mut().zip(payload.chunks_exact(2)) {
                    *sample = i16::from_le_bytes([bytes[0], bytes[1]]) as f32 / 32768.0;
                }
            }
        }
        let level = level(wire);
        let wide_len = match &mut self.rate {
            RateIn::Same => {
                self.wide[..samples].copy_from_slice(wire);
                Ok(samples)
            }
            RateIn::Three(up) => up.process(wire, &mut self.wide),
            RateIn::Other(r) => r.process(wire, &mut self.wide),
        };
        // The scratch buffers are sized above for the largest output of `samples` inputs.
        let wide_len = wide_len.expect("scratch sized for the payload");
        let overflow = input.push(&self.wide[..wide_len]) as u64;
        stats.add(&stats.input_overflow_samples, overflow);
        level
    }
}

/// The session's output → the wire rate and codec, one 20 ms packet per tick.
pub struct OutboundAudio {
    pub source: PacketSource,
    pub format: WireFormat,
    rate: RateOut,
    narrow: Vec<f32>,
    payload: Vec<u8>,
    /// 24 kHz samples sent so far (the mark queue's clock).
    /// Samples (24 kHz) sent so far.
    pub sent_samples: u64,
}

impl OutboundAudio {
    pub fn new(source: PacketSource, format: WireFormat) -> Result<Self, String> {
        check_rate(format.rate)?;
        let rate = match format.rate {
            SAMPLE_RATE => RateOut::Same,
            8000 => RateOut::Three(Box::default()),
            other => RateOut::Other(Box::new(
                StreamResampler::new(SAMPLE_RATE, other).map_err(|e| e.to_string())?,
            )),
        };
        Ok(Self {
            source,
            format,
            rate,
            narrow: vec![0.0; 2 * PACKET_SAMPLES],
            payload: Vec::with_capacity(4 * PACKET_SAMPLES),
            sent_samples: 0,
        })
    }

    /// The next packet's payload and its level before encoding.
    pub fn next(&mut self, stats: &SessionStats, metrics: &Metrics) -> (&[u8], f32) {
        let pcm = self.source.next_packet(stats, metrics);
        let level = level(pcm);
        let narrow_len = match &mut self.rate {
            RateOut::Same => {
                self.narrow[..pcm.len()].copy_from_slice(pcm);
                Ok(pcm.len())
            }
            RateOut::Three(down) => down.process(pcm, &mut self.narrow),
            RateOut::Other(r) => r.process(pcm, &mut self.narrow),
        };
        // `narrow` holds two packets, more than any converter makes of one.
        let narrow = &self.narrow[..narrow_len.expect("scratch sized for a packet")];
        self.payload.clear();
        match self.format.codec {
            Codec::G711(law) => {
                self.payload.resize(narrow.len(), 0);
                g711::encode(law, narrow, &mut self.payload);
            }
            Codec::L16 => {
                for &sample in narrow {
                    self.payload
                        .extend_from_slice(&g711::to_i16(sample).to_le_bytes());
                }
            }
        }
        self.sent_samples += PACKET_SAMPLES as u64;
        (&self.payload, level)
    }
}
