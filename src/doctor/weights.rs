//! Whether a model's files are all there and whole: each safetensors file must be as long as its
//! own header says (a cut-off download is caught before the server tries to map it).

use crate::model::files::{FilesError, ModelFiles};
use serde::Serialize;
use std::io::Read;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct FileCheck {
    pub name: String,
    pub bytes: u64,
    /// Bytes the file should have, when its format says.
    pub expected_bytes: Option<u64>,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct WeightsReport {
    pub dir: Option<String>,
    pub files: Vec<FileCheck>,
    pub voices: Vec<String>,
    /// Why the weights cannot be used (absent, incomplete).
    pub problem: Option<String>,
}

impl WeightsReport {
    pub fn complete(&self) -> bool {
        self.problem.is_none() && self.files.iter().all(|f| f.problem.is_none())
    }
}

/// Checks the weights `serve` would use.
pub fn check(model_dir: Option<&Path>, repo: &str) -> WeightsReport {
    let files = match ModelFiles::locate(model_dir, repo) {
        Ok(files) => files,
        Err(err @ (FilesError::Missing { .. } | FilesError::NotCached { .. })) => {
            return WeightsReport {
                problem: Some(err.to_string()),
                ..Default::default()
            };
        }
        Err(err) => {
            return WeightsReport {
                problem: Some(err.to_string()),
                ..Default::default()
            };
        }
    };
    let mut checks = vec![
        safetensors(&files.lm),
        safetensors(&files.mimi),
        plain(&files.tokenizer),
    ];
    if let Some(config) = &files.config {
        checks.push(plain(config));
    }
    let voices = crate::model::voice::VoiceLibrary::scan(&files.voices)
        .map(|l| l.names())
        .unwrap_or_default();
    let problem = voices.is_empty().then(|| {
        format!(
            "no voice presets in {} (run `duplex fetch`, which unpacks voices.tgz)",
            files.voices.display()
        )
    });
    WeightsReport {
        dir: Some(files.dir.display().to_string()),
        files: checks,
        voices,
        problem,
    }
}

fn plain(path: &Path) -> FileCheck {
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let problem = (bytes == 0).then(|| "empty file".to_owned());
    FileCheck {
        name: file_name(path),
        bytes,
        expected_bytes: None,
        problem,
    }
}

fn safetensors(path: &Path) -> FileCheck {
    let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let (expected_bytes, problem) = match safetensors_length(path) {
        Ok(expected) if expected == bytes => (Some(expected), None),
        Ok(expected) => (
            Some(expected),
            Some(format!(
                "truncated or padded: {bytes} bytes, its header describes {expected} (download it again: `duplex fetch`)"
            )),
        ),
        Err(err) => (
            None,
            Some(format!("not a readable safetensors file: {err}")),
        ),
    };
    FileCheck {
        name: file_name(path),
        bytes,
        expected_bytes,
        problem,
    }
}

/// The length a safetensors file must have: 8 + header length + the end of the last tensor.
fn safetensors_length(path: &Path) -> Result<u64, String> {
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| e.to_string())?;
    let header_len = u64::from_le_bytes(len);
    if header_len > 100_000_000 {
        return Err(format!("header length {header_len} is implausible"));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| format!("header: {e}"))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| format!("header: {e}"))?;
    let data_end = header
        .as_object()
        .ok_or("header is not an object")?
        .values()
        .filter_map(|t| t.get("data_offsets")?.as_array()?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    Ok(8 + header_len + data_end)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny")
    }

    #[test]
    fn the_tiny_model_is_complete() {
        let report = check(Some(&tiny()), "any/repo");
        assert!(report.complete(), "{report:?}");
        assert_eq!(report.voices, vec!["NATF0", "NATM0"]);
        assert!(
            report
                .files
                .iter()
                .any(|f| f.name == "model.safetensors" && f.expected_bytes == Some(f.bytes))
        );
    }

    #[test]
    fn a_truncated_checkpoint_is_reported_with_the_fix() {
        let dir = std::env::temp_dir().join(format!("duplex-doctor-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("voices")).unwrap();
        for entry in std::fs::read_dir(tiny()).unwrap() {
            let path = entry.unwrap().path();
            if path.is_file() {
                std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
            }
        }
        std::fs::copy(tiny().join("voices/NATF0.pt"), dir.join("voices/NATF0.pt")).unwrap();
        let lm = dir.join("model.safetensors");
        let data = std::fs::read(&lm).unwrap();
        std::fs::write(&lm, &data[..data.len() - 1000]).unwrap();
        let report = check(Some(&dir), "any/repo");
        assert!(!report.complete());
        let lm = report
            .files
            .iter()
            .find(|f| f.name == "model.safetensors")
            .unwrap();
        assert!(
            lm.problem.as_deref().unwrap().contains("duplex fetch"),
            "{lm:?}"
        );
    }

    #[test]
    fn absent_weights_say_how_to_get_them() {
        let report = check(Some(Path::new("/nonexistent/model")), "any/repo");
        assert!(report.problem.unwrap().contains("duplex fetch"));
    }
}
