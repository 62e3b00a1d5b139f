//! One-token attention over a ring cache as two kernels (`kernels/attention.cu`): RoPE on the
//! query and key fused with the ring write at a *device* index, then attention over the filled
//! part of the ring. A bf16 GPU runs the CUDA kernels; everything else runs their CPU references
//! here, composed from candle ops, so the model code that drives them is tested on any machine.
//! A ring may hold 8-bit keys and values (`KvRing` with scales); the kernels and references then
//! quantise on write and scale on read.

use super::Result;
use super::nn::RopeTables;
use super::quant::{KvQuant, dequantize_rows, quantize_rows};
use candle_core::{D, DType, Device, Tensor};

/// One layer's ring of keys and values, `[rows, heads, capacity, head_dim]` each: in the model's
/// dtype, or, with `scales`, int8 codes (two's-complement bytes, `quant::quantize_rows`) with
/// f32 scales `[rows, heads, capacity]` for the keys and for the values.
#[derive(Debug, Clone)]
pub struct KvRing {
    pub k: Tensor,
    pub v: Tensor,
    pub scales: Option<[Tensor; 2]>,
}

impl KvRing {
    /// Bytes its tensors hold.
    pub fn bytes(&self) -> u64 {
        let bytes = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        let scales = self.scales.iter().flatten().map(bytes).sum::<u64>();
        bytes(&self.k) + bytes(&self.v) + scales
    }

    /// An empty ring of `dims` (rows, heads, capacity, head_dim), stored as `quant` says.
    pub fn zeros(
        dims: (usize, usize, usize, usize),
        dtype: DType,
        quant: KvQuant,
        device: &Device,
    ) -> Result<Self> {
        let (rows, heads, capacity, _) = dims;
        let codes_dtype = match quant {
            KvQuant::None => dtype,
            KvQuant::Int8 => DType::U8,
        };
        let scales = match quant {
            KvQuant::None => None,
            KvQuant::Int8 => {
                let scale = || Tensor::ones((rows, heads, capacity), DType::F32, device);
                Some([scale()?, scale()?])
            }
        };
        Ok(Self {
            k: Tensor::zeros(dims, codes_dtype, device)?,
            v: Tensor::zeros(dims, codes_dtype, device)?,
            scales,
        })
    }

    pub fn is_int8(&self) -> bool {
        self.scales.is_some()
    }

    /// How it stores its keys and values.
    pub fn storage(&self) -> KvQuant {
        match self.is_int8() {
            true => KvQuant::Int8,
            false => KvQuant::None,
        }
    }

    /// Rows `start..start + len` (views: writes through them land in this ring).
    pub fn rows(&self, start: usize, len: usize) -> Result<Self> {
        self.map(|t| t.narrow(0, start, len))
    }

    /// Its first `len` entries of every row (views).
    pub fn entries(&self, len: usize) -> Result<Self> {
        self.map(|t| t.narrow(2, 0, len))
    }

    /// A contiguous copy.
    pub fn copy(&self) -> Result<Self> {
        self.map(|t| t.force_contiguous())
    }

    /// Writes `other` (a ring of this one's kind) over this one's first entries.
    pub fn set_entries(&self, other: &KvRing) -> Result<()> {
        self.k.slice_set(&other.k, 2, 0)?;
        self.v.slice_set(&other.v, 2, 0)?;
        if let (Some([k, v]), Some([other_k, other_v])) = (&self.scales, &other.scales) {
            k.slice_set(other_k, 2, 0)?;
            v.slice_set(other_v, 2, 0)?;
        } else if self.is_int8() != other.is_int8() {
            candle_core::bail!("an int8 ring and a dense one do not mix");
        }
        Ok(())
    }

