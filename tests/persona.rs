//! PersonaPlex's system prompt and live frames against the reference run (fixture
//! `persona_greedy`): voice preset, silences, the role prompt, then 40 live frames, greedy.

mod tiny;

use candle_core::{Device, IndexOp, Tensor};
use duplex::model::decode::DecodeAttention;
use duplex::model::generate::{CallInput, Forced, Generator, SamplingConfig, Snapshot};
use duplex::model::kv::RingPositions;
use duplex::model::lm::LmModel;
use duplex::model::persona::{PromptRun, VoicePrompt, prompt_calls, run_prompt};
use duplex::model::pipeline::Prefill;
use duplex::model::quant::KvQuant;
use duplex::model::tokenizer::{TextTokenizer, wrap_system_prompt};
use duplex::model::voice::VoicePreset;
use std::collections::HashMap;

fn reference() -> HashMap<String, Tensor> {
    tiny::load("persona_greedy.safetensors")
}

fn voice() -> VoicePrompt {
    let preset = VoicePreset::load(
        &tiny::fixtures().join("tiny/voices/NATF0.pt"),
        32,
        &Device::Cpu,
    )
    .unwrap();
    VoicePrompt::Preset(Box::new(preset))
}

fn prompt_tokens() -> Vec<u32> {
    let tokenizer =
        TextTokenizer::open(&tiny::fixtures().join("tiny/tokenizer_spm_32k_3.model")).unwrap();
    tokenizer
        .encode(&wrap_system_prompt("You are a wise and friendly teacher."))
        .unwrap()
}

/// The user codes of each live frame. The fixture stores the PersonaPlex run's; the PyPI-ring run
/// encoded the user audio with a PyPI-ring Mimi, whose codes differ after a few frames, so those
/// are read back from its outputs (each output echoes the previous frame's forced user codes).
fn user_codes(fx: &HashMap<String, Tensor>, positions: RingPositions) -> Vec<[i64; 8]> {
    let frame = |t: &Tensor, rows: std::ops::Range<usize>, col: usize| -> [i64; 8] {
        let values: Vec<i64> = t.i((rows, col)).unwrap().to_vec1().unwrap();
        values.try_into().unwrap()
    };
    let frames = fx["user_codes"].dim(1).unwrap();
    match positions {
        RingPositions::PersonaPlex => (0..frames)
            .map(|f| frame(&fx["user_codes"], 0..8, f))
            .collect(),
        RingPositions::Exact => (1..frames)
            .map(|f| frame(&fx["out_tokens"], 9..17, f))
            .collect(),
    }
}

/// Runs the live frames on `slot_idx` and checks tokens (the first `rows` streams) and logits.
fn check_live(
    model: &LmModel,
    generator: &mut Generator,
    slot_idx: usize,
    positions: RingPositions,
    rows: usize,
) {
    generator.record_text_logits(true);
    let fx = reference();
    let suffix = if positions == RingPositions::PersonaPlex {
        "_pp"
    } else {
        ""
    };
    let (tokens, logits) = (
        &fx[&format!("out_tokens{suffix}")],
        &fx[&format!("live_text_logits{suffix}")],
    );
    let mut worst = 0f32;
    for (frame, user) in user_codes(&fx, positions).into_iter().enumerate() {
        let mut inputs = vec![None; generator.batch()];
        inputs[slot_idx] = Some(CallInput::Tokens(Forced {
            user: Some(user),
            ..Default::default()
        }));
        let out = generator
            .step(model, &inputs)
            .unwrap()
            .remove(slot_idx)
            .unwrap();
        let got = out
            .tokens
            .unwrap_or_else(|| panic!("live frame {frame} produced no output"));
        let want: Vec<i64> = tokens.i((.., frame)).unwrap().to_vec1().unwrap();
        assert_eq!(
            &got[..rows],
            &want[..rows],
            "live frame {frame} ({positions:?})"
        );
        let got_logits = Tensor::new(out.text_logits.unwrap().as_slice(), &Device::Cpu).unwrap();
        worst = worst.max(tiny::max_abs_diff(&got_logits, &logits.i(frame).unwrap()));
    }
    eprintln!("{positions:?}: live text logits max |diff| {worst:e}");
    assert!(worst < 1e-4);
}

/// A batch-1 generator with its slot open, greedy, over the model's whole context.
fn opened(model: &LmModel) -> Generator {
    let context = model.config().context;
    let mut generator = Generator::new(model, 1, context, RingPositions::PersonaPlex).unwrap();
    generator.open(0, 0, SamplingConfig::GREEDY);
    generator
}

