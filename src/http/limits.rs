//! Request-head limits (Gunicorn's `limit_request_*`), answered with a 4xx and a short body.
//!
//! hyper enforces the field count itself (`max_headers`, answered 431) and caps its read buffer;
//! the exact per-line and per-field sizes and the declared body size are checked here, before
//! the app sees the request.

use hyper::header::CONTENT_LENGTH;
use hyper::{Request, StatusCode};

use super::ApiError;
use crate::config::RequestLimits;

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

/// Checks a parsed request head against the limits.
pub fn check_head<B>(request: &Request<B>, limits: &RequestLimits) -> Result<(), ApiError> {
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
        if length > limits.body {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body is {length} bytes; the limit is {}", limits.body),
            ));
        }
    }
    Ok(())
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
        }
    }

    #[test]
    fn each_limit_has_its_status() {
        let ok = Request::get("/health").body(()).unwrap();
        assert!(check_head(&ok, &limits()).is_ok());
        let long = Request::get(format!("/{}", "a".repeat(100)))
            .body(())
            .unwrap();
        assert_eq!(
            check_head(&long, &limits()).unwrap_err().status,
            StatusCode::URI_TOO_LONG
        );
        let big_field = Request::get("/")
            .header("x-a", "b".repeat(60))
            .body(())
            .unwrap();
        assert_eq!(
            check_head(&big_field, &limits()).unwrap_err().status,
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
            check_head(&many, &limits()).unwrap_err().status,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
        let body = Request::post("/")
            .header("content-length", "11")
            .body(())
            .unwrap();
        assert_eq!(
            check_head(&body, &limits()).unwrap_err().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        let bad = Request::post("/")
            .header("content-length", "x")
            .body(())
            .unwrap();
        assert_eq!(
            check_head(&bad, &limits()).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }
}
