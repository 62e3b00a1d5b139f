//! Choosing tokens from logits: greedy, or temperature + top-k with a seeded generator per slot.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick one stream's tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Greedy,
    TopK { temperature: f32, top_k: usize },
}

impl Sampling {
    /// PersonaPlex's defaults for text (0.7, top 25) and audio (0.8, top 250).
    pub const TEXT: Self = Self::TopK {
        temperature: 0.7,
        top_k: 25,
    };
    pub const AUDIO: Self = Self::TopK {
        temperature: 0.8,
        top_k: 250,
    };
}

/// A slot's random source: reproducible from its seed.
pub struct Sampler {
    rng: StdRng,
    scratch: Vec<(f32, usize)>,
}

impl Sampler {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            scratch: Vec::new(),
        }
    }

    /// Picks a token from `logits` with `sampling`.
    pub fn sample(&mut self, logits: &[f32], sampling: Sampling) -> usize {
        match sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::TopK { temperature, top_k } if temperature > 0.0 && top_k > 1 => {
                self.top_k(logits, temperature, top_k.min(logits.len()))
            }
            Sampling::TopK { .. } => argmax(logits),
        }
    }

    /// softmax(logits / t) restricted to the k largest, drawn as argmax(p / Exp(1)) — the
    /// reference's sync-free multinomial, which is an exact draw from the distribution.
    fn top_k(&mut self, logits: &[f32], temperature: f32, k: usize) -> usize {
        self.scratch.clear();
        self.scratch.extend(
            logits
                .iter()
                .enumerate()
                .map(|(idx, &l)| (l / temperature, idx)),
        );
        self.scratch
            .select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        let top = &self.scratch[..k];
        let max = top.iter().map(|(l, _)| *l).fold(f32::MIN, f32::max);
        let mut best = (f32::MIN, top[0].1);
        for &(logit, idx) in top {
            let prob = (logit - max).exp();
            let exponential: f32 = -(1.0 - self.rng.random::<f32>()).ln();
            let score = prob / exponential.max(f32::MIN_POSITIVE);
            if score > best.0 {
                best = (score, idx);
            }
        }
        best.1
    }
}

/// The index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold(
            (0, f32::MIN),
            |best, (idx, &v)| if v > best.1 { (idx, v) } else { best },
        )
        .0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_largest_and_the_first_tie() {
        let mut sampler = Sampler::new(0);
        assert_eq!(sampler.sample(&[0.1, 3.0, 3.0, -1.0], Sampling::Greedy), 1);
    }

    #[test]
    fn top_k_never_leaves_the_top_k() {
        let mut sampler = Sampler::new(7);
        let logits: Vec<f32> = (0..100).map(|i| i as f32 / 10.0).collect();
        for _ in 0..1000 {
            let token = sampler.sample(
                &logits,
                Sampling::TopK {
                    temperature: 1.0,
                    top_k: 5,
                },
            );
            assert!(token >= 95, "{token}");
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 7) % 13) as f32).collect();
        let draw = |seed| {
            let mut s = Sampler::new(seed);
            (0..20)
                .map(|_| s.sample(&logits, Sampling::AUDIO))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }

    #[test]
    fn draws_follow_the_distribution() {
        // Two tokens with probabilities 0.75 / 0.25 at temperature 1.
        let logits = [3f32.ln(), 0.0];
        let mut sampler = Sampler::new(1);
        let n = 20_000;
        let first = (0..n)
            .filter(|_| {
                sampler.sample(
                    &logits,
                    Sampling::TopK {
                        temperature: 1.0,
                        top_k: 2,
                    },
                ) == 0
            })
            .count();
        let share = first as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.02, "{share}");
    }
}
