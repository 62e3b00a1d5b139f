//! Causal streaming convolutions with per-slot state, as in `moshi.modules.conv`.
//!
//! A conv keeps the last `kernel_eff − stride` input samples of each slot and prepends them to the
//! next chunk; a fresh state holds zeros (constant padding) or, for the replicate-padded
//! downsample, the first sample of the first chunk. A conv-transpose keeps the `kernel − stride`
//! output samples that overlap the next chunk (without bias) and adds them back. Running a fresh
//! state over a whole signal is exactly the reference's non-streaming forward.

use crate::model::Result;
use crate::model::checkpoint::mimi::ConvWeights;
use candle_core::{DType, Device, Tensor};
use std::ops::Range;

/// Which of a step's rows advance, as device masks `[rows]` (u8). Every step runs the same
/// kernels whatever the masks hold, so a step can be captured once as a CUDA graph and replayed
/// with other masks.
#[derive(Debug, Clone)]
pub(super) struct RowMask {
    /// 1 for the rows that advance.
    active: Tensor,
    /// 1 for the rows that sit the step out.
    idle: Tensor,
}

impl RowMask {
    pub fn new(active: &[bool], device: &Device) -> Result<Self> {
        let flags =
            |value: bool| -> Vec<u8> { active.iter().map(|&a| u8::from(a == value)).collect() };
        Ok(Self {
            active: Tensor::new(flags(true).as_slice(), device)?,
            idle: Tensor::new(flags(false).as_slice(), device)?,
        })
    }

    /// Every one of `rows` rows advances.
    pub fn all(rows: usize, device: &Device) -> Result<Self> {
        Self::new(&vec![true; rows], device)
    }

    /// The masks read from other tensors (a CUDA graph's input buffers).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn from_tensors(active: Tensor, idle: Tensor) -> Self {
        Self { active, idle }
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn tensors(&self) -> [&Tensor; 2] {
        [&self.active, &self.idle]
    }

    /// Rows of `new` where the row advances, of `old` elsewhere.
    pub fn select(&self, new: &Tensor, old: &Tensor) -> Result<Tensor> {
        select_rows(&self.active, new, old)
    }
}

/// Row masks already on the device, by pattern: a stream's steps repeat a few patterns (most
/// often every row busy), so each is uploaded once rather than every step.
#[derive(Debug, Default)]
pub(super) struct RowMaskMemo(Vec<(Vec<bool>, RowMask)>);

/// Patterns a `RowMaskMemo` keeps.
const ROW_MASK_MEMO: usize = 16;

impl RowMaskMemo {
    pub fn get(&mut self, active: &[bool], device: &Device) -> Result<RowMask> {
        if let Some((_, mask)) = self.0.iter().find(|(pattern, _)| pattern == active) {
            return Ok(mask.clone());
        }
        let mask = RowMask::new(active, device)?;
        if self.0.len() == ROW_MASK_MEMO {
            self.0.remove(0);
        }
        self.0.push((active.to_vec(), mask.clone()));
        Ok(mask)
    }
}

/// Rows (dim 0) of `new` where `take` (u8 `[rows]`) is 1, of `old` elsewhere.
fn select_rows(take: &Tensor, new: &Tensor, old: &Tensor) -> Result<Tensor> {
    let mut shape = vec![1; old.rank()];
    shape[0] = take.dim(0)?;
    take.reshape(shape)?
        .broadcast_as(old.shape())?
        .where_cond(new, old)
}

/// Writes `rows` (the first rows of `state`'s shape) into `state` in place: the state keeps its
/// buffer, so a captured graph that updates it stays valid.
fn store(state: &Tensor, rows: &Tensor) -> Result<()> {
    if rows.elem_count() == 0 {
        // CUDA refuses zero-size launches (a convolution with nothing to carry).
        return Ok(());
    }
    state.slice_set(rows, 0, 0)
}

/// Sets `slots` of `state` (dim 0) to ones or zeros, in place.
fn fill_rows(state: &Tensor, slots: Range<usize>, ones: bool) -> Result<()> {
    let mut dims = state.dims().to_vec();
    dims[0] = slots.len();
    if dims.iter().product::<usize>() == 0 {
        return Ok(());
    }
    let filled = match ones {
        true => Tensor::ones(dims, state.dtype(), state.device())?,
        false => Tensor::zeros(dims, state.dtype(), state.device())?,
    };
    state.slice_set(&filled, 0, slots.start)
}

