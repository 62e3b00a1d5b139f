//! The PersonaPlex/Moshi WebSocket protocol at `/api/chat`, so the official web client and
//! Kyutai's clients work unchanged.
//!
//! Every message is binary and its first byte is the kind: `0x00` handshake (sent once the
//! persona is in place), `0x01` audio (Ogg pages carrying 24 kHz mono Opus, both ways), `0x02`
//! text (UTF-8 pieces of the agent's inner monologue). Other kinds are ignored and counted. The
//! query parameters `voice_prompt` (a voice *name* such as `NATF2.pt`, looked up in the catalog,
//! never used as a path) and `text_prompt` choose the persona.
//!
//! Framing is pure functions over bytes; [`run`] is the session, generic over a `Sink` and a
//! `Stream` of messages so tests drive it through channels. Output is paced on the engine's
//! 20 ms grid like the WebRTC path; bad input closes the socket with a reason.

use super::outbound::{PacketSource, close_reason, packet_ticker};
use super::{ApiError, AppState};
use crate::audio::ogg_opus::{OggOpusError, OggOpusReader, OggOpusWriter};
use crate::audio::opus::{EncoderConfig, MAX_PACKET_SAMPLES, OpusDecoder, OpusEncoder};
use crate::audio::ring::{InputProducer, OutputConsumer};
use crate::audio::{PACKET_SAMPLES, SAMPLE_RATE};
use crate::engine::session::SessionCloser;
use crate::engine::{PersonaRequest, SessionEvent, SessionHandle, SessionId, SessionStats};
use crate::metrics::Metrics;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use crossbeam_channel::{Receiver, TryRecvError};
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use std::fmt::Display;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Message kinds (first byte).
pub const KIND_HANDSHAKE: u8 = 0x00;
pub const KIND_AUDIO: u8 = 0x01;
pub const KIND_TEXT: u8 = 0x02;
/// The largest message the session accepts; a client's 20–40 ms pages are a few hundred bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// The WebSocket layer's own limit (larger, so the session can close with a clear reason).
pub const MAX_TRANSPORT_BYTES: usize = 1024 * 1024;
/// A client that does not read for this long is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// The metrics label of this transport.
const TRANSPORT: &str = "chat";

/// Close codes (RFC 6455 §7.4.1).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const UNSUPPORTED: u16 = 1003;
    pub const INVALID_DATA: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
}

/// The query of `/api/chat` as the official client sends it (other parameters it sends —
/// temperatures, seeds — are accepted and ignored).
#[derive(Debug, Default, Deserialize)]
pub struct ChatQuery {
    pub voice_prompt: Option<String>,
    pub text_prompt: Option<String>,
    /// Bearer token, for clients that cannot set headers (browsers).
    pub token: Option<String>,
}

impl ChatQuery {
    pub fn persona(&self) -> PersonaRequest {
        PersonaRequest {
            voice: self.voice_prompt.clone(),
            prompt: self.text_prompt.clone(),
        }
    }
}

/// A client message, by kind.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    /// Ogg pages (or pieces of them).
    Audio(&'a [u8]),
    /// A kind this server does not act on (handshake, control, metadata, ping, …).
    Other(u8),
    /// A message with no kind byte.
    Empty,
}

pub fn parse_client(bytes: &[u8]) -> ClientMessage<'_> {
    match bytes.split_first() {
        None => ClientMessage::Empty,
        Some((&KIND_AUDIO, payload)) => ClientMessage::Audio(payload),
        Some((&kind, _)) => ClientMessage::Other(kind),
    }
}

/// The handshake: the single byte 0x00, as the official server sends it.
pub fn handshake() -> Vec<u8> {
    vec![KIND_HANDSHAKE]
}

/// An audio message carrying `pages`.
pub fn audio_message(pages: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(pages.len() + 1);
    message.push(KIND_AUDIO);
    message.extend_from_slice(pages);
    message
}

/// A text message carrying `piece`.
pub fn text_message(piece: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(piece.len() + 1);
    message.push(KIND_TEXT);
    message.extend_from_slice(piece.as_bytes());
    message
}

