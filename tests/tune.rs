//! `duplex tune` where it cannot measure: a build or machine without a GPU, and bad requests,
//! each a clear error and a non-zero exit. (On a GPU, `tests/kernels.rs` checks the measurement.)

use std::process::{Command, Output};

fn tune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_duplex"))
        .arg("tune")
        .args(args)
        .env("HOME", env!("CARGO_TARGET_TMPDIR"))
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn without_a_gpu_it_says_why_and_measures_nothing() {
    if !duplex::doctor::gpu::probe().devices.is_empty() && cfg!(feature = "cuda") {
        eprintln!("this machine has a GPU and the build CUDA: tests/kernels.rs measures");
        return;
    }
    let output = tune(&["--config", "mid", "--quant", "int8"]);
    assert!(!output.status.success());
    let why = stderr(&output);
    let expected = if cfg!(feature = "cuda") {
        "no CUDA GPU"
    } else {
        "this build has no CUDA support"
    };
    assert!(why.contains(expected), "{why}");
    let kept = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(".cache/duplex/kernels");
    assert!(!kept.exists(), "a plan was kept at {}", kept.display());
}

/// Runs `duplex tune` with `args` and checks it exits with `code` naming `why`.
fn refused(args: &[&str], code: i32, why: &str) {
    let output = tune(args);
    assert_eq!(output.status.code(), Some(code), "{args:?}");
    assert!(
        stderr(&output).contains(why),
        "{args:?}: {}",
        stderr(&output)
    );
}

#[test]
fn bad_matrices_rings_kernels_rows_and_presets_are_named() {
    let bad_matrix = ["--matrices", "int8:4096x4096:norm,fp8:1x2:plain"];
    refused(&bad_matrix, 2, "\"fp8:1x2:plain\" is not a matrix");
    refused(
        &["--exclude", "split-k,cutlass"],
        2,
        "\"cutlass\" is not a kernel",
    );
    refused(
        &[
            "--exclude",
            "attention-staged-64-128,attention-staged-512-128",
        ],
        2,
        "\"attention-staged-512-128\" is not an attention launch",
    );
    refused(
        &["--rings", "bf16:32x128x3000,fp8:32x128x3000"],
        2,
        "\"fp8:32x128x3000\" is not a ring",
    );
    refused(&["--rows", "1,0"], 2, "--rows");
    refused(&["--config", "gpt-9"], 1, "unknown config \"gpt-9\"");
}
