//! Parity with the PyTorch reference (`tests/fixtures/mimi_parity.safetensors`, made by
//! `tests/reference/make_fixtures.py` from the tiny Mimi checkpoint), streaming against
//! non-streaming, slot masking and resets.

use super::replay::Streaming;
use super::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn tiny_weights() -> PathBuf {
    fixtures().join("tiny/tokenizer-e351c8d8-checkpoint125.safetensors")
}

fn tiny_config() -> MimiConfig {
    let text = std::fs::read_to_string(fixtures().join("tiny/config.json")).unwrap();
    MimiConfig::from_model_config_json(&text).unwrap()
}

fn load(path: &Path, positions: RingPositions) -> Result<Mimi> {
    let ckpt = Checkpoint::open(path, DType::F32, &Device::Cpu)?;
    Mimi::load(&ckpt, &tiny_config(), positions)
}

fn tiny(positions: RingPositions) -> Mimi {
    load(&tiny_weights(), positions).unwrap()
}

fn parity() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("mimi_parity.safetensors"), &Device::Cpu)
        .unwrap()
}

fn get(p: &HashMap<String, Tensor>, name: &str) -> Tensor {
    p.get(name)
        .unwrap_or_else(|| panic!("fixture {name} is missing"))
        .clone()
}

fn max_abs_diff(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shapes differ");
    (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor, atol: f32) {
    let diff = max_abs_diff(got, want);
    println!("{name}: max |diff| = {diff:.3e}");
    assert!(diff <= atol, "{name}: max |diff| {diff:.3e} > {atol:.0e}");
}

/// `[n, frames]` as rows of i64.
fn rows(codes: &Tensor) -> Vec<Vec<i64>> {
    codes.to_dtype(DType::I64).unwrap().to_vec2().unwrap()
}

/// Exact equality of codes `[n, frames]`; on failure names the first differing frame and the
/// reference's decision margin there.
fn assert_codes(name: &str, got: &Tensor, want: &Tensor, margin: Option<&Tensor>) {
    let (got, want) = (rows(got), rows(want));
    assert_eq!(
        (got.len(), got[0].len()),
        (want.len(), want[0].len()),
        "{name}: shapes"
    );
    let frames = got[0].len();
    let first = (0..frames).find(|&f| got.iter().zip(&want).any(|(g, w)| g[f] != w[f]));
    if let Some(f) = first {
        let margins = margin.map(|m| m.narrow(1, f, 1).unwrap().flatten_all().unwrap());
        panic!(
            "{name}: codes differ from frame {f}: got {:?}, want {:?} (batch-path margins there {:?})",
            got.iter().map(|r| r[f]).collect::<Vec<_>>(),
            want.iter().map(|r| r[f]).collect::<Vec<_>>(),
            margins.map(|m| m.to_vec1::<f32>().unwrap())
        );
    }
    println!("{name}: {frames} frames × {} codebooks equal", got.len());
}

/// Streaming encode, batch 1, one frame per call → `[n, frames]`.
fn stream_encode(mimi: &Mimi, pcm: &Tensor) -> Result<Tensor> {
    let frame = mimi.frame_samples();
    let mut state = mimi.encoder_state(1)?;
    let frames = pcm.dim(2)? / frame;
    let codes = (0..frames)
        .map(|f| mimi.encode_step(&pcm.narrow(2, f * frame, frame)?, &mut state, &[true]))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&codes, 0)?.t()
}

/// Streaming decode, batch 1, one frame per call → `[1, 1, frames · frame]`.
fn stream_decode(mimi: &Mimi, codes: &Tensor) -> Result<Tensor> {
    let mut state = mimi.decoder_state(1)?;
    let codes = codes.to_dtype(DType::U32)?;
    let pcm = (0..codes.dim(1)?)
        .map(|f| mimi.decode_step(&codes.narrow(1, f, 1)?.t()?, &mut state, &[true]))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&pcm, 2)
}

