//! The PersonaPlex engine (tiny reference checkpoint) behind the real WebRTC gateway: a client
//! picks a voice and a role prompt, talks, and gets the model's text and audio back.

mod common;

use common::{ServerOptions, TestEngine, TestServer, speech};
use duplex::audio::signal;
use duplex::bench::client::{ClientOptions, ClientPeer, Refused};
use std::time::Duration;

fn tiny() -> ServerOptions {
    ServerOptions {
        engine: TestEngine::TinyPersonaPlex,
        max_sessions: 2,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_hears_the_model_and_reads_its_text() {
    let server = TestServer::start(tiny()).await;
    let info: serde_json::Value = reqwest::get(format!("{}/api/info", server.base_url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["engine"], "personaplex");
    assert_eq!(info["voices"], serde_json::json!(["NATF0", "NATM0"]));
    let options = ClientOptions {
        base_url: server.base_url.clone(),
        voice: Some("NATM0".into()),
        prompt: Some("You enjoy having a good conversation.".into()),
        ..Default::default()
    };
    let mut client = ClientPeer::connect(options).await.unwrap();
    client
        .play(&speech("Hello there, how are you today?", 3.0))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = client.events();
    assert_eq!(
        events.first().map(|e| e["type"].clone()),
        Some("ready".into()),
        "{events:?}"
    );
    let text: String = events
        .iter()
        .filter(|e| e["type"] == "text")
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert!(
        !text.trim().is_empty(),
        "the model's text reached the data channel: {events:?}"
    );
    let recording = client.recording();
    assert!(recording.packets > 100, "{} packets", recording.packets);
    assert!(
        signal::rms(&recording.pcm) > 1e-4,
        "the agent's audio is not silent"
    );
    client.close().await.unwrap();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_voices_and_long_prompts_are_refused_at_the_offer() {
    let server = TestServer::start(tiny()).await;
    let base = ClientOptions {
        base_url: server.base_url.clone(),
        ..Default::default()
    };
    let err = ClientPeer::connect(ClientOptions {
        voice: Some("VARF4".into()),
        ..base.clone()
    })
    .await
    .err()
    .unwrap();
    let refused = err.downcast_ref::<Refused>().unwrap();
    assert_eq!(refused.status, 400);
    assert!(refused.body.contains("NATF0, NATM0"), "{}", refused.body);
    let long = "you are a very helpful and friendly teacher ".repeat(10);
    let err = ClientPeer::connect(ClientOptions {
        prompt: Some(long),
        ..base
    })
    .await
    .err()
    .unwrap();
    let refused = err.downcast_ref::<Refused>().unwrap();
    assert_eq!(refused.status, 400);
    assert!(
        refused.body.contains("tokens") && refused.body.contains("limit"),
        "{}",
        refused.body
    );
    server.stop().await;
}
