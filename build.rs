//! With the `cuda` feature: compiles `kernels/*.cu` to PTX for `CUDA_COMPUTE_CAP` with nvcc (from
//! `CUDA_HOME`, `CUDA_PATH` or `PATH`) and records the target in the binary for `duplex doctor`.
//! The default (CPU) build needs no CUDA tool at all.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| {
        panic!("the cuda feature needs CUDA_COMPUTE_CAP (e.g. 90 for H100, 121 for DGX Spark's GB10, 80 for A100)")
    });
    let cap = cap.trim().trim_start_matches("sm_").to_owned();
    let nvcc = nvcc();
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for entry in std::fs::read_dir("kernels").expect("kernels/ is part of the source") {
        let path = entry.expect("kernels/ is readable").path();
        if path.extension().is_some_and(|e| e == "cu") {
            compile(&nvcc, &path, &cap, &out);
        }
    }
    println!("cargo:rustc-env=DUPLEX_CUDA_ARCHS=sm_{cap}");
    if let Some(version) = nvcc_version(&nvcc) {
        println!("cargo:rustc-env=DUPLEX_CUDA_VERSION={version}");
    }
}

fn nvcc() -> PathBuf {
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let candidate = Path::new(&home).join("bin").join("nvcc");
            if candidate.exists() {
                return candidate;
            }
        }
    }
    PathBuf::from("nvcc")
}

fn compile(nvcc: &Path, source: &Path, cap: &str, out: &Path) {
    let stem = source
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("kernel names are UTF-8");
    let ptx = out.join(format!("{stem}.ptx"));
    let output = Command::new(nvcc)
        .args([
            "-ptx",
            "-O3",
            "-std=c++17",
            &format!("-arch=compute_{cap}"),
            "-Ikernels",
        ])
        .arg(source)
        .arg("-o")
        .arg(&ptx)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {} failed ({e}): install the CUDA toolkit or set CUDA_HOME",
                nvcc.display()
            )
        });
    if !output.status.success() {
        panic!(
            "nvcc failed on {}:\n{}",
            source.display(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

fn nvcc_version(nvcc: &Path) -> Option<String> {
    let output = Command::new(nvcc).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let release = text.split("release ").nth(1)?;
    Some(release.split(',').next()?.trim().to_owned())
}