/// Checks a slot range against a batch.
pub(super) fn check_slots(slots: &Range<usize>, batch: usize) -> Result<()> {
    if slots.end > batch {
        candle_core::bail!("slots {slots:?} are out of range for a batch of {batch}");
    }
    Ok(())
}

pub(super) fn check_active(active: &[bool], batch: usize) -> Result<()> {
    if active.len() != batch {
        candle_core::bail!(
            "active mask has {} entries for a batch of {batch}",
            active.len()
        );
    }
    Ok(())
}

/// How a fresh state fills the left context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pad {
    /// Zeros (SEANet).
    Constant,
    /// The first sample of the first chunk, repeated (the conv downsample).
    Replicate,
}

/// A causal 1-D convolution.
#[derive(Debug, Clone)]
pub(super) struct Conv1d {
    /// `[out, in, kernel]`.
    weight: Tensor,
    /// `[1, out, 1]`.
    bias: Option<Tensor>,
    stride: usize,
    dilation: usize,
    pad: Pad,
    in_channels: usize,
    /// Input samples kept between chunks: `(kernel − 1)·dilation + 1 − stride`.
    context: usize,
}

/// One conv's left context for every slot, updated in place (its buffers never change).
#[derive(Debug)]
pub(super) struct Conv1dState {
    /// `[batch, in_channels, context]`.
    prev: Tensor,
    /// Replicate padding only: 1 for a slot that has not seen a sample since its reset, u8
    /// `[batch]`.
    fresh: Option<Tensor>,
}

/// A bias `[n]` as `[1, n, 1]`, ready to broadcast over `[batch, n, t]`.
fn channel_bias(bias: &Option<Tensor>) -> Result<Option<Tensor>> {
    bias.as_ref()
        .map(|b| b.reshape((1, b.elem_count(), 1)))
        .transpose()
}

impl Conv1d {
    pub fn new(w: &ConvWeights, stride: usize, dilation: usize, pad: Pad) -> Result<Self> {
        let (_, in_channels, kernel) = w.weight.dims3()?;
        let span = (kernel - 1) * dilation + 1;
        if stride == 0 || span < stride {
            candle_core::bail!(
                "a causal conv needs 0 < stride <= kernel span, got stride {stride}, kernel {kernel}, dilation {dilation}"
            );
        }
        Ok(Self {
            weight: w.weight.clone(),
            bias: channel_bias(&w.bias)?,
            stride,
            dilation,
            pad,
            in_channels,
            context: span - stride,
        })
    }

    pub fn state(&self, batch: usize) -> Result<Conv1dState> {
        let device = self.weight.device();
        Ok(Conv1dState {
            prev: Tensor::zeros(
                (batch, self.in_channels, self.context),
                self.weight.dtype(),
                device,
            )?,
            fresh: match self.pad {
                Pad::Replicate if self.context > 0 => Some(Tensor::ones(batch, DType::U8, device)?),
                _ => None,
            },
        })
    }

    /// `step` of `elu(xs)` when `elu` (SEANet's activation before most of its convs), plus
    /// `residual` where given (a residual block's skip connection). On a GPU in f32 it runs our
    /// kernels around one product (`kernels/conv.cu`: the context, the ELU and the input's
    /// layout in one launch, the bias and skip connection in another), unless candle's ops are
    /// asked for; a replicate-padded conv stays on candle's ops.
    pub fn step_after(
        &self,
        xs: &Tensor,
        state: &mut Conv1dState,
        mask: &RowMask,
        elu: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if self.runs_kernels(xs, state) {
            return self.step_kernels(xs, state, mask, elu, residual);
        }
        let ys = match elu {
            true => self.step(&xs.elu(1.0)?, state, mask)?,
            false => self.step(xs, state, mask)?,
        };
        match residual {
            Some(residual) => residual + ys,
            None => Ok(ys),
        }
    }

    #[cfg(feature = "cuda")]
    fn runs_kernels(&self, xs: &Tensor, state: &Conv1dState) -> bool {
        xs.device().is_cuda()
            && xs.dtype() == DType::F32
            && state.fresh.is_none()
            && self.context <= crate::model::cuda::STREAM_CONV_MAX_CONTEXT
            && !crate::model::nn::candle_ops_requested()
    }

