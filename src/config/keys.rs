//! Every configuration key, declared once: its table, name, type, default, range and doc line.
//!
//! [`ALL`] is the one list that drives everything else: reading `workers.toml`
//! ([`super::sources`]), the `RAGPOOL_*` variables (named by [`Key::env_var`]), the type and
//! range checks ([`Kind::convert`]), `ragpool check`'s output and the key table of README.md
//! ([`reference_table`], pinned by a test). Adding a key is one line here plus the line that
//! puts its value into [`super::Config`]. This module only describes keys: it reads no file and
//! no environment.

use std::fmt::Write as _;

/// One configuration key.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Key {
    /// `""` for the top level, else the table (`"llm"` for `[llm]`).
    pub table: &'static str,
    pub name: &'static str,
    pub kind: Kind,
    /// One line for the README's key table.
    pub doc: &'static str,
}

/// A key's type, default and allowed range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// A whole number in `min..=max`.
    Int {
        default: i64,
        min: i64,
        max: i64,
    },
    /// Seconds, whole or fractional, in `min..=max`.
    Seconds {
        default: f64,
        min: f64,
        max: f64,
    },
    /// A number, whole or fractional, in `min..=max`.
    Float {
        default: f64,
        min: f64,
        max: f64,
    },
    Bool {
        default: bool,
    },
    /// Free text; a `secret` is masked by `ragpool check`.
    Text {
        default: &'static str,
        secret: bool,
    },
    /// One of `choices` (compared in lower case).
    Choice {
        default: &'static str,
        choices: &'static [&'static str],
    },
    /// A string or a list of strings; a string is split at commas (`"a, b"`).
    List {
        default: &'static [&'static str],
    },
    /// A whole number in `1..=max`, or `"auto"`.
    Workers {
        default: i64,
        max: i64,
    },
}

/// A checked value of a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    List(Vec<String>),
    /// `workers = "auto"`.
    Auto,
}

macro_rules! keys {
    ($( $id:ident : $table:literal $name:literal, $kind:expr, $doc:literal; )*) => {
        $( pub const $id: Key = Key { table: $table, name: $name, kind: $kind, doc: $doc }; )*
        /// Every key, in the order of `workers.toml` and `ragpool check`.
        pub const ALL: &[Key] = &[$($id),*];
    };
}

const fn int(default: i64, min: i64, max: i64) -> Kind {
    Kind::Int { default, min, max }
}
const fn secs(default: f64, min: f64, max: f64) -> Kind {
    Kind::Seconds { default, min, max }
}
const fn text(default: &'static str) -> Kind {
    Kind::Text {
        default,
        secret: false,
    }
}
const SECRET: Kind = Kind::Text {
    default: "",
    secret: true,
};
const PROVIDERS: &[&str] = &["none", "ollama", "openai"];
const HOUR: f64 = 3600.0;
const MIB: i64 = 1024 * 1024;

