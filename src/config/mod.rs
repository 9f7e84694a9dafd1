//! Configuration: `workers.toml`, `RAGPOOL_*` environment variables and command-line flags,
//! merged in that order of precedence over built-in defaults, then validated.
//!
//! [`raw::RawConfig`] is what serde reads; [`Config`] is what the rest of ragpool uses, with
//! every value checked and every duration a [`Duration`]. Nothing here touches processes or
//! sockets, so the master can re-run [`load`] on `SIGHUP` and throw the result away if it fails.

pub mod app;
mod bind;
mod error;
pub mod process;
pub mod raw;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use app::{
    Distance, EmbedConfig, LlmConfig, Provider, RagConfig, StoreBackend, StoreConfig, MAX_TOP_K,
};
pub use bind::BindAddr;
pub use error::{ConfigError, Origin};
use raw::{RawBind, RawConfig, RawSeconds, RawWorkers, KEYS};

/// The file read when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "workers.toml";
/// Upper bound on `workers`: the scoreboard holds two full generations during a reload.
pub const MAX_WORKERS: usize = 256;

/// Built-in defaults, after Gunicorn's where it has the same setting.
pub mod defaults {
    pub const BIND: &str = "127.0.0.1:8000";
    pub const WORKERS: usize = 1;
    pub const BACKLOG: i32 = 2048;
    pub const TIMEOUT_SECS: f64 = 30.0;
    pub const GRACEFUL_TIMEOUT_SECS: f64 = 30.0;
    pub const KEEPALIVE_SECS: f64 = 5.0;
    pub const WORKER_CONNECTIONS: usize = 1000;
    pub const LIMIT_REQUEST_LINE: usize = 4094;
    pub const LIMIT_REQUEST_FIELDS: usize = 100;
    pub const LIMIT_REQUEST_FIELD_SIZE: usize = 8190;
    pub const MAX_BODY_SIZE: u64 = 16 * 1024 * 1024;
    pub const HEADER_TIMEOUT_SECS: f64 = 10.0;
    /// The body of a JSON question (`/api/ask`): a 2,000-character question is under 12 KiB
    /// even with every character escaped.
    pub const JSON_BODY_LIMIT: u64 = 32 * 1024;
    pub const BODY_TIMEOUT_SECS: f64 = 30.0;
    pub const LOGLEVEL: &str = "info";
    pub const UNIX_SOCKET_MODE: u32 = 0o660;
}

/// Where a log goes: standard output/error (`-`) or a file that `SIGUSR1` reopens.
#[derive(Debug, Clone, PartialEq)]
pub enum LogTarget {
    Std,
    File(PathBuf),
}

impl LogTarget {
    fn parse(s: &str) -> LogTarget {
        if s == "-" {
            LogTarget::Std
        } else {
            LogTarget::File(PathBuf::from(s))
        }
    }
}

/// Limits on one HTTP request; exceeding one is answered with its 4xx, never a reset.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestLimits {
    /// Longest request line (method, target, version) in bytes; beyond it, 414.
    pub line: usize,
    /// Most header fields; beyond it, 431.
    pub fields: usize,
    /// Longest single header field (`name: value`) in bytes; beyond it, 431.
    pub field_size: usize,
    /// Largest request body in bytes; beyond it, 413.
    pub body: u64,
    /// Largest body of the JSON question endpoints (`/api/ask`, `/api/ask/stream`), at most
    /// `body`; beyond it, 413 while reading, so a huge body is never buffered.
    pub json_body: u64,
}

