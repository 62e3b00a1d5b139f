//! The language model on the GPU against the PyTorch fixtures the CPU model already matches:
//! teacher-forced logits and greedy token streams of the tiny checkpoint, in f32 and bf16.
//! Built only with `--features cuda`; without a GPU each test says so and returns.
#![cfg(feature = "cuda")]

mod tiny;

use candle_core::{DType, Device, IndexOp, Tensor};
use duplex::model::checkpoint::Checkpoint;
use duplex::model::config::LmConfig;
use duplex::model::decode::DecodeAttention;
use duplex::model::generate::{CallInput, Forced, Generator, SamplingConfig};
use duplex::model::kv::RingPositions;
use duplex::model::lm::{Column, LmModel};
use duplex::model::quant::{KvQuant, Quant};

fn column(tokens: &Tensor, step: usize) -> Column {
    let values: Vec<i64> = tokens.i((.., step)).unwrap().to_vec1().unwrap();
    values.try_into().unwrap()
}

/// Worst text-logit difference against the fixture over the teacher-forced sequence, the
/// temporal transformer attending through `decode` over a ring stored as `kv` says.
fn teacher_forced_logit_error(
    dtype: DType,
    device: &Device,
    decode: DecodeAttention,
    kv: KvQuant,
) -> f32 {
    let fx = tiny::load("lm_parity.safetensors");
    let mut model = tiny::model(16, dtype, device, Quant::None);
    model.set_kv_quant(kv);
    let positions = RingPositions::PersonaPlex;
    let mut state = model
        .transformer_state(1, model.config().context, positions)
        .unwrap();
    state.set_decode(decode);
    let mut worst = 0f32;
    for step in 0..fx["input_tokens"].dim(1).unwrap() {
        let emb = model
            .embed_columns(&[column(&fx["input_tokens"], step)])
            .unwrap();
        let (_, logits) = model.temporal(&emb, &mut state, &[true]).unwrap();
        worst = worst.max(tiny::max_abs_diff(
            &logits,
            &fx["text_logits_pp"].i(step).unwrap(),
        ));
    }
    worst
}

#[test]
fn teacher_forced_logits_on_the_gpu_match_the_reference() {
    let Some(gpu) = tiny::gpu() else { return };
    let error = |dtype, decode, kv| teacher_forced_logit_error(dtype, &gpu, decode, kv);
    let f32_error = error(DType::F32, DecodeAttention::Composed, KvQuant::None);
    let bf16_error = error(DType::BF16, DecodeAttention::Composed, KvQuant::None);
    // bf16 through kernels/attention.cu (RoPE + ring write, attention over the filled ring).
    let kernels_error = error(DType::BF16, DecodeAttention::Kernels, KvQuant::None);
    // The same over an int8 ring (rope_kv_write_int8, ring_attention_part_int8).
    let int8_kv_error = error(DType::BF16, DecodeAttention::Kernels, KvQuant::Int8);
    eprintln!(
        "text logits on the GPU, max |diff| vs PyTorch: f32 {f32_error:e}, bf16 {bf16_error:e}, \
         bf16 through the attention kernels {kernels_error:e}, with int8 keys and values \
         {int8_kv_error:e}"
    );
    assert!(f32_error < 1e-3, "f32 logits differ by {f32_error}");
    // bf16 rounds weights and activations to 8 bits of mantissa: allow 5% of the largest logit.
    let largest = tiny::largest_abs(&tiny::load("lm_parity.safetensors")["text_logits_pp"]);
    for (what, error) in [
        ("bf16", bf16_error),
        ("bf16 kernels", kernels_error),
        ("bf16 kernels, int8 keys and values", int8_kv_error),
    ] {
        assert!(
            error < 0.05 * largest,
            "{what} logits differ by {error} (largest logit {largest})"
        );
    }
}

