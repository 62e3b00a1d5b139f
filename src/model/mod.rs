//! The speech model: Mimi (the audio codec) and the PersonaPlex/Moshi language model, built on
//! candle from the official checkpoint files. No file or clock I/O in the model math: weights
//! arrive through `checkpoint`, streaming state lives in its own structs, one row per slot.

pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod decode;
pub mod depformer;
pub mod files;
pub mod generate;
#[cfg(feature = "cuda")]
pub mod graph;
pub mod graph_cache;
pub mod kernel_plan;
pub mod kv;
pub mod lm;
pub mod memory;
pub mod mimi;
pub mod nn;
pub mod persona;
pub mod pipeline;
pub mod quant;
pub mod sampling;
pub mod tokenizer;
pub mod transformer;
pub mod voice;

pub use candle_core::{DType, Device, Tensor};

/// Errors from the model code: candle's, plus our own messages.
pub type Result<T> = candle_core::Result<T>;

/// Opens CUDA GPU `ordinal` for the model (an error in a build without the `cuda` feature).
///
/// All of a device's work runs on its one stream, in order, so cudarc's per-buffer event
/// tracking (for buffers shared between streams) has nothing to order and is turned off: it
/// waits on and records an event for every buffer of every launch, inside CUDA-graph captures
/// too. (Read from cudarc's code; its cost was not timed on its own.)
pub fn open_gpu(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(gpu) = &device {
        // SAFETY: one stream per device (above); no tensor is used on another stream.
        unsafe { gpu.disable_event_tracking() };
    }
    Ok(device)
}

/// Opens (`open`) or closes the span of GPU work a profiler records: `cuProfilerStart` and
/// `cuProfilerStop`, which `.ci/kprof.cpp` and Nsight Systems' `--capture-range=cudaProfilerApi`
/// follow. It waits for the device first, so a span holds exactly the work launched inside it.
/// With no profiler attached the driver does nothing, and on the CPU neither does this.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn profile_span(device: &Device, open: bool) -> Result<()> {
    device.synchronize()?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(gpu) = device {
        use candle_core::cuda_backend::WrapErr;
        use candle_core::cuda_backend::cudarc::driver::sys;
        gpu.cuda_stream().context().bind_to_thread().w()?;
        // SAFETY: no arguments; the device's context is current on this thread.
        let marked = unsafe {
            if open {
                sys::cuProfilerStart()
            } else {
                sys::cuProfilerStop()
            }
        };
        marked.result().w()?;
    }
    Ok(())
}