keys! {
    WORKERS: "" "workers", Kind::Workers { default: 1, max: super::MAX_WORKERS as i64 },
        "worker processes, or `\"auto\"`: the CPUs this process may use (affinity and cgroup quota)";
    BIND: "" "bind", Kind::List { default: &["127.0.0.1:8000"] },
        "`host:port`, `[v6]:port` (IPv6-only) or `unix:/path` (stale socket files are replaced, live ones refused)";
    BACKLOG: "" "backlog", int(2048, 1, 65_535), "`listen(2)` backlog (the kernel caps it at `net.core.somaxconn`)";
    TIMEOUT: "" "timeout", secs(30.0, 0.1, HOUR),
        "seconds a worker's event loop may be silent before SIGABRT, then SIGKILL";
    GRACEFUL_TIMEOUT: "" "graceful_timeout", secs(30.0, 0.0, HOUR),
        "seconds a stopping or retiring worker gets to finish in-flight requests";
    BOOT_TIMEOUT: "" "boot_timeout", secs(30.0, 0.1, HOUR),
        "seconds a reload's new generation may take until every worker serves; past it the reload is rolled back";
    KEEPALIVE: "" "keepalive", secs(5.0, 0.0, HOUR), "seconds an idle keep-alive connection stays open (0 = no keep-alive)";
    MAX_REQUESTS: "" "max_requests", int(0, 0, 1_000_000_000), "recycle a worker after this many requests; 0 = never";
    MAX_REQUESTS_JITTER: "" "max_requests_jitter", int(0, 0, 1_000_000_000),
        "plus up to this many more, at random per worker, so they do not all recycle at once";
    MAX_WORKER_MEMORY: "" "max_worker_memory", int(0, 0, MIB), "recycle a worker whose RSS exceeds this many MiB; 0 = never";
    WORKER_CONNECTIONS: "" "worker_connections", int(1000, 1, 1_000_000),
        "concurrent connections per worker; a full worker stops accepting (clients wait in the backlog or go to another worker), and on a shared listener each takes only its fair share";
    LIMIT_REQUEST_LINE: "" "limit_request_line", int(4094, 64, 65_536), "longest request line in bytes; beyond it `414`";
    LIMIT_REQUEST_FIELDS: "" "limit_request_fields", int(100, 1, 32_768), "most header fields; beyond it `431`";
    LIMIT_REQUEST_FIELD_SIZE: "" "limit_request_field_size", int(8190, 64, 65_536),
        "longest header field in bytes; beyond it `431`";
    MAX_BODY_SIZE: "" "max_body_size", int(16 * MIB, 0, 1024 * MIB), "largest request body in bytes; beyond it `413`";
    JSON_BODY_LIMIT: "" "json_body_limit", int(32 * 1024, 64, 1024 * MIB),
        "body of `/api/ask` and `/api/ask/stream` in bytes; beyond it `413`, cut while reading";
    HEADER_TIMEOUT: "" "header_timeout", secs(10.0, 0.1, HOUR), "seconds a client has to send a complete request head";
    BODY_TIMEOUT: "" "body_timeout", secs(30.0, 0.0, HOUR),
        "seconds a client has to send a complete request body after its head; else `408` (0 = no limit)";
    ACCESSLOG: "" "accesslog", text(""), "a path, `\"-\"` for standard output, `\"\"` for none; `USR1` reopens files";
    ERRORLOG: "" "errorlog", text("-"), "a path, or `\"-\"` for standard error; `USR1` reopens files";
    LOGLEVEL: "" "loglevel", Kind::Choice { default: "info", choices: &["error", "warn", "info", "debug", "trace", "off"] },
        "default log filter; `RUST_LOG` overrides it";
    PIDFILE: "" "pidfile", text(""), "the master's pid, written atomically; refused while a live master holds it";
    REUSE_PORT: "" "reuse_port", Kind::Bool { default: false }, "one `SO_REUSEPORT` socket per worker instead of one shared listener";
    UNIX_SOCKET_MODE: "" "unix_socket_mode", text("0660"), "permissions of the unix sockets ragpool creates (octal)";
    USER: "" "user", text(""), "workers switch to this user right after fork (the master keeps root to bind, reload, upgrade)";
    GROUP: "" "group", text(""), "and to this group (default: the user's own)";
    UMASK: "" "umask", text(""), "file-creation mask of the master and workers, e.g. `\"0027\"` (`\"\"` = inherit)";
    CHDIR: "" "chdir", text(""), "the master's working directory, set before anything relative is opened";
    FORWARDED_ALLOW_IPS: "" "forwarded_allow_ips", Kind::List { default: &["127.0.0.1", "::1"] },
        "peers whose `X-Forwarded-For`/`-Proto` are believed; `\"*\"` = all";
    ADMIN_TOKEN: "" "admin_token", SECRET, "bearer token for uploads/deletions and for `/metrics`, `/status` from elsewhere; `\"\"` disables uploads";
    OPENAI_API_KEY: "" "openai_api_key", SECRET,
        "bearer key clients of the OpenAI-compatible `/v1/chat/completions` and `/v1/models` must send; `\"\"`: open, like `/api/ask`";
    METRICS: "" "metrics", Kind::Bool { default: true }, "record request and RAG metrics in shared memory";

    STORE_BACKEND: "store" "backend", Kind::Choice { default: "embedded", choices: &["embedded", "qdrant"] },
        "`embedded`: SQLite under `path`; `qdrant`: a Qdrant server at `url`";
    STORE_PATH: "store" "path", text("data"), "data directory of the embedded store";
    STORE_URL: "store" "url", Kind::List { default: &[super::app::QDRANT_URL] },
        "Qdrant's gRPC URL, or a list of a cluster's nodes (tried in turn while one does not answer)";
    STORE_COLLECTION: "store" "collection", text("ragpool"), "Qdrant collection";
    STORE_API_KEY: "store" "api_key", SECRET, "Qdrant API key";
    STORE_DISTANCE: "store" "distance", Kind::Choice { default: "cosine", choices: &["cosine", "dot", "euclid"] },
        "vector distance";
    STORE_THREADS: "store" "threads", int(0, 0, 64),
        "embedded store: a worker's fixed threads, one SQLite connection each (queries beyond them wait in line); 0 = one per CPU, at most 2";
    STORE_SHARD_NUMBER: "store" "shard_number", int(0, 0, 1024),
        "shards of a Qdrant collection ragpool creates; 0 = Qdrant's default (one per node)";
    STORE_REPLICATION_FACTOR: "store" "replication_factor", int(1, 1, 64),
        "copies of each shard on a Qdrant cluster (2 survives the loss of a node)";
    STORE_WRITE_CONSISTENCY_FACTOR: "store" "write_consistency_factor", int(1, 1, 64),
        "copies that must apply a write before it succeeds (at most `replication_factor`)";

    EMBED_PROVIDER: "embed" "provider", Kind::Choice { default: "none", choices: PROVIDERS },
        "embedding API: `ollama` (`/api/embed`), `openai` (`/v1/embeddings`), or `none` (lexical retrieval only)";
    EMBED_URL: "embed" "url", Kind::List { default: &[super::app::OLLAMA_URL] },
        "base URL of the embedding server, or a list of servers with the same model (each call goes to the least busy one with a closed breaker, and moves on when one fails)";
    EMBED_MODEL: "embed" "model", text("nomic-embed-text"), "embedding model";
    EMBED_API_KEY: "embed" "api_key", SECRET, "bearer token for the embedding server";
    EMBED_DIMENSIONS: "embed" "dimensions", int(0, 0, 65_536),
        "vector size; 0 = take it from the first response; when set it is also asked of the server, which shortens the vectors if the model can";
    EMBED_TIMEOUT: "embed" "timeout", secs(30.0, 0.1, HOUR), "seconds per embedding request";
    EMBED_LANGUAGES: "embed" "languages", Kind::List { default: &[] },
        "question languages the embedding model is trusted for (`\"en\"`, `\"ru\"`): for others hybrid retrieval uses the lexical list alone; empty = every language";
    EMBED_KEEP_ALIVE: "embed" "keep_alive", text(super::app::KEEP_ALIVE),
        "how long Ollama keeps the model loaded after a request: `\"30m\"`, `\"1h\"`, seconds (`\"-1\"` = always); `\"\"` = Ollama's default (5 minutes)";

    LLM_PROVIDER: "llm" "provider", Kind::Choice { default: "ollama", choices: PROVIDERS },
        "generation API: `ollama` (`/api/chat`), `openai` (`/v1/chat/completions`), or `none` (extractive answers)";
    LLM_URL: "llm" "url", Kind::List { default: &[super::app::OLLAMA_URL] },
        "base URL of the LLM server, or a list of servers sharing this table's `provider`, `model` and `api_key` (ignored when `[[llm.backend]]` tables are given)";
    LLM_MODEL: "llm" "model", text("llama3.2"), "model name";
    LLM_API_KEY: "llm" "api_key", SECRET, "bearer token for the LLM server";
    LLM_TIMEOUT: "llm" "timeout", secs(120.0, 0.1, HOUR), "seconds for a whole answer";
    LLM_CONNECT_TIMEOUT: "llm" "connect_timeout", secs(2.0, 0.1, 300.0), "seconds to connect to the LLM server";
    LLM_FIRST_TOKEN_TIMEOUT: "llm" "first_token_timeout", secs(60.0, 0.1, HOUR),
        "seconds until the first token (a token of reasoning counts)";
    LLM_TEMPERATURE: "llm" "temperature", Kind::Float { default: 0.2, min: 0.0, max: 2.0 }, "sampling temperature";
    LLM_MAX_TOKENS: "llm" "max_tokens", int(512, 1, MIB),
        "the answer's token budget (reasoning counts against it); an answer that reaches it is marked as cut off";
    LLM_MAX_CONCURRENT: "llm" "max_concurrent", int(0, 0, 100_000),
        "pool-wide cap on answers generated at once (0 = none); the others wait in line and are told their place";
    LLM_THINK: "llm" "think", Kind::Bool { default: false },
        "thinking models may think (`false` sends `\"think\": false`); `true` shows their reasoning collapsed on the page";
    LLM_KEEP_ALIVE: "llm" "keep_alive", text(super::app::KEEP_ALIVE),
        "how long Ollama keeps the model loaded after a request (as `[embed] keep_alive`)";
    LLM_REPEAT_PENALTY: "llm" "repeat_penalty", Kind::Float { default: 1.1, min: 0.5, max: 2.0 },
        "penalty on repeating recent tokens, so a small model does not loop to `max_tokens` (Ollama's option; llama.cpp and vLLM take it on `/v1` too); 1.0 = off, not sent";
    LLM_FREQUENCY_PENALTY: "llm" "frequency_penalty", Kind::Float { default: 0.0, min: -2.0, max: 2.0 },
        "penalty growing with how often a token already appeared (both APIs); 0 = off, not sent";
    LLM_STOP: "llm" "stop", Kind::List { default: &[] },
        "strings that end the answer where they appear (both APIs' `stop`), e.g. a chat template's end marker";
    LLM_BREAKER_FAILURES: "llm" "breaker_failures", int(3, 1, 1000),
        "consecutive failures of one LLM backend that open its circuit breaker (no answers go to it)";
    LLM_BREAKER_COOLDOWN: "llm" "breaker_cooldown", secs(5.0, 0.1, HOUR),
        "seconds an open breaker waits before a health probe of the backend (success closes it, failure re-opens it)";
    LLM_BACKEND_URL: "llm.backend" "url", text(""), "`[[llm.backend]]`: base URL of one LLM server of a pool (required in each table)";
    LLM_BACKEND_PROVIDER: "llm.backend" "provider", Kind::Choice { default: "", choices: &["", "ollama", "openai"] },
        "its API; `\"\"` = `[llm] provider`";
    LLM_BACKEND_MODEL: "llm.backend" "model", text(""), "its model; `\"\"` = `[llm] model`";
    LLM_BACKEND_API_KEY: "llm.backend" "api_key", SECRET, "its bearer token; `\"\"` = `[llm] api_key`";
    LLM_BACKEND_MAX_CONCURRENT: "llm.backend" "max_concurrent", int(0, 0, 100_000),
        "answers it generates at once, pool-wide (its `OLLAMA_NUM_PARALLEL`); 0 = no cap of its own";

    RERANK_URL: "rerank" "url", text(""),
        "base URL of a reranker speaking `POST /v1/rerank` (llama.cpp's server with `--reranking`, vLLM, TEI, Infinity); `\"\"` = no reranking";
    RERANK_MODEL: "rerank" "model", text(""), "reranking model name sent with each request";
    RERANK_API_KEY: "rerank" "api_key", SECRET, "bearer token for the reranker";
    RERANK_CANDIDATES: "rerank" "candidates", int(20, 1, 200),
        "fused documents (their best passages) the reranker reorders; the top `top_k` of its order are kept";
    RERANK_TIMEOUT: "rerank" "timeout", secs(5.0, 0.1, HOUR),
        "seconds for one rerank request; past it, or on any failure, the fused order is kept";

    RAG_CHUNK_SIZE: "rag" "chunk_size", int(800, 100, 100_000), "chunks of about this many characters";
    RAG_CHUNK_OVERLAP: "rag" "chunk_overlap", int(100, 0, 50_000), "characters shared by neighbouring chunks (less than `chunk_size`)";
    RAG_TOP_K: "rag" "top_k", int(5, 1, super::app::MAX_TOP_K as i64), "passages given to the LLM (a request may ask for 1 to 50)";
    RAG_MAX_QUESTION_CHARS: "rag" "max_question_chars", int(2000, 10, 100_000), "longest question in characters";
    RAG_MAX_HISTORY_TURNS: "rag" "max_history_turns", int(20, 0, 1000),
        "most earlier turns (`history`) a question may carry; beyond it `413`";
    RAG_MAX_HISTORY_CHARS: "rag" "max_history_chars", int(16_000, 0, 1_000_000),
        "most characters of those turns together; beyond it `413`";
    RAG_REWRITE_TIMEOUT: "rag" "rewrite_timeout", secs(5.0, 0.1, 300.0),
        "seconds the LLM may take to rewrite a follow-up as a standalone question (past it: the follow-up plus the previous question's words)";
    RAG_DOCS_DIR: "rag" "docs_dir", text("docs"), "ingested once in a store's life, on its first start (deleting the documents does not bring them back)";
    RAG_INGEST_DOCS_ON_FIRST_RUN: "rag" "ingest_docs_on_first_run", Kind::Bool { default: true }, "whether to do that";
    RAG_EXTRACT_TIMEOUT: "rag" "extract_timeout", secs(60.0, 1.0, HOUR),
        "seconds one HTML/PDF parse may take in its sandboxed helper process; past it `422`";
    RAG_EXTRACT_CPU: "rag" "extract_cpu", secs(30.0, 1.0, HOUR), "CPU seconds of that parse (`RLIMIT_CPU`)";
    RAG_EXTRACT_MEMORY: "rag" "extract_memory", int(1024, 128, MIB), "address space of that parse in MiB (`RLIMIT_AS`)";
    RAG_EXTRACT_MAX_TEXT: "rag" "extract_max_text", int(16, 1, 1024), "largest text extracted from one document in MiB (any format); beyond it `422`";
}

