//! Phone calls straight from a PBX or a SIP trunk (`serve --sip-port`): a SIP user agent over
//! UDP that answers INVITEs with Opus, G.722 or G.711 over plain RTP (RFC 3261, 3264, 3550,
//! 4733, 7587), so an Asterisk, FreeSWITCH or 3CX on the same network reaches the agent with
//! no cloud provider.
//!
//! Callers are admitted by source address (`--sip-allow`, private networks by default): SIP
//! has no bearer token, and scanners probe every public port 5060. Requests from elsewhere get
//! a 403 (INVITE) or nothing. The persona comes from the `X-Duplex-Voice` and
//! `X-Duplex-Prompt` headers, or from a request URI whose user part is a voice's name
//! (`sip:NATM1@agent`).

pub mod auth;
pub mod dial;
mod dialog;
pub mod media;
pub mod message;
pub mod offer;
pub mod register;
pub mod srtp;
mod transport;

use super::{ApiError, AppState};
use crate::engine::{PersonaRequest, SessionHandle, SessionId};
use crate::gateway::outbound::PacketSource;
use crate::gateway::ports::PortLease;
use auth::{CallerAuth, Verdict};
use dialog::{ALLOW, ByeTarget, Dialog};
use ipnet::IpNet;
use media::{MediaCall, MediaEnding, TRANSPORT};
use message::{MAX_MESSAGE_BYTES, Request};
use offer::{AudioOffer, SipCodec};
use register::{RegisterDialog, RegisterSettings};
use rustls::pki_types::ServerName;
use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Notify, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use transport::Peer;
pub use transport::Transport;

/// RFC 3261's T1: the first retransmission interval of a reliable answer over UDP.
const T1: Duration = Duration::from_millis(500);
/// Its cap (T2).
const T2: Duration = Duration::from_secs(4);
/// An answered INVITE whose ACK has not come after this long (64·T1) is abandoned.
const ACK_TIMEOUT: Duration = Duration::from_secs(32);
/// Our BYE is sent at most this many times, waiting twice as long after each (from
/// `BYE_FIRST_WAIT`): under two seconds in all, inside the shutdown's drain.
const BYE_SENDS: usize = 3;
const BYE_FIRST_WAIT: Duration = Duration::from_millis(250);
/// Retry-After, in seconds, on a 503.
const RETRY_AFTER_SECS: &str = "5";

/// Where SIP listens and whom it answers.
#[derive(Debug, Clone)]
pub struct SipSettings {
    pub bind: SocketAddr,
    /// Source networks whose requests are answered.
    pub allow: Vec<IpNet>,
    /// The PBX extension to register as, if any (its registrar is then allowed too).
    pub register: Option<RegisterSettings>,
    /// The codecs a call may take, the preferred first (`SipCodec::ALL` by default).
    pub codecs: Vec<SipCodec>,
    /// SIP over TLS (`--sip-tls-port`): where it listens and the certificate it shows.
    pub tls: Option<SipTls>,
    /// The account a new call must prove it knows (`--sip-caller-auth`), if any.
    pub caller_auth: Option<Arc<CallerAuth>>,
    /// How calls placed over TLS check the callee's certificate ([`tls_client_config`];
    /// the public CAs when None).
    pub tls_client: Option<Arc<rustls::ClientConfig>>,
}

