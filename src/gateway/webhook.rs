//! Events POSTed to a URL a client named (a placed call's `status_url`): JSON, in order, each
//! tried up to [`ATTEMPTS`] times; signed with the server's `--token` when it has one, so the
//! receiver can tell them from forgeries (`X-Duplex-Signature: sha256=<hex HMAC of the body>`).

use crate::metrics::Metrics;
use hmac::{Hmac, Mac};
use reqwest::Url;
use serde::Serialize;
use sha2::Sha256;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// Tries per event: the first, then after 1 s and 2 s.
const ATTEMPTS: u32 = 3;
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// One delivery's limit, from connecting to the answer.
const DELIVERY_LIMIT: Duration = Duration::from_secs(5);
/// The metrics label of webhook events.
const TRANSPORT: &str = "webhook";

/// Checks a client's URL: http or https, with a host.
pub fn parse_url(url: &str) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|err| format!("{url:?} is no URL: {err}"))?;
    match (parsed.scheme(), parsed.host_str()) {
        ("http" | "https", Some(_)) => Ok(parsed),
        _ => Err(format!("{url:?} is no http(s) URL with a host")),
    }
}

/// The queue of one URL's events, delivered by its own task; dropping it lets the task
/// finish what is queued.
#[derive(Debug)]
pub struct Webhook {
    events: mpsc::UnboundedSender<Vec<u8>>,
}

impl Webhook {
    pub fn start(url: Url, token: Option<String>, metrics: Arc<Metrics>) -> Self {
        let (events, queue) = mpsc::unbounded_channel();
        tokio::spawn(deliver_all(url, token, metrics, queue));
        Self { events }
    }

    pub fn send(&self, event: &impl Serialize) {
        if let Ok(body) = serde_json::to_vec(event) {
            let _ = self.events.send(body);
        }
    }
}

async fn deliver_all(
    url: Url,
    token: Option<String>,
    metrics: Arc<Metrics>,
    mut queue: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    while let Some(body) = queue.recv().await {
        let outcome = match deliver(&url, token.as_deref(), body).await {
            Ok(()) => "delivered",
            Err(why) => {
                tracing::warn!(%url, %why, "status webhook not delivered");
                "failed"
            }
        };
        metrics.transport_event(TRANSPORT, outcome);
    }
}

/// POSTs `body`, again after a network error, a 5xx or a 429.
async fn deliver(url: &Url, token: Option<&str>, body: Vec<u8>) -> Result<(), String> {
    let mut request = client()
        .post(url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header("X-Duplex-Signature", signature(token, &body));
    }
    let request = request.body(body);
    let mut wait = FIRST_RETRY;
    let mut last = String::new();
    for attempt in 1..=ATTEMPTS {
        let Some(this) = request.try_clone() else {
            break;
        };
        match this.send().await {
            Ok(response) if response.status().is_success() => return Ok(()),
            Ok(response) => {
                last = format!("answered {}", response.status());
                let status = response.status();
                if !(status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS) {
                    break;
                }
            }
            Err(err) => last = err.to_string(),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
    Err(last)
}

/// `sha256=` and the hex HMAC-SHA256 of `body` keyed with `token`.
pub fn signature(token: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256={hex}")
}

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(DELIVERY_LIMIT)
            // A redirect could send the event where the caller never named.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("duplex/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a client with a timeout")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 4231's test case 2 ("Jefe"), whose HMAC-SHA256 it gives.
    #[test]
    fn the_signature_is_rfc_4231s_hmac_sha256() {
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    /// A 503 is tried again and then delivered; a redirect is neither followed nor retried.
    #[tokio::test]
    async fn a_failed_delivery_is_retried_and_a_redirect_is_not_followed() {
        use axum::http::StatusCode;
        use axum::response::Redirect;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let hits: Arc<[AtomicUsize; 3]> = Arc::default();
        let (flaky, moved, target) = (hits.clone(), hits.clone(), hits.clone());
        let app = axum::Router::new()
            .route(
                "/flaky",
                axum::routing::post(move || async move {
                    match flaky[0].fetch_add(1, Ordering::SeqCst) {
                        0 => StatusCode::SERVICE_UNAVAILABLE,
                        _ => StatusCode::OK,
                    }
                }),
            )
            .route(
                "/moved",
                axum::routing::post(move || async move {
                    moved[1].fetch_add(1, Ordering::SeqCst);
                    Redirect::temporary("/elsewhere")
                }),
            )
            .route(
                "/elsewhere",
                axum::routing::post(move || async move {
                    target[2].fetch_add(1, Ordering::SeqCst);
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let metrics = Arc::new(Metrics::new());
        let count = |outcome: &str| {
            let counter = metrics
                .transport_events
                .with_label_values(&[TRANSPORT, outcome]);
            counter.get()
        };
        for path in ["/flaky", "/moved"] {
            let url = parse_url(&format!("{base}{path}")).unwrap();
            // Dropped at once: what it queued is still delivered.
            Webhook::start(url, None, metrics.clone()).send(&"event");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while count("delivered") + count("failed") < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!((count("delivered"), count("failed")), (1, 1));
        let hits: Vec<usize> = hits.iter().map(|h| h.load(Ordering::SeqCst)).collect();
        assert_eq!(hits, [2, 1, 0], "flaky twice, moved once, its target never");
    }

    #[test]
    fn only_http_urls_with_a_host_are_taken() {
        assert!(parse_url("https://crm.example/hooks/call?x=1").is_ok());
        assert!(parse_url("http://10.0.0.5:8080/").is_ok());
        for bad in [
            "ftp://h/",
            "file:///etc/passwd",
            "crm.example/hook",
            "",
            "http://",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }
}
