//! The language model: summed stream embeddings → temporal transformer → text head, and the
//! depformer for the audio codebooks.

use super::Result;
use super::checkpoint::Checkpoint;
use super::checkpoint::lm::LmWeights;
use super::config::LmConfig;
use super::depformer::{Depformer, DepformerState, TokenFeed};
use super::kv::{RingPositions, RingStep};
use super::nn::{Linear, RmsNorm, RopeTables};
use super::quant::{KvQuant, Quant};
use super::transformer::{RMS_EPS, Transformer, TransformerState};
use candle_core::{DType, Device, Tensor};

/// Number of token streams: text, then the agent's and the user's codebooks.
pub const STREAMS: usize = 17;

/// One column of tokens, one per stream (−1 = zero embedding).
pub type Column = [i64; STREAMS];

pub struct LmModel {
    cfg: LmConfig,
    input: InputTables,
    transformer: Transformer,
    out_norm: RmsNorm,
    text_linear: Linear,
    depformer: Depformer,
    /// How the temporal transformer's keys and values are kept (states made from now on).
    kv_quant: KvQuant,
    dtype: DType,
    device: Device,
}

impl LmModel {
    /// Loads the model from `ckpt`, running `dep_steps` depformer steps per frame (8 serve the
    /// agent's codebooks; the checkpoint's 16 reproduce the reference for parity tests).
    pub fn load(ckpt: &Checkpoint, cfg: &LmConfig, dep_steps: usize) -> Result<Self> {
        Self::load_quantized(ckpt, cfg, dep_steps, Quant::None)
    }

    /// Loads the model with its transformer and depformer matrices stored as `quant` (the text
    /// head, depformer heads and embeddings stay as in the checkpoint).
    pub fn load_quantized(
        ckpt: &Checkpoint,
        cfg: &LmConfig,
        dep_steps: usize,
        quant: Quant,
    ) -> Result<Self> {
        cfg.validate()?;
        let _span = tracing::info_span!("load_lm", file = %ckpt.path().display(), ?quant).entered();
        let w = LmWeights::load(ckpt, cfg, dep_steps)?;
        Ok(Self {
            transformer: Transformer::new(w.layers, cfg.dim, cfg.num_heads, cfg.max_period, quant)?,
            depformer: Depformer::new(
                w.depformer,
                cfg.depformer_dim,
                cfg.depformer_num_heads,
                cfg.dep_q,
                quant,
            )?,
            out_norm: RmsNorm::new(w.out_norm, RMS_EPS)?,
            input: InputTables::new(w.text_emb, w.audio_emb)?,
            text_linear: Linear::new(&w.text_linear)?,
            cfg: cfg.clone(),
            kv_quant: KvQuant::None,
            dtype: ckpt.dtype(),
            device: ckpt.device().clone(),
        })
    }

    pub fn config(&self) -> &LmConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Makes the temporal transformer's states from now on keep their keys and values as
    /// `quant` says.
    pub fn set_kv_quant(&mut self, quant: KvQuant) {
        self.kv_quant = quant;
    }

    pub fn kv_quant(&self) -> KvQuant {
        self.kv_quant
    }

    /// Bytes of one slot's temporal keys and values over `entries` positions, every layer
    /// (int8 codes and an f32 scale per head and entry with `KvQuant::Int8`).
    pub fn temporal_kv_bytes(&self, entries: usize) -> u64 {
        let cfg = &self.cfg;
        let entry = match self.kv_quant {
            KvQuant::None => cfg.dim * self.dtype.size_in_bytes(),
            KvQuant::Int8 => cfg.dim + cfg.num_heads * DType::F32.size_in_bytes(),
        };
        (2 * cfg.num_layers * entries * entry) as u64
    }

    /// Bytes of one slot's attention caches: the temporal keys and values over the context,
    /// and every depformer layer's over one frame's steps.
    pub fn slot_state_bytes(&self) -> u64 {
        let cfg = &self.cfg;
        let depformer = cfg.depformer_num_layers * cfg.dep_q * cfg.depformer_dim;
        self.temporal_kv_bytes(cfg.context) + (2 * depformer * self.dtype.size_in_bytes()) as u64
    }

