//! Sample-rate conversion of whole signals (files) with rubato's synchronous FFT resampler.

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::signal;

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
