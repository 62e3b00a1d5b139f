//! Telephony media streams over WebSocket: Twilio, Telnyx, Plivo and Vonage at
//! `/telephony/{twilio,telnyx,plivo,vonage}`, each a small [`Provider`] (a serializer: parse one
//! inbound message into a [`CallEvent`], encode media, mark acknowledgements and clears) over
//! one transport, [`run_call`].
//!
//! The bridge turns the provider's audio (G.711 µ-law/A-law or 16-bit PCM at 8, 16 or 24 kHz)
//! into 24 kHz PCM for the session and back, sends the agent's audio paced on the engine's
//! 20 ms grid (never in bursts, so the provider's buffer stays short), sends the provider's
//! clear message when the caller starts speaking over the agent, echoes playback marks once the
//! audio sent before them has gone out, and counts DTMF digits. The start message's custom
//! parameters `voice` and `prompt` choose the persona (and `token`, where the server has one).

mod plivo;
mod telnyx;
mod twilio;
mod vonage;

pub use plivo::Plivo;
pub use telnyx::Telnyx;
pub use twilio::Twilio;
pub use vonage::Vonage;

pub use super::wire::{Codec, WireFormat};
use super::wire::{InboundAudio, OutboundAudio};

use super::outbound::{PacketSource, close_reason, packet_ticker};
use super::{ApiError, AppState};
use crate::audio::ring::InputProducer;
use crate::engine::session::SessionCloser;
use crate::engine::{PersonaRequest, SessionEvent, SessionHandle, SessionId, SessionStats};
use crate::metrics::Metrics;
use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use crossbeam_channel::TryRecvError;
use futures::{Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use std::collections::{BTreeMap, VecDeque};
use std::fmt::Display;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The largest message accepted from a provider (Telnyx may send up to 30 s chunks of base64
/// audio in one message, far below this; a 20 ms frame is a few hundred bytes).
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// A provider that does not read for this long is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Marks echoed recently, remembered so a provider's acknowledgement of our echo is not
/// echoed again.
const MAX_REMEMBERED_MARKS: usize = 64;
/// Marks waiting for their audio to go out.
const MAX_PENDING_MARKS: usize = 256;

/// The routes of every provider.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/telephony/twilio", get(accept::<Twilio>))
        .route("/telephony/telnyx", get(accept::<Telnyx>))
        .route("/telephony/plivo", get(accept::<Plivo>))
        .route("/telephony/vonage", get(accept::<Vonage>))
}

/// One inbound message, as the bridge sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallEvent {
    /// The provider connected (no reply needed).
    Connected,
    /// The stream started: its id, the custom parameters and the audio format.
    Start {
        stream_id: String,
        params: BTreeMap<String, String>,
        format: WireFormat,
    },
    /// Audio in the wire format.
    Media(Vec<u8>),
    /// A playback marker: acknowledged once the audio sent before it has gone out.
    Mark(String),
    /// The provider acknowledging that a marker we sent has played.
    Played(String),
    /// A keypad digit.
    Dtmf(String),
    /// The call ended.
    Stop,
    /// A message this bridge does not act on, by its event name.
    Ignored(String),
}

/// What the bridge sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
}

/// Why an inbound message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("{0}")]
    BinaryNotAllowed(&'static str),
    #[error("{0}")]
    TextNotAllowed(&'static str),
    #[error("not a JSON message: {0}")]
    BadJson(String),
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("media payload is not valid base64")]
    BadBase64,
    #[error("message for stream {got:?}, but this stream is {expected:?}")]
    WrongStream { expected: String, got: String },
    #[error("{0} before the stream started")]
    BeforeStart(&'static str),
    #[error("unsupported audio format: {0}")]
    Format(String),
}

impl ProtocolError {
    /// Whether the call cannot go on (the peer is not speaking the protocol). Other errors drop
    /// the one message, are counted and logged, as providers do with a bad message.
    pub fn is_fatal(&self) -> bool {
        !matches!(self, Self::BadBase64 | Self::WrongStream { .. })
    }

    /// The close code for a fatal error.
    pub fn close_code(&self) -> u16 {
        match self {
            Self::BinaryNotAllowed(_) | Self::TextNotAllowed(_) => 1003,
            Self::BadJson(_) | Self::BadBase64 | Self::Format(_) => 1007,
            _ => 1008,
        }
    }

    /// A short name for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::BinaryNotAllowed(_) => "binary_frame",
            Self::TextNotAllowed(_) => "text_frame",
            Self::BadJson(_) => "bad_json",
            Self::Missing(_) => "missing_field",
            Self::BadBase64 => "bad_base64",
            Self::WrongStream { .. } => "wrong_stream",
            Self::BeforeStart(_) => "before_start",
            Self::Format(_) => "bad_format",
        }
    }
}

