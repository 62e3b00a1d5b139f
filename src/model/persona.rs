//! PersonaPlex's system prompt, run before the first live frame: the voice prompt (a preset's
//! embeddings, or Mimi codes of a voice recording, forced on the agent stream), half a second of
//! silence, the role prompt one token a frame, and half a second of silence — all teacher forced
//! while the user stream hears a 440 Hz sine.

use super::Result;
use super::config::LmConfig;
use super::generate::{CACHE_COLUMNS, CallInput, FORCED_CHUNK, Forced, Generator, TEXT_PAD};
use super::lm::{LmModel, STREAMS};
use super::voice::VoicePreset;
use std::collections::VecDeque;

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

/// One step of the system prompt.
enum PromptStep {
    /// A model call with this input on the prompt's slot.
    Call(CallInput),
    /// The voice preset's token ring, put in place once its embeddings have run.
    LoadCache(Box<[[i64; CACHE_COLUMNS]; STREAMS]>),
}

/// The system prompt as a queue of model calls, run a few at a time (`advance`) so a server can
/// prefill a new persona between the frames of live conversations, or all at once
/// (`run_prompt`).
pub struct PromptRun {
    slot_idx: usize,
    steps: VecDeque<PromptStep>,
}

impl PromptRun {
    /// The prompt of `voice` and `text_tokens` for slot `slot_idx` of a model of config `cfg`.
    pub fn new(
        cfg: &LmConfig,
        slot_idx: usize,
        voice: &VoicePrompt,
        text_tokens: &[u32],
    ) -> Result<Self> {
        let (silence, sine) = (cfg.silence().map(i64::from), cfg.sine().map(i64::from));
        let mut steps = VecDeque::with_capacity(prompt_calls(voice, text_tokens));
        match voice {
            VoicePrompt::None => {}
            VoicePrompt::Preset(preset) => {
                for frame in 0..preset.embeddings.dim(0)? {
                    steps.push_back(PromptStep::Call(CallInput::Embedding(
                        preset.embeddings.get(frame)?,
                    )));
                }
                steps.push_back(PromptStep::LoadCache(Box::new(preset.cache)));
            }
            VoicePrompt::Codes(codes) => {
                steps.extend(codes.iter().map(|frame| {
                    PromptStep::Call(CallInput::Tokens(Forced {
                        text: Some(TEXT_PAD),
                        agent: Some(*frame),
                        user: Some(sine),
                    }))
                }));
            }
        }
        let quiet = |text: i64| {
            PromptStep::Call(CallInput::Tokens(Forced {
                text: Some(text),
                agent: Some(silence),
                user: Some(sine),
            }))
        };
        let pad = || (0..SILENCE_FRAMES).map(|_| quiet(TEXT_PAD));
        steps.extend(pad());
        steps.extend(text_tokens.iter().map(|&token| quiet(i64::from(token))));
        steps.extend(pad());
        Ok(Self { slot_idx, steps })
    }

    /// Runs at most `calls` more model calls of the prompt on `generator` (whose slot must have
    /// been freshly opened before the first); returns whether the prompt is done. Runs of
    /// calls go through the temporal transformer together (`Generator::run_forced`).
    pub fn advance(
        &mut self,
        model: &LmModel,
        generator: &mut Generator,
        calls: usize,
    ) -> Result<bool> {
        let mut made = 0;
        while made < calls {
            match self.steps.front() {
                None => break,
                Some(PromptStep::LoadCache(_)) => self.load_cache(generator)?,
                Some(PromptStep::Call(_)) => {
                    made += self.run_calls(model, generator, calls - made)?
                }
            }
        }
        Ok(self.steps.is_empty())
    }

    /// Runs up to `calls` of the model calls at the front (at least one); returns how many ran.
    fn run_calls(
        &mut self,
        model: &LmModel,
        generator: &mut Generator,
        calls: usize,
    ) -> Result<usize> {
        let inputs: Vec<CallInput> = self
            .steps
            .iter()
            .take(calls.min(FORCED_CHUNK))
            .map_while(|step| match step {
                PromptStep::Call(input) => Some(input.clone()),
                PromptStep::LoadCache(_) => None,
            })
            .collect();
        let mut ran = generator.run_forced(model, self.slot_idx, &inputs)?;
        if ran == 0 {
            let mut batch = vec![None; generator.batch()];
            batch[self.slot_idx] = inputs.into_iter().next();
            generator.step(model, &batch)?;
            ran = 1;
        }
        self.steps.drain(..ran);
        Ok(ran)
    }

    /// Puts the voice preset's token ring in place (the step at the front).
    fn load_cache(&mut self, generator: &mut Generator) -> Result<()> {
        let Some(PromptStep::LoadCache(cache)) = self.steps.pop_front() else {
            candle_core::bail!("internal error: no token ring to load at the prompt's front");
        };
        generator
            .slot_mut(self.slot_idx)
            .ok_or_else(|| candle_core::Error::msg("prompt on a closed slot"))?
            .tokens
            .load_cache(&cache);
        Ok(())
    }
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
    let mut run = PromptRun::new(model.config(), slot_idx, voice, text_tokens)?;
    run.advance(model, generator, usize::MAX)?;
    Ok(())
}
