//! How SIP reaches a peer: datagrams on the shared UDP socket, or a TCP connection (RFC 3261
//! §18), plain or TLS, over which the answers to its requests and the requests within its
//! calls go back.

use super::Shared;
use super::message::{self, FrameError, Framed};
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Connections at once (TCP and TLS each); more are closed as they come.
const MAX_CONNECTIONS: usize = 256;
/// Of those, from outside `--sip-allow` (each gets one answer, then is closed).
const MAX_STRANGERS: usize = 16;
/// Connecting to a peer (a call we place over TCP or TLS) is given up after this.
const CONNECT_LIMIT: Duration = Duration::from_secs(5);
/// A TLS handshake that takes longer than this is abandoned.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// A connection silent this long before its first whole message is closed (a limit on each
/// wait for bytes, so a peer trickling a header keeps it open: the slot caps bound that).
const FIRST_MESSAGE_LIMIT: Duration = Duration::from_secs(10);
/// A connection with no call on it is closed after this long without a message (a PBX opens
/// another for its next call).
const IDLE_LIMIT: Duration = Duration::from_secs(300);
/// How often a connection we opened checks whether a call still holds it (it is closed once
/// none does).
const OPENED_CHECK: Duration = Duration::from_secs(2);
/// Messages waiting to be written to one connection; beyond, the peer is not reading and
/// further ones are dropped.
const MAX_QUEUED: usize = 64;

/// A peer and the way back to it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    link: Link,
}

#[derive(Debug, Clone)]
enum Link {
    Udp,
    /// The writing half of the connection the peer's messages came on, and whether it is TLS.
    Stream {
        writer: mpsc::Sender<Vec<u8>>,
        tls: bool,
    },
}

impl Peer {
    pub fn udp(addr: SocketAddr) -> Self {
        Self {
            addr,
            link: Link::Udp,
        }
    }

    /// The transport's name as a Via header writes it.
    pub fn transport(&self) -> &'static str {
        match self.link {
            Link::Udp => "UDP",
            Link::Stream { tls: false, .. } => "TCP",
            Link::Stream { tls: true, .. } => "TLS",
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.link, Link::Stream { tls: true, .. })
    }

    /// Copies of this connection's `Peer` beyond the connection's own: the calls on it.
    fn calls_holding(&self) -> usize {
        match &self.link {
            Link::Udp => 0,
            Link::Stream { writer, .. } => writer.strong_count().saturating_sub(1),
        }
    }

    /// Whether the peer's connection has closed (never for a UDP peer).
    pub fn is_closed(&self) -> bool {
        matches!(&self.link, Link::Stream { writer, .. } if writer.is_closed())
    }

    /// Resolves once the peer's connection has closed (never for a UDP peer).
    pub async fn closed(&self) {
        match &self.link {
            Link::Udp => std::future::pending().await,
            Link::Stream { writer, .. } => writer.closed().await,
        }
    }

    /// Whether the peer is on a connection (TCP or TLS), which delivers or fails by itself.
    pub fn is_stream(&self) -> bool {
        matches!(self.link, Link::Stream { .. })
    }

    /// The `transport` parameter our Contact needs so the peer's requests within a call come
    /// the same way ("" for UDP, the default).
    pub fn contact_param(&self) -> &'static str {
        match self.link {
            Link::Udp => "",
            Link::Stream { tls: false, .. } => ";transport=tcp",
            Link::Stream { tls: true, .. } => ";transport=tls",
        }
    }

    /// Writes `text` to the peer's connection; false for a UDP peer, whose messages go on
    /// the shared socket.
    pub fn write_stream(&self, text: &str) -> bool {
        let Link::Stream { writer, .. } = &self.link else {
            return false;
        };
        match writer.try_send(text.as_bytes().to_vec()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!(to = %self, "SIP peer reads nothing: message dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::debug!(to = %self, "SIP connection closed: message not sent");
            }
        }
        true
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.link {
            Link::Udp => write!(f, "{}", self.addr),
            Link::Stream { tls: false, .. } => write!(f, "tcp:{}", self.addr),
            Link::Stream { tls: true, .. } => write!(f, "tls:{}", self.addr),
        }
    }
}

/// What carries SIP to a peer we reach out to (a placed call, the registrar).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    /// `sips:` URIs, and `transport=tls`.
    Tls,
}

