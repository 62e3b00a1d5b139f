//! Calls through a real TURN server (coturn's `turnserver`, on loopback): the server's peers
//! gather relay candidates from it, a relay-only call carries its audio through it both ways,
//! and a TURN server that refuses the server's credentials gets a clear refusal, not an answer
//! no client can reach.

mod common;

use common::{ServerOptions, TestServer, speech};
use duplex::audio::SAMPLE_RATE;
use duplex::bench::client::{ClientOptions, ClientPeer, Refused};
use duplex::gateway::ice::{self, IceConfig, TurnAuth};
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::ops::RangeInclusive;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const USER: &str = "duplex";
const PASSWORD: &str = "turn-password";
const SHARED_SECRET: &str = "shared-with-coturn";

/// How coturn checks credentials.
enum Credentials {
    /// One long-term user, `USER` with `PASSWORD`.
    LongTerm,
    /// The TURN REST scheme: usernames carry their expiry, credentials are their HMAC under
    /// `SHARED_SECRET`.
    Secret,
}

/// A coturn process on 127.0.0.1 with one long-term user, relaying between loopback peers.
struct Coturn {
    child: Child,
    port: u16,
    relay_ports: RangeInclusive<u16>,
}

impl Coturn {
    fn start(credentials: Credentials) -> Self {
        let binary = std::env::var("TURNSERVER").unwrap_or_else(|_| "turnserver".into());
        let port = free_udp_port();
        // Relay ports from a block the OS hands out rarely; coturn binds them on demand.
        let first_relay = 20_000 + (port % 200) * 50;
        let relay_ports = first_relay..=first_relay + 49;
        let dir = common::scratch_dir("turn");
        let child = Command::new(&binary)
            .args(["-n", "--no-cli", "--no-tls", "--no-dtls", "--no-tcp"])
            .args(["--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1"])
            .arg(format!("--listening-port={port}"))
            .arg(format!("--min-port={}", relay_ports.start()))
            .arg(format!("--max-port={}", relay_ports.end()))
            .args(["--realm=duplex", "--allow-loopback-peers"])
            .args(match credentials {
                Credentials::LongTerm => [
                    "--lt-cred-mech".to_owned(),
                    format!("--user={USER}:{PASSWORD}"),
                ],
                Credentials::Secret => [
                    "--use-auth-secret".to_owned(),
                    format!("--static-auth-secret={SHARED_SECRET}"),
                ],
            })
            .arg(format!("--pidfile={}", dir.join("turn.pid").display()))
            .arg(format!("--userdb={}", dir.join("turndb").display()))
            .args(["--log-file=stdout", "--simple-log"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot start {binary} ({err}): run `bash .ci/setup test` (Debian's coturn)")
            });
        let mut turn = Self {
            child,
            port,
            relay_ports,
        };
        turn.drain_log();
        turn.wait_until_it_answers();
        turn
    }

    fn url(&self) -> String {
        format!("turn:127.0.0.1:{}", self.port)
    }

    fn ice(&self, password: &str, relay_only: bool) -> IceConfig {
        IceConfig::new(vec![self.url()], turn_user(password), relay_only).unwrap()
    }

    /// Keeps coturn's pipe from filling; its log goes to the test's stderr at debug level.
    fn drain_log(&mut self) {
        let stdout = self.child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                tracing::debug!(target: "coturn", "{line}");
            }
        });
    }

    /// Sends STUN binding requests until one is answered.
    fn wait_until_it_answers(&mut self) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
        request.extend_from_slice(b"duplex-test!");
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut reply = [0u8; 512];
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("turnserver exited at start: {status}");
            }
            socket.send_to(&request, ("127.0.0.1", self.port)).unwrap();
            if let Ok((len, _)) = socket.recv_from(&mut reply)
                && len >= 20
                && reply[..2] == [0x01, 0x01]
            {
                return;
            }
        }
        panic!("turnserver did not answer STUN on port {}", self.port);
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The long-term TURN user coturn knows.
fn turn_user(password: &str) -> TurnAuth {
    TurnAuth::Fixed {
        username: USER.into(),
        credential: password.into(),
    }
}

