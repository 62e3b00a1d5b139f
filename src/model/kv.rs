//! Ring key/value caches with absolute positions, and attention over them.
//!
//! Each layer keeps one `[batch, heads, capacity, head_dim]` buffer for keys and one for values;
//! slot `b` writes its `n`-th token at ring index `n % capacity`. Shapes never change, so a
//! step can be replayed, and a slot is reset by forgetting its count. Which ring entries a query
//! may see is decided from the counts alone (the additive mask), as in the reference. All layers
//! advance together, so a step's write indices, mask and rotations are built once (`begin`) and
//! every layer reuses them (`append`): one upload per step instead of one per layer.

use super::Result;
use super::decode::{self, DecodeAttention, KvRing, PinnedPrefix};
use super::nn::{Rope, RopeTables};
use super::quant::KvQuant;
use candle_core::{D, DType, Device, Tensor};

/// How a full ring labels its oldest entry — the one difference between the two references.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RingPositions {
    /// PersonaPlex / moshi 0.1.0: the entry the next write will overwrite is masked, so a full
    /// ring attends `capacity − 1` keys. What the official server computes.
    #[default]
    PersonaPlex,
    /// PyPI moshi ≥ 0.2: a full ring attends all `capacity` keys, as in training.
    Exact,
}

/// What a step attends to: the stored keys and values (possibly only the filled prefix) and an
/// additive mask `[batch, 1, time, len]` (0 where visible, −∞ where not).
pub struct Attend {
    pub k: Tensor,
    pub v: Tensor,
    pub mask: Tensor,
}

/// The keys and values one slot holds in every layer, copied out so a persona prefill can be
/// restored later.
#[derive(Debug, Clone)]
pub struct SlotKv {
    layers: Vec<KvRing>,
    end: u64,
}

impl SlotKv {
    /// Bytes its keys and values hold.
    pub fn bytes(&self) -> u64 {
        self.layers.iter().map(KvRing::bytes).sum()
    }

    /// These keys and values stored as `quant` says (`KvRing::stored_as`).
    pub fn stored_as(&self, quant: KvQuant) -> Result<Self> {
        Ok(Self {
            layers: self
                .layers
                .iter()
                .map(|ring| ring.stored_as(quant))
                .collect::<Result<_>>()?,
            end: self.end,
        })
    }
}

/// What one step writes and sees, worked out once and shared by every layer.
pub struct RingStep {
    /// The ring index of each new token, i64 `[rows, heads, time, head_dim]` (broadcast over
    /// heads and the head dimension): one scatter per layer writes every slot. A slot sitting
    /// the step out writes where its own next token will go, which that token overwrites before
    /// any query of the slot reads it.
    write_index: Option<Tensor>,
    /// With `DecodeAttention::Kernels` (one token, no prefix to rotate): the ring index of each
    /// row's token, i64 `[rows]`, instead of `write_index`; the mask is then f32.
    slot_index: Option<Tensor>,
    rows: usize,
    /// Ring entries read (the filled part, all of it once a slot has wrapped).
    len: usize,
    /// The absolute position of every new token, `[slot][token]`.
    positions: Vec<Vec<u64>>,
    mask: Tensor,
    /// Composed steps: the longest pinned prefix and the rotation that moves each slot's
    /// prefix up to its window (the keys are rotated).
    pinned_rotation: Option<(usize, RopeTables)>,
    /// Kernels steps: each row's pinned prefix and how its query turns back to meet it (the
    /// keys stay as stored).
    prefix: Option<PinnedPrefix>,
}

impl RingStep {
    /// The absolute positions of the step's tokens, `[slot][token]` (RoPE's input).
    pub fn positions(&self) -> &[Vec<u64>] {
        &self.positions
    }

    /// Whether layers attend through `RingCache::attend_kernels` (RoPE tables in f32) rather
    /// than `append` and `attention`.
    pub fn uses_kernels(&self) -> bool {
        self.slot_index.is_some()
    }

    /// A kernels step's device inputs (write index, mask, prefix lengths, the prefix rotation's
    /// cos and sin): a CUDA graph copies these into its buffers.
    pub fn graph_inputs(&self) -> Option<[&Tensor; 5]> {
        let (Some(slot_index), Some(prefix)) = (&self.slot_index, &self.prefix) else {
            return None;
        };
        let (cos, sin) = prefix.unturn.cos_sin();
        Some([slot_index, &self.mask, &prefix.lens, cos, sin])
    }

    /// A composed step's device inputs (write index, mask) when it has nothing else that varies
    /// (no pinned prefix to rotate): a CUDA graph copies these into its buffers.
    pub fn composed_graph_inputs(&self) -> Option<[&Tensor; 2]> {
        match (&self.write_index, &self.pinned_rotation) {
            (Some(write_index), None) => Some([write_index, &self.mask]),
            _ => None,
        }
    }

    /// This composed step reading its inputs from `buffers` (as `composed_graph_inputs` orders
    /// them) instead.
    pub fn with_composed_graph_inputs(&self, buffers: &[Tensor]) -> Result<RingStep> {
        let [write_index, mask] = buffers else {
            candle_core::bail!(
                "a composed step takes 2 graph inputs, not {}",
                buffers.len()
            )
        };
        if self.composed_graph_inputs().is_none() {
            candle_core::bail!("internal error: this step cannot run from graph inputs");
        }
        Ok(RingStep {
            write_index: Some(write_index.clone()),
            slot_index: None,
            rows: self.rows,
            len: self.len,
            positions: self.positions.clone(),
            mask: mask.clone(),
            pinned_rotation: None,
            prefix: None,
        })
    }

    /// This step reading its inputs from `buffers` (as `graph_inputs` orders them) instead.
    pub fn with_graph_inputs(&self, buffers: &[Tensor]) -> Result<RingStep> {
        let [slot_index, mask, lens, cos, sin] = buffers else {
            candle_core::bail!("a step takes 5 graph inputs, not {}", buffers.len())
        };
        if self.graph_inputs().is_none() {
            candle_core::bail!("internal error: this step cannot run from graph inputs");
        }
        Ok(RingStep {
            write_index: None,
            slot_index: Some(slot_index.clone()),
            rows: self.rows,
            len: self.len,
            positions: self.positions.clone(),
            mask: mask.clone(),
            pinned_rotation: None,
            prefix: Some(PinnedPrefix {
                lens: lens.clone(),
                unturn: RopeTables::from_cos_sin(cos.clone(), sin.clone()),
            }),
        })
    }
}

