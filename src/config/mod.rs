//! Configuration: `workers.toml`, `RAGPOOL_*` environment variables and command-line flags,
//! merged in that order of precedence over built-in defaults, then validated.
//!
//! Every key is declared once, in [`keys`] (name, table, type, default, range, doc line);
//! [`sources`] reads the layers into checked [`sources::Values`], and [`validate`] turns those
//! into [`Config`], what the rest of ragpool uses, with every duration a [`Duration`]. Nothing
//! here touches processes or sockets, so the master can re-run [`load`] on `SIGHUP` and throw
//! the result away if it fails.
//!
//! A reload never silently changes what the operator did not change: a file that sets no key
//! is refused, and so is a missing file that was there at start (see [`ConfigSource`]).

pub mod app;
mod bind;
mod error;
pub mod keys;
pub mod process;
pub mod sources;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use app::{
    Distance, EmbedConfig, LlmConfig, Provider, RagConfig, RerankConfig, StoreBackend, StoreConfig,
    MAX_TOP_K,
};
pub use bind::BindAddr;
pub use error::{ConfigError, Origin};
use keys::*;
use sources::Values;

/// The file read when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "workers.toml";
/// Upper bound on `workers`: the scoreboard holds two full generations during a reload.
pub const MAX_WORKERS: usize = 256;

/// Where a log goes: standard output/error (`-`) or a file that `SIGUSR1` reopens.
#[derive(Debug, Clone, PartialEq)]
pub enum LogTarget {
    Std,
    File(PathBuf),
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
    /// How long a reload's new generation may take until every worker serves; past it the
    /// reload is rolled back and the old generation keeps serving.
    pub boot_timeout: Duration,
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
    /// Bearer key of the OpenAI-compatible `/v1` endpoints; `None`: open like `/api/ask`.
    pub openai_api_key: Option<String>,
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
    pub rerank: RerankConfig,
    pub rag: RagConfig,
    /// Every key's effective value, for `ragpool check` ([`Config::to_toml`]).
    effective: Values,
}

impl Default for Config {
    fn default() -> Self {
        // Defaults are valid by construction; a test pins that.
        validate(Values::default(), None).expect("built-in defaults are valid")
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
    /// Whether the file must exist: it was named with `--config`, or it has been there since
    /// ragpool started. A default `./workers.toml` absent at start means built-in defaults (and
    /// a reload re-reads them); once the file has been read, its disappearing is an error, never
    /// a silent reset. Shared by clones: they are the same source.
    required: Arc<AtomicBool>,
}

impl ConfigSource {
    pub fn new(path: Option<PathBuf>, overrides: Overrides) -> ConfigSource {
        let explicit = path.is_some();
        // Absolute, so a reload after `chdir` still finds the same file.
        let path = path.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        let path = std::path::absolute(&path).unwrap_or(path);
        ConfigSource {
            explicit,
            required: Arc::new(AtomicBool::new(explicit || path.exists())),
            path,
            overrides,
        }
    }

