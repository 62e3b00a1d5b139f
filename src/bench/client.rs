//! A WebRTC client of our own server: offers Opus sendrecv plus the `events` data channel,
//! sends paced 20 ms packets, and records what comes back with arrival times. Used by
//! `duplex bench loopback` and the integration tests.

use crate::audio::opus::{EncoderConfig, MAX_PACKET_SAMPLES, OpusDecoder, OpusEncoder};
use crate::audio::{PACKET_PERIOD, PACKET_SAMPLES};
use crate::gateway::ice::IceConfig;
use crate::gateway::peer::{opus_media_engine, opus_track};
use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use rtc::media::Sample;
use rtc::peer_connection::configuration::RTCOfferOptions;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCIceGatheringState,
    RTCPeerConnectionState, RTCSessionDescription,
};
use webrtc::rtp_transceiver::RtpSender;

/// Where and how to connect.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// The server's base URL, e.g. `http://127.0.0.1:8998`.
    pub base_url: String,
    pub token: Option<String>,
    pub voice: Option<String>,
    pub prompt: Option<String>,
    /// STUN and TURN servers to gather from (none: host candidates only).
    pub ice: IceConfig,
}

/// The agent audio received so far.
#[derive(Debug, Default, Clone)]
pub struct Recording {
    /// Decoded 24 kHz PCM, in arrival order.
    pub pcm: Vec<f32>,
    /// For each packet: index of its first sample in `pcm` and when it arrived.
    pub arrivals: Vec<(usize, Instant)>,
    /// Each packet's RTP sequence number, in arrival order (as `arrivals`).
    pub sequence_numbers: Vec<u16>,
    /// RTP packets received.
    pub packets: u64,
}

impl Recording {
    /// When sample `idx` would play if each packet were played on arrival.
    pub fn play_time(&self, idx: usize) -> Option<Instant> {
        let packet = self
            .arrivals
            .partition_point(|(first, _)| *first <= idx)
            .checked_sub(1)?;
        let (first, arrival) = self.arrivals[packet];
        Some(
            arrival
                + Duration::from_secs_f64((idx - first) as f64 / crate::audio::SAMPLE_RATE as f64),
        )
    }
}

struct ClientEvents {
    gathered: watch::Sender<bool>,
    states: watch::Sender<RTCPeerConnectionState>,
    recording: Arc<Mutex<Recording>>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for ClientEvents {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.states.send(state);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        tokio::spawn(record(track, self.recording.clone()));
    }
}

async fn record(track: Arc<dyn TrackRemote>, recording: Arc<Mutex<Recording>>) {
    let Ok(mut decoder) = OpusDecoder::new() else {
        return;
    };
    let mut pcm = vec![0.0; MAX_PACKET_SAMPLES];
    while let Some(event) = track.poll().await {
        let TrackRemoteEvent::OnRtpPacket(packet) = event else {
            continue;
        };
        let arrival = Instant::now();
        let samples = decoder
            .decode(&packet.payload, &mut pcm)
            .unwrap_or_else(|_| {
                pcm[..PACKET_SAMPLES].fill(0.0);
                PACKET_SAMPLES
            });
        let mut rec = recording.lock().expect("recording lock");
        let first = rec.pcm.len();
        rec.arrivals.push((first, arrival));
        rec.sequence_numbers.push(packet.header.sequence_number);
        rec.pcm.extend_from_slice(&pcm[..samples]);
        rec.packets += 1;
    }
}

/// A connected client session.
pub struct ClientPeer {
    pc: Arc<dyn PeerConnection>,
    track: Arc<TrackLocalStaticSample>,
    ssrc: u32,
    payload_type: u8,
    states: watch::Receiver<RTCPeerConnectionState>,
    recording: Arc<Mutex<Recording>>,
    events: Arc<Mutex<Vec<Value>>>,
    http: reqwest::Client,
    options: ClientOptions,
    /// The session id the server assigned, as its logs name it.
    pub session: String,
    /// The session's resource (`/api/sessions/{key}`), which alone restarts or ends it.
    pub resource: String,
    /// The server's answer.
    pub answer_sdp: String,
}

/// The server refused the offer.
#[derive(Debug, thiserror::Error)]
#[error("server answered {status}: {body}")]
pub struct Refused {
    pub status: u16,
    pub body: String,
    pub retry_after: Option<String>,
}