/// The ring caches of one transformer: a key and a value buffer per layer, one row per slot.
///
/// A slot may pin a prefix (its persona prompt): the first `pinned` entries are never
/// overwritten, the ring turns over the rest, and once the window has slid past the prefix the
/// prefix keys are rotated forward (RoPE rotations compose) so they sit just before the oldest
/// key in the window — always within the distances the model was trained on.
#[derive(Debug, Clone)]
pub struct RingCache {
    layers: Vec<KvRing>,
    ends: Vec<u64>,
    pinned: Vec<usize>,
    capacity: usize,
    positions: RingPositions,
    rope: Option<Rope>,
    dtype: DType,
    device: Device,
    /// Recent index tensors by (kernels form, rows, indices), when `memo_indices`: the
    /// depformer's repeat every frame, so they are uploaded once (and a CUDA graph capturing
    /// them needs no host copy). Other caches' indices change every frame and are not kept.
    index_memo: Vec<(bool, usize, Vec<i64>, Tensor)>,
    memo_indices: bool,
    /// While a CUDA graph is captured (`keep_indices`), every index tensor a step uses: the
    /// graph reads them at every replay, long after the memo may have dropped them.
    kept_indices: Option<Vec<Tensor>>,
    decode: DecodeAttention,
    /// The no-prefix plan of a kernels step, by rows (the same every step).
    no_prefix: Vec<(usize, PinnedPrefix)>,
    /// Every kernels step reads the whole ring (the mask hides what is not written): its shapes
    /// never change, so it can be captured as a CUDA graph.
    whole_ring: bool,
    /// Every step, composed ones too, reads the whole ring (Mimi's transformers, whose steps
    /// are captured whole).
    fixed_shape: bool,
}

/// Write-index tensors `RingCache` keeps (enough for two row buckets of a 16-step depformer).
const INDEX_MEMO: usize = 32;

/// The shape of a `RingCache`.
#[derive(Debug, Clone, Copy)]
pub struct RingShape {
    pub layers: usize,
    pub batch: usize,
    pub heads: usize,
    pub capacity: usize,
    pub head_dim: usize,
}

impl RingCache {
    pub fn new(
        shape: RingShape,
        dtype: DType,
        device: &Device,
        positions: RingPositions,
    ) -> Result<Self> {
        Self::stored(shape, dtype, KvQuant::None, device, positions)
    }

