//! Kernels of ours that start while the kernel before them finishes (programmatic dependent
//! launch, sm_90 and later), set up as a capture goes (`DUPLEX_PDL=1`).
//!
//! Each kernel of ours waits for the kernel before it to complete before it touches anything
//! but weights (`grid_dependency_sync`, kernels/common.cuh), so a programmatic edge from that
//! kernel lets it be scheduled, and its blocks start, while that kernel's last blocks run. But
//! candle allocates every output on the stream, so a capture holds an allocation node, after
//! the kernel before, in front of each kernel, and frees between them; and a graph holding
//! allocations cannot have its edges changed after the capture. So an op of ours asks `prepare`
//! before it allocates: when the capture ends in a kernel and frees after it, the op's
//! allocations are made to depend on what that kernel depends on, and `arm`, right before the
//! launch, makes the op's kernel depend on them and, programmatically, on that kernel.
//!
//! An allocation may reuse only memory freed before it in the graph's order. The frees skipped
//! over are left out of the chain, so the next early start's allocations depend on them too:
//! that op's kernel writes only after the kernels before it completed, the last users of what
//! those frees gave back among them. Buffers are reused a kernel later than in a plain capture.

use crate::model::Result;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::sys::{
    self, CUgraphDependencyType, CUgraphEdgeData, CUgraphNode, CUgraphNodeType,
    CUstreamCaptureStatus, CUstreamUpdateCaptureDependencies_flags,
};
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaStream};
use std::cell::{Cell, RefCell};
use std::sync::Arc;

thread_local! {
    /// Set while a capture with early starts runs on this thread.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// The frees the last early start skipped over.
    static LEFT_OUT: RefCell<Vec<CUgraphNode>> = const { RefCell::new(Vec::new()) };
}

/// Whether kernels of ours on this card can start early: programmatic edges need sm_90 or
/// later and a driver of CUDA 12.3 or later (edge data in captures), and our kernels wait only
/// when their PTX was built for sm_90 or later (`DUPLEX_CUDA_ARCHS`).
pub fn supported(device: &candle_core::CudaDevice) -> Result<bool> {
    let built: u32 = env!("DUPLEX_CUDA_ARCHS")
        .trim_start_matches("sm_")
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or(0);
    let major = device
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
        .w()?;
    let mut driver = 0;
    // SAFETY: a place for the version.
    unsafe { sys::cuDriverGetVersion(&mut driver) }
        .result()
        .w()?;
    let supported = built >= 90 && major >= 9 && driver >= 12030;
    static WARNED: std::sync::Once = std::sync::Once::new();
    if !supported {
        WARNED.call_once(|| {
            tracing::warn!(
                built = env!("DUPLEX_CUDA_ARCHS"),
                major,
                driver,
                "DUPLEX_PDL: kernels start early only on sm_90 or later, built for it, with a \
                 CUDA 12.3 driver or later; not here"
            )
        });
    }
    Ok(supported)
}

/// While it lives, ops of ours captured on this thread start early where they can; then the
/// thread's state is what it was (a capture inside another on this thread is its own).
pub struct Capturing {
    was_capturing: bool,
    was_left_out: Vec<CUgraphNode>,
}

impl Capturing {
    pub fn begin() -> Self {
        Self {
            was_capturing: CAPTURING.replace(true),
            was_left_out: LEFT_OUT.take(),
        }
    }
}

impl Drop for Capturing {
    fn drop(&mut self) {
        CAPTURING.set(self.was_capturing);
        LEFT_OUT.replace(std::mem::take(&mut self.was_left_out));
    }
}

/// An op of ours whose kernel may start early, from `prepare` to `arm`.
pub struct EarlyStart {
    stream: Arc<CudaStream>,
    /// The kernel before it.
    kernel: CUgraphNode,
    /// What `prepare` made the op's allocations depend on.
    prepared: Vec<CUgraphNode>,
}

fn plain() -> CUgraphEdgeData {
    // SAFETY: plain data, all zeros is the default edge.
    unsafe { std::mem::zeroed() }
}

