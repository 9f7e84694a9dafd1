//! Operations: systemd's notify protocol and socket activation, with the real tools.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::config;
use crate::support::http;
use crate::support::{free_port, Launch, ServerProcess};

const BOUND: Duration = Duration::from_secs(20);

/// Reads datagrams until one contains `needle`; returns everything read.
fn read_until(socket: &UnixDatagram, needle: &str, seen: &mut Vec<String>) -> bool {
    let deadline = Instant::now() + BOUND;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(message.clone());
            if message.contains(needle) {
                return true;
            }
        }
    }
    false
}

#[test]
fn the_master_speaks_systemds_notify_protocol_across_start_reload_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let notify = path.display().to_string();
    let mut server = ServerProcess::launch(
        &config(2, ""),
        Launch {
            env: &[("NOTIFY_SOCKET", notify.as_str())],
            ..Launch::default()
        },
    );
    let mut seen = Vec::new();
    assert!(
        read_until(&socket, "READY=1", &mut seen),
        "{seen:?}\n{}",
        server.logs()
    );
    assert!(
        seen.last()
            .unwrap()
            .contains("STATUS=2 workers serving, generation 1"),
        "{seen:?}"
    );
    assert!(
        server.wait_for_log("are serving", BOUND),
        "READY only after every worker booted"
    );

    server.signal(Signal::SIGHUP);
    let mut reload = Vec::new();
    assert!(read_until(&socket, "READY=1", &mut reload), "{reload:?}");
    assert!(
        reload[0].starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reload:?}"
    );
    assert!(
        reload
            .last()
            .unwrap()
            .contains("last reload: ok (generation 2)"),
        "{reload:?}"
    );
    assert!(
        // The log line is written before READY=1; the pipe to this test may lag behind.
        server.wait_for_log("Reload complete: generation 2", BOUND),
        "READY after the new generation serves"
    );

    server.signal(Signal::SIGTERM);
    let mut stop = Vec::new();
    assert!(read_until(&socket, "STOPPING=1", &mut stop), "{stop:?}");
    assert_eq!(server.wait_exit(BOUND).and_then(|s| s.code()), Some(0));
}

#[test]
fn a_rejected_reload_still_ends_with_ready_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let notify = path.display().to_string();
    let server = ServerProcess::launch(
        &config(1, ""),
        Launch {
            env: &[("NOTIFY_SOCKET", notify.as_str())],
            ..Launch::default()
        },
    );
    let mut seen = Vec::new();
    assert!(read_until(&socket, "READY=1", &mut seen));
    server.rewrite_config("workers = \"lots\"\n");
    server.signal(Signal::SIGHUP);
    let mut reload = Vec::new();
    assert!(read_until(&socket, "READY=1", &mut reload), "{reload:?}");
    assert!(
        reload.last().unwrap().contains("last reload: rejected"),
        "{reload:?}"
    );
}

#[test]
fn socket_activation_uses_the_socket_systemd_passes() {
    if which("systemd-socket-activate").is_none() {
        panic!("systemd-socket-activate is missing: apt-get install systemd (CI installs it)");
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = ServerProcess::launch(
        // `bind` names another port: under activation it must be ignored.
        &config(2, ""),
        Launch {
            wrapper: &["systemd-socket-activate", "-l", &listen],
            ..Launch::default()
        },
    );
    // systemd-socket-activate listens, and on the first connection execs ragpool with
    // LISTEN_FDS=1: that first connection waits in the backlog and must be served.
    let first = {
        let listen = listen.clone();
        std::thread::spawn(move || {
            crate::support::wait_until(BOUND, || {
                http::get(&listen, "/health")
                    .map(|r| r.status == 200)
                    .unwrap_or(false)
            })
        })
    };
    assert!(
        server.wait_for_log("socket activation", BOUND),
        "{}",
        server.logs()
    );
    assert!(
        server.wait_for_log("are serving", BOUND),
        "{}",
        server.logs()
    );
    assert!(
        first.join().unwrap(),
        "the connection that triggered activation was served"
    );
    assert_eq!(http::get(&listen, "/health").unwrap().status, 200);
    // A reload keeps serving on the activated socket.
    server.signal(Signal::SIGHUP);
    assert!(
        server.wait_for_log("Reload complete", BOUND),
        "{}",
        server.logs()
    );
    assert_eq!(http::get(&listen, "/health").unwrap().status, 200);
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| std::path::Path::new(dir).join(program))
        .find(|p| p.exists())
}