    /// This ring stored as `quant` says: a dense one quantised to int8 codes and scales by the
    /// kernels' rounding, from the values it holds (a write quantises the f32 key before any
    /// bf16 rounding, so a code may differ by one); an int8 one is not made dense again.
    pub fn stored_as(&self, quant: KvQuant) -> Result<Self> {
        match (quant, self.is_int8()) {
            (KvQuant::Int8, true) | (KvQuant::None, false) => Ok(self.clone()),
            (KvQuant::Int8, false) => {
                let (k, k_scale) = quantize_rows(&self.k)?;
                let (v, v_scale) = quantize_rows(&self.v)?;
                Ok(Self {
                    k,
                    v,
                    scales: Some([k_scale, v_scale]),
                })
            }
            (KvQuant::None, true) => {
                candle_core::bail!("internal error: an int8 ring is not made dense again")
            }
        }
    }

    /// Keys and values in `dtype` (scaled back from their codes in an int8 ring).
    pub fn values_in(&self, dtype: DType) -> Result<(Tensor, Tensor)> {
        match &self.scales {
            None => Ok((self.k.to_dtype(dtype)?, self.v.to_dtype(dtype)?)),
            Some([k_scale, v_scale]) => Ok((
                dequantize_rows(&self.k, k_scale, dtype)?,
                dequantize_rows(&self.v, v_scale, dtype)?,
            )),
        }
    }

    /// The ring with `f` applied to each of its tensors (keys, values, scales).
    pub fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        let scales = match &self.scales {
            Some([k, v]) => Some([f(k)?, f(v)?]),
            None => None,
        };
        Ok(Self {
            k: f(&self.k)?,
            v: f(&self.v)?,
            scales,
        })
    }
}

/// The widest head the attention kernels hold (their query lives in shared memory).
pub const MAX_HEAD_DIM: usize = 128;

/// Ring entries one block of the attention kernel scores (`ATTENTION_CHUNK` in
/// `kernels/attention.cu`): a step attending at most this many needs no join, and its ring
/// write and attention run as one kernel (`write_and_attend`).
pub const ATTENTION_CHUNK: usize = 128;

/// How `ring_attention_part_*` is launched: its (score, value) load-batch variant (the kernel
/// name's suffix), the ring entries each block scores, and the threads of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttentionLaunch {
    pub suffix: &'static str,
    pub keys_per_block: usize,
    pub threads: u32,
}

impl AttentionLaunch {
    /// The kernel variants (`RING_ATTENTION_PART`, the staged and the joined ones in
    /// `kernels/attention.cu`): the name `DUPLEX_ATTENTION` gives, the kernel name's suffix, and
    /// the most ring entries a block of it scores (`MAX_KEYS_PER_BLOCK`; the staged ones hold
    /// their chunk in shared memory, `STAGED_MAX_KEYS`).
    const VARIANTS: [(&'static str, &'static str, usize); 7] = [
        ("", "", 256),
        ("s2v2", "_s2v2", 256),
        ("s4v8", "_s4v8", 256),
        ("s8v8", "_s8v8", 256),
        ("staged", "_staged", 64),
        ("joined", "_joined", 256),
        ("stagedjoined", "_staged_joined", 64),
    ];
    /// `MAX_ATTENTION_THREADS` in the kernel.
    const MAX_THREADS: u32 = 256;

    pub const DEFAULT: Self = Self {
        suffix: "",
        keys_per_block: ATTENTION_CHUNK,
        threads: 128,
    };

    /// The launches `duplex tune` times against the default on each card (`VARIANT,KEYS,THREADS`):
    /// the runners-up of the H200's hand trials (`docs/benchmarks.md`), the staged kernel, whose
    /// copies in flight should matter most where one wave of blocks cannot hide DRAM's latency,
    /// and both with the join inside (no join kernel).
    pub const CANDIDATES: [&'static str; 8] = [
        ",128,128",
        "s2v2,128,128",
        ",64,128",
        "staged,64,128",
        "staged,32,128",
        "staged,64,256",
        "joined,128,128",
        "stagedjoined,64,128",
    ];