/// `GET /api/chat`: admits the session (400 for a bad persona, 503 + Retry-After when full)
/// before upgrading, then runs it.
pub async fn chat(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<ChatQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let admitted = admit(&state, &headers, &query);
    let session = match admitted {
        Ok(session) => session,
        Err(err) => {
            state
                .engine
                .metrics()
                .sessions_rejected
                .with_label_values(&[err.reason()])
                .inc();
            tracing::info!(reason = err.reason(), %err, "chat refused");
            return err.into_response();
        }
    };
    let id = session.id;
    let (cancel, tracked) = state.track_guard(id);
    let task = ChatTask::new(session, &state, cancel);
    let task_metrics = state.engine.metrics().clone();
    upgrade
        .max_message_size(MAX_TRANSPORT_BYTES)
        .max_frame_size(MAX_TRANSPORT_BYTES)
        .on_upgrade(move |socket: WebSocket| async move {
            let _call = task_metrics.call("chat");
            let (sink, stream) = socket.split();
            let ending = run(sink, stream, task).await;
            tracing::info!(session = %id, ?ending, "chat ended");
            drop(tracked);
        })
        .into_response()
}

fn admit(
    state: &AppState,
    headers: &HeaderMap,
    query: &ChatQuery,
) -> Result<SessionHandle, ApiError> {
    if state.is_draining() {
        return Err(ApiError::Draining);
    }
    super::routes::authorize_with_query(state, headers, query.token.as_deref())?;
    Ok(state.engine.open_session(&query.persona())?)
}

/// Everything one `/api/chat` session owns.
pub struct ChatTask {
    pub id: SessionId,
    pub input: InputProducer,
    pub output: OutputConsumer,
    pub events: Receiver<SessionEvent>,
    pub stats: Arc<SessionStats>,
    pub closer: SessionCloser,
    pub schedule: (Instant, Duration),
    pub cancel: CancellationToken,
    pub metrics: Arc<Metrics>,
}

impl ChatTask {
    pub fn new(session: SessionHandle, state: &AppState, cancel: CancellationToken) -> Self {
        Self {
            id: session.id,
            input: session.input,
            output: session.output,
            events: session.events,
            stats: session.stats,
            closer: session.closer,
            schedule: state.engine.output_schedule(),
            cancel,
            metrics: state.engine.metrics().clone(),
        }
    }
}

/// How a chat session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChatEnding {
    /// The client closed the socket (or it dropped).
    ClientClosed,
    /// The client sent something the protocol does not allow; closed with `code` and `reason`.
    BadInput { code: u16, reason: String },
    /// The engine refused or dropped the session.
    Engine(String),
    /// The client stopped reading.
    Stalled,
    /// Ended by the server (shutdown or DELETE).
    Cancelled,
}

/// Runs one session over `sink`/`stream` until either side ends it, then closes the socket
/// with a reason and frees the slot.
pub async fn run<S, R, E>(mut sink: S, mut stream: R, task: ChatTask) -> ChatEnding
where
    S: Sink<Message> + Unpin,
    S::Error: Display,
    R: Stream<Item = Result<Message, E>> + Unpin,
    E: Display,
{
    let ChatTask {
        id,
        input,
        output,
        events,
        stats,
        closer,
        schedule,
        cancel,
        metrics,
    } = task;
    let (encoder, decoder) = match (OpusEncoder::new(EncoderConfig::agent()), OpusDecoder::new()) {
        (Ok(e), Ok(d)) => (e, d),
        (Err(err), _) | (_, Err(err)) => {
            tracing::error!(session = %id, %err, "cannot create the Opus codec");
            let _ = sink
                .send(close(close_code::INTERNAL, "internal error"))
                .await;
            return ChatEnding::Engine(err.to_string());
        }
    };
    let mut outbound = Outbound::new(output, encoder, id);
    let mut inbound = Inbound::new(input, decoder);
    let ending = {
        let send_side = outbound.run(&mut sink, &events, &stats, &metrics, schedule);
        let receive_side = inbound.run(&mut stream, &stats, &metrics);
        tokio::select! {
            ending = send_side => ending,
            ending = receive_side => ending,
            _ = cancel.cancelled() => ChatEnding::Cancelled,
        }
    };
    let frame = match &ending {
        ChatEnding::ClientClosed | ChatEnding::Stalled => None,
        ChatEnding::BadInput { code, reason } => {
            metrics.transport_event(TRANSPORT, "bad_input");
            Some(close(*code, reason))
        }
        ChatEnding::Engine(reason) => Some(close(close_code::INTERNAL, reason)),
        ChatEnding::Cancelled => Some(close(close_code::GOING_AWAY, "the session was ended")),
    };
    if let Some(frame) = frame {
        let _ = tokio::time::timeout(SEND_TIMEOUT, sink.send(frame)).await;
    }
    let _ = tokio::time::timeout(SEND_TIMEOUT, sink.close()).await;
    drop(closer);
    tracing::debug!(session = %id, stats = ?stats.snapshot(), "chat session closed");
    ending
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: close_reason(reason).into(),
    }))
}

