//! Mimi, Kyutai's streaming neural audio codec (24 kHz PCM ↔ 12.5 Hz codes), as used by Moshi
//! and NVIDIA PersonaPlex.
//!
//! Encode: SEANet encoder (PCM → 25 Hz latent) → transformer → stride-2 conv downsample (12.5 Hz)
//! → split RVQ codes. Decode: RVQ sums → depthwise conv-transpose upsample (25 Hz) → transformer →
//! SEANet decoder. The weights ([`Mimi`]) are `&self`; streaming state lives in
//! [`EncoderState`]/[`DecoderState`], one row per slot, so one set of weights serves a batch of
//! sessions. Every step takes an `active` mask: inactive slots compute garbage that the caller
//! ignores and keep their state unchanged. State is updated in place and every step runs the
//! same kernels whatever the mask holds (device masks, the transformers' whole rings), so on a
//! GPU each step can replay a CUDA graph (`replay.rs`).

mod bench;
mod config;
mod conv;
mod quantizer;
mod replay;
mod seanet;
mod transformer;

#[cfg(test)]
mod tests;

pub use bench::{MimiBench, bench_streaming};
pub use config::{MimiConfig, QuantizerConfig, SeanetConfig, TransformerConfig};

use super::Result;
use super::checkpoint::Checkpoint;
use super::checkpoint::mimi::MimiWeights;
use super::graph_cache::GraphMode;
use super::kv::RingPositions;
use candle_core::{DType, Device, Tensor};
use conv::{
    Conv1d, Conv1dState, ConvTr1d, ConvTr1dState, Pad, RowMask, RowMaskMemo, check_active,
    check_slots,
};
use quantizer::SplitRvq;
use seanet::{SeanetDecoder, SeanetEncoder, SeanetState};
use std::ops::Range;
use transformer::{Transformer, TransformerPlan, TransformerState};

/// The codec's weights.
#[derive(Debug, Clone)]
pub struct Mimi {
    cfg: MimiConfig,
    encoder: SeanetEncoder,
    encoder_transformer: Transformer,
    downsample: Conv1d,
    quantizer: SplitRvq,
    upsample: ConvTr1d,
    decoder_transformer: Transformer,
    decoder: SeanetDecoder,
    dtype: DType,
    device: Device,
    span_encode: tracing::Span,
    span_decode: tracing::Span,
    span_downsample: tracing::Span,
    span_upsample: tracing::Span,
}

/// Streaming encoder state for a batch of slots.
pub struct EncoderState {
    batch: usize,
    seanet: SeanetState,
    transformer: TransformerState,
    downsample: Conv1dState,
    masks: RowMaskMemo,
    graphs: GraphMode,
}

/// Streaming decoder state for a batch of slots.
pub struct DecoderState {
    batch: usize,
    upsample: ConvTr1dState,
    transformer: TransformerState,
    seanet: SeanetState,
    masks: RowMaskMemo,
    graphs: GraphMode,
}

impl EncoderState {
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Returns slot `slot_idx` to the start state (a new stream).
    pub fn reset_slot(&mut self, slot_idx: usize) -> Result<()> {
        self.reset(slot_idx..slot_idx + 1)
    }

    pub fn reset_all(&mut self) -> Result<()> {
        self.reset(0..self.batch)
    }

    fn reset(&mut self, slots: Range<usize>) -> Result<()> {
        check_slots(&slots, self.batch)?;
        self.seanet.reset(slots.clone())?;
        self.transformer.reset(slots.clone());
        self.downsample.reset(slots)
    }
}

impl DecoderState {
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Returns slot `slot_idx` to the start state (a new stream).
    pub fn reset_slot(&mut self, slot_idx: usize) -> Result<()> {
        self.reset(slot_idx..slot_idx + 1)
    }

    pub fn reset_all(&mut self) -> Result<()> {
        self.reset(0..self.batch)
    }

    fn reset(&mut self, slots: Range<usize>) -> Result<()> {
        check_slots(&slots, self.batch)?;
        self.upsample.reset(slots.clone())?;
        self.transformer.reset(slots.clone());
        self.seanet.reset(slots)
    }
}