/// The tables, in the order their keys are declared (arrays of tables such as `llm.backend`
/// are not among them: see [`ARRAYS`]).
pub fn tables() -> Vec<&'static str> {
    let mut tables: Vec<&'static str> = Vec::new();
    for key in ALL {
        if !key.table.is_empty() && !key.in_array() && !tables.contains(&key.table) {
            tables.push(key.table);
        }
    }
    tables
}

/// Arrays of tables, `(parent table, key)`: `[[llm.backend]]` is the key `backend` of `[llm]`,
/// and each of its tables takes the keys declared in table `"llm.backend"`. Their keys are
/// read from the file only (an array has no one environment variable per key).
pub const ARRAYS: &[(&str, &str)] = &[("llm", "backend")];

/// The key named `name` in `table` (`""` = top level).
pub fn find(table: &str, name: &str) -> Option<&'static Key> {
    ALL.iter().find(|k| k.table == table && k.name == name)
}

impl Key {
    /// `workers`, or `rag.top_k` inside a table: how errors and docs name the key.
    pub fn path(&self) -> String {
        if self.table.is_empty() {
            self.name.to_string()
        } else {
            format!("{}.{}", self.table, self.name)
        }
    }

    /// Whether the key belongs to an array of tables (`[[llm.backend]]`), set in the file only.
    pub fn in_array(&self) -> bool {
        self.table.contains('.')
    }

