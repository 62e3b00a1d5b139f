//! Phone calls straight from a PBX or a SIP trunk (`serve --sip-port`): a SIP user agent over
//! UDP that answers INVITEs with G.711 over plain RTP (RFC 3261, 3264, 3550, 4733), so an
//! Asterisk, FreeSWITCH or 3CX on the same network reaches the agent with no cloud provider.
//!
//! Callers are admitted by source address (`--sip-allow`, private networks by default): SIP
//! has no bearer token, and scanners probe every public port 5060. The persona comes from the
//! `X-Duplex-Voice` and `X-Duplex-Prompt` headers, or from a request URI whose user part is a
//! voice's name (`sip:NATM1@agent`).

pub mod media;
pub mod message;
pub mod offer;

use super::{ApiError, AppState};
use crate::engine::{PersonaRequest, SessionHandle, SessionId};
use crate::gateway::outbound::PacketSource;
use crate::gateway::ports::PortLease;
use ipnet::IpNet;
use media::{MediaCall, MediaEnding, TRANSPORT};
use message::{MAX_MESSAGE_BYTES, Request};
use offer::AudioOffer;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

/// RFC 3261's T1: the first retransmission interval of a reliable answer over UDP.
const T1: Duration = Duration::from_millis(500);
/// Its cap (T2).
const T2: Duration = Duration::from_secs(4);
/// An answered INVITE whose ACK has not come after this long (64·T1) is abandoned.
const ACK_TIMEOUT: Duration = Duration::from_secs(32);
/// Retry-After, in seconds, on a 503.
const RETRY_AFTER_SECS: &str = "5";
const ALLOW: &str = "INVITE, ACK, BYE, CANCEL, OPTIONS";

/// Where SIP listens and whom it answers.
#[derive(Debug, Clone)]
pub struct SipSettings {
    pub bind: SocketAddr,
    /// Source networks whose INVITEs are answered; others get 403.
    pub allow: Vec<IpNet>,
}

/// Loopback and the private ranges (RFC 1918, RFC 4193, link-local): a PBX on the same network.
pub fn private_networks() -> Vec<IpNet> {
    [
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    ]
    .iter()
    .map(|net| net.parse().expect("a valid network"))
    .collect()
}

/// The SIP endpoint: one UDP socket for signaling, one per call for its RTP.
pub struct SipServer {
    socket: Arc<UdpSocket>,
    shared: Arc<Shared>,
}

struct Shared {
    socket: Arc<UdpSocket>,
    state: Arc<AppState>,
    allow: Vec<IpNet>,
    /// Live calls by Call-ID.
    dialogs: Mutex<HashMap<String, Dialog>>,
    /// BYEs we sent, by Call-ID, woken by their final response.
    byes: Mutex<HashMap<String, Arc<Notify>>>,
}

/// A call between its INVITE and its end.
struct Dialog {
    id: SessionId,
    /// The 200 OK, sent again while the caller retransmits its INVITE or has not ACKed it.
    answer: String,
    acked: Arc<Notify>,
    /// Where the call's RTP goes; a re-INVITE may move it.
    remote_rtp: watch::Sender<SocketAddr>,
    /// What answers a re-INVITE: the offer, our RTP address, the SDP's ids.
    offer: AudioOffer,
    local_rtp: SocketAddr,
    sdp_id: u64,
    sdp_version: u64,
    cancel: CancellationToken,
}

