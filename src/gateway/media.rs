//! A session's life after the answer: the 20 ms send loop on the engine's clock grid, event
//! forwarding to the data channel, and the end of the session (client gone, DELETE, shutdown).

use super::outbound::{PacketSource, packet_ticker};
use super::peer::Peer;
use crate::audio::opus::{EncoderConfig, OpusEncoder};
use crate::audio::ring::OutputConsumer;
use crate::audio::{PACKET_PERIOD, samples_to_ms};
use crate::engine::session::SessionCloser;
use crate::engine::{SessionEvent, SessionId, SessionStats};
use crate::metrics::Metrics;
use bytes::Bytes;
use crossbeam_channel::Receiver;
use rtc::media::Sample;
use serde_json::json;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use webrtc::data_channel::RTCDataChannelState;
use webrtc::peer_connection::RTCPeerConnectionState;

/// Messages kept for a data channel that is not open yet.
const MAX_PENDING_MESSAGES: usize = 256;
const STATS_INTERVAL: Duration = Duration::from_secs(1);

/// Everything a running session owns.
pub struct SessionTask {
    pub id: SessionId,
    pub peer: Peer,
    pub output: OutputConsumer,
    pub events: Receiver<SessionEvent>,
    pub stats: Arc<SessionStats>,
    pub closer: SessionCloser,
    pub cancel: CancellationToken,
    pub engine_name: &'static str,
    /// The engine's output grid: packets go out at `origin + phase + k * 20 ms`.
    pub schedule: (Instant, Duration),
    pub connect_timeout: Duration,
    pub metrics: Arc<Metrics>,
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The client closed the connection, or it was ended by DELETE or shutdown.
    Closed,
    /// The client disappeared (ICE failed) or never connected.
    Vanished,
    /// The engine refused or dropped the session.
    EngineError,
}

/// Runs the session until it ends, then closes the peer and frees the slot.
pub async fn run(task: SessionTask) -> Ending {
    let SessionTask {
        id,
        peer,
        output,
        events,
        stats,
        closer,
        cancel,
        engine_name,
        schedule,
        connect_timeout,
        metrics,
    } = task;
    let mut sender = match OutboundAudio::new(output) {
        Ok(sender) => sender,
        Err(err) => {
            tracing::error!(session = %id, %err, "cannot create the Opus encoder");
            let _ = peer.pc.close().await;
            return Ending::EngineError;
        }
    };
    let mut forwarder = EventForwarder::new(id, engine_name, events);
    let mut states = peer.states.clone();
    let mut ticker = packet_ticker(schedule);
    let connect_deadline = tokio::time::Instant::now() + connect_timeout;
    let mut connected = false;
    let ending = loop {
        tokio::select! {
            _ = ticker.tick() => {
                sender.send_packet(&peer, connected, &stats, &metrics).await;
                if forwarder.forward(&peer, &stats).await.is_err() {
                    break Ending::EngineError;
                }
            }
            changed = states.changed() => {
                let state = *states.borrow_and_update();
                match (changed, state) {
                    (Err(_), _) | (_, RTCPeerConnectionState::Closed) => break Ending::Closed,
                    (_, RTCPeerConnectionState::Failed) => break Ending::Vanished,
                    (_, RTCPeerConnectionState::Connected) => connected = true,
                    _ => {}
                }
            }
            _ = tokio::time::sleep_until(connect_deadline), if !connected => break Ending::Vanished,
            _ = cancel.cancelled() => break Ending::Closed,
        }
    };
    if ending == Ending::Vanished {
        metrics.sessions_vanished.inc();
    }
    let _ = peer.pc.close().await;
    drop(closer);
    tracing::info!(session = %id, ?ending, stats = ?stats.snapshot(), "session ended");
    ending
}

/// Takes 20 ms of output per tick (the WebSocket transports' [`PacketSource`]), encodes it and
/// writes it to the track.
struct OutboundAudio {
    source: PacketSource,
    encoder: OpusEncoder,
    payload_type: Option<u8>,
}

impl OutboundAudio {
    fn new(output: OutputConsumer) -> Result<Self, crate::audio::opus::OpusError> {
        Ok(Self {
            source: PacketSource::new(output),
            encoder: OpusEncoder::new(EncoderConfig::agent())?,
            payload_type: None,
        })
    }