/// The validated configuration of one generation of workers.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file this was read from, if one was.
    pub path: Option<PathBuf>,
    /// How many workers a generation has.
    pub workers: usize,
    /// Whether `workers` was `"auto"` (shown by `ragpool check`).
    pub workers_auto: bool,
    /// Addresses to listen on, in the order given.
    pub bind: Vec<BindAddr>,
    /// `listen(2)` backlog.
    pub backlog: i32,
    /// A worker whose event loop is silent longer than this is killed.
    pub timeout: Duration,
    /// How long a stopping or retiring worker may take to finish in-flight requests.
    pub graceful_timeout: Duration,
    /// How long an idle keep-alive connection is kept open.
    pub keepalive: Duration,
    /// Recycle a worker after this many requests (0 = never).
    pub max_requests: u64,
    /// Up to this many extra requests, chosen at random per worker, so they don't recycle at once.
    pub max_requests_jitter: u64,
    /// Recycle a worker whose resident memory exceeds this many MiB (0 = never).
    pub max_worker_memory_mib: u64,
    /// Most concurrent connections per worker; beyond it, a fast 503.
    pub worker_connections: usize,
    pub limits: RequestLimits,
    /// A client must send a complete request head within this time.
    pub header_timeout: Duration,
    /// A client must send a complete request body within this time after its head; else 408.
    pub body_timeout: Duration,
    /// Access log (`None` = off, as Gunicorn's default).
    pub accesslog: Option<LogTarget>,
    /// Error log: the master's and workers' `log` output.
    pub errorlog: LogTarget,
    /// Default log filter when `RUST_LOG` is not set.
    pub loglevel: String,
    pub pidfile: Option<PathBuf>,
    /// One `SO_REUSEPORT` socket per worker instead of one shared listener.
    pub reuse_port: bool,
    /// Permissions of unix sockets ragpool creates.
    pub unix_socket_mode: u32,
    /// Bearer token for write endpoints (and later metrics); `None` disables them.
    pub admin_token: Option<String>,
    /// Record per-request and RAG metrics into the shared scoreboard (`/metrics`).
    pub metrics: bool,
    /// Workers switch to this user (and group) right after fork.
    pub run_as: Option<process::RunAs>,
    /// Applied by the master at start (files and sockets it and the workers create).
    pub umask: Option<u32>,
    /// The master's working directory, set before anything relative is opened.
    pub chdir: Option<PathBuf>,
    /// Peers whose `X-Forwarded-For`/`-Proto` are believed (Gunicorn's `forwarded_allow_ips`).
    pub forwarded_allow_ips: process::TrustedProxies,
    pub store: StoreConfig,
    pub embed: EmbedConfig,
    pub llm: LlmConfig,
    pub rag: RagConfig,
}

impl Default for Config {
    fn default() -> Self {
        let empty = Loader::new(None, String::new());
        // Defaults are valid by construction; a test pins that.
        validate(RawConfig::default(), &empty).expect("built-in defaults are valid")
    }
}

/// What `ragpool serve` was asked for on the command line; kept so a reload re-applies it.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub workers: Option<String>,
    pub bind: Vec<String>,
}

/// Everything needed to (re)load the configuration.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// `false` when the path is the implicit default, which may be absent.
    pub explicit: bool,
    pub overrides: Overrides,
}

impl ConfigSource {
    pub fn new(path: Option<PathBuf>, overrides: Overrides) -> ConfigSource {
        ConfigSource {
            explicit: path.is_some(),
            // Absolute, so a reload after `chdir` still finds the same file.
            path: {
                let path = path.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
                std::path::absolute(&path).unwrap_or(path)
            },
            overrides,
        }
    }
}

/// Reads and validates the configuration from the file, the process environment and the flags.
pub fn load(source: &ConfigSource) -> Result<Config, ConfigError> {
    load_with_env(source, |name| std::env::var(name).ok())
}

/// [`load`] with the environment supplied by the caller (tests pass their own).
pub fn load_with_env(
    source: &ConfigSource,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let (path, doc) = match std::fs::read_to_string(&source.path) {
        Ok(doc) => (Some(source.path.clone()), doc),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !source.explicit => {
            (None, String::new())
        }
        Err(e) => {
            return Err(ConfigError::Read {
                path: source.path.clone(),
                source: e,
            })
        }
    };
    let mut loader = Loader::new(path, doc);
    let mut merged = loader.parse_file()?;

    for key in KEYS {
        let var = format!("RAGPOOL_{}", key.to_ascii_uppercase());
        if let Some(value) = env(&var) {
            let layer = parse_override(key, &value, Origin::Env(var.clone()))?;
            overlay(&mut merged, layer);
            loader.origins.insert(key, Origin::Env(var));
        }
    }
    overlay_table_env(&mut merged, &mut loader, &env)?;
    if let Some(workers) = &source.overrides.workers {
        let origin = Origin::Flag("--workers".into());
        overlay(
            &mut merged,
            parse_override("workers", workers, origin.clone())?,
        );
        loader.origins.insert("workers", origin);
    }
    if !source.overrides.bind.is_empty() {
        merged.bind = Some(RawBind::Many(source.overrides.bind.clone()));
        loader.origins.insert("bind", Origin::Flag("--bind".into()));
    }
    validate(merged, &loader)
}

