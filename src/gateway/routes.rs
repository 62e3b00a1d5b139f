//! HTTP routes: the page, signaling (`/api/offer`, `/api/sessions/{key}`), the WebSocket
//! transports (`/api/chat`, `/telephony/*`), `/api/info`, `/api/ice`, `/health` and `/metrics`.

use super::AppState;
use super::error::ApiError;
use super::resource::ResourceKey;
use super::sdp::MAX_OFFER_BYTES;
use super::sip::dial::{CallReport, DialRequest, Dialer};
use crate::engine::PersonaRequest;
use crate::engine::step_loop::Health;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const STYLE_CSS: &str = include_str!("../../web/style.css");

pub fn router(state: Arc<AppState>) -> Router {
    let signaling = Router::new()
        .route("/api/offer", post(offer))
        .route(
            "/api/sessions/{key}",
            delete(end_session).patch(restart_session_ice),
        )
        .layer(DefaultBodyLimit::max(MAX_OFFER_BYTES));
    Router::new()
        .route(
            "/",
            get(|| async { page(INDEX_HTML, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { page(APP_JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/style.css",
            get(|| async { page(STYLE_CSS, "text/css; charset=utf-8") }),
        )
        .route("/api/info", get(info))
        .route("/api/ice", get(ice))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/api/chat", get(super::moshi_ws::chat))
        .route("/api/calls", post(place_call).get(list_calls))
        .route("/api/calls/{id}", get(call_report).delete(hang_up_call))
        .merge(super::telephony::routes())
        .merge(signaling)
        .with_state(state)
}

fn page(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn info(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let info = state.engine.info();
    Json(json!({
        "engine": info.name,
        "model": info.model,
        "notice": info.notice,
        "voices": info.catalog.voices,
        "default_voice": info.catalog.default_voice,
        "prompts": info.catalog.prompts,
        "max_prompt_chars": info.catalog.max_prompt_chars,
        "auth_required": state.config.token.is_some(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// `GET /api/ice`: the STUN and TURN servers the page's peer gathers from, with credentials
/// minted now; behind the token, like the offer it precedes.
async fn ice(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let page = state.config.peer.ice.for_page();
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(page)).into_response())
}

/// 200 while the engine serves; 503 while draining, once its steps keep failing (each ends
/// every session), or once its step loop has stopped, with the error.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let (status, error) = match state.engine.health() {
        _ if state.is_draining() => ("draining", None),
        Health::Serving => ("ok", None),
        Health::Failing { error, .. } => ("failing", Some(error)),
        Health::Stopped(why) => ("stopped", Some(why)),
    };
    let code = match status {
        "ok" => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut body = json!({
        "status": status,
        "engine": state.engine.info().name,
        "sessions": state.engine.active_sessions(),
        "max_sessions": state.engine.max_sessions(),
        "real_time": state.engine.keeps_real_time(),
    });
    if let Some(error) = error {
        body["error"] = json!(error);
    }
    (code, Json(body)).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let body = state.engine.metrics().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// The JSON form of an offer.
#[derive(Deserialize)]
struct JsonOffer {
    sdp: String,
    #[serde(rename = "type")]
    kind: String,
    voice: Option<String>,
    prompt: Option<String>,
}

/// Persona choice for WHIP clients, which can only send SDP in the body.
#[derive(Deserialize, Default)]
struct PersonaQuery {
    voice: Option<String>,
    prompt: Option<String>,
}

/// `POST /api/offer`: WHIP (`application/sdp` → 201 + `Location` + SDP answer) or JSON
/// (`{"sdp","type":"offer","voice","prompt"}` → `{"sdp","type":"answer","session"}`).
async fn offer(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<PersonaQuery>,
    body: Bytes,
) -> Response {
    let result = negotiate(&state, &headers, query, &body).await;
    if let Err(err) = &result {
        state
            .engine
            .metrics()
            .sessions_rejected
            .with_label_values(&[err.reason()])
            .inc();
        tracing::info!(reason = err.reason(), %err, "offer refused");
    }
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn negotiate(
    state: &Arc<AppState>,
    headers: &HeaderMap,
    query: PersonaQuery,
    body: &[u8],
) -> Result<Response, ApiError> {
    authorize(state, headers)?;
    if is_sdp(headers) {
        let sdp = std::str::from_utf8(body)
            .map_err(|_| ApiError::BadSdp("the offer is not UTF-8 text".into()))?;
        let persona = PersonaRequest {
            voice: query.voice,
            prompt: query.prompt,
        };
        let accepted = state.accept_offer(sdp, &persona).await?;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/sdp"),
        );
        headers.insert(
            header::LOCATION,
            HeaderValue::from_str(&accepted.resource.path()).expect("resource keys are hex"),
        );
        for link in state.config.peer.ice.link_headers() {
            match HeaderValue::from_str(&link) {
                Ok(value) => {
                    headers.append(header::LINK, value);
                }
                Err(_) => tracing::warn!("an ICE server's Link header is not valid HTTP; left out"),
            }
        }
        return Ok((StatusCode::CREATED, headers, accepted.answer_sdp).into_response());
    }
    let offer = json_offer(body, " or an application/sdp body")?;
    let persona = PersonaRequest {
        voice: offer.voice,
        prompt: offer.prompt,
    };
    let accepted = state.accept_offer(&offer.sdp, &persona).await?;
    Ok(Json(json!({
        "sdp": accepted.answer_sdp,
        "type": "answer",
        "session": accepted.id.to_string(),
        "resource": accepted.resource.path(),
    }))
    .into_response())
}

/// `body` as a JSON offer (`{"sdp","type":"offer"}`); `or_else` names what else the route takes.
fn json_offer(body: &[u8], or_else: &str) -> Result<JsonOffer, ApiError> {
    let offer: JsonOffer = serde_json::from_slice(body).map_err(|e| {
        ApiError::BadRequest(format!(
            "expected JSON {{\"sdp\",\"type\":\"offer\"}}{or_else}: {e}"
        ))
    })?;
    if offer.kind != "offer" {
        return Err(ApiError::BadRequest(format!(
            "type must be \"offer\", got {:?}",
            offer.kind
        )));
    }
    Ok(offer)
}

fn is_sdp(headers: &HeaderMap) -> bool {
    is_content_type(headers, "application/sdp")
}

fn is_content_type(headers: &HeaderMap, media_type: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with(media_type))
}

/// `DELETE /api/sessions/{key}`: ends the session.
async fn end_session(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    authorize(&state, &headers)?;
    let resource = ResourceKey::parse(&key).ok_or(ApiError::NoSession)?;
    state.end_session(&resource)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PATCH /api/sessions/{key}` with `{"sdp","type":"offer"}`: an ICE restart of a WebRTC
/// session (its client's network changed) → `{"sdp","type":"answer"}`.
async fn restart_session_ice(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let resource = ResourceKey::parse(&key).ok_or(ApiError::NoSession)?;
    if is_content_type(&headers, "application/trickle-ice-sdpfrag") {
        return Err(ApiError::Unprocessable(
            "this server takes no trickled candidates; restart ICE with a JSON offer \
             ({\"sdp\",\"type\":\"offer\"})"
                .into(),
        ));
    }
    let offer = json_offer(&body, "")?;
    let answer = state.restart_ice(&resource, &offer.sdp).await?;
    Ok(Json(json!({"sdp": answer, "type": "answer"})).into_response())
}

/// `POST /api/calls` (`{"to", "voice", "prompt", "ring_timeout_s"}`): the agent calls `to`
/// over SIP. 201 with the call's report; it rings on by itself (`GET /api/calls/{id}`).
async fn place_call(
    State(state): State<Arc<AppState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let dialer = calls_allowed(&state, client, &headers)?;
    // A web page may POST text/plain to localhost without asking first; JSON it may not.
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err(ApiError::UnsupportedMediaType(
            "send the call as JSON (content-type: application/json)".into(),
        ));
    }
    let request: DialRequest = serde_json::from_slice(&body).map_err(|err| {
        ApiError::BadRequest(format!(
            "expected JSON {{\"to\": \"sip:bob@host\" or a number, \"voice\", \"prompt\", \
\"ring_timeout_s\"}}: {err}"
        ))
    })?;
    let report = dialer.dial(request).await?;
    let location = format!("/api/calls/{}", report.id);
    let location =
        HeaderValue::from_str(&location).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(report),
    )
        .into_response())
}

async fn list_calls(
    State(state): State<Arc<AppState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    let dialer = calls_allowed(&state, client, &headers)?;
    Ok(Json(json!({ "calls": dialer.reports() })))
}

async fn call_report(
    State(state): State<Arc<AppState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<CallReport>, ApiError> {
    let dialer = calls_allowed(&state, client, &headers)?;
    dialer.report(&id).map(Json).ok_or(ApiError::NoCall)
}

/// `DELETE /api/calls/{id}`: cancelled while it rings, a BYE once answered.
async fn hang_up_call(
    State(state): State<Arc<AppState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<CallReport>, ApiError> {
    let dialer = calls_allowed(&state, client, &headers)?;
    dialer.hang_up(&id).map(Json).ok_or(ApiError::NoCall)
}

/// The dialer, for a client that may place calls: one with the bearer token when one is
/// set, else only one on this host (a call through a PBX can cost money).
fn calls_allowed<'a>(
    state: &'a AppState,
    client: SocketAddr,
    headers: &HeaderMap,
) -> Result<&'a Dialer, ApiError> {
    match state.config.token {
        Some(_) => authorize(state, headers)?,
        None if client.ip().to_canonical().is_loopback() => {}
        None => {
            return Err(ApiError::Forbidden(
                "placing calls from another host needs the server's --token (a call through a \
PBX can cost money)"
                    .into(),
            ));
        }
    }
    state.dialer().ok_or_else(|| {
        ApiError::NotEnabled("calls are placed over SIP: start the server with --sip-port".into())
    })
}

/// Checks the bearer token when one is configured, in constant time.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(expected) = &state.config.token else {
        return Ok(());
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Like [`authorize`], also accepting the token as a query parameter (WebSocket clients in
/// browsers and telephony providers cannot set headers).
pub(super) fn authorize_with_query(
    state: &AppState,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<(), ApiError> {
    match (&state.config.token, query_token) {
        (Some(expected), Some(presented))
            if constant_time_eq(presented.as_bytes(), expected.as_bytes()) =>
        {
            Ok(())
        }
        _ => authorize(state, headers),
    }
}

/// Whether two secrets are equal, taking as long whatever their first difference (the bearer
/// token here, SIP digests in `sip::auth`).
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EchoEngine, EngineConfig, EngineHandle};
    use crate::gateway::GatewayConfig;
    use crate::gateway::sdp::tests::CHROME_OFFER;
    use crate::metrics::Metrics;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn app(token: Option<&str>, max_sessions: usize) -> (Router, Arc<AppState>) {
        let config = EngineConfig {
            max_sessions,
            ..Default::default()
        };
        let engine =
            EngineHandle::start(EchoEngine::new(4, 1), config, Arc::new(Metrics::new())).unwrap();
        let state = AppState::new(
            engine,
            GatewayConfig {
                token: token.map(Into::into),
                ..Default::default()
            },
        );
        (router(state.clone()), state)
    }

    async fn send(app: &Router, request: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let response = app.clone().oneshot(request).await.unwrap();
        let (parts, body) = response.into_parts();
        let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        (
            parts.status,
            parts.headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    fn json_offer(sdp: &str) -> Request<Body> {
        let body = json!({"sdp": sdp, "type": "offer"}).to_string();
        Request::post("/api/offer")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap()
    }

    /// Placing calls: only from this host without a token, only with it when one is set
    /// (checked before anything else, SIP being off here).
    #[tokio::test]
    async fn calls_are_placed_only_from_this_host_or_with_the_token() {
        use axum::extract::connect_info::MockConnectInfo;
        let place = |token: Option<&str>| {
            let mut request = Request::post("/api/calls");
            if let Some(token) = token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            request.body(Body::from(r#"{"to": "8001"}"#)).unwrap()
        };
        let lan: SocketAddr = "192.168.1.20:50000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let (open, state) = app(None, 2);
        let (status, _, body) = send(&open.clone().layer(MockConnectInfo(lan)), place(None)).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body.contains("--token"), "{body}");
        let (status, _, body) = send(&open.layer(MockConnectInfo(local)), place(None)).await;
        assert_eq!(status, StatusCode::NOT_IMPLEMENTED, "{body}");
        state.engine.shutdown();
        let (guarded, state) = app(Some("s3cret"), 2);
        let guarded = guarded.layer(MockConnectInfo(local));
        let (status, _, _) = send(&guarded, place(None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, _) = send(&guarded, place(Some("s3cret"))).await;
        assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
        let from_lan = guarded.layer(MockConnectInfo(lan));
        let (status, _, _) = send(&from_lan, place(Some("s3cret"))).await;
        assert_eq!(
            status,
            StatusCode::NOT_IMPLEMENTED,
            "the token admits any host"
        );
        state.engine.shutdown();
    }

    #[tokio::test]
    async fn the_page_and_info_are_served() {
        let (app, state) = app(None, 2);
        let (status, headers, body) =
            send(&app, Request::get("/").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            headers[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        assert!(body.contains("app.js"));
        let (status, _, body) =
            send(&app, Request::get("/api/info").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        let info: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(info["engine"], "echo");
        assert!(info["notice"].as_str().unwrap().contains("Echo engine"));
        assert_eq!(info["voices"].as_array().unwrap().len(), 18);
        state.engine.shutdown();
    }

    #[tokio::test]
    async fn ice_servers_are_handed_out_behind_the_token_and_never_cached() {
        let (app, state) = app(Some("s3cret"), 2);
        let ice = |token: Option<&str>| {
            let mut request = Request::get("/api/ice");
            if let Some(token) = token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            request.body(Body::empty()).unwrap()
        };
        let (status, _, _) = send(&app, ice(None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, _) = send(&app, ice(Some("wrong"))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, headers, body) = send(&app, ice(Some("s3cret"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        let page: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(page, json!({"iceServers": [], "iceTransportPolicy": "all"}));
        state.engine.shutdown();
    }

    #[tokio::test]
    async fn malformed_sdp_is_a_400_naming_the_problem() {
        let (app, state) = app(None, 2);
        let (status, _, body) = send(&app, json_offer("v=0\r\nnonsense\r\n")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("malformed SDP offer"), "{body}");
        let whip = Request::post("/api/offer")
            .header("content-type", "application/sdp")
            .body(Body::from("garbage"))
            .unwrap();
        let (status, _, body) = send(&app, whip).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("malformed SDP offer"), "{body}");
        assert_eq!(state.engine.active_sessions(), 0);
        state.engine.shutdown();
    }

    #[tokio::test]
    async fn bad_json_and_wrong_type_are_400() {
        let (app, state) = app(None, 2);
        let request = Request::post("/api/offer")
            .header("content-type", "application/json")
            .body(Body::from("{"))
            .unwrap();
        assert_eq!(send(&app, request).await.0, StatusCode::BAD_REQUEST);
        let body = json!({"sdp": CHROME_OFFER, "type": "answer"}).to_string();
        let request = Request::post("/api/offer")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let (status, _, body) = send(&app, request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("type must be"));
        state.engine.shutdown();
    }

    #[tokio::test]
    async fn unknown_voices_are_refused_with_the_list() {
        let (app, state) = app(None, 2);
        let body =
            json!({"sdp": CHROME_OFFER, "type": "offer", "voice": "../../etc/passwd"}).to_string();
        let request = Request::post("/api/offer")
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let (status, _, body) = send(&app, request).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body.contains("unknown voice") && body.contains("NATF0"),
            "{body}"
        );
        state.engine.shutdown();
    }

    #[tokio::test]
    async fn oversized_bodies_are_refused() {
        let (app, state) = app(None, 2);
        let huge = "a".repeat(MAX_OFFER_BYTES + 1);
        let request = Request::post("/api/offer")
            .header("content-type", "application/sdp")
            .body(Body::from(huge))
            .unwrap();
        assert_eq!(send(&app, request).await.0, StatusCode::PAYLOAD_TOO_LARGE);
        state.engine.shutdown();
    }

    #[tokio::test]
    async fn tokens_are_required_when_configured() {
        let (app, state) = app(Some("sesame"), 2);
        let (status, headers, _) = send(&app, json_offer(CHROME_OFFER)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        let mut request = json_offer(CHROME_OFFER);
        request.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer wrong"),
        );
        assert_eq!(send(&app, request).await.0, StatusCode::UNAUTHORIZED);
        let delete = Request::delete("/api/sessions/s00000001")
            .body(Body::empty())
            .unwrap();
        assert_eq!(send(&app, delete).await.0, StatusCode::UNAUTHORIZED);
        state.engine.shutdown();
    }

    #[tokio::test]
    async fn deleting_an_unknown_session_is_404() {
        let (app, state) = app(None, 2);
        for id in ["s00000099", "nonsense"] {
            let delete = Request::delete(format!("/api/sessions/{id}"))
                .body(Body::empty())
                .unwrap();
            assert_eq!(send(&app, delete).await.0, StatusCode::NOT_FOUND);
        }
        state.engine.shutdown();
    }

    #[tokio::test]
    async fn health_and_metrics_answer() {
        let (app, state) = app(None, 3);
        let (status, _, body) =
            send(&app, Request::get("/health").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("\"max_sessions\":3"));
        assert!(body.contains("\"real_time\":true"), "{body}");
        let (status, _, body) =
            send(&app, Request::get("/metrics").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.contains("duplex_step_seconds"));
        state.engine.shutdown();
    }

    /// A load balancer must stop sending callers to a server whose step loop has ended (a
    /// panic, or here a shutdown without draining): `/health` says so, with why.
    #[tokio::test]
    async fn health_is_unavailable_once_the_step_loop_has_stopped() {
        let (app, state) = app(None, 2);
        state.engine.shutdown();
        let (status, _, body) =
            send(&app, Request::get("/health").body(Body::empty()).unwrap()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["status"], "stopped");
        assert_eq!(body["error"], "the engine has shut down");
    }
}
