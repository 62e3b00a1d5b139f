//! The language model's configuration, in the reference loaders' `lm_kwargs` keys, so any
//! Moshi-family `config.json` loads; with presets for PersonaPlex 7B and Moshiko.

use super::Result;
use super::nn::gated_hidden;
use serde::Deserialize;
use std::path::Path;

/// PersonaPlex's Mimi frames for a silent agent (`SILENCE_TOKENS` in the reference, card 2048).
pub const SILENCE_TOKENS: [u32; 8] = [948, 243, 1178, 546, 1736, 1030, 1978, 2008];
/// PersonaPlex's Mimi frames for a 440 Hz sine on the user stream while prompting (`SINE_TOKENS`).
pub const SINE_TOKENS: [u32; 8] = [430, 1268, 381, 1611, 1095, 1495, 56, 472];

fn default_padding_id() -> u32 {
    3
}
fn default_true() -> bool {
    true
}
fn default_rope() -> String {
    "rope".into()
}
fn default_silu() -> String {
    "silu".into()
}
fn default_norm() -> String {
    "rms_norm_f32".into()
}
fn default_none() -> String {
    "none".into()
}

/// `lm_kwargs` as the reference spells them. Keys we do not use are ignored; values we cannot
/// run are rejected by [`LmConfig::validate`].
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LmConfig {
    pub dim: usize,
    pub text_card: usize,
    #[serde(default = "default_padding_id")]
    pub existing_text_padding_id: u32,
    pub n_q: usize,
    pub dep_q: usize,
    pub card: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub hidden_scale: f64,
    #[serde(default = "default_true")]
    pub causal: bool,
    #[serde(default)]
    pub layer_scale: Option<f64>,
    pub context: usize,
    pub max_period: f64,
    #[serde(default = "default_silu")]
    pub gating: String,
    #[serde(default = "default_norm")]
    pub norm: String,
    #[serde(default = "default_rope")]
    pub positional_embedding: String,
    pub depformer_dim: usize,
    #[serde(default)]
    pub depformer_dim_feedforward: Option<usize>,
    pub depformer_num_heads: usize,
    pub depformer_num_layers: usize,
    #[serde(default)]
    pub depformer_layer_scale: Option<f64>,
    #[serde(default = "default_true")]
    pub depformer_multi_linear: bool,
    #[serde(default = "default_silu")]
    pub depformer_gating: String,
    #[serde(default = "default_none")]
    pub depformer_pos_emb: String,
    #[serde(default = "default_true")]
    pub depformer_weights_per_step: bool,
    pub delays: Vec<usize>,
    /// Agent silence frame for prompting (PersonaPlex's constant when absent).
    #[serde(default)]
    pub silence_tokens: Option<Vec<u32>>,
    /// User sine frame for prompting (PersonaPlex's constant when absent).
    #[serde(default)]
    pub sine_tokens: Option<Vec<u32>>,
}

