//! CUDA-graph replay of Mimi's streaming steps (`EncoderState::use_cuda_graphs`): encode and
//! decode are each captured once per row bucket at their first frame, checked against that
//! frame's eager result, then replayed — one launch instead of hundreds of small ones.
//!
//! A step shifts its convolutions' state, so running a frame twice is not the same as running
//! it once: the capture frame saves that state, runs eagerly, puts the state back and lets the
//! graph's first replay run the frame again. (The transformers' rings are rewritten in place at
//! the same entries with the same values, so they need no saving.)

use super::{DecoderState, EncoderState, Mimi, StepPlan};
use crate::model::Result;
use crate::model::graph_cache::GraphMode;
use candle_core::Tensor;

/// How far a decode graph's first replay may stray from the eager step, relative to the
/// largest sample: float reassociation, not a misplaced frame.
#[cfg(feature = "cuda")]
const DECODE_GRAPH_TOLERANCE: f32 = 1e-3;

fn check_graphs_apply(mimi: &Mimi) -> Result<()> {
    if !cfg!(feature = "cuda") || !mimi.device().is_cuda() {
        candle_core::bail!("CUDA graphs need a CUDA device and a build with the `cuda` feature");
    }
    Ok(())
}

impl EncoderState {
    /// Replays each step as a CUDA graph, captured at the first frame of each row bucket (see
    /// the module's notes); a capture that fails or disagrees logs why and encoding stays eager.
    pub fn use_cuda_graphs(&mut self, mimi: &Mimi) -> Result<()> {
        check_graphs_apply(mimi)?;
        self.graphs = GraphMode::on();
        Ok(())
    }

    /// Whether steps now replay a captured graph.
    pub fn replays_cuda_graph(&self) -> bool {
        self.graphs.replays()
    }
}

impl DecoderState {
    /// See `EncoderState::use_cuda_graphs`.
    pub fn use_cuda_graphs(&mut self, mimi: &Mimi) -> Result<()> {
        check_graphs_apply(mimi)?;
        self.graphs = GraphMode::on();
        Ok(())
    }

    /// Whether steps now replay a captured graph.
    pub fn replays_cuda_graph(&self) -> bool {
        self.graphs.replays()
    }
}

