//! Operations: systemd's notify protocol and socket activation, with the real tools.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::config;
use crate::support::http;
use crate::support::{free_port, Launch, ServerProcess};

const BOUND: Duration = Duration::from_secs(20);

/// A test-owned `NOTIFY_SOCKET`: (its dir, kept alive; the socket; its path for the env).
fn notify_socket() -> (tempfile::TempDir, UnixDatagram, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let notify = path.display().to_string();
    (dir, socket, notify)
}

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
    let (_dir, socket, notify) = notify_socket();
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
    let (_dir, socket, notify) = notify_socket();
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

#[test]
fn workers_drop_to_the_configured_user_while_the_master_keeps_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: dropping privileges needs the tests to run as root (CI does)");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody");
    let data = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        data.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let server = ServerProcess::start(&format!(
        "workers = 2\nbind = [\"127.0.0.1:0\"]\nuser = \"nobody\"\n[store]\npath = \"{}\"\n",
        data.path().join("store").display()
    ));
    let uid_of = |pid: i32| -> u32 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        line.split_whitespace().nth(2).unwrap().parse().unwrap() // effective uid
    };
    assert_eq!(
        uid_of(server.pid()),
        0,
        "the master keeps root (to bind, reload, upgrade)"
    );
    for worker in server.workers() {
        assert_eq!(
            uid_of(worker),
            nobody.uid.as_raw(),
            "worker {worker} runs as nobody"
        );
    }
    assert_eq!(
        http::get(&server.addr(), "/health").unwrap().json()["store"]["status"],
        "ok"
    );
}

#[test]
fn an_unknown_user_is_a_configuration_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workers.toml");
    std::fs::write(&path, "workers = 1\nuser = \"no-such-user-here\"\n").unwrap();
    let out = std::process::Command::new(crate::support::BIN)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("workers.toml:2: key `user`: no such user"),
        "{stderr}"
    );
}

#[test]
fn umask_and_chdir_apply_to_the_files_the_pool_creates() {
    let work = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&format!(
        "workers = 1\nbind = [\"127.0.0.1:0\"]\numask = \"0077\"\nchdir = \"{}\"\naccesslog = \"access.log\"\n",
        work.path().display()
    ));
    http::get(&server.addr(), "/health").unwrap();
    let log = work.path().join("access.log");
    assert!(
        crate::support::wait_until(BOUND, || log.exists()),
        "relative paths resolve in chdir"
    );
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&log).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "umask 0077 applied");
    assert!(
        work.path().join("data").is_dir(),
        "the default store path is under chdir"
    );
}

#[test]
fn x_forwarded_for_is_believed_only_from_trusted_peers() {
    let trusting = ServerProcess::start(&config(1, "accesslog = \"{dir}/access.log\"\n"));
    let distrusting = ServerProcess::start(&config(
        1,
        "accesslog = \"{dir}/access.log\"\nforwarded_allow_ips = []\n",
    ));
    for server in [&trusting, &distrusting] {
        let request = "GET /health HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 198.51.100.9, 203.0.113.7\r\nConnection: close\r\n\r\n";
        assert_eq!(
            http::send_raw(&server.addr(), request.as_bytes())
                .unwrap()
                .status,
            200
        );
    }
    let first_field = |server: &ServerProcess| {
        let log = server.path("access.log");
        assert!(crate::support::wait_until(BOUND, || {
            std::fs::read_to_string(&log).is_ok_and(|t| !t.is_empty())
        }));
        std::fs::read_to_string(&log)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        first_field(&trusting),
        "203.0.113.7",
        "loopback is trusted by default, as in Gunicorn"
    );
    assert_eq!(first_field(&distrusting), "127.0.0.1");
}

#[test]
fn the_master_loop_pets_systemds_watchdog_at_half_its_interval() {
    let (_dir, socket, notify) = notify_socket();
    let _server = ServerProcess::launch(
        &config(1, ""),
        Launch {
            env: &[
                ("NOTIFY_SOCKET", notify.as_str()),
                ("WATCHDOG_USEC", "400000"),
            ],
            ..Launch::default()
        },
    );
    let mut seen = Vec::new();
    assert!(read_until(&socket, "READY=1", &mut seen));
    let started = Instant::now();
    let mut pets = 0;
    while pets < 5 && started.elapsed() < BOUND {
        let mut more = Vec::new();
        if read_until(&socket, "WATCHDOG=1", &mut more) {
            pets += 1;
        }
    }
    assert_eq!(pets, 5);
    // Every 200 ms (half of 400 ms), give or take a loop tick: well under 5 x 400 ms.
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "{:?}",
        started.elapsed()
    );
}
