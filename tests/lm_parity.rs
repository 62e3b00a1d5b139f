//! The language model against the PyTorch reference (fixtures from tests/reference): teacher-
//! forced temporal logits, depformer logits with forced tokens, greedy token streams.

mod tiny;

use candle_core::{Device, IndexOp, Tensor};
use duplex::model::decode::DecodeAttention;
use duplex::model::depformer::TokenFeed;
use duplex::model::generate::{CallInput, Forced, Generator, SamplingConfig};
use duplex::model::kv::RingPositions;
use duplex::model::lm::Column;

fn column(tokens: &Tensor, step: usize) -> Column {
    let values: Vec<i64> = tokens.i((.., step)).unwrap().to_vec1().unwrap();
    values.try_into().unwrap()
}

fn teacher_forced(positions: RingPositions, hidden_key: &str, logits_key: &str) {
    let fx = tiny::load("lm_parity.safetensors");
    let model = tiny::cpu_model(16);
    let mut state = model
        .transformer_state(1, model.config().context, positions)
        .unwrap();
    let steps = fx["input_tokens"].dim(1).unwrap();
    let (mut worst_hidden, mut worst_logits, mut worst_emb) = (0f32, 0f32, 0f32);
    for step in 0..steps {
        let emb = model
            .embed_columns(&[column(&fx["input_tokens"], step)])
            .unwrap();
        worst_emb = worst_emb.max(tiny::max_abs_diff(&emb, &fx["emb_sum"].i(step).unwrap()));
        let (hidden, logits) = model.temporal(&emb, &mut state, &[true]).unwrap();
        worst_hidden = worst_hidden.max(tiny::max_abs_diff(
            &hidden,
            &fx[hidden_key].i(step).unwrap(),
        ));
        worst_logits = worst_logits.max(tiny::max_abs_diff(
            &logits,
            &fx[logits_key].i(step).unwrap(),
        ));
    }
    eprintln!(
        "{positions:?}: max |diff| embedding {worst_emb:e}, hidden {worst_hidden:e}, text logits {worst_logits:e}"
    );
    assert!(worst_emb < 1e-5 && worst_hidden < 1e-4 && worst_logits < 1e-4);
}

#[test]
fn temporal_logits_match_with_personaplex_ring_positions() {
    teacher_forced(
        RingPositions::PersonaPlex,
        "temporal_hidden_pp",
        "text_logits_pp",
    );
}

#[test]
fn temporal_logits_match_with_exact_ring_positions() {
    teacher_forced(RingPositions::Exact, "temporal_hidden", "text_logits");
}

#[test]
fn depformer_logits_match_with_forced_tokens() {
    let fx = tiny::load("lm_parity.safetensors");
    let model = tiny::cpu_model(16);
    let steps: Vec<i64> = fx["dep_steps"].to_vec1().unwrap();
    let text: Vec<i64> = fx["dep_text_token"].to_vec1().unwrap();
    let forced: Vec<Vec<i64>> = fx["dep_forced_tokens"].to_vec2().unwrap();
    let mut worst = 0f32;
    for positions in [RingPositions::Exact, RingPositions::PersonaPlex] {
        let mut state = model.depformer_state(1, positions).unwrap();
        for (idx, &step) in steps.iter().enumerate() {
            let hidden = fx["temporal_hidden"]
                .i(step as usize)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            state.reset();
            let mut prev = text[idx];
            for (k, &forced_token) in forced[idx].iter().enumerate() {
                let logits = model
                    .depformer_step(
                        k,
                        &hidden,
                        &TokenFeed::from_host(&[prev], &Device::Cpu).unwrap(),
                        &mut state,
                        &[true],
                    )
                    .unwrap();
                let expected = match (positions, k) {
                    (RingPositions::PersonaPlex, 15) => fx["dep_logits_pp_last"].i(idx).unwrap(),
                    _ => fx["dep_logits"].i((idx, k)).unwrap(),
                };
                worst = worst.max(tiny::max_abs_diff(&logits, &expected));
                prev = forced_token;
            }
        }
    }
    eprintln!("depformer: max |diff| {worst:e}");
    assert!(worst < 1e-4);
}