    /// Takes the next packet of output; writes it to the track once the connection is up.
    async fn send_packet(
        &mut self,
        peer: &Peer,
        connected: bool,
        stats: &SessionStats,
        metrics: &Metrics,
    ) {
        let Self {
            source,
            encoder,
            payload_type,
        } = self;
        source.wait_for_late_output().await;
        let pcm = source.next_packet(stats, metrics);
        if !connected {
            return;
        }
        let Some(payload_type) = negotiated_payload_type(payload_type, peer).await else {
            return;
        };
        let Ok(packet) = encoder.encode(pcm) else {
            return;
        };
        let sample = Sample {
            data: Bytes::copy_from_slice(packet),
            duration: PACKET_PERIOD,
            ..Sample::new(Instant::now())
        };
        // A failed write means the connection is going away; the state watch ends the session.
        let _ = peer
            .track
            .sample_writer(peer.ssrc, payload_type)
            .write_sample(&sample)
            .await;
    }
}

/// The payload type the client negotiated for Opus (known once the answer is applied), cached.
async fn negotiated_payload_type(cached: &mut Option<u8>, peer: &Peer) -> Option<u8> {
    if cached.is_none() {
        let parameters = peer.sender.get_parameters().await.ok()?;
        *cached = parameters
            .rtp_parameters
            .codecs
            .first()
            .map(|c| c.payload_type);
    }
    *cached
}

/// Turns session events and periodic stats into JSON messages on the `events` data channel.
struct EventForwarder {
    id: SessionId,
    engine_name: &'static str,
    events: Receiver<SessionEvent>,
    pending: VecDeque<String>,
    next_stats: Instant,
}

/// The session cannot continue (the engine refused or dropped it).
struct SessionFailed;

impl EventForwarder {
    fn new(id: SessionId, engine_name: &'static str, events: Receiver<SessionEvent>) -> Self {
        Self {
            id,
            engine_name,
            events,
            pending: VecDeque::new(),
            next_stats: Instant::now() + STATS_INTERVAL,
        }
    }

    async fn forward(&mut self, peer: &Peer, stats: &SessionStats) -> Result<(), SessionFailed> {
        let mut failed = false;
        while let Ok(event) = self.events.try_recv() {
            failed |= matches!(event, SessionEvent::Error(_));
            let message = self.message(&event);
            self.queue(message);
        }
        if Instant::now() >= self.next_stats {
            self.next_stats += STATS_INTERVAL;
            self.queue(stats_message(stats));
        }
        self.flush(peer).await;
        if failed { Err(SessionFailed) } else { Ok(()) }
    }

    fn message(&self, event: &SessionEvent) -> String {
        match event {
            SessionEvent::Ready => {
                json!({"type": "ready", "session": self.id.to_string(), "engine": self.engine_name})
            }
            SessionEvent::Text(text) => json!({"type": "text", "text": text}),
            SessionEvent::Error(message) => json!({"type": "error", "message": message}),
        }
        .to_string()
    }

    fn queue(&mut self, message: String) {
        if self.pending.len() == MAX_PENDING_MESSAGES {
            self.pending.pop_front();
        }
        self.pending.push_back(message);
    }

    async fn flush(&mut self, peer: &Peer) {
        if self.pending.is_empty() {
            return;
        }
        let Some(channel) = peer.data_channel.borrow().clone() else {
            return;
        };
        if !matches!(channel.ready_state().await, Ok(RTCDataChannelState::Open)) {
            return;
        }
        while let Some(message) = self.pending.pop_front() {
            if channel.try_send_text(&message).await.is_err() {
                break;
            }
        }
    }
}

fn stats_message(stats: &SessionStats) -> String {
    let snap = stats.snapshot();
    let mut value = serde_json::to_value(snap).expect("a snapshot of integers serializes");
    let dropped = snap.input_dropped_samples + snap.output_dropped_samples;
    value["type"] = json!("stats");
    value["step_ms"] = json!(snap.last_step_us as f64 / 1000.0);
    value["dropped_ms"] = json!(samples_to_ms(dropped));
    value["underruns"] = json!(snap.input_underruns + snap.output_underruns);
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_messages_carry_the_counters_and_derived_fields() {
        let stats = SessionStats::default();
        stats.add(&stats.input_dropped_samples, 480);
        stats.add(&stats.input_underruns, 2);
        stats.add(&stats.output_underruns, 1);
        stats
            .last_step_us
            .store(1500, std::sync::atomic::Ordering::Relaxed);
        let value: serde_json::Value = serde_json::from_str(&stats_message(&stats)).unwrap();
        assert_eq!(value["type"], "stats");
        assert_eq!(value["dropped_ms"], 20.0);
        assert_eq!(value["underruns"], 3);
        assert_eq!(value["step_ms"], 1.5);
        assert_eq!(value["input_underruns"], 2);
    }
}