    /// `RAGPOOL_WORKERS`, or `RAGPOOL_RAG__TOP_K` inside a table.
    pub fn env_var(&self) -> String {
        let name = self.name.to_ascii_uppercase();
        if self.table.is_empty() {
            format!("RAGPOOL_{name}")
        } else {
            format!("RAGPOOL_{}__{name}", self.table.to_ascii_uppercase())
        }
    }

    pub fn is_secret(&self) -> bool {
        matches!(self.kind, Kind::Text { secret: true, .. })
    }
}

impl Kind {
    pub fn default_value(&self) -> Value {
        match *self {
            Kind::Int { default, .. } => Value::Int(default),
            Kind::Seconds { default, .. } | Kind::Float { default, .. } => Value::Float(default),
            Kind::Bool { default } => Value::Bool(default),
            Kind::Text { default, .. } | Kind::Choice { default, .. } => {
                Value::Text(default.to_string())
            }
            Kind::List { default } => Value::List(default.iter().map(|s| s.to_string()).collect()),
            Kind::Workers { default, .. } => Value::Int(default),
        }
    }

    /// What the key takes, with its range: "a whole number in 1..=65535".
    pub fn describe(&self) -> String {
        match self {
            Kind::Int { min, max, .. } => format!("a whole number in {min}..={max}"),
            Kind::Seconds { min, max, .. } => format!("seconds in {min}..={max}"),
            Kind::Float { min, max, .. } => format!("a number in {min}..={max}"),
            Kind::Bool { .. } => "true or false".to_string(),
            Kind::Text { .. } => "a string".to_string(),
            Kind::Choice { choices, .. } => format!("one of {}", quoted(choices)),
            Kind::List { .. } => "a string or a list of strings".to_string(),
            Kind::Workers { max, .. } => format!("a whole number in 1..={max}, or \"auto\""),
        }
    }

