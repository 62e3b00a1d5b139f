//! CUDA-graph capture and replay (`cuda` feature): a piece of a frame is captured once as a graph
//! over persistent input and output buffers, then every later frame copies its inputs into those
//! buffers and launches the graph — one launch instead of hundreds of kernel launches from the
//! host.
//!
//! What may run inside a capture: kernels, device-to-device copies and memsets, allocations that
//! are freed before the capture ends, uploads already in candle's cache (`cached_uploads`). Not:
//! other host transfers (no fresh `Tensor::new`, no `to_vec`), and nothing whose shape or
//! host-side branch changes between frames.
//!
//! With `DUPLEX_PDL=1` (sm_90 and later) a graph also lets each of our kernels be scheduled
//! while the kernel before it finishes (programmatic dependent launch): before it is
//! instantiated, the capture's chain is rebuilt with programmatic edges into our kernels
//! (`graph_cache::early_chain`, which says what that costs in memory), and each of our kernels
//! waits for the one before it (`grid_dependency_sync`, kernels/common.cuh) before it reads or
//! writes anything but weights, which the split-K products prefetch meanwhile. The launch gaps
//! between a frame's few hundred small kernels can then overlap the kernels' tails.

use super::Result;
use super::graph_cache::{NodeKind, chain_order, early_chain, early_launch_from};
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::driver::result;
use candle_core::cuda_backend::cudarc::driver::sys::{
    self, CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use candle_core::{DType, Device, Shape, Tensor};
use std::collections::HashMap;
use std::sync::Arc;

/// Whether graphs let our kernels start while the kernel before them finishes: `DUPLEX_PDL=1`
/// (off otherwise, until a GPU run shows it pays), read once.
pub fn early_launch() -> Result<bool> {
    static EARLY: std::sync::OnceLock<std::result::Result<bool, String>> =
        std::sync::OnceLock::new();
    EARLY
        .get_or_init(|| {
            let early = early_launch_from(std::env::var("DUPLEX_PDL").ok().as_deref());
            if early == Ok(true) {
                tracing::info!(
                    "DUPLEX_PDL=1: CUDA graphs let our kernels start while the kernel before them finishes"
                );
            }
            early
        })
        .clone()
        .map_err(candle_core::Error::Msg)
}

/// While the returned guard lives, candle caches every host-to-device upload (kernel shape
/// parameters, small tensors) by content in device buffers that outlive any graph. Hold it over
/// the eager run just before a capture and over the capture: the eager run fills the cache, so
/// the capture copies from those buffers. Without it a captured upload reads host memory freed
/// right after the capture, at every replay (garbage indices, illegal addresses); with it, an
/// upload the eager run did not make fails the capture with candle's error.
///
/// candle keeps that cache per thread and frees it when the thread ends, so capture only on a
/// thread that outlives the graphs: the step loop's, or the one `serve`'s warm-up runs on (the
/// main thread); never a pool thread that exits when idle (`spawn_blocking`'s).
pub fn cached_uploads(device: &Device) -> Result<impl Sized> {
    Ok(device.as_cuda_device()?.enable_cuda_graph_htod_cache())
}

/// A captured graph and its executable instance, destroyed together.
struct Instantiated {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    stream: Arc<CudaStream>,
}

impl Drop for Instantiated {
    fn drop(&mut self) {
        // SAFETY: both handles are this value's own (null where not made), used by nothing
        // once it drops; a failure to destroy leaks, which is all there is to do about it.
        unsafe {
            if !self.exec.is_null() {
                let _ = result::graph::exec_destroy(self.exec);
            }
            if !self.graph.is_null() {
                let _ = result::graph::destroy(self.graph);
            }
        }
    }
}

impl Instantiated {
    /// Ends the stream's capture; `None` when it recorded nothing.
    fn end_capture(stream: &Arc<CudaStream>) -> Result<Option<Self>> {
        stream.context().bind_to_thread().w()?;
        // SAFETY: the stream is capturing (`FrameGraph::capture` began it).
        let graph = unsafe { result::stream::end_capture(stream.cu_stream()) }.w()?;
        Ok((!graph.is_null()).then(|| Self {
            graph,
            exec: std::ptr::null_mut(),
            stream: stream.clone(),
        }))
    }

    /// Rebuilds the graph's edges as `early_chain` says, when the capture made one chain of
    /// plain edges (else leaves it as it is); returns how many of our kernels may start early.
    fn let_kernels_start_early(&self, ours: &[sys::CUmodule]) -> Result<usize> {
        let (nodes, from, to, data) = self.nodes_and_edges()?;
        let index: HashMap<sys::CUgraphNode, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, &node)| (node, i))
            .collect();
        let edges: Vec<(usize, usize)> = from
            .iter()
            .zip(&to)
            .map(|(f, t)| (index[f], index[t]))
            .collect();
        let plain = sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_DEFAULT as u8;
        let Some(chain) = chain_order(nodes.len(), &edges)
            .filter(|_| data.iter().all(|edge| edge.type_ == plain))
        else {
            tracing::debug!("a captured graph is not one chain: its kernels start as they were");
            return Ok(0);
        };
        let kinds = chain
            .iter()
            // SAFETY: nodes of this graph.
            .map(|&n| unsafe { node_kind(nodes[n], ours) })
            .collect::<Result<Vec<_>>>()?;
        if edges.is_empty() || !kinds.contains(&NodeKind::Ours) {
            return Ok(0);
        }
        let rebuilt = early_chain(&kinds);
        let edge_data = |early: bool| sys::CUgraphEdgeData {
            from_port: if early {
                sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8
            } else {
                0
            },
            to_port: 0,
            type_: if early {
                sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8
            } else {
                plain
            },
            reserved: [0; 5],
        };
        let new_from: Vec<_> = rebuilt.iter().map(|e| nodes[chain[e.0]]).collect();
        let new_to: Vec<_> = rebuilt.iter().map(|e| nodes[chain[e.1]]).collect();
        let new_data: Vec<_> = rebuilt.iter().map(|e| edge_data(e.2)).collect();
        // SAFETY: the graph is valid and not instantiated; each array holds its edges' count.
        unsafe {
            let removed = sys::cuGraphRemoveDependencies_v2(
                self.graph,
                from.as_ptr(),
                to.as_ptr(),
                data.as_ptr(),
                from.len(),
            );
            removed.result().w()?;
            let added = sys::cuGraphAddDependencies_v2(
                self.graph,
                new_from.as_ptr(),
                new_to.as_ptr(),
                new_data.as_ptr(),
                new_from.len(),
            );
            added.result().w()?;
        }
        Ok(rebuilt.iter().filter(|e| e.2).count())
    }

    /// The graph's nodes, and its edges as `from`, `to` and their data.
    #[allow(clippy::type_complexity)]
    fn nodes_and_edges(
        &self,
    ) -> Result<(
        Vec<sys::CUgraphNode>,
        Vec<sys::CUgraphNode>,
        Vec<sys::CUgraphNode>,
        Vec<sys::CUgraphEdgeData>,
    )> {
        let none = std::ptr::null_mut();
        let (mut node_count, mut edge_count) = (0usize, 0usize);
        // SAFETY: a valid graph; null arrays ask for the counts, then arrays of those counts
        // are filled.
        unsafe {
            sys::cuGraphGetNodes(self.graph, none, &mut node_count)
                .result()
                .w()?;
            let mut nodes = vec![std::ptr::null_mut(); node_count];
            sys::cuGraphGetNodes(self.graph, nodes.as_mut_ptr(), &mut node_count)
                .result()
                .w()?;
            sys::cuGraphGetEdges_v2(
                self.graph,
                none,
                none,
                std::ptr::null_mut(),
                &mut edge_count,
            )
            .result()
            .w()?;
            let mut from = vec![std::ptr::null_mut(); edge_count];
            let mut to = vec![std::ptr::null_mut(); edge_count];
            let mut data = vec![std::mem::zeroed::<sys::CUgraphEdgeData>(); edge_count];
            sys::cuGraphGetEdges_v2(
                self.graph,
                from.as_mut_ptr(),
                to.as_mut_ptr(),
                data.as_mut_ptr(),
                &mut edge_count,
            )
            .result()
            .w()?;
            Ok((nodes, from, to, data))
        }
    }

    /// Instantiates the graph and uploads it, so the first launch pays no setup.
    fn instantiate(&mut self) -> Result<()> {
        // SAFETY: a valid graph, instantiated once; the stream is the capture's.
        unsafe {
            self.exec = result::graph::instantiate(self.graph, CUgraphInstantiate_flags(0)).w()?;
            result::graph::upload(self.exec, self.stream.cu_stream()).w()?;
        }
        Ok(())
    }

    fn launch(&self) -> Result<()> {
        self.stream.context().bind_to_thread().w()?;
        // SAFETY: an instantiated graph, launched on the stream it was captured on.
        unsafe { result::graph::launch(self.exec, self.stream.cu_stream()) }.w()?;
        Ok(())
    }
}

