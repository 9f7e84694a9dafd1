//! The HTTP boundary between the pool and the app.
//!
//! A worker hands every request that passed [`limits`] to [`App::handle`] and gets a response
//! back; nothing here knows about processes. Errors become status codes in exactly one place,
//! [`ApiError::into_response`], and bodies never carry internal details.

pub mod access_log;
pub mod api;
pub mod forwarded;
pub mod limits;
pub mod metrics;
pub mod sse;

use std::convert::Infallible;

use std::pin::Pin;
use std::rc::Rc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Request, Response, StatusCode};

use crate::config::Config;

/// Every response body: a full buffer or a stream. Not `Send`: a worker is one thread.
pub type Body = Pin<Box<dyn hyper::body::Body<Data = Bytes, Error = std::io::Error>>>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Box::pin(Full::new(bytes.into()).map_err(|never: Infallible| match never {}))
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// An error a client can act on: status and a message safe to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn not_found() -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not found")
    }

    /// The one place an error becomes a response.
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
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot load the app: {0}")]
    Load(#[from] crate::rag::engine::RagError),
}

/// The application every worker serves. Built after fork, inside the worker's runtime.
pub struct App {
    api: api::Api,
}

impl App {
    pub async fn load(
        config: &std::sync::Arc<Config>,
        board: &'static crate::scoreboard::Scoreboard,
        slot: &'static crate::scoreboard::Slot,
    ) -> Result<App, AppError> {
        let mut rag = crate::rag::engine::Rag::open(config).await?;
        if config.llm.max_concurrent > 0 {
            let gate = crate::scoreboard::LlmGate::new(board, slot, config.llm.max_concurrent);
            rag.set_gate(Box::new(gate));
        }
        let rag = Rc::new(rag);
        Ok(App {
            api: api::Api {
                rag,
                admin_token: config.admin_token.clone(),
                max_body: config.limits.body,
                board,
                slot,
                config: std::sync::Arc::clone(config),
            },
        })
    }

    pub fn rag(&self) -> &Rc<crate::rag::engine::Rag> {
        &self.api.rag
    }

    pub async fn handle(
        &self,
        request: Request<Incoming>,
        client: forwarded::Client,
    ) -> Response<Body> {
        match self.api.route(request, client).await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        }
    }
}

impl crate::rag::engine::GenerationGate for crate::scoreboard::LlmGate {
    fn enqueue(&self) -> u64 {
        crate::scoreboard::LlmGate::enqueue(self)
    }
    fn try_admit(&self) -> bool {
        crate::scoreboard::LlmGate::try_admit(self)
    }
    fn position(&self, ticket: u64) -> u64 {
        crate::scoreboard::LlmGate::position(self, ticket)
    }
    fn abandon(&self) {
        crate::scoreboard::LlmGate::abandon(self)
    }
    fn release(&self) {
        crate::scoreboard::LlmGate::release(self)
    }
}