    /// Checks one TOML value against this kind: type first, then range. The message says
    /// what was expected, with the limits.
    pub fn convert(&self, value: &toml_edit::Value) -> Result<Value, String> {
        use toml_edit::Value as T;
        let found = || format!("expected {}, found {}", self.describe(), type_name(value));
        match (*self, value) {
            (Kind::Int { min, max, .. }, T::Integer(i)) => {
                let i = *i.value();
                in_range(i, min, max).map(|()| Value::Int(i))
            }
            (Kind::Seconds { min, max, .. } | Kind::Float { min, max, .. }, T::Integer(i)) => {
                let f = *i.value() as f64;
                in_range(f, min, max).map(|()| Value::Float(f))
            }
            (Kind::Seconds { min, max, .. } | Kind::Float { min, max, .. }, T::Float(f)) => {
                let f = *f.value();
                if !f.is_finite() {
                    return Err(format!("{f} is not a number in {min}..={max}"));
                }
                in_range(f, min, max).map(|()| Value::Float(f))
            }
            (Kind::Bool { .. }, T::Boolean(b)) => Ok(Value::Bool(*b.value())),
            (Kind::Text { .. }, T::String(s)) => Ok(Value::Text(s.value().clone())),
            (Kind::Choice { choices, .. }, T::String(s)) => {
                let lower = s.value().trim().to_ascii_lowercase();
                if choices.contains(&lower.as_str()) {
                    Ok(Value::Text(lower))
                } else {
                    Err(format!(
                        "\"{}\" is not one of {}",
                        s.value(),
                        quoted(choices)
                    ))
                }
            }
            (Kind::List { .. }, T::String(s)) => Ok(Value::List(split_list(s.value()))),
            (Kind::List { .. }, T::Array(items)) => items
                .iter()
                .map(|item| match item {
                    T::String(s) => Ok(s.value().trim().to_string()),
                    other => Err(format!(
                        "expected a list of strings, found {} in it",
                        type_name(other)
                    )),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Value::List),
            (Kind::Workers { max, .. }, T::Integer(i)) => {
                let i = *i.value();
                in_range(i, 1, max).map(|()| Value::Int(i))
            }
            (Kind::Workers { .. }, T::String(s)) if s.value().eq_ignore_ascii_case("auto") => {
                Ok(Value::Auto)
            }
            (Kind::Workers { .. }, T::String(s)) => Err(format!(
                "\"{}\" is neither a number nor \"auto\"",
                s.value()
            )),
            _ => Err(found()),
        }
    }

    /// Checks a value given as text (an environment variable or a flag): as a TOML value
    /// first, so `RAGPOOL_REUSE_PORT=true` is a boolean, else as a plain string.
    pub fn convert_text(&self, text: &str) -> Result<Value, String> {
        let text = text.trim();
        let as_string = || self.convert(&toml_edit::Value::from(text));
        match text.parse::<toml_edit::Value>() {
            Ok(value) => self.convert(&value).or_else(|e| as_string().map_err(|_| e)),
            Err(_) => as_string(),
        }
    }
}

fn in_range<N: PartialOrd + std::fmt::Display>(n: N, min: N, max: N) -> Result<(), String> {
    if n < min || n > max {
        Err(format!("{n} is out of range {min}..={max}"))
    } else {
        Ok(())
    }
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn quoted(choices: &[&str]) -> String {
    choices
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn type_name(value: &toml_edit::Value) -> &'static str {
    use toml_edit::Value as T;
    match value {
        T::String(_) => "a string",
        T::Integer(_) => "a whole number",
        T::Float(_) => "a fractional number",
        T::Boolean(_) => "a boolean",
        T::Datetime(_) => "a date",
        T::Array(_) => "a list",
        T::InlineTable(_) => "a table",
    }
}

/// A value as it is written in TOML (strings quoted and escaped).
pub fn to_toml(value: &Value) -> String {
    let string = |s: &str| toml::Value::String(s.to_string()).to_string();
    match value {
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Text(s) => string(s),
        Value::List(items) => {
            let items: Vec<String> = items.iter().map(|s| string(s)).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Auto => string("auto"),
    }
}

/// The key table of README.md, generated from [`ALL`]; a test fails when the README differs.
pub fn reference_table() -> String {
    let mut out =
        String::from("| key | takes | default | environment | meaning |\n|---|---|---|---|---|\n");
    for key in ALL {
        let default = to_toml(&key.kind.default_value()).replace('|', "\\|");
        let env = match key.in_array() {
            true => "(file only)".to_string(),
            false => format!("`{}`", key.env_var()),
        };
        let _ = writeln!(
            out,
            "| `{}` | {} | `{}` | {env} | {} |",
            key.path(),
            key.kind.describe().replace('|', "\\|"),
            default,
            key.doc
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_defaults_in_range() {
        for (i, key) in ALL.iter().enumerate() {
            assert!(
                !ALL[..i].iter().any(|k| k.path() == key.path()),
                "{} declared twice",
                key.path()
            );
            let default = key.kind.default_value();
            let written = to_toml(&default);
            let parsed = written.parse::<toml_edit::Value>().unwrap();
            assert_eq!(
                key.kind.convert(&parsed),
                Ok(default),
                "{}: default {written} fails its own check",
                key.path()
            );
        }
    }

    #[test]
    fn limits_are_in_the_message() {
        let value = |s: &str| s.parse::<toml_edit::Value>().unwrap();
        assert_eq!(
            BACKLOG.kind.convert(&value("2147483647")),
            Err("2147483647 is out of range 1..=65535".to_string())
        );
        assert_eq!(
            HEADER_TIMEOUT.kind.convert(&value("0")),
            Err("0 is out of range 0.1..=3600".to_string())
        );
        assert_eq!(
            WORKER_CONNECTIONS.kind.convert(&value("1e12")),
            Err("expected a whole number in 1..=1000000, found a fractional number".to_string())
        );
        assert_eq!(
            TIMEOUT.kind.convert(&value("nan")),
            Err("NaN is not a number in 0.1..=3600".to_string())
        );
    }

    #[test]
    fn text_values_read_as_toml_first_then_as_a_string() {
        assert_eq!(REUSE_PORT.kind.convert_text("true"), Ok(Value::Bool(true)));
        assert_eq!(
            BIND.kind.convert_text("127.0.0.1:1, unix:/x"),
            Ok(Value::List(vec!["127.0.0.1:1".into(), "unix:/x".into()]))
        );
        assert_eq!(
            LLM_MODEL.kind.convert_text("qwen2.5"),
            Ok(Value::Text("qwen2.5".into()))
        );
        assert_eq!(WORKERS.kind.convert_text("AUTO"), Ok(Value::Auto));
        assert!(TIMEOUT.kind.convert_text("never").is_err());
        assert_eq!(
            LOGLEVEL.kind.convert_text("Debug"),
            Ok(Value::Text("debug".into()))
        );
    }

    const BEGIN: &str = "<!-- keys: generated from src/config/keys.rs -->\n";
    const END: &str = "<!-- /keys -->";

    /// The README's key table is [`reference_table`]; `RAGPOOL_BLESS=1 cargo test --lib
    /// config::keys` rewrites it after a key is added or changed.
    #[test]
    fn readme_key_table_matches_the_declarations() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");
        let readme = std::fs::read_to_string(path).unwrap();
        let start = readme.find(BEGIN).expect("README.md has the keys marker") + BEGIN.len();
        let end = start
            + readme[start..]
                .find(END)
                .expect("README.md has the end marker");
        let want = reference_table();
        if readme[start..end] != want && std::env::var_os("RAGPOOL_BLESS").is_some() {
            std::fs::write(
                path,
                format!("{}{want}{}", &readme[..start], &readme[end..]),
            )
            .unwrap();
            return;
        }
        assert!(
            readme[start..end] == want,
            "README.md's key table differs from src/config/keys.rs; \
             run `RAGPOOL_BLESS=1 cargo test --lib config::keys` to regenerate it:\n{want}"
        );
    }

    /// The shipped workers.toml sets every key, in its table, to its default, or says
    /// `(default: X)` with the declared default in the comment just above it.
    #[test]
    fn workers_toml_documents_every_key_with_its_default() {
        let text = include_str!("../../workers.toml");
        let doc = toml_edit::ImDocument::parse(text).unwrap();
        for key in ALL {
            if key.in_array() {
                // Arrays of tables are shown as a commented example (a pool is optional).
                let header = format!("# [[{}]]", key.table);
                let example = &text[text.find(&header).expect("an [[llm.backend]] example")..];
                assert!(
                    example.contains(&format!("# {} = ", key.name)),
                    "workers.toml's {header} example does not show `{}`",
                    key.name
                );
                continue;
            }
            let table = if key.table.is_empty() {
                Some(doc.as_table() as &dyn toml_edit::TableLike)
            } else {
                doc.get(key.table).and_then(toml_edit::Item::as_table_like)
            };
            let Some((k, item)) = table.and_then(|t| t.get_key_value(key.name)) else {
                panic!("workers.toml does not show `{}`", key.path());
            };
            let value = key.kind.convert(item.as_value().unwrap()).unwrap();
            let default = key.kind.default_value();
            if value == default {
                continue;
            }
            let line = text[..k.span().unwrap().start].matches('\n').count();
            let comment: Vec<&str> = text
                .lines()
                .take(line)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .take_while(|l| l.starts_with('#'))
                .collect();
            let note = format!("(default: {})", to_toml(&default));
            assert!(
                comment.iter().any(|l| l.contains(&note)),
                "workers.toml sets `{}` to {} without saying {note} just above it",
                key.path(),
                to_toml(&value)
            );
        }
    }

    /// The operator's manual (docs/en, docs/ru: ingested, so the app answers from it) has a
    /// row for every top-level key with its declared default, and no row for a key that is
    /// not declared.
    #[test]
    fn the_manual_lists_every_top_level_key_with_its_default() {
        for path in ["docs/en/configuration.md", "docs/ru/configuration.md"] {
            let text =
                std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
            let mut listed = Vec::new();
            for row in text.lines().filter(|l| l.starts_with("| `")) {
                let cells: Vec<&str> = row.split('|').map(str::trim).collect();
                let names: Vec<&str> = cells[1].split('`').skip(1).step_by(2).collect();
                // One default for all the row's keys, or one each ("0, 0", "100 / 8190").
                let defaults: Vec<&str> = match names.len() {
                    1 => vec![cells[2]],
                    _ => cells[2].split([',', '/']).map(str::trim).collect(),
                };
                for (i, name) in names.iter().enumerate() {
                    let Some(key) = find("", name) else {
                        panic!("{path} lists `{name}`, which src/config/keys.rs does not declare");
                    };
                    let shown = defaults
                        .get(i)
                        .or(defaults.first())
                        .unwrap_or(&"")
                        .trim_matches('`');
                    let want = to_toml(&key.kind.default_value());
                    let none = ["none", "off", "нет", "выключен"];
                    assert!(
                        shown == want || (want == "\"\"" && none.contains(&shown)),
                        "{path} says `{name}` defaults to {shown}, src/config/keys.rs to {want}"
                    );
                    listed.push(*name);
                }
            }
            for key in ALL.iter().filter(|k| k.table.is_empty()) {
                assert!(
                    listed.contains(&key.name),
                    "{path} has no row for `{}` (declared in src/config/keys.rs)",
                    key.name
                );
            }
        }
    }
}
