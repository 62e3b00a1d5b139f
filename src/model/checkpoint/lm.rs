//! The language model's tensors by role, read from the official PersonaPlex/Moshi names.

use super::Checkpoint;
use crate::model::Result;
use crate::model::config::LmConfig;
use candle_core::Tensor;

/// One temporal transformer layer.
pub struct TemporalLayerWeights {
    pub norm1: Tensor,
    pub norm2: Tensor,
    /// Packed q|k|v, `[3 dim, dim]`.
    pub in_proj: Tensor,
    pub out_proj: Tensor,
    pub linear_in: Tensor,
    pub linear_out: Tensor,
}

/// One depformer layer's weights for one step (attention and FFN are per step).
pub struct DepformerLayerStepWeights {
    pub in_proj: Tensor,
    pub out_proj: Tensor,
    pub linear_in: Tensor,
    pub linear_out: Tensor,
}

/// Everything depformer step `k` uses besides the shared norms.
pub struct DepformerStepWeights {
    /// `depformer_in.{k}`: temporal hidden → depformer width.
    pub input: Tensor,
    /// Embedding of the previous token: the text token for step 0, codebook `k−1` otherwise.
    pub emb: Tensor,
    /// `linears.{k}`: the output head over the audio vocabulary.
    pub head: Tensor,
    pub layers: Vec<DepformerLayerStepWeights>,
}

pub struct DepformerWeights {
    /// `(norm1, norm2)` per layer, shared by every step.
    pub norms: Vec<(Tensor, Tensor)>,
    pub steps: Vec<DepformerStepWeights>,
}

pub struct LmWeights {
    pub text_emb: Tensor,
    pub audio_emb: Vec<Tensor>,
    pub text_linear: Tensor,
    pub out_norm: Tensor,
    pub layers: Vec<TemporalLayerWeights>,
    pub depformer: DepformerWeights,
}

impl LmWeights {
    /// Reads the model, materialising only the first `dep_steps` depformer steps.
    pub fn load(ckpt: &Checkpoint, cfg: &LmConfig, dep_steps: usize) -> Result<Self> {
        if dep_steps == 0 || dep_steps > cfg.dep_q {
            candle_core::bail!(
                "cannot run {dep_steps} depformer steps of a checkpoint with {}",
                cfg.dep_q
            );
        }
        let (dim, hidden) = (cfg.dim, cfg.hidden());
        let layers = (0..cfg.num_layers)
            .map(|l| {
                let p = format!("transformer.layers.{l}");
                Ok(TemporalLayerWeights {
                    norm1: ckpt.tensor(&format!("{p}.norm1.alpha"), &[1, 1, dim])?,
                    norm2: ckpt.tensor(&format!("{p}.norm2.alpha"), &[1, 1, dim])?,
                    in_proj: ckpt
                        .tensor(&format!("{p}.self_attn.in_proj_weight"), &[3 * dim, dim])?,
                    out_proj: ckpt
                        .tensor(&format!("{p}.self_attn.out_proj.weight"), &[dim, dim])?,
                    linear_in: ckpt
                        .tensor(&format!("{p}.gating.linear_in.weight"), &[2 * hidden, dim])?,
                    linear_out: ckpt
                        .tensor(&format!("{p}.gating.linear_out.weight"), &[dim, hidden])?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            text_emb: ckpt.tensor("text_emb.weight", &[cfg.text_card + 1, dim])?,
            audio_emb: (0..cfg.n_q)
                .map(|q| ckpt.tensor(&format!("emb.{q}.weight"), &[cfg.card + 1, dim]))
                .collect::<Result<_>>()?,
            text_linear: ckpt.tensor("text_linear.weight", &[cfg.text_card, dim])?,
            out_norm: ckpt.tensor("out_norm.alpha", &[1, 1, dim])?,
            layers,
            depformer: load_depformer(ckpt, cfg, dep_steps)?,
        })
    }
}

fn load_depformer(ckpt: &Checkpoint, cfg: &LmConfig, dep_steps: usize) -> Result<DepformerWeights> {
    let (dd, hidden, total) = (cfg.depformer_dim, cfg.depformer_hidden(), cfg.dep_q);
    // The per-step attention weights are stacked along dim 0: step k owns rows k·3dd .. (k+1)·3dd.
    let stacked: Vec<(Tensor, Tensor)> = (0..cfg.depformer_num_layers)
        .map(|l| {
            let p = format!("depformer.layers.{l}.self_attn");
            let in_proj = ckpt.tensor(&format!("{p}.in_proj_weight"), &[total * 3 * dd, dd])?;
            let out_proj = ckpt.tensor(&format!("{p}.out_proj.weight"), &[total * dd, dd])?;
            Ok((in_proj, out_proj))
        })
        .collect::<Result<_>>()?;
    let norms = (0..cfg.depformer_num_layers)
        .map(|l| {
            let p = format!("depformer.layers.{l}");
            Ok((
                ckpt.tensor(&format!("{p}.norm1.alpha"), &[1, 1, dd])?,
                ckpt.tensor(&format!("{p}.norm2.alpha"), &[1, 1, dd])?,
            ))
        })
        .collect::<Result<_>>()?;
    let steps = (0..dep_steps)
        .map(|k| {
            let layers = stacked
                .iter()
                .enumerate()
                .map(|(l, (in_proj, out_proj))| {
                    let p = format!("depformer.layers.{l}.gating.{k}");
                    Ok(DepformerLayerStepWeights {
                        in_proj: in_proj.narrow(0, k * 3 * dd, 3 * dd)?.force_contiguous()?,
                        out_proj: out_proj.narrow(0, k * dd, dd)?.force_contiguous()?,
                        linear_in: ckpt
                            .tensor(&format!("{p}.linear_in.weight"), &[2 * hidden, dd])?,
                        linear_out: ckpt
                            .tensor(&format!("{p}.linear_out.weight"), &[dd, hidden])?,
                    })
                })
                .collect::<Result<_>>()?;
            let emb = if k == 0 {
                ckpt.tensor("depformer_text_emb.weight", &[cfg.text_card + 1, dd])?
            } else {
                ckpt.tensor(
                    &format!("depformer_emb.{}.weight", k - 1),
                    &[cfg.card + 1, dd],
                )?
            };
            Ok(DepformerStepWeights {
                input: ckpt.tensor(&format!("depformer_in.{k}.weight"), &[dd, cfg.dim])?,
                emb,
                head: ckpt.tensor(&format!("linears.{k}.weight"), &[cfg.card, dd])?,
                layers,
            })
        })
        .collect::<Result<_>>()?;
    Ok(DepformerWeights { norms, steps })
}