/// What a streaming step reads besides its input and the state, made on the host each frame:
/// which rows advance, and the transformer's plan. A CUDA graph of the step is told these
/// tensors each frame.
struct StepPlan {
    mask: RowMask,
    transformer: Option<TransformerPlan>,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl StepPlan {
    fn tensors(&self) -> Result<Vec<&Tensor>> {
        let mut tensors = self.mask.tensors().to_vec();
        if let Some(plan) = &self.transformer {
            tensors.extend(plan.tensors()?);
        }
        Ok(tensors)
    }

    /// This plan reading its tensors from `buffers` (ordered as `tensors`).
    fn with_tensors(&self, buffers: &[Tensor]) -> Result<Self> {
        let [active, idle, rest @ ..] = buffers else {
            candle_core::bail!(
                "a Mimi step needs its two masks, got {} tensors",
                buffers.len()
            )
        };
        Ok(Self {
            mask: RowMask::from_tensors(active.clone(), idle.clone()),
            transformer: self
                .transformer
                .as_ref()
                .map(|plan| plan.with_tensors(rest))
                .transpose()?,
        })
    }
}

/// What the non-streaming encoder computes on the way to the codes (for parity checks).
pub struct EncodeTrace {
    pub seanet: Tensor,
    pub transformer: Tensor,
    pub latent: Tensor,
    pub codes: Tensor,
}

/// What the non-streaming decoder computes on the way to the PCM.
pub struct DecodeTrace {
    pub latent: Tensor,
    pub upsampled: Tensor,
    pub transformer: Tensor,
    pub pcm: Tensor,
}

impl Mimi {
    /// Builds the codec from `ckpt` (official names) for `cfg`; `positions` picks the ring-KV
    /// semantics of the transformers (`PersonaPlex` is what the official server computes).
    pub fn load(ckpt: &Checkpoint, cfg: &MimiConfig, positions: RingPositions) -> Result<Self> {
        let w = MimiWeights::load(ckpt, cfg)?;
        let stride = cfg.resample_stride();
        Ok(Self {
            cfg: cfg.clone(),
            encoder: SeanetEncoder::new(&w.encoder, cfg)?,
            encoder_transformer: Transformer::new(
                &w.encoder_transformer,
                cfg,
                positions,
                "encoder",
            )?,
            downsample: Conv1d::new(&checkpoint_conv(&w.downsample), stride, 1, Pad::Replicate)?,
            quantizer: SplitRvq::new(&w.rvq_first, &w.rvq_rest)?,
            upsample: ConvTr1d::depthwise(&w.upsample, stride)?,
            decoder_transformer: Transformer::new(
                &w.decoder_transformer,
                cfg,
                positions,
                "decoder",
            )?,
            decoder: SeanetDecoder::new(&w.decoder, cfg)?,
            dtype: ckpt.dtype(),
            device: ckpt.device().clone(),
            span_encode: tracing::span!(tracing::Level::TRACE, "mimi_encode"),
            span_decode: tracing::span!(tracing::Level::TRACE, "mimi_decode"),
            span_downsample: tracing::span!(tracing::Level::TRACE, "mimi_downsample"),
            span_upsample: tracing::span!(tracing::Level::TRACE, "mimi_upsample"),
        })
    }

    /// Bytes of one slot's streaming state: the encoder's and the decoder's attention rings (f32;
    /// the convolutions' few frames of history are small beside them).
    pub fn slot_state_bytes(&self) -> u64 {
        let t = &self.cfg.transformer;
        let ring = t.num_layers * t.context.unwrap_or(0) * t.d_model;
        (2 * 2 * ring * std::mem::size_of::<f32>()) as u64
    }

    pub fn config(&self) -> &MimiConfig {
        &self.cfg
    }

    /// PCM samples per code frame (1920).
    pub fn frame_samples(&self) -> usize {
        self.cfg.frame_samples()
    }