    /// A cache whose keys and values are stored as `quant` says. An int8 cache attends through
    /// the kernels (or their references), one token per step.
    pub fn stored(
        shape: RingShape,
        dtype: DType,
        quant: KvQuant,
        device: &Device,
        positions: RingPositions,
    ) -> Result<Self> {
        let dims = (shape.batch, shape.heads, shape.capacity, shape.head_dim);
        let layers = (0..shape.layers)
            .map(|_| KvRing::zeros(dims, dtype, quant, device))
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            ends: vec![0; shape.batch],
            pinned: vec![0; shape.batch],
            capacity: shape.capacity,
            positions,
            rope: None,
            dtype,
            device: device.clone(),
            index_memo: Vec::new(),
            memo_indices: false,
            kept_indices: None,
            decode: DecodeAttention::Composed,
            no_prefix: Vec::new(),
            whole_ring: false,
            fixed_shape: false,
        })
    }

    /// Makes every step read the whole ring, so a step's shapes depend only on its rows and
    /// tokens (a cache whose composed steps are captured as CUDA graphs).
    pub fn with_fixed_shape(mut self) -> Self {
        self.fixed_shape = true;
        self
    }

    /// Keeps recent write-index tensors for reuse (for caches whose steps repeat them).
    pub fn with_index_memo(mut self) -> Self {
        self.memo_indices = true;
        self
    }

    /// Keeps every index tensor the steps use from now until `take_kept_indices`: call it
    /// before capturing a CUDA graph, whose replays read those tensors where they lie.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn keep_indices(&mut self) {
        self.kept_indices = Some(Vec::new());
    }

    /// The index tensors used since `keep_indices`, for the captured graph to own; stops
    /// keeping them.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn take_kept_indices(&mut self) -> Vec<Tensor> {
        self.kept_indices.take().unwrap_or_default()
    }

    /// Makes every step read the whole ring (see `whole_ring`).
    pub fn set_whole_ring(&mut self, whole: bool) {
        self.whole_ring = whole;
    }

    /// How one-token steps attend from now on.
    pub fn set_decode(&mut self, decode: DecodeAttention) {
        self.decode = decode;
    }

    /// Allows pinned prefixes, re-rotating them with `rope` as the window slides.
    pub fn with_pinning(mut self, rope: Rope) -> Self {
        self.rope = Some(rope);
        self
    }

    /// Keeps slot `slot_idx`'s first `len` entries (all it has written so far) forever.
    pub fn pin_prefix(&mut self, slot_idx: usize, len: usize) -> Result<()> {
        if self.rope.is_none() {
            candle_core::bail!("this cache was built without pinning");
        }
        if len as u64 > self.ends[slot_idx] || len + 2 > self.capacity {
            candle_core::bail!(
                "cannot pin {len} of {} entries in a ring of {}",
                self.ends[slot_idx],
                self.capacity
            );
        }
        self.pinned[slot_idx] = len;
        Ok(())
    }

    /// Tokens slot `slot_idx` has written since its reset (its next token's position).
    pub fn end(&self, slot_idx: usize) -> u64 {
        self.ends[slot_idx]
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The most tokens slot `slot_idx` can take in one step of the first `rows` slots that sees
    /// exactly what as many one-token steps would: its ring does not fill (a full PersonaPlex
    /// ring hides its oldest entry, which a step's earlier queries would need), and no row's
    /// writes land on an entry it has written (the others sit the step out, and write where their
    /// own next tokens will go). 0 for an int8 ring, which takes one token a step.
    pub fn chunk_room(&self, slot_idx: usize, rows: usize) -> usize {
        if self.is_int8() || slot_idx >= rows || rows > self.ends.len() {
            return 0;
        }
        let unwritten = |b: usize| {
            let region = (self.capacity - self.pinned[b]) as u64;
            let turned = self.ends[b] - self.pinned[b] as u64;
            region.saturating_sub(turned) as usize
        };
        (0..rows)
            .map(|b| match b == slot_idx {
                true => unwritten(b).saturating_sub(1),
                false => unwritten(b),
            })
            .min()
            .unwrap_or(0)
    }

    /// Whether keys and values are stored as int8 codes.
    pub fn is_int8(&self) -> bool {
        self.layers.first().is_some_and(KvRing::is_int8)
    }

    pub fn reset_slot(&mut self, slot_idx: usize) {
        self.ends[slot_idx] = 0;
        self.pinned[slot_idx] = 0;
    }

    /// Counts `tokens` more writes for slot `slot_idx` without making them: its queries then see
    /// whatever the ring holds there (benchmarks time attention over a full history this way).
    pub fn skip(&mut self, slot_idx: usize, tokens: u64) {
        self.ends[slot_idx] += tokens;
    }

    pub fn reset_all(&mut self) {
        self.ends.fill(0);
        self.pinned.fill(0);
    }

    /// Starts a step of `time` tokens for the first `active.len()` slots (the rows the step
    /// computes; the rest sit it out): every active one advances by `time`. The returned plan
    /// says where each layer's `append` writes and what its queries see.
    pub fn begin(&mut self, time: usize, active: &[bool]) -> Result<RingStep> {
        let rows = active.len();
        if rows > self.ends.len() {
            candle_core::bail!("a step of {rows} rows on a cache of {}", self.ends.len());
        }
        let positions = self.ends[..rows]
            .iter()
            .map(|&end| (end..end + time as u64).collect())
            .collect();
        let mut index = Vec::with_capacity(rows * time);
        for (slot_idx, &is_active) in active.iter().enumerate() {
            let region = self.pinned[slot_idx]..self.capacity;
            if is_active && time >= region.len() {
                candle_core::bail!(
                    "a step of {time} tokens does not fit a ring of {} entries",
                    region.len()
                );
            }
            let turned = self.ends[slot_idx] - region.start as u64;
            index.extend(
                (0..time as u64)
                    .map(|t| (region.start as u64 + (turned + t) % region.len() as u64) as i64),
            );
            if is_active {
                self.ends[slot_idx] += time as u64;
            }
        }
        let kernels = (self.decode == DecodeAttention::Kernels || self.is_int8()) && time == 1;
        if self.is_int8() && !kernels {
            candle_core::bail!("an int8 key/value cache takes one token per step, not {time}");
        }
        // Only steps that may be captured pay for reading the whole ring.
        let len = if (self.whole_ring && kernels) || self.fixed_shape {
            self.capacity
        } else {
            self.visible_len(rows)
        };
        let index = self.index_tensor(index, rows, time, kernels)?;
        let (write_index, slot_index, mask_dtype) = if kernels {
            (None, index, DType::F32)
        } else {
            (index, None, self.dtype)
        };
        Ok(RingStep {
            write_index,
            slot_index,
            rows,
            len,
            positions,
            mask: self.mask(time, len, active, mask_dtype)?,
            pinned_rotation: match kernels {
                true => None,
                false => self.pinned_rotation(rows)?,
            },
            prefix: match kernels {
                true => Some(self.pinned_prefix(rows)?),
                false => None,
            },
        })
    }

    /// The ring indices `[rows][time]` on the device: for the kernels (`kernels`, one token),
    /// i64 `[rows]`; else as the scatter's index tensor `[rows, heads, time, head_dim]`.
    fn index_tensor(
        &mut self,
        index: Vec<i64>,
        rows: usize,
        time: usize,
        kernels: bool,
    ) -> Result<Option<Tensor>> {
        let tensor = self.memo_or_upload(index, rows, time, kernels)?;
        if let (Some(kept), Some(tensor)) = (&mut self.kept_indices, &tensor) {
            kept.push(tensor.clone());
        }
        Ok(tensor)
    }

    /// `index_tensor`'s tensor from the memo, else uploaded (and remembered, with the memo).
    fn memo_or_upload(
        &mut self,
        index: Vec<i64>,
        rows: usize,
        time: usize,
        kernels: bool,
    ) -> Result<Option<Tensor>> {
        let known = |(k, r, i, _): &&(bool, usize, Vec<i64>, Tensor)| {
            *k == kernels && *r == rows && *i == index
        };
        if let Some((.., tensor)) = self.index_memo.iter().find(known) {
            return Ok(Some(tensor.clone()));
        }
        let tensor = Tensor::new(index.as_slice(), &self.device)?;
        let tensor = match self.layers.first() {
            _ if kernels => tensor,
            None => return Ok(None),
            Some(ring) => {
                let (_, heads, _, head_dim) = ring.k.dims4()?;
                tensor
                    .reshape((rows, 1, time, 1))?
                    .broadcast_as((rows, heads, time, head_dim))?
                    .contiguous()?
            }
        };
        if !self.memo_indices {
            return Ok(Some(tensor));
        }
        if self.index_memo.len() == INDEX_MEMO {
            self.index_memo.remove(0);
        }
        self.index_memo.push((kernels, rows, index, tensor.clone()));
        Ok(Some(tensor))
    }

    /// Writes layer `layer`'s `k`/`v` `[rows, heads, time, head_dim]` where `step` says and
    /// returns what its queries attend to.
    pub fn append(&self, layer: usize, step: &RingStep, k: &Tensor, v: &Tensor) -> Result<Attend> {
        let KvRing {
            k: ring_k,
            v: ring_v,
            scales: None,
        } = &self.layers[layer]
        else {
            candle_core::bail!("internal error: an int8 ring is written by `attend_kernels`")
        };
        let rows = step.rows;
        let Some(index) = &step.write_index else {
            candle_core::bail!("internal error: a step planned for the kernels, or without layers")
        };
        ring_k
            .narrow(0, 0, rows)?
            .scatter_set(index, &k.contiguous()?, 2)?;
        ring_v
            .narrow(0, 0, rows)?
            .scatter_set(index, &v.contiguous()?, 2)?;
        let keys = ring_k.narrow(0, 0, rows)?.narrow(2, 0, step.len)?;
        let keys = match &step.pinned_rotation {
            Some((longest, rotation)) => rotate_prefix(keys, *longest, rotation)?,
            None => keys,
        };
        Ok(Attend {
            k: keys,
            v: ring_v.narrow(0, 0, rows)?.narrow(2, 0, step.len)?,
            mask: step.mask.clone(),
        })
    }

    /// `append` of a step's in-projection `qkv` `[rows, time, 3 · heads · head_dim]`, split and
    /// its queries and keys turned by `rope` first: the turned queries `[rows, heads, time,
    /// head_dim]` and what they attend to. On a GPU in f32 the turn and the ring write are one
    /// launch (`cuda::rope_ring_write`), unless candle's ops are asked for.
    pub fn append_qkv(
        &self,
        layer: usize,
        step: &RingStep,
        qkv: &Tensor,
        rope: &RopeTables,
        heads: usize,
    ) -> Result<(Tensor, Attend)> {
        let head_dim = qkv.dim(2)? / (3 * heads);
        #[cfg(feature = "cuda")]
        if let Some(attend) = self.append_qkv_kernel(layer, step, qkv, rope, heads)? {
            return Ok(attend);
        }
        let [q, k, v] = split_qkv(qkv, heads, head_dim)?;
        let (q, k, v) = (rope.apply(&q)?, rope.apply(&k)?, v.contiguous()?);
        Ok((q, self.append(layer, step, &k, &v)?))
    }

    /// `append_qkv` by `cuda::rope_ring_write`, where it applies: f32 on a GPU, a dense ring, no
    /// pinned prefix to turn back.
    #[cfg(feature = "cuda")]
    fn append_qkv_kernel(
        &self,
        layer: usize,
        step: &RingStep,
        qkv: &Tensor,
        rope: &RopeTables,
        heads: usize,
    ) -> Result<Option<(Tensor, Attend)>> {
        let ring = &self.layers[layer];
        let applies = qkv.device().is_cuda()
            && qkv.dtype() == DType::F32
            && ring.scales.is_none()
            && step.pinned_rotation.is_none()
            && !super::nn::candle_ops_requested();
        let (true, Some(index)) = (applies, &step.write_index) else {
            return Ok(None);
        };
        let q = super::cuda::rope_ring_write(
            &qkv.contiguous()?,
            rope.cos_sin(),
            index,
            (&ring.k, &ring.v),
            heads,
        )?;
        let rows = step.rows;
        let entries = |t: &Tensor| t.narrow(0, 0, rows)?.narrow(2, 0, step.len);
        let attend = Attend {
            k: entries(&ring.k)?,
            v: entries(&ring.v)?,
            mask: step.mask.clone(),
        };
        Ok(Some((q, attend)))
    }

    /// Layer `layer`'s attention for a step planned for the kernels: `qkv` `[rows, 1, 3 · heads
    /// · head_dim]` is rotated by `rope` (f32 tables), its key and value written into the ring,
    /// and the query attends: `[rows, heads, 1, head_dim]`.
    pub fn attend_kernels(
        &self,
        layer: usize,
        step: &RingStep,
        qkv: &Tensor,
        rope: &RopeTables,
    ) -> Result<Tensor> {
        let Some(slot_index) = &step.slot_index else {
            candle_core::bail!("internal error: a step not planned for the kernels")
        };
        let ring = self.layers[layer].rows(0, step.rows)?;
        let Some(prefix) = &step.prefix else {
            candle_core::bail!("internal error: a kernels step without its prefix plan")
        };
        decode::write_and_attend(qkv, rope, &ring, slot_index, &step.mask, prefix)
    }

    /// Each of the first `rows` slots' pinned prefix for the kernels: its length and the
    /// rotation by minus its shift (`pin_shift`). With nothing pinned it is the same every step,
    /// so it is made once per row count.
    fn pinned_prefix(&mut self, rows: usize) -> Result<PinnedPrefix> {
        let head_dim = match self.layers.first() {
            Some(ring) => ring.k.dim(3)?,
            None => candle_core::bail!("a ring without layers has no prefix"),
        };
        if self.pinned[..rows].iter().all(|&len| len == 0) {
            if let Some((_, none)) = self.no_prefix.iter().find(|(r, _)| *r == rows) {
                return Ok(none.clone());
            }
            let none = PinnedPrefix::none(rows, head_dim, &self.device)?;
            self.no_prefix.push((rows, none.clone()));
            return Ok(none);
        }
        let Some(rope) = &self.rope else {
            candle_core::bail!("internal error: a pinned prefix without RoPE")
        };
        let lens: Vec<u32> = self.pinned[..rows].iter().map(|&p| p as u32).collect();
        let shifts: Vec<Vec<u64>> = (0..rows).map(|b| vec![self.pin_shift(b)]).collect();
        let turn = rope.tables(&shifts, DType::F32, &self.device)?;
        let (cos, sin) = turn.cos_sin();
        Ok(PinnedPrefix {
            lens: Tensor::new(lens.as_slice(), &self.device)?,
            unturn: RopeTables::from_cos_sin(cos.clone(), sin.neg()?),
        })
    }

    /// How far slot `slot_idx`'s pinned prefix is rotated forward: the distance the window has
    /// slid past it.
    fn pin_shift(&self, slot_idx: usize) -> u64 {
        if self.pinned[slot_idx] == 0 {
            0
        } else {
            self.ends[slot_idx].saturating_sub(self.capacity as u64)
        }
    }

    /// The rotation that moves the pinned prefix of each of the first `rows` slots to sit just
    /// before its window, when any has to move.
    fn pinned_rotation(&self, rows: usize) -> Result<Option<(usize, RopeTables)>> {
        let Some(rope) = &self.rope else {
            return Ok(None);
        };
        let longest = self.pinned[..rows].iter().copied().max().unwrap_or(0);
        if longest == 0 || (0..rows).all(|b| self.pin_shift(b) == 0) {
            return Ok(None);
        }
        let positions: Vec<Vec<u64>> = (0..rows)
            .map(|b| {
                (0..longest)
                    .map(|i| {
                        if i < self.pinned[b] {
                            self.pin_shift(b)
                        } else {
                            0
                        }
                    })
                    .collect()
            })
            .collect();
        let tables = rope.tables(&positions, self.dtype, &self.device)?;
        Ok(Some((longest, tables)))
    }

    /// Ring entries any of the first `rows` slots has written (all of them once one has
    /// wrapped).
    fn visible_len(&self, rows: usize) -> usize {
        let longest = self.ends[..rows].iter().copied().max().unwrap_or(0);
        (longest.min(self.capacity as u64) as usize).max(1)
    }

    /// The additive mask; all zeros (nothing hidden) is made on the device without a host
    /// copy, which keeps the depformer's steps capturable in a CUDA graph.
    fn mask(&self, time: usize, len: usize, active: &[bool], dtype: DType) -> Result<Tensor> {
        let shape = (active.len(), 1, time, len);
        let mut mask = vec![0f32; active.len() * time * len];
        for (slot_idx, rows) in mask.chunks_exact_mut(time * len).enumerate() {
            if !active[slot_idx] {
                continue;
            }
            for (query_idx, row) in rows.chunks_exact_mut(len).enumerate() {
                let end = self.ends[slot_idx];
                let query_pos = end - time as u64 + query_idx as u64;
                let pinned = self.pinned[slot_idx];
                for (ring_idx, cell) in row.iter_mut().enumerate() {
                    if !self.visible(end, ring_idx, query_pos, pinned) {
                        *cell = f32::NEG_INFINITY;
                    }
                }
            }
        }
        if mask.iter().all(|&cell| cell == 0.0) {
            return Tensor::zeros(shape, dtype, &self.device);
        }
        Tensor::from_vec(mask, shape, &self.device)?.to_dtype(dtype)
    }

    /// Whether ring entry `ring_idx` is visible to a query at `query_pos` after `end` writes,
    /// the first `pinned` entries being a kept prefix.
    fn visible(&self, end: u64, ring_idx: usize, query_pos: u64, pinned: usize) -> bool {
        if ring_idx < pinned {
            return ring_idx as u64 <= query_pos;
        }
        // Positions and indices relative to the turning part of the ring.
        let (offset, capacity) = (pinned as u64, (self.capacity - pinned) as u64);
        let (end, ring_idx) = (end - offset, (ring_idx - pinned) as u64);
        if end == 0 || ring_idx > end - 1 {
            return false;
        }
        let last = end - 1;
        let stored_pos = last - (last - ring_idx) % capacity + offset;
        if stored_pos > query_pos {
            return false;
        }
        let oldest_of_full_ring = end >= capacity && ring_idx == end % capacity;
        !(self.positions == RingPositions::PersonaPlex && oldest_of_full_ring)
    }

    /// Copies what slot `slot_idx` holds in every layer (its filled entries only).
    pub fn save_slot(&self, slot_idx: usize) -> Result<SlotKv> {
        let end = self.ends[slot_idx];
        let len = (end.min(self.capacity as u64) as usize).max(1);
        let layers = self
            .layers
            .iter()
            .map(|ring| ring.rows(slot_idx, 1)?.entries(len)?.copy())
            .collect::<Result<_>>()?;
        Ok(SlotKv { layers, end })
    }

    /// Puts a saved slot back, possibly into another slot index.
    pub fn restore_slot(&mut self, slot_idx: usize, saved: &SlotKv) -> Result<()> {
        if saved.layers.len() != self.layers.len() {
            candle_core::bail!(
                "a saved slot of {} layers does not fit a cache of {}",
                saved.layers.len(),
                self.layers.len()
            );
        }
        for (ring, saved) in self.layers.iter().zip(&saved.layers) {
            ring.rows(slot_idx, 1)?.set_entries(saved)?;
        }
        self.ends[slot_idx] = saved.end;
        self.pinned[slot_idx] = 0;
        Ok(())
    }
}

