//! The generic bridge through channels: pacing, barge-in, marks, DTMF and bad input.

use super::*;
use crate::audio::g711::{self, Law};
use crate::engine::{EchoEngine, EngineConfig, EngineHandle};
use crate::gateway::GatewayConfig;
use futures::channel::mpsc;
use std::convert::Infallible;
use std::time::Instant;

#[test]
fn barge_in_fires_on_an_onset_while_the_agent_plays() {
    let mut b = BargeIn::default();
    // Loud input with the agent silent: no clear.
    for _ in 0..5 {
        b.output(0.0);
        assert!(!b.input(0.3));
    }
    b.input(0.0);
    // The agent talks; the caller starts: the third loud packet fires, once.
    b.output(0.2);
    assert!(!b.input(0.3));
    assert!(!b.input(0.3));
    assert!(b.input(0.3));
    assert!(!b.input(0.3));
    // A new onset within the cooldown does not fire again.
    b.input(0.0);
    b.output(0.2);
    for _ in 0..3 {
        assert!(!b.input(0.3));
    }
    for _ in 0..BargeIn::COOLDOWN_PACKETS {
        b.output(0.2);
    }
    b.input(0.0);
    for idx in 0..3 {
        assert_eq!(b.input(0.3), idx == 2);
    }
}

#[test]
fn marks_wait_for_their_audio_and_acks_are_not_echoed_again() {
    let mut marks = MarkQueue::default();
    assert!(marks.push("a".into(), 960));
    assert!(marks.push("b".into(), 1920));
    assert_eq!(marks.due(480), None);
    assert_eq!(marks.due(960).as_deref(), Some("a"));
    assert_eq!(marks.due(960), None);
    assert_eq!(marks.flush(), vec!["b".to_owned()]);
    // The provider acknowledging our echo of "a": not queued again.
    assert!(marks.push("a".into(), 5000));
    assert_eq!(marks.due(u64::MAX), None);
}

struct Harness {
    to_bridge: mpsc::UnboundedSender<Result<Message, Infallible>>,
    from_bridge: mpsc::UnboundedReceiver<Message>,
    task: tokio::task::JoinHandle<CallSummary>,
    state: Arc<AppState>,
}