impl Transport {
    /// From a URI's parameters (`transport=tcp`); `sips:` is TLS whatever they say.
    pub fn of(params: &str, sips: bool) -> Result<Self, String> {
        let named = params.split(';').find_map(|param| {
            let (key, value) = param.split_once('=')?;
            key.eq_ignore_ascii_case("transport").then_some(value)
        });
        match named.map(str::to_ascii_lowercase).as_deref() {
            _ if sips => Ok(Self::Tls),
            None | Some("udp") => Ok(Self::Udp),
            Some("tcp") => Ok(Self::Tcp),
            Some("tls") => Ok(Self::Tls),
            Some(other) => Err(format!(
                "transport={other}: calls are placed over udp, tcp or tls"
            )),
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Self::Tls => 5061,
            _ => 5060,
        }
    }
}

/// A host and its port (`default` when none is given); IPv6 hosts in brackets.
pub fn split_host_port(host_port: &str, default: u16) -> Option<(&str, u16)> {
    let (host, port) = match host_port.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') && !port.contains(']') => {
            (host, port.parse().ok()?)
        }
        _ => (host_port, default),
    };
    (!host.is_empty()).then_some((host, port))
}

/// Open connections, all and from strangers.
#[derive(Default)]
struct Open {
    all: AtomicUsize,
    strangers: AtomicUsize,
}

/// A connection's place among the open ones, given back when dropped.
struct Slot {
    open: Arc<Open>,
    stranger: bool,
}