    /// Whether a missing file is an error (see the field's doc).
    pub fn required(&self) -> bool {
        self.required.load(Ordering::Relaxed)
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
    let mut values = Values::default();
    let path = match std::fs::read_to_string(&source.path) {
        Ok(doc) => {
            source.required.store(true, Ordering::Relaxed);
            sources::apply_file(&mut values, &source.path, &doc)?;
            Some(source.path.clone())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !source.required() => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !source.explicit => {
            return Err(ConfigError::Vanished {
                path: source.path.clone(),
            })
        }
        Err(e) => {
            return Err(ConfigError::Read {
                path: source.path.clone(),
                source: e,
            })
        }
    };
    sources::apply_env(&mut values, env)?;
    if let Some(workers) = &source.overrides.workers {
        sources::apply_text(
            &mut values,
            &WORKERS,
            workers,
            Origin::Flag("--workers".into()),
        )?;
    }
    if !source.overrides.bind.is_empty() {
        sources::apply_list(
            &mut values,
            &BIND,
            &source.overrides.bind,
            Origin::Flag("--bind".into()),
        )?;
    }
    validate(values, path)
}

/// Validates a TOML document on its own (no environment, no flags); used by tests and tools.
pub fn from_toml_str(doc: &str, path: &Path) -> Result<Config, ConfigError> {
    let mut values = Values::default();
    sources::apply_file(&mut values, path, doc)?;
    validate(values, Some(path.to_path_buf()))
}

/// Turns checked values into a [`Config`], checking what a single key's range cannot: that
/// addresses parse, users exist, modes are octal, and so on.
fn validate(v: Values, path: Option<PathBuf>) -> Result<Config, ConfigError> {
    let (workers, workers_auto) = match v.get(&WORKERS) {
        Value::Auto => (available_cpus(), true),
        _ => (v.int(&WORKERS) as usize, false),
    };

    if v.list(&BIND).is_empty() {
        return Err(v.invalid(&BIND, "needs at least one address"));
    }
    let mut bind = Vec::with_capacity(v.list(&BIND).len());
    for spec in v.list(&BIND) {
        let addr = BindAddr::parse(spec).map_err(|m| v.invalid(&BIND, m))?;
        if bind.contains(&addr) {
            return Err(v.invalid(&BIND, format!("{addr} is listed twice")));
        }
        bind.push(addr);
    }

    let mode = v.text(&UNIX_SOCKET_MODE);
    let unix_socket_mode = process::octal(mode).ok_or_else(|| {
        v.invalid(
            &UNIX_SOCKET_MODE,
            format!("\"{mode}\" is not an octal mode like \"0660\""),
        )
    })?;

    let field_error = |(name, message): process::FieldError| match keys::find("", name) {
        Some(key) => v.invalid(key, message),
        None => v.invalid(&USER, message),
    };
    let run_as = process::run_as(v.optional(&USER), v.optional(&GROUP)).map_err(field_error)?;
    let umask = process::umask(v.optional(&UMASK)).map_err(field_error)?;
    let chdir = process::chdir(v.optional(&CHDIR)).map_err(field_error)?;
    let forwarded_allow_ips =
        process::trusted_proxies(v.list(&FORWARDED_ALLOW_IPS)).map_err(field_error)?;
    let log = |s: String| {
        if s == "-" {
            LogTarget::Std
        } else {
            LogTarget::File(PathBuf::from(s))
        }
    };

    Ok(Config {
        path,
        workers,
        workers_auto,
        bind,
        backlog: v.int(&BACKLOG) as i32,
        timeout: v.seconds(&TIMEOUT),
        graceful_timeout: v.seconds(&GRACEFUL_TIMEOUT),
        boot_timeout: v.seconds(&BOOT_TIMEOUT),
        keepalive: v.seconds(&KEEPALIVE),
        max_requests: v.int(&MAX_REQUESTS) as u64,
        max_requests_jitter: v.int(&MAX_REQUESTS_JITTER) as u64,
        max_worker_memory_mib: v.int(&MAX_WORKER_MEMORY) as u64,
        worker_connections: v.int(&WORKER_CONNECTIONS) as usize,
        limits: RequestLimits {
            line: v.int(&LIMIT_REQUEST_LINE) as usize,
            fields: v.int(&LIMIT_REQUEST_FIELDS) as usize,
            field_size: v.int(&LIMIT_REQUEST_FIELD_SIZE) as usize,
            body: v.int(&MAX_BODY_SIZE) as u64,
            json_body: v.int(&JSON_BODY_LIMIT) as u64,
        },
        header_timeout: v.seconds(&HEADER_TIMEOUT),
        body_timeout: v.seconds(&BODY_TIMEOUT),
        accesslog: v.optional(&ACCESSLOG).map(log),
        errorlog: v.optional(&ERRORLOG).map(log).unwrap_or(LogTarget::Std),
        loglevel: v.text(&LOGLEVEL).to_string(),
        pidfile: v.optional(&PIDFILE).map(PathBuf::from),
        reuse_port: v.flag(&REUSE_PORT),
        unix_socket_mode,
        admin_token: v.optional(&ADMIN_TOKEN),
        openai_api_key: v.optional(&OPENAI_API_KEY),
        metrics: v.flag(&METRICS),
        run_as,
        umask,
        chdir,
        forwarded_allow_ips,
        store: app::store(&v)?,
        embed: app::embed(&v)?,
        llm: app::llm(&v)?,
        rerank: app::rerank(&v)?,
        rag: app::rag(&v)?,
        effective: v,
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
    /// The whole effective configuration as TOML, for `ragpool check`: every key of every
    /// table, secrets masked, and a note on each value that came from the environment or a flag.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# effective configuration{}",
            match &self.path {
                Some(p) => format!(" (from {})", p.display()),
                None => " (built-in defaults; no config file)".to_string(),
            }
        );
        let mut table = "";
        for (key, value, origin) in self.effective.iter() {
            if key.table != table {
                table = key.table;
                let _ = writeln!(out, "\n[{table}]");
            }
            let mut notes = Vec::new();
            let shown = match value {
                Value::Text(s) if key.is_secret() && !s.is_empty() => {
                    notes.push("set, masked".to_string());
                    keys::to_toml(&Value::Text("********".into()))
                }
                Value::Auto => {
                    notes.push(format!("{} on this machine", self.workers));
                    keys::to_toml(value)
                }
                _ => keys::to_toml(value),
            };
            if matches!(origin, Origin::Env(_) | Origin::Flag(_)) {
                notes.push(format!("from {origin}"));
            }
            let _ = match notes.is_empty() {
                true => writeln!(out, "{} = {shown}", key.name),
                false => writeln!(out, "{} = {shown}  # {}", key.name, notes.join("; ")),
            };
        }
        for (parent, name) in keys::ARRAYS {
            let array = format!("{parent}.{name}");
            for entry in self.effective.array(&array) {
                let _ = writeln!(out, "\n[[{array}]]");
                for key in ALL.iter().filter(|k| k.table == array) {
                    let shown = match entry.get(key) {
                        Value::Text(s) if key.is_secret() && !s.is_empty() => {
                            format!(
                                "{}  # set, masked",
                                keys::to_toml(&Value::Text("********".into()))
                            )
                        }
                        value => keys::to_toml(value),
                    };
                    let _ = writeln!(out, "{} = {shown}", key.name);
                }
            }
        }
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
    fn store_takes_a_list_of_qdrant_nodes_and_a_cluster_layout() {
        let c = parse(
            "[store]\nbackend = \"qdrant\"\nurl = [\"http://q1:6334\", \"http://q2:6334/\"]\n\
             shard_number = 3\nreplication_factor = 2\nwrite_consistency_factor = 1\n",
        )
        .unwrap();
        assert_eq!(c.store.urls, ["http://q1:6334", "http://q2:6334"]);
        assert_eq!(
            (
                c.store.shard_number,
                c.store.replication_factor,
                c.store.write_consistency_factor
            ),
            (3, 2, 1)
        );
        let one = parse("[store]\nurl = \"http://q1:6334\"\n").unwrap();
        assert_eq!(one.store.urls, ["http://q1:6334"]);
        let defaults = parse("workers = 1\n").unwrap().store;
        assert_eq!(defaults.urls, [app::QDRANT_URL]);
        assert_eq!((defaults.shard_number, defaults.replication_factor), (0, 1));
        let err = parse("[store]\nreplication_factor = 2\nwrite_consistency_factor = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("write_consistency_factor"), "{err}");
        assert!(err.contains("more than replication_factor"), "{err}");
        let err = parse("[store]\nurl = []\n").unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        let err = parse("[store]\nurl = [\"q1:6334\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("http://"), "{err}");
        let err = parse("[store]\nreplicaton_factor = 2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("did you mean `replication_factor`"), "{err}");
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
    fn every_declared_key_is_read_from_the_file_and_its_variable() {
        for key in ALL.iter().filter(|k| !k.in_array()) {
            let default = key.kind.default_value();
            let written = keys::to_toml(&default);
            let doc = match key.table {
                "" => format!("{} = {written}\n", key.name),
                table => format!("[{table}]\n{} = {written}\n", key.name),
            };
            let mut values = Values::default();
            sources::apply_file(&mut values, Path::new("w.toml"), &doc)
                .unwrap_or_else(|e| panic!("{}: {e}", key.path()));
            assert!(matches!(values.origin(key), Origin::File { .. }), "{doc}");
            let mut values = Values::default();
            let var = key.env_var();
            sources::apply_env(&mut values, |name| (name == var).then(|| written.clone())).unwrap();
            assert_eq!(values.origin(key), &Origin::Env(var.clone()));
            assert_eq!(values.get(key), &default, "{var}={written}");
        }
    }

    #[test]
    fn shipped_workers_toml_is_valid() {
        let doc = include_str!("../../workers.toml");
        parse(doc).unwrap();
    }

    #[test]
    fn llm_takes_a_pool_of_backends_as_tables_or_a_url_list() {
        let c = parse(
            "[llm]\nmodel = \"qwen2.5\"\napi_key = \"k\"\nmax_concurrent = 10\n\
             [[llm.backend]]\nurl = \"http://a:11434/\"\nmax_concurrent = 4\n\
             [[llm.backend]]\nurl = \"http://b:8080/v1\"\nprovider = \"openai\"\n\
             model = \"gpt\"\napi_key = \"\"\n",
        )
        .unwrap();
        let b = &c.llm.backends;
        assert_eq!(b.len(), 2);
        assert_eq!(
            (b[0].url.as_str(), b[0].provider, b[0].model.as_str()),
            ("http://a:11434", Provider::Ollama, "qwen2.5")
        );
        assert_eq!(
            (b[0].max_concurrent, b[0].api_key.as_deref()),
            (4, Some("k"))
        );
        assert_eq!(
            (b[1].provider, b[1].model.as_str(), b[1].max_concurrent),
            (Provider::OpenAi, "gpt", 0)
        );
        assert_eq!(b[1].api_key.as_deref(), Some("k"), "blank = [llm]'s");
        assert_eq!(
            (c.llm.url.as_str(), c.llm.max_concurrent),
            ("http://a:11434", 10)
        );
        // The check output shows the tables and reads back the same.
        let shown = c.to_toml();
        assert!(shown.contains("[[llm.backend]]"), "{shown}");
        assert!(!shown.contains("= \"k\""), "secrets masked: {shown}");
        let inline =
            parse("llm.backend = [{ url = \"http://a:1\" }, { url = \"http://b:2\" }]\n").unwrap();
        assert_eq!(inline.llm.backends.len(), 2);

        let list = parse("[llm]\nurl = [\"http://a:1\", \"http://b:2\"]\n").unwrap();
        let urls: Vec<&str> = list.llm.backends.iter().map(|b| b.url.as_str()).collect();
        assert_eq!(urls, ["http://a:1", "http://b:2"]);
        let one = Config::default();
        assert_eq!(
            one.llm.backends.len(),
            1,
            "the single server is a pool of one"
        );
        assert_eq!(one.llm.backends[0].url, app::OLLAMA_URL);
        let none = parse("[llm]\nprovider = \"none\"\n").unwrap();
        assert!(none.llm.backends.is_empty());
        let embed = parse("[embed]\nurl = [\"http://e1:1/\", \"http://e2:1\"]\n").unwrap();
        assert_eq!(embed.embed.urls, ["http://e1:1", "http://e2:1"]);
        assert_eq!(embed.embed.url, "http://e1:1");
        assert_eq!(Config::default().embed.urls, [app::OLLAMA_URL]);

        let err = parse("[[llm.backend]]\nurl = \"http://a:1\"\nmax_concurent = 4\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("workers.toml:3:") && err.contains("max_concurrent"),
            "{err}"
        );
        let err = parse("[[llm.backend]]\nmodel = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a url"), "{err}");
        let err = parse("[llm.backend]\nurl = \"http://a:1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("expected tables [[llm.backend]]"), "{err}");
        let many: String = (0..17)
            .map(|i| format!("[[llm.backend]]\nurl = \"http://h{i}:1\"\n"))
            .collect();
        let err = parse(&many).unwrap_err().to_string();
        assert!(err.contains("at most 16"), "{err}");
    }

    #[test]
    fn check_output_round_trips() {
        let c = parse(
            "workers = 3\nbind = [\"127.0.0.1:9001\", \"unix:/tmp/a.sock\"]\nmax_requests = 50\n\
             [[llm.backend]]\nurl = \"http://a:1\"\nmax_concurrent = 4\n\
             [[llm.backend]]\nurl = \"http://b:2\"\nprovider = \"openai\"\n",
        )
        .unwrap();
        assert_eq!(c.llm.backends.len(), 2);
        let again = parse(&c.to_toml()).unwrap();
        assert_eq!(
            Config {
                path: c.path.clone(),
                ..again
            },
            c
        );
    }

    #[test]
    fn a_duplicate_key_says_so_with_its_line() {
        let err = parse("workers = 2\nbacklog = 10\nworkers = 3\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "workers.toml:3: duplicate key `workers` in document root"
        );
        let err = parse("[llm]\nmodel = \"a\"\n\nmodel = \"b\"\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("workers.toml:4: duplicate key `model`"),
            "{err}"
        );
    }

    #[test]
    fn a_file_that_sets_no_key_is_refused() {
        for doc in [
            "",
            "\n\n",
            "# workers = 4\n# bind = []\n",
            "[llm]\n# model = \"x\"\n",
        ] {
            let err = parse(doc).unwrap_err();
            assert!(matches!(err, ConfigError::Empty { .. }), "{doc:?}: {err}");
            assert!(err.to_string().contains("sets no key"), "{err}");
        }
    }

    #[test]
    fn absurd_numbers_are_refused_naming_key_line_and_limit() {
        for (doc, want) in [
            (
                "workers = 2\nheader_timeout = 0\n",
                "workers.toml:2: key `header_timeout`: 0 is out of range 0.1..=3600",
            ),
            (
                "backlog = 2147483647\n",
                "workers.toml:1: key `backlog`: 2147483647 is out of range 1..=65535",
            ),
            (
                "# c\nworker_connections = 1e12\n",
                "workers.toml:2: key `worker_connections`: expected a whole number in \
                 1..=1000000, found a fractional number",
            ),
            (
                "worker_connections = 1000000000000\n",
                "workers.toml:1: key `worker_connections`: 1000000000000 is out of range \
                 1..=1000000",
            ),
            (
                "max_body_size = 9200000000000000000\n",
                "workers.toml:1: key `max_body_size`: 9200000000000000000 is out of range \
                 0..=1073741824",
            ),
            (
                "[llm]\ntemperature = 3\n",
                "workers.toml:2: key `llm.temperature`: 3 is out of range 0..=2",
            ),
            (
                "timeout = -1\n",
                "workers.toml:1: key `timeout`: -1 is out of range 0.1..=3600",
            ),
        ] {
            assert_eq!(parse(doc).unwrap_err().to_string(), want, "{doc}");
        }
    }

    #[test]
    fn a_missing_file_is_an_error_unless_it_was_the_absent_default_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("workers.toml");
        let none = |_: &str| None;

        // Named with --config: must exist.
        let explicit = ConfigSource::new(Some(path.clone()), Overrides::default());
        let err = load_with_env(&explicit, none).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err}");

        // The implicit default, absent at start: built-in defaults, and still on a reload.
        let implicit = |path: &Path| ConfigSource {
            path: path.to_path_buf(),
            required: Arc::new(AtomicBool::new(path.exists())),
            ..ConfigSource::new(None, Overrides::default())
        };
        let absent = implicit(&path);
        let c = load_with_env(&absent, none).unwrap();
        assert_eq!((c.path, c.workers), (None, 1));
        let c = load_with_env(&absent, none).unwrap();
        assert_eq!((c.path, c.workers), (None, 1));
        // Created later and read by a reload: from then on it is required too.
        std::fs::write(&path, "workers = 2\n").unwrap();
        assert_eq!(load_with_env(&absent, none).unwrap().workers, 2);
        std::fs::remove_file(&path).unwrap();
        let err = load_with_env(&absent, none).unwrap_err();
        assert!(matches!(err, ConfigError::Vanished { .. }), "{err}");

        // Present at start, gone at the reload: refused, never a silent reset.
        std::fs::write(&path, "workers = 3\n").unwrap();
        let present = implicit(&path);
        assert!(present.required());
        std::fs::remove_file(&path).unwrap();
        let err = load_with_env(&present, none).unwrap_err();
        assert!(matches!(err, ConfigError::Vanished { .. }), "{err}");
        assert!(err.to_string().contains("is gone"), "{err}");
    }

    #[test]
    fn check_output_shows_every_table_and_masks_secrets() {
        let c = parse(
            "admin_token = \"hunter2\"\n[llm]\napi_key = \"sk-secret\"\nmodel = \"qwen2.5\"\n",
        )
        .unwrap();
        let out = c.to_toml();
        for key in ALL {
            assert!(
                out.lines()
                    .any(|l| l.starts_with(&format!("{} = ", key.name))),
                "{} missing from:\n{out}",
                key.path()
            );
        }
        for table in keys::tables() {
            assert!(out.contains(&format!("\n[{table}]\n")), "{out}");
        }
        assert!(
            !out.contains("hunter2") && !out.contains("sk-secret"),
            "{out}"
        );
        assert!(
            out.contains("admin_token = \"********\"  # set, masked"),
            "{out}"
        );
        assert!(out.contains("model = \"qwen2.5\""), "{out}");
        assert!(
            out.contains("api_key = \"\"\n"),
            "unset secrets show empty: {out}"
        );
    }

    #[test]
    fn tables_may_be_inline_or_dotted_and_must_be_tables() {
        let c =
            parse("workers = 1\nllm = { model = \"a\", max_tokens = 9 }\nrag.top_k = 3\n").unwrap();
        assert_eq!(
            (c.llm.model.as_str(), c.llm.max_tokens, c.rag.top_k),
            ("a", 9, 3)
        );
        let err = parse("workers = 1\nllm = { model = \"a\", max_tokns = 9 }\n").unwrap_err();
        assert!(
            err.to_string().starts_with(
                "workers.toml:2: unknown key `max_tokns` (did you mean `max_tokens`?)"
            ),
            "{err}"
        );
        let err = parse("workers = 1\n\n[[llm]]\nmodel = \"a\"\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "workers.toml:3: key `llm`: expected a table [llm]"
        );
        let err = parse("[workers]\nn = 1\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("workers.toml:1: key `workers`: expected"),
            "{err}"
        );
        let err = parse("[stor]\nbackend = \"qdrant\"\n").unwrap_err();
        assert!(err.to_string().contains("did you mean `store`"), "{err}");
    }

    #[test]
    fn a_syntax_error_is_one_line_with_its_line_number() {
        let err = parse("workers = 2\nbind = [\"127.0.0.1:1\"\n\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("workers.toml:"), "{text}");
        assert!(!text.contains('\n'), "{text:?}");
        let err = parse("workers = 2\n[llm\nmodel = \"x\"\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "workers.toml:2: invalid table header; expected `.`, `]`"
        );
    }
}
