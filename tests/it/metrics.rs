//! Observability: `/metrics` (checked by a real Prometheus text parser), `/status`,
//! `ragpool status`, exact pool-wide counts across worker deaths, and access control.

use std::collections::HashSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config;
use crate::support::http::{self, send_raw};
use crate::support::{wait_until, ServerProcess, BIN};

const BOUND: Duration = Duration::from_secs(30);

/// The value of one sample line (`name{labels} value`), 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn metrics(addr: &str) -> String {
    let response = http::get(addr, "/metrics").unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(response
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    response.body
}

#[test]
fn the_exposition_parses_with_prometheus_own_parser() {
    let server = ServerProcess::start(&config(2, ""));
    for path in ["/health", "/", "/nope"] {
        http::get(&server.addr(), path).unwrap();
    }
    let text = metrics(&server.addr());
    let check = "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as parse\n\
                 names = sorted({f.name for f in parse(sys.stdin.read())})\nprint(len(names)); print(' '.join(names))";
    let python = Command::new("python3")
        .args(["-c", check])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut python) = python else {
        panic!("python3 is needed for this test")
    };
    python
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = python.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("No module named 'prometheus_client'") {
        assert!(
            std::env::var("RAGPOOL_REQUIRE_PROMETHEUS_CLIENT").is_err(),
            "pip install prometheus_client"
        );
        eprintln!("skipped: pip install prometheus_client to parse the exposition");
        return;
    }
    assert!(
        out.status.success(),
        "the parser rejected the exposition: {stderr}\n{text}"
    );
    let names = String::from_utf8_lossy(&out.stdout);
    for family in [
        "ragpool_http_requests",
        "ragpool_http_request_duration_seconds",
        "ragpool_worker_restarts",
        "ragpool_workers_up",
        "ragpool_rag_stage_duration_seconds",
        "ragpool_upstream_errors",
        "ragpool_store_documents",
    ] {
        assert!(
            names.split_whitespace().any(|n| n == family),
            "{family} missing: {names}"
        );
    }
}

#[test]
fn counts_are_exact_across_workers_and_survive_a_killed_worker() {
    let server = ServerProcess::start(&config(3, ""));
    let addr = server.addr();
    let series = "ragpool_http_requests_total{route=\"page\",status=\"200\"}";
    for _ in 0..150 {
        assert_eq!(http::get(&addr, "/").unwrap().status, 200);
    }
    assert_eq!(sample(&metrics(&addr), series), 150.0);
    let victim = server.workers()[0];
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    assert!(wait_until(BOUND, || {
        let now = server.workers();
        now.len() == 3 && !now.contains(&victim)
    }));
    for _ in 0..150 {
        assert_eq!(http::get(&addr, "/").unwrap().status, 200);
    }
    let text = metrics(&addr);
    assert_eq!(
        sample(&text, series),
        300.0,
        "the killed worker's share stays in the pool's count"
    );
    assert_eq!(
        sample(&text, "ragpool_worker_restarts_total{cause=\"crash\"}"),
        1.0
    );
    assert_eq!(sample(&text, "ragpool_workers_up"), 3.0);
    assert_eq!(
        sample(
            &text,
            "ragpool_http_request_duration_seconds_count{route=\"page\"}"
        ),
        300.0
    );
}

#[test]
fn reloads_and_recycling_are_counted_by_cause() {
    let server = ServerProcess::start(&config(2, "max_requests = 20\n"));
    let addr = server.addr();
    server.signal(Signal::SIGHUP);
    assert!(server.wait_for_log("Reload complete", BOUND));
    for _ in 0..80 {
        http::get(&addr, "/health").unwrap();
    }
    assert!(wait_until(BOUND, || sample(
        &metrics(&addr),
        "ragpool_worker_restarts_total{cause=\"max_requests\"}"
    ) >= 1.0));
    let text = metrics(&addr);
    assert_eq!(
        sample(&text, "ragpool_worker_restarts_total{cause=\"reload\"}"),
        2.0,
        "{text}"
    );
    assert_eq!(sample(&text, "ragpool_generation"), 2.0);
    assert_eq!(sample(&text, "ragpool_last_reload_success"), 1.0);
    assert!(sample(&text, "ragpool_last_reload_timestamp_seconds") > 1.7e9);
}

#[test]
fn status_lists_exactly_the_live_workers_and_the_cli_shows_them() {
    let server = ServerProcess::start(&config(2, ""));
    let status = http::get(&server.addr(), "/status").unwrap().json();
    let listed: HashSet<i64> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    let live: HashSet<i64> = server.workers().into_iter().map(i64::from).collect();
    assert_eq!(listed, live);
    assert_eq!(status["master_pid"].as_i64(), Some(i64::from(server.pid())));
    assert!(status["config_path"]
        .as_str()
        .unwrap()
        .ends_with("workers.toml"));
    assert!(status["workers"][0]["rss_bytes"].as_u64().is_some());

    // The CLI reads the same config, finds the bound address and prints a table.
    let addr = server.addr();
    std::fs::write(
        &server.config_path,
        format!("workers = 2\nbind = [\"{addr}\"]\n"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["status", "--config"])
        .arg(&server.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with(&format!("master {}", server.pid())),
        "{table}"
    );
    for pid in &live {
        assert!(
            table
                .lines()
                .any(|l| l.trim_start().starts_with(&pid.to_string()) && l.contains("ready")),
            "{table}"
        );
    }
}

#[test]
fn internal_endpoints_refuse_clients_from_elsewhere_unless_they_hold_the_token() {
    let server = ServerProcess::start(&config(1, "admin_token = \"ops\"\n"));
    let addr = server.addr();
    // A request nginx forwards for a remote client (loopback peer, X-Forwarded-For set).
    let forwarded = |path: &str, extra: &str| {
        let raw = format!("GET {path} HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.7\r\n{extra}Connection: close\r\n\r\n");
        send_raw(&addr, raw.as_bytes()).unwrap()
    };
    for path in ["/metrics", "/status"] {
        assert_eq!(forwarded(path, "").status, 403, "{path}");
        assert_eq!(
            forwarded(path, "Authorization: Bearer wrong\r\n").status,
            403,
            "{path}"
        );
        assert_eq!(
            forwarded(path, "Authorization: Bearer ops\r\n").status,
            200,
            "{path}"
        );
        assert_eq!(
            http::get(&addr, path).unwrap().status,
            200,
            "{path} from loopback"
        );
    }
    assert_eq!(
        forwarded("/health", "").status,
        200,
        "the public endpoints stay public"
    );
}
