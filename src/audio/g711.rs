//! G.711 µ-law and A-law (ITU-T G.711), the telephone network's 8-bit companded PCM, between
//! its bytes and f32 samples in [-1, 1]. Both directions write into the caller's buffer.

use audio_codec_algorithms::{decode_alaw, decode_ulaw, encode_alaw, encode_ulaw};

/// Which G.711 companding law a byte stream uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Law {
    /// µ-law (PCMU): North America and Japan; Twilio's only format.
    Mulaw,
    /// A-law (PCMA): Europe and most other networks.
    Alaw,
}

const SCALE: f32 = 32768.0;

/// Decodes `bytes` into `out[..bytes.len()]`; returns the samples written. `out` must be at
/// least as long as `bytes` (extra bytes are ignored).
pub fn decode(law: Law, bytes: &[u8], out: &mut [f32]) -> usize {
    let len = bytes.len().min(out.len());
    let decode_one = match law {
        Law::Mulaw => decode_ulaw,
        Law::Alaw => decode_alaw,
    };
    for (sample, &byte) in out[..len].iter_mut().zip(bytes) {
        *sample = decode_one(byte) as f32 / SCALE;
    }
    len
}

/// Encodes `pcm` into `out[..pcm.len()]`; returns the bytes written. Samples beyond full scale
/// are clipped.
pub fn encode(law: Law, pcm: &[f32], out: &mut [u8]) -> usize {
    let len = pcm.len().min(out.len());
    let encode_one = match law {
        Law::Mulaw => encode_ulaw,
        Law::Alaw => encode_alaw,
    };
    for (byte, &sample) in out[..len].iter_mut().zip(pcm) {
        *byte = encode_one(to_i16(sample));
    }
    len
}

/// f32 in [-1, 1] to 16-bit PCM, rounded and clipped.
pub fn to_i16(sample: f32) -> i16 {
    (sample * SCALE)
        .round()
        .clamp(i16::MIN as f32, i16::MAX as f32) as i16
}

#[cfg(test)]
mod tests {
    use super::*;

    // Every code's linear value as sox decodes it (`sox -e u-law|a-law ... -e signed -b 16`),
    // an implementation independent of the one under test.
    include!("g711_tables.rs");

    #[test]
    fn every_code_decodes_to_the_table_value() {
        for (law, table) in [(Law::Mulaw, &ULAW_TABLE), (Law::Alaw, &ALAW_TABLE)] {
            let codes: Vec<u8> = (0..=255).collect();
            let mut out = [0.0; 256];
            assert_eq!(decode(law, &codes, &mut out), 256);
            for (code, (&got, &want)) in out.iter().zip(table.iter()).enumerate() {
                assert_eq!(to_i16(got), want, "{law:?} code {code:#04x}");
            }
        }
    }

    #[test]
    fn table_values_encode_back_to_their_code() {
        for (law, table) in [(Law::Mulaw, &ULAW_TABLE), (Law::Alaw, &ALAW_TABLE)] {
            let pcm: Vec<f32> = table.iter().map(|&v| v as f32 / SCALE).collect();
            let mut codes = [0u8; 256];
            encode(law, &pcm, &mut codes);
            for (code, &got) in codes.iter().enumerate() {
                // µ-law has two zeros (0x7f and 0xff); both decode to 0, which encodes as 0xff.
                let want = if law == Law::Mulaw && code == 0x7f {
                    0xff
                } else {
                    code as u8
                };
                assert_eq!(got, want, "{law:?} value {}", table[code]);
            }
        }
    }

    #[test]
    fn known_points_and_clipping() {
        let mut out = [0u8; 4];
        encode(Law::Mulaw, &[0.0, 1.5, -1.5, 0.0], &mut out);
        assert_eq!(out, [0xff, 0x80, 0x00, 0xff]);
        encode(Law::Alaw, &[0.0, 1.5, -1.5, 0.0], &mut out);
        assert_eq!(out, [0xd5, 0xaa, 0x2a, 0xd5]);
    }

    #[test]
    fn a_tone_survives_the_round_trip() {
        let tone: Vec<f32> = (0..800)
            .map(|i| 0.5 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 8000.0).sin())
            .collect();
        for law in [Law::Mulaw, Law::Alaw] {
            let mut bytes = vec![0u8; tone.len()];
            let mut back = vec![0.0; tone.len()];
            encode(law, &tone, &mut bytes);
            decode(law, &bytes, &mut back);
            let err = crate::audio::signal::rms_difference(&tone, &back);
            assert!(err < 0.01, "{law:?} rms error {err}");
        }
    }
}