impl Mimi {
    /// The codes of an encode step replayed as a graph (captured first if pending); `None`
    /// when the step runs eagerly.
    #[cfg(not(feature = "cuda"))]
    pub(super) fn replay_encode(
        &self,
        _pcm: &Tensor,
        _state: &mut EncoderState,
        _plan: &StepPlan,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The PCM of a decode step replayed as a graph (captured first if pending); `None` when
    /// the step runs eagerly.
    #[cfg(not(feature = "cuda"))]
    pub(super) fn replay_decode(
        &self,
        _codes: &Tensor,
        _state: &mut DecoderState,
        _plan: &StepPlan,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    #[cfg(feature = "cuda")]
    pub(super) fn replay_encode(
        &self,
        pcm: &Tensor,
        state: &mut EncoderState,
        plan: &StepPlan,
    ) -> Result<Option<Tensor>> {
        let pcm = pcm.to_dtype(self.dtype)?;
        replay_or_capture("mimi encode", state, &pcm, plan, same_codes, |s, x, p| {
            self.encode_planned(x, s, p)
        })
    }

    #[cfg(feature = "cuda")]
    pub(super) fn replay_decode(
        &self,
        codes: &Tensor,
        state: &mut DecoderState,
        plan: &StepPlan,
    ) -> Result<Option<Tensor>> {
        let agrees = |replayed: &Tensor, eager: &Tensor| {
            crate::model::graph_cache::agrees_within(replayed, eager, DECODE_GRAPH_TOLERANCE)
        };
        replay_or_capture("mimi decode", state, codes, plan, agrees, |s, x, p| {
            self.decode_planned(x, s, p)
        })
    }
}

/// What capture needs of a streaming state.
pub(super) trait Streaming {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn graphs(&mut self) -> &mut GraphMode;

    /// The state a step shifts along: its convolutions'. (A repeated step rewrites the
    /// transformer's ring in place at the same entries with the same values.)
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn shift_buffers(&self) -> Vec<&Tensor>;
}

impl Streaming for EncoderState {
    fn graphs(&mut self) -> &mut GraphMode {
        &mut self.graphs
    }

    fn shift_buffers(&self) -> Vec<&Tensor> {
        let seanet = self.seanet.buffers();
        seanet.chain(self.downsample.buffers()).collect()
    }
}

impl Streaming for DecoderState {
    fn graphs(&mut self) -> &mut GraphMode {
        &mut self.graphs
    }

    fn shift_buffers(&self) -> Vec<&Tensor> {
        let upsample = self.upsample.buffers();
        upsample.chain(self.seanet.buffers()).collect()
    }
}

#[cfg(feature = "cuda")]
type Agreement = std::result::Result<(), String>;

/// Replays `piece`'s graph for this many rows, or captures it: saves the shifted state, runs
/// the frame eagerly (`run`), puts the state back, captures `run` over the graph's buffers and
/// replays it, which runs the frame again. A graph whose first replay `agrees` with the eager
/// output is kept; otherwise the frame runs eagerly once more from the saved state, so the state
/// always ends one frame on. `None` when graphs are off or have failed.
#[cfg(feature = "cuda")]
fn replay_or_capture<S: Streaming>(
    piece: &str,
    state: &mut S,
    input: &Tensor,
    plan: &StepPlan,
    agrees: impl Fn(&Tensor, &Tensor) -> Result<Agreement>,
    run: impl Fn(&mut S, &Tensor, &StepPlan) -> Result<Tensor>,
) -> Result<Option<Tensor>> {
    use crate::model::graph::{FrameGraph, cached_uploads};
    let mut inputs = vec![input];
    inputs.extend(plan.tensors()?);
    let rows = input.dim(0)?;
    // The output buffer is overwritten by the next replay: copied out.
    let replayed = state
        .graphs()
        .replay_with(piece, &rows, |graph| graph.replay(&inputs)?.copy());
    if replayed.is_some() || !state.graphs().captures(&rows) {
        return Ok(replayed);
    }
    let _uploads = cached_uploads(input.device())?;
    // Laid out as the graph's buffer will be, so the eager run makes the uploads (shapes and
    // strides) the capture will ask candle's cache for.
    let input = &input.force_contiguous()?;
    let saved = save(&state.shift_buffers())?;
    let eager = run(state, input, plan)?;
    restore(&state.shift_buffers(), &saved)?;
    let captured = FrameGraph::capture(&inputs, eager.shape().clone(), eager.dtype(), |buffers| {
        let [input, plan_buffers @ ..] = buffers else {
            candle_core::bail!("internal error: a Mimi graph without inputs")
        };
        run(state, input, &plan.with_tensors(plan_buffers)?)
    })
    .and_then(|graph| {
        let agreement = agrees(graph.replay(&inputs)?, &eager)?;
        Ok((graph, agreement))
    });
    if state.graphs().settle(piece, rows, captured) {
        return Ok(Some(eager));
    }
    // Whatever a failed capture or replay left in the state, the frame runs again from before.
    restore(&state.shift_buffers(), &saved)?;
    Ok(Some(run(state, input, plan)?))
}

#[cfg(feature = "cuda")]
fn same_codes(replayed: &Tensor, eager: &Tensor) -> Result<Agreement> {
    let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<u32>();
    Ok((flat(replayed)? == flat(eager)?)
        .then_some(())
        .ok_or_else(|| "the codes differ".to_owned()))
}

/// Copies of `buffers`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) fn save(buffers: &[&Tensor]) -> Result<Vec<Tensor>> {
    buffers.iter().map(|buffer| buffer.copy()).collect()
}

/// Writes `saved` back into `buffers`, in place.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) fn restore(buffers: &[&Tensor], saved: &[Tensor]) -> Result<()> {
    for (buffer, saved) in buffers.iter().zip(saved) {
        if saved.elem_count() > 0 {
            buffer.slice_set(saved, 0, 0)?;
        }
    }
    Ok(())
}
