//! Supervision under abuse, with the real binary: a kill storm under keep-alive load, a worker
//! that can never boot, and a master killed while one of its workers is stopped.
//!
//! The kill storm runs 8 s here; `RAGPOOL_SOAK=1` runs the full 20 s of the issue.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::support::http;
use crate::support::{wait_until, Launch, ServerProcess};

const BOUND: Duration = Duration::from_secs(30);

/// Four workers on the embedded store with no LLM: `/api/ask` answers from the store itself.
fn storm_config(workers: usize) -> String {
    format!(
        "workers = {workers}\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\n[store]\npath = \"{{dir}}/data\"\n[llm]\nprovider = \"none\"\n[rag]\ningest_docs_on_first_run = false\n"
    )
}

/// One keep-alive HTTP/1.1 connection, reopened after an error.
struct KeepAlive {
    addr: String,
    stream: Option<BufReader<TcpStream>>,
}

impl KeepAlive {
    fn new(addr: &str) -> KeepAlive {
        KeepAlive {
            addr: addr.to_string(),
            stream: None,
        }
    }

    /// Sends `raw` (which must not say `Connection: close`) and reads one response: its status.
    fn request(&mut self, raw: &[u8]) -> std::io::Result<u16> {
        let result = self.try_request(raw);
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    fn try_request(&mut self, raw: &[u8]) -> std::io::Result<u16> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(&self.addr)?;
            stream.set_read_timeout(Some(http::IO_TIMEOUT))?;
            stream.set_write_timeout(Some(http::IO_TIMEOUT))?;
            self.stream = Some(BufReader::new(stream));
        }
        let reader = self.stream.as_mut().expect("connected above");
        reader.get_mut().write_all(raw)?;
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(bad("connection closed before the response"));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad status line"))?;
        let (mut length, mut chunked, mut close) = (0usize, false, false);
        loop {
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                return Err(bad("connection closed in the head"));
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap_or((header, ""));
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "content-length" => length = value.parse().map_err(|_| bad("content-length"))?,
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        if chunked {
            loop {
                line.clear();
                reader.read_line(&mut line)?;
                let size = usize::from_str_radix(line.trim(), 16).map_err(|_| bad("chunk size"))?;
                let mut chunk = vec![0; size + 2];
                reader.read_exact(&mut chunk)?;
                if size == 0 {
                    break;
                }
            }
        } else {
            let mut body = vec![0; length];
            reader.read_exact(&mut body)?;
        }
        if close {
            self.stream = None;
        }
        Ok(status)
    }
}

