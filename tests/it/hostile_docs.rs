//! Hostile documents and store faults through the real binary (issue #10): the test builds
//! each hostile input itself (PDFs with nested arrays and dicts that overflow a parser's stack,
//! flate bombs that inflate to hundreds of MiB or GiBs, 100k nested `<div>`s, 800 KB of text
//! without whitespace), uploads them under `/health` load, ingests them with the CLI, and
//! deletes or corrupts the store file under a serving pool.
//!
//! Bounded by default; `RAGPOOL_SOAK=1` repeats the upload round 10 times as long.

use std::io::Write as _;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flate2::{Compress, Compression, FlushCompress};

use crate::support::http::{self, delete};
use crate::support::{wait_until, ServerProcess, BIN};

const BOUND: Duration = Duration::from_secs(60);

/// Limits of the helper in these tests: tight enough to hit quickly on a loaded 2-core box.
const LIMITS: &str = "extract_timeout = 30\nextract_cpu = 10\nextract_memory = 512\n";

fn app_config(workers: usize, rag: &str) -> String {
    format!(
        "workers = {workers}\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\nadmin_token = \"t\"\n\
         [store]\npath = \"{{dir}}/data\"\n[llm]\nprovider = \"none\"\n[rag]\n{rag}"
    )
}

// ----- hostile inputs, built here ------------------------------------------------------------

