//! `duplex bench step`: per-stage time of one frame (Mimi encode, temporal transformer,
//! depformer, Mimi decode) for a model preset or checkpoint, with random or real weights.

use crate::audio::{FRAME_MS, FRAME_SAMPLES, signal};
use crate::bench::loopback::Percentiles;
use crate::model::checkpoint::Checkpoint;
use crate::model::config::LmConfig;
use crate::model::decode::{AttentionLaunch, DecodeAttention};
use crate::model::files::ModelFiles;
use crate::model::generate::SamplingConfig;
use crate::model::kv::RingPositions;
use crate::model::lm::LmModel;
use crate::model::mimi::{Mimi, MimiConfig};
use crate::model::persona::VoicePrompt;
use crate::model::pipeline::{Models, PipelineState, Prefill, Stage};
use crate::model::profile_span;
use crate::model::quant::{KvQuant, Quant};
use anyhow::{Context, Result};
use candle_core::{DType, Device};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct StepBenchOptions {
    /// A preset (`personaplex-7b`, `moshiko`, `mid`) used with random weights.
    pub config: String,
    /// Real weights instead (a model directory); its config wins over `config`.
    pub model_dir: Option<PathBuf>,
    pub device: Device,
    pub dtype: DType,
    pub batch: usize,
    /// Slots in a conversation (the first ones; `None`: all).
    pub busy: Option<usize>,
    pub frames: usize,
    pub dep_steps: usize,
    /// Frames of history each session starts with (`None`: the model's whole context).
    pub history: Option<usize>,
    /// Replay every piece of each frame (Mimi's encode and decode, the temporal step, the
    /// depformer half) as CUDA graphs.
    pub cuda_graphs: bool,
    pub quant: Quant,
    pub kv_quant: KvQuant,
}