#[test]
fn streaming_matches_personaplex() -> Result<()> {
    let p = parity();
    let mimi = tiny(RingPositions::PersonaPlex);
    let codes = stream_encode(&mimi, &get(&p, "pcm_in"))?;
    assert_codes(
        "codes_stream_pp",
        &codes,
        &get(&p, "codes_stream_pp"),
        Some(&get(&p, "code_margin")),
    );
    let pcm = stream_decode(&mimi, &get(&p, "codes_stream_pp"))?;
    assert_close(
        "pcm_decoded_stream_pp",
        &pcm,
        &get(&p, "pcm_decoded_stream_pp"),
        1e-4,
    );
    Ok(())
}

#[test]
fn streaming_matches_pypi() -> Result<()> {
    let p = parity();
    let mimi = tiny(RingPositions::Exact);
    let codes = stream_encode(&mimi, &get(&p, "pcm_in"))?;
    assert_codes(
        "codes_stream",
        &codes,
        &get(&p, "codes_stream"),
        Some(&get(&p, "code_margin")),
    );
    let pcm = stream_decode(&mimi, &get(&p, "codes_stream"))?;
    assert_close(
        "pcm_decoded_stream",
        &pcm,
        &get(&p, "pcm_decoded_stream"),
        1e-4,
    );
    Ok(())
}

#[test]
fn batch_encode_matches_with_its_intermediates() -> Result<()> {
    let p = parity();
    let mimi = tiny(RingPositions::PersonaPlex);
    let trace = mimi.encode_trace(&get(&p, "pcm_in"))?;
    assert_close(
        "enc_seanet_out",
        &trace.seanet,
        &get(&p, "enc_seanet_out"),
        1e-4,
    );
    assert_close(
        "enc_transformer_out",
        &trace.transformer,
        &get(&p, "enc_transformer_out"),
        1e-4,
    );
    assert_close("enc_latent", &trace.latent, &get(&p, "enc_latent"), 1e-4);
    assert_codes(
        "codes_batch",
        &trace.codes.squeeze(0)?,
        &get(&p, "codes_batch"),
        Some(&get(&p, "code_margin")),
    );
    Ok(())
}

#[test]
fn batch_decode_intermediates_match() -> Result<()> {
    let p = parity();
    let mimi = tiny(RingPositions::Exact);
    let codes = get(&p, "codes_stream").unsqueeze(0)?;
    let trace = mimi.decode_trace(&codes)?;
    assert_close(
        "dec_quantized_latent",
        &trace.latent,
        &get(&p, "dec_quantized_latent"),
        1e-4,
    );
    assert_close(
        "dec_upsampled",
        &trace.upsampled,
        &get(&p, "dec_upsampled"),
        1e-4,
    );
    assert_close(
        "dec_transformer_out",
        &trace.transformer,
        &get(&p, "dec_transformer_out"),
        1e-4,
    );
    Ok(())
}

/// Before the 25-frame rings fill (12 code frames, two encoder frames each), streaming and
/// non-streaming compute the same thing.
#[test]
fn streaming_equals_non_streaming_until_the_ring_fills() -> Result<()> {
    let p = parity();
    let frame = 1920;
    for positions in [RingPositions::PersonaPlex, RingPositions::Exact] {
        let mimi = tiny(positions);
        let pcm = get(&p, "pcm_in");
        let streamed = stream_encode(&mimi, &pcm)?;
        let batch = mimi.encode(&pcm)?.squeeze(0)?;
        assert_codes(
            "stream vs batch codes, frames 0..13",
            &streamed.narrow(1, 0, 13)?,
            &batch.narrow(1, 0, 13)?,
            None,
        );
        let codes = get(&p, "codes_stream");
        let streamed = stream_decode(&mimi, &codes)?;
        let batch = mimi.decode(&codes.unsqueeze(0)?)?;
        assert_close(
            "stream vs batch decode, frames 0..12",
            &streamed.narrow(2, 0, 12 * frame)?,
            &batch.narrow(2, 0, 12 * frame)?,
            1e-5,
        );
    }
    Ok(())
}

/// How a test runs each streaming step.
#[derive(Clone, Copy, PartialEq)]
enum Steps {
    /// `encode_step` / `decode_step`.
    Once,
    /// As a CUDA-graph capture does at its frame: plan, save the shifted state, run, put the
    /// state back, run again from copies of the input and the plan's tensors; the two outputs
    /// must be equal and the stream must go on as if the frame ran once.
    Twice,
}

