//! Sample-rate conversion: whole signals (files) and streams of any rate with rubato's
//! synchronous FFT resampler, and the telephone rate (8 kHz ↔ 24 kHz, an exact ratio of 3) with
//! a small polyphase FIR. The streaming converters allocate only in `new` and write into the
//! caller's buffer, so chunk boundaries never change the output.

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};
use std::f64::consts::PI;

#[derive(Debug, thiserror::Error)]
#[error("resampling {from} Hz to {to} Hz: {reason}")]
pub struct ResampleError {
    from: u32,
    to: u32,
    reason: String,
}

/// Converts mono `pcm` from `from` Hz to `to` Hz (output length `len · to / from`, rounded up).
pub fn resample(pcm: &[f32], from: u32, to: u32) -> Result<Vec<f32>, ResampleError> {
    if from == to || pcm.is_empty() {
        return Ok(pcm.to_vec());
    }
    let fail = |reason: String| ResampleError { from, to, reason };
    let mut resampler = Fft::<f32>::new(from as usize, to as usize, 1024, 1, FixedSync::Both)
        .map_err(|e| fail(e.to_string()))?;
    let input = InterleavedSlice::new(pcm, 1, pcm.len()).map_err(|e| fail(e.to_string()))?;
    let capacity = resampler.process_all_needed_output_len(pcm.len());
    let mut out = vec![0.0; capacity];
    let mut output =
        InterleavedSlice::new_mut(&mut out, 1, capacity).map_err(|e| fail(e.to_string()))?;
    let (_, produced) = resampler
        .process_all_into_buffer(&input, &mut output, pcm.len(), None)
        .map_err(|e| fail(e.to_string()))?;
    out.truncate(produced);
    Ok(out)
}

/// The caller's output buffer cannot hold what one `process` call produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("resampler output buffer holds {have} samples, {need} needed")]
pub struct OutputTooSmall {
    pub need: usize,
    pub have: usize,
}

/// Taps per polyphase branch of the ratio-3 filter (96 taps at 24 kHz: about 2 ms of delay).
const TAPS_PER_PHASE: usize = 32;
/// Filter length at the high rate.
const FIR_LEN: usize = 3 * TAPS_PER_PHASE;
/// Pass band edge of the telephone-band filter (the 8 kHz side's Nyquist is 4 kHz).
const CUTOFF_HZ: f64 = 3600.0;

/// A Kaiser-windowed sinc low-pass at 24 kHz with its cut-off below 4 kHz, unity DC gain.
fn telephone_lowpass() -> [f32; FIR_LEN] {
    let beta = 6.0;
    let center = (FIR_LEN - 1) as f64 / 2.0;
    let fc = CUTOFF_HZ / super::SAMPLE_RATE as f64;
    let mut taps = [0.0f64; FIR_LEN];
    for (idx, tap) in taps.iter_mut().enumerate() {
        let t = idx as f64 - center;
        let sinc = if t == 0.0 {
            2.0 * fc
        } else {
            (2.0 * PI * fc * t).sin() / (PI * t)
        };
        let ratio = t / center;
        let window = bessel_i0(beta * (1.0 - ratio * ratio).max(0.0).sqrt()) / bessel_i0(beta);
        *tap = sinc * window;
    }
    let sum: f64 = taps.iter().sum();
    taps.map(|t| (t / sum) as f32)
}

/// The zeroth-order modified Bessel function of the first kind (series; enough for a window).
fn bessel_i0(x: f64) -> f64 {
    let (mut sum, mut term) = (1.0, 1.0);
    for k in 1..50 {
        term *= (x / (2.0 * k as f64)).powi(2);
        sum += term;
    }
    sum
}

/// 8 kHz → 24 kHz: each input sample yields three output samples.
pub struct Upsampler3 {
    /// The filter split into its three phases, each reversed for a forward dot product.
    phases: [[f32; TAPS_PER_PHASE]; 3],
    /// The last `TAPS_PER_PHASE` inputs, stored twice so a window is always contiguous.
    history: [f32; 2 * TAPS_PER_PHASE],
    write_idx: usize,
}

impl Default for Upsampler3 {
    fn default() -> Self {
        Self::new()
    }
}