fn programmatic() -> CUgraphEdgeData {
    CUgraphEdgeData {
        from_port: sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8,
        to_port: 0,
        type_: CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8,
        reserved: [0; 5],
    }
}

/// Called by an op of ours before it allocates its outputs: `None` (the capture left as it is)
/// unless a capture with early starts is under way on this thread and ends in a kernel and
/// frees after it.
pub fn prepare(device: &candle_core::CudaDevice) -> Result<Option<EarlyStart>> {
    if !CAPTURING.get() {
        return Ok(None);
    }
    let stream = device.cuda_stream();
    let Some(tail) = capture_dependencies(&stream)? else {
        return Ok(None);
    };
    if let Some((kernel, frees)) = kernel_before(&tail)? {
        let mut prepared = node_dependencies(kernel)?;
        if !prepared.is_empty() {
            prepared.extend(LEFT_OUT.replace(frees));
            let edges: Vec<_> = prepared.iter().map(|&node| (node, plain())).collect();
            set_capture_dependencies(&stream, &edges, SET)?;
            return Ok(Some(EarlyStart {
                stream,
                kernel,
                prepared,
            }));
        }
    }
    // The frees the last early start skipped over join what comes next, as they would have in
    // a plain capture: it comes after the kernel that started early, which waited for the
    // last users of what they gave back.
    let left_out: Vec<_> = LEFT_OUT
        .take()
        .into_iter()
        .map(|free| (free, plain()))
        .collect();
    if !left_out.is_empty() {
        set_capture_dependencies(&stream, &left_out, ADD)?;
    }
    Ok(None)
}

/// Called by an op of ours right before it launches its kernel, with what `prepare` gave.
/// Only the op's allocations may have been captured since: anything else would depend on what
/// the kernel before depends on, not on that kernel, and could run beside it.
pub fn arm(start: Option<EarlyStart>) -> Result<()> {
    let Some(start) = start else { return Ok(()) };
    let Some(tail) = capture_dependencies(&start.stream)? else {
        candle_core::bail!("a capture ended between an op's allocations and its launch")
    };
    for &node in &tail {
        let node_type = node_type(node)?;
        let allocation = node_type == CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_ALLOC;
        if !allocation && !start.prepared.contains(&node) {
            candle_core::bail!(
                "an op of ours captured {node_type:?} between its allocations and its launch"
            )
        }
    }
    let edges: Vec<_> = (tail.into_iter().map(|node| (node, plain())))
        .chain([(start.kernel, programmatic())])
        .collect();
    set_capture_dependencies(&start.stream, &edges, SET)
}

/// How many of `graph`'s edges are programmatic: the kernels that may start early, as the
/// driver recorded them.
pub fn programmatic_edges(graph: &CudaGraph) -> Result<usize> {
    let graph = graph.cu_graph();
    let mut count = 0usize;
    let none = std::ptr::null_mut();
    // SAFETY: the graph `graph` owns; null arrays ask for the count, then arrays of that count are
    // filled.
    let data = unsafe {
        sys::cuGraphGetEdges_v2(graph, none, none, std::ptr::null_mut(), &mut count)
            .result()
            .w()?;
        let mut from = vec![std::ptr::null_mut(); count];
        let mut to = vec![std::ptr::null_mut(); count];
        let mut data = vec![plain(); count];
        let (from, to, edge_data) = (from.as_mut_ptr(), to.as_mut_ptr(), data.as_mut_ptr());
        sys::cuGraphGetEdges_v2(graph, from, to, edge_data, &mut count)
            .result()
            .w()?;
        data.truncate(count);
        data
    };
    let programmatic = CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8;
    Ok(data
        .iter()
        .filter(|edge| edge.type_ == programmatic)
        .count())
}

