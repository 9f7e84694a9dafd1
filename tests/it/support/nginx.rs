//! Debian's real nginx in front of a test server, running the SHIPPED deploy/nginx/ragpool.conf.
//!
//! The site file is copied into a temp dir with only its two deployment-specific values
//! rewritten (the upstream `server unix:/run/ragpool.sock;` and `listen 80;`); everything else
//! (rate limits, buffering, timeouts, headers, access rules) is what operators install. A
//! minimal main `nginx.conf` around it keeps pid, logs and temp files in the temp dir. nginx runs
//! in the foreground in its own process group and is stopped (master and workers) on drop.
//!
//! Also here: [`RawUpstream`], a hand-written upstream that records the request heads nginx
//! sends and can answer with a large body, so a test sees what the site config itself does
//! (the app's own `X-Accel-Buffering: no` would otherwise hide it).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use super::http::{self, Response, IO_TIMEOUT};
use super::{free_port, wait_until};

/// The site file operators install in /etc/nginx/conf.d/.
pub const SHIPPED_SITE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/nginx/ragpool.conf");
/// The two deployment-specific lines of the shipped site, rewritten for a test.
pub const SHIPPED_UPSTREAM: &str = "server unix:/run/ragpool.sock;";
pub const SHIPPED_LISTEN: &str = "listen 80;";

const START_BOUND: Duration = Duration::from_secs(10);
const STOP_BOUND: Duration = Duration::from_secs(5);

