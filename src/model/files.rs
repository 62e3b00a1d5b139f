//! Where a model's files are: a directory laid out like the Hugging Face repository
//! (`--model-dir`), or the standard hub cache that `duplex fetch` fills.

use std::path::{Path, PathBuf};

/// The repository PersonaPlex is published in.
pub const DEFAULT_REPO: &str = "nvidia/personaplex-7b-v1";
pub const LM_FILE: &str = "model.safetensors";
pub const MIMI_FILE: &str = "tokenizer-e351c8d8-checkpoint125.safetensors";
pub const TOKENIZER_FILE: &str = "tokenizer_spm_32k_3.model";
pub const CONFIG_FILE: &str = "config.json";
pub const VOICES_DIR: &str = "voices";
pub const VOICES_ARCHIVE: &str = "voices.tgz";

/// Files a model directory must hold.
pub const REQUIRED_FILES: [&str; 3] = [LM_FILE, MIMI_FILE, TOKENIZER_FILE];

/// A model's files, all present.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub lm: PathBuf,
    pub mimi: PathBuf,
    pub tokenizer: PathBuf,
    /// `config.json`, if the directory has one.
    pub config: Option<PathBuf>,
    /// The voice presets folder (unpacked from `voices.tgz` on first use).
    pub voices: PathBuf,
}

/// Why no model could be used; the message says how to get one.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{dir}: missing {}; a model directory needs {} (get them with `duplex fetch`)", missing.join(", "), REQUIRED_FILES.join(", "))]
    Missing { dir: String, missing: Vec<String> },
    #[error(
        "no weights for {repo} in the Hugging Face cache ({cache}); run `duplex fetch` (the repository is gated: accept its licence on huggingface.co and set HF_TOKEN) or pass --model-dir DIR"
    )]
    NotCached { repo: String, cache: String },
    #[error("unpacking {archive}: {source}")]
    Unpack {
        archive: String,
        #[source]
        source: std::io::Error,
    },
}

impl ModelFiles {
    /// Checks `dir`, naming every missing file.
    pub fn in_dir(dir: &Path) -> Result<Self, FilesError> {
        let missing: Vec<String> = REQUIRED_FILES
            .iter()
            .filter(|f| !dir.join(f).is_file())
            .map(|f| f.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(FilesError::Missing {
                dir: dir.display().to_string(),
                missing,
            });
        }
        let config = Some(dir.join(CONFIG_FILE)).filter(|p| p.is_file());
        Ok(Self {
            dir: dir.to_owned(),
            lm: dir.join(LM_FILE),
            mimi: dir.join(MIMI_FILE),
            tokenizer: dir.join(TOKENIZER_FILE),
            config,
            voices: dir.join(VOICES_DIR),
        })
    }

    /// `model_dir` when given, else the hub cache's snapshot of `repo`.
    pub fn locate(model_dir: Option<&Path>, repo: &str) -> Result<Self, FilesError> {
        if let Some(dir) = model_dir {
            return Self::in_dir(dir);
        }
        let cache = hub_cache_dir();
        let snapshot = cached_snapshot(&cache, repo).ok_or_else(|| FilesError::NotCached {
            repo: repo.to_owned(),
            cache: cache.display().to_string(),
        })?;
        Self::in_dir(&snapshot)
    }

    /// Unpacks `voices.tgz` next to it once, when the `voices/` folder is not there yet.
    pub fn ensure_voices(&self) -> Result<(), FilesError> {
        let archive = self.dir.join(VOICES_ARCHIVE);
        if self.voices.is_dir() || !archive.is_file() {
            return Ok(());
        }
        tracing::info!(archive = %archive.display(), "unpacking voice presets");
        let unpack = || -> std::io::Result<()> {
            let file = std::fs::File::open(&archive)?;
            tar::Archive::new(flate2::read::GzDecoder::new(file)).unpack(&self.dir)
        };
        unpack().map_err(|source| FilesError::Unpack {
            archive: archive.display().to_string(),
            source,
        })
    }
}

/// The hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(home) = std::env::var_os("HF_HOME") {
        return PathBuf::from(home).join("hub");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("huggingface").join("hub")
}

/// The snapshot folder of `repo` in a hub cache: the one `refs/main` names, else the newest.
pub fn cached_snapshot(cache: &Path, repo: &str) -> Option<PathBuf> {
    let repo_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshots = repo_dir.join("snapshots");
    if let Ok(revision) = std::fs::read_to_string(repo_dir.join("refs").join("main")) {
        let dir = snapshots.join(revision.trim());
        if dir.is_dir() {
            return Some(dir);
        }
    }
    std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.path().is_dir())
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("duplex-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_tiny_fixture_is_a_complete_model_dir() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
        let files = ModelFiles::in_dir(&dir).unwrap();
        assert!(files.config.is_some());
        assert!(files.voices.join("NATF0.pt").is_file());
    }

    #[test]
    fn missing_files_are_all_named_with_the_fix() {
        let dir = scratch("missing");
        std::fs::write(dir.join(LM_FILE), b"x").unwrap();
        let err = ModelFiles::in_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains(MIMI_FILE)
                && err.contains(TOKENIZER_FILE)
                && !err.contains(&format!("missing {LM_FILE}")),
            "{err}"
        );
        assert!(err.contains("duplex fetch"));
    }

    #[test]
    fn a_hub_cache_snapshot_is_found_through_refs_main() {
        let cache = scratch("hub");
        let repo = cache.join("models--nvidia--personaplex-7b-v1");
        for rev in ["aaa111", "bbb222"] {
            let snap = repo.join("snapshots").join(rev);
            std::fs::create_dir_all(&snap).unwrap();
            for file in REQUIRED_FILES {
                std::fs::write(snap.join(file), rev).unwrap();
            }
        }
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), "aaa111\n").unwrap();
        let found = cached_snapshot(&cache, DEFAULT_REPO).unwrap();
        assert!(found.ends_with("snapshots/aaa111"), "{}", found.display());
        assert!(ModelFiles::in_dir(&found).is_ok());
        assert!(cached_snapshot(&cache, "someone/else").is_none());
    }

    #[test]
    fn voices_are_unpacked_once_from_the_archive() {
        let dir = scratch("voices");
        for file in REQUIRED_FILES {
            std::fs::write(dir.join(file), b"x").unwrap();
        }
        let tgz = std::fs::File::create(dir.join(VOICES_ARCHIVE)).unwrap();
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            tgz,
            flate2::Compression::fast(),
        ));
        let preset =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/voices/NATF0.pt");
        builder
            .append_path_with_name(&preset, "voices/NATF0.pt")
            .unwrap();
        builder.into_inner().unwrap().finish().unwrap();
        let files = ModelFiles::in_dir(&dir).unwrap();
        files.ensure_voices().unwrap();
        assert!(files.voices.join("NATF0.pt").is_file());
        files.ensure_voices().unwrap();
    }
}