/// One provider's message format. Parsing keeps the stream id from `start` and checks it on
/// later messages; encoding uses it.
pub trait Provider: Send + 'static {
    /// The path segment and metrics label: `twilio`, `telnyx`, `plivo`, `vonage`.
    const NAME: &'static str;

    fn new() -> Self;
    /// Parses a text frame.
    fn parse_text(&mut self, text: &str) -> Result<CallEvent, ProtocolError>;
    /// Parses a binary frame (only Vonage carries audio in them).
    fn parse_binary(&mut self, _bytes: &[u8]) -> Result<CallEvent, ProtocolError> {
        Err(ProtocolError::BinaryNotAllowed(
            "binary frames are not accepted; send JSON text messages",
        ))
    }
    /// One packet of agent audio in the wire format.
    fn media(&self, payload: &[u8], format: WireFormat) -> Frame;
    /// The acknowledgement of marker `name`, once played.
    fn mark_played(&self, name: &str) -> Frame;
    /// Flushes the provider's playback buffer (barge-in).
    fn clear(&self) -> Frame;
}

/// Optional token in the WebSocket URL.
#[derive(Debug, Default, Deserialize)]
pub struct TelephonyQuery {
    pub token: Option<String>,
}

async fn accept<P: Provider>(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<TelephonyQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Err(err) = admit(&state) {
        state
            .engine
            .metrics()
            .sessions_rejected
            .with_label_values(&[err.reason()])
            .inc();
        return err.into_response();
    }
    // Twilio cannot put a token in a header or the URL: without one here, the start message's
    // custom parameter `token` must carry it.
    let authorized =
        super::routes::authorize_with_query(&state, &headers, query.token.as_deref()).is_ok();
    let context = CallContext {
        state: state.clone(),
        authorized,
    };
    upgrade
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| async move {
            let (sink, stream) = socket.split();
            let summary = run_call(P::new(), sink, stream, context).await;
            tracing::info!(provider = P::NAME, ?summary, "call ended");
        })
        .into_response()
}

/// Refuses the upgrade while the server is draining, full, failing or behind real time (503 +
/// Retry-After).
fn admit(state: &AppState) -> Result<(), ApiError> {
    if state.is_draining() {
        return Err(ApiError::Draining);
    }
    Ok(state.engine.admits()?)
}

/// What a call needs from the server.
#[derive(Clone)]
pub struct CallContext {
    pub state: Arc<AppState>,
    /// The upgrade request carried the server's token (or none is required).
    pub authorized: bool,
}

/// How a call ended and what happened in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallSummary {
    pub stream_id: Option<String>,
    pub session: Option<SessionId>,
    pub ending: CallEnding,
    /// DTMF digits in the order pressed.
    pub dtmf: String,
    pub marks_echoed: usize,
    pub clears_sent: usize,
    pub media_in: usize,
    pub media_out: usize,
    pub ignored: usize,
    pub dropped_messages: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum CallEnding {
    /// The provider sent `stop` or closed the socket.
    #[default]
    Hangup,
    /// Bad input closed the call with this code and reason.
    Refused { code: u16, reason: String },
    /// The engine refused or dropped the session.
    Engine(String),
    /// The provider stopped reading.
    Stalled,
    /// Ended by the server (shutdown or DELETE).
    Cancelled,
}

