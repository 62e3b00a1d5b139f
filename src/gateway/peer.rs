//! One WebRTC peer connection per session: built from the client's offer, answering with Opus
//! sendrecv, and reporting its state, the remote audio track and the `events` data channel.

use super::error::ApiError;
use super::ice::{self, IceConfig};
use super::jitter::InboundAudio;
use super::ports::{PortLease, PortPool};
use crate::engine::{SessionId, SessionStats};
use crate::metrics::Metrics;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::peer_connection::configuration::media_engine::MIME_TYPE_OPUS;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::MediaStreamTrack;
use webrtc::media_stream::track_local::static_sample::TrackLocalStaticSample;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCIceCandidateType, RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription,
    Registry, SettingEngineBuilder, register_default_interceptors,
};
use webrtc::rtp_transceiver::RtpSender;

/// The data channel the client opens for events.
pub const EVENTS_CHANNEL: &str = "events";
/// Opus as browsers offer it; the fmtp asks the other side for in-band FEC.
const OPUS_FMTP: &str = "minptime=10;useinbandfec=1";
const OPUS_PAYLOAD_TYPE: u8 = 111;
/// How long ICE gathering may take before the answer is sent with the candidates so far: a
/// STUN or TURN server that does not answer delays each call's start by this much.
const GATHER_TIMEOUT: Duration = Duration::from_secs(3);

/// Network settings shared by every peer.
#[derive(Debug, Clone)]
pub struct PeerSettings {
    /// Address the media sockets bind (`0.0.0.0` = every interface).
    pub bind_ip: IpAddr,
    /// Public address to announce instead of the local one (1:1 NAT, Docker).
    pub public_ip: Option<IpAddr>,
    pub ports: Arc<PortPool>,
    /// Silence after which ICE reports `disconnected`.
    pub ice_disconnected: Duration,
    /// Further silence after which ICE reports `failed` and the session is freed.
    pub ice_failed: Duration,
    /// Time a client has to connect after the answer.
    pub connect_timeout: Duration,
    /// STUN and TURN servers, also handed to the page.
    pub ice: IceConfig,
}

impl Default for PeerSettings {
    fn default() -> Self {
        Self {
            bind_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            public_ip: None,
            ports: PortPool::new(None),
            ice_disconnected: Duration::from_secs(5),
            ice_failed: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(20),
            ice: IceConfig::default(),
        }
    }
}

/// A negotiated peer, ready for the session task.
pub struct Peer {
    pub pc: Arc<dyn PeerConnection>,
    pub answer_sdp: String,
    pub track: Arc<TrackLocalStaticSample>,
    pub sender: Arc<dyn RtpSender>,
    pub ssrc: u32,
    pub states: watch::Receiver<RTCPeerConnectionState>,
    pub data_channel: watch::Receiver<Option<Arc<dyn DataChannel>>>,
    pub port: PortLease,
}

/// The Opus codec we send and accept.
pub fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: OPUS_FMTP.to_owned(),
        rtcp_feedback: vec![],
    }
}

/// A media engine that knows Opus only, with the default interceptors (RTCP reports, NACK).
pub fn opus_media_engine() -> Result<(MediaEngine, Registry), webrtc::error::Error> {
    let mut media = MediaEngine::default();
    let opus = RTCRtpCodecParameters {
        rtp_codec: opus_codec(),
        payload_type: OPUS_PAYLOAD_TYPE,
    };
    media.register_codec(opus, RtpCodecKind::Audio)?;
    let registry = register_default_interceptors(Registry::new(), &mut media)?;
    Ok((media, registry))
}