/// The agent's side: handshake, text, and one Ogg page of Opus every 20 ms.
struct Outbound {
    source: PacketSource,
    encoder: OpusEncoder,
    writer: OggOpusWriter,
    ready: bool,
}

impl Outbound {
    fn new(output: OutputConsumer, mut encoder: OpusEncoder, id: SessionId) -> Self {
        let lookahead = encoder.lookahead_samples().unwrap_or(0);
        Self {
            source: PacketSource::new(output),
            encoder,
            writer: OggOpusWriter::new(id.0 as u32, lookahead),
            ready: false,
        }
    }

    async fn run<S>(
        &mut self,
        sink: &mut S,
        events: &Receiver<SessionEvent>,
        stats: &SessionStats,
        metrics: &Metrics,
        schedule: (Instant, Duration),
    ) -> ChatEnding
    where
        S: Sink<Message> + Unpin,
        S::Error: Display,
    {
        let mut ticker = packet_ticker(schedule);
        loop {
            ticker.tick().await;
            loop {
                let message = match events.try_recv() {
                    Ok(SessionEvent::Ready) if !self.ready => {
                        self.ready = true;
                        if let Err(ending) = send(sink, handshake()).await {
                            return ending;
                        }
                        audio_message(&self.writer.headers())
                    }
                    Ok(SessionEvent::Ready) => continue,
                    Ok(SessionEvent::Text(piece)) => text_message(&piece),
                    Ok(SessionEvent::Error(reason)) => return ChatEnding::Engine(reason),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        return ChatEnding::Engine("the engine stopped".into());
                    }
                };
                if let Err(ending) = send(sink, message).await {
                    return ending;
                }
            }
            if !self.ready {
                continue;
            }
            self.source.wait_for_late_output().await;
            let pcm = self.source.next_packet(stats, metrics);
            let Ok(packet) = self.encoder.encode(pcm) else {
                continue;
            };
            let page = self.writer.page(packet, PACKET_SAMPLES);
            if let Err(ending) = send(sink, audio_message(&page)).await {
                return ending;
            }
        }
    }
}

async fn send<S>(sink: &mut S, bytes: Vec<u8>) -> Result<(), ChatEnding>
where
    S: Sink<Message> + Unpin,
    S::Error: Display,
{
    match tokio::time::timeout(SEND_TIMEOUT, sink.send(Message::Binary(bytes.into()))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(ChatEnding::ClientClosed),
        Err(_) => Err(ChatEnding::Stalled),
    }
}

/// The user's side: Ogg pages → Opus packets → 24 kHz PCM → the input ring.
struct Inbound {
    input: InputProducer,
    reader: OggOpusReader,
    decoder: OpusDecoder,
    pcm: Vec<f32>,
    /// 24 kHz samples still to drop for the stream's pre-skip.
    skip_samples: usize,
    stream_started: bool,
}

impl Inbound {
    fn new(input: InputProducer, decoder: OpusDecoder) -> Self {
        Self {
            input,
            reader: OggOpusReader::new(),
            decoder,
            pcm: vec![0.0; MAX_PACKET_SAMPLES],
            skip_samples: 0,
            stream_started: false,
        }
    }

