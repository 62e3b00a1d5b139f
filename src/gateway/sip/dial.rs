//! Calls the agent places (`POST /api/calls`): an INVITE carrying our offer over UDP (RFC 3261
//! §13.2.1, §17.1.1), to a SIP URI or, for a bare number, through the `--sip-register` PBX
//! with its credentials; it rings until answered, refused, or cancelled (CANCEL, §9.1) when
//! the ring timeout passes or the call is hung up first. Once answered it runs like a call
//! the agent took: the same dialog table, media loop and BYE.

use super::dialog::{ALLOW, ByeTarget, Dialog};
use super::media::{self, AgentText, MediaEnding, TRANSPORT};
use super::message::{self, RequestHead, Response};
use super::offer::{self, AudioOffer, OfferError};
use super::register;
use super::srtp::Crypto;
use super::transport::{self, Peer, Transport, split_host_port};
use super::{ACK_TIMEOUT, Shared, T1, media_call, resolve};
use crate::engine::PersonaRequest;
use crate::gateway::ApiError;
use crate::gateway::ports::PortLease;
use crate::gateway::webhook::{self, Webhook};
use rustls::pki_types::ServerName;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::net::UdpSocket;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

/// How long a call rings before it is cancelled, unless the request says otherwise.
pub const DEFAULT_RING_TIMEOUT: Duration = Duration::from_secs(60);
pub const MAX_RING_TIMEOUT: Duration = Duration::from_secs(300);
/// How long an answered call may last, unless the request says otherwise: a voicemail that
/// never hangs up holds a session no longer than this.
pub const DEFAULT_MAX_DURATION: Duration = Duration::from_secs(3600);
pub const MAX_MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Ended calls whose reports `GET /api/calls` still gives.
const KEPT_ENDED: usize = 64;
/// The longest `to` taken.
const MAX_TARGET_CHARS: usize = 256;
/// How long a CANCEL waits for the INVITE's final answer (64·T1).
const CANCEL_WAIT: Duration = ACK_TIMEOUT;
/// Resolving the callee's host and connecting to it (TCP, TLS) take at most this long.
const NEXT_HOP_LIMIT: Duration = Duration::from_secs(15);
/// A CANCEL is sent at most this many times, T1 apart, until it is answered.
const CANCEL_SENDS: u32 = 4;

/// `POST /api/calls`'s body.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DialRequest {
    /// A SIP URI (`sip:bob@10.0.0.7`), or a number or extension the PBX dials.
    pub to: String,
    #[serde(default)]
    pub voice: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    /// Seconds to ring before giving up (1 to 300; 60 by default).
    #[serde(default)]
    pub ring_timeout_s: Option<u64>,
    /// Seconds an answered call may last before the agent hangs up (1 to 86400; 3600 by
    /// default).
    #[serde(default)]
    pub max_duration_s: Option<u64>,
    /// Where the call's report is POSTed each time its state changes.
    #[serde(default)]
    pub status_url: Option<String>,
    /// Offer SRTP (SDES keys, `RTP/SAVP`): the call fails with the callee's 488 if it cannot.
    #[serde(default)]
    pub srtp: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CallState {
    /// The INVITE is on its way; nothing has answered it yet.
    Calling,
    /// The other side rings (180 or 183).
    Ringing,
    /// Answered: the agent is talking.
    Answered,
    /// Answered, and over.
    Ended,
    /// Never answered: refused, cancelled, or unreachable.
    Failed,
}

/// What `GET /api/calls/{id}` says of a call.
#[derive(Debug, Clone, Serialize)]
pub struct CallReport {
    pub id: String,
    /// The request URI dialed.
    pub to: String,
    /// What carries its SIP: `udp`, `tcp` or `tls`.
    pub transport: &'static str,
    pub state: CallState,
    /// The SIP status of a call that failed with one (486 Busy Here, 487 after a CANCEL, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why it failed or ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The engine session once answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub codec: Option<&'static str>,
    /// Seconds since it was answered, or how long it lasted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub talked_s: Option<f64>,
    /// What the agent said (the model's text stream), once answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_text: Option<String>,
}

impl CallReport {
    fn calling(id: String, to: String, transport: &'static str) -> Self {
        Self {
            id,
            to,
            transport,
            state: CallState::Calling,
            status: None,
            reason: None,
            session: None,
            codec: None,
            talked_s: None,
            agent_text: None,
        }
    }
}

/// The calls the agent placed: the live ones, and the last [`KEPT_ENDED`] over.
#[derive(Default)]
pub struct PlacedCalls {
    calls: HashMap<String, Placed>,
    /// Call-IDs in the order they were placed.
    order: VecDeque<String>,
}

struct Placed {
    report: CallReport,
    hangup: CancellationToken,
    /// Where its SIP goes (the INVITE's next hop, and the callee's Contact once answered):
    /// the only strangers whose messages about it are read.
    peers: Vec<IpAddr>,
    /// Our tag (From's): a request within the call names it.
    local_tag: String,
    answered: Option<Instant>,
    over: Option<Instant>,
    agent_text: Option<AgentText>,
    /// Where its state changes are POSTed, until it is over.
    hook: Option<Webhook>,
}

impl Placed {
    /// POSTs the report to the call's `status_url`, if it has one.
    fn tell(&self) {
        if let Some(hook) = &self.hook {
            hook.send(&self.report());
        }
    }

    fn report(&self) -> CallReport {
        let talked = self
            .answered
            .map(|at| self.over.unwrap_or_else(Instant::now) - at);
        CallReport {
            talked_s: talked.map(|t| (t.as_secs_f64() * 10.0).round() / 10.0),
            agent_text: self.agent_text.as_ref().map(AgentText::text),
            ..self.report.clone()
        }
    }
}

impl PlacedCalls {
    fn insert(
        &mut self,
        report: CallReport,
        hangup: CancellationToken,
        call: &Outgoing,
        hook: Option<Webhook>,
    ) {
        self.order.push_back(report.id.clone());
        let placed = Placed {
            report,
            hangup,
            peers: vec![call.peer.addr.ip().to_canonical()],
            local_tag: call.tag.clone(),
            answered: None,
            over: None,
            agent_text: None,
            hook,
        };
        self.calls.insert(placed.report.id.clone(), placed);
        self.forget_oldest_ended();
    }

    fn forget_oldest_ended(&mut self) {
        let ended = self.calls.values().filter(|c| c.over.is_some()).count();
        if ended <= KEPT_ENDED {
            return;
        }
        let calls = &self.calls;
        let oldest = self.order.iter().position(|id| calls[id].over.is_some());
        if let Some(id) = oldest.and_then(|at| self.order.remove(at)) {
            self.calls.remove(&id);
        }
    }

    /// Calls not yet answered nor over: each will want a session if answered.
    fn pending(&self) -> usize {
        let pending =
            |c: &&Placed| matches!(c.report.state, CallState::Calling | CallState::Ringing);
        self.calls.values().filter(pending).count()
    }