/// Where nginx proxies to.
pub enum Upstream<'a> {
    /// A unix socket path (the production shape, as systemd/ragpool.socket).
    Unix(&'a Path),
    /// `host:port` (the commented TCP variant of the shipped file).
    Tcp(&'a str),
    /// Several `host:port` servers in the one upstream: ragpool nodes side by side.
    TcpServers(&'a [String]),
}

/// The nginx binary, or `None` (with a skip message) when it is missing and
/// `RAGPOOL_REQUIRE_NGINX=1` is not set; panics when it is set.
pub fn require_nginx() -> Option<PathBuf> {
    let found = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    if found.is_none() {
        if std::env::var("RAGPOOL_REQUIRE_NGINX").as_deref() == Ok("1") {
            panic!("nginx is missing and RAGPOOL_REQUIRE_NGINX=1: apt-get install nginx-light");
        }
        eprintln!("skipped: nginx is not installed (apt-get install nginx-light)");
    }
    found
}

/// The shipped site with only the upstream server and the listen address replaced. Each
/// replaced line must occur exactly once, so a changed site file fails here, loudly.
pub fn site_conf(upstream: &Upstream<'_>, listen: &str) -> String {
    let shipped = std::fs::read_to_string(SHIPPED_SITE).expect("read deploy/nginx/ragpool.conf");
    for needle in [SHIPPED_UPSTREAM, SHIPPED_LISTEN] {
        assert_eq!(
            shipped.matches(needle).count(),
            1,
            "deploy/nginx/ragpool.conf should contain `{needle}` exactly once"
        );
    }
    let server = match upstream {
        Upstream::Unix(path) => format!("server unix:{};", path.display()),
        Upstream::Tcp(addr) => format!("server {addr};"),
        Upstream::TcpServers(addrs) => addrs
            .iter()
            .map(|addr| format!("server {addr};"))
            .collect::<Vec<_>>()
            .join("\n    "),
    };
    shipped
        .replace(SHIPPED_UPSTREAM, &server)
        .replace(SHIPPED_LISTEN, &format!("listen {listen};"))
}

/// A prepared nginx prefix: the main conf and the rewritten site in a temp dir.
pub struct NginxSite {
    binary: PathBuf,
    pub dir: tempfile::TempDir,
    /// `127.0.0.1:PORT`, free a moment ago.
    pub addr: String,
}

impl NginxSite {
    pub fn prepare(binary: &Path, upstream: Upstream<'_>) -> NginxSite {
        let dir = tempfile::tempdir().expect("temp dir");
        let addr = format!("127.0.0.1:{}", free_port());
        std::fs::write(dir.path().join("ragpool.conf"), site_conf(&upstream, &addr))
            .expect("write ragpool.conf");
        let d = dir.path().display();
        // Workers of a root master would run as `nobody`, which cannot reach a socket in a 0700
        // temp dir; the `user` directive only means something to a root master.
        let user = if nix::unistd::Uid::effective().is_root() {
            "user root;\n"
        } else {
            ""
        };
        let main = format!(
            "daemon off;\n\
             {user}\
             worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             \x20   log_format upstream '$remote_addr \"$request\" $status \"$upstream_status\"';\n\
             \x20   access_log {d}/access.log upstream;\n\
             \x20   client_body_temp_path {d}/client_body;\n\
             \x20   proxy_temp_path {d}/proxy;\n\
             \x20   fastcgi_temp_path {d}/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/uwsgi;\n\
             \x20   scgi_temp_path {d}/scgi;\n\
             \x20   include {d}/ragpool.conf;\n\
             }}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), main).expect("write nginx.conf");
        NginxSite {
            binary: binary.to_path_buf(),
            dir,
            addr,
        }
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.binary);
        command
            .arg("-p")
            .arg(self.dir.path())
            .arg("-c")
            .arg(self.dir.path().join("nginx.conf"));
        command
    }

    /// `nginx -t` on the main conf (and so on the included shipped site).
    pub fn test_config(&self) -> Output {
        self.command()
            .arg("-t")
            .stdin(Stdio::null())
            .output()
            .expect("run nginx -t")
    }

    /// Starts nginx and waits (bounded) until it accepts on its port.
    pub fn start(self) -> Nginx {
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("spawn nginx");
        let mut nginx = Nginx { child, site: self };
        let up = wait_until(START_BOUND, || {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited ({status}); error.log:\n{}", nginx.error_log());
            }
            TcpStream::connect(&nginx.site.addr).is_ok()
        });
        assert!(
            up,
            "nginx did not listen; error.log:\n{}",
            nginx.error_log()
        );
        nginx
    }
}

/// A running nginx (master and workers in one process group); stopped on drop: TERM to the
/// master, then SIGKILL to the group.
pub struct Nginx {
    child: Child,
    site: NginxSite,
}

impl Nginx {
    pub fn addr(&self) -> &str {
        &self.site.addr
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.site.dir.path().join("error.log")).unwrap_or_default()
    }

    /// One line per request: `remote "request" status "upstream statuses"`.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.site.dir.path().join("access.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // TERM first: the master stops and reaps its workers (a SIGKILLed master would leave
        // them to init). Then SIGKILL to the whole group, whatever is left.
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        let _ = wait_until(STOP_BOUND, || matches!(self.child.try_wait(), Ok(Some(_))));
        let _ = killpg(pid, Signal::SIGKILL);
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- nginx error.log ----\n{}\n-------------------------",
                self.error_log()
            );
        }
    }
}

/// A TCP connection to `addr` from the loopback address `source` (any of 127.0.0.0/8 reaches a
/// listener on 127.0.0.1, and nginx sees `source` as `$remote_addr`).
pub fn connect_from(source: Ipv4Addr, addr: &str) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let target: SocketAddr = addr
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: {e}")))?;
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect_timeout(&target.into(), IO_TIMEOUT)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// A connection to `addr` with a small receive buffer, for a client that stops reading.
pub fn connect_small_window(addr: &str) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let target: SocketAddr = addr
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: {e}")))?;
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_recv_buffer_size(16 * 1024)?;
    socket.connect_timeout(&target.into(), IO_TIMEOUT)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

/// Writes `raw` from `source` and reads the response until nginx closes.
pub fn send_from(source: Ipv4Addr, addr: &str, raw: &[u8]) -> io::Result<Response> {
    let mut stream = connect_from(source, addr)?;
    stream.write_all(raw)?;
    http::read_response(&mut stream)
}