impl SipServer {
    pub async fn bind(settings: &SipSettings, state: Arc<AppState>) -> std::io::Result<Self> {
        let socket = Arc::new(UdpSocket::bind(settings.bind).await?);
        let shared = Arc::new(Shared {
            socket: socket.clone(),
            state,
            allow: settings.allow.clone(),
            dialogs: Mutex::new(HashMap::new()),
            byes: Mutex::new(HashMap::new()),
        });
        Ok(Self { socket, shared })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Answers SIP until the server shuts down.
    pub async fn run(self) {
        let shutdown = self.shared.state.shutdown.clone();
        let mut buf = vec![0u8; MAX_MESSAGE_BYTES + 1];
        loop {
            let received = tokio::select! {
                received = self.socket.recv_from(&mut buf) => received,
                _ = shutdown.cancelled() => break,
            };
            let Ok((len, from)) = received else { continue };
            if len > MAX_MESSAGE_BYTES {
                self.shared.count("too_big");
                continue;
            }
            self.shared.clone().handle(&buf[..len], from).await;
        }
    }
}

impl Shared {
    fn count(&self, event: &str) {
        self.state
            .engine
            .metrics()
            .transport_event(TRANSPORT, event);
    }

    async fn send(&self, text: &str, to: SocketAddr) {
        if let Err(err) = self.socket.send_to(text.as_bytes(), to).await {
            tracing::debug!(%to, %err, "SIP send failed");
        }
    }

    async fn handle(self: Arc<Self>, datagram: &[u8], from: SocketAddr) {
        if message::is_final_response(datagram) {
            self.response_arrived(datagram);
            return;
        }
        let request = match Request::parse(datagram) {
            Ok(request) => request,
            Err(message::ParseError::Response) => return,
            Err(err) => {
                // Without the headers a response copies there is no one to answer.
                tracing::debug!(%from, %err, "SIP datagram dropped");
                self.count("bad_message");
                return;
            }
        };
        match request.method.as_str() {
            "INVITE" => self.invite(request, from).await,
            "ACK" => self.ack(&request),
            "BYE" => self.bye(&request, from).await,
            "CANCEL" => self.cancel(&request, from).await,
            "OPTIONS" => {
                let allow = [("Allow", ALLOW.to_owned())];
                self.send(&request.response(200, "OK", None, &allow, None), from)
                    .await
            }
            other => {
                tracing::debug!(%from, method = other, "SIP method not answered");
                self.count("unsupported_method");
                let allow = [("Allow", ALLOW.to_owned())];
                let response = request.response(405, "Method Not Allowed", None, &allow, None);
                self.send(&response, from).await
            }
        }
    }

    async fn invite(self: Arc<Self>, request: Request, from: SocketAddr) {
        if request.tag("To").is_some() {
            return self.reinvite(&request, from).await;
        }
        let resent = self
            .dialogs
            .lock()
            .expect("dialog lock")
            .get(request.call_id())
            .map(|dialog| dialog.answer.clone());
        if let Some(answer) = resent {
            return self.send(&answer, from).await;
        }
        self.send(&request.response(100, "Trying", None, &[], None), from)
            .await;
        if let Err(refusal) = self.clone().answer(&request, from).await {
            let reason = refusal.reason();
            self.state
                .engine
                .metrics()
                .sessions_rejected
                .with_label_values(&[reason])
                .inc();
            tracing::info!(%from, reason, why = %refusal, "SIP call refused");
            self.send(&refusal.response(&request), from).await;
        }
    }

