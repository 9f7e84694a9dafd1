//! Test support: the real `ragpool` binary in a temp dir, raw HTTP over TCP and unix sockets,
//! a bounded load generator, and condition waits with deadlines (never fixed sleeps).

#![allow(dead_code)]

pub mod fake_ollama;
pub mod http;
pub mod llama;
pub mod load;
pub mod nginx;
pub mod qdrant;
pub mod webdriver;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

pub const BIN: &str = env!("CARGO_BIN_EXE_ragpool");

/// Polls `cond` every 20 ms until it holds or `within` passes; returns whether it held.
pub fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Pids whose parent is `parent`, from /proc.
pub fn children_of(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ..." — comm may contain spaces, so split after the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let ppid: Option<i32> = fields.next().and_then(|p| p.parse().ok());
        if ppid == Some(parent) && state != Some("Z") {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}

/// How to start the binary beyond the defaults.
#[derive(Default)]
pub struct Launch<'a> {
    /// A program (and its arguments) that runs ragpool, e.g. systemd-socket-activate.
    pub wrapper: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
    pub extra_args: &'a [&'a str],
    /// Run this binary instead of the one cargo built (e.g. a copy a test can replace).
    pub binary: Option<&'a Path>,
    /// Leave out `--config`: the server finds ./workers.toml in its working directory.
    pub implicit_config: bool,
    /// Write no workers.toml at all (with `implicit_config`: built-in defaults).
    pub no_file: bool,
}

/// A running `ragpool serve` in its own temp dir and process group; killed on drop.
pub struct ServerProcess {
    child: Child,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    exit: Option<ExitStatus>,
}

impl ServerProcess {
    /// Starts `ragpool serve` with `config` as its workers.toml and waits until every worker of
    /// the first generation serves.
    pub fn start(config: &str) -> ServerProcess {
        let server = ServerProcess::spawn(config, &[]);
        assert!(
            server.wait_for_log("are serving", Duration::from_secs(20)),
            "server did not become ready; log:\n{}",
            server.logs()
        );
        server
    }

    /// Starts without waiting for readiness (for boot-failure tests).
    pub fn spawn(config: &str, extra_args: &[&str]) -> ServerProcess {
        ServerProcess::launch(
            config,
            Launch {
                extra_args,
                ..Launch::default()
            },
        )
    }

    /// Starts with a wrapper command (e.g. `systemd-socket-activate -l ADDR`) and extra env.
    pub fn launch(config: &str, launch: Launch<'_>) -> ServerProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config.replace("{dir}", &dir.path().display().to_string());
        let config_path = dir.path().join("workers.toml");
        if !launch.no_file {
            std::fs::write(&config_path, config).expect("write workers.toml");
        }
        let binary = launch.binary.unwrap_or(Path::new(BIN));
        let mut command = match launch.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        command.envs(launch.env.iter().copied());
        command.arg("serve");
        if !launch.implicit_config {
            command.arg("--config").arg(&config_path);
        }
        command
            .args(launch.extra_args)
            .current_dir(dir.path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = command.spawn().expect("spawn ragpool");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        ServerProcess {
            child,
            dir,
            config_path,
            lines,
            exit: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The first TCP address the master reported listening on.
    pub fn addr(&self) -> String {
        self.listening_addrs()
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no 'Listening at' line; log:\n{}", self.logs()))
    }

    /// Every `Listening at: http://ADDR` address logged so far, latest last.
    pub fn listening_addrs(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.split("Listening at: http://").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    pub fn logs(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn count_in_log(&self, needle: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    pub fn wait_for_log(&self, needle: &str, within: Duration) -> bool {
        wait_until(within, || self.count_in_log(needle) > 0)
    }

    pub fn wait_for_log_count(&self, needle: &str, count: usize, within: Duration) -> bool {
        wait_until(within, || self.count_in_log(needle) >= count)
    }

    pub fn workers(&self) -> Vec<i32> {
        children_of(self.pid())
    }

    pub fn wait_for_workers(&self, count: usize, within: Duration) -> bool {
        wait_until(within, || self.workers().len() == count)
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid()), signal).expect("signal the master");
    }

    pub fn rewrite_config(&self, config: &str) {
        let config = config.replace("{dir}", &self.dir.path().display().to_string());
        std::fs::write(&self.config_path, config).expect("rewrite workers.toml");
    }

    /// Waits for the master to exit; `None` if it is still running at the deadline.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exit {
                return Some(status);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
                // Let the stderr reader catch the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- ragpool log ----\n{}\n---------------------",
                self.logs()
            );
        }
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}