#[test]
fn greedy_tokens_on_the_gpu_match_the_reference() {
    let Some(gpu) = tiny::gpu() else { return };
    let fx = tiny::load("lm_greedy.safetensors");
    let model = tiny::model(8, DType::F32, &gpu, Quant::None);
    let positions = RingPositions::PersonaPlex;
    let mut generator = Generator::new(&model, 1, model.config().context, positions).unwrap();
    generator.open(0, 0, SamplingConfig::GREEDY);
    let valid: Vec<i64> = fx["out_valid"].to_vec1().unwrap();
    let mut compared = 0;
    for frame in 0..fx["user_codes"].dim(1).unwrap() {
        let user: Vec<i64> = fx["user_codes"].i((.., frame)).unwrap().to_vec1().unwrap();
        let input = CallInput::Tokens(Forced {
            user: Some(user.try_into().unwrap()),
            ..Default::default()
        });
        let out = generator
            .step(&model, &[Some(input)])
            .unwrap()
            .remove(0)
            .unwrap();
        // Our call `frame` is the reference's call `frame - 1` (see tests/lm_parity.rs).
        let Some(call) = frame.checked_sub(1).filter(|&call| valid[call] != 0) else {
            continue;
        };
        let tokens = out.tokens.expect("output once the reference has one");
        let want: Vec<i64> = fx["out_tokens_pp"]
            .i((.., call))
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(&tokens[..9], want.as_slice(), "frame {frame}");
        compared += 1;
    }
    assert!(compared >= 45, "compared {compared} frames");
}

#[test]
fn a_batch_of_three_steps_and_resets_slots_on_the_gpu() {
    use duplex::model::mimi::{Mimi, MimiConfig};
    use duplex::model::pipeline::{Models, PipelineState};
    let Some(gpu) = tiny::gpu() else { return };
    // Random weights at Mimi's real codebook size (the tiny fixture's is smaller).
    let cfg = LmConfig::preset("mid").unwrap();
    let lm = LmModel::load(&Checkpoint::random("mid", DType::BF16, &gpu), &cfg, 8).unwrap();
    let mimi_ckpt = Checkpoint::random("mimi", DType::F32, &gpu);
    let mimi = Mimi::load(&mimi_ckpt, &MimiConfig::v0_1(), RingPositions::PersonaPlex).unwrap();
    let models = Models {
        lm: &lm,
        mimi: &mimi,
    };
    let batch = 3;
    let mut state = PipelineState::new(models, batch, RingPositions::PersonaPlex).unwrap();
    for slot in 0..batch {
        state
            .open_fresh(slot, slot as u64, SamplingConfig::DEFAULT)
            .unwrap();
    }
    let frame = duplex::audio::FRAME_SAMPLES;
    let input: Vec<f32> = (0..batch * frame)
        .map(|i| (i as f32 * 0.01).sin() * 0.3)
        .collect();
    let mut output = vec![0f32; batch * frame];
    for step in 0..6 {
        if step == 3 {
            state.open_fresh(1, 7, SamplingConfig::DEFAULT).unwrap();
        }
        let active = [true, step % 2 == 0, true];
        state
            .step(models, &input, &active, &mut output, &mut |_| {})
            .unwrap();
        assert!(output.iter().all(|v| v.is_finite()), "step {step}");
    }
}

/// The tokens of each slot, frame by frame.
type SlotFrames = Vec<Vec<Option<Column>>>;

/// Runs `frames` frames of the fixture's user codes through a 4-slot generator (slot 0 greedy,
/// slots 1 and 3 seeded top-k, slot 2 never opened), with CUDA graphs or eagerly, feeding the
/// slots `busy(frame)` marks; returns each frame's tokens and the generator, to ask what it
/// replayed.
fn four_slot_frames(
    model: &LmModel,
    graphs: bool,
    frames: usize,
    busy: impl Fn(usize) -> [bool; 4],
) -> (SlotFrames, Generator) {
    let fx = tiny::load("lm_greedy.safetensors");
    let mut generator =
        Generator::new(model, 4, model.config().context, RingPositions::PersonaPlex).unwrap();
    if graphs {
        generator.use_cuda_graphs(model).unwrap();
    }
    generator.open(0, 0, SamplingConfig::GREEDY);
    generator.open(1, 11, SamplingConfig::DEFAULT);
    generator.open(3, 12, SamplingConfig::DEFAULT);
    let recorded = fx["user_codes"].dim(1).unwrap();
    let mut tokens = Vec::new();
    for frame in 0..frames {
        let user: Vec<i64> = fx["user_codes"]
            .i((.., frame % recorded))
            .unwrap()
            .to_vec1()
            .unwrap();
        let input = CallInput::Tokens(Forced {
            user: Some(user.try_into().unwrap()),
            ..Default::default()
        });
        let inputs = busy(frame).map(|busy| busy.then(|| input.clone()));
        let out = generator.step(model, &inputs).unwrap();
        tokens.push(out.into_iter().map(|o| o.and_then(|o| o.tokens)).collect());
    }
    (tokens, generator)
}

