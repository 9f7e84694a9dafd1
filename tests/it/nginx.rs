//! ragpool behind Debian's real nginx running the SHIPPED deploy/nginx/ragpool.conf (only the
//! upstream address and the listen port rewritten; see tests/it/support/nginx.rs): the config
//! passes `nginx -t`, requests reach the workers over the unix-socket and TCP upstreams, answers
//! stream token by token, only the stream location is unbuffered, the API is rate limited per
//! client, /metrics and /status are for loopback only, nginx forwards the client's address and
//! closes idle upstream connections before ragpool would, and a HUP reload behind nginx fails
//! no request.
//!
//! Without nginx these tests print a skip message and pass, unless RAGPOOL_REQUIRE_NGINX=1 (CI).

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;

use crate::support::fake_ollama::{FakeOllama, FakeOptions};
use crate::support::http::{self, post};
use crate::support::load::Load;
use crate::support::nginx::{
    connect_small_window, get_from, require_nginx, send_from, time_stream, NginxSite, RawUpstream,
    Upstream, BULK_BYTES,
};
use crate::support::{wait_until, ServerProcess};

const BOUND: Duration = Duration::from_secs(30);
/// nginx's `$remote_addr` for ordinary test traffic, and for "another client".
const LOOPBACK: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// workers.toml: the given bind, an access log in the test dir, no LLM, no first-run ingest.
fn app_config(workers: usize, bind: &str, extra: &str) -> String {
    format!(
        "workers = {workers}\nbind = [\"{bind}\"]\naccesslog = \"{{dir}}/access.log\"\n{extra}\n\
         [store]\npath = \"{{dir}}/data\"\n\
         [llm]\nprovider = \"none\"\n[rag]\ningest_docs_on_first_run = false\n"
    )
}

/// The lines of ragpool's access log that contain `needle`.
fn access_lines(server: &ServerProcess, needle: &str) -> Vec<String> {
    std::fs::read_to_string(server.path("access.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

#[test]
fn nginx_t_accepts_the_shipped_site() {
    let Some(nginx) = require_nginx() else { return };
    let site = NginxSite::prepare(&nginx, Upstream::Unix("/run/ragpool.sock".as_ref()));
    let out = site.test_config();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nginx -t failed:\n{stderr}");
    assert!(stderr.contains("test is successful"), "{stderr}");
    for level in ["[warn]", "[emerg]", "[alert]", "[crit]"] {
        assert!(!stderr.contains(level), "nginx -t: {level}\n{stderr}");
    }
}

#[test]
fn requests_reach_the_workers_through_the_unix_socket_upstream() {
    let Some(nginx) = require_nginx() else { return };
    let server = ServerProcess::start(&app_config(2, "unix:{dir}/r.sock", ""));
    let socket = server.path("r.sock");
    let nginx = NginxSite::prepare(&nginx, Upstream::Unix(&socket)).start();

    let health = get_from(OTHER_CLIENT, nginx.addr(), "/health", &[]).unwrap();
    assert_eq!(health.status, 200, "{}", health.body);
    let pid = health.json()["pid"].as_i64().unwrap() as i32;
    assert!(server.workers().contains(&pid), "pid {pid} is not a worker");

    let answer = http::post_json(
        nginx.addr(),
        "/api/ask",
        &json!({ "question": "how do I reload?" }),
    )
    .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["mode"], "extractive");

    // A unix-socket peer is trusted: the access log shows the client nginx forwarded.
    assert!(wait_until(BOUND, || !access_lines(&server, "GET /health").is_empty()));
    let line = &access_lines(&server, "GET /health")[0];
    assert!(line.starts_with("127.0.0.2 - - ["), "{line}");
}

#[test]
fn requests_reach_the_workers_through_the_tcp_upstream() {
    let Some(nginx) = require_nginx() else { return };
    let server = ServerProcess::start(&app_config(2, "127.0.0.1:0", ""));
    let addr = server.addr();
    let nginx = NginxSite::prepare(&nginx, Upstream::Tcp(&addr)).start();

    // The client claims to be someone else; nginx appends the address it really came from.
    let health = get_from(
        OTHER_CLIENT,
        nginx.addr(),
        "/health",
        &["X-Forwarded-For: 203.0.113.7"],
    )
    .unwrap();
    assert_eq!(health.status, 200, "{}", health.body);
    let pid = health.json()["pid"].as_i64().unwrap() as i32;
    assert!(server.workers().contains(&pid), "pid {pid} is not a worker");
    let page = http::get(nginx.addr(), "/").unwrap();
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));

    // nginx (127.0.0.1) is a trusted proxy by default: ragpool logs the rightmost forwarded
    // address, the one nginx added, not the client's own claim.
    assert!(wait_until(BOUND, || !access_lines(&server, "GET /health").is_empty()));
    let line = &access_lines(&server, "GET /health")[0];
    assert!(line.starts_with("127.0.0.2 - - ["), "{line}");
}