/// A local Opus track with one fresh SSRC.
pub fn opus_track(
    track_id: &str,
) -> Result<(Arc<TrackLocalStaticSample>, u32), webrtc::error::Error> {
    let ssrc = rand::random::<u32>();
    let encoding = RTCRtpEncodingParameters {
        rtp_coding_parameters: RTCRtpCodingParameters {
            ssrc: Some(ssrc),
            ..Default::default()
        },
        codec: opus_codec(),
        ..Default::default()
    };
    let track = MediaStreamTrack::new(
        "duplex".into(),
        track_id.into(),
        track_id.into(),
        RtpCodecKind::Audio,
        vec![encoding],
    );
    Ok((
        Arc::new(TrackLocalStaticSample::new(Instant::now(), track)?),
        ssrc,
    ))
}

/// The peer's event handler: forwards states, starts the receive loop, keeps the data channel.
struct PeerEvents {
    id: SessionId,
    gathered: watch::Sender<bool>,
    states: watch::Sender<RTCPeerConnectionState>,
    data_channel: watch::Sender<Option<Arc<dyn DataChannel>>>,
    inbound: Mutex<Option<InboundAudio>>,
    stats: Arc<SessionStats>,
    metrics: Arc<Metrics>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for PeerEvents {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.gathered.send(true);
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        tracing::debug!(session = %self.id, %state, "peer connection state");
        let _ = self.states.send(state);
    }

    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        if track.kind().await != RtpCodecKind::Audio {
            return;
        }
        let Some(inbound) = self.inbound.lock().ok().and_then(|mut slot| slot.take()) else {
            tracing::warn!(session = %self.id, "ignoring a second audio track");
            return;
        };
        tokio::spawn(receive_audio(
            track,
            inbound,
            self.stats.clone(),
            self.metrics.clone(),
        ));
    }

    async fn on_data_channel(&self, channel: Arc<dyn DataChannel>) {
        if channel.label().await.ok().as_deref() != Some(EVENTS_CHANNEL) {
            return;
        }
        let _ = self.data_channel.send(Some(channel.clone()));
        // Drain the channel's own events so its queue never backs up; clients send nothing we use.
        tokio::spawn(async move {
            while !matches!(channel.poll().await, None | Some(DataChannelEvent::OnClose)) {}
        });
    }
}

async fn receive_audio(
    track: Arc<dyn TrackRemote>,
    mut inbound: InboundAudio,
    stats: Arc<SessionStats>,
    metrics: Arc<Metrics>,
) {
    while let Some(event) = track.poll().await {
        if let TrackRemoteEvent::OnRtpPacket(packet) = event {
            inbound.on_packet(
                packet.header.sequence_number,
                packet.payload,
                &stats,
                &metrics,
            );
        }
    }
}

/// Builds a peer for `offer` and returns it with its answer (all candidates gathered).
pub async fn answer(
    offer: RTCSessionDescription,
    settings: &PeerSettings,
    id: SessionId,
    inbound: InboundAudio,
    stats: Arc<SessionStats>,
    metrics: Arc<Metrics>,
) -> Result<Peer, ApiError> {
    let (gathered_tx, mut gathered) = watch::channel(false);
    let (states_tx, states) = watch::channel(RTCPeerConnectionState::New);
    let (channel_tx, data_channel) = watch::channel(None);
    let gather_timeouts = metrics.ice_gathering_timeouts.clone();
    let events = Arc::new(PeerEvents {
        id,
        gathered: gathered_tx,
        states: states_tx,
        data_channel: channel_tx,
        inbound: Mutex::new(Some(inbound)),
        stats,
        metrics,
    });
    let (pc, port) = build(settings, events).await?;
    match negotiate(&pc, offer, &mut gathered, &settings.ice, &gather_timeouts).await {
        Ok((answer_sdp, track, sender, ssrc)) => Ok(Peer {
            pc,
            answer_sdp,
            track,
            sender,
            ssrc,
            states,
            data_channel,
            port,
        }),
        Err(err) => {
            let _ = pc.close().await;
            Err(err)
        }
    }
}