/// What attends in the temporal transformer for this run (`DecodeAttention::for_device`; an
/// int8 ring always takes the kernels' path, their CPU references where they do not run).
fn attention_path(cfg: &LmConfig, options: &StepBenchOptions) -> String {
    let kernels = DecodeAttention::for_device(options.dtype, &options.device, cfg.head_dim());
    let path = match (kernels, options.kv_quant) {
        (DecodeAttention::Kernels, KvQuant::None) => "kernels",
        (DecodeAttention::Kernels, KvQuant::Int8) => "kernels, int8 ring",
        (DecodeAttention::Composed, KvQuant::None) => "candle",
        (DecodeAttention::Composed, KvQuant::Int8) => "kernel references, int8 ring",
    };
    match (kernels, AttentionLaunch::forced()) {
        (DecodeAttention::Kernels, Some(Ok(launch))) => {
            format!("{path}, {} (DUPLEX_ATTENTION)", launch.name())
        }
        _ => path.into(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StepBenchReport {
    pub config: String,
    pub weights: String,
    pub device: String,
    pub dtype: String,
    pub batch: usize,
    pub busy: usize,
    pub frames: usize,
    pub depformer_steps: usize,
    /// Temporal positions each session's attention read (its history when timing started).
    pub history: usize,
    /// Whether the timed frames replayed a CUDA graph of the depformer half (asked for and
    /// captured).
    pub cuda_graph_replayed: bool,
    /// Whether they replayed one of the temporal step too.
    pub temporal_graph_replayed: bool,
    /// Whether Mimi's encode and decode replayed graphs.
    pub mimi_graphs_replayed: bool,
    /// How the temporal transformer attended: `kernels` (kernels/attention.cu) or `candle`,
    /// and whether over an int8 ring.
    pub attention: String,
    /// Which kernels ran the matrix products: the installed kernel plan's choices
    /// (`duplex tune`), or the built-in ones.
    pub kernels: String,
    pub quant: String,
    /// How the temporal keys and values were stored: `None` (the model's dtype) or `Int8`.
    pub kv_quant: String,
    pub encode_ms: Percentiles,
    pub temporal_ms: Percentiles,
    pub depformer_ms: Percentiles,
    pub decode_ms: Percentiles,
    pub total_ms: Percentiles,
    /// One call of a system prompt (`PROMPT_TOKENS` text tokens between silences, every stream
    /// forced) in a batch-1 generator of its own, run alone: what a new persona costs per call
    /// when no more fit between two frames.
    pub prompt_call_ms: Percentiles,
    /// That whole system prompt, its calls run together as far as they go (`run_forced`):
    /// how long a new persona takes on an idle server.
    pub prompt_ms: Percentiles,
    /// Median frame time over the 80 ms frame: below 1 keeps up with real time.
    pub real_time_factor: f64,
    /// Bytes of language-model weights one frame reads (temporal + the depformer steps run).
    pub weight_bytes: u64,
    /// Weight bytes over the median temporal + depformer time.
    pub achieved_gb_per_s: f64,
    /// The device's copy bandwidth, measured here (read + write of a large buffer).
    pub copy_gb_per_s: f64,
    /// Time to read the weights once at that bandwidth: the frame's floor at batch 1.
    pub bandwidth_floor_ms: f64,
    /// Keys and values the temporal transformer's attention reads per frame (every busy slot's
    /// history, up to the context).
    pub kv_bytes: u64,
    /// Time to read the weights and those keys and values once: no step can do less.
    pub floor_with_kv_ms: f64,
}

impl StepBenchReport {
    /// The pieces that replayed CUDA graphs: `mimi + temporal + depformer`, or `off`.
    fn graphs_replayed(&self) -> String {
        let pieces = [
            ("mimi", self.mimi_graphs_replayed),
            ("temporal", self.temporal_graph_replayed),
            ("depformer", self.cuda_graph_replayed),
        ];
        let replayed: Vec<&str> = pieces
            .iter()
            .filter(|(_, replayed)| *replayed)
            .map(|(piece, _)| *piece)
            .collect();
        match replayed.is_empty() {
            true => "off".into(),
            false => replayed.join(" + "),
        }
    }

    pub fn table(&self) -> String {
        let row = |name: &str, p: &Percentiles| {
            format!(
                "{name:<12} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                p.p50, p.p95, p.p99, p.max
            )
        };
        [
            format!(
                "bench step: {} ({} weights) on {} {}, batch {} ({} busy), {} frames, {} depformer \
                 steps, history {} frames, CUDA graphs {}, attention by {}, weight quant {}, \
                 key/value quant {}",
                self.config,
                self.weights,
                self.device,
                self.dtype,
                self.batch,
                self.busy,
                self.frames,
                self.depformer_steps,
                self.history,
                self.graphs_replayed(),
                self.attention,
                self.quant.to_lowercase(),
                self.kv_quant.to_lowercase()
            ),
            format!(
                "{:<12} {:>9} {:>9} {:>9} {:>9}",
                "ms/frame", "p50", "p95", "p99", "max"
            ),
            row("mimi encode", &self.encode_ms),
            row("temporal", &self.temporal_ms),
            row("depformer", &self.depformer_ms),
            row("mimi decode", &self.decode_ms),
            row("total", &self.total_ms),
            row("prompt call", &self.prompt_call_ms),
            row("whole prompt", &self.prompt_ms),
            format!("matrix products: {}", self.kernels),
            format!(
                "real-time factor (p50 / {FRAME_MS} ms): {:.3}",
                self.real_time_factor
            ),
            format!(
                "bandwidth floor at {:.0} GB/s: weights {:.2} ms, with keys and values {:.2} ms; \
                 language model p50 {:.2} ms ({:.0} GB/s of weights)",
                self.copy_gb_per_s,
                self.bandwidth_floor_ms,
                self.floor_with_kv_ms,
                self.temporal_ms.p50 + self.depformer_ms.p50,
                self.achieved_gb_per_s
            ),
        ]
        .join("\n")
    }
}

fn load_models(options: &StepBenchOptions) -> Result<(LmModel, Mimi, String, String)> {
    let (mut lm, mimi, config, weights) = load_weights(options)?;
    lm.set_kv_quant(options.kv_quant);
    Ok((lm, mimi, config, weights))
}

fn load_weights(options: &StepBenchOptions) -> Result<(LmModel, Mimi, String, String)> {
    let (dtype, device) = (options.dtype, &options.device);
    if let Some(dir) = &options.model_dir {
        let files = ModelFiles::in_dir(dir)?;
        let lm_cfg = match &files.config {
            Some(path) => LmConfig::from_file(path).unwrap_or_else(|_| LmConfig::personaplex_7b()),
            None => LmConfig::personaplex_7b(),
        };
        let mimi_cfg = files
            .config
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|text| MimiConfig::from_model_config_json(&text).ok())
            .unwrap_or_else(MimiConfig::v0_1);
        let lm = LmModel::load_quantized(
            &Checkpoint::open(&files.lm, dtype, device)?,
            &lm_cfg,
            options.dep_steps,
            options.quant,
        )?;
        let mimi = Mimi::load(
            &Checkpoint::open(&files.mimi, DType::F32, device)?,
            &mimi_cfg,
            RingPositions::PersonaPlex,
        )?;
        return Ok((lm, mimi, dir.display().to_string(), "real".into()));
    }
    let cfg = LmConfig::named(&options.config)?;
    let lm = LmModel::load_quantized(
        &Checkpoint::random(&options.config, dtype, device),
        &cfg,
        options.dep_steps,
        options.quant,
    )?;
    let mimi = Mimi::load(
        &Checkpoint::random("mimi", DType::F32, device),
        &MimiConfig::v0_1(),
        RingPositions::PersonaPlex,
    )?;
    Ok((lm, mimi, options.config.clone(), "random".into()))
}

/// The kernels the matrix products ran on, for the report.
fn kernels_used(options: &StepBenchOptions) -> String {
    match crate::model::kernel_plan::installed() {
        _ if !options.device.is_cuda() => "candle on the CPU".into(),
        Some(installed) => installed.plan.summary(),
        None => "built-in (cuBLAS for bf16, the row kernel for int8)".into(),
    }
}

/// Runs the benchmark.
pub fn run(options: &StepBenchOptions) -> Result<StepBenchReport> {
    let (lm, mimi, config, weights) = load_models(options).context("building the model")?;
    let models = Models {
        lm: &lm,
        mimi: &mimi,
    };
    let batch = options.batch;
    let mut state = PipelineState::new(models, batch, RingPositions::PersonaPlex)?;
    let history = options.history.unwrap_or(lm.config().context);
    for slot in 0..batch {
        state.open_fresh(slot, slot as u64, SamplingConfig::DEFAULT)?;
        state.generator.skip_history(slot, history as u64);
    }
    if options.cuda_graphs {
        state.use_cuda_graphs(models)?;
    }
    let speech = signal::speech_like(FRAME_SAMPLES * 50, 3);
    let busy = options.busy.unwrap_or(batch).min(batch);
    let active: Vec<bool> = (0..batch).map(|slot| slot < busy).collect();
    let mut output = vec![0.0; batch * FRAME_SAMPLES];
    let mut stages: [Vec<f64>; 5] = Default::default();
    let warm_up = 3;
    for frame in 0..options.frames + warm_up {
        if frame == warm_up {
            profile_span(&options.device, true)?;
        }
        let chunk = &speech[(frame % 50) * FRAME_SAMPLES..][..FRAME_SAMPLES];
        let input: Vec<f32> = chunk
            .iter()
            .copied()
            .cycle()
            .take(batch * FRAME_SAMPLES)
            .collect();
        let started = Instant::now();
        let mut last = started;
        let mut times = [0f64; 4];
        let device = &options.device;
        state.step(models, &input, &active, &mut output, &mut |stage| {
            // GPU work is asynchronous: wait for the stage's kernels so the time is the stage's.
            let _ = device.synchronize();
            let now = Instant::now();
            let idx = match stage {
                Stage::Encode => 0,
                Stage::Temporal => 1,
                Stage::Depformer => 2,
                Stage::Decode => 3,
            };
            times[idx] = (now - last).as_secs_f64() * 1000.0;
            last = now;
        })?;
        if frame >= warm_up {
            for (series, time) in stages.iter_mut().zip(times) {
                series.push(time);
            }
            stages[4].push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    profile_span(&options.device, false)?;
    let [encode, temporal, depformer, decode, total] = stages.map(|s| Percentiles::of(&s));
    let prompt_call_ms = time_prompt(&lm, &options.device, 1)?;
    let prompt_ms = time_prompt(&lm, &options.device, usize::MAX)?;
    let weight_bytes = lm_weight_bytes(
        lm.config(),
        lm.depformer_steps(),
        options.dtype,
        options.quant,
    );
    let copy_gb_per_s = copy_bandwidth(&options.device)?;
    let kv_bytes = busy as u64 * lm.temporal_kv_bytes(history.min(lm.config().context));
    let floor_ms = |bytes: u64| bytes as f64 / 1e6 / copy_gb_per_s.max(1e-9);
    let lm_ms = temporal.p50 + depformer.p50;
    Ok(StepBenchReport {
        config,
        weights,
        device: format!("{:?}", options.device),
        dtype: format!("{:?}", options.dtype),
        batch,
        busy,
        frames: options.frames,
        depformer_steps: lm.depformer_steps(),
        history,
        cuda_graph_replayed: state.generator.replays_cuda_graph(),
        temporal_graph_replayed: state.generator.replays_temporal_graph(),
        mimi_graphs_replayed: {
            let [encode, _, _, decode] = state.graphs_replayed();
            encode && decode
        },
        attention: attention_path(lm.config(), options),
        kernels: kernels_used(options),
        quant: format!("{:?}", options.quant),
        kv_quant: format!("{:?}", options.kv_quant),
        real_time_factor: total.p50 / FRAME_MS as f64,
        encode_ms: encode,
        temporal_ms: temporal,
        depformer_ms: depformer,
        decode_ms: decode,
        total_ms: total,
        prompt_call_ms,
        prompt_ms,
        weight_bytes,
        achieved_gb_per_s: weight_bytes as f64 / 1e6 / lm_ms.max(1e-9),
        copy_gb_per_s,
        bandwidth_floor_ms: floor_ms(weight_bytes),
        kv_bytes,
        floor_with_kv_ms: floor_ms(weight_bytes + kv_bytes),
    })
}

/// Text tokens of the system prompt `time_prompt` runs.
const PROMPT_TOKENS: u32 = 32;

/// Whole system prompts `time_prompt` runs when it runs them at once.
const WHOLE_PROMPTS: usize = 3;

/// A system prompt advanced `calls` model calls at a time, each advance timed to a device
/// synchronisation: single calls (`calls` 1; the first, which runs no model, left out), or
/// `WHOLE_PROMPTS` prompts run whole (`usize::MAX`).
fn time_prompt(lm: &LmModel, device: &Device, calls: usize) -> Result<Percentiles> {
    let text: Vec<u32> = (0..PROMPT_TOKENS).map(|i| 1000 + i).collect();
    let runs = if calls == 1 { 1 } else { WHOLE_PROMPTS };
    let mut times = Vec::new();
    for _ in 0..runs {
        // As the server prefills.
        let mut prefill = Prefill::new(lm, RingPositions::PersonaPlex, &VoicePrompt::None, &text)?;
        loop {
            let started = Instant::now();
            let done = prefill.advance(lm, calls)?.is_some();
            device.synchronize()?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            if done {
                break;
            }
        }
    }
    if calls == 1 {
        times.remove(0);
    }
    Ok(Percentiles::of(&times))
}

/// Bytes of the matrices a frame reads: every temporal layer, and `dep_steps` depformer steps.
fn lm_weight_bytes(cfg: &LmConfig, dep_steps: usize, dtype: DType, quant: Quant) -> u64 {
    let (d, h) = (cfg.dim as u64, cfg.hidden() as u64);
    let (dd, dh) = (cfg.depformer_dim as u64, cfg.depformer_hidden() as u64);
    let temporal = cfg.num_layers as u64 * (4 * d * d + 3 * d * h);
    let depformer =
        dep_steps as u64 * (cfg.depformer_num_layers as u64 * (4 * dd * dd + 3 * dd * dh) + d * dd);
    let heads = d * cfg.text_card as u64 + dep_steps as u64 * dd * cfg.card as u64;
    let matrix_bytes = match quant {
        Quant::Int8 => 1,
        Quant::None => dtype.size_in_bytes() as u64,
    };
    (temporal + depformer) * matrix_bytes + heads * dtype.size_in_bytes() as u64
}

/// Copy bandwidth of `device` in GB/s (bytes read + written per second), median of 5 copies of a
/// 256 MiB buffer.
fn copy_bandwidth(device: &Device) -> Result<f64> {
    let elems = 64 * 1024 * 1024;
    let src = candle_core::Tensor::zeros(elems, DType::F32, device)?;
    let mut rates = Vec::new();
    for _ in 0..6 {
        let started = Instant::now();
        let copy = src.force_contiguous()?;
        device.synchronize()?;
        let seconds = started.elapsed().as_secs_f64();
        drop(copy);
        rates.push((2 * elems * 4) as f64 / 1e9 / seconds);
    }
    rates.remove(0);
    Ok(Percentiles::of(&rates).p50)
}
