//! Opus at 24 kHz mono: 20 ms packets, in-band FEC, and loss concealment on the decode side.

use super::{PACKET_SAMPLES, SAMPLE_RATE};
use opus::{Application, Bitrate, Channels};

/// The largest Opus packet (RFC 6716 §3.4: 1275 bytes per frame, up to 120 ms per packet).
const MAX_PACKET_BYTES: usize = 4000;
/// The longest audio one Opus packet may carry: 120 ms.
pub const MAX_PACKET_SAMPLES: usize = SAMPLE_RATE as usize * 120 / 1000;

/// Errors from libopus, with what we were doing when it failed.
#[derive(Debug, thiserror::Error)]
pub enum OpusError {
    #[error("opus {op}: {source}")]
    Codec {
        op: &'static str,
        #[source]
        source: opus::Error,
    },
    #[error("opus encoder takes exactly {PACKET_SAMPLES} samples (20 ms), got {0}")]
    PacketLength(usize),
}

fn codec(op: &'static str) -> impl FnOnce(opus::Error) -> OpusError {
    move |source| OpusError::Codec { op, source }
}

/// Which of Opus's codecs an encoder may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpusMode {
    /// SILK, hybrid or CELT as libopus judges the signal, with in-band FEC: what a browser
    /// sends. 6.5 ms of lookahead; three to four times `LowDelay`'s CPU for speech.
    Voice,
    /// CELT only: 2.5 ms of lookahead, but no in-band FEC (a lost packet is concealed).
    /// `duplex bench opus` measures both.
    LowDelay,
}

/// Encoder settings that differ between uses (the agent's voice, a test client).
#[derive(Debug, Clone, Copy)]
pub struct EncoderConfig {
    pub mode: OpusMode,
    /// Target bitrate in bits per second.
    pub bitrate_bps: i32,
    /// Expected packet loss in percent; makes libopus spend bits on in-band FEC (`Voice`).
    pub expected_loss_percent: i32,
}

impl Default for EncoderConfig {
    /// A client's microphone: voice with FEC.
    fn default() -> Self {
        Self {
            mode: OpusMode::Voice,
            bitrate_bps: 32_000,
            expected_loss_percent: 5,
        }
    }
}

impl EncoderConfig {
    /// The agent's voice on its way out: CELT alone, so a server encodes a hundred streams
    /// on a core and adds 4 ms less delay; the bitrate is raised a little for CELT's sake.
    pub fn agent() -> Self {
        Self {
            mode: OpusMode::LowDelay,
            bitrate_bps: 40_000,
            expected_loss_percent: 0,
        }
    }
}

/// Encodes 20 ms of 24 kHz mono PCM into one Opus packet.
pub struct OpusEncoder {
    inner: opus::Encoder,
    packet: Vec<u8>,
}

impl OpusEncoder {
    pub fn new(config: EncoderConfig) -> Result<Self, OpusError> {
        let application = match config.mode {
            OpusMode::Voice => Application::Audio,
            OpusMode::LowDelay => Application::LowDelay,
        };
        let mut inner = opus::Encoder::new(SAMPLE_RATE, Channels::Mono, application)
            .map_err(codec("create encoder"))?;
        inner
            .set_inband_fec(config.mode == OpusMode::Voice)
            .map_err(codec("enable fec"))?;
        inner
            .set_packet_loss_perc(config.expected_loss_percent)
            .map_err(codec("set loss percent"))?;
        inner
            .set_bitrate(Bitrate::Bits(config.bitrate_bps))
            .map_err(codec("set bitrate"))?;
        Ok(Self {
            inner,
            packet: vec![0; MAX_PACKET_BYTES],
        })
    }

    /// Encodes one 20 ms packet; the returned slice is valid until the next call.
    pub fn encode(&mut self, pcm: &[f32]) -> Result<&[u8], OpusError> {
        if pcm.len() != PACKET_SAMPLES {
            return Err(OpusError::PacketLength(pcm.len()));
        }
        let len = self
            .inner
            .encode_float(pcm, &mut self.packet)
            .map_err(codec("encode"))?;
        Ok(&self.packet[..len])
    }

    /// The encoder's algorithmic delay in samples at 24 kHz.
    pub fn lookahead_samples(&mut self) -> Result<usize, OpusError> {
        let samples = self.inner.get_lookahead().map_err(codec("lookahead"))?;
        Ok(samples.max(0) as usize)
    }

    pub fn reset(&mut self) -> Result<(), OpusError> {
        self.inner.reset_state().map_err(codec("reset encoder"))
    }
}

/// Decodes Opus packets to 24 kHz mono PCM, recovering lost packets from FEC or concealing them.
pub struct OpusDecoder {
    inner: opus::Decoder,
}

impl OpusDecoder {
    pub fn new() -> Result<Self, OpusError> {
        let inner =
            opus::Decoder::new(SAMPLE_RATE, Channels::Mono).map_err(codec("create decoder"))?;
        Ok(Self { inner })
    }

    /// Samples the packet decodes to, or an error for a packet libopus cannot parse.
    pub fn packet_samples(&self, packet: &[u8]) -> Result<usize, OpusError> {
        self.inner
            .get_nb_samples(packet)
            .map_err(codec("parse packet"))
    }

    /// Decodes one packet into `out` (at least as long as the packet's samples,
    /// [`Self::packet_samples`]; [`MAX_PACKET_SAMPLES`] always is); returns the samples written.
    pub fn decode(&mut self, packet: &[u8], out: &mut [f32]) -> Result<usize, OpusError> {
        self.inner
            .decode_float(packet, out, false)
            .map_err(codec("decode"))
    }

