//! Audio on a phone line's wire and the session's 24 kHz: G.711 µ-law/A-law or 16-bit PCM at
//! 8, 16 or 24 kHz, G.722 (16 kHz) or Opus, converted on the way in (into the session's input
//! ring) and on the way out (one 20 ms packet per tick of the engine's grid). The telephony
//! bridges and SIP share it.

use super::outbound::{PacketSource, level};
use crate::audio::g711::{self, Law};
use crate::audio::g722::{self, G722Decode, G722Encode};
use crate::audio::opus::{EncoderConfig, OpusDecoder, OpusEncoder};
use crate::audio::resample::Polyphase;
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
    /// G.722 at 64 kbit/s: 16 kHz, a byte per two samples.
    G722,
    /// Opus, decoded to and encoded from 24 kHz.
    Opus,
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
    pub const G722: Self = Self {
        codec: Codec::G722,
        rate: g722::RATE,
    };
    pub const OPUS: Self = Self {
        codec: Codec::Opus,
        rate: SAMPLE_RATE,
    };

    /// Bytes of one 20 ms packet; None for Opus, whose packets vary.
    pub fn packet_bytes(&self) -> Option<usize> {
        let samples = self.rate as usize / 50;
        match self.codec {
            Codec::G711(_) => Some(samples),
            Codec::L16 => Some(2 * samples),
            Codec::G722 => Some(samples / 2),
            Codec::Opus => None,
        }
    }

    fn check(&self) -> Result<(), String> {
        let fits = match self.codec {
            Codec::G711(_) | Codec::L16 => matches!(self.rate, 8000 | 16000 | 24000),
            Codec::G722 => self.rate == g722::RATE,
            Codec::Opus => self.rate == SAMPLE_RATE,
        };
        match fits {
            true => Ok(()),
            false => Err(format!(
                "{:?} at {} Hz is not supported",
                self.codec, self.rate
            )),
        }
    }
}

/// A codec's decoding state.
enum Decode {
    G711(Law),
    L16,
    G722(Box<G722Decode>),
    Opus(Box<OpusDecoder>),
}

impl Decode {
    fn new(codec: Codec) -> Result<Self, String> {
        Ok(match codec {
            Codec::G711(law) => Self::G711(law),
            Codec::L16 => Self::L16,
            Codec::G722 => Self::G722(Box::default()),
            Codec::Opus => Self::Opus(Box::new(OpusDecoder::new().map_err(|e| e.to_string())?)),
        })
    }

    /// The samples `payload` decodes to; None when it is not a packet of this codec.
    fn samples_in(&self, payload: &[u8]) -> Option<usize> {
        match self {
            Self::G711(_) => Some(payload.len()),
            Self::L16 => Some(payload.len() / 2),
            Self::G722(_) => Some(2 * payload.len()),
            Self::Opus(decoder) => decoder.packet_samples(payload).ok(),
        }
    }

    /// Decodes `payload` into `out` (sized by [`Self::samples_in`]); None when it is garbage.
    fn decode(&mut self, payload: &[u8], out: &mut [f32]) -> Option<usize> {
        match self {
            Self::G711(law) => Some(g711::decode(*law, payload, out)),
            Self::L16 => {
                for (sample, bytes) in out.iter_mut().zip(payload.chunks_exact(2)) {
                    *sample = i16::from_le_bytes([bytes[0], bytes[1]]) as f32 / 32768.0;
                }
                Some(payload.len() / 2)
            }
            Self::G722(decoder) => Some(decoder.decode(payload, out)),
            Self::Opus(decoder) => decoder.decode(payload, out).ok(),
        }
    }
}

/// A codec's encoding state.
enum Encode {
    G711(Law),
    L16,
    G722(Box<G722Encode>),
    Opus(Box<OpusEncoder>),
}

impl Encode {
    fn new(codec: Codec) -> Result<Self, String> {
        Ok(match codec {
            Codec::G711(law) => Self::G711(law),
            Codec::L16 => Self::L16,
            Codec::G722 => Self::G722(Box::default()),
            // The agent's voice, as WebRTC sends it: CELT, low delay.
            Codec::Opus => Self::Opus(Box::new(
                OpusEncoder::new(EncoderConfig::agent()).map_err(|e| e.to_string())?,
            )),
        })
    }

    /// Encodes one packet's samples into `payload` (empty if the encoder fails).
    fn encode(&mut self, pcm: &[f32], payload: &mut Vec<u8>) {
        payload.clear();
        match self {
            Self::G711(law) => {
                payload.resize(pcm.len(), 0);
                g711::encode(*law, pcm, payload);
            }
            Self::L16 => {
                for &sample in pcm {
                    payload.extend_from_slice(&g711::to_i16(sample).to_le_bytes());
                }
            }
            Self::G722(encoder) => {
                payload.resize(pcm.len() / 2, 0);
                encoder.encode(pcm, payload);
            }
            Self::Opus(encoder) => {
                if let Ok(packet) = encoder.encode(pcm) {
                    payload.extend_from_slice(packet);
                }
            }
        }
    }
}