    /// The launches of `CANDIDATES`, the default first.
    pub fn candidates() -> Vec<Self> {
        Self::CANDIDATES
            .iter()
            .map(|spec| Self::parse(spec).expect("the candidates parse"))
            .collect()
    }

    /// Its name in a kernel plan and on `duplex tune --exclude`: `attention-staged-64-128`
    /// (`plain` for the default kernel; no commas or spaces).
    pub fn name(&self) -> String {
        let variant = match self.variant() {
            "" => "plain",
            variant => variant,
        };
        format!(
            "attention-{variant}-{}-{}",
            self.keys_per_block, self.threads
        )
    }

    /// The launch `name` gives.
    pub fn from_name(name: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!(
                "{name:?} is not an attention launch like attention-plain-128-128 or \
                 attention-staged-64-128"
            )
        };
        let rest = name.strip_prefix("attention-").ok_or_else(bad)?;
        let [variant, keys, threads] = rest.splitn(3, '-').collect::<Vec<_>>()[..] else {
            return Err(bad());
        };
        let variant = if variant == "plain" { "" } else { variant };
        Self::parse(&format!("{variant},{keys},{threads}")).map_err(|_| bad())
    }

    /// Whether its kernel joins a head's chunks itself (`join_if_last`), with arrival counts.
    pub fn joins(&self) -> bool {
        self.suffix.ends_with("_joined")
    }

    /// Whether a fault in `other` likely lies in code it shares with this launch: the same
    /// scoring body (the suffix without `_joined`), or both joining inside.
    pub fn shares_code_with(&self, other: &Self) -> bool {
        let body = |launch: &Self| launch.suffix.trim_end_matches("_joined");
        body(self) == body(other) || (self.joins() && other.joins())
    }

    /// The variant's name in `DUPLEX_ATTENTION` (empty for the default kernel).
    fn variant(&self) -> &'static str {
        Self::VARIANTS
            .iter()
            .find(|(_, suffix, _)| *suffix == self.suffix)
            .map_or("", |(name, _, _)| name)
    }

    /// The launch `DUPLEX_ATTENTION` forces (`VARIANT,KEYS,THREADS`, e.g. `s8v8,256,128` or
    /// `staged,64,128`; an empty variant is the default kernel), whatever a kernel plan says:
    /// `None` when unset.
    pub fn forced() -> Option<std::result::Result<Self, String>> {
        std::env::var("DUPLEX_ATTENTION")
            .ok()
            .map(|spec| Self::parse(&spec))
    }

    pub fn parse(spec: &str) -> std::result::Result<Self, String> {
        let bad = || {
            let variants: Vec<String> = Self::VARIANTS
                .iter()
                .map(|(name, _, keys)| format!("{name:?} (KEYS 8..={keys})"))
                .collect();
            format!(
                "DUPLEX_ATTENTION={spec:?}: expected VARIANT,KEYS,THREADS with VARIANT one of \
                 {} and THREADS whole warps up to {}",
                variants.join(", "),
                Self::MAX_THREADS
            )
        };
        let [variant, keys, threads] = spec.split(',').collect::<Vec<_>>()[..] else {
            return Err(bad());
        };
        let Some(&(_, suffix, max_keys)) = Self::VARIANTS
            .iter()
            .find(|(name, _, _)| *name == variant.trim())
        else {
            return Err(bad());
        };
        let keys_per_block: usize = keys.trim().parse().map_err(|_| bad())?;
        let threads: u32 = threads.trim().parse().map_err(|_| bad())?;
        let keys_fit = (8..=max_keys).contains(&keys_per_block);
        let threads_fit = threads.is_multiple_of(32) && (32..=Self::MAX_THREADS).contains(&threads);
        if !keys_fit || !threads_fit {
            return Err(bad());
        }
        Ok(Self {
            suffix,
            keys_per_block,
            threads,
        })
    }
}

impl serde::Serialize for AttentionLaunch {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.name())
    }
}

impl<'de> serde::Deserialize<'de> for AttentionLaunch {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Self::from_name(&name).map_err(serde::de::Error::custom)
    }
}

