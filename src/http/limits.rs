//! Request limits (Gunicorn's `limit_request_*`, nginx's `client_body_timeout`), answered with
//! a 4xx and a short body, and hyper's connection settings that enforce the rest.
//!
//! hyper enforces the field count itself (`max_headers`, answered 431), caps its read buffer and
//! times out slow heads (`header_timeout`); the exact per-line and per-field sizes and the
//! declared body size are checked here, before the app sees the request; a body is read through
//! [`read_body`], which stops at the route's limit while reading and at `body_timeout`.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::server::conn::http1;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioTimer;

use super::ApiError;
use crate::config::{Config, RequestLimits};

/// hyper's HTTP/1.1 settings for every connection of a worker, built once from the config.
pub fn http1_builder(config: &Config) -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .keep_alive(!config.keepalive.is_zero())
        // A client that sends its request and then shuts down its write side still gets the
        // response (nginx and curl do not, but plain sockets and some proxies do).
        .half_close(true)
        .max_headers(config.limits.fields)
        .max_buf_size(max_head_bytes(&config.limits))
        .header_read_timeout((!config.header_timeout.is_zero()).then_some(config.header_timeout));
    http
}

/// The largest request head hyper may buffer: big enough that our own checks, not hyper's
/// buffer, decide which limit a request broke.
pub fn max_head_bytes(limits: &RequestLimits) -> usize {
    let fields = limits
        .fields
        .saturating_mul(limits.field_size.saturating_add(4));
    limits
        .line
        .saturating_add(fields)
        .saturating_add(4096)
        .max(8192)
}

/// Checks a parsed request head against the limits; `body` is the route's body limit and
/// the name of the key that sets it.
pub fn check_head<B>(
    request: &Request<B>,
    limits: &RequestLimits,
    (body, key): (u64, &str),
) -> Result<(), ApiError> {
    // "METHOD SP request-target SP HTTP/1.1"
    let line = request.method().as_str().len() + 1 + request.uri().to_string().len() + 9;
    if line > limits.line {
        return Err(ApiError::new(
            StatusCode::URI_TOO_LONG,
            format!("request line is {line} bytes; the limit is {}", limits.line),
        ));
    }
    if request.headers().len() > limits.fields {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("too many header fields; the limit is {}", limits.fields),
        ));
    }
    for (name, value) in request.headers() {
        let size = name.as_str().len() + 2 + value.len();
        if size > limits.field_size {
            return Err(ApiError::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!(
                    "header field {name} is {size} bytes; the limit is {}",
                    limits.field_size
                ),
            ));
        }
    }
    if let Some(length) = request.headers().get(CONTENT_LENGTH) {
        let length: u64 = length
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "invalid Content-Length"))?;
        if length > body {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body is {length} bytes; the limit is {body} ({key})"),
            ));
        }
    }
    Ok(())
}

/// The whole body, or 413 as soon as more than `limit` bytes arrived (nothing past the limit
/// is buffered), or 408 when it has not all arrived within `timeout` (zero: no deadline).
pub async fn read_body(
    body: Incoming,
    (limit, key): (u64, &str),
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let collect = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX)).collect();
    let collected = if timeout.is_zero() {
        collect.await
    } else {
        tokio::time::timeout(timeout, collect).await.map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {} s (body_timeout)",
                    timeout.as_secs_f64()
                ),
            )
        })?
    };
    collected.map(|c| c.to_bytes()).map_err(|e| {
        if e.downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body exceeds {key} ({limit} bytes)"),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "could not read the request body")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> RequestLimits {
        RequestLimits {
            line: 100,
            fields: 3,
            field_size: 50,
            body: 10,
            json_body: 5,
        }
    }

    fn check(request: &Request<()>) -> Result<(), ApiError> {
        check_head(request, &limits(), (10, "max_body_size"))
    }

    #[test]
    fn each_limit_has_its_status() {
        let ok = Request::get("/health").body(()).unwrap();
        assert!(check(&ok).is_ok());
        let long = Request::get(format!("/{}", "a".repeat(100)))
            .body(())
            .unwrap();
        assert_eq!(check(&long).unwrap_err().status, StatusCode::URI_TOO_LONG);
        let big_field = Request::get("/")
            .header("x-a", "b".repeat(60))
            .body(())
            .unwrap();
        assert_eq!(
            check(&big_field).unwrap_err().status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let many = Request::get("/")
            .header("a", "1")
            .header("b", "1")
            .header("c", "1")
            .header("d", "1")
            .body(())
            .unwrap();
        assert_eq!(
            check(&many).unwrap_err().status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let body = Request::post("/")
            .header("content-length", "11")
            .body(())
            .unwrap();
        assert_eq!(
            check(&body).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let bad = Request::post("/")
            .header("content-length", "x")
            .body(())
            .unwrap();
        assert_eq!(check(&bad).unwrap_err().status, StatusCode::BAD_REQUEST);
    }
}
