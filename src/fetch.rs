//! `duplex fetch`: downloads a model's files from the Hugging Face Hub into the standard cache
//! (where `serve` and `offline` find them), with progress and resumable downloads.

use crate::model::files::{
    CONFIG_FILE, LM_FILE, MIMI_FILE, ModelFiles, TOKENIZER_FILE, VOICES_ARCHIVE,
};
use anyhow::{Context, Result, anyhow};
use hf_hub::api::tokio::{ApiBuilder, ApiError};
use std::path::PathBuf;

/// What to download.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub repo: String,
    /// The access token (gated repositories); `HF_TOKEN` or the token file of `huggingface-cli login`.
    pub token: Option<String>,
    pub progress: bool,
}

/// Downloads every file the server needs; returns where they are.
pub async fn fetch(options: &FetchOptions) -> Result<ModelFiles> {
    let mut builder = ApiBuilder::from_env().with_progress(options.progress);
    if let Some(token) = &options.token {
        builder = builder.with_token(Some(token.clone()));
    }
    let api = builder
        .build()
        .context("setting up the Hugging Face client")?;
    let repo = api.model(options.repo.clone());
    let mut snapshot: Option<PathBuf> = None;
    // Small files first, so a missing licence acceptance shows up at once.
    for file in [TOKENIZER_FILE, MIMI_FILE, VOICES_ARCHIVE, LM_FILE] {
        tracing::info!(%file, repo = %options.repo, "fetching");
        let path = repo
            .get(file)
            .await
            .map_err(|err| explain(err, &options.repo, file))?;
        snapshot = path.parent().map(PathBuf::from);
    }
    if let Err(err) = repo.get(CONFIG_FILE).await {
        tracing::debug!(%err, "no config.json; the built-in PersonaPlex configuration applies");
    }
    let dir = snapshot.ok_or_else(|| anyhow!("no files were downloaded"))?;
    let files = ModelFiles::in_dir(&dir)?;
    files.ensure_voices()?;
    Ok(files)
}

/// Turns hub errors into what to do about them.
fn explain(err: ApiError, repo: &str, file: &str) -> anyhow::Error {
    let status = match &err {
        ApiError::RequestError(request) => request.status().map(|s| s.as_u16()),
        _ => None,
    };
    match status {
        Some(401) | Some(403) => anyhow!(
            "{repo} is gated and the hub refused {file} ({}): accept the licence at https://huggingface.co/{repo} \
             with your account, create an access token at https://huggingface.co/settings/tokens, and run \
             `HF_TOKEN=hf_... duplex fetch`",
            status.unwrap_or_default()
        ),
        Some(404) => anyhow!("{repo} has no file {file} (404): is the repository name right?"),
        _ => anyhow!("downloading {file} from {repo}: {err}"),
    }
}