    pub fn depformer_steps(&self) -> usize {
        self.depformer.num_steps()
    }

    /// The tokens a stream starts from before anything was generated.
    pub fn initial_column(&self) -> Column {
        let mut column = [self.cfg.card as i64; STREAMS];
        column[0] = self.cfg.text_card as i64;
        column
    }

    pub fn transformer_state(
        &self,
        batch: usize,
        capacity: usize,
        positions: RingPositions,
    ) -> Result<TransformerState> {
        self.transformer_state_stored(batch, capacity, (positions, self.kv_quant))
    }

    /// `transformer_state` with its keys and values stored as `quant` says, whatever the
    /// model's own setting.
    pub fn transformer_state_stored(
        &self,
        batch: usize,
        capacity: usize,
        ring: (RingPositions, KvQuant),
    ) -> Result<TransformerState> {
        self.transformer
            .state(batch, capacity, ring, self.dtype, &self.device)
    }

    pub fn depformer_state(
        &self,
        batch: usize,
        positions: RingPositions,
    ) -> Result<DepformerState> {
        self.depformer
            .state(batch, positions, self.dtype, &self.device)
    }

    /// The summed input embedding of one column per slot → `[batch, 1, dim]`: the audio
    /// streams in order, then text, the reference's order, which the CPU adds in; candle's GPU
    /// reduction adds bf16 rows in f32 and rounds once (the reference rounds at each addition).
    pub fn embed_columns(&self, columns: &[Column]) -> Result<Tensor> {
        self.input.embed(columns)
    }

    /// Temporal step on `[batch, time, dim]` embeddings → (normed hidden, text logits).
    pub fn temporal(
        &self,
        emb: &Tensor,
        state: &mut TransformerState,
        active: &[bool],
    ) -> Result<(Tensor, Tensor)> {
        let (step, rope) = self.plan_temporal(state, active)?;
        self.temporal_planned(emb, state, &step, &rope)
    }

    /// Runs `emb` `[rows, time, dim]` through the temporal transformer for the keys and values
    /// it leaves in `state` alone (a system prompt's calls, whose outputs nothing reads).
    pub fn fill_temporal(
        &self,
        emb: &Tensor,
        state: &mut TransformerState,
        active: &[bool],
    ) -> Result<()> {
        let _span = tracing::trace_span!("fill_temporal", time = emb.dim(1)?).entered();
        self.transformer.forward(emb, state, active)?;
        Ok(())
    }

    /// Starts a one-token temporal step for the first `active.len()` slots (see
    /// `Transformer::plan`).
    pub fn plan_temporal(
        &self,
        state: &mut TransformerState,
        active: &[bool],
    ) -> Result<(RingStep, RopeTables)> {
        self.transformer.plan(state, 1, active, &self.device)
    }

    /// `temporal` for a step already planned: `[batch, 1, dim]` hidden states and text logits.
    pub fn temporal_planned(
        &self,
        emb: &Tensor,
        state: &TransformerState,
        step: &RingStep,
        rope: &RopeTables,
    ) -> Result<(Tensor, Tensor)> {
        let hidden = self
            .out_norm
            .forward(&self.transformer.forward_planned(emb, state, step, rope)?)?;
        let logits = self.text_linear.forward(&hidden)?;
        Ok((hidden, logits))
    }

    /// Depformer step `k`: `hidden` `[batch, dim]`, `prev` per slot → logits `[batch, card]`.
    pub fn depformer_step(
        &self,
        k: usize,
        hidden: &Tensor,
        prev: &TokenFeed,
        state: &mut DepformerState,
        active: &[bool],
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("depformer", k).entered();
        self.depformer.step(k, hidden, prev, state, active)
    }
}

/// Every stream's input embedding table in one, the agent's and the user's codebooks in stream
/// order, then text, then a zero row for the reference's −1 token: a batch of columns is one
/// upload of row numbers, one gather and one sum (not 17 lookups and 16 additions, each a
/// launch on a GPU).
struct InputTables {
    table: Tensor,
    /// Per stream, its table's first row in `table`, and its rows.
    first_row: Column,
    rows: Column,
    zero_row: i64,
}

