//! CUDA-graph replay of a frame's two halves (`Generator::use_cuda_graphs`): the temporal step
//! and the depformer's draws and steps, each captured once per row bucket at the first frame it
//! can run, checked once against that frame's eager result, then replayed.

use super::Generator;
#[cfg(feature = "cuda")]
use super::{DrawPlan, draw_frame};
use crate::model::Result;
use crate::model::graph_cache::GraphMode;
#[cfg(feature = "cuda")]
use crate::model::graph_cache::agrees_within;
use crate::model::lm::LmModel;
#[cfg(feature = "cuda")]
use candle_core::{DType, Tensor};

/// How far a temporal graph's first replay may stray from the eager step, relative to the
/// largest output: bf16 rounding, not a misplaced key.
#[cfg(feature = "cuda")]
const TEMPORAL_GRAPH_TOLERANCE: f32 = 1e-2;

/// What a depformer graph is captured for: its rows, and per drawn stream whether some slot
/// forces its token and whether a forced token may be −1 (both shape the graph's kernels; the
/// forced tokens themselves are its inputs). The forcing changes rarely: a live call forces the
/// user's streams when the depformer draws them (16 steps), a prompt forces everything.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) struct DepformerGraphKey {
    rows: usize,
    /// Bit `s`: some slot forces drawn stream `s`.
    forced: u32,
    /// Bit `s`: a token forced on stream `s` may be −1.
    may_be_zero: u32,
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
impl DepformerGraphKey {
    /// The key of `rows` rows drawn by `plan` (at most 32 streams: PersonaPlex draws 17).
    fn of(rows: usize, plan: &super::DrawPlan) -> Self {
        let bits = |pick: fn(&(bool, bool)) -> bool| {
            plan.forced
                .iter()
                .enumerate()
                .filter(|(_, flags)| pick(flags))
                .fold(0u32, |mask, (stream, _)| mask | 1 << stream)
        };
        Self {
            rows,
            forced: bits(|flags| flags.0),
            may_be_zero: bits(|flags| flags.1),
        }
    }
}

impl std::fmt::Debug for DepformerGraphKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let forced: Vec<u32> = (0..32).filter(|s| self.forced >> s & 1 == 1).collect();
        write!(f, "{} rows, forced streams {forced:?}", self.rows)
    }
}

impl Generator {
    /// Replays both halves of each frame as CUDA graphs: the temporal step (its attention then
    /// reads the whole ring, so its shapes never change) and the depformer half. Each graph is
    /// captured at the first frame it can run and checked once against that frame's eager
    /// result; on any failure it logs why and that half stays eager.
    pub fn use_cuda_graphs(&mut self, model: &LmModel) -> Result<()> {
        if !cfg!(feature = "cuda") || !model.device().is_cuda() {
            candle_core::bail!(
                "CUDA graphs need a CUDA device and a build with the `cuda` feature"
            );
        }
        self.depformer_graph = GraphMode::on();
        self.temporal_graph = GraphMode::on();
        self.temporal.set_whole_ring(true);
        Ok(())
    }

    /// Whether frames now replay a captured depformer graph.
    pub fn replays_cuda_graph(&self) -> bool {
        self.depformer_graph.replays()
    }

    /// Whether frames now replay a captured temporal-step graph.
    pub fn replays_temporal_graph(&self) -> bool {
        self.temporal_graph.replays()
    }

