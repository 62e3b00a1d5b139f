//! Mimi's tensors under the official Kyutai names (`tokenizer-e351c8d8-checkpoint125.safetensors`,
//! the file PersonaPlex ships), grouped by role. Shapes follow from the config; a missing tensor or
//! a wrong shape is an error naming the tensor and the file.

use super::Checkpoint;
use crate::model::Result;
use crate::model::mimi::MimiConfig;
use candle_core::Tensor;

/// A convolution: `[out, in, kernel]` (or `[in, out, kernel]` for a transposed one) and its bias.
#[derive(Debug, Clone)]
pub struct ConvWeights {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// A SEANet residual block: `ELU → conv1 (k, dim → dim/compress) → ELU → conv2 (1, back to dim)`.
#[derive(Debug, Clone)]
pub struct ResidualWeights {
    pub conv1: ConvWeights,
    pub conv2: ConvWeights,
}

/// One SEANet resolution: its residual blocks and the strided (transposed) conv that changes rate.
#[derive(Debug, Clone)]
pub struct SeanetStageWeights {
    pub residuals: Vec<ResidualWeights>,
    /// Encoder: conv `[2c, c, 2r]` after the residuals. Decoder: conv-transpose `[c, c/2, 2r]` before.
    pub resample: ConvWeights,
}

/// A SEANet encoder or decoder, stages in the order they run.
#[derive(Debug, Clone)]
pub struct SeanetWeights {
    pub first: ConvWeights,
    pub stages: Vec<SeanetStageWeights>,
    pub last: ConvWeights,
}

/// One pre-norm transformer layer with LayerNorm, GELU FFN and optional layer scales.
#[derive(Debug, Clone)]
pub struct TransformerLayerWeights {
    /// `[3·d, d]`: q, k, v stacked, heads × head_dim each.
    pub in_proj: Tensor,
    pub out_proj: Tensor,
    pub norm1_weight: Tensor,
    pub norm1_bias: Tensor,
    pub norm2_weight: Tensor,
    pub norm2_bias: Tensor,
    pub linear1: Tensor,
    pub linear2: Tensor,
    pub layer_scale_1: Option<Tensor>,
    pub layer_scale_2: Option<Tensor>,
}

/// One codebook as stored: the EMA sums and usage counts (entry = sum / max(usage, 1e-5)).
#[derive(Debug, Clone)]
pub struct CodebookWeights {
    pub embedding_sum: Tensor,
    pub cluster_usage: Tensor,
}

/// `rvq_first` or `rvq_rest`: 1×1 conv projections in and out, and the codebooks in use.
#[derive(Debug, Clone)]
pub struct RvqWeights {
    /// `[dim, input_dim, 1]`.
    pub input_proj: Tensor,
    /// `[output_dim, dim, 1]`.
    pub output_proj: Tensor,
    pub codebooks: Vec<CodebookWeights>,
}

/// Every tensor Mimi runs on.
#[derive(Debug, Clone)]
pub struct MimiWeights {
    pub encoder: SeanetWeights,
    pub encoder_transformer: Vec<TransformerLayerWeights>,
    /// Learnt stride-2 downsample conv `[d, d, 4]`, no bias.
    pub downsample: Tensor,
    pub rvq_first: RvqWeights,
    pub rvq_rest: RvqWeights,
    /// Depthwise stride-2 conv-transpose upsample `[d, 1, 4]`, no bias.
    pub upsample: Tensor,
    pub decoder_transformer: Vec<TransformerLayerWeights>,
    pub decoder: SeanetWeights,
}

impl MimiWeights {
    /// Reads what `cfg` needs (only the `num_codebooks` codebooks in use) from `ckpt`.
    pub fn load(ckpt: &Checkpoint, cfg: &MimiConfig) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.seanet.dimension;
        let k = 2 * cfg.resample_stride();
        let semantic = cfg.semantic_codebooks();
        Ok(Self {
            encoder: load_encoder(ckpt, cfg)?,
            encoder_transformer: load_transformer(ckpt, cfg, "encoder_transformer")?,
            downsample: ckpt.tensor("downsample.conv.conv.conv.weight", &[d, d, k])?,
            rvq_first: load_rvq(ckpt, cfg, "rvq_first", semantic)?,
            rvq_rest: load_rvq(ckpt, cfg, "rvq_rest", cfg.num_codebooks - semantic)?,
            upsample: ckpt.tensor("upsample.convtr.convtr.convtr.weight", &[d, 1, k])?,
            decoder_transformer: load_transformer(ckpt, cfg, "decoder_transformer")?,
            decoder: load_decoder(ckpt, cfg)?,
        })
    }
}