impl Slot {
    fn take(open: &Arc<Open>, stranger: bool) -> Option<Self> {
        let full = open.all.load(Ordering::Acquire) >= MAX_CONNECTIONS
            || (stranger && open.strangers.load(Ordering::Acquire) >= MAX_STRANGERS);
        if full {
            return None;
        }
        open.all.fetch_add(1, Ordering::AcqRel);
        if stranger {
            open.strangers.fetch_add(1, Ordering::AcqRel);
        }
        Some(Self {
            open: open.clone(),
            stranger,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.all.fetch_sub(1, Ordering::AcqRel);
        if self.stranger {
            self.open.strangers.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Takes TCP connections (TLS ones when `tls` is given) for as long as the server runs.
pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let open = Arc::new(Open::default());
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::debug!(%err, "SIP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // A callee of ours may open its own connection for its BYE.
        let trusted = shared.allowed(from) || shared.placed_peer(from.ip());
        if tls.is_some() && !trusted {
            // No handshake (CPU) for a stranger: any request but an INVITE gets nothing anyway.
            shared.count("forbidden");
            continue;
        }
        let Some(slot) = Slot::take(&open, !trusted) else {
            shared.count("too_many_connections");
            continue;
        };
        let (shared, tls) = (shared.clone(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let Some(acceptor) = tls else {
                return connection(stream, from, false, None, shared).await;
            };
            let handshake = tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(stream));
            match handshake.await {
                Ok(Ok(stream)) => connection(stream, from, true, None, shared).await,
                Ok(Err(err)) => {
                    tracing::debug!(%from, %err, "SIP TLS handshake failed");
                    shared.count("tls_failed");
                }
                Err(_) => shared.count("tls_failed"),
            }
        });
    }
}

/// Opens a connection to `addr` (TLS when `tls` names the server to expect there) for a call
/// we place: our requests go down it and its messages are read like those of a connection
/// the peer opened (the call's own are read though it is outside `--sip-allow`).
pub async fn connect(
    addr: SocketAddr,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    shared: Arc<Shared>,
) -> std::io::Result<Peer> {
    let timed_out =
        |what: &str| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} timed out"));
    let stream = tokio::time::timeout(CONNECT_LIMIT, TcpStream::connect(addr))
        .await
        .map_err(|_| timed_out("connecting"))??;
    let (opened, peer) = oneshot::channel();
    match tls {
        None => tokio::spawn(connection(stream, addr, false, Some(opened), shared)),
        Some((connector, name)) => {
            let handshake = tokio::time::timeout(HANDSHAKE_LIMIT, connector.connect(name, stream));
            let stream = handshake
                .await
                .map_err(|_| timed_out("the TLS handshake"))??;
            tokio::spawn(connection(stream, addr, true, Some(opened), shared))
        }
    };
    peer.await
        .map_err(|_| std::io::Error::other("the connection closed as it opened"))
}

/// One connection: its messages handled in order, each answer written back on it. A peer
/// outside `--sip-allow` gets one message answered (a 403 for an INVITE), then the door; so
/// does a connection silent for [`FIRST_MESSAGE_LIMIT`] before its first whole message, or
/// for [`IDLE_LIMIT`] after it while no call is on it. When reading ends, so does writing.
/// A connection we `opened` is handed its `Peer` and trusted.
async fn connection<S>(
    stream: S,
    from: SocketAddr,
    tls: bool,
    opened: Option<oneshot::Sender<Peer>>,
    shared: Arc<Shared>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let trusted = opened.is_some() || shared.allowed(from) || shared.placed_peer(from.ip());
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (sender, mut outgoing) = mpsc::channel::<Vec<u8>>(MAX_QUEUED);
    let done = tokio_util::sync::CancellationToken::new();
    let reading_done = done.clone();
    let writing = tokio::spawn(async move {
        loop {
            // What is queued goes out first: a stranger's answer, queued just before its
            // connection's reading ends.
            let bytes = tokio::select! {
                biased;
                bytes = outgoing.recv() => bytes,
                _ = reading_done.cancelled() => outgoing.try_recv().ok(),
            };
            let Some(bytes) = bytes else { break };
            if writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err() {
                break;
            }
        }
        let _ = writer.shutdown().await;
    });
    let peer = Peer {
        addr: from,
        link: Link::Stream {
            writer: sender,
            tls,
        },
    };
    let first_limit = match opened {
        Some(opened) => {
            let _ = opened.send(peer.clone());
            OPENED_CHECK
        }
        None => FIRST_MESSAGE_LIMIT,
    };
    read_messages(&mut reader, &peer, trusted, first_limit, &shared).await;
    done.cancel();
    let _ = writing.await;
}

/// Reads and handles the connection's messages until it closes, breaks the framing, idles
/// or (a stranger) has had its one answer.
async fn read_messages<R>(
    reader: &mut R,
    peer: &Peer,
    trusted: bool,
    mut limit: Duration,
    shared: &Arc<Shared>,
) where
    R: AsyncRead + Unpin,
{
    let mut stream = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 4096];
    loop {
        loop {
            match message::frame(&stream) {
                Ok(Framed::Partial) => break,
                Ok(Framed::Ping(len)) => {
                    if !trusted {
                        return;
                    }
                    stream.drain(..len);
                    peer.write_stream("\r\n");
                }
                Ok(Framed::Padding(len)) => {
                    stream.drain(..len);
                }
                Ok(Framed::Message(len)) => {
                    let message: Vec<u8> = stream.drain(..len).collect();
                    shared.clone().handle(&message, peer).await;
                    if !trusted {
                        return;
                    }
                    if limit != OPENED_CHECK {
                        limit = IDLE_LIMIT;
                    }
                }
                Err(err) => {
                    tracing::debug!(%peer, %err, "SIP connection closed");
                    shared.count(match err {
                        FrameError::TooBig => "too_big",
                        FrameError::BadLength => "bad_message",
                    });
                    return;
                }
            }
        }
        match tokio::time::timeout(limit, reader.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => return,
            Ok(Ok(read)) => stream.extend_from_slice(&chunk[..read]),
            // A call on this connection holds a clone of its `Peer`: keep it open for them.
            // One we opened for a call closes when no call holds it any more.
            Err(_) if limit == IDLE_LIMIT && peer.calls_holding() > 0 => {}
            Err(_) if limit == OPENED_CHECK && peer.calls_holding() > 0 => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_stream(tls: bool) -> Peer {
        let (writer, _) = mpsc::channel(1);
        Peer {
            addr: "10.0.0.5:5061".parse().unwrap(),
            link: Link::Stream { writer, tls },
        }
    }

    #[test]
    fn our_contact_keeps_the_call_on_its_transport_and_scheme() {
        let contact = |peer: &Peer, sips| {
            super::super::contact_uri("10.0.0.1:5061".parse().unwrap(), peer, sips)
        };
        let udp = Peer::udp("10.0.0.5:5060".parse().unwrap());
        assert_eq!(contact(&udp, false), "<sip:duplex@10.0.0.1:5061>");
        assert_eq!(
            contact(&on_stream(false), false),
            "<sip:duplex@10.0.0.1:5061;transport=tcp>"
        );
        assert_eq!(
            contact(&on_stream(true), false),
            "<sip:duplex@10.0.0.1:5061;transport=tls>"
        );
        assert_eq!(
            contact(&on_stream(true), true),
            "<sips:duplex@10.0.0.1:5061>"
        );
        // sips: asked over a hop that is not TLS gets no sips: Contact it could not keep.
        assert_eq!(contact(&udp, true), "<sip:duplex@10.0.0.1:5061>");
        assert_eq!(
            (on_stream(true).transport(), on_stream(false).transport()),
            ("TLS", "TCP")
        );
    }
}
