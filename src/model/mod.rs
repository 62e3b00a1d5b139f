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