/// The converter from `from` Hz to `to` Hz; None where they are equal.
fn converter(from: u32, to: u32) -> Result<Option<Box<Polyphase>>, String> {
    match from == to {
        true => Ok(None),
        false => Polyphase::new(from, to)
            .map(|c| Some(Box::new(c)))
            .map_err(|e| e.to_string()),
    }
}

/// Runs `input` through `converter` (or copies it) into `out`; returns the samples written.
fn convert(converter: &mut Option<Box<Polyphase>>, input: &[f32], out: &mut [f32]) -> usize {
    let written = match converter {
        None => {
            out[..input.len()].copy_from_slice(input);
            Ok(input.len())
        }
        Some(converter) => converter.process(input, out),
    };
    // Every caller sizes `out` for the most that `input` can yield.
    written.expect("scratch sized for the converter's output")
}

/// Longest run of lost packets concealed (Opus): a longer gap is a pause in the stream (a
/// transfer, a hold), not loss to paper over.
const MAX_CONCEALED_PACKETS: u64 = 5;

/// Provider audio → 24 kHz → the session's input ring.
pub struct InboundAudio {
    decode: Decode,
    rate: Option<Box<Polyphase>>,
    wire: Vec<f32>,
    wide: Vec<f32>,
}

impl InboundAudio {
    pub fn new(format: WireFormat) -> Result<Self, String> {
        format.check()?;
        Ok(Self {
            decode: Decode::new(format.codec)?,
            rate: converter(format.rate, SAMPLE_RATE)?,
            wire: vec![0.0; 4096],
            wide: vec![0.0; 3 * 4096],
        })
    }

    /// Decodes and queues one payload; returns its level (RMS). A payload the codec cannot
    /// read is counted as bad and queues nothing.
    pub fn push(
        &mut self,
        payload: &[u8],
        input: &mut InputProducer,
        stats: &SessionStats,
        metrics: &Metrics,
    ) -> f32 {
        stats.add(&stats.packets_received, 1);
        metrics.packets_received.inc();
        let decoded = self.decode.samples_in(payload).and_then(|samples| {
            self.fit(samples);
            self.decode.decode(payload, &mut self.wire[..samples])
        });
        let Some(samples) = decoded else {
            stats.add(&stats.packets_bad, 1);
            metrics.packets_bad.inc();
            return 0.0;
        };
        self.queue(samples, input, stats)
    }

    /// `packets` before `next` never came: counted as lost, and for Opus filled in (the last
    /// rebuilt from `next`'s FEC data, the others concealed) so the caller's speech keeps its
    /// timing. The other codecs leave the gap: the engine hears it as a short silence.
    pub fn lost(
        &mut self,
        packets: u64,
        next: &[u8],
        input: &mut InputProducer,
        stats: &SessionStats,
        metrics: &Metrics,
    ) {
        stats.add(&stats.packets_lost, packets);
        metrics.packets_lost.inc_by(packets);
        let Decode::Opus(decoder) = &self.decode else {
            return;
        };
        // A lost packet lasted as long as the one that follows it, as far as can be told.
        let Some(samples) = decoder
            .packet_samples(next)
            .ok()
            .filter(|_| packets <= MAX_CONCEALED_PACKETS)
        else {
            return;
        };
        self.fit(samples);
        for missing in (1..=packets).rev() {
            let Decode::Opus(decoder) = &mut self.decode else {
                return;
            };
            let lost_packet = &mut self.wire[..samples];
            let recovered = missing == 1 && decoder.recover(next, lost_packet).is_ok();
            if recovered {
                stats.add(&stats.packets_recovered, 1);
                metrics.packets_recovered.inc();
            }
            if recovered || decoder.conceal(lost_packet).is_ok() {
                self.queue(samples, input, stats);
            }
        }
    }

    /// Grows the scratch buffers for `samples` at the wire rate: only for chunks longer than
    /// 0.5 s (Telnyx allows them); 20 ms packets never grow them.
    fn fit(&mut self, samples: usize) {
        if self.wire.len() < samples {
            self.wire.resize(samples, 0.0);
            self.wide.resize(3 * samples + 1024, 0.0);
        }
    }

    /// Converts `wire[..samples]` to 24 kHz and queues it; returns its level.
    fn queue(&mut self, samples: usize, input: &mut InputProducer, stats: &SessionStats) -> f32 {
        let wire = &self.wire[..samples];
        let level = level(wire);
        // `fit` sized `wide` for the most `samples` inputs yield.
        let wide_len = convert(&mut self.rate, wire, &mut self.wide);
        let overflow = input.push(&self.wide[..wide_len]) as u64;
        stats.add(&stats.input_overflow_samples, overflow);
        level
    }
}

/// The session's output → the wire rate and codec, one 20 ms packet per tick.
pub struct OutboundAudio {
    pub source: PacketSource,
    pub format: WireFormat,
    encode: Encode,
    rate: Option<Box<Polyphase>>,
    narrow: Vec<f32>,
    payload: Vec<u8>,
    /// Samples (24 kHz) sent so far (the mark queue's clock).
    pub sent_samples: u64,
}