/// What `early_chain` needs to know of a graph's node.
///
/// # Safety
/// `node` is a node of a valid graph.
unsafe fn node_kind(node: sys::CUgraphNode, ours: &[sys::CUmodule]) -> Result<NodeKind> {
    let mut node_type = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
    unsafe { sys::cuGraphNodeGetType(node, &mut node_type) }
        .result()
        .w()?;
    match node_type {
        sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL => {}
        sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_ALLOC => return Ok(NodeKind::Alloc),
        sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE => return Ok(NodeKind::Free),
        _ => return Ok(NodeKind::Other),
    }
    // SAFETY: a kernel node, and a zeroed parameter block for the driver to fill.
    let mut params: sys::CUDA_KERNEL_NODE_PARAMS = unsafe { std::mem::zeroed() };
    unsafe { sys::cuGraphKernelNodeGetParams_v2(node, &mut params) }
        .result()
        .w()?;
    if params.func.is_null() {
        return Ok(NodeKind::OtherKernel);
    }
    let mut module = std::ptr::null_mut();
    unsafe { sys::cuFuncGetModule(&mut module, params.func) }
        .result()
        .w()?;
    Ok(if ours.contains(&module) {
        NodeKind::Ours
    } else {
        NodeKind::OtherKernel
    })
}

