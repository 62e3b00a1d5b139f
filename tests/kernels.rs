//! Our CUDA kernels against their CPU references. Built only with `--features cuda`; without a
//! GPU each test says so and returns (CI compiles them; a GPU machine runs them).
#![cfg(feature = "cuda")]

mod tiny;

use candle_core::{DType, Device, Tensor};
use duplex::model::decode::KvRing;
use duplex::model::kernel_plan::Sublayer;
use duplex::model::quant::KvQuant;
use duplex::model::{cuda, quant, sampling};

/// A weight quantised to int8, on the GPU, with its CPU reference product.
struct Int8Case {
    on_gpu: quant::Int8Weight,
    scale: Tensor,
    values_t: Tensor,
}

impl Int8Case {
    fn new(weight: &Tensor, gpu: &Device) -> Self {
        let q = quant::quantize(weight).unwrap();
        Self {
            on_gpu: quant::Int8Weight {
                q: q.q.to_device(gpu).unwrap(),
                scale: q.scale.to_device(gpu).unwrap(),
            },
            values_t: q.values_f32().unwrap().t().unwrap().contiguous().unwrap(),
            scale: q.scale,
        }
    }

    /// `quant::w8a16_reference` of `x` `[rows, k]` (any dtype) on the CPU, in f32.
    fn reference(&self, x: &Tensor) -> Tensor {
        let x = x.to_dtype(DType::F32).unwrap();
        quant::w8a16_reference(&x, &self.values_t, &self.scale).unwrap()
    }
}

/// Every w8a16 kernel against the CPU reference: the matrix-vector ones (with and without the
/// next weights loaded ahead) and the tensor-core one for batches up to two tiles, the split-K
/// one for 1 to 4 rows. The shapes leave partial blocks and chunks: 771 channels (a partial
/// group of four), 1040 inputs (a partial 128-input slice of the tensor-core kernel, a 16-input tail chunk of the split-K one), 4224 inputs (9
/// chunks over 8 warps: a warp's second round), 11264 (22 chunks: rounds of two).
#[test]
fn w8a16_kernels_match_the_cpu_reference() {
    use cuda::W8a16Kernel::{Rows, RowsAhead, SplitK, TensorCores};
    let Some(gpu) = tiny::gpu() else { return };
    for (n, k) in [(771, 1040), (37, 4224), (5, 11264)] {
        let weight = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
        let int8 = Int8Case::new(&weight, &gpu);
        let runs = [1, 3, 8, 17, 64, 100]
            .into_iter()
            .flat_map(|batch| [(batch, Rows), (batch, RowsAhead), (batch, TensorCores)])
            .chain((1..=cuda::GEMV_MAX_ROWS).map(|batch| (batch, SplitK)));
        for (batch, kernel) in runs {
            // RMS 4, far from the unit RMS of a normalised input (see `check_sublayer_ends`).
            let x = Tensor::randn(0f32, 4.0, (batch, k), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let want = int8.reference(&x);
            let scale = tiny::largest_abs(&want);
            let x_gpu = x.to_device(&gpu).unwrap();
            let got = cuda::w8a16_on(&x_gpu, &int8.on_gpu, kernel).unwrap();
            let diff = tiny::max_abs_diff(&got, &want);
            assert!(
                diff <= 0.01 * scale,
                "{n}x{k}, batch {batch}, {kernel:?}: max |diff| {diff} (output scale {scale})"
            );
            if kernel == SplitK {
                let product = |x: &Tensor| int8.reference(x);
                let fused = |ends: &cuda::Ends| {
                    cuda::w8a16_fused(&x_gpu, &int8.on_gpu, kernel, ends).unwrap()
                };
                let what = format!("int8 {n}x{k}, batch {batch}");
                check_sublayer_ends(&x, product, fused, &gpu, &what);
            }
        }
    }
}

/// A split-K product with its sublayer's ends inside (`fused`) against the composition on the
/// CPU (`product` of a bf16 `x` `[rows, k]` on the CPU, in f32): with a skip connection, and
/// with an RMS pre-norm. `x` must be far from unit RMS, so that a norm that skips the division
/// cannot pass.
fn check_sublayer_ends(
    x: &Tensor,
    product: impl Fn(&Tensor) -> Tensor,
    fused: impl Fn(&cuda::Ends) -> Tensor,
    gpu: &Device,
    what: &str,
) {
    let plain = product(x);
    let (rows, n) = plain.dims2().unwrap();
    let residual = Tensor::randn(0f32, 1.0, (rows, n), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let want = (&plain + residual.to_dtype(DType::F32).unwrap()).unwrap();
    let got = fused(&cuda::Ends {
        residual: Some(residual.to_device(gpu).unwrap()),
        ..Default::default()
    });
    let diff = tiny::max_abs_diff(&got, &want);
    assert!(
        diff <= 0.01 * tiny::largest_abs(&want),
        "{what}, with a skip connection: {diff}"
    );
    let alpha = Tensor::randn(1f32, 0.1, x.dim(1).unwrap(), &Device::Cpu).unwrap();
    let normed = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32).unwrap(), &alpha, 1e-5).unwrap();
    let want = product(&normed);
    let got = fused(&cuda::Ends {
        norm: Some((alpha.to_device(gpu).unwrap(), 1e-5)),
        ..Default::default()
    });
    let diff = tiny::max_abs_diff(&got, &want);
    assert!(
        diff <= 0.01 * tiny::largest_abs(&want),
        "{what}, with a pre-norm: {diff}"
    );
}

/// The bf16 split-K product against candle's f32 matmul of the same bf16 values, for 1 to 4
/// rows and the shapes of the w8a16 test (1032 inputs leave an 8-input tail).
#[test]
fn the_bf16_split_k_product_matches_a_matmul() {
    let Some(gpu) = tiny::gpu() else { return };
    for (n, k) in [(771, 1032), (37, 4224), (5, 11264)] {
        let bf16 = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
        let weight = bf16(Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap());
        let weight_gpu = weight.to_device(&gpu).unwrap();
        for batch in 1..=cuda::GEMV_MAX_ROWS {
            // RMS 4, far from the unit RMS of a normalised input (see `check_sublayer_ends`).
            let x = bf16(Tensor::randn(0f32, 4.0, (batch, k), &Device::Cpu).unwrap());
            let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let want = f32(&x).matmul(&f32(&weight).t().unwrap()).unwrap();
            let scale = tiny::largest_abs(&want);
            let x_gpu = x.to_device(&gpu).unwrap();
            let got = cuda::gemv_bf16(&x_gpu, &weight_gpu, &cuda::Ends::default()).unwrap();
            let diff = tiny::max_abs_diff(&got, &want);
            assert!(
                diff <= 0.01 * scale,
                "{n}x{k}, batch {batch}: max |diff| {diff} (output scale {scale})"
            );
            let product = |x: &Tensor| f32(x).matmul(&f32(&weight).t().unwrap()).unwrap();
            let fused = |ends: &cuda::Ends| cuda::gemv_bf16(&x_gpu, &weight_gpu, ends).unwrap();
            let what = format!("bf16 {n}x{k}, batch {batch}");
            check_sublayer_ends(&x, product, fused, &gpu, &what);
        }
    }
}