    /// Reads the call's messages from `peer` too (the callee's Contact).
    fn add_peer(&mut self, id: &str, peer: IpAddr) {
        if let Some(call) = self.calls.get_mut(id) {
            call.peers.push(peer.to_canonical());
        }
    }

    /// Whether a message from `from` about call `id` is read: a response while one is
    /// awaited (`awaited`), a request naming our tag while the call is on.
    fn reads(&self, id: &str, from: IpAddr, to_tag: Option<&str>, awaited: bool) -> bool {
        let Some(call) = self.calls.get(id) else {
            return false;
        };
        if !call.peers.contains(&from.to_canonical()) {
            return false;
        }
        match to_tag {
            None => awaited,
            Some(tag) => call.over.is_none() && tag == call.local_tag,
        }
    }

    fn set(&mut self, id: &str, state: CallState) {
        if let Some(call) = self.calls.get_mut(id).filter(|c| c.report.state != state) {
            call.report.state = state;
            call.tell();
        }
    }

    fn answered(&mut self, id: &str, session: String, codec: &'static str, text: AgentText) {
        if let Some(call) = self.calls.get_mut(id) {
            call.report.state = CallState::Answered;
            call.report.session = Some(session);
            call.report.codec = Some(codec);
            call.answered = Some(Instant::now());
            call.agent_text = Some(text);
            call.tell();
        }
    }

    fn over(&mut self, id: &str, state: CallState, status: Option<u16>, reason: String) {
        if let Some(call) = self.calls.get_mut(id) {
            call.report.state = state;
            call.report.status = status;
            call.report.reason = Some(reason);
            call.over = Some(Instant::now());
            call.tell();
            call.hook = None;
        }
        self.forget_oldest_ended();
    }

    fn get(&self, id: &str) -> Option<CallReport> {
        self.calls.get(id).map(Placed::report)
    }

    fn all(&self) -> Vec<CallReport> {
        self.order
            .iter()
            .filter_map(|id| self.calls.get(id))
            .map(Placed::report)
            .collect()
    }
}

/// Where a call goes: its request URI, the next hop its INVITE is sent to, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub uri: String,
    pub hop: Hop,
    pub transport: Transport,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hop {
    /// Through the registrar, with the extension's credentials.
    Registrar,
    /// Straight to this host, on this port.
    Direct(String, u16),
}

impl Target {
    /// Reads `to`: `sip:user@host[:port][;params]` (`sips:`, or `;transport=tcp|tls`, for a
    /// connection), `user@host`, or a bare number or extension, which needs `registrar` (the
    /// `--sip-register` PBX's host) to dial it.
    pub fn parse(to: &str, registrar: Option<&str>) -> Result<Self, String> {
        let to = to.trim();
        if to.is_empty() || to.chars().count() > MAX_TARGET_CHARS {
            return Err(format!(
                "`to` must name whom to call, in at most {MAX_TARGET_CHARS} characters"
            ));
        }
        if let Some(bad) = to.chars().find(|c| !is_uri_char(*c)) {
            return Err(format!("`to` holds {bad:?}, which no SIP URI has"));
        }
        let (scheme, rest) = match to.split_once(':') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("sip") => ("sip", rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("sips") => ("sips", rest),
            _ => ("", to),
        };
        if scheme.is_empty() && !rest.contains('@') {
            return Self::number(to, registrar);
        }
        let scheme = if scheme.is_empty() { "sip" } else { scheme };
        let (address, params) = rest.split_once(';').unwrap_or((rest, ""));
        let transport = Transport::of(params, scheme == "sips")?;
        let host_port = match address.rsplit_once('@') {
            Some((user, host)) if !user.is_empty() => host,
            Some(_) => return Err(format!("{to:?} has an empty user part")),
            None => address,
        };
        let (host, port) = split_host_port(host_port, transport.default_port())
            .ok_or_else(|| format!("{to:?} names no host to call (sip:user@host[:port])"))?;
        let params = match params {
            "" => String::new(),
            params => format!(";{params}"),
        };
        let through_registrar = transport == Transport::Udp
            && registrar.is_some_and(|registrar| {
                split_host_port(registrar, 5060).is_some_and(|(r_host, r_port)| {
                    r_host.eq_ignore_ascii_case(host) && r_port == port
                })
            });
        let hop = match through_registrar {
            true => Hop::Registrar,
            false => Hop::Direct(host.to_owned(), port),
        };
        Ok(Self {
            uri: format!("{scheme}:{address}{params}"),
            hop,
            transport,
        })
    }

    /// A bare number or extension: the PBX's to dial.
    fn number(to: &str, registrar: Option<&str>) -> Result<Self, String> {
        match registrar {
            Some(host) if !to.contains([':', ';']) => Ok(Self {
                uri: format!("sip:{to}@{host}"),
                hop: Hop::Registrar,
                transport: Transport::Udp,
            }),
            Some(_) => Err(format!("{to:?} is neither a number nor a sip: URI")),
            None => Err(format!(
                "{to:?} is a number, which needs a PBX to dial it: start the server with \
--sip-register, or give a sip: URI (sip:{to}@host)"
            )),
        }
    }
}

/// The characters a SIP URI may hold (RFC 3261 §25.1, escapes included); anything else
/// (spaces, line breaks, `<>"`) could leave the request line or a header.
fn is_uri_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.!~*'()&=+$,;?/:%@[]".contains(c)
}

/// The `host:port` of a SIP URI we reach over UDP (a Contact), None for one on another
/// transport or without a host.
fn udp_host_port(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("sip:")?;
    let (address, params) = rest.split_once(';').unwrap_or((rest, ""));
    if Transport::of(params, false).ok()? != Transport::Udp {
        return None;
    }
    let host_port = address.rsplit_once('@').map_or(address, |(_, host)| host);
    let (host, port) = split_host_port(host_port, 5060)?;
    Some(format!("{host}:{port}"))
}

/// Places calls and reports on them; held by the HTTP routes (weakly: the SIP endpoint owns
/// the calls).
#[derive(Clone)]
pub struct Dialer(Weak<Shared>);

impl Dialer {
    pub(super) fn new(shared: &Arc<Shared>) -> Self {
        Self(Arc::downgrade(shared))
    }

    fn shared(&self) -> Result<Arc<Shared>, ApiError> {
        self.0.upgrade().ok_or(ApiError::Draining)
    }

    /// Checks the request, sends the INVITE and returns the call's first report; the call
    /// goes on by itself.
    pub async fn dial(&self, request: DialRequest) -> Result<CallReport, ApiError> {
        self.shared()?.dial(request).await
    }

    pub fn report(&self, id: &str) -> Option<CallReport> {
        self.0.upgrade()?.placed.lock().ok()?.get(id)
    }

    pub fn reports(&self) -> Vec<CallReport> {
        let shared = self.0.upgrade();
        let placed = shared.as_ref().and_then(|s| s.placed.lock().ok());
        placed.map(|p| p.all()).unwrap_or_default()
    }

    /// Hangs up the call: cancelled while it rings, a BYE once answered. Its report, or
    /// None when there is no such call.
    pub fn hang_up(&self, id: &str) -> Option<CallReport> {
        let shared = self.0.upgrade()?;
        let placed = shared.placed.lock().ok()?;
        let call = placed.calls.get(id)?;
        call.hangup.cancel();
        Some(call.report())
    }
}

