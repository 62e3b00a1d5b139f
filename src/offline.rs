//! `duplex offline`: a WAV in, the agent's audio (a WAV as long as the input) and per-frame
//! tokens (JSON) out, through the same pipeline the server steps, deterministic with `--seed`.

use crate::audio::{FRAME_SAMPLES, SAMPLE_RATE, resample, wav};
use crate::model::files::{DEFAULT_REPO, ModelFiles};
use crate::model::generate::SamplingConfig;
use crate::model::persona::VoicePrompt;
use crate::model::pipeline::{Pipeline, PipelineConfig};
use anyhow::{Context, Result, bail};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The role prompt used when none is given (the reference offline script's default).
pub const DEFAULT_PROMPT: &str = "You are a wise and friendly teacher. Answer questions or provide advice in a clear and engaging way.";

#[derive(Debug, Clone)]
pub struct OfflineOptions {
    pub model_dir: Option<PathBuf>,
    pub input: PathBuf,
    pub output: PathBuf,
    pub tokens: Option<PathBuf>,
    pub voice: Option<String>,
    pub voice_wav: Option<PathBuf>,
    pub prompt: Option<String>,
    pub seed: u64,
    pub greedy: bool,
    pub pipeline: PipelineConfig,
}

/// One frame of the run, as written to the tokens file.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FrameTokens {
    pub frame: usize,
    /// The text token (None until the model's outputs start).
    pub text_id: Option<i64>,
    /// Its transcript piece (none for padding).
    pub text: Option<String>,
    /// The agent's 8 codes.
    pub agent: Option<[i64; 8]>,
    /// The user's 8 codes the model saw.
    pub user: [i64; 8],
}

#[derive(Debug, Clone, Serialize)]
pub struct OfflineReport {
    pub model_dir: String,
    pub voice: Option<String>,
    pub prompt: String,
    pub seed: u64,
    pub greedy: bool,
    pub frames: Vec<FrameTokens>,
    /// The transcript (all text pieces joined).
    pub transcript: String,
    /// The agent's audio as written (before 16-bit quantisation).
    #[serde(skip)]
    pub agent_pcm: Vec<f32>,
    /// Whether the last frames replayed CUDA graphs (every piece: Mimi's encode and decode,
    /// the temporal step, the depformer half).
    pub graphs_replayed: bool,
}

/// Runs the whole conversation and writes the outputs.
pub fn run(options: &OfflineOptions) -> Result<OfflineReport> {
    let files = ModelFiles::locate(options.model_dir.as_deref(), DEFAULT_REPO)?;
    tracing::info!(dir = %files.dir.display(), "loading the model ({})", options.pipeline.describe());
    let pipeline = Pipeline::load(&files, &options.pipeline).context("loading the model")?;
    let input = read_24k(&options.input)?;
    let (voice, voice_name) = voice_prompt(&pipeline, options)?;
    let prompt = options
        .prompt
        .clone()
        .unwrap_or_else(|| DEFAULT_PROMPT.to_owned());
    let tokens = pipeline.prompt_tokens(&prompt)?;
    let limit = pipeline.max_prompt_tokens(Some(&voice));
    if tokens.len() > limit {
        let context = pipeline.lm.config().context;
        if limit == 0 {
            bail!(
                "the voice prompt alone fills the model's {context}-frame window; use a shorter voice recording"
            );
        }
        bail!(
            "the role prompt is {} tokens; with this voice the model's {context}-frame window allows {limit}",
            tokens.len()
        );
    }
    let snapshot = pipeline
        .prefill(&voice, &tokens)
        .context("running the system prompt")?;
    let sampling = if options.greedy {
        SamplingConfig::GREEDY
    } else {
        SamplingConfig::DEFAULT
    };
    let mut state = pipeline.state(1)?;
    state.open(0, &snapshot, options.seed, sampling)?;
    let (agent_pcm, frames) = converse(&pipeline, &mut state, &input)?;
    wav::write_pcm16(&options.output, SAMPLE_RATE, &[&agent_pcm])?;
    let transcript: String = frames.iter().filter_map(|f| f.text.as_deref()).collect();
    let report = OfflineReport {
        model_dir: files.dir.display().to_string(),
        voice: voice_name,
        prompt,
        seed: options.seed,
        greedy: options.greedy,
        frames,
        transcript,
        agent_pcm,
        graphs_replayed: state.graphs_replayed().iter().all(|&replayed| replayed),
    };
    if let Some(path) = &options.tokens {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(report)
}

/// Steps every frame of `input`; returns the agent audio (as long as the input) and the tokens.
fn converse(
    pipeline: &Pipeline,
    state: &mut crate::model::pipeline::PipelineState,
    input: &[f32],
) -> Result<(Vec<f32>, Vec<FrameTokens>)> {
    let mut agent = Vec::with_capacity(input.len() + FRAME_SAMPLES);
    let mut frames = Vec::new();
    let mut out = vec![0.0; FRAME_SAMPLES];
    for (frame, chunk) in input.chunks(FRAME_SAMPLES).enumerate() {
        let mut pcm = chunk.to_vec();
        pcm.resize(FRAME_SAMPLES, 0.0);
        let step = state.step(pipeline.models(), &pcm, &[true], &mut out, &mut |_| {})?;
        let Some(Some(slot)) = step.into_iter().next() else {
            bail!("frame {frame}: the model produced nothing")
        };
        let text_id = slot.tokens.map(|t| t[0]);
        frames.push(FrameTokens {
            frame,
            text_id,
            text: text_id.and_then(|id| pipeline.text_piece(id as u32)),
            agent: slot.tokens.map(|t| std::array::from_fn(|q| t[1 + q])),
            user: slot.user_codes,
        });
        agent.extend_from_slice(&out);
    }
    agent.truncate(input.len());
    Ok((agent, frames))
}

fn voice_prompt(
    pipeline: &Pipeline,
    options: &OfflineOptions,
) -> Result<(VoicePrompt, Option<String>)> {
    if let Some(path) = &options.voice_wav {
        let pcm = read_24k(path)?;
        return Ok((
            pipeline.voice_from_pcm(&crate::audio::loudness::normalize(&pcm, SAMPLE_RATE))?,
            Some(path.display().to_string()),
        ));
    }
    let names = pipeline.voices.names();
    let name = match &options.voice {
        Some(name) => name.strip_suffix(".pt").unwrap_or(name).to_owned(),
        None => match names.iter().find(|n| *n == "NATF0").or(names.first()) {
            Some(name) => name.clone(),
            None => return Ok((VoicePrompt::None, None)),
        },
    };
    if !names.contains(&name) {
        bail!(
            "unknown voice {name:?}; available voices: {}",
            names.join(", ")
        );
    }
    Ok((pipeline.voice_preset(&name)?, Some(name)))
}

/// Reads a WAV as mono 24 kHz (resampling other rates).
fn read_24k(path: &Path) -> Result<Vec<f32>> {
    let (pcm, rate) = wav::read_mono(path)?;
    Ok(resample::resample(&pcm, rate, SAMPLE_RATE)?)
}