#[test]
fn the_prompt_tokens_are_the_reference_ones() {
    let expected: Vec<i64> = reference()["prompt_text_tokens"].to_vec1().unwrap();
    let ours: Vec<i64> = prompt_tokens().into_iter().map(i64::from).collect();
    assert_eq!(ours, expected);
}

#[test]
fn prompt_then_live_frames_match_the_reference_with_all_16_depformer_steps() {
    for positions in [RingPositions::PersonaPlex, RingPositions::Exact] {
        let model = tiny::cpu_model(16);
        let mut generator = Generator::new(&model, 1, model.config().context, positions).unwrap();
        generator.open(0, 0, SamplingConfig::GREEDY);
        run_prompt(&model, &mut generator, 0, &voice(), &prompt_tokens()).unwrap();
        let cache: Vec<Vec<i64>> = reference()["cache_after_prompt"].to_vec2().unwrap();
        let ours: Vec<Vec<i64>> = generator
            .slot(0)
            .unwrap()
            .tokens
            .cache()
            .iter()
            .map(|r| r.to_vec())
            .collect();
        assert_eq!(ours, cache, "token ring after the prompt");
        // Every stream of a prompt call is forced once the delays are filled, so those calls
        // skip the depformer; each live call runs it.
        let calls = prompt_calls(&voice(), &prompt_tokens()) as u64;
        let prompt_depformer = generator.depformer_calls();
        assert!(
            prompt_depformer * 10 < calls,
            "{prompt_depformer} of the prompt's {calls} calls ran the depformer"
        );
        // The voice's embeddings in one forward, the silences and the role prompt in another.
        assert_eq!(generator.forced_chunks(), 2, "forwards for {calls} calls");
        check_live(&model, &mut generator, 0, positions, 17);
        let live = user_codes(&reference(), positions).len() as u64;
        assert_eq!(generator.depformer_calls() - prompt_depformer, live);
    }
}

#[test]
fn serving_with_8_depformer_steps_gives_the_same_agent_tokens() {
    let model = tiny::cpu_model(8);
    let mut generator = opened(&model);
    run_prompt(&model, &mut generator, 0, &voice(), &prompt_tokens()).unwrap();
    check_live(&model, &mut generator, 0, RingPositions::PersonaPlex, 17);
}

/// A prefill computed once in a small batch-1 generator and restored into slot 1 of a serving
/// generator gives exactly the same live tokens as running the prompt in place.
#[test]
fn a_restored_prefill_snapshot_continues_exactly() {
    let model = tiny::cpu_model(8);
    let (voice, text) = (voice(), prompt_tokens());
    let mut prefill = Generator::new(
        &model,
        1,
        prompt_calls(&voice, &text) + 1,
        RingPositions::PersonaPlex,
    )
    .unwrap();
    prefill.open(0, 0, SamplingConfig::GREEDY);
    run_prompt(&model, &mut prefill, 0, &voice, &text).unwrap();
    let snapshot: Snapshot = prefill.snapshot(0).unwrap();
    let mut serving = Generator::new(
        &model,
        2,
        model.config().context,
        RingPositions::PersonaPlex,
    )
    .unwrap();
    serving.open(0, 5, SamplingConfig::DEFAULT);
    serving
        .restore(1, &snapshot, 0, SamplingConfig::GREEDY)
        .unwrap();
    check_live(&model, &mut serving, 1, RingPositions::PersonaPlex, 17);
}

/// How `live_text_logits` runs the system prompt.
#[derive(Clone, Copy, PartialEq)]
enum Prompt {
    /// A temporal forward per call (as the reference does).
    CallByCall,
    /// As many calls a forward as fit (`Generator::run_forced`), as serving does.
    InChunks,
}

/// A generator whose slot 0 has run the persona prompt as `prompt` says, attending as `decode`
/// says.
fn prompted(model: &LmModel, decode: DecodeAttention, prompt: Prompt) -> Generator {
    let (voice, text) = (voice(), prompt_tokens());
    let mut generator = opened(model);
    generator.set_decode_attention(decode);
    // Calls that record their logits run one at a time.
    generator.record_text_logits(prompt == Prompt::CallByCall);
    run_prompt(model, &mut generator, 0, &voice, &text).unwrap();
    let chunks = generator.forced_chunks();
    match prompt {
        Prompt::CallByCall => assert_eq!(chunks, 0),
        Prompt::InChunks => assert!((1..=2).contains(&chunks), "{chunks} forwards"),
    }
    generator
}