    /// Rebuilds a lost packet of `out.len()` samples from the FEC data carried by the packet
    /// that followed it.
    pub fn recover(&mut self, next_packet: &[u8], out: &mut [f32]) -> Result<usize, OpusError> {
        self.inner
            .decode_float(next_packet, out, true)
            .map_err(codec("decode fec"))
    }

    /// Conceals a lost packet of `out.len()` samples (packet loss concealment).
    pub fn conceal(&mut self, out: &mut [f32]) -> Result<usize, OpusError> {
        self.inner
            .decode_float(&[], out, false)
            .map_err(codec("conceal"))
    }

    pub fn reset(&mut self) -> Result<(), OpusError> {
        self.inner.reset_state().map_err(codec("reset decoder"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::signal;

    fn encode_all(pcm: &[f32]) -> Vec<Vec<u8>> {
        encode_with(EncoderConfig::default(), pcm)
    }

    fn encode_with(config: EncoderConfig, pcm: &[f32]) -> Vec<Vec<u8>> {
        let mut encoder = OpusEncoder::new(config).unwrap();
        pcm.chunks_exact(PACKET_SAMPLES)
            .map(|chunk| encoder.encode(chunk).unwrap().to_vec())
            .collect()
    }

    #[test]
    fn round_trip_through_libopus_keeps_the_signal() {
        let pcm = signal::speech_like(SAMPLE_RATE as usize, 7);
        for (config, lookahead) in [
            (EncoderConfig::default(), 156),
            (EncoderConfig::agent(), 60),
        ] {
            let packets = encode_with(config, &pcm);
            let mut decoder = OpusDecoder::new().unwrap();
            let mut out = vec![0.0; MAX_PACKET_SAMPLES];
            let mut decoded = Vec::new();
            for packet in &packets {
                assert_eq!(decoder.packet_samples(packet).unwrap(), PACKET_SAMPLES);
                let n = decoder.decode(packet, &mut out).unwrap();
                decoded.extend_from_slice(&out[..n]);
            }
            let (lag, corr) = signal::best_lag(&pcm, &decoded, 800);
            assert!(corr > 0.9, "{config:?}: correlation {corr} at lag {lag}");
            // The decoded audio trails the input by the encoder's lookahead.
            assert!(lag.abs_diff(lookahead) <= 2, "{config:?}: lag {lag}");
            let encoder_lookahead = OpusEncoder::new(config)
                .unwrap()
                .lookahead_samples()
                .unwrap();
            assert_eq!(encoder_lookahead, lookahead);
        }
    }

    #[test]
    fn fec_recovers_better_than_concealment() {
        let pcm = signal::speech_like(SAMPLE_RATE as usize, 3);
        let packets = encode_all(&pcm);
        let lost_idx = 20;
        let run = |use_fec: bool| {
            let mut decoder = OpusDecoder::new().unwrap();
            let mut out = vec![0.0; MAX_PACKET_SAMPLES];
            let mut decoded = Vec::new();
            for (idx, packet) in packets.iter().enumerate() {
                let n = if idx != lost_idx {
                    decoder.decode(packet, &mut out).unwrap()
                } else if use_fec {
                    decoder
                        .recover(&packets[idx + 1], &mut out[..PACKET_SAMPLES])
                        .unwrap()
                } else {
                    decoder.conceal(&mut out[..PACKET_SAMPLES]).unwrap()
                };
                decoded.extend_from_slice(&out[..n]);
            }
            decoded
        };
        let reference = run(false);
        assert_eq!(reference.len(), pcm.len());
        let with_fec = run(true);
        assert_eq!(with_fec.len(), pcm.len());
        // Compare the lost packet's span against the lossless decode.
        let mut lossless_decoder = OpusDecoder::new().unwrap();
        let mut out = vec![0.0; MAX_PACKET_SAMPLES];
        let mut lossless = Vec::new();
        for packet in &packets {
            let n = lossless_decoder.decode(packet, &mut out).unwrap();
            lossless.extend_from_slice(&out[..n]);
        }
        let span = lost_idx * PACKET_SAMPLES..(lost_idx + 1) * PACKET_SAMPLES;
        let err = |x: &[f32]| signal::rms_difference(&x[span.clone()], &lossless[span.clone()]);
        assert!(
            err(&with_fec) < err(&reference),
            "fec {} plc {}",
            err(&with_fec),
            err(&reference)
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut decoder = OpusDecoder::new().unwrap();
        let mut out = vec![0.0; MAX_PACKET_SAMPLES];
        // A TOC byte announcing code 3 with a frame count of zero is invalid.
        assert!(decoder.decode(&[0x03, 0x00], &mut out).is_err());
        assert!(decoder.packet_samples(&[0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn encoder_rejects_wrong_packet_length() {
        let mut encoder = OpusEncoder::new(EncoderConfig::default()).unwrap();
        assert!(matches!(
            encoder.encode(&[0.0; 100]),
            Err(OpusError::PacketLength(100))
        ));
    }

    #[test]
    fn reset_twice_gives_the_same_packets() {
        let pcm = signal::chirp(PACKET_SAMPLES * 4, 300.0, 3000.0, 0.5);
        let mut encoder = OpusEncoder::new(EncoderConfig::default()).unwrap();
        let mut run = || {
            encoder.reset().unwrap();
            pcm.chunks_exact(PACKET_SAMPLES)
                .map(|c| encoder.encode(c).unwrap().to_vec())
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }
}