/// A graph whose kernels of ours start while the kernel before them finishes (`DUPLEX_PDL`)
/// computes what eager launches compute, bit for bit, over 50 replays on new inputs: 48
/// dependent split-K products (each with its pre-norm and skip connection, every fourth gated
/// and followed by the norm kernel), and every eighth a long cuBLAS product of 2048 copies of
/// the row before ours. A kernel of ours reading its input before the kernel writing it
/// finished, a long one above all, would differ somewhere.
#[test]
fn a_graph_of_early_starting_kernels_replays_the_eager_chain() {
    use duplex::model::graph::FrameGraph;
    let Some(gpu) = tiny::gpu() else { return };
    if !duplex::model::graph::early::supported(gpu.as_cuda_device().unwrap()).unwrap() {
        eprintln!("kernels start early only on sm_90 or later, built for it: skipped");
        return;
    }
    let k = 1024;
    let bf16 = |t: Tensor| t.to_dtype(DType::BF16).unwrap().to_device(&gpu).unwrap();
    let weights: Vec<Tensor> = (0..4)
        .map(|_| bf16(Tensor::randn(0f32, 0.03, (k, k), &Device::Cpu).unwrap()))
        .collect();
    let gate_weight = bf16(Tensor::randn(0f32, 0.03, (2 * k, k), &Device::Cpu).unwrap());
    let alpha = Tensor::ones(k, DType::F32, &gpu).unwrap();
    let chain = |x: &Tensor| -> candle_core::Result<Tensor> {
        let mut hidden = x.clone();
        for layer in 0..48 {
            if layer % 4 == 3 {
                let ends = cuda::Ends {
                    residual: None,
                    norm: Some((alpha.clone(), 1e-5)),
                    gate: true,
                };
                let gated = cuda::gemv_bf16(&hidden, &gate_weight, &ends)?;
                hidden = cuda::rms_norm(&(gated + &hidden)?, &alpha, 1e-5)?;
                continue;
            }
            if layer % 8 == 0 {
                // cuBLAS over many rows: long enough to still run when ours starts.
                let rows = hidden.repeat((2048, 1))?;
                hidden = rows.matmul(&weights[0])?.narrow(0, 2047, 1)?;
            }
            let ends = cuda::Ends {
                residual: Some(hidden.clone()),
                norm: Some((alpha.clone(), 1e-5)),
                gate: false,
            };
            hidden = cuda::gemv_bf16(&hidden, &weights[layer % 4], &ends)?;
        }
        Ok(hidden)
    };
    let input = |seed: f32| {
        bf16((Tensor::randn(0f32, 1.0, (1, k), &Device::Cpu).unwrap() + seed as f64).unwrap())
    };
    let first = input(0.0);
    // As the model captures: an eager run first fills candle's upload cache (`cached_uploads`).
    let _uploads = duplex::model::graph::cached_uploads(&gpu).unwrap();
    chain(&first).unwrap();
    let graph = FrameGraph::capture_with(&[&first], (1, k), DType::BF16, true, |buffers| {
        chain(&buffers[0])
    })
    .unwrap();
    // 36 plain products, 12 gated ones and 12 norms, each after a kernel (ours, cuBLAS's or
    // candle's) and frees.
    assert!(
        graph.early_kernels() >= 48,
        "only {} of 60 kernels of ours may start early (each comes after a kernel and frees)",
        graph.early_kernels()
    );
    let bits = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    for replay in 0..50 {
        let x = input(replay as f32 / 50.0);
        let eager = bits(&chain(&x).unwrap());
        let replayed = bits(graph.replay(&[&x]).unwrap());
        let differing = eager.iter().zip(&replayed).filter(|(a, b)| a != b).count();
        assert_eq!(
            differing, 0,
            "replay {replay}: {differing} of {k} outputs differ"
        );
    }
}

/// A gated FFN's in-projection with its pre-norm and gate inside the split-K kernel equals the
/// same product followed by the swiglu kernel, value for value, and the CPU composition within
/// bf16 rounding; int8 and bf16 weights, 1 to 4 rows. Shapes: h = 385 (the last block holds
/// one gate and its up channel), the depformer's (2 x 2816, 1024) and the temporal
/// transformer's (2 x 11264, 4096).
#[test]
fn a_gated_split_k_product_equals_the_product_then_the_gate() {
    let Some(gpu) = tiny::gpu() else { return };
    let f32 = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    for (n, k) in [(770, 1040), (2 * 2816, 1024), (2 * 11264, 4096)] {
        let weight = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
        let int8 = Int8Case::new(&weight, &gpu);
        let bf16_weight = weight.to_dtype(DType::BF16).unwrap();
        let bf16_gpu = bf16_weight.to_device(&gpu).unwrap();
        let alpha = Tensor::randn(1f32, 0.1, k, &Device::Cpu).unwrap();
        let ends = |gate| cuda::Ends {
            residual: None,
            norm: Some((alpha.to_device(&gpu).unwrap(), 1e-5)),
            gate,
        };
        for rows in 1..=cuda::GEMV_MAX_ROWS {
            let x = Tensor::randn(0f32, 4.0, (rows, k), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let x_gpu = x.to_device(&gpu).unwrap();
            let normed = candle_nn::ops::rms_norm(&f32(&x), &alpha, 1e-5).unwrap();
            let int8_product = |ends: &cuda::Ends| {
                cuda::w8a16_fused(&x_gpu, &int8.on_gpu, cuda::W8a16Kernel::SplitK, ends).unwrap()
            };
            let bf16_product =
                |ends: &cuda::Ends| cuda::gemv_bf16(&x_gpu, &bf16_gpu, ends).unwrap();
            let cpu_bf16 = normed.matmul(&f32(&bf16_weight).t().unwrap()).unwrap();
            for (kind, product, cpu) in [
                (
                    "int8",
                    &int8_product as &dyn Fn(&cuda::Ends) -> Tensor,
                    int8.reference(&normed),
                ),
                ("bf16", &bf16_product, cpu_bf16),
            ] {
                let what = format!("{kind} {n}x{k}, {rows} rows");
                let gated = product(&ends(true));
                let then_gate = cuda::swiglu(&product(&ends(false))).unwrap();
                assert_eq!(gated.dims(), [rows, n / 2], "{what}");
                assert_eq!(
                    f32(&gated).to_vec2::<f32>().unwrap(),
                    f32(&then_gate).to_vec2::<f32>().unwrap(),
                    "{what}: the gated product differs from the product then the gate"
                );
                let h = n / 2;
                let want = (candle_nn::ops::silu(&cpu.narrow(1, 0, h).unwrap()).unwrap()
                    * cpu.narrow(1, h, h).unwrap())
                .unwrap();
                let diff = tiny::max_abs_diff(&gated, &want);
                assert!(
                    diff <= 0.02 * tiny::largest_abs(&want),
                    "{what}: max |diff| {diff} from the CPU composition"
                );
            }
        }
    }
}

#[test]
fn rms_norm_and_swiglu_match_the_cpu_layers() {
    let Some(gpu) = tiny::gpu() else { return };
    let x = Tensor::randn(0f32, 2.0, (5, 4096), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let alpha = Tensor::randn(1f32, 0.1, 4096, &Device::Cpu).unwrap();
    let want = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32).unwrap(), &alpha, 1e-8).unwrap();
    let got = cuda::rms_norm(
        &x.to_device(&gpu).unwrap(),
        &alpha.to_device(&gpu).unwrap(),
        1e-8,
    )
    .unwrap();
    assert!(tiny::max_abs_diff(&got, &want) < 0.05, "rms norm");
    let gated = Tensor::randn(0f32, 1.0, (3, 2 * 2816), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let f = gated.to_dtype(DType::F32).unwrap();
    let want = (candle_nn::ops::silu(&f.narrow(1, 0, 2816).unwrap()).unwrap()
        * f.narrow(1, 2816, 2816).unwrap())
    .unwrap();
    let got = cuda::swiglu(&gated.to_device(&gpu).unwrap()).unwrap();
    assert!(tiny::max_abs_diff(&got, &want) < 0.05, "swiglu");
}

/// Mimi's f32 products by the split-K kernel equal a CPU matmul, at each row count it takes,
/// for Mimi's transformer and quantizer shapes and one with a partial last block and chunk;
/// five rows are refused.
#[test]
fn the_f32_split_k_product_matches_a_matmul() {
    let Some(gpu) = tiny::gpu() else { return };
    let mimi = [
        (1536, 512),
        (512, 512),
        (2048, 512),
        (512, 2048),
        (256, 512),
        (512, 256),
    ];
    for (n, k) in mimi.into_iter().chain([(771, 1040)]) {
        let weight = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap();
        let weight_gpu = weight.to_device(&gpu).unwrap();
        for rows in 1..=4 {
            let x = Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu).unwrap();
            let want = x.matmul(&weight.t().unwrap()).unwrap();
            let got = cuda::gemv_f32(&x.to_device(&gpu).unwrap(), &weight_gpu).unwrap();
            let error = tiny::max_abs_diff(&got, &want);
            assert!(error < 1e-4, "{rows} rows of {n}x{k}: {error}");
        }
    }
    let five = Tensor::zeros((5, 512), DType::F32, &gpu).unwrap();
    let weight = Tensor::zeros((64, 512), DType::F32, &gpu).unwrap();
    let err = cuda::gemv_f32(&five, &weight).unwrap_err();
    assert!(err.to_string().contains("1 to 4 rows"), "{err}");
}

