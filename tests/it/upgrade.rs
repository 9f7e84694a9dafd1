//! USR2: binary upgrades under load, and a failed upgrade that leaves the old master serving.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config;
use crate::support::http;
use crate::support::load::Load;
use crate::support::{children_of, wait_until, Launch, ServerProcess, BIN};

const BOUND: Duration = Duration::from_secs(30);

/// Alive and not a zombie.
fn is_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A copy of the binary the test may replace, as an operator replaces the installed one.
fn installed_copy(dir: &Path) -> PathBuf {
    let path = dir.join("ragpool-installed");
    std::fs::copy(BIN, &path).unwrap();
    path
}

/// A server running an installed copy of the binary (which the test may replace), with a
/// pidfile, once it serves. Keep the returned dir alive as long as the server.
fn serve_installed_copy(workers: usize) -> (tempfile::TempDir, PathBuf, ServerProcess) {
    let bin_dir = tempfile::tempdir().unwrap();
    let binary = installed_copy(bin_dir.path());
    let server = ServerProcess::launch(
        &config(workers, "pidfile = \"{dir}/ragpool.pid\"\n"),
        Launch {
            binary: Some(&binary),
            ..Launch::default()
        },
    );
    assert!(
        server.wait_for_log("are serving", BOUND),
        "{}",
        server.logs()
    );
    (bin_dir, binary, server)
}

#[test]
fn a_load_running_across_five_binary_upgrades_sees_zero_failed_requests() {
    let (_bin_dir, _binary, server) = serve_installed_copy(2);
    let pidfile = server.path("ragpool.pid");
    let oldbin = server.path("ragpool.pid.oldbin");
    let load = Load::start(&server.addr(), 4);
    assert!(load.wait_for_progress(50, BOUND));
    let mut master = read_pid(&pidfile).unwrap();
    for n in 1..=5 {
        kill(Pid::from_raw(master), Signal::SIGUSR2).unwrap();
        let mut successor = 0;
        assert!(
            wait_until(BOUND, || {
                successor = read_pid(&pidfile).unwrap_or(0);
                successor != master
                    && successor != 0
                    && server.count_in_log("Upgrade complete") >= n
            }),
            "upgrade {n} did not complete:\n{}",
            server.logs()
        );
        assert!(
            wait_until(BOUND, || !is_running(master)),
            "old master {master} still running"
        );
        assert!(
            !oldbin.exists(),
            "the old master removed its .oldbin pidfile"
        );
        assert_eq!(
            children_of(successor).len(),
            2,
            "the new master runs the configured workers"
        );
        assert!(
            load.wait_for_progress(50, BOUND),
            "no progress after upgrade {n}"
        );
        master = successor;
    }
    let report = load.stop();
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(report.ok > 500, "{report:?}");
}

#[test]
fn an_upgrade_waits_for_a_new_binary_still_open_for_writing() {
    let (bin_dir, binary, server) = serve_installed_copy(1);
    let pidfile = server.path("ragpool.pid");
    let master = server.pid();
    // A package manager has renamed the new binary into place but still holds it open for
    // writing (or a process forked meanwhile does): executing it fails with ETXTBSY for now.
    let new = bin_dir.path().join("ragpool-new");
    std::fs::copy(BIN, &new).unwrap();
    let writer = std::fs::OpenOptions::new().write(true).open(&new).unwrap();
    std::fs::rename(&new, &binary).unwrap();
    server.signal(Signal::SIGUSR2);
    // The writer finishes within the master's retry window (not a synchronisation: the
    // scenario's own timing).
    std::thread::sleep(Duration::from_millis(300));
    drop(writer);
    assert!(
        wait_until(BOUND, || {
            server.count_in_log("Upgrade complete") >= 1
                && read_pid(&pidfile).is_some_and(|pid| pid != master)
        }),
        "{}",
        server.logs()
    );
    assert!(
        !server.logs().contains("Upgrade failed"),
        "{}",
        server.logs()
    );
    assert!(wait_until(BOUND, || !is_running(master)));
    let successor = read_pid(&pidfile).unwrap();
    assert!(wait_until(BOUND, || children_of(successor).len() == 1));
    assert_eq!(http::get(&server.addr(), "/health").unwrap().status, 200);
}

#[test]
fn a_new_binary_that_cannot_boot_leaves_the_old_master_serving() {
    let (bin_dir, binary, server) = serve_installed_copy(2);
    let pidfile = server.path("ragpool.pid");
    let workers = server.workers();
    // "Install" a broken binary: replace the file, as a package upgrade does (rename over it).
    let broken = bin_dir.path().join("broken");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'broken build: refusing to start' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&broken, &binary).unwrap();

    server.signal(Signal::SIGUSR2);
    assert!(
        server.wait_for_log("Upgrade failed", BOUND),
        "{}",
        server.logs()
    );
    assert!(server.logs().contains("broken build: refusing to start"));
    assert_eq!(
        read_pid(&pidfile),
        Some(server.pid()),
        "the pidfile is ours again"
    );
    assert!(!server.path("ragpool.pid.oldbin").exists());
    assert_eq!(server.workers(), workers, "the same workers keep serving");
    assert_eq!(http::get(&server.addr(), "/health").unwrap().status, 200);
    // And a later HUP still works: the master is fully in charge.
    server.signal(Signal::SIGHUP);
    assert!(
        server.wait_for_log("Reload complete", BOUND),
        "{}",
        server.logs()
    );
}

