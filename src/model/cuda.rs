//! Our CUDA kernels (`kernels/*.cu`, compiled to PTX by `build.rs`) as candle custom ops. Each
//! has a CPU reference elsewhere in `model` and a GPU test comparing the two (`tests/kernels.rs`).

use super::Result;
use super::decode::{KvRing, PinnedPrefix};
use super::graph::early;
use super::kernel_plan::{Kernel, Sublayer, W8A16_MMA_MIN_ROWS, mma_split_k};
use super::quant::{Int8Weight, KvQuant};
use super::sampling::DrawParams;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor};
use half::bf16;

const W8A16_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/w8a16.ptx"));
const GEMV_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gemv.ptx"));
const NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));
const SAMPLING_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));
const CONV_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/conv.ptx"));

/// A digest of the matrix-product kernels' code: a kernel plan measured on other code is stale.
pub fn product_kernels_digest() -> u64 {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same binary gives the same digest in every run.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (W8A16_PTX, GEMV_PTX).hash(&mut hasher);
    hasher.finish()
}

/// Warps (output rows) per block of the w8a16 kernel.
const W8A16_WARPS_PER_BLOCK: usize = 4;
const W8A16_ROWS_PER_WARP: usize = 4;

fn contiguous(layout: &Layout, what: &str) -> Result<()> {
    if !layout.is_contiguous() {
        candle_core::bail!("{what} must be contiguous");
    }
    Ok(())
}

/// A null device pointer: an optional buffer a kernel is launched without.
static NULL_POINTER: u64 = 0;

/// Pushes the optional buffer `value` as a kernel argument, a null pointer where it is absent.
fn arg_or_null<'a, T>(builder: &mut LaunchArgs<'a>, value: Option<&'a T>)
where
    LaunchArgs<'a>: PushKernelArg<&'a T> + PushKernelArg<&'a u64>,
{
    match value {
        Some(value) => PushKernelArg::<&'a T>::arg(builder, value),
        None => PushKernelArg::<&'a u64>::arg(builder, &NULL_POINTER),
    };
}

/// Rows of a tile of `w8a16_mma_bf16`, its output channels and warps per block.
const W8A16_MMA_ROWS: usize = 64;
const W8A16_MMA_CHANNELS: usize = 64;
const W8A16_MMA_WARPS: usize = 8;
/// The SMs of `device`'s GPU.
fn sm_count(device: &candle_core::CudaDevice) -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let context = device.cuda_stream().context().clone();
    let count = context
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    Ok(count.max(1) as usize)
}

/// `gemv_splitk_*` (kernels/gemv.cu): output channels per block, the most warps sharing them,
/// and the most rows.
const GEMV_CHANNELS: usize = 4;
const GEMV_MAX_WARPS: usize = 8;
pub use super::kernel_plan::{GEMV_MAX_ROWS, gemv_takes};

/// The entry point, grid and block of `gemv.cu`'s `family` (`int8`, `bf16`) for `rows` x `k`
/// inputs, `n` outputs and weights of `weight_bytes` each.
fn gemv_launch(
    family: &str,
    rows: usize,
    n: usize,
    k: usize,
    weight_bytes: usize,
) -> Result<(String, LaunchConfig)> {
    let per_load = 16 / weight_bytes;
    if !gemv_takes(rows, k, weight_bytes) {
        candle_core::bail!(
            "the split-K products take 1 to {GEMV_MAX_ROWS} rows and inputs in whole 16-byte loads, not {rows} x {k}"
        );
    }
    let warps = k.div_ceil(32 * per_load).clamp(1, GEMV_MAX_WARPS);
    let config = LaunchConfig {
        grid_dim: (n.div_ceil(GEMV_CHANNELS) as u32, 1, 1),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((format!("gemv_splitk_{family}_b{rows}"), config))
}

/// A split-K product's `(rows, n, k)` from its input `[rows, k]` and weight `[n, k]` layouts,
/// both contiguous and starting on a 16-byte boundary (elements of `elem_bytes`).
fn gemv_operands(
    x_layout: &Layout,
    w_layout: &Layout,
    elem_bytes: usize,
) -> Result<(usize, usize, usize)> {
    contiguous(x_layout, "gemv input")?;
    contiguous(w_layout, "gemv weight")?;
    let (rows, k) = x_layout.shape().dims2()?;
    let (n, k_w) = w_layout.shape().dims2()?;
    let aligned = |offset: usize| offset.is_multiple_of(16 / elem_bytes);
    if k != k_w || !aligned(x_layout.start_offset()) || !aligned(w_layout.start_offset()) {
        candle_core::bail!(
            "gemv: input width {k} vs weight {k_w} (must match; both 16-byte aligned)"
        );
    }
    Ok((rows, n, k))
}

/// Which w8a16 kernel runs a product (`kernels/w8a16.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum W8a16Kernel {
    /// `w8a16_bf16`: four output channels per warp, any number of rows.
    Rows,
    /// `w8a16_ahead_bf16`: the same, each warp's next weights loaded before it multiplies
    /// the ones it holds.
    RowsAhead,
    /// `gemv_splitk_int8_b*` (kernels/gemv.cu): up to 8 warps split each channel's inputs, 1
    /// to 4 rows.
    SplitK,
    /// `w8a16_mma_bf16`: tiles of rows on the tensor cores.
    TensorCores,
}

/// What a split-K product takes of its transformer sublayer besides the matrix, each optional:
/// the skip connection added to its output, the RMS pre-norm of its input, and a gated FFN's
/// gate applied to its output.
#[derive(Debug, Clone, Default)]
pub struct Ends {
    /// bf16, the output's shape.
    pub residual: Option<Tensor>,
    /// The norm's f32 weight `[k]` and epsilon.
    pub norm: Option<(Tensor, f32)>,
    /// The product is a gated FFN's in-projection, `[a, u]` of `n = 2h` channels: the output is
    /// `silu(a) · u` `[rows, h]`, as `swiglu` would make it (no residual with it).
    pub gate: bool,
}

impl Ends {
    pub fn is_empty(&self) -> bool {
        self.residual.is_none() && self.norm.is_none() && !self.gate
    }

    /// The output width of a product of `n` channels.
    fn out_features(&self, n: usize) -> usize {
        if self.gate { n / 2 } else { n }
    }

    /// Compact copies for a `[rows, k]` → `[rows, n]` product, checked.
    fn for_product(&self, rows: usize, n: usize, k: usize) -> Result<Self> {
        if self.gate && (!n.is_multiple_of(2) || self.residual.is_some()) {
            candle_core::bail!(
                "a fused gate needs an even number of channels ({n}) and no skip connection"
            );
        }
        let n = self.out_features(n);
        let residual = match &self.residual {
            Some(r) => Some(r.reshape((rows, n))?.to_dtype(DType::BF16)?.contiguous()?),
            None => None,
        };
        let norm = match &self.norm {
            Some((alpha, eps)) if alpha.elem_count() == k => Some((
                alpha.flatten_all()?.to_dtype(DType::F32)?.contiguous()?,
                *eps,
            )),
            Some((alpha, _)) => candle_core::bail!(
                "a fused norm of {} weights for inputs of {k}",
                alpha.elem_count()
            ),
            None => None,
        };
        Ok(Self {
            residual,
            norm,
            gate: self.gate,
        })
    }
}

/// `gemv.cu`'s `flags`: the product is gated; it prefetches its first weights before it waits
/// for the kernel before it (worth it only where it starts early, `graph::early`).
const GEMV_GATED: i32 = 1;
const GEMV_PREFETCH: i32 = 2;

/// `Ends` as kernel arguments: residual, alpha (null pointers for what is absent), eps and
/// the flags (gated, prefetch).
struct EndsArgs<'a> {
    residual: Option<CudaView<'a, bf16>>,
    alpha: Option<CudaView<'a, f32>>,
    eps: f32,
    flags: i32,
}

impl<'a> EndsArgs<'a> {
    /// From read locks on `ends`' residual and norm weight (`Tensor::storage_and_layout`).
    fn new<G: std::ops::Deref<Target = candle_core::Storage>>(
        ends: &Ends,
        residual: Option<&'a (G, &'a Layout)>,
        alpha: Option<&'a (G, &'a Layout)>,
        prefetch: bool,
    ) -> Result<Self> {
        Ok(Self {
            residual: residual
                .map(|(storage, layout)| gpu_view::<bf16>(storage, layout, "skip connection"))
                .transpose()?,
            alpha: alpha
                .map(|(storage, layout)| gpu_view::<f32>(storage, layout, "norm weight"))
                .transpose()?,
            eps: ends.norm.as_ref().map_or(0.0, |(_, eps)| *eps),
            flags: if ends.gate { GEMV_GATED } else { 0 }
                | if prefetch { GEMV_PREFETCH } else { 0 },
        })
    }

    fn push(&'a self, builder: &mut LaunchArgs<'a>) {
        arg_or_null(builder, self.residual.as_ref());
        arg_or_null(builder, self.alpha.as_ref());
        builder.arg(&self.eps).arg(&self.flags);
    }
}

/// The w8a16 product by `kernel`; the split-K kernel also takes its sublayer's `ends`.
struct W8a16 {
    kernel: W8a16Kernel,
    ends: Ends,
}