    /// Opens the session, binds its RTP socket and sends the 200 OK; the call then runs on
    /// its own task.
    async fn answer(self: Arc<Self>, request: &Request, from: SocketAddr) -> Result<(), Refusal> {
        if !self.allow.iter().any(|net| net.contains(&from.ip())) {
            return Err(Refusal::Forbidden(from.ip()));
        }
        if self.state.is_draining() {
            return Err(Refusal::Api(ApiError::Draining));
        }
        let offer = AudioOffer::parse(&request.body).map_err(Refusal::Offer)?;
        let persona = self.persona(request);
        let session = self
            .state
            .engine
            .open_session(&persona)
            .map_err(|e| Refusal::Api(e.into()))?;
        let (socket, lease) = self.bind_rtp().await?;
        let local_ip = self.local_ip(from);
        let local_rtp = SocketAddr::new(local_ip, socket.local_addr().map_err(Refusal::Io)?.port());
        let local_tag = format!("{:016x}", rand::random::<u64>());
        let sdp_id = rand::random::<u32>() as u64;
        let contact = [
            (
                "Contact",
                format!("<sip:duplex@{}>", self.contact_addr(local_ip)),
            ),
            ("Allow", ALLOW.to_owned()),
        ];
        let body = offer.answer(local_rtp, sdp_id, 1);
        let answer = request.response(
            200,
            "OK",
            Some(&local_tag),
            &contact,
            Some(("application/sdp", &body)),
        );
        let (remote_tx, remote_rx) = watch::channel(offer.remote);
        let (cancel, tracked) = self.state.track_guard(session.id);
        let acked = Arc::new(Notify::new());
        let dialog = Dialog {
            id: session.id,
            answer: answer.clone(),
            acked: acked.clone(),
            remote_rtp: remote_tx,
            offer,
            local_rtp,
            sdp_id,
            sdp_version: 1,
            cancel: cancel.clone(),
        };
        let call_id = request.call_id().to_owned();
        self.dialogs
            .lock()
            .expect("dialog lock")
            .insert(call_id.clone(), dialog);
        tracing::info!(
            session = %session.id, %from, rtp = %offer.remote, codec = media::law_name(offer.law),
            voice = ?persona.voice, "SIP call answered"
        );
        self.send(&answer, from).await;
        tokio::spawn(
            self.clone()
                .resend_until_acked(answer, from, acked, cancel.clone()),
        );
        let call = media_call(session, socket, offer, remote_rx, &self.state, cancel);
        let bye = ByeTarget::new(request, &local_tag, from, self.contact_addr(local_ip));
        let timer = self.state.engine.metrics().call(TRANSPORT);
        tokio::spawn(async move {
            let ending = media::run(call).await;
            drop((lease, tracked, timer));
            self.call_ended(&call_id, ending, bye).await;
        });
        Ok(())
    }

    fn persona(&self, request: &Request) -> PersonaRequest {
        let voices = &self.state.engine.info().catalog.voices;
        let uri_voice = request
            .uri
            .strip_prefix("sip:")
            .and_then(|rest| rest.split_once('@'))
            .map(|(user, _)| user)
            .filter(|user| voices.iter().any(|v| v == user));
        PersonaRequest {
            voice: request
                .header("X-Duplex-Voice")
                .or(uri_voice)
                .map(str::to_owned),
            prompt: request.header("X-Duplex-Prompt").map(str::to_owned),
        }
    }

    async fn bind_rtp(&self) -> Result<(UdpSocket, PortLease), Refusal> {
        let settings = &self.state.config.peer;
        let mut failed = BTreeSet::new();
        let mut last_error = None;
        for _ in 0..settings.ports.attempts() {
            let Some(lease) = settings.ports.lease(&failed) else {
                break;
            };
            match UdpSocket::bind((settings.bind_ip, lease.port)).await {
                Ok(socket) => return Ok((socket, lease)),
                Err(err) => {
                    failed.insert(lease.port);
                    last_error = Some(err);
                }
            }
        }
        Err(Refusal::Io(last_error.unwrap_or_else(|| {
            std::io::Error::other("every port of --udp-ports is in use")
        })))
    }

    /// The address a caller reaches us at: `--public-ip`, `--udp-bind` when it names one, or
    /// the one this host routes to the caller from.
    fn local_ip(&self, caller: SocketAddr) -> IpAddr {
        let settings = &self.state.config.peer;
        if let Some(ip) = settings.public_ip {
            return ip;
        }
        if !settings.bind_ip.is_unspecified() {
            return settings.bind_ip;
        }
        route_source(caller).unwrap_or(settings.bind_ip)
    }

    fn contact_addr(&self, local_ip: IpAddr) -> SocketAddr {
        let port = self.socket.local_addr().map(|a| a.port()).unwrap_or(5060);
        SocketAddr::new(local_ip, port)
    }

