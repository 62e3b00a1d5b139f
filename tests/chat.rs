//! `/api/chat`, the PersonaPlex/Moshi WebSocket protocol, with a real WebSocket client on
//! loopback: handshake, Ogg/Opus both ways through the echo engine, text pieces, and clean
//! closes for malformed, oversized and text messages; admission errors before the upgrade.

mod common;

use common::{ServerOptions, TestServer, speech, ws_url};
use duplex::audio::ogg_opus::{OggOpusReader, OggOpusWriter};
use duplex::audio::opus::{EncoderConfig, MAX_PACKET_SAMPLES, OpusDecoder, OpusEncoder};
use duplex::audio::{PACKET_SAMPLES, SAMPLE_RATE};
use futures::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const SENTENCE: &str = "Good morning. Could you tell me about the weather in Paris today?";

fn chat_url(server: &TestServer, query: &str) -> String {
    ws_url(server, &format!("/api/chat?{query}"))
}

/// Encodes `pcm` as the official client does: an Ogg Opus stream, one page per 20 ms packet.
fn client_pages(pcm: &[f32]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut encoder = OpusEncoder::new(EncoderConfig::default()).unwrap();
    let mut writer = OggOpusWriter::new(0xc1, encoder.lookahead_samples().unwrap());
    let headers = writer.headers();
    let pages = pcm
        .chunks_exact(PACKET_SAMPLES)
        .map(|chunk| {
            let packet = encoder.encode(chunk).unwrap().to_vec();
            writer.page(&packet, PACKET_SAMPLES)
        })
        .collect();
    (headers, pages)
}