/// A captured computation with its persistent buffers.
pub struct FrameGraph {
    graph: Instantiated,
    inputs: Vec<Tensor>,
    output: Tensor,
    /// Tensors made before the capture that it reads where they lie (`keep_alive`).
    kept: Vec<Tensor>,
    early_kernels: usize,
}

// SAFETY: a graph is not internally synchronised and must not be used from two threads at once;
// `FrameGraph` owns its graph and is used through `&self` only by its owner, so moving it to
// another thread (the engine moves to the step loop's) is sound.
unsafe impl Send for FrameGraph {}

fn stream(device: &Device) -> Result<Arc<CudaStream>> {
    Ok(device.as_cuda_device()?.cuda_stream())
}

impl FrameGraph {
    /// Captures `run` on persistent copies of `inputs`; its result (of `output_shape` and
    /// `output_dtype`) is copied into a persistent output buffer inside the graph. `run` must
    /// drop everything it allocates before it returns.
    pub fn capture(
        inputs: &[&Tensor],
        output_shape: impl Into<Shape>,
        output_dtype: DType,
        run: impl FnOnce(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Self> {
        Self::capture_with(inputs, output_shape, output_dtype, early_launch()?, run)
    }

    /// `capture`, letting our kernels start early (`early`) or not whatever `DUPLEX_PDL` says.
    pub fn capture_with(
        inputs: &[&Tensor],
        output_shape: impl Into<Shape>,
        output_dtype: DType,
        early: bool,
        run: impl FnOnce(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Self> {
        let Some(first) = inputs.first() else {
            candle_core::bail!("a graph needs at least one input")
        };
        let device = first.device().clone();
        // Compact buffers of their own: `Tensor::copy` keeps a narrowed view's layout, which
        // `slice_set` cannot write.
        let inputs: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.force_contiguous())
            .collect::<Result<_>>()?;
        let output = Tensor::zeros(output_shape, output_dtype, &device)?;
        let stream = stream(&device)?;
        stream.synchronize().w()?;
        // Relaxed: a first use inside the capture (a module load, cuBLAS's workspace) may call
        // APIs that global capture forbids.
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .w()?;
        let captured = run(&inputs).and_then(|out| output.slice_set(&out, 0, 0));
        // The capture must end even when the run failed, or the stream stays unusable.
        let ended = Instantiated::end_capture(&stream);
        captured?;
        let Some(mut graph) = ended? else {
            candle_core::bail!("the capture recorded nothing")
        };
        let early_kernels = if early {
            let ours = super::cuda::our_modules(device.as_cuda_device()?)?;
            graph.let_kernels_start_early(&ours)?
        } else {
            0
        };
        graph.instantiate()?;
        Ok(Self {
            graph,
            inputs,
            output,
            kept: Vec::new(),
            early_kernels,
        })
    }

    /// How many of the graph's kernels may start while the kernel before them finishes.
    pub fn early_kernels(&self) -> usize {
        self.early_kernels
    }

    /// Owns `tensors`, which the capture read where they lie: a tensor another owner drops
    /// would free memory every replay still reads.
    pub fn keep_alive(&mut self, tensors: Vec<Tensor>) {
        self.kept.extend(tensors);
    }

    /// Copies `inputs` (the shapes and dtypes captured) into the graph's buffers, replays it and
    /// returns its output buffer (overwritten by the next replay).
    pub fn replay(&self, inputs: &[&Tensor]) -> Result<&Tensor> {
        if inputs.len() != self.inputs.len() {
            candle_core::bail!(
                "a graph of {} inputs replayed with {}",
                self.inputs.len(),
                inputs.len()
            );
        }
        for (buffer, input) in self.inputs.iter().zip(inputs) {
            if buffer.shape() != input.shape() || buffer.dtype() != input.dtype() {
                candle_core::bail!(
                    "a graph captured for {:?} {:?} replayed with {:?} {:?}",
                    buffer.dtype(),
                    buffer.shape(),
                    input.dtype(),
                    input.shape()
                );
            }
            buffer.slice_set(&input.contiguous()?, 0, 0)?;
        }
        self.graph.launch()?;
        Ok(&self.output)
    }
}
