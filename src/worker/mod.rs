//! A worker process: one tokio `current_thread` runtime serving HTTP/1.1 on inherited listeners.
//!
//! Entered only from [`crate::master`]'s fork (the binary hands [`run`] to the master as its
//! worker entry point), after the child has shed the master's signal actions and foreign fds
//! and dropped privileges. Boot, in order: stamp the heartbeat; raise the open-files limit;
//! open the access log; build the runtime; take the listeners into it; load the app (clients
//! and stores are created here, after fork, never inherited); mark the slot `Ready`. A failure before `Ready` is written into the
//! slot and reported by exit code ([`EXIT_BOOT_ERROR`], [`EXIT_APP_LOAD_ERROR`]), so the master
//! can say why instead of respawning forever.
//!
//! # Threads
//!
//! A worker is one event-loop thread plus a fixed few for blocking work, whatever the number
//! of connections: the embedded store's own pool (`[store] threads`, see
//! [`crate::rag::store::pool`]) and tokio's blocking pool, capped at [`BLOCKING_THREADS`] for
//! the rest (parsing an upload, chunking a document, a name lookup); work beyond the cap waits
//! in line.

mod balance;
mod heartbeat;
pub mod io;
mod server;
mod trim;

use std::sync::Arc;

use nix::unistd::Pid;

use crate::config::Config;
use crate::http::access_log::AccessLog;
use crate::http::App;
use crate::scoreboard::{Scoreboard, Slot, SlotState};

/// The exit codes the master reads as boot failures: the worker could not set itself up
/// (runtime, listeners, logs: Gunicorn's 3), or the app could not be loaded (store, config of
/// the app: Gunicorn's 4). They are the master's protocol, so they are defined there.
pub use crate::scoreboard::{EXIT_APP_LOAD_ERROR, EXIT_BOOT_ERROR};
/// Most threads in tokio's blocking pool per worker (tokio's default is 512): CPU-bound work
/// off the event loop queues behind these instead of starting a thread per request.
pub const BLOCKING_THREADS: usize = 2;

/// What the master gives a freshly forked worker.
pub struct WorkerBoot {
    /// This worker's scoreboard slot; the mapping outlives the process.
    pub slot: &'static Slot,
    /// The whole scoreboard, for answering `/metrics` and `/status` for the pool.
    pub board: &'static Scoreboard,
    pub slot_index: usize,
    pub generation: u64,
    pub config: Arc<Config>,
    /// Listening fds, now owned by this worker.
    pub listen_fds: Vec<std::os::fd::RawFd>,
    pub master_pid: Pid,
}

/// Runs the worker to completion; returns its exit code.
pub fn run(boot: WorkerBoot) -> i32 {
    let slot = boot.slot;
    slot.stamp_heartbeat();
    let fail = |code: i32, message: String| {
        log::error!("worker failed to boot: {message}");
        slot.set_boot_error(&message);
        code
    };

    raise_open_files_limit();
    let access_log = match AccessLog::open(boot.config.accesslog.as_ref()) {
        Ok(log) => log,
        Err(e) => return fail(EXIT_BOOT_ERROR, e.to_string()),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_BOOT_ERROR, format!("cannot build the runtime: {e}")),
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let mut listeners = Vec::with_capacity(boot.listen_fds.len());
        for fd in &boot.listen_fds {
            match io::Listener::from_inherited_fd(*fd) {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    return fail(
                        EXIT_BOOT_ERROR,
                        format!("cannot use inherited listener fd {fd}: {e}"),
                    )
                }
            }
        }
        let app = match App::load(&boot.config, boot.board, slot).await {
            Ok(app) => app,
            Err(e) => return fail(EXIT_APP_LOAD_ERROR, e.to_string()),
        };
        let stop = match server::StopSignals::install() {
            Ok(stop) => stop,
            Err(e) => {
                return fail(
                    EXIT_BOOT_ERROR,
                    format!("cannot install signal handlers: {e}"),
                )
            }
        };
        tokio::task::spawn_local({
            let (rag, config) = (std::rc::Rc::clone(app.rag()), Arc::clone(&boot.config));
            async move { rag.ingest_docs_on_first_run(&config).await }
        });
        let shared =
            server::Shared::new(Arc::clone(&boot.config), slot, boot.board, app, access_log);
        tokio::task::spawn_local(heartbeat::run(
            slot,
            boot.config.timeout,
            boot.master_pid,
            shared.stopper(),
        ));
        slot.set_state(SlotState::Ready);
        log::debug!(
            "worker booted (slot {}, generation {})",
            boot.slot_index,
            boot.generation
        );
        server::serve(listeners, shared, stop).await;
        0
    })
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (nginx's `worker_rlimit_nofile`, what Go
/// does at start): a worker holds two descriptors per streaming conversation (the client and
/// the LLM), and distributions still default the soft limit to 1024.
fn raise_open_files_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log::warn!("cannot raise the open-files limit from {soft} to {hard}: {e}");
            }
        }
        Ok(_) => {}
        Err(e) => log::warn!("cannot read the open-files limit: {e}"),
    }
}