/// The text logits of the reference's live frames on slot 0 of `generator`.
fn live_logits(model: &LmModel, generator: &mut Generator) -> Vec<Vec<f32>> {
    generator.record_text_logits(true);
    user_codes(&reference(), RingPositions::PersonaPlex)
        .into_iter()
        .map(|user| {
            let input = CallInput::Tokens(Forced {
                user: Some(user),
                ..Default::default()
            });
            generator
                .step(model, &[Some(input)])
                .unwrap()
                .remove(0)
                .unwrap()
                .text_logits
                .unwrap()
        })
        .collect()
}

/// The text logits of the reference's live frames after the persona prompt, with the persona
/// pinned or not, attending as `decode` says.
fn live_text_logits(
    model: &LmModel,
    pin: bool,
    decode: DecodeAttention,
    prompt: Prompt,
) -> Vec<Vec<f32>> {
    let mut generator = prompted(model, decode, prompt);
    if pin {
        generator.pin_prefix(0).unwrap();
    }
    live_logits(model, &mut generator)
}

/// With the persona pinned, nothing changes until the window would slide past the prompt; after
/// that the prompt stays in attention, so the model's outputs differ from the reference's.
#[test]
fn pinning_the_persona_changes_nothing_until_the_window_slides() {
    let model = tiny::cpu_model(8);
    let run =
        |pin: bool| live_text_logits(&model, pin, DecodeAttention::Composed, Prompt::InChunks);
    let (plain, pinned) = (run(false), run(true));
    // The prompt fills 37 of the 40 positions; PersonaPlex's ring drops its oldest key once it
    // holds 40, so the first 2 live frames see all of the prompt either way.
    assert!(
        plain[..2] == pinned[..2],
        "pinning changed frames before the window slid"
    );
    assert!(
        plain[2..].iter().zip(&pinned[2..]).any(|(a, b)| a != b),
        "pinning had no effect"
    );
}

/// A pinned persona seen through the attention kernels' CPU references (the query turned back
/// to meet the prefix where it is stored) gives the composed path's logits (the prefix keys
/// turned forward), frame by frame as the window slides.
#[test]
fn a_pinned_persona_through_the_kernels_references_matches_the_composed_path() {
    let model = tiny::cpu_model(8);
    let composed = live_text_logits(&model, true, DecodeAttention::Composed, Prompt::InChunks);
    let kernels = live_text_logits(&model, true, DecodeAttention::Kernels, Prompt::InChunks);
    assert!(composed.len() > 2, "the window must slide past the prompt");
    assert_close(&composed, &kernels, 1e-4);
}

fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>], bound: f32) {
    assert_eq!(a.len(), b.len());
    let mut worst = 0f32;
    for (frame, (a, b)) in a.iter().zip(b).enumerate() {
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < bound, "frame {frame}: max |diff| {diff}");
        worst = worst.max(diff);
    }
    eprintln!("max |diff| over {} frames: {worst:e}", a.len());
}

/// A prompt whose calls go through the temporal transformer together leaves the token ring
/// (with what was forced where, and the call count), the sampler's counter and the keys and
/// values that one call at a time leaves, through the composed attention and the kernels'
/// references alike: every live frame after it gives the same logits.
#[test]
fn a_prompt_in_chunks_leaves_what_one_call_at_a_time_leaves() {
    let model = tiny::cpu_model(8);
    for decode in [DecodeAttention::Composed, DecodeAttention::Kernels] {
        let mut by_call = prompted(&model, decode, Prompt::CallByCall);
        let mut chunked = prompted(&model, decode, Prompt::InChunks);
        let (a, b) = (by_call.slot(0).unwrap(), chunked.slot(0).unwrap());
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.sampler.counter(), b.sampler.counter());
        let by_call = live_logits(&model, &mut by_call);
        assert_close(&by_call, &live_logits(&model, &mut chunked), 1e-5);
    }
}