    async fn resend_until_acked(
        self: Arc<Self>,
        answer: String,
        to: SocketAddr,
        acked: Arc<Notify>,
        cancel: CancellationToken,
    ) {
        let deadline = tokio::time::Instant::now() + ACK_TIMEOUT;
        let mut interval = T1;
        loop {
            tokio::select! {
                _ = acked.notified() => return,
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::info!(%to, "no ACK for the 200 OK: ending the call");
                self.count("no_ack");
                cancel.cancel();
                return;
            }
            self.send(&answer, to).await;
            interval = (interval * 2).min(T2);
        }
    }

    fn ack(&self, request: &Request) {
        if let Some(dialog) = self
            .dialogs
            .lock()
            .expect("dialog lock")
            .get(request.call_id())
        {
            dialog.acked.notify_one();
        }
    }

    async fn bye(&self, request: &Request, from: SocketAddr) {
        let dialog = self
            .dialogs
            .lock()
            .expect("dialog lock")
            .remove(request.call_id());
        let response = match dialog {
            Some(dialog) => {
                tracing::info!(session = %dialog.id, "the caller hung up");
                dialog.cancel.cancel();
                request.response(200, "OK", None, &[], None)
            }
            None => request.response(481, "Call/Transaction Does Not Exist", None, &[], None),
        };
        self.send(&response, from).await;
    }

    /// Calls are answered at once, so a CANCEL finds either an answered call (which a BYE
    /// ends, RFC 3261 §9.2) or nothing.
    async fn cancel(&self, request: &Request, from: SocketAddr) {
        let known = self
            .dialogs
            .lock()
            .expect("dialog lock")
            .contains_key(request.call_id());
        let response = match known {
            true => request.response(200, "OK", None, &[], None),
            false => request.response(481, "Call/Transaction Does Not Exist", None, &[], None),
        };
        self.send(&response, from).await;
    }

    /// A re-INVITE (hold, a moved media address, a session timer's refresh): the same answer
    /// with the SDP's version counted up, the RTP sent where the new offer says.
    async fn reinvite(&self, request: &Request, from: SocketAddr) {
        let response = {
            let mut dialogs = self.dialogs.lock().expect("dialog lock");
            match dialogs.get_mut(request.call_id()) {
                None => request.response(481, "Call/Transaction Does Not Exist", None, &[], None),
                Some(dialog) => {
                    if let Ok(offer) = AudioOffer::parse(&request.body) {
                        dialog.remote_rtp.send_replace(offer.remote);
                    }
                    dialog.sdp_version += 1;
                    let body =
                        dialog
                            .offer
                            .answer(dialog.local_rtp, dialog.sdp_id, dialog.sdp_version);
                    let contact = [("Allow", ALLOW.to_owned())];
                    request.response(200, "OK", None, &contact, Some(("application/sdp", &body)))
                }
            }
        };
        self.send(&response, from).await;
    }

    /// Sends a BYE unless the caller's own BYE ended the call.
    async fn call_ended(&self, call_id: &str, ending: MediaEnding, bye: ByeTarget) {
        let ours = self.dialogs.lock().expect("dialog lock").remove(call_id);
        if ours.is_none() {
            return;
        }
        tracing::info!(call_id, ?ending, "ending the SIP call");
        let answered = Arc::new(Notify::new());
        self.byes
            .lock()
            .expect("bye lock")
            .insert(call_id.to_owned(), answered.clone());
        let text = bye.request(call_id);
        let mut interval = T1;
        for _ in 0..4 {
            self.send(&text, bye.to).await;
            tokio::select! {
                _ = answered.notified() => break,
                _ = tokio::time::sleep(interval) => interval = (interval * 2).min(T2),
            }
        }
        self.byes.lock().expect("bye lock").remove(call_id);
    }

    fn response_arrived(&self, datagram: &[u8]) {
        let text = String::from_utf8_lossy(datagram);
        let call_id = text.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            let name = name.trim();
            (name.eq_ignore_ascii_case("Call-ID") || name == "i").then(|| value.trim())
        });
        if let Some(waiter) = call_id.and_then(|id| self.byes.lock().ok()?.get(id).cloned()) {
            waiter.notify_one();
        }
    }
}

