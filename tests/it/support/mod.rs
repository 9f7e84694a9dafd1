//! Test support: the real `ragpool` binary in a temp dir, raw HTTP over TCP and unix sockets,
//! a bounded load generator, and condition waits with deadlines (never fixed sleeps).
//! Readiness is the master's own `READY=1` on a test-owned `NOTIFY_SOCKET` (systemd's notify
//! protocol), not a log line.

#![allow(dead_code)]

pub mod fake_ollama;
pub mod fake_rerank;
pub mod http;
pub mod llama;
pub mod load;
pub mod nginx;
pub mod qdrant;
pub mod webdriver;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Start the master in a session of its own (as systemd does) instead of only a process
    /// group: then the kernel does not SIGCONT its stopped workers when it dies.
    pub new_session: bool,
}

/// A test-owned `NOTIFY_SOCKET`: the master's notify messages (`READY=1`, `RELOADING=1`, ...)
/// are read as they arrive by a thread of its own (a full datagram queue would block the
/// sender) and kept for [`NotifySocket::wait_for`].
pub struct NotifySocket {
    /// Holds the socket file; removed on drop.
    _dir: tempfile::TempDir,
    messages: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    /// The value for the `NOTIFY_SOCKET` environment variable.
    pub path: String,
}

impl NotifySocket {
    pub fn new() -> NotifySocket {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("notify socket timeout");
        let messages = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, stopped) = (Arc::clone(&messages), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                    sink.lock().unwrap().push(message);
                }
            }
        });
        NotifySocket {
            _dir: dir,
            messages,
            stop,
            path: path.display().to_string(),
        }
    }

    /// Waits until a message so far contains `needle`, for at most `within`; whether one did.
    pub fn wait_for(&self, needle: &str, within: Duration) -> bool {
        wait_until(within, || {
            self.messages
                .lock()
                .unwrap()
                .iter()
                .any(|m| m.contains(needle))
        })
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How long a first generation may take to boot before a test gives up.
const READY_BOUND: Duration = Duration::from_secs(20);

/// A running `ragpool serve` in its own temp dir and process group; killed on drop.
pub struct ServerProcess {
    child: Child,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    exit: Option<ExitStatus>,
    /// The `NOTIFY_SOCKET` readiness came from (kept open for the master's later messages).
    notify: Option<NotifySocket>,
}

impl ServerProcess {
    /// Starts `ragpool serve` with `config` as its workers.toml and waits until the master says
    /// `READY=1` (every worker of the first generation serves) on a test-owned notify socket.
    pub fn start(config: &str) -> ServerProcess {
        let notify = NotifySocket::new();
        let mut server = ServerProcess::launch(
            config,
            Launch {
                env: &[("NOTIFY_SOCKET", notify.path.as_str())],
                ..Launch::default()
            },
        );
        assert!(
            notify.wait_for("READY=1", READY_BOUND),
            "server did not become ready; log:\n{}",
            server.logs()
        );
        server.notify = Some(notify);
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
            .stderr(Stdio::piped());
        if launch.new_session {
            // SAFETY: setsid is async-signal-safe; the new session's group id is the pid, so
            // `killpg` on drop still reaches the whole group.
            unsafe {
                command.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        } else {
            command.process_group(0);
        }
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
            notify: None,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The first TCP address the master reported listening on (waiting a bounded while for
    /// the line: the log pipe may lag behind the notify socket).
    pub fn addr(&self) -> String {
        wait_until(Duration::from_secs(5), || {
            !self.listening_addrs().is_empty()
        });
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

    /// Workers that died without being asked to, as the master logged them (a worker that
    /// refused to boot, exit code 3 or 4, is not one: it never served).
    pub fn worker_deaths(&self) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(") died: "))
            .filter(|l| !l.contains("(boot error)") && !l.contains("(app load error)"))
            .count()
    }

    /// Prints one row of a chaos test's table (`cargo test -- --nocapture`): what the test
    /// sent, how many of those did not get the answer they should, the workers that died, and
    /// the largest peak RSS (`VmHWM`) among the live workers.
    pub fn report_case(&self, case: &str, sent: u64, failed: u64) {
        let peak = self
            .workers()
            .iter()
            .filter_map(|pid| proc_status_kib(*pid, "VmHWM"))
            .max()
            .unwrap_or(0);
        eprintln!(
            "case | {case} | sent {sent} | failed {failed} | worker deaths {} | worker peak RSS {} MiB",
            self.worker_deaths(),
            peak / 1024
        );
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

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`); `None` once the process is gone.
pub fn proc_status_kib(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
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
