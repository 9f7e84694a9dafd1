//! ragpool: a pre-forked process pool server in the mould of Gunicorn, whose single-threaded
//! async workers serve a retrieval-augmented question-answering app.
//!
//! # Layout
//!
//! - [`config`]: `workers.toml` + `RAGPOOL_*` + flags -> a validated [`config::Config`].
//! - [`master`]: the arbiter. Binds, forks (the only worker `fork` is in `master::spawn`),
//!   supervises, handles signals. Every decision is made by the pure `master::pool` core; the
//!   rest is its effectful shell. Single-threaded; never imports `worker`, `http` or `rag` (the
//!   binary hands it the worker's entry point), so it never touches tokio, hyper or the app.
//! - [`scoreboard`]: shared memory between master and workers: heartbeats and counters.
//! - [`worker`]: one tokio `current_thread` runtime per process serving HTTP/1.1 with hyper,
//!   graceful drain, heartbeat.
//! - [`http`]: the boundary between pool and app: limits, routing, the access log, and the one
//!   place errors become status codes.
//! - [`logging`]: the error log (`log` + `env_logger`), reopenable on `SIGUSR1`.
//! - [`rag`]: the app: ingest, stores, LLM clients, retrieval and answers.
//! - [`metrics`], [`status`]: the counters' layout and the `ragpool status` client.
//!
//! # Layering
//!
//! The binary uses `master` and `worker` and hands the second to the first; below them:
//!
//! ```text
//! bin ──> master ──> config, logging, metrics, scoreboard
//!  └───> worker ──> http ──> rag ──> config
//!                    └─────> config, logging, metrics, scoreboard
//! scoreboard ──> metrics;  logging, status ──> config
//! ```
//!
//! No other `crate::` edge exists: a test (`layering`) reads every source file and fails on one.

pub mod config;
pub mod http;
pub mod logging;
pub mod master;
pub mod metrics;
pub mod rag;
pub mod scoreboard;
pub mod status;
pub mod worker;

#[cfg(test)]
mod layering;