/// The kernel a capture whose dependency set is `tail` ends in, with the frees after it
/// (newest first); `None` when it ends otherwise, or in more than one node.
fn kernel_before(tail: &[CUgraphNode]) -> Result<Option<(CUgraphNode, Vec<CUgraphNode>)>> {
    let [mut node] = tail[..] else {
        return Ok(None);
    };
    let mut frees = Vec::new();
    loop {
        match node_type(node)? {
            CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL => return Ok(Some((node, frees))),
            CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE => {
                frees.push(node);
                let [previous] = node_dependencies(node)?[..] else {
                    return Ok(None);
                };
                node = previous;
            }
            _ => return Ok(None),
        }
    }
}

/// The nodes the next node captured on the stream would depend on (copied: the driver's array
/// lasts until the next call on the stream); `None` when it is not capturing. (Their edge data
/// is asked for too: without a place for it the query fails once an edge is not plain.)
fn capture_dependencies(stream: &CudaStream) -> Result<Option<Vec<CUgraphNode>>> {
    let mut status = CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    let (mut id, mut graph) = (0u64, std::ptr::null_mut());
    let (mut nodes, mut data, mut count) = (std::ptr::null(), std::ptr::null(), 0usize);
    // SAFETY: a live stream and places for each output.
    unsafe {
        sys::cuStreamGetCaptureInfo_v3(
            stream.cu_stream(),
            &mut status,
            &mut id,
            &mut graph,
            &mut nodes,
            &mut data,
            &mut count,
        )
    }
    .result()
    .w()?;
    if status != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE {
        return Ok(None);
    }
    if count == 0 {
        return Ok(Some(Vec::new()));
    }
    // SAFETY: the driver's array of `count` nodes.
    Ok(Some(
        unsafe { std::slice::from_raw_parts(nodes, count) }.to_vec(),
    ))
}

const SET: CUstreamUpdateCaptureDependencies_flags =
    CUstreamUpdateCaptureDependencies_flags::CU_STREAM_SET_CAPTURE_DEPENDENCIES;
const ADD: CUstreamUpdateCaptureDependencies_flags =
    CUstreamUpdateCaptureDependencies_flags::CU_STREAM_ADD_CAPTURE_DEPENDENCIES;

/// Replaces (`SET`) or extends (`ADD`) the stream's capture dependencies with `edges`: the
/// nodes the next captured node will depend on, and how.
fn set_capture_dependencies(
    stream: &CudaStream,
    edges: &[(CUgraphNode, CUgraphEdgeData)],
    how: CUstreamUpdateCaptureDependencies_flags,
) -> Result<()> {
    let (mut nodes, data): (Vec<CUgraphNode>, Vec<CUgraphEdgeData>) = edges.iter().copied().unzip();
    // SAFETY: a capturing stream, and as many edge data as nodes, all nodes of its graph.
    unsafe {
        sys::cuStreamUpdateCaptureDependencies_v2(
            stream.cu_stream(),
            nodes.as_mut_ptr(),
            data.as_ptr(),
            nodes.len(),
            how as u32,
        )
    }
    .result()
    .w()?;
    Ok(())
}

fn node_type(node: CUgraphNode) -> Result<CUgraphNodeType> {
    let mut node_type = CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
    // SAFETY: a node of the graph under capture.
    unsafe { sys::cuGraphNodeGetType(node, &mut node_type) }
        .result()
        .w()?;
    Ok(node_type)
}

/// The nodes `node` depends on.
fn node_dependencies(node: CUgraphNode) -> Result<Vec<CUgraphNode>> {
    let mut count = 0usize;
    // SAFETY: a node of the graph under capture; null arrays ask for the count, then arrays of
    // that count are filled.
    unsafe {
        sys::cuGraphNodeGetDependencies_v2(
            node,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            &mut count,
        )
        .result()
        .w()?;
        let mut nodes = vec![std::ptr::null_mut(); count];
        let mut data = vec![plain(); count];
        sys::cuGraphNodeGetDependencies_v2(node, nodes.as_mut_ptr(), data.as_mut_ptr(), &mut count)
            .result()
            .w()?;
        nodes.truncate(count);
        Ok(nodes)
    }
}