/// Runs one call over `sink`/`stream` until it ends; the session opens at `start`.
pub async fn run_call<P, S, R, E>(
    mut provider: P,
    mut sink: S,
    mut stream: R,
    context: CallContext,
) -> CallSummary
where
    P: Provider,
    S: Sink<Message> + Unpin,
    S::Error: Display,
    R: Stream<Item = Result<Message, E>> + Unpin,
    E: Display,
{
    let state = context.state.clone();
    let metrics = state.engine.metrics().clone();
    let mut summary = CallSummary::default();
    let shutdown = state.shutdown.child_token();
    // Until `start`: only connected/ignored messages are fine.
    let (session, format) = loop {
        let message = tokio::select! {
            message = stream.next() => message,
            _ = shutdown.cancelled() => {
                summary.ending = CallEnding::Cancelled;
                break None;
            }
        };
        let Some(event) = next_event(&mut provider, message, &mut summary, &metrics, P::NAME)
        else {
            break None;
        };
        match event {
            CallEvent::Start {
                stream_id,
                params,
                format,
            } => {
                summary.stream_id = Some(stream_id);
                match open(&context, &params) {
                    Ok(session) => break Some((session, format)),
                    Err((code, reason)) => {
                        summary.ending = CallEnding::Refused { code, reason };
                        break None;
                    }
                }
            }
            CallEvent::Connected => {}
            CallEvent::Ignored(_) => summary.ignored += 1,
            CallEvent::Stop => break None,
            CallEvent::Media(_) => {
                summary.ending = refusal(ProtocolError::BeforeStart("media"), &metrics, P::NAME);
                break None;
            }
            CallEvent::Mark(_) | CallEvent::Played(_) | CallEvent::Dtmf(_) => {
                summary.ending = refusal(
                    ProtocolError::BeforeStart("mark or dtmf"),
                    &metrics,
                    P::NAME,
                );
                break None;
            }
        }
    }
    .map_or((None, None), |(s, f)| (Some(s), Some(f)));
    if let (Some(session), Some(format)) = (session, format) {
        let id = session.id;
        summary.session = Some(id);
        let _call = metrics.call(P::NAME);
        let (cancel, _tracked) = state.track_guard(id);
        tracing::info!(provider = P::NAME, session = %id, stream = ?summary.stream_id, ?format, "call started");
        let mut call = match Call::new(session, format) {
            Ok(call) => call,
            Err(reason) => {
                summary.ending = CallEnding::Refused { code: 1007, reason };
                let _ = finish(&mut sink, &summary.ending).await;
                return summary;
            }
        };
        summary.ending = call
            .run(
                &mut provider,
                &mut sink,
                &mut stream,
                &mut summary,
                &metrics,
                &cancel,
                &shutdown,
                &state,
            )
            .await;
        drop(call);
    }
    let _ = finish(&mut sink, &summary.ending).await;
    summary
}

/// Sends the close frame for `ending` and closes the sink.
async fn finish<S>(sink: &mut S, ending: &CallEnding) -> Result<(), ()>
where
    S: Sink<Message> + Unpin,
{
    let frame = match ending {
        CallEnding::Hangup | CallEnding::Stalled => None,
        CallEnding::Refused { code, reason } => Some((*code, reason.as_str())),
        CallEnding::Engine(reason) => Some((1011, reason.as_str())),
        CallEnding::Cancelled => Some((1001, "the call was ended by the server")),
    };
    if let Some((code, reason)) = frame {
        let close = Message::Close(Some(CloseFrame {
            code,
            reason: close_reason(reason).into(),
        }));
        let _ = tokio::time::timeout(SEND_TIMEOUT, sink.send(close)).await;
    }
    let _ = tokio::time::timeout(SEND_TIMEOUT, sink.close()).await;
    Ok(())
}

fn refusal(err: ProtocolError, metrics: &Metrics, provider: &str) -> CallEnding {
    metrics.transport_event(provider, err.label());
    CallEnding::Refused {
        code: err.close_code(),
        reason: err.to_string(),
    }
}