/// `GET path` from `source`, with extra header lines.
pub fn get_from(
    source: Ipv4Addr,
    addr: &str,
    path: &str,
    headers: &[&str],
) -> io::Result<Response> {
    let mut head =
        format!("GET {path} HTTP/1.1\r\nHost: rag.example.test\r\nConnection: close\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    send_from(source, addr, head.as_bytes())
}

/// When the bytes of a streamed response arrived, relative to the request being sent.
#[derive(Debug)]
pub struct Arrival {
    /// When each `event: token` was first seen, in order.
    pub tokens: Vec<Duration>,
    /// The connection closed (the whole response is in).
    pub end: Duration,
    pub raw: String,
}

/// Sends `raw` (which must ask for `Connection: close`) and times the response's bytes.
pub fn time_stream(addr: &str, raw: &[u8]) -> io::Result<Arrival> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let started = Instant::now();
    stream.write_all(raw)?;
    let mut seen = Vec::new();
    let mut tokens = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        let count = String::from_utf8_lossy(&seen)
            .matches("event: token")
            .count();
        while tokens.len() < count {
            tokens.push(started.elapsed());
        }
    }
    Ok(Arrival {
        tokens,
        end: started.elapsed(),
        raw: String::from_utf8_lossy(&seen).into_owned(),
    })
}

/// The size of a bulk answer from [`RawUpstream`]: far more than the socket buffers between
/// it and a client that does not read can hold.
pub const BULK_BYTES: usize = 64 << 20;

/// A minimal HTTP/1.1 upstream for nginx, on threads: every request head is recorded, and so is
/// how long each kept-alive connection sat idle before the peer (nginx) closed it. A request
/// with the header `X-Raw: bulk` gets [`BULK_BYTES`] of body, written as fast as nginx takes
/// them, and the connection closes; anything else gets `{}` and the connection stays open.
pub struct RawUpstream {
    pub addr: String,
    state: Arc<RawState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct RawState {
    heads: Mutex<Vec<String>>,
    /// Per connection closed by the peer: time from our last response to its close.
    idle_closes: Mutex<Vec<Duration>>,
    /// Bytes of bulk body written so far, over all requests.
    bulk_written: AtomicUsize,
    stop: AtomicBool,
}

impl RawUpstream {
    pub fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind raw upstream");
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(RawState::default());
        let shared = Arc::clone(&state);
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(stream) = stream else { continue };
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    let _ = serve_raw(stream, &shared);
                });
            }
        });
        RawUpstream {
            addr,
            state,
            thread: Some(thread),
        }
    }

    /// The request heads received so far, oldest first.
    pub fn heads(&self) -> Vec<String> {
        self.state.heads.lock().unwrap().clone()
    }

    /// For each kept-alive connection nginx closed: how long it had been idle.
    pub fn idle_closes(&self) -> Vec<Duration> {
        self.state.idle_closes.lock().unwrap().clone()
    }

    pub fn bulk_written(&self) -> usize {
        self.state.bulk_written.load(Ordering::SeqCst)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr); // wakes the accept loop
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Serves requests on one connection until the peer closes it (or a bulk answer ends it).
fn serve_raw(mut stream: TcpStream, state: &RawState) -> io::Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let mut last_response: Option<Instant> = None;
    loop {
        let head_end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = stream.read(&mut buf)?;
            if n == 0 {
                if let (Some(at), true) = (last_response, raw.is_empty()) {
                    state.idle_closes.lock().unwrap().push(at.elapsed());
                }
                return Ok(());
            }
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
        let header = |name: &str| {
            head.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let bulk = header("x-raw").as_deref() == Some("bulk");
        while raw.len() < head_end + 4 + length {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            raw.extend_from_slice(&buf[..n]);
        }
        raw.drain(..head_end + 4 + length);
        state.heads.lock().unwrap().push(head);
        if bulk {
            stream.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {BULK_BYTES}\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )?;
            let piece = vec![b'x'; 64 * 1024];
            for _ in 0..BULK_BYTES / piece.len() {
                stream.write_all(&piece)?;
                state.bulk_written.fetch_add(piece.len(), Ordering::SeqCst);
            }
            return stream.flush();
        }
        stream.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        )?;
        stream.flush()?;
        last_response = Some(Instant::now());
    }
}
