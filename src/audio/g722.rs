//! G.722 at 64 kbit/s (ITU-T G.722): 16 kHz wideband speech as one byte per two samples, as
//! SIP phones and PBXs send it. The signal is split by a quadrature mirror filter into a low
//! band (6-bit ADPCM) and a high band (2-bit ADPCM), each with the standard's adaptive
//! predictor; integer arithmetic throughout, bit for bit the standard's (checked against an
//! independent implementation, `tests/reference/make_g722_fixture.py`). Both directions work
//! on f32 samples in [-1, 1] and write into the caller's buffer; the state carries from one
//! packet to the next.
//!
//! Written here because the Rust crates at hand either differ from the standard's output or
//! bring a media framework along.

use super::g711::to_i16;

/// G.722's sample rate (its RTP clock is 8 kHz all the same: RFC 3551 §4.5.2).
pub const RATE: u32 = 16_000;
const SCALE: f32 = 32768.0;

/// The QMF's 24 taps, folded to 12 (the filter is symmetric about its middle).
const QMF: [i32; 12] = [3, -11, 12, 32, -210, 951, 3876, -805, 362, -156, 53, -11];

/// Low band: decision levels of the 6-bit quantizer (QUANTL), scaled by the step size.
const LOW_LEVELS: [i32; 30] = [
    0, 35, 72, 110, 150, 190, 233, 276, 323, 370, 422, 473, 530, 587, 650, 714, 786, 858, 940,
    1023, 1121, 1219, 1339, 1458, 1612, 1765, 1980, 2195, 2557, 2919,
];
/// The 6-bit code of each interval, for a negative and a positive difference.
const LOW_CODE_NEG: [i32; 31] = [
    0, 63, 62, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11,
    10, 9, 8, 7, 6, 5, 4,
];
const LOW_CODE_POS: [i32; 31] = [
    0, 61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49, 48, 47, 46, 45, 44, 43, 42, 41, 40, 39,
    38, 37, 36, 35, 34, 33, 32,
];
/// Low band: the 6-bit inverse quantizer (the decoder's output).
const LOW_INVERSE_6: [i32; 64] = [
    -136, -136, -136, -136, -24808, -21904, -19008, -16704, -14984, -13512, -12280, -11192, -10232,
    -9360, -8576, -7856, -7192, -6576, -6000, -5456, -4944, -4464, -4008, -3576, -3168, -2776,
    -2400, -2032, -1688, -1360, -1040, -728, 24808, 21904, 19008, 16704, 14984, 13512, 12280,
    11192, 10232, 9360, 8576, 7856, 7192, 6576, 6000, 5456, 4944, 4464, 4008, 3576, 3168, 2776,
    2400, 2032, 1688, 1360, 1040, 728, 432, 136, -432, -136,
];
/// Low band: the 4-bit inverse quantizer that feeds the predictor (the code's top 4 bits).
const LOW_INVERSE_4: [i32; 16] = [
    0, -20456, -12896, -8968, -6288, -4240, -2584, -1200, 20456, 12896, 8968, 6288, 4240, 2584,
    1200, 0,
];
/// Low band: the log step size's adjustment for each 4-bit code's magnitude.
const LOW_MAGNITUDE: [usize; 16] = [0, 7, 6, 5, 4, 3, 2, 1, 7, 6, 5, 4, 3, 2, 1, 0];
const LOW_LOG_STEP: [i32; 8] = [-60, -30, 58, 172, 334, 538, 1198, 3042];
/// High band: the 2-bit inverse quantizer and the log step size's adjustments.
const HIGH_INVERSE: [i32; 4] = [-7408, -1616, 7408, 1616];
const HIGH_MAGNITUDE: [usize; 4] = [2, 1, 2, 1];
const HIGH_LOG_STEP: [i32; 3] = [0, -214, 798];
/// The step size's mantissa, indexed by the log step's fraction.
const STEP_MANTISSA: [i32; 32] = [
    2048, 2093, 2139, 2186, 2233, 2282, 2332, 2383, 2435, 2489, 2543, 2599, 2656, 2714, 2774, 2834,
    2896, 2960, 3025, 3091, 3158, 3228, 3298, 3371, 3444, 3520, 3597, 3676, 3756, 3838, 3922, 4008,
];

