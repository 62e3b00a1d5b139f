//! Transports: the HTTP server, WebRTC peers and their media loops, the PersonaPlex/Moshi
//! WebSocket protocol (`moshi_ws`), the telephony media streams (`telephony`) and SIP calls
//! (`sip`). Everything a client sends is checked here and turned into a session on the engine;
//! nothing here touches tensors.

mod error;
pub mod ice;
pub mod jitter;
pub mod media;
pub mod moshi_ws;
pub mod outbound;
pub mod peer;
pub mod ports;
pub mod resource;
mod routes;
pub mod sdp;
pub mod sip;
pub mod telephony;
pub mod tls;
pub mod webhook;
pub mod wire;

pub use error::ApiError;
pub use peer::PeerSettings;
pub use routes::router;

use crate::engine::{EngineHandle, PersonaRequest, SessionHandle, SessionId};
use jitter::InboundAudio;
use media::SessionTask;
use resource::ResourceKey;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use webrtc::peer_connection::{PeerConnection, RTCPeerConnectionState};

/// How long shutdown waits for live sessions to close.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Server options that are not the engine's.
#[derive(Debug, Clone, Default)]
pub struct GatewayConfig {
    /// Bearer token required on the signaling endpoints, if set.
    pub token: Option<String>,
    pub peer: PeerSettings,
}

/// What every request handler and session task shares.
pub struct AppState {
    pub engine: EngineHandle,
    pub config: GatewayConfig,
    sessions: Mutex<HashMap<SessionId, CancellationToken>>,
    /// Each WebRTC session by its resource, for ICE restarts and hang-ups.
    resources: Mutex<HashMap<ResourceKey, LivePeer>>,
    draining: AtomicBool,
    shutdown: CancellationToken,
    /// Farewells the drain waits for besides sessions (a PBX registration being withdrawn).
    farewells: AtomicUsize,
    /// What places calls (`POST /api/calls`), once SIP serves.
    dialer: OnceLock<sip::dial::Dialer>,
}

impl AppState {
    pub fn new(engine: EngineHandle, config: GatewayConfig) -> Arc<Self> {
        Arc::new(Self {
            engine,
            config,
            sessions: Mutex::new(HashMap::new()),
            resources: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
            farewells: AtomicUsize::new(0),
            dialer: OnceLock::new(),
        })
    }

    /// Lets `POST /api/calls` place calls through this SIP endpoint (set once).
    pub fn set_dialer(&self, dialer: sip::dial::Dialer) {
        let _ = self.dialer.set(dialer);
    }

    pub fn dialer(&self) -> Option<&sip::dial::Dialer> {
        self.dialer.get()
    }