/// A placed call before its answer: what every request of its INVITE transaction carries.
struct Outgoing {
    call_id: String,
    uri: String,
    /// Our From tag.
    tag: String,
    /// Our From, with its tag.
    from: String,
    /// To, as the INVITE names it (no tag).
    to: String,
    contact: String,
    via: SocketAddr,
    /// The next hop, and the way there (over TCP or TLS, the connection we opened).
    peer: Peer,
    sdp: String,
    /// Our SDES key, when the offer asks for SRTP.
    crypto: Option<Crypto>,
    cseq: u32,
    branch: String,
    authorization: Option<(String, String)>,
}

impl Outgoing {
    /// A new INVITE: the next CSeq, a new branch (a new transaction).
    fn next_attempt(&mut self) {
        self.cseq += 1;
        self.branch = message::new_branch();
    }

    fn head(&self, method: &str, to: &str) -> String {
        RequestHead {
            method,
            uri: &self.uri,
            transport: self.peer.transport(),
            via: self.via,
            branch: &self.branch,
            from: &self.from,
            to,
            call_id: &self.call_id,
            cseq: self.cseq,
        }
        .write()
    }

    fn invite(&self) -> String {
        let mut extra = vec![
            ("Contact", self.contact.clone()),
            ("Allow", ALLOW.to_owned()),
            ("User-Agent", "duplex".to_owned()),
        ];
        if let Some((name, value)) = &self.authorization {
            extra.push((name.as_str(), value.clone()));
        }
        let head = self.head("INVITE", &self.to);
        message::finish(head, &extra, Some(("application/sdp", &self.sdp)))
    }

    /// The CANCEL of the INVITE in flight: its branch and CSeq number (RFC 3261 §9.1).
    fn cancel(&self) -> String {
        message::finish(self.head("CANCEL", &self.to), &[], None)
    }

    /// The ACK of a final answer other than 2xx, within the INVITE's transaction (§17.1.1.3).
    fn ack_refusal(&self, response: &Response) -> String {
        let to = response.header("To").unwrap_or(&self.to);
        message::finish(self.head("ACK", to), &[], None)
    }
}

/// How the ringing ended.
enum Rung {
    Answered(Response),
    /// Answered after we had given up on it (a CANCEL crossed the 2xx): hung up at once.
    AnsweredLate {
        answer: Response,
        why: String,
    },
    /// Refused, or given up; `unanswered` when no final answer came (nor a provisional one,
    /// so no CANCEL could be sent).
    Refused {
        status: Option<u16>,
        reason: String,
        unanswered: bool,
    },
}

/// What one response to the INVITE makes of the ringing.
enum Heard {
    Wait,
    /// A challenge, answered: the INVITE again with credentials.
    Challenged,
    Done(Rung),
}

/// One INVITE in flight (RFC 3261 §17.1.1.2): over UDP sent again at T1, 2·T1, … until
/// anything answers (timer A); given up 64·T1 after it was sent with no answer at all (timer
/// B); once it rings, its CANCEL (§9.1), over UDP sent again at T1 until answered.
struct Attempt {
    /// Over TCP or TLS, which deliver or fail by themselves: nothing is sent again.
    reliable: bool,
    provisional: bool,
    resend_every: Duration,
    resend_at: Instant,
    timer_b: Instant,
    /// Why it is being cancelled, and until when the INVITE's final answer is awaited.
    cancelling: Option<(String, Instant)>,
    cancel_at: Instant,
    cancels_sent: u32,
    cancel_answered: bool,
}

impl Attempt {
    fn new(reliable: bool) -> Self {
        let now = Instant::now();
        Self {
            reliable,
            provisional: false,
            resend_every: T1,
            resend_at: now + T1,
            timer_b: now + ACK_TIMEOUT,
            cancelling: None,
            cancel_at: now,
            cancels_sent: 0,
            cancel_answered: false,
        }
    }

    fn resent(&mut self) {
        self.resend_every *= 2;
        self.resend_at = Instant::now() + self.resend_every;
    }

    fn cancel(&mut self, why: String) {
        self.cancelling = Some((why, Instant::now() + CANCEL_WAIT));
        self.cancel_at = Instant::now();
    }

    /// Whether the INVITE is to be sent again when `resend_at` comes.
    fn resend_due(&self) -> bool {
        !self.reliable && !self.provisional
    }

    fn cancel_due(&self) -> bool {
        let sends = if self.reliable { 1 } else { CANCEL_SENDS };
        self.cancelling.is_some() && !self.cancel_answered && self.cancels_sent < sends
    }

    fn cancel_sent(&mut self) {
        self.cancels_sent += 1;
        self.cancel_at = Instant::now() + T1;
    }

    fn why(&self) -> Option<String> {
        self.cancelling.as_ref().map(|(why, _)| why.clone())
    }

    fn final_deadline(&self) -> Instant {
        let far = Instant::now() + ACK_TIMEOUT;
        self.cancelling.as_ref().map_or(far, |(_, until)| *until)
    }
}

/// A placed call's media and persona, set up before its INVITE.
struct CallSetup {
    persona: PersonaRequest,
    ring_timeout: Duration,
    max_duration: Duration,
    hangup: CancellationToken,
    socket: UdpSocket,
    lease: PortLease,
    local_rtp: SocketAddr,
    sdp_id: u64,
}

impl Shared {
    async fn dial(self: Arc<Self>, request: DialRequest) -> Result<CallReport, ApiError> {
        if self.state.is_draining() {
            return Err(ApiError::Draining);
        }
        let ring_timeout = seconds_within(
            "ring_timeout_s",
            request.ring_timeout_s,
            DEFAULT_RING_TIMEOUT,
            MAX_RING_TIMEOUT,
        )?;
        let max_duration = seconds_within(
            "max_duration_s",
            request.max_duration_s,
            DEFAULT_MAX_DURATION,
            MAX_MAX_DURATION,
        )?;
        let registrar = self.register.as_ref();
        let target = Target::parse(&request.to, registrar.map(|(r, _)| r.registrar_host()))
            .map_err(ApiError::BadRequest)?;
        let persona = PersonaRequest {
            voice: request.voice,
            prompt: request.prompt,
        };
        self.state.engine.info().catalog.resolve(&persona)?;
        let status_url = request
            .status_url
            .as_deref()
            .map(|url| {
                webhook::parse_url(url)
                    .map_err(|why| ApiError::BadRequest(format!("status_url: {why}")))
            })
            .transpose()?;
        self.admit(&self.placed.lock().expect("placed lock"))?;
        let peer = tokio::time::timeout(NEXT_HOP_LIMIT, self.next_hop(&target))
            .await
            .map_err(|_| {
                ApiError::BadRequest(format!(
                    "cannot call {}: no connection within {} s",
                    target.uri,
                    NEXT_HOP_LIMIT.as_secs()
                ))
            })??;
        let (socket, lease) = self.bind_rtp().await.map_err(internal)?;
        let local_ip = self.local_ip(peer.addr);
        let local_rtp = SocketAddr::new(local_ip, socket.local_addr().map_err(internal)?.port());
        let sdp_id = u64::from(rand::random::<u32>());
        let via = self.contact_addr(local_ip, &peer);
        let next_hop = peer.clone();
        let call = self.outgoing(&target, peer, via, local_rtp, sdp_id, request.srtp);
        let hangup = CancellationToken::new();
        let transport = match call.peer.transport() {
            "TLS" => "tls",
            "TCP" => "tcp",
            _ => "udp",
        };
        let report = CallReport::calling(call.call_id.clone(), target.uri.clone(), transport);
        {
            let mut placed = self.placed.lock().expect("placed lock");
            // Again with the lock held, so two requests cannot both take the last slot.
            self.admit(&placed)?;
            let hook = status_url.map(|url| {
                let metrics = self.state.engine.metrics().clone();
                Webhook::start(url, self.state.config.token.clone(), metrics)
            });
            placed.insert(report.clone(), hangup.clone(), &call, hook);
        }
        tracing::info!(call = %call.call_id, to = %target.uri, %next_hop, "placing a SIP call");
        self.count("call_placed");
        let setup = CallSetup {
            persona,
            ring_timeout,
            max_duration,
            hangup,
            socket,
            lease,
            local_rtp,
            sdp_id,
        };
        tokio::spawn(self.clone().place(call, setup));
        Ok(report)
    }