fn audio(bytes: &[u8]) -> Message {
    let mut message = vec![0x01];
    message.extend_from_slice(bytes);
    Message::Binary(message.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_protocol_echoes_speech_with_a_handshake_and_text() {
    let server = TestServer::start(ServerOptions::default()).await;
    let url = chat_url(
        &server,
        "voice_prompt=NATF2.pt&text_prompt=You%20enjoy%20a%20good%20conversation.&text_temperature=0.7&audio_topk=250",
    );
    let (socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let (mut tx, mut rx) = socket.split();
    // The first message is the handshake, once the persona is in place.
    let first = tokio::time::timeout(Duration::from_secs(5), rx.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first, Message::Binary(vec![0x00].into()));
    let reader = tokio::spawn(async move {
        let mut pages = OggOpusReader::new();
        let mut decoder = OpusDecoder::new().unwrap();
        let mut out = vec![0.0; MAX_PACKET_SAMPLES];
        let mut pcm = Vec::new();
        let mut text = String::new();
        let mut audio_times = Vec::new();
        while let Some(Ok(message)) = rx.next().await {
            let Message::Binary(bytes) = message else {
                break;
            };
            match bytes.first() {
                Some(0x01) => {
                    audio_times.push(Instant::now());
                    pages.push(&bytes[1..]).expect("the server's pages parse");
                    while let Some(packet) = pages.pop_packet() {
                        let n = decoder.decode(&packet, &mut out).unwrap();
                        pcm.extend_from_slice(&out[..n]);
                    }
                }
                Some(0x02) => text.push_str(std::str::from_utf8(&bytes[1..]).unwrap()),
                other => panic!("unexpected kind {other:?}"),
            }
        }
        let skip = pages.pre_skip_48k() as usize / 2;
        (pcm.split_off(skip.min(pcm.len())), text, audio_times)
    });
    let sent = speech(SENTENCE, 3.0);
    let (headers, pages) = client_pages(&sent);
    tx.send(audio(&headers)).await.unwrap();
    let mut ticker = tokio::time::interval(Duration::from_millis(20));
    // Pages go out in pairs, as opus-recorder sends them (maxFramesPerPage 2).
    for pair in pages.chunks(2) {
        ticker.tick().await;
        ticker.tick().await;
        tx.send(audio(&pair.concat())).await.unwrap();
    }
    // Silence after the speech lets the echo finish and the utterance be reported.
    let (_, quiet) = client_pages(&vec![0.0; SAMPLE_RATE as usize / 2]);
    for page in quiet {
        ticker.tick().await;
        tx.send(audio(&page)).await.unwrap();
    }
    tx.send(Message::Close(None)).await.unwrap();
    let (received, text, times) = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap()
        .unwrap();
    let (corr, lag_ms) = common::echo_correlation(&sent, &received, SAMPLE_RATE);
    let span_ms = (*times.last().unwrap() - times[1]).as_secs_f64() * 1000.0;
    let mean_gap = span_ms / (times.len() - 2) as f64;
    eprintln!(
        "chat: echo correlation {corr:.3} at {lag_ms:.0} ms; {} audio messages, mean gap {mean_gap:.2} ms; text {text:?}",
        times.len()
    );
    assert!(corr > 0.7, "correlation {corr}");
    assert!(
        (19.0..21.0).contains(&mean_gap),
        "audio paced every 20 ms: {mean_gap}"
    );
    assert!(
        text.contains("echo"),
        "the echo engine's text piece: {text:?}"
    );
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    let calls = &server.metrics.calls_started;
    assert_eq!(calls.with_label_values(&["chat"]).get(), 1);
    server.stop().await;
}

/// Sends `message` on a fresh chat and returns the close frame's code and reason.
async fn close_after(server: &TestServer, message: Message) -> (u16, String) {
    let (mut socket, _) =
        tokio_tungstenite::connect_async(chat_url(server, "voice_prompt=NATF0.pt"))
            .await
            .unwrap();
    // A server that refuses a message mid-way may reset the connection while it is still being
    // sent; the close frame (if any) is then read below.
    let _ = socket.send(message).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Ok(Some(Ok(_))) => continue,
            // The socket dropped without a close frame.
            Ok(Some(Err(_)) | None) => return (1006, String::new()),
            Err(_) => panic!("no close"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_oversized_and_text_messages_get_a_clean_close() {
    let server = TestServer::start(ServerOptions::default()).await;
    let (code, reason) = close_after(&server, audio(b"OggS but not really a page.....")).await;
    assert_eq!(code, 1007, "{reason}");
    assert!(reason.contains("Ogg"), "{reason}");
    let (code, reason) = close_after(&server, audio(&vec![0u8; 100 * 1024])).await;
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("limit"), "{reason}");
    let (code, reason) = close_after(&server, Message::Text("hello".into())).await;
    assert_eq!(code, 1003, "{reason}");
    // Beyond the WebSocket layer's own limit: the connection ends, the server stays up.
    let (code, _) = close_after(&server, audio(&vec![0u8; 3 * 1024 * 1024])).await;
    assert!(code == 1009 || code == 1006, "code {code}");
    // Unknown kinds are ignored and counted; the session goes on.
    let (mut socket, _) = tokio_tungstenite::connect_async(chat_url(&server, ""))
        .await
        .unwrap();
    socket
        .send(Message::Binary(vec![0x06].into()))
        .await
        .unwrap();
    socket
        .send(Message::Binary(vec![0x03, 0x01].into()))
        .await
        .unwrap();
    for _ in 0..5 {
        let message = tokio::time::timeout(Duration::from_secs(2), socket.next())
            .await
            .unwrap();
        assert!(
            matches!(message, Some(Ok(Message::Binary(_)))),
            "{message:?}"
        );
    }
    assert!(
        server
            .metrics
            .transport_events
            .with_label_values(&["chat", "ignored"])
            .get()
            >= 2
    );
    drop(socket);
    assert!(server.sessions_end_within(Duration::from_secs(3)).await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_errors_come_before_the_upgrade() {
    let server = TestServer::start(ServerOptions {
        max_sessions: 1,
        ..Default::default()
    })
    .await;
    let refusal = |url: String| async move {
        match tokio_tungstenite::connect_async(url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response,
            other => panic!("expected an HTTP refusal, got {:?}", other.map(|_| ())),
        }
    };
    let response = refusal(chat_url(&server, "voice_prompt=../../etc/passwd")).await;
    assert_eq!(response.status(), 400);
    let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
    assert!(
        body.contains("unknown voice") && body.contains("NATF2"),
        "{body}"
    );
    let (first, _) = tokio_tungstenite::connect_async(chat_url(&server, ""))
        .await
        .unwrap();
    let response = refusal(chat_url(&server, "")).await;
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    drop(first);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_server_takes_the_token_in_the_query() {
    let server = TestServer::start(ServerOptions {
        token: Some("sesame".into()),
        ..Default::default()
    })
    .await;
    match tokio_tungstenite::connect_async(chat_url(&server, "voice_prompt=NATF0")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }
    let (mut socket, _) =
        tokio_tungstenite::connect_async(chat_url(&server, "voice_prompt=NATF0&token=sesame"))
            .await
            .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first, Message::Binary(vec![0x00].into()));
    drop(socket);
    server.stop().await;
}