/// With int8 keys and values (which a step writes one token at a time) a prompt runs in
/// chunks over a dense ring of its own and is quantised once it is done, as `Pipeline`'s
/// prefill does: live frames after it stay as close to the unquantised run as those after a
/// prompt run a call at a time on the int8 ring.
#[test]
fn an_int8_ring_takes_a_prompt_run_in_chunks_over_a_dense_one() {
    let dense_model = tiny::cpu_model(8);
    let dense = live_text_logits(
        &dense_model,
        false,
        DecodeAttention::Composed,
        Prompt::InChunks,
    );
    let mut model = tiny::cpu_model(8);
    model.set_kv_quant(KvQuant::Int8);
    let (voice, text) = (voice(), prompt_tokens());
    let context = model.config().context;
    let mut by_call = opened(&model);
    run_prompt(&model, &mut by_call, 0, &voice, &text).unwrap();
    assert_eq!(by_call.forced_chunks(), 0, "an int8 ring takes no chunks");
    // As the server prefills (`Pipeline::start_prefill`).
    let mut prefill = Prefill::new(&model, RingPositions::PersonaPlex, &voice, &text).unwrap();
    let snapshot = prefill.advance(&model, usize::MAX).unwrap().unwrap();
    assert_eq!(prefill.forced_chunks(), 2);
    let mut chunked = Generator::new(&model, 1, context, RingPositions::PersonaPlex).unwrap();
    chunked
        .restore(0, &snapshot, 0, SamplingConfig::GREEDY)
        .unwrap();
    // The first 30 frames: later ones may draw another token and go their own way.
    let worst = |logits: &[Vec<f32>]| {
        let diffs = logits[..30]
            .iter()
            .zip(&dense)
            .flat_map(|(a, b)| a.iter().zip(b));
        diffs.map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
    };
    let (by_call, chunked) = (
        worst(&live_logits(&model, &mut by_call)),
        worst(&live_logits(&model, &mut chunked)),
    );
    eprintln!(
        "int8 ring vs dense, first 30 live frames' max |diff|: prompt by call {by_call:e}, in \
         chunks {chunked:e}"
    );
    assert!(chunked > 0.0, "the int8 ring changed nothing");
    assert!(chunked <= 1.5 * by_call, "{chunked} vs {by_call}");
}

/// A prompt advanced a few calls at a time (as a server does between frames) makes exactly
/// that many calls each time and ends where one run at once does.
#[test]
fn a_prompt_advanced_five_calls_at_a_time_ends_where_one_run_does() {
    let model = tiny::cpu_model(8);
    let (voice, text) = (voice(), prompt_tokens());
    let mut whole = opened(&model);
    run_prompt(&model, &mut whole, 0, &voice, &text).unwrap();
    let mut stepped = opened(&model);
    let mut run = PromptRun::new(model.config(), 0, &voice, &text).unwrap();
    // The voice's first embedding also takes the generator's first, model-free call.
    let calls = prompt_calls(&voice, &text) as u64 - 1;
    let mut advances = 0;
    loop {
        let before = stepped.slot(0).unwrap().tokens.offset();
        let done = run.advance(&model, &mut stepped, 5).unwrap();
        let made = stepped.slot(0).unwrap().tokens.offset() - before - u64::from(before == 0);
        advances += 1;
        if done {
            assert!(made <= 5);
            break;
        }
        assert_eq!(made, 5, "advance {advances}");
    }
    assert_eq!(advances, calls.div_ceil(5));
    assert!(stepped.forced_chunks() >= advances, "chunks of 5 calls");
    assert_eq!(
        stepped.slot(0).unwrap().tokens,
        whole.slot(0).unwrap().tokens
    );
    let live = |generator: &mut Generator| {
        generator.record_text_logits(true);
        user_codes(&reference(), RingPositions::PersonaPlex)
            .into_iter()
            .take(5)
            .map(|user| {
                let input = CallInput::Tokens(Forced {
                    user: Some(user),
                    ..Default::default()
                });
                let out = generator.step(&model, &[Some(input)]).unwrap();
                out[0].as_ref().unwrap().text_logits.clone().unwrap()
            })
            .collect::<Vec<_>>()
    };
    assert_close(&live(&mut stepped), &live(&mut whole), 1e-5);
}

/// Voice presets are read once, when the model loads: a join parses no `.pt` file on the step
/// thread, and a preset file removed after loading still serves its voice.
#[test]
fn voice_presets_are_read_once_at_load() {
    use duplex::model::files::ModelFiles;
    use duplex::model::pipeline::{Pipeline, PipelineConfig};
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("voices-read-once-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("voices")).unwrap();
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    for voice in ["NATF0", "NATM0"] {
        let file = format!("voices/{voice}.pt");
        std::fs::copy(source.join(&file), dir.join(&file)).unwrap();
    }
    let files = ModelFiles::in_dir(&dir).unwrap();
    let pipeline = Pipeline::load(&files, &PipelineConfig::default()).unwrap();
    std::fs::remove_dir_all(dir.join("voices")).unwrap();
    let VoicePrompt::Preset(preset) = pipeline.voice_preset("NATF0").unwrap() else {
        panic!("NATF0 is a preset");
    };
    let VoicePrompt::Preset(expected) = voice() else {
        unreachable!()
    };
    assert_eq!(preset.cache, expected.cache);
    assert_eq!(
        preset.embeddings.dims(),
        expected.embeddings.dims(),
        "the preset read at load"
    );
    assert!(pipeline.voice_preset("NOBODY").is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
