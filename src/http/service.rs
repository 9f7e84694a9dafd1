//! The request path: one hyper service per connection that takes a request from its head to
//! the end of its response body. In order: who the client is ([`super::forwarded`]), the
//! request's bookkeeping ([`RequestGuard`]: access line, counters, metrics label), overload,
//! the head limits for its route ([`super::limits`]), then the app ([`super::api`]). Every
//! error becomes a response in [`ApiError::into_response`].
//!
//! The worker owns sockets, accept and drain; it builds a [`Server`] once, a [`Conn`] per
//! connection, and hands hyper [`service`]. It reads [`Conn`] to time keep-alive and drain.
//! Nothing here accepts, closes or counts connections.

use std::cell::Cell;
use std::convert::Infallible;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION};
use hyper::service::Service;
use hyper::{Request, Response, StatusCode};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::access_log::{AccessLog, Entry};
use super::body::Body;
use super::routes::Route;
use super::{forwarded, limits, ApiError, App};
use crate::config::Config;
use crate::scoreboard::Slot;

/// What every request of one worker shares.
pub struct Server {
    config: Arc<Config>,
    slot: &'static Slot,
    app: App,
    access_log: AccessLog,
    /// Set once when the worker starts draining: responses then say `Connection: close`.
    draining: Cell<bool>,
}

impl Server {
    pub fn new(
        config: Arc<Config>,
        slot: &'static Slot,
        app: App,
        access_log: AccessLog,
    ) -> Server {
        Server {
            config,
            slot,
            app,
            access_log,
            draining: Cell::new(false),
        }
    }

    /// From now on, tell keep-alive clients (and nginx's upstream pool) not to reuse connections.
    pub fn start_draining(&self) {
        self.draining.set(true);
    }

    pub fn access_log(&self) -> &AccessLog {
        &self.access_log
    }
}

/// One connection's request bookkeeping, shared by its requests and read by the worker.
pub struct Conn {
    in_flight: Cell<u32>,
    requests: Cell<u64>,
    /// When the last response finished: the start of keep-alive idleness.
    last_done: Cell<Instant>,
    /// Woken when a request starts (a connection told to drain before its first request
    /// closes after that request).
    pub request_started: Notify,
}

impl Conn {
    pub fn new() -> Rc<Conn> {
        Rc::new(Conn {
            in_flight: Cell::new(0),
            requests: Cell::new(0),
            last_done: Cell::new(Instant::now()),
            request_started: Notify::new(),
        })
    }

    /// Requests being answered now on this connection.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.get()
    }

    /// Requests started on this connection so far.
    pub fn requests(&self) -> u64 {
        self.requests.get()
    }

    /// When the last response ended.
    pub fn last_done(&self) -> Instant {
        self.last_done.get()
    }
}

/// The hyper service of one connection. `peer` is `None` for a unix socket; `overloaded` means
/// the worker was over `worker_connections` when it accepted the connection.
pub fn service(
    server: Rc<Server>,
    conn: Rc<Conn>,
    peer: Option<IpAddr>,
    overloaded: bool,
) -> impl Service<Request<Incoming>, Response = Response<Body>, Error = Infallible> {
    hyper::service::service_fn(move |request| {
        handle(
            Rc::clone(&server),
            Rc::clone(&conn),
            peer,
            overloaded,
            request,
        )
    })
}

async fn handle(
    server: Rc<Server>,
    conn: Rc<Conn>,
    peer: Option<IpAddr>,
    overloaded: bool,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let client = forwarded::client(peer, request.headers(), &server.config.forwarded_allow_ips);
    let route = Route::of(request.method(), request.uri().path());
    let mut guard = RequestGuard::begin(Rc::clone(&server), conn, client, route.label, &request);
    let response = if overloaded {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this worker is at worker_connections; retry shortly",
        )
        .into_response()
    } else {
        let limits = &server.config.limits;
        match limits::check_head(&request, limits, route.body.bytes(limits)) {
            Err(error) => error.into_response(),
            Ok(()) => server.app.handle(request, route, client).await,
        }
    };
    guard.status = response.status().as_u16();
    let (mut parts, body) = response.into_parts();
    if server.draining.get() {
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(Response::from_parts(parts, body.finish_with(guard)))
}

/// Lives from the start of a request to the end (or drop) of its response body; on drop it
/// writes the access line and settles the counters, whatever way the request ended.
pub struct RequestGuard {
    server: Rc<Server>,
    conn: Rc<Conn>,
    client: forwarded::Client,
    started: std::time::Instant,
    /// Only captured when the access log is on.
    request_line: String,
    referer: String,
    user_agent: String,
    /// 499 (nginx's "client closed request") until a response exists.
    status: u16,
    /// Index into [`crate::metrics::ROUTES`].
    label: usize,
    bytes: u64,
}

impl RequestGuard {
    fn begin(
        server: Rc<Server>,
        conn: Rc<Conn>,
        client: forwarded::Client,
        label: usize,
        request: &Request<Incoming>,
    ) -> RequestGuard {
        server.slot.request_started();
        conn.in_flight.set(conn.in_flight.get() + 1);
        conn.requests.set(conn.requests.get() + 1);
        conn.request_started.notify_one();
        let (request_line, referer, user_agent) = if server.access_log.is_on() {
            let header = |name| {
                request
                    .headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string()
            };
            (
                format!(
                    "{} {} {:?}",
                    request.method(),
                    request.uri(),
                    request.version()
                ),
                header(hyper::header::REFERER),
                header(hyper::header::USER_AGENT),
            )
        } else {
            Default::default()
        };
        RequestGuard {
            server,
            conn,
            client,
            started: std::time::Instant::now(),
            request_line,
            referer,
            user_agent,
            status: 499,
            label,
            bytes: 0,
        }
    }

    pub(super) fn add_bytes(&mut self, n: usize) {
        self.bytes += n as u64;
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let server = &self.server;
        server.slot.request_finished();
        if server.config.metrics {
            server
                .slot
                .metrics
                .record_request(self.label, self.status, self.started.elapsed());
        }
        self.conn.in_flight.set(self.conn.in_flight.get() - 1);
        self.conn.last_done.set(Instant::now());
        if !server.access_log.is_on() {
            return; // nothing below is needed, and the host string would be an allocation
        }
        server.access_log.write(&Entry {
            remote: &self.client.host(),
            request_line: &self.request_line,
            status: self.status,
            bytes: self.bytes,
            referer: &self.referer,
            user_agent: &self.user_agent,
            duration: self.started.elapsed(),
        });
    }
}
