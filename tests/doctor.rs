//! `duplex doctor` on this machine: a valid JSON report, a GPU that is absent reported as such,
//! failures that stop a deployment turned into a non-zero exit, and the weights found in a
//! directory laid out like the Hugging Face cache (no network).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn doctor(args: &[&str], envs: &[(&str, &Path)]) -> (Output, serde_json::Value) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_duplex"));
    command
        .arg("doctor")
        .arg("--json")
        .args(args)
        .env_remove("DUPLEX_MODEL_DIR");
    for (key, value) in envs {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed invalid JSON ({e}):\n{}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    (output, report)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn empty_hf_home() -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("hf-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn check<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no {name} check"))
}

#[test]
fn the_report_is_valid_json_with_every_section() {
    let port = free_port().to_string();
    let (output, report) = doctor(
        &["--host", "127.0.0.1", "--port", &port],
        &[("HF_HOME", &empty_hf_home())],
    );
    for key in [
        "system", "gpu", "binary", "weights", "audio", "ports", "checks",
    ] {
        assert!(report.get(key).is_some(), "missing {key}");
    }
    assert!(report["system"]["cores"].as_u64().unwrap() >= 1);
    assert!(report["system"]["memory_bytes"].as_u64().unwrap() > 0);
    let gpu = &report["gpu"];
    if gpu["devices"].as_array().unwrap().is_empty() {
        assert!(gpu["problem"].as_str().unwrap().contains("driver"), "{gpu}");
        assert_eq!(check(&report, "gpu")["status"], "warn");
        assert!(
            check(&report, "gpu")["fix"]
                .as_str()
                .unwrap()
                .contains("NVIDIA driver")
        );
    }
    assert_eq!(report["binary"]["cuda"], cfg!(feature = "cuda"));
    assert_eq!(
        check(&report, "weights")["status"],
        "warn",
        "no weights: warn, echo still serves"
    );
    assert!(
        check(&report, "weights")["fix"]
            .as_str()
            .unwrap()
            .contains("duplex fetch")
    );
    assert_eq!(report["ok"], true);
    assert!(output.status.success());
}

#[test]
fn a_busy_port_fails_with_the_fix_and_a_non_zero_exit() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let (output, report) = doctor(
        &["--host", "127.0.0.1", "--port", &port],
        &[("HF_HOME", &empty_hf_home())],
    );
    assert_eq!(report["ok"], false);
    let http = check(&report, "http port");
    assert_eq!(http["status"], "fail");
    assert!(http["fix"].as_str().unwrap().contains("--port"));
    assert_eq!(output.status.code(), Some(1));
    drop(listener);
}

#[test]
fn weights_are_found_in_a_hub_cache_layout() {
    let hf_home =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("hf-home-{}", std::process::id()));
    let snapshot = hf_home.join("hub/models--nvidia--personaplex-7b-v1/snapshots/0123abcd");
    std::fs::create_dir_all(snapshot.join("voices")).unwrap();
    std::fs::create_dir_all(hf_home.join("hub/models--nvidia--personaplex-7b-v1/refs")).unwrap();
    std::fs::write(
        hf_home.join("hub/models--nvidia--personaplex-7b-v1/refs/main"),
        "0123abcd",
    )
    .unwrap();
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny");
    for file in [
        "model.safetensors",
        "tokenizer-e351c8d8-checkpoint125.safetensors",
        "tokenizer_spm_32k_3.model",
        "voices/NATF0.pt",
    ] {
        std::fs::copy(tiny.join(file), snapshot.join(file)).unwrap();
    }
    let port = free_port().to_string();
    let (_, report) = doctor(
        &["--host", "127.0.0.1", "--port", &port],
        &[("HF_HOME", &hf_home)],
    );
    assert_eq!(
        check(&report, "weights")["status"],
        "ok",
        "{}",
        check(&report, "weights")
    );
    assert!(
        report["weights"]["dir"]
            .as_str()
            .unwrap()
            .ends_with("snapshots/0123abcd")
    );
    assert_eq!(report["weights"]["voices"], serde_json::json!(["NATF0"]));
}

#[test]
fn udp_ranges_with_busy_ports_are_reported() {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let busy = socket.local_addr().unwrap().port();
    let range = format!("{busy}-{}", busy + 2);
    let port = free_port().to_string();
    let (_, report) = doctor(
        &[
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--udp-ports",
            &range,
        ],
        &[("HF_HOME", &empty_hf_home())],
    );
    assert_eq!(report["ports"]["udp_busy"], serde_json::json!([busy]));
    assert_eq!(check(&report, "udp ports")["status"], "warn");
}
