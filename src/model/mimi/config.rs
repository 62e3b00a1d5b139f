//! Mimi's configuration, in the layout of PyPI moshi's `loaders._mimi_config` (the `"mimi"` object
//! of our `config.json`), with the real Moshi/PersonaPlex codec as a preset.

use crate::model::Result;
use serde::Deserialize;

/// The whole codec: SEANet, the two transformers, the split RVQ and the frame arithmetic.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MimiConfig {
    pub sample_rate: usize,
    pub channels: usize,
    /// Codes per second (12.5).
    pub frame_rate: f64,
    pub seanet: SeanetConfig,
    pub quantizer: QuantizerConfig,
    pub transformer: TransformerConfig,
    /// Codebooks used per frame (PersonaPlex: 8 of the 32 the file holds).
    #[serde(default = "default_num_codebooks")]
    pub num_codebooks: usize,
}

fn default_num_codebooks() -> usize {
    8
}

/// The SEANet encoder/decoder (`moshi.modules.seanet`), shared by both directions.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeanetConfig {
    pub channels: usize,
    pub dimension: usize,
    pub causal: bool,
    pub n_filters: usize,
    pub n_residual_layers: usize,
    pub activation: String,
    pub compress: usize,
    pub dilation_base: usize,
    pub disable_norm_outer_blocks: usize,
    pub kernel_size: usize,
    pub residual_kernel_size: usize,
    pub last_kernel_size: usize,
    pub norm: String,
    pub pad_mode: String,
    /// Decoder order (the encoder downsamples by the reversed list).
    pub ratios: Vec<usize>,
    pub true_skip: bool,
}

/// The split residual vector quantizer (`SplitResidualVectorQuantizer`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizerConfig {
    /// Codebook vector width.
    pub dimension: usize,
    /// Codebooks trained (semantic + acoustic).
    pub n_q: usize,
    /// Entries per codebook.
    pub bins: usize,
    pub input_dimension: Option<usize>,
    pub output_dimension: Option<usize>,
    /// Semantic codebooks (in `rvq_first`); 1 when absent.
    #[serde(default)]
    pub n_q_semantic: Option<usize>,
    // Training-only knobs: accepted so that training configs load, never used.
    #[serde(default)]
    pub q_dropout: Option<bool>,
    #[serde(default)]
    pub no_quantization_rate: Option<f64>,
    #[serde(default)]
    pub decay: Option<f64>,
    #[serde(default)]
    pub threshold_usage_ratio: Option<f64>,
    #[serde(default)]
    pub replaced_usage_ratio: Option<f64>,
}

/// The encoder and decoder transformers (`ProjectedTransformer` kwargs).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerConfig {
    pub d_model: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub causal: bool,
    pub layer_scale: Option<f64>,
    /// Attention window in 25 Hz frames, also the ring capacity.
    pub context: Option<usize>,
    pub conv_layout: bool,
    pub max_period: f64,
    pub gating: String,
    pub norm: String,
    pub positional_embedding: String,
    pub dim_feedforward: usize,
    pub input_dimension: usize,
    pub output_dimensions: Vec<usize>,
}

impl MimiConfig {
    /// The Mimi of Moshi and PersonaPlex (`tokenizer-e351c8d8-checkpoint125.safetensors`), 8 codebooks.
    pub fn v0_1() -> Self {
        let dimension = 512;
        Self {
            sample_rate: 24_000,
            channels: 1,
            frame_rate: 12.5,
            seanet: SeanetConfig {
                channels: 1,
                dimension,
                causal: true,
                n_filters: 64,
                n_residual_layers: 1,
                activation: "ELU".into(),
                compress: 2,
                dilation_base: 2,
                disable_norm_outer_blocks: 0,
                kernel_size: 7,
                residual_kernel_size: 3,
                last_kernel_size: 3,
                norm: "none".into(),
                pad_mode: "constant".into(),
                ratios: vec![8, 6, 5, 4],
                true_skip: true,
            },
            quantizer: QuantizerConfig {
                dimension: 256,
                n_q: 32,
                bins: 2048,
                input_dimension: Some(dimension),
                output_dimension: Some(dimension),
                n_q_semantic: None,
                q_dropout: None,
                no_quantization_rate: None,
                decay: None,
                threshold_usage_ratio: None,
                replaced_usage_ratio: None,
            },
            transformer: TransformerConfig {
                d_model: dimension,
                num_heads: 8,
                num_layers: 8,
                causal: true,
                layer_scale: Some(0.01),
                context: Some(250),
                conv_layout: true,
                max_period: 10_000.0,
                gating: "none".into(),
                norm: "layer_norm".into(),
                positional_embedding: "rope".into(),
                dim_feedforward: 2048,
                input_dimension: dimension,
                output_dimensions: vec![dimension],
            },
            num_codebooks: 8,
        }
    }