/// Whether the attention kernels take heads of `head_dim`: at most `MAX_HEAD_DIM`, in whole
/// 16-byte loads of bf16.
pub fn head_dim_fits(head_dim: usize) -> bool {
    head_dim <= MAX_HEAD_DIM && head_dim.is_multiple_of(8)
}

/// How a step's rows see their pinned prefix (a persona prompt kept in the ring): row `b`'s
/// first `lens[b]` entries (u32 `[rows]`) hold keys at their prompt positions and are scored
/// against the query turned back by `unturn` (RoPE by minus the distance the window has slid past
/// them; f32 `[rows, 1, head_dim / 2]`). Rotations compose, so this equals turning those keys
/// forward to sit just before the window, without rewriting or copying them.
#[derive(Debug, Clone)]
pub struct PinnedPrefix {
    pub lens: Tensor,
    pub unturn: RopeTables,
}

impl PinnedPrefix {
    /// No prefix on any of `rows` rows (heads of `head_dim`).
    pub fn none(rows: usize, head_dim: usize, device: &Device) -> Result<Self> {
        Ok(Self {
            lens: Tensor::zeros(rows, DType::U32, device)?,
            unturn: RopeTables::identity(rows, head_dim, device)?,
        })
    }
}

/// How the temporal transformer attends one new token per slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeAttention {
    /// Candle ops: RoPE, a scatter into the ring, attention over the filled part.
    Composed,
    /// `rope_kv_write` then `ring_attention`: the ring write index is a device tensor, so a
    /// step needs no host-side index.
    Kernels,
}

impl DecodeAttention {
    /// The kernels where they run natively (bf16 on a GPU in a `cuda` build, heads of at most
    /// 128 and a multiple of 8, unless `DUPLEX_KERNELS=candle`), candle's ops elsewhere.
    pub fn for_device(dtype: DType, device: &candle_core::Device, head_dim: usize) -> Self {
        let candle_ops = super::nn::candle_ops_requested();
        let fits = head_dim_fits(head_dim);
        if cfg!(feature = "cuda") && device.is_cuda() && dtype == DType::BF16 && fits && !candle_ops
        {
            Self::Kernels
        } else {
            Self::Composed
        }
    }
}

/// `qkv` `[rows, 1, 3 · heads · head_dim]` (one token's packed in-projection per slot) → the
/// query rotated by `rope` (f32 tables `[rows, 1, head_dim / 2]`), `[rows, heads, 1, head_dim]`.
/// The rotated key and the value are written into `ring` (`[rows, heads, capacity, head_dim]`;
/// quantised if it is int8) at `write_idx` (i64 `[rows]`; a negative index leaves that row's
/// ring alone).
pub fn rope_kv_write(
    qkv: &Tensor,
    rope: &RopeTables,
    ring: &KvRing,
    write_idx: &Tensor,
) -> Result<Tensor> {
    if native(qkv) {
        let (cos, sin) = rope.cos_sin();
        return gpu::rope_kv_write(qkv, cos, sin, ring, write_idx);
    }
    let (_, heads, _, head_dim) = ring.k.dims4()?;
    let [q, k, v] = super::kv::split_qkv(qkv, heads, head_dim)?;
    let (q, k) = (
        rope.apply_f32(&q)?.to_dtype(qkv.dtype())?,
        rope.apply_f32(&k)?,
    );
    let entry = match ring.scales {
        None => KvRing {
            k: k.to_dtype(qkv.dtype())?,
            v,
            scales: None,
        },
        Some(_) => {
            let (k, k_scale) = quantize_rows(&k)?;
            let (v, v_scale) = quantize_rows(&v)?;
            KvRing {
                k,
                v,
                scales: Some([k_scale, v_scale]),
            }
        }
    };
    for (row, at) in write_idx.to_vec1::<i64>()?.into_iter().enumerate() {
        let Ok(at) = usize::try_from(at) else {
            continue;
        };
        let written = entry.rows(row, 1)?.copy()?;
        let slot = ring.rows(row, 1)?;
        slot.k.slice_set(&written.k, 2, at)?;
        slot.v.slice_set(&written.v, 2, at)?;
        if let (Some([k, v]), Some([written_k, written_v])) = (&slot.scales, &written.scales) {
            k.slice_set(written_k, 2, at)?;
            v.slice_set(written_v, 2, at)?;
        }
    }
    Ok(q)
}

