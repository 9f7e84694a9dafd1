//! Hostile clients against the real binary: huge and slow bodies, slow heads at scale,
//! half-closed sockets, forged forwarded addresses, anonymous health probes. Each case counts
//! what failed and prints a line for the table in the closing note (`cargo test -- --nocapture`).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::http::{self, send_raw};
use crate::support::load::Load;
use crate::support::{wait_until, ServerProcess};

const BOUND: Duration = Duration::from_secs(30);
const MIB: usize = 1024 * 1024;

/// workers.toml for these tests: loopback, a store in the test dir, no LLM, no first-run ingest.
fn hostile_config(workers: usize, top: &str) -> String {
    format!(
        "workers = {workers}\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\n{top}\n[store]\npath = \"{{dir}}/data\"\n[llm]\nprovider = \"none\"\n[rag]\ningest_docs_on_first_run = false\n"
    )
}

fn worker_pid(addr: &str) -> i32 {
    http::get(addr, "/health").unwrap().json()["pid"]
        .as_i64()
        .unwrap() as i32
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`, `VmHWM`).
fn proc_kib(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Reads whatever the server sends until it closes (or resets after sending), and parses it.
fn read_answer(stream: &mut TcpStream) -> io::Result<http::Response> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if raw.is_empty() => return Err(e),
            Err(_) => break, // a reset after the response: what was read stands
        }
    }
    http::parse(&raw)
}

/// Streams a chunked JSON body of `total` bytes (a question that never ends) on a writer
/// thread while this thread waits for the answer; returns the status and how long it took.
fn chunked_ask(addr: &str, total: usize) -> (u16, Duration) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(BOUND)).unwrap();
    stream
        .write_all(b"POST /api/ask HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    let mut writer = stream.try_clone().unwrap();
    let feeder = thread::spawn(move || {
        let chunk = vec![b'a'; 64 * 1024];
        let _ = writer.write_all(b"10\r\n{\"question\": \"aa\r\n");
        let mut sent = 0;
        while sent < total {
            let head = format!("{:x}\r\n", chunk.len());
            let ok = writer.write_all(head.as_bytes()).is_ok()
                && writer.write_all(&chunk).is_ok()
                && writer.write_all(b"\r\n").is_ok();
            if !ok {
                return sent; // the server stopped reading: that is the point
            }
            sent += chunk.len();
        }
        let _ = writer.write_all(b"2\r\n\"}\r\n0\r\n\r\n");
        sent
    });
    let status = read_answer(&mut stream).map(|r| r.status).unwrap_or(0);
    let took = started.elapsed();
    let _ = stream.shutdown(Shutdown::Both);
    let _ = feeder.join();
    (status, took)
}

#[test]
fn a_16_mib_json_body_is_refused_while_reading_with_bounded_memory() {
    let server = ServerProcess::start(&hostile_config(1, "json_body_limit = 32768"));
    let addr = server.addr();
    let pid = worker_pid(&addr);
    // Warm up the paths the test uses, then take the worker's peak RSS as the baseline.
    let normal = http::post_json(
        &addr,
        "/api/ask",
        &serde_json::json!({"question": "warm up"}),
    )
    .unwrap();
    assert_eq!(normal.status, 200, "{}", normal.body);
    let (status, _) = chunked_ask(&addr, 64 * 1024);
    assert_eq!(status, 413);
    let peak_before = proc_kib(pid, "VmHWM");

    // Declared: refused from the head alone, before a byte of the body is read.
    let declared = format!(
        "POST /api/ask HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        16 * MIB
    );
    let started = Instant::now();
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(BOUND)).unwrap();
    stream.write_all(declared.as_bytes()).unwrap();
    stream.write_all(&[b'a'; 4096]).unwrap();
    let response = read_answer(&mut stream).unwrap();
    assert_eq!(response.status, 413, "{}", response.body);
    assert!(
        response.json()["error"]
            .as_str()
            .unwrap()
            .contains("json_body_limit"),
        "{}",
        response.body
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    // Undeclared (chunked), 8 at once: cut at the limit while reading.
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let addr = addr.clone();
            thread::spawn(move || chunked_ask(&addr, 16 * MIB))
        })
        .collect();
    let results: Vec<(u16, Duration)> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let refused = results.iter().filter(|(s, _)| *s == 413).count();
    let slowest = results.iter().map(|(_, t)| *t).max().unwrap();
    let peak_after = proc_kib(pid, "VmHWM");
    let grew_kib = peak_after.saturating_sub(peak_before);
    println!(
        "hostile: 16 MiB JSON bodies: 1 declared + 8 chunked, {refused}/8 chunked got 413, slowest {slowest:?}, worker peak RSS +{grew_kib} KiB"
    );
    server.report_case(
        "16 MiB JSON body to /api/ask: 1 declared + 8 chunked at once",
        9,
        8 - refused as u64,
    );
    assert_eq!(refused, 8, "{results:?}");
    assert!(slowest < Duration::from_secs(10), "{results:?}");
    // Buffering the bodies would be 8 x 16 MiB; reading to the limit is 8 x 32 KiB.
    assert!(
        grew_kib < 24 * 1024,
        "worker peak RSS grew by {grew_kib} KiB"
    );
    assert_eq!(worker_pid(&addr), pid, "the same worker still serves");
    assert_eq!(server.count_in_log("died"), 0, "{}", server.logs());
}

#[test]
fn a_body_that_never_completes_is_cut_with_408() {
    let server = ServerProcess::start(&hostile_config(1, "body_timeout = 1"));
    let addr = server.addr();
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(BOUND)).unwrap();
    stream
        .write_all(b"POST /api/ask HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"question\":")
        .unwrap();
    let started = Instant::now();
    let response = read_answer(&mut stream).unwrap();
    let waited = started.elapsed();
    assert_eq!(response.status, 408, "{}", response.body);
    assert!(response.json()["error"]
        .as_str()
        .unwrap()
        .contains("body_timeout"));
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(10),
        "cut after {waited:?}"
    );
    assert_eq!(http::get(&addr, "/health").unwrap().status, 200);
    eprintln!("hostile: a body that never completes (body_timeout = 1): 408 after {waited:?}");
    server.report_case("a body that never completes, then /health", 2, 0);
}

#[test]
fn a_client_that_half_closes_after_its_request_still_gets_the_response() {
    let server = ServerProcess::start(&hostile_config(1, ""));
    let addr = server.addr();
    let body = r#"{"question": "how do I reload?"}"#;
    let requests = [
        "GET /health HTTP/1.1\r\nHost: t\r\n\r\n".to_string(),
        format!(
            "POST /api/ask HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    ];
    let mut answered = 0u64;
    for request in &requests {
        for _ in 0..10 {
            let mut stream = TcpStream::connect(&addr).unwrap();
            stream.set_read_timeout(Some(BOUND)).unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
            let response = read_answer(&mut stream).unwrap();
            assert_eq!(response.status, 200, "{request}: {}", response.body);
            answered += 1;
        }
    }
    println!("hostile: half-close after the request: {answered}/20 answered");
    server.report_case(
        "half-close after the request (10 GET, 10 POST /api/ask)",
        20,
        20 - answered,
    );
}

#[test]
fn a_forged_forwarded_for_does_not_make_a_client_local() {
    let server = ServerProcess::start(&hostile_config(1, "admin_token = \"ops\""));
    let addr = server.addr();
    let with_xff = |path: &str, xff: &str| {
        let raw = format!(
            "GET {path} HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: {xff}\r\nConnection: close\r\n\r\n"
        );
        send_raw(&addr, raw.as_bytes()).unwrap().status
    };
    let forged = [
        "127.0.0.1, <garbage>",
        "<garbage>, 127.0.0.1",
        "127.0.0.1, ",
        "127.0.0.1 127.0.0.2",
        "localhost",
        "",
    ];
    let mut refused = 0u64;
    for path in ["/metrics", "/status"] {
        for xff in forged {
            assert_eq!(
                with_xff(path, xff),
                403,
                "{path} with X-Forwarded-For: {xff:?}"
            );
            refused += 1;
        }
        // A trusted proxy that says the client is on this machine is still believed.
        assert_eq!(with_xff(path, "203.0.113.7, 127.0.0.1"), 200, "{path}");
    }
    println!("hostile: forged X-Forwarded-For on /metrics and /status: {refused}/12 refused");
    server.report_case(
        "forged X-Forwarded-For on /metrics and /status (12 forged, 2 trusted)",
        14,
        12 - refused,
    );
}

#[test]
fn anonymous_health_says_only_ok_degraded_or_down() {
    // An LLM that is not there: its detail would name the URL and the connection error.
    let dead = crate::support::free_port();
    let top = "admin_token = \"ops\"";
    let config = format!(
        "workers = 1\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\n{top}\n[store]\npath = \"{{dir}}/data\"\n[llm]\nprovider = \"ollama\"\nurl = \"http://127.0.0.1:{dead}\"\nmodel = \"m\"\n[rag]\ningest_docs_on_first_run = false\n"
    );
    let server = ServerProcess::start(&config);
    let addr = server.addr();
    let remote = |extra: &str| {
        let raw = format!(
            "GET /health HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.7\r\n{extra}Connection: close\r\n\r\n"
        );
        send_raw(&addr, raw.as_bytes()).unwrap()
    };
    let anonymous = remote("");
    assert_eq!(anonymous.status, 200, "{}", anonymous.body);
    let health = anonymous.json();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["llm"], serde_json::json!({ "status": "down" }));
    assert_eq!(health["store"], serde_json::json!({ "status": "ok" }));
    let port = dead.to_string();
    for secret in [port.as_str(), "http", "detail", "sqlite", "/"] {
        assert!(
            !anonymous.body.contains(secret),
            "anonymous /health shows {secret:?}: {}",
            anonymous.body
        );
    }
    // The admin token (any case of the scheme) and loopback see the details.
    for detailed in [
        remote("Authorization: bearer ops\r\n"),
        http::get(&addr, "/health").unwrap(),
    ] {
        let body = detailed.json();
        assert!(body["llm"]["detail"].is_string(), "{}", detailed.body);
        assert!(body["store"]["backend"].is_string(), "{}", detailed.body);
    }
    println!("hostile: anonymous /health: no URL, no error text, no detail fields");
    server.report_case("anonymous /health vs token and loopback", 3, 0);
}

#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let server = ServerProcess::start(&hostile_config(1, "admin_token = \"ops\""));
    let addr = server.addr();
    let mut accepted = 0u64;
    for (i, scheme) in ["Bearer", "bearer", "BEARER", "bEaReR"].iter().enumerate() {
        let auth = format!("Authorization: {scheme} ops");
        let body =
            serde_json::json!({ "title": format!("Doc {i}"), "text": "Some text to index." })
                .to_string();
        let created = http::post(
            &addr,
            "/api/documents",
            "application/json",
            body.as_bytes(),
            &[&auth],
        )
        .unwrap();
        assert_eq!(created.status, 201, "{scheme}: {}", created.body);
        let raw = format!(
            "GET /metrics HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: 203.0.113.7\r\n{auth}\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(
            send_raw(&addr, raw.as_bytes()).unwrap().status,
            200,
            "{scheme}"
        );
        accepted += 2;
    }
    let wrong = http::post(
        &addr,
        "/api/documents",
        "application/json",
        br#"{"title":"x","text":"y"}"#,
        &["Authorization: Basic ops"],
    )
    .unwrap();
    assert_eq!(wrong.status, 401);
    println!("hostile: Bearer scheme in 4 cases: {accepted}/8 accepted, Basic refused");
    server.report_case("Bearer scheme in 4 cases, Basic", 9, 8 - accepted);
}

#[test]
fn listings_and_answers_never_show_absolute_server_paths() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("manual");
    std::fs::create_dir_all(docs.join("en")).unwrap();
    std::fs::write(
        docs.join("en/reload.md"),
        "# Reload\n\nSend SIGHUP to the master to reload the workers.\n",
    )
    .unwrap();
    let config = format!(
        "workers = 1\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\n[store]\npath = \"{{dir}}/data\"\n[llm]\nprovider = \"none\"\n[rag]\ndocs_dir = \"{}\"\n",
        docs.display()
    );
    let server = ServerProcess::start(&config);
    let addr = server.addr();
    let mut listing = String::new();
    assert!(
        wait_until(BOUND, || {
            listing = http::get(&addr, "/api/documents").unwrap().body;
            listing.contains("reload")
        }),
        "{listing}\n{}",
        server.logs()
    );
    let documents: serde_json::Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(
        documents["documents"][0]["source"], "manual/en/reload.md",
        "{listing}"
    );
    let secret = dir.path().display().to_string();
    assert!(!listing.contains(&secret), "{listing}");
    // The sources of answers too, JSON and streamed.
    let question = serde_json::json!({ "question": "how do I reload the workers?" });
    let answer = http::post_json(&addr, "/api/ask", &question).unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.json()["sources"][0]["source"],
        "manual/en/reload.md",
        "{}",
        answer.body
    );
    let streamed = http::post_json(&addr, "/api/ask/stream", &question).unwrap();
    assert!(
        streamed.body.contains("manual/en/reload.md"),
        "{}",
        streamed.body
    );
    for body in [&answer.body, &streamed.body] {
        assert!(!body.contains(&secret), "{body}");
    }
    server.report_case("no absolute path in listings and answers", 3, 0);
}

/// One slow client: what it sends first, then one byte per tick forever.
struct Slow {
    stream: Option<TcpStream>,
    opening: &'static [u8],
    /// Times the server cut it off (then it reconnects).
    cut: u64,
}

impl Slow {
    fn connect(&mut self, addr: &str) {
        self.stream = TcpStream::connect(addr).ok().and_then(|mut s| {
            s.write_all(self.opening).ok()?;
            s.set_nonblocking(true).ok()?;
            Some(s)
        });
    }

    /// Sends one more byte; notices (and counts) when the server has closed or answered.
    fn tick(&mut self, addr: &str) {
        let Some(stream) = self.stream.as_mut() else {
            return self.connect(addr);
        };
        let mut buf = [0u8; 512];
        let closed = match stream.read(&mut buf) {
            Ok(_) => true, // EOF or the server's 408: it is done with us
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        };
        let closed =
            closed || matches!(stream.write(b"a"), Err(e) if e.kind() != io::ErrorKind::WouldBlock);
        if closed {
            self.cut += 1;
            self.connect(addr);
        }
    }
}

#[test]
fn four_hundred_slow_clients_do_not_starve_the_others() {
    let server = ServerProcess::start(&hostile_config(
        2,
        "header_timeout = 2\nbody_timeout = 2\nworker_connections = 1000",
    ));
    let addr = server.addr();
    let mut slow: Vec<Slow> = (0..400)
        .map(|i| Slow {
            stream: None,
            opening: if i % 2 == 0 {
                b"GET /health HTTP/1.1\r\nHost: t\r\nX-Slow: "
            } else {
                b"POST /api/ask HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n{\"question\": \""
            },
            cut: 0,
        })
        .collect();
    for client in &mut slow {
        client.connect(&addr);
    }
    let connected = slow.iter().filter(|c| c.stream.is_some()).count();
    assert_eq!(connected, 400, "every slow client connected");

    let load = Load::start(&addr, 4);
    // RAGPOOL_SOAK=1: a minute instead of 8 s.
    let soak = std::env::var("RAGPOOL_SOAK").as_deref() == Ok("1");
    let run = Duration::from_secs(if soak { 60 } else { 8 });
    let started = Instant::now();
    while started.elapsed() < run {
        for client in &mut slow {
            client.tick(&addr);
        }
        thread::sleep(Duration::from_millis(100));
    }
    let report = load.stop();
    let cut_heads: u64 = slow.iter().step_by(2).map(|c| c.cut).sum();
    let cut_bodies: u64 = slow.iter().skip(1).step_by(2).map(|c| c.cut).sum();
    let total = report.ok + report.failed;
    println!(
        "hostile: 400 slow clients (200 heads, 200 bodies) for {run:?}: normal requests {}/{total} ok, {} failed; slow heads cut {cut_heads} times, slow bodies cut {cut_bodies} times",
        report.ok, report.failed
    );
    server.report_case(
        &format!("400 slow clients (heads and bodies) for {run:?}: normal /health requests"),
        total,
        report.failed,
    );
    assert!(
        report.ok >= 100,
        "too few normal requests got through: {report:?}"
    );
    assert!(
        report.failed * 100 <= total,
        "more than 1% of normal requests failed: {} of {total}; first errors: {:?}",
        report.failed,
        report.errors.iter().take(5).collect::<Vec<_>>()
    );
    // Both timeouts held: every slow client was cut at least once in 8 s of 2 s limits.
    assert!(cut_heads >= 200, "slow heads cut {cut_heads} times");
    assert!(cut_bodies >= 200, "slow bodies cut {cut_bodies} times");
    assert_eq!(server.count_in_log("died"), 0, "{}", server.logs());
}
