//! One integration-test binary (link once): the real `ragpool` binary, real signals, real HTTP.

mod support;

mod browser;
mod cli;
mod conversation;
mod hostile_docs;
mod hostile_http;
mod lifecycle;
mod limits;
mod llm;
mod llm_pool;
mod metrics;
mod nginx;
mod ops;
mod qdrant;
mod rag;
mod reload;
mod scale;
mod supervision;
mod systemd;
mod systemd_real;
mod upgrade;

/// A workers.toml for tests: loopback, kernel-chosen port, the given extra lines.
pub fn config(workers: usize, extra: &str) -> String {
    let accesslog = if extra.contains("accesslog") {
        ""
    } else {
        "accesslog = \"\"\n"
    };
    format!("workers = {workers}\nbind = [\"127.0.0.1:0\"]\n{accesslog}{extra}\n")
}