    async fn run<R, E>(
        &mut self,
        stream: &mut R,
        stats: &SessionStats,
        metrics: &Metrics,
    ) -> ChatEnding
    where
        R: Stream<Item = Result<Message, E>> + Unpin,
        E: Display,
    {
        while let Some(message) = stream.next().await {
            let bytes = match message {
                Ok(Message::Binary(bytes)) => bytes,
                Ok(Message::Text(_)) => {
                    return ChatEnding::BadInput {
                        code: close_code::UNSUPPORTED,
                        reason: "text frames are not part of the protocol: send binary messages whose first byte is the kind".into(),
                    };
                }
                Ok(Message::Close(_)) => return ChatEnding::ClientClosed,
                Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                Err(err) => return transport_error(&err.to_string()),
            };
            if bytes.len() > MAX_MESSAGE_BYTES {
                return ChatEnding::BadInput {
                    code: close_code::TOO_BIG,
                    reason: format!(
                        "a message of {} bytes exceeds the limit of {MAX_MESSAGE_BYTES}",
                        bytes.len()
                    ),
                };
            }
            match parse_client(&bytes) {
                ClientMessage::Audio(pages) => {
                    if let Err(err) = self.pages(pages, stats, metrics) {
                        return ChatEnding::BadInput {
                            code: close_code::INVALID_DATA,
                            reason: err.to_string(),
                        };
                    }
                }
                ClientMessage::Other(_) | ClientMessage::Empty => {
                    metrics.transport_event(TRANSPORT, "ignored");
                }
            }
        }
        ChatEnding::ClientClosed
    }

    fn pages(
        &mut self,
        pages: &[u8],
        stats: &SessionStats,
        metrics: &Metrics,
    ) -> Result<(), OggOpusError> {
        self.reader.push(pages)?;
        if !self.stream_started && self.reader.channels() > 0 {
            self.stream_started = true;
            self.skip_samples = self.reader.pre_skip_48k() as usize * SAMPLE_RATE as usize / 48_000;
        }
        while let Some(packet) = self.reader.pop_packet() {
            stats.add(&stats.packets_received, 1);
            metrics.packets_received.inc();
            let decoded = match self.decoder.decode(&packet, &mut self.pcm) {
                Ok(n) => n,
                Err(_) => {
                    stats.add(&stats.packets_bad, 1);
                    metrics.packets_bad.inc();
                    continue;
                }
            };
            let skip = self.skip_samples.min(decoded);
            self.skip_samples -= skip;
            let overflow = self.input.push(&self.pcm[skip..decoded]) as u64;
            stats.add(&stats.input_overflow_samples, overflow);
        }
        Ok(())
    }
}

