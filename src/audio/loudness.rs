//! Integrated loudness (ITU-R BS.1770: K-weighting, 400 ms blocks, absolute and relative gates)
//! and normalisation to −24 LUFS, which PersonaPlex applies to a voice recording before it
//! becomes a voice prompt.

/// The loudness voice prompts are normalised to.
pub const VOICE_PROMPT_LUFS: f64 = -24.0;

/// A biquad in direct form I.
struct Biquad {
    b: [f64; 3],
    a: [f64; 3],
}

impl Biquad {
    /// The BS.1770 pre-filter (a high shelf, +4 dB above ~1.5 kHz) for `rate`.
    fn high_shelf(rate: f64) -> Self {
        let (gain_db, q, fc) = (4.0f64, std::f64::consts::FRAC_1_SQRT_2, 1500.0);
        let a = 10f64.powf(gain_db / 40.0);
        let w0 = 2.0 * std::f64::consts::PI * fc / rate;
        let (cos, alpha) = (w0.cos(), w0.sin() / (2.0 * q));
        let sq = 2.0 * a.sqrt() * alpha;
        Self {
            b: [
                a * ((a + 1.0) + (a - 1.0) * cos + sq),
                -2.0 * a * ((a - 1.0) + (a + 1.0) * cos),
                a * ((a + 1.0) + (a - 1.0) * cos - sq),
            ],
            a: [
                (a + 1.0) - (a - 1.0) * cos + sq,
                2.0 * ((a - 1.0) - (a + 1.0) * cos),
                (a + 1.0) - (a - 1.0) * cos - sq,
            ],
        }
    }

    /// The BS.1770 RLB weighting (a high-pass at 38 Hz) for `rate`.
    fn high_pass(rate: f64) -> Self {
        let (q, fc) = (0.5f64, 38.0);
        let w0 = 2.0 * std::f64::consts::PI * fc / rate;
        let (cos, alpha) = (w0.cos(), w0.sin() / (2.0 * q));
        Self {
            b: [(1.0 + cos) / 2.0, -(1.0 + cos), (1.0 + cos) / 2.0],
            a: [1.0 + alpha, -2.0 * cos, 1.0 - alpha],
        }
    }

    fn apply(&self, xs: &[f64]) -> Vec<f64> {
        let (b, a) = (self.b.map(|v| v / self.a[0]), self.a.map(|v| v / self.a[0]));
        let (mut x1, mut x2, mut y1, mut y2) = (0.0, 0.0, 0.0, 0.0);
        xs.iter()
            .map(|&x| {
                let y = b[0] * x + b[1] * x1 + b[2] * x2 - a[1] * y1 - a[2] * y2;
                (x2, x1, y2, y1) = (x1, x, y1, y);
                y
            })
            .collect()
    }
}

/// Integrated loudness of mono `pcm` in LUFS; `None` when it is too short or silent.
pub fn integrated_lufs(pcm: &[f32], rate: u32) -> Option<f64> {
    let rate_f = f64::from(rate);
    let xs: Vec<f64> = pcm.iter().map(|&x| f64::from(x)).collect();
    let weighted = Biquad::high_pass(rate_f).apply(&Biquad::high_shelf(rate_f).apply(&xs));
    let (block, step) = ((0.4 * rate_f) as usize, (0.1 * rate_f) as usize);
    if weighted.len() < block || step == 0 {
        return None;
    }
    let powers: Vec<f64> = (0..=(weighted.len() - block) / step)
        .map(|idx| {
            weighted[idx * step..idx * step + block]
                .iter()
                .map(|v| v * v)
                .sum::<f64>()
                / block as f64
        })
        .collect();
    let loudness = |power: f64| -0.691 + 10.0 * power.log10();
    let mean_above = |gate: f64| {
        let kept: Vec<f64> = powers
            .iter()
            .copied()
            .filter(|&p| loudness(p) > gate)
            .collect();
        (!kept.is_empty()).then(|| kept.iter().sum::<f64>() / kept.len() as f64)
    };
    let relative_gate = loudness(mean_above(-70.0)?) - 10.0;
    Some(loudness(mean_above(relative_gate.max(-70.0))?))
}

/// Scales `pcm` to [`VOICE_PROMPT_LUFS`] (unchanged when its loudness cannot be measured).
pub fn normalize(pcm: &[f32], rate: u32) -> Vec<f32> {
    match integrated_lufs(pcm, rate) {
        Some(lufs) => {
            let gain = 10f64.powf((VOICE_PROMPT_LUFS - lufs) / 20.0) as f32;
            pcm.iter().map(|x| x * gain).collect()
        }
        None => pcm.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sine(freq: f32, amplitude: f32, rate: u32, seconds: f32) -> Vec<f32> {
        (0..(rate as f32 * seconds) as usize)
            .map(|i| amplitude * (2.0 * std::f32::consts::PI * freq * i as f32 / rate as f32).sin())
            .collect()
    }

    #[test]
    fn a_full_scale_1khz_sine_reads_minus_3_lufs() {
        // BS.1770's calibration point, at 48 kHz and at our 24 kHz.
        for rate in [48_000, 24_000] {
            let lufs = integrated_lufs(&sine(1000.0, 1.0, rate, 3.0), rate).unwrap();
            assert!((lufs + 3.01).abs() < 0.1, "{rate} Hz: {lufs}");
        }
    }

    #[test]
    fn normalising_reaches_the_target() {
        let pcm = sine(300.0, 0.05, 24_000, 2.0);
        let lufs = integrated_lufs(&normalize(&pcm, 24_000), 24_000).unwrap();
        assert!((lufs - VOICE_PROMPT_LUFS).abs() < 0.05, "{lufs}");
    }

    #[test]
    fn silence_and_short_clips_are_left_alone() {
        assert_eq!(integrated_lufs(&[0.0; 48_000], 24_000), None);
        assert_eq!(integrated_lufs(&[0.5; 100], 24_000), None);
        assert_eq!(normalize(&[0.0; 10], 24_000), vec![0.0; 10]);
    }
}
