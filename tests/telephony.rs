//! Telephony bridges end to end: a WebSocket client on loopback replays a provider's call
//! (Twilio, Telnyx, Plivo, Vonage framing) against the real server with the echo engine and
//! checks pacing, stream ids, marks and the audio that comes back; then bad input, a full
//! server, a 60 s soak of 20 calls and repeated connect/disconnect cycles.

mod common;

use common::{ServerOptions, TestServer, espeak_raw, rss_kib, ws_url};
use duplex::audio::g711::{self, Law};
use duplex::audio::signal;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const SENTENCE: &str = "Hello, I would like to check the status of my order, please.";
/// Frames a realistic call sends: 3 s of speech in 20 ms packets.
const MEDIA_FRAMES: usize = 150;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Flavor {
    Twilio,
    Telnyx,
    Plivo,
    Vonage,
}

/// What the client received, by kind.
#[derive(Debug)]
enum Received {
    Media(Vec<u8>),
    Mark(String),
    Clear,
    Other,
}

impl Flavor {
    fn path(self) -> &'static str {
        match self {
            Self::Twilio => "/telephony/twilio",
            Self::Telnyx => "/telephony/telnyx",
            Self::Plivo => "/telephony/plivo",
            Self::Vonage => "/telephony/vonage",
        }
    }

    fn rate(self) -> u32 {
        if self == Self::Vonage { 16_000 } else { 8000 }
    }

    fn packet_bytes(self) -> usize {
        if self == Self::Vonage { 640 } else { 160 }
    }

    /// The caller's speech in the wire format, made by espeak-ng and sox.
    fn speech(self) -> Vec<u8> {
        let (encoding, rate) = match self {
            Self::Telnyx => ("a-law", 8000),
            Self::Vonage => ("signed", 16_000),
            _ => ("u-law", 8000),
        };
        let mut bytes = espeak_raw(SENTENCE, encoding, rate).unwrap_or_else(|| {
            eprintln!("espeak-ng or sox not found: using a synthetic speech-like signal");
            let pcm = signal::speech_like(24_000 * 3, 5);
            let narrow: Vec<f32> = pcm
                .iter()
                .step_by(24_000 / rate as usize)
                .copied()
                .collect();
            self.encode(&narrow)
        });
        let silence = if self == Self::Vonage {
            0x00
        } else {
            self.encode(&[0.0])[0]
        };
        bytes.resize(MEDIA_FRAMES * self.packet_bytes(), silence);
        bytes
    }

    fn encode(self, pcm: &[f32]) -> Vec<u8> {
        match self {
            Self::Vonage => pcm
                .iter()
                .flat_map(|s| g711::to_i16(*s).to_le_bytes())
                .collect(),
            _ => {
                let mut out = vec![0; pcm.len()];
                g711::encode(self.law(), pcm, &mut out);
                out
            }
        }
    }

    fn law(self) -> Law {
        if self == Self::Telnyx {
            Law::Alaw
        } else {
            Law::Mulaw
        }
    }

    fn decode(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            Self::Vonage => bytes
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0)
                .collect(),
            _ => {
                let mut out = vec![0.0; bytes.len()];
                g711::decode(self.law(), bytes, &mut out);
                out
            }
        }
    }

    fn opening(self, sid: &str, params: Value) -> Vec<Message> {
        let text = |v: Value| Message::Text(v.to_string().into());
        match self {
            Self::Twilio => vec![
                text(json!({"event": "connected", "protocol": "Call", "version": "1.0.0"})),
                text(
                    json!({"event": "start", "sequenceNumber": "1", "streamSid": sid, "start": {
                    "accountSid": "AC00", "streamSid": sid, "callSid": "CA00", "tracks": ["inbound"],
                    "customParameters": params,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}),
                ),
            ],
            Self::Telnyx => vec![
                text(json!({"event": "connected", "version": "1.0.0"})),
                text(
                    json!({"event": "start", "sequence_number": "1", "stream_id": sid, "start": {
                    "call_control_id": "v3:00", "custom_parameters": params,
                    "media_format": {"encoding": "PCMA", "sample_rate": 8000, "channels": 1}}}),
                ),
            ],
            Self::Plivo => vec![text(
                json!({"event": "start", "sequenceNumber": 1, "start": {
                "callId": "c-00", "streamId": sid, "tracks": ["inbound"], "customParameters": params,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}}}),
            )],
            Self::Vonage => {
                let mut connected = json!({"event": "websocket:connected",
                    "content-type": "audio/l16;rate=16000", "uuid": sid});
                for (key, value) in params.as_object().unwrap() {
                    connected[key] = value.clone();
                }
                vec![text(connected)]
            }
        }
    }

    fn media(self, sid: &str, seq: usize, payload: &[u8]) -> Message {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(payload);
        let ts = (seq * 20).to_string();
        let value = match self {
            Self::Twilio => {
                json!({"event": "media", "sequenceNumber": (seq + 2).to_string(), "streamSid": sid,
                "media": {"track": "inbound", "chunk": (seq + 1).to_string(), "timestamp": ts, "payload": b64}})
            }
            Self::Telnyx => {
                json!({"event": "media", "sequence_number": (seq + 2).to_string(), "stream_id": sid,
                "media": {"track": "inbound", "chunk": (seq + 1).to_string(), "timestamp": ts, "payload": b64}})
            }
            Self::Plivo => json!({"event": "media", "sequenceNumber": seq + 2, "streamId": sid,
                "media": {"track": "inbound", "timestamp": ts, "chunk": seq + 1, "payload": b64}}),
            Self::Vonage => return Message::Binary(payload.to_vec().into()),
        };
        Message::Text(value.to_string().into())
    }

    fn mark(self, sid: &str, name: &str) -> Message {
        let value = match self {
            Self::Twilio => json!({"event": "mark", "streamSid": sid, "mark": {"name": name}}),
            Self::Telnyx => json!({"event": "mark", "stream_id": sid, "mark": {"name": name}}),
            Self::Plivo => json!({"event": "checkpoint", "streamId": sid, "name": name}),
            Self::Vonage => json!({"action": "notify", "payload": {"name": name}}),
        };
        Message::Text(value.to_string().into())
    }

    fn dtmf(self, sid: &str, digit: &str) -> Message {
        let value = match self {
            Self::Twilio => {
                json!({"event": "dtmf", "streamSid": sid, "dtmf": {"track": "inbound_track", "digit": digit}})
            }
            Self::Telnyx => json!({"event": "dtmf", "stream_id": sid, "dtmf": {"digit": digit}}),
            Self::Plivo => json!({"event": "dtmf", "streamId": sid, "dtmf": {"digit": digit}}),
            Self::Vonage => json!({"event": "websocket:dtmf", "digit": digit, "duration": 200}),
        };
        Message::Text(value.to_string().into())
    }

    /// The hang-up message (Vonage has none: it closes the socket).
    fn stop(self, sid: &str) -> Option<Message> {
        let value = match self {
            Self::Twilio => {
                json!({"event": "stop", "streamSid": sid, "stop": {"accountSid": "AC00", "callSid": "CA00"}})
            }
            Self::Telnyx => json!({"event": "stop", "stream_id": sid, "stop": {}}),
            Self::Plivo => json!({"event": "stop", "streamId": sid}),
            Self::Vonage => return None,
        };
        Some(Message::Text(value.to_string().into()))
    }

    /// Classifies a server message, checking the stream id where the provider carries one.
    fn classify(self, message: &Message, sid: &str) -> Received {
        use base64::Engine;
        let text = match message {
            Message::Binary(bytes) if self == Self::Vonage => {
                return Received::Media(bytes.to_vec());
            }
            Message::Text(text) => text.as_str(),
            _ => return Received::Other,
        };
        let value: Value = serde_json::from_str(text).unwrap();
        let sid_field = match self {
            Self::Twilio => Some("streamSid"),
            Self::Plivo => Some("streamId"),
            _ => None,
        };
        let event = value["event"]
            .as_str()
            .or(value["action"].as_str())
            .unwrap_or("");
        if let Some(field) = sid_field
            && event != "playAudio"
        {
            assert_eq!(value[field], sid, "wrong stream id in {text}");
        }
        let decode = |b64: &Value| {
            base64::engine::general_purpose::STANDARD
                .decode(b64.as_str().unwrap())
                .unwrap()
        };
        match event {
            "media" => Received::Media(decode(&value["media"]["payload"])),
            "playAudio" => Received::Media(decode(&value["media"]["payload"])),
            "mark" => Received::Mark(value["mark"]["name"].as_str().unwrap().to_owned()),
            "playedStream" => Received::Mark(value["name"].as_str().unwrap().to_owned()),
            "websocket:notify" => {
                Received::Mark(value["payload"]["name"].as_str().unwrap().to_owned())
            }
            "clear" | "clearAudio" => Received::Clear,
            _ => Received::Other,
        }
    }
}