/// A test server (the echo engine) whose peers gather with `ice`.
async fn server_with(ice: IceConfig) -> TestServer {
    TestServer::start(ServerOptions {
        ice,
        ..Default::default()
    })
    .await
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Each candidate's type and port, through the server's own reading of an SDP; every
/// candidate line must be one it reads.
fn candidates(sdp: &str) -> Vec<(String, u16)> {
    let read: Vec<(String, u16)> = ice::candidates(sdp)
        .map(|candidate| (candidate.kind.to_owned(), candidate.port))
        .collect();
    assert_eq!(read.len(), sdp.matches("a=candidate:").count(), "{sdp}");
    read
}

/// Plays a sentence and checks that its echo comes back, whatever path the call took.
async fn assert_the_echo_comes_back(client: &mut ClientPeer) {
    let sent = speech(SENTENCE, 2.0);
    client.play(&sent).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (correlation, _) = common::echo_correlation(&sent, &client.recording().pcm, SAMPLE_RATE);
    assert!(correlation > 0.7, "correlation {correlation}");
}

const SENTENCE: &str = "This call goes through a relay on both sides and still comes back.";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_only_call_carries_its_audio_through_the_turn_server() {
    let turn = Coturn::start(Credentials::LongTerm);
    let server = server_with(turn.ice(PASSWORD, true)).await;

    let mut client = ClientPeer::connect(ClientOptions {
        base_url: server.base_url.clone(),
        ice: turn.ice(PASSWORD, true),
        ..Default::default()
    })
    .await
    .expect("a relay-only client reaches a relay-only server through TURN");
    let offered = candidates(&client.answer_sdp);
    assert!(!offered.is_empty(), "{}", client.answer_sdp);
    for (kind, port) in &offered {
        assert_eq!(kind, "relay", "{}", client.answer_sdp);
        assert!(
            turn.relay_ports.contains(port),
            "the relay port {port} is not one of coturn's"
        );
    }

    let sent = speech(SENTENCE, 3.0);
    client.play(&sent).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (correlation, round_trip_ms) =
        common::echo_correlation(&sent, &client.recording().pcm, SAMPLE_RATE);
    eprintln!("through TURN: echo correlation {correlation:.3} at {round_trip_ms:.0} ms");
    assert!(correlation > 0.7, "correlation {correlation}");

    client.close().await.unwrap();
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_server_that_refuses_the_credentials_gets_a_clear_502() {
    let turn = Coturn::start(Credentials::LongTerm);
    let server = server_with(turn.ice("wrong-password", true)).await;
    let started = Instant::now();
    let err = ClientPeer::connect(ClientOptions {
        base_url: server.base_url.clone(),
        ..Default::default()
    })
    .await
    .err()
    .expect("no call without a relay address");
    let refused = err
        .downcast_ref::<Refused>()
        .unwrap_or_else(|| panic!("not a refusal: {err:#}"));
    // The deployment's fault, which retrying does not mend: no "busy", no Retry-After.
    assert_eq!(refused.status, 502, "{}", refused.body);
    assert!(refused.retry_after.is_none());
    assert!(
        refused
            .body
            .contains("TURN server gave this server no relay address"),
        "{}",
        refused.body
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the refusal took {:?}",
        started.elapsed()
    );
    let rejected = server
        .metrics
        .sessions_rejected
        .with_label_values(&["no_candidate"])
        .get();
    assert_eq!(rejected, 1);
    assert!(
        server.sessions_end_within(Duration::from_secs(3)).await,
        "the refused call's slot was freed"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_stun_and_turn_the_answer_offers_a_public_address_and_a_relay_beside_its_own() {
    let turn = Coturn::start(Credentials::LongTerm);
    // coturn answers STUN too: on loopback the address it sees is the server's own.
    let urls = vec![format!("stun:127.0.0.1:{}", turn.port), turn.url()];
    let auth = turn_user(PASSWORD);
    let server = server_with(IceConfig::new(urls, auth, false).unwrap()).await;
    // A client that knows no TURN server still connects, straight to the server's address.
    let mut client = ClientPeer::connect(ClientOptions {
        base_url: server.base_url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Gathering finished: the answer did not wait out the server's 3 s cap.
    assert_eq!(server.metrics.ice_gathering_timeouts.get(), 0);
    let kinds: Vec<String> = candidates(&client.answer_sdp)
        .into_iter()
        .map(|(kind, _)| kind)
        .collect();
    assert!(kinds.iter().any(|k| k == "host"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "relay"), "{kinds:?}");
    assert!(kinds.iter().any(|k| k == "srflx"), "{kinds:?}");
    assert_the_echo_comes_back(&mut client).await;
    client.close().await.unwrap();
    server.stop().await;
}

/// What `GET /api/ice` hands the page, as the client's settings.
async fn ice_for_the_page(server: &TestServer) -> (IceConfig, serde_json::Value) {
    let page: serde_json::Value = reqwest::get(format!("{}/api/ice", server.base_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entry = &page["iceServers"][0];
    let urls = entry["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|url| url.as_str().unwrap().to_owned())
        .collect();
    let auth = TurnAuth::Fixed {
        username: entry["username"].as_str().unwrap().to_owned(),
        credential: entry["credential"].as_str().unwrap().to_owned(),
    };
    let relay_only = page["iceTransportPolicy"] == "relay";
    (IceConfig::new(urls, auth, relay_only).unwrap(), page)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_minted_from_a_shared_secret_relay_both_sides_of_a_call() {
    let turn = Coturn::start(Credentials::Secret);
    let auth = TurnAuth::Secret {
        secret: SHARED_SECRET.into(),
        lifetime: Duration::from_secs(600),
    };
    let server = server_with(IceConfig::new(vec![turn.url()], auth, true).unwrap()).await;
    // The client relays with what the page is handed, as a browser would.
    let (ice, page) = ice_for_the_page(&server).await;
    let username = page["iceServers"][0]["username"].as_str().unwrap();
    assert!(username.ends_with(":duplex"), "{page}");
    assert_ne!(page["iceServers"][0]["credential"], SHARED_SECRET, "{page}");
    assert_eq!(page["iceTransportPolicy"], "relay", "{page}");
    let mut client = ClientPeer::connect(ClientOptions {
        base_url: server.base_url.clone(),
        ice,
        ..Default::default()
    })
    .await
    .expect("minted credentials relay the client and the server");
    assert!(
        candidates(&client.answer_sdp)
            .iter()
            .all(|(kind, port)| kind == "relay" && turn.relay_ports.contains(port)),
        "{}",
        client.answer_sdp
    );
    assert_the_echo_comes_back(&mut client).await;
    client.close().await.unwrap();
    server.stop().await;
}

/// How `duplex serve` with `args` and `env` (no other `DUPLEX_` variable) turned out.
enum Serve {
    /// It stopped at once, with its output.
    Refused(String),
    /// It was still serving after a few seconds (then killed).
    Serving,
}

/// An environment variable's name and value.
type Variable<'a> = (&'a str, &'a str);

fn serve_with(args: &[&str], env: &[Variable]) -> Serve {
    let mut command = Command::new(env!("CARGO_BIN_EXE_duplex"));
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("DUPLEX_")) {
        command.env_remove(name);
    }
    let mut child = command
        .args(["serve", "--host", "127.0.0.1", "--port", "0"])
        .args(["--engine", "echo"])
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            let output = child.wait_with_output().unwrap();
            return Serve::Refused(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    Serve::Serving
}

#[test]
fn serve_refuses_ice_settings_it_cannot_use_and_says_which_flag() {
    let turn = ["--ice-server", "turn:127.0.0.1"];
    let cases: [(&[&str], &[Variable], &str); 7] = [
        (&turn, &[], "is a TURN server: give --turn-secret"),
        (
            &["--ice-server", "stun://127.0.0.1"],
            &[],
            "write stun:HOST",
        ),
        (
            &["--ice-server", "stun:127.0.0.1", "--ice-relay-only"],
            &[],
            "--ice-relay-only needs a turn: server",
        ),
        (
            &["--ice-server", "stun:127.0.0.1"],
            &[("DUPLEX_ICE_RELAY_ONLY", "1")],
            "--ice-relay-only needs a turn: server",
        ),
        (
            &[
                "--ice-server",
                "turn:127.0.0.1",
                "--turn-secret",
                "s",
                "--ice-username",
                "u",
                "--ice-credential",
                "c",
            ],
            &[],
            "leave out --ice-username and --ice-credential",
        ),
        (
            &turn,
            &[("DUPLEX_ICE_CREDENTIAL", "c")],
            "--ice-username and --ice-credential go together",
        ),
        (
            &["--turn-secret", "s", "--turn-credential-secs", "0"],
            &[],
            "--turn-credential-secs",
        ),
    ];
    for (args, env, expected) in cases {
        match serve_with(args, env) {
            Serve::Refused(printed) => {
                assert!(
                    printed.contains(expected),
                    "serve {args:?} {env:?}:\n{printed}"
                )
            }
            Serve::Serving => panic!("serve {args:?} {env:?} started"),
        }
    }
}

#[test]
fn empty_ice_variables_as_compose_passes_them_mean_none() {
    let empty = [
        ("DUPLEX_ICE_SERVERS", ""),
        ("DUPLEX_TURN_SECRET", ""),
        ("DUPLEX_ICE_USERNAME", ""),
        ("DUPLEX_ICE_CREDENTIAL", ""),
        ("DUPLEX_ICE_RELAY_ONLY", ""),
    ];
    match serve_with(&[], &empty) {
        Serve::Serving => {}
        Serve::Refused(printed) => panic!("serve refused empty variables:\n{printed}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_stun_or_turn_server_delays_the_answer_but_the_call_connects() {
    // Nothing listens on these ports: every request to them goes unanswered.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let auth = turn_user(PASSWORD);
    let urls = vec![
        format!("stun:127.0.0.1:{port}"),
        format!("turn:127.0.0.1:{port}"),
    ];
    // The defaults of `serve`: the server's checks must outlast the wait for its gathering.
    let server = TestServer::start(ServerOptions {
        ice: IceConfig::new(urls, auth, false).unwrap(),
        ice_disconnected: Duration::from_secs(5),
        ice_failed: Duration::from_secs(10),
        ..Default::default()
    })
    .await;
    let started = Instant::now();
    let client = ClientPeer::connect(ClientOptions {
        base_url: server.base_url.clone(),
        ..Default::default()
    })
    .await
    .expect("the server's own address still reaches the client");
    assert_eq!(server.metrics.ice_gathering_timeouts.get(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "connecting took {:?}",
        started.elapsed()
    );
    let kinds: Vec<String> = candidates(&client.answer_sdp)
        .into_iter()
        .map(|(kind, _)| kind)
        .collect();
    assert!(
        !kinds.is_empty() && kinds.iter().all(|kind| kind == "host"),
        "{}",
        client.answer_sdp
    );
    client.close().await.unwrap();
    drop(silent);
    server.stop().await;
}

/// `duplex doctor --json`'s `ice` check with `args`.
fn doctor_ice_check(args: &[String]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_duplex"))
        .args(["doctor", "--json", "--port", "0", "--udp-bind", "127.0.0.1"])
        .args(args)
        .env("DUPLEX_MODEL_DIR", common::scratch_dir("doctor-no-weights"))
        .output()
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "doctor printed no JSON ({err}):\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|check| check["name"] == "ice")
        .unwrap_or_else(|| panic!("no ice check: {report}"))
        .clone()
}

#[test]
fn doctor_says_what_the_turn_server_gave_or_why_not() {
    let turn = Coturn::start(Credentials::LongTerm);
    let with_password = |password: &str| {
        vec![
            "--ice-server".to_owned(),
            turn.url(),
            "--ice-username".to_owned(),
            USER.to_owned(),
            "--ice-credential".to_owned(),
            password.to_owned(),
        ]
    };
    let good = doctor_ice_check(&with_password(PASSWORD));
    assert_eq!(good["status"], "ok", "{good}");
    assert!(
        good["detail"]
            .as_str()
            .unwrap()
            .contains("relay 127.0.0.1:"),
        "{good}"
    );
    let refused = doctor_ice_check(&with_password("wrong"));
    assert_eq!(refused["status"], "fail", "{refused}");
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("no TURN server gave this server a relay"),
        "{refused}"
    );
    assert!(refused["fix"].as_str().unwrap().contains("--turn-secret"));
}

#[test]
fn serve_logs_what_the_turn_server_gave_at_start() {
    let turn = Coturn::start(Credentials::LongTerm);
    let url = turn.url();
    let args = ["--udp-bind", "127.0.0.1", "--ice-server", &url];
    let credentials = ["--ice-username", USER, "--ice-credential", PASSWORD];
    let args: Vec<&str> = args.iter().chain(&credentials).copied().collect();
    let line = common::serve_until_logged(&args, "STUN/TURN servers:", Duration::from_secs(10))
        .expect("a STUN/TURN line");
    assert!(line.contains("relay 127.0.0.1:"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_cannot_reach_the_servers_does_not_hold_up_the_answer() {
    // `serve` binds loopback beside its public socket; from loopback a remote server cannot be
    // reached at all (the send fails at once). That must end its gathering, not wait it out.
    let auth = turn_user(PASSWORD);
    let urls = vec![
        "stun:203.0.113.1:3478".into(),
        "turn:203.0.113.1:3478".into(),
    ];
    let server = server_with(IceConfig::new(urls, auth, false).unwrap()).await;
    let client = ClientPeer::connect(ClientOptions {
        base_url: server.base_url.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(server.metrics.ice_gathering_timeouts.get(), 0);
    client.close().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_clients_learn_the_servers_from_link_headers() {
    let turn = Coturn::start(Credentials::Secret);
    let urls = vec![format!("stun:127.0.0.1:{}", turn.port), turn.url()];
    let auth = TurnAuth::Secret {
        secret: SHARED_SECRET.into(),
        lifetime: Duration::from_secs(600),
    };
    let server = server_with(IceConfig::new(urls, auth, false).unwrap()).await;
    let (sdp, holder) = common::duplex_offer().await;
    let response = common::post_whip(&server.base_url, "", sdp).await;
    assert_eq!(response.status(), 201);
    let links: Vec<&str> = response
        .headers()
        .get_all("link")
        .iter()
        .map(|value| value.to_str().unwrap())
        .collect();
    assert_eq!(links.len(), 2, "{links:?}");
    assert_eq!(
        links[0],
        format!("<stun:127.0.0.1:{}>; rel=\"ice-server\"", turn.port)
    );
    let turn_link = links[1];
    assert!(
        turn_link.starts_with(&format!(
            "<{}>; rel=\"ice-server\"; username=\"",
            turn.url()
        )),
        "{turn_link}"
    );
    assert!(
        turn_link.contains(":duplex\"; credential=\""),
        "{turn_link}"
    );
    assert!(
        turn_link.ends_with("; credential-type=\"password\""),
        "{turn_link}"
    );
    assert!(!turn_link.contains(SHARED_SECRET), "{turn_link}");
    drop(holder);
    server.stop().await;
}