/// Threads on keep-alive connections, half on `/health`, half asking `/api/ask`.
struct KeepAliveLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl KeepAliveLoad {
    fn start(addr: &str, threads: usize) -> KeepAliveLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let handles = (0..threads)
            .map(|i| {
                let (stop, ok, failed, errors) =
                    (stop.clone(), ok.clone(), failed.clone(), errors.clone());
                let mut client = KeepAlive::new(addr);
                std::thread::spawn(move || {
                    let body = r#"{"question":"how do I reload the workers?"}"#;
                    let raw = if i % 2 == 0 {
                        "GET /health HTTP/1.1\r\nHost: t\r\n\r\n".to_string()
                    } else {
                        format!(
                            "POST /api/ask HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                            body.len()
                        )
                    };
                    let started = Instant::now();
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                        match client.request(raw.as_bytes()) {
                            Ok(200) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(status) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.lock().unwrap().push(format!("status {status}"));
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                errors.lock().unwrap().push(e.to_string());
                            }
                        }
                    }
                })
            })
            .collect();
        KeepAliveLoad {
            stop,
            ok,
            failed,
            errors,
            threads: handles,
        }
    }

    fn wait_for_progress(&self, n: u64, within: Duration) -> bool {
        let target = self.ok.load(Ordering::Relaxed) + n;
        wait_until(within, || self.ok.load(Ordering::Relaxed) >= target)
    }

    fn stop(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let errors = self.errors.lock().unwrap().clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

/// Ready workers as `/status` reports them; `None` when no answer came within a second.
fn ready_workers(addr: &str) -> Option<usize> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream
        .write_all(b"GET /status HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .ok()?;
    let response = http::read_response(&mut stream).ok()?;
    let status: serde_json::Value = serde_json::from_str(&response.body).ok()?;
    Some(
        status["workers"]
            .as_array()?
            .iter()
            .filter(|w| w["state"] == "ready")
            .count(),
    )
}

fn metric(addr: &str, series: &str) -> f64 {
    let text = http::get(addr, "/metrics").unwrap().body;
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// xorshift: which worker to kill needs spread, not quality.
fn next_random(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn a_kill_storm_under_keep_alive_load_never_leaves_fewer_than_three_of_four_workers_for_long() {
    let soak = std::env::var("RAGPOOL_SOAK").as_deref() == Ok("1");
    let storm = Duration::from_secs(if soak { 20 } else { 8 });
    let server = ServerProcess::start(&storm_config(4));
    let addr = server.addr();
    let load = KeepAliveLoad::start(&addr, 8);
    assert!(load.wait_for_progress(100, BOUND), "{}", server.logs());

    // Sample the ready workers every 100 ms, on its own thread.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (addr, sampling) = (addr.clone(), sampling.clone());
        std::thread::spawn(move || {
            let mut samples: Vec<(Instant, usize)> = Vec::new();
            let started = Instant::now();
            while sampling.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let at = Instant::now();
                // No answer within a second counts as no worker at all.
                samples.push((at, ready_workers(&addr).unwrap_or(0)));
                std::thread::sleep(Duration::from_millis(100).saturating_sub(at.elapsed()));
            }
            samples
        })
    };

    let mut seed = u64::from(std::process::id()) | 1;
    let mut kills = 0u64;
    let started = Instant::now();
    let mut next = started;
    while started.elapsed() < storm {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        next += Duration::from_millis(500);
        let workers = server.workers();
        if workers.is_empty() {
            continue;
        }
        let victim = workers[(next_random(&mut seed) % workers.len() as u64) as usize];
        if kill(Pid::from_raw(victim), Signal::SIGKILL).is_ok() {
            kills += 1;
        }
    }
    let storm_end = Instant::now();
    assert!(
        wait_until(BOUND, || ready_workers(&addr) == Some(4)),
        "the pool did not recover:\n{}",
        server.logs()
    );
    assert!(
        load.wait_for_progress(50, BOUND),
        "no progress after the storm"
    );
    sampling.store(false, Ordering::Relaxed);
    let samples = sampler.join().unwrap();
    let (ok, failed, errors) = load.stop();

    let during: Vec<&(Instant, usize)> = samples.iter().filter(|(t, _)| *t <= storm_end).collect();
    assert!(during.len() >= 20, "too few samples: {}", during.len());
    let fewest = during.iter().map(|(_, n)| *n).min().unwrap();
    let mean = during.iter().map(|(_, n)| *n as f64).sum::<f64>() / during.len() as f64;
    // The longest stretch of consecutive samples below 3, from its first low sample to the
    // first sample back at 3 or more.
    let mut longest_low = Duration::ZERO;
    let mut low_since: Option<Instant> = None;
    for (at, n) in &samples {
        match (low_since, *n < 3) {
            (None, true) => low_since = Some(*at),
            (Some(since), false) => {
                longest_low = longest_low.max(*at - since);
                low_since = None;
            }
            _ => {}
        }
    }
    let per_kill = failed as f64 / kills.max(1) as f64;
    eprintln!(
        "kill storm: {kills} kills in {storm:?}; live ready workers min {fewest}, mean {mean:.2} of 4 \
         over {} samples; longest below 3: {longest_low:?}; requests ok {ok}, failed {failed} \
         ({per_kill:.2} per kill)",
        during.len()
    );
    assert!(
        kills as f64 >= storm.as_secs_f64() * 2.0 - 2.0,
        "{kills} kills"
    );
    assert!(
        longest_low <= Duration::from_millis(1100),
        "below 3 ready workers for {longest_low:?} (min {fewest}, mean {mean:.2}):\n{}",
        server.logs()
    );
    // Only requests on a killed worker's connections fail (8 keep-alive connections over 4
    // workers: about 2 per kill), as connection errors, never as an error status.
    assert!(
        per_kill <= 3.0,
        "{failed} failed for {kills} kills: {errors:?}"
    );
    assert!(
        !errors.iter().any(|e| e.starts_with("status")),
        "{errors:?}"
    );
    // Every kill is one restart counted as a crash, exactly.
    assert_eq!(
        metric(&addr, "ragpool_worker_restarts_total{cause=\"crash\"}"),
        kills as f64,
        "{}",
        server.logs()
    );
    assert_eq!(server.count_in_log("keep failing"), 0, "{}", server.logs());
}

/// Utime + stime of a process in clock ticks (1/100 s on Linux).
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")": state is field 3 of stat(5), so utime (14) and stime (15) are at 11 and 12.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn a_worker_that_cannot_boot_backs_off_quietly_and_a_hup_with_a_fixed_config_recovers() {
    let server = ServerProcess::start(
        &storm_config(1).replace("accesslog = \"\"", "accesslog = \"{dir}/access.log\""),
    );
    let log = server.path("access.log");
    assert_eq!(http::get(&server.addr(), "/health").unwrap().status, 200);
    assert!(wait_until(BOUND, || log.exists()));
    // From now on no worker can open its access log: it is a directory.
    std::fs::remove_file(&log).unwrap();
    std::fs::create_dir(&log).unwrap();
    let serving = server.workers()[0];
    let boots_before = server.count_in_log("Booting worker");
    let cpu_before = cpu_ticks(server.pid());
    let watched = Instant::now();
    kill(Pid::from_raw(serving), Signal::SIGKILL).unwrap();

    // Backoff 0.1, 0.2, 0.4, 0.8, 1.6, 3.2 s: the seventh failure comes after 6.3 s.
    assert!(
        server.wait_for_log("next spawn in 3.2s", BOUND),
        "{}",
        server.logs()
    );
    let elapsed = watched.elapsed();
    let cpu = cpu_ticks(server.pid()) - cpu_before;
    let logs = server.logs();
    assert!(
        elapsed >= Duration::from_millis(2900),
        "backoff too short: {elapsed:?}"
    );
    let boots = server.count_in_log("Booting worker") - boots_before;
    assert!(
        (6..=7).contains(&boots),
        "{boots} boots in {elapsed:?}:\n{logs}"
    );
    for step in ["100ms", "200ms", "400ms", "800ms", "1.6s", "3.2s"] {
        assert_eq!(
            server.count_in_log(&format!("; next spawn in {step}")),
            1,
            "each backoff step logged once: {step}\n{logs}"
        );
    }
    // The worker's own error, once per failed boot in the master's log.
    let failures = server.count_in_log(") failed to boot: cannot open access log");
    assert_eq!(failures, server.count_in_log("; next spawn in"), "{logs}");
    assert!(failures >= 6, "{logs}");
    // The master idles while it waits (100 ticks = 1 s of CPU).
    assert!(cpu <= 30, "master used {cpu} ticks of CPU in {elapsed:?}");

    // A fixed config (another log path) recovers at the next HUP, without waiting for the backoff.
    server.rewrite_config(
        &storm_config(1).replace("accesslog = \"\"", "accesslog = \"{dir}/access2.log\""),
    );
    server.signal(Signal::SIGHUP);
    assert!(
        server.wait_for_log("Reload complete: generation 2 is serving", BOUND),
        "{}",
        server.logs()
    );
    assert_eq!(http::get(&server.addr(), "/health").unwrap().status, 200);
    let failures_after = server.count_in_log("failed to boot: cannot open access log");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        server.count_in_log("failed to boot: cannot open access log"),
        failures_after,
        "the failing seat is gone with its generation:\n{}",
        server.logs()
    );
}

fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
    }
}

#[test]
fn a_stopped_worker_does_not_outlive_a_killed_master_so_a_new_master_binds_the_port() {
    // Its own session, as under systemd: the kernel's orphaned-process-group SIGCONT does not
    // apply, so only the worker's own guard can get it going again.
    let first = ServerProcess::launch(
        &storm_config(2),
        Launch {
            new_session: true,
            ..Launch::default()
        },
    );
    assert!(first.wait_for_log("are serving", BOUND), "{}", first.logs());
    let addr = first.addr();
    assert_eq!(http::get(&addr, "/health").unwrap().status, 200);
    let workers = first.workers();
    assert_eq!(workers.len(), 2);
    kill(Pid::from_raw(workers[0]), Signal::SIGSTOP).unwrap();
    kill(Pid::from_raw(first.pid()), Signal::SIGKILL).unwrap();
    let killed = Instant::now();

    assert!(
        wait_until(Duration::from_secs(5), || workers
            .iter()
            .all(|p| is_gone(*p))),
        "workers {workers:?} outlived their master by 5 s"
    );
    assert!(
        wait_until(
            Duration::from_secs(5).saturating_sub(killed.elapsed()),
            || { TcpListener::bind(&addr).is_ok() }
        ),
        "{addr} still held 5 s after the master died"
    );
    let freed = killed.elapsed();
    let second = ServerProcess::start(&storm_config(1).replace("127.0.0.1:0", &addr));
    assert_eq!(second.addr(), addr);
    assert_eq!(http::get(&addr, "/health").unwrap().status, 200);
    eprintln!("port free {freed:?} after the master's SIGKILL");
}