/// Both halves of a frame replayed as CUDA graphs (the temporal step, its attention then over
/// the whole ring, and the depformer half) give, frame for frame, the tokens the eager path
/// gives: 50 frames of three busy slots and an idle one between them (greedy, and two seeded
/// top-k samplers), on the tiny checkpoint in bf16 and on random mid-size weights in int8
/// (w8a16 needs widths of 16s), and on the tiny checkpoint with int8 keys and values.
#[test]
fn fifty_replayed_frames_equal_fifty_eager_frames() {
    // The captures log why a graph was refused.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let Some(gpu) = tiny::gpu() else { return };
    let mid = LmConfig::preset("mid").unwrap();
    let mut int8_ring = tiny::model(8, DType::BF16, &gpu, Quant::None);
    int8_ring.set_kv_quant(KvQuant::Int8);
    let models = [
        ("tiny bf16", tiny::model(8, DType::BF16, &gpu, Quant::None)),
        ("tiny bf16, int8 keys and values", int8_ring),
        (
            "mid int8",
            LmModel::load_quantized(
                &Checkpoint::random("mid", DType::BF16, &gpu),
                &mid,
                8,
                Quant::Int8,
            )
            .unwrap(),
        ),
    ];
    for (name, model) in &models {
        let run = |graphs: bool| {
            let (tokens, generator) =
                four_slot_frames(model, graphs, 50, |_| [true, true, false, true]);
            let replaying = [
                generator.replays_temporal_graph(),
                generator.replays_cuda_graph(),
            ];
            (tokens, replaying)
        };
        let (eager, _) = run(false);
        let (replayed, [temporal, depformer]) = run(true);
        assert!(
            temporal && depformer,
            "{name}: a graph was not captured (temporal {temporal}, depformer {depformer}; see \
             the log)"
        );
        for (frame, (e, r)) in eager.iter().zip(&replayed).enumerate() {
            assert_eq!(e, r, "{name}: frame {frame}");
        }
    }
}

/// Graphs of three row buckets, each captured once and replayed after the others: frames go
/// from one busy slot (1 row) to two (2 rows) to three with slot 3 busy (4 rows), then back to
/// one. With 16 depformer steps the three buckets turn over the depformer ring's memo of index
/// tensors, so a graph that did not own the ones it reads would replay over freed memory. The
/// tokens equal the eager run's, frame for frame.
#[test]
fn graphs_of_three_row_buckets_replay_the_eager_tokens_after_each_other() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let Some(gpu) = tiny::gpu() else { return };
    let model = tiny::model(16, DType::BF16, &gpu, Quant::None);
    let busy_slots = |frame: usize| match frame / 10 {
        1 => [true, true, false, false],
        2 => [true, true, false, true],
        _ => [true, false, false, false],
    };
    let run = |graphs: bool| {
        let (tokens, generator) = four_slot_frames(&model, graphs, 40, busy_slots);
        (tokens, generator.replays_cuda_graph())
    };
    let (eager, _) = run(false);
    let (replayed, depformer) = run(true);
    assert!(
        depformer,
        "the depformer graph was not captured (see the log)"
    );
    for (frame, (e, r)) in eager.iter().zip(&replayed).enumerate() {
        assert_eq!(e, r, "frame {frame}, busy slots {:?}", busy_slots(frame));
    }
}