fn start<P: Provider>(max_sessions: usize) -> Harness {
    let config = EngineConfig {
        max_sessions,
        ..Default::default()
    };
    let engine = EngineHandle::start(
        EchoEngine::new(max_sessions, 1),
        config,
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let state = AppState::new(engine, GatewayConfig::default());
    let (to_bridge, stream) = mpsc::unbounded();
    let (sink, from_bridge) = mpsc::unbounded();
    let context = CallContext {
        state: state.clone(),
        authorized: true,
    };
    let task = tokio::spawn(run_call(P::new(), sink, stream, context));
    Harness {
        to_bridge,
        from_bridge,
        task,
        state,
    }
}

impl Harness {
    fn text(&self, text: &str) {
        self.to_bridge
            .unbounded_send(Ok(Message::Text(text.to_owned().into())))
            .unwrap();
    }

    async fn next_json(&mut self) -> serde_json::Value {
        loop {
            match tokio::time::timeout(Duration::from_secs(3), self.from_bridge.next()).await {
                Ok(Some(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
                Ok(Some(Message::Close(frame))) => panic!("closed: {frame:?}"),
                Ok(Some(_)) => continue,
                _ => panic!("nothing from the bridge"),
            }
        }
    }

    async fn close(&mut self) -> (u16, String) {
        loop {
            match tokio::time::timeout(Duration::from_secs(3), self.from_bridge.next()).await {
                Ok(Some(Message::Close(Some(frame)))) => {
                    return (frame.code, frame.reason.to_string());
                }
                Ok(Some(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    }
}

const START: &str = r#"{"event":"start","start":{"streamSid":"MZ9","callSid":"CA9","customParameters":{"voice":"NATF3"},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}},"streamSid":"MZ9"}"#;

fn media(payload: &[u8]) -> String {
    serde_json::json!({"event": "media", "streamSid": "MZ9", "media": {"track": "inbound", "payload": encode_payload(payload)}}).to_string()
}

#[tokio::test]
async fn media_is_paced_and_dtmf_marks_and_stop_are_handled() {
    let mut h = start::<Twilio>(2);
    h.text(r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#);
    h.text(START);
    let first = h.next_json().await;
    assert_eq!(first["event"], "media");
    assert_eq!(first["streamSid"], "MZ9");
    let started = Instant::now();
    for _ in 0..10 {
        assert_eq!(h.next_json().await["event"], "media");
    }
    // 200 ms when paced; the bounds leave a late tick room and still fail a burst or a pace
    // twice as fast.
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(150) && elapsed < Duration::from_millis(400),
        "10 packets in {elapsed:?}"
    );
    h.text(&media(&[0xff; 160]));
    h.text(r#"{"event":"dtmf","streamSid":"MZ9","dtmf":{"track":"inbound_track","digit":"4"}}"#);
    h.text(r#"{"event":"dtmf","streamSid":"MZ9","dtmf":{"track":"inbound_track","digit":"2"}}"#);
    h.text(r#"{"event":"mark","streamSid":"MZ9","mark":{"name":"m-1"}}"#);
    let mark = loop {
        let message = h.next_json().await;
        if message["event"] == "mark" {
            break message;
        }
    };
    assert_eq!(mark["mark"]["name"], "m-1");
    assert_eq!(mark["streamSid"], "MZ9");
    h.text(r#"{"event":"stop","streamSid":"MZ9","stop":{}}"#);
    let summary = h.task.await.unwrap();
    assert_eq!(summary.ending, CallEnding::Hangup);
    assert_eq!(summary.dtmf, "42");
    assert_eq!(summary.marks_echoed, 1);
    assert_eq!(summary.stream_id.as_deref(), Some("MZ9"));
    assert_eq!(
        h.state
            .engine
            .metrics()
            .transport_events
            .with_label_values(&["twilio", "dtmf"])
            .get(),
        2
    );
    h.state.engine.shutdown();
}

#[tokio::test]
async fn binary_frames_close_a_twilio_call() {
    let mut h = start::<Twilio>(1);
    h.text(START);
    h.to_bridge
        .unbounded_send(Ok(Message::Binary(vec![0xff; 160].into())))
        .unwrap();
    let (code, reason) = h.close().await;
    assert_eq!(code, 1003);
    assert!(reason.contains("binary"), "{reason}");
    h.state.engine.shutdown();
}

#[tokio::test]
async fn media_before_start_closes_the_call() {
    let mut h = start::<Twilio>(1);
    h.text(&media(&[0xff; 160]));
    let (code, reason) = h.close().await;
    assert_eq!(code, 1008);
    assert!(reason.contains("before the stream started"), "{reason}");
    assert!(matches!(
        h.task.await.unwrap().ending,
        CallEnding::Refused { .. }
    ));
    h.state.engine.shutdown();
}

#[tokio::test]
async fn bad_base64_and_wrong_stream_are_dropped_and_counted() {
    let mut h = start::<Twilio>(1);
    h.text(START);
    h.next_json().await;
    h.text(r#"{"event":"media","streamSid":"MZ9","media":{"payload":"***"}}"#);
    h.text(r#"{"event":"media","streamSid":"MZ0","media":{"payload":"//8="}}"#);
    h.text(r#"{"event":"whatever","streamSid":"MZ9"}"#);
    h.text(r#"{"event":"stop","streamSid":"MZ9"}"#);
    let summary = h.task.await.unwrap();
    assert_eq!(summary.ending, CallEnding::Hangup);
    assert_eq!(summary.dropped_messages, 2);
    assert!(summary.ignored >= 3, "{summary:?}");
    let metrics = h.state.engine.metrics();
    for label in ["bad_base64", "wrong_stream", "ignored"] {
        assert!(
            metrics
                .transport_events
                .with_label_values(&["twilio", label])
                .get()
                >= 1,
            "{label}"
        );
    }
    h.state.engine.shutdown();
}

#[tokio::test]
async fn an_unknown_voice_closes_with_the_list() {
    let mut h = start::<Twilio>(1);
    h.text(&START.replace("NATF3", "../etc/passwd"));
    let (code, reason) = h.close().await;
    assert_eq!(code, 1008);
    assert!(reason.contains("unknown voice"), "{reason}");
    assert_eq!(h.state.engine.active_sessions(), 0);
    h.state.engine.shutdown();
}

#[tokio::test]
async fn talking_over_the_agent_sends_a_clear() {
    let mut h = start::<Twilio>(1);
    h.text(START);
    h.next_json().await;
    let tone: Vec<f32> = (0..8000)
        .map(|i| 0.3 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 8000.0).sin())
        .collect();
    let mut ulaw = vec![0u8; tone.len()];
    g711::encode(Law::Mulaw, &tone, &mut ulaw);
    let silence = [0xffu8; 160];
    // 0.4 s of tone, 0.1 s of silence (the echo still plays), then the tone again.
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    for idx in 0..45 {
        ticker.tick().await;
        let packet = if (20..25).contains(&idx) {
            &silence[..]
        } else {
            &ulaw[idx * 160..][..160]
        };
        h.text(&media(packet));
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut cleared = false;
    while Instant::now() < deadline && !cleared {
        cleared = h.next_json().await["event"] == "clear";
    }
    assert!(cleared, "no clear after talking over the echo");
    h.text(r#"{"event":"stop","streamSid":"MZ9"}"#);
    assert!(h.task.await.unwrap().clears_sent >= 1);
    h.state.engine.shutdown();
}

#[tokio::test]
async fn without_a_token_in_the_url_the_start_must_carry_it() {
    let engine = EngineHandle::start(
        EchoEngine::new(1, 1),
        EngineConfig::default(),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let config = GatewayConfig {
        token: Some("sesame".into()),
        ..Default::default()
    };
    let state = AppState::new(engine, config);
    for (token, accepted) in [
        (None, false),
        (Some("wrong"), false),
        (Some("sesame"), true),
    ] {
        let (to_bridge, stream) = mpsc::unbounded::<Result<Message, Infallible>>();
        let (sink, mut from_bridge) = mpsc::unbounded();
        let context = CallContext {
            state: state.clone(),
            authorized: false,
        };
        let task = tokio::spawn(run_call(Twilio::new(), sink, stream, context));
        let mut start: serde_json::Value = serde_json::from_str(START).unwrap();
        if let Some(token) = token {
            start["start"]["customParameters"]["token"] = token.into();
        }
        to_bridge
            .unbounded_send(Ok(Message::Text(start.to_string().into())))
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(3), from_bridge.next())
            .await
            .unwrap()
            .unwrap();
        match first {
            Message::Text(_) => assert!(accepted, "{token:?} was accepted"),
            Message::Close(Some(frame)) => {
                assert!(!accepted, "{token:?} was refused");
                assert_eq!(frame.code, 1008);
                assert!(frame.reason.contains("token"));
            }
            other => panic!("{other:?}"),
        }
        drop(to_bridge);
        task.await.unwrap();
    }
    state.engine.shutdown();
}