    #[cfg(feature = "cuda")]
    fn step_kernels(
        &self,
        xs: &Tensor,
        state: &mut Conv1dState,
        mask: &RowMask,
        elu: bool,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        use crate::model::cuda;
        self.check_chunk(xs)?;
        let conv = cuda::StreamConv {
            kernel: self.weight.dim(2)?,
            stride: self.stride,
            dilation: self.dilation,
            elu,
        };
        let prev = (self.context > 0).then_some(&state.prev);
        let (weight, bias) = (&self.weight, self.bias.as_ref());
        cuda::stream_conv(xs, prev, &mask.active, weight, bias, residual, conv)
    }

    /// Refuses a chunk `xs` `[rows, in, t]` of no samples or not a whole number of strides.
    fn check_chunk(&self, xs: &Tensor) -> Result<()> {
        let time = xs.dim(2)?;
        if time == 0 || time % self.stride != 0 {
            candle_core::bail!(
                "a streaming conv of stride {} got a chunk of {time} samples",
                self.stride
            );
        }
        Ok(())
    }

    /// `xs` `[rows, in, t]` with `t` a multiple of the stride → `[rows, out, t / stride]`, for
    /// the first `rows` slots of the state; the rows `mask` marks idle keep their context.
    pub fn step(&self, xs: &Tensor, state: &mut Conv1dState, mask: &RowMask) -> Result<Tensor> {
        self.check_chunk(xs)?;
        let context = self.context;
        let xs = if context == 0 {
            xs.clone()
        } else {
            let prev = state.left_context(xs, mask)?;
            let xs = Tensor::cat(&[&prev, xs], 2)?;
            let tail = xs.narrow(2, xs.dim(2)? - context, context)?;
            store(&state.prev, &mask.select(&tail, &prev)?)?;
            xs
        };
        let ys = xs.conv1d(&self.weight, 0, self.stride, self.dilation, 1)?;
        match &self.bias {
            Some(bias) => ys.broadcast_add(bias),
            None => Ok(ys),
        }
    }
}

impl Conv1dState {
    /// The context the first `rows` slots prepend to `xs`: what they kept, or for a fresh slot
    /// of a replicate-padded conv that advances now, `xs`'s first sample repeated.
    fn left_context(&self, xs: &Tensor, mask: &RowMask) -> Result<Tensor> {
        let rows = xs.dim(0)?;
        let prev = self.prev.narrow(0, 0, rows)?;
        let Some(all_fresh) = &self.fresh else {
            return Ok(prev);
        };
        let fresh = all_fresh.narrow(0, 0, rows)?;
        let starts = (&fresh * &mask.active)?;
        store(all_fresh, &(&fresh * &mask.idle)?)?;
        let first = xs.narrow(2, 0, 1)?.broadcast_as(prev.shape())?;
        select_rows(&starts, &first, &prev)
    }

    /// Returns `slots` to the start state.
    pub fn reset(&mut self, slots: Range<usize>) -> Result<()> {
        fill_rows(&self.prev, slots.clone(), false)?;
        match &self.fresh {
            Some(fresh) => fill_rows(fresh, slots, true),
            None => Ok(()),
        }
    }

    /// The state's buffers (to save and restore around a graph capture).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn buffers(&self) -> impl Iterator<Item = &Tensor> {
        std::iter::once(&self.prev).chain(&self.fresh)
    }
}

/// A causal transposed convolution: dense (`[in, out, k]`, SEANet) or depthwise (`[c, 1, k]`,
/// the upsample).
#[derive(Debug, Clone)]
pub(super) struct ConvTr1d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    depthwise: bool,
    out_channels: usize,
    kernel: usize,
}

/// One conv-transpose's pending overlap for every slot: `[batch, out, kernel − stride]`.
#[derive(Debug)]
pub(super) struct ConvTr1dState {
    partial: Tensor,
}

impl ConvTr1d {
    pub fn dense(w: &ConvWeights, stride: usize) -> Result<Self> {
        let (_, out_channels, kernel) = w.weight.dims3()?;
        Self::checked(
            w.weight.clone(),
            channel_bias(&w.bias)?,
            stride,
            false,
            out_channels,
            kernel,
        )
    }

    pub fn depthwise(weight: &Tensor, stride: usize) -> Result<Self> {
        let (channels, one, kernel) = weight.dims3()?;
        if one != 1 {
            candle_core::bail!(
                "a depthwise conv-transpose weight is [c, 1, k], got {:?}",
                weight.dims()
            );
        }
        Self::checked(weight.clone(), None, stride, true, channels, kernel)
    }

