//! The worker's server: accept loops, one task per connection, graceful drain.
//!
//! Backpressure is explicit: at most `worker_connections` connections are served normally; the
//! next ones get a fast `503` with `Retry-After` and are closed, instead of piling up.
//!
//! Drain (SIGTERM/SIGQUIT, or the master vanished): each accept loop stops waiting, accepts what
//! the kernel already queued (so those clients are served, not reset), and drops its listener;
//! every connection finishes its request in flight and closes, idle keep-alive connections close
//! at once; the worker exits when the last connection is gone or `graceful_timeout` passes.
//! SIGINT exits at once.

use std::cell::Cell;
use std::convert::Infallible;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::header::{HeaderValue, CONNECTION};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::io::{Listener, Peer, Stream};
use crate::config::Config;
use crate::http::access_log::{AccessLog, Entry};
use crate::http::{forwarded, limits, ApiError, App, Body};
use crate::scoreboard::{Slot, SlotState};

/// Pause after a failed `accept` (e.g. EMFILE) before trying again; never fatal.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The worker's signal streams, installed once its runtime exists.
pub struct StopSignals {
    term: Signal,
    quit: Signal,
    int: Signal,
    usr1: Signal,
}

impl StopSignals {
    pub fn install() -> std::io::Result<StopSignals> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            quit: signal(SignalKind::quit())?,
            int: signal(SignalKind::interrupt())?,
            usr1: signal(SignalKind::user_defined1())?,
        })
    }
}

/// State every connection of this worker shares.
pub struct Shared {
    config: Arc<Config>,
    slot: &'static Slot,
    app: App,
    access_log: AccessLog,
    /// hyper's connection settings, built once from the config.
    http: http1::Builder,
    /// Connections open now: for `worker_connections` and to know when a drain is done.
    open: Cell<usize>,
    /// Woken when the last connection closes.
    all_closed: Notify,
    /// Flips to `true` once, to start the drain.
    stop: watch::Sender<bool>,
}

/// A handle that starts the drain (used by the heartbeat when the master is gone).
pub struct Stopper(Rc<Shared>);

impl Stopper {
    pub fn stop(&self) {
        self.0.stop.send_replace(true);
    }
}

impl Shared {
    pub fn new(
        config: Arc<Config>,
        slot: &'static Slot,
        app: App,
        access_log: AccessLog,
    ) -> Rc<Shared> {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .keep_alive(!config.keepalive.is_zero())
            .max_headers(config.limits.fields)
            .max_buf_size(limits::max_head_bytes(&config.limits))
            .header_read_timeout(
                (!config.header_timeout.is_zero()).then_some(config.header_timeout),
            );
        Rc::new(Shared {
            config,
            slot,
            app,
            access_log,
            http,
            open: Cell::new(0),
            all_closed: Notify::new(),
            stop: watch::channel(false).0,
        })
    }

    pub fn stopper(self: &Rc<Self>) -> Stopper {
        Stopper(Rc::clone(self))
    }
}

/// Serves until told to stop, then drains.
pub async fn serve(listeners: Vec<Listener>, shared: Rc<Shared>, mut signals: StopSignals) {
    let accept_loops: Vec<_> = listeners
        .into_iter()
        .map(|l| tokio::task::spawn_local(accept_loop(l, Rc::clone(&shared))))
        .collect();
    let mut stopped = shared.stop.subscribe();
    loop {
        tokio::select! {
            _ = signals.term.recv() => break,
            _ = signals.quit.recv() => break,
            _ = stopped.changed() => break,
            _ = signals.int.recv() => {
                log::info!("worker exiting at once (SIGINT)");
                return;
            }
            _ = signals.usr1.recv() => reopen_logs(&shared),
        }
    }
    log::info!("worker draining: {} connections open", shared.open.get());
    shared.slot.set_state(SlotState::Draining);
    shared.stop.send_replace(true);
    for accept_loop in accept_loops {
        let _ = accept_loop.await;
    }
    let deadline = tokio::time::sleep(shared.config.graceful_timeout);
    tokio::pin!(deadline);
    loop {
        let closed = shared.all_closed.notified();
        if shared.open.get() == 0 {
            break;
        }
        tokio::select! {
            _ = closed => {}
            _ = signals.int.recv() => return,
            _ = &mut deadline => {
                log::warn!("graceful_timeout passed with {} connections open; exiting", shared.open.get());
                return;
            }
        }
    }
    log::info!("worker drained; exiting");
}