impl W8a16 {
    /// The kernel's name, grid and block for `rows` x `k` inputs and `n` outputs; for the
    /// tensor-core kernel, `split_k` inputs a block.
    fn launch(
        &self,
        rows: usize,
        n: usize,
        k: usize,
        split_k: usize,
    ) -> Result<(String, LaunchConfig)> {
        let (name, grid_dim, warps) = match self.kernel {
            W8a16Kernel::Rows | W8a16Kernel::RowsAhead => (
                match self.kernel {
                    W8a16Kernel::Rows => "w8a16_bf16",
                    _ => "w8a16_ahead_bf16",
                }
                .to_owned(),
                (
                    n.div_ceil(W8A16_WARPS_PER_BLOCK * W8A16_ROWS_PER_WARP) as u32,
                    1,
                    1,
                ),
                W8A16_WARPS_PER_BLOCK,
            ),
            W8a16Kernel::SplitK => return gemv_launch("int8", rows, n, k, 1),
            W8a16Kernel::TensorCores => (
                "w8a16_mma_bf16".to_owned(),
                (
                    n.div_ceil(W8A16_MMA_CHANNELS) as u32,
                    rows.div_ceil(W8A16_MMA_ROWS) as u32,
                    k.div_ceil(split_k) as u32,
                ),
                W8A16_MMA_WARPS,
            ),
        };
        let config = LaunchConfig {
            grid_dim,
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        Ok((name, config))
    }
}

impl CustomOp3 for W8a16 {
    fn name(&self) -> &'static str {
        "w8a16"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("w8a16 on the CPU is `quant::w8a16_reference`")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        q: &CudaStorage,
        q_layout: &Layout,
        scale: &CudaStorage,
        scale_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        contiguous(x_layout, "w8a16 input")?;
        contiguous(q_layout, "w8a16 weight")?;
        let (rows, k) = x_layout.shape().dims2()?;
        let (n, k_w) = q_layout.shape().dims2()?;
        if k != k_w
            || k == 0
            || !k.is_multiple_of(16)
            || !x_layout.start_offset().is_multiple_of(8)
            || !q_layout.start_offset().is_multiple_of(16)
        {
            candle_core::bail!(
                "w8a16: input width {k} vs weight {k_w} (must match and be a nonzero multiple of 16; input and weight 16-byte aligned)"
            );
        }
        if scale_layout.shape().elem_count() != n || !scale_layout.is_contiguous() {
            candle_core::bail!(
                "w8a16: {:?} scales for {n} output channels",
                scale_layout.shape()
            );
        }
        let device = x.device().clone();
        let xs = x.as_cuda_slice::<bf16>()?.slice(x_layout.start_offset()..);
        let qs = q.as_cuda_slice::<u8>()?.slice(q_layout.start_offset()..);
        let ss = scale
            .as_cuda_slice::<f32>()?
            .slice(scale_layout.start_offset()..);
        let n_out = self.ends.out_features(n);
        let tiles = n.div_ceil(W8A16_MMA_CHANNELS) * rows.div_ceil(W8A16_MMA_ROWS);
        let split_k = match self.kernel {
            W8a16Kernel::TensorCores => mma_split_k(tiles, k, sm_count(&device)?),
            _ => k,
        };
        let (name, config) = self.launch(rows, n, k, split_k)?;
        if self.kernel != W8a16Kernel::SplitK && !self.ends.is_empty() {
            candle_core::bail!("the {:?} w8a16 kernel fuses nothing", self.kernel);
        }
        let early = early::prepare(&device)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { device.alloc::<bf16>(rows * n_out)? };
        let splits = k.div_ceil(split_k);
        // SAFETY: each split's block writes its sum of every row and channel.
        let partial = match splits {
            1 => None,
            _ => Some(unsafe { device.alloc::<f32>(splits * rows * n)? }),
        };
        let residual = self.ends.residual.as_ref().map(|r| r.storage_and_layout());
        let alpha = self.ends.norm.as_ref().map(|(a, _)| a.storage_and_layout());
        let prefetch = early.is_some();
        let ends = EndsArgs::new(&self.ends, residual.as_ref(), alpha.as_ref(), prefetch)?;
        let func = match self.kernel {
            W8a16Kernel::SplitK => {
                device.get_or_load_custom_func(&name, "duplex_gemv", GEMV_PTX)?
            }
            _ => device.get_or_load_custom_func(&name, "duplex_w8a16", W8A16_PTX)?,
        };
        let (batch, n_i, k_i, split_k_i) = (rows as i32, n as i32, k as i32, split_k as i32);
        let mut builder = func.builder();
        builder.arg(&xs).arg(&qs).arg(&ss);
        // The split-K entry points take their sublayer's ends and have the batch in their name.
        if self.kernel == W8a16Kernel::SplitK {
            ends.push(&mut builder);
        }
        builder.arg(&out);
        if self.kernel == W8a16Kernel::TensorCores {
            arg_or_null(&mut builder, partial.as_ref());
        }
        if self.kernel != W8a16Kernel::SplitK {
            builder.arg(&batch);
        }
        builder.arg(&n_i).arg(&k_i);
        if self.kernel == W8a16Kernel::TensorCores {
            builder.arg(&split_k_i);
        }
        early::arm(early)?;
        // SAFETY: the arguments match the kernel's signature; sizes were checked above.
        unsafe { builder.launch(config) }.w()?;
        if let Some(partial) = &partial {
            join_mma_splits(&device, partial, &ss, &out, splits, rows, n)?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((rows, n_out)),
        ))
    }
}

/// `w8a16_mma_join`: `out` = the `splits` partial sums of `rows` x `n` outputs added in order
/// and scaled.
fn join_mma_splits(
    device: &candle_core::CudaDevice,
    partial: &CudaSlice<f32>,
    scale: &CudaView<'_, f32>,
    out: &CudaSlice<bf16>,
    splits: usize,
    rows: usize,
    n: usize,
) -> Result<()> {
    let func = device.get_or_load_custom_func("w8a16_mma_join", "duplex_w8a16", W8A16_PTX)?;
    let config = LaunchConfig::for_num_elems((rows * n) as u32);
    let (splits, rows, n) = (splits as i32, rows as i32, n as i32);
    let mut builder = func.builder();
    builder
        .arg(partial)
        .arg(scale)
        .arg(out)
        .arg(&splits)
        .arg(&rows)
        .arg(&n);
    early::arm(early::prepare(device)?)?;
    // SAFETY: the arguments match the kernel's signature; `partial` holds `splits` x `rows` x `n`.
    unsafe { builder.launch(config) }.w()?;
    Ok(())
}

/// Whether environment variable `name` is `1`.
fn requested(name: &str, flag: &'static std::sync::OnceLock<bool>) -> bool {
    *flag.get_or_init(|| std::env::var(name).is_ok_and(|v| v == "1"))
}

/// The kernel `w8a16` uses for `rows` rows of an int8 `[n, k]` matrix in `sublayer`: the
/// split-K one for 1 to 4 rows when `DUPLEX_W8A16_SPLITK=1`, the tensor-core one from 4 rows
/// when `DUPLEX_W8A16_MMA=1` (to compare them by hand); else the installed kernel plan's choice
/// (`kernel_plan`), else the matrix-vector one.
pub fn w8a16_kernel(n: usize, k: usize, sublayer: Option<Sublayer>, rows: usize) -> W8a16Kernel {
    static SPLITK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    static MMA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if gemv_takes(rows, k, 1) && requested("DUPLEX_W8A16_SPLITK", &SPLITK) {
        return W8a16Kernel::SplitK;
    }
    if rows >= W8A16_MMA_MIN_ROWS && requested("DUPLEX_W8A16_MMA", &MMA) {
        return W8a16Kernel::TensorCores;
    }
    let planned = super::kernel_plan::installed()
        .zip(sublayer)
        .and_then(|(plan, sublayer)| plan.int8_kernel(n, k, sublayer, rows));
    match planned {
        Some(Kernel::SplitK) if gemv_takes(rows, k, 1) => W8a16Kernel::SplitK,
        Some(Kernel::TensorCores) if rows >= W8A16_MMA_MIN_ROWS => W8a16Kernel::TensorCores,
        Some(Kernel::RowsAhead) => W8a16Kernel::RowsAhead,
        _ => W8a16Kernel::Rows,
    }
}

/// `x · (q · scale)ᵀ` on the GPU with int8 weights, by the kernel the plan measured for the
/// product in `sublayer` (its ends composed around it); `x` any leading dims, bf16 compute.
pub fn w8a16(xs: &Tensor, weight: &Int8Weight, sublayer: Sublayer) -> Result<Tensor> {
    let k = xs.dim(candle_core::D::Minus1)?;
    let (n, rows) = (weight.out_features()?, xs.elem_count() / k);
    w8a16_on(xs, weight, w8a16_kernel(n, k, Some(sublayer), rows))
}

/// Whether `w8a16` runs `rows` rows in `sublayer` on the split-K kernel, which takes the
/// sublayer's ends inside.
pub fn w8a16_fuses(weight: &Int8Weight, sublayer: Option<Sublayer>, rows: usize) -> Result<bool> {
    let (n, k) = (weight.out_features()?, weight.in_features()?);
    Ok(w8a16_kernel(n, k, sublayer, rows) == W8a16Kernel::SplitK)
}

/// `w8a16` by `kernel`.
pub fn w8a16_on(xs: &Tensor, weight: &Int8Weight, kernel: W8a16Kernel) -> Result<Tensor> {
    w8a16_fused(xs, weight, kernel, &Ends::default())
}

/// `w8a16` by `kernel` with its sublayer's `ends` inside the kernel (the split-K one only).
pub fn w8a16_fused(
    xs: &Tensor,
    weight: &Int8Weight,
    kernel: W8a16Kernel,
    ends: &Ends,
) -> Result<Tensor> {
    let n = weight.out_features()?;
    on_rows(xs, ends.out_features(n), |x, rows, k| {
        let op = W8a16 {
            kernel,
            ends: ends.for_product(rows, n, k)?,
        };
        x.apply_op3_no_bwd(&weight.q, &weight.scale, &op)
    })
}

/// `product` of `xs` as compact bf16 rows `[rows, k]` (given with `rows` and `k`), its `[rows,
/// n]` result returned with `xs`'s leading dims and dtype.
fn on_rows(
    xs: &Tensor,
    n: usize,
    product: impl FnOnce(&Tensor, usize, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut dims = xs.dims().to_vec();
    let k = dims[dims.len() - 1];
    let rows = xs.elem_count() / k;
    let x = xs.reshape((rows, k))?.to_dtype(DType::BF16)?.contiguous()?;
    let y = product(&x, rows, k)?;
    *dims.last_mut().expect("a linear input has dims") = n;
    y.reshape(dims)?.to_dtype(xs.dtype())
}

/// `x · wᵀ` with bf16 weights `[n, k]` by `gemv_splitk_bf16_b*`, with its sublayer's `ends`.
struct GemvBf16 {
    ends: Ends,
}

impl candle_core::CustomOp2 for GemvBf16 {
    fn name(&self) -> &'static str {
        "gemv-bf16"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the bf16 matrix-vector kernel has no CPU path; use a matmul")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, n, k) = gemv_operands(x_layout, w_layout, 2)?;
        let (name, config) = gemv_launch("bf16", rows, n, k, 2)?;
        let device = x.device().clone();
        let early = early::prepare(&device)?;
        let residual = self.ends.residual.as_ref().map(|r| r.storage_and_layout());
        let alpha = self.ends.norm.as_ref().map(|(a, _)| a.storage_and_layout());
        let prefetch = early.is_some();
        let ends = EndsArgs::new(&self.ends, residual.as_ref(), alpha.as_ref(), prefetch)?;
        let xs = x.as_cuda_slice::<bf16>()?.slice(x_layout.start_offset()..);
        let ws = w.as_cuda_slice::<bf16>()?.slice(w_layout.start_offset()..);
        let n_out = self.ends.out_features(n);
        // SAFETY: every element is written by the kernel.
        let out = unsafe { device.alloc::<bf16>(rows * n_out)? };
        let func = device.get_or_load_custom_func(&name, "duplex_gemv", GEMV_PTX)?;
        let (n_i, k_i) = (n as i32, k as i32);
        let mut builder = func.builder();
        // The bf16 entry points take a scale pointer they never read, like the int8 ones' scale:
        // the input stands in for it.
        builder.arg(&xs).arg(&ws).arg(&xs);
        ends.push(&mut builder);
        builder.arg(&out).arg(&n_i).arg(&k_i);
        early::arm(early)?;
        // SAFETY: the arguments match the kernel's signature; sizes were checked above.
        unsafe { builder.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((rows, n_out)),
        ))
    }
}