    /// The INVITE's next hop and the way there: the registrar, or the URI's host (over TCP or
    /// TLS, a connection opened to it now).
    async fn next_hop(self: &Arc<Self>, target: &Target) -> Result<Peer, ApiError> {
        let (host, port) = match (&target.hop, &self.register) {
            (Hop::Registrar, Some(_)) => {
                return self.registrar_peer().await.map_err(ApiError::BadRequest);
            }
            (Hop::Registrar, None) => return Err(internal("a PBX hop without --sip-register")),
            (Hop::Direct(host, port), _) => (host, *port),
        };
        let unreachable =
            |e: std::io::Error| ApiError::BadRequest(format!("cannot call {host}: {e}"));
        let local = self.socket.local_addr().map_err(internal)?;
        let addr = resolve(&format!("{host}:{port}"), local)
            .await
            .map_err(unreachable)?;
        let tls = match target.transport {
            Transport::Udp => return Ok(Peer::udp(addr)),
            Transport::Tcp => None,
            Transport::Tls if self.tls_port.is_none() => {
                return Err(ApiError::BadRequest(
                    "calls over TLS need --sip-tls-port: the callee's requests within the call \
(its BYE) come to our TLS port"
                        .into(),
                ));
            }
            Transport::Tls => {
                let name = host.trim_matches(['[', ']']).to_owned();
                let name = ServerName::try_from(name)
                    .map_err(|e| ApiError::BadRequest(format!("{host}: {e}")))?;
                Some((TlsConnector::from(self.tls_client.clone()), name))
            }
        };
        transport::connect(addr, tls, self.clone())
            .await
            .map_err(unreachable)
    }

    /// Whether the engine would take the session of one more answered call, counting the
    /// calls still ringing.
    fn admit(&self, placed: &PlacedCalls) -> Result<(), ApiError> {
        let engine = &self.state.engine;
        engine.admits()?;
        let pending = placed.pending();
        let max = engine.max_sessions();
        match engine.active_sessions() + pending >= max {
            true => Err(ApiError::Full { max }),
            false => Ok(()),
        }
    }

    /// The INVITE's fixed parts: who we are (the extension, through the PBX) and whom we call.
    fn outgoing(
        &self,
        target: &Target,
        peer: Peer,
        via: SocketAddr,
        local_rtp: SocketAddr,
        sdp_id: u64,
        srtp: bool,
    ) -> Outgoing {
        let tag = format!("{:016x}", rand::random::<u64>());
        let crypto = srtp.then(Crypto::offered);
        let from = match (&target.hop, &self.register) {
            (Hop::Registrar, Some((register, _))) => {
                format!("<{}>;tag={tag}", register.aor)
            }
            _ => format!("<sip:duplex@{via}>;tag={tag}"),
        };
        let user = match (&target.hop, &self.register) {
            (Hop::Registrar, Some((register, _))) => register.user.as_str(),
            _ => "duplex",
        };
        Outgoing {
            call_id: format!("{:032x}", rand::random::<u128>()),
            uri: target.uri.clone(),
            tag,
            from,
            to: format!("<{}>", target.uri),
            // RFC 3261 §8.1.1.8 asks a sips: Contact of a sips: request; baresip then never
            // reaches it (its BYE is lost), while `;transport=tls` it follows.
            contact: format!("<sip:{user}@{via}{}>", peer.contact_param()),
            via,
            peer,
            sdp: offer::late_offer(local_rtp, sdp_id, &self.codecs, crypto.as_ref()),
            crypto,
            cseq: 0,
            branch: String::new(),
            authorization: None,
        }
    }

    /// The call from its INVITE to its end, its report kept up to date.
    async fn place(self: Arc<Self>, mut call: Outgoing, setup: CallSetup) {
        // The drain waits for the call's CANCEL or BYE.
        let _farewell = self.state.hold_drain();
        let mut responses = self.await_responses(&call.call_id);
        match self.ring(&mut call, &mut responses, &setup).await {
            Rung::Answered(answer) => {
                let (state, status, reason) =
                    self.clone().talk(&call, answer, responses, setup).await;
                self.call_over(&call.call_id, state, status, reason);
            }
            Rung::AnsweredLate { answer, why } => {
                self.call_over(&call.call_id, CallState::Failed, None, why);
                let bye = self.acknowledge(&call, &answer).await;
                self.hang_up(&call.call_id, &bye).await;
            }
            Rung::Refused {
                status,
                reason,
                unanswered,
            } => {
                self.call_over(&call.call_id, CallState::Failed, status, reason);
                drop(setup);
                // Over a connection a refusal is not sent again (timer D is 0).
                if unanswered || !call.peer.is_stream() {
                    self.linger(&call, responses, unanswered).await;
                }
            }
        }
        self.awaiting
            .lock()
            .expect("awaiting lock")
            .remove(&call.call_id);
    }

    fn call_over(&self, call_id: &str, state: CallState, status: Option<u16>, reason: String) {
        let event = match state {
            CallState::Ended => "call_ended",
            _ => "call_failed",
        };
        self.count(event);
        tracing::info!(call = %call_id, ?state, ?status, %reason, "placed SIP call over");
        let mut placed = self.placed.lock().expect("placed lock");
        placed.over(call_id, state, status, reason);
    }