fn conv(ckpt: &Checkpoint, prefix: &str, shape: [usize; 3], out: usize) -> Result<ConvWeights> {
    Ok(ConvWeights {
        weight: ckpt.tensor(&format!("{prefix}.weight"), &shape)?,
        bias: Some(ckpt.tensor(&format!("{prefix}.bias"), &[out])?),
    })
}

/// `model.{idx}.block.{1,3}` of a residual block at width `dim`.
fn residual(
    ckpt: &Checkpoint,
    model: &str,
    idx: usize,
    dim: usize,
    cfg: &MimiConfig,
) -> Result<ResidualWeights> {
    let hidden = dim / cfg.seanet.compress;
    let k = cfg.seanet.residual_kernel_size;
    Ok(ResidualWeights {
        conv1: conv(
            ckpt,
            &format!("{model}.{idx}.block.1.conv.conv"),
            [hidden, dim, k],
            hidden,
        )?,
        conv2: conv(
            ckpt,
            &format!("{model}.{idx}.block.3.conv.conv"),
            [dim, hidden, 1],
            dim,
        )?,
    })
}

/// `encoder.model.N`: conv, then per ratio (reversed) residuals, ELU, strided conv; ELU, conv.
fn load_encoder(ckpt: &Checkpoint, cfg: &MimiConfig) -> Result<SeanetWeights> {
    let s = &cfg.seanet;
    let m = "encoder.model";
    let first = conv(
        ckpt,
        &format!("{m}.0.conv.conv"),
        [s.n_filters, s.channels, s.kernel_size],
        s.n_filters,
    )?;
    let mut idx = 1;
    let mut width = s.n_filters;
    let mut stages = Vec::with_capacity(s.ratios.len());
    for &ratio in s.ratios.iter().rev() {
        let mut residuals = Vec::with_capacity(s.n_residual_layers);
        for _ in 0..s.n_residual_layers {
            residuals.push(residual(ckpt, m, idx, width, cfg)?);
            idx += 1;
        }
        idx += 1; // ELU
        let resample = conv(
            ckpt,
            &format!("{m}.{idx}.conv.conv"),
            [2 * width, width, 2 * ratio],
            2 * width,
        )?;
        idx += 1;
        width *= 2;
        stages.push(SeanetStageWeights {
            residuals,
            resample,
        });
    }
    idx += 1; // ELU
    let last = conv(
        ckpt,
        &format!("{m}.{idx}.conv.conv"),
        [s.dimension, width, s.last_kernel_size],
        s.dimension,
    )?;
    Ok(SeanetWeights {
        first,
        stages,
        last,
    })
}

/// `decoder.model.N`: conv, then per ratio ELU, conv-transpose, residuals; ELU, conv.
fn load_decoder(ckpt: &Checkpoint, cfg: &MimiConfig) -> Result<SeanetWeights> {
    let s = &cfg.seanet;
    let m = "decoder.model";
    let mut width = s.n_filters << s.ratios.len();
    let first = conv(
        ckpt,
        &format!("{m}.0.conv.conv"),
        [width, s.dimension, s.kernel_size],
        width,
    )?;
    let mut idx = 1;
    let mut stages = Vec::with_capacity(s.ratios.len());
    for &ratio in &s.ratios {
        idx += 1; // ELU
        let resample = conv(
            ckpt,
            &format!("{m}.{idx}.convtr.convtr"),
            [width, width / 2, 2 * ratio],
            width / 2,
        )?;
        idx += 1;
        width /= 2;
        let mut residuals = Vec::with_capacity(s.n_residual_layers);
        for _ in 0..s.n_residual_layers {
            residuals.push(residual(ckpt, m, idx, width, cfg)?);
            idx += 1;
        }
        stages.push(SeanetStageWeights {
            residuals,
            resample,
        });
    }
    idx += 1; // ELU
    let last = conv(
        ckpt,
        &format!("{m}.{idx}.conv.conv"),
        [s.channels, width, s.last_kernel_size],
        s.channels,
    )?;
    Ok(SeanetWeights {
        first,
        stages,
        last,
    })
}

