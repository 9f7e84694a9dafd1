//! Boot, supervision and shutdown of the real binary, driven by real signals.

use std::collections::HashSet;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config;
use crate::support::http::{self, read_response};
use crate::support::load::Load;
use crate::support::{exists, wait_until, ServerProcess};

const BOUND: Duration = Duration::from_secs(20);

fn pid_of(response: &http::Response) -> i32 {
    response.json()["pid"].as_i64().expect("pid in /health") as i32
}

#[test]
fn n_workers_boot_and_every_one_serves() {
    let server = ServerProcess::start(&config(3, ""));
    let workers: HashSet<i32> = server.workers().into_iter().collect();
    assert_eq!(workers.len(), 3);
    let mut answered = HashSet::new();
    let all_answered = wait_until(BOUND, || {
        let response = http::get(&server.addr(), "/health").unwrap();
        assert_eq!(response.status, 200);
        assert!(response.json()["pid"].is_number());
        answered.insert(pid_of(&response));
        answered == workers
    });
    assert!(
        all_answered,
        "answered by {answered:?}, workers {workers:?}"
    );
}

#[test]
fn a_killed_worker_is_replaced_and_service_never_stops() {
    let server = ServerProcess::start(&config(2, ""));
    let before = server.workers();
    let load = Load::start(&server.addr(), 4);
    assert!(load.wait_for_progress(50, BOUND));
    kill(Pid::from_raw(before[0]), Signal::SIGKILL).unwrap();
    assert!(
        wait_until(BOUND, || {
            let now = server.workers();
            now.len() == 2 && !now.contains(&before[0])
        }),
        "no replacement: {:?}",
        server.workers()
    );
    assert!(
        load.wait_for_progress(200, BOUND),
        "service stopped answering"
    );
    let report = load.stop();
    // Only connections the killed worker had already accepted can fail: at most one per thread.
    assert!(report.failed <= 4, "{report:?}");
    assert!(
        server.logs().contains("killed by SIGKILL"),
        "{}",
        server.logs()
    );
}

#[test]
fn term_lets_a_slow_request_finish_then_exits_zero() {
    let mut server = ServerProcess::start(&config(1, "graceful_timeout = 10\n"));
    // A slow client: half a request head now, the rest after TERM has arrived.
    let mut slow = TcpStream::connect(server.addr()).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n")
        .unwrap();
    server.signal(Signal::SIGTERM);
    assert!(
        server.wait_for_log("worker draining", BOUND),
        "{}",
        server.logs()
    );
    assert!(
        server.wait_exit(Duration::from_millis(300)).is_none(),
        "exited with a request in flight"
    );
    slow.write_all(b"Connection: keep-alive\r\n\r\n").unwrap();
    let response = read_response(&mut slow).unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(
        response.header("connection"),
        Some("close"),
        "draining closes after the response"
    );
    let status = server
        .wait_exit(BOUND)
        .expect("master exits after the drain");
    assert_eq!(status.code(), Some(0), "{}", server.logs());
}