/// `x · wᵀ` for 1 to 4 rows of `x` with bf16 weights `w` `[out, in]` (PyTorch's layout), by
/// the split-K matrix-vector kernel, with its sublayer's `ends` inside; `x` any leading dims.
pub fn gemv_bf16(xs: &Tensor, weight: &Tensor, ends: &Ends) -> Result<Tensor> {
    let n = weight.dim(0)?;
    let weight = weight.to_dtype(DType::BF16)?.contiguous()?;
    on_rows(xs, ends.out_features(n), |x, rows, k| {
        let op = GemvBf16 {
            ends: ends.for_product(rows, n, k)?,
        };
        x.apply_op2_no_bwd(&weight, &op)
    })
}

struct RmsNormOp {
    alpha: Tensor,
    eps: f32,
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "duplex-rms-norm"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("rms norm on the CPU is `nn::RmsNorm`")
    }

    fn cuda_fwd(&self, x: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        contiguous(layout, "rms norm input")?;
        let dim = layout.shape().dims().last().copied().unwrap_or(0);
        if dim == 0 || self.alpha.elem_count() != dim {
            candle_core::bail!(
                "rms norm: {} weights for rows of {dim}",
                self.alpha.elem_count()
            );
        }
        let rows = layout.shape().elem_count() / dim;
        let device = x.device().clone();
        let xs = x.as_cuda_slice::<bf16>()?.slice(layout.start_offset()..);
        let (alpha, alpha_layout) = self.alpha.storage_and_layout();
        let alpha = gpu_view::<f32>(&alpha, alpha_layout, "alpha")?;
        let early = early::prepare(&device)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { device.alloc::<bf16>(rows * dim)? };
        let func = device.get_or_load_custom_func("rms_norm_bf16", "duplex_norm", NORM_PTX)?;
        let (dim_i, eps) = (dim as i32, self.eps);
        let mut builder = func.builder();
        builder.arg(&xs).arg(&alpha).arg(&out).arg(&dim_i).arg(&eps);
        let config = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        early::arm(early)?;
        // SAFETY: the arguments match the kernel's signature.
        unsafe { builder.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            layout.shape().clone(),
        ))
    }
}

/// Fused RMS normalisation of bf16 rows (f32 inside); `alpha` f32 `[dim]` on the same GPU.
pub fn rms_norm(xs: &Tensor, alpha: &Tensor, eps: f32) -> Result<Tensor> {
    xs.to_dtype(DType::BF16)?
        .contiguous()?
        .apply_op1_no_bwd(&RmsNormOp {
            alpha: alpha.to_dtype(DType::F32)?,
            eps,
        })
}

/// `skip_layer_norm_f32`'s tensors besides its input: the update added to it and its scale
/// (`update` absent: a plain LayerNorm), and the norm's weight and bias.
struct SkipLayerNormOp {
    update: Option<(Tensor, Option<Tensor>)>,
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl CustomOp1 for SkipLayerNormOp {
    fn name(&self) -> &'static str {
        "duplex-skip-layer-norm"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("layer norm on the CPU is `nn::LayerNorm`")
    }

    fn cuda_fwd(&self, x: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        contiguous(layout, "layer norm input")?;
        let dim = layout.shape().dims().last().copied().unwrap_or(0);
        let rows = layout.shape().elem_count() / dim.max(1);
        let wrong = |what: &str, count: usize, want: usize| {
            candle_core::bail!("layer norm: {count} {what} values for rows of {dim} (want {want})")
        };
        for (what, tensor) in [("weight", &self.weight), ("bias", &self.bias)] {
            if dim == 0 || tensor.elem_count() != dim {
                wrong(what, tensor.elem_count(), dim)?;
            }
        }
        if let Some((update, scale)) = &self.update {
            if update.shape() != layout.shape() {
                candle_core::bail!(
                    "layer norm: an update of {:?} for an input of {:?}",
                    update.shape(),
                    layout.shape()
                );
            }
            if let Some(scale) = scale.as_ref().filter(|s| s.elem_count() != dim) {
                wrong("scale", scale.elem_count(), dim)?;
            }
        }
        let device = x.device().clone();
        let xs = x.as_cuda_slice::<f32>()?.slice(layout.start_offset()..);
        let (weight, bias) = (
            self.weight.storage_and_layout(),
            self.bias.storage_and_layout(),
        );
        let update = self.update.as_ref().map(|(u, _)| u.storage_and_layout());
        let scale = self
            .update
            .as_ref()
            .and_then(|(_, s)| s.as_ref().map(Tensor::storage_and_layout));
        let (weight, bias) = (f32_view(&weight, "weight")?, f32_view(&bias, "bias")?);
        let update = update.as_ref().map(|u| f32_view(u, "update")).transpose()?;
        let scale = scale.as_ref().map(|s| f32_view(s, "scale")).transpose()?;
        let early = early::prepare(&device)?;
        let halves = if update.is_some() { 2 } else { 1 };
        // SAFETY: the kernel writes every element: y always, x_out when there is an update.
        let out = unsafe { device.alloc::<f32>(halves * rows * dim)? };
        let (x_out, y) = (
            out.slice(..(halves - 1) * rows * dim),
            out.slice((halves - 1) * rows * dim..),
        );
        let func =
            device.get_or_load_custom_func("skip_layer_norm_f32", "duplex_norm", NORM_PTX)?;
        let (dim_i, eps) = (dim as i32, self.eps);
        let mut builder = func.builder();
        builder.arg(&xs);
        arg_or_null(&mut builder, update.as_ref());
        arg_or_null(&mut builder, update.as_ref().and(scale.as_ref()));
        builder.arg(&weight).arg(&bias);
        arg_or_null(&mut builder, update.as_ref().map(|_| &x_out));
        builder.arg(&y).arg(&dim_i).arg(&eps);
        let threads = dim.div_ceil(4).next_multiple_of(32).clamp(32, 1024) as u32;
        let config = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        early::arm(early)?;
        // SAFETY: the arguments match the kernel's signature; sizes were checked above.
        unsafe { builder.launch(config) }.w()?;
        let mut dims = vec![halves];
        dims.extend_from_slice(layout.shape().dims());
        Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from(dims)))
    }
}

/// `t` as contiguous f32, as our f32 kernels read it (no copy when it already is).
fn f32_contiguous(t: &Tensor) -> Result<Tensor> {
    t.to_dtype(DType::F32)?.contiguous()
}

fn run_skip_layer_norm(
    xs: &Tensor,
    update: Option<(&Tensor, Option<&Tensor>)>,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> Result<Tensor> {
    let update = match update {
        Some((u, s)) => Some((f32_contiguous(u)?, s.map(f32_contiguous).transpose()?)),
        None => None,
    };
    let op = SkipLayerNormOp {
        update,
        weight: f32_contiguous(weight)?,
        bias: f32_contiguous(bias)?,
        eps,
    };
    f32_contiguous(xs)?.apply_op1_no_bwd(&op)
}

/// Mimi's skip connection then LayerNorm, f32 rows on the GPU in one kernel: `xs + scale ·
/// update` (a scale of one when absent) and its normalisation `· weight + bias`, both returned.
pub fn skip_layer_norm(
    xs: &Tensor,
    update: &Tensor,
    scale: Option<&Tensor>,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let halves = run_skip_layer_norm(xs, Some((update, scale)), weight, bias, eps)?;
    Ok((halves.get(0)?, halves.get(1)?))
}

/// LayerNorm of f32 rows on the GPU: `skip_layer_norm` without a skip connection.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f32) -> Result<Tensor> {
    run_skip_layer_norm(xs, None, weight, bias, eps)?.get(0)
}

/// `x · wᵀ` in f32 by `gemv_splitk_f32_b*` (Mimi's products): `x` `[rows, k]`, `w` `[n, k]`.
struct GemvF32;

impl candle_core::CustomOp2 for GemvF32 {
    fn name(&self) -> &'static str {
        "gemv-f32"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the f32 matrix-vector kernel has no CPU path; use a matmul")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        w: &CudaStorage,
        w_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (rows, n, k) = gemv_operands(x_layout, w_layout, 4)?;
        let (name, config) = gemv_launch("f32", rows, n, k, 4)?;
        let device = x.device().clone();
        let xs = x.as_cuda_slice::<f32>()?.slice(x_layout.start_offset()..);
        let ws = w.as_cuda_slice::<f32>()?.slice(w_layout.start_offset()..);
        let early = early::prepare(&device)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { device.alloc::<f32>(rows * n)? };
        let func = device.get_or_load_custom_func(&name, "duplex_gemv", GEMV_PTX)?;
        let (n_i, k_i) = (n as i32, k as i32);
        let mut builder = func.builder();
        builder.arg(&xs).arg(&ws).arg(&out).arg(&n_i).arg(&k_i);
        early::arm(early)?;
        // SAFETY: the arguments match the kernel's signature; sizes were checked above.
        unsafe { builder.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((rows, n)),
        ))
    }
}

