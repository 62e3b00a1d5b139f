//! Whether a piece of a frame (the temporal step, the depformer half, Mimi's encode or decode)
//! replays CUDA graphs: one graph per key (a row bucket, or for the depformer a row bucket and
//! the streams it forces), each captured at the first frame of that key and checked once
//! against that frame's eager result.

use super::Result;
use candle_core::{DType, Tensor};

/// Whether captures let our kernels start while the kernel before them finishes (programmatic
/// dependent launch; `graph::early`), from `DUPLEX_PDL`: `1` on; unset, empty or `0` off.
pub fn early_launch_from(value: Option<&str>) -> std::result::Result<bool, String> {
    match value.map(str::trim) {
        None | Some("" | "0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(format!("DUPLEX_PDL={other:?}: expected 0 or 1")),
    }
}

/// What a graph is captured for: frames of the same key replay the same graph.
pub trait GraphKey: Ord + Clone + std::fmt::Debug {}
impl<K: Ord + Clone + std::fmt::Debug> GraphKey for K {}

/// How a piece of a frame runs.
pub enum GraphMode<K = usize> {
    Off,
    /// One graph per key, each captured at the first frame of that key it can run.
    On(GraphCache<K>),
}

/// The captured graphs, by key (rows, unless the piece says otherwise).
pub struct GraphCache<K = usize> {
    #[cfg(feature = "cuda")]
    graphs: std::collections::BTreeMap<K, super::graph::FrameGraph>,
    /// Keys whose capture failed, whose first replay disagreed with the eager frame, or whose
    /// replay failed: they run eagerly for good, the other keys keep their graphs.
    refused: std::collections::BTreeSet<K>,
}

impl<K: GraphKey> Default for GraphCache<K> {
    fn default() -> Self {
        Self {
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
            refused: Default::default(),
        }
    }
}

#[cfg(feature = "cuda")]
impl<K: GraphKey> GraphCache<K> {
    pub fn get(&self, key: &K) -> Option<&super::graph::FrameGraph> {
        self.graphs.get(key)
    }
}

/// A capture and whether its first replay agreed with the eager run (`Ok(())`, else why not).
#[cfg(feature = "cuda")]
pub type Captured = Result<(super::graph::FrameGraph, std::result::Result<(), String>)>;

impl<K: GraphKey> GraphMode<K> {
    /// Graphs are wanted (for the pieces that have captured none yet, at their next frame).
    pub fn on() -> Self {
        GraphMode::On(GraphCache::default())
    }

    /// Whether some graph has been captured and is replayed.
    pub fn replays(&self) -> bool {
        #[cfg(feature = "cuda")]
        if let GraphMode::On(cache) = self {
            return !cache.graphs.is_empty();
        }
        false
    }

    /// Replays the graph of `key` through `replay` when there is one. A replay that fails logs
    /// why and leaves `piece` eager for good at this key (`None`, as when there is no graph),
    /// so the frame runs eagerly rather than the same replay failing every frame after.
    #[cfg(feature = "cuda")]
    pub fn replay_with<T>(
        &mut self,
        piece: &str,
        key: &K,
        replay: impl FnOnce(&super::graph::FrameGraph) -> Result<T>,
    ) -> Option<T> {
        let GraphMode::On(cache) = self else {
            return None;
        };
        match replay(cache.get(key)?) {
            Ok(out) => Some(out),
            Err(err) => {
                tracing::warn!(graph = ?key, piece, error = %err, "replaying a graph failed; its frames run eagerly from now on");
                cache.graphs.remove(key);
                cache.refused.insert(key.clone());
                None
            }
        }
    }

    /// Whether a frame of `key` without a graph should capture one (graphs are on, and this key
    /// was not refused).
    pub fn captures(&self, key: &K) -> bool {
        matches!(self, GraphMode::On(cache) if !cache.refused.contains(key))
    }

    /// Keeps the graph just captured for `key` when its first replay agreed with the eager
    /// run; on any failure logs why, and `piece` stays eager for good at this key. Returns
    /// whether the graph was kept.
    #[cfg(feature = "cuda")]
    pub fn settle(&mut self, piece: &str, key: K, captured: Captured) -> bool {
        let GraphMode::On(cache) = self else {
            return false;
        };
        match captured {
            Ok((graph, Ok(()))) => {
                let early_kernels = graph.early_kernels();
                tracing::info!(graph = ?key, piece, early_kernels, "CUDA graph captured; replaying it");
                cache.graphs.insert(key, graph);
                return true;
            }
            Ok((_, Err(why))) => tracing::warn!(
                graph = ?key,
                piece,
                why,
                "a graph's first replay differs from the eager run; its frames stay eager"
            ),
            Err(err) => {
                tracing::warn!(graph = ?key, piece, error = %err, "capturing a graph failed; its frames stay eager")
            }
        }
        cache.refused.insert(key);
        false
    }
}

/// The largest `|a - b|`, infinite when either holds a NaN or an infinity. A maximum alone
/// would not say: candle's on a GPU skips NaN (`fmaxf`), so an output of NaN would pass.
pub fn largest_difference(a: &Tensor, b: &Tensor) -> Result<f32> {
    let diff = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?.abs()?;
    if !diff.sum_all()?.to_scalar::<f32>()?.is_finite() {
        return Ok(f32::INFINITY);
    }
    diff.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// Whether a replayed output is the eager one up to `tolerance` relative to its largest value
/// (`Err` says by how much it is not).
#[cfg(feature = "cuda")]
pub fn agrees_within(
    replayed: &Tensor,
    eager: &Tensor,
    tolerance: f32,
) -> Result<std::result::Result<(), String>> {
    let largest = eager
        .to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let diff = largest_difference(replayed, eager)?;
    Ok((diff <= tolerance * largest.max(1.0))
        .then_some(())
        .ok_or_else(|| format!("max |diff| {diff} in outputs up to {largest}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn early_launch_is_off_unless_asked_and_a_bad_value_says_what_it_takes() {
        assert_eq!(early_launch_from(None), Ok(false));
        assert_eq!(early_launch_from(Some("0")), Ok(false));
        assert_eq!(early_launch_from(Some(" 1 ")), Ok(true));
        let bad = early_launch_from(Some("yes")).unwrap_err();
        assert!(
            bad.contains("DUPLEX_PDL=\"yes\"") && bad.contains("0 or 1"),
            "{bad}"
        );
    }

    #[test]
    fn a_nan_or_an_infinity_is_an_infinite_difference() {
        let eager = Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap();
        let close = Tensor::new(&[1.0f32, -2.5, 3.0], &Device::Cpu).unwrap();
        assert_eq!(largest_difference(&close, &eager).unwrap(), 0.5);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let replayed = Tensor::new(&[1.0f32, bad, 3.0], &Device::Cpu).unwrap();
            assert_eq!(
                largest_difference(&replayed, &eager).unwrap(),
                f32::INFINITY,
                "{bad}"
            );
        }
    }
}