/// Mimi's encode and decode replayed as CUDA graphs give the eager codes and audio, frame by
/// frame: one slot alone (a 1-row graph), then two (a 2-row graph), the second sitting frames
/// out and then reset.
#[test]
fn mimi_graphs_replay_the_eager_stream() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let Some(gpu) = tiny::gpu() else { return };
    let mimi = tiny::mimi(&gpu);
    let frame = mimi.frame_samples();
    let pcm = tiny::load("mimi_parity.safetensors")["pcm_in"]
        .to_device(&gpu)
        .unwrap();
    let other = (pcm.flip(&[2]).unwrap() * 0.7).unwrap();
    let frames = pcm.dim(2).unwrap() / frame;
    let (alone, idle, reset_at) = (4, 8..11, 13);
    let run = |graphs: bool| {
        let mut enc = mimi.encoder_state(2).unwrap();
        let mut dec = mimi.decoder_state(2).unwrap();
        if graphs {
            enc.use_cuda_graphs(&mimi).unwrap();
            dec.use_cuda_graphs(&mimi).unwrap();
        }
        let mut out = Vec::new();
        for f in 0..frames {
            if f == reset_at {
                enc.reset_slot(1).unwrap();
                dec.reset_slot(1).unwrap();
            }
            let own = pcm.narrow(2, f * frame, frame).unwrap();
            let (xs, active) = if f < alone {
                (own, vec![true])
            } else {
                let theirs = other.narrow(2, f * frame, frame).unwrap();
                let xs = Tensor::cat(&[&own, &theirs], 0).unwrap();
                (xs, vec![true, !idle.contains(&f)])
            };
            let codes = mimi.encode_step(&xs, &mut enc, &active).unwrap();
            let audio = mimi.decode_step(&codes, &mut dec, &active).unwrap();
            let codes: Vec<Vec<u32>> = codes.to_vec2().unwrap();
            out.push((codes, audio));
        }
        let replaying = (enc.replays_cuda_graph(), dec.replays_cuda_graph());
        (out, replaying)
    };
    let (eager, _) = run(false);
    let (replayed, (encode, decode)) = run(true);
    assert!(
        encode && decode,
        "a Mimi graph was not captured (encode {encode}, decode {decode}; see the log)"
    );
    for (f, ((eager_codes, eager_audio), (codes, audio))) in eager.iter().zip(&replayed).enumerate()
    {
        let active = if f < alone {
            vec![true]
        } else {
            vec![true, !idle.contains(&f)]
        };
        for (slot, &is_active) in active.iter().enumerate() {
            if !is_active {
                continue;
            }
            assert_eq!(
                eager_codes[slot], codes[slot],
                "codes of slot {slot}, frame {f}"
            );
            let diff = tiny::max_abs_diff(
                &eager_audio.narrow(0, slot, 1).unwrap(),
                &audio.narrow(0, slot, 1).unwrap(),
            );
            assert!(
                diff < 1e-4,
                "audio of slot {slot}, frame {f}: max |diff| {diff}"
            );
        }
    }
}

/// The whole offline path (Mimi, voice preset, role prompt, 40 live frames, Mimi back) on the
/// GPU in f32 gives the reference's greedy tokens, as it does on the CPU (tests/offline.rs).
#[test]
fn an_offline_persona_run_on_the_gpu_gives_the_reference_tokens() {
    use duplex::model::pipeline::PipelineConfig;
    use duplex::offline::run;
    let Some(gpu) = tiny::gpu() else { return };
    let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("gpu-offline");
    std::fs::create_dir_all(&out).unwrap();
    let pipeline = PipelineConfig {
        device: gpu,
        dtype: DType::F32,
        positions: RingPositions::PersonaPlex,
        ..Default::default()
    };
    let report = run(&tiny::persona_offline(&out, pipeline)).unwrap();
    tiny::assert_reference_persona_tokens(&report);
}

