//! `duplex bench loopback` through the model: WebRTC client peers on loopback talk to the
//! PersonaPlex engine (the tiny checkpoint, then random weights) and the report says what the
//! run did. Whether the CPU keeps real time is the benchmark's to measure, not these tests'.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn scratch(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-{name}-{}", std::process::id()))
}

/// Runs `duplex bench loopback` on the CPU with `args`.
fn loopback(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["bench", "loopback", "--device", "cpu"])
        .args(args)
        .env_remove("DUPLEX_DEVICE")
        .env_remove("DUPLEX_MODEL_DIR")
        .output()
        .unwrap()
}

/// The report of `duplex bench loopback --engine personaplex` with `args`, which must succeed.
fn model_report(name: &str, args: &[&str]) -> Value {
    let json = scratch(&format!("{name}.json"));
    let json_arg = json.to_str().unwrap();
    let ran = loopback(&[&["--engine", "personaplex", "--json", json_arg], args].concat());
    assert!(
        ran.status.success(),
        "bench loopback failed:\n{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

fn tiny_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .display()
        .to_string()
}

#[test]
fn two_sessions_through_the_tiny_model_are_counted_frame_by_frame() {
    let dir = tiny_dir();
    // Both sessions, whatever the warm-up on a busy test machine finds (`--overload`): the
    // report is under test here, the admission in the engine's unit tests.
    let args = [
        "--model-dir",
        &dir,
        "--sessions",
        "2",
        "--overload",
        "--seconds",
        "3",
    ];
    let report = model_report("tiny", &args);
    assert_eq!(report["engine"], "personaplex (tiny)");
    assert_eq!(report["sessions_connected"], 2);
    assert_eq!(report["sessions_admitted"], 2);
    assert_eq!(
        report["frames_total"], 75,
        "2 sessions × 3 s of 80 ms frames"
    );
    assert!(
        report["latency_ms"].is_null() && report["probes_sent"] == 0,
        "a model's answer is no echo to time: {report}"
    );
    let arrivals = &report["arrival_lateness_ms"];
    assert!(
        arrivals["count"].as_u64().unwrap() >= 270,
        "the agent's packets reached both clients for 3 s, 50 a second: {arrivals}"
    );
    let steps = &report["steps"];
    assert!(steps["ticks"].as_u64().unwrap() >= 30, "{steps}");
    assert!(steps["mean_ms"].as_f64().unwrap() > 0.0, "{steps}");
}

#[test]
fn random_weights_serve_a_session_without_a_checkpoint() {
    let report = model_report("random", &["--random-weights", "mid", "--seconds", "3"]);
    assert_eq!(report["engine"], "personaplex (random mid)");
    assert_eq!(report["sessions_connected"], 1);
    assert!(report["steps"]["ticks"].as_u64().unwrap() > 0, "{report}");
    // Far slower than real time on a CPU, so ticks are missed, and both sides of each lose its
    // frame: the run's loss is the worse side's, not their sum (151 % on one such run).
    let lost = |field: &str| report[field].as_f64().unwrap();
    assert!(
        lost("output_lost_percent") > 0.0
            && lost("dropped_percent")
                == lost("input_lost_percent").max(lost("output_lost_percent")),
        "{report}"
    );
}

#[test]
fn sessions_beyond_the_step_budget_are_refused_and_counted() {
    let dir = tiny_dir();
    // A 10 ms budget: on a CPU the warm-up's steps take longer, so the server admits one session
    // (at least one always) and refuses the rest as full.
    let args = [
        "--model-dir",
        &dir,
        "--sessions",
        "3",
        "--step-budget-ms",
        "10",
        "--seconds",
        "2",
    ];
    let report = model_report("budget", &args);
    let count = |field: &str| report[field].as_u64().unwrap();
    assert_eq!(
        count("sessions_connected")
            + count("sessions_refused_full")
            + count("sessions_refused_behind"),
        3,
        "{report}"
    );
    assert_eq!(
        count("sessions_refused_full"),
        3 - count("sessions_admitted"),
        "{report}"
    );
    assert!(count("sessions_admitted") >= 1, "{report}");
}

#[test]
fn a_step_budget_outside_the_frame_is_refused() {
    for budget in ["80", "5"] {
        let ran = loopback(&["--engine", "personaplex", "--step-budget-ms", budget]);
        let stderr = String::from_utf8_lossy(&ran.stderr);
        assert!(!ran.status.success());
        assert!(
            stderr.contains("--step-budget-ms") && stderr.contains("10..=75"),
            "{stderr}"
        );
    }
}

#[test]
fn random_weights_need_the_model_engine_and_a_known_preset() {
    let echo = loopback(&["--random-weights", "mid"]);
    assert!(!echo.status.success());
    assert!(
        String::from_utf8_lossy(&echo.stderr).contains("add --engine personaplex"),
        "{}",
        String::from_utf8_lossy(&echo.stderr)
    );
    let unknown = loopback(&["--engine", "personaplex", "--random-weights", "huge"]);
    assert!(!unknown.status.success());
    assert!(
        String::from_utf8_lossy(&unknown.stderr)
            .contains("unknown config \"huge\"; presets: personaplex-7b, moshiko, mid"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
}

/// The report of `duplex bench loopback` (the echo engine) with `args`, which must succeed.
fn echo_report(name: &str, args: &[&str]) -> Value {
    let json = scratch(&format!("{name}.json"));
    let ran = loopback(&[&["--json", json.to_str().unwrap()], args].concat());
    assert!(
        ran.status.success(),
        "bench loopback failed:\n{}",
        String::from_utf8_lossy(&ran.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
}

fn outcomes(report: &Value) -> Vec<String> {
    report["joins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|join| join["outcome"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn callers_arriving_over_time_are_timed_from_their_own_first_packet() {
    let args = [
        "--sessions",
        "3",
        "--join-every-ms",
        "600",
        "--seconds",
        "4",
    ];
    let report = echo_report("arrivals-echo", &args);
    assert_eq!(report["join_every_seconds"], 0.6, "{report}");
    assert_eq!(outcomes(&report), ["admitted"; 3], "{report}");
    let joins = report["joins"].as_array().unwrap();
    for (idx, join) in joins.iter().enumerate() {
        let at = join["at_seconds"].as_f64().unwrap();
        assert!(at >= 0.6 * idx as f64, "join {idx} at {at} s: {report}");
        assert_eq!(join["sessions_in"], idx + 1, "{report}");
    }
    // Later callers talk for less of the run: fewer frames than three whole sessions.
    let frames = report["frames_total"].as_u64().unwrap();
    assert!(frames < 3 * 50 && frames > 50, "{frames} frames: {report}");
    // Each caller's probes are looked for where it sent them: a late joiner's are found too.
    let sent = report["probes_sent"].as_u64().unwrap();
    let found = report["probes_found"].as_u64().unwrap();
    assert!(sent >= 6, "{report}");
    assert!(
        found * 10 >= sent * 9,
        "{found} of {sent} probes found: {report}"
    );
}

#[test]
fn callers_arriving_after_the_server_is_full_are_refused_one_by_one() {
    let dir = tiny_dir();
    // The 10 ms budget admits one session on a CPU (at least one always): the rest are full.
    let args = [
        "--model-dir",
        &dir,
        "--sessions",
        "3",
        "--step-budget-ms",
        "10",
        "--join-every-ms",
        "300",
        "--seconds",
        "3",
    ];
    let report = model_report("arrivals-full", &args);
    let admitted = report["sessions_admitted"].as_u64().unwrap() as usize;
    let outcomes = outcomes(&report);
    assert_eq!(outcomes.len(), 3, "{report}");
    let connected = report["sessions_connected"].as_u64().unwrap() as usize;
    assert!(connected >= 1 && connected <= admitted, "{report}");
    assert!(
        outcomes[..connected].iter().all(|o| o == "admitted"),
        "{report}"
    );
    assert!(
        outcomes[connected..]
            .iter()
            .all(|o| o.starts_with("refused_")),
        "{report}"
    );
    let refused = |reason: &str| outcomes.iter().filter(|o| *o == reason).count() as u64;
    assert_eq!(
        refused("refused_full"),
        report["sessions_refused_full"],
        "{report}"
    );
    assert_eq!(
        refused("refused_behind"),
        report["sessions_refused_behind"],
        "{report}"
    );
}

#[test]
fn a_join_interval_outside_its_range_is_refused() {
    let ran = loopback(&["--join-every-ms", "5"]);
    let stderr = String::from_utf8_lossy(&ran.stderr);
    assert!(!ran.status.success());
    assert!(stderr.contains("--join-every-ms"), "{stderr}");
}