/// `x · wᵀ` for 1 to `GEMV_MAX_ROWS` f32 rows `[rows, k]` and f32 weights `[n, k]` on the
/// GPU, by the split-K kernel (k a multiple of 4) → `[rows, n]`.
pub fn gemv_f32(xs: &Tensor, weight: &Tensor) -> Result<Tensor> {
    f32_contiguous(xs)?.apply_op2_no_bwd(&f32_contiguous(weight)?, &GemvF32)
}

/// The most positions of context `stream_im2col_f32` keeps (kernels/conv.cu).
pub const STREAM_CONV_MAX_CONTEXT: usize = 1024;
/// About how many entries of the product's input each block of `stream_im2col_f32` writes.
const STREAM_CONV_BLOCK_ENTRIES: usize = 256;

/// A causal streaming conv's taps and step, and whether an ELU comes before it.
#[derive(Debug, Clone, Copy)]
pub struct StreamConv {
    pub kernel: usize,
    pub stride: usize,
    pub dilation: usize,
    pub elu: bool,
}

impl StreamConv {
    /// The input positions it keeps between steps.
    pub fn context(&self) -> usize {
        (self.kernel.saturating_sub(1) * self.dilation + 1).saturating_sub(self.stride)
    }

    /// The outputs of a (row, channel) each block of `stream_im2col_f32` lays out, of `t_out`:
    /// about `STREAM_CONV_BLOCK_ENTRIES` entries, at least every output that reads the kept
    /// context (only the first block reads it, and moves it on), and few enough blocks for a
    /// grid's second dimension (a whole recording in one step).
    fn outputs_per_block(&self, t_out: usize) -> usize {
        let reading_context = self.context().div_ceil(self.stride);
        let grid_limit = t_out.div_ceil(u16::MAX as usize);
        reading_context
            .max(STREAM_CONV_BLOCK_ENTRIES.div_ceil(self.kernel))
            .max(grid_limit)
    }
}

/// `stream_im2col_f32`: a streaming conv's input `[rows, c_in, t_in]` (f32) with the context it
/// keeps in `prev` (updated in place for the rows `active` marks) as the right-hand side of its
/// product, `[c_in · kernel, rows · t_out]`.
struct StreamIm2col<'a> {
    prev: Option<&'a Tensor>,
    conv: StreamConv,
}

impl StreamIm2col<'_> {
    /// Checks `prev` against `rows` x `c_in` inputs of a conv that keeps `context` positions.
    fn check_prev(&self, rows: usize, c_in: usize, context: usize) -> Result<()> {
        match (self.prev, context) {
            (None, 0) => Ok(()),
            (Some(prev), context) if context > 0 => {
                let (batch, prev_c, prev_t) = prev.dims3()?;
                if batch < rows || prev_c != c_in || prev_t != context || !prev.is_contiguous() {
                    candle_core::bail!(
                        "streaming conv: a context of {:?} for {rows} rows of {c_in} channels, \
                         {context} positions",
                        prev.dims()
                    );
                }
                Ok(())
            }
            _ => candle_core::bail!(
                "streaming conv: a context of {context} positions needs a state, and only it"
            ),
        }
    }
}

impl candle_core::CustomOp2 for StreamIm2col<'_> {
    fn name(&self) -> &'static str {
        "duplex-stream-im2col"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("on the CPU a streaming conv is `mimi::conv::Conv1d::step`'s candle ops")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        x_layout: &Layout,
        active: &CudaStorage,
        active_layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        contiguous(x_layout, "streaming conv input")?;
        let (rows, c_in, t_in) = x_layout.shape().dims3()?;
        let StreamConv {
            kernel,
            stride,
            dilation,
            elu,
        } = self.conv;
        let empty = rows == 0 || c_in == 0 || t_in == 0;
        if empty || kernel == 0 || stride == 0 || t_in % stride != 0 {
            candle_core::bail!(
                "streaming conv: {t_in} samples of {rows} x {c_in} for {kernel} taps of stride \
                 {stride} (a whole, nonzero number of strides)"
            );
        }
        let context = self.conv.context();
        if context > STREAM_CONV_MAX_CONTEXT {
            candle_core::bail!(
                "streaming conv: {kernel} taps of dilation {dilation} keep {context} positions, \
                 more than {STREAM_CONV_MAX_CONTEXT}"
            );
        }
        if active_layout.shape().dims() != [rows] || !active_layout.is_contiguous() {
            candle_core::bail!(
                "streaming conv: a row mask of {:?} for {rows} rows",
                active_layout.shape()
            );
        }
        self.check_prev(rows, c_in, context)?;
        let prev = self.prev.map(Tensor::storage_and_layout);
        let t_out = t_in / stride;
        let t_chunk = self.conv.outputs_per_block(t_out);
        let device = x.device().clone();
        let xs = x.as_cuda_slice::<f32>()?.slice(x_layout.start_offset()..);
        let active = active
            .as_cuda_slice::<u8>()?
            .slice(active_layout.start_offset()..);
        let prev = prev
            .as_ref()
            .map(|(storage, layout)| gpu_view::<f32>(storage, layout, "conv context"))
            .transpose()?;
        let early = early::prepare(&device)?;
        let count = rows * c_in * kernel * t_out;
        // SAFETY: every element is written by the kernel.
        let col = unsafe { device.alloc::<f32>(count)? };
        let func = device.get_or_load_custom_func("stream_im2col_f32", "duplex_conv", CONV_PTX)?;
        let mut builder = func.builder();
        builder.arg(&xs);
        arg_or_null(&mut builder, prev.as_ref());
        builder.arg(&active).arg(&col);
        let dims = [
            c_in, t_in, context, kernel, stride, dilation, t_out, t_chunk,
        ];
        let dims = dims.map(|d| d as i32);
        for dim in &dims {
            builder.arg(dim);
        }
        let elu = i32::from(elu);
        builder.arg(&elu);
        let config = LaunchConfig {
            grid_dim: ((rows * c_in) as u32, t_out.div_ceil(t_chunk) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        early::arm(early)?;
        // SAFETY: the arguments match the kernel's signature; sizes were checked above. The
        // context is written in place: device memory nothing else uses during the launch.
        unsafe { builder.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(col, device),
            Shape::from((c_in * kernel, rows * t_out)),
        ))
    }
}

/// `conv_finish_f32`: a conv's product `[c_out, rows · t]` as `[rows, c_out, t]`, with its bias
/// and a residual block's skip connection.
struct ConvFinish<'a> {
    rows: usize,
    bias: Option<&'a Tensor>,
    residual: Option<&'a Tensor>,
}

impl CustomOp1 for ConvFinish<'_> {
    fn name(&self) -> &'static str {
        "duplex-conv-finish"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("on the CPU a conv's bias and skip connection are candle's adds")
    }

    fn cuda_fwd(&self, y: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        contiguous(layout, "conv product")?;
        let (c_out, columns) = layout.shape().dims2()?;
        let rows = self.rows;
        if rows == 0 || !columns.is_multiple_of(rows) {
            candle_core::bail!("conv product: {columns} columns for {rows} rows");
        }
        let t = columns / rows;
        if let Some(bias) = self.bias
            && bias.elem_count() != c_out
        {
            candle_core::bail!("conv bias: {:?} for {c_out} channels", bias.dims());
        }
        if let Some(residual) = self.residual
            && residual.dims() != [rows, c_out, t]
        {
            candle_core::bail!(
                "conv skip connection: {:?} for an output of {:?}",
                residual.dims(),
                [rows, c_out, t]
            );
        }
        let device = y.device().clone();
        let ys = y.as_cuda_slice::<f32>()?.slice(layout.start_offset()..);
        let (bias, residual) = (
            self.bias.map(Tensor::storage_and_layout),
            self.residual.map(Tensor::storage_and_layout),
        );
        let bias = bias
            .as_ref()
            .map(|(s, l)| gpu_view::<f32>(s, l, "conv bias"))
            .transpose()?;
        let residual = residual
            .as_ref()
            .map(|(s, l)| gpu_view::<f32>(s, l, "conv skip connection"))
            .transpose()?;
        let early = early::prepare(&device)?;
        let count = rows * c_out * t;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { device.alloc::<f32>(count)? };
        let func = device.get_or_load_custom_func("conv_finish_f32", "duplex_conv", CONV_PTX)?;
        let mut builder = func.builder();
        builder.arg(&ys);
        arg_or_null(&mut builder, bias.as_ref());
        arg_or_null(&mut builder, residual.as_ref());
        builder.arg(&out);
        let dims = [rows, c_out, t].map(|d| d as i32);
        for dim in &dims {
            builder.arg(dim);
        }
        early::arm(early)?;
        // SAFETY: the arguments match the kernel's signature; sizes were checked above.
        unsafe { builder.launch(LaunchConfig::for_num_elems(count as u32)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((rows, c_out, t)),
        ))
    }
}

/// One step of a causal streaming conv on the GPU in f32, in three launches: `xs` `[rows, c_in,
/// t_in]` (through the ELU first when `conv.elu`) after the context `prev` keeps (`[batch >=
/// rows, c_in, context]`, none when `conv` keeps none; moved on in place for the rows `active`,
/// u8 `[rows]`, marks), convolved with `weight` `[c_out, c_in, kernel]`, plus `bias` (`c_out`
/// values) and then `residual` (`[rows, c_out, t_out]`) where given → `[rows, c_out, t_out]`.
pub fn stream_conv(
    xs: &Tensor,
    prev: Option<&Tensor>,
    active: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    conv: StreamConv,
) -> Result<Tensor> {
    let rows = xs.dim(0)?;
    let (c_out, c_in, kernel) = weight.dims3()?;
    if kernel != conv.kernel {
        candle_core::bail!(
            "streaming conv: {kernel} taps of weights for a conv of {}",
            conv.kernel
        );
    }
    let columns = f32_contiguous(xs)?.apply_op2_no_bwd(active, &StreamIm2col { prev, conv })?;
    let product = f32_contiguous(weight)?
        .reshape((c_out, c_in * kernel))?
        .matmul(&columns)?;
    let bias = bias.map(f32_contiguous).transpose()?;
    let residual = residual.map(f32_contiguous).transpose()?;
    product.apply_op1_no_bwd(&ConvFinish {
        rows,
        bias: bias.as_ref(),
        residual: residual.as_ref(),
    })
}

/// `rope_ring_write_f32`: Mimi's step's queries rotated out, its keys (rotated) and values
/// written into the rings in place.
struct RopeRingWrite<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    index: &'a Tensor,
    ring_k: &'a Tensor,
    ring_v: &'a Tensor,
    heads: usize,
}