fn saturate(value: i32) -> i32 {
    value.clamp(i16::MIN.into(), i16::MAX.into())
}

/// A 15-bit fixed-point product.
fn mul15(a: i32, b: i32) -> i32 {
    (a * b) >> 15
}

/// One sub-band's ADPCM state: the step size (blocks 3L/3H) and the adaptive predictor with
/// two poles and six zeros (block 4).
struct Band {
    /// The signal estimate: what the next sample is predicted to be.
    estimate: i32,
    /// Its zero part alone.
    zero_estimate: i32,
    /// Reconstructed signal and partial reconstruction, newest first.
    signal: [i32; 3],
    partial: [i32; 3],
    /// Pole coefficients (index 1 and 2 used).
    poles: [i32; 3],
    /// Quantized differences, newest first, and the zero coefficients (index 1 to 6 used).
    differences: [i32; 7],
    zeros: [i32; 7],
    /// The log step size and the step size it gives.
    log_step: i32,
    step: i32,
    /// The band's largest log step, and the shift that turns it into a step size.
    max_log_step: i32,
    step_shift: i32,
}

impl Band {
    fn new(step: i32, max_log_step: i32, step_shift: i32) -> Self {
        Self {
            estimate: 0,
            zero_estimate: 0,
            signal: [0; 3],
            partial: [0; 3],
            poles: [0; 3],
            differences: [0; 7],
            zeros: [0; 7],
            log_step: 0,
            step,
            max_log_step,
            step_shift,
        }
    }

    fn low() -> Self {
        Self::new(32, 18432, 8)
    }

    fn high() -> Self {
        Self::new(8, 22528, 10)
    }

    /// Blocks 3L/3H (LOGSCL, SCALEL): the log step leaks and moves by `adjust`; the step size
    /// follows it.
    fn adapt_step(&mut self, adjust: i32) {
        self.log_step = (((self.log_step * 127) >> 7) + adjust).clamp(0, self.max_log_step);
        let mantissa = STEP_MANTISSA[((self.log_step >> 6) & 31) as usize];
        let shift = self.step_shift - (self.log_step >> 11);
        let step = match shift < 0 {
            true => mantissa << -shift,
            false => mantissa >> shift,
        };
        self.step = step << 2;
    }

    /// Block 4: takes the quantized difference `d` into the predictor and predicts the next
    /// sample.
    fn predict(&mut self, d: i32) {
        self.differences[0] = d;
        self.signal[0] = saturate(self.estimate + d);
        self.partial[0] = saturate(self.zero_estimate + d);
        let sign = |v: i32| v >> 15;
        let choose = |same: bool, yes: i32, no: i32| if same { yes } else { no };
        let [p0, p1, p2] = self.partial.map(sign);
        // UPPOL2: the second pole.
        let leak = saturate(self.poles[1] << 2);
        let pull = choose(p0 == p1, -leak, leak).min(32767);
        let second = ((pull >> 7) + choose(p0 == p2, 128, -128) + mul15(self.poles[2], 32512))
            .clamp(-12288, 12288);
        // UPPOL1: the first, bounded by the second.
        let bound = saturate(15360 - second);
        let first = saturate(choose(p0 == p1, 192, -192) + mul15(self.poles[1], 32640))
            .clamp(-bound, bound);
        // UPZERO: each zero moves toward the sign agreement of its difference with d.
        let nudge = choose(d == 0, 0, 128);
        let d_sign = sign(d);
        for (zero, &difference) in self.zeros[1..].iter_mut().zip(&self.differences[1..]) {
            let agree = sign(difference) == d_sign;
            *zero = saturate(choose(agree, nudge, -nudge) + mul15(*zero, 32640));
        }
        // DELAYA: age every history by one sample.
        self.differences.copy_within(0..6, 1);
        self.signal.copy_within(0..2, 1);
        self.partial.copy_within(0..2, 1);
        self.poles[1] = first;
        self.poles[2] = second;
        // FILTEP, FILTEZ, PREDIC.
        let pole_estimate = saturate(
            mul15(self.poles[1], saturate(2 * self.signal[1]))
                + mul15(self.poles[2], saturate(2 * self.signal[2])),
        );
        let zero_sum: i32 = self.zeros[1..]
            .iter()
            .zip(&self.differences[1..])
            .map(|(&zero, &difference)| mul15(zero, saturate(2 * difference)))
            .sum();
        self.zero_estimate = saturate(zero_sum);
        self.estimate = saturate(pole_estimate + self.zero_estimate);
    }
}

