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
//! With `DUPLEX_PDL=1` a capture also lets each kernel of ours start while the kernel before it
//! finishes (`early`).

pub mod early;

use super::Result;
use super::graph_cache::early_launch_from;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::sys::{
    CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaStream};
use candle_core::{DType, Device, Shape, Tensor};
use std::sync::Arc;

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

/// Whether captures let our kernels start while the kernel before them finishes:
/// `DUPLEX_PDL=1` (off otherwise, until a GPU run shows it pays), read once.
pub fn early_launch() -> Result<bool> {
    static EARLY: std::sync::OnceLock<std::result::Result<bool, String>> =
        std::sync::OnceLock::new();
    EARLY
        .get_or_init(|| early_launch_from(std::env::var("DUPLEX_PDL").ok().as_deref()))
        .clone()
        .map_err(candle_core::Error::Msg)
}

/// A captured computation with its persistent buffers.
pub struct FrameGraph {
    graph: CudaGraph,
    inputs: Vec<Tensor>,
    output: Tensor,
    /// Tensors made before the capture that it reads where they lie (`keep_alive`).
    kept: Vec<Tensor>,
    /// How many of its kernels may start while the kernel before them finishes.
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

    /// `capture`, letting our kernels start early (where the card and the kernels' build allow
    /// it) or not, whatever `DUPLEX_PDL` says.
    pub fn capture_with(
        inputs: &[&Tensor],
        output_shape: impl Into<Shape>,
        output_dtype: DType,
        start_early: bool,
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
        let start_early = start_early && early::supported(device.as_cuda_device()?)?;
        let stream = stream(&device)?;
        stream.synchronize().w()?;
        // Relaxed: a first use inside the capture (a module load, cuBLAS's workspace) may call
        // APIs that global capture forbids.
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .w()?;
        let capturing = start_early.then(early::Capturing::begin);
        let captured = run(&inputs).and_then(|out| output.slice_set(&out, 0, 0));
        drop(capturing);
        // The capture must end even when the run failed, or the stream stays unusable.
        let ended = stream.end_capture(CUgraphInstantiate_flags(0));
        captured?;
        let Some(graph) = ended.w()? else {
            candle_core::bail!("the capture recorded nothing")
        };
        graph.upload().w()?;
        let early_kernels = if start_early {
            early::programmatic_edges(&graph)?
        } else {
            0
        };
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
        self.graph.launch().w()?;
        Ok(&self.output)
    }
}