impl ClientPeer {
    /// Offers, gets the answer over HTTP and waits until the connection is up.
    pub async fn connect(options: ClientOptions) -> Result<Self> {
        let (gathered_tx, mut gathered) = watch::channel(false);
        let (states_tx, states) = watch::channel(RTCPeerConnectionState::New);
        let recording = Arc::new(Mutex::new(Recording::default()));
        let handler = Arc::new(ClientEvents {
            gathered: gathered_tx,
            states: states_tx,
            recording: recording.clone(),
        });
        let (media, registry) = opus_media_engine()?;
        let pc: Arc<dyn PeerConnection> = Arc::new(
            PeerConnectionBuilder::new()
                .with_configuration(options.ice.configuration())
                .with_media_engine(media)
                .with_interceptor_registry(registry)
                .with_handler(handler)
                .with_udp_addrs(vec!["127.0.0.1:0"])
                .build()
                .await?,
        );
        let (track, ssrc) = opus_track("user-audio")?;
        let sender = pc.add_track(track.clone()).await?;
        let channel = pc.create_data_channel("events", None).await?;
        let events = Arc::new(Mutex::new(Vec::new()));
        tokio::spawn(collect_events(channel, events.clone()));
        let offer = pc.create_offer(None).await?;
        pc.set_local_description(offer).await?;
        tokio::time::timeout(Duration::from_secs(5), gathered.wait_for(|g| *g))
            .await
            .context("ICE gathering")??;
        let offer_sdp = pc
            .local_description()
            .await
            .ok_or_else(|| anyhow!("no local description"))?
            .sdp;
        let http = reqwest::Client::new();
        let Offered {
            answer_sdp,
            session,
            resource,
        } = match post_offer(&http, &options, &offer_sdp).await {
            Ok(answer) => answer,
            Err(err) => {
                let _ = pc.close().await;
                return Err(err);
            }
        };
        pc.set_remote_description(RTCSessionDescription::answer(answer_sdp.clone())?)
            .await?;
        let mut client = Self {
            pc,
            track,
            ssrc,
            payload_type: 0,
            states,
            recording,
            events,
            http,
            options,
            session,
            resource,
            answer_sdp,
        };
        client.wait_connected(Duration::from_secs(10)).await?;
        client.payload_type = payload_type(&sender).await?;
        Ok(client)
    }

    async fn wait_connected(&mut self, limit: Duration) -> Result<()> {
        let reached = tokio::time::timeout(
            limit,
            self.states.wait_for(|s| {
                matches!(
                    s,
                    RTCPeerConnectionState::Connected | RTCPeerConnectionState::Failed
                )
            }),
        )
        .await
        .context("timed out waiting for the connection")??
        .to_owned();
        if reached != RTCPeerConnectionState::Connected {
            bail!("connection {reached}");
        }
        Ok(())
    }

    /// The connection's current state.
    pub fn state(&self) -> RTCPeerConnectionState {
        *self.states.borrow()
    }

    /// Waits until the connection leaves `connected` (closed or failed by the server).
    pub async fn wait_disconnected(&mut self, limit: Duration) -> Result<RTCPeerConnectionState> {
        let state = tokio::time::timeout(
            limit,
            self.states
                .wait_for(|s| *s != RTCPeerConnectionState::Connected),
        )
        .await
        .context("still connected")??;
        Ok(*state)
    }

    /// Sends one RTP payload as is (used to send garbage).
    pub async fn send_payload(&mut self, payload: Bytes) -> Result<()> {
        let sample = Sample {
            data: payload,
            duration: PACKET_PERIOD,
            ..Sample::new(Instant::now())
        };
        self.track
            .sample_writer(self.ssrc, self.payload_type)
            .write_sample(&sample)
            .await?;
        Ok(())
    }

    /// Sends `pcm` in real time, one packet every 20 ms; returns when each packet was sent.
    pub async fn play(&mut self, pcm: &[f32]) -> Result<Vec<Instant>> {
        let packets = encode_packets(pcm)?;
        self.play_encoded(&packets).await
    }

    /// Sends Opus packets in real time, one every 20 ms; returns when each was sent. (Many
    /// clients sending the same audio encode it once.)
    pub async fn play_encoded(&mut self, packets: &[Bytes]) -> Result<Vec<Instant>> {
        let mut ticker = tokio::time::interval(PACKET_PERIOD);
        let mut sent = Vec::with_capacity(packets.len());
        for packet in packets {
            ticker.tick().await;
            self.send_payload(packet.clone()).await?;
            sent.push(Instant::now());
        }
        Ok(sent)
    }

