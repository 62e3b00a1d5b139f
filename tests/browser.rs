//! Headless Chromium drives the web page against the real `duplex serve` binary: it opens the
//! page, connects with a fake microphone playing espeak-ng speech, and must reach the connected
//! state and play non-silent agent audio. Server and browser run in a network namespace with
//! only loopback up (when the machine allows it), so nothing leaves the machine.
//!
//! Needs Chromium, espeak-ng, sox and the Node packages: `bash .ci/setup test`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// espeak-ng speech at 48 kHz mono for Chromium's fake microphone.
fn speech_wav(dir: &Path) -> PathBuf {
    let raw = dir.join("say.wav");
    let out = dir.join("say48k.wav");
    let text = "Hello there. This is the browser test of the duplex voice agent. One, two, three.";
    let spoke = Command::new("espeak-ng")
        .args(["-v", "en-us", "-s", "150", "-w"])
        .arg(&raw)
        .arg(text)
        .status();
    assert!(
        spoke.is_ok_and(|s| s.success()),
        "espeak-ng failed or is missing: run `bash .ci/setup test`"
    );
    // Half a second of lead-in silence, then the sentence; Chromium loops the file.
    let converted = Command::new("sox")
        .args(["-R", "-D"])
        .arg(&raw)
        .args(["-r", "48000", "-c", "1", "-b", "16"])
        .arg(&out)
        .args(["pad", "0.5", "0.5"])
        .status();
    assert!(
        converted.is_ok_and(|s| s.success()),
        "sox failed or is missing: run `bash .ci/setup test`"
    );
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Whether this machine lets us make a network namespace (root, or unprivileged user namespaces).
fn can_isolate() -> bool {
    Command::new("unshare")
        .args(["-rn", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// What runs beside the server in the page's network namespace.
struct Scenario<'a> {
    name: &'a str,
    /// Shell lines run before the server starts.
    setup: &'a str,
    /// More `duplex serve` arguments.
    serve_args: &'a str,
    /// More arguments of the browser script (`e2e.mjs`).
    page_args: &'a str,
}

/// Runs the page against `duplex serve` and returns the browser script's report, once both
/// ended well and the agent's audio was heard.
fn run_page(scenario: Scenario) -> Option<serde_json::Value> {
    if std::env::var_os("DUPLEX_SKIP_BROWSER").is_some() {
        eprintln!("browser test skipped: DUPLEX_SKIP_BROWSER is set");
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        chromium().exists(),
        "{} not found: run `bash .ci/setup test`",
        chromium().display()
    );
    assert!(
        root.join("tests/browser/node_modules/playwright-core")
            .exists(),
        "Node packages missing: run `bash .ci/setup test`"
    );
    let dir = common::scratch_dir(scenario.name);
    let wav = speech_wav(&dir);
    let screenshot = dir.join("browser.png");
    let port = free_port();
    let script = format!(
        r#"ip link set lo up 2>/dev/null
{setup}
"{duplex}" serve --host 127.0.0.1 --port {port} --max-sessions 2 {serve_args} &
server=$!
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && break; sleep 0.1; done
node "{e2e}" --url http://127.0.0.1:{port}/ --wav "{wav}" --screenshot "{shot}" --timeout-ms 40000 {page_args}
status=$?
kill -TERM $server
wait $server
server_status=$?
echo "server exit: $server_status" >&2
[ $status -eq 0 ] && [ $server_status -eq 0 ]
"#,
        setup = scenario.setup,
        serve_args = scenario.serve_args,
        page_args = scenario.page_args,
        duplex = env!("CARGO_BIN_EXE_duplex"),
        e2e = root.join("tests/browser/e2e.mjs").display(),
        wav = wav.display(),
        shot = screenshot.display(),
    );
    let isolated = can_isolate();
    if !isolated {
        eprintln!("no network namespace available here: running on the host's loopback instead");
    }
    let mut command = if isolated {
        Command::new("unshare")
    } else {
        Command::new("bash")
    };
    if isolated {
        command.args(["-rn", "bash"]);
    }
    let output = command
        .arg("-c")
        .arg(&script)
        .env("CHROMIUM", chromium())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("screenshot: {}", screenshot.display());
    let report = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    let Some(report) = report else {
        panic!("no report from the browser script\nstdout:\n{stdout}\nstderr:\n{stderr}");
    };
    eprintln!("browser report: {report}");
    assert_eq!(
        report["ok"], true,
        "browser check failed: {report}\nstderr:\n{stderr}"
    );
    assert!(
        report["inboundAudioEnergy"].as_f64().unwrap_or(0.0) > 1e-4,
        "{report}"
    );
    assert!(
        output.status.success(),
        "server or browser exited badly\nstderr:\n{stderr}"
    );
    assert!(screenshot.exists(), "no screenshot was written");
    Some(report)
}

#[test]
fn the_page_connects_and_plays_the_agents_audio() {
    let report = run_page(Scenario {
        name: "browser",
        setup: "",
        serve_args: "",
        page_args: "",
    });
    if let Some(report) = report {
        assert_eq!(report["link"]["localCandidateType"], "host", "{report}");
        let hang_ups = report["hangUps"].as_array().expect("the page's DELETEs");
        assert_eq!(hang_ups.len(), 1, "{report}");
        let path = hang_ups[0]["path"].as_str().unwrap();
        let key = path.strip_prefix("/api/sessions/").unwrap_or("");
        assert_eq!(key.len(), 32, "the page hangs up on its resource: {report}");
        assert_eq!(hang_ups[0]["status"], 204, "{report}");
    }
}

/// A network change makes the page restart ICE; the server answers it on the same session and
/// the agent's audio goes on, for longer than a broken path would last (the server gives up on
/// a silent peer after 1 + 2 s here).
#[test]
fn the_page_restarts_ice_and_the_call_goes_on() {
    let report = run_page(Scenario {
        name: "browser-restart",
        setup: "",
        serve_args: "--ice-disconnected-secs 1 --ice-failed-secs 2",
        page_args: "--restart-ice yes",
    });
    if let Some(report) = report {
        let restart = &report["restart"];
        assert_eq!(restart["iceRestarts"], 1, "{report}");
        assert_eq!(restart["lastIceRestart"], "answered", "{report}");
        assert_eq!(restart["session"], report["session"], "{report}");
        assert!(
            restart["packetsAfter"].as_u64() > restart["packetsBefore"].as_u64(),
            "{report}"
        );
    }
}

/// The page takes the server's TURN server from `/api/ice`: with `--ice-relay-only` the
/// browser and the server each reach the other only through relays of a coturn on loopback.
#[test]
fn the_page_talks_through_the_servers_turn_server() {
    let turn_port = free_port();
    let setup = format!(
        r#"turnserver -n --no-cli --no-tls --no-dtls --no-tcp --listening-ip=127.0.0.1 --relay-ip=127.0.0.1 \
  --listening-port={turn_port} --min-port=30000 --max-port=30099 --lt-cred-mech --realm=duplex \
  --allow-loopback-peers --user=duplex:page-secret --userdb=/tmp/duplex-turndb-{turn_port} \
  --pidfile=/tmp/duplex-turn-{turn_port}.pid --log-file=stdout --simple-log >/dev/null 2>&1 &
turn=$!
trap 'kill $turn 2>/dev/null' EXIT
for _ in $(seq 50); do ss -Hlun "sport = :{turn_port}" | grep -q . && break; sleep 0.1; done
ss -Hlun "sport = :{turn_port}" | grep -q . || {{ echo "turnserver did not start: run bash .ci/setup test" >&2; exit 1; }}"#
    );
    let serve_args = format!(
        "--ice-server turn:127.0.0.1:{turn_port} --ice-username duplex --ice-credential page-secret --ice-relay-only"
    );
    let report = run_page(Scenario {
        name: "browser-turn",
        setup: &setup,
        serve_args: &serve_args,
        page_args: "",
    });
    if let Some(report) = report {
        assert_eq!(report["link"]["localCandidateType"], "relay", "{report}");
        assert_eq!(report["link"]["remoteCandidateType"], "relay", "{report}");
    }
}
