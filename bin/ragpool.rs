//! The `ragpool` command: parses flags, loads the configuration, starts the logger and hands
//! over to the library. Errors are printed here, with their chain, and become exit codes:
//! 0 ok, 1 runtime error, 2 bad configuration or usage, 3 workers failed to boot.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ragpool::config::{self, ConfigSource, Overrides};
use ragpool::master::{self, MasterError};
use ragpool::rag::engine::{IngestStep, IngestTally, Rag};
use ragpool::rag::UpsertOutcome;

#[derive(Parser)]
#[command(
    name = "ragpool",
    version,
    about = "A pre-forked RAG question-answering server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the master and its workers.
    Serve {
        /// Config file, which must exist (default: ./workers.toml if it exists at start, else
        /// built-in defaults).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Number of workers, or "auto" (overrides workers.toml and RAGPOOL_WORKERS).
        #[arg(long, short)]
        workers: Option<String>,
        /// Address to listen on; repeat for several (overrides workers.toml and RAGPOOL_BIND).
        #[arg(long, short)]
        bind: Vec<String>,
    },
    /// Validate the configuration and print it as ragpool will use it (like `nginx -t`).
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Also reach the configured LLM and embedding servers and check they have their models.
        #[arg(long)]
        online: bool,
    },
    /// Show the running pool: master, generation, and each worker (pid, state, requests, RSS).
    Status {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the raw JSON of /status instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Reload the running pool's configuration and wait until the new generation serves (exit
    /// 0) or the reload fails (exit 1; the master's log says why). For `ExecReload=`.
    Reload {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The master's pid (default: the config's pidfile, else $MAINPID as systemd sets it).
        #[arg(long)]
        pid: Option<i32>,
        /// Seconds to wait for the master's answer.
        #[arg(long, default_value_t = 90)]
        timeout: u64,
    },
    /// Add or update documents: files or folders (Markdown, text, HTML, PDF). Safe while serving.
    Ingest {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Files or folders (walked recursively).
        #[arg(required_unless_present = "reembed")]
        paths: Vec<PathBuf>,
        /// Fill in the vectors of documents stored without them (embedding failed then).
        #[arg(long)]
        reembed: bool,
    },
    /// Readers' votes on answers (the page's thumbs up/down, `POST /api/feedback`).
    Feedback {
        #[command(subcommand)]
        action: FeedbackAction,
    },
    /// Internal (benches/retrieval.sh): reads one question a line on stdin and prints, per
    /// question, one JSON line with the ranked hits `retrieve` returns (source, position, score).
    #[command(hide = true)]
    Search {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// How many results per question.
        #[arg(long, default_value_t = 10)]
        k: usize,
        /// Which result lists: `both` (what answers use), `lexical` or `dense`.
        #[arg(long, default_value = "both")]
        lists: String,
    },
    /// Internal: the sandboxed document parser. Reads one document on stdin, prints its text as
    /// JSON; started by ragpool itself under resource limits.
    #[command(hide = true)]
    Extract {
        #[arg(long)]
        format: String,
        #[arg(long)]
        max_text: usize,
    },
}

#[derive(Subcommand)]
enum FeedbackAction {
    /// Print every vote as one JSON line, oldest first: id, created_at (unix seconds), vote,
    /// question, answer, mode, source_ids. E.g. `... | jq 'select(.vote == "down") | .question'`.
    Export {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

const EXIT_CONFIG: u8 = 2;
const EXIT_BOOT: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config, online } => {
            check(ConfigSource::new(config, Overrides::default()), online)
        }
        Command::Serve {
            config,
            workers,
            bind,
        } => serve(ConfigSource::new(config, Overrides { workers, bind })),
        Command::Status { config, json } => {
            status(ConfigSource::new(config, Overrides::default()), json)
        }
        Command::Reload {
            config,
            pid,
            timeout,
        } => reload(
            ConfigSource::new(config, Overrides::default()),
            pid,
            Duration::from_secs(timeout),
        ),
        Command::Ingest {
            config,
            paths,
            reembed,
        } => ingest(
            ConfigSource::new(config, Overrides::default()),
            &paths,
            reembed,
        ),
        Command::Feedback {
            action: FeedbackAction::Export { config },
        } => export_feedback(ConfigSource::new(config, Overrides::default())),
        Command::Search { config, k, lists } => {
            search(ConfigSource::new(config, Overrides::default()), k, &lists)
        }
        Command::Extract { format, max_text } => extract(&format, max_text),
    }
}