impl RopeRingWrite<'_> {
    /// The ring's capacity, once every operand is checked against `rows` x `time` tokens of
    /// `heads` heads of `head_dim`.
    fn check(&self, rows: usize, time: usize, head_dim: usize) -> Result<usize> {
        let heads = self.heads;
        let (batch, ring_heads, capacity, ring_dim) = self.ring_k.dims4()?;
        let ring_fits = batch >= rows && ring_heads == heads && ring_dim == head_dim;
        let same_rings = self.ring_v.dims() == self.ring_k.dims();
        let f32_rings = [self.ring_k, self.ring_v].map(|r| r.dtype() == DType::F32);
        if !ring_fits || !same_rings || f32_rings.contains(&false) {
            candle_core::bail!(
                "Mimi's ring write: rings {:?} / {:?} for {rows} rows of {heads} heads of {head_dim}",
                self.ring_k.dims(),
                self.ring_v.dims()
            );
        }
        let half = head_dim / 2;
        for table in [self.cos, self.sin] {
            if table.dims() != [rows, time, half] || table.dtype() != DType::F32 {
                candle_core::bail!(
                    "Mimi's ring write: a RoPE table of {:?} for {rows} rows of {time} steps",
                    table.dims()
                );
            }
        }
        if self.index.dims() != [rows, heads, time, head_dim] || self.index.dtype() != DType::I64 {
            candle_core::bail!(
                "Mimi's ring write: an index of {:?} {:?} for {rows} rows of {time} steps",
                self.index.dims(),
                self.index.dtype()
            );
        }
        Ok(capacity)
    }
}

impl CustomOp1 for RopeRingWrite<'_> {
    fn name(&self) -> &'static str {
        "duplex-rope-ring-write"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "on the CPU Mimi's ring write is `RopeTables::apply` and `RingCache::append`"
        )
    }

    fn cuda_fwd(&self, qkv: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        contiguous(layout, "Mimi's in-projection")?;
        let (rows, time, width) = layout.shape().dims3()?;
        let heads = self.heads;
        let head_dim = width / (3 * heads).max(1);
        if width != 3 * heads * head_dim || !head_dim.is_multiple_of(2) || rows * time == 0 {
            candle_core::bail!(
                "Mimi's ring write: an in-projection of {:?} for {heads} heads",
                layout.shape()
            );
        }
        let capacity = self.check(rows, time, head_dim)?;
        let device = qkv.device().clone();
        let qkv = qkv.as_cuda_slice::<f32>()?.slice(layout.start_offset()..);
        let operands =
            [self.cos, self.sin, self.ring_k, self.ring_v].map(Tensor::storage_and_layout);
        let [cos, sin, ring_k, ring_v] = &operands;
        let index = self.index.storage_and_layout();
        let cos = f32_view(cos, "cos")?;
        let sin = f32_view(sin, "sin")?;
        let ring_k = f32_view(ring_k, "ring keys")?;
        let ring_v = f32_view(ring_v, "ring values")?;
        let index = gpu_view::<i64>(&index.0, index.1, "ring index")?;
        let early = early::prepare(&device)?;
        // SAFETY: every element is written by the kernel.
        let q_out = unsafe { device.alloc::<f32>(rows * heads * time * head_dim)? };
        let func = device.get_or_load_custom_func(
            "rope_ring_write_f32",
            "duplex_attention",
            ATTENTION_PTX,
        )?;
        let mut builder = func.builder();
        builder
            .arg(&qkv)
            .arg(&cos)
            .arg(&sin)
            .arg(&index)
            .arg(&ring_k)
            .arg(&ring_v)
            .arg(&q_out);
        let dims = [heads, time, head_dim, capacity].map(|d| d as i32);
        for dim in &dims {
            builder.arg(dim);
        }
        let config = LaunchConfig {
            grid_dim: ((rows * time * heads) as u32, 1, 1),
            block_dim: ((head_dim / 2) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        early::arm(early)?;
        // SAFETY: the arguments match the kernel's signature; sizes were checked above. The rings
        // are written in place: device memory nothing else uses during the launch.
        unsafe { builder.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(q_out, device),
            Shape::from((rows, heads, time, head_dim)),
        ))
    }
}

/// Mimi's step before its attention on the GPU, in one launch: `qkv` `[rows, time, 3 · heads ·
/// head_dim]` (f32) → its queries turned by interleaved RoPE (`cos`, `sin` f32 `[rows, time,
/// head_dim / 2]`), `[rows, heads, time, head_dim]`; its turned keys and its values written
/// into `ring_k`, `ring_v` (`[batch, heads, capacity, head_dim]` f32) at the entries of `index`
/// (i64 `[rows, heads, time, head_dim]`, `kv::RingCache`'s scatter index).
pub fn rope_ring_write(
    qkv: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    index: &Tensor,
    (ring_k, ring_v): (&Tensor, &Tensor),
    heads: usize,
) -> Result<Tensor> {
    qkv.apply_op1_no_bwd(&RopeRingWrite {
        cos: &f32_contiguous(cos)?,
        sin: &f32_contiguous(sin)?,
        index: &index.contiguous()?,
        ring_k,
        ring_v,
        heads,
    })
}

/// The most ring entries and the widest heads `masked_attention_f32` takes (kernels/attention.cu).
pub const MASKED_ATTENTION_MAX_KEYS: usize = 1024;
pub const MASKED_ATTENTION_MAX_HEAD_DIM: usize = 256;

/// `masked_attention_f32`'s keys, values and mask, for the queries it is applied to.
struct MaskedAttentionOp {
    k: Tensor,
    v: Tensor,
    /// Entries per head of the rings `k` and `v` are the first entries of.
    capacity: usize,
    mask: Tensor,
    scale: f32,
}

/// Keys or values `[rows, heads, len, head_dim]` as `masked_attention_f32` reads them: the
/// first `len` entries of rings `[rows, heads, capacity, head_dim]` in place (a narrow of a
/// contiguous f32 ring along its entries, as `kv::RingCache::append` hands them out), with the
/// capacity; anything else made contiguous (a capacity of `len`).
fn ring_entries(t: &Tensor) -> Result<(Tensor, usize)> {
    let (rows, heads, len, head_dim) = t.dims4()?;
    let stride = t.stride();
    let capacity = stride[1] / head_dim.max(1);
    // One head (or row) may carry any stride for it: those take the copy.
    let in_place = t.dtype() == DType::F32
        && heads > 1
        && head_dim > 0
        && stride[3] == 1
        && stride[2] == head_dim
        && stride[1] == capacity * head_dim
        && capacity >= len
        && (rows == 1 || stride[0] == heads * stride[1]);
    match in_place {
        true => Ok((t.clone(), capacity)),
        false => Ok((f32_contiguous(t)?, len)),
    }
}

/// A read-only view of the ring `t` (`ring_entries`'s) from its first entry, checked to hold
/// every entry the kernel reads.
fn ring_view<'a, S>(
    (storage, layout): &'a (S, &Layout),
    capacity: usize,
    what: &str,
) -> Result<CudaView<'a, f32>>
where
    S: std::ops::Deref<Target = candle_core::Storage>,
{
    let candle_core::Storage::Cuda(storage) = &**storage else {
        candle_core::bail!("{what} must be on the GPU")
    };
    let (rows, heads, len, head_dim) = layout.shape().dims4()?;
    let want = [
        heads * capacity * head_dim,
        capacity * head_dim,
        head_dim,
        1,
    ];
    let (dims, stride) = (layout.dims(), layout.stride());
    // A dimension of one entry may carry any stride (candle calls such a tensor contiguous).
    if !(0..4).all(|d| dims[d] == 1 || stride[d] == want[d]) {
        candle_core::bail!("{what}: strides {stride:?} are not those of a ring of {capacity}");
    }
    let view = storage
        .as_cuda_slice::<f32>()?
        .slice(layout.start_offset()..);
    let reads = ((rows * heads - 1) * capacity + len) * head_dim;
    if view.len() < reads {
        candle_core::bail!("{what}: {} values for {reads} read", view.len());
    }
    Ok(view)
}

impl CustomOp1 for MaskedAttentionOp {
    fn name(&self) -> &'static str {
        "duplex-masked-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("masked attention on the CPU is `kv::attention`")
    }

    fn cuda_fwd(&self, q: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        contiguous(layout, "attention queries")?;
        let (rows, heads, time, head_dim) = layout.shape().dims4()?;
        let (_, _, len, _) = self.k.dims4()?;
        let kv_dims = [rows, heads, len, head_dim];
        if self.k.dims() != kv_dims || self.v.dims() != kv_dims {
            candle_core::bail!(
                "masked attention: keys {:?} and values {:?} for queries {:?}",
                self.k.dims(),
                self.v.dims(),
                layout.shape().dims()
            );
        }
        if self.mask.dims() != [rows, 1, time, len] {
            candle_core::bail!(
                "masked attention: a mask of {:?} for {rows} rows of {time} queries over {len} keys",
                self.mask.dims()
            );
        }
        if len == 0 || len > MASKED_ATTENTION_MAX_KEYS || head_dim > MASKED_ATTENTION_MAX_HEAD_DIM {
            candle_core::bail!(
                "masked attention takes 1 to {MASKED_ATTENTION_MAX_KEYS} keys of at most \
                 {MASKED_ATTENTION_MAX_HEAD_DIM} values, not {len} of {head_dim}"
            );
        }
        let device = q.device().clone();
        let qs = q.as_cuda_slice::<f32>()?.slice(layout.start_offset()..);
        let (k, v, mask) = (
            self.k.storage_and_layout(),
            self.v.storage_and_layout(),
            self.mask.storage_and_layout(),
        );
        let capacity = self.capacity;
        let (k, v) = (
            ring_view(&k, capacity, "keys")?,
            ring_view(&v, capacity, "values")?,
        );
        let mask = f32_view(&mask, "mask")?;
        let early = early::prepare(&device)?;
        let count = rows * heads * time * head_dim;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { device.alloc::<f32>(count)? };
        let func = device.get_or_load_custom_func(
            "masked_attention_f32",
            "duplex_attention",
            ATTENTION_PTX,
        )?;
        let dims = [heads, time, len, capacity, head_dim].map(|d| d as i32);
        let mut builder = func.builder();
        builder.arg(&qs).arg(&k).arg(&v).arg(&mask).arg(&out);
        for dim in &dims {
            builder.arg(dim);
        }
        builder.arg(&self.scale);
        let config = LaunchConfig {
            grid_dim: ((rows * heads * time) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        early::arm(early)?;
        // SAFETY: the arguments match the kernel's signature; sizes were checked above.
        unsafe { builder.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((rows, time, heads * head_dim)),
        ))
    }
}

