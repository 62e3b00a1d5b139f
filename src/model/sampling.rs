//! Choosing tokens from logits: greedy, or temperature + top-k drawn with a counter-based random
//! generator, so a seeded run repeats exactly and the GPU kernel (`kernels/sampling.cu`) draws
//! the same tokens as this reference. `draw` picks one token per row where the logits lie, so a
//! frame's tokens stay on the GPU until the frame ends.

use super::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

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

impl Sampling {
    /// `(top_k, temperature)` as `draw` takes them; greedy is `(1, 0)`.
    pub fn draw_params(self) -> (i64, f32) {
        match self {
            Self::Greedy => (1, 0.0),
            Self::TopK { temperature, top_k } => (top_k as i64, temperature),
        }
    }
}

/// A slot's random source: a seed and a count of draws.
pub struct Sampler {
    seed: u64,
    counter: u64,
}

impl Sampler {
    pub fn new(seed: u64) -> Self {
        Self { seed, counter: 0 }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Draws made so far (the next draw's counter).
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// Counts `draws` made elsewhere (by `draw`, from this sampler's seed and counter).
    pub fn advance(&mut self, draws: u64) {
        self.counter += draws;
    }

    /// Picks a token from `logits` with `sampling`.
    pub fn sample(&mut self, logits: &[f32], sampling: Sampling) -> usize {
        let token = match sampling {
            Sampling::Greedy => argmax(logits),
            Sampling::TopK { temperature, top_k } => {
                topk_reference(logits, top_k, temperature, self.seed, self.counter)
            }
        };
        self.counter += 1;
        token
    }
}

/// The index of the largest value (the first one on ties), ranking values as `ranked` does; 0
/// when none is above -inf.
pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (idx, &v)| {
            let v = ranked(v);
            if v > best.1 { (idx, v) } else { best }
        })
        .0
}

/// A logit as sampling ranks it: NaN is -inf (never drawn), +inf the largest finite value (so
/// several tie and every score stays a number).
fn ranked(logit: f32) -> f32 {
    if logit.is_nan() {
        f32::NEG_INFINITY
    } else {
        logit.min(f32::MAX)
    }
}

/// A uniform number in [0, 1) from (seed, counter, index): splitmix64 on their mix, the same bits
/// as `uniform01` in `kernels/common.cuh`.
pub fn uniform01(seed: u64, counter: u64, index: u64) -> f32 {
    let mut z = seed
        ^ counter.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// softmax(logits / t) restricted to the k largest, drawn as argmax(p / E) with E ~ Exp(1) —
/// the reference's sync-free multinomial, an exact draw. Every logit at or above the k-th largest
/// value is kept (ties too), as the kernel's radix select keeps them. Logits are `ranked`: -inf and
/// NaN are never drawn (nor counted among the k) unless no logit is above -inf, and then, as when
/// greedy, the token is `argmax`'s.
pub fn topk_reference(
    logits: &[f32],
    k: usize,
    temperature: f32,
    seed: u64,
    counter: u64,
) -> usize {
    let best = argmax(logits);
    let max = logits.get(best).map_or(f32::NEG_INFINITY, |&v| ranked(v));
    if temperature.is_nan() || temperature <= 0.0 || k <= 1 || max == f32::NEG_INFINITY {
        return best;
    }
    let low = kth_largest(logits, k);
    let mut chosen = (-1f32, logits.len());
    for (idx, v) in logits.iter().map(|&v| ranked(v)).enumerate() {
        if v < low {
            continue;
        }
        let p = ((v - max) / temperature).exp();
        let e = -(1.0 - uniform01(seed, counter, idx as u64)).max(1e-30).ln();
        let score = p / e.max(1e-30);
        if score > chosen.0 {
            chosen = (score, idx);
        }
    }
    chosen.1
}

/// The k-th largest ranked logit above -inf, or the smallest of them when fewer than k are.
fn kth_largest(logits: &[f32], k: usize) -> f32 {
    let mut kept: Vec<f32> = logits
        .iter()
        .map(|&v| ranked(v))
        .filter(|&v| v > f32::NEG_INFINITY)
        .collect();
    let rank = k.min(kept.len()) - 1;
    *kept.select_nth_unstable_by(rank, |a, b| b.total_cmp(a)).1
}

/// One row's draw, as the kernel makes it: greedy when `temperature` is not above 0 or `top_k <= 1`.
fn draw_row(logits: &[f32], top_k: i64, temperature: f32, seed: u64, counter: u64) -> usize {
    topk_reference(logits, top_k.max(1) as usize, temperature, seed, counter)
}

/// Threads of the sampling kernel's block for rows of `vocab` logits: an eighth of the row
/// rounded up to a power of two, 128 to 1024 (a row's block is alone on its SM, so the long text
/// row wants every warp), unless `DUPLEX_TOPK_THREADS` names another count of whole warps (read
/// once).
pub fn sampling_threads(vocab: usize) -> std::result::Result<u32, String> {
    static OVERRIDE: std::sync::OnceLock<std::result::Result<Option<u32>, String>> =
        std::sync::OnceLock::new();
    let chosen = OVERRIDE.get_or_init(|| match std::env::var("DUPLEX_TOPK_THREADS") {
        Ok(spec) => match spec.trim().parse::<u32>() {
            Ok(threads) if threads.is_multiple_of(32) && (32..=1024).contains(&threads) => {
                Ok(Some(threads))
            }
            _ => Err(format!(
                "DUPLEX_TOPK_THREADS={spec:?}: expected whole warps, 32 to 1024"
            )),
        },
        Err(_) => Ok(None),
    });
    match chosen {
        Ok(Some(threads)) => Ok(*threads),
        Ok(None) => Ok((vocab / 8).next_power_of_two().clamp(128, 1024) as u32),
        Err(why) => Err(why.clone()),
    }
}

/// Per-row parameters of one `draw`, each `[rows]` on the logits' device.
pub struct DrawParams {
    /// i64 seeds.
    pub seeds: Tensor,
    /// i64 counters (the draw's index in the slot's stream of draws).
    pub counters: Tensor,
    /// i64 top-k (1: greedy).
    pub top_k: Tensor,
    /// f32 temperatures (0: greedy).
    pub temperature: Tensor,
}

struct Draw<'a>(&'a DrawParams);