fn encode(
    mimi: &Mimi,
    pcm: &Tensor,
    state: &mut EncoderState,
    active: &[bool],
    steps: Steps,
) -> Result<Tensor> {
    if steps == Steps::Once {
        return mimi.encode_step(pcm, state, active);
    }
    let plan = mimi.plan_step(
        &mimi.encoder_transformer,
        &mut state.transformer,
        &mut state.masks,
        active,
    )?;
    let saved = replay::save(&state.shift_buffers())?;
    let first = mimi.encode_planned(pcm, state, &plan)?;
    replay::restore(&state.shift_buffers(), &saved)?;
    let again = mimi.encode_planned(&pcm.copy()?, state, &copied(&plan)?)?;
    assert_eq!(
        rows(&first),
        rows(&again),
        "an encode step run again from its saved state"
    );
    Ok(again)
}

fn decode(
    mimi: &Mimi,
    codes: &Tensor,
    state: &mut DecoderState,
    active: &[bool],
    steps: Steps,
) -> Result<Tensor> {
    if steps == Steps::Once {
        return mimi.decode_step(codes, state, active);
    }
    let plan = mimi.plan_step(
        &mimi.decoder_transformer,
        &mut state.transformer,
        &mut state.masks,
        active,
    )?;
    let saved = replay::save(&state.shift_buffers())?;
    let first = mimi.decode_planned(codes, state, &plan)?;
    replay::restore(&state.shift_buffers(), &saved)?;
    let again = mimi.decode_planned(&codes.copy()?, state, &copied(&plan)?)?;
    assert_eq!(
        max_abs_diff(&first, &again),
        0.0,
        "a decode step run again from its saved state"
    );
    Ok(again)
}

/// `plan` reading copies of its tensors (as a graph reads its input buffers).
fn copied(plan: &StepPlan) -> Result<StepPlan> {
    let copies = plan
        .tensors()?
        .iter()
        .map(|t| t.copy())
        .collect::<Result<Vec<_>>>()?;
    plan.with_tensors(&copies)
}

/// Slot 0 streams the fixture audio throughout; slot 1 streams other audio, sits out a few
/// steps, is reset and then streams the fixture audio from its start. Both must reproduce the
/// batch-1 codes, and slot 0's decode must not notice slot 1.
#[test]
fn slots_are_independent_and_reset_restarts_one() -> Result<()> {
    slots_and_resets(Steps::Once)
}

/// The same stream with every frame run the way a CUDA-graph capture runs it.
#[test]
fn a_frame_run_again_from_its_saved_state_continues_the_stream() -> Result<()> {
    slots_and_resets(Steps::Twice)
}

fn slots_and_resets(steps: Steps) -> Result<()> {
    let p = parity();
    let mimi = tiny(RingPositions::PersonaPlex);
    let frame = mimi.frame_samples();
    let pcm = get(&p, "pcm_in");
    let want = get(&p, "codes_stream_pp");
    let frames = want.dim(1)?;
    let other = (pcm.flip(&[2])? * 0.7)?;
    let (reset_at, idle) = (9, 5..9);

    let mut enc = mimi.encoder_state(2)?;
    let mut dec = mimi.decoder_state(2)?;
    let (mut slot0, mut slot1, mut pcm0) = (vec![], vec![], vec![]);
    for f in 0..frames {
        if f == reset_at {
            enc.reset_slot(1)?;
            dec.reset_slot(1)?;
        }
        let src1 = if f < reset_at { &other } else { &pcm };
        let f1 = if f < reset_at { f } else { f - reset_at };
        let xs = Tensor::cat(
            &[
                pcm.narrow(2, f * frame, frame)?,
                src1.narrow(2, f1 * frame, frame)?,
            ],
            0,
        )?;
        let active = [true, !idle.contains(&f)];
        let codes = encode(&mimi, &xs, &mut enc, &active, steps)?;
        slot0.push(codes.narrow(0, 0, 1)?);
        if f >= reset_at {
            slot1.push(codes.narrow(0, 1, 1)?);
        }
        // Decode the reference codes for slot 0; slot 1 decodes its own codes.
        let dec_codes = Tensor::cat(
            &[
                want.narrow(1, f, 1)?.t()?.to_dtype(DType::U32)?,
                codes.narrow(0, 1, 1)?,
            ],
            0,
        )?;
        pcm0.push(decode(&mimi, &dec_codes, &mut dec, &active, steps)?.narrow(0, 0, 1)?);
    }
    assert_codes(
        "slot 0 (batch 2)",
        &Tensor::cat(&slot0, 0)?.t()?,
        &want,
        None,
    );
    assert_codes(
        "slot 1 after reset",
        &Tensor::cat(&slot1, 0)?.t()?,
        &want.narrow(1, 0, frames - reset_at)?,
        None,
    );
    assert_close(
        "slot 0 decode (batch 2) vs pcm_decoded_stream_pp",
        &Tensor::cat(&pcm0, 2)?,
        &get(&p, "pcm_decoded_stream_pp"),
        1e-4,
    );
    Ok(())
}