    /// Reads the `"mimi"` object of a model's `config.json` and checks it.
    pub fn from_model_config_json(text: &str) -> Result<Self> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| candle_core::Error::msg(format!("config.json is not JSON: {e}")))?;
        let mimi = value
            .get("mimi")
            .ok_or_else(|| candle_core::Error::msg("config.json has no \"mimi\" object"))?;
        let cfg: Self = serde_json::from_value(mimi.clone())
            .map_err(|e| candle_core::Error::msg(format!("config.json \"mimi\": {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// SEANet hop: samples per encoder frame (960 → 25 Hz).
    pub fn hop_samples(&self) -> usize {
        self.seanet.ratios.iter().product()
    }

    /// Samples per code frame (1920 = 80 ms at 24 kHz).
    pub fn frame_samples(&self) -> usize {
        (self.sample_rate as f64 / self.frame_rate).round() as usize
    }

    /// Encoder frames per code frame: the stride of the conv downsample (2).
    pub fn resample_stride(&self) -> usize {
        self.frame_samples() / self.hop_samples().max(1)
    }

    /// Codebooks held by `rvq_first`.
    pub fn semantic_codebooks(&self) -> usize {
        self.quantizer.n_q_semantic.unwrap_or(1)
    }

    /// Checks every value the Rust code relies on; what it cannot run is refused here.
    pub fn validate(&self) -> Result<()> {
        let s = &self.seanet;
        let t = &self.transformer;
        let q = &self.quantizer;
        let refuse = |what: &str, value: &dyn std::fmt::Debug, supported: &str| -> Result<()> {
            candle_core::bail!("mimi config: {what} = {value:?} is not supported ({supported})")
        };
        if s.norm != "none" {
            refuse(
                "seanet.norm",
                &s.norm,
                "only \"none\": fold weight norm into the conv weights first",
            )?;
        }
        if s.activation != "ELU" {
            refuse("seanet.activation", &s.activation, "only \"ELU\"")?;
        }
        if s.pad_mode != "constant" {
            refuse("seanet.pad_mode", &s.pad_mode, "only \"constant\"")?;
        }
        if !s.causal {
            refuse(
                "seanet.causal",
                &s.causal,
                "only causal convolutions stream",
            )?;
        }
        if !s.true_skip {
            refuse(
                "seanet.true_skip",
                &s.true_skip,
                "only identity skips in residual blocks",
            )?;
        }
        if s.channels != self.channels {
            candle_core::bail!(
                "mimi config: seanet.channels {} differs from channels {}",
                s.channels,
                self.channels
            );
        }
        if s.ratios.is_empty() || s.ratios.contains(&0) {
            refuse("seanet.ratios", &s.ratios, "non-empty, all positive")?;
        }
        if s.compress == 0 || s.n_filters == 0 || s.dimension == 0 || s.dilation_base == 0 {
            candle_core::bail!(
                "mimi config: seanet compress/n_filters/dimension/dilation_base must be positive"
            );
        }
        if s.kernel_size == 0 || s.residual_kernel_size == 0 || s.last_kernel_size == 0 {
            candle_core::bail!("mimi config: seanet kernel sizes must be positive");
        }
        if !s.n_filters.is_multiple_of(s.compress) {
            refuse(
                "seanet.compress",
                &s.compress,
                "must divide n_filters so residual widths are whole",
            )?;
        }
        let frame = self.sample_rate as f64 / self.frame_rate;
        let hop = self.hop_samples();
        if self.frame_rate <= 0.0 || frame.fract() != 0.0 || !(frame as usize).is_multiple_of(hop) {
            candle_core::bail!(
                "mimi config: sample_rate {} / frame_rate {} is not a whole multiple of the SEANet hop {hop}",
                self.sample_rate,
                self.frame_rate
            );
        }
        if self.resample_stride() < 2 {
            refuse(
                "frame_rate",
                &self.frame_rate,
                "the encoder rate must be at least twice the frame rate (conv resampling)",
            )?;
        }
        if t.gating != "none" {
            refuse("transformer.gating", &t.gating, "only \"none\" (GELU FFN)")?;
        }
        if t.norm != "layer_norm" {
            refuse("transformer.norm", &t.norm, "only \"layer_norm\"")?;
        }
        if t.positional_embedding != "rope" {
            refuse(
                "transformer.positional_embedding",
                &t.positional_embedding,
                "only \"rope\"",
            )?;
        }
        if !t.causal {
            refuse("transformer.causal", &t.causal, "only causal attention")?;
        }
        if !t.conv_layout {
            refuse("transformer.conv_layout", &t.conv_layout, "only true")?;
        }
        match t.context {
            Some(c) if c > 2 * self.resample_stride() => {}
            _ => refuse(
                "transformer.context",
                &t.context,
                "a ring capacity larger than two steps of encoder frames",
            )?,
        }
        if t.num_heads == 0
            || !t.d_model.is_multiple_of(t.num_heads)
            || !(t.d_model / t.num_heads).is_multiple_of(2)
        {
            candle_core::bail!(
                "mimi config: transformer d_model {} must split into {} heads of even width",
                t.d_model,
                t.num_heads
            );
        }
        if t.d_model != s.dimension
            || t.input_dimension != s.dimension
            || t.output_dimensions != [s.dimension]
        {
            candle_core::bail!(
                "mimi config: transformer d_model {}, input_dimension {}, output_dimensions {:?} must all equal seanet.dimension {} (projected transformers are not supported)",
                t.d_model,
                t.input_dimension,
                t.output_dimensions,
                s.dimension
            );
        }
        let q_in = q.input_dimension.unwrap_or(q.dimension);
        let q_out = q.output_dimension.unwrap_or(q.dimension);
        if q_in != s.dimension || q_out != s.dimension {
            candle_core::bail!(
                "mimi config: quantizer input/output dimensions {q_in}/{q_out} must equal seanet.dimension {}",
                s.dimension
            );
        }
        let semantic = self.semantic_codebooks();
        if semantic == 0 || semantic >= q.n_q {
            candle_core::bail!(
                "mimi config: quantizer n_q_semantic {semantic} must be in 1..n_q ({})",
                q.n_q
            );
        }
        if self.num_codebooks < semantic || self.num_codebooks > q.n_q {
            candle_core::bail!(
                "mimi config: num_codebooks {} must be between {semantic} and quantizer.n_q {}",
                self.num_codebooks,
                q.n_q
            );
        }
        if q.bins == 0 || q.dimension == 0 {
            candle_core::bail!("mimi config: quantizer bins and dimension must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_text() -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny/config.json");
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn the_tiny_config_loads_and_matches_the_real_layout() -> Result<()> {
        let tiny = MimiConfig::from_model_config_json(&tiny_text())?;
        let real = MimiConfig::v0_1();
        real.validate()?;
        assert_eq!(tiny.frame_samples(), 1920);
        assert_eq!(real.frame_samples(), 1920);
        assert_eq!((tiny.hop_samples(), tiny.resample_stride()), (960, 2));
        assert_eq!(tiny.num_codebooks, 8);
        assert_eq!(tiny.transformer.context, Some(25));
        // Same structure as the real codec, smaller widths.
        assert_eq!(tiny.seanet.ratios, real.seanet.ratios);
        assert_eq!(tiny.seanet.kernel_size, real.seanet.kernel_size);
        assert_eq!(tiny.transformer.layer_scale, real.transformer.layer_scale);
        Ok(())
    }

    #[test]
    fn unsupported_values_are_refused_by_name() {
        type Edit = fn(&mut MimiConfig);
        let cases: [(Edit, &str); 7] = [
            (|c| c.seanet.norm = "weight_norm".into(), "seanet.norm"),
            (
                |c| c.transformer.gating = "silu".into(),
                "transformer.gating",
            ),
            (|c| c.transformer.causal = false, "transformer.causal"),
            (|c| c.seanet.causal = false, "seanet.causal"),
            (|c| c.seanet.pad_mode = "reflect".into(), "seanet.pad_mode"),
            (|c| c.transformer.context = None, "transformer.context"),
            (|c| c.num_codebooks = 33, "num_codebooks"),
        ];
        for (edit, name) in cases {
            let mut cfg = MimiConfig::v0_1();
            edit(&mut cfg);
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text =
            tiny_text().replace("\"true_skip\": true", "\"true_skip\": true, \"mask_fn\": 1");
        let err = MimiConfig::from_model_config_json(&text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("mask_fn"), "{err}");
    }
}