/// How calls placed over TLS check the callee's certificate: against the public CAs
/// (webpki-roots), and the certificates in `extra_ca` (`--sip-tls-ca`: a PEM file with a
/// PBX's own CA, or its self-signed certificate).
pub fn tls_client_config(extra_ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots =
        rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_ca {
        let shown = path.display();
        let certificates = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("{shown}: {e}"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{shown}: {e}"))?;
        if certificates.is_empty() {
            return Err(format!("{shown} holds no PEM certificate"));
        }
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|e| format!("{shown}: {e}"))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// SIP over TLS: its address and the server's TLS configuration (the page's certificate).
#[derive(Debug, Clone)]
pub struct SipTls {
    pub bind: SocketAddr,
    pub config: Arc<rustls::ServerConfig>,
}

/// How long a REGISTER over a connection waits for its answer (as long as UDP's six sends).
const REGISTER_WAIT: Duration = Duration::from_secs(16);
/// A registration failed, or was refused: retried after this.
const REGISTER_RETRY: Duration = Duration::from_secs(30);
/// How long shutdown gives the registration's withdrawal (inside the drain's 3 s).
const UNREGISTER_LIMIT: Duration = Duration::from_secs(2);

/// The UDP socket and the TCP listener on one port: for port 0, the first free port both
/// can take; for a given port, TCP is left off (with a warning) when another program holds it.
async fn bind_pair(bind: SocketAddr) -> std::io::Result<(UdpSocket, Option<TcpListener>)> {
    let tries = if bind.port() == 0 { 20 } else { 1 };
    let mut last_error = None;
    for _ in 0..tries {
        let socket = UdpSocket::bind(bind).await?;
        match TcpListener::bind(socket.local_addr()?).await {
            Ok(listener) => return Ok((socket, Some(listener))),
            Err(err) if bind.port() == 0 => last_error = Some(err),
            Err(err) => {
                tracing::warn!(%err, "SIP over TCP is off: its port is taken; UDP answers alone");
                return Ok((socket, None));
            }
        }
    }
    let err = last_error.map_or_else(String::new, |e| e.to_string());
    tracing::warn!(%err, "SIP over TCP is off: no port was free for both; UDP answers alone");
    Ok((UdpSocket::bind(bind).await?, None))
}

/// Our Contact for a call from `peer`: a `sips:` URI when the call asked for one over TLS
/// (RFC 3261 §12.1.1), else `sip:` with the transport the call came on.
fn contact_uri(addr: SocketAddr, peer: &Peer, sips: bool) -> String {
    match sips && peer.is_tls() {
        true => format!("<sips:duplex@{addr}>"),
        false => format!("<sip:duplex@{addr}{}>", peer.contact_param()),
    }
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

/// The SIP endpoint: one UDP socket and a TCP listener on the same port for signaling, one
/// UDP socket per call for its RTP.
pub struct SipServer {
    socket: Arc<UdpSocket>,
    /// None when the TCP port was taken (SIP then answers over UDP alone).
    tcp: Option<TcpListener>,
    tls: Option<(TcpListener, TlsAcceptor)>,
    shared: Arc<Shared>,
}

struct Shared {
    socket: Arc<UdpSocket>,
    state: Arc<AppState>,
    allow: Vec<IpNet>,
    /// Live calls by Call-ID.
    dialogs: Mutex<HashMap<String, Dialog>>,
    /// Requests we sent (BYE, REGISTER), by Call-ID: their final responses go here.
    awaiting: Mutex<HashMap<String, mpsc::UnboundedSender<String>>>,
    /// The registration to keep, with the registrar's address.
    register: Option<(RegisterSettings, SocketAddr)>,
    codecs: Vec<SipCodec>,
    /// The TLS listener's port, for the Contact of calls that came over TLS.
    tls_port: Option<u16>,
    caller_auth: Option<Arc<CallerAuth>>,
    tls_client: Arc<rustls::ClientConfig>,
    /// Calls the agent placed, by Call-ID: live ones and the last ended ones.
    placed: Mutex<dial::PlacedCalls>,
    /// The connection kept to the registrar over TCP or TLS.
    registrar_link: Mutex<Option<Peer>>,
}

impl SipServer {
    pub async fn bind(settings: &SipSettings, state: Arc<AppState>) -> std::io::Result<Self> {
        let (socket, tcp) = bind_pair(settings.bind).await?;
        let socket = Arc::new(socket);
        let tls = match &settings.tls {
            Some(tls) => Some((
                TcpListener::bind(tls.bind).await?,
                TlsAcceptor::from(tls.config.clone()),
            )),
            None => None,
        };
        let tls_port = match &tls {
            Some((listener, _)) => Some(listener.local_addr()?.port()),
            None => None,
        };
        let tls_client = match &settings.tls_client {
            Some(config) => config.clone(),
            None => tls_client_config(None).map_err(std::io::Error::other)?,
        };
        let mut allow = settings.allow.clone();
        let register = match &settings.register {
            Some(register) => {
                let registrar = resolve(&register.registrar, socket.local_addr()?).await?;
                allow.push(IpNet::from(registrar.ip().to_canonical()));
                Some((register.clone(), registrar))
            }
            None => None,
        };
        let shared = Arc::new(Shared {
            socket: socket.clone(),
            state,
            allow,
            dialogs: Mutex::new(HashMap::new()),
            awaiting: Mutex::new(HashMap::new()),
            register,
            codecs: settings.codecs.clone(),
            tls_port,
            caller_auth: settings.caller_auth.clone(),
            tls_client,
            placed: Mutex::new(dial::PlacedCalls::default()),
            registrar_link: Mutex::new(None),
        });
        Ok(Self {
            socket,
            tcp,
            tls,
            shared,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// What places calls for `POST /api/calls`.
    pub fn dialer(&self) -> dial::Dialer {
        dial::Dialer::new(&self.shared)
    }

    /// Whether SIP is answered over TCP too (on the UDP port).
    pub fn has_tcp(&self) -> bool {
        self.tcp.is_some()
    }

    /// Where SIP over TLS answers, if it does.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref()?.0.local_addr().ok()
    }

    /// Answers SIP for as long as the server runs (through its shutdown too: the calls'
    /// BYEs are answered then, and new INVITEs get 503).
    pub async fn run(self) {
        if self.shared.register.is_some() {
            tokio::spawn(self.shared.clone().keep_registered());
        }
        if let Some(listener) = self.tcp {
            tokio::spawn(transport::serve(listener, None, self.shared.clone()));
        }
        if let Some((listener, acceptor)) = self.tls {
            tokio::spawn(transport::serve(
                listener,
                Some(acceptor),
                self.shared.clone(),
            ));
        }
        let mut buf = vec![0u8; MAX_MESSAGE_BYTES + 1];
        loop {
            let Ok((len, from)) = self.socket.recv_from(&mut buf).await else {
                continue;
            };
            if len > MAX_MESSAGE_BYTES {
                self.shared.count("too_big");
                continue;
            }
            self.shared
                .clone()
                .handle(&buf[..len], &Peer::udp(from))
                .await;
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

    async fn send(&self, text: &str, to: &Peer) {
        if to.write_stream(text) {
            return;
        }
        if let Err(err) = self.socket.send_to(text.as_bytes(), to.addr).await {
            tracing::debug!(%to, %err, "SIP send failed");
        }
    }

    fn allowed(&self, from: SocketAddr) -> bool {
        let ip = from.ip().to_canonical();
        self.allow.iter().any(|net| net.contains(&ip))
    }

    async fn handle(self: Arc<Self>, datagram: &[u8], from: &Peer) {
        if !self.allowed(from.addr) && !self.placed_with(datagram, from.addr) {
            return self.refuse_stranger(datagram, from).await;
        }
        if message::is_response(datagram) {
            self.response_arrived(datagram);
            return;
        }
        let mut request = match Request::parse(datagram) {
            Ok(request) => request,
            Err(message::ParseError::Response) => return,
            Err(err) => {
                // Without the headers a response copies there is no one to answer.
                tracing::debug!(%from, %err, "SIP datagram dropped");
                self.count("bad_message");
                return;
            }
        };
        request.note_source(from.addr);
        match request.method.as_str() {
            "INVITE" if request.tag("To").is_some() => self.in_dialog(&request, from).await,
            "INVITE" => self.invite(request, from).await,
            "ACK" | "BYE" | "CANCEL" => self.in_dialog(&request, from).await,
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

    /// A request from outside `--sip-allow`: an INVITE gets 403 with the reason (a PBX
    /// misconfigured on our side should learn why), anything else nothing.
    async fn refuse_stranger(&self, datagram: &[u8], from: &Peer) {
        self.count("forbidden");
        let Ok(request) = Request::parse(datagram) else {
            return;
        };
        if request.method != "INVITE" || request.tag("To").is_some() {
            return;
        }
        let refusal = Refusal::Forbidden(from.addr.ip());
        self.rejected(&refusal, from);
        self.send(&refusal.response(&request), from).await;
    }

    fn rejected(&self, refusal: &Refusal, from: &Peer) {
        let reason = refusal.reason();
        let metrics = self.state.engine.metrics();
        metrics.sessions_rejected.with_label_values(&[reason]).inc();
        tracing::info!(%from, reason, why = %refusal, "SIP call refused");
    }

    async fn invite(self: Arc<Self>, request: Request, from: &Peer) {
        let known = self
            .dialogs
            .lock()
            .expect("dialog lock")
            .get(request.call_id())
            .map(|dialog| (dialog.owns_initial(&request), dialog.answer.clone()));
        match known {
            // A retransmission: the same answer again.
            Some((true, answer)) => return self.send(&answer, from).await,
            // Another caller's Call-ID, or a call we placed: it reaches nothing.
            Some((false, _)) => {
                let why = dialog::warning(&"this Call-ID belongs to another call");
                let response = request.response(400, "Bad Request", None, &[why], None);
                return self.send(&response, from).await;
            }
            None if self.placed_call_id(request.call_id()) => {
                let why = dialog::warning(&"this Call-ID belongs to another call");
                let response = request.response(400, "Bad Request", None, &[why], None);
                return self.send(&response, from).await;
            }
            None => {}
        }
        if let Some(required) = request.header("Require") {
            // No extension (100rel, timer, …) is implemented: RFC 3261 §8.2.2.3.
            let unsupported = [("Unsupported", required.to_owned())];
            let response = request.response(420, "Bad Extension", None, &unsupported, None);
            return self.send(&response, from).await;
        }
        if let Some(auth) = &self.caller_auth {
            match auth.check(&request) {
                Verdict::Accepted => {}
                Verdict::Challenge { stale } => {
                    self.count("challenged");
                    let challenge = [auth.challenge(stale)];
                    let response = request.response(401, "Unauthorized", None, &challenge, None);
                    return self.send(&response, from).await;
                }
                Verdict::Refused(why) => {
                    let refusal = Refusal::Unauthorized(why);
                    self.rejected(&refusal, from);
                    return self.send(&refusal.response(&request), from).await;
                }
            }
        }
        self.send(&request.response(100, "Trying", None, &[], None), from)
            .await;
        if let Err(refusal) = self.clone().answer(&request, from).await {
            self.rejected(&refusal, from);
            self.send(&refusal.response(&request), from).await;
        }
    }

    /// Opens the session, binds its RTP socket and sends the 200 OK; the call then runs on
    /// its own task.
    async fn answer(self: Arc<Self>, request: &Request, from: &Peer) -> Result<(), Refusal> {
        if self.state.is_draining() {
            return Err(Refusal::Api(ApiError::Draining));
        }
        let offer = match request.body.trim().is_empty() {
            true => None,
            false => Some(AudioOffer::parse(&request.body, &self.codecs)?),
        };
        let persona = self.persona(request);
        let session = self
            .state
            .engine
            .open_session(&persona)
            .map_err(|e| Refusal::Api(e.into()))?;
        let (socket, lease) = self.bind_rtp().await?;
        let local_ip = self.local_ip(from.addr);
        let rtp_port = socket.local_addr().map_err(Refusal::Io)?.port();
        let (cancel, tracked) = self.state.track_guard(session.id);
        let local_rtp = SocketAddr::new(local_ip, rtp_port);
        let dialog = self.dialog_for(
            request,
            from,
            offer.as_ref(),
            session.id,
            local_rtp,
            cancel.clone(),
        );
        let (rtp, codec) = match &offer {
            Some(offer) => (offer.remote.to_string(), offer.codec.name()),
            None => ("from the ACK".into(), "offered"),
        };
        tracing::info!(
            session = %session.id, %from, rtp, codec, voice = ?persona.voice, "SIP call answered"
        );
        let answer = dialog.answer.clone();
        let acked = dialog.acked.clone();
        let offers = dialog.offer.subscribe();
        let bye = ByeTarget::new(
            request,
            &dialog.local_tag,
            from.clone(),
            self.contact_addr(local_ip, from),
        );
        let call_id = request.call_id().to_owned();
        self.dialogs
            .lock()
            .expect("dialog lock")
            .insert(call_id.clone(), dialog);
        self.send(&answer, from).await;
        let resend = self
            .clone()
            .resend_until_acked(answer, from.clone(), acked, cancel.clone());
        tokio::spawn(resend);
        let id = session.id;
        let caller_ip = from.addr.ip().to_canonical();
        let call = media_call(
            session,
            socket,
            offers,
            caller_ip,
            &self.state,
            cancel,
            None,
        );
        let timer = self.state.engine.metrics().call(TRANSPORT);
        tokio::spawn(async move {
            let ending = media::run(call).await;
            drop((lease, timer));
            self.call_ended(&call_id, id, ending, bye).await;
            drop(tracked);
        });
        Ok(())
    }

    /// The dialog a 200 OK to `request` sets up, with that answer.
    fn dialog_for(
        &self,
        request: &Request,
        from: &Peer,
        offer: Option<&AudioOffer>,
        id: SessionId,
        local_rtp: SocketAddr,
        cancel: CancellationToken,
    ) -> Dialog {
        let local_tag = format!("{:016x}", rand::random::<u64>());
        let sdp_id = u64::from(rand::random::<u32>());
        let contact = contact_uri(
            self.contact_addr(local_rtp.ip(), from),
            from,
            request.uri.starts_with("sips:"),
        );
        let extra = [("Contact", contact.clone()), ("Allow", ALLOW.to_owned())];
        let body = match offer {
            Some(offer) => offer.answer(local_rtp, sdp_id, 1),
            None => offer::late_offer(local_rtp, sdp_id, &self.codecs, None),
        };
        let sdp = Some(("application/sdp", body.as_str()));
        let answer = request.response(200, "OK", Some(&local_tag), &extra, sdp);
        Dialog {
            id,
            remote_tag: request.tag("From").unwrap_or_default().to_owned(),
            local_tag,
            answer,
            acked: Arc::new(Notify::new()),
            offer: watch::Sender::new(offer.cloned()),
            local_rtp,
            contact,
            sdp_id,
            sdp_version: 1,
            invite_cseq: dialog::cseq_number(request),
            reoffer_cseq: None,
            last_reinvite: None,
            codecs: self.codecs.clone(),
            cancel,
            outbound: false,
        }
    }

    fn persona(&self, request: &Request) -> PersonaRequest {
        let voices = &self.state.engine.info().catalog.voices;
        let uri_voice = request
            .uri
            .strip_prefix("sip:")
            .or_else(|| request.uri.strip_prefix("sips:"))
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
        route_source(caller).map_or(settings.bind_ip, |ip| ip.to_canonical())
    }

    /// Our SIP address for `peer`: the TLS port for a peer on TLS, else the UDP (and TCP) one.
    fn contact_addr(&self, local_ip: IpAddr, peer: &Peer) -> SocketAddr {
        let port = match (peer.is_tls(), self.tls_port) {
            (true, Some(port)) => port,
            _ => self.socket.local_addr().map(|a| a.port()).unwrap_or(5060),
        };
        SocketAddr::new(local_ip, port)
    }

    async fn resend_until_acked(
        self: Arc<Self>,
        answer: String,
        to: Peer,
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
            self.send(&answer, &to).await;
            interval = (interval * 2).min(T2);
        }
    }

    /// ACK, BYE, CANCEL or a re-INVITE: answered only within the call its Call-ID and tags
    /// name (481 otherwise; an ACK gets no answer).
    async fn in_dialog(&self, request: &Request, from: &Peer) {
        let response = {
            let mut dialogs = self.dialogs.lock().expect("dialog lock");
            let call_id = request.call_id();
            match dialogs.get_mut(call_id).filter(|d| d.owns(request)) {
                None if request.method == "ACK" => return,
                None => request.response(481, "Call/Transaction Does Not Exist", None, &[], None),
                Some(dialog) => match request.method.as_str() {
                    "ACK" => {
                        if let Err(err) = dialog.ack(request) {
                            tracing::info!(session = %dialog.id, %err, "the ACK did not answer our offer: ending the call");
                            dialog.cancel.cancel();
                        }
                        return;
                    }
                    "BYE" => {
                        let dialog = dialogs.remove(call_id).expect("found above");
                        tracing::info!(session = %dialog.id, "the caller hung up");
                        dialog.cancel.cancel();
                        request.response(200, "OK", None, &[], None)
                    }
                    // Calls are answered at once: a CANCEL finds an answered call, which
                    // only a BYE ends (RFC 3261 §9.2).
                    "CANCEL" => request.response(200, "OK", Some(&dialog.local_tag), &[], None),
                    _ => dialog.reinvite(request),
                },
            }
        };
        self.send(&response, from).await;
    }

    /// Sends a BYE unless the other side's own BYE ended the call; whether it did.
    async fn call_ended(
        &self,
        call_id: &str,
        id: SessionId,
        ending: MediaEnding,
        bye: ByeTarget,
    ) -> bool {
        let dialog = {
            let mut dialogs = self.dialogs.lock().expect("dialog lock");
            let ours = dialogs.get(call_id).is_some_and(|dialog| dialog.id == id);
            ours.then(|| dialogs.remove(call_id)).flatten()
        };
        let Some(dialog) = dialog else {
            return false;
        };
        tracing::info!(session = %dialog.id, ?ending, "hanging up the SIP call");
        self.hang_up(call_id, &bye).await;
        true
    }

    /// Sends our BYE until it is answered (over UDP: three times at most, in under two
    /// seconds).
    async fn hang_up(&self, call_id: &str, bye: &ByeTarget) {
        let text = bye.request(call_id);
        let cseq = bye.cseq();
        // A connection delivers or fails by itself (RFC 3261 §17.1.2.2): one send, the same
        // wait in all.
        let (sends, mut wait) = match bye.to.is_stream() {
            true => (1, BYE_FIRST_WAIT * 7),
            false => (BYE_SENDS, BYE_FIRST_WAIT),
        };
        let mut responses = self.await_responses(call_id);
        for _ in 0..sends {
            self.send(&text, &bye.to).await;
            if tokio::time::timeout(wait, final_response(&mut responses, cseq, "BYE"))
                .await
                .is_ok()
            {
                break;
            }
            wait *= 2;
        }
        self.awaiting.lock().expect("awaiting lock").remove(call_id);
    }

    /// Where the final responses to our requests with `call_id` will arrive.
    fn await_responses(&self, call_id: &str) -> mpsc::UnboundedReceiver<String> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.awaiting
            .lock()
            .expect("awaiting lock")
            .insert(call_id.to_owned(), sender);
        receiver
    }

    fn response_arrived(&self, datagram: &[u8]) {
        let text = String::from_utf8_lossy(datagram).into_owned();
        let call_id = message::text_header(&text, "Call-ID");
        let waiter = call_id.and_then(|id| self.awaiting.lock().ok()?.get(id).cloned());
        if let Some(waiter) = waiter {
            let _ = waiter.send(text);
        }
    }

    /// The way to the registrar: over UDP, or over TCP or TLS the connection kept to it (a
    /// new one when there is none or it closed), which also carries the calls it sends us
    /// and those we place through it.
    pub(super) async fn registrar_peer(self: &Arc<Self>) -> Result<Peer, String> {
        let Some((settings, registrar)) = &self.register else {
            return Err("no --sip-register".into());
        };
        if settings.transport == Transport::Udp {
            return Ok(Peer::udp(*registrar));
        }
        let kept = self.registrar_link.lock().expect("link lock").clone();
        if let Some(peer) = kept.filter(|peer| !peer.is_closed()) {
            return Ok(peer);
        }
        let tls = match settings.transport {
            Transport::Tls => {
                let name = ServerName::try_from(settings.registrar_name().to_owned())
                    .map_err(|e| format!("{}: {e}", settings.registrar_name()))?;
                Some((TlsConnector::from(self.tls_client.clone()), name))
            }
            _ => None,
        };
        let peer = transport::connect(*registrar, tls, self.clone())
            .await
            .map_err(|e| format!("connecting to {registrar}: {e}"))?;
        *self.registrar_link.lock().expect("link lock") = Some(peer.clone());
        Ok(peer)
    }

    /// Keeps `--sip-register`'s registration standing: registered again before it expires,
    /// retried after a failure.
    async fn keep_registered(self: Arc<Self>) {
        let Some((settings, registrar)) = self.register.clone() else {
            return;
        };
        // The drain waits for the registration's withdrawal, so the PBX stops sending calls.
        let _farewell = self.state.hold_drain();
        let shutdown = self.state.shutdown_token();
        let mut dialog = RegisterDialog::new();
        let mut responses = self.await_responses(&dialog.call_id);
        let gauge = self.state.engine.metrics().sip_registered.clone();
        loop {
            let attempt = self.register_once(&settings, &mut dialog, &mut responses);
            let answer = tokio::select! {
                answer = attempt => answer,
                _ = shutdown.cancelled() => break,
            };
            let outcome = answer.and_then(|ok| {
                match register::granted_expires(&ok, dialog.contact, dialog.expires) {
                    0 => Err("the registrar granted no time".to_owned()),
                    granted => Ok(granted),
                }
            });
            let wait = match outcome {
                Ok(granted) => {
                    if gauge.get() == 0 {
                        tracing::info!(aor = %settings.aor, %registrar, granted, "registered with the PBX");
                    }
                    gauge.set(1);
                    Duration::from_secs(u64::from(granted) * 4 / 5).max(Duration::from_secs(1))
                }
                Err(why) => {
                    tracing::warn!(aor = %settings.aor, %registrar, %why, "SIP registration failed; retrying in 30 s");
                    gauge.set(0);
                    REGISTER_RETRY
                }
            };
            // A connection to the registrar that closes takes its calls away: register anew.
            let link = self.registrar_link.lock().expect("link lock").clone();
            let link_closed = async {
                match &link {
                    Some(peer) => peer.closed().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = link_closed => {
                    tracing::warn!(aor = %settings.aor, %registrar, "the connection to the registrar closed; registering again");
                }
                _ = shutdown.cancelled() => break,
            }
        }
        if gauge.get() == 1 {
            self.unregister(&settings, registrar, &mut dialog, &mut responses)
                .await;
            gauge.set(0);
        }
    }

    /// Withdraws our binding (a REGISTER with `Expires: 0`), within [`UNREGISTER_LIMIT`].
    async fn unregister(
        self: &Arc<Self>,
        settings: &RegisterSettings,
        registrar: SocketAddr,
        dialog: &mut RegisterDialog,
        responses: &mut mpsc::UnboundedReceiver<String>,
    ) {
        dialog.expires = 0;
        let withdrawn = self.register_once(settings, dialog, responses);
        match tokio::time::timeout(UNREGISTER_LIMIT, withdrawn).await {
            Ok(Ok(_)) => {
                tracing::info!(aor = %settings.aor, %registrar, "unregistered from the PBX")
            }
            Ok(Err(why)) => {
                tracing::warn!(aor = %settings.aor, %registrar, %why, "unregistering failed; the registration lapses")
            }
            Err(_) => tracing::warn!(
                aor = %settings.aor, %registrar,
                "no answer to unregistering; the registration lapses"
            ),
        }
    }

    /// One REGISTER, answering a digest challenge (and a second when the first nonce went
    /// stale) and a 423's `Min-Expires`; the registrar's 2xx.
    async fn register_once(
        self: &Arc<Self>,
        settings: &RegisterSettings,
        dialog: &mut RegisterDialog,
        responses: &mut mpsc::UnboundedReceiver<String>,
    ) -> Result<String, String> {
        let registrar = self.registrar_peer().await?;
        dialog.contact = self.contact_addr(self.local_ip(registrar.addr), &registrar);
        let mut authorization = None;
        let mut challenges = 0;
        loop {
            dialog.cseq += 1;
            let request = settings.request(dialog, authorization.as_ref(), &registrar);
            let response = self
                .transact(&request, dialog.cseq, &registrar, responses)
                .await?;
            let refused = || response.lines().next().unwrap_or_default().to_owned();
            let stale = register::is_stale(&response);
            match register::status(&response) {
                Some(200..=299) => return Ok(response),
                Some(401 | 407) if challenges == 0 || (challenges == 1 && stale) => {
                    challenges += 1;
                    authorization = Some(settings.answer_challenge(&response)?);
                }
                // Withdrawing (Expires: 0) must not turn into registering for longer.
                Some(423) if dialog.expires > 0 => match register::min_expires(&response) {
                    Some(min) if min > dialog.expires => dialog.expires = min,
                    _ => return Err(refused()),
                },
                _ => return Err(refused()),
            }
        }
    }

    /// Sends `request` (again at T1, 2·T1, … while unanswered, RFC 3261 §17.1.2) and returns
    /// its final response: the one with its `cseq` (a late answer to an earlier request of
    /// the same Call-ID is skipped).
    async fn transact(
        &self,
        request: &str,
        cseq: u32,
        to: &Peer,
        responses: &mut mpsc::UnboundedReceiver<String>,
    ) -> Result<String, String> {
        // A connection delivers or fails by itself: one send, and as long to wait for it.
        let (sends, mut wait) = match to.is_stream() {
            true => (1, REGISTER_WAIT),
            false => (6, T1),
        };
        for _ in 0..sends {
            self.send(request, to).await;
            let answered = final_response(responses, cseq, "REGISTER");
            if let Ok(Some(response)) = tokio::time::timeout(wait, answered).await {
                return Ok(response);
            }
            wait = (wait * 2).min(T2);
        }
        Err(format!("no answer from {to}"))
    }
}

/// The next final response among `responses` to our request `cseq` of `method`, as sent
/// (None once
/// their sender is gone).
async fn final_response(
    responses: &mut mpsc::UnboundedReceiver<String>,
    cseq: u32,
    method: &str,
) -> Option<String> {
    loop {
        let text = responses.recv().await?;
        let answers = message::Response::parse(&text)
            .is_some_and(|r| r.status >= 200 && r.cseq() == Some((cseq, method)));
        if answers {
            return Some(text);
        }
    }
}

fn media_call(
    session: SessionHandle,
    socket: UdpSocket,
    offer: watch::Receiver<Option<AudioOffer>>,
    caller_ip: IpAddr,
    state: &AppState,
    cancel: CancellationToken,
    agent_text: Option<media::AgentText>,
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
        caller_ip,
        input,
        output: PacketSource::new(output),
        events,
        stats,
        closer,
        schedule: state.engine.output_schedule(),
        metrics: state.engine.metrics().clone(),
        cancel,
        agent_text,
    }
}

/// Why an INVITE gets a final answer other than 200.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0} is not among --sip-allow's networks")]
    Forbidden(IpAddr),
    #[error("the credentials do not hold ({0})")]
    Unauthorized(&'static str),
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
            Self::Unauthorized(_) => "unauthorized",
            Self::Offer(_) => "bad_sdp",
            Self::Api(err) => err.reason(),
            Self::Io(_) => "internal",
        }
    }

    /// The final response, with a `Warning` (RFC 3261 §20.43) that says why.
    fn response(&self, request: &Request) -> String {
        let (status, phrase) = match self {
            Self::Forbidden(_) | Self::Unauthorized(_) => (403, "Forbidden"),
            Self::Offer(_) => (488, "Not Acceptable Here"),
            Self::Api(err) if err.status().is_server_error() => (503, "Service Unavailable"),
            Self::Api(_) => (400, "Bad Request"),
            Self::Io(_) => (500, "Server Internal Error"),
        };
        let mut extra = vec![dialog::warning(self)];
        if status == 503 {
            extra.push(("Retry-After", RETRY_AFTER_SECS.to_owned()));
        }
        request.response(status, phrase, None, &extra, None)
    }
}

/// The first address `host:port` resolves to that a socket bound at `local` can reach (an
/// IPv4 socket cannot send to IPv6).
async fn resolve(host: &str, local: SocketAddr) -> std::io::Result<SocketAddr> {
    let reachable = |addr: &SocketAddr| local.is_ipv6() || addr.is_ipv4();
    let found = tokio::net::lookup_host(host).await?.find(reachable);
    found.ok_or_else(|| {
        let why = format!("{host} has no address this SIP socket ({local}) can reach");
        std::io::Error::new(std::io::ErrorKind::NotFound, why)
    })
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