    pub fn num_codebooks(&self) -> usize {
        self.quantizer.num_codebooks()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn encoder_state(&self, batch: usize) -> Result<EncoderState> {
        Ok(EncoderState {
            batch,
            seanet: self.encoder.state(batch)?,
            transformer: self.encoder_transformer.state(batch)?,
            downsample: self.downsample.state(batch)?,
            masks: RowMaskMemo::default(),
            graphs: GraphMode::Off,
        })
    }

    pub fn decoder_state(&self, batch: usize) -> Result<DecoderState> {
        Ok(DecoderState {
            batch,
            upsample: self.upsample.state(batch)?,
            transformer: self.decoder_transformer.state(batch)?,
            seanet: self.decoder.state(batch)?,
            masks: RowMaskMemo::default(),
            graphs: GraphMode::Off,
        })
    }

    /// One 80 ms frame for each of the first `rows` slots: `pcm` `[rows, channels,
    /// frame_samples]` → codes `[rows, num_codebooks]` (u32). Slots with `active[i] == false`,
    /// and all past `rows`, keep their state.
    pub fn encode_step(
        &self,
        pcm: &Tensor,
        state: &mut EncoderState,
        active: &[bool],
    ) -> Result<Tensor> {
        let _enter = self.span_encode.enter();
        let (batch, channels, samples) = pcm.dims3()?;
        if batch > state.batch || channels != self.cfg.channels || samples != self.frame_samples() {
            candle_core::bail!(
                "mimi encode_step: pcm {:?}, expected [at most {}, {}, {}]",
                pcm.dims(),
                state.batch,
                self.cfg.channels,
                self.frame_samples()
            );
        }
        check_active(active, batch)?;
        let plan = self.plan_step(
            &self.encoder_transformer,
            &mut state.transformer,
            &mut state.masks,
            active,
        )?;
        if let Some(codes) = self.replay_encode(pcm, state, &plan)? {
            return Ok(codes);
        }
        self.encode_planned(pcm, state, &plan)
    }

    /// Plans a step of the first `active.len()` slots: its masks (from `masks`), and
    /// `transformer`'s ring writes and rotations (each active slot advances one frame of
    /// transformer tokens).
    fn plan_step(
        &self,
        transformer: &Transformer,
        state: &mut TransformerState,
        masks: &mut RowMaskMemo,
        active: &[bool],
    ) -> Result<StepPlan> {
        Ok(StepPlan {
            mask: masks.get(active, &self.device)?,
            transformer: transformer.plan(state, self.cfg.resample_stride(), active)?,
        })
    }

    /// `encode_step` once the step is planned (what a CUDA graph of it captures).
    fn encode_planned(
        &self,
        pcm: &Tensor,
        state: &mut EncoderState,
        plan: &StepPlan,
    ) -> Result<Tensor> {
        let pcm = pcm.to_dtype(self.dtype)?;
        let xs = self.encoder.step(&pcm, &mut state.seanet, &plan.mask)?;
        let xs =
            self.encoder_transformer
                .step(&xs, &state.transformer, plan.transformer.as_ref())?;
        let latent = {
            let _enter = self.span_downsample.enter();
            self.downsample
                .step(&xs, &mut state.downsample, &plan.mask)?
        };
        self.quantizer.encode(&latent)?.squeeze(2)
    }

    /// One frame of codes for each of the first `rows` slots: `codes` `[rows, num_codebooks]`
    /// (u32) → PCM `[rows, channels, frame_samples]` (f32). Slots with `active[i] == false`,
    /// and all past `rows`, keep their state.
    pub fn decode_step(
        &self,
        codes: &Tensor,
        state: &mut DecoderState,
        active: &[bool],
    ) -> Result<Tensor> {
        let _enter = self.span_decode.enter();
        let (batch, n) = codes.dims2()?;
        if batch > state.batch || n != self.num_codebooks() {
            candle_core::bail!(
                "mimi decode_step: codes {:?}, expected [at most {}, {}]",
                codes.dims(),
                state.batch,
                self.num_codebooks()
            );
        }
        check_active(active, batch)?;
        let plan = self.plan_step(
            &self.decoder_transformer,
            &mut state.transformer,
            &mut state.masks,
            active,
        )?;
        if let Some(pcm) = self.replay_decode(codes, state, &plan)? {
            return Ok(pcm);
        }
        self.decode_planned(codes, state, &plan)
    }

    /// `decode_step` once the step is planned (what a CUDA graph of it captures).
    fn decode_planned(
        &self,
        codes: &Tensor,
        state: &mut DecoderState,
        plan: &StepPlan,
    ) -> Result<Tensor> {
        let latent = self.quantizer.decode(&codes.unsqueeze(2)?, self.dtype)?;
        let xs = {
            let _enter = self.span_upsample.enter();
            self.upsample
                .step(&latent, &mut state.upsample, &plan.mask)?
        };
        let xs =
            self.decoder_transformer
                .step(&xs, &state.transformer, plan.transformer.as_ref())?;
        self.decoder
            .step(&xs, &mut state.seanet, &plan.mask)?
            .to_dtype(DType::F32)
    }

    /// Non-streaming encode of whole signals: `pcm` `[b, channels, t]` → codes `[b, n, frames]`
    /// (u32). The end is zero-padded to a whole frame, as the reference does.
    pub fn encode(&self, pcm: &Tensor) -> Result<Tensor> {
        Ok(self.encode_trace(pcm)?.codes)
    }

    /// Non-streaming decode: codes `[b, n, frames]` → PCM `[b, channels, frames · frame_samples]`.
    pub fn decode(&self, codes: &Tensor) -> Result<Tensor> {
        Ok(self.decode_trace(codes)?.pcm)
    }

    pub fn encode_trace(&self, pcm: &Tensor) -> Result<EncodeTrace> {
        let _enter = self.span_encode.enter();
        let (b, channels, t) = pcm.dims3()?;
        if channels != self.cfg.channels || t == 0 {
            candle_core::bail!(
                "mimi encode: pcm {:?}, expected [b, {}, t > 0]",
                pcm.dims(),
                self.cfg.channels
            );
        }
        let frame = self.frame_samples();
        let pcm = pcm
            .to_dtype(self.dtype)?
            .pad_with_zeros(2, 0, t.div_ceil(frame) * frame - t)?;
        let all = RowMask::all(b, &self.device)?;
        let seanet = self.encoder.step(&pcm, &mut self.encoder.state(b)?, &all)?;
        let transformer = self.encoder_transformer.forward(&seanet)?;
        let latent = {
            let _enter = self.span_downsample.enter();
            self.downsample
                .step(&transformer, &mut self.downsample.state(b)?, &all)?
        };
        let codes = self.quantizer.encode(&latent)?;
        Ok(EncodeTrace {
            seanet,
            transformer,
            latent,
            codes,
        })
    }

    pub fn decode_trace(&self, codes: &Tensor) -> Result<DecodeTrace> {
        let _enter = self.span_decode.enter();
        let (b, _, frames) = codes.dims3()?;
        if frames == 0 {
            candle_core::bail!("mimi decode: no frames in codes {:?}", codes.dims());
        }
        let all = RowMask::all(b, &self.device)?;
        let latent = self.quantizer.decode(codes, self.dtype)?;
        let upsampled = {
            let _enter = self.span_upsample.enter();
            self.upsample
                .step(&latent, &mut self.upsample.state(b)?, &all)?
        };
        let transformer = self.decoder_transformer.forward(&upsampled)?;
        let pcm = self
            .decoder
            .step(&transformer, &mut self.decoder.state(b)?, &all)?
            .to_dtype(DType::F32)?;
        Ok(DecodeTrace {
            latent,
            upsampled,
            transformer,
            pcm,
        })
    }
}

/// The downsample conv has no bias.
fn checkpoint_conv(weight: &Tensor) -> super::checkpoint::mimi::ConvWeights {
    super::checkpoint::mimi::ConvWeights {
        weight: weight.clone(),
        bias: None,
    }
}