/// The QMF's last 24 inputs (a pair per band sample), oldest first.
#[derive(Default)]
struct QmfHistory([i32; 24]);

impl QmfHistory {
    /// Takes a new pair; returns the filter's two halves: the even positions by the taps in
    /// order, and the odd ones by the taps reversed.
    fn push(&mut self, first: i32, second: i32) -> (i32, i32) {
        self.0.copy_within(2.., 0);
        self.0[22] = first;
        self.0[23] = second;
        let mut forward = 0;
        let mut backward = 0;
        for (i, &tap) in QMF.iter().enumerate() {
            forward += self.0[2 * i] * tap;
            backward += self.0[2 * i + 1] * QMF[11 - i];
        }
        (forward, backward)
    }
}

/// Encodes 16 kHz PCM, two samples to a byte.
pub struct G722Encode {
    qmf: QmfHistory,
    low: Band,
    high: Band,
}

impl Default for G722Encode {
    fn default() -> Self {
        Self {
            qmf: QmfHistory::default(),
            low: Band::low(),
            high: Band::high(),
        }
    }
}

impl G722Encode {
    /// Encodes `pcm` into `out`, a byte per pair of samples (an odd last sample waits for
    /// nothing: it is dropped); returns the bytes written.
    pub fn encode(&mut self, pcm: &[f32], out: &mut [u8]) -> usize {
        let mut written = 0;
        for (pair, byte) in pcm.chunks_exact(2).zip(out.iter_mut()) {
            let (forward, backward) = self
                .qmf
                .push(to_i16(pair[0]).into(), to_i16(pair[1]).into());
            let low = self.encode_low((backward + forward) >> 14);
            let high = self.encode_high((backward - forward) >> 14);
            *byte = ((high << 6) | low) as u8;
            written += 1;
        }
        written
    }

    /// Blocks 1L-4L: the low band's 6-bit code.
    fn encode_low(&mut self, sample: i32) -> i32 {
        let band = &mut self.low;
        let error = saturate(sample - band.estimate);
        let magnitude = if error >= 0 { error } else { -(error + 1) };
        let interval = (1..30)
            .find(|&i| magnitude < (LOW_LEVELS[i] * band.step) >> 12)
            .unwrap_or(30);
        let code = match error < 0 {
            true => LOW_CODE_NEG[interval],
            false => LOW_CODE_POS[interval],
        };
        let top = (code >> 2) as usize;
        let difference = mul15(band.step, LOW_INVERSE_4[top]);
        band.adapt_step(LOW_LOG_STEP[LOW_MAGNITUDE[top]]);
        band.predict(difference);
        code
    }

    /// Blocks 1H-4H: the high band's 2-bit code.
    fn encode_high(&mut self, sample: i32) -> i32 {
        let band = &mut self.high;
        let error = saturate(sample - band.estimate);
        let magnitude = if error >= 0 { error } else { -(error + 1) };
        let large = magnitude >= (564 * band.step) >> 12;
        let code = match (error < 0, large) {
            (true, true) => 0,
            (true, false) => 1,
            (false, true) => 2,
            (false, false) => 3,
        };
        let difference = mul15(band.step, HIGH_INVERSE[code as usize]);
        band.adapt_step(HIGH_LOG_STEP[HIGH_MAGNITUDE[code as usize]]);
        band.predict(difference);
        code
    }
}