/// Attention of one query per slot (`q` `[rows, heads, 1, head_dim]`) over the first `len`
/// ring entries, `len` being the last dim of `mask` (f32 `[rows, 1, 1, len]`, 0 visible, −∞
/// hidden), each row's pinned prefix seen as `prefix` says: `[rows, heads, 1, head_dim]`.
pub fn ring_attention(
    q: &Tensor,
    ring: &KvRing,
    mask: &Tensor,
    prefix: &PinnedPrefix,
) -> Result<Tensor> {
    if native(q) {
        return gpu::ring_attention(q, ring, mask, prefix);
    }
    let len = mask.dim(3)?;
    let (keys, values) = ring.entries(len)?.values_in(q.dtype())?;
    let lens = prefix.lens.to_vec1::<u32>()?;
    if lens.iter().all(|&pinned| pinned == 0) {
        let attend = super::kv::Attend {
            k: keys,
            v: values,
            mask: mask.clone(),
        };
        return super::kv::attention(q, &attend);
    }
    // Every entry scored against the query and against the turned-back query; the prefix
    // entries take the latter.
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores =
        |q: &Tensor| -> Result<Tensor> { keys.matmul(&q.t()?.contiguous()?)?.t()? * scale };
    let turned_back = prefix.unturn.apply_f32(q)?.to_dtype(q.dtype())?;
    let (plain, turned) = (scores(q)?, scores(&turned_back)?);
    let in_prefix: Vec<f32> = lens
        .iter()
        .flat_map(|&pinned| (0..len).map(move |j| f32::from(u8::from(j < pinned as usize))))
        .collect();
    let in_prefix = Tensor::from_vec(in_prefix, (lens.len(), 1, 1, len), q.device())?
        .to_dtype(plain.dtype())?;
    let scores = (&plain + (turned - &plain)?.broadcast_mul(&in_prefix)?)?
        .broadcast_add(&mask.to_dtype(plain.dtype())?)?;
    candle_nn::ops::softmax_last_dim(&scores)?.matmul(&values.contiguous()?)
}

/// `rope_kv_write` then `ring_attention` (arguments as theirs): on a GPU one kernel when the
/// entries attended fit one chunk (the depformer's few steps), else the two.
pub fn write_and_attend(
    qkv: &Tensor,
    rope: &RopeTables,
    ring: &KvRing,
    write_idx: &Tensor,
    mask: &Tensor,
    prefix: &PinnedPrefix,
) -> Result<Tensor> {
    if native(qkv) && mask.dim(3)? <= ATTENTION_CHUNK {
        let (cos, sin) = rope.cos_sin();
        return gpu::write_and_attend(qkv, cos, sin, ring, write_idx, mask, prefix);
    }
    let q = rope_kv_write(qkv, rope, ring, write_idx)?;
    ring_attention(&q, ring, mask, prefix)
}

/// Whether the CUDA kernels take `xs` (they are written for bf16).
fn native(xs: &Tensor) -> bool {
    cfg!(feature = "cuda") && xs.device().is_cuda() && xs.dtype() == DType::BF16
}

#[cfg(feature = "cuda")]
use super::cuda as gpu;

#[cfg(not(feature = "cuda"))]
mod gpu {
    use super::{KvRing, Result, Tensor};

    pub fn rope_kv_write(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &KvRing,
        _: &Tensor,
    ) -> Result<Tensor> {
        unreachable!("a tensor is only on a GPU in a build with the `cuda` feature")
    }