/// Mimi's skip connection and LayerNorm in one kernel equal candle's ops on the CPU: with a
/// scaled update, an unscaled one and none (a plain LayerNorm, through `nn::LayerNorm` too);
/// misshaped tensors are refused.
#[test]
fn skip_layer_norm_matches_the_cpu_layers() {
    let Some(gpu) = tiny::gpu() else { return };
    for dim in [7, 100, 512, 4096] {
        check_skip_layer_norm(&gpu, 3, dim);
    }
}

/// `skip_layer_norm_matches_the_cpu_layers` for `rows` rows of `dim` (Mimi's is 512; 7 is fewer
/// values than a warp has threads; 4096 takes a block of 1024).
fn check_skip_layer_norm(gpu: &Device, rows: usize, dim: usize) {
    use duplex::model::nn::LayerNorm;
    let cpu = Device::Cpu;
    let eps = 1e-5;
    let x = (Tensor::randn(0f32, 2.0, (rows, 1, dim), &cpu).unwrap() + 0.5).unwrap();
    let update = Tensor::randn(0f32, 3.0, (rows, 1, dim), &cpu).unwrap();
    let scale = Tensor::randn(0f32, 0.05, dim, &cpu).unwrap();
    let weight = Tensor::randn(1f32, 0.2, dim, &cpu).unwrap();
    let bias = Tensor::randn(0f32, 0.3, dim, &cpu).unwrap();
    let on_gpu = |t: &Tensor| t.to_device(gpu).unwrap();
    let norm = LayerNorm::new(weight.clone(), bias.clone(), eps);
    let norm_gpu = LayerNorm::new(on_gpu(&weight), on_gpu(&bias), eps);
    for scale in [Some(&scale), None] {
        let want = norm.forward_after_skip(&x, &update, scale).unwrap();
        let scale_gpu = scale.map(on_gpu);
        let got = norm_gpu
            .forward_after_skip(&on_gpu(&x), &on_gpu(&update), scale_gpu.as_ref())
            .unwrap();
        assert!(tiny::max_abs_diff(&got.0, &want.0) < 1e-5, "the sum");
        assert!(tiny::max_abs_diff(&got.1, &want.1) < 1e-4, "the norm");
    }
    let plain = norm_gpu.forward(&on_gpu(&x)).unwrap();
    let want = candle_nn::ops::layer_norm(&x, &weight, &bias, eps).unwrap();
    assert!(
        tiny::max_abs_diff(&plain, &want) < 1e-4,
        "a plain layer norm"
    );
    let x_gpu = on_gpu(&x);
    let short = on_gpu(&update.narrow(0, 0, 1).unwrap());
    let (weight_gpu, bias_gpu) = (on_gpu(&weight), on_gpu(&bias));
    let err = cuda::skip_layer_norm(&x_gpu, &short, None, &weight_gpu, &bias_gpu, eps);
    assert!(err.unwrap_err().to_string().contains("update of"));
    let short_bias = on_gpu(&bias.narrow(0, 0, dim - 1).unwrap());
    let err = cuda::layer_norm(&x_gpu, &weight_gpu, &short_bias, eps);
    let want = format!("{} bias values", dim - 1);
    assert!(err.unwrap_err().to_string().contains(&want));
}

/// Mimi's streaming conv on our kernels (`cuda::stream_conv`, which `mimi::conv::Conv1d` runs on a
/// GPU: its input laid out with the context and the ELU, one product, then the bias and skip
/// connection) equals candle's conv over the context and the input on the CPU, for three steps
/// in a row with row masks: a 7-tap conv without ELU, a dilated residual conv, one with its skip
/// connection, the 8-tap downsample of stride 4, a 16-tap one of stride 8 over as many samples as
/// its context (one output), and a 1-tap conv without context (the emulator,
/// `tests/emu/conv.cpp`, also runs contexts longer than the input), at 2 and 9 rows. An idle row
/// and a slot outside the step keep their context. Misshaped inputs are refused.
#[test]
fn streaming_conv_kernels_match_candle_conv() {
    let Some(gpu) = tiny::gpu() else { return };
    for rows in [2, 9] {
        check_stream_conv(&gpu, rows, (1, 64, 1920), (7, 1, 1), false, false);
        check_stream_conv(&gpu, rows, (64, 32, 1920), (3, 1, 3), true, false);
        check_stream_conv(&gpu, rows, (32, 32, 480), (3, 1, 1), true, true);
        check_stream_conv(&gpu, rows, (64, 128, 1920), (8, 4, 1), true, false);
        check_stream_conv(&gpu, rows, (512, 1024, 8), (16, 8, 1), true, false);
        check_stream_conv(&gpu, rows, (32, 64, 40), (1, 1, 1), true, true);
    }
    let x = Tensor::zeros((2, 4, 10), DType::F32, &gpu).unwrap();
    let active = Tensor::ones(2, DType::U8, &gpu).unwrap();
    let conv = |kernel, stride| cuda::StreamConv {
        kernel,
        stride,
        dilation: 1,
        elu: false,
    };
    let weight = |kernel| Tensor::zeros((3, 4, kernel), DType::F32, &gpu).unwrap();
    let prev = Tensor::zeros((2, 4, 1), DType::F32, &gpu).unwrap();
    let run = |prev: Option<&Tensor>, kernel, stride| {
        let weight = weight(kernel);
        let conv = conv(kernel, stride);
        cuda::stream_conv(&x, prev, &active, &weight, None, None, conv)
            .unwrap_err()
            .to_string()
    };
    assert!(run(Some(&prev), 3, 1).contains("a context of [2, 4, 1]"));
    assert!(run(Some(&prev), 3, 3).contains("for 3 taps of stride 3"));
    assert!(run(None, 2, 1).contains("needs a state"));
    let short_bias = Tensor::zeros(2, DType::F32, &gpu).unwrap();
    let err = cuda::stream_conv(
        &x,
        None,
        &active,
        &weight(1),
        Some(&short_bias),
        None,
        conv(1, 1),
    );
    assert!(
        err.unwrap_err()
            .to_string()
            .contains("conv bias: [2] for 3 channels")
    );
}

/// One `streaming_conv_kernels_match_candle_conv` case: `rows` rows of a batch of `rows + 1`
/// slots, `(c_in, c_out, t_in)`, `(kernel, stride, dilation)`, an ELU before the conv, a skip
/// connection after it.
fn check_stream_conv(
    gpu: &Device,
    rows: usize,
    (c_in, c_out, t_in): (usize, usize, usize),
    (kernel, stride, dilation): (usize, usize, usize),
    elu: bool,
    skip: bool,
) {
    let (cpu, batch) = (Device::Cpu, rows + 1);
    let conv = cuda::StreamConv {
        kernel,
        stride,
        dilation,
        elu,
    };
    let context = conv.context();
    let t_out = t_in / stride;
    let weight = Tensor::randn(0f32, 0.1, (c_out, c_in, kernel), &cpu).unwrap();
    let bias = Tensor::randn(0f32, 0.5, c_out, &cpu).unwrap();
    let mut prev = Tensor::randn(0f32, 1.0, (batch, c_in, context), &cpu).unwrap();
    let prev_gpu = prev.to_device(gpu).unwrap();
    let on_gpu = |t: &Tensor| t.to_device(gpu).unwrap();
    let (weight_gpu, bias_gpu) = (on_gpu(&weight), on_gpu(&bias));
    let what =
        format!("{rows} rows, {c_in}->{c_out} over {t_in}, {kernel} taps of stride {stride}");
    for step in 0..3 {
        // Every row, then the odd rows only, then the even ones.
        let active: Vec<u8> = (0..rows)
            .map(|r| u8::from(step == 0 || r % 2 == step % 2))
            .collect();
        let x = Tensor::randn(0f32, 2.0, (rows, c_in, t_in), &cpu).unwrap();
        let residual = Tensor::randn(0f32, 1.0, (rows, c_out, t_out), &cpu).unwrap();
        let input = if elu { x.elu(1.0).unwrap() } else { x.clone() };
        let seq = Tensor::cat(&[&prev.narrow(0, 0, rows).unwrap(), &input], 2).unwrap();
        let mut want = seq
            .conv1d(&weight, 0, stride, dilation, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, c_out, 1)).unwrap())
            .unwrap();
        if skip {
            want = (want + &residual).unwrap();
        }
        let active_gpu = Tensor::new(active.as_slice(), gpu).unwrap();
        let prev_arg = (context > 0).then_some(&prev_gpu);
        let residual_gpu = skip.then(|| on_gpu(&residual));
        let x_gpu = on_gpu(&x);
        let got = cuda::stream_conv(
            &x_gpu,
            prev_arg,
            &active_gpu,
            &weight_gpu,
            Some(&bias_gpu),
            residual_gpu.as_ref(),
            conv,
        )
        .unwrap();
        let diff = tiny::max_abs_diff(&got, &want);
        let scale = tiny::largest_abs(&want);
        assert!(
            diff <= 1e-4 * scale.max(1.0),
            "{what}, step {step}: max |diff| {diff} (output scale {scale})"
        );
        if context == 0 {
            continue;
        }
        let tail = seq.narrow(2, t_in, context).unwrap();
        let kept: Vec<Tensor> = (0..batch)
            .map(|r| match r < rows && active[r] == 1 {
                true => tail.narrow(0, r, 1).unwrap(),
                false => prev.narrow(0, r, 1).unwrap(),
            })
            .collect();
        prev = Tensor::cat(&kept, 0).unwrap();
        let diff = tiny::max_abs_diff(&prev_gpu, &prev);
        assert!(
            diff <= 1e-6,
            "{what}, step {step}: the context is off by {diff}"
        );
    }
}