/// A PDF of these objects (1-based: 1 = catalog), with a correct cross-reference table.
fn pdf(objects: &[Vec<u8>]) -> Vec<u8> {
    let mut out = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, body) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        out.extend_from_slice(body);
        out.extend_from_slice(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for offset in offsets {
        out.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}

/// Catalog, pages, one page showing object 5 as its content, a font; then `content` (object 5)
/// and `extra` objects.
fn one_page_pdf(content: Vec<u8>, extra: &[Vec<u8>]) -> Vec<u8> {
    let mut objects = vec![
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_vec(),
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>".to_vec(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec(),
        content,
    ];
    objects.extend_from_slice(extra);
    pdf(&objects)
}

fn stream(data: &[u8], filter: &str) -> Vec<u8> {
    let mut out = format!("<< /Length {} {filter}>>\nstream\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\nendstream");
    out
}

fn good_pdf(text: &str) -> Vec<u8> {
    let content = format!("BT /F1 12 Tf 72 720 Td ({text}) Tj ET");
    one_page_pdf(stream(content.as_bytes(), ""), &[])
}

/// An extra object of `depth` nested arrays: `[[[...]]]`.
fn nested_arrays_pdf(depth: usize) -> Vec<u8> {
    let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    one_page_pdf(stream(b"BT ET", ""), &[nested.into_bytes()])
}

/// An extra object of `depth` nested dictionaries: `<< /A << /A ... 1 >> >>`.
fn nested_dicts_pdf(depth: usize) -> Vec<u8> {
    let nested = format!("{}1{}", "<< /A ".repeat(depth), " >>".repeat(depth));
    one_page_pdf(stream(b"BT ET", ""), &[nested.into_bytes()])
}

/// Adler-32 state after `n` more bytes of value `c` (a run), computed in O(1).
fn adler_run((a, b): (u64, u64), c: u8, n: u64) -> (u64, u64) {
    const MOD: u128 = 65521;
    let (a0, b0, c, n) = (a as u128, b as u128, c as u128, n as u128);
    let a1 = (a0 + n * c) % MOD;
    let b1 = (b0 + n * a0 + c * (n * (n + 1) / 2)) % MOD;
    (a1 as u64, b1 as u64)
}

fn adler_bytes(state: (u64, u64), bytes: &[u8]) -> (u64, u64) {
    bytes.iter().fold(state, |s, &c| adler_run(s, c, 1))
}

/// A zlib stream of `prefix`, then `blocks` MiB of byte `fill`, then `suffix`, without ever
/// holding the inflated data: one MiB is deflated once (after a full flush, so it refers to
/// nothing before it) and the block is repeated.
fn zlib_of_run(prefix: &[u8], fill: u8, blocks: usize, suffix: &[u8]) -> Vec<u8> {
    let deflate = |compress: &mut Compress, input: &[u8], flush: FlushCompress| {
        let mut out = Vec::with_capacity(input.len() / 100 + 1024);
        let start_in = compress.total_in();
        loop {
            let consumed = (compress.total_in() - start_in) as usize;
            out.reserve(64 * 1024);
            let status = compress
                .compress_vec(&input[consumed..], &mut out, flush)
                .unwrap();
            let done_in = (compress.total_in() - start_in) as usize == input.len();
            if done_in && (status == flate2::Status::StreamEnd || out.capacity() > out.len()) {
                return out;
            }
        }
    };
    let mut compress = Compress::new(Compression::best(), false);
    let mut out = vec![0x78, 0xDA];
    out.extend(deflate(&mut compress, prefix, FlushCompress::Full));
    let mib = vec![fill; 1 << 20];
    let block = deflate(&mut compress, &mib, FlushCompress::Full);
    for _ in 0..blocks {
        out.extend_from_slice(&block);
    }
    out.extend(deflate(&mut compress, suffix, FlushCompress::Finish));
    let state = adler_bytes((1, 0), prefix);
    let state = adler_run(state, fill, (blocks as u64) << 20);
    let (a, b) = adler_bytes(state, suffix);
    out.extend_from_slice(&(((b << 16) | a) as u32).to_be_bytes());
    out
}

/// ~150 KB: one content stream that inflates to 150 MiB of text to show.
fn text_bomb_pdf() -> Vec<u8> {
    let content = zlib_of_run(b"BT /F1 12 Tf 72 720 Td (", b'A', 150, b") Tj ET");
    one_page_pdf(stream(&content, "/Filter /FlateDecode "), &[])
}

/// Small: a stream deflated twice that inflates to 4 GiB of spaces.
fn double_bomb_pdf() -> Vec<u8> {
    let inner = zlib_of_run(b"", b' ', 4096, b"");
    let mut outer = flate2::write::ZlibEncoder::new(Vec::new(), Compression::best());
    outer.write_all(&inner).unwrap();
    let outer = outer.finish().unwrap();
    one_page_pdf(stream(&outer, "/Filter [/FlateDecode /FlateDecode] "), &[])
}

fn deep_divs_html() -> Vec<u8> {
    format!(
        "<html><body>{}deep text{}</body></html>",
        "<div>".repeat(100_000),
        "</div>".repeat(100_000)
    )
    .into_bytes()
}

fn no_whitespace_text() -> Vec<u8> {
    vec![b'a'; 800_000]
}

/// One hostile upload and what must come of it.
struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    /// `Some(words)`: 422 whose error contains one of them. `None`: stored (201).
    refused_with: Option<&'static [&'static str]>,
}

/// What a bomb may hit first: memory usually; CPU or the deadline on a loaded machine.
const LIMIT_HIT: &[&str] = &[
    "could not parse PDF: exceeded the memory limit (512 MiB",
    "could not parse PDF: exceeded the CPU time limit (10 s",
    "could not parse PDF: took longer than 30 s",
    "extracted text is larger than",
];

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "nested-824.pdf",
            bytes: nested_arrays_pdf(400),
            // Shallow enough for the helper's stack: lopdf parses it; no text layer.
            refused_with: Some(&["no text layer"]),
        },
        Case {
            name: "nested-arrays.pdf",
            bytes: nested_arrays_pdf(100_000),
            refused_with: Some(&["could not parse PDF: nested too deeply"]),
        },
        Case {
            name: "nested-dicts.pdf",
            bytes: nested_dicts_pdf(50_000),
            refused_with: Some(&["could not parse PDF: nested too deeply"]),
        },
        Case {
            name: "text-bomb.pdf",
            bytes: text_bomb_pdf(),
            refused_with: Some(LIMIT_HIT),
        },
        Case {
            name: "double-bomb.pdf",
            bytes: double_bomb_pdf(),
            refused_with: Some(LIMIT_HIT),
        },
        Case {
            name: "divs.html",
            bytes: deep_divs_html(),
            refused_with: None,
        },
        Case {
            name: "nows.txt",
            bytes: no_whitespace_text(),
            refused_with: None,
        },
    ]
}