    pub fn write_and_attend(
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &KvRing,
        _: &Tensor,
        _: &Tensor,
        _: &super::PinnedPrefix,
    ) -> Result<Tensor> {
        unreachable!("a tensor is only on a GPU in a build with the `cuda` feature")
    }

    pub fn ring_attention(
        _: &Tensor,
        _: &KvRing,
        _: &Tensor,
        _: &super::PinnedPrefix,
    ) -> Result<Tensor> {
        unreachable!("a tensor is only on a GPU in a build with the `cuda` feature")
    }
}

#[cfg(test)]
mod tests {
    use super::AttentionLaunch;

    #[test]
    fn an_attention_launch_is_read_from_its_spec_or_refused() {
        assert_eq!(
            AttentionLaunch::parse(",128,128"),
            Ok(AttentionLaunch::DEFAULT)
        );
        let wide = AttentionLaunch::parse("s8v8, 256, 256").unwrap();
        assert_eq!(
            (wide.suffix, wide.keys_per_block, wide.threads),
            ("_s8v8", 256, 256)
        );
        let staged = AttentionLaunch::parse("staged,64,128").unwrap();
        assert_eq!(
            (staged.suffix, staged.keys_per_block, staged.threads),
            ("_staged", 64, 128)
        );
        for bad in [
            "",
            "plain,128,128",
            "s8v8,256",
            "s9v9,128,128",
            "s2v2,512,128",
            "s2v2,128,100",
            "s2v2,4,128",
            "staged,128,128",
        ] {
            let err = AttentionLaunch::parse(bad).unwrap_err();
            assert!(err.contains("DUPLEX_ATTENTION"), "{bad}: {err}");
        }
    }

    #[test]
    fn an_attention_launch_reads_back_from_its_name_in_a_plan() {
        assert_eq!(AttentionLaunch::DEFAULT.name(), "attention-plain-128-128");
        let candidates = AttentionLaunch::candidates();
        assert_eq!(candidates[0], AttentionLaunch::DEFAULT, "the default first");
        for launch in candidates {
            let name = launch.name();
            assert!(!name.contains([',', ' ']), "{name}: one word, no commas");
            assert_eq!(AttentionLaunch::from_name(&name), Ok(launch));
            let json = serde_json::to_string(&launch).unwrap();
            assert_eq!(json, format!("{name:?}"));
            assert_eq!(
                serde_json::from_str::<AttentionLaunch>(&json).unwrap(),
                launch
            );
        }
        for bad in [
            "attention-staged-128-128",
            "staged-64-128",
            "attention-plain-128",
            "split-k",
        ] {
            let err = AttentionLaunch::from_name(bad).unwrap_err();
            assert!(err.contains("attention"), "{bad}: {err}");
        }
        assert!(serde_json::from_str::<AttentionLaunch>("\"attention-s9v9-128-128\"").is_err());
    }

    #[test]
    fn joined_launches_say_so_and_launches_know_their_kin() {
        let launch = |spec| AttentionLaunch::parse(spec).unwrap();
        let (joined, staged_joined) = (launch("joined,128,128"), launch("stagedjoined,64,128"));
        assert!(joined.joins() && staged_joined.joins());
        assert_eq!(staged_joined.suffix, "_staged_joined");
        assert!(!AttentionLaunch::DEFAULT.joins() && !launch("staged,64,128").joins());
        assert!(
            launch("staged,32,128").shares_code_with(&staged_joined),
            "the same body"
        );
        assert!(joined.shares_code_with(&staged_joined), "both join");
        assert!(
            joined.shares_code_with(&AttentionLaunch::DEFAULT),
            "the same body"
        );
        assert!(!launch("s2v2,128,128").shares_code_with(&launch("staged,64,128")));
        assert!(
            AttentionLaunch::parse("stagedjoined,128,128").is_err(),
            "staged: 64 keys at most"
        );
    }
}
