//! The worker's server: accept loops, one task per connection, graceful drain. What happens
//! to a request once hyper parsed its head is [`crate::http::service`]'s; this module only owns
//! sockets: accepting, keep-alive idleness, closing and draining.
//!
//! Backpressure is explicit: a worker holding `worker_connections` connections stops
//! accepting until one closes; the next clients wait in the kernel's backlog (or are taken by
//! another worker) instead of being accepted and held. On a shared listener a worker also
//! stops while it holds more than its fair share of the pool's connections
//! ([`super::balance`]), so a burst spreads over the workers instead of landing on whichever
//! woke first. (Only connections still queued when a drain starts can exceed the limit; they
//! get a fast `503` with `Retry-After`.)
//!
//! Drain (SIGTERM/SIGQUIT, or the master vanished): each accept loop stops waiting, accepts what
//! the kernel already queued (so those clients are served, not reset), and drops its listener;
//! every connection finishes its request in flight and closes, idle keep-alive connections close
//! at once; the worker exits when the last connection is gone or `graceful_timeout` passes.
//! SIGINT exits at once.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::io::{Listener, Peer, Stream};
use crate::config::Config;
use crate::http::access_log::AccessLog;
use crate::http::service::{self, Conn, Server};
use crate::http::{limits, App};
use crate::scoreboard::{Scoreboard, Slot, SlotState};

/// Pause after a failed `accept` (e.g. EMFILE) before trying again; never fatal.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// While above its fair share, a worker looks at the pool again this often (the others'
/// counts change without telling it); its own closes wake it at once.
const FAIR_SHARE_RECHECK: Duration = Duration::from_millis(5);

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
    /// The request path, shared by every connection.
    server: Rc<Server>,
    /// The pool's slots: the other workers' connection counts, for the fair share.
    board: &'static Scoreboard,
    /// Whether the workers share listening sockets (not `reuse_port`): then the fair share
    /// applies; with `reuse_port` the kernel spreads connections over per-worker sockets.
    shared_listener: bool,
    /// How old a peer's heartbeat may be for it to count as accepting.
    stale_ms: u64,
    /// hyper's connection settings, built once from the config.
    http: http1::Builder,
    /// Connections open now: for `worker_connections` and to know when a drain is done.
    open: Cell<usize>,
    /// Woken when the last connection closes.
    all_closed: Notify,
    /// Woken whenever a connection closes (an accept loop waiting for room).
    closed: Notify,
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
        board: &'static Scoreboard,
        app: App,
        access_log: AccessLog,
    ) -> Rc<Shared> {
        // Three missed beats: the peer is not running its event loop, so not accepting either.
        let stale_ms = 3 * super::heartbeat::period(config.timeout).as_millis() as u64;
        Rc::new(Shared {
            http: limits::http1_builder(&config),
            server: Rc::new(Server::new(Arc::clone(&config), slot, app, access_log)),
            shared_listener: !config.reuse_port,
            stale_ms,
            config,
            slot,
            board,
            open: Cell::new(0),
            all_closed: Notify::new(),
            closed: Notify::new(),
            stop: watch::channel(false).0,
        })
    }

    pub fn stopper(self: &Rc<Self>) -> Stopper {
        Stopper(Rc::clone(self))
    }

    /// Returns once this worker may take another connection: below `worker_connections`, and
    /// on a shared listener within its fair share of the pool's connections.
    async fn room_to_accept(&self) {
        loop {
            // Created before the check: a close between the check and the await still wakes us.
            let closed = self.closed.notified();
            let open = self.open.get();
            if open >= self.config.worker_connections {
                closed.await;
                continue;
            }
            if !self.shared_listener
                || super::balance::may_accept(self.board, self.slot, open as u64, self.stale_ms)
            {
                return;
            }
            tokio::select! {
                _ = closed => {}
                _ = tokio::time::sleep(FAIR_SHARE_RECHECK) => {}
            }
        }
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
    shared.server.start_draining();
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
    if let Err(e) = shared.server.access_log().reopen() {
        log::error!("{e}");
    }
    if let Err(e) = crate::logging::reopen_error_log() {
        log::error!("cannot reopen the error log: {e}");
    }
}

async fn accept_loop(listener: Listener, shared: Rc<Shared>) {
    let mut stop = shared.stop.subscribe();
    while !*stop.borrow_and_update() {
        // Not polling the listener leaves new connections in the backlog for the other workers.
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            () = shared.room_to_accept() => {}
        }
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
    let state = Conn::new();
    let peer_ip = match peer {
        Peer::Ip(addr) => Some(addr.ip()),
        Peer::Unix => None,
    };
    let service = service::service(
        Rc::clone(&shared.server),
        Rc::clone(&state),
        peer_ip,
        overloaded,
    );
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
        let idle_deadline = if state.in_flight() > 0 || state.requests() == 0 {
            Instant::now() + keepalive
        } else {
            state.last_done() + keepalive
        };
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    log::debug!("connection from {}: {e}", peer.host());
                }
                break;
            }
            _ = stop.changed(), if !shutting_down && close_after.is_none() => {
                if state.in_flight() > 0 {
                    // Finish the request in flight (its response says Connection: close), then close.
                    conn.as_mut().graceful_shutdown();
                    shutting_down = true;
                } else {
                    // Idle (or not a request read yet): closing now would race a client — nginx's
                    // upstream pool above all — that is sending its next request on this very
                    // connection, and a POST is not retried. Serve that request with
                    // Connection: close instead; if none comes, the keep-alive timer (or the
                    // header timeout) closes the connection.
                    close_after = Some(state.requests());
                }
            }
            _ = state.request_started.notified(), if close_after.is_some() && !shutting_down => {
                if close_after.is_some_and(|seen| state.requests() > seen) {
                    conn.as_mut().graceful_shutdown();
                    shutting_down = true;
                }
            }
            _ = tokio::time::sleep_until(idle_deadline), if !shutting_down => {
                let idle = state.in_flight() == 0 && state.requests() > 0;
                if idle && state.last_done().elapsed() >= keepalive {
                    conn.as_mut().graceful_shutdown();
                    shutting_down = true;
                }
            }
        }
    }
    shared.slot.connection_closed();
    shared.open.set(shared.open.get() - 1);
    shared.closed.notify_waiters();
    if shared.open.get() == 0 {
        shared.all_closed.notify_waiters();
    }
}