/// Mimi's RoPE and ring write in one launch (`cuda::rope_ring_write`, which
/// `kv::RingCache::append_qkv` runs on a GPU) equals `RopeTables::apply` on the queries and keys
/// and their keys and values put at the index's entries, on the CPU: Mimi's 8 heads of 64, 2
/// steps a frame, two rows (the second wrapping round its 250-entry ring) of a batch of three.
/// Misshaped operands are refused.
#[test]
fn mimi_ring_write_matches_rope_and_the_scatter() {
    use duplex::model::kv::split_qkv;
    use duplex::model::nn::Rope;
    let Some(gpu) = tiny::gpu() else { return };
    let (cpu, rows, time, heads, head_dim, capacity) = (Device::Cpu, 2, 2, 8, 64, 250);
    let qkv = Tensor::randn(0f32, 1.0, (rows, time, 3 * heads * head_dim), &cpu).unwrap();
    let positions = vec![vec![5, 6], vec![300, 301]];
    let tables = Rope::new(head_dim, 10_000.0)
        .tables(&positions, DType::F32, &cpu)
        .unwrap();
    let [q, k, v] = split_qkv(&qkv, heads, head_dim).unwrap();
    let (q, k) = (tables.apply(&q).unwrap(), tables.apply(&k).unwrap());
    let entries = [[10usize, 11], [249, 0]];
    let ring = || Tensor::randn(0f32, 1.0, (rows + 1, heads, capacity, head_dim), &cpu).unwrap();
    let (ring_k, ring_v) = (ring(), ring());
    let (mut want_k, mut want_v) = (ring_k.clone(), ring_v.clone());
    for (r, row) in entries.iter().enumerate() {
        for (t, &entry) in row.iter().enumerate() {
            let put = |ring: &Tensor, src: &Tensor| {
                let src = src.narrow(0, r, 1).unwrap().narrow(2, t, 1).unwrap();
                let at = [r..r + 1, 0..heads, entry..entry + 1, 0..head_dim];
                ring.slice_assign(&at, &src.contiguous().unwrap()).unwrap()
            };
            want_k = put(&want_k, &k);
            want_v = put(&want_v, &v);
        }
    }
    let index: Vec<i64> = (0..rows * heads * time * head_dim)
        .map(|i| entries[i / (heads * time * head_dim)][i / head_dim % time] as i64)
        .collect();
    let index = Tensor::from_vec(index, (rows, heads, time, head_dim), &gpu).unwrap();
    let on_gpu = |t: &Tensor| t.to_device(&gpu).unwrap();
    let (rings_k, rings_v) = (on_gpu(&ring_k), on_gpu(&ring_v));
    let (cos, sin) = tables.cos_sin();
    let (cos, sin) = (on_gpu(cos), on_gpu(sin));
    let got_q = cuda::rope_ring_write(
        &on_gpu(&qkv),
        (&cos, &sin),
        &index,
        (&rings_k, &rings_v),
        heads,
    )
    .unwrap();
    assert!(tiny::max_abs_diff(&got_q, &q) < 1e-5, "the turned queries");
    assert!(
        tiny::max_abs_diff(&rings_k, &want_k) < 1e-5,
        "the keys in the ring"
    );
    assert!(
        tiny::max_abs_diff(&rings_v, &want_v) == 0.0,
        "the values in the ring"
    );
    let short = qkv.narrow(2, 0, 3 * heads * head_dim - 3).unwrap();
    let short = on_gpu(&short.contiguous().unwrap());
    let err = cuda::rope_ring_write(&short, (&cos, &sin), &index, (&rings_k, &rings_v), heads);
    assert!(err.unwrap_err().to_string().contains("an in-projection of"));
    let two_heads =
        cuda::rope_ring_write(&on_gpu(&qkv), (&cos, &sin), &index, (&rings_k, &rings_v), 2);
    assert!(two_heads.unwrap_err().to_string().contains("rings"));
}

/// Mimi's attention in one kernel equals the CPU's composed attention with the heads merged, also
/// with its keys and values read in place from rings with spare entries:
/// Mimi's shape with a causal window, a row that sees everything and a row that sees one key;
/// fewer keys than warps with heads wider than the block. Misshaped masks and rings past the
/// kernel's keys are refused.
#[test]
fn masked_attention_matches_the_cpu_path() {
    let Some(gpu) = tiny::gpu() else { return };
    check_masked_attention(&gpu, (3, 8, 2, 250, 64));
    check_masked_attention(&gpu, (3, 2, 1, 3, 256));
    let zeros = |dims: (usize, usize, usize, usize)| Tensor::zeros(dims, DType::F32, &gpu).unwrap();
    let (q, kv) = (zeros((3, 8, 2, 64)), zeros((3, 8, 250, 64)));
    let short_mask = zeros((3, 1, 2, 249));
    let err = cuda::masked_attention(&q, &kv, &kv, &short_mask, 0.125);
    assert!(err.unwrap_err().to_string().contains("a mask of"));
    // One row, one step: the split in-projection's views, which candle calls contiguous
    // whatever the strides of their dimensions of one entry. A single key: its value comes out.
    let qkv = Tensor::randn(0f32, 1.0, (1, 1, 3 * 8 * 64), &gpu).unwrap();
    let [q1, k1, v1] = duplex::model::kv::split_qkv(&qkv, 8, 64).unwrap();
    let one_key = cuda::masked_attention(&q1, &k1, &v1, &zeros((1, 1, 1, 1)), 0.125).unwrap();
    let value = v1.transpose(1, 2).unwrap().reshape((1, 1, 8 * 64)).unwrap();
    assert!(tiny::max_abs_diff(&one_key, &value) < 1e-6, "a single key");
    let (long, long_mask) = (zeros((3, 8, 1025, 64)), zeros((3, 1, 2, 1025)));
    let err = cuda::masked_attention(&q, &long, &long, &long_mask, 0.125);
    assert!(err.unwrap_err().to_string().contains("not 1025 of 64"));
}

