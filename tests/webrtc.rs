//! The WebRTC path end to end with a real client peer (the same crate) on loopback: audio goes
//! through Opus, the jitter buffer, the rings, the step loop (echo engine) and back.

mod common;

use bytes::Bytes;
use common::{ServerOptions, TestServer, eventually, speech};
use duplex::audio::{PACKET_SAMPLES, SAMPLE_RATE};
use duplex::bench::client::{ClientOptions, ClientPeer, Refused};
use std::time::Duration;

fn options(server: &TestServer) -> ClientOptions {
    ClientOptions {
        base_url: server.base_url.clone(),
        ..Default::default()
    }
}

const SENTENCE: &str =
    "Hello, this is a test of the full duplex voice agent. Can you hear me clearly?";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_comes_back_over_the_same_connection() {
    let server = TestServer::start(ServerOptions::default()).await;
    let mut client = ClientPeer::connect(options(&server)).await.unwrap();
    let sent = speech(SENTENCE, 3.0);
    client.play(&sent).await.unwrap();
    // Let the echo (about 200 ms behind) and the end-of-utterance text arrive.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let recording = client.recording();
    let (correlation, round_trip_ms) = common::echo_correlation(&sent, &recording.pcm, SAMPLE_RATE);
    eprintln!("echo correlation {correlation:.3} at {round_trip_ms:.0} ms");
    assert!(
        correlation > 0.7,
        "received audio does not match what was sent (correlation {correlation})"
    );
    assert!(
        (100.0..600.0).contains(&round_trip_ms),
        "round trip {round_trip_ms} ms"
    );

    let events = client.events();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"ready"), "events: {events:?}");
    assert!(kinds.contains(&"stats"), "events: {events:?}");
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "text" && e["text"].as_str().unwrap_or("").contains("echo")),
        "the echo engine reports the utterance as text: {events:?}"
    );
    let stats = events.iter().rev().find(|e| e["type"] == "stats").unwrap();
    assert!(
        stats["packets_received"].as_u64().unwrap() >= 100,
        "{stats}"
    );
    assert_eq!(stats["packets_bad"], 0);

    client.close().await.unwrap();
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    let calls = &server.metrics.calls_started;
    assert_eq!(calls.with_label_values(&["webrtc"]).get(), 1);
    let lengths = server.metrics.call_seconds.with_label_values(&["webrtc"]);
    assert!(eventually(Duration::from_secs(1), || lengths.get_sample_count() == 1).await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_payloads_are_counted_and_the_session_goes_on() {
    let server = TestServer::start(ServerOptions::default()).await;
    let mut client = ClientPeer::connect(options(&server)).await.unwrap();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    for idx in 0..40u8 {
        ticker.tick().await;
        // Invalid Opus: TOC code 3 with a zero frame count, then random bytes.
        let garbage = Bytes::from(vec![0x03, 0x00, idx, 0xff, 0x13, 0x37]);
        client.send_payload(garbage).await.unwrap();
    }
    let sent = speech(SENTENCE, 2.0);
    client.play(&sent).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recording = client.recording();
    // The echo of the speech still arrives after the garbage.
    let tail = &recording.pcm[40 * PACKET_SAMPLES..];
    let (correlation, _) = common::echo_correlation(&sent, tail, SAMPLE_RATE);
    assert!(
        correlation > 0.7,
        "echo after garbage: correlation {correlation}"
    );
    assert!(
        server.metrics.packets_bad.get() >= 30,
        "bad packets counted: {}",
        server.metrics.packets_bad.get()
    );
    let stats = client
        .events()
        .into_iter()
        .rev()
        .find(|e| e["type"] == "stats")
        .unwrap();
    assert!(stats["packets_bad"].as_u64().unwrap() >= 30, "{stats}");
    client.close().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_answers_503_with_retry_after() {
    let server = TestServer::start(ServerOptions {
        max_sessions: 1,
        ..Default::default()
    })
    .await;
    let first = ClientPeer::connect(options(&server)).await.unwrap();
    let err = ClientPeer::connect(options(&server))
        .await
        .err()
        .expect("second session must be refused");
    let refused = err
        .downcast_ref::<Refused>()
        .unwrap_or_else(|| panic!("not a refusal: {err:#}"));
    assert_eq!(refused.status, 503);
    assert!(refused.body.contains("server full"), "{}", refused.body);
    assert_eq!(refused.retry_after.as_deref(), Some("5"));
    assert_eq!(
        server
            .metrics
            .sessions_rejected
            .with_label_values(&["full"])
            .get(),
        1
    );
    // Once the first leaves, the slot is free again.
    first.close().await.unwrap();
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    ClientPeer::connect(options(&server))
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_is_required_when_configured() {
    let server = TestServer::start(ServerOptions {
        token: Some("open-sesame".into()),
        ..Default::default()
    })
    .await;
    for token in [None, Some("wrong".to_owned())] {
        let err = ClientPeer::connect(ClientOptions {
            token,
            ..options(&server)
        })
        .await
        .err()
        .unwrap();
        assert_eq!(
            err.downcast_ref::<Refused>().map(|r| r.status),
            Some(401),
            "{err:#}"
        );
    }
    let client = ClientPeer::connect(ClientOptions {
        token: Some("open-sesame".into()),
        ..options(&server)
    })
    .await
    .unwrap();
    client.close().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_voice_is_refused_before_any_media() {
    let server = TestServer::start(ServerOptions::default()).await;
    let err = ClientPeer::connect(ClientOptions {
        voice: Some("NOT_A_VOICE".into()),
        ..options(&server)
    })
    .await
    .err()
    .unwrap();
    let refused = err.downcast_ref::<Refused>().unwrap();
    assert_eq!(refused.status, 400);
    assert!(
        refused.body.contains("NATF0"),
        "lists the voices: {}",
        refused.body
    );
    assert_eq!(server.state.engine.active_sessions(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_offers_get_201_location_and_delete_ends_the_session() {
    let server = TestServer::start(ServerOptions::default()).await;
    // A real offer, made by a client peer that we then drive by hand over WHIP.
    let (sdp, holder) = common::duplex_offer().await;
    let response = common::post_whip(&server.base_url, "?voice=NATM1", sdp).await;
    let http = reqwest::Client::new();
    assert_eq!(response.status(), 201);
    assert_eq!(response.headers()["content-type"], "application/sdp");
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let key = location.strip_prefix("/api/sessions/").unwrap();
    assert!(
        key.len() == 32 && key.bytes().all(|b| b.is_ascii_hexdigit()),
        "the resource is 128 random bits, not the session id: {location}"
    );
    let answer = response.text().await.unwrap();
    assert!(
        answer.contains("opus/48000/2") && answer.contains("a=candidate"),
        "{answer}"
    );
    assert!(
        answer.contains("127.0.0.1"),
        "the answer carries a loopback candidate"
    );
    assert_eq!(server.state.engine.active_sessions(), 1);
    let deleted = http
        .delete(format!("{}{location}", server.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    let again = http
        .delete(format!("{}{location}", server.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 404);
    drop(holder);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_live_sessions_within_seconds() {
    let server = TestServer::start(ServerOptions::default()).await;
    let mut client = ClientPeer::connect(options(&server)).await.unwrap();
    let took = server.stop().await;
    assert!(took < Duration::from_secs(4), "shutdown took {took:?}");
    let state = client
        .wait_disconnected(Duration::from_secs(5))
        .await
        .unwrap();
    eprintln!("client saw {state} after shutdown");
}

/// The child half of `a_vanished_client_frees_its_slot`: connects, then waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by a_vanished_client_frees_its_slot in a child process"]
async fn vanishing_client_child() {
    let Ok(base_url) = std::env::var("DUPLEX_TEST_SERVER") else {
        return;
    };
    let mut client = ClientPeer::connect(ClientOptions {
        base_url,
        ..Default::default()
    })
    .await
    .unwrap();
    println!("CONNECTED {}", client.session);
    let pcm = speech("still here", 60.0);
    client.play(&pcm).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_frees_its_slot() {
    use std::io::{BufRead, BufReader};
    let server = TestServer::start(ServerOptions {
        ice_disconnected: Duration::from_secs(1),
        ice_failed: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "vanishing_client_child",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("DUPLEX_TEST_SERVER", &server.base_url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let connected = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains("CONNECTED"))
    })
    .await
    .unwrap();
    assert!(connected, "the child client never connected");
    assert_eq!(server.state.engine.active_sessions(), 1);
    // SIGKILL: no DELETE, no DTLS close, no ICE goodbye.
    child.kill().unwrap();
    child.wait().unwrap();
    let freed = eventually(Duration::from_secs(15), || {
        server.state.engine.active_sessions() == 0
    })
    .await;
    assert!(freed, "the vanished client's slot was never freed");
    assert_eq!(server.metrics.sessions_vanished.get(), 1);
    server.stop().await;
}

/// The `a=ice-ufrag` of an SDP.
fn ice_ufrag(sdp: &str) -> &str {
    sdp.lines()
        .find_map(|line| line.strip_prefix("a=ice-ufrag:"))
        .expect("an SDP with ICE credentials")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ice_restart_keeps_the_session_and_its_audio() {
    // The test server gives up on a silent peer after 2 + 2 s: a restart that broke the path
    // would end the session well within the 5 s of audio below.
    let server = TestServer::start(ServerOptions::default()).await;
    let mut client = ClientPeer::connect(options(&server)).await.unwrap();
    let first_answer = client.answer_sdp.clone();
    client.restart_ice().await.unwrap();
    assert_ne!(
        ice_ufrag(&first_answer),
        ice_ufrag(&client.answer_sdp),
        "the answer to a restart carries new ICE credentials"
    );
    assert_heard_after_restart(&mut client).await;
    assert_eq!(server.state.engine.active_sessions(), 1);
    let readies = client
        .events()
        .iter()
        .filter(|e| e["type"] == "ready")
        .count();
    assert_eq!(readies, 1, "one session throughout");
    client.close().await.unwrap();
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_restarts_of_unknown_sessions_or_with_bad_offers_are_refused() {
    let server = TestServer::start(ServerOptions::default()).await;
    let client = ClientPeer::connect(options(&server)).await.unwrap();
    let http = reqwest::Client::new();
    let patch = |resource: &str, body: serde_json::Value| {
        http.patch(format!("{}{resource}", server.base_url))
            .json(&body)
            .send()
    };
    let (offer, holder) = common::duplex_offer().await;
    let unknown = patch(
        "/api/sessions/0123456789abcdef0123456789abcdef",
        serde_json::json!({"sdp": offer, "type": "offer"}),
    )
    .await
    .unwrap();
    assert_eq!(unknown.status(), 404);
    let garbage = patch(
        &client.resource,
        serde_json::json!({"sdp": "v=0\r\nnonsense", "type": "offer"}),
    )
    .await
    .unwrap();
    assert_eq!(garbage.status(), 400);
    let answer_type = patch(
        &client.resource,
        serde_json::json!({"sdp": offer, "type": "answer"}),
    )
    .await
    .unwrap();
    assert_eq!(answer_type.status(), 400);
    // WHIP's trickle PATCH: not taken here, and said so.
    let trickle = http
        .patch(format!("{}{}", server.base_url, client.resource))
        .header("content-type", "application/trickle-ice-sdpfrag")
        .body("a=ice-ufrag:abcd\r\na=ice-pwd:efgh\r\n")
        .send()
        .await
        .unwrap();
    assert_eq!(trickle.status(), 422);
    let mut client = client;
    client
        .restart_ice()
        .await
        .expect("the session's own client restarts after the bad requests");
    assert_heard_after_restart(&mut client).await;
    drop(holder);
    client.close().await.unwrap();
    server.stop().await;
}

/// One token shared by many callers: each call's resource is its own, so another caller who
/// knows the session id (the page shows it; logs carry it) can neither hang it up nor take its
/// media path with an ICE restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_caller_cannot_end_or_restart_a_call() {
    let token = "shared-by-the-team";
    let server = TestServer::start(ServerOptions {
        token: Some(token.into()),
        ..Default::default()
    })
    .await;
    let with_token = || ClientOptions {
        token: Some(token.into()),
        ..options(&server)
    };
    let mut victim = ClientPeer::connect(with_token()).await.unwrap();
    let other = ClientPeer::connect(with_token()).await.unwrap();
    assert_ne!(victim.resource, other.resource);
    let (offer, holder) = common::duplex_offer().await;
    let http = reqwest::Client::new();
    let by_id = format!("{}/api/sessions/{}", server.base_url, victim.session);
    let restart = http
        .patch(&by_id)
        .bearer_auth(token)
        .json(&serde_json::json!({"sdp": offer, "type": "offer"}))
        .send()
        .await
        .unwrap();
    assert_eq!(restart.status(), 404, "an ICE restart by session id");
    let hang_up = http.delete(&by_id).bearer_auth(token).send().await.unwrap();
    assert_eq!(hang_up.status(), 404, "a DELETE by session id");
    other.close().await.unwrap();
    assert!(
        server.sessions_become(1, Duration::from_secs(3)).await,
        "the other caller's own DELETE ends only its call"
    );
    let sent = speech(SENTENCE, 3.0);
    victim.play(&sent).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (correlation, _) = common::echo_correlation(&sent, &victim.recording().pcm, SAMPLE_RATE);
    assert!(
        correlation > 0.7,
        "the call goes on: correlation {correlation}"
    );
    drop(holder);
    victim.close().await.unwrap();
    server.stop().await;
}

/// Speech played after an ICE restart (once its checks are done) comes back.
async fn assert_heard_after_restart(client: &mut ClientPeer) {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let heard_before = client.recording().pcm.len();
    let sent = speech(SENTENCE, 5.0);
    client.play(&sent).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let after_restart = client.recording().pcm[heard_before..].to_vec();
    let (correlation, _) = common::echo_correlation(&sent, &after_restart, SAMPLE_RATE);
    assert!(
        correlation > 0.7,
        "after the restart: correlation {correlation}, {} samples heard",
        after_restart.len()
    );
}