/// The serving path in bf16 with CUDA graphs (the default on a GPU: the prefilled persona,
/// Mimi both ways, 40 live frames, every piece replayed) draws the same tokens and speaks the
/// same audio as with every frame eager.
#[test]
fn an_offline_bf16_run_replays_graphs_with_the_eager_tokens() {
    use duplex::model::pipeline::PipelineConfig;
    use duplex::offline::run;
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let Some(gpu) = tiny::gpu() else { return };
    let tokens = |cuda_graphs: bool| {
        let out = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("gpu-offline-bf16-{cuda_graphs}"));
        std::fs::create_dir_all(&out).unwrap();
        let pipeline = PipelineConfig {
            device: gpu.clone(),
            dtype: DType::BF16,
            positions: RingPositions::PersonaPlex,
            cuda_graphs,
            ..Default::default()
        };
        let report = run(&tiny::persona_offline(&out, pipeline)).unwrap();
        assert_eq!(report.graphs_replayed, cuda_graphs, "see the log");
        let tokens: Vec<_> = report.frames.iter().map(|f| (f.text_id, f.agent)).collect();
        (tokens, report.agent_pcm)
    };
    let ((eager, eager_pcm), (replayed, replayed_pcm)) = (tokens(false), tokens(true));
    assert_eq!(eager.len(), 40);
    assert_eq!(eager, replayed);
    let diff = eager_pcm
        .iter()
        .zip(&replayed_pcm)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert_eq!(eager_pcm.len(), replayed_pcm.len());
    assert!(diff < 1e-3, "agent audio: max |diff| {diff}");
}

/// A system prompt's calls run together (`Generator::run_forced`: one temporal forward over
/// many positions, through candle's attention and cuBLAS) leave, in bf16 on the GPU, the keys
/// and values that one call at a time (the attention kernels) leaves: live frames after it,
/// every stream forced so both runs read the same tokens, give the same text logits within
/// bf16's rounding.
#[test]
fn a_prompt_in_chunks_on_the_gpu_leaves_what_one_call_at_a_time_leaves() {
    use duplex::model::persona::{VoicePrompt, run_prompt};
    use duplex::model::tokenizer::{TextTokenizer, wrap_system_prompt};
    use duplex::model::voice::VoicePreset;
    let Some(gpu) = tiny::gpu() else { return };
    let model = tiny::model(8, DType::BF16, &gpu, Quant::None);
    let preset = VoicePreset::load(&tiny::fixtures().join("tiny/voices/NATF0.pt"), 32, &gpu);
    let voice = VoicePrompt::Preset(Box::new(preset.unwrap()));
    let text = TextTokenizer::open(&tiny::fixtures().join("tiny/tokenizer_spm_32k_3.model"))
        .unwrap()
        .encode(&wrap_system_prompt("You are a wise and friendly teacher."))
        .unwrap();
    let live_logits = |in_chunks: bool| -> Vec<Tensor> {
        let context = model.config().context;
        let mut generator = Generator::new(&model, 1, context, RingPositions::PersonaPlex).unwrap();
        // Calls that record their logits run one at a time.
        generator.record_text_logits(!in_chunks);
        generator.open(0, 0, SamplingConfig::GREEDY);
        run_prompt(&model, &mut generator, 0, &voice, &text).unwrap();
        assert_eq!(generator.forced_chunks() > 0, in_chunks);
        generator.record_text_logits(true);
        (0..2i64)
            .map(|frame| {
                let codes =
                    |offset: i64| std::array::from_fn(|q| (frame * 5 + q as i64 + offset) % 16);
                let input = CallInput::Tokens(Forced {
                    text: Some(3),
                    agent: Some(codes(0)),
                    user: Some(codes(7)),
                });
                let out = generator.step(&model, &[Some(input)]).unwrap();
                let logits = out[0].as_ref().unwrap().text_logits.clone().unwrap();
                Tensor::new(logits.as_slice(), &Device::Cpu).unwrap()
            })
            .collect()
    };
    let (by_call, chunked) = (live_logits(false), live_logits(true));
    for (frame, (a, b)) in by_call.iter().zip(&chunked).enumerate() {
        let (diff, largest) = (tiny::max_abs_diff(a, b), tiny::largest_abs(a));
        eprintln!("live frame {frame}: text logits max |diff| {diff:e} of {largest:e}");
        assert!(diff < 0.05 * largest, "frame {frame}: {diff} of {largest}");
    }
}