/// A read error from the WebSocket layer: an oversized message gets its own close reason.
fn transport_error(error: &str) -> ChatEnding {
    let lower = error.to_ascii_lowercase();
    if lower.contains("too long") || lower.contains("too big") || lower.contains("space limit") {
        ChatEnding::BadInput {
            code: close_code::TOO_BIG,
            reason: format!("message too big: {error}"),
        }
    } else {
        ChatEnding::ClientClosed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EchoEngine, EngineConfig, EngineHandle};
    use crate::gateway::GatewayConfig;
    use futures::channel::mpsc;
    use std::convert::Infallible;

    #[test]
    fn framing_is_one_kind_byte_then_the_payload() {
        assert_eq!(handshake(), vec![0]);
        assert_eq!(text_message(" hi"), b"\x02 hi".to_vec());
        assert_eq!(audio_message(b"OggS"), b"\x01OggS".to_vec());
        assert_eq!(parse_client(b"\x01abc"), ClientMessage::Audio(b"abc"));
        assert_eq!(parse_client(b"\x03\x00"), ClientMessage::Other(3));
        assert_eq!(parse_client(b""), ClientMessage::Empty);
    }

    #[test]
    fn query_maps_to_a_persona_by_name() {
        let query: ChatQuery = serde_urlencoded_like("voice_prompt=NATF2.pt&text_prompt=Be+kind");
        let persona = query.persona();
        assert_eq!(persona.voice.as_deref(), Some("NATF2.pt"));
        assert_eq!(persona.prompt.as_deref(), Some("Be kind"));
    }

    fn serde_urlencoded_like(query: &str) -> ChatQuery {
        let uri: axum::http::Uri = format!("/api/chat?{query}").parse().unwrap();
        Query::<ChatQuery>::try_from_uri(&uri).unwrap().0
    }

    struct Harness {
        to_session: mpsc::UnboundedSender<Result<Message, Infallible>>,
        from_session: mpsc::UnboundedReceiver<Message>,
        task: tokio::task::JoinHandle<ChatEnding>,
        state: Arc<AppState>,
    }

    fn start() -> Harness {
        let engine = EngineHandle::start(
            EchoEngine::new(2, 1),
            EngineConfig::default(),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let state = AppState::new(engine, GatewayConfig::default());
        let session = state
            .engine
            .open_session(&PersonaRequest::default())
            .unwrap();
        let task = ChatTask::new(session, &state, CancellationToken::new());
        let (to_session, stream) = mpsc::unbounded();
        let (sink, from_session) = mpsc::unbounded();
        let task = tokio::spawn(run(sink, stream, task));
        Harness {
            to_session,
            from_session,
            task,
            state,
        }
    }

    async fn next_binary(rx: &mut mpsc::UnboundedReceiver<Message>) -> Vec<u8> {
        match tokio::time::timeout(Duration::from_secs(3), rx.next()).await {
            Ok(Some(Message::Binary(bytes))) => bytes.to_vec(),
            Ok(Some(other)) => panic!("unexpected {other:?}"),
            _ => panic!("no message"),
        }
    }

    async fn close_frame(rx: &mut mpsc::UnboundedReceiver<Message>) -> (u16, String) {
        loop {
            match tokio::time::timeout(Duration::from_secs(3), rx.next()).await {
                Ok(Some(Message::Close(Some(frame)))) => {
                    return (frame.code, frame.reason.to_string());
                }
                Ok(Some(_)) => continue,
                _ => panic!("no close frame"),
            }
        }
    }

    #[tokio::test]
    async fn handshake_then_headers_then_pages_every_20_ms() {
        let mut h = start();
        assert_eq!(next_binary(&mut h.from_session).await, vec![0]);
        let headers = next_binary(&mut h.from_session).await;
        assert_eq!(headers[0], KIND_AUDIO);
        assert!(headers.windows(8).any(|w| w == b"OpusHead"));
        let started = Instant::now();
        for _ in 0..10 {
            let page = next_binary(&mut h.from_session).await;
            assert_eq!(&page[..5], b"\x01OggS");
        }
        // Nine intervals after the first page: 180 ms when paced. The bounds leave a late tick
        // (the ticker then catches up) and a slow machine room, and still fail a burst or a
        // pace twice as fast.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(130) && elapsed < Duration::from_millis(400),
            "10 pages took {elapsed:?}"
        );
        drop(h.to_session);
        assert_eq!(h.task.await.unwrap(), ChatEnding::ClientClosed);
        h.state.engine.shutdown();
    }

    #[tokio::test]
    async fn text_frames_close_with_a_reason() {
        let mut h = start();
        h.to_session
            .unbounded_send(Ok(Message::Text("hello".into())))
            .unwrap();
        let (code, reason) = close_frame(&mut h.from_session).await;
        assert_eq!(code, close_code::UNSUPPORTED);
        assert!(reason.contains("binary"), "{reason}");
        assert!(matches!(h.task.await.unwrap(), ChatEnding::BadInput { .. }));
        h.state.engine.shutdown();
    }

    #[tokio::test]
    async fn malformed_pages_and_oversized_messages_close_with_a_reason() {
        for (message, want_code, want) in [
            (
                audio_message(b"not an ogg page at all"),
                close_code::INVALID_DATA,
                "Ogg",
            ),
            (
                vec![KIND_AUDIO; MAX_MESSAGE_BYTES + 1],
                close_code::TOO_BIG,
                "exceeds",
            ),
        ] {
            let mut h = start();
            h.to_session
                .unbounded_send(Ok(Message::Binary(message.into())))
                .unwrap();
            let (code, reason) = close_frame(&mut h.from_session).await;
            assert_eq!(code, want_code, "{reason}");
            assert!(reason.contains(want), "{reason}");
            h.task.await.unwrap();
            assert_eq!(
                h.state
                    .engine
                    .metrics()
                    .transport_events
                    .with_label_values(&[TRANSPORT, "bad_input"])
                    .get(),
                1
            );
            h.state.engine.shutdown();
        }
    }

    #[tokio::test]
    async fn other_kinds_are_ignored_and_counted() {
        let mut h = start();
        for message in [vec![], vec![0x03, 0x00], vec![0x06], vec![0x00]] {
            h.to_session
                .unbounded_send(Ok(Message::Binary(message.into())))
                .unwrap();
        }
        assert_eq!(next_binary(&mut h.from_session).await, vec![0]);
        let metrics = h.state.engine.metrics().clone();
        let ignored = || {
            metrics
                .transport_events
                .with_label_values(&[TRANSPORT, "ignored"])
                .get()
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while ignored() < 4 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(ignored(), 4);
        assert!(!h.task.is_finished());
        h.task.abort();
        h.state.engine.shutdown();
    }
}