impl Upsampler3 {
    pub fn new() -> Self {
        let taps = telephone_lowpass();
        let mut phases = [[0.0; TAPS_PER_PHASE]; 3];
        for (phase_idx, phase) in phases.iter_mut().enumerate() {
            for k in 0..TAPS_PER_PHASE {
                // Gain 3 makes up for the two zeros stuffed between input samples.
                phase[TAPS_PER_PHASE - 1 - k] = 3.0 * taps[3 * k + phase_idx];
            }
        }
        Self {
            phases,
            history: [0.0; 2 * TAPS_PER_PHASE],
            write_idx: 0,
        }
    }

    /// Output samples for `input_len` input samples.
    pub fn output_len(input_len: usize) -> usize {
        3 * input_len
    }

    /// Converts `input`, writing `3 · input.len()` samples to the front of `out`.
    pub fn process(&mut self, input: &[f32], out: &mut [f32]) -> Result<usize, OutputTooSmall> {
        let need = Self::output_len(input.len());
        if out.len() < need {
            return Err(OutputTooSmall {
                need,
                have: out.len(),
            });
        }
        for (&x, out3) in input.iter().zip(out.chunks_exact_mut(3)) {
            self.history[self.write_idx] = x;
            self.history[self.write_idx + TAPS_PER_PHASE] = x;
            self.write_idx = (self.write_idx + 1) % TAPS_PER_PHASE;
            // Oldest to newest: the reversed phases line up with it.
            let window = &self.history[self.write_idx..self.write_idx + TAPS_PER_PHASE];
            for (y, phase) in out3.iter_mut().zip(&self.phases) {
                *y = dot(window, phase);
            }
        }
        Ok(need)
    }

    pub fn reset(&mut self) {
        self.history.fill(0.0);
        self.write_idx = 0;
    }
}

/// 24 kHz → 8 kHz: low-pass, then keep every third sample.
pub struct Downsampler3 {
    /// The filter reversed for a forward dot product.
    taps: [f32; FIR_LEN],
    history: [f32; 2 * FIR_LEN],
    write_idx: usize,
    /// Inputs seen since the last output (0, 1 or 2).
    phase: usize,
}

impl Default for Downsampler3 {
    fn default() -> Self {
        Self::new()
    }
}

impl Downsampler3 {
    pub fn new() -> Self {
        let mut taps = telephone_lowpass();
        taps.reverse();
        Self {
            taps,
            history: [0.0; 2 * FIR_LEN],
            write_idx: 0,
            phase: 0,
        }
    }

    /// The most output samples `input_len` input samples can yield (depends on the phase).
    pub fn max_output_len(input_len: usize) -> usize {
        input_len.div_ceil(3)
    }

    /// Converts `input`, writing to the front of `out`; returns the samples written.
    pub fn process(&mut self, input: &[f32], out: &mut [f32]) -> Result<usize, OutputTooSmall> {
        let need = (self.phase + input.len()) / 3;
        if out.len() < need {
            return Err(OutputTooSmall {
                need,
                have: out.len(),
            });
        }
        let mut written = 0;
        for &x in input {
            self.history[self.write_idx] = x;
            self.history[self.write_idx + FIR_LEN] = x;
            self.write_idx = (self.write_idx + 1) % FIR_LEN;
            self.phase += 1;
            if self.phase == 3 {
                self.phase = 0;
                let window = &self.history[self.write_idx..self.write_idx + FIR_LEN];
                out[written] = dot(window, &self.taps);
                written += 1;
            }
        }
        Ok(written)
    }