    /// The INVITE's transaction: sent again until something answers, a challenge answered
    /// (again once when only its nonce was stale), ringing until the answer or a refusal;
    /// cancelled when the ring timeout passes, the call is hung up, or the server shuts down.
    async fn ring(
        &self,
        call: &mut Outgoing,
        responses: &mut mpsc::UnboundedReceiver<String>,
        setup: &CallSetup,
    ) -> Rung {
        let shutdown = self.state.shutdown_token();
        let ring_deadline = Instant::now() + setup.ring_timeout;
        let mut challenges = 0;
        loop {
            call.next_attempt();
            self.send(&call.invite(), &call.peer).await;
            let mut attempt = Attempt::new(call.peer.is_stream());
            loop {
                let (waiting, cancelling) = (!attempt.provisional, attempt.cancelling.is_some());
                let why = tokio::select! {
                    text = responses.recv() => {
                        let Some(text) = text else {
                            return unanswered(None, "the SIP endpoint stopped".into());
                        };
                        match self.on_response(call, &mut attempt, &text, &mut challenges).await {
                            Heard::Wait => continue,
                            Heard::Challenged => break,
                            Heard::Done(rung) => return rung,
                        }
                    }
                    _ = tokio::time::sleep_until(attempt.resend_at), if attempt.resend_due() => {
                        self.send(&call.invite(), &call.peer).await;
                        attempt.resent();
                        continue;
                    }
                    _ = tokio::time::sleep_until(attempt.cancel_at), if attempt.cancel_due() => {
                        self.send(&call.cancel(), &call.peer).await;
                        attempt.cancel_sent();
                        continue;
                    }
                    _ = tokio::time::sleep_until(attempt.timer_b), if waiting => {
                        let why = format!("no answer from {}", call.peer.addr);
                        return unanswered(Some(408), why);
                    }
                    _ = tokio::time::sleep_until(attempt.final_deadline()), if cancelling => {
                        let why = attempt.why().unwrap_or_default();
                        return refused(None, format!("{why} (the CANCEL went unanswered)"));
                    }
                    _ = tokio::time::sleep_until(ring_deadline), if !cancelling => {
                        format!("no answer within {} s", setup.ring_timeout.as_secs())
                    }
                    _ = setup.hangup.cancelled(), if !cancelling => {
                        "hung up before it was answered".to_owned()
                    }
                    _ = shutdown.cancelled(), if !cancelling => {
                        "the server is shutting down".to_owned()
                    }
                    _ = call.peer.closed() => {
                        let why = format!("the connection to {} closed", call.peer.addr);
                        return unanswered(None, why);
                    }
                };
                tracing::info!(call = %call.call_id, %why, "cancelling the SIP call");
                // A CANCEL may only follow a provisional answer (RFC 3261 §9.1): before one,
                // the call is given up here, and `linger` cancels it if one comes.
                if !attempt.provisional {
                    return unanswered(None, why);
                }
                attempt.cancel(why);
            }
        }
    }

    /// One answer to our INVITE (or to its CANCEL): what the ringing does next.
    async fn on_response(
        &self,
        call: &mut Outgoing,
        attempt: &mut Attempt,
        text: &str,
        challenges: &mut u32,
    ) -> Heard {
        let Some(response) = Response::parse(text) else {
            return Heard::Wait;
        };
        match response.cseq() {
            Some((n, "INVITE")) if n == call.cseq => {}
            Some((n, "CANCEL")) if n == call.cseq => {
                attempt.cancel_answered = true;
                return Heard::Wait;
            }
            _ => return Heard::Wait,
        }
        let may_answer = *challenges == 0 || (*challenges == 1 && register::is_stale(text));
        match (response.status, attempt.why()) {
            (100..=199, why) => {
                attempt.provisional = true;
                if matches!(response.status, 180 | 183) && why.is_none() {
                    self.placed_state(&call.call_id, CallState::Ringing);
                }
                Heard::Wait
            }
            (200..=299, None) => Heard::Done(Rung::Answered(response)),
            (200..=299, Some(why)) => Heard::Done(Rung::AnsweredLate {
                answer: response,
                why,
            }),
            (401 | 407, None) if may_answer => {
                self.send(&call.ack_refusal(&response), &call.peer).await;
                match self.answer_challenge(call, text) {
                    Ok(header) => {
                        call.authorization = Some(header);
                        *challenges += 1;
                        Heard::Challenged
                    }
                    Err(why) => Heard::Done(refused(Some(response.status), why)),
                }
            }
            (status, why) => {
                self.send(&call.ack_refusal(&response), &call.peer).await;
                let reason = why.unwrap_or_else(|| response.status_line());
                Heard::Done(refused(Some(status), reason))
            }
        }
    }

    /// After a call that was never answered, for 64·T1: a refusal sent again is ACKed again
    /// (RFC 3261 §17.1.1.2's timer D), an INVITE given up before it rang is cancelled once
    /// something says it rings, and a late 2xx is ACKed and hung up (§13.2.2.4).
    async fn linger(
        &self,
        call: &Outgoing,
        mut responses: mpsc::UnboundedReceiver<String>,
        unanswered: bool,
    ) {
        let deadline = Instant::now() + ACK_TIMEOUT;
        let mut cancelled = !unanswered;
        let shutdown = self.state.shutdown_token();
        loop {
            let text = tokio::select! {
                text = tokio::time::timeout_at(deadline, responses.recv()) => text,
                _ = shutdown.cancelled() => return,
            };
            let Ok(Some(text)) = text else {
                return;
            };
            let Some(response) = Response::parse(&text) else {
                continue;
            };
            if response.cseq() != Some((call.cseq, "INVITE")) {
                continue;
            }
            match response.status {
                100..=199 if !cancelled => {
                    self.send(&call.cancel(), &call.peer).await;
                    cancelled = true;
                }
                100..=199 => {}
                200..=299 => {
                    let bye = self.acknowledge(call, &response).await;
                    return self.hang_up(&call.call_id, &bye).await;
                }
                _ => {
                    let ack = call.ack_refusal(&response);
                    self.send(&ack, &call.peer).await;
                }
            }
        }
    }

    /// The credentials of `--sip-register`'s extension for a challenge to our INVITE; a
    /// call straight to a URI has none to give.
    fn answer_challenge(
        &self,
        call: &Outgoing,
        challenge: &str,
    ) -> Result<(String, String), String> {
        match &self.register {
            Some((register, registrar)) if *registrar == call.peer.addr => {
                register.authorize(challenge, "INVITE", &call.uri)
            }
            _ => Err(format!(
                "{} asks for credentials, which only calls through --sip-register's PBX have",
                call.peer.addr
            )),
        }
    }

    /// ACKs the 2xx `answer`; the BYE that will end the dialog it set up.
    async fn acknowledge(&self, call: &Outgoing, answer: &Response) -> ByeTarget {
        let hop = self.in_dialog_hop(answer, &call.peer).await;
        if hop.addr != call.peer.addr {
            let mut placed = self.placed.lock().expect("placed lock");
            placed.add_peer(&call.call_id, hop.addr.ip());
        }
        let bye = ByeTarget::placed(answer, call.from.clone(), hop, call.via, call.cseq);
        self.send(&bye.ack(&call.call_id, call.cseq), &bye.to).await;
        bye
    }

