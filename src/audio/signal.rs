//! Deterministic test and probe signals, and the correlation used to find them again.

use super::SAMPLE_RATE;
use std::f32::consts::PI;

/// A linear chirp from `f0_hz` to `f1_hz` over `len` samples at 24 kHz, with a raised-cosine
/// fade at both ends so it survives a perceptual codec cleanly.
pub fn chirp(len: usize, f0_hz: f32, f1_hz: f32, amplitude: f32) -> Vec<f32> {
    let rate = SAMPLE_RATE as f32;
    let duration_s = len as f32 / rate;
    let sweep = (f1_hz - f0_hz) / duration_s;
    let fade = (len / 10).max(1);
    (0..len)
        .map(|idx| {
            let t = idx as f32 / rate;
            let phase = 2.0 * PI * (f0_hz * t + 0.5 * sweep * t * t);
            let edge = idx.min(len - 1 - idx);
            let gain = if edge < fade {
                0.5 - 0.5 * (PI * edge as f32 / fade as f32).cos()
            } else {
                1.0
            };
            amplitude * gain * phase.sin()
        })
        .collect()
}

/// A voiced, syllable-like test signal: a pitch-modulated harmonic tone with a 4 Hz envelope,
/// deterministic for a given `seed`. Real speech comes from espeak-ng in the integration tests;
/// this is for unit tests that must not shell out.
pub fn speech_like(len: usize, seed: u32) -> Vec<f32> {
    let rate = SAMPLE_RATE as f32;
    let base_hz = 110.0 + (seed % 7) as f32 * 15.0;
    let mut phase = 0.0f32;
    (0..len)
        .map(|idx| {
            let t = idx as f32 / rate;
            let pitch = base_hz * (1.0 + 0.1 * (2.0 * PI * 1.3 * t).sin());
            phase += 2.0 * PI * pitch / rate;
            let envelope = (0.5 - 0.5 * (2.0 * PI * 4.0 * t).cos()).powf(1.5);
            let voice: f32 = (1..=8).map(|h| (h as f32 * phase).sin() / h as f32).sum();
            0.3 * envelope * voice
        })
        .collect()
}

/// Root-mean-square level.
pub fn rms(samples: &[f32]) -> f32 {
    if samples.is_empty() {
        return 0.0;
    }
    (samples.iter().map(|s| s * s).sum::<f32>() / samples.len() as f32).sqrt()
}

/// RMS of the difference of two equally long signals.
pub fn rms_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "rms_difference needs equal lengths");
    let diff: Vec<f32> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    rms(&diff)
}

/// Normalized cross-correlation of `reference` against `received` shifted by `lag` samples
/// (`received[idx + lag]` against `reference[idx]`) over their overlap.
pub fn correlation_at(reference: &[f32], received: &[f32], lag: usize) -> f32 {
    let overlap = reference.len().min(received.len().saturating_sub(lag));
    if overlap == 0 {
        return 0.0;
    }
    let (mut dot, mut energy_ref, mut energy_rec) = (0.0f64, 0.0f64, 0.0f64);
    for idx in 0..overlap {
        let (x, y) = (reference[idx] as f64, received[idx + lag] as f64);
        dot += x * y;
        energy_ref += x * x;
        energy_rec += y * y;
    }
    if energy_ref == 0.0 || energy_rec == 0.0 {
        return 0.0;
    }
    (dot / (energy_ref * energy_rec).sqrt()) as f32
}

/// The lag in `0..=max_lag` at which `received` best matches `reference`, and that correlation.
pub fn best_lag(reference: &[f32], received: &[f32], max_lag: usize) -> (usize, f32) {
    (0..=max_lag)
        .map(|lag| (lag, correlation_at(reference, received, lag)))
        .fold(
            (0, f32::MIN),
            |best, cur| if cur.1 > best.1 { cur } else { best },
        )
}

/// Positions where `template` occurs in `signal`: local maxima of the normalized correlation
/// above `threshold`, at least `min_gap` samples apart, in order.
pub fn find_occurrences(
    signal: &[f32],
    template: &[f32],
    threshold: f32,
    min_gap: usize,
) -> Vec<(usize, f32)> {
    let template_energy: f32 = template.iter().map(|x| x * x).sum();
    if template.is_empty() || signal.len() < template.len() || template_energy == 0.0 {
        return Vec::new();
    }
    let scores: Vec<f32> = (0..=signal.len() - template.len())
        .map(|pos| {
            let window = &signal[pos..pos + template.len()];
            let dot: f32 = window.iter().zip(template).map(|(x, y)| x * y).sum();
            let energy: f32 = window.iter().map(|x| x * x).sum();
            if energy == 0.0 {
                0.0
            } else {
                dot / (energy * template_energy).sqrt()
            }
        })
        .collect();
    let mut found: Vec<(usize, f32)> = Vec::new();
    for (pos, &score) in scores.iter().enumerate() {
        if score < threshold {
            continue;
        }
        match found.last_mut() {
            Some(last) if pos - last.0 < min_gap => {
                if score > last.1 {
                    *last = (pos, score);
                }
            }
            _ => found.push((pos, score)),
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_lag_finds_a_shift() {
        let reference = speech_like(4000, 1);
        let mut shifted = vec![0.0; 123];
        shifted.extend_from_slice(&reference);
        let (lag, corr) = best_lag(&reference, &shifted, 500);
        assert_eq!(lag, 123);
        assert!(corr > 0.999);
    }

    #[test]
    fn occurrences_of_a_chirp_are_found_where_placed() {
        let probe = chirp(1200, 500.0, 4000.0, 0.5);
        let mut signal = vec![0.0; 20_000];
        for start in [1000, 9000, 15_500] {
            signal[start..start + probe.len()].copy_from_slice(&probe);
        }
        let found: Vec<usize> = find_occurrences(&signal, &probe, 0.6, 2400)
            .iter()
            .map(|f| f.0)
            .collect();
        assert_eq!(found, vec![1000, 9000, 15_500]);
    }

    #[test]
    fn rms_of_silence_is_zero() {
        assert_eq!(rms(&[0.0; 10]), 0.0);
        assert_eq!(rms(&[]), 0.0);
    }
}