/// Reads the next message into an event. `None` ends the call (hang-up or a fatal error,
/// recorded in `summary`); non-fatal errors are counted and skipped.
fn next_event<P: Provider, E: Display>(
    provider: &mut P,
    message: Option<Result<Message, E>>,
    summary: &mut CallSummary,
    metrics: &Metrics,
    name: &str,
) -> Option<CallEvent> {
    let parsed = match message {
        None | Some(Ok(Message::Close(_))) => return None,
        Some(Err(err)) => {
            let text = err.to_string();
            if text.contains("too long") || text.contains("too big") || text.contains("limit") {
                summary.ending = CallEnding::Refused {
                    code: 1009,
                    reason: format!("message too big: {text}"),
                };
                metrics.transport_event(name, "too_big");
            }
            return None;
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(CallEvent::Ignored("ping".into())),
        Some(Ok(Message::Text(text))) => provider.parse_text(&text),
        Some(Ok(Message::Binary(bytes))) => provider.parse_binary(&bytes),
    };
    match parsed {
        Ok(CallEvent::Ignored(kind)) => {
            metrics.transport_event(name, "ignored");
            tracing::debug!(provider = name, kind, "ignored message");
            Some(CallEvent::Ignored(kind))
        }
        Ok(event) => Some(event),
        Err(err) if err.is_fatal() => {
            tracing::info!(provider = name, %err, "closing the call");
            summary.ending = refusal(err, metrics, name);
            None
        }
        Err(err) => {
            tracing::warn!(provider = name, %err, "message dropped");
            metrics.transport_event(name, err.label());
            summary.dropped_messages += 1;
            Some(CallEvent::Ignored(err.label().into()))
        }
    }
}

/// Opens the session the start message asks for; `Err((close code, reason))` when refused.
fn open(
    context: &CallContext,
    params: &BTreeMap<String, String>,
) -> Result<SessionHandle, (u16, String)> {
    if !context.authorized {
        let request_token = params.get("token").map(String::as_str);
        let ok =
            super::routes::authorize_with_query(&context.state, &HeaderMap::new(), request_token)
                .is_ok();
        if !ok {
            return Err((1008, "missing or wrong token".into()));
        }
    }
    let request = PersonaRequest {
        voice: params.get("voice").cloned(),
        prompt: params.get("prompt").cloned(),
    };
    context.state.engine.open_session(&request).map_err(|err| {
        let err = ApiError::from(err);
        context
            .state
            .engine
            .metrics()
            .sessions_rejected
            .with_label_values(&[err.reason()])
            .inc();
        // 1013: try again later (full); 1008: the request itself is refused.
        let code = if err.status().is_server_error() {
            1013
        } else {
            1008
        };
        (code, err.to_string())
    })
}

/// The running part of a call: the session, codecs, pacing, barge-in and marks.
struct Call {
    id: SessionId,
    input: InputProducer,
    events: crossbeam_channel::Receiver<SessionEvent>,
    stats: Arc<SessionStats>,
    /// Ends the session when the call is dropped.
    _closer: SessionCloser,
    inbound: InboundAudio,
    outbound: OutboundAudio,
    barge_in: BargeIn,
    marks: MarkQueue,
}

impl Call {
    fn new(session: SessionHandle, format: WireFormat) -> Result<Self, String> {
        let SessionHandle {
            id,
            input,
            output,
            events,
            stats,
            closer,
        } = session;
        Ok(Self {
            id,
            input,
            events,
            stats,
            _closer: closer,
            inbound: InboundAudio::new(format)?,
            outbound: OutboundAudio::new(PacketSource::new(output), format)?,
            barge_in: BargeIn::default(),
            marks: MarkQueue::default(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn run<P, S, R, E>(
        &mut self,
        provider: &mut P,
        sink: &mut S,
        stream: &mut R,
        summary: &mut CallSummary,
        metrics: &Metrics,
        cancel: &CancellationToken,
        shutdown: &CancellationToken,
        state: &AppState,
    ) -> CallEnding
    where
        P: Provider,
        S: Sink<Message> + Unpin,
        S::Error: Display,
        R: Stream<Item = Result<Message, E>> + Unpin,
        E: Display,
    {
        let mut ticker = packet_ticker(state.engine.output_schedule());
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    loop {
                        match self.events.try_recv() {
                            Ok(SessionEvent::Error(reason)) => return CallEnding::Engine(reason),
                            Ok(SessionEvent::Text(piece)) => tracing::trace!(piece, "agent text"),
                            Ok(SessionEvent::Ready) => {}
                            Err(TryRecvError::Empty) => break,
                            Err(TryRecvError::Disconnected) => {
                                return CallEnding::Engine("the engine stopped".into());
                            }
                        }
                    }
                    self.outbound.source.wait_for_late_output().await;
                    let format = self.outbound.format;
                    let (payload, output_level) = self.outbound.next(&self.stats, metrics);
                    let frame = provider.media(payload, format);
                    self.barge_in.output(output_level);
                    if let Err(ending) = send(sink, frame).await {
                        return ending;
                    }
                    summary.media_out += 1;
                    let sent = self.outbound.sent_samples;
                    while let Some(name) = self.marks.due(sent) {
                        if let Err(ending) = send(sink, provider.mark_played(&name)).await {
                            return ending;
                        }
                        summary.marks_echoed += 1;
                        metrics.transport_event(P::NAME, "mark");
                    }
                }
                message = stream.next() => {
                    let Some(event) = next_event(provider, message, summary, metrics, P::NAME) else {
                        return std::mem::take(&mut summary.ending);
                    };
                    match event {
                        CallEvent::Media(payload) => {
                            summary.media_in += 1;
                            let input_level = self.inbound.push(&payload, &mut self.input, &self.stats, metrics);
                            if self.barge_in.input(input_level) {
                                if let Err(ending) = send(sink, provider.clear()).await {
                                    return ending;
                                }
                                summary.clears_sent += 1;
                                metrics.transport_event(P::NAME, "clear");
                                // Whatever was waiting to play is gone: its marks are played now.
                                for name in self.marks.flush() {
                                    if let Err(ending) = send(sink, provider.mark_played(&name)).await {
                                        return ending;
                                    }
                                    summary.marks_echoed += 1;
                                }
                            }
                        }
                        CallEvent::Mark(name) => {
                            let position = self.outbound.sent_samples + self.outbound.source.queued() as u64;
                            if !self.marks.push(name, position) {
                                metrics.transport_event(P::NAME, "marks_dropped");
                            }
                        }
                        CallEvent::Played(name) => tracing::debug!(provider = P::NAME, name, "mark played"),
                        CallEvent::Dtmf(digit) => {
                            tracing::info!(provider = P::NAME, session = %self.id, digit, "dtmf");
                            metrics.transport_event(P::NAME, "dtmf");
                            summary.dtmf.push_str(&digit);
                        }
                        CallEvent::Stop => return CallEnding::Hangup,
                        CallEvent::Ignored(_) => summary.ignored += 1,
                        CallEvent::Connected | CallEvent::Start { .. } => {
                            metrics.transport_event(P::NAME, "ignored");
                            summary.ignored += 1;
                        }
                    }
                }
                _ = cancel.cancelled() => return CallEnding::Cancelled,
                _ = shutdown.cancelled() => return CallEnding::Cancelled,
            }
        }
    }
}

async fn send<S>(sink: &mut S, frame: Frame) -> Result<(), CallEnding>
where
    S: Sink<Message> + Unpin,
    S::Error: Display,
{
    let message = match frame {
        Frame::Text(text) => Message::Text(text.into()),
        Frame::Binary(bytes) => Message::Binary(bytes.into()),
    };
    match tokio::time::timeout(SEND_TIMEOUT, sink.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(CallEnding::Hangup),
        Err(_) => Err(CallEnding::Stalled),
    }
}

/// Barge-in: the caller starting to speak while the agent's audio is playing. Counted in
/// packets (20 ms), without a clock.
#[derive(Debug, Default)]
pub struct BargeIn {
    /// Packets the agent's audio still counts as playing.
    output_hold: u32,
    loud_run: u32,
    cooldown: u32,
}

impl BargeIn {
    /// Input RMS that counts as speech (about -34 dBFS).
    pub const INPUT_LEVEL: f32 = 0.02;
    /// Output RMS that counts as the agent talking.
    pub const OUTPUT_LEVEL: f32 = 0.01;
    /// Loud input packets in a row that make an onset (60 ms).
    pub const ONSET_PACKETS: u32 = 3;
    /// Packets the agent counts as playing after its last loud packet (the provider's buffer).
    pub const HOLD_PACKETS: u32 = 10;
    /// Packets after a clear before the next may be sent (1 s).
    pub const COOLDOWN_PACKETS: u32 = 50;

    /// Records one outbound packet's level.
    pub fn output(&mut self, level: f32) {
        if level > Self::OUTPUT_LEVEL {
            self.output_hold = Self::HOLD_PACKETS;
        } else {
            self.output_hold = self.output_hold.saturating_sub(1);
        }
        self.cooldown = self.cooldown.saturating_sub(1);
    }

    /// Records one inbound packet's level; true when a clear should be sent now.
    pub fn input(&mut self, level: f32) -> bool {
        if level <= Self::INPUT_LEVEL {
            self.loud_run = 0;
            return false;
        }
        self.loud_run += 1;
        if self.loud_run == Self::ONSET_PACKETS && self.output_hold > 0 && self.cooldown == 0 {
            self.cooldown = Self::COOLDOWN_PACKETS;
            return true;
        }
        false
    }
}

/// Marks waiting for the audio queued before them to be sent.
#[derive(Debug, Default)]
struct MarkQueue {
    pending: VecDeque<(u64, String)>,
    echoed: VecDeque<String>,
}

impl MarkQueue {
    /// Queues `name` to be echoed once `position` samples have been sent. A name we echoed
    /// ourselves is the provider's acknowledgement of that echo and is not echoed again.
    fn push(&mut self, name: String, position: u64) -> bool {
        if let Some(idx) = self.echoed.iter().position(|n| *n == name) {
            self.echoed.remove(idx);
            return true;
        }
        if self.pending.len() == MAX_PENDING_MARKS {
            return false;
        }
        self.pending.push_back((position, name));
        true
    }

    fn due(&mut self, sent_samples: u64) -> Option<String> {
        if self.pending.front()?.0 > sent_samples {
            return None;
        }
        let (_, name) = self.pending.pop_front()?;
        self.remember(&name);
        Some(name)
    }

    fn flush(&mut self) -> Vec<String> {
        let names: Vec<String> = self.pending.drain(..).map(|(_, n)| n).collect();
        for name in &names {
            self.remember(name);
        }
        names
    }

    fn remember(&mut self, name: &str) {
        if self.echoed.len() == MAX_REMEMBERED_MARKS {
            self.echoed.pop_front();
        }
        self.echoed.push_back(name.to_owned());
    }
}

/// Reads a string field at `path` (nested keys) from a JSON value.
pub(crate) fn field<'a>(value: &'a serde_json::Value, path: &[&str]) -> Option<&'a str> {
    let mut cursor = value;
    for key in path {
        cursor = cursor.get(*key)?;
    }
    cursor.as_str()
}