    /// Where requests within the dialog `answer` set up go (RFC 3261 §12.2.1.1): to the
    /// route set's first hop, which is where our INVITE went (a proxy that record-routes);
    /// without one, to the callee's Contact where it names an address we reach over UDP,
    /// else where the INVITE went. Over TCP or TLS, down the connection the INVITE took.
    async fn in_dialog_hop(&self, answer: &Response, next_hop: &Peer) -> Peer {
        if next_hop.is_stream() || !answer.headers_named("Record-Route").is_empty() {
            return next_hop.clone();
        }
        let Some(host) = answer.contact_uri().and_then(udp_host_port) else {
            return next_hop.clone();
        };
        let Ok(local) = self.socket.local_addr() else {
            return next_hop.clone();
        };
        match resolve(&host, local).await {
            Ok(addr) => Peer::udp(addr),
            Err(_) => next_hop.clone(),
        }
    }

    /// An answered call: ACKed, its session opened and its media run until either side ends
    /// it. Its final state, status and reason.
    async fn talk(
        self: Arc<Self>,
        call: &Outgoing,
        answer: Response,
        responses: mpsc::UnboundedReceiver<String>,
        setup: CallSetup,
    ) -> (CallState, Option<u16>, String) {
        let bye = self.acknowledge(call, &answer).await;
        let answered = match self.answered_media(&answer, call.crypto.as_ref()) {
            Ok(offer) => self
                .state
                .engine
                .open_session(&setup.persona)
                .map(|s| (offer, s))
                .map_err(|e| e.to_string()),
            Err(err) => Err(format!("its answer cannot be used: {err}")),
        };
        let (offer, session) = match answered {
            Ok(answered) => answered,
            Err(why) => {
                self.hang_up(&call.call_id, &bye).await;
                return (CallState::Failed, None, why);
            }
        };
        let id = session.id;
        let (cancel, tracked) = self.state.track_guard(id);
        let codec = offer.codec.name();
        let dialog = Dialog {
            id,
            remote_tag: answer.tag("To").unwrap_or_default().to_owned(),
            local_tag: message::header_param(&call.from, "tag")
                .unwrap_or_default()
                .to_owned(),
            answer: String::new(),
            acked: Arc::new(Notify::new()),
            offer: watch::Sender::new(Some(offer)),
            local_rtp: setup.local_rtp,
            contact: call.contact.clone(),
            sdp_id: setup.sdp_id,
            sdp_version: 1,
            invite_cseq: None,
            reoffer_cseq: None,
            last_reinvite: None,
            codecs: self.codecs.clone(),
            cancel: cancel.clone(),
            outbound: true,
        };
        let offers = dialog.offer.subscribe();
        self.dialogs
            .lock()
            .expect("dialog lock")
            .insert(call.call_id.clone(), dialog);
        tracing::info!(call = %call.call_id, session = %id, codec, "placed SIP call answered");
        let agent_text = AgentText::default();
        self.placed.lock().expect("placed lock").answered(
            &call.call_id,
            id.to_string(),
            codec,
            agent_text.clone(),
        );
        let ack = bye.ack(&call.call_id, call.cseq);
        tokio::spawn(self.clone().ack_again(
            ack,
            bye.to.clone(),
            call.cseq,
            responses,
            cancel.clone(),
        ));
        let too_long = CancellationToken::new();
        let (hangup, ended, reached) = (setup.hangup.clone(), cancel.clone(), too_long.clone());
        let max_duration = setup.max_duration;
        tokio::spawn(async move {
            tokio::select! {
                _ = hangup.cancelled() => ended.cancel(),
                _ = tokio::time::sleep(max_duration) => {
                    reached.cancel();
                    ended.cancel();
                }
                _ = ended.cancelled() => {}
            }
        });
        let remote_ip = call.peer.addr.ip().to_canonical();
        let media = media_call(
            session,
            setup.socket,
            offers,
            remote_ip,
            &self.state,
            cancel,
            Some(agent_text),
        );
        let timer = self.state.engine.metrics().call(TRANSPORT);
        let ending = media::run(media).await;
        drop((setup.lease, timer));
        let reason = match (&ending, setup.hangup.is_cancelled()) {
            (_, true) => "hung up by request".to_owned(),
            _ if too_long.is_cancelled() => {
                format!("it lasted max_duration_s ({} s)", max_duration.as_secs())
            }
            (MediaEnding::Cancelled, false) => "the server shut down".to_owned(),
            (MediaEnding::Silent, false) => format!(
                "no RTP from the other side for {} s",
                media::RTP_TIMEOUT.as_secs()
            ),
            (MediaEnding::Engine(why), false) => format!("the engine ended the session: {why}"),
        };
        let we_hung_up = self.call_ended(&call.call_id, id, ending, bye).await;
        drop(tracked);
        let reason = match we_hung_up {
            true => reason,
            false => "the other side hung up".to_owned(),
        };
        (CallState::Ended, None, reason)
    }

    /// The answer's SDP, which must answer our plain-RTP offer with one of our codecs.
    fn answered_media(
        &self,
        answer: &Response,
        offered: Option<&Crypto>,
    ) -> Result<AudioOffer, OfferError> {
        let media = AudioOffer::parse(&answer.body, &self.codecs)?;
        answering_our_crypto(media, offered)
    }

    /// Sends the ACK again for each 2xx the callee sends again (our ACK was lost), until the
    /// call ends or our BYE takes over its responses.
    async fn ack_again(
        self: Arc<Self>,
        ack: String,
        to: Peer,
        cseq: u32,
        mut responses: mpsc::UnboundedReceiver<String>,
        ended: CancellationToken,
    ) {
        loop {
            let text = tokio::select! {
                text = responses.recv() => text,
                _ = ended.cancelled() => return,
            };
            let Some(text) = text else {
                return;
            };
            let again = Response::parse(&text).is_some_and(|r| {
                (200..300).contains(&r.status) && r.cseq() == Some((cseq, "INVITE"))
            });
            if again {
                self.send(&ack, &to).await;
            }
        }
    }

    fn placed_state(&self, call_id: &str, state: CallState) {
        self.placed.lock().expect("placed lock").set(call_id, state);
    }

    /// Whether `datagram` is about a call we placed through `from` (read though `from` is
    /// outside `--sip-allow`): an answer to a request of ours, or a request within the call.
    pub(super) fn placed_with(&self, datagram: &[u8], from: SocketAddr) -> bool {
        let Ok(text) = std::str::from_utf8(datagram) else {
            return false;
        };
        let Some(call_id) = message::text_header(text, "Call-ID") else {
            return false;
        };
        let to_tag = match message::is_response(datagram) {
            true => None,
            false => Some(
                message::text_header(text, "To")
                    .and_then(|to| message::header_param(to, "tag"))
                    .unwrap_or_default(),
            ),
        };
        let awaited = self.awaiting.lock().is_ok_and(|a| a.contains_key(call_id));
        let placed = self.placed.lock().expect("placed lock");
        placed.reads(call_id, from.ip(), to_tag, awaited)
    }

    /// Whether `ip` is where a live call we placed went (its own connection for its BYE is
    /// taken though it is outside `--sip-allow`).
    pub(super) fn placed_peer(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let placed = self.placed.lock().expect("placed lock");
        placed
            .calls
            .values()
            .any(|call| call.over.is_none() && call.peers.contains(&ip))
    }

