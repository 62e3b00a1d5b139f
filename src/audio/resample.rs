//! Sample-rate conversion: whole signals (files) and streams of any rate with rubato's synchronous
//! FFT resampler, and the phone lines' rates (8 or 16 kHz ↔ 24 kHz, small exact ratios) with a
//! polyphase FIR of 2 ms delay. The streaming converters allocate only in `new` and write into the
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

/// The low-pass filter's length in time: 4 ms at the converter's high rate (96 taps for
/// 8 ↔ 24 kHz, 192 for 16 ↔ 24 kHz), so each conversion delays the audio by 2 ms.
const FILTER_SECONDS: f64 = 0.004;
/// The low-pass's cut-off (its response half down), as a share of the lower rate: 3.6 kHz
/// for 8 kHz, 7.2 kHz for 16; the band is flat to about 3.1 and 6.7 kHz.
const PASS_BAND: f64 = 0.45;

/// A Kaiser-windowed sinc low-pass of `len` taps, cut-off `cutoff` (a fraction of the rate it
/// runs at), unity DC gain.
fn kaiser_lowpass(len: usize, cutoff: f64) -> Vec<f64> {
    let beta = 6.0;
    let center = (len - 1) as f64 / 2.0;
    let taps: Vec<f64> = (0..len)
        .map(|idx| {
            let t = idx as f64 - center;
            let sinc = if t == 0.0 {
                2.0 * cutoff
            } else {
                (2.0 * PI * cutoff * t).sin() / (PI * t)
            };
            let ratio = t / center;
            sinc * bessel_i0(beta * (1.0 - ratio * ratio).max(0.0).sqrt()) / bessel_i0(beta)
        })
        .collect();
    let sum: f64 = taps.iter().sum();
    taps.iter().map(|t| t / sum).collect()
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

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A stream between two rates of a small ratio (8 or 16 kHz ↔ 24 kHz, the phone lines' rates)
/// with a polyphase FIR: up by `up`, low-pass below the lower rate's Nyquist, down by `down`,
/// each output computed from one branch of the filter. 2 ms of delay, where rubato's FFT
/// converter (`StreamResampler`) buffers 10 ms chunks.
pub struct Polyphase {
    up: usize,
    down: usize,
    taps_per_branch: usize,
    /// Branch `p` (the outputs `p` high-rate samples after an input) holds the filter's taps
    /// `p`, `p + up`, `p + 2·up`, … reversed, so a dot product with the history (oldest first)
    /// applies them; gain `up` makes up for the zeros the upsampling stuffs.
    branches: Vec<f32>,
    /// The last `taps_per_branch` inputs, stored twice so a window is always contiguous.
    history: Vec<f32>,
    write_idx: usize,
    /// The next output's position at the high rate, counted from the newest input.
    next: usize,
}

impl Polyphase {
    pub fn new(from: u32, to: u32) -> Result<Self, ResampleError> {
        let not_small = |reason: &str| ResampleError {
            from,
            to,
            reason: reason.into(),
        };
        if from == 0 || to == 0 {
            return Err(not_small("a rate of 0"));
        }
        let common = gcd(from, to);
        let (up, down) = ((to / common) as usize, (from / common) as usize);
        if up > 16 || down > 16 {
            return Err(not_small("not a small ratio"));
        }
        let high_rate = f64::from(from) * up as f64;
        let taps_per_branch = ((FILTER_SECONDS * high_rate) as usize).div_ceil(up);
        let cutoff = PASS_BAND * f64::from(from.min(to)) / high_rate;
        // An odd length (the last slot stays zero) delays by whole samples at the high rate.
        let mut taps = kaiser_lowpass(up * taps_per_branch - 1, cutoff);
        taps.push(0.0);
        let mut branches = vec![0.0; up * taps_per_branch];
        for (branch_idx, branch) in branches.chunks_exact_mut(taps_per_branch).enumerate() {
            for (k, tap) in branch.iter_mut().rev().enumerate() {
                *tap = (up as f64 * taps[branch_idx + up * k]) as f32;
            }
        }
        Ok(Self {
            up,
            down,
            taps_per_branch,
            branches,
            history: vec![0.0; 2 * taps_per_branch],
            write_idx: 0,
            next: 0,
        })
    }

    /// The most output samples `input_len` input samples can yield.
    pub fn max_output_len(&self, input_len: usize) -> usize {
        (input_len * self.up).div_ceil(self.down)
    }

    /// Output samples `input_len` inputs yield from the current phase.
    fn output_len(&self, input_len: usize) -> usize {
        let span = input_len * self.up;
        match span > self.next {
            true => (span - self.next - 1) / self.down + 1,
            false => 0,
        }
    }

    /// Converts `input`, writing to the front of `out`; returns the samples written.
    pub fn process(&mut self, input: &[f32], out: &mut [f32]) -> Result<usize, OutputTooSmall> {
        let need = self.output_len(input.len());
        if out.len() < need {
            return Err(OutputTooSmall {
                need,
                have: out.len(),
            });
        }
        let taps = self.taps_per_branch;
        let mut written = 0;
        for &x in input {
            self.history[self.write_idx] = x;
            self.history[self.write_idx + taps] = x;
            self.write_idx = (self.write_idx + 1) % taps;
            let window = &self.history[self.write_idx..self.write_idx + taps];
            while self.next < self.up {
                let branch = &self.branches[self.next * taps..(self.next + 1) * taps];
                out[written] = dot(window, branch);
                written += 1;
                self.next += self.down;
            }
            self.next -= self.up;
        }
        Ok(written)
    }

    pub fn reset(&mut self) {
        self.history.fill(0.0);
        self.write_idx = 0;
        self.next = 0;
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

    fn streamed(from: u32, to: u32, input: &[f32], chunk: usize) -> Vec<f32> {
        let mut converter = Polyphase::new(from, to).unwrap();
        let mut out = vec![0.0; converter.max_output_len(chunk)];
        let mut all = Vec::new();
        for piece in input.chunks(chunk) {
            let n = converter.process(piece, &mut out).unwrap();
            all.extend_from_slice(&out[..n]);
        }
        all
    }

    const PHONE_RATES: [u32; 2] = [8000, 16_000];

    #[test]
    fn phone_rate_streams_match_offline_for_any_chunking() {
        let wide = signal::speech_like(24_000, 4);
        for rate in PHONE_RATES {
            let narrow = resample(&wide, 24_000, rate).unwrap();
            let up_offline = streamed(rate, 24_000, &narrow, narrow.len());
            let down_offline = streamed(24_000, rate, &wide, wide.len());
            assert_eq!(up_offline.len(), narrow.len() * 24_000 / rate as usize);
            assert_eq!(down_offline.len(), wide.len() * rate as usize / 24_000);
            for chunk in [1, 7, 160, 1920] {
                let up = streamed(rate, 24_000, &narrow, chunk);
                assert_eq!(up, up_offline, "{rate} up, chunk {chunk}");
                let down = streamed(24_000, rate, &wide, chunk);
                assert_eq!(down, down_offline, "{rate} down, chunk {chunk}");
            }
        }
    }

    #[test]
    fn the_line_band_passes_both_ways_and_above_it_is_removed() {
        for (rate, band_top, stop_hz) in [(8000, 3000.0, 6000.0), (16_000, 6500.0, 10_000.0)] {
            // A chirp within the line's band goes down to the line's rate and back unchanged,
            // 2 ms later each way.
            let pass = signal::chirp(4800, 300.0, band_top, 0.5);
            let mut down = Polyphase::new(24_000, rate).unwrap();
            let mut up = Polyphase::new(rate, 24_000).unwrap();
            let mut narrow = vec![0.0; down.max_output_len(pass.len())];
            let mut back = vec![0.0; 4800];
            let n = down.process(&pass, &mut narrow).unwrap();
            up.process(&narrow[..n], &mut back).unwrap();
            let (lag, corr) = signal::best_lag(&pass[..4000], &back, 200);
            assert!(corr > 0.99, "{rate}: corr {corr}");
            assert!(
                lag.abs_diff(96) <= 3,
                "{rate}: lag {lag}, expected about 96"
            );
            let gain = signal::rms(&back[lag + 600..4000 + lag]) / signal::rms(&pass[600..4000]);
            assert!((gain - 1.0).abs() < 0.05, "{rate}: gain {gain}");
            // Above the line's Nyquist nothing comes through.
            let stop = tone(stop_hz, 24_000, 4800);
            down.reset();
            let n = down.process(&stop, &mut narrow).unwrap();
            let level = signal::rms(&narrow[200..n]) / signal::rms(&stop);
            assert!(level < 0.01, "{rate}: {stop_hz} Hz leaks at {level}");
        }
    }

    #[test]
    fn reset_twice_gives_the_same_output() {
        let input = signal::speech_like(960, 1);
        for (from, to) in [
            (24_000, 8000),
            (8000, 24_000),
            (24_000, 16_000),
            (16_000, 24_000),
        ] {
            let mut converter = Polyphase::new(from, to).unwrap();
            let mut a = vec![0.0; 2880];
            let mut b = vec![0.0; 2880];
            converter.process(&input[..1], &mut a).unwrap();
            converter.reset();
            converter.process(&input, &mut a).unwrap();
            converter.reset();
            converter.process(&input, &mut b).unwrap();
            assert_eq!(a, b, "{from} -> {to}");
        }
    }

    #[test]
    fn a_short_output_buffer_is_an_error() {
        let mut up = Polyphase::new(8000, 24_000).unwrap();
        assert_eq!(
            up.process(&[0.0; 10], &mut [0.0; 29]),
            Err(OutputTooSmall { need: 30, have: 29 })
        );
        let mut down = Polyphase::new(24_000, 16_000).unwrap();
        assert!(down.process(&[0.0; 9], &mut [0.0; 5]).is_err());
        assert!(Polyphase::new(44_100, 24_000).is_err());
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