    /// Replays the temporal graph of this row bucket, capturing it first if it is pending;
    /// `None` when this step runs eagerly. On the capture frame the eager step runs first and
    /// the replay then writes the same keys and values at the same ring entries again.
    #[cfg(feature = "cuda")]
    pub(super) fn replay_temporal(
        &mut self,
        model: &LmModel,
        emb: &Tensor,
        step: &crate::model::kv::RingStep,
        rope: &crate::model::nn::RopeTables,
    ) -> Result<Option<(Tensor, Tensor)>> {
        use crate::model::graph::FrameGraph;
        let Some([slot_index, mask, prefix_lens, unturn_cos, unturn_sin]) = step.graph_inputs()
        else {
            return Ok(None);
        };
        let (cos, sin) = rope.cos_sin();
        let inputs = [
            emb,
            cos,
            sin,
            slot_index,
            mask,
            prefix_lens,
            unturn_cos,
            unturn_sin,
        ];
        let (rows, _, dim) = emb.dims3()?;
        let split = |joined: &Tensor| -> Result<(Tensor, Tensor)> {
            let width = joined.dim(2)?;
            Ok((
                joined.narrow(2, 0, dim)?.force_contiguous()?,
                joined.narrow(2, dim, width - dim)?.force_contiguous()?,
            ))
        };
        let replayed = self
            .temporal_graph
            .replay_with("temporal", &rows, |graph| split(graph.replay(&inputs)?));
        if replayed.is_some() || !self.temporal_graph.captures(&rows) {
            return Ok(replayed);
        }
        let _uploads = crate::model::graph::cached_uploads(emb.device())?;
        let (hidden, logits) = model.temporal_planned(emb, &self.temporal, step, rope)?;
        let eager = Tensor::cat(&[&hidden, &logits], 2)?;
        let temporal = &self.temporal;
        let captured =
            FrameGraph::capture(&inputs, eager.shape().clone(), eager.dtype(), |buffers| {
                let [emb, cos, sin, step_inputs @ ..] = buffers else {
                    candle_core::bail!("internal error: the temporal graph has 8 inputs")
                };
                let step = step.with_graph_inputs(step_inputs)?;
                let rope = crate::model::nn::RopeTables::from_cos_sin(cos.clone(), sin.clone());
                let (hidden, logits) = model.temporal_planned(emb, temporal, &step, &rope)?;
                Tensor::cat(&[&hidden, &logits], 2)
            })
            .and_then(|graph| {
                let agrees =
                    agrees_within(graph.replay(&inputs)?, &eager, TEMPORAL_GRAPH_TOLERANCE)?;
                Ok((graph, agrees))
            });
        self.temporal_graph.settle("temporal", rows, captured);
        Ok(Some((hidden, logits)))
    }

    /// Replays the depformer graph, capturing it first if it is pending; `None` when this frame
    /// runs eagerly.
    #[cfg(feature = "cuda")]
    pub(super) fn replay_depformer(
        &mut self,
        model: &LmModel,
        hidden: &Tensor,
        text_logits: &Tensor,
        plan: &DrawPlan,
        running: &[bool],
    ) -> Result<Option<Vec<Vec<u32>>>> {
        use crate::model::graph::FrameGraph;
        let inputs = [hidden, text_logits, &plan.ints, &plan.temperature];
        let rows = running.len();
        let key = DepformerGraphKey::of(rows, plan);
        let replayed = self
            .depformer_graph
            .replay_with("depformer", &key, |graph| graph.replay(&inputs)?.to_vec2());
        if replayed.is_some() || !self.depformer_graph.captures(&key) {
            return Ok(replayed);
        }
        // Every row runs in the graph (idle rows draw greedily and are ignored), so the graph
        // depends only on the number of rows. The eager frame runs the same way: its tokens for
        // the busy rows are the same (rows are independent), and it leaves the ring's
        // write-index tensors for all rows in its memo and candle's upload cache filled.
        let all_rows = vec![true; rows];
        let _uploads = crate::model::graph::cached_uploads(hidden.device())?;
        let eager: Vec<Vec<u32>> = draw_frame(
            model,
            &mut self.depformer,
            hidden,
            text_logits,
            plan,
            &all_rows,
        )?
        .to_vec2()?;
        let depformer = &mut self.depformer;
        depformer.keep_for_capture();
        let captured =
            FrameGraph::capture(&inputs, (rows, plan.streams()), DType::U32, |buffers| {
                let plan = plan.with_buffers(&buffers[2], &buffers[3]);
                draw_frame(model, depformer, &buffers[0], &buffers[1], &plan, &all_rows)
            });
        // The ring's write indices come from its memo, which later row buckets turn over.
        let ring_indices = self.depformer.take_kept();
        let captured = captured
            .map(|mut graph| {
                graph.keep_alive(ring_indices);
                graph
            })
            .and_then(|graph| {
                let replayed: Vec<Vec<u32>> = graph.replay(&inputs)?.to_vec2()?;
                let agrees = (0..running.len())
                    .filter(|&b| running[b])
                    .all(|b| replayed[b] == eager[b])
                    .then_some(())
                    .ok_or_else(|| "the drawn tokens differ".to_owned());
                Ok((graph, agrees))
            });
        self.depformer_graph.settle("depformer", key, captured);
        Ok(Some(eager))
    }
}
