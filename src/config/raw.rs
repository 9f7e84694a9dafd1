//! The raw, unvalidated shape of `workers.toml` as serde sees it.
//!
//! Every field is optional so that the file, the `RAGPOOL_*` environment and the command line can
//! each supply a part; [`super::validate`] turns the merged result into a [`super::Config`].
//! Unknown keys are rejected here (`deny_unknown_fields`), which is how a typo gets reported
//! with its line instead of being silently ignored as Gunicorn does.

use serde::Deserialize;

/// `workers = 4` or `workers = "auto"`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RawWorkers {
    Count(i64),
    Word(String),
}

/// A duration in seconds, written as an integer or a float.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RawSeconds {
    Int(i64),
    Float(f64),
}

impl RawSeconds {
    pub fn as_f64(self) -> f64 {
        match self {
            RawSeconds::Int(i) => i as f64,
            RawSeconds::Float(f) => f,
        }
    }
}

/// `bind = "127.0.0.1:8000"` or `bind = ["127.0.0.1:8000", "unix:/run/ragpool.sock"]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RawBind {
    One(String),
    Many(Vec<String>),
}

impl RawBind {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            RawBind::One(s) => vec![s],
            RawBind::Many(v) => v,
        }
    }
}

/// The top level of `workers.toml`. Names follow Gunicorn's settings where one exists.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub workers: Option<RawWorkers>,
    pub bind: Option<RawBind>,
    pub backlog: Option<i64>,
    pub timeout: Option<RawSeconds>,
    pub graceful_timeout: Option<RawSeconds>,
    pub keepalive: Option<RawSeconds>,
    pub max_requests: Option<i64>,
    pub max_requests_jitter: Option<i64>,
    pub max_worker_memory: Option<i64>,
    pub worker_connections: Option<i64>,
    pub limit_request_line: Option<i64>,
    pub limit_request_fields: Option<i64>,
    pub limit_request_field_size: Option<i64>,
    pub max_body_size: Option<i64>,
    pub json_body_limit: Option<i64>,
    pub header_timeout: Option<RawSeconds>,
    pub body_timeout: Option<RawSeconds>,
    pub accesslog: Option<String>,
    pub errorlog: Option<String>,
    pub loglevel: Option<String>,
    pub pidfile: Option<String>,
    pub reuse_port: Option<bool>,
    pub unix_socket_mode: Option<String>,
    pub admin_token: Option<String>,
    pub metrics: Option<bool>,
    pub user: Option<String>,
    pub group: Option<String>,
    pub umask: Option<String>,
    pub chdir: Option<String>,
    pub forwarded_allow_ips: Option<RawBind>,
    pub store: Option<RawStore>,
    pub embed: Option<RawEmbed>,
    pub llm: Option<RawLlm>,
    pub rag: Option<RawRag>,
}

/// `[store]`: where documents and chunks live.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub backend: Option<String>,
    pub path: Option<String>,
    pub url: Option<String>,
    pub collection: Option<String>,
    pub api_key: Option<String>,
    pub distance: Option<String>,
}

/// `[embed]`: the embedding model, if any.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEmbed {
    pub provider: Option<String>,
    pub url: Option<String>,
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub dimensions: Option<i64>,
    pub timeout: Option<RawSeconds>,
}

/// `[llm]`: the generator, if any.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLlm {
    pub provider: Option<String>,
    pub url: Option<String>,
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub timeout: Option<RawSeconds>,
    pub connect_timeout: Option<RawSeconds>,
    pub first_token_timeout: Option<RawSeconds>,
    pub temperature: Option<f64>,
    pub max_tokens: Option<i64>,
    pub max_concurrent: Option<i64>,
}

/// `[rag]`: chunking, retrieval and question limits.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRag {
    pub chunk_size: Option<i64>,
    pub chunk_overlap: Option<i64>,
    pub top_k: Option<i64>,
    pub max_question_chars: Option<i64>,
    pub docs_dir: Option<String>,
    pub ingest_docs_on_first_run: Option<bool>,
}

/// Every top-level key, in the order `ragpool check` prints them. Used to read the matching
/// `RAGPOOL_<KEY>` environment variables and to suggest a spelling for a typo.
pub const KEYS: &[&str] = &[
    "workers",
    "bind",
    "backlog",
    "timeout",
    "graceful_timeout",
    "keepalive",
    "max_requests",
    "max_requests_jitter",
    "max_worker_memory",
    "worker_connections",
    "limit_request_line",
    "limit_request_fields",
    "limit_request_field_size",
    "max_body_size",
    "json_body_limit",
    "header_timeout",
    "body_timeout",
    "accesslog",
    "errorlog",
    "loglevel",
    "pidfile",
    "reuse_port",
    "unix_socket_mode",
    "admin_token",
    "metrics",
    "user",
    "group",
    "umask",
    "chdir",
    "forwarded_allow_ips",
];

/// The tables of `workers.toml`; their keys are set in the file (or `RAGPOOL_<TABLE>__<KEY>`).
pub const TABLES: &[&str] = &["store", "embed", "llm", "rag"];