/// Mimi's streaming attention in f32 on the GPU, in one kernel: `q` `[rows, heads, time,
/// head_dim]` over `k`, `v` `[rows, heads, len, head_dim]` with the additive `mask` `[rows, 1,
/// time, len]`, scores scaled by `scale` → `[rows, time, heads · head_dim]` (heads merged).
pub fn masked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f32,
) -> Result<Tensor> {
    let (rows, heads, time, head_dim) = q.dims4()?;
    if rows * heads * time == 0 {
        return Tensor::zeros((rows, time, heads * head_dim), DType::F32, q.device());
    }
    let (k, capacity) = ring_entries(k)?;
    let (v, v_capacity) = ring_entries(v)?;
    let (k, v, capacity) = match capacity == v_capacity {
        true => (k, v, capacity),
        false => (k.contiguous()?, v.contiguous()?, k.dim(2)?),
    };
    let op = MaskedAttentionOp {
        k,
        v,
        capacity,
        mask: f32_contiguous(mask)?,
        scale,
    };
    f32_contiguous(q)?.apply_op1_no_bwd(&op)
}

struct SwiGluOp;

impl CustomOp1 for SwiGluOp {
    fn name(&self) -> &'static str {
        "duplex-swiglu"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("swiglu on the CPU is `nn::SwiGlu`")
    }

    fn cuda_fwd(&self, x: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        contiguous(layout, "swiglu input")?;
        let dims = layout.shape().dims();
        let width = dims.last().copied().unwrap_or(0);
        if width == 0 || !width.is_multiple_of(2) {
            candle_core::bail!("swiglu takes rows of [a, b] halves, not of {width}");
        }
        let hidden = width / 2;
        let rows = layout.shape().elem_count() / (2 * hidden);
        let device = x.device().clone();
        let xs = x.as_cuda_slice::<bf16>()?.slice(layout.start_offset()..);
        let early = early::prepare(&device)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { device.alloc::<bf16>(rows * hidden)? };
        let func = device.get_or_load_custom_func("swiglu_bf16", "duplex_norm", NORM_PTX)?;
        let (rows_i, hidden_i) = (rows as i32, hidden as i32);
        let mut builder = func.builder();
        builder.arg(&xs).arg(&out).arg(&rows_i).arg(&hidden_i);
        let blocks = (rows * hidden).div_ceil(256).min(65_535) as u32;
        let config = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        early::arm(early)?;
        // SAFETY: the arguments match the kernel's signature.
        unsafe { builder.launch(config) }.w()?;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("swiglu input has dims") = hidden;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from(out_dims),
        ))
    }
}

/// `silu(a) · b` for `[.., 2h]` bf16 input split as `[a, b]`.
pub fn swiglu(xs: &Tensor) -> Result<Tensor> {
    xs.to_dtype(DType::BF16)?
        .contiguous()?
        .apply_op1_no_bwd(&SwiGluOp)
}

/// The contiguous `T` elements of a tensor on the GPU.
fn gpu_view<'a, T: candle_core::cuda_backend::CudaDType>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let candle_core::Storage::Cuda(storage) = storage else {
        candle_core::bail!("{what} must be on the GPU")
    };
    contiguous(layout, what)?;
    Ok(storage.as_cuda_slice::<T>()?.slice(layout.start_offset()..))
}

/// `gpu_view` of an f32 tensor's `storage_and_layout`.
fn f32_view<'a, S>((storage, layout): &'a (S, &Layout), what: &str) -> Result<CudaView<'a, f32>>
where
    S: std::ops::Deref<Target = candle_core::Storage>,
{
    gpu_view(storage, layout, what)
}

/// `sampling::draw` on the GPU: one block per row of `[rows, vocab]` f32 logits.
pub fn draw(
    logits: &CudaStorage,
    layout: &Layout,
    params: &DrawParams,
) -> Result<(CudaStorage, Shape)> {
    contiguous(layout, "logits")?;
    let (rows, vocab) = layout.shape().dims2()?;
    let device = logits.device().clone();
    let xs = logits
        .as_cuda_slice::<f32>()?
        .slice(layout.start_offset()..);
    let (seeds, seeds_layout) = params.seeds.storage_and_layout();
    let (counters, counters_layout) = params.counters.storage_and_layout();
    let (top_k, top_k_layout) = params.top_k.storage_and_layout();
    let (temperature, temperature_layout) = params.temperature.storage_and_layout();
    let seeds = gpu_view::<i64>(&seeds, seeds_layout, "seeds")?;
    let counters = gpu_view::<i64>(&counters, counters_layout, "counters")?;
    let top_k = gpu_view::<i64>(&top_k, top_k_layout, "top_k")?;
    let temperature = gpu_view::<f32>(&temperature, temperature_layout, "temperature")?;
    let early = early::prepare(&device)?;
    // SAFETY: every element is written by the kernel.
    let out = unsafe { device.alloc::<u32>(rows)? };
    let func =
        device.get_or_load_custom_func("topk_sample_f32", "duplex_sampling", SAMPLING_PTX)?;
    let vocab_i = vocab as i32;
    let mut builder = func.builder();
    builder
        .arg(&xs)
        .arg(&out)
        .arg(&seeds)
        .arg(&counters)
        .arg(&top_k)
        .arg(&temperature)
        .arg(&vocab_i);
    let threads = super::sampling::sampling_threads(vocab).map_err(candle_core::Error::Msg)?;
    let config = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    early::arm(early)?;
    // SAFETY: the arguments match the kernel's signature (i64 seeds and counters are read as
    // uint64).
    unsafe { builder.launch(config) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(out, device), Shape::from(rows)))
}

const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

/// Threads per block of `ring_write_attend_*` (`ATTENTION_THREADS` in the kernel).
const ATTENTION_THREADS: u32 = 128;
use super::decode::{ATTENTION_CHUNK, AttentionLaunch};

/// The part kernel's launch for `rows` rows over a ring of `dims` (rows, heads, capacity,
/// head_dim): the one `DUPLEX_ATTENTION` forces (read once), else the installed kernel plan's
/// for such a ring, else the default.
fn attention_launch(
    storage: KvQuant,
    (rows, heads, capacity, head_dim): (usize, usize, usize, usize),
) -> Result<AttentionLaunch> {
    static FORCED: std::sync::OnceLock<Option<std::result::Result<AttentionLaunch, String>>> =
        std::sync::OnceLock::new();
    if let Some(forced) = FORCED.get_or_init(AttentionLaunch::forced) {
        return forced.clone().map_err(candle_core::Error::Msg);
    }
    let planned = super::kernel_plan::installed()
        .and_then(|plan| plan.attention_launch(storage, heads, head_dim, capacity, rows));
    Ok(planned.unwrap_or(AttentionLaunch::DEFAULT))
}

/// Arrival counts of at least `len` heads for the joined attention kernels (`join_if_last`),
/// zeroed once per device and calling thread and kept for the process: every launch leaves them
/// zero, and a thread's launches on a device run one after another on its stream (candle gives
/// each thread its own), so no two launches in flight share them. A captured graph goes on
/// reading the capturing thread's buffer wherever it is replayed: `serve`'s warm-up hands its
/// graphs to the step loop's thread and launches nothing more. `None` while the stream captures
/// a graph and none is long enough (an allocation there would belong to the graph): the caller
/// then joins with the join kernel.
fn arrival_counts(
    device: &candle_core::CudaDevice,
    len: usize,
) -> Result<Option<&'static CudaSlice<u32>>> {
    use candle_core::cuda_backend::DeviceId;
    use candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus;
    use std::cell::RefCell;
    // Per thread, so the step loop looks its buffer up without a lock.
    thread_local! {
        static KEPT: RefCell<Vec<(DeviceId, &'static CudaSlice<u32>)>> =
            const { RefCell::new(Vec::new()) };
    }
    let found = KEPT.with_borrow(|kept| {
        kept.iter()
            .find(|(id, counts)| *id == device.id() && counts.len() >= len)
            .map(|(_, counts)| *counts)
    });
    if found.is_some() {
        return Ok(found);
    }
    let status = device.cuda_stream().capture_status().w()?;
    if status != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        return Ok(None);
    }
    // Room for 64 rows of 64 heads, so that one buffer serves every bucket of our models.
    let counts = device.alloc_zeros::<u32>(len.max(64 * 64))?;
    let counts: &'static CudaSlice<u32> = Box::leak(Box::new(counts));
    KEPT.with_borrow_mut(|kept| kept.push((device.id(), counts)));
    Ok(Some(counts))
}

/// A tensor's storage, held (read-locked) for a launch, and its layout.
type Held<'a, G> = (G, &'a Layout);

/// A ring's buffers held for a launch (see `KvRing`).
struct RingStorage<'a, G> {
    k: Held<'a, G>,
    v: Held<'a, G>,
    scales: Option<[Held<'a, G>; 2]>,
}

