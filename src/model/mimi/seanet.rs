//! The SEANet encoder (PCM → 25 Hz latent) and decoder (25 Hz latent → PCM), causal and streaming.

use super::conv::{Conv1d, Conv1dState, ConvTr1d, ConvTr1dState, Pad, RowMask};
use crate::model::Result;
use crate::model::checkpoint::mimi::{ResidualWeights, SeanetWeights};
use crate::model::mimi::MimiConfig;
use candle_core::Tensor;
use std::ops::Range;

/// `x + conv2(elu(conv1(elu(x))))` (true skip).
#[derive(Debug, Clone)]
struct Residual {
    conv1: Conv1d,
    conv2: Conv1d,
}

impl Residual {
    fn new(w: &ResidualWeights, dilation: usize) -> Result<Self> {
        Ok(Self {
            conv1: Conv1d::new(&w.conv1, 1, dilation, Pad::Constant)?,
            conv2: Conv1d::new(&w.conv2, 1, 1, Pad::Constant)?,
        })
    }

    fn step(&self, xs: &Tensor, states: &mut ConvStates, mask: &RowMask) -> Result<Tensor> {
        // Read twice below: one contiguous copy (the decoder's come from a narrow).
        let xs = xs.contiguous()?;
        let ys = self
            .conv1
            .step_after(&xs, states.next(), mask, true, None)?;
        self.conv2
            .step_after(&ys, states.next(), mask, true, Some(&xs))
    }

    fn states(&self, batch: usize, out: &mut Vec<Conv1dState>) -> Result<()> {
        out.push(self.conv1.state(batch)?);
        out.push(self.conv2.state(batch)?);
        Ok(())
    }
}

fn elu(xs: &Tensor) -> Result<Tensor> {
    xs.elu(1.0)
}

/// Hands out a model's conv states in the order its layers run.
struct ConvStates<'a>(std::slice::IterMut<'a, Conv1dState>);

impl<'a> ConvStates<'a> {
    fn next(&mut self) -> &'a mut Conv1dState {
        // The state vector is built by walking the same layers, so it cannot run short.
        self.0
            .next()
            .expect("one conv state per conv, built from the same layers")
    }
}

/// Streaming state of a SEANet encoder or decoder: every conv's left context and every
/// conv-transpose's pending overlap, in the order they run.
#[derive(Debug)]
pub(super) struct SeanetState {
    convs: Vec<Conv1dState>,
    convtrs: Vec<ConvTr1dState>,
}

impl SeanetState {
    pub fn reset(&mut self, slots: Range<usize>) -> Result<()> {
        self.convs
            .iter_mut()
            .try_for_each(|s| s.reset(slots.clone()))?;
        self.convtrs
            .iter_mut()
            .try_for_each(|s| s.reset(slots.clone()))
    }

    /// Every conv's buffers (to save and restore around a graph capture).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn buffers(&self) -> impl Iterator<Item = &Tensor> {
        let convs = self.convs.iter().flat_map(Conv1dState::buffers);
        convs.chain(self.convtrs.iter().flat_map(ConvTr1dState::buffers))
    }
}

#[derive(Debug, Clone)]
struct Stage {
    residuals: Vec<Residual>,
    down: Conv1d,
}

/// Conv, then per ratio (4, 5, 6, 8) residual blocks, ELU and a strided conv; ELU, conv.
#[derive(Debug, Clone)]
pub(super) struct SeanetEncoder {
    first: Conv1d,
    stages: Vec<Stage>,
    last: Conv1d,
    span: tracing::Span,
}