    fn checked(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        depthwise: bool,
        out_channels: usize,
        kernel: usize,
    ) -> Result<Self> {
        if stride == 0 || kernel < stride {
            candle_core::bail!(
                "a causal conv-transpose needs 0 < stride <= kernel, got stride {stride}, kernel {kernel}"
            );
        }
        Ok(Self {
            weight,
            bias,
            stride,
            depthwise,
            out_channels,
            kernel,
        })
    }

    pub fn state(&self, batch: usize) -> Result<ConvTr1dState> {
        Ok(ConvTr1dState {
            partial: Tensor::zeros(
                (batch, self.out_channels, self.kernel - self.stride),
                self.weight.dtype(),
                self.weight.device(),
            )?,
        })
    }

    /// The full transposed convolution (no trimming): `[batch, out, (t − 1)·stride + kernel]`.
    fn full(&self, xs: &Tensor) -> Result<Tensor> {
        if !self.depthwise {
            return xs.conv_transpose1d(&self.weight, 0, 0, self.stride, 1, 1);
        }
        // Per channel: y[s·m + r] = Σ_q x[m − q] · w[r + q·s]. One shifted product per kernel
        // tap, interleaved by residue — a few elementwise ops instead of one conv per channel.
        let (batch, channels, time) = xs.dims3()?;
        let (stride, kernel) = (self.stride, self.kernel);
        let taps = kernel.div_ceil(stride);
        let padded = xs.pad_with_zeros(2, taps - 1, taps - 1)?;
        let len = time + taps - 1;
        let mut phases = Vec::with_capacity(stride);
        for r in 0..stride {
            let mut acc: Option<Tensor> = None;
            for q in (0..taps).filter(|q| r + q * stride < kernel) {
                let w = self
                    .weight
                    .narrow(2, r + q * stride, 1)?
                    .reshape((1, channels, 1))?;
                let term = padded.narrow(2, taps - 1 - q, len)?.broadcast_mul(&w)?;
                acc = Some(match acc {
                    None => term,
                    Some(a) => (a + term)?,
                });
            }
            phases.push(match acc {
                Some(a) => a,
                None => Tensor::zeros((batch, channels, len), xs.dtype(), xs.device())?,
            });
        }
        Tensor::stack(&phases, 3)?
            .reshape((batch, channels, len * stride))?
            .narrow(2, 0, (time - 1) * stride + kernel)
    }

    /// `xs` `[rows, in, t]` → `[rows, out, t · stride]`, for the first `rows` slots of the
    /// state; the rows `mask` marks idle keep their overlap.
    pub fn step(&self, xs: &Tensor, state: &mut ConvTr1dState, mask: &RowMask) -> Result<Tensor> {
        let mut ys = self.full(xs)?;
        if let Some(bias) = &self.bias {
            ys = ys.broadcast_add(bias)?;
        }
        let overlap = state.partial.dim(2)?;
        if overlap == 0 {
            return Ok(ys);
        }
        let len = ys.dim(2)?;
        let partial = state.partial.narrow(0, 0, ys.dim(0)?)?;
        let head = (ys.narrow(2, 0, overlap)? + &partial)?;
        let ys = Tensor::cat(&[&head, &ys.narrow(2, overlap, len - overlap)?], 2)?;
        let mut tail = ys.narrow(2, len - overlap, overlap)?;
        if let Some(bias) = &self.bias {
            tail = tail.broadcast_sub(bias)?;
        }
        store(&state.partial, &mask.select(&tail, &partial)?)?;
        ys.narrow(2, 0, len - overlap)
    }
}

impl ConvTr1dState {
    /// Returns `slots` to the start state.
    pub fn reset(&mut self, slots: Range<usize>) -> Result<()> {
        fill_rows(&self.partial, slots, false)
    }

