//! Who the agent is for one session: a voice preset and a role prompt, checked against the
//! engine's catalog before a session is admitted.

use serde::{Deserialize, Serialize};

/// The default upper bound on a role prompt, in characters. PersonaPlex spends one model frame
/// (80 ms) per prompt token, so this also bounds session start-up work.
pub const DEFAULT_MAX_PROMPT_CHARS: usize = 2000;

/// What a client asked for.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PersonaRequest {
    pub voice: Option<String>,
    pub prompt: Option<String>,
}

/// A validated persona: the voice is one of the catalog's names, the prompt within limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Persona {
    pub voice: Option<String>,
    pub prompt: String,
}

/// A role prompt preset shown to users.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PromptPreset {
    pub name: String,
    pub text: String,
}

/// Why a persona request was refused; the message is meant for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PersonaError {
    #[error("unknown voice {name:?}; available voices: {}", available.join(", "))]
    UnknownVoice {
        name: String,
        available: Vec<String>,
    },
    #[error("role prompt is {len} characters; the limit is {max}")]
    PromptTooLong { len: usize, max: usize },
    #[error("role prompt is {len} tokens; the limit is {max} tokens")]
    PromptTooManyTokens { len: usize, max: usize },
    #[error("this engine reads no role prompt: {why}")]
    NoRolePrompts { why: String },
}

/// Counts a role prompt in the units an engine limits (tokens).
pub trait PromptCounter: Send + Sync {
    fn count(&self, prompt: &str) -> usize;
}

/// The voices and prompt presets an engine offers, and its limits.
#[derive(Clone, Serialize)]
pub struct PersonaCatalog {
    pub voices: Vec<String>,
    pub default_voice: Option<String>,
    pub prompts: Vec<PromptPreset>,
    pub max_prompt_chars: usize,
    /// An engine's own limit on the prompt, in its tokens, and how to count them.
    #[serde(skip)]
    pub max_prompt_tokens: Option<(usize, std::sync::Arc<dyn PromptCounter>)>,
    /// Why this engine refuses every role prompt, when it does.
    #[serde(skip)]
    pub no_prompts: Option<String>,
}

impl std::fmt::Debug for PersonaCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersonaCatalog")
            .field("voices", &self.voices)
            .field("default_voice", &self.default_voice)
            .field("max_prompt_chars", &self.max_prompt_chars)
            .field(
                "max_prompt_tokens",
                &self.max_prompt_tokens.as_ref().map(|(max, _)| max),
            )
            .finish()
    }
}

#[derive(Deserialize)]
struct VoiceList {
    default: String,
    voices: Vec<String>,
}

#[derive(Deserialize)]
struct PromptList {
    prompts: Vec<PromptPreset>,
}

impl PersonaCatalog {
    /// The PersonaPlex voice presets and the built-in role prompts (`assets/`).
    pub fn builtin() -> Self {
        let voices: VoiceList = serde_json::from_str(include_str!("../../assets/voices.json"))
            .expect("assets/voices.json is valid");
        Self {
            voices: voices.voices,
            default_voice: Some(voices.default),
            ..Self::with_voices(Vec::new(), None)
        }
    }

    /// A catalog with the given voices and the built-in prompts.
    pub fn with_voices(voices: Vec<String>, default_voice: Option<String>) -> Self {
        let prompts: PromptList = serde_json::from_str(include_str!("../../assets/prompts.json"))
            .expect("assets/prompts.json is valid");
        Self {
            voices,
            default_voice,
            max_prompt_tokens: None,
            prompts: prompts.prompts,
            max_prompt_chars: DEFAULT_MAX_PROMPT_CHARS,
            no_prompts: None,
        }
    }

    /// This catalog limited to `max` of the engine's tokens, counted by `counter`, and with only
    /// the prompt presets within it: the page never offers, and a client asking for nothing
    /// never gets, a prompt the engine refuses (a small model's window holds few tokens).
    pub fn limit_prompt_tokens(
        self,
        max: usize,
        counter: std::sync::Arc<dyn PromptCounter>,
    ) -> Self {
        let prompts = self
            .prompts
            .into_iter()
            .filter(|preset| counter.count(&preset.text) <= max)
            .collect();
        Self {
            prompts,
            max_prompt_tokens: Some((max, counter)),
            ..self
        }
    }

    /// This catalog with no prompt presets, refusing every role prompt for `why`.
    pub fn without_prompts(self, why: impl Into<String>) -> Self {
        Self {
            prompts: Vec::new(),
            no_prompts: Some(why.into()),
            ..self
        }
    }