/// Custom parameters: an object of strings (numbers and booleans are written as text).
pub(crate) fn params(value: Option<&serde_json::Value>) -> BTreeMap<String, String> {
    let Some(object) = value.and_then(|v| v.as_object()) else {
        return BTreeMap::new();
    };
    object
        .iter()
        .filter_map(|(key, value)| {
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => return None,
            };
            Some((key.clone(), text))
        })
        .collect()
}

/// Decodes a base64 media payload.
pub(crate) fn decode_payload(payload: &str) -> Result<Vec<u8>, ProtocolError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(payload)
        .map_err(|_| ProtocolError::BadBase64)
}

pub(crate) fn encode_payload(payload: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(payload)
}

/// Parses a text frame as a JSON object.
pub(crate) fn json(text: &str) -> Result<serde_json::Value, ProtocolError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| ProtocolError::BadJson(e.to_string()))?;
    if !value.is_object() {
        return Err(ProtocolError::BadJson("expected a JSON object".into()));
    }
    Ok(value)
}

/// The audio of a JSON `media` event (`media.payload`, base64); a track other than the caller's
/// (`media.track` other than `inbound`, where the provider names tracks) is ignored.
pub(crate) fn media_event(message: &serde_json::Value) -> Result<CallEvent, ProtocolError> {
    if field(message, &["media", "track"]).is_some_and(|t| t != "inbound") {
        return Ok(CallEvent::Ignored("media (outbound track)".into()));
    }
    let payload =
        field(message, &["media", "payload"]).ok_or(ProtocolError::Missing("media.payload"))?;
    Ok(CallEvent::Media(decode_payload(payload)?))
}

/// A JSON `dtmf` event's digit (`dtmf.digit`).
pub(crate) fn dtmf_event(message: &serde_json::Value) -> Result<CallEvent, ProtocolError> {
    let digit = field(message, &["dtmf", "digit"]).ok_or(ProtocolError::Missing("dtmf.digit"))?;
    Ok(CallEvent::Dtmf(digit.to_owned()))
}

/// A JSON `mark` event's name (`mark.name`).
pub(crate) fn mark_event(message: &serde_json::Value) -> Result<CallEvent, ProtocolError> {
    let name = field(message, &["mark", "name"]).ok_or(ProtocolError::Missing("mark.name"))?;
    Ok(CallEvent::Mark(name.to_owned()))
}

/// Checks a message's stream id against the started stream's.
pub(crate) fn check_stream(
    started: &Option<String>,
    got: Option<&str>,
    what: &'static str,
) -> Result<(), ProtocolError> {
    let Some(expected) = started else {
        return Err(ProtocolError::BeforeStart(what));
    };
    match got {
        Some(got) if got != expected => Err(ProtocolError::WrongStream {
            expected: expected.clone(),
            got: got.to_owned(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
