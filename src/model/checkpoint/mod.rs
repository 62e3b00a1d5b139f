//! Reading the official checkpoint files. Every PyTorch tensor name is spelled only here (and in
//! the per-model files of this folder), so the model code deals in roles, not names.

pub mod lm;
pub mod mimi;

use super::Result;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// A memory-mapped safetensors file, or random tensors made up on request (benchmarks of
/// model sizes whose weights are not at hand).
pub struct Checkpoint {
    path: PathBuf,
    tensors: Option<MmapedSafetensors>,
    dtype: DType,
    device: Device,
}

impl Checkpoint {
    /// Maps `path`; tensors are converted to `dtype` on `device` as they are read.
    pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        if !path.exists() {
            candle_core::bail!("checkpoint {} not found", path.display());
        }
        // SAFETY: the file is mapped read-only; we never mutate it and ask users not to either.
        let tensors = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
            candle_core::Error::msg(format!(
                "{}: not a readable safetensors file: {e}",
                path.display()
            ))
        })?;
        Ok(Self {
            path: path.to_owned(),
            tensors: Some(tensors),
            dtype,
            device: device.clone(),
        })
    }

    /// A checkpoint whose every tensor is random (scaled so activations stay in range): norms and
    /// codebook usage are ones, biases zeros, layer scales 0.1, the rest N(0, 1/fan_in).
    pub fn random(label: &str, dtype: DType, device: &Device) -> Self {
        Self {
            path: PathBuf::from(format!("<random {label}>")),
            tensors: None,
            dtype,
            device: device.clone(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the file holds `name` (a random checkpoint holds everything).
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.as_ref().is_none_or(|t| t.get(name).is_ok())
    }

    /// Reads tensor `name`, which must have exactly `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Some(tensors) = &self.tensors else {
            return self.random_tensor(name, shape);
        };
        let view = tensors.get(name).map_err(|_| {
            candle_core::Error::msg(format!(
                "{}: tensor {name} is missing (expected shape {shape:?})",
                self.path.display()
            ))
        })?;
        if view.shape() != shape {
            candle_core::bail!(
                "{}: tensor {name} has shape {:?}, expected {shape:?} (does the config match the checkpoint?)",
                self.path.display(),
                view.shape()
            );
        }
        tensors.load(name, &self.device)?.to_dtype(self.dtype)
    }

    /// Reads tensor `name` whatever its shape (for shapes the config does not fix).
    pub fn tensor_any(&self, name: &str) -> Result<Tensor> {
        match &self.tensors {
            Some(tensors) if self.contains(name) => {
                tensors.load(name, &self.device)?.to_dtype(self.dtype)
            }
            Some(_) => candle_core::bail!("{}: tensor {name} is missing", self.path.display()),
            None => candle_core::bail!(
                "{}: a random checkpoint cannot guess the shape of {name}",
                self.path.display()
            ),
        }
    }

    fn random_tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (dtype, device) = (self.dtype, &self.device);
        let ones = name.ends_with(".alpha")
            || name.ends_with("cluster_usage")
            || name.ends_with("_initialized")
            || (name.contains("norm") && name.ends_with(".weight"));
        if ones {
            return Tensor::ones(shape, dtype, device);
        }
        if name.ends_with(".bias") {
            return Tensor::zeros(shape, dtype, device);
        }
        if name.ends_with(".scale") {
            return (Tensor::ones(shape, dtype, device)? * 0.1)?.to_dtype(dtype);
        }
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let std = if name.ends_with("embedding_sum") {
            1.0
        } else {
            1.0 / (fan_in as f64).sqrt()
        };
        Tensor::randn(0f32, std as f32, shape, device)?.to_dtype(dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_lm() -> Checkpoint {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/model.safetensors");
        Checkpoint::open(&path, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn a_wrong_shape_names_the_tensor_and_both_shapes() {
        let err = tiny_lm()
            .tensor("text_emb.weight", &[10, 10])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("text_emb.weight")
                && err.contains("[257, 32]")
                && err.contains("[10, 10]"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_tensor_names_the_tensor_and_the_file() {
        let err = tiny_lm()
            .tensor("no.such.tensor", &[1])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no.such.tensor") && err.contains("model.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn a_broken_file_is_an_error() {
        let dir = std::env::temp_dir().join(format!("duplex-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("broken.safetensors");
        std::fs::write(&path, b"definitely not safetensors").unwrap();
        let err = Checkpoint::open(&path, DType::F32, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("broken.safetensors"), "{err}");
        assert!(
            Checkpoint::open(&dir.join("absent.safetensors"), DType::F32, &Device::Cpu).is_err()
        );
    }
}