fn reopen_logs(shared: &Shared) {
    if let Err(e) = shared.access_log.reopen() {
        log::error!("{e}");
    }
    if let Err(e) = crate::logging::reopen_error_log() {
        log::error!("cannot reopen the error log: {e}");
    }
}

async fn accept_loop(listener: Listener, shared: Rc<Shared>) {
    let mut stop = shared.stop.subscribe();
    while !*stop.borrow_and_update() {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => start_connection(&shared, stream, peer, false),
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            },
        }
    }
    // Serve what the kernel already queued for us (gunicorn#2529), then close the listener.
    while let Some(accepted) = listener.accept_queued() {
        match accepted {
            Ok((stream, peer)) => start_connection(&shared, stream, peer, true),
            Err(e) => {
                log::warn!("accept failed while draining: {e}");
                break;
            }
        }
    }
}

/// Per-connection bookkeeping shared with its requests.
struct ConnState {
    in_flight: Cell<u32>,
    requests: Cell<u64>,
    /// When the last response finished: the start of keep-alive idleness.
    last_done: Cell<Instant>,
    /// Woken when a request starts (a connection told to drain before its first request
    /// closes after that request).
    request_started: Notify,
}

fn start_connection(shared: &Rc<Shared>, stream: Stream, peer: Peer, draining: bool) {
    let overloaded = shared.open.get() >= shared.config.worker_connections;
    shared.open.set(shared.open.get() + 1);
    shared.slot.connection_opened();
    // Subscribe now, not in the task: a stop sent before the task first runs must still be seen.
    let stop = shared.stop.subscribe();
    tokio::task::spawn_local(serve_connection(
        Rc::clone(shared),
        stream,
        peer,
        overloaded,
        draining,
        stop,
    ));
}

async fn serve_connection(
    shared: Rc<Shared>,
    stream: Stream,
    peer: Peer,
    overloaded: bool,
    draining: bool,
    mut stop: watch::Receiver<bool>,
) {
    let state = Rc::new(ConnState {
        in_flight: Cell::new(0),
        requests: Cell::new(0),
        last_done: Cell::new(Instant::now()),
        request_started: Notify::new(),
    });
    let service = {
        let shared = Rc::clone(&shared);
        let state = Rc::clone(&state);
        service_fn(move |request| {
            handle(
                Rc::clone(&shared),
                Rc::clone(&state),
                peer,
                overloaded,
                request,
            )
        })
    };
    let mut builder = shared.http.clone();
    if overloaded || draining {
        builder.keep_alive(false);
    }
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let keepalive = shared.config.keepalive.max(Duration::from_millis(1));
    let mut shutting_down = overloaded || draining;
    // While draining: close once a request beyond this count has started.
    let mut close_after: Option<u64> = None;
    loop {
        let idle_deadline = if state.in_flight.get() > 0 || state.requests.get() == 0 {
            Instant::now() + keepalive
        } else {
            state.last_done.get() + keepalive
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    log::debug!("connection from {}: {e}", peer.host());
                }
                break;
            }
            _ = stop.changed(), if !shutting_down && close_after.is_none() => {
                if state.in_flight.get() > 0 {
                    // Finish the request in flight (its response says Connection: close), then close.
                    conn.as_mut().graceful_shutdown();
                    shutting_down = true;
                } else {
                    // Idle (or not a request read yet): closing now would race a client — nginx's
                    // upstream pool above all — that is sending its next request on this very
                    // connection, and a POST is not retried. Serve that request with
                    // Connection: close instead; if none comes, the keep-alive timer (or the
                    // header timeout) closes the connection.
                    close_after = Some(state.requests.get());
                }
            }
            _ = state.request_started.notified(), if close_after.is_some() && !shutting_down => {
                if close_after.is_some_and(|seen| state.requests.get() > seen) {
                    conn.as_mut().graceful_shutdown();
                    shutting_down = true;
                }
            }
            _ = tokio::time::sleep_until(idle_deadline), if !shutting_down => {
                let idle = state.in_flight.get() == 0 && state.requests.get() > 0;
                if idle && state.last_done.get().elapsed() >= keepalive {
                    conn.as_mut().graceful_shutdown();
                    shutting_down = true;
                }
            }
        }
    }
    shared.slot.connection_closed();
    shared.open.set(shared.open.get() - 1);
    if shared.open.get() == 0 {
        shared.all_closed.notify_waiters();
    }
}