/// `keys` with their first `longest` entries rotated by `rotation`.
fn rotate_prefix(keys: Tensor, longest: usize, rotation: &RopeTables) -> Result<Tensor> {
    let prefix = rotation.apply(&keys.narrow(2, 0, longest)?)?;
    let rest = keys.narrow(2, longest, keys.dim(2)? - longest)?;
    Tensor::cat(&[&prefix, &rest], 2)
}

/// A packed in-projection `[batch, time, 3 · heads · head_dim]` → its query, key and value,
/// `[batch, heads, time, head_dim]` each (views, not copies).
pub fn split_qkv(qkv: &Tensor, heads: usize, head_dim: usize) -> Result<[Tensor; 3]> {
    let (batch, time, _) = qkv.dims3()?;
    let qkv = qkv.reshape((batch, time, 3, heads, head_dim))?;
    let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2)?.transpose(1, 2);
    Ok([part(0)?, part(1)?, part(2)?])
}

/// Scaled dot-product attention of `q` `[batch, heads, time, head_dim]` over `attend`.
pub fn attention(q: &Tensor, attend: &Attend) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    // Scores as (k·qᵀ)ᵀ: the cache is read where it lies and only the small `[time, len]` result
    // is transposed. `k.t().contiguous()` would copy the whole cache element by element on the
    // CPU (0.2 ms for Mimi's 8×250×64 ring, every layer and step).
    let scores = attend.k.matmul(&q.t()?.contiguous()?)?.t()?; // b,h,t,len
    let scores = (scores * scale)?;
    let scores = scores.broadcast_add(&attend.mask.to_dtype(scores.dtype())?)?;
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(&attend.v.contiguous()?)
}

