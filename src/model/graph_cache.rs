//! Whether a piece of a frame (the temporal step, the depformer half, Mimi's encode or decode)
//! replays CUDA graphs: one graph per key (a row bucket, or for the depformer a row bucket and
//! the streams it forces), each captured at the first frame of that key and checked once
//! against that frame's eager result.

use super::Result;
use candle_core::{DType, Tensor};

/// Whether captured graphs let our kernels start while the kernel before them finishes
/// (programmatic dependent launch; `graph::early_launch`), from `DUPLEX_PDL`: `1` on; unset,
/// empty or `0` off.
pub fn early_launch_from(value: Option<&str>) -> std::result::Result<bool, String> {
    match value.map(str::trim) {
        None | Some("" | "0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(format!("DUPLEX_PDL={other:?}: expected 0 or 1")),
    }
}

/// A captured graph's node, as `early_chain` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    /// One of our kernels: it waits for the kernels before it first (`grid_dependency_sync`).
    Ours,
    /// Another kernel (candle's, cuBLAS's), which may read its inputs at once.
    OtherKernel,
    /// A stream-ordered allocation (candle allocates every output so).
    Alloc,
    /// A stream-ordered free.
    Free,
    /// A copy, a memset, anything else.
    Other,
}

impl NodeKind {
    fn is_kernel(self) -> bool {
        matches!(self, Self::Ours | Self::OtherKernel)
    }
}

/// The order of a graph's `nodes` nodes when its `edges` (`from`, `to`) make one chain, the
/// shape a capture on one stream has; `None` otherwise.
pub fn chain_order(nodes: usize, edges: &[(usize, usize)]) -> Option<Vec<usize>> {
    let mut next = vec![None; nodes];
    let mut has_previous = vec![false; nodes];
    for &(from, to) in edges {
        if next[from].replace(to).is_some() || std::mem::replace(&mut has_previous[to], true) {
            return None;
        }
    }
    let mut node = (0..nodes).find(|&n| !has_previous[n]);
    let mut order = Vec::with_capacity(nodes);
    while let Some(n) = node {
        order.push(n);
        node = next[n];
    }
    (order.len() == nodes).then_some(order)
}

/// A chain's edges rebuilt so that each of our kernels may be scheduled while the kernel
/// before it finishes: (`from`, `to`, programmatic) over positions in `chain`.
///
/// candle allocates each output and frees each input on the stream, so a capture puts
/// allocations and frees between the kernels, and a kernel after one of those could not start
/// before it. So each run of kernels, allocations and frees is reordered: its allocations
/// first, then its kernels in their order, then its frees. Every allocation still comes before
/// the kernels that use it and every free after them, and nothing else moves; what it costs is
/// memory, as an allocation no longer reuses what a free in the same run gave back. An edge
/// from a kernel into one of ours turns programmatic: ours waits for that kernel to complete
/// before it reads or writes, so only its launch and start overlap that kernel's tail.
pub fn early_chain(chain: &[NodeKind]) -> Vec<(usize, usize, bool)> {
    let runs = chain.chunk_by(|a, b| (*a == NodeKind::Other) == (*b == NodeKind::Other));
    let mut order = Vec::with_capacity(chain.len());
    let mut start = 0;
    for run in runs {
        let positions = start..start + run.len();
        start += run.len();
        for keep in [
            |kind: NodeKind| kind == NodeKind::Alloc,
            NodeKind::is_kernel,
            |kind: NodeKind| kind == NodeKind::Free,
            |kind: NodeKind| kind == NodeKind::Other,
        ] {
            order.extend(positions.clone().filter(|&p| keep(chain[p])));
        }
    }
    order
        .windows(2)
        .map(|pair| {
            let early = chain[pair[0]].is_kernel() && chain[pair[1]] == NodeKind::Ours;
            (pair[0], pair[1], early)
        })
        .collect()
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
    fn a_chain_is_ordered_and_anything_else_is_not_one() {
        assert_eq!(
            chain_order(4, &[(2, 0), (0, 3), (3, 1)]),
            Some(vec![2, 0, 3, 1])
        );
        assert_eq!(chain_order(1, &[]), Some(vec![0]));
        assert_eq!(chain_order(3, &[(0, 1), (0, 2)]), None, "a fork");
        assert_eq!(chain_order(3, &[(0, 2), (1, 2)]), None, "a join");
        assert_eq!(chain_order(3, &[(0, 1)]), None, "two pieces");
        assert_eq!(chain_order(2, &[(0, 1), (1, 0)]), None, "a cycle");
    }

    #[test]
    fn allocations_move_before_their_run_frees_after_it_and_our_kernels_start_early() {
        use NodeKind::*;
        // As a capture records two products and a norm: alloc, ours, alloc, ours, free, alloc,
        // cuBLAS, free, alloc, ours, a copy, alloc, ours, free.
        let chain = [
            Alloc,
            Ours,
            Alloc,
            Ours,
            Free,
            Alloc,
            OtherKernel,
            Free,
            Alloc,
            Ours,
            Other,
            Alloc,
            Ours,
            Free,
        ];
        let edges = early_chain(&chain);
        let order: Vec<usize> = std::iter::once(edges[0].0)
            .chain(edges.iter().map(|e| e.1))
            .collect();
        assert_eq!(order, [0, 2, 5, 8, 1, 3, 6, 9, 4, 7, 10, 11, 12, 13]);
        let early: Vec<(usize, usize)> = edges.iter().filter(|e| e.2).map(|e| (e.0, e.1)).collect();
        // Ours after ours, ours after cuBLAS; not cuBLAS after ours, nor anything after an
        // allocation, a free or a copy.
        assert_eq!(early, [(1, 3), (6, 9)]);
        // Every allocation before, every free after, each kernel using it; kernels in order.
        let at = |node: usize| order.iter().position(|&n| n == node).unwrap();
        for (alloc, user, free) in [(0, 1, 4), (2, 3, 7), (5, 6, 13), (8, 9, 13), (11, 12, 13)] {
            assert!(
                at(alloc) < at(user) && at(user) < at(free),
                "{alloc} {user} {free}"
            );
        }
        assert!(early_chain(&[]).is_empty() && early_chain(&[Ours]).is_empty());
    }

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