async fn handle(
    shared: Rc<Shared>,
    state: Rc<ConnState>,
    peer: Peer,
    overloaded: bool,
    request: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let peer_ip = match peer {
        Peer::Ip(addr) => Some(addr.ip()),
        Peer::Unix => None,
    };
    let client = forwarded::client(
        peer_ip,
        request.headers(),
        &shared.config.forwarded_allow_ips,
    );
    let mut guard = RequestGuard::begin(Rc::clone(&shared), state, client, &request);
    let response = if overloaded {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this worker is at worker_connections; retry shortly",
        )
        .into_response()
    } else {
        match limits::check_head(&request, &shared.config.limits) {
            Err(error) => error.into_response(),
            Ok(()) => shared.app.handle(request, client).await,
        }
    };
    guard.status = response.status().as_u16();
    let (mut parts, body) = response.into_parts();
    if *shared.stop.borrow() {
        // Tell keep-alive clients (and nginx's upstream pool) not to reuse this connection.
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    let body: Body = Box::pin(LoggedBody {
        inner: body,
        guard: Some(guard),
    });
    Ok(Response::from_parts(parts, body))
}

/// Lives from the start of a request to the end (or drop) of its response body; on drop it
/// writes the access line and settles the counters, whatever way the request ended.
struct RequestGuard {
    shared: Rc<Shared>,
    conn: Rc<ConnState>,
    client: forwarded::Client,
    started: std::time::Instant,
    /// Only captured when the access log is on.
    request_line: String,
    referer: String,
    user_agent: String,
    /// 499 (nginx's "client closed request") until a response exists.
    status: u16,
    /// Index into [`crate::metrics::ROUTES`].
    route: usize,
    bytes: u64,
}

impl RequestGuard {
    fn begin(
        shared: Rc<Shared>,
        conn: Rc<ConnState>,
        client: forwarded::Client,
        request: &Request<Incoming>,
    ) -> RequestGuard {
        shared.slot.request_started();
        conn.in_flight.set(conn.in_flight.get() + 1);
        conn.requests.set(conn.requests.get() + 1);
        conn.request_started.notify_one();
        let (request_line, referer, user_agent) = if shared.access_log.is_on() {
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
            shared,
            conn,
            client,
            started: std::time::Instant::now(),
            request_line,
            referer,
            user_agent,
            status: 499,
            route: crate::metrics::route_of(request.uri().path()),
            bytes: 0,
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.shared.slot.request_finished();
        if self.shared.config.metrics {
            self.shared.slot.metrics.record_request(
                self.route,
                self.status,
                self.started.elapsed(),
            );
        }
        self.conn.in_flight.set(self.conn.in_flight.get() - 1);
        self.conn.last_done.set(Instant::now());
        if !self.shared.access_log.is_on() {
            return; // nothing below is needed, and the host string would be an allocation
        }
        self.shared.access_log.write(&Entry {
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

/// A response body that counts its bytes and finishes its request when it ends or is dropped.
struct LoggedBody {
    inner: Body,
    guard: Option<RequestGuard>,
}

impl HttpBody for LoggedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(guard)) = (frame.data_ref(), self.guard.as_mut()) {
                    guard.bytes += data.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                self.guard.take();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