    /// Checks a request against the catalog. An absent or empty voice means the default; an
    /// absent prompt means the first preset.
    pub fn resolve(&self, request: &PersonaRequest) -> Result<Persona, PersonaError> {
        let voice = match request
            .voice
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            None => self.default_voice.clone(),
            Some(name) => Some(self.lookup_voice(name)?),
        };
        let prompt = match &request.prompt {
            Some(text) => text.trim().to_owned(),
            None => self
                .prompts
                .first()
                .map(|p| p.text.clone())
                .unwrap_or_default(),
        };
        if let Some(why) = self.no_prompts.as_ref().filter(|_| !prompt.is_empty()) {
            return Err(PersonaError::NoRolePrompts { why: why.clone() });
        }
        let len = prompt.chars().count();
        if len > self.max_prompt_chars {
            return Err(PersonaError::PromptTooLong {
                len,
                max: self.max_prompt_chars,
            });
        }
        if let Some((max, counter)) = &self.max_prompt_tokens {
            let tokens = counter.count(&prompt);
            if tokens > *max {
                return Err(PersonaError::PromptTooManyTokens {
                    len: tokens,
                    max: *max,
                });
            }
        }
        Ok(Persona { voice, prompt })
    }

    /// Finds a voice by name; `NATF0` and `NATF0.pt` both name the preset (the official
    /// client sends file names).
    fn lookup_voice(&self, name: &str) -> Result<String, PersonaError> {
        let stem = name.strip_suffix(".pt").unwrap_or(name);
        self.voices
            .iter()
            .find(|v| v.as_str() == stem)
            .cloned()
            .ok_or_else(|| PersonaError::UnknownVoice {
                name: name.to_owned(),
                available: self.voices.clone(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(voice: Option<&str>, prompt: Option<&str>) -> PersonaRequest {
        PersonaRequest {
            voice: voice.map(Into::into),
            prompt: prompt.map(Into::into),
        }
    }

    #[test]
    fn builtin_catalog_has_the_personaplex_voices() {
        let catalog = PersonaCatalog::builtin();
        assert_eq!(catalog.voices.len(), 18);
        assert_eq!(catalog.default_voice.as_deref(), Some("NATF0"));
        assert!(!catalog.prompts.is_empty());
    }

    #[test]
    fn defaults_fill_absent_fields() {
        let catalog = PersonaCatalog::builtin();
        let persona = catalog.resolve(&request(None, None)).unwrap();
        assert_eq!(persona.voice.as_deref(), Some("NATF0"));
        assert_eq!(persona.prompt, catalog.prompts[0].text);
    }

    #[test]
    fn a_catalog_without_prompts_takes_the_empty_one_and_refuses_the_rest() {
        let catalog = PersonaCatalog::with_voices(Vec::new(), None).without_prompts("no tokenizer");
        let persona = catalog.resolve(&request(None, None)).unwrap();
        assert_eq!((persona.voice, persona.prompt.as_str()), (None, ""));
        assert_eq!(
            catalog.resolve(&request(None, Some("  "))).unwrap().prompt,
            ""
        );
        let refused = catalog
            .resolve(&request(None, Some("You are a pirate.")))
            .unwrap_err();
        assert_eq!(
            refused.to_string(),
            "this engine reads no role prompt: no tokenizer"
        );
    }

    struct Words;

    impl PromptCounter for Words {
        fn count(&self, prompt: &str) -> usize {
            prompt.split_whitespace().count()
        }
    }

    #[test]
    fn a_token_limit_keeps_only_the_presets_within_it() {
        let builtin = PersonaCatalog::builtin();
        let shortest = builtin
            .prompts
            .iter()
            .map(|p| Words.count(&p.text))
            .min()
            .unwrap();
        let catalog = builtin
            .clone()
            .limit_prompt_tokens(shortest, std::sync::Arc::new(Words));
        assert!(!catalog.prompts.is_empty());
        assert!(catalog.prompts.len() < builtin.prompts.len());
        assert!(
            catalog
                .prompts
                .iter()
                .all(|p| Words.count(&p.text) <= shortest)
        );
        assert_eq!(
            catalog.resolve(&request(None, None)).unwrap().prompt,
            catalog.prompts[0].text
        );
        let none_fit = builtin.limit_prompt_tokens(shortest - 1, std::sync::Arc::new(Words));
        let persona = none_fit.resolve(&request(None, None)).unwrap();
        assert_eq!(
            (persona.voice.as_deref(), persona.prompt.as_str()),
            (Some("NATF0"), "")
        );
        assert!(matches!(
            none_fit.resolve(&request(None, Some(&"word ".repeat(shortest)))),
            Err(PersonaError::PromptTooManyTokens { .. })
        ));
    }

    #[test]
    fn voice_file_names_are_accepted() {
        let catalog = PersonaCatalog::builtin();
        assert_eq!(
            catalog
                .resolve(&request(Some("VARM3.pt"), Some("hi")))
                .unwrap()
                .voice
                .as_deref(),
            Some("VARM3")
        );
    }

    #[test]
    fn unknown_and_traversal_voices_are_refused_with_the_list() {
        let catalog = PersonaCatalog::builtin();
        for name in ["NOPE", "../../etc/passwd", "NATF0/../x", "natf0"] {
            let err = catalog.resolve(&request(Some(name), None)).unwrap_err();
            assert!(
                matches!(&err, PersonaError::UnknownVoice { available, .. } if available.len() == 18)
            );
            assert!(err.to_string().contains("NATM1"), "{err}");
        }
    }

    #[test]
    fn long_prompts_are_refused_with_the_limit() {
        let catalog = PersonaCatalog::builtin();
        let text = "a".repeat(DEFAULT_MAX_PROMPT_CHARS + 1);
        let err = catalog.resolve(&request(None, Some(&text))).unwrap_err();
        assert_eq!(
            err,
            PersonaError::PromptTooLong {
                len: DEFAULT_MAX_PROMPT_CHARS + 1,
                max: DEFAULT_MAX_PROMPT_CHARS
            }
        );
        assert!(err.to_string().contains("2000"));
    }
}