impl SeanetEncoder {
    pub fn new(w: &SeanetWeights, cfg: &MimiConfig) -> Result<Self> {
        let s = &cfg.seanet;
        let stages = w
            .stages
            .iter()
            .zip(s.ratios.iter().rev())
            .map(|(stage, &ratio)| {
                Ok(Stage {
                    residuals: residuals(&stage.residuals, s.dilation_base)?,
                    down: Conv1d::new(&stage.resample, ratio, 1, Pad::Constant)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            first: Conv1d::new(&w.first, 1, 1, Pad::Constant)?,
            stages,
            last: Conv1d::new(&w.last, 1, 1, Pad::Constant)?,
            span: tracing::span!(tracing::Level::TRACE, "mimi_seanet_encoder"),
        })
    }

    pub fn state(&self, batch: usize) -> Result<SeanetState> {
        let mut convs = vec![self.first.state(batch)?];
        for stage in &self.stages {
            for r in &stage.residuals {
                r.states(batch, &mut convs)?;
            }
            convs.push(stage.down.state(batch)?);
        }
        convs.push(self.last.state(batch)?);
        Ok(SeanetState {
            convs,
            convtrs: vec![],
        })
    }

    /// `[batch, channels, t]` (t a multiple of the hop) → `[batch, dimension, t / hop]`.
    pub fn step(&self, xs: &Tensor, state: &mut SeanetState, mask: &RowMask) -> Result<Tensor> {
        let _enter = self.span.enter();
        let mut states = ConvStates(state.convs.iter_mut());
        let mut xs = self
            .first
            .step_after(xs, states.next(), mask, false, None)?;
        for stage in &self.stages {
            for r in &stage.residuals {
                xs = r.step(&xs, &mut states, mask)?;
            }
            xs = stage
                .down
                .step_after(&xs, states.next(), mask, true, None)?;
        }
        self.last.step_after(&xs, states.next(), mask, true, None)
    }
}

#[derive(Debug, Clone)]
struct UpStage {
    up: ConvTr1d,
    residuals: Vec<Residual>,
}

/// Conv, then per ratio (8, 6, 5, 4) ELU, a strided conv-transpose and residual blocks; ELU, conv.
#[derive(Debug, Clone)]
pub(super) struct SeanetDecoder {
    first: Conv1d,
    stages: Vec<UpStage>,
    last: Conv1d,
    span: tracing::Span,
}

impl SeanetDecoder {
    pub fn new(w: &SeanetWeights, cfg: &MimiConfig) -> Result<Self> {
        let s = &cfg.seanet;
        let stages = w
            .stages
            .iter()
            .zip(&s.ratios)
            .map(|(stage, &ratio)| {
                Ok(UpStage {
                    up: ConvTr1d::dense(&stage.resample, ratio)?,
                    residuals: residuals(&stage.residuals, s.dilation_base)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            first: Conv1d::new(&w.first, 1, 1, Pad::Constant)?,
            stages,
            last: Conv1d::new(&w.last, 1, 1, Pad::Constant)?,
            span: tracing::span!(tracing::Level::TRACE, "mimi_seanet_decoder"),
        })
    }

    pub fn state(&self, batch: usize) -> Result<SeanetState> {
        let mut convs = vec![self.first.state(batch)?];
        let mut convtrs = vec![];
        for stage in &self.stages {
            convtrs.push(stage.up.state(batch)?);
            for r in &stage.residuals {
                r.states(batch, &mut convs)?;
            }
        }
        convs.push(self.last.state(batch)?);
        Ok(SeanetState { convs, convtrs })
    }

    /// `[batch, dimension, t]` → `[batch, channels, t · hop]`.
    pub fn step(&self, xs: &Tensor, state: &mut SeanetState, mask: &RowMask) -> Result<Tensor> {
        let _enter = self.span.enter();
        let mut states = ConvStates(state.convs.iter_mut());
        let mut trs = state.convtrs.iter_mut();
        let mut xs = self
            .first
            .step_after(xs, states.next(), mask, false, None)?;
        for stage in &self.stages {
            let tr_state = trs
                .next()
                .expect("one conv-transpose state per stage, built from the same stages");
            xs = stage.up.step(&elu(&xs)?, tr_state, mask)?;
            for r in &stage.residuals {
                xs = r.step(&xs, &mut states, mask)?;
            }
        }
        self.last.step_after(&xs, states.next(), mask, true, None)
    }
}

fn residuals(w: &[ResidualWeights], dilation_base: usize) -> Result<Vec<Residual>> {
    w.iter()
        .enumerate()
        .map(|(j, r)| Residual::new(r, dilation_base.pow(j as u32)))
        .collect()
}
