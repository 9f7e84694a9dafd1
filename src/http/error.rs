//! The one error type of the request path and the one place an error becomes a response.
//!
//! An [`ApiError`] carries a status and a message that is safe to show a client. Internal
//! failures (store, embedding, a task that panicked) are logged here with their cause and
//! answered with a fixed sentence: a client never sees a path, a URL or an upstream's words.
//! `/v1` gets the same errors in OpenAI's shape ([`ApiError::into_openai_response`]).
//! Nothing here reads a request or knows a route.

use hyper::header::{HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};

use super::body::{json, Body};
use crate::rag::engine::RagError;
use crate::rag::ingest::IngestError;
use crate::rag::store::StoreError;

/// An error a client can act on: status and a message safe to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    /// `message` is shown to the client as is: only for what the client itself sent or did.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not found")
    }

    /// An internal failure: `cause` goes to the error log, the client gets `public`.
    pub fn internal(
        status: StatusCode,
        public: &'static str,
        cause: &dyn std::fmt::Display,
    ) -> ApiError {
        log::error!("{public}: {cause}");
        ApiError::new(status, public)
    }

    /// The one place an error becomes a response: `{"error": message}` with its status.
    pub fn into_response(self) -> Response<Body> {
        let mut response = json(self.status, &serde_json::json!({ "error": self.message }));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }

    /// The same error in OpenAI's shape, for `/v1`: `{"error": {message, type, param, code}}`.
    pub fn into_openai_response(self) -> Response<Body> {
        let kind = match self.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::NOT_FOUND => "not_found_error",
            s if s.is_client_error() => "invalid_request_error",
            _ => "api_error",
        };
        let body = serde_json::json!({
            "error": { "message": self.message, "type": kind, "param": null, "code": null },
        });
        let mut response = self.into_response();
        *response.body_mut() = Body::full(body.to_string());
        response
    }
}

/// A document the client sent could not be read: its own fault, so the message names why.
impl From<IngestError> for ApiError {
    fn from(e: IngestError) -> ApiError {
        let status = match e {
            IngestError::Unsupported { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        ApiError::new(status, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError::internal(
            StatusCode::SERVICE_UNAVAILABLE,
            "the document store is unavailable",
            &e,
        )
    }
}

impl From<RagError> for ApiError {
    fn from(e: RagError) -> ApiError {
        match e {
            RagError::Ingest(e) => e.into(),
            RagError::Store(e) => e.into(),
            RagError::Empty(_) | RagError::Chunking(_) => {
                log::warn!("ingest refused: {e}");
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
            }
            RagError::Embed(_) => ApiError::internal(
                StatusCode::BAD_GATEWAY,
                "the embedding model is unavailable; nothing was stored",
                &e,
            ),
            RagError::Client { .. } => ApiError::internal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the server is misconfigured",
                &e,
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_errors_do_not_reach_the_client() {
        let store = StoreError::CreateDir {
            path: "/srv/secret/data".into(),
            source: std::io::Error::other("disk on fire"),
        };
        let error = ApiError::from(RagError::Store(store));
        assert_eq!(error.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!error.message.contains("/srv"), "{}", error.message);
        assert!(!error.message.contains("fire"), "{}", error.message);
    }
}