    pub fn reset(&mut self) {
        self.history.fill(0.0);
        self.write_idx = 0;
        self.phase = 0;
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A stream of mono audio from one rate to another in chunks of any size (sound cards at
/// 44.1 or 48 kHz ↔ 24 kHz). Input is gathered into rubato's fixed 10 ms chunks; equal rates
/// pass through.
pub struct StreamResampler {
    inner: Option<Fft<f32>>,
    chunk_in: usize,
    pending: Vec<f32>,
    pending_len: usize,
    chunk_out: Vec<f32>,
}

impl StreamResampler {
    pub fn new(from: u32, to: u32) -> Result<Self, ResampleError> {
        let fail = |reason: String| ResampleError { from, to, reason };
        let chunk_in = (from as usize / 100).max(1);
        let inner = if from == to {
            None
        } else {
            Some(
                Fft::<f32>::new(from as usize, to as usize, chunk_in, 1, FixedSync::Input)
                    .map_err(|e| fail(e.to_string()))?,
            )
        };
        let out_max = inner.as_ref().map_or(0, |r| r.output_frames_max());
        Ok(Self {
            inner,
            chunk_in,
            pending: vec![0.0; chunk_in],
            pending_len: 0,
            chunk_out: vec![0.0; out_max],
        })
    }

    /// The most output samples `input_len` input samples can yield.
    pub fn max_output_len(&self, input_len: usize) -> usize {
        match &self.inner {
            None => input_len,
            Some(r) => (self.pending_len + input_len) / self.chunk_in * r.output_frames_max(),
        }
    }

    /// Converts `input`, writing to the front of `out` (at least `max_output_len` long);
    /// returns the samples written.
    pub fn process(&mut self, input: &[f32], out: &mut [f32]) -> Result<usize, OutputTooSmall> {
        let need = self.max_output_len(input.len());
        if out.len() < need {
            return Err(OutputTooSmall {
                need,
                have: out.len(),
            });
        }
        let Some(resampler) = self.inner.as_mut() else {
            out[..input.len()].copy_from_slice(input);
            return Ok(input.len());
        };
        let mut written = 0;
        let mut rest = input;
        while !rest.is_empty() {
            let take = (self.chunk_in - self.pending_len).min(rest.len());
            self.pending[self.pending_len..self.pending_len + take].copy_from_slice(&rest[..take]);
            self.pending_len += take;
            rest = &rest[take..];
            if self.pending_len < self.chunk_in {
                break;
            }
            self.pending_len = 0;
            let out_len = self.chunk_out.len();
            // Both adapters are built over buffers sized from the resampler itself.
            let input = InterleavedSlice::new(&self.pending[..], 1, self.chunk_in)
                .expect("the pending buffer holds one chunk");
            let mut output = InterleavedSlice::new_mut(&mut self.chunk_out[..], 1, out_len)
                .expect("the output buffer holds output_frames_max");
            let (_, produced) = resampler
                .process_into_buffer(&input, &mut output, None)
                .expect("a full chunk into a max-sized buffer");
            out[written..written + produced].copy_from_slice(&self.chunk_out[..produced]);
            written += produced;
        }
        Ok(written)
    }

    pub fn reset(&mut self) {
        self.pending_len = 0;
        if let Some(r) = self.inner.as_mut() {
            r.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::signal;

    fn tone(freq_hz: f32, rate: u32, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| 0.5 * (2.0 * std::f32::consts::PI * freq_hz * i as f32 / rate as f32).sin())
            .collect()
    }

    fn up_streamed(input: &[f32], chunk: usize) -> Vec<f32> {
        let mut up = Upsampler3::new();
        let mut out = vec![0.0; 3 * chunk];
        let mut all = Vec::new();
        for piece in input.chunks(chunk) {
            let n = up.process(piece, &mut out).unwrap();
            all.extend_from_slice(&out[..n]);
        }
        all
    }

    fn down_streamed(input: &[f32], chunk: usize) -> Vec<f32> {
        let mut down = Downsampler3::new();
        let mut out = vec![0.0; Downsampler3::max_output_len(chunk) + 1];
        let mut all = Vec::new();
        for piece in input.chunks(chunk) {
            let n = down.process(piece, &mut out).unwrap();
            all.extend_from_slice(&out[..n]);
        }
        all
    }

    #[test]
    fn ratio_3_streams_match_offline_for_any_chunking() {
        let narrow = signal::speech_like(4800, 3)
            .into_iter()
            .step_by(3)
            .collect::<Vec<_>>();
        let wide = signal::speech_like(24_000, 4);
        let up_offline = up_streamed(&narrow, narrow.len());
        let down_offline = down_streamed(&wide, wide.len());
        assert_eq!(up_offline.len(), 3 * narrow.len());
        assert_eq!(down_offline.len(), wide.len() / 3);
        for chunk in [1, 7, 160, 1920] {
            assert_eq!(up_streamed(&narrow, chunk), up_offline, "up, chunk {chunk}");
            assert_eq!(
                down_streamed(&wide, chunk),
                down_offline,
                "down, chunk {chunk}"
            );
        }
    }

    #[test]
    fn telephone_band_tones_pass_and_high_tones_are_removed() {
        // 1 kHz at 24 kHz → 8 kHz → 24 kHz comes back; 6 kHz (above 4 kHz) is removed.
        let delay = FIR_LEN - 1; // both filters' group delays, at 24 kHz
        let pass = signal::chirp(4800, 300.0, 3000.0, 0.5);
        let mut down = Downsampler3::new();
        let mut up = Upsampler3::new();
        let mut narrow = vec![0.0; 1600];
        let mut back = vec![0.0; 4800];
        down.process(&pass, &mut narrow).unwrap();
        up.process(&narrow, &mut back).unwrap();
        let (lag, corr) = signal::best_lag(&pass[..4000], &back, 200);
        assert!(corr > 0.99, "corr {corr}");
        // The decimation phase moves it by up to two samples.
        assert!(
            lag.abs_diff(delay) <= 3,
            "lag {lag}, expected about {delay}"
        );
        let rms_ratio = signal::rms(&back[lag + 600..4000 + lag]) / signal::rms(&pass[600..4000]);
        assert!((rms_ratio - 1.0).abs() < 0.05, "gain {rms_ratio}");
        let stop = tone(6000.0, 24_000, 4800);
        down.reset();
        let n = down.process(&stop, &mut narrow).unwrap();
        let level = signal::rms(&narrow[200..n]) / signal::rms(&stop);
        assert!(level < 0.01, "6 kHz leaks at {level}");
    }

    #[test]
    fn reset_twice_gives_the_same_output() {
        let input = signal::speech_like(960, 1);
        let mut down = Downsampler3::new();
        let mut a = vec![0.0; 320];
        let mut b = vec![0.0; 320];
        down.process(&input[..1], &mut a).unwrap();
        down.reset();
        down.process(&input, &mut a).unwrap();
        down.reset();
        down.process(&input, &mut b).unwrap();
        assert_eq!(a, b);
        let mut up = Upsampler3::new();
        let (mut c, mut d) = (vec![0.0; 2880], vec![0.0; 2880]);
        up.process(&input, &mut c).unwrap();
        up.reset();
        up.process(&input, &mut d).unwrap();
        assert_eq!(c, d);
    }

    #[test]
    fn a_short_output_buffer_is_an_error() {
        let mut up = Upsampler3::new();
        assert_eq!(
            up.process(&[0.0; 10], &mut [0.0; 29]),
            Err(OutputTooSmall { need: 30, have: 29 })
        );
        let mut down = Downsampler3::new();
        assert!(down.process(&[0.0; 9], &mut [0.0; 2]).is_err());
    }

    #[test]
    fn stream_resampler_matches_offline_for_any_chunking() {
        let input = tone(440.0, 44_100, 44_100);
        let run = |chunk: usize| {
            let mut r = StreamResampler::new(44_100, 24_000).unwrap();
            let mut out = vec![0.0; r.max_output_len(chunk.max(441)) + 600];
            let mut all = Vec::new();
            for piece in input.chunks(chunk) {
                let n = r.process(piece, &mut out).unwrap();
                all.extend_from_slice(&out[..n]);
            }
            all
        };
        let offline = {
            let mut r = StreamResampler::new(44_100, 24_000).unwrap();
            let mut out = vec![0.0; r.max_output_len(input.len())];
            let n = r.process(&input, &mut out).unwrap();
            out.truncate(n);
            out
        };
        assert!(
            (offline.len() as i64 - 24_000).abs() <= 300,
            "{}",
            offline.len()
        );
        for chunk in [1, 7, 160, 1920] {
            assert_eq!(run(chunk), offline, "chunk {chunk}");
        }
        let expected = tone(440.0, 24_000, 24_000);
        let (_, corr) = signal::best_lag(&expected[2000..20_000], &offline, 600);
        assert!(corr > 0.99, "corr {corr}");
        let mut same = StreamResampler::new(24_000, 24_000).unwrap();
        let mut out = [0.0; 3];
        assert_eq!(same.process(&[0.1, 0.2, 0.3], &mut out).unwrap(), 3);
        assert_eq!(out, [0.1, 0.2, 0.3]);
    }

    #[test]
    fn a_tone_keeps_its_frequency_and_length() {
        // 440 Hz at 16 kHz → 24 kHz.
        let tone: Vec<f32> = (0..16_000)
            .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 16_000.0).sin())
            .collect();
        let out = resample(&tone, 16_000, 24_000).unwrap();
        assert!((out.len() as i64 - 24_000).abs() <= 1, "{}", out.len());
        let expected: Vec<f32> = (0..24_000)
            .map(|i| (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 24_000.0).sin())
            .collect();
        let (lag, corr) = signal::best_lag(&expected[2000..22_000], &out[2000..], 50);
        assert!(corr > 0.99 && lag < 5, "corr {corr} lag {lag}");
    }

    #[test]
    fn equal_rates_copy() {
        assert_eq!(
            resample(&[0.1, 0.2], 24_000, 24_000).unwrap(),
            vec![0.1, 0.2]
        );
    }
}
