//! The HTTP boundary between the pool and the app.
//!
//! A worker hands every request that passed [`limits`] to [`App::handle`] and gets a response
//! back; nothing here knows about processes. Errors become status codes in exactly one place,
//! [`ApiError::into_response`], and bodies never carry internal details.

pub mod access_log;
pub mod limits;

use std::convert::Infallible;

use std::pin::Pin;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};

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
        response
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot load the app: {0}")]
    Load(String),
}

/// The application every worker serves. Built after fork, inside the worker's runtime.
pub struct App {
    pid: u32,
}

impl App {
    pub fn load(_config: &Config) -> Result<App, AppError> {
        Ok(App {
            pid: std::process::id(),
        })
    }

    pub async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        match self.route(request).await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        }
    }

    async fn route(&self, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        match (request.method(), request.uri().path()) {
            (&Method::GET | &Method::HEAD, "/health") => Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "status": "ok", "pid": self.pid }),
            )),
            (_, "/health") => Err(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "use GET")),
            _ => Err(ApiError::not_found()),
        }
    }
}