impl LmConfig {
    /// NVIDIA PersonaPlex 7B v1 (Moshi architecture, 16-step depformer).
    pub fn personaplex_7b() -> Self {
        Self {
            dim: 4096,
            text_card: 32000,
            existing_text_padding_id: 3,
            n_q: 16,
            dep_q: 16,
            card: 2048,
            num_heads: 32,
            num_layers: 32,
            hidden_scale: 4.125,
            causal: true,
            layer_scale: None,
            context: 3000,
            max_period: 10000.0,
            gating: "silu".into(),
            norm: "rms_norm_f32".into(),
            positional_embedding: "rope".into(),
            depformer_dim: 1024,
            depformer_dim_feedforward: Some(4224),
            depformer_num_heads: 16,
            depformer_num_layers: 6,
            depformer_layer_scale: None,
            depformer_multi_linear: true,
            depformer_gating: "silu".into(),
            depformer_pos_emb: "none".into(),
            depformer_weights_per_step: true,
            delays: vec![0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
            silence_tokens: None,
            sine_tokens: None,
        }
    }

    /// Kyutai's Moshiko (8-step depformer, the same temporal transformer).
    pub fn moshiko() -> Self {
        Self {
            dep_q: 8,
            ..Self::personaplex_7b()
        }
    }

    /// A mid-size model for CPU benchmarks: the 7B's shape with d 1024 and 8 layers, and the
    /// full depformer.
    pub fn mid() -> Self {
        Self {
            dim: 1024,
            num_heads: 16,
            num_layers: 8,
            ..Self::personaplex_7b()
        }
    }

    /// The names `preset` knows.
    pub const PRESETS: [&str; 3] = ["personaplex-7b", "moshiko", "mid"];

    /// A preset by name: `personaplex-7b`, `moshiko`, `mid`.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "personaplex-7b" => Some(Self::personaplex_7b()),
            "moshiko" => Some(Self::moshiko()),
            "mid" => Some(Self::mid()),
            _ => None,
        }
    }

    /// `preset`, or an error that lists the presets.
    pub fn named(preset: &str) -> Result<Self> {
        Self::preset(preset).ok_or_else(|| {
            candle_core::Error::msg(format!(
                "unknown config {preset:?}; presets: {}",
                Self::PRESETS.join(", ")
            ))
        })
    }

    /// Reads a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::msg(format!("{}: {e}", path.display())))?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects what this implementation does not run, naming the key and the value.
    pub fn validate(&self) -> Result<()> {
        let expect = |key: &str, found: &str, wanted: &[&str]| -> Result<()> {
            if wanted.contains(&found) {
                Ok(())
            } else {
                candle_core::bail!(
                    "config {key} = {found:?} is not supported (supported: {wanted:?})"
                )
            }
        };
        expect("gating", &self.gating, &["silu"])?;
        expect("depformer_gating", &self.depformer_gating, &["silu"])?;
        expect("norm", &self.norm, &["rms_norm_f32", "rms_norm"])?;
        expect(
            "positional_embedding",
            &self.positional_embedding,
            &["rope"],
        )?;
        expect("depformer_pos_emb", &self.depformer_pos_emb, &["none"])?;
        if self.layer_scale.is_some() || self.depformer_layer_scale.is_some() {
            candle_core::bail!("config layer_scale must be null (LM layer scale is not supported)");
        }
        if !self.causal || !self.depformer_multi_linear || !self.depformer_weights_per_step {
            candle_core::bail!(
                "config must be causal with depformer_multi_linear and depformer_weights_per_step"
            );
        }
        if self.delays.len() != self.n_q + 1 {
            candle_core::bail!(
                "config delays has {} entries, expected n_q + 1 = {}",
                self.delays.len(),
                self.n_q + 1
            );
        }
        if self.n_q != 16 || self.dep_q < 8 || self.dep_q > self.n_q {
            candle_core::bail!(
                "config n_q = {}, dep_q = {}: expected 16 streams and 8..=16 depformer steps",
                self.n_q,
                self.dep_q
            );
        }
        if !self.dim.is_multiple_of(self.num_heads)
            || !self.depformer_dim.is_multiple_of(self.depformer_num_heads)
        {
            candle_core::bail!("config dims must divide by their head counts");
        }
        for (key, tokens) in [
            ("silence_tokens", &self.silence_tokens),
            ("sine_tokens", &self.sine_tokens),
        ] {
            if let Some(tokens) = tokens
                && (tokens.len() != 8 || tokens.iter().any(|&t| t as usize >= self.card))
            {
                candle_core::bail!("config {key} must be 8 codes below card {}", self.card);
            }
        }
        Ok(())
    }

    /// Audio codebooks per speaker.
    pub fn codebooks(&self) -> usize {
        self.n_q / 2
    }

    pub fn max_delay(&self) -> usize {
        self.delays.iter().copied().max().unwrap_or(0)
    }

    /// Width of one of the temporal transformer's attention heads.
    pub fn head_dim(&self) -> usize {
        self.dim / self.num_heads
    }

    /// Width of the temporal transformer's gated FFN.
    pub fn hidden(&self) -> usize {
        gated_hidden(self.dim, (self.hidden_scale * self.dim as f64) as usize)
    }

    /// Width of the depformer's gated FFN.
    pub fn depformer_hidden(&self) -> usize {
        let ff = self
            .depformer_dim_feedforward
            .unwrap_or((self.hidden_scale * self.depformer_dim as f64) as usize);
        gated_hidden(self.depformer_dim, ff)
    }

    pub fn silence(&self) -> [u32; 8] {
        self.silence_tokens
            .as_deref()
            .map(to_frame)
            .unwrap_or(SILENCE_TOKENS)
    }

    pub fn sine(&self) -> [u32; 8] {
        self.sine_tokens
            .as_deref()
            .map(to_frame)
            .unwrap_or(SINE_TOKENS)
    }
}

fn to_frame(tokens: &[u32]) -> [u32; 8] {
    let mut frame = [0; 8];
    frame.copy_from_slice(&tokens[..8]);
    frame
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_path() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny/config.json")
    }

    #[test]
    fn the_tiny_config_loads_with_its_prompt_frames() {
        let cfg = LmConfig::from_file(&tiny_path()).unwrap();
        assert_eq!(
            (cfg.dim, cfg.dep_q, cfg.card, cfg.text_card, cfg.context),
            (32, 16, 64, 256, 40)
        );
        assert_eq!(cfg.hidden(), 88);
        assert_eq!(cfg.depformer_hidden(), 44);
        assert_eq!(cfg.silence(), [2, 5, 9, 8, 17, 34, 61, 1]);
    }

    #[test]
    fn presets_have_the_published_sizes() {
        let pp = LmConfig::personaplex_7b();
        pp.validate().unwrap();
        assert_eq!(
            (pp.hidden(), pp.depformer_hidden(), pp.silence()),
            (11264, 2816, SILENCE_TOKENS)
        );
        assert_eq!(LmConfig::moshiko().dep_q, 8);
    }

    #[test]
    fn unsupported_values_are_named() {
        let cfg = LmConfig {
            gating: "gelu".into(),
            ..LmConfig::personaplex_7b()
        };
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains("gating") && err.contains("gelu"), "{err}");
        let cfg = LmConfig {
            delays: vec![0; 3],
            ..LmConfig::personaplex_7b()
        };
        assert!(cfg.validate().unwrap_err().to_string().contains("delays"));
    }
}
