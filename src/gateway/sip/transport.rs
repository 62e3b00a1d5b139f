//! How SIP reaches a peer: datagrams on the shared UDP socket, or a TCP connection (RFC 3261
//! §18), plain or TLS, over which the answers to its requests and the requests within its
//! calls go back.

use super::Shared;
use super::message::{self, FrameError, Framed, MAX_MESSAGE_BYTES};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

/// Connections at once (TCP and TLS each); more are closed as they come.
const MAX_CONNECTIONS: usize = 256;
/// A TLS handshake that takes longer than this is abandoned.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

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
        writer: mpsc::UnboundedSender<Vec<u8>>,
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
        if writer.send(text.as_bytes().to_vec()).is_err() {
            tracing::debug!(to = %self, "SIP connection closed: message not sent");
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

/// Takes TCP connections (TLS ones when `tls` is given) for as long as the server runs.
pub async fn serve(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            continue;
        };
        if open.load(Ordering::Acquire) >= MAX_CONNECTIONS {
            shared.count("too_many_connections");
            continue;
        }
        open.fetch_add(1, Ordering::AcqRel);
        let (shared, open, tls) = (shared.clone(), open.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => connection(stream, from, false, shared).await,
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(stream)) => connection(stream, from, true, shared).await,
                        Ok(Err(err)) => {
                            tracing::debug!(%from, %err, "SIP TLS handshake failed");
                            shared.count("tls_failed");
                        }
                        Err(_) => shared.count("tls_failed"),
                    }
                }
            }
            open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

/// One connection: its messages handled in order, each answer written back on it. A peer
/// outside `--sip-allow` gets one message answered (a 403 for an INVITE), then the door.
async fn connection<S>(stream: S, from: SocketAddr, tls: bool, shared: Arc<Shared>)
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let trusted = shared.allowed(from);
    let (mut reader, mut writer) = tokio::io::split(stream);
    let (sender, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
    let writing = tokio::spawn(async move {
        while let Some(bytes) = outgoing.recv().await {
            if writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err() {
                break;
            }
        }
    });
    let peer = Peer {
        addr: from,
        link: Link::Stream {
            writer: sender.clone(),
            tls,
        },
    };
    let mut stream = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 4096];
    'reading: loop {
        loop {
            match message::frame(&stream) {
                Ok(Framed::Partial) => break,
                Ok(Framed::Ping(len)) => {
                    stream.drain(..len);
                    let _ = sender.send(b"\r\n".to_vec());
                }
                Ok(Framed::Padding(len)) => {
                    stream.drain(..len);
                }
                Ok(Framed::Message(len)) => {
                    let message: Vec<u8> = stream.drain(..len).collect();
                    shared.clone().handle(&message, &peer).await;
                    if !trusted {
                        break 'reading;
                    }
                }
                Err(err) => {
                    tracing::debug!(%peer, %err, "SIP connection closed");
                    shared.count(match err {
                        FrameError::TooBig => "too_big",
                        FrameError::BadLength => "bad_message",
                    });
                    break 'reading;
                }
            }
        }
        match reader.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(read) => stream.extend_from_slice(&chunk[..read]),
        }
        if stream.len() > 2 * MAX_MESSAGE_BYTES {
            break;
        }
    }
    // The writer runs on while a call of this connection holds its `Peer` (for its BYE).
    drop(writing);
}
