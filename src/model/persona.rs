//! PersonaPlex's system prompt, run before the first live frame: the voice prompt (a preset's
//! embeddings, or Mimi codes of a voice recording, forced on the agent stream), half a second of
//! silence, the role prompt one token a frame, and half a second of silence — all teacher forced
//! while the user stream hears a 440 Hz sine.

use super::Result;
use super::generate::{CallInput, Forced, Generator, TEXT_PAD};
use super::lm::LmModel;
use super::voice::VoicePreset;

/// Frames of silence after the voice and after the text (0.5 s at 12.5 Hz).
pub const SILENCE_FRAMES: usize = 6;

/// Where the agent's voice comes from.
#[derive(Debug, Clone)]
pub enum VoicePrompt {
    None,
    Preset(Box<VoicePreset>),
    /// Mimi codes of a voice recording, one `[8]` frame per entry.
    Codes(Vec<[i64; 8]>),
}

/// Model calls the whole prompt takes (for sizing the prefill state).
pub fn prompt_calls(voice: &VoicePrompt, text_tokens: &[u32]) -> usize {
    let voice_calls = match voice {
        VoicePrompt::None => 0,
        // The first embedding consumes the generator's first, model-free call as well.
        VoicePrompt::Preset(preset) => preset.embeddings.dim(0).unwrap_or(0) + 1,
        VoicePrompt::Codes(codes) => codes.len(),
    };
    voice_calls + 2 * SILENCE_FRAMES + text_tokens.len()
}

/// Runs the system prompt on `slot_idx` of `generator` (which must be freshly opened).
pub fn run_prompt(
    model: &LmModel,
    generator: &mut Generator,
    slot_idx: usize,
    voice: &VoicePrompt,
    text_tokens: &[u32],
) -> Result<()> {
    let _span = tracing::debug_span!("system_prompt", text_tokens = text_tokens.len()).entered();
    let cfg = model.config();
    let (silence, sine) = (cfg.silence().map(i64::from), cfg.sine().map(i64::from));
    let mut call = |input: CallInput| -> Result<()> {
        let mut inputs = vec![None; generator.batch()];
        inputs[slot_idx] = Some(input);
        generator.step(model, &inputs).map(|_| ())
    };
    match voice {
        VoicePrompt::None => {}
        VoicePrompt::Preset(preset) => {
            for frame in 0..preset.embeddings.dim(0)? {
                call(CallInput::Embedding(preset.embeddings.get(frame)?))?;
            }
        }
        VoicePrompt::Codes(codes) => {
            for frame in codes {
                call(CallInput::Tokens(Forced {
                    text: Some(TEXT_PAD),
                    agent: Some(*frame),
                    user: Some(sine),
                }))?;
            }
        }
    }
    if let VoicePrompt::Preset(preset) = voice {
        let slot = generator
            .slot_mut(slot_idx)
            .ok_or_else(|| candle_core::Error::msg("prompt on a closed slot"))?;
        slot.tokens.load_cache(&preset.cache);
    }
    let quiet = |text: i64| {
        CallInput::Tokens(Forced {
            text: Some(text),
            agent: Some(silence),
            user: Some(sine),
        })
    };
    let mut call = |input: CallInput| -> Result<()> {
        let mut inputs = vec![None; generator.batch()];
        inputs[slot_idx] = Some(input);
        generator.step(model, &inputs).map(|_| ())
    };
    for _ in 0..SILENCE_FRAMES {
        call(quiet(TEXT_PAD))?;
    }
    for &token in text_tokens {
        call(quiet(i64::from(token)))?;
    }
    for _ in 0..SILENCE_FRAMES {
        call(quiet(TEXT_PAD))?;
    }
    Ok(())
}