fn multipart(name: &str, bytes: &[u8]) -> (String, Vec<u8>) {
    let boundary = "ragpool-hostile-boundary-7f3a";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn upload(addr: &str, name: &str, bytes: &[u8]) -> http::Response {
    let (content_type, body) = multipart(name, bytes);
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    // The slowest case may take the helper's whole deadline.
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut raw = format!(
        "POST /api/documents HTTP/1.1\r\nHost: test\r\nConnection: close\r\nAuthorization: Bearer t\r\n\
         Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(&body);
    stream.write_all(&raw).unwrap();
    http::read_response(&mut stream).unwrap()
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

fn soak() -> bool {
    std::env::var_os("RAGPOOL_SOAK").is_some_and(|v| v == "1")
}

// ----- uploads -------------------------------------------------------------------------------

/// 16 hostile uploads in a row (160 with RAGPOOL_SOAK=1) while a client polls /health: every
/// hostile PDF gets a 422 naming the limit, the deep HTML and the unbroken text are stored,
/// no worker dies (same pids), no worker grows past a bound, and /health never fails.
#[test]
fn hostile_uploads_under_health_load_kill_no_worker_and_each_gets_a_clear_answer() {
    let server = ServerProcess::start(&app_config(
        2,
        &format!("ingest_docs_on_first_run = false\n{LIMITS}"),
    ));
    let addr = server.addr();
    assert!(server.wait_for_workers(2, BOUND));
    let workers = server.workers();
    let baseline: Vec<u64> = workers.iter().map(|&pid| rss_kib(pid)).collect();

    let stop = Arc::new(AtomicBool::new(false));
    let (health_ok, health_failed, peak_rss) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let load = {
        let (stop, ok, failed, peak) = (
            Arc::clone(&stop),
            Arc::clone(&health_ok),
            Arc::clone(&health_failed),
            Arc::clone(&peak_rss),
        );
        let (addr, workers) = (addr.clone(), workers.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(3600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                match http::get(&addr, "/health") {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
                for &pid in &workers {
                    peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let cases = cases();
    let rounds = if soak() { 160 } else { 16 };
    let mut table = Vec::new();
    for i in 0..rounds {
        let case = &cases[i % cases.len()];
        // A new name each round: a new document, so nothing is skipped as unchanged.
        let name = format!("{i:03}-{}", case.name);
        let started = Instant::now();
        let response = upload(&addr, &name, &case.bytes);
        let took = started.elapsed();
        table.push(format!(
            "{:<18} {:>9} B  {:>3}  {:>6.1} s  {}",
            case.name,
            case.bytes.len(),
            response.status,
            took.as_secs_f64(),
            response.body.chars().take(140).collect::<String>()
        ));
        match case.refused_with {
            Some(words) => {
                assert_eq!(response.status, 422, "{}: {}", case.name, response.body);
                assert!(
                    words.iter().any(|w| response.body.contains(w)),
                    "{}: expected {words:?} in {}",
                    case.name,
                    response.body
                );
            }
            None => assert_eq!(response.status, 201, "{}: {}", case.name, response.body),
        }
        // The helper's deadline bounds every case (plus a loaded box's slack).
        assert!(took < Duration::from_secs(90), "{}: {took:?}", case.name);
    }
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    eprintln!("hostile uploads:\n{}", table.join("\n"));

    let after: Vec<u64> = workers.iter().map(|&pid| rss_kib(pid)).collect();
    let peak = peak_rss.load(Ordering::Relaxed);
    eprintln!(
        "worker RSS KiB: before {baseline:?}, after {after:?}, peak {peak}; /health ok {} failed {}",
        health_ok.load(Ordering::Relaxed),
        health_failed.load(Ordering::Relaxed)
    );
    server.report_case(
        &format!(
            "{rounds} hostile uploads in a row ({} kinds) under /health load",
            cases.len()
        ),
        rounds as u64 + health_ok.load(Ordering::Relaxed) + health_failed.load(Ordering::Relaxed),
        health_failed.load(Ordering::Relaxed),
    );
    assert_eq!(server.workers(), workers, "a worker died or was replaced");
    assert_eq!(server.count_in_log("exited with"), 0, "{}", server.logs());
    assert_eq!(health_failed.load(Ordering::Relaxed), 0);
    assert!(health_ok.load(Ordering::Relaxed) > 0);
    // Before the sandbox one flate bomb took a worker to 6.5 GB; now the parse is elsewhere.
    assert!(peak < 400 * 1024, "worker RSS peaked at {peak} KiB");
    // No helper is left behind.
    for &pid in &workers {
        assert!(
            wait_until(Duration::from_secs(10), || crate::support::children_of(pid)
                .is_empty()),
            "worker {pid} still has children"
        );
    }
}

// ----- the CLI -------------------------------------------------------------------------------

/// `ragpool ingest` of a folder with hostile and good files: the good ones are stored, each bad
/// one is named with its reason, and the exit code says some failed.
#[test]
fn ingest_of_a_folder_with_hostile_files_stores_the_good_ones_and_names_the_bad() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("docs");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(
        folder.join("a-good.md"),
        "# Reloading\n\nSend SIGHUP to the master.\n",
    )
    .unwrap();
    std::fs::write(
        folder.join("b-good.pdf"),
        good_pdf("Workers are recycled after max_requests"),
    )
    .unwrap();
    std::fs::write(folder.join("c-nested.pdf"), nested_arrays_pdf(100_000)).unwrap();
    std::fs::write(folder.join("d-bomb.pdf"), double_bomb_pdf()).unwrap();
    std::fs::write(folder.join("e-deep.html"), deep_divs_html()).unwrap();
    let config = dir.path().join("workers.toml");
    std::fs::write(
        &config,
        format!(
            "[store]\npath = \"{}/data\"\n[llm]\nprovider = \"none\"\n[rag]\n{LIMITS}",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("ingest")
        .arg("--config")
        .arg(&config)
        .arg(&folder)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    for good in ["a-good.md", "b-good.pdf", "e-deep.html"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with("inserted") && l.contains(good)),
            "{good}: {stdout}"
        );
    }
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("c-nested.pdf") && l.contains("nested too deeply")),
        "{stderr}"
    );
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("d-bomb.pdf") && LIMIT_HIT.iter().any(|w| l.contains(w))),
        "{stderr}"
    );
    assert!(
        stdout.contains("3 inserted, 0 replaced, 0 unchanged, 2 failed"),
        "{stdout}"
    );
    eprintln!(
        "case | ragpool ingest of a folder: 3 good files, 2 hostile PDFs | 5 files | 2 failed, \
         each named with its reason, the other 3 stored | exit code {:?}",
        out.status.code()
    );
}

// ----- the store file ------------------------------------------------------------------------

thread_local! {
    /// `/health` requests this test (its thread) sent, for its row of the table.
    static HEALTH_CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn health(addr: &str) -> (u16, serde_json::Value) {
    HEALTH_CALLS.with(|c| c.set(c.get() + 1));
    let r = http::get(addr, "/health").unwrap();
    (r.status, r.json())
}

/// Deleting every document, then a HUP, does not bring the manual back; deleting the store
/// file under the pool is `/health` 503 `store: down` with the reason, and a HUP then neither
/// re-creates an empty store nor re-ingests docs_dir: the new generation refuses to boot and
/// the old one keeps serving.
#[test]
fn a_deleted_store_file_is_store_down_and_a_hup_does_not_recreate_it() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("manual");
    std::fs::create_dir(&docs).unwrap();
    std::fs::write(
        docs.join("reload.md"),
        "# Reload\n\nkill -HUP the master.\n",
    )
    .unwrap();
    let config = app_config(2, &format!("docs_dir = \"{}\"\n", docs.display()));
    let server = ServerProcess::start(&config);
    let addr = server.addr();
    assert!(
        server.wait_for_log("first run: ingested 1 documents", BOUND),
        "{}",
        server.logs()
    );
    let (code, h) = health(&addr);
    assert_eq!(
        (code, h["store"]["documents"].as_u64()),
        (200, Some(1)),
        "{h}"
    );

    // Every document deleted, then a reload: the manual stays deleted.
    let id = crate::support::http::get(&addr, "/api/documents")
        .unwrap()
        .json()["documents"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        delete(
            &addr,
            &format!("/api/documents/{id}"),
            &["Authorization: Bearer t"]
        )
        .unwrap()
        .status,
        200
    );
    server.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        server.wait_for_log("Reload complete", BOUND),
        "{}",
        server.logs()
    );
    assert!(wait_until(BOUND, || health(&addr).1["store"]["documents"]
        .as_u64()
        == Some(0)));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        server.count_in_log("first run: ingested"),
        1,
        "{}",
        server.logs()
    );
    assert_eq!(health(&addr).1["store"]["documents"].as_u64(), Some(0));

    // The file deleted under the pool: store down, with the reason.
    let file = server.path("data/ragpool.sqlite3");
    for name in [
        "ragpool.sqlite3",
        "ragpool.sqlite3-wal",
        "ragpool.sqlite3-shm",
    ] {
        let _ = std::fs::remove_file(server.path(&format!("data/{name}")));
    }
    // Every worker says so once its cached probe (1 s) expires.
    let h = down_everywhere(&addr);
    assert_eq!(h["store"]["status"], "down", "{h}");
    assert!(
        h["store"]["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("was deleted while serving"),
        "{h}"
    );

    // A reload: the new workers refuse to create a fresh store; the old ones keep serving.
    let workers = server.workers();
    server.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        server.wait_for_log("ragpool.initialised", BOUND),
        "{}",
        server.logs()
    );
    assert!(
        server.wait_for_log("keeps serving", BOUND),
        "{}",
        server.logs()
    );
    assert!(server.wait_for_workers(2, BOUND));
    assert_eq!(server.workers(), workers);
    assert!(!file.exists(), "a fresh store was created");
    assert_eq!(server.count_in_log("first run: ingested"), 1);
    down_everywhere(&addr);
    server.report_case(
        "store file deleted while serving, then HUP (new generation refuses to boot)",
        HEALTH_CALLS.with(|c| c.get()),
        0,
    );
}

/// Waits until ten `/health` calls in a row (spread over the workers) answer 503; the last.
fn down_everywhere(addr: &str) -> serde_json::Value {
    let mut streak = 0;
    let mut last = serde_json::Value::Null;
    let held = wait_until(BOUND, || {
        let (code, h) = health(addr);
        streak = if code == 503 { streak + 1 } else { 0 };
        last = h;
        streak >= 10
    });
    assert!(held, "/health did not stay 503: {last}");
    last
}

/// A store file overwritten with garbage under the pool: `/health` says `store: down` and why.
#[test]
fn a_corrupted_store_file_is_store_down_with_the_reason() {
    let server = ServerProcess::start(&app_config(1, "ingest_docs_on_first_run = false\n"));
    let addr = server.addr();
    http::add_document(&addr, "Reload", "kill -HUP the master");
    assert_eq!(health(&addr).0, 200);
    let file = server.path("data/ragpool.sqlite3");
    let size = std::fs::metadata(&file).unwrap().len() as usize;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .write_all(&vec![0x5a; size.max(4096)])
        .unwrap();
    assert!(
        wait_until(BOUND, || health(&addr).0 == 503),
        "{}",
        health(&addr).1
    );
    let (_, h) = health(&addr);
    assert_eq!(h["store"]["status"], "down", "{h}");
    let detail = h["store"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("not a database") || detail.contains("malformed"),
        "{h}"
    );
    server.report_case(
        "store file overwritten with garbage while serving",
        HEALTH_CALLS.with(|c| c.get()) + 1,
        0,
    );
}