/// Validates a TOML document on its own (no environment, no flags); used by tests and tools.
pub fn from_toml_str(doc: &str, path: &Path) -> Result<Config, ConfigError> {
    let mut loader = Loader::new(Some(path.to_path_buf()), doc.to_string());
    let raw = loader.parse_file()?;
    validate(raw, &loader)
}

/// Remembers the file text and where each key came from, to point errors at their source.
struct Loader {
    path: Option<PathBuf>,
    doc: String,
    origins: HashMap<&'static str, Origin>,
    /// Where `table.key` values came from when not from the file.
    table_origins: HashMap<String, Origin>,
}

impl Loader {
    fn new(path: Option<PathBuf>, doc: String) -> Loader {
        Loader {
            path,
            doc,
            origins: HashMap::new(),
            table_origins: HashMap::new(),
        }
    }

    fn file_origin(&self, line: Option<usize>) -> Origin {
        Origin::File {
            path: self
                .path
                .clone()
                .unwrap_or_else(|| DEFAULT_CONFIG_PATH.into()),
            line,
        }
    }

    fn parse_file(&mut self) -> Result<RawConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(&self.doc).map_err(|e| {
            let line = e.span().map(|span| line_at(&self.doc, span.start));
            let origin = self.file_origin(line);
            let key_on_line = line.and_then(|l| key_on_line(&self.doc, l));
            translate_serde_error(e.message(), origin, key_on_line)
        })?;
        for key in KEYS {
            if line_of_key(&self.doc, key).is_some() {
                self.origins
                    .insert(key, self.file_origin(line_of_key(&self.doc, key)));
            }
        }
        Ok(raw)
    }

    fn origin_of(&self, key: &str) -> Origin {
        if let Some(origin) = self.origins.get(key) {
            return origin.clone();
        }
        if let Some(origin) = self.table_origins.get(key) {
            return origin.clone();
        }
        match line_of_key(&self.doc, key) {
            Some(line) => self.file_origin(Some(line)),
            None => Origin::Default,
        }
    }

    fn invalid(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin_of(key),
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// Turns serde's wording into ours: unknown keys get a suggestion, type errors name the key.
fn translate_serde_error(message: &str, origin: Origin, key: Option<String>) -> ConfigError {
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let unknown = rest.split('`').next().unwrap_or_default().to_string();
        let expected: Vec<&'static str> = known_keys_in(message);
        return ConfigError::UnknownKey {
            suggestion: error::suggest(&unknown, &expected),
            origin,
            key: unknown,
        };
    }
    let friendly = if message.contains("untagged enum RawWorkers") {
        "expected a whole number of workers or \"auto\"".to_string()
    } else if message.contains("untagged enum RawSeconds") {
        "expected a number of seconds, e.g. 30 or 0.5".to_string()
    } else if message.contains("untagged enum RawBind") {
        "expected an address string or a list of them, e.g. [\"127.0.0.1:8000\"]".to_string()
    } else {
        message
            .replace("expected i64", "expected a whole number")
            .replace("expected a boolean", "expected true or false")
            .trim()
            .to_string()
    };
    match key {
        Some(key) => ConfigError::Invalid {
            origin,
            key,
            message: friendly,
        },
        None => ConfigError::Syntax {
            origin,
            message: friendly,
        },
    }
}

/// The keys serde listed as expected ("expected one of `a`, `b`"), as known static names.
fn known_keys_in(message: &str) -> Vec<&'static str> {
    let listed = message.split("expected").nth(1).unwrap_or_default();
    KEYS.iter()
        .chain(raw::TABLES)
        .chain(TABLE_KEYS)
        .copied()
        .filter(|k| listed.contains(&format!("`{k}`")))
        .collect()
}

/// Keys inside the tables (`[store]`, `[embed]`, `[llm]`, `[rag]`), for suggestions; the
/// top-level ones are [`KEYS`] and [`raw::TABLES`].
const TABLE_KEYS: &[&str] = &[
    "backend",
    "path",
    "url",
    "collection",
    "api_key",
    "distance",
    "provider",
    "model",
    "dimensions",
    "timeout",
    "connect_timeout",
    "first_token_timeout",
    "temperature",
    "max_tokens",
    "max_concurrent",
    "chunk_size",
    "chunk_overlap",
    "top_k",
    "max_question_chars",
    "docs_dir",
    "ingest_docs_on_first_run",
];

