//! What the model tests share: the committed fixtures (made by `reference/make_fixtures.py`), the
//! tiny checkpoint built from them, tensor differences, and the GPU when there is one.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use duplex::model::checkpoint::Checkpoint;
use duplex::model::config::LmConfig;
use duplex::model::lm::LmModel;
use duplex::model::quant::Quant;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tensors of fixture file `name`, on the CPU.
pub fn load(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &Device::Cpu).unwrap()
}

/// The tiny checkpoint's language model running `dep_steps` depformer steps.
pub fn model(dep_steps: usize, dtype: DType, device: &Device, quant: Quant) -> LmModel {
    let cfg = LmConfig::from_file(&fixtures().join("tiny/config.json")).unwrap();
    let ckpt = Checkpoint::open(&fixtures().join("tiny/model.safetensors"), dtype, device).unwrap();
    LmModel::load_quantized(&ckpt, &cfg, dep_steps, quant).unwrap()
}

/// The tiny checkpoint's Mimi in f32 on `device`.
pub fn mimi(device: &Device) -> duplex::model::mimi::Mimi {
    use duplex::model::mimi::{Mimi, MimiConfig};
    let dir = fixtures().join("tiny");
    let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg = MimiConfig::from_model_config_json(&text).unwrap();
    let weights = dir.join("tokenizer-e351c8d8-checkpoint125.safetensors");
    let ckpt = Checkpoint::open(&weights, DType::F32, device).unwrap();
    Mimi::load(&ckpt, &cfg, duplex::model::kv::RingPositions::PersonaPlex).unwrap()
}

/// The tiny model in f32 on the CPU, as the parity tests run it.
pub fn cpu_model(dep_steps: usize) -> LmModel {
    model(dep_steps, DType::F32, &Device::Cpu, Quant::None)
}

/// Largest |a - b| over all elements, whatever the two tensors' devices and dtypes (equal
/// infinities differ by 0); NaN when any difference is NaN (candle's `max` would skip it, so a
/// NaN output would pass a bound).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    let on_cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let (a, b) = (on_cpu(a), on_cpu(b));
    assert_eq!(a.len(), b.len(), "compared tensors differ in size");
    a.iter()
        .zip(&b)
        .map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() })
        .fold(0.0, |largest, diff| {
            match diff.is_nan() || largest.is_nan() {
                true => f32::NAN,
                false => largest.max(diff),
            }
        })
}

/// Largest |t| over all elements (the scale tolerances are relative to).
pub fn largest_abs(t: &Tensor) -> f32 {
    let flat = t
        .to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap();
    flat.max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// The first GPU, or `None` (with a note) when there is none.
pub fn gpu() -> Option<Device> {
    match duplex::model::open_gpu(0) {
        Ok(device) => Some(device),
        Err(err) => {
            eprintln!("skipped: no GPU ({err})");
            None
        }
    }
}

/// `duplex offline`'s options for the reference's persona run (the tiny checkpoint, voice NATF0,
/// the teacher prompt, greedy), writing under `out`, with `pipeline`.
pub fn persona_offline(
    out: &Path,
    pipeline: duplex::model::pipeline::PipelineConfig,
) -> duplex::offline::OfflineOptions {
    duplex::offline::OfflineOptions {
        model_dir: Some(fixtures().join("tiny")),
        input: fixtures().join("persona_user.wav"),
        output: out.join("agent.wav"),
        tokens: Some(out.join("tokens.json")),
        voice: Some("NATF0".into()),
        voice_wav: None,
        prompt: Some("You are a wise and friendly teacher.".into()),
        seed: 42,
        greedy: true,
        pipeline,
    }
}

/// Asserts an offline run's 40 live frames carry the reference's text and agent tokens.
pub fn assert_reference_persona_tokens(report: &duplex::offline::OfflineReport) {
    let reference = load("persona_greedy.safetensors");
    let tokens: Vec<Vec<i64>> = reference["out_tokens_pp"].t().unwrap().to_vec2().unwrap();
    assert_eq!(report.frames.len(), 40);
    for (frame, ours) in report.frames.iter().enumerate() {
        assert_eq!(
            ours.text_id,
            Some(tokens[frame][0]),
            "text of frame {frame}"
        );
        assert_eq!(
            ours.agent.map(|a| a.to_vec()),
            Some(tokens[frame][1..9].to_vec()),
            "agent codes of frame {frame}"
        );
    }
}