    /// A copy of what has been received so far.
    pub fn recording(&self) -> Recording {
        self.recording.lock().expect("recording lock").clone()
    }

    /// The JSON messages received on the `events` channel so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().expect("events lock").clone()
    }

    /// Ends the session the polite way: DELETE on its resource, then close.
    pub async fn close(self) -> Result<()> {
        let url = format!("{}{}", self.options.base_url, self.resource);
        let mut request = self.http.delete(url);
        if let Some(token) = &self.options.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await;
        let _ = self.pc.close().await;
        let status = response?.status();
        if !status.is_success() {
            bail!("DELETE answered {status}");
        }
        Ok(())
    }

    /// Restarts ICE as a browser does when its network changes: a new offer with new ICE
    /// credentials, sent as PATCH on the session's resource, and the server's answer applied.
    pub async fn restart_ice(&mut self) -> Result<()> {
        let options = RTCOfferOptions { ice_restart: true };
        let offer = self.pc.create_offer(Some(options)).await?;
        self.pc.set_local_description(offer).await?;
        let offer_sdp = self
            .pc
            .local_description()
            .await
            .ok_or_else(|| anyhow!("no local description"))?
            .sdp;
        let url = format!("{}{}", self.options.base_url, self.resource);
        let body = serde_json::json!({"sdp": offer_sdp, "type": "offer"});
        let answer = exchange(self.http.patch(url), &self.options, &body).await?;
        let sdp = answer_sdp(&answer)?;
        self.pc
            .set_remote_description(RTCSessionDescription::answer(sdp.clone())?)
            .await?;
        self.answer_sdp = sdp;
        Ok(())
    }

    /// Closes the connection without telling the server over HTTP.
    pub async fn hang_up(self) {
        let _ = self.pc.close().await;
    }
}

/// `pcm` as the 20 ms Opus packets a client sends.
pub fn encode_packets(pcm: &[f32]) -> Result<Vec<Bytes>> {
    let mut encoder = OpusEncoder::new(EncoderConfig::default())?;
    pcm.chunks_exact(PACKET_SAMPLES)
        .map(|packet| Ok(Bytes::copy_from_slice(encoder.encode(packet)?)))
        .collect()
}

/// The server's answer to an offer.
struct Offered {
    answer_sdp: String,
    session: String,
    resource: String,
}

async fn post_offer(http: &reqwest::Client, options: &ClientOptions, sdp: &str) -> Result<Offered> {
    let body = serde_json::json!({"sdp": sdp, "type": "offer", "voice": options.voice, "prompt": options.prompt});
    let request = http.post(format!("{}/api/offer", options.base_url));
    let answer = exchange(request, options, &body).await?;
    let field = |name: &str| {
        answer[name]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("answer without {name}: {answer}"))
    };
    Ok(Offered {
        answer_sdp: answer_sdp(&answer)?,
        session: field("session")?,
        resource: field("resource")?,
    })
}

/// Sends `body` as JSON (with the bearer token, if any) and returns the JSON that answers
/// it; a refusal is a [`Refused`].
async fn exchange(
    request: reqwest::RequestBuilder,
    options: &ClientOptions,
    body: &Value,
) -> Result<Value> {
    let mut request = request.json(body);
    if let Some(token) = &options.token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.context("the signaling request")?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = response.text().await?;
    if !status.is_success() {
        return Err(Refused {
            status: status.as_u16(),
            body: text,
            retry_after,
        }
        .into());
    }
    serde_json::from_str(&text).with_context(|| format!("answer JSON: {text}"))
}

fn answer_sdp(answer: &Value) -> Result<String> {
    answer["sdp"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("answer without sdp: {answer}"))
}

async fn payload_type(sender: &Arc<dyn RtpSender>) -> Result<u8> {
    let parameters = sender.get_parameters().await?;
    parameters
        .rtp_parameters
        .codecs
        .first()
        .map(|c| c.payload_type)
        .ok_or_else(|| anyhow!("no codec negotiated"))
}

async fn collect_events(channel: Arc<dyn DataChannel>, events: Arc<Mutex<Vec<Value>>>) {
    while let Some(event) = channel.poll().await {
        match event {
            DataChannelEvent::OnMessage(message) => {
                if let Ok(value) = serde_json::from_slice::<Value>(&message.data) {
                    events.lock().expect("events lock").push(value);
                }
            }
            DataChannelEvent::OnClose => break,
            _ => {}
        }
    }
}