/// `masked_attention_matches_the_cpu_path` for `(rows, heads, time, len, head_dim)`, both
/// through `kv::attention_merged` and the kernel itself (which `DUPLEX_KERNELS=candle` would
/// leave out of the first).
fn check_masked_attention(
    gpu: &Device,
    (rows, heads, time, len, head_dim): (usize, usize, usize, usize, usize),
) {
    use duplex::model::kv::{Attend, attention_merged};
    let cpu = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (rows, heads, time, head_dim), &cpu).unwrap();
    let k = Tensor::randn(0f32, 1.0, (rows, heads, len, head_dim), &cpu).unwrap();
    let v = Tensor::randn(0f32, 2.0, (rows, heads, len, head_dim), &cpu).unwrap();
    let cell = |row: usize, query: usize, key: usize| {
        let newest = len - time + query;
        let visible = match row {
            0 => key <= newest && newest - key < 100,
            1 => true,
            _ => key == 0,
        };
        if visible { 0f32 } else { f32::NEG_INFINITY }
    };
    let mask: Vec<f32> = (0..rows * time * len)
        .map(|i| cell(i / (time * len), i / len % time, i % len))
        .collect();
    let mask = Tensor::from_vec(mask, (rows, 1, time, len), &cpu).unwrap();
    let on_gpu = |t: &Tensor| t.to_device(gpu).unwrap();
    let attend = |device: &dyn Fn(&Tensor) -> Tensor| Attend {
        k: device(&k),
        v: device(&v),
        mask: device(&mask),
    };
    let want = attention_merged(&q, &attend(&|t| t.clone())).unwrap();
    let routed = attention_merged(&on_gpu(&q), &attend(&on_gpu)).unwrap();
    let scale = 1.0 / (head_dim as f32).sqrt();
    let kernel =
        cuda::masked_attention(&on_gpu(&q), &on_gpu(&k), &on_gpu(&v), &on_gpu(&mask), scale)
            .unwrap();
    // The keys and values as the first `len` entries of rings of `len + 7`, read in place.
    let ring = |t: &Tensor| {
        let spare = Tensor::zeros((rows, heads, 7, head_dim), DType::F32, &cpu).unwrap();
        let ring = on_gpu(&Tensor::cat(&[t, &spare], 2).unwrap());
        ring.narrow(2, 0, len).unwrap()
    };
    let in_rings =
        cuda::masked_attention(&on_gpu(&q), &ring(&k), &ring(&v), &on_gpu(&mask), scale).unwrap();
    let runs = [
        ("attention_merged", routed),
        ("the kernel", kernel),
        ("the kernel over rings", in_rings),
    ];
    for (what, got) in runs {
        assert_eq!(got.dims(), [rows, time, heads * head_dim], "{what}");
        let error = tiny::max_abs_diff(&got, &want);
        assert!(
            error < 1e-4,
            "{what} differs by {error} at {len} keys of {head_dim}"
        );
    }
}