    /// The state's buffer (to save and restore around a graph capture).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn buffers(&self) -> impl Iterator<Item = &Tensor> {
        std::iter::once(&self.partial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn randn(shape: (usize, usize, usize), seed: u64) -> Tensor {
        // A small deterministic generator: tests need no RNG crate features.
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Streaming over chunks equals one pass over the whole signal (the moshi conv test).
    #[test]
    fn streamed_convs_match_one_pass() -> Result<()> {
        for (kernel, stride) in [(1, 1), (3, 1), (4, 2), (8, 4), (7, 1), (10, 5)] {
            let conv = Conv1d::new(
                &ConvWeights {
                    weight: randn((5, 3, kernel), 1),
                    bias: Some(randn((1, 1, 5), 2).flatten_all()?),
                },
                stride,
                1,
                Pad::Constant,
            )?;
            let tr = ConvTr1d::dense(
                &ConvWeights {
                    weight: randn((5, 3, kernel), 3),
                    bias: Some(randn((1, 1, 3), 4).flatten_all()?),
                },
                stride,
            )?;
            let dw = ConvTr1d::depthwise(&randn((5, 1, kernel), 5), stride)?;
            let frames = 12;
            let xs = randn((2, 3, frames * stride), 6);
            let all = RowMask::all(2, &Device::Cpu)?;
            let conv_full = conv.step(&xs, &mut conv.state(2)?, &all)?;
            let tr_full = tr.step(&conv_full, &mut tr.state(2)?, &all)?;
            let dw_full = dw.step(&conv_full, &mut dw.state(2)?, &all)?;
            for chunk in [1, 2, 3] {
                let (mut cs, mut ts, mut ds) = (conv.state(2)?, tr.state(2)?, dw.state(2)?);
                let (mut c_out, mut t_out, mut d_out) = (vec![], vec![], vec![]);
                for start in (0..frames).step_by(chunk) {
                    let n = chunk.min(frames - start);
                    let y = conv.step(&xs.narrow(2, start * stride, n * stride)?, &mut cs, &all)?;
                    t_out.push(tr.step(&y, &mut ts, &all)?);
                    d_out.push(dw.step(&y, &mut ds, &all)?);
                    c_out.push(y);
                }
                let c = Tensor::cat(&c_out, 2)?;
                let t = Tensor::cat(&t_out, 2)?;
                let d = Tensor::cat(&d_out, 2)?;
                assert!(
                    max_diff(&c, &conv_full) < 1e-5,
                    "conv k{kernel} s{stride} chunk {chunk}"
                );
                assert!(
                    max_diff(&t, &tr_full) < 1e-5,
                    "convtr k{kernel} s{stride} chunk {chunk}"
                );
                assert!(
                    max_diff(&d, &dw_full) < 1e-5,
                    "depthwise k{kernel} s{stride} chunk {chunk}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn depthwise_matches_the_grouped_conv_transpose() -> Result<()> {
        let w = randn((4, 1, 4), 7);
        let xs = randn((2, 4, 5), 8);
        let ours = ConvTr1d::depthwise(&w, 2)?.full(&xs)?;
        let candle = xs.conv_transpose1d(&w, 0, 0, 2, 1, 4)?;
        assert!(max_diff(&ours, &candle) < 1e-6);
        Ok(())
    }

    #[test]
    fn inactive_slots_keep_their_state_and_replicate_pads_with_the_first_sample() -> Result<()> {
        let w = randn((2, 2, 4), 9);
        let conv = Conv1d::new(
            &ConvWeights {
                weight: w.clone(),
                bias: None,
            },
            2,
            1,
            Pad::Replicate,
        )?;
        let xs = randn((2, 2, 4), 10);
        // Slot 1 sits out the first chunk; afterwards it must behave like a fresh slot.
        let mut state = conv.state(2)?;
        conv.step(
            &xs,
            &mut state,
            &RowMask::new(&[true, false], &Device::Cpu)?,
        )?;
        let out = conv.step(&xs, &mut state, &RowMask::all(2, &Device::Cpu)?)?;
        let fresh = conv.step(
            &xs.narrow(0, 1, 1)?,
            &mut conv.state(1)?,
            &RowMask::all(1, &Device::Cpu)?,
        )?;
        assert!(max_diff(&out.narrow(0, 1, 1)?, &fresh) < 1e-6);
        // Replicate: a fresh pass equals zero padding of (x − x0) plus the response to x0.
        let x0 = xs.narrow(0, 1, 1)?.narrow(2, 0, 1)?;
        let manual = Tensor::cat(&[&x0, &x0, &xs.narrow(0, 1, 1)?], 2)?.conv1d(&w, 0, 2, 1, 1)?;
        assert!(max_diff(&fresh, &manual) < 1e-6);
        Ok(())
    }
}