/// A step of only the first rows leaves the other slots exactly as they were: slot 0 streams
/// alone in 1-row steps, then slot 2 joins from a state untouched all along (3-row steps, slot 1
/// idle); both give the reference's codes.
#[test]
fn stepping_the_first_rows_leaves_the_rest_untouched() -> Result<()> {
    let p = parity();
    let mimi = tiny(RingPositions::PersonaPlex);
    let frame = mimi.frame_samples();
    let pcm = get(&p, "pcm_in");
    let want = get(&p, "codes_stream_pp");
    let (frames, joins) = (want.dim(1)?, 6);
    let mut enc = mimi.encoder_state(3)?;
    let (mut slot0, mut slot2) = (vec![], vec![]);
    for f in 0..frames {
        let own = pcm.narrow(2, f * frame, frame)?;
        if f < joins {
            slot0.push(mimi.encode_step(&own, &mut enc, &[true])?);
            continue;
        }
        let joined = pcm.narrow(2, (f - joins) * frame, frame)?;
        let xs = Tensor::cat(&[&own, &own.zeros_like()?, &joined], 0)?;
        let codes = mimi.encode_step(&xs, &mut enc, &[true, false, true])?;
        slot0.push(codes.narrow(0, 0, 1)?);
        slot2.push(codes.narrow(0, 2, 1)?);
    }
    assert_codes("slot 0", &Tensor::cat(&slot0, 0)?.t()?, &want, None);
    assert_codes(
        "slot 2, joined late",
        &Tensor::cat(&slot2, 0)?.t()?,
        &want.narrow(1, 0, frames - joins)?,
        None,
    );
    Ok(())
}

#[test]
fn reset_all_twice_gives_the_same_result() -> Result<()> {
    let p = parity();
    let mimi = tiny(RingPositions::PersonaPlex);
    let frame = mimi.frame_samples();
    let pcm = get(&p, "pcm_in");
    let frames = pcm.dim(2)? / frame;
    let mut enc = mimi.encoder_state(1)?;
    let mut dec = mimi.decoder_state(1)?;
    let mut runs = vec![];
    for _ in 0..3 {
        enc.reset_all()?;
        dec.reset_all()?;
        let (mut codes, mut out) = (vec![], vec![]);
        for f in 0..frames {
            let c = mimi.encode_step(&pcm.narrow(2, f * frame, frame)?, &mut enc, &[true])?;
            out.push(mimi.decode_step(&c, &mut dec, &[true])?);
            codes.push(c);
        }
        runs.push((Tensor::cat(&codes, 0)?.t()?, Tensor::cat(&out, 2)?));
    }
    assert_codes("first run", &runs[0].0, &get(&p, "codes_stream_pp"), None);
    for (i, run) in runs.iter().enumerate().skip(1) {
        assert_codes(&format!("run {i} codes"), &run.0, &runs[0].0, None);
        assert_close(&format!("run {i} pcm"), &run.1, &runs[0].1, 0.0);
    }
    Ok(())
}