fn user_frame(codes: &Tensor, frame: usize) -> [i64; 8] {
    let values: Vec<i64> = codes.i((.., frame)).unwrap().to_vec1().unwrap();
    values.try_into().unwrap()
}

/// PyPI LMGen (8 depformer steps) returns at call t what PersonaPlex returns at call t + 1.
fn greedy_stream(positions: RingPositions, tokens_key: &str) {
    greedy_stream_in_slot(positions, tokens_key, 1, 0, DecodeAttention::Composed);
}

/// The same, from slot `slot` of a generator of `batch` slots (the others idle), the temporal
/// transformer attending through `decode`.
fn greedy_stream_in_slot(
    positions: RingPositions,
    tokens_key: &str,
    batch: usize,
    slot: usize,
    decode: DecodeAttention,
) {
    let fx = tiny::load("lm_greedy.safetensors");
    let model = tiny::cpu_model(8);
    let mut generator = Generator::new(&model, batch, model.config().context, positions).unwrap();
    generator.set_decode_attention(decode);
    generator.open(slot, 0, SamplingConfig::GREEDY);
    let frames = fx["user_codes"].dim(1).unwrap();
    let expected = &fx[tokens_key];
    let valid: Vec<i64> = fx["out_valid"].to_vec1().unwrap();
    let mut compared = 0;
    for frame in 0..frames {
        let mut inputs = vec![None; batch];
        inputs[slot] = Some(CallInput::Tokens(Forced {
            user: Some(user_frame(&fx["user_codes"], frame)),
            ..Default::default()
        }));
        let out = generator
            .step(&model, &inputs)
            .unwrap()
            .remove(slot)
            .unwrap();
        // Our call `frame` corresponds to PyPI's call `frame - 1`.
        let Some(reference_call) = frame.checked_sub(1) else {
            continue;
        };
        if valid[reference_call] == 0 {
            assert!(
                out.tokens.is_none(),
                "frame {frame}: no output expected yet"
            );
            continue;
        }
        let tokens = out
            .tokens
            .unwrap_or_else(|| panic!("frame {frame}: expected output"));
        let want: Vec<i64> = expected.i((.., reference_call)).unwrap().to_vec1().unwrap();
        assert_eq!(
            &tokens[..9],
            want.as_slice(),
            "frame {frame} (reference call {reference_call})"
        );
        compared += 1;
    }
    assert!(compared >= 45, "compared {compared} frames");
}

#[test]
fn greedy_tokens_match_pypi_lmgen_one_call_later_with_exact_positions() {
    greedy_stream(RingPositions::Exact, "out_tokens");
}

#[test]
fn greedy_tokens_match_pypi_lmgen_one_call_later_with_personaplex_positions() {
    greedy_stream(RingPositions::PersonaPlex, "out_tokens_pp");
}

/// A call computes only the rows up to its last busy slot (rounded up to a power of two): slot
/// 2 of 7 runs in a 4-row step, slot 6 in the full 7, and both give the reference's tokens.
#[test]
fn greedy_tokens_match_from_any_slot_of_a_larger_batch() {
    let composed = DecodeAttention::Composed;
    greedy_stream_in_slot(RingPositions::PersonaPlex, "out_tokens_pp", 7, 2, composed);
    greedy_stream_in_slot(RingPositions::PersonaPlex, "out_tokens_pp", 7, 6, composed);
}

/// The attention kernels' CPU references (RoPE fused with a ring write at a device index, then
/// attention over the filled ring) drive the same model code a GPU runs: the reference's tokens,
/// alone and from a slot with idle rows around it, in both ring-position modes.
#[test]
fn greedy_tokens_match_through_the_attention_kernels_references() {
    let kernels = DecodeAttention::Kernels;
    greedy_stream_in_slot(RingPositions::Exact, "out_tokens", 1, 0, kernels);
    greedy_stream_in_slot(RingPositions::PersonaPlex, "out_tokens_pp", 1, 0, kernels);
    greedy_stream_in_slot(RingPositions::PersonaPlex, "out_tokens_pp", 4, 2, kernels);
}