/// Binds a peer on a free port of the pool, trying the next port when one is taken.
async fn build(
    settings: &PeerSettings,
    events: Arc<dyn PeerConnectionEventHandler>,
) -> Result<(Arc<dyn PeerConnection>, PortLease), ApiError> {
    let mut failed_ports = BTreeSet::new();
    let mut last_error = String::from("no port tried");
    for _ in 0..settings.ports.attempts() {
        let Some(lease) = settings.ports.lease(&failed_ports) else {
            break;
        };
        let (media, registry) =
            opus_media_engine().map_err(|e| ApiError::Internal(e.to_string()))?;
        let built = PeerConnectionBuilder::new()
            .with_configuration(settings.ice.configuration())
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_setting_engine(setting_engine(settings))
            .with_handler(events.clone())
            .with_udp_addrs(udp_addrs(settings, lease.port))
            .build()
            .await;
        match built {
            Ok(pc) => return Ok((Arc::new(pc), lease)),
            Err(err) => {
                last_error = err.to_string();
                failed_ports.insert(lease.port);
            }
        }
    }
    Err(ApiError::Internal(format!(
        "could not bind a media socket: {last_error}"
    )))
}

fn setting_engine(settings: &PeerSettings) -> webrtc::peer_connection::SettingEngine {
    let mut builder = SettingEngineBuilder::new()
        .with_ice_timeouts(
            Some(settings.ice_disconnected),
            Some(settings.ice_failed),
            Some(Duration::from_secs(1)),
        )
        .with_multicast_dns_mode(MulticastDnsMode::Disabled);
    if let Some(ip) = settings.public_ip {
        builder = builder.with_nat_1to1_ips(vec![ip.to_string()], RTCIceCandidateType::Host);
    }
    builder.build()
}

/// The media socket addresses: the configured one, plus loopback so a client on this machine
/// can always connect (unless a public address is announced instead).
fn udp_addrs(settings: &PeerSettings, port: u16) -> Vec<SocketAddr> {
    let mut addrs = vec![SocketAddr::new(settings.bind_ip, port)];
    if settings.public_ip.is_none() && !settings.bind_ip.is_loopback() {
        addrs.push(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    addrs
}

/// Why gathering found no address a client could reach.
fn no_candidate_reason(ice: &IceConfig) -> String {
    if ice.relay_only() {
        "the TURN server gave this server no relay address (unreachable, or it refused the \
         credentials of --turn-secret or --ice-username/--ice-credential)"
            .to_owned()
    } else {
        "no network interface gave an address".to_owned()
    }
}

type Negotiated = (String, Arc<TrackLocalStaticSample>, Arc<dyn RtpSender>, u32);

async fn negotiate(
    pc: &Arc<dyn PeerConnection>,
    offer: RTCSessionDescription,
    gathered: &mut watch::Receiver<bool>,
    ice: &IceConfig,
    gather_timeouts: &prometheus::IntCounter,
) -> Result<Negotiated, ApiError> {
    pc.set_remote_description(offer)
        .await
        .map_err(|e| ApiError::BadSdp(e.to_string()))?;
    let (track, ssrc) = opus_track("agent-audio").map_err(|e| ApiError::Internal(e.to_string()))?;
    let sender = pc
        .add_track(track.clone())
        .await
        .map_err(|e| ApiError::Internal(format!("add track: {e}")))?;
    answer_the_offer(pc).await?;
    if tokio::time::timeout(GATHER_TIMEOUT, gathered.wait_for(|done| *done))
        .await
        .is_err()
    {
        gather_timeouts.inc();
        tracing::warn!(
            "ICE gathering did not complete in time; answering with the candidates so far"
        );
    }
    let local = local_description(pc).await?;
    if ice::candidate_count(&local.sdp) == 0 {
        return Err(ApiError::NoCandidate(no_candidate_reason(ice)));
    }
    Ok((local.sdp, track, sender, ssrc))
}

/// Answers a new offer on a live peer: an ICE restart, the client's network having changed
/// (Wi-Fi to cellular). The peer keeps its candidates through a restart, so the answer needs
/// no new gathering; the session, its slot and its audio go on.
pub async fn renegotiate(
    pc: &Arc<dyn PeerConnection>,
    offer: RTCSessionDescription,
) -> Result<String, ApiError> {
    pc.set_remote_description(offer)
        .await
        .map_err(|e| ApiError::BadSdp(e.to_string()))?;
    let answered = answer_offer_applied(pc).await;
    if answered.is_err() {
        // Back to the last agreed description, so a later restart finds the peer stable.
        if let Ok(rollback) = RTCSessionDescription::rollback(None) {
            let _ = pc.set_remote_description(rollback).await;
        }
    }
    answered
}

async fn local_description(
    pc: &Arc<dyn PeerConnection>,
) -> Result<RTCSessionDescription, ApiError> {
    pc.local_description()
        .await
        .ok_or_else(|| ApiError::Internal("no local description".into()))
}

/// Makes the answer to the remote offer and applies it locally.
async fn answer_the_offer(pc: &Arc<dyn PeerConnection>) -> Result<(), ApiError> {
    let answer = pc
        .create_answer(None)
        .await
        .map_err(|e| ApiError::BadSdp(format!("cannot answer the offer: {e}")))?;
    pc.set_local_description(answer)
        .await
        .map_err(|e| ApiError::Internal(format!("set local description: {e}")))
}

/// The answer to the remote offer just applied, with its candidates.
async fn answer_offer_applied(pc: &Arc<dyn PeerConnection>) -> Result<String, ApiError> {
    answer_the_offer(pc).await?;
    let local = local_description(pc).await?;
    if ice::candidate_count(&local.sdp) == 0 {
        return Err(ApiError::NoCandidate(
            "the restarted peer kept no address".into(),
        ));
    }
    Ok(local.sdp)
}

/// Says when a probe peer's gathering is complete.
struct GatherEvents(watch::Sender<bool>);

#[async_trait::async_trait]
impl PeerConnectionEventHandler for GatherEvents {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.0.send(true);
        }
    }
}