#[test]
fn a_streamed_answer_arrives_token_by_token_through_nginx() {
    let Some(nginx) = require_nginx() else { return };
    let fake = FakeOllama::with(FakeOptions {
        answer: Some("Send HUP to the master to reload the workers [1].".into()),
        tokens: 10,
        answer_duration: Duration::from_secs(3),
        ..FakeOptions::default()
    });
    let tables = format!(
        "[llm]\nprovider = \"ollama\"\nurl = \"{}\"\nmodel = \"llama3.2\"\nfirst_token_timeout = 5\n\
         [rag]\ningest_docs_on_first_run = false\n",
        fake.url()
    );
    let config = format!(
        "workers = 1\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\nadmin_token = \"t\"\n\
         [store]\npath = \"{{dir}}/data\"\n{tables}"
    );
    let server = ServerProcess::start(&config);
    let addr = server.addr();
    let doc = json!({ "title": "Reload", "text": "# Reload\n\nSend HUP to the master to reload the workers." });
    let seeded = post(
        &addr,
        "/api/documents",
        "application/json",
        doc.to_string().as_bytes(),
        &["Authorization: Bearer t"],
    )
    .unwrap();
    assert_eq!(seeded.status, 201, "{}", seeded.body);
    let nginx = NginxSite::prepare(&nginx, Upstream::Tcp(&addr)).start();

    let body = json!({ "question": "How do I reload?" }).to_string();
    let request = format!(
        "POST /api/ask/stream HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let arrival = time_stream(nginx.addr(), request.as_bytes()).unwrap();
    eprintln!(
        "through nginx: tokens at {:?}, end after {:?}",
        arrival.tokens, arrival.end
    );
    assert!(arrival.raw.starts_with("HTTP/1.1 200"), "{}", arrival.raw);
    assert!(arrival.raw.contains("event: done"), "{}", arrival.raw);
    // The fake spreads 10 tokens over 3 s: the end cannot come sooner, and a buffered stream
    // would bring every token with it.
    assert!(arrival.end >= Duration::from_millis(2500), "{arrival:?}");
    let (first, last) = (arrival.tokens[0], *arrival.tokens.last().unwrap());
    assert!(first < arrival.end / 2, "{arrival:?}");
    assert!(
        last - first >= Duration::from_millis(2000),
        "tokens came in together: {arrival:?}"
    );
}

#[test]
fn proxy_buffering_is_off_for_the_stream_location_only() {
    // Arrival times cannot tell: nginx passes chunks on as they come in either mode, and the app
    // also sends `X-Accel-Buffering: no`. What buffering changes is who absorbs a client that
    // does not read: buffered, nginx reads the whole answer from upstream (spooling to disk);
    // unbuffered, it reads only as fast as the client, so upstream feels the back-pressure. This
    // upstream sends no X-Accel-Buffering, so what is measured is the site config alone.
    let Some(nginx) = require_nginx() else { return };
    let upstream = RawUpstream::start();
    let nginx = NginxSite::prepare(&nginx, Upstream::Tcp(&upstream.addr)).start();

    let mut unbuffered = connect_small_window(nginx.addr()).unwrap();
    unbuffered
        .write_all(b"POST /api/ask/stream HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Raw: bulk\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        .unwrap();
    // A bounded wait for something that must not happen.
    let finished = wait_until(Duration::from_secs(2), || {
        upstream.bulk_written() >= BULK_BYTES
    });
    let written = upstream.bulk_written();
    assert!(
        !finished,
        "/api/ask/stream: upstream wrote all {written} bytes to a client that reads nothing"
    );
    let mut received = Vec::new();
    unbuffered.read_to_end(&mut received).unwrap();
    assert!(received.len() > BULK_BYTES, "{}", received.len());

    let mut buffered = connect_small_window(nginx.addr()).unwrap();
    buffered
        .write_all(
            b"GET /api/documents HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Raw: bulk\r\n\r\n",
        )
        .unwrap();
    let started = Instant::now();
    assert!(
        wait_until(BOUND, || upstream.bulk_written() >= 2 * BULK_BYTES),
        "/api/documents: nginx should absorb the answer; upstream wrote {}",
        upstream.bulk_written() - BULK_BYTES
    );
    eprintln!(
        "unbuffered: upstream wrote {} MiB of {} MiB in 2 s; buffered: all of it in {:?}",
        written >> 20,
        BULK_BYTES >> 20,
        started.elapsed()
    );
    let mut received = Vec::new();
    buffered.read_to_end(&mut received).unwrap();
    assert!(received.len() > BULK_BYTES, "{}", received.len());
}

#[test]
fn the_api_is_rate_limited_per_client_and_pages_are_not() {
    let Some(nginx) = require_nginx() else { return };
    let server = ServerProcess::start(&app_config(1, "127.0.0.1:0", ""));
    let addr = server.addr();
    let nginx = NginxSite::prepare(&nginx, Upstream::Tcp(&addr)).start();

    // 30 quick requests, alternating the two rate-limited locations (one zone for both).
    let started = Instant::now();
    let statuses: Vec<(&str, u16)> = (0..30)
        .map(|i| {
            let path = if i % 2 == 0 {
                "/api/documents"
            } else {
                "/api/ask/stream"
            };
            (path, http::get(nginx.addr(), path).unwrap().status)
        })
        .collect();
    let elapsed = started.elapsed();
    let limited = |p: &str| {
        statuses
            .iter()
            .filter(|(path, s)| *path == p && *s == 429)
            .count()
    };
    let passed = statuses.iter().filter(|(_, s)| *s != 429).count();
    eprintln!("30 requests in {elapsed:?}: {statuses:?}");
    assert!(
        statuses
            .iter()
            .any(|(p, s)| *p == "/api/documents" && *s == 200),
        "{statuses:?}"
    );
    assert!(limited("/api/documents") > 0, "{statuses:?}");
    assert!(limited("/api/ask/stream") > 0, "{statuses:?}");
    // rate=2r/s, burst=10, nodelay: the first request, the burst, and what the rate refilled.
    let allowed = 1 + 10 + (2.0 * elapsed.as_secs_f64()).ceil() as usize;
    assert!(passed <= allowed, "{passed} passed in {elapsed:?}");

    // The limit is per client address: another client is not affected.
    let other = get_from(OTHER_CLIENT, nginx.addr(), "/api/documents", &[]).unwrap();
    assert_eq!(other.status, 200, "{}", other.body);

    // Pages and health checks are not limited, even for the client that just hit the limit.
    for _ in 0..30 {
        assert_eq!(http::get(nginx.addr(), "/health").unwrap().status, 200);
        assert_eq!(http::get(nginx.addr(), "/").unwrap().status, 200);
    }
}

#[test]
fn metrics_and_status_are_denied_to_other_addresses() {
    // All test traffic is loopback, so "a remote client" is 127.0.0.2: the shipped rule allows
    // exactly 127.0.0.1 and ::1. (Connections over ::1 are not tested: the site listens on IPv4.)
    // ragpool has its own check on these paths; the admin token passes it, so what decides here
    // is nginx.
    let Some(nginx) = require_nginx() else { return };
    let server = ServerProcess::start(&app_config(1, "127.0.0.1:0", "admin_token = \"t\""));
    let addr = server.addr();
    let nginx = NginxSite::prepare(&nginx, Upstream::Tcp(&addr)).start();
    let token = "Authorization: Bearer t";

    for path in ["/metrics", "/status"] {
        let denied = get_from(OTHER_CLIENT, nginx.addr(), path, &[token]).unwrap();
        assert_eq!(denied.status, 403, "{path}: {}", denied.body);
        assert!(
            denied.body.contains("<center>nginx"),
            "{path}: {}",
            denied.body
        );
        let allowed = get_from(LOOPBACK, nginx.addr(), path, &[token]).unwrap();
        assert_eq!(allowed.status, 200, "{path}: {}", allowed.body);
    }
    // Only those two paths: the other client is served elsewhere.
    let health = get_from(OTHER_CLIENT, nginx.addr(), "/health", &[]).unwrap();
    assert_eq!(health.status, 200);
    // The denied requests never reached ragpool; the allowed ones did.
    assert!(wait_until(BOUND, || access_lines(&server, "GET /status")
        .len()
        == 1));
    assert_eq!(access_lines(&server, "GET /metrics").len(), 1);
    assert!(access_lines(&server, "127.0.0.2 - - [")
        .iter()
        .all(|l| l.contains("GET /health")));
}

#[test]
fn nginx_forwards_the_client_address_and_keeps_upstream_connections_alive() {
    // The request heads exactly as nginx sends them (the effect on ragpool's access log is in
    // the two upstream tests above).
    let Some(nginx) = require_nginx() else { return };
    let upstream = RawUpstream::start();
    let nginx = NginxSite::prepare(&nginx, Upstream::Tcp(&upstream.addr)).start();

    assert_eq!(
        get_from(OTHER_CLIENT, nginx.addr(), "/api/documents", &[])
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        get_from(
            OTHER_CLIENT,
            nginx.addr(),
            "/",
            &["X-Forwarded-For: 203.0.113.7"]
        )
        .unwrap()
        .status,
        200
    );
    let heads = upstream.heads();
    assert_eq!(heads.len(), 2, "{heads:?}");
    let header = |head: &str, name: &str| -> Option<String> {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    assert_eq!(
        header(&heads[0], "x-forwarded-for").as_deref(),
        Some("127.0.0.2")
    );
    assert_eq!(
        header(&heads[1], "x-forwarded-for").as_deref(),
        Some("203.0.113.7, 127.0.0.2")
    );
    for head in &heads {
        assert!(
            head.lines().next().unwrap().ends_with(" HTTP/1.1"),
            "{head}"
        );
        assert_eq!(
            header(head, "host").as_deref(),
            Some("rag.example.test"),
            "{head}"
        );
        assert_eq!(
            header(head, "x-forwarded-proto").as_deref(),
            Some("http"),
            "{head}"
        );
        // No `Connection: close`: the upstream connection may be kept alive.
        assert_eq!(header(head, "connection"), None, "{head}");
    }

    // Bodies over client_max_body_size (16m, as max_body_size) are refused by nginx itself.
    let too_big = send_from(
        LOOPBACK,
        nginx.addr(),
        b"POST /api/documents HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: 16777217\r\n\r\n",
    )
    .unwrap();
    assert_eq!(too_big.status, 413, "{}", too_big.body);
    assert_eq!(upstream.heads().len(), 2);
}

#[test]
fn a_reload_behind_nginx_fails_no_request() {
    // nginx keeps upstream connections alive; a retiring worker closes its idle ones. nginx
    // retries an idempotent request that meets a closed kept-alive connection
    // (`proxy_next_upstream error`), so clients see no error.
    let Some(nginx) = require_nginx() else { return };
    let mut config = app_config(2, "unix:{dir}/r.sock", "");
    config = config.replace("accesslog = \"{dir}/access.log\"", "accesslog = \"\"");
    let server = ServerProcess::start(&config);
    let socket = server.path("r.sock");
    let nginx = NginxSite::prepare(&nginx, Upstream::Unix(&socket)).start();

    let load = Load::start(nginx.addr(), 8);
    assert!(
        load.wait_for_progress(200, BOUND),
        "no traffic through nginx"
    );
    let started = Instant::now();
    for generation in 2..=4 {
        server.signal(Signal::SIGHUP);
        assert!(
            server.wait_for_log(&format!("Reload complete: generation {generation}"), BOUND),
            "{}",
            server.logs()
        );
        assert!(server.wait_for_log_count("worker drained", 2 * (generation - 1), BOUND));
        assert!(
            load.wait_for_progress(200, BOUND),
            "no traffic after reload"
        );
    }
    let reloads = started.elapsed();
    let report = load.stop();
    let retried = nginx
        .access_log()
        .lines()
        .filter(|l| l.contains(", "))
        .count();
    eprintln!(
        "3 reloads behind nginx in {reloads:?}: {} ok, {} failed, {retried} retried by nginx",
        report.ok, report.failed
    );
    assert_eq!(
        report.failed,
        0,
        "{:?}",
        &report.errors[..report.errors.len().min(5)]
    );
}

#[test]
fn nginx_closes_idle_upstream_connections_before_ragpool_does() {
    // Whoever closes an idle kept-alive connection first decides whether a request can be sent
    // on a connection the other end is closing. nginx must be first: it retries GETs on such a
    // connection, but a POST (/api/ask) would get a 502.
    let Some(nginx) = require_nginx() else { return };
    let workers: toml::Value =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/workers.toml"))
            .unwrap()
            .parse()
            .unwrap();
    let keepalive = Duration::from_secs(
        workers
            .get("keepalive")
            .and_then(toml::Value::as_integer)
            .unwrap_or(5) as u64,
    );
    let upstream = RawUpstream::start();
    let nginx = NginxSite::prepare(&nginx, Upstream::Tcp(&upstream.addr)).start();
    assert_eq!(http::get(nginx.addr(), "/health").unwrap().status, 200);
    assert!(
        wait_until(keepalive + Duration::from_secs(2), || !upstream
            .idle_closes()
            .is_empty()),
        "nginx kept its idle upstream connection open past ragpool's keepalive ({keepalive:?})"
    );
    let idle = upstream.idle_closes()[0];
    assert!(idle < keepalive, "nginx closed after {idle:?}");
}

#[test]
fn posts_through_nginx_survive_reloads_too() {
    // nginx does not retry a POST that meets a closed kept-alive upstream connection, so a
    // draining worker must not close idle connections under it: it answers their next request
    // with `Connection: close` instead (and nginx closes idle ones first, before `keepalive`).
    // POST / is answered 405 by the app: any answer but nginx's 502 means the request got through.
    let Some(nginx) = require_nginx() else { return };
    let config = app_config(2, "unix:{dir}/r.sock", "")
        .replace("accesslog = \"{dir}/access.log\"", "accesslog = \"\"");
    let server = ServerProcess::start(&config);
    let socket = server.path("r.sock");
    let nginx = NginxSite::prepare(&nginx, Upstream::Unix(&socket)).start();
    let addr = nginx.addr().to_string();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let posters: Vec<_> = (0..8)
        .map(|_| {
            let (addr, stop, answered) = (addr.clone(), stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut bad = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline
                {
                    match post(&addr, "/", "application/json", b"{\"x\":1}", &[]) {
                        Ok(r) if r.status == 405 => {
                            answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(r) => bad.push(format!(
                            "{}: {}",
                            r.status,
                            r.body.chars().take(80).collect::<String>()
                        )),
                        Err(e) => bad.push(e.to_string()),
                    }
                }
                bad
            })
        })
        .collect();
    let progress = |n: u64| {
        let target = answered.load(std::sync::atomic::Ordering::Relaxed) + n;
        wait_until(BOUND, || {
            answered.load(std::sync::atomic::Ordering::Relaxed) >= target
        })
    };
    assert!(progress(200));
    for generation in 2..=6 {
        server.signal(Signal::SIGHUP);
        assert!(
            server.wait_for_log(&format!("Reload complete: generation {generation}"), BOUND),
            "{}",
            server.logs()
        );
        assert!(progress(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failures: Vec<String> = posters
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();
    eprintln!(
        "5 reloads with POSTs through nginx: {} answered",
        answered.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(
        failures.is_empty(),
        "{} failed, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}