/// `RAGPOOL_<TABLE>__<KEY>` (e.g. `RAGPOOL_LLM__MODEL=bge-m3`) over the file's tables. Each
/// value is checked on its own first, so an error names its variable.
fn overlay_table_env(
    merged: &mut RawConfig,
    loader: &mut Loader,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    let mut found = Vec::new();
    for table in raw::TABLES {
        for key in TABLE_KEYS {
            let var = format!(
                "RAGPOOL_{}__{}",
                table.to_ascii_uppercase(),
                key.to_ascii_uppercase()
            );
            if let Some(value) = env(&var) {
                found.push((*table, *key, var, value));
            }
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    // The file as a table (it parsed above, so this cannot fail), with the variables applied.
    let mut doc: toml::Table = toml::from_str(&loader.doc).unwrap_or_default();
    for (table, key, var, value) in found {
        let origin = Origin::Env(var.clone());
        let literal = format!("[{table}]\n{key} = {}", value.trim());
        let parsed = match toml::from_str::<toml::Table>(&literal) {
            Ok(parsed) => parsed,
            Err(_) => toml::from_str::<toml::Table>(&format!(
                "[{table}]\n{key} = {}",
                toml_string(value.trim())
            ))
            .map_err(|e| {
                translate_serde_error(e.message(), origin.clone(), Some(format!("{table}.{key}")))
            })?,
        };
        let value = parsed[table][key].clone();
        // Check the value's type in its own table, so the error names the variable.
        let mut alone = toml::Table::new();
        alone.insert(
            table.to_string(),
            toml::Value::Table(toml::Table::from_iter([(key.to_string(), value.clone())])),
        );
        toml::from_str::<RawConfig>(&alone.to_string()).map_err(|e| {
            translate_serde_error(e.message(), origin.clone(), Some(format!("{table}.{key}")))
        })?;
        let entry = doc
            .entry(table.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = entry {
            t.insert(key.to_string(), value);
        }
        loader
            .table_origins
            .insert(format!("{table}.{key}"), origin);
    }
    let tables: RawConfig = toml::from_str(&doc.to_string()).map_err(|e| ConfigError::Syntax {
        origin: Origin::Env("RAGPOOL_*__*".into()),
        message: e.message().to_string(),
    })?;
    merged.store = tables.store;
    merged.embed = tables.embed;
    merged.llm = tables.llm;
    merged.rag = tables.rag;
    Ok(())
}

/// Parses one key's value given as text (environment or flag): TOML syntax first, so that
/// `RAGPOOL_REUSE_PORT=true` is a boolean, falling back to a plain string.
fn parse_override(key: &str, value: &str, origin: Origin) -> Result<RawConfig, ConfigError> {
    let value = value.trim();
    let literal = if key == "bind" && !value.starts_with('[') {
        let items: Vec<String> = value.split(',').map(|s| toml_string(s.trim())).collect();
        format!("[{}]", items.join(", "))
    } else {
        value.to_string()
    };
    let doc = format!("{key} = {literal}");
    match toml::from_str::<RawConfig>(&doc) {
        Ok(raw) => Ok(raw),
        Err(_) => toml::from_str::<RawConfig>(&format!("{key} = {}", toml_string(value)))
            .map_err(|e| translate_serde_error(e.message(), origin, Some(key.to_string()))),
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Copies every key that `top` sets over `base`.
fn overlay(base: &mut RawConfig, top: RawConfig) {
    macro_rules! take {
        ($($field:ident),* $(,)?) => { $( if top.$field.is_some() { base.$field = top.$field; } )* };
    }
    take!(
        workers,
        bind,
        backlog,
        timeout,
        graceful_timeout,
        keepalive,
        max_requests,
        max_requests_jitter,
        max_worker_memory,
        worker_connections,
        limit_request_line,
        limit_request_fields,
        limit_request_field_size,
        max_body_size,
        json_body_limit,
        header_timeout,
        body_timeout,
        accesslog,
        errorlog,
        loglevel,
        pidfile,
        reuse_port,
        unix_socket_mode,
        admin_token,
        metrics,
        user,
        group,
        umask,
        chdir,
        forwarded_allow_ips,
        store,
        embed,
        llm,
        rag,
    );
}

fn line_at(doc: &str, offset: usize) -> usize {
    doc[..offset.min(doc.len())].matches('\n').count() + 1
}

/// The key assigned on a given line (`key = value`), for errors that point at the value.
fn key_on_line(doc: &str, line: usize) -> Option<String> {
    let text = doc.lines().nth(line.checked_sub(1)?)?;
    let (key, _) = text.split_once('=')?;
    let key = key.trim().trim_matches('"');
    (!key.is_empty() && !key.starts_with('#')).then(|| key.to_string())
}

/// The line on which a key (`name` at the top level, `table.name` inside a table) is assigned.
fn line_of_key(doc: &str, key: &str) -> Option<usize> {
    let (want_table, name) = match key.split_once('.') {
        Some((table, name)) => (Some(table), name),
        None => (None, key),
    };
    let mut table: Option<String> = None;
    for (i, text) in doc.lines().enumerate() {
        let t = text.trim();
        if let Some(header) = t.strip_prefix('[') {
            table = Some(header.trim_end_matches(']').trim().to_string());
            continue;
        }
        if let Some((k, _)) = t.split_once('=') {
            if k.trim().trim_matches('"') == name && table.as_deref() == want_table {
                return Some(i + 1);
            }
        }
    }
    None
}

fn seconds(
    loader: &Loader,
    key: &str,
    raw: Option<RawSeconds>,
    default: f64,
) -> Result<Duration, ConfigError> {
    let secs = raw.map(RawSeconds::as_f64).unwrap_or(default);
    if !secs.is_finite() || !(0.0..=366.0 * 86400.0).contains(&secs) {
        return Err(loader.invalid(key, format!("{secs} is not a sensible number of seconds")));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn count(
    loader: &Loader,
    key: &str,
    raw: Option<i64>,
    default: u64,
    min: u64,
) -> Result<u64, ConfigError> {
    match raw {
        None => Ok(default),
        Some(v) if v >= 0 && (v as u64) >= min => Ok(v as u64),
        Some(v) => {
            Err(loader.invalid(key, format!("{v} is too small; the least allowed is {min}")))
        }
    }
}

fn validate(raw: RawConfig, loader: &Loader) -> Result<Config, ConfigError> {
    let (workers, workers_auto) = match raw.workers {
        None => (defaults::WORKERS, false),
        Some(RawWorkers::Word(w)) if w.eq_ignore_ascii_case("auto") => (available_cpus(), true),
        Some(RawWorkers::Word(w)) => {
            return Err(loader.invalid(
                "workers",
                format!("\"{w}\" is neither a number nor \"auto\""),
            ))
        }
        Some(RawWorkers::Count(n)) if n >= 1 && (n as usize) <= MAX_WORKERS => (n as usize, false),
        Some(RawWorkers::Count(n)) => {
            return Err(loader.invalid("workers", format!("{n} is out of range 1..={MAX_WORKERS}")))
        }
    };

    let specs = raw
        .bind
        .map(RawBind::into_vec)
        .unwrap_or_else(|| vec![defaults::BIND.to_string()]);
    if specs.is_empty() {
        return Err(loader.invalid("bind", "needs at least one address"));
    }
    let mut bind = Vec::with_capacity(specs.len());
    for spec in &specs {
        let addr = BindAddr::parse(spec).map_err(|m| loader.invalid("bind", m))?;
        if bind.contains(&addr) {
            return Err(loader.invalid("bind", format!("{addr} is listed twice")));
        }
        bind.push(addr);
    }

    let backlog = count(loader, "backlog", raw.backlog, defaults::BACKLOG as u64, 1)?;
    let backlog = i32::try_from(backlog).map_err(|_| loader.invalid("backlog", "is too large"))?;

    let loglevel = raw
        .loglevel
        .unwrap_or_else(|| defaults::LOGLEVEL.to_string());
    if !["error", "warn", "info", "debug", "trace", "off"].contains(&loglevel.as_str()) {
        return Err(loader.invalid(
            "loglevel",
            format!("\"{loglevel}\" is not one of error, warn, info, debug, trace, off"),
        ));
    }

    let unix_socket_mode = match raw.unix_socket_mode {
        None => defaults::UNIX_SOCKET_MODE,
        Some(m) => u32::from_str_radix(m.trim_start_matches("0o"), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                loader.invalid(
                    "unix_socket_mode",
                    format!("\"{m}\" is not an octal mode like \"0660\""),
                )
            })?,
    };

    let timeout = seconds(loader, "timeout", raw.timeout, defaults::TIMEOUT_SECS)?;
    if timeout < Duration::from_millis(100) {
        return Err(loader.invalid("timeout", "must be at least 0.1 seconds"));
    }
    let path_value = |v: Option<String>| v.filter(|s| !s.is_empty());
    let table_error = |table: &str, (key, message): app::TableError| {
        loader.invalid(&format!("{table}.{key}"), message)
    };
    let field_error = |(key, message): process::FieldError| loader.invalid(key, message);
    let run_as = process::run_as(raw.user, raw.group).map_err(field_error)?;
    let umask = process::umask(raw.umask).map_err(field_error)?;
    let chdir = process::chdir(raw.chdir).map_err(field_error)?;
    let forwarded_allow_ips =
        process::trusted_proxies(raw.forwarded_allow_ips.map(RawBind::into_vec))
            .map_err(field_error)?;
    let store = app::store(raw.store.unwrap_or_default()).map_err(|e| table_error("store", e))?;
    let embed = app::embed(raw.embed.unwrap_or_default()).map_err(|e| table_error("embed", e))?;
    let llm = app::llm(raw.llm.unwrap_or_default()).map_err(|e| table_error("llm", e))?;
    let rag = app::rag(raw.rag.unwrap_or_default()).map_err(|e| table_error("rag", e))?;

    Ok(Config {
        path: loader.path.clone(),
        workers,
        workers_auto,
        bind,
        backlog,
        timeout,
        graceful_timeout: seconds(
            loader,
            "graceful_timeout",
            raw.graceful_timeout,
            defaults::GRACEFUL_TIMEOUT_SECS,
        )?,
        keepalive: seconds(loader, "keepalive", raw.keepalive, defaults::KEEPALIVE_SECS)?,
        max_requests: count(loader, "max_requests", raw.max_requests, 0, 0)?,
        max_requests_jitter: count(loader, "max_requests_jitter", raw.max_requests_jitter, 0, 0)?,
        max_worker_memory_mib: count(loader, "max_worker_memory", raw.max_worker_memory, 0, 0)?,
        worker_connections: count(
            loader,
            "worker_connections",
            raw.worker_connections,
            defaults::WORKER_CONNECTIONS as u64,
            1,
        )? as usize,
        limits: RequestLimits {
            line: count(
                loader,
                "limit_request_line",
                raw.limit_request_line,
                defaults::LIMIT_REQUEST_LINE as u64,
                64,
            )? as usize,
            fields: count(
                loader,
                "limit_request_fields",
                raw.limit_request_fields,
                defaults::LIMIT_REQUEST_FIELDS as u64,
                1,
            )? as usize,
            field_size: count(
                loader,
                "limit_request_field_size",
                raw.limit_request_field_size,
                defaults::LIMIT_REQUEST_FIELD_SIZE as u64,
                64,
            )? as usize,
            body: count(
                loader,
                "max_body_size",
                raw.max_body_size,
                defaults::MAX_BODY_SIZE,
                0,
            )?,
            json_body: count(
                loader,
                "json_body_limit",
                raw.json_body_limit,
                defaults::JSON_BODY_LIMIT,
                64,
            )?,
        },
        header_timeout: seconds(
            loader,
            "header_timeout",
            raw.header_timeout,
            defaults::HEADER_TIMEOUT_SECS,
        )?,
        body_timeout: seconds(
            loader,
            "body_timeout",
            raw.body_timeout,
            defaults::BODY_TIMEOUT_SECS,
        )?,
        accesslog: path_value(raw.accesslog).map(|s| LogTarget::parse(&s)),
        errorlog: path_value(raw.errorlog)
            .map(|s| LogTarget::parse(&s))
            .unwrap_or(LogTarget::Std),
        loglevel,
        pidfile: path_value(raw.pidfile).map(PathBuf::from),
        reuse_port: raw.reuse_port.unwrap_or(false),
        unix_socket_mode,
        admin_token: path_value(raw.admin_token),
        metrics: raw.metrics.unwrap_or(true),
        run_as,
        umask,
        chdir,
        forwarded_allow_ips,
        store,
        embed,
        llm,
        rag,
    })
}

/// CPUs this process may run on: honours the affinity mask and the cgroup CPU quota.
pub fn available_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(MAX_WORKERS)
}

impl Config {
    /// The effective configuration as TOML, for `ragpool check`.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let secs = |d: Duration| d.as_secs_f64();
        let log = |t: &LogTarget| match t {
            LogTarget::Std => "-".to_string(),
            LogTarget::File(p) => p.display().to_string(),
        };
        let q = |s: &str| toml_string(s);
        let _ = writeln!(
            out,
            "# effective configuration{}",
            match &self.path {
                Some(p) => format!(" (from {})", p.display()),
                None => " (built-in defaults; no config file)".to_string(),
            }
        );
        let workers_note = if self.workers_auto {
            "  # \"auto\""
        } else {
            ""
        };
        let _ = writeln!(out, "workers = {}{workers_note}", self.workers);
        let binds: Vec<String> = self.bind.iter().map(|b| q(&b.to_string())).collect();
        let _ = writeln!(out, "bind = [{}]", binds.join(", "));
        let _ = writeln!(out, "backlog = {}", self.backlog);
        let _ = writeln!(out, "timeout = {}", secs(self.timeout));
        let _ = writeln!(out, "graceful_timeout = {}", secs(self.graceful_timeout));
        let _ = writeln!(out, "keepalive = {}", secs(self.keepalive));
        let _ = writeln!(out, "max_requests = {}", self.max_requests);
        let _ = writeln!(out, "max_requests_jitter = {}", self.max_requests_jitter);
        let _ = writeln!(out, "max_worker_memory = {}", self.max_worker_memory_mib);
        let _ = writeln!(out, "worker_connections = {}", self.worker_connections);
        let _ = writeln!(out, "limit_request_line = {}", self.limits.line);
        let _ = writeln!(out, "limit_request_fields = {}", self.limits.fields);
        let _ = writeln!(out, "limit_request_field_size = {}", self.limits.field_size);
        let _ = writeln!(out, "max_body_size = {}", self.limits.body);
        let _ = writeln!(out, "json_body_limit = {}", self.limits.json_body);
        let _ = writeln!(out, "header_timeout = {}", secs(self.header_timeout));
        let _ = writeln!(out, "body_timeout = {}", secs(self.body_timeout));
        let _ = writeln!(
            out,
            "accesslog = {}",
            q(&self.accesslog.as_ref().map(log).unwrap_or_default())
        );
        let _ = writeln!(out, "errorlog = {}", q(&log(&self.errorlog)));
        let _ = writeln!(out, "loglevel = {}", q(&self.loglevel));
        let _ = writeln!(
            out,
            "pidfile = {}",
            q(&self
                .pidfile
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default())
        );
        let _ = writeln!(out, "reuse_port = {}", self.reuse_port);
        let _ = writeln!(out, "unix_socket_mode = \"{:04o}\"", self.unix_socket_mode);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(doc: &str) -> Result<Config, ConfigError> {
        from_toml_str(doc, Path::new("workers.toml"))
    }

    #[test]
    fn defaults_are_valid_and_match_gunicorn() {
        let c = Config::default();
        assert_eq!(c.workers, 1);
        assert_eq!(c.backlog, 2048);
        assert_eq!(c.timeout, Duration::from_secs(30));
        assert_eq!(c.limits.line, 4094);
        assert_eq!(c.limits.fields, 100);
        assert_eq!(c.limits.field_size, 8190);
        assert_eq!(c.bind, vec![BindAddr::parse("127.0.0.1:8000").unwrap()]);
    }

    #[test]
    fn unknown_key_names_line_and_suggests() {
        let err = parse("workers = 2\nwokers = 3\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("workers.toml:2"), "{text}");
        assert!(text.contains("`wokers`"), "{text}");
        assert!(text.contains("did you mean `workers`"), "{text}");
    }

    #[test]
    fn a_typo_inside_a_table_is_caught_with_its_line() {
        let err = parse("workers = 1\n[llm]\nprovider = \"ollama\"\nmodle = \"x\"\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("workers.toml:4: unknown key `modle`"),
            "{text}"
        );
        assert!(text.contains("did you mean `model`"), "{text}");
        let err = parse("[rag]\ntop_k = 0\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("workers.toml:2: key `rag.top_k`"),
            "{err}"
        );
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let err = parse("bind = \"127.0.0.1:9000\"\n\ntimeout = \"soon\"\n").unwrap_err();
        assert_eq!(err.key(), Some("timeout"));
        assert!(
            err.to_string().starts_with("workers.toml:3: key `timeout`"),
            "{err}"
        );
        let err = parse("workers = \"many\"\n").unwrap_err();
        assert_eq!(err.key(), Some("workers"));
        assert!(err.to_string().contains("workers.toml:1"), "{err}");
    }

    #[test]
    fn out_of_range_value_names_line() {
        let err = parse("# comment\nworkers = 0\n").unwrap_err();
        assert!(
            err.to_string().starts_with("workers.toml:2: key `workers`"),
            "{err}"
        );
    }

    #[test]
    fn auto_workers_uses_available_cpus() {
        let c = parse("workers = \"auto\"").unwrap();
        assert_eq!(c.workers, available_cpus());
        assert!(c.workers_auto);
    }

    #[test]
    fn precedence_is_defaults_file_env_flags() {
        let dir = std::env::temp_dir().join(format!("ragpool-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.toml");
        std::fs::write(
            &path,
            "workers = 2\ntimeout = 10\nbind = \"127.0.0.1:7000\"\n",
        )
        .unwrap();
        let env = |name: &str| match name {
            "RAGPOOL_WORKERS" => Some("3".to_string()),
            "RAGPOOL_KEEPALIVE" => Some("7".to_string()),
            "RAGPOOL_BIND" => Some("127.0.0.1:7001,unix:/tmp/r.sock".to_string()),
            _ => None,
        };
        let source = ConfigSource::new(Some(path.clone()), Overrides::default());
        let c = load_with_env(&source, env).unwrap();
        assert_eq!(c.workers, 3, "env beats file");
        assert_eq!(c.timeout, Duration::from_secs(10), "file beats default");
        assert_eq!(c.keepalive, Duration::from_secs(7));
        assert_eq!(c.bind.len(), 2);
        let source = ConfigSource::new(
            Some(path.clone()),
            Overrides {
                workers: Some("5".into()),
                bind: vec!["127.0.0.1:7002".into()],
            },
        );
        let c = load_with_env(&source, env).unwrap();
        assert_eq!(c.workers, 5, "flag beats env");
        assert_eq!(c.bind, vec![BindAddr::parse("127.0.0.1:7002").unwrap()]);

        let table_env = |name: &str| match name {
            "RAGPOOL_LLM__MODEL" => Some("qwen2.5".to_string()),
            "RAGPOOL_RAG__TOP_K" => Some("7".to_string()),
            _ => None,
        };
        let c = load_with_env(
            &ConfigSource::new(Some(path.clone()), Overrides::default()),
            table_env,
        )
        .unwrap();
        assert_eq!((c.llm.model.as_str(), c.rag.top_k), ("qwen2.5", 7));
        let bad_table = |name: &str| (name == "RAGPOOL_RAG__TOP_K").then(|| "0".to_string());
        let err = load_with_env(
            &ConfigSource::new(Some(path.clone()), Overrides::default()),
            bad_table,
        )
        .unwrap_err();
        assert!(err.to_string().contains("RAGPOOL_RAG__TOP_K"), "{err}");

        let bad_env = |name: &str| (name == "RAGPOOL_TIMEOUT").then(|| "never".to_string());
        let err = load_with_env(
            &ConfigSource::new(Some(path), Overrides::default()),
            bad_env,
        )
        .unwrap_err();
        assert!(err.to_string().contains("RAGPOOL_TIMEOUT"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_listed_key_is_a_real_key() {
        for key in KEYS {
            let err = parse(&format!("{key} = {{ x = 1 }}")).unwrap_err();
            assert!(
                !matches!(err, ConfigError::UnknownKey { .. }),
                "{key}: {err}"
            );
        }
    }

    #[test]
    fn shipped_workers_toml_is_valid() {
        let doc = include_str!("../../workers.toml");
        parse(doc).unwrap();
    }

    #[test]
    fn check_output_round_trips() {
        let c = parse(
            "workers = 3\nbind = [\"127.0.0.1:9001\", \"unix:/tmp/a.sock\"]\nmax_requests = 50\n",
        )
        .unwrap();
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(
            Config {
                path: c.path.clone(),
                ..again
            },
            c
        );
    }
}