/// `{which}.transformer.layers.{l}.*`. Attention weights use the official single-weight names
/// (`self_attn.in_proj_weight`, `self_attn.out_proj.weight`); files saved from PyPI moshi's
/// modules (`self_attn.in_projs.0.weight`, `self_attn.out_projs.0.weight`) are read too.
fn load_transformer(
    ckpt: &Checkpoint,
    cfg: &MimiConfig,
    which: &str,
) -> Result<Vec<TransformerLayerWeights>> {
    let t = &cfg.transformer;
    let d = t.d_model;
    let either = |official: &str, pypi: &str, shape: &[usize]| -> Result<Tensor> {
        if !ckpt.contains(official) && ckpt.contains(pypi) {
            ckpt.tensor(pypi, shape)
        } else {
            ckpt.tensor(official, shape)
        }
    };
    (0..t.num_layers)
        .map(|l| {
            let p = format!("{which}.transformer.layers.{l}");
            let scale = |n: usize| -> Result<Option<Tensor>> {
                t.layer_scale
                    .map(|_| ckpt.tensor(&format!("{p}.layer_scale_{n}.scale"), &[d]))
                    .transpose()
            };
            Ok(TransformerLayerWeights {
                in_proj: either(
                    &format!("{p}.self_attn.in_proj_weight"),
                    &format!("{p}.self_attn.in_projs.0.weight"),
                    &[3 * d, d],
                )?,
                out_proj: either(
                    &format!("{p}.self_attn.out_proj.weight"),
                    &format!("{p}.self_attn.out_projs.0.weight"),
                    &[d, d],
                )?,
                norm1_weight: ckpt.tensor(&format!("{p}.norm1.weight"), &[d])?,
                norm1_bias: ckpt.tensor(&format!("{p}.norm1.bias"), &[d])?,
                norm2_weight: ckpt.tensor(&format!("{p}.norm2.weight"), &[d])?,
                norm2_bias: ckpt.tensor(&format!("{p}.norm2.bias"), &[d])?,
                linear1: ckpt.tensor(&format!("{p}.linear1.weight"), &[t.dim_feedforward, d])?,
                linear2: ckpt.tensor(&format!("{p}.linear2.weight"), &[d, t.dim_feedforward])?,
                layer_scale_1: scale(1)?,
                layer_scale_2: scale(2)?,
            })
        })
        .collect()
}

/// `quantizer.{which}.*` with its first `used` codebooks.
fn load_rvq(ckpt: &Checkpoint, cfg: &MimiConfig, which: &str, used: usize) -> Result<RvqWeights> {
    let q = &cfg.quantizer;
    let d = cfg.seanet.dimension;
    let p = format!("quantizer.{which}");
    let codebooks = (0..used)
        .map(|i| {
            let c = format!("{p}.vq.layers.{i}._codebook");
            Ok(CodebookWeights {
                embedding_sum: ckpt
                    .tensor(&format!("{c}.embedding_sum"), &[q.bins, q.dimension])?,
                cluster_usage: ckpt.tensor(&format!("{c}.cluster_usage"), &[q.bins])?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RvqWeights {
        input_proj: ckpt.tensor(&format!("{p}.input_proj.weight"), &[q.dimension, d, 1])?,
        output_proj: ckpt.tensor(&format!("{p}.output_proj.weight"), &[d, q.dimension, 1])?,
        codebooks,
    })
}
