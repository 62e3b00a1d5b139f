//! Errors the HTTP API answers with: bad input keeps its status and its text, internal errors
//! are logged once and answered generically.

use crate::engine::{OpenError, PersonaError};
use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Seconds a refused client should wait before retrying a full server.
const RETRY_AFTER_SECONDS: &str = "5";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed SDP offer: {0}")]
    BadSdp(String),
    #[error("the offer has no audio section; duplex needs a microphone track (m=audio)")]
    NoAudio,
    #[error("the offer's audio section does not offer Opus (opus/48000/2); offered: {offered}")]
    NoOpus { offered: String },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error(transparent)]
    Persona(#[from] PersonaError),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("no such session: it has ended, or this is not its resource")]
    NoSession,
    #[error("no such call: it was never placed here, or ended long ago")]
    NoCall,
    /// The request needs more than the server was started with.
    #[error("{0}")]
    NotEnabled(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("server full: all {max} sessions are in use; retry later")]
    Full { max: usize },
    #[error("the server is shutting down")]
    Draining,
    #[error("the model is failing ({0}); retry later")]
    Failing(String),
    /// The sessions already in take steps too slow for real time (`OpenError::Behind`).
    #[error("{0}")]
    Behind(String),
    /// ICE gathering left the answer without a single address to reach the server at: a
    /// fault of the deployment (its TURN server), which retrying does not mend.
    #[error("the server has no address to offer this call: {0}")]
    NoCandidate(String),
    /// The request clashes with one in progress on the same resource.
    #[error("{0}")]
    Conflict(String),
    /// A request this server does not take on that resource (a WHIP trickle PATCH).
    #[error("{0}")]
    Unprocessable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<OpenError> for ApiError {
    fn from(err: OpenError) -> Self {
        match err {
            OpenError::Full { max } => Self::Full { max },
            OpenError::Persona(err) => Self::Persona(err),
            OpenError::Stopped => Self::Draining,
            OpenError::Failing(why) => Self::Failing(why),
            behind @ OpenError::Behind { .. } => Self::Behind(behind.to_string()),
        }
    }
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadSdp(_)
            | Self::NoAudio
            | Self::NoOpus { .. }
            | Self::BadRequest(_)
            | Self::Persona(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::NoSession | Self::NoCall => StatusCode::NOT_FOUND,
            Self::NotEnabled(_) => StatusCode::NOT_IMPLEMENTED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Full { .. } | Self::Draining | Self::Failing(_) | Self::Behind(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::NoCandidate(_) => StatusCode::BAD_GATEWAY,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A short machine-readable name for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadSdp(_) => "bad_sdp",
            Self::NoAudio => "no_audio",
            Self::NoOpus { .. } => "no_opus",
            Self::BadRequest(_) => "bad_request",
            Self::Persona(_) => "persona",
            Self::Unauthorized => "unauthorized",
            Self::NoSession => "no_session",
            Self::NoCall => "no_call",
            Self::NotEnabled(_) => "not_enabled",
            Self::Forbidden(_) => "forbidden",
            Self::UnsupportedMediaType(_) => "unsupported_media_type",
            Self::Full { .. } => "full",
            Self::Draining => "draining",
            Self::Failing(_) => "failing",
            Self::Behind(_) => "behind",
            Self::NoCandidate(_) => "no_candidate",
            Self::Conflict(_) => "conflict",
            Self::Unprocessable(_) => "unprocessable",
            Self::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            Self::Internal(detail) => {
                tracing::error!(%detail, "internal error answering a request");
                "internal server error".to_owned()
            }
            other => other.to_string(),
        };
        let mut response = (status, Json(serde_json::json!({ "error": message }))).into_response();
        let headers = response.headers_mut();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECONDS),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_behind_real_time_answers_503_with_retry_after_and_why() {
        let err = ApiError::from(OpenError::Behind {
            sessions: 3,
            slow: 5,
        });
        assert_eq!(err.reason(), "behind");
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            response.headers().get(header::RETRY_AFTER),
            Some(&HeaderValue::from_static(RETRY_AFTER_SECONDS))
        );
        assert_eq!(
            ApiError::from(OpenError::Behind {
                sessions: 3,
                slow: 5
            })
            .to_string(),
            "the server is behind real time: 5 of its last 32 steps took too long, with 3 in; retry later"
        );
    }
}
