//! A REAL Qdrant server (not a fake) for tests: the Qdrant 1.19.0 binary that
//! `shared/qdrant/qdrant-bin` unpacks (the shared folder beside the clone, or above it), one
//! node or a cluster on loopback, each node in its own temp dir and on free ports, killed on
//! drop. Self-contained (std, nix, libc, tempfile): the library's store suite includes this
//! file too (`#[path]`), so both test binaries start their Qdrant the same way.
//!
//! The binary is `RAGPOOL_QDRANT_BIN` if set (`.ci/run` sets it), else what `qdrant-bin`
//! prints. Not found -> tests skip (`None`), unless `RAGPOOL_REQUIRE_QDRANT=1` (CI), where they
//! panic, so a missing server cannot pass as green.
//!
//! A node is started with `PR_SET_PDEATHSIG`: if the test thread that started it dies without
//! dropping it, the kernel kills the node, so no Qdrant outlives its test.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The env var that turns "no Qdrant here" from a skip into a failure.
pub const REQUIRE_ENV: &str = "RAGPOOL_REQUIRE_QDRANT";
/// The env var naming the server binary.
pub const BIN_ENV: &str = "RAGPOOL_QDRANT_BIN";
/// A single node is ready in ~30 ms; a cluster node waits for consensus. Generous: the box is
/// shared with many compiles.
const READY_WITHIN: Duration = Duration::from_secs(60);
/// A port picked as free can be taken by someone else before the server binds it.
const START_ATTEMPTS: usize = 3;

/// The server binary, or `None` (after a message, or a panic under `RAGPOOL_REQUIRE_QDRANT=1`).
pub fn binary() -> Option<PathBuf> {
    static BINARY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BINARY.get_or_init(find_binary) {
        Ok(path) => Some(path.clone()),
        Err(why) => {
            if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
                panic!("{REQUIRE_ENV}=1 but there is no Qdrant server: {why}");
            }
            eprintln!("skipped: no Qdrant server ({why})");
            None
        }
    }
}

fn find_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(BIN_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("{BIN_ENV}={} is not a file", path.display()))
        };
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = root
        .ancestors()
        .skip(1)
        .map(|dir| dir.join("shared/qdrant/qdrant-bin"))
        .find(|script| script.is_file())
        .ok_or_else(|| {
            format!(
                "no shared/qdrant/qdrant-bin beside or above {}, and {BIN_ENV} is not set",
                root.display()
            )
        })?;
    // Unpacked into this clone's target dir (the shared folder may be read-only).
    let output = Command::new(&script)
        .arg(root.join("target/qdrant"))
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!("{} printed no binary", script.display()))
    }
}

/// The ports of one node.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub http: u16,
    pub grpc: u16,
    pub p2p: u16,
}

impl Ports {
    fn free() -> Ports {
        Ports {
            http: free_port(),
            grpc: free_port(),
            p2p: free_port(),
        }
    }
}

/// How a node joins: alone, as the first node of a cluster, or through a running peer.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    Single,
    /// The first node of a cluster (`--uri` its own p2p address).
    First,
    /// Joins the cluster through this peer's p2p port (`--bootstrap`).
    Join(u16),
}

/// One running Qdrant node in its own temp dir; SIGKILLed on drop.
pub struct QdrantNode {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub ports: Ports,
    role: Role,
    binary: PathBuf,
}

impl QdrantNode {
    /// A single node on free ports, ready. `None` as for [`binary`].
    pub fn start() -> Option<QdrantNode> {
        let binary = binary()?;
        Some(QdrantNode::start_with(&binary, Role::Single))
    }

    /// A node in the given role on free ports, ready (retried on a port someone took).
    pub fn start_with(binary: &Path, role: Role) -> QdrantNode {
        let mut failures = Vec::new();
        for _ in 0..START_ATTEMPTS {
            let mut node = QdrantNode {
                child: None,
                dir: tempfile::tempdir().expect("temp dir"),
                ports: Ports::free(),
                role,
                binary: binary.to_path_buf(),
            };
            match node.spawn().and_then(|()| node.wait_ready(READY_WITHIN)) {
                Ok(()) => return node,
                Err(failure) => failures.push(format!("{failure}\n{}", node.log())),
            }
        }
        panic!("Qdrant did not start:\n{}", failures.join("\n----\n"));
    }