/// What one replayed call saw.
struct CallRecord {
    sent: Vec<f32>,
    received: Vec<f32>,
    media_times: Vec<Instant>,
    marks: Vec<(String, Instant)>,
    clears: usize,
    mark_sent_at: Instant,
    close: Option<Option<CloseCode>>,
}

/// Replays a call: opening messages, `MEDIA_FRAMES` packets of speech every 20 ms, a DTMF
/// digit, a mark, then (once the mark is echoed) the stop.
async fn replay(server: &TestServer, flavor: Flavor, sid: &str, speech: &[u8]) -> CallRecord {
    let (socket, _) = tokio_tungstenite::connect_async(ws_url(server, flavor.path()))
        .await
        .expect("upgrade");
    let (mut tx, mut rx) = socket.split();
    let params = json!({"voice": "NATM1", "prompt": "You are a helpful support agent."});
    for message in flavor.opening(sid, params) {
        tx.send(message).await.unwrap();
    }
    let reader_sid = sid.to_owned();
    let reader = tokio::spawn(async move {
        let mut media = Vec::new();
        let mut times = Vec::new();
        let mut marks = Vec::new();
        let mut clears = 0;
        let mut close = None;
        while let Some(Ok(message)) = rx.next().await {
            if let Message::Close(frame) = &message {
                close = Some(frame.as_ref().map(|f| f.code));
                break;
            }
            match flavor.classify(&message, &reader_sid) {
                Received::Media(bytes) => {
                    times.push(Instant::now());
                    media.extend(bytes);
                }
                Received::Mark(name) => marks.push((name, Instant::now())),
                Received::Clear => clears += 1,
                Received::Other => {}
            }
        }
        (media, times, marks, clears, close)
    });
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    for (seq, packet) in speech.chunks(flavor.packet_bytes()).enumerate() {
        ticker.tick().await;
        tx.send(flavor.media(sid, seq, packet)).await.unwrap();
    }
    tx.send(flavor.dtmf(sid, "5")).await.unwrap();
    let mark_sent_at = Instant::now();
    tx.send(flavor.mark(sid, "end-of-speech")).await.unwrap();
    // Let the echo of the last words and the mark come back.
    tokio::time::sleep(Duration::from_millis(600)).await;
    match flavor.stop(sid) {
        Some(stop) => tx.send(stop).await.unwrap(),
        None => tx.send(Message::Close(None)).await.unwrap(),
    }
    let (media, media_times, marks, clears, close) =
        tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("the server closes the call after stop")
            .unwrap();
    let _ = tx.close().await;
    CallRecord {
        sent: flavor.decode(speech),
        received: flavor.decode(&media),
        media_times,
        marks,
        clears,
        mark_sent_at,
        close,
    }
}