    /// Whether `call_id` is a call we placed (an INVITE naming it is no new call).
    pub(super) fn placed_call_id(&self, call_id: &str) -> bool {
        let placed = self.placed.lock().expect("placed lock");
        placed.calls.contains_key(call_id)
    }
}

/// The answer's media, which must keep our offer's encryption: plain RTP for plain, our
/// SDES tag and suite (with our key kept) for SRTP.
fn answering_our_crypto(
    mut media: AudioOffer,
    offered: Option<&Crypto>,
) -> Result<AudioOffer, OfferError> {
    media.crypto = match (media.crypto.take(), offered) {
        (None, None) => None,
        (Some(_), None) => return Err(OfferError::CryptoChanged("plain RTP, as our offer")),
        (theirs, Some(ours)) => Some(
            theirs
                .and_then(|t| t.answering(ours))
                .ok_or(OfferError::SrtpRefused)?,
        ),
    };
    Ok(media)
}

fn refused(status: Option<u16>, reason: String) -> Rung {
    Rung::Refused {
        status,
        reason,
        unanswered: false,
    }
}

fn unanswered(status: Option<u16>, reason: String) -> Rung {
    Rung::Refused {
        status,
        reason,
        unanswered: true,
    }
}

/// A request's `name` in seconds: `default` when absent, else 1 s to `max`.
fn seconds_within(
    name: &str,
    seconds: Option<u64>,
    default: Duration,
    max: Duration,
) -> Result<Duration, ApiError> {
    match seconds {
        None => Ok(default),
        Some(seconds) if (1..=max.as_secs()).contains(&seconds) => Ok(Duration::from_secs(seconds)),
        Some(_) => Err(ApiError::BadRequest(format!(
            "{name} must be 1 to {}",
            max.as_secs()
        ))),
    }
}