#[test]
fn connections_queued_in_the_backlog_at_term_are_served() {
    let mut server = ServerProcess::start(&config(1, "graceful_timeout = 10\n"));
    let worker = server.workers()[0];
    // Freeze the only worker so new connections wait in the kernel's listen queue.
    kill(Pid::from_raw(worker), Signal::SIGSTOP).unwrap();
    let mut queued: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut s = TcpStream::connect(server.addr()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    server.signal(Signal::SIGTERM);
    assert!(server.wait_for_log("graceful shutdown", BOUND));
    kill(Pid::from_raw(worker), Signal::SIGCONT).unwrap();
    for stream in &mut queued {
        assert_eq!(read_response(stream).unwrap().status, 200);
    }
    assert_eq!(
        server.wait_exit(BOUND).and_then(|s| s.code()),
        Some(0),
        "{}",
        server.logs()
    );
}

#[test]
fn int_exits_quickly_even_with_a_client_mid_request() {
    let mut server = ServerProcess::start(&config(2, "graceful_timeout = 60\n"));
    let mut slow = TcpStream::connect(server.addr()).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    let started = Instant::now();
    server.signal(Signal::SIGINT);
    let status = server.wait_exit(BOUND).expect("master exits");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{}", server.logs());
}

#[test]
fn ttin_adds_and_ttou_removes_workers_never_below_one() {
    let server = ServerProcess::start(&config(2, ""));
    server.signal(Signal::SIGTTIN);
    assert!(server.wait_for_workers(3, BOUND), "{:?}", server.workers());
    server.signal(Signal::SIGTTOU);
    assert!(server.wait_for_log("target is now 2 workers", BOUND));
    assert!(server.wait_for_workers(2, BOUND), "{:?}", server.workers());
    // Standard signals sent back to back may merge into one, so wait for each to be handled.
    for n in 1..=3 {
        server.signal(Signal::SIGTTOU);
        assert!(
            server.wait_for_log_count("target is now 1 workers", n, BOUND),
            "{}",
            server.logs()
        );
    }
    assert!(server.wait_for_workers(1, BOUND), "{:?}", server.workers());
    assert_eq!(http::get(&server.addr(), "/health").unwrap().status, 200);
}

#[test]
fn a_hung_worker_is_killed_after_timeout_and_replaced() {
    let server = ServerProcess::start(&config(2, "timeout = 1\n"));
    let hung = server.workers()[0];
    kill(Pid::from_raw(hung), Signal::SIGSTOP).unwrap();
    let started = Instant::now();
    assert!(
        wait_until(BOUND, || {
            let now = server.workers();
            now.len() == 2 && !now.contains(&hung)
        }),
        "{}",
        server.logs()
    );
    // timeout (1 s) + SIGABRT grace (2 s) + a tick: well under 10 s.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let logs = server.logs();
    assert!(
        logs.contains(&format!("WORKER TIMEOUT (pid: {hung})")),
        "{logs}"
    );
    assert!(logs.contains("killed by SIGKILL"), "{logs}");
    assert_eq!(http::get(&server.addr(), "/health").unwrap().status, 200);
}

#[test]
fn max_requests_recycles_workers_without_a_capacity_dip() {
    let server = ServerProcess::start(&config(2, "max_requests = 40\nmax_requests_jitter = 10\n"));
    let first = server.workers();
    let load = Load::start(&server.addr(), 3);
    let mut fewest = usize::MAX;
    let recycled_both = wait_until(Duration::from_secs(60), || {
        let now = server.workers();
        fewest = fewest.min(now.len());
        server.count_in_log("(max_requests); recycling") >= 4
            && !now.iter().any(|p| first.contains(p))
    });
    let report = load.stop();
    assert!(recycled_both, "{}", server.logs());
    assert_eq!(report.failed, 0, "{report:?}");
    assert!(fewest >= 2, "worker count dipped to {fewest}");
    // The replacement was started before its predecessor was told to go.
    let logs = server.logs();
    let first_replacement = logs
        .match_indices("Booting worker with pid")
        .nth(2)
        .map(|(i, _)| i);
    let first_retirement = logs.find("Retiring worker");
    assert!(
        first_replacement.unwrap() < first_retirement.unwrap(),
        "{logs}"
    );
}

#[test]
fn listens_on_a_unix_socket_and_replaces_a_stale_one() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ragpool.sock");
    // A stale socket file left by a crashed server.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(exists(&sock));
    let doc = format!(
        "workers = 2\nbind = [\"unix:{}\"]\naccesslog = \"\"\n",
        sock.display()
    );
    let mut server = ServerProcess::start(&doc);
    let response = http::get_unix(&sock, "/health").unwrap();
    assert_eq!(response.status, 200);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660);
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(BOUND).and_then(|s| s.code()), Some(0));
    assert!(!exists(&sock), "socket file removed on exit");
}

#[test]
fn a_first_generation_that_cannot_boot_stops_the_master_with_the_reason() {
    let mut server = ServerProcess::spawn(
        &config(2, "accesslog = \"{dir}/missing/dir/access.log\"\n"),
        &[],
    );
    let status = server
        .wait_exit(BOUND)
        .expect("master gives up instead of looping");
    assert_eq!(status.code(), Some(3), "{}", server.logs());
    assert!(status.signal().is_none());
    let logs = server.logs();
    assert!(logs.contains("worker failed to boot"), "{logs}");
    assert!(logs.contains("cannot open access log"), "{logs}");
    assert!(logs.contains("missing/dir/access.log"), "{logs}");
    assert!(
        server.count_in_log("Booting worker") <= 2,
        "no crash loop: {logs}"
    );
}

#[test]
fn pidfile_is_written_and_removed_and_a_live_one_is_refused() {
    let mut server = ServerProcess::start(&config(1, "pidfile = \"{dir}/ragpool.pid\"\n"));
    let pidfile = server.path("ragpool.pid");
    let written: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(written, server.pid());

    // A second master pointed at the same pidfile refuses to start.
    let doc = format!(
        "workers = 1\nbind = [\"127.0.0.1:0\"]\npidfile = \"{}\"\n",
        pidfile.display()
    );
    let mut second = ServerProcess::spawn(&doc, &[]);
    let status = second.wait_exit(BOUND).expect("second master exits");
    assert_ne!(status.code(), Some(0));
    assert!(second.logs().contains("still running"), "{}", second.logs());

    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(BOUND).and_then(|s| s.code()), Some(0));
    assert!(!pidfile.exists());
}