/// Gaps between media messages in ms, after the first second (start-up).
fn gaps_ms(times: &[Instant]) -> Vec<f64> {
    times
        .windows(2)
        .skip(50)
        .map(|w| (w[1] - w[0]).as_secs_f64() * 1000.0)
        .collect()
}

async fn call_round_trip(flavor: Flavor) {
    let server = TestServer::start(ServerOptions::default()).await;
    let speech = flavor.speech();
    let record = replay(&server, flavor, "MZ0123456789", &speech).await;

    // Paced: one 20 ms message per 20 ms, not bursts.
    let gaps = gaps_ms(&record.media_times);
    let span =
        (*record.media_times.last().unwrap() - record.media_times[50]).as_secs_f64() * 1000.0;
    let mean = span / gaps.len() as f64;
    let within = gaps.iter().filter(|g| **g < 30.0).count() as f64 / gaps.len() as f64;
    let max = gaps.iter().cloned().fold(0.0, f64::max);
    eprintln!(
        "{flavor:?}: {} media messages, mean gap {mean:.2} ms, {:.0}% under 30 ms, max {max:.1} ms, {} clears",
        record.media_times.len(),
        within * 100.0,
        record.clears
    );
    assert!((19.0..21.0).contains(&mean), "mean gap {mean} ms");
    assert!(
        within > 0.9,
        "only {:.0}% of gaps under 30 ms",
        within * 100.0
    );
    let bytes_per_message = record.received.len() / record.media_times.len();
    assert_eq!(
        bytes_per_message,
        flavor.rate() as usize / 50,
        "20 ms per message"
    );

    // The mark comes back once the audio queued before it has gone out.
    let (name, at) = record.marks.first().expect("the mark is echoed");
    assert_eq!(name, "end-of-speech");
    let mark_delay = at.duration_since(record.mark_sent_at);
    assert!(
        mark_delay < Duration::from_millis(300),
        "mark echoed after {mark_delay:?}"
    );

    // The audio is the caller's, echoed.
    let (corr, lag_ms) = common::echo_correlation(&record.sent, &record.received, flavor.rate());
    eprintln!("{flavor:?}: echo correlation {corr:.3}, lag {lag_ms:.0} ms");
    assert!(corr > 0.7, "correlation {corr}");
    assert!((40.0..400.0).contains(&lag_ms), "lag {lag_ms} ms");
    assert!(
        matches!(
            record.close,
            None | Some(None) | Some(Some(CloseCode::Normal))
        ),
        "a hang-up closes without an error: {:?}",
        record.close
    );

    let events = &server.metrics.transport_events;
    let name = format!("{flavor:?}").to_lowercase();
    assert_eq!(events.with_label_values(&[&name, "dtmf"]).get(), 1);
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    let calls = &server.metrics.calls_started;
    assert_eq!(calls.with_label_values(&[&name]).get(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twilio_call_is_echoed_paced_with_its_mark() {
    call_round_trip(Flavor::Twilio).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telnyx_call_is_echoed_paced_with_its_mark() {
    call_round_trip(Flavor::Telnyx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plivo_call_is_echoed_paced_with_its_checkpoint() {
    call_round_trip(Flavor::Plivo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vonage_call_is_echoed_paced_with_its_notify() {
    call_round_trip(Flavor::Vonage).await;
}

/// Sends `messages` after a Twilio start and returns the close frame's code and reason.
async fn close_after(server: &TestServer, path: &str, messages: Vec<Message>) -> (u16, String) {
    let (mut socket, _) = tokio_tungstenite::connect_async(ws_url(server, path))
        .await
        .unwrap();
    for message in messages {
        socket.send(message).await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    }
}

fn twilio_start() -> Message {
    Flavor::Twilio.opening("MZ1", json!({})).pop().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clean_close_or_is_counted() {
    let server = TestServer::start(ServerOptions::default()).await;
    let path = "/telephony/twilio";
    // Binary frames where Twilio sends text.
    let (code, reason) = close_after(
        &server,
        path,
        vec![twilio_start(), Message::Binary(vec![0xff; 160].into())],
    )
    .await;
    assert_eq!(code, 1003, "{reason}");
    assert!(reason.contains("binary"), "{reason}");
    // Not JSON.
    let (code, reason) = close_after(&server, path, vec![Message::Text("hello".into())]).await;
    assert_eq!(code, 1007, "{reason}");
    // Media before start.
    let (code, reason) = close_after(
        &server,
        path,
        vec![Flavor::Twilio.media("MZ1", 0, &[0xff; 160])],
    )
    .await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("before the stream started"), "{reason}");
    // An unknown voice in the custom parameters names the voices.
    let bad_voice = Flavor::Twilio
        .opening("MZ1", json!({"voice": "../../voices/x"}))
        .pop()
        .unwrap();
    let (code, reason) = close_after(&server, path, vec![bad_voice]).await;
    assert_eq!(code, 1008);
    assert!(reason.contains("unknown voice"), "{reason}");
    // Vonage audio before websocket:connected.
    let (code, _) = close_after(
        &server,
        "/telephony/vonage",
        vec![Message::Binary(vec![0; 640].into())],
    )
    .await;
    assert_eq!(code, 1008);

    // Bad base64, a wrong streamSid and unknown events are dropped, counted, and the call goes on.
    let (mut socket, _) = tokio_tungstenite::connect_async(ws_url(&server, path))
        .await
        .unwrap();
    socket.send(twilio_start()).await.unwrap();
    let bad = [
        json!({"event": "media", "streamSid": "MZ1", "media": {"payload": "!!not base64!!"}}),
        json!({"event": "media", "streamSid": "MZ-other", "media": {"payload": "//8="}}),
        json!({"event": "somethingNew", "streamSid": "MZ1"}),
    ];
    for value in bad {
        socket
            .send(Message::Text(value.to_string().into()))
            .await
            .unwrap();
    }
    socket
        .send(Flavor::Twilio.media("MZ1", 0, &[0xff; 160]))
        .await
        .unwrap();
    let mut media = 0;
    while media < 10 {
        match tokio::time::timeout(Duration::from_secs(2), socket.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => media += 1,
            other => panic!("the call did not go on: {other:?}"),
        }
    }
    let events = &server.metrics.transport_events;
    for label in ["bad_base64", "wrong_stream", "ignored"] {
        assert!(
            events.with_label_values(&["twilio", label]).get() >= 1,
            "{label} not counted"
        );
    }
    socket
        .send(Flavor::Twilio.stop("MZ1").unwrap())
        .await
        .unwrap();
    drop(socket);
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_refuses_the_upgrade_with_503() {
    let server = TestServer::start(ServerOptions {
        max_sessions: 1,
        ..Default::default()
    })
    .await;
    let (mut first, _) = tokio_tungstenite::connect_async(ws_url(&server, "/telephony/twilio"))
        .await
        .unwrap();
    first.send(twilio_start()).await.unwrap();
    assert!(
        common::eventually(Duration::from_secs(2), || server
            .state
            .engine
            .active_sessions()
            == 1)
        .await
    );
    let err = tokio_tungstenite::connect_async(ws_url(&server, "/telephony/plivo"))
        .await
        .unwrap_err();
    let tokio_tungstenite::tungstenite::Error::Http(response) = err else {
        panic!("expected an HTTP refusal, got {err:?}");
    };
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    drop(first);
    server.stop().await;
}

/// 20 Twilio-style calls at once for 60 s: paced both ways, nothing dropped beyond the drop
/// policy, no tick missed. Then 100 short calls: memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_calls_for_a_minute_then_memory_stays_flat_across_reconnects() {
    const CALLS: usize = 20;
    let seconds: u64 = std::env::var("DUPLEX_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let server = TestServer::start(ServerOptions {
        max_sessions: CALLS,
        ..Default::default()
    })
    .await;
    let speech = Flavor::Twilio.speech();
    let started = Instant::now();
    let mut calls = Vec::new();
    for idx in 0..CALLS {
        let url = ws_url(&server, "/telephony/twilio");
        let speech = speech.clone();
        calls.push(tokio::spawn(async move {
            let sid = format!("MZsoak{idx:02}");
            let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let (mut tx, mut rx) = socket.split();
            for message in Flavor::Twilio.opening(&sid, json!({})) {
                tx.send(message).await.unwrap();
            }
            let reader = tokio::spawn(async move {
                let mut received = 0usize;
                while let Some(Ok(message)) = rx.next().await {
                    if matches!(message, Message::Text(_)) {
                        received += 1;
                    }
                }
                received
            });
            let packets = seconds as usize * 50;
            let mut ticker = tokio::time::interval(Duration::from_millis(20));
            for seq in 0..packets {
                ticker.tick().await;
                let chunk = &speech[(seq % MEDIA_FRAMES) * 160..][..160];
                tx.send(Flavor::Twilio.media(&sid, seq, chunk))
                    .await
                    .unwrap();
            }
            tx.send(Flavor::Twilio.stop(&sid).unwrap()).await.unwrap();
            let received = reader.await.unwrap();
            (packets, received)
        }));
    }
    let mut sent_total = 0;
    let mut received_total = 0;
    for call in calls {
        let (sent, received) = call.await.unwrap();
        sent_total += sent;
        received_total += received;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let m = &server.metrics;
    let frames = sent_total as f64 / 4.0;
    let dropped_ms = (m.input_dropped_samples.get() + m.output_dropped_samples.get()) as f64 / 24.0;
    eprintln!(
        "soak: {CALLS} calls x {seconds} s in {elapsed:.1} s; sent {sent_total}, received {received_total} messages; \
         input underruns {}, input dropped {:.0} ms, output underruns {}, output dropped {:.0} ms, ticks overrun {}, missed {}",
        m.input_underruns.get(),
        m.input_dropped_samples.get() as f64 / 24.0,
        m.output_underruns.get(),
        m.output_dropped_samples.get() as f64 / 24.0,
        m.ticks_overrun.get(),
        m.ticks_missed.get(),
    );
    assert!(
        received_total as f64 >= 0.97 * sent_total as f64,
        "sent {sent_total}, received {received_total}"
    );
    assert_eq!(m.ticks_missed.get(), 0, "the step loop kept its clock");
    // The drop policy: each direction of each session may trim one standing packet per 2 s
    // window (a backlog that jitter never used), plus a couple at start-up and hang-up.
    // Anything beyond that is a real loss.
    let windows =
        seconds as f64 * 1000.0 / (duplex::engine::clock::TRIM_WINDOW_TICKS as f64 * 80.0);
    let policy_ms = CALLS as f64 * (windows + 2.0) * 20.0;
    for (what, samples) in [
        ("input", m.input_dropped_samples.get()),
        ("output", m.output_dropped_samples.get()),
    ] {
        let ms = samples as f64 / 24.0;
        assert!(
            ms <= policy_ms,
            "{what}: dropped {ms:.0} ms, the policy allows {policy_ms:.0} ms"
        );
    }
    let _ = dropped_ms;
    assert!(
        (m.input_underruns.get() as f64) < 0.01 * frames + 2.0 * CALLS as f64,
        "{} input underruns over {frames} frames",
        m.input_underruns.get()
    );

    // Memory: warm up, then 100 short calls, compare resident memory.
    let short_call = |idx: usize| {
        let url = ws_url(&server, "/telephony/twilio");
        async move {
            let sid = format!("MZcycle{idx}");
            let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            for message in Flavor::Twilio.opening(&sid, json!({})) {
                socket.send(message).await.unwrap();
            }
            for seq in 0..5 {
                socket
                    .send(Flavor::Twilio.media(&sid, seq, &[0xff; 160]))
                    .await
                    .unwrap();
            }
            let _ = socket.next().await;
            socket
                .send(Flavor::Twilio.stop(&sid).unwrap())
                .await
                .unwrap();
            while let Some(Ok(_)) = socket.next().await {}
        }
    };
    for idx in 0..20 {
        short_call(idx).await;
    }
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    let before = rss_kib().unwrap_or(0);
    for idx in 0..100 {
        short_call(1000 + idx).await;
    }
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    let after = rss_kib().unwrap_or(0);
    let growth_kib = after.saturating_sub(before);
    eprintln!("rss before {before} KiB, after 100 calls {after} KiB (+{growth_kib} KiB)");
    assert!(
        growth_kib < 20 * 1024,
        "resident memory grew by {growth_kib} KiB over 100 calls"
    );
    assert_eq!(server.state.live_sessions(), 0);
    server.stop().await;
}