/// Gathers once as a call's peer would, with no call: what the STUN and TURN servers give
/// this server (its public address, its relays), to check them at start and in `doctor`.
pub async fn probe_ice(settings: &PeerSettings) -> Result<ice::Gathered, ApiError> {
    let (gathered_tx, mut gathered) = watch::channel(false);
    let (pc, _port) = build(settings, Arc::new(GatherEvents(gathered_tx))).await?;
    let result = offer_and_gather(&pc, &mut gathered).await;
    let _ = pc.close().await;
    result
}

/// Probes the STUN and TURN servers and judges what they gave: `Ok` with the public address
/// and relays, or `Err` with what is missing.
pub async fn check_ice_servers(settings: &PeerSettings) -> Result<String, String> {
    let gathered = probe_ice(settings).await.map_err(|err| err.to_string())?;
    settings.ice.judge(&gathered)
}

async fn offer_and_gather(
    pc: &Arc<dyn PeerConnection>,
    gathered: &mut watch::Receiver<bool>,
) -> Result<ice::Gathered, ApiError> {
    let internal =
        |what: &str, err: webrtc::error::Error| ApiError::Internal(format!("{what}: {err}"));
    pc.create_data_channel("probe", None)
        .await
        .map_err(|e| internal("data channel", e))?;
    let offer = pc
        .create_offer(None)
        .await
        .map_err(|e| internal("offer", e))?;
    pc.set_local_description(offer)
        .await
        .map_err(|e| internal("set local description", e))?;
    let complete = tokio::time::timeout(GATHER_TIMEOUT, gathered.wait_for(|done| *done))
        .await
        .is_ok();
    let local = local_description(pc).await?;
    Ok(ice::Gathered::from_sdp(&local.sdp, complete))
}