impl CustomOp1 for Draw<'_> {
    fn name(&self) -> &'static str {
        "duplex-draw"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = layout.shape().dims2()?;
        let logits = storage.as_slice::<f32>()?;
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("draw: logits must be contiguous")
        };
        let logits = &logits[start..end];
        let params = self.0;
        let (seeds, counters, top_k, temperature) = (
            params.seeds.to_vec1::<i64>()?,
            params.counters.to_vec1::<i64>()?,
            params.top_k.to_vec1::<i64>()?,
            params.temperature.to_vec1::<f32>()?,
        );
        let tokens = (0..rows)
            .map(|r| {
                let row = &logits[r * vocab..][..vocab];
                draw_row(
                    row,
                    top_k[r],
                    temperature[r],
                    seeds[r] as u64,
                    counters[r] as u64,
                ) as u32
            })
            .collect();
        Ok((CpuStorage::U32(tokens), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::draw(storage, layout, self.0)
    }
}

/// One token per row of `logits` `[rows, vocab]` (u32 `[rows]`, on the logits' device), drawn
/// with each row's parameters: no copy to the host.
pub fn draw(logits: &Tensor, params: &DrawParams) -> Result<Tensor> {
    let rows = logits.dim(0)?;
    for (name, t) in [
        ("seeds", &params.seeds),
        ("counters", &params.counters),
        ("top_k", &params.top_k),
        ("temperature", &params.temperature),
    ] {
        if t.dims() != [rows] {
            candle_core::bail!("draw: {name} is {:?}, logits have {rows} rows", t.dims());
        }
    }
    logits
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&Draw(params))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_sampling_block_grows_with_the_row_up_to_1024_threads() {
        let threads = |vocab| super::sampling_threads(vocab).unwrap();
        assert_eq!(
            [
                threads(5),
                threads(1000),
                threads(2048),
                threads(2049),
                threads(32000)
            ],
            [128, 128, 256, 256, 1024]
        );
    }

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

    #[test]
    fn uniforms_are_spread_over_the_unit_interval() {
        let values: Vec<f32> = (0..10_000).map(|i| uniform01(5, 9, i)).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        let mean = values.iter().sum::<f32>() / values.len() as f32;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
    }

    #[test]
    fn a_batched_draw_gives_each_row_its_own_sampler_draw() -> Result<()> {
        use candle_core::Device;
        let rows: Vec<Vec<f32>> = (0..3)
            .map(|r| (0..40).map(|i| ((i * (r + 3)) % 17) as f32 / 4.0).collect())
            .collect();
        let settings = [Sampling::Greedy, Sampling::TEXT, Sampling::AUDIO];
        let (seeds, counters) = ([5u64, 6, 7], [0u64, 3, 9]);
        let params = DrawParams {
            seeds: Tensor::new(&seeds.map(|s| s as i64), &Device::Cpu)?,
            counters: Tensor::new(&counters.map(|c| c as i64), &Device::Cpu)?,
            top_k: Tensor::new(&settings.map(|s| s.draw_params().0), &Device::Cpu)?,
            temperature: Tensor::new(&settings.map(|s| s.draw_params().1), &Device::Cpu)?,
        };
        let logits = Tensor::new(rows.clone(), &Device::Cpu)?;
        let got: Vec<u32> = draw(&logits, &params)?.to_vec1()?;
        for r in 0..3 {
            let mut sampler = Sampler::new(seeds[r]);
            sampler.advance(counters[r]);
            assert_eq!(
                got[r] as usize,
                sampler.sample(&rows[r], settings[r]),
                "row {r}"
            );
        }
        let short = DrawParams {
            seeds: params.seeds.narrow(0, 0, 2)?,
            ..params
        };
        assert!(draw(&logits, &short).is_err(), "a parameter per row");
        Ok(())
    }

    fn draws(logits: &[f32], top_k: usize, times: usize) -> Vec<usize> {
        let mut sampler = Sampler::new(11);
        let sampling = Sampling::TopK {
            temperature: 1.0,
            top_k,
        };
        (0..times)
            .map(|_| sampler.sample(logits, sampling))
            .collect()
    }

    #[test]
    fn masked_logits_are_never_drawn_nor_counted_among_the_k() {
        // -inf masks every third token; the top 3 of the rest are tokens 7, 8 and 10.
        let logits: Vec<f32> = (0..11)
            .map(|i| {
                if i % 3 == 0 {
                    f32::NEG_INFINITY
                } else {
                    i as f32
                }
            })
            .collect();
        let seen = draws(&logits, 3, 500);
        assert!(seen.iter().all(|t| [7, 8, 10].contains(t)), "{seen:?}");
        // Fewer tokens left than k: any unmasked one, never a masked one.
        let seen = draws(&logits, 10, 2000);
        assert!(seen.iter().all(|t| t % 3 != 0), "{seen:?}");
    }

    #[test]
    fn nothing_above_minus_infinity_gives_token_zero() {
        let logits = [f32::NEG_INFINITY, f32::NAN, f32::NEG_INFINITY];
        assert_eq!(argmax(&logits), 0);
        assert_eq!(draws(&logits, 25, 20), vec![0; 20]);
        assert_eq!(draws(&[], 25, 1), vec![0]);
    }

    #[test]
    fn nan_is_never_drawn_and_infinite_logits_tie_at_the_top() {
        let logits = [f32::NAN, 1.0, f32::INFINITY, f32::NAN, 2.0, f32::INFINITY];
        assert_eq!(argmax(&logits), 2);
        let seen = draws(&logits, 2, 400);
        assert!(seen.iter().all(|t| [2, 5].contains(t)), "{seen:?}");
        assert!(
            seen.contains(&2) && seen.contains(&5),
            "both infinite logits are drawn"
        );
        let seen = draws(&logits, 6, 400);
        assert!(seen.iter().all(|t| [1, 2, 4, 5].contains(t)), "{seen:?}");
    }

    #[test]
    fn ties_at_the_kth_value_are_all_candidates() {
        // Four equal logits, k = 2: every one of them can be drawn.
        let logits = [1.0f32, 1.0, 1.0, 1.0];
        let mut seen = [false; 4];
        let mut sampler = Sampler::new(3);
        for _ in 0..200 {
            seen[sampler.sample(
                &logits,
                Sampling::TopK {
                    temperature: 1.0,
                    top_k: 2,
                },
            )] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