#[test]
fn an_upgrade_hands_systemd_the_new_main_pid_and_never_says_stopping() {
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let notify = notify_path.display().to_string();
    let bin_dir = tempfile::tempdir().unwrap();
    let binary = installed_copy(bin_dir.path());
    let server = ServerProcess::launch(
        &config(1, "pidfile = \"{dir}/ragpool.pid\"\n"),
        Launch {
            binary: Some(&binary),
            env: &[("NOTIFY_SOCKET", notify.as_str())],
            ..Launch::default()
        },
    );
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    let mut read_until = |needle: &str, messages: &mut Vec<String>| {
        wait_until(BOUND, || {
            if let Ok(n) = socket.recv(&mut buf) {
                messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            messages.iter().any(|m| m.contains(needle))
        })
    };
    assert!(read_until("READY=1", &mut messages), "{messages:?}");
    server.signal(Signal::SIGUSR2);
    assert!(
        read_until("MAINPID=", &mut messages),
        "{messages:?}\n{}",
        server.logs()
    );
    let announced: i32 = messages
        .iter()
        .find_map(|m| m.lines().find_map(|l| l.strip_prefix("MAINPID=")))
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(announced, server.pid());
    assert_eq!(read_pid(&server.path("ragpool.pid")), Some(announced));
    // The old master drains and exits without telling systemd the service is stopping.
    assert!(wait_until(BOUND, || !is_running(server.pid())));
    while let Ok(n) = socket.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        !messages.iter().any(|m| m.contains("STOPPING=1")),
        "{messages:?}"
    );
}

fn parent_of(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))?
        .trim()
        .parse()
        .ok()
}

/// What systemd gives a socket-activated, watchdog-supervised service: sockets by
/// systemd-socket-activate (LISTEN_FDS/LISTEN_PID), WATCHDOG_USEC with WATCHDOG_PID naming the
/// master (set by a shell that then execs it, so `$$` is the master's pid), a NOTIFY_SOCKET.
#[test]
fn an_upgrade_keeps_the_activated_socket_pets_the_watchdog_and_leaves_the_old_masters_tree() {
    if !Path::new("/usr/bin/systemd-socket-activate").exists() {
        panic!("systemd-socket-activate is missing: apt-get install systemd (CI installs it)");
    }
    let sockets = tempfile::tempdir().unwrap();
    let socket_path = sockets.path().join("activated.sock");
    let listen = socket_path.display().to_string();
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    // systemd-socket-activate clears the environment but for what -E names.
    let notify_env = format!("NOTIFY_SOCKET={}", notify_path.display());
    let server = ServerProcess::launch(
        // `bind` names a TCP port: under activation, before and after the upgrade, it is ignored.
        &config(1, ""),
        Launch {
            wrapper: &[
                "systemd-socket-activate",
                "-l",
                &listen,
                "-E",
                &notify_env,
                "-E",
                "WATCHDOG_USEC=1000000",
                "sh",
                "-c",
                "WATCHDOG_PID=$$ exec \"$0\" \"$@\"",
            ],
            ..Launch::default()
        },
    );
    // The first connection triggers the activation (systemd-socket-activate execs on it).
    let mut last = None;
    assert!(
        wait_until(BOUND, || {
            last = Some(http::get_unix(&socket_path, "/health"));
            last.as_ref()
                .unwrap()
                .as_ref()
                .is_ok_and(|r| r.status == 200)
        }),
        "{last:?}\n{}",
        server.logs()
    );
    let mut messages = Vec::new();
    let mut buf = [0u8; 4096];
    let mut read = |messages: &mut Vec<String>| {
        if let Ok(n) = notify.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    assert!(wait_until(BOUND, || {
        read(&mut messages);
        messages.iter().any(|m| m.contains("READY=1"))
    }));
    assert!(messages.iter().any(|m| m.contains("WATCHDOG=1")));

    server.signal(Signal::SIGUSR2);
    assert!(
        wait_until(BOUND, || {
            read(&mut messages);
            messages.iter().any(|m| m.contains("MAINPID="))
        }),
        "{messages:?}\n{}",
        server.logs()
    );
    let new_master: i32 = messages
        .iter()
        .find_map(|m| m.lines().find_map(|l| l.strip_prefix("MAINPID=")))
        .unwrap()
        .parse()
        .unwrap();
    // Not the old master's child: under systemd it is PID 1's (the service manager's).
    assert_ne!(parent_of(new_master), Some(server.pid()));
    assert!(wait_until(BOUND, || !is_running(server.pid())));
    // Only the new master is left to pet the watchdog, and it does, more than once.
    messages.clear();
    assert!(
        wait_until(BOUND, || {
            read(&mut messages);
            messages.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2
        }),
        "the new master does not pet the watchdog: {messages:?}\n{}",
        server.logs()
    );
    // It serves the activated socket, whose file the old master's exit left in place, and
    // bound nothing of its own.
    assert!(
        socket_path.exists(),
        "the activated socket's file was removed"
    );
    assert_eq!(http::get_unix(&socket_path, "/health").unwrap().status, 200);
    let logs = server.logs();
    let new_master_lines = format!("[{new_master}] [INFO] Listening at: ");
    assert!(
        logs.contains(&format!("{new_master_lines}unix:{listen}")),
        "{logs}"
    );
    assert!(!logs.contains("Listening at: http://"), "{logs}");
    let _ = kill(Pid::from_raw(new_master), Signal::SIGTERM);
    assert!(wait_until(BOUND, || !is_running(new_master)));
    assert!(
        socket_path.exists(),
        "the new master removed systemd's socket file"
    );
}