/// Decodes G.722 bytes to 16 kHz PCM, two samples per byte.
pub struct G722Decode {
    qmf: QmfHistory,
    low: Band,
    high: Band,
}

impl Default for G722Decode {
    fn default() -> Self {
        Self {
            qmf: QmfHistory::default(),
            low: Band::low(),
            high: Band::high(),
        }
    }
}

impl G722Decode {
    /// Decodes `bytes` into `out`, as many as fit; returns the samples written (two per
    /// byte).
    pub fn decode(&mut self, bytes: &[u8], out: &mut [f32]) -> usize {
        let mut written = 0;
        for (&byte, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
            let low = self.decode_low(i32::from(byte & 0x3f));
            let high = self.decode_high(usize::from(byte >> 6));
            let (forward, backward) = self.qmf.push(low + high, low - high);
            pair[0] = saturate(backward >> 11) as f32 / SCALE;
            pair[1] = saturate(forward >> 11) as f32 / SCALE;
            written += 2;
        }
        written
    }

    /// Blocks 5L, 6L and the low band's predictor: the reconstructed low band sample.
    fn decode_low(&mut self, code: i32) -> i32 {
        let band = &mut self.low;
        let output =
            (band.estimate + mul15(band.step, LOW_INVERSE_6[code as usize])).clamp(-16384, 16383);
        let top = (code >> 2) as usize;
        let difference = mul15(band.step, LOW_INVERSE_4[top]);
        band.adapt_step(LOW_LOG_STEP[LOW_MAGNITUDE[top]]);
        band.predict(difference);
        output
    }

    /// Blocks 5H, 6H and the high band's predictor: the reconstructed high band sample.
    fn decode_high(&mut self, code: usize) -> i32 {
        let band = &mut self.high;
        let difference = mul15(band.step, HIGH_INVERSE[code]);
        let output = (difference + band.estimate).clamp(-16384, 16383);
        band.adapt_step(HIGH_LOG_STEP[HIGH_MAGNITUDE[code]]);
        band.predict(difference);
        output
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/g722")
            .join(name)
    }

    fn read_wav(name: &str) -> Vec<f32> {
        let mut reader = hound::WavReader::open(fixture(name)).unwrap();
        assert_eq!(reader.spec().sample_rate, RATE);
        reader
            .samples::<i16>()
            .map(|s| f32::from(s.unwrap()) / SCALE)
            .collect()
    }

    /// The bytes and the decoded audio are those of an independent implementation (Sippy's
    /// libg722, `tests/reference/make_g722_fixture.py`), packet by packet as a call runs.
    #[test]
    fn matches_libg722_bit_for_bit_both_ways() {
        let input = read_wav("input.wav");
        let expected_bytes = std::fs::read(fixture("encoded.g722")).unwrap();
        let expected_pcm = read_wav("decoded.wav");
        let mut encoder = G722Encode::default();
        let mut decoder = G722Decode::default();
        let (mut bytes, mut pcm) = (Vec::new(), Vec::new());
        let (mut packet, mut decoded) = ([0u8; 160], [0f32; 320]);
        for chunk in input.chunks_exact(320) {
            let n = encoder.encode(chunk, &mut packet);
            assert_eq!(n, 160);
            bytes.extend_from_slice(&packet);
            let m = decoder.decode(&packet, &mut decoded);
            assert_eq!(m, 320);
            pcm.extend_from_slice(&decoded);
        }
        assert_eq!(bytes.len(), expected_bytes.len());
        let first_diff = bytes.iter().zip(&expected_bytes).position(|(a, b)| a != b);
        assert_eq!(first_diff, None, "encoded bytes differ from libg722's");
        assert_eq!(pcm, expected_pcm, "decoded audio differs from libg722's");
    }

    #[test]
    fn a_short_output_buffer_bounds_the_decode() {
        let mut decoder = G722Decode::default();
        let mut out = [0f32; 7];
        assert_eq!(decoder.decode(&[0x55; 160], &mut out), 6);
    }
}
