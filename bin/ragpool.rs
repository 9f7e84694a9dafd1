//! The `ragpool` command: parses flags, loads the configuration, starts the logger and hands
//! over to the library. Errors are printed here, with their chain, and become exit codes:
//! 0 ok, 1 runtime error, 2 bad configuration or usage, 3 workers failed to boot.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ragpool::config::{self, ConfigSource, Overrides};
use ragpool::master::{self, MasterError};

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
        /// Config file (default: ./workers.toml; absent means built-in defaults).
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
    },
}

const EXIT_CONFIG: u8 = 2;
const EXIT_BOOT: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(ConfigSource::new(config, Overrides::default())),
        Command::Serve {
            config,
            workers,
            bind,
        } => serve(ConfigSource::new(config, Overrides { workers, bind })),
    }
}

fn check(source: ConfigSource) -> ExitCode {
    match config::load(&source) {
        Ok(config) => {
            print!("{}", config.to_toml());
            eprintln!("ragpool: configuration is valid");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ragpool: error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
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
    match master::run(source, config) {
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