fn media_call(
    session: SessionHandle,
    socket: UdpSocket,
    offer: AudioOffer,
    remote: watch::Receiver<SocketAddr>,
    state: &AppState,
    cancel: CancellationToken,
) -> MediaCall {
    let SessionHandle {
        id,
        input,
        output,
        events,
        stats,
        closer,
    } = session;
    MediaCall {
        id,
        socket,
        offer,
        remote,
        input,
        output: PacketSource::new(output),
        events,
        stats,
        closer,
        schedule: state.engine.output_schedule(),
        metrics: state.engine.metrics().clone(),
        cancel,
    }
}

/// Everything a BYE from our side needs: the dialog as the INVITE set it up.
struct ByeTarget {
    /// The caller's Contact URI (the BYE's request URI).
    uri: String,
    /// Our From: the INVITE's To with our tag.
    from: String,
    /// Our To: the INVITE's From.
    to_header: String,
    /// Where the INVITE came from (its Contact may name an address behind NAT).
    to: SocketAddr,
    /// Our Via's address.
    via: SocketAddr,
}

impl ByeTarget {
    fn new(invite: &Request, local_tag: &str, from: SocketAddr, via: SocketAddr) -> Self {
        Self {
            uri: invite
                .contact_uri()
                .map_or_else(|| format!("sip:{from}"), str::to_owned),
            from: format!(
                "{};tag={local_tag}",
                invite.header("To").unwrap_or_default()
            ),
            to_header: invite.header("From").unwrap_or_default().to_owned(),
            to: from,
            via,
        }
    }

    fn request(&self, call_id: &str) -> String {
        let branch = format!("z9hG4bK{:016x}", rand::random::<u64>());
        let head = format!(
            "BYE {} SIP/2.0\r\nVia: SIP/2.0/UDP {};branch={branch};rport\r\nMax-Forwards: 70\r\n\
From: {}\r\nTo: {}\r\nCall-ID: {call_id}\r\nCSeq: 1 BYE\r\n",
            self.uri, self.via, self.from, self.to_header
        );
        message::finish(head, &[], None)
    }
}

/// Why an INVITE gets a final answer other than 200.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0} is not among --sip-allow's networks")]
    Forbidden(IpAddr),
    #[error(transparent)]
    Offer(#[from] offer::OfferError),
    #[error(transparent)]
    Api(ApiError),
    #[error("could not bind an RTP socket: {0}")]
    Io(std::io::Error),
}

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Self::Forbidden(_) => "forbidden",
            Self::Offer(_) => "bad_sdp",
            Self::Api(err) => err.reason(),
            Self::Io(_) => "internal",
        }
    }

    /// The final response, with a `Warning` (RFC 3261 §20.43) that says why.
    fn response(&self, request: &Request) -> String {
        let (status, phrase) = match self {
            Self::Forbidden(_) => (403, "Forbidden"),
            Self::Offer(_) => (488, "Not Acceptable Here"),
            Self::Api(err) if err.status().is_server_error() => (503, "Service Unavailable"),
            Self::Api(_) => (400, "Bad Request"),
            Self::Io(_) => (500, "Server Internal Error"),
        };
        let why = self.to_string().replace('"', "'");
        let mut extra = vec![("Warning", format!("399 duplex \"{why}\""))];
        if status == 503 {
            extra.push(("Retry-After", RETRY_AFTER_SECS.to_owned()));
        }
        request.response(status, phrase, None, &extra, None)
    }
}

/// The local address this host sends to `peer` from (no packet is sent).
fn route_source(peer: SocketAddr) -> Option<IpAddr> {
    let unspecified: SocketAddr = match peer {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().ok()?,
        SocketAddr::V6(_) => "[::]:0".parse().ok()?,
    };
    let socket = std::net::UdpSocket::bind(unspecified).ok()?;
    socket.connect(peer).ok()?;
    Some(socket.local_addr().ok()?.ip())
}