    /// A token cancelled when shutdown begins.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.child_token()
    }

    /// Makes the drain wait (up to its limit) until the returned guard is dropped: for work
    /// that must reach the network before the process ends.
    pub fn hold_drain(self: &Arc<Self>) -> DrainHold {
        self.farewells.fetch_add(1, Ordering::AcqRel);
        DrainHold(self.clone())
    }

    pub fn live_sessions(&self) -> usize {
        self.sessions.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Negotiates a WebRTC session for `offer_sdp` and starts it.
    pub async fn accept_offer(
        self: &Arc<Self>,
        offer_sdp: &str,
        persona: &PersonaRequest,
    ) -> Result<Accepted, ApiError> {
        if self.is_draining() {
            return Err(ApiError::Draining);
        }
        let offer = sdp::parse_offer(offer_sdp)?;
        let SessionHandle {
            id,
            input,
            output,
            events,
            stats,
            closer,
        } = self.engine.open_session(persona)?;
        let inbound = InboundAudio::new(input).map_err(|e| ApiError::Internal(e.to_string()))?;
        let metrics = self.engine.metrics().clone();
        let settings = &self.config.peer;
        let peer =
            peer::answer(offer, settings, id, inbound, stats.clone(), metrics.clone()).await?;
        let answer_sdp = peer.answer_sdp.clone();
        let cancel = self.shutdown.child_token();
        self.sessions
            .lock()
            .expect("session map lock")
            .insert(id, cancel.clone());
        let resource = ResourceKey::generate();
        let live = LivePeer {
            id,
            cancel: cancel.clone(),
            pc: peer.pc.clone(),
            states: peer.states.clone(),
            restarting: Arc::new(tokio::sync::Mutex::new(())),
        };
        self.resources
            .lock()
            .expect("resource map lock")
            .insert(resource.clone(), live);
        let task = SessionTask {
            id,
            peer,
            output,
            events,
            stats,
            closer,
            cancel,
            engine_name: self.engine.info().name,
            schedule: self.engine.output_schedule(),
            connect_timeout: settings.connect_timeout,
            metrics,
        };
        let (state, key) = (self.clone(), resource.clone());
        let call = self.engine.metrics().call("webrtc");
        tokio::spawn(async move {
            media::run(task).await;
            drop(call);
            state
                .resources
                .lock()
                .expect("resource map lock")
                .remove(&key);
            state.sessions.lock().expect("session map lock").remove(&id);
        });
        tracing::info!(session = %id, "session started");
        Ok(Accepted {
            id,
            resource,
            answer_sdp,
        })
    }

    /// Registers a session run by a WebSocket transport, so shutdown reaches it;
    /// returns the token that ends it. Pair with [`AppState::untrack`] when it ends.
    pub fn track(&self, id: SessionId) -> CancellationToken {
        let cancel = self.shutdown.child_token();
        self.sessions
            .lock()
            .expect("session map lock")
            .insert(id, cancel.clone());
        cancel
    }

    /// Forgets a session registered with [`AppState::track`].
    pub fn untrack(&self, id: SessionId) {
        self.sessions.lock().expect("session map lock").remove(&id);
    }

    /// Like [`AppState::track`], returning a guard that forgets the session when dropped (also
    /// when the task holding it never runs, e.g. a failed WebSocket upgrade).
    pub fn track_guard(self: &Arc<Self>, id: SessionId) -> (CancellationToken, Tracked) {
        let cancel = self.track(id);
        let guard = Tracked {
            state: self.clone(),
            id,
        };
        (cancel, guard)
    }

    /// Answers `offer_sdp`, an ICE restart of the WebRTC session at `resource` (its client's
    /// network changed), on the session's own peer.
    pub async fn restart_ice(
        &self,
        resource: &ResourceKey,
        offer_sdp: &str,
    ) -> Result<String, ApiError> {
        let offer = sdp::parse_offer(offer_sdp)?;
        let live = self.live_peer(resource)?;
        let ended = matches!(
            *live.states.borrow(),
            RTCPeerConnectionState::Closed | RTCPeerConnectionState::Failed
        );
        if ended {
            return Err(ApiError::NoSession);
        }
        let id = live.id;
        let Ok(_only_restart) = live.restarting.try_lock() else {
            return Err(ApiError::Conflict(format!(
                "session {id} is already restarting ICE; wait for that answer"
            )));
        };
        let answer = peer::renegotiate(&live.pc, offer).await?;
        tracing::info!(session = %id, "ICE restarted");
        Ok(answer)
    }

    /// Ends the WebRTC session at `resource` (DELETE on it).
    pub fn end_session(&self, resource: &ResourceKey) -> Result<(), ApiError> {
        let live = self.live_peer(resource)?;
        live.cancel.cancel();
        tracing::info!(session = %live.id, "session ended by its client");
        Ok(())
    }

    fn live_peer(&self, resource: &ResourceKey) -> Result<LivePeer, ApiError> {
        self.resources
            .lock()
            .expect("resource map lock")
            .get(resource)
            .cloned()
            .ok_or(ApiError::NoSession)
    }

    /// Stops taking offers, closes every live session and waits (briefly) for them to finish.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        self.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        let busy = || self.live_sessions() > 0 || self.farewells.load(Ordering::Acquire) > 0;
        while busy() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.live_sessions() > 0 {
            tracing::warn!(
                left = self.live_sessions(),
                "sessions still closing at shutdown"
            );
        }
    }
}

/// A WebRTC session just negotiated: its id (for logs), the resource its client reaches it at,
/// and the SDP answer.
pub struct Accepted {
    pub id: SessionId,
    pub resource: ResourceKey,
    pub answer_sdp: String,
}

/// A WebRTC session as its resource reaches it: to restart its ICE or end it.
#[derive(Clone)]
struct LivePeer {
    id: SessionId,
    cancel: CancellationToken,
    pc: Arc<dyn PeerConnection>,
    states: tokio::sync::watch::Receiver<RTCPeerConnectionState>,
    /// Held while a restart is answered: one at a time.
    restarting: Arc<tokio::sync::Mutex<()>>,
}

/// Keeps a session in the server's registry until dropped.
pub struct Tracked {
    state: Arc<AppState>,
    id: SessionId,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.state.untrack(self.id);
    }
}

/// Keeps the drain waiting while held ([`AppState::hold_drain`]).
pub struct DrainHold(Arc<AppState>);

impl Drop for DrainHold {
    fn drop(&mut self) {
        self.0.farewells.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An HTTP server bound to its port, not yet serving.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
}

impl Server {
    pub async fn bind(addr: SocketAddr, state: Arc<AppState>) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        Ok(Self { listener, state })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Serves HTTPS with `tls` until `shutdown` completes, then drains live sessions.
    pub async fn run_tls(
        self,
        tls: axum_server::tls_rustls::RustlsConfig,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let handle = axum_server::Handle::new();
        let (state, stopper) = (self.state.clone(), handle.clone());
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: refusing new sessions and closing live ones");
            state.drain().await;
            stopper.graceful_shutdown(Some(Duration::from_secs(2)));
        });
        let listener = self.listener.into_std()?;
        axum_server::from_tcp_rustls(listener, tls)?
            .handle(handle)
            .serve(router(self.state).into_make_service_with_connect_info::<SocketAddr>())
            .await
    }

    /// Serves until `shutdown` completes, then drains live sessions.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        let drained = CancellationToken::new();
        let drained_signal = drained.clone();
        let drain_state = state.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: refusing new sessions and closing live ones");
            drain_state.drain().await;
            drained_signal.cancel();
        });
        let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
        axum::serve(self.listener, app)
            .with_graceful_shutdown(drained.cancelled_owned())
            .await
    }
}