/// `sampling::draw` of `logits` on the GPU and on the CPU, each with `params` on its device.
fn draws_on_both(
    logits: &Tensor,
    gpu: &Device,
    params: impl Fn(&Device) -> sampling::DrawParams,
) -> (Vec<u32>, Vec<u32>) {
    let draw = |device: &Device| -> Vec<u32> {
        let logits = logits.to_device(device).unwrap();
        sampling::draw(&logits, &params(device))
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    (draw(gpu), draw(&Device::Cpu))
}

#[test]
fn device_sampling_draws_what_the_cpu_reference_draws() {
    let Some(gpu) = tiny::gpu() else { return };
    let (rows, vocab) = (64, 2048);
    let logits = Tensor::randn(0f32, 3.0, (rows, vocab), &Device::Cpu).unwrap();
    let seeds: Vec<i64> = (0..rows as i64).map(|r| 1000 + r).collect();
    let counters: Vec<i64> = (0..rows as i64).map(|r| 7 * r).collect();
    // Every row its own setting: top-k 250 / 25, greedy by k = 1 and by temperature 0.
    let settings = [(250i64, 0.8f32), (25, 0.7), (1, 0.8), (250, 0.0)];
    let top_k: Vec<i64> = (0..rows).map(|r| settings[r % 4].0).collect();
    let temperature: Vec<f32> = (0..rows).map(|r| settings[r % 4].1).collect();
    let params = |device: &Device| sampling::DrawParams {
        seeds: Tensor::new(seeds.as_slice(), device).unwrap(),
        counters: Tensor::new(counters.as_slice(), device).unwrap(),
        top_k: Tensor::new(top_k.as_slice(), device).unwrap(),
        temperature: Tensor::new(temperature.as_slice(), device).unwrap(),
    };
    let (got, want) = draws_on_both(&logits, &gpu, params);
    let agree = (0..rows).filter(|&r| got[r] == want[r]).count();
    // exp/log may differ by an ulp between the GPU and the CPU; ties are rare.
    assert!(agree * 100 >= rows * 98, "{agree}/{rows} rows agree");
    let greedy_rows = (0..rows).filter(|r| r % 4 >= 2);
    assert!(
        greedy_rows.clone().all(|r| got[r] == want[r]),
        "greedy rows must agree exactly"
    );
}

/// Masked logits on the device as in the CPU reference: -inf over a different half of each
/// row, NaN in some rows, and rows with nothing above -inf (token 0).
#[test]
fn device_sampling_never_draws_a_masked_logit() {
    let Some(gpu) = tiny::gpu() else { return };
    let (rows, vocab) = (32usize, 2048usize);
    let noise: Vec<f32> = Tensor::randn(0f32, 3.0, rows * vocab, &Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap();
    let logits: Vec<f32> = (0..rows * vocab)
        .map(|i| {
            let (r, j) = (i / vocab, i % vocab);
            match r % 8 {
                7 => f32::NEG_INFINITY,
                6 if j % 5 == 0 => f32::NAN,
                _ if (j * 7 + r) % 2 == 0 => f32::NEG_INFINITY,
                _ => noise[i],
            }
        })
        .collect();
    let logits = Tensor::from_vec(logits, (rows, vocab), &Device::Cpu).unwrap();
    let settings = [(250i64, 0.8f32), (25, 0.7), (1, 0.8), (4, 1.5)];
    let params = |device: &Device| sampling::DrawParams {
        seeds: Tensor::new(&[9i64; 32], device).unwrap(),
        counters: Tensor::arange(0i64, rows as i64, device).unwrap(),
        top_k: Tensor::new(&settings.map(|s| s.0), device)
            .unwrap()
            .repeat(8)
            .unwrap(),
        temperature: Tensor::new(&settings.map(|s| s.1), device)
            .unwrap()
            .repeat(8)
            .unwrap(),
    };
    let (got, want) = draws_on_both(&logits, &gpu, params);
    let values: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    for r in 0..rows {
        if r % 8 == 7 {
            assert_eq!((got[r], want[r]), (0, 0), "row {r}: nothing above -inf");
        } else {
            let logit = values[r][got[r] as usize];
            assert!(
                logit.is_finite(),
                "row {r}: token {} has logit {logit}",
                got[r]
            );
        }
    }
    let agree = (0..rows).filter(|&r| got[r] == want[r]).count();
    assert!(agree * 100 >= rows * 90, "{agree}/{rows} rows agree");
    assert!(
        (0..rows).filter(|r| r % 4 == 2).all(|r| got[r] == want[r]),
        "greedy rows must agree exactly"
    );
}

/// RoPE on the query and key with the key and value written into the ring at a device index,
/// against the CPU path (`RopeTables::apply` and a plain copy into the ring).
/// Misshaped inputs the kernels would read past are refused with the reason: rotation tables
/// and write indices for fewer rows, an int8 weight's scales for fewer channels.
#[test]
fn misshaped_kernel_inputs_are_refused() {
    let Some(gpu) = tiny::gpu() else { return };
    let (rows, heads, capacity, head_dim) = (2, 2, 8, 64);
    let zeros = |shape: &[usize], dtype| Tensor::zeros(shape, dtype, &gpu).unwrap();
    let qkv = zeros(&[rows, 1, 3, heads, head_dim], DType::BF16);
    let ring = KvRing::zeros(
        (rows, heads, capacity, head_dim),
        DType::BF16,
        KvQuant::None,
        &gpu,
    )
    .unwrap();
    let table = zeros(&[rows, head_dim / 2], DType::F32);
    let short_table = zeros(&[1, head_dim / 2], DType::F32);
    let write_idx = zeros(&[rows], DType::I64);
    let short_idx = zeros(&[1], DType::I64);
    cuda::rope_kv_write(&qkv, &table, &table, &ring, &write_idx).unwrap();
    let err = cuda::rope_kv_write(&qkv, &short_table, &table, &ring, &write_idx).unwrap_err();
    assert!(err.to_string().contains("rotation tables"), "{err}");
    let err = cuda::rope_kv_write(&qkv, &table, &table, &ring, &short_idx).unwrap_err();
    assert!(err.to_string().contains("write indices"), "{err}");
    let weight = Tensor::randn(0f32, 0.05, (32, 64), &Device::Cpu).unwrap();
    let mut int8 = Int8Case::new(&weight, &gpu).on_gpu;
    let x = zeros(&[1, 64], DType::BF16);
    cuda::w8a16(&x, &int8, Sublayer::Plain).unwrap();
    int8.scale = int8.scale.narrow(0, 0, 31).unwrap();
    let err = cuda::w8a16(&x, &int8, Sublayer::Plain).unwrap_err();
    assert!(err.to_string().contains("31] scales for 32"), "{err}");
}

#[test]
fn rope_and_ring_write_match_the_cpu_path() {
    use duplex::model::nn::Rope;
    let Some(gpu) = tiny::gpu() else { return };
    let (rows, heads, capacity, head_dim) = (3, 4, 16, 128);
    let bf16 = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
    let qkv = bf16(Tensor::randn(0f32, 1.0, (rows, 1, 3, heads, head_dim), &Device::Cpu).unwrap());
    let ring =
        bf16(Tensor::randn(0f32, 1.0, (rows, heads, capacity, head_dim), &Device::Cpu).unwrap());
    let write_idx = [5i64, -1, 15];
    let positions = vec![vec![7u64], vec![0], vec![3001]];
    let tables = Rope::new(head_dim, 10_000.0)
        .tables(&positions, DType::F32, &Device::Cpu)
        .unwrap();
    let (cos, sin) = tables.cos_sin();
    let on_gpu = |t: &Tensor| t.to_device(&gpu).unwrap();
    let gpu_ring = KvRing {
        k: on_gpu(&ring),
        v: on_gpu(&ring.affine(-1.0, 0.0).unwrap()),
        scales: None,
    };
    let q = cuda::rope_kv_write(
        &on_gpu(&qkv),
        &on_gpu(&cos.squeeze(1).unwrap()),
        &on_gpu(&sin.squeeze(1).unwrap()),
        &gpu_ring,
        &on_gpu(&Tensor::new(&write_idx, &Device::Cpu).unwrap()),
    )
    .unwrap();
    let (ring_k, ring_v) = (gpu_ring.k, gpu_ring.v);
    // The CPU path: split, rotate (in f32), copy into the ring.
    let part = |i: usize| {
        qkv.to_dtype(DType::F32)
            .unwrap()
            .narrow(2, i, 1)
            .unwrap()
            .squeeze(2)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let (want_q, want_k, want_v) = (
        tables.apply(&part(0)).unwrap(),
        tables.apply(&part(1)).unwrap(),
        part(2),
    );
    assert!(tiny::max_abs_diff(&q, &want_q) < 0.05, "rotated query");
    for (slot, &at) in write_idx.iter().enumerate() {
        let got = |ring: &Tensor| ring.narrow(0, slot, 1).unwrap();
        let (k_row, v_row) = (got(&ring_k), got(&ring_v));
        let untouched = |t: &Tensor, sign: f64| {
            ring.narrow(0, slot, 1)
                .unwrap()
                .affine(sign, 0.0)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .broadcast_as(t.shape())
                .unwrap()
                .contiguous()
                .unwrap()
        };
        if at < 0 {
            assert_eq!(
                tiny::max_abs_diff(&k_row, &untouched(&k_row, 1.0)),
                0.0,
                "slot {slot} skipped"
            );
            continue;
        }
        let at = at as usize;
        let entry = |t: &Tensor| t.narrow(2, at, 1).unwrap();
        let want = |t: &Tensor| t.narrow(0, slot, 1).unwrap();
        assert!(
            tiny::max_abs_diff(&entry(&k_row), &want(&want_k)) < 0.05,
            "slot {slot} key"
        );
        assert!(
            tiny::max_abs_diff(&entry(&v_row), &want(&want_v)) < 0.01,
            "slot {slot} value"
        );
        let before = |t: &Tensor| t.narrow(2, 0, at).unwrap();
        assert_eq!(
            tiny::max_abs_diff(&before(&k_row), &before(&untouched(&k_row, 1.0))),
            0.0,
            "slot {slot}: other entries kept"
        );
    }
}

/// Attention over the filled part of the ring against `kv::attention` on the CPU, with hidden
/// entries and a length short of the capacity: the 7B model's heads, and the tiny model's over a
/// ring of several key chunks, some of them wholly hidden; and pinned prefixes seen through the
/// turned-back query against keys turned forward on the CPU.
/// Int8 rings the same way, against the CPU's attention over their codes scaled back.
#[test]
fn ring_attention_matches_the_cpu_path() {
    let Some(gpu) = tiny::gpu() else { return };
    for quant in [KvQuant::None, KvQuant::Int8] {
        for (heads, capacity, head_dim, len, pinned) in [
            (4, 40, 128, 33, false),
            (2, 700, 16, 650, false),
            (2, 384, 64, 384, false),
            (4, 300, 128, 290, true),
        ] {
            let shape = (heads, capacity, head_dim, len);
            let diff = ring_attention_error(&gpu, shape, pinned, quant);
            assert!(
                diff < 0.02,
                "{quant:?} head_dim {head_dim}, {len} keys, pinned {pinned}: max |diff| {diff}"
            );
        }
    }
}

/// Rows 0 and 2 keep a pinned prefix (3 and 9 entries) that the window has slid 500 and 7
/// positions past; row 1 none.
const PREFIX_LENS: [u32; 3] = [3, 0, 9];
const PREFIX_SHIFTS: [u64; 3] = [500, 0, 7];

/// The largest difference between the GPU's attention and the CPU's over a random ring of
/// (heads, capacity, head_dim, filled entries), stored as `quant` says.
fn ring_attention_error(
    gpu: &Device,
    (heads, capacity, head_dim, len): (usize, usize, usize, usize),
    pinned: bool,
    quant: KvQuant,
) -> f32 {
    use duplex::model::decode::PinnedPrefix;
    use duplex::model::kv::{Attend, attention};
    use duplex::model::nn::{Rope, RopeTables};
    let rows = 3;
    let bf16 = |t: Tensor| t.to_dtype(DType::BF16).unwrap();
    let randn = |shape: (usize, usize, usize, usize)| {
        bf16(Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap())
    };
    let q = randn((rows, heads, 1, head_dim));
    let ring = random_ring((rows, heads, capacity, head_dim), quant);
    // Row 2 sees only its first 21 entries, so its later chunks are hidden whole.
    let mask: Vec<f32> = (0..rows * len)
        .map(|i| {
            if (i % len) % 5 == 3 || (i / len == 2 && i % len > 20) {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (rows, 1, 1, len), &Device::Cpu).unwrap();
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
    let rope = Rope::new(head_dim, 10_000.0);
    let lens = if pinned { PREFIX_LENS } else { [0; 3] };
    // The CPU turns each prefix key forward by its shift.
    let turn_keys: Vec<Vec<u64>> = (0..rows)
        .map(|b| {
            (0..len as u32)
                .map(|j| if j < lens[b] { PREFIX_SHIFTS[b] } else { 0 })
                .collect()
        })
        .collect();
    let (keys, values) = ring.entries(len).unwrap().values_in(DType::F32).unwrap();
    let keys = rope
        .tables(&turn_keys, DType::F32, &Device::Cpu)
        .unwrap()
        .apply(&keys)
        .unwrap();
    let want = attention(
        &f32_of(&q),
        &Attend {
            k: keys,
            v: values,
            mask: mask.clone(),
        },
    )
    .unwrap();
    let on_gpu = |t: &Tensor| t.to_device(gpu).unwrap();
    let shifts: Vec<Vec<u64>> = PREFIX_SHIFTS.iter().map(|&s| vec![s]).collect();
    let turn = rope.tables(&shifts, DType::F32, &Device::Cpu).unwrap();
    let (cos, sin) = turn.cos_sin();
    let prefix = PinnedPrefix {
        lens: on_gpu(&Tensor::new(&lens, &Device::Cpu).unwrap()),
        unturn: RopeTables::from_cos_sin(on_gpu(cos), on_gpu(&sin.neg().unwrap())),
    };
    let got =
        cuda::ring_attention(&on_gpu(&q), &ring_on(&ring, gpu), &on_gpu(&mask), &prefix).unwrap();
    tiny::max_abs_diff(&got, &want)
}

/// A ring of standard normal keys and values (bf16), or their int8 codes and scales.
fn random_ring(dims: (usize, usize, usize, usize), quant: KvQuant) -> KvRing {
    let randn = || Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap();
    let (k, v) = (randn(), randn());
    match quant {
        KvQuant::None => KvRing {
            k: k.to_dtype(DType::BF16).unwrap(),
            v: v.to_dtype(DType::BF16).unwrap(),
            scales: None,
        },
        KvQuant::Int8 => {
            let (k, k_scale) = quant::quantize_rows(&k).unwrap();
            let (v, v_scale) = quant::quantize_rows(&v).unwrap();
            KvRing {
                k,
                v,
                scales: Some([k_scale, v_scale]),
            }
        }
    }
}

/// A copy of `ring` on `device`.
fn ring_on(ring: &KvRing, device: &Device) -> KvRing {
    let to = |t: &Tensor| t.to_device(device).unwrap();
    KvRing {
        k: to(&ring.k),
        v: to(&ring.v),
        scales: ring.scales.as_ref().map(|[k, v]| [to(k), to(v)]),
    }
}

/// The int8 ring write (RoPE on the key, each entry quantised with its own scale) against
/// `decode::rope_kv_write`'s CPU reference from the same inputs, for the 7B model's heads and
/// the tiny model's (8 pairs: a block of one partly idle warp): codes within one step of each
/// other (rounding of products the GPU may fuse), the same scales, the same query, and every
/// other entry untouched.
#[test]
fn the_int8_ring_write_matches_the_cpu_reference() {
    use duplex::model::decode;
    use duplex::model::nn::Rope;
    let Some(gpu) = tiny::gpu() else { return };
    for (heads, head_dim) in [(4, 128), (2, 16)] {
        let (rows, capacity) = (3, 16);
        let qkv = Tensor::randn(0f32, 1.0, (rows, 1, 3 * heads * head_dim), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let ring = random_ring((rows, heads, capacity, head_dim), KvQuant::Int8);
        let gpu_ring = ring_on(&ring, &gpu);
        let write_idx = Tensor::new(&[5i64, -1, 15], &Device::Cpu).unwrap();
        let positions = vec![vec![7u64], vec![0], vec![3001]];
        let tables = Rope::new(head_dim, 10_000.0)
            .tables(&positions, DType::F32, &Device::Cpu)
            .unwrap();
        let want_q = decode::rope_kv_write(&qkv, &tables, &ring, &write_idx).unwrap();
        let (cos, sin) = tables.cos_sin();
        let on_gpu = |t: &Tensor| t.to_device(&gpu).unwrap();
        let q = cuda::rope_kv_write(
            &on_gpu(&qkv),
            &on_gpu(&cos.squeeze(1).unwrap()),
            &on_gpu(&sin.squeeze(1).unwrap()),
            &gpu_ring,
            &on_gpu(&write_idx),
        )
        .unwrap();
        assert!(tiny::max_abs_diff(&q, &want_q) < 0.05, "rotated query");
        let signed = |codes: &Tensor| -> Vec<i32> {
            let bytes: Vec<u8> = codes
                .to_device(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            bytes.iter().map(|&b| i32::from(b as i8)).collect()
        };
        for (got, want) in [(&gpu_ring.k, &ring.k), (&gpu_ring.v, &ring.v)] {
            let worst = signed(got)
                .iter()
                .zip(signed(want))
                .map(|(a, b)| (a - b).abs())
                .max();
            assert!(
                worst <= Some(1),
                "head_dim {head_dim}: codes differ by {worst:?}"
            );
        }
        let (Some(got), Some(want)) = (&gpu_ring.scales, &ring.scales) else {
            unreachable!("both rings are int8")
        };
        for (got, want) in got.iter().zip(want) {
            let diff = tiny::max_abs_diff(got, want);
            assert!(diff < 1e-6, "head_dim {head_dim}: scales differ by {diff}");
        }
    }
}

/// `cuda::write_and_attend` (one kernel, for steps attending one chunk: the depformer's) gives
/// what `rope_kv_write` then `ring_attention` give, output and ring, for bf16 and int8 rings,
/// with a pinned prefix, hidden keys and a row that writes nothing.
#[test]
fn the_one_kernel_write_and_attention_equals_the_two() {
    use duplex::model::decode::PinnedPrefix;
    use duplex::model::nn::{Rope, RopeTables};
    let Some(gpu) = tiny::gpu() else { return };
    let rows = 3;
    for quant in [KvQuant::None, KvQuant::Int8] {
        for (heads, capacity, head_dim, len) in [(16, 16, 64, 8), (4, 128, 128, 128)] {
            let ring = random_ring((rows, heads, capacity, head_dim), quant);
            let (two_ring, one_ring) = (ring_on(&ring, &gpu), ring_on(&ring, &gpu));
            let on_gpu = |t: &Tensor| t.to_device(&gpu).unwrap();
            let qkv = Tensor::randn(0f32, 1.0, (rows, 1, 3 * heads * head_dim), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            let write_idx = Tensor::new(&[len as i64 - 1, -1, 0], &Device::Cpu).unwrap();
            let rope = Rope::new(head_dim, 10_000.0);
            let positions: Vec<Vec<u64>> = vec![vec![len as u64 + 40], vec![7], vec![0]];
            let tables = rope.tables(&positions, DType::F32, &Device::Cpu).unwrap();
            let (cos, sin) = tables.cos_sin();
            let (cos, sin) = (
                on_gpu(&cos.squeeze(1).unwrap()),
                on_gpu(&sin.squeeze(1).unwrap()),
            );
            let mask: Vec<f32> = (0..rows * len)
                .map(|i| if i % 7 == 5 { f32::NEG_INFINITY } else { 0.0 })
                .collect();
            let mask = on_gpu(&Tensor::from_vec(mask, (rows, 1, 1, len), &Device::Cpu).unwrap());
            let shifts: Vec<Vec<u64>> = PREFIX_SHIFTS.iter().map(|&s| vec![s]).collect();
            let turn = rope.tables(&shifts, DType::F32, &Device::Cpu).unwrap();
            let (turn_cos, turn_sin) = turn.cos_sin();
            let prefix = PinnedPrefix {
                lens: on_gpu(&Tensor::new(&PREFIX_LENS, &Device::Cpu).unwrap()),
                unturn: RopeTables::from_cos_sin(
                    on_gpu(turn_cos),
                    on_gpu(&turn_sin.neg().unwrap()),
                ),
            };
            let (qkv, write_idx) = (on_gpu(&qkv), on_gpu(&write_idx));
            let q = cuda::rope_kv_write(&qkv, &cos, &sin, &two_ring, &write_idx).unwrap();
            let two = cuda::ring_attention(&q, &two_ring, &mask, &prefix).unwrap();
            let one =
                cuda::write_and_attend(&qkv, &cos, &sin, &one_ring, &write_idx, &mask, &prefix)
                    .unwrap();
            let diff = tiny::max_abs_diff(&one, &two);
            eprintln!("{quant:?} {heads}x{head_dim}, {len} entries: one kernel vs two {diff:e}");
            assert!(
                diff < 1e-2,
                "{quant:?} {heads}x{head_dim}: outputs differ by {diff}"
            );
            let parts = |r: &KvRing| {
                let mut parts = vec![r.k.clone(), r.v.clone()];
                parts.extend(r.scales.iter().flatten().cloned());
                parts
            };
            for (a, b) in parts(&one_ring).iter().zip(parts(&two_ring)) {
                assert_eq!(
                    tiny::max_abs_diff(a, &b),
                    0.0,
                    "{quant:?}: the rings differ"
                );
            }
        }
    }
}

#[test]
fn quantisation_on_the_gpu_gives_the_cpu_bytes() {
    let Some(gpu) = tiny::gpu() else { return };
    let weight = Tensor::randn(0f32, 0.05, (512, 768), &Device::Cpu).unwrap();
    let on_cpu = quant::quantize(&weight).unwrap();
    let on_gpu = quant::quantize(&weight.to_device(&gpu).unwrap()).unwrap();
    let bytes = |q: &quant::Int8Weight| -> Vec<u8> {
        let q = q.q.to_device(&Device::Cpu).unwrap();
        q.flatten_all().unwrap().to_vec1().unwrap()
    };
    assert_eq!(bytes(&on_cpu), bytes(&on_gpu));
    assert_eq!(tiny::max_abs_diff(&on_cpu.scale, &on_gpu.scale), 0.0);
}

/// `duplex tune`'s measurement on shapes with partial blocks, in every sublayer: every
/// candidate of every matrix and row bucket runs (the split-K ones with their norm, skip
/// connection or gate inside) and agrees with the built-in kernel composed with our separate
/// norm, add and gate (none is rejected); so does every attention launch over a bf16 and an
/// int8 ring with a partial last chunk; an excluded kernel or launch is recorded, not run.
#[test]
fn a_measured_plan_tries_every_candidate_and_each_agrees() {
    use duplex::model::decode::AttentionLaunch;
    use duplex::model::kernel_plan::attention::Ring;
    use duplex::model::kernel_plan::measure::{Measurement, measure};
    use duplex::model::kernel_plan::{Candidate, Kernel, Matrix, Sublayer, WeightKind};
    let Some(gpu) = tiny::gpu() else { return };
    let matrix = Matrix::new;
    let matrices = [
        matrix(WeightKind::Bf16, 771, 1040, Sublayer::Plain),
        matrix(WeightKind::Bf16, 772, 1040, Sublayer::NormGate),
        matrix(WeightKind::Int8, 771, 1040, Sublayer::Norm),
        matrix(WeightKind::Int8, 772, 1040, Sublayer::NormGate),
        matrix(WeightKind::Int8, 37, 4224, Sublayer::Skip),
        matrix(WeightKind::Bf16, 37, 4224, Sublayer::Skip),
    ];
    let rows = [1, 2, 4, 8, 64];
    let mut tried = Vec::new();
    let mut finished = 0;
    let mut trace = |trial: Option<(Candidate, &str, usize)>| match trial {
        Some((candidate, what, rows)) => tried.push((candidate, what.to_owned(), rows)),
        None => finished += 1,
    };
    let rings = [
        Ring::parse("bf16:4x64x300").unwrap(),
        Ring::parse("int8:3x128x257").unwrap(),
    ];
    let left_out = AttentionLaunch::parse("staged,32,128").unwrap();
    let excluded = [
        (
            Candidate::Product(Kernel::CublasOutIn),
            "left out".to_owned(),
        ),
        (Candidate::Attention(left_out), "left out".to_owned()),
    ];
    let measurement = Measurement {
        matrices: &matrices,
        rings: &rings,
        rows: &rows,
        excluded: &excluded,
        trace: &mut trace,
    };
    let plan = measure(&gpu, measurement, "test".into(), "this GPU".into()).unwrap();
    eprintln!("{}", plan.table());
    assert_eq!(plan.choices.len(), matrices.len() * rows.len());
    let mut expected_tries = 0;
    for choice in &plan.choices {
        let kernels: Vec<_> = choice.trials.iter().map(|t| t.kernel).collect();
        assert_eq!(kernels, choice.matrix.candidates(choice.rows));
        for trial in &choice.trials {
            let what = format!("{:?} at {} rows", choice.matrix, choice.rows);
            if trial.kernel == Kernel::CublasOutIn {
                assert_eq!(trial.rejected.as_deref(), Some("left out"), "{what}");
                continue;
            }
            expected_tries += 1;
            assert_eq!(trial.rejected, None, "{what}: {:?}", trial.kernel);
            assert!(trial.median_us.is_some_and(|us| us > 0.0), "{what}");
        }
    }
    assert_eq!(plan.attention.len(), rings.len() * rows.len());
    for choice in &plan.attention {
        let launches: Vec<_> = choice.trials.iter().map(|t| t.kernel).collect();
        assert_eq!(launches, AttentionLaunch::candidates());
        for trial in &choice.trials {
            let what = format!("{} at {} rows", choice.ring.label(), choice.rows);
            if trial.kernel == left_out {
                assert_eq!(trial.rejected.as_deref(), Some("left out"), "{what}");
                continue;
            }
            expected_tries += 1;
            assert_eq!(trial.rejected, None, "{what}: {}", trial.kernel.name());
            assert!(trial.median_us.is_some_and(|us| us > 0.0), "{what}");
        }
    }
    assert!(tried.contains(&(
        Candidate::Attention(AttentionLaunch::DEFAULT),
        "int8:3x128x257".to_owned(),
        64
    )));
    assert_eq!(tried.len(), expected_tries, "each trial announced once");
    assert_eq!(finished, expected_tries, "each trial's end announced once");
    let split_k_gated = plan.choices.iter().any(|c| {
        c.matrix.sublayer == Sublayer::NormGate
            && c.trials
                .iter()
                .any(|t| t.kernel == Kernel::SplitK && t.rejected.is_none())
    });
    assert!(
        split_k_gated,
        "the gate inside the split-K kernel was checked"
    );
}

/// Not a test: times one layer's decode attention over a full 7B ring (32 heads of 128, 3000
/// keys) with the kernels over a bf16 ring and an int8 one, and with candle's ops, in GB/s of
/// keys and values read (scales included), for the GPU benchmark notes. `--ignored --nocapture`
/// to run.
#[test]
#[ignore]
fn ring_attention_speed() {
    use duplex::model::kv::{Attend, attention};
    let Some(gpu) = tiny::gpu() else { return };
    let (heads, len, head_dim) = (32, 3000, 128);
    for rows in [1, 8, 32] {
        let randn = |shape: (usize, usize, usize, usize)| {
            Tensor::randn(0f32, 1.0, shape, &gpu)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap()
        };
        let q = randn((rows, heads, 1, head_dim));
        let ring = KvRing {
            k: randn((rows, heads, len, head_dim)),
            v: randn((rows, heads, len, head_dim)),
            scales: None,
        };
        let int8_ring = KvRing::zeros(
            (rows, heads, len, head_dim),
            DType::BF16,
            KvQuant::Int8,
            &gpu,
        )
        .unwrap();
        let mask = Tensor::zeros((rows, 1, 1, len), DType::F32, &gpu).unwrap();
        let time = |f: &dyn Fn() -> Tensor| mean_micros(&gpu, f);
        let bytes = (2 * rows * heads * len * head_dim * 2) as f64;
        let int8_bytes = (2 * rows * heads * len * (head_dim + 4)) as f64;
        let prefix = duplex::model::decode::PinnedPrefix::none(rows, head_dim, &gpu).unwrap();
        let kernels_us = time(&|| cuda::ring_attention(&q, &ring, &mask, &prefix).unwrap());
        let int8_us = time(&|| cuda::ring_attention(&q, &int8_ring, &mask, &prefix).unwrap());
        let attend = Attend {
            k: ring.k.clone(),
            v: ring.v.clone(),
            mask: mask.to_dtype(DType::BF16).unwrap(),
        };
        let candle_us = time(&|| attention(&q, &attend).unwrap());
        eprintln!(
            "rows {rows:>2}: kernels {kernels_us:>8.1} µs ({:.0} GB/s), int8 ring {int8_us:>8.1} µs ({:.0} GB/s), candle {candle_us:>8.1} µs ({:.0} GB/s)",
            bytes / kernels_us / 1e3,
            int8_bytes / int8_us / 1e3,
            bytes / candle_us / 1e3
        );
    }
}

/// The mean time of 20 calls of `f` on `gpu` after one warm-up call, in µs.
fn mean_micros(gpu: &Device, f: &dyn Fn() -> Tensor) -> f64 {
    f();
    gpu.synchronize().unwrap();
    let started = std::time::Instant::now();
    for _ in 0..20 {
        f();
    }
    gpu.synchronize().unwrap();
    started.elapsed().as_secs_f64() * 1e6 / 20.0
}