fn check(source: ConfigSource, online: bool) -> ExitCode {
    match config::load(&source) {
        Ok(config) => {
            print!("{}", config.to_toml());
            eprintln!("ragpool: configuration is valid");
            if online {
                return check_online(&config);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ragpool: error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `ragpool check --online`: one line per configured model server on stderr; exit 1 if any
/// is unreachable or lacks its model.
fn check_online(config: &config::Config) -> ExitCode {
    let Ok(runtime) = cli_runtime() else {
        return ExitCode::FAILURE;
    };
    let probes = runtime.block_on(ragpool::rag::llm::probe_models(&config.llm, &config.embed));
    let mut failed = false;
    for probe in &probes {
        let what = format!("[{}] {} at {}", probe.table, probe.model, probe.url);
        match &probe.result {
            Ok(()) => eprintln!("ragpool: {what}: ok"),
            Err(e) => {
                failed = true;
                eprintln!("ragpool: {what}: {}", error_chain(e));
            }
        }
    }
    if probes.is_empty() {
        eprintln!("ragpool: no LLM or embedding server configured: nothing to reach");
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn serve(source: ConfigSource) -> ExitCode {
    let config = match config::load(&source) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ragpool: error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = ragpool::logging::init(&config.errorlog, &config.loglevel) {
        eprintln!("ragpool: error: cannot open the error log: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    if config.path.is_none() {
        log::warn!(
            "No config file at {}: serving on built-in defaults",
            source.path.display()
        );
    }
    match master::run(source, config, worker_main) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{}", error_chain(&e));
            eprintln!("ragpool: error: {}", error_chain(&e));
            match e {
                MasterError::BootFailed { .. } => ExitCode::from(EXIT_BOOT),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The worker entry point handed to the master: the binary is what ties them together, so the
/// master never depends on the worker, HTTP or the app.
fn worker_main(context: master::WorkerContext) -> i32 {
    ragpool::worker::run(ragpool::worker::WorkerBoot {
        slot: context.slot,
        board: context.board,
        slot_index: context.slot_index,
        generation: context.generation,
        config: context.config,
        listen_fds: context.listen_fds,
        master_pid: context.master_pid,
    })
}

/// `ragpool status`: the pool as its `/status` endpoint sees it.
fn status(source: ConfigSource, json: bool) -> ExitCode {
    let config = match config::load(&source) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("ragpool: error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match ragpool::status::fetch(&config) {
        Ok(value) if json => {
            println!("{value}");
            ExitCode::SUCCESS
        }
        Ok(value) => {
            print!("{}", ragpool::status::render(&value));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ragpool: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ragpool reload`: HUP to the master, then its answer. A config that does not load is reported
/// here too (from the same file, read by this process), but the master's verdict is the one that
/// counts: it reads the file itself.
fn reload(source: ConfigSource, pid: Option<i32>, timeout: Duration) -> ExitCode {
    let pid = match pid {
        Some(pid) => Some(pid),
        None => master_pid_from_pidfile(&source)
            .or_else(|| std::env::var("MAINPID").ok()?.trim().parse().ok()),
    };
    let Some(pid) = pid.filter(|p| *p > 0) else {
        eprintln!("ragpool: error: which master? pass --pid, set `pidfile` in the config, or run as systemd's ExecReload= ($MAINPID)");
        return ExitCode::from(EXIT_CONFIG);
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    match master::reload_reply::request(pid, timeout) {
        Ok(generation) => {
            eprintln!("ragpool: reloaded: generation {generation} is serving (master pid {pid})");
            ExitCode::SUCCESS
        }
        Err(e) => {
            // As ExecReload=, this goes to the journal: at error priority, as the master's line.
            let prefix = if ragpool::logging::stderr_is_journal() {
                "<3>"
            } else {
                ""
            };
            eprintln!("{prefix}ragpool: error: {e}");
            if let Err(config_error) = config::load(&source) {
                eprintln!("{prefix}ragpool: error: {config_error}");
            }
            ExitCode::FAILURE
        }
    }
}

fn master_pid_from_pidfile(source: &ConfigSource) -> Option<i32> {
    let config = config::load(source).ok()?;
    let text = std::fs::read_to_string(config.pidfile?).ok()?;
    text.trim().parse().ok()
}

/// `ragpool ingest`: its own process and runtime (never the master's), the same store as the
/// workers; prints one line per document and exits 1 if any failed.
/// `ragpool search` (hidden): the ranking `ask` would use, for the retrieval bench. A failed
/// question prints `{"question", "error"}` and the rest go on.
fn search(source: ConfigSource, k: usize, lists: &str) -> ExitCode {
    use ragpool::rag::engine::Lists;
    let lists = match lists {
        "both" => Lists::Both,
        "lexical" => Lists::Lexical,
        "dense" => Lists::Dense,
        other => {
            eprintln!("ragpool: error: --lists is both, lexical or dense, not {other:?}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    with_app(&source, async |rag| {
        for line in std::io::stdin().lines() {
            let Ok(question) = line else { break };
            let mut timings = ragpool::rag::engine::Timings::default();
            let line = match rag.retrieve_lists(&question, k, lists, &mut timings).await {
                Ok(hits) => serde_json::json!({
                    "question": question,
                    "retrieve_ms": timings.retrieve_ms,
                    "hits": hits.iter().map(|h| serde_json::json!({
                        "source": h.source,
                        "position": h.position,
                        "score": h.score,
                    })).collect::<Vec<_>>(),
                }),
                Err(e) => serde_json::json!({"question": question, "error": error_chain(&e)}),
            };
            println!("{line}");
        }
        ExitCode::SUCCESS
    })
}

/// `ragpool feedback export`: the store's votes as JSON lines on stdout.
fn export_feedback(source: ConfigSource) -> ExitCode {
    use std::io::Write as _;
    let Ok(config) = cli_config(&source) else {
        return ExitCode::from(EXIT_CONFIG);
    };
    let Ok(runtime) = cli_runtime() else {
        return ExitCode::FAILURE;
    };
    let votes = runtime.block_on(async {
        let store = ragpool::rag::store::Store::open(&config.store).await?;
        store.list_feedback().await
    });
    let votes = match votes {
        Ok(votes) => votes,
        Err(e) => {
            eprintln!("ragpool: error: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let mut out = std::io::stdout().lock();
    for vote in &votes {
        let line = serde_json::to_string(vote).unwrap_or_default();
        // A closed pipe (`| head`) ends the export quietly.
        if writeln!(out, "{line}").is_err() {
            return ExitCode::SUCCESS;
        }
    }
    let _ = out.flush();
    eprintln!("ragpool: {} votes", votes.len());
    ExitCode::SUCCESS
}

fn ingest(source: ConfigSource, paths: &[PathBuf], reembed: bool) -> ExitCode {
    with_app(&source, async |rag| {
        let mut tally = IngestTally::default();
        for path in paths {
            let run = rag.ingest_path(path.clone(), |step| match step {
                IngestStep::Stored { source, outcome } => match outcome {
                    UpsertOutcome::Inserted(id) => println!("inserted   {source} ({id})"),
                    UpsertOutcome::Replaced(id) => println!("replaced   {source} ({id})"),
                    UpsertOutcome::Unchanged(id) => println!("unchanged  {source} ({id})"),
                },
                IngestStep::Failed { source, error } => {
                    eprintln!("failed     {source}: {}", error_chain(error))
                }
                IngestStep::Unloadable(error) => eprintln!("failed     {error}"),
            });
            match run.await {
                Ok(run) => tally += run,
                Err(e) => {
                    eprintln!("failed     {}: {e}", path.display());
                    tally.failed += 1;
                }
            }
        }
        let IngestTally {
            inserted,
            replaced,
            unchanged,
            mut failed,
        } = tally;
        if !paths.is_empty() {
            println!(
                "{inserted} inserted, {replaced} replaced, {unchanged} unchanged, {failed} failed"
            );
        }
        if reembed {
            match rag.fill_missing_vectors().await {
                Ok((filled, waiting)) => {
                    println!("vectors filled in for {filled} documents, {waiting} still without");
                    failed += waiting;
                }
                Err(e) => {
                    eprintln!("failed     filling in vectors: {}", error_chain(&e));
                    failed += 1;
                }
            }
        }
        if failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}

/// `ragpool extract`: the helper side of the document sandbox (no config, no logger).
fn extract(format: &str, max_text: usize) -> ExitCode {
    let Some(format) = ragpool::rag::ingest::sandbox::parse_format_arg(format) else {
        eprintln!("ragpool extract: unknown format {format:?}");
        return ExitCode::from(EXIT_CONFIG);
    };
    match ragpool::rag::ingest::sandbox::run_helper(format, max_text) {
        0 => ExitCode::SUCCESS,
        code => ExitCode::from(code as u8),
    }
}

/// The config of a one-shot command, warnings logged to stderr; Err once the error is printed.
fn cli_config(source: &ConfigSource) -> Result<config::Config, ()> {
    let config = config::load(source).map_err(|e| eprintln!("ragpool: error: {e}"))?;
    let _ = ragpool::logging::init(&ragpool::config::LogTarget::Std, "warn");
    Ok(config)
}

/// A one-shot command's runtime: one thread and the worker's bounded blocking pool.
fn cli_runtime() -> Result<tokio::runtime::Runtime, ()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(ragpool::worker::BLOCKING_THREADS)
        .build()
        .map_err(|e| eprintln!("ragpool: error: cannot start a runtime: {e}"))
}

/// Runs a one-shot command on the app (`ingest`, `search`): config, runtime and store opened
/// as a worker opens them, each failure one `ragpool: error:` line and its exit code.
fn with_app(source: &ConfigSource, body: impl AsyncFnOnce(&Rag) -> ExitCode) -> ExitCode {
    let Ok(config) = cli_config(source) else {
        return ExitCode::from(EXIT_CONFIG);
    };
    let Ok(runtime) = cli_runtime() else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        match Rag::open(&config).await {
            Ok(rag) => body(&rag).await,
            Err(e) => {
                eprintln!("ragpool: error: {}", error_chain(&e));
                ExitCode::FAILURE
            }
        }
    })
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