#[test]
fn bad_inputs_are_errors() -> Result<()> {
    let mimi = tiny(RingPositions::PersonaPlex);
    let mut enc = mimi.encoder_state(2)?;
    let short = Tensor::zeros((2, 1, 960), DType::F32, &Device::Cpu)?;
    assert!(mimi.encode_step(&short, &mut enc, &[true, true]).is_err());
    let pcm = Tensor::zeros((2, 1, 1920), DType::F32, &Device::Cpu)?;
    assert!(mimi.encode_step(&pcm, &mut enc, &[true]).is_err());
    assert!(enc.reset_slot(2).is_err());
    let mut dec = mimi.decoder_state(1)?;
    let bad = Tensor::new(&[[64u32, 0, 0, 0, 0, 0, 0, 0]], &Device::Cpu)?;
    assert!(mimi.decode_step(&bad, &mut dec, &[true]).is_err());
    let few = Tensor::new(&[[1u32, 2]], &Device::Cpu)?;
    assert!(mimi.decode_step(&few, &mut dec, &[true]).is_err());
    Ok(())
}

/// Writes the tiny checkpoint with `edit` applied to a temporary file.
fn edited_checkpoint(tag: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let mut tensors = candle_core::safetensors::load(tiny_weights(), &Device::Cpu).unwrap();
    edit(&mut tensors);
    let dir = std::env::temp_dir().join(format!("duplex-mimi-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mimi.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

#[test]
fn a_missing_tensor_is_named() {
    let name = "encoder_transformer.transformer.layers.1.linear2.weight";
    let path = edited_checkpoint("missing", |t| {
        t.remove(name);
    });
    let err = load(&path, RingPositions::PersonaPlex)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(name) && err.contains("mimi.safetensors"),
        "{err}"
    );
}

#[test]
fn a_wrong_shape_is_named_with_both_shapes() {
    let name = "quantizer.rvq_rest.vq.layers.3._codebook.embedding_sum";
    let path = edited_checkpoint("shape", |t| {
        t.insert(
            name.into(),
            Tensor::zeros((64, 8), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = load(&path, RingPositions::PersonaPlex)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(name) && err.contains("[64, 8]") && err.contains("[64, 16]"),
        "{err}"
    );
}

/// Files saved from PyPI moshi's modules spell the attention weights `in_projs.0.weight`.
#[test]
fn pypi_attention_names_load_too() -> Result<()> {
    let path = edited_checkpoint("pypi", |t| {
        let names: Vec<String> = t.keys().cloned().collect();
        for name in names {
            let renamed = name
                .replace(".self_attn.in_proj_weight", ".self_attn.in_projs.0.weight")
                .replace(
                    ".self_attn.out_proj.weight",
                    ".self_attn.out_projs.0.weight",
                );
            if renamed != name {
                let v = t.remove(&name).unwrap();
                t.insert(renamed, v);
            }
        }
    });
    let p = parity();
    let codes = load(&path, RingPositions::PersonaPlex)?.encode(&get(&p, "pcm_in"))?;
    assert_codes(
        "codes_batch (PyPI names)",
        &codes.squeeze(0)?,
        &get(&p, "codes_batch"),
        None,
    );
    Ok(())
}

/// Full-size Mimi speed on this machine. Needs the random full-size checkpoint written by
/// `tests/reference/bench_mimi.py` (default `/tmp/mimi-random.safetensors`, or `MIMI_BENCH_WEIGHTS`):
/// `cargo test --release --lib model::mimi::tests::bench -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench() -> Result<()> {
    let path = std::env::var("MIMI_BENCH_WEIGHTS")
        .unwrap_or_else(|_| "/tmp/mimi-random.safetensors".into());
    let ckpt = Checkpoint::open(Path::new(&path), DType::F32, &Device::Cpu)?;
    let mimi = Mimi::load(&ckpt, &MimiConfig::v0_1(), RingPositions::PersonaPlex)?;
    let seconds = std::env::var("MIMI_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let result = bench_streaming(&mimi, seconds)?;
    println!(
        "{}",
        serde_json::to_string(&result).expect("plain numbers serialise")
    );
    Ok(())
}