impl InputTables {
    fn new(text: Tensor, audio: Vec<Tensor>) -> Result<Self> {
        if audio.len() != STREAMS - 1 {
            candle_core::bail!(
                "{} audio embedding tables for {} audio streams",
                audio.len(),
                STREAMS - 1
            );
        }
        let dim = text.dim(1)?;
        let zero = Tensor::zeros((1, dim), text.dtype(), text.device())?;
        let (mut first_row, mut rows) = ([0i64; STREAMS], [0i64; STREAMS]);
        let mut next = 0i64;
        for (stream, table) in (1..STREAMS).zip(&audio).chain([(0, &text)]) {
            first_row[stream] = next;
            rows[stream] = table.dim(0)? as i64;
            next += rows[stream];
        }
        let tables: Vec<&Tensor> = audio.iter().chain([&text, &zero]).collect();
        Ok(Self {
            table: Tensor::cat(&tables, 0)?,
            first_row,
            rows,
            zero_row: next,
        })
    }

    /// The summed embedding of each of `columns` → `[columns, 1, dim]`.
    fn embed(&self, columns: &[Column]) -> Result<Tensor> {
        let mut rows = Vec::with_capacity(STREAMS * columns.len());
        for stream in (1..STREAMS).chain([0]) {
            for column in columns {
                rows.push(self.row_of(stream, column[stream])?);
            }
        }
        let rows = Tensor::from_vec(rows, STREAMS * columns.len(), self.table.device())?;
        let dim = self.table.dim(1)?;
        self.table
            .index_select(&rows, 0)?
            .reshape((STREAMS, columns.len(), dim))?
            .sum(0)?
            .unsqueeze(1)
    }

    /// Where token `id` of `stream` lies in `table` (−1: the zero row).
    fn row_of(&self, stream: usize, id: i64) -> Result<i64> {
        match id {
            id if id < 0 => Ok(self.zero_row),
            id if id < self.rows[stream] => Ok(self.first_row[stream] + id),
            id => candle_core::bail!(
                "token {id} of stream {stream} is outside its {} embeddings",
                self.rows[stream]
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::depformer::embed;

    /// The stacked tables give each column exactly the reference's sum: the audio streams'
    /// rows in order, then the text's, −1 a zero vector.
    #[test]
    fn stacked_tables_sum_a_column_as_the_reference_does() -> Result<()> {
        let device = Device::Cpu;
        let table = |rows: usize, seed: f32| {
            let values = (0..rows * 8).map(|i| ((i as f32 + seed) * 0.37).sin() * 3.0);
            Tensor::from_vec(values.collect::<Vec<f32>>(), (rows, 8), &device)
        };
        let text = table(11, 0.5)?;
        let audio = (0..STREAMS - 1)
            .map(|q| table(5 + q % 3, q as f32 * 1.7))
            .collect::<Result<Vec<_>>>()?;
        let input = InputTables::new(text.clone(), audio.clone())?;
        let columns: Vec<Column> = (0..3i64)
            .map(|c| {
                std::array::from_fn(|s| {
                    if (s as i64 + c) % 5 == 0 {
                        -1
                    } else {
                        (s as i64 * 3 + c) % 5
                    }
                })
            })
            .collect();
        for (c, column) in columns.iter().enumerate() {
            let mut want = embed(&audio[0], &[column[1]])?;
            for (q, table) in audio.iter().enumerate().skip(1) {
                want = (want + embed(table, &[column[q + 1]])?)?;
            }
            let want: Vec<f32> = (want + embed(&text, &[column[0]])?)?
                .flatten_all()?
                .to_vec1()?;
            let got: Vec<f32> = input.embed(&columns)?.get(c)?.flatten_all()?.to_vec1()?;
            assert_eq!(got, want, "column {c}");
        }
        let mut too_far = columns[0];
        too_far[16] = 5;
        let err = input.embed(&[too_far]).unwrap_err().to_string();
        assert!(err.contains("token 5 of stream 16"), "{err}");
        assert!(InputTables::new(text, audio[1..].to_vec()).is_err());
        Ok(())
    }
}