/// `attention` with the heads merged: `[batch, time, heads · head_dim]`. Mimi's f32 steps on a
/// GPU (a mask per row, a ring of at most `MASKED_ATTENTION_MAX_KEYS`) run it in one kernel
/// (`cuda::masked_attention`), unless candle's ops are asked for.
pub fn attention_merged(q: &Tensor, attend: &Attend) -> Result<Tensor> {
    let (batch, heads, time, head_dim) = q.dims4()?;
    #[cfg(feature = "cuda")]
    if q.device().is_cuda()
        && q.dtype() == DType::F32
        && attend.mask.dims() == [batch, 1, time, attend.k.dim(2)?]
        && attend.k.dim(2)? <= super::cuda::MASKED_ATTENTION_MAX_KEYS
        && head_dim <= super::cuda::MASKED_ATTENTION_MAX_HEAD_DIM
        && !super::nn::candle_ops_requested()
    {
        let scale = 1.0 / (head_dim as f32).sqrt();
        return super::cuda::masked_attention(q, &attend.k, &attend.v, &attend.mask, scale);
    }
    attention(q, attend)?
        .transpose(1, 2)?
        .reshape((batch, time, heads * head_dim))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::TensorId;

    const HEAD_DIM: usize = 2;

    fn ring(capacity: usize, positions: RingPositions) -> RingCache {
        let shape = RingShape {
            layers: 1,
            batch: 2,
            heads: 1,
            capacity,
            head_dim: HEAD_DIM,
        };
        RingCache::new(shape, DType::F32, &Device::Cpu, positions).unwrap()
    }

    /// Writes `time` tokens whose key components all equal their position, for slot 0 only.
    fn write(ring: &mut RingCache, time: usize) -> Attend {
        let start = ring.end(0) as f32;
        let values: Vec<f32> = (0..2 * time * HEAD_DIM)
            .map(|i| {
                if i < time * HEAD_DIM {
                    start + (i / HEAD_DIM) as f32
                } else {
                    -1.0
                }
            })
            .collect();
        let k = Tensor::from_vec(values, (2, 1, time, HEAD_DIM), &Device::Cpu).unwrap();
        let step = ring.begin(time, &[true, false]).unwrap();
        ring.append(0, &step, &k, &k).unwrap()
    }

    /// The positions (first key component) visible to each query of slot 0.
    fn visible(attend: &Attend) -> Vec<Vec<f32>> {
        let keys: Vec<f32> = attend
            .v
            .narrow(0, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let keys: Vec<f32> = keys.iter().step_by(HEAD_DIM).copied().collect();
        let mask = attend
            .mask
            .narrow(0, 0, 1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        mask.iter()
            .map(|row| {
                let mut seen: Vec<f32> = row
                    .iter()
                    .zip(&keys)
                    .filter(|(m, _)| m.is_finite())
                    .map(|(_, k)| *k)
                    .collect();
                seen.sort_by(f32::total_cmp);
                seen
            })
            .collect()
    }

    /// A CUDA graph captured over the depformer's memoised ring reads the index tensors its
    /// steps used at every replay, long after the memo has turned them over: the capture
    /// keeps each one it used, and only those.
    #[test]
    fn a_capture_keeps_the_index_tensors_its_steps_used_after_the_memo_drops_them() {
        let shape = RingShape {
            layers: 1,
            batch: 4,
            heads: 1,
            capacity: 64,
            head_dim: HEAD_DIM,
        };
        let mut r = RingCache::new(shape, DType::F32, &Device::Cpu, RingPositions::PersonaPlex)
            .unwrap()
            .with_index_memo();
        r.begin(1, &[true; 4]).unwrap();
        r.keep_indices();
        let used: Vec<TensorId> = (0..3)
            .map(|_| r.begin(1, &[true; 4]).unwrap().write_index.unwrap().id())
            .collect();
        let kept: Vec<TensorId> = r.take_kept_indices().iter().map(Tensor::id).collect();
        assert_eq!(kept, used);
        // Each later step writes elsewhere: the memo drops the captured steps' tensors.
        for _ in 0..INDEX_MEMO {
            r.begin(1, &[true, false, true, false]).unwrap();
        }
        let memo: Vec<TensorId> = r.index_memo.iter().map(|(.., t)| t.id()).collect();
        assert!(
            used.iter().all(|id| !memo.contains(id)),
            "the memo kept them"
        );
        assert!(r.take_kept_indices().is_empty(), "keeping did not stop");
    }

    #[test]
    fn before_wrapping_a_query_sees_everything_up_to_itself() {
        let mut r = ring(4, RingPositions::PersonaPlex);
        assert_eq!(visible(&write(&mut r, 2)), vec![vec![0.0], vec![0.0, 1.0]]);
        assert_eq!(visible(&write(&mut r, 1)), vec![vec![0.0, 1.0, 2.0]]);
    }

    #[test]
    fn a_full_exact_ring_sees_capacity_keys_and_personaplex_one_less() {
        let mut exact = ring(4, RingPositions::Exact);
        let mut pp = ring(4, RingPositions::PersonaPlex);
        for _ in 0..5 {
            write(&mut exact, 1);
            write(&mut pp, 1);
        }
        assert_eq!(
            visible(&write(&mut exact, 1)),
            vec![vec![2.0, 3.0, 4.0, 5.0]]
        );
        assert_eq!(visible(&write(&mut pp, 1)), vec![vec![3.0, 4.0, 5.0]]);
    }

    /// A prompt's chunk of `chunk_room` tokens sees what as many one-token steps see, however
    /// full the ring already is; one token more costs a query a key once it fills the ring.
    #[test]
    fn a_chunk_within_its_room_sees_what_one_token_steps_see() {
        for positions in [RingPositions::PersonaPlex, RingPositions::Exact] {
            for start in 0..4 {
                let (mut chunked, mut single) = (ring(5, positions), ring(5, positions));
                for _ in 0..start {
                    write(&mut chunked, 1);
                    write(&mut single, 1);
                }
                let room = chunked.chunk_room(0, 2);
                assert_eq!(room, 4 - start, "{positions:?} after {start}");
                let mut over = chunked.clone();
                let together = visible(&write(&mut chunked, room));
                let apart: Vec<Vec<f32>> = (0..room)
                    .map(|_| visible(&write(&mut single, 1)).remove(0))
                    .collect();
                assert_eq!(together, apart, "{positions:?} after {start}");
                if positions == RingPositions::PersonaPlex && start > 0 {
                    let beyond = visible(&write(&mut over, room + 1));
                    assert_ne!(beyond[..room], apart[..], "after {start}");
                }
            }
        }
    }

    /// Rows that sit a chunk out write its tokens where their own next ones go: the chunk may
    /// not reach entries they have written, and an int8 ring takes no chunks.
    #[test]
    fn a_chunk_never_writes_over_another_rows_keys() {
        let mut r = ring(8, RingPositions::Exact);
        // Slot 1 holds keys 100, 101, 102.
        for pos in 0..3 {
            let k = Tensor::new(&[0f32, 0.0, 100.0 + pos as f32, 0.0], &Device::Cpu).unwrap();
            let k = k.reshape((2, 1, 1, HEAD_DIM)).unwrap();
            let step = r.begin(1, &[false, true]).unwrap();
            r.append(0, &step, &k, &k).unwrap();
        }
        let slot_1_keys = |r: &RingCache| -> Vec<f32> {
            let keys = r.layers[0].k.get(1).unwrap().flatten_all().unwrap();
            keys.to_vec1::<f32>().unwrap()[..3 * HEAD_DIM].to_vec()
        };
        let before = slot_1_keys(&r);
        assert_eq!(r.chunk_room(0, 1), 7, "slot 1 sits out a step of one row");
        assert_eq!(r.chunk_room(1, 1), 0, "slot 1 is not among the rows");
        assert_eq!(r.chunk_room(0, 2), 5);
        write(&mut r, 5);
        assert_eq!(
            slot_1_keys(&r),
            before,
            "the chunk wrote over slot 1's keys"
        );
        let shape = RingShape {
            layers: 1,
            batch: 1,
            heads: 1,
            capacity: 8,
            head_dim: 16,
        };
        let int8 = RingCache::stored(
            shape,
            DType::F32,
            KvQuant::Int8,
            &Device::Cpu,
            RingPositions::Exact,
        )
        .unwrap();
        assert_eq!(int8.chunk_room(0, 1), 0);
    }

    #[test]
    fn two_tokens_a_step_cost_the_first_query_a_key() {
        let mut exact = ring(4, RingPositions::Exact);
        write(&mut exact, 2);
        write(&mut exact, 2);
        // Positions 4 and 5 overwrite 0 and 1: query 4 sees 2..=4, query 5 sees 2..=5.
        assert_eq!(
            visible(&write(&mut exact, 2)),
            vec![vec![2.0, 3.0, 4.0], vec![2.0, 3.0, 4.0, 5.0]]
        );
    }

    #[test]
    fn inactive_slots_do_not_advance() {
        let mut r = ring(4, RingPositions::PersonaPlex);
        write(&mut r, 3);
        assert_eq!((r.end(0), r.end(1)), (3, 0));
        r.reset_slot(0);
        assert_eq!(visible(&write(&mut r, 1)), vec![vec![0.0]]);
    }

    /// A slot sitting steps out is written where its next token goes (one scatter writes every
    /// row); its next step overwrites that entry before reading, so its window is intact.
    #[test]
    fn an_idle_slot_of_a_full_exact_ring_sees_exactly_its_own_keys() -> Result<()> {
        let mut r = ring(4, RingPositions::Exact);
        let step_with = |r: &mut RingCache, active: [bool; 2], values: [f32; 2]| {
            let data: Vec<f32> = values.iter().flat_map(|&v| [v; HEAD_DIM]).collect();
            let kv = Tensor::from_vec(data, (2, 1, 1, HEAD_DIM), &Device::Cpu).unwrap();
            let step = r.begin(1, &active).unwrap();
            r.append(0, &step, &kv, &kv).unwrap()
        };
        for pos in 0..6 {
            step_with(&mut r, [false, true], [-7.0, pos as f32]);
        }
        for _ in 0..2 {
            step_with(&mut r, [true, false], [-7.0, 99.0]);
        }
        let attend = step_with(&mut r, [false, true], [-7.0, 6.0]);
        let keys: Vec<f32> = attend.k.narrow(0, 1, 1)?.flatten_all()?.to_vec1()?;
        let mut seen: Vec<f32> = keys.iter().step_by(HEAD_DIM).copied().collect();
        seen.sort_by(f32::total_cmp);
        assert_eq!(
            seen,
            vec![3.0, 4.0, 5.0, 6.0],
            "no idle-step write survives"
        );
        Ok(())
    }

    #[test]
    fn a_saved_slot_restores_into_another() {
        let mut r = ring(4, RingPositions::PersonaPlex);
        write(&mut r, 3);
        let saved = r.save_slot(0).unwrap();
        r.restore_slot(1, &saved).unwrap();
        assert_eq!(r.end(1), 3);
        let keys = r.layers[0]
            .k
            .narrow(0, 1, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(&keys[..3 * HEAD_DIM], &[0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
    }

    #[test]
    fn a_pinned_prefix_survives_the_window_and_is_rotated_just_before_it() -> Result<()> {
        let rope = Rope::new(2, 10_000.0);
        let mut pinned = ring(6, RingPositions::PersonaPlex).with_pinning(rope.clone());
        let mut plain = ring(6, RingPositions::PersonaPlex);
        write(&mut pinned, 2);
        write(&mut plain, 2);
        pinned.pin_prefix(0, 2)?;
        let (mut with_pin, mut without) = (write(&mut pinned, 1), write(&mut plain, 1));
        for _ in 0..9 {
            with_pin = write(&mut pinned, 1);
            without = write(&mut plain, 1);
        }
        // 12 tokens written: without a pin only the last 5 remain (PersonaPlex masks one);
        // with it, positions 0 and 1 stay and the turning part (4 entries) shows 3.
        assert_eq!(visible(&without), vec![vec![7.0, 8.0, 9.0, 10.0, 11.0]]);
        let seen = visible(&with_pin)[0].len();
        assert_eq!(seen, 5, "2 pinned + 3 in the ring");
        // The pinned keys were rotated by the slide (12 − 6 = 6 positions).
        let keys = with_pin.k.narrow(0, 0, 1)?.narrow(2, 0, 2)?;
        let stored = pinned.layers[0].k.narrow(0, 0, 1)?.narrow(2, 0, 2)?;
        let expected = rope.apply(&stored, &[vec![6, 6]])?;
        let diff = (keys - expected)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6);
        Ok(())
    }

    #[test]
    fn pinning_needs_a_rope_and_room() {
        let mut r = ring(4, RingPositions::PersonaPlex);
        write(&mut r, 2);
        assert!(r.pin_prefix(0, 2).is_err());
        let mut r = ring(4, RingPositions::PersonaPlex).with_pinning(Rope::new(2, 10_000.0));
        write(&mut r, 3);
        assert!(r.pin_prefix(0, 3).is_err(), "no room left to turn");
        assert!(r.pin_prefix(0, 2).is_ok());
    }

    #[test]
    fn attention_averages_visible_values() -> Result<()> {
        let shape = RingShape {
            layers: 1,
            batch: 1,
            heads: 1,
            capacity: 4,
            head_dim: 1,
        };
        let mut r = RingCache::new(shape, DType::F32, &Device::Cpu, RingPositions::Exact)?;
        let kv = Tensor::new(&[0f32, 0.0], &Device::Cpu)?.reshape((1, 1, 2, 1))?;
        let vals = Tensor::new(&[2f32, 4.0], &Device::Cpu)?.reshape((1, 1, 2, 1))?;
        let step = r.begin(2, &[true])?;
        let attend = r.append(0, &step, &kv, &vals)?;
        let q = Tensor::zeros((1, 1, 2, 1), DType::F32, &Device::Cpu)?;
        let out = attention(&q, &attend)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(out, vec![2.0, 3.0]);
        Ok(())
    }

    /// Largest |a − b| over the rows that ran (an idle row's output is never read).
    fn max_diff(a: &Tensor, b: &Tensor, active: &[bool]) -> Result<f32> {
        let mut worst = 0f32;
        for row in (0..active.len()).filter(|&row| active[row]) {
            let diff = (a.narrow(0, row, 1)? - b.narrow(0, row, 1)?)?;
            worst = worst.max(diff.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?);
        }
        Ok(worst)
    }

    /// A step planned for the kernels (device write index, f32 mask) leaves the ring and gives
    /// the attention of the composed path, across a wrap, with a row sitting steps out and a
    /// pinned prefix the window slides past; so does one reading the whole ring from copies of
    /// its graph inputs (as a CUDA graph's replay does), wherever it has them.
    #[test]
    fn the_kernels_plan_matches_the_composed_path() -> Result<()> {
        let (heads, head_dim) = (2, 4);
        let shape = RingShape {
            layers: 1,
            batch: 3,
            heads,
            capacity: 5,
            head_dim,
        };
        let rope = Rope::new(head_dim, 10_000.0);
        for positions in [RingPositions::PersonaPlex, RingPositions::Exact] {
            let new_ring = || -> Result<RingCache> {
                Ok(RingCache::new(shape, DType::F32, &Device::Cpu, positions)?
                    .with_pinning(rope.clone()))
            };
            let (mut composed, mut kernels, mut whole) = (new_ring()?, new_ring()?, new_ring()?);
            kernels.set_decode(DecodeAttention::Kernels);
            whole.set_decode(DecodeAttention::Kernels);
            whole.set_whole_ring(true);
            let mut from_buffers = 0;
            for frame in 0..12 {
                if frame == 2 {
                    composed.pin_prefix(0, 2)?;
                    kernels.pin_prefix(0, 2)?;
                    whole.pin_prefix(0, 2)?;
                }
                let active = [true, frame % 3 != 1, true];
                let qkv = Tensor::randn(0f32, 1.0, (3, 1, 3 * heads * head_dim), &Device::Cpu)?;
                let plan = composed.begin(1, &active)?;
                let tables = rope.tables(plan.positions(), DType::F32, &Device::Cpu)?;
                let [q, k, v] = split_qkv(&qkv, heads, head_dim)?;
                let (q, k) = (tables.apply(&q)?, tables.apply(&k)?);
                let attend = composed.append(0, &plan, &k, &v.contiguous()?)?;
                let want = attention(&q, &attend)?;
                let plan = kernels.begin(1, &active)?;
                assert!(plan.uses_kernels());
                let got = kernels.attend_kernels(0, &plan, &qkv, &tables)?;
                let diff = max_diff(&got, &want, &active)?;
                assert!(diff < 1e-5, "{positions:?} frame {frame}: {diff}");
                let plan = whole.begin(1, &active)?;
                let plan = match plan.graph_inputs() {
                    Some(inputs) => {
                        from_buffers += 1;
                        let buffers = inputs.map(|t| t.copy()).into_iter();
                        plan.with_graph_inputs(&buffers.collect::<Result<Vec<_>>>()?)?
                    }
                    None => plan,
                };
                let got = whole.attend_kernels(0, &plan, &qkv, &tables)?;
                let diff = max_diff(&got, &want, &active)?;
                assert!(
                    diff < 1e-5,
                    "{positions:?} frame {frame}, whole ring: {diff}"
                );
            }
            assert_eq!(from_buffers, 12, "every step, pinned rotations too");
            let (ring, kernel_ring) = (&composed.layers[0], &kernels.layers[0]);
            for (a, b) in [(&ring.k, &kernel_ring.k), (&ring.v, &kernel_ring.v)] {
                let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(diff < 1e-5, "{positions:?} rings differ by {diff}");
            }
        }
        Ok(())
    }

    /// An int8 ring against an exact one, through the kernels plan (on the CPU, the kernels'
    /// references): across a wrap, with a row sitting steps out and a pinned prefix the window
    /// slides past, the attention stays within the rounding of 8-bit codes; a slot saved and
    /// restored into another row carries its codes and scales; a step of two tokens is refused.
    #[test]
    fn an_int8_ring_attends_close_to_the_exact_one() -> Result<()> {
        let (heads, head_dim) = (2, 16);
        let shape = RingShape {
            layers: 1,
            batch: 3,
            heads,
            capacity: 5,
            head_dim,
        };
        let rope = Rope::new(head_dim, 10_000.0);
        let new_ring = |quant| -> Result<RingCache> {
            let mut ring = RingCache::stored(
                shape,
                DType::F32,
                quant,
                &Device::Cpu,
                RingPositions::PersonaPlex,
            )?
            .with_pinning(rope.clone());
            ring.set_decode(DecodeAttention::Kernels);
            Ok(ring)
        };
        let (mut exact, mut int8) = (new_ring(KvQuant::None)?, new_ring(KvQuant::Int8)?);
        assert!(int8.is_int8() && !exact.is_int8());
        let mut worst = 0f32;
        for frame in 0..12 {
            if frame == 2 {
                exact.pin_prefix(0, 2)?;
                int8.pin_prefix(0, 2)?;
            }
            if frame == 9 {
                // Row 1 restarts from what row 0 holds, as a persona snapshot would.
                let (saved, saved_exact) = (int8.save_slot(0)?, exact.save_slot(0)?);
                int8.restore_slot(1, &saved)?;
                exact.restore_slot(1, &saved_exact)?;
            }
            let active = [true, frame % 3 != 1, true];
            let qkv = Tensor::randn(0f32, 1.0, (3, 1, 3 * heads * head_dim), &Device::Cpu)?;
            let plan = exact.begin(1, &active)?;
            let tables = rope.tables(plan.positions(), DType::F32, &Device::Cpu)?;
            let want = exact.attend_kernels(0, &plan, &qkv, &tables)?;
            let plan = int8.begin(1, &active)?;
            let got = int8.attend_kernels(0, &plan, &qkv, &tables)?;
            worst = worst.max(max_diff(&got, &want, &active)?);
        }
        // Each code is within half a step (1/254 of its entry's largest magnitude). Over
        // standard normal keys and values the worst output moved 0.01-0.025 in 16 runs here.
        assert!(worst < 0.05, "int8 attention differs by {worst}");
        assert!(worst > 0.0, "the int8 ring must round something");
        assert!(int8.begin(2, &[true, true, true]).is_err());
        Ok(())
    }
}