    /// The gRPC URL, for `[store] url`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.grpc)
    }

    /// `127.0.0.1:HTTP`, for REST calls.
    pub fn http_addr(&self) -> String {
        format!("127.0.0.1:{}", self.ports.http)
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// SIGKILLs the node and reaps it; its storage stays for [`QdrantNode::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// Starts a killed node again on the same ports and storage, and waits until it is ready.
    pub fn restart(&mut self) -> Result<(), String> {
        self.kill();
        self.spawn()?;
        self.wait_ready(READY_WITHIN)
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qdrant.log")).unwrap_or_default()
    }

    /// A REST request; the status and body, or an error for a node that does not answer.
    pub fn rest(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), String> {
        rest(&self.http_addr(), method, path, body)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let dir = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("qdrant.log"))
            .map_err(|e| format!("qdrant.log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| format!("qdrant.log: {e}"))?;
        let mut command = Command::new(&self.binary);
        // An empty cwd: Qdrant also reads ./config/*.yaml.
        command
            .current_dir(dir)
            .env("QDRANT__SERVICE__HOST", "127.0.0.1")
            .env("QDRANT__SERVICE__HTTP_PORT", self.ports.http.to_string())
            .env("QDRANT__SERVICE__GRPC_PORT", self.ports.grpc.to_string())
            .env("QDRANT__STORAGE__STORAGE_PATH", dir.join("storage"))
            .env("QDRANT__STORAGE__SNAPSHOTS_PATH", dir.join("snapshots"))
            .env("QDRANT__TELEMETRY_DISABLED", "true")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        match self.role {
            Role::Single => {}
            Role::First | Role::Join(_) => {
                command
                    .env("QDRANT__CLUSTER__ENABLED", "true")
                    .env("QDRANT__CLUSTER__P2P__PORT", self.ports.p2p.to_string());
            }
        }
        let own = format!("http://127.0.0.1:{}", self.ports.p2p);
        match self.role {
            Role::Single => {}
            Role::First => {
                command.arg("--uri").arg(&own);
            }
            Role::Join(peer) => {
                command
                    .arg("--uri")
                    .arg(&own)
                    .arg("--bootstrap")
                    .arg(format!("http://127.0.0.1:{peer}"));
            }
        }
        // SAFETY: prctl is async-signal-safe and touches only the child's own state.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until `/readyz` answers 200 and the gRPC port (which opens a little after the
    /// HTTP one) takes connections, failing early if the process exits.
    fn wait_ready(&mut self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("Qdrant exited before it was ready: {status}"));
                }
            }
            if matches!(self.rest("GET", "/readyz", None), Ok((200, _)))
                && TcpStream::connect(("127.0.0.1", self.ports.grpc)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("Qdrant was not ready within {within:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for QdrantNode {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "---- qdrant log ({}) ----\n{}\n---------------------",
                self.http_addr(),
                self.log()
            );
        }
    }
}

/// A cluster of nodes on loopback: the first started with `--uri`, the others joining it.
pub struct QdrantCluster {
    pub nodes: Vec<QdrantNode>,
}

impl QdrantCluster {
    /// `size` nodes, each ready and all of them peers. `None` as for [`binary`].
    pub fn start(size: usize) -> Option<QdrantCluster> {
        let binary = binary()?;
        let first = QdrantNode::start_with(&binary, Role::First);
        let p2p = first.ports.p2p;
        let mut nodes = vec![first];
        for _ in 1..size {
            nodes.push(QdrantNode::start_with(&binary, Role::Join(p2p)));
        }
        let cluster = QdrantCluster { nodes };
        let joined = wait_until(READY_WITHIN, || {
            cluster
                .nodes
                .iter()
                .all(|node| cluster.peers_seen_by(node) == Some(size))
        });
        assert!(joined, "the {size} Qdrant nodes did not all become peers");
        Some(cluster)
    }

    /// How many peers `node` knows of, from `GET /cluster`.
    pub fn peers_seen_by(&self, node: &QdrantNode) -> Option<usize> {
        let (status, body) = node.rest("GET", "/cluster", None).ok()?;
        if status != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        Some(json["result"]["peers"].as_object()?.len())
    }

    /// Every node's gRPC URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(QdrantNode::url).collect()
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free loopback port")
}

fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), bounded by timeouts.
pub fn rest(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let timeout = Duration::from_secs(30);
    let socket = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut stream = TcpStream::connect_timeout(&socket, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write to {addr}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no HTTP status from {addr}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