fn internal(err: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::sip::offer::SipCodec;

    fn direct(uri: &str, host: &str, port: u16, transport: Transport) -> Target {
        Target {
            uri: uri.into(),
            hop: Hop::Direct(host.into(), port),
            transport,
        }
    }

    fn through_pbx(uri: &str) -> Target {
        Target {
            uri: uri.into(),
            hop: Hop::Registrar,
            transport: Transport::Udp,
        }
    }

    #[test]
    fn a_target_is_a_sip_uri_or_a_number_for_the_pbx() {
        use Transport::{Tcp, Tls, Udp};
        let cases = [
            (
                "sip:bob@10.0.0.7",
                None,
                direct("sip:bob@10.0.0.7", "10.0.0.7", 5060, Udp),
            ),
            (
                "bob@10.0.0.7:5070",
                None,
                direct("sip:bob@10.0.0.7:5070", "10.0.0.7", 5070, Udp),
            ),
            (
                "SIP:bob@h;transport=UDP",
                None,
                direct("sip:bob@h;transport=UDP", "h", 5060, Udp),
            ),
            (
                "sip:[::1]:5062",
                None,
                direct("sip:[::1]:5062", "[::1]", 5062, Udp),
            ),
            (
                "sip:bob@h;transport=TCP",
                None,
                direct("sip:bob@h;transport=TCP", "h", 5060, Tcp),
            ),
            (
                "sip:bob@h;transport=tls",
                None,
                direct("sip:bob@h;transport=tls", "h", 5061, Tls),
            ),
            (
                "sips:bob@h:5071",
                None,
                direct("sips:bob@h:5071", "h", 5071, Tls),
            ),
            (
                "+15551234",
                Some("pbx.example"),
                through_pbx("sip:+15551234@pbx.example"),
            ),
            (
                "sip:8001@pbx.example:5060",
                Some("pbx.example"),
                through_pbx("sip:8001@pbx.example:5060"),
            ),
            (
                "sip:8001@other.example",
                Some("pbx.example"),
                direct("sip:8001@other.example", "other.example", 5060, Udp),
            ),
            (
                "sip:8001@pbx.example;transport=tcp",
                Some("pbx.example"),
                direct(
                    "sip:8001@pbx.example;transport=tcp",
                    "pbx.example",
                    5060,
                    Tcp,
                ),
            ),
        ];
        for (to, registrar, expected) in cases {
            assert_eq!(Target::parse(to, registrar), Ok(expected), "{to}");
        }
    }

    #[test]
    fn a_target_that_cannot_be_called_says_why() {
        let cases = [
            ("", None, "must name"),
            ("8001", None, "--sip-register"),
            ("sip:bob@h>\r\nX-Evil: 1", None, "no SIP URI has"),
            ("sip:bob@h x", None, "no SIP URI has"),
            ("sip:bob@h;transport=sctp", None, "udp, tcp or tls"),
            ("sip:@h", None, "empty user"),
            ("sip:bob@", None, "no host"),
            ("sip:bob@h:99999", None, "no host"),
            ("80;01", Some("pbx"), "neither"),
            ("sip:bob#1@h", None, "no SIP URI has"),
        ];
        for (to, registrar, why) in cases {
            let err = Target::parse(to, registrar).unwrap_err();
            assert!(err.contains(why), "{to:?}: {err}");
        }
        let long = format!("sip:{}@h", "a".repeat(MAX_TARGET_CHARS));
        assert!(Target::parse(&long, None).is_err());
    }

    fn outgoing() -> Outgoing {
        Outgoing {
            call_id: "c1".into(),
            uri: "sip:bob@10.0.0.7".into(),
            tag: "f1".into(),
            from: "<sip:duplex@10.0.0.2>;tag=f1".into(),
            to: "<sip:bob@10.0.0.7>".into(),
            contact: "<sip:duplex@10.0.0.2:5060>".into(),
            via: "10.0.0.2:5060".parse().unwrap(),
            peer: Peer::udp("10.0.0.7:5060".parse().unwrap()),
            sdp: "v=0\r\n".into(),
            crypto: None,
            cseq: 0,
            branch: String::new(),
            authorization: None,
        }
    }

    #[test]
    fn the_invite_cancel_and_ack_share_the_transaction() {
        let mut call = outgoing();
        call.next_attempt();
        let invite = call.invite();
        assert!(
            invite.starts_with("INVITE sip:bob@10.0.0.7 SIP/2.0\r\n"),
            "{invite}"
        );
        assert!(invite.contains("\r\nCSeq: 1 INVITE\r\n"));
        assert!(
            invite
                .contains("\r\nContent-Type: application/sdp\r\nContent-Length: 5\r\n\r\nv=0\r\n")
        );
        let branch = |text: &str| {
            message::header_param(message::text_header(text, "Via").unwrap(), "branch")
                .unwrap()
                .to_owned()
        };
        let cancel = call.cancel();
        assert!(cancel.starts_with("CANCEL sip:bob@10.0.0.7 SIP/2.0\r\n"));
        assert!(cancel.contains("\r\nCSeq: 1 CANCEL\r\n"));
        assert_eq!(branch(&cancel), branch(&invite));
        let busy = Response::parse(
            "SIP/2.0 486 Busy Here\r\nTo: <sip:bob@10.0.0.7>;tag=b1\r\nCSeq: 1 INVITE\r\n\r\n",
        )
        .unwrap();
        let ack = call.ack_refusal(&busy);
        assert!(
            ack.contains("\r\nTo: <sip:bob@10.0.0.7>;tag=b1\r\n"),
            "{ack}"
        );
        assert!(ack.contains("\r\nCSeq: 1 ACK\r\n"));
        assert_eq!(branch(&ack), branch(&invite));
        call.next_attempt();
        assert_ne!(branch(&call.invite()), branch(&invite));
        assert!(call.invite().contains("\r\nCSeq: 2 INVITE\r\n"));
    }

    #[test]
    fn the_ack_of_a_2xx_follows_the_contact_and_the_reversed_record_route() {
        let answer = Response::parse(
            "SIP/2.0 200 OK\r\nTo: <sip:bob@pbx>;tag=b1\r\nCSeq: 2 INVITE\r\n\
Record-Route: <sip:p2;lr>\r\nRecord-Route: <sip:p1;lr>\r\nContact: <sip:bob@10.0.0.7:5062>\r\n\r\n",
        )
        .unwrap();
        let bye = ByeTarget::placed(
            &answer,
            "<sip:7000@pbx>;tag=f1".into(),
            Peer::udp("10.0.0.1:5060".parse().unwrap()),
            "10.0.0.2:5060".parse().unwrap(),
            2,
        );
        let ack = bye.ack("c1", 2);
        assert!(
            ack.starts_with("ACK sip:bob@10.0.0.7:5062 SIP/2.0\r\n"),
            "{ack}"
        );
        assert!(ack.contains("\r\nCSeq: 2 ACK\r\n"));
        assert!(ack.contains("\r\nFrom: <sip:7000@pbx>;tag=f1\r\nTo: <sip:bob@pbx>;tag=b1\r\n"));
        let p1 = ack.find("Route: <sip:p1;lr>").unwrap();
        let p2 = ack.find("Route: <sip:p2;lr>").unwrap();
        assert!(p1 < p2, "{ack}");
        assert!(bye.request("c1").contains("\r\nCSeq: 3 BYE\r\n"));
    }

    #[test]
    fn an_answer_keeps_our_offers_encryption() {
        let key = "WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz";
        let ours = Crypto::offered();
        let offer = offer::late_offer(
            "10.0.0.2:4000".parse().unwrap(),
            1,
            &[SipCodec::Pcmu],
            Some(&ours),
        );
        assert!(offer.contains("m=audio 4000 RTP/SAVP 0 101\r\n"), "{offer}");
        assert!(
            offer.contains("a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:"),
            "{offer}"
        );
        let answer = |profile: &str, crypto: &str| {
            let sdp = format!(
                "v=0\r\no=- 1 1 IN IP4 10.0.0.7\r\ns=-\r\nc=IN IP4 10.0.0.7\r\nt=0 0\r\n\
m=audio 5000 {profile} 0\r\n{crypto}"
            );
            AudioOffer::parse(&sdp, &[SipCodec::Pcmu]).unwrap()
        };
        let keyed = format!("a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:{key}\r\n");
        let srtp = answering_our_crypto(answer("RTP/SAVP", &keyed), Some(&ours)).unwrap();
        assert!(
            srtp.crypto
                .is_some_and(|c| c.answer_line() == ours.answer_line()),
            "our key kept"
        );
        let plain = answering_our_crypto(answer("RTP/AVP", ""), Some(&ours));
        assert_eq!(plain.unwrap_err(), OfferError::SrtpRefused);
        let other_tag = format!("a=crypto:2 AES_CM_128_HMAC_SHA1_80 inline:{key}\r\n");
        let other = answering_our_crypto(answer("RTP/SAVP", &other_tag), Some(&ours));
        assert_eq!(other.unwrap_err(), OfferError::SrtpRefused);
        let added = answering_our_crypto(answer("RTP/SAVP", &keyed), None);
        assert!(matches!(added, Err(OfferError::CryptoChanged(_))));
        assert!(answering_our_crypto(answer("RTP/AVP", ""), None).is_ok());
    }

    #[test]
    fn a_contact_is_reached_over_udp_only() {
        assert_eq!(
            udp_host_port("sip:bob@10.0.0.7:5062"),
            Some("10.0.0.7:5062".into())
        );
        assert_eq!(
            udp_host_port("sip:10.0.0.7;ob"),
            Some("10.0.0.7:5060".into())
        );
        assert_eq!(udp_host_port("sip:bob@h;transport=tcp"), None);
        assert_eq!(udp_host_port("sips:bob@h"), None);
    }

    #[test]
    fn only_answers_awaited_and_requests_naming_our_tag_are_read_from_the_callee() {
        let mut placed = PlacedCalls::default();
        let call = Outgoing {
            tag: "ours".into(),
            peer: Peer::udp("10.0.0.7:5060".parse().unwrap()),
            ..outgoing()
        };
        placed.insert(
            CallReport::calling("c1".into(), "sip:x@h".into(), "udp"),
            CancellationToken::new(),
            &call,
            None,
        );
        let callee: IpAddr = "10.0.0.7".parse().unwrap();
        let other: IpAddr = "10.0.0.8".parse().unwrap();
        assert!(placed.reads("c1", callee, None, true));
        assert!(
            !placed.reads("c1", callee, None, false),
            "no answer awaited"
        );
        assert!(!placed.reads("c1", other, None, true), "another host");
        assert!(!placed.reads("c2", callee, None, true), "another call");
        assert!(placed.reads("c1", callee, Some("ours"), false));
        assert!(!placed.reads("c1", callee, Some(""), false), "a new INVITE");
        assert!(!placed.reads("c1", callee, Some("theirs"), false));
        placed.add_peer("c1", other);
        assert!(
            placed.reads("c1", other, Some("ours"), false),
            "the Contact's host"
        );
        placed.over("c1", CallState::Ended, None, "done".into());
        assert!(
            !placed.reads("c1", callee, Some("ours"), false),
            "the call is over"
        );
    }

    #[test]
    fn ended_calls_are_forgotten_oldest_first_beyond_the_kept_number() {
        let mut placed = PlacedCalls::default();
        let report = |id: usize| CallReport::calling(format!("c{id}"), "sip:x@h".into(), "udp");
        placed.insert(report(0), CancellationToken::new(), &outgoing(), None);
        for id in 1..=KEPT_ENDED + 1 {
            placed.insert(report(id), CancellationToken::new(), &outgoing(), None);
            placed.over(
                &format!("c{id}"),
                CallState::Failed,
                Some(486),
                "busy".into(),
            );
        }
        assert_eq!(placed.pending(), 1);
        assert!(placed.get("c0").is_some(), "a live call is never forgotten");
        assert!(placed.get("c1").is_none(), "the oldest ended call is");
        assert!(placed.get(&format!("c{}", KEPT_ENDED + 1)).is_some());
        assert_eq!(placed.all().len(), KEPT_ENDED + 1);
        assert_eq!(placed.all()[0].id, "c0");
    }
}
