//! Our CUDA kernels' own source, run on the CPU: `tests/emu/` emulates the part of CUDA they use
//! (threads of a block as fibers, barriers and warp shuffles as scheduling points, guarded
//! device buffers) and checks each kernel against a double-precision reference of its
//! documented contract. This catches indexing, synchronisation and arithmetic mistakes on any
//! machine, before a GPU is at hand; speed and the GPU's own rounding still need one
//! (`tests/kernels.rs`). Needs a C++20 compiler (`g++`, from `bash .ci/setup test`; or `CXX`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles `tests/emu/{name}.cpp` with the kernels on its include path and runs it; panics
/// with its output unless every check passed.
fn run_emulated(name: &str) {
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "g++".into());
    let binary = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("emu-{name}"));
    let source = root().join("tests/emu").join(format!("{name}.cpp"));
    let compiled = Command::new(&compiler)
        .args(["-std=c++20", "-O2", "-Wall", "-Wno-unknown-pragmas"])
        .arg("-I")
        .arg(root().join("tests/emu/include"))
        .arg("-I")
        .arg(root().join("kernels"))
        .arg(&source)
        .arg("-o")
        .arg(&binary)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run the C++ compiler {compiler:?} ({e}): `bash .ci/setup test`")
        });
    assert!(
        compiled.status.success(),
        "{} does not compile:\n{}",
        source.display(),
        String::from_utf8_lossy(&compiled.stderr)
    );
    // Threads and blocks first to last, then last to first: a kernel that passes only one way
    // reads what another thread or block writes without a barrier between them.
    for order in ["forward", "reverse"] {
        let ran = Command::new(&binary)
            .env("EMU_ORDER", order)
            .output()
            .expect("the emulated test runs");
        let report = String::from_utf8_lossy(&ran.stdout);
        eprintln!("{order}: {report}");
        assert!(
            ran.status.success(),
            "{name}, threads and blocks run {order}: a kernel failed its check ({}):\n{report}\n{}",
            ran.status,
            String::from_utf8_lossy(&ran.stderr)
        );
    }
}

/// `kernels/attention.cu`: RoPE with the ring write (bf16 and int8 rings) and attention over
/// the filled part of the ring, with hidden chunks and pinned prefixes.
#[test]
fn attention_kernels_meet_their_references_on_the_emulator() {
    run_emulated("attention");
}

/// `kernels/gemv.cu`: the split-K products, int8 and bf16 weights, 1 to 4 rows, with and
/// without the fused pre-norm and skip connection.
#[test]
fn split_k_products_meet_their_references_on_the_emulator() {
    run_emulated("gemv");
}

/// `kernels/w8a16.cu`: the int8 matrix-vector kernel for 1 to 64 rows, and the tensor-core one
/// (wmma emulated by `tests/emu/include/mma.h`) for 1 to 100 rows.
#[test]
fn w8a16_products_meet_their_references_on_the_emulator() {
    run_emulated("w8a16");
}

/// `kernels/norm.cu`: RMSNorm and the SwiGLU gate.
#[test]
fn norm_and_swiglu_meet_their_references_on_the_emulator() {
    run_emulated("norm");
}

/// `kernels/conv.cu`: Mimi's streaming conv input (context, ELU, im2col layout, the context's
/// update in place) and the bias and skip connection after its product.
#[test]
fn streaming_conv_kernels_meet_their_references_on_the_emulator() {
    run_emulated("conv");
}

/// `kernels/sampling.cu`: temperature and top-k draws with the counter-based random numbers,
/// greedy, ties and partial blocks.
#[test]
fn device_sampling_draws_the_reference_tokens_on_the_emulator() {
    run_emulated("sampling");
}

/// The body of each `__global__` function in `source`, named by the text before its parameter
/// list (a macro's entry points included).
fn kernel_bodies(source: &str) -> Vec<(String, String)> {
    let mut bodies = Vec::new();
    let mut rest = source;
    while let Some(at) = rest.find("__global__") {
        let signature = &rest[at..];
        let open = signature.find('{').expect("a kernel has a body");
        let name = signature[..signature.find('(').expect("a parameter list")].to_owned();
        let mut depth = 0;
        let body_end = signature[open..]
            .char_indices()
            .find_map(|(i, c)| {
                depth += match c {
                    '{' => 1,
                    '}' => -1,
                    _ => 0,
                };
                (depth == 0).then_some(open + i)
            })
            .expect("a kernel's braces balance");
        bodies.push((name, signature[open + 1..body_end].to_owned()));
        rest = &signature[body_end..];
    }
    bodies
}

/// Graphs may let a kernel of ours start while the one before it finishes (`DUPLEX_PDL=1`), so
/// each must wait for it (`grid_dependency_sync`, kernels/common.cuh) before it reads or writes
/// anything but weights: first thing, after nothing but prefetches.
#[test]
fn every_kernel_waits_for_the_kernel_before_it_first() {
    let mut kernels = 0;
    for entry in std::fs::read_dir(root().join("kernels")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "cu" && e != "cuh") {
            continue;
        }
        let source: String = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|line| line.split("//").next().unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        for (name, body) in kernel_bodies(&source) {
            kernels += 1;
            let before = body
                .split_once("grid_dependency_sync();")
                .map(|(before, _)| before)
                .unwrap_or_else(|| panic!("{}: {name} never waits", path.display()));
            let before: Vec<String> = before
                .split(';')
                .map(|statement| statement.replace('\\', " ").trim().to_owned())
                .filter(|statement| !statement.is_empty())
                .collect();
            let is_prefetch_call = |statement: &String| {
                let callee = statement.split('(').next().unwrap().trim();
                let is_name = callee
                    .chars()
                    .all(|c| c.is_alphanumeric() || "_<>:".contains(c));
                is_name && callee.contains("prefetch") && statement.ends_with(')')
            };
            assert!(
                before.iter().all(is_prefetch_call),
                "{}: {name} runs {before:?} before it waits",
                path.display()
            );
        }
    }
    assert!(kernels >= 13, "found only {kernels} kernels");
}
