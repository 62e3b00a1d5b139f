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

/// A session joining with a persona not prefilled yet waits while the engine prefills it
/// between frames; a live session meanwhile gets every frame, and the newcomer starts once its
/// persona is in place. Here no frame leaves room (the deadline has passed), so the engine
/// makes progress only every eighth frame, the progress it must make whatever the time: as
/// many calls as it judges to cost about one, so how many such frames it takes depends on the
/// machine, but never fewer than two (the first makes one call, since none was timed alone).
#[test]
fn a_new_persona_is_prefilled_between_frames_while_a_live_session_keeps_talking() {
    use duplex::audio::ring::ring;
    use duplex::audio::{FRAME_SAMPLES, PACKET_SAMPLES};
    use duplex::engine::session::SlotSession;
    use duplex::engine::step_loop::StepLoop;
    use duplex::engine::{Engine, PersonaRequest, SessionEvent, SessionId, SessionStats};
    use duplex::metrics::Metrics;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::time::Instant;

    let engine = common::tiny_personaplex(2);
    let catalog = engine.info().catalog;
    let mut step_loop = StepLoop::new(
        engine,
        Instant::now(),
        PACKET_SAMPLES,
        Arc::new(AtomicUsize::new(2)),
        Arc::new(Metrics::new()),
    );
    let join = |step_loop: &mut StepLoop<_>, id: u64, voice: &str, prompt: &str| {
        let (input, input_cons) = ring(8 * FRAME_SAMPLES);
        let (output_prod, output) = ring(4 * FRAME_SAMPLES);
        let (events_tx, events) = crossbeam_channel::unbounded();
        let session = SlotSession {
            id: SessionId(id),
            input: input_cons,
            output: output_prod,
            events: events_tx,
            stats: Arc::new(SessionStats::default()),
        };
        let request = PersonaRequest {
            voice: Some(voice.into()),
            prompt: Some(prompt.into()),
        };
        step_loop.join(session, &catalog.resolve(&request).unwrap());
        (input, output, events)
    };
    let teacher = "You are a wise and friendly teacher.";
    let (mut live_input, mut live_output, live_events) = join(&mut step_loop, 1, "NATF0", teacher);
    // The live session's persona first, all at once, as a server's warm-up would.
    step_loop.prepare_all();
    assert_eq!(live_events.try_recv(), Ok(SessionEvent::Ready));
    let tutor = "You are a patient tutor.";
    let (_, mut new_output, new_events) = join(&mut step_loop, 2, "NATM0", tutor);
    let speech = speech("Can you help me with fractions?", 4.0);
    let mut frame = vec![0.0; FRAME_SAMPLES];
    let mut frames_waited = 0;
    while new_events.try_recv() != Ok(SessionEvent::Ready) {
        assert!(
            frames_waited < 2000,
            "the new persona never came into place"
        );
        let chunk = frames_waited % (speech.len() / FRAME_SAMPLES);
        live_input.push(&speech[chunk * FRAME_SAMPLES..][..FRAME_SAMPLES]);
        let deadline = step_loop.deadline();
        step_loop.tick(&mut || deadline);
        assert!(
            live_output.pop_exact(&mut frame),
            "the live session missed frame {frames_waited}"
        );
        assert!(
            !new_output.pop_exact(&mut frame),
            "a frame before its persona"
        );
        step_loop.prepare(Instant::now());
        frames_waited += 1;
    }
    // `prepare_all` was the loop's first prepare, so the forced ones are this loop's 7th, 15th…
    assert_eq!(
        frames_waited % 8,
        7,
        "prefilled in {frames_waited} frames: progress on a frame without room or force"
    );
    assert!(frames_waited >= 15, "prefilled in {frames_waited} frames");
    let deadline = step_loop.deadline();
    step_loop.tick(&mut || deadline);
    assert!(
        new_output.pop_exact(&mut frame),
        "the newcomer's first frame"
    );
    assert!(live_output.pop_exact(&mut frame));
}
