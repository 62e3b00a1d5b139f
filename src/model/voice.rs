//! Voice presets: PersonaPlex's `voices/<NAME>.pt` files (a torch zip with the summed input
//! embeddings of the voice prompt and the token ring after it), and the library of them.

use super::Result;
use super::generate::CACHE_COLUMNS;
use super::lm::STREAMS;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A loaded voice preset.
#[derive(Debug, Clone)]
pub struct VoicePreset {
    /// `[frames, dim]`: what the transformer is fed for each voice frame.
    pub embeddings: Tensor,
    /// The token ring after the voice prompt.
    pub cache: [[i64; CACHE_COLUMNS]; STREAMS],
}

impl VoicePreset {
    /// Reads a `.pt` preset for a model of width `dim`.
    pub fn load(path: &Path, dim: usize, device: &Device) -> Result<Self> {
        let context = |what: &str| format!("{}: {what}", path.display());
        let tensors = candle_core::pickle::read_all(path).map_err(|e| {
            candle_core::Error::msg(context(&format!("not a torch voice preset: {e}")))
        })?;
        let find = |name: &str| {
            tensors
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, t)| t.clone())
                .ok_or_else(|| candle_core::Error::msg(context(&format!("no {name:?} tensor"))))
        };
        let embeddings = find("embeddings")?;
        let frames = embeddings.elem_count() / dim;
        if embeddings.elem_count() != frames * dim || frames == 0 {
            candle_core::bail!(
                "{}",
                context(&format!(
                    "embeddings {:?} do not fit model width {dim}",
                    embeddings.shape()
                ))
            );
        }
        let embeddings = embeddings
            .to_dtype(DType::F32)?
            .reshape((frames, dim))?
            .to_device(device)?;
        let cache = find("cache")?;
        if cache.dims() != [1, STREAMS, CACHE_COLUMNS] {
            candle_core::bail!(
                "{}",
                context(&format!(
                    "cache has shape {:?}, expected [1, {STREAMS}, {CACHE_COLUMNS}]",
                    cache.shape()
                ))
            );
        }
        let rows: Vec<Vec<i64>> = cache.squeeze(0)?.to_dtype(DType::I64)?.to_vec2()?;
        let mut ring = [[0; CACHE_COLUMNS]; STREAMS];
        for (dst, src) in ring.iter_mut().zip(rows) {
            dst.copy_from_slice(&src);
        }
        Ok(Self {
            embeddings,
            cache: ring,
        })
    }
}

/// The presets found in a model's `voices/` folder, by name. Clients name voices; names are
/// looked up here and never turned into paths.
#[derive(Debug, Clone, Default)]
pub struct VoiceLibrary {
    files: BTreeMap<String, PathBuf>,
}

impl VoiceLibrary {
    /// Lists `dir/*.pt` (an absent folder is an empty library).
    pub fn scan(dir: &Path) -> std::io::Result<Self> {
        let mut files = BTreeMap::new();
        if dir.is_dir() {
            for entry in std::fs::read_dir(dir)? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "pt")
                    && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
                {
                    files.insert(stem.to_owned(), path);
                }
            }
        }
        Ok(Self { files })
    }

    pub fn names(&self) -> Vec<String> {
        self.files.keys().cloned().collect()
    }

    pub fn path(&self, name: &str) -> Option<&Path> {
        self.files.get(name).map(PathBuf::as_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn voices() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/voices")
    }

    #[test]
    fn the_tiny_presets_load() {
        let preset = VoicePreset::load(&voices().join("NATF0.pt"), 32, &Device::Cpu).unwrap();
        assert_eq!(preset.embeddings.dims(), &[4, 32]);
        assert!(preset.cache.iter().flatten().all(|&t| t >= -1));
    }

    #[test]
    fn a_preset_for_another_width_is_refused() {
        let err = VoicePreset::load(&voices().join("NATF0.pt"), 48, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("NATF0.pt") && err.contains("48"), "{err}");
    }

    #[test]
    fn the_library_lists_names_only() {
        let library = VoiceLibrary::scan(&voices()).unwrap();
        assert_eq!(library.names(), vec!["NATF0", "NATM0"]);
        assert!(library.path("../NATF0").is_none());
        assert!(
            VoiceLibrary::scan(Path::new("/nonexistent"))
                .unwrap()
                .names()
                .is_empty()
        );
    }
}