impl OutboundAudio {
    pub fn new(source: PacketSource, format: WireFormat) -> Result<Self, String> {
        format.check()?;
        Ok(Self {
            source,
            format,
            encode: Encode::new(format.codec)?,
            rate: converter(SAMPLE_RATE, format.rate)?,
            narrow: vec![0.0; 2 * PACKET_SAMPLES],
            payload: Vec::with_capacity(4 * PACKET_SAMPLES),
            sent_samples: 0,
        })
    }

    /// The next packet's payload (empty if the encoder failed) and its level before
    /// encoding.
    pub fn next(&mut self, stats: &SessionStats, metrics: &Metrics) -> (&[u8], f32) {
        let pcm = self.source.next_packet(stats, metrics);
        let level = level(pcm);
        // `narrow` holds two packets, more than any converter makes of one.
        let narrow_len = convert(&mut self.rate, pcm, &mut self.narrow);
        let narrow = &self.narrow[..narrow_len];
        self.encode.encode(narrow, &mut self.payload);
        self.sent_samples += PACKET_SAMPLES as u64;
        (&self.payload, level)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::opus::EncoderConfig;
    use crate::audio::ring::ring;
    use crate::audio::signal;

    #[test]
    fn opus_is_decoded_and_a_lost_packet_rebuilt_from_the_next() {
        let pcm = signal::speech_like(PACKET_SAMPLES * 10, 5);
        let mut encoder = OpusEncoder::new(EncoderConfig::default()).unwrap();
        let packets: Vec<Vec<u8>> = pcm
            .chunks_exact(PACKET_SAMPLES)
            .map(|c| encoder.encode(c).unwrap().to_vec())
            .collect();
        let (mut producer, consumer) = ring(20 * PACKET_SAMPLES);
        let mut inbound = InboundAudio::new(WireFormat::OPUS).unwrap();
        let (stats, metrics) = (SessionStats::default(), Metrics::new());
        for (idx, packet) in packets.iter().enumerate() {
            match idx {
                3 => continue,
                4 => inbound.lost(1, packet, &mut producer, &stats, &metrics),
                _ => {}
            }
            inbound.push(packet, &mut producer, &stats, &metrics);
        }
        inbound.push(&[0x03, 0x00], &mut producer, &stats, &metrics);
        let snap = stats.snapshot();
        let counts = (
            snap.packets_received,
            snap.packets_lost,
            snap.packets_recovered,
        );
        assert_eq!((counts, snap.packets_bad), ((10, 1, 1), 1));
        assert_eq!(consumer.queued(), 10 * PACKET_SAMPLES);
    }

    #[test]
    fn a_long_gap_is_counted_but_not_papered_over() {
        let mut encoder = OpusEncoder::new(EncoderConfig::default()).unwrap();
        let packet = encoder.encode(&[0.0; PACKET_SAMPLES]).unwrap().to_vec();
        let (mut producer, consumer) = ring(20 * PACKET_SAMPLES);
        let (stats, metrics) = (SessionStats::default(), Metrics::new());
        let mut inbound = InboundAudio::new(WireFormat::OPUS).unwrap();
        inbound.lost(
            MAX_CONCEALED_PACKETS + 1,
            &packet,
            &mut producer,
            &stats,
            &metrics,
        );
        assert_eq!((stats.snapshot().packets_lost, consumer.queued()), (6, 0));
        let mut g711 = InboundAudio::new(WireFormat::MULAW_8K).unwrap();
        g711.lost(2, &[0xff; 160], &mut producer, &stats, &metrics);
        assert_eq!((stats.snapshot().packets_lost, consumer.queued()), (8, 0));
    }

    #[test]
    fn g722_carries_24khz_audio_out_and_back_in() {
        let pcm = signal::speech_like(PACKET_SAMPLES * 25, 9);
        let (mut agent, output) = ring(4 * PACKET_SAMPLES);
        let (stats, metrics) = (SessionStats::default(), Metrics::new());
        let mut outbound = OutboundAudio::new(PacketSource::new(output), WireFormat::G722).unwrap();
        let mut inbound = InboundAudio::new(WireFormat::G722).unwrap();
        let (mut producer, mut consumer) = ring(pcm.len() + PACKET_SAMPLES);
        for packet in pcm.chunks_exact(PACKET_SAMPLES) {
            agent.push(packet);
            let (payload, _) = outbound.next(&stats, &metrics);
            assert_eq!(payload.len(), 160);
            let payload = payload.to_vec();
            inbound.push(&payload, &mut producer, &stats, &metrics);
        }
        let mut heard = vec![0.0; consumer.queued()];
        consumer.pop(&mut heard);
        let (lag, correlation) = signal::best_lag(&pcm, &heard, 400);
        assert!(correlation > 0.9, "correlation {correlation} at lag {lag}");
    }
}