/// A ring's buffers as the attention kernels take them: bf16 keys and values, or int8 codes
/// (as bytes) and their f32 scales.
enum RingViews<'a> {
    Bf16([CudaView<'a, bf16>; 2]),
    Int8([CudaView<'a, u8>; 2], [CudaView<'a, f32>; 2]),
}

/// `ring`'s buffers, checked to be `[rows, heads, capacity, head_dim]` each (scales `[rows,
/// heads, capacity]`), with 16-byte aligned rows (8-byte for int8), and its dims.
#[allow(clippy::type_complexity)]
fn hold_ring<'a>(
    ring: &'a KvRing,
    what: &str,
) -> Result<(
    RingStorage<'a, impl std::ops::Deref<Target = candle_core::Storage> + 'a>,
    (usize, usize, usize, usize),
)> {
    let dims = ring.k.dims4()?;
    let (rows, heads, capacity, _) = dims;
    let expected_dtype = if ring.is_int8() {
        DType::U8
    } else {
        DType::BF16
    };
    let aligned = |t: &Tensor| t.layout().start_offset().is_multiple_of(8);
    let scales_fit = ring.scales.as_ref().is_none_or(|scales| {
        scales
            .iter()
            .all(|s| s.dims() == [rows, heads, capacity] && s.dtype() == DType::F32)
    });
    if ring.v.dims4()? != dims
        || ring.k.dtype() != expected_dtype
        || ring.v.dtype() != expected_dtype
        || !aligned(&ring.k)
        || !aligned(&ring.v)
        || !scales_fit
    {
        candle_core::bail!(
            "{what}: ring {:?} {:?} / {:?} {:?}, scales {:?} (bf16, or u8 codes with f32 \
                 scales; aligned rows)",
            ring.k.dims(),
            ring.k.dtype(),
            ring.v.dims(),
            ring.v.dtype(),
            ring.scales.as_ref().map(|[k, _]| k.dims().to_vec())
        );
    }
    let storage = RingStorage {
        k: ring.k.storage_and_layout(),
        v: ring.v.storage_and_layout(),
        scales: ring
            .scales
            .as_ref()
            .map(|[k, v]| [k.storage_and_layout(), v.storage_and_layout()]),
    };
    Ok((storage, dims))
}

impl<G: std::ops::Deref<Target = candle_core::Storage>> RingStorage<'_, G> {
    /// The kernels' views of the buffers; they write the ring in place (device memory the kernel
    /// owns for the launch; nothing on the host reads it meanwhile).
    fn views(&self) -> Result<RingViews<'_>> {
        Ok(match &self.scales {
            None => RingViews::Bf16([
                gpu_view::<bf16>(&self.k.0, self.k.1, "ring keys")?,
                gpu_view::<bf16>(&self.v.0, self.v.1, "ring values")?,
            ]),
            Some([k_scale, v_scale]) => RingViews::Int8(
                [
                    gpu_view::<u8>(&self.k.0, self.k.1, "ring keys")?,
                    gpu_view::<u8>(&self.v.0, self.v.1, "ring values")?,
                ],
                [
                    gpu_view::<f32>(&k_scale.0, k_scale.1, "key scales")?,
                    gpu_view::<f32>(&v_scale.0, v_scale.1, "value scales")?,
                ],
            ),
        })
    }
}

impl RingViews<'_> {
    /// The kernel of `family` for this ring's kind: `{family}_bf16` or `{family}_int8`.
    fn kernel(&self, family: &str) -> String {
        match self {
            Self::Bf16(_) => format!("{family}_bf16"),
            Self::Int8(..) => format!("{family}_int8"),
        }
    }

    /// Pushes the ring's arguments: keys and values, then for int8 their scales.
    fn push<'b>(&'b self, builder: &mut LaunchArgs<'b>) {
        match self {
            Self::Bf16([k, v]) => {
                builder.arg(k).arg(v);
            }
            Self::Int8([k, v], [k_scale, v_scale]) => {
                builder.arg(k).arg(v).arg(k_scale).arg(v_scale);
            }
        }
    }
}

/// The step's ring writes and the query rotation of `rope_kv_write`.
struct RopeKvWrite<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    ring: &'a KvRing,
    write_idx: &'a Tensor,
}

impl CustomOp1 for RopeKvWrite<'_> {
    fn name(&self) -> &'static str {
        "duplex-rope-kv-write"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("on the CPU this is `decode::rope_kv_write`'s reference")
    }

    fn cuda_fwd(&self, qkv: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        contiguous(layout, "qkv")?;
        let (ring, (rows, heads, capacity, head_dim)) = hold_ring(self.ring, "rope_kv_write")?;
        if layout.shape().elem_count() != rows * 3 * heads * head_dim || head_dim % 2 != 0 {
            candle_core::bail!(
                "rope_kv_write: qkv {:?} for a ring of {:?}",
                layout.shape(),
                self.ring.k.dims()
            );
        }
        let what = "rope_kv_write";
        check_rope_inputs(self.cos, self.sin, self.write_idx, rows, head_dim, what)?;
        let device = qkv.device().clone();
        let qkv = qkv.as_cuda_slice::<bf16>()?.slice(layout.start_offset()..);
        let (cos, cos_layout) = self.cos.storage_and_layout();
        let (sin, sin_layout) = self.sin.storage_and_layout();
        let (write_idx, write_idx_layout) = self.write_idx.storage_and_layout();
        let cos = gpu_view::<f32>(&cos, cos_layout, "cos")?;
        let sin = gpu_view::<f32>(&sin, sin_layout, "sin")?;
        let ring = ring.views()?;
        let write_idx = gpu_view::<i64>(&write_idx, write_idx_layout, "write_idx")?;
        let early = early::prepare(&device)?;
        // SAFETY: every element is written by the kernel.
        let q_out = unsafe { device.alloc::<bf16>(rows * heads * head_dim)? };
        let func = device.get_or_load_custom_func(
            &ring.kernel("rope_kv_write"),
            "duplex_attention",
            ATTENTION_PTX,
        )?;
        let (heads_i, head_dim_i, capacity_i) = (heads as i32, head_dim as i32, capacity as i32);
        let mut builder = func.builder();
        builder.arg(&qkv).arg(&cos).arg(&sin).arg(&q_out);
        ring.push(&mut builder);
        builder
            .arg(&write_idx)
            .arg(&heads_i)
            .arg(&head_dim_i)
            .arg(&capacity_i);
        // The int8 kernel reduces each entry's largest magnitude over whole warps.
        let threads = match ring {
            RingViews::Bf16(_) => head_dim / 2,
            RingViews::Int8(..) => (head_dim / 2).next_multiple_of(32),
        };
        let config = LaunchConfig {
            grid_dim: ((rows * heads) as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        early::arm(early)?;
        // SAFETY: the arguments match the kernel's signature; sizes were checked above.
        unsafe { builder.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(q_out, device),
            Shape::from((rows, heads, 1, head_dim)),
        ))
    }
}

/// One token per slot: `qkv` (bf16, `rows · 3 · heads · head_dim` elements: the packed
/// in-projection) → the query rotated by interleaved RoPE (`cos`/`sin` f32 `[rows, head_dim/2]`),
/// `[rows, heads, 1, head_dim]`; the rotated key and the value are written into `ring`
/// (`[rows, heads, capacity, head_dim]`, bf16 or int8 codes and scales) at `write_idx` (i64
/// `[rows]`, < 0: not written).
pub fn rope_kv_write(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    ring: &KvRing,
    write_idx: &Tensor,
) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1_no_bwd(&RopeKvWrite {
        cos,
        sin,
        ring,
        write_idx,
    })
}

/// Checks a RoPE launch's per-row inputs for `rows` rows of `head_dim`-wide heads: `cos` and
/// `sin` f32 with `head_dim / 2` values a row, `write_idx` one i64 a row.
fn check_rope_inputs(
    cos: &Tensor,
    sin: &Tensor,
    write_idx: &Tensor,
    rows: usize,
    head_dim: usize,
    what: &str,
) -> Result<()> {
    let table = |t: &Tensor| t.elem_count() == rows * head_dim / 2 && t.dtype() == DType::F32;
    if !table(cos) || !table(sin) {
        candle_core::bail!(
            "{what}: rotation tables {:?} {:?} for {rows} rows of {head_dim} (f32, {} a row)",
            cos.dims(),
            cos.dtype(),
            head_dim / 2
        );
    }
    if write_idx.elem_count() != rows || write_idx.dtype() != DType::I64 {
        candle_core::bail!(
            "{what}: write indices {:?} {:?} for {rows} rows (i64, one a row)",
            write_idx.dims(),
            write_idx.dtype()
        );
    }
    Ok(())
}

/// What the attention kernels read besides the query and the ring, held for a launch: the mask
/// and each row's pinned prefix (lengths, turn-back rotation).
struct AttendStorage<'a, G> {
    mask: Held<'a, G>,
    lens: Held<'a, G>,
    cos: Held<'a, G>,
    sin: Held<'a, G>,
}

/// `mask` (f32, `rows · len` values, `len` ≤ `capacity`) and `prefix` checked for `rows` rows of
/// `head_dim`-wide heads, and `len`.
#[allow(clippy::type_complexity)]
fn hold_attend_inputs<'a>(
    mask: &'a Tensor,
    prefix: &'a PinnedPrefix,
    (rows, capacity, head_dim): (usize, usize, usize),
    what: &str,
) -> Result<(
    AttendStorage<'a, impl std::ops::Deref<Target = candle_core::Storage> + 'a>,
    usize,
)> {
    let len = mask.elem_count() / rows.max(1);
    if !super::decode::head_dim_fits(head_dim)
        || len == 0
        || len > capacity
        || mask.elem_count() != rows * len
        || mask.dtype() != DType::F32
    {
        candle_core::bail!(
            "{what}: mask {:?} {:?} for {rows} rows of a ring of {capacity} entries of {head_dim}",
            mask.dims(),
            mask.dtype()
        );
    }
    let (cos, sin) = prefix.unturn.cos_sin();
    if prefix.lens.dims() != [rows]
        || prefix.lens.dtype() != DType::U32
        || cos.elem_count() != rows * head_dim / 2
        || sin.elem_count() != rows * head_dim / 2
    {
        candle_core::bail!(
            "{what}: prefix lengths {:?} and rotation {:?} for {rows} rows",
            prefix.lens.dims(),
            cos.dims()
        );
    }
    let storage = AttendStorage {
        mask: mask.storage_and_layout(),
        lens: prefix.lens.storage_and_layout(),
        cos: cos.storage_and_layout(),
        sin: sin.storage_and_layout(),
    };
    Ok((storage, len))
}

/// The attention inputs' views, pushed in the kernels' order: mask, prefix lengths, cos, sin.
struct AttendViews<'a> {
    mask: CudaView<'a, f32>,
    lens: CudaView<'a, u32>,
    cos: CudaView<'a, f32>,
    sin: CudaView<'a, f32>,
}

impl<G: std::ops::Deref<Target = candle_core::Storage>> AttendStorage<'_, G> {
    fn views(&self) -> Result<AttendViews<'_>> {
        Ok(AttendViews {
            mask: gpu_view::<f32>(&self.mask.0, self.mask.1, "mask")?,
            lens: gpu_view::<u32>(&self.lens.0, self.lens.1, "prefix lengths")?,
            cos: gpu_view::<f32>(&self.cos.0, self.cos.1, "unturn cos")?,
            sin: gpu_view::<f32>(&self.sin.0, self.sin.1, "unturn sin")?,
        })
    }
}

