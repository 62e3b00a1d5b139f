//! Whether a piece of a frame (the temporal step, the depformer half, Mimi's encode or decode)
//! replays CUDA graphs: one graph per row bucket, each captured at the first frame of that
//! bucket and checked once against that frame's eager result.

#[cfg(feature = "cuda")]
use super::Result;

/// How a piece of a frame runs.
pub enum GraphMode {
    Off,
    /// One graph per row bucket, each captured at the first frame of that bucket it can run.
    On(GraphCache),
    /// Capture failed or a replay disagreed with the eager frame: eager for good.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Failed,
}

/// The captured graphs, by rows.
#[derive(Default)]
pub struct GraphCache {
    #[cfg(feature = "cuda")]
    graphs: std::collections::BTreeMap<usize, super::graph::FrameGraph>,
}

#[cfg(feature = "cuda")]
impl GraphCache {
    pub fn get(&self, rows: usize) -> Option<&super::graph::FrameGraph> {
        self.graphs.get(&rows)
    }
}

/// A capture and whether its first replay agreed with the eager run (`Ok(())`, else why not).
#[cfg(feature = "cuda")]
pub type Captured = Result<(super::graph::FrameGraph, std::result::Result<(), String>)>;

impl GraphMode {
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

    /// Keeps the graph just captured for `rows` when its first replay agreed with the eager
    /// run; on any failure logs why, and `piece` stays eager for good. Returns whether the graph
    /// was kept.
    #[cfg(feature = "cuda")]
    pub fn settle(&mut self, piece: &str, rows: usize, captured: Captured) -> bool {
        match (captured, &mut *self) {
            (Ok((graph, Ok(()))), GraphMode::On(cache)) => {
                tracing::info!(rows, piece, "CUDA graph captured; replaying it");
                cache.graphs.insert(rows, graph);
                return true;
            }
            (Ok((_, Ok(()))), _) => {}
            (Ok((_, Err(why))), _) => {
                tracing::warn!(
                    rows,
                    piece,
                    why,
                    "a graph's first replay differs from the eager run; staying eager"
                );
                *self = GraphMode::Failed;
            }
            (Err(err), _) => {
                tracing::warn!(rows, piece, error = %err, "capturing a graph failed; staying eager");
                *self = GraphMode::Failed;
            }
        }
        false
    }
}

/// Whether a replayed output is the eager one up to `tolerance` relative to its largest value
/// (`Err` says by how much it is not).
#[cfg(feature = "cuda")]
pub fn agrees_within(
    replayed: &candle_core::Tensor,
    eager: &candle_core::Tensor,
    tolerance: f32,
) -> Result<std::result::Result<(), String>> {
    use candle_core::DType;
    let replayed = replayed.to_dtype(DType::F32)?;
    let eager = eager.to_dtype(DType::F32)?;
    let largest = eager.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let diff = (replayed - eager)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    Ok((diff <= tolerance * largest.max(1.0))
        .then_some(())
        .ok_or_else(|| format!("max |diff| {diff} in outputs up to {largest}")))
}