#[test]
fn access_log_has_one_line_per_request_with_status_and_pid() {
    let server = ServerProcess::start(&config(1, "accesslog = \"{dir}/access.log\"\n"));
    for path in ["/health", "/missing"] {
        http::get(&server.addr(), path).unwrap();
    }
    let log = server.path("access.log");
    assert!(wait_until(BOUND, || std::fs::read_to_string(&log)
        .map(|t| t.lines().count() >= 2)
        .unwrap_or(false)));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let worker = server.workers()[0];
    assert!(lines[0].starts_with("127.0.0.1 - - ["), "{text}");
    assert!(lines[0].contains("\"GET /health HTTP/1.1\" 200 "), "{text}");
    assert!(
        lines[1].contains("\"GET /missing HTTP/1.1\" 404 "),
        "{text}"
    );
    assert!(lines[1].ends_with(&format!(" {worker}")), "{text}");
}

#[test]
fn reuse_port_gives_each_worker_its_own_socket_and_all_serve() {
    let mut server = ServerProcess::start(&config(3, "reuse_port = true\n"));
    let workers: HashSet<i32> = server.workers().into_iter().collect();
    let mut answered = HashSet::new();
    assert!(wait_until(BOUND, || {
        answered.insert(pid_of(&http::get(&server.addr(), "/health").unwrap()));
        answered == workers
    }));
    // One listening socket per worker on the port; the master's own socket only holds the port.
    let port: u16 = server.addr().rsplit(':').next().unwrap().parse().unwrap();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let listening = table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f[1].ends_with(&format!(":{port:04X}")) && f[3] == "0A"
        })
        .count();
    assert_eq!(listening, 3);
    server.signal(Signal::SIGTERM);
    assert_eq!(server.wait_exit(BOUND).and_then(|s| s.code()), Some(0));
}

#[test]
fn a_worker_over_max_worker_memory_is_recycled_replacement_first() {
    // 1 MiB is below any real worker's RSS, so every worker is recycled as soon as it is seen.
    let server = ServerProcess::start(&config(1, "max_worker_memory = 1\n"));
    let first = server.workers()[0];
    let load = Load::start(&server.addr(), 2);
    assert!(
        wait_until(BOUND, || !server.workers().contains(&first)),
        "{}",
        server.logs()
    );
    assert!(load.wait_for_progress(20, BOUND));
    let report = load.stop();
    assert_eq!(report.failed, 0, "{report:?}");
    let logs = server.logs();
    assert!(
        logs.contains(&format!("Worker (pid: {first}) uses")),
        "{logs}"
    );
    let replacement_booted = logs
        .match_indices("Booting worker with pid")
        .nth(1)
        .map(|(i, _)| i)
        .unwrap();
    let first_retired = logs
        .find(&format!("Retiring worker (pid: {first}"))
        .unwrap();
    assert!(replacement_booted < first_retired, "{logs}");
}

#[test]
fn a_worker_killed_after_serving_is_replaced_at_once_however_often_it_happens() {
    // Eight kills in a row of the only worker, each as soon as it answers: not a crash loop
    // (each one booted and served), so no backoff: every replacement serves within seconds.
    let server = ServerProcess::start(&config(1, ""));
    let mut slowest = Duration::ZERO;
    let mut previous = None;
    for kill_number in 1..=8 {
        let mut pid = None;
        assert!(
            wait_until(BOUND, || {
                pid = http::get(&server.addr(), "/health")
                    .ok()
                    .filter(|r| r.status == 200)
                    .map(|r| pid_of(&r))
                    .filter(|p| Some(*p) != previous);
                pid.is_some()
            }),
            "no new worker answered before kill {kill_number}:\n{}",
            server.logs()
        );
        let victim = pid.unwrap();
        kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
        let killed_at = Instant::now();
        assert!(
            wait_until(BOUND, || http::get(&server.addr(), "/health")
                .is_ok_and(|r| r.status == 200 && pid_of(&r) != victim)),
            "{}",
            server.logs()
        );
        slowest = slowest.max(killed_at.elapsed());
        previous = Some(victim);
    }
    // The old crash-loop backoff had reached 12.8 s by the eighth kill.
    assert!(
        slowest < Duration::from_secs(3),
        "slowest replacement {slowest:?}"
    );
    let logs = server.logs();
    assert_eq!(server.count_in_log("keep failing"), 0, "{logs}");
    assert_eq!(server.count_in_log("killed by SIGKILL"), 8, "{logs}");
}

#[test]
fn usr1_reopens_the_access_log_after_rotation() {
    let server = ServerProcess::start(&config(1, "accesslog = \"{dir}/access.log\"\n"));
    let log = server.path("access.log");
    http::get(&server.addr(), "/health").unwrap();
    assert!(wait_until(BOUND, || log.exists()));
    std::fs::rename(&log, server.path("access.log.1")).unwrap();
    server.signal(Signal::SIGUSR1);
    assert!(server.wait_for_log("reopening log files", BOUND));
    assert!(wait_until(BOUND, || {
        http::get(&server.addr(), "/health").unwrap();
        std::fs::read_to_string(&log)
            .map(|t| t.contains("/health"))
            .unwrap_or(false)
    }));
}