impl AttendViews<'_> {
    fn push<'b>(&'b self, builder: &mut LaunchArgs<'b>) {
        builder
            .arg(&self.mask)
            .arg(&self.lens)
            .arg(&self.cos)
            .arg(&self.sin);
    }
}

/// The trailing arguments of every attention kernel: heads, head_dim, capacity, len, scale.
struct AttendShape {
    heads: i32,
    head_dim: i32,
    capacity: i32,
    len: i32,
    scale: f32,
}

impl AttendShape {
    fn new(heads: usize, head_dim: usize, capacity: usize, len: usize) -> Self {
        Self {
            heads: heads as i32,
            head_dim: head_dim as i32,
            capacity: capacity as i32,
            len: len as i32,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }

    fn push<'b>(&'b self, builder: &mut LaunchArgs<'b>) {
        builder
            .arg(&self.heads)
            .arg(&self.head_dim)
            .arg(&self.capacity)
            .arg(&self.len)
            .arg(&self.scale);
    }
}

struct RingAttention<'a> {
    ring: &'a KvRing,
    mask: &'a Tensor,
    prefix: &'a PinnedPrefix,
    /// `None`: as `attention_launch` says.
    launch: Option<AttentionLaunch>,
}

impl CustomOp1 for RingAttention<'_> {
    fn name(&self) -> &'static str {
        "duplex-ring-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("on the CPU this is `decode::ring_attention`'s reference")
    }

    fn cuda_fwd(&self, q: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        contiguous(layout, "q")?;
        let (ring, (rows, heads, capacity, head_dim)) = hold_ring(self.ring, "ring_attention")?;
        let dims = (rows, capacity, head_dim);
        let (inputs, len) = hold_attend_inputs(self.mask, self.prefix, dims, "ring_attention")?;
        if layout.shape().elem_count() != rows * heads * head_dim {
            candle_core::bail!(
                "ring_attention: q {:?} for a ring of {:?}",
                layout.shape(),
                self.ring.k.dims()
            );
        }
        let device = q.device().clone();
        let q = q.as_cuda_slice::<bf16>()?.slice(layout.start_offset()..);
        let (ring, inputs) = (ring.views()?, inputs.views()?);
        let shape = AttendShape::new(heads, head_dim, capacity, len);
        let launch = match self.launch {
            Some(launch) => launch,
            None => attention_launch(self.ring.storage(), (rows, heads, capacity, head_dim))?,
        };
        let chunks = len.div_ceil(launch.keys_per_block);
        let heads_total = rows * heads;
        // A joined kernel needs arrival counts only to join, and may have to do without.
        let arrivals = match launch.joins() && chunks > 1 {
            true => arrival_counts(&device, heads_total)?,
            false => None,
        };
        let suffix = match arrivals.is_some() || chunks == 1 {
            true => launch.suffix,
            false => launch.suffix.trim_end_matches("_joined"),
        };
        let early = early::prepare(&device)?;
        // One chunk normalises its own result; more leave parts for the join.
        let part = match chunks {
            1 => None,
            // SAFETY: every element is written by the part kernel.
            _ => Some(unsafe { device.alloc::<f32>(heads_total * chunks * (head_dim + 2))? }),
        };
        // SAFETY: every element is written by the kernels.
        let out = unsafe { device.alloc::<bf16>(heads_total * head_dim)? };
        let func = device.get_or_load_custom_func(
            &(ring.kernel("ring_attention_part") + suffix),
            "duplex_attention",
            ATTENTION_PTX,
        )?;
        let keys_per_block = launch.keys_per_block as i32;
        let mut builder = func.builder();
        builder.arg(&q);
        ring.push(&mut builder);
        inputs.push(&mut builder);
        arg_or_null(&mut builder, part.as_ref());
        arg_or_null(
            &mut builder,
            (part.is_none() || arrivals.is_some()).then_some(&out),
        );
        shape.push(&mut builder);
        builder.arg(&keys_per_block);
        if suffix.ends_with("_joined") {
            arg_or_null(&mut builder, arrivals);
        }
        let config = LaunchConfig {
            grid_dim: (heads_total as u32, chunks as u32, 1),
            block_dim: (launch.threads, 1, 1),
            shared_mem_bytes: 0,
        };
        early::arm(early)?;
        // SAFETY: the arguments match the kernel's signature; sizes were checked above (a joined
        // kernel's arrival counts cover every head).
        unsafe { builder.launch(config) }.w()?;
        if let Some(part) = part.as_ref().filter(|_| arrivals.is_none()) {
            let func = device.get_or_load_custom_func(
                "ring_attention_join",
                "duplex_attention",
                ATTENTION_PTX,
            )?;
            let mut builder = func.builder();
            let chunks_i = chunks as i32;
            builder
                .arg(part)
                .arg(&out)
                .arg(&shape.head_dim)
                .arg(&chunks_i);
            let config = LaunchConfig {
                grid_dim: (heads_total as u32, 1, 1),
                block_dim: (head_dim.next_multiple_of(32) as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            early::arm(early::prepare(&device)?)?;
            // SAFETY: as above; `part` holds `chunks` entries per head.
            unsafe { builder.launch(config) }.w()?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((rows, heads, 1, head_dim)),
        ))
    }
}

/// `rope_kv_write` and `ring_attention` in one launch, for rings attended over one chunk.
struct RingWriteAttend<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    ring: &'a KvRing,
    write_idx: &'a Tensor,
    mask: &'a Tensor,
    prefix: &'a PinnedPrefix,
}

impl CustomOp1 for RingWriteAttend<'_> {
    fn name(&self) -> &'static str {
        "duplex-ring-write-attend"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("on the CPU this is `decode::write_and_attend`'s reference")
    }

    fn cuda_fwd(&self, qkv: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        contiguous(layout, "qkv")?;
        let what = "ring_write_attend";
        let (ring, (rows, heads, capacity, head_dim)) = hold_ring(self.ring, what)?;
        let dims = (rows, capacity, head_dim);
        let (inputs, len) = hold_attend_inputs(self.mask, self.prefix, dims, what)?;
        if layout.shape().elem_count() != rows * 3 * heads * head_dim || len > ATTENTION_CHUNK {
            candle_core::bail!(
                "{what}: qkv {:?} for a ring of {:?}, {len} entries attended (one chunk at most)",
                layout.shape(),
                self.ring.k.dims()
            );
        }
        check_rope_inputs(self.cos, self.sin, self.write_idx, rows, head_dim, what)?;
        let device = qkv.device().clone();
        let qkv = qkv.as_cuda_slice::<bf16>()?.slice(layout.start_offset()..);
        let (cos, cos_layout) = self.cos.storage_and_layout();
        let (sin, sin_layout) = self.sin.storage_and_layout();
        let (write_idx, write_idx_layout) = self.write_idx.storage_and_layout();
        let cos = gpu_view::<f32>(&cos, cos_layout, "cos")?;
        let sin = gpu_view::<f32>(&sin, sin_layout, "sin")?;
        let write_idx = gpu_view::<i64>(&write_idx, write_idx_layout, "write_idx")?;
        let (ring, inputs) = (ring.views()?, inputs.views()?);
        let shape = AttendShape::new(heads, head_dim, capacity, len);
        let early = early::prepare(&device)?;
        // SAFETY: every element is written by the kernel.
        let out = unsafe { device.alloc::<bf16>(rows * heads * head_dim)? };
        let func = device.get_or_load_custom_func(
            &ring.kernel("ring_write_attend"),
            "duplex_attention",
            ATTENTION_PTX,
        )?;
        let mut builder = func.builder();
        builder.arg(&qkv).arg(&cos).arg(&sin);
        ring.push(&mut builder);
        builder.arg(&write_idx);
        inputs.push(&mut builder);
        builder.arg(&out);
        shape.push(&mut builder);
        let config = LaunchConfig {
            grid_dim: ((rows * heads) as u32, 1, 1),
            block_dim: (ATTENTION_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        early::arm(early)?;
        // SAFETY: the arguments match the kernel's signature; sizes were checked above.
        unsafe { builder.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((rows, heads, 1, head_dim)),
        ))
    }
}

/// `rope_kv_write` then `ring_attention` as one kernel, when the mask's `len` (the entries
/// attended) is at most `decode::ATTENTION_CHUNK`: `qkv` bf16 (`rows · 3 · heads · head_dim`
/// values), RoPE tables `cos`/`sin` f32 `[rows, head_dim / 2]`, the ring written at `write_idx`
/// (i64 `[rows]`, < 0: not written) → `[rows, heads, 1, head_dim]`.
pub fn write_and_attend(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    ring: &KvRing,
    write_idx: &Tensor,
    mask: &Tensor,
    prefix: &PinnedPrefix,
) -> Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?.contiguous()?;
    qkv.contiguous()?.apply_op1_no_bwd(&RingWriteAttend {
        cos,
        sin,
        ring,
        write_idx,
        mask: &mask,
        prefix,
    })
}

/// Attention of one query per slot (`q` bf16 `[rows, heads, 1, head_dim]`) over the first `len`
/// entries of `ring` (bf16, or int8 codes and scales; `len` = the mask's last dim; `mask` f32
/// `[rows, 1, 1, len]`, 0 visible, −∞ hidden), each row's pinned prefix seen as `prefix` says:
/// `[rows, heads, 1, head_dim]`, reading only the filled part of the ring.
pub fn ring_attention(
    q: &Tensor,
    ring: &KvRing,
    mask: &Tensor,
    prefix: &PinnedPrefix,
) -> Result<Tensor> {
    ring_attention_launched(q, ring, mask, prefix, None)
}

/// `ring_attention` by `launch` (`None`: as the plan or `DUPLEX_ATTENTION` says), to time and
/// check the launches against each other.
pub fn ring_attention_launched(
    q: &Tensor,
    ring: &KvRing,
    mask: &Tensor,
    prefix: &PinnedPrefix,
    launch: Option<AttentionLaunch>,
) -> Result<Tensor> {
    let mask = mask.to_dtype(DType::F32)?.contiguous()?;
    q.to_dtype(DType::BF16)?
        .contiguous()?
        .apply_op1_no_bwd(&RingAttention {
            ring,
            mask: &mask,
            prefix,
            launch,
        })
}
