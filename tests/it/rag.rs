//! The RAG app end to end through the real binary: first run, questions in English and Russian,
//! the documents API, streaming from a fake Ollama (wire-level, tests/it/support/fake_ollama.rs)
//! and a real llama.cpp server, failures, cancellation, concurrency, and ingest under load.

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::fake_ollama::{FakeOllama, FakeOptions};
use crate::support::fake_rerank::FakeRerank;
use crate::support::http::{self, delete, post, post_json, sse_events};
use crate::support::llama::LlamaServer;
use crate::support::{wait_until, ServerProcess, BIN};

const BOUND: Duration = Duration::from_secs(30);
const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs");

/// workers.toml for app tests: loopback, data under the test dir, the given tables.
fn app_config(workers: usize, top: &str, tables: &str) -> String {
    format!(
        "workers = {workers}\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\n{top}\n[store]\npath = \"{{dir}}/data\"\n{tables}\n"
    )
}

fn no_llm() -> &'static str {
    "[llm]\nprovider = \"none\"\n[rag]\ningest_docs_on_first_run = false\n"
}

fn ask(addr: &str, question: &str) -> Value {
    let response = post_json(addr, "/api/ask", &json!({ "question": question })).unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()
}

fn sources_of(answer: &Value) -> Vec<String> {
    answer["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["source"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_fresh_server_ingests_the_manual_and_answers_in_english_and_russian() {
    let server = ServerProcess::start(&app_config(
        2,
        "",
        &format!("[llm]\nprovider = \"none\"\n[rag]\ndocs_dir = \"{DOCS}\"\n"),
    ));
    let addr = server.addr();
    assert!(
        server.wait_for_log("first run: ingested", BOUND),
        "{}",
        server.logs()
    );

    let answer = ask(&addr, "how do I reload the workers?");
    assert_eq!(answer["mode"], "extractive");
    assert!(
        answer["answer"]
            .as_str()
            .unwrap()
            .starts_with("No language model is configured"),
        "{answer}"
    );
    assert!(
        sources_of(&answer)
            .iter()
            .any(|s| s.ends_with("docs/en/reload.md")),
        "{answer}"
    );

    let answer = ask(&addr, "как перезагрузить воркеры?");
    assert!(
        answer["answer"]
            .as_str()
            .unwrap()
            .starts_with("Языковая модель не настроена"),
        "{answer}"
    );
    assert!(sources_of(&answer)[0].contains("docs/ru/"), "{answer}");
    assert!(
        answer["answer"]
            .as_str()
            .unwrap()
            .contains("**перезагрузить**"),
        "{answer}"
    );

    let health = http::get(&addr, "/health").unwrap();
    assert_eq!(health.status, 200);
    let health = health.json();
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["degraded"], json!(["llm"]));
    assert_eq!(health["store"]["status"], "ok");
    assert!(
        health["store"]["documents"].as_u64().unwrap() >= 16,
        "{health}"
    );

    let page = http::get(&addr, "/").unwrap();
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(page.body.contains("/api/ask/stream"));
    // What the page's <meta> policy cannot say: no framing by another site, no sniffing.
    assert_eq!(
        page.header("content-security-policy"),
        Some("frame-ancestors 'none'")
    );
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    assert_eq!(page.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(page.header("referrer-policy"), Some("same-origin"));
}

#[test]
fn bad_questions_get_json_errors_never_a_crash() {
    let server = ServerProcess::start(&app_config(1, "", no_llm()));
    let addr = server.addr();
    let status = |r: std::io::Result<http::Response>| {
        let r = r.unwrap();
        assert!(r.json()["error"].is_string(), "{}", r.body);
        r.status
    };
    assert_eq!(
        status(post(&addr, "/api/ask", "text/plain", b"hi", &[])),
        415
    );
    assert_eq!(
        status(post(
            &addr,
            "/api/ask",
            "application/json",
            b"{not json",
            &[]
        )),
        400
    );
    assert_eq!(
        status(post_json(&addr, "/api/ask", &json!({ "question": "   " }))),
        422
    );
    assert_eq!(
        status(post_json(&addr, "/api/ask", &json!({ "question": 42 }))),
        422
    );
    assert_eq!(
        status(post_json(
            &addr,
            "/api/ask",
            &json!({ "question": "x".repeat(2001) })
        )),
        413
    );
    assert_eq!(
        status(post_json(
            &addr,
            "/api/ask",
            &json!({ "question": "ok?", "top_k": 0 })
        )),
        422
    );
    assert_eq!(
        status(post_json(
            &addr,
            "/api/ask",
            &json!({ "question": "ok?", "top_k": "five" })
        )),
        422
    );
    assert_eq!(status(http::get(&addr, "/api/ask")), 405);
    assert_eq!(status(post_json(&addr, "/api/ask/stream", &json!({}))), 422);
    assert_eq!(server.count_in_log("died"), 0);
    assert_eq!(http::get(&addr, "/health").unwrap().status, 200);
}

#[test]
fn the_documents_api_needs_the_admin_token_and_keeps_documents_whole() {
    // Without a token configured, writes are refused with a hint.
    let closed = ServerProcess::start(&app_config(1, "", no_llm()));
    let refused = post_json(
        &closed.addr(),
        "/api/documents",
        &json!({ "title": "t", "text": "x" }),
    )
    .unwrap();
    assert_eq!(refused.status, 403);
    assert!(refused.json()["error"]
        .as_str()
        .unwrap()
        .contains("admin_token"));
    drop(closed);

    let server = ServerProcess::start(&app_config(2, "admin_token = \"s3cret\"", no_llm()));
    let addr = server.addr();
    let auth = "Authorization: Bearer s3cret";
    let doc = json!({ "title": "Резервное копирование", "text": "# Резервное копирование\n\nРезервные копии базы создаются каждую ночь скриптом backup.sh." });
    let body = doc.to_string();
    let wrong = post(
        &addr,
        "/api/documents",
        "application/json",
        body.as_bytes(),
        &["Authorization: Bearer nope"],
    )
    .unwrap();
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.header("www-authenticate"), Some("Bearer"));

    let created = post(
        &addr,
        "/api/documents",
        "application/json",
        body.as_bytes(),
        &[auth],
    )
    .unwrap();
    assert_eq!(created.status, 201, "{}", created.body);
    let id = created.json()["documents"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(created.json()["documents"][0]["outcome"], "inserted");
    let again = post(
        &addr,
        "/api/documents",
        "application/json",
        body.as_bytes(),
        &[auth],
    )
    .unwrap();
    assert_eq!(again.json()["documents"][0]["outcome"], "unchanged");

    // Another word form finds it, from every worker.
    let mut pids = HashSet::new();
    assert!(wait_until(BOUND, || {
        let answer = ask(&addr, "как создать резервную копию?");
        assert_eq!(answer["sources"][0]["document_id"], id.as_str(), "{answer}");
        pids.insert(
            http::get(&addr, "/health").unwrap().json()["pid"]
                .as_i64()
                .unwrap(),
        );
        pids.len() == 2
    }));

    let listed = http::get(&addr, "/api/documents").unwrap().json();
    assert_eq!(listed["documents"][0]["title"], "Резервное копирование");

    // A multipart upload of a Markdown file.
    let boundary = "XyZ";
    let multipart = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"vpn.md\"\r\nContent-Type: text/markdown\r\n\r\n# VPN\n\nConnect to the office VPN with WireGuard.\r\n--{boundary}--\r\n"
    );
    let uploaded = post(
        &addr,
        "/api/documents",
        &format!("multipart/form-data; boundary={boundary}"),
        multipart.as_bytes(),
        &[auth],
    )
    .unwrap();
    assert_eq!(uploaded.status, 201, "{}", uploaded.body);
    assert!(sources_of(&ask(&addr, "how do I connect to the VPN?")).contains(&"vpn.md".to_string()));
    let unsupported = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.exe\"\r\n\r\nMZ\r\n--{boundary}--\r\n"
    );
    let refused = post(
        &addr,
        "/api/documents",
        &format!("multipart/form-data; boundary={boundary}"),
        unsupported.as_bytes(),
        &[auth],
    )
    .unwrap();
    assert_eq!(refused.status, 415, "{}", refused.body);

    assert_eq!(
        delete(&addr, &format!("/api/documents/{id}"), &[])
            .unwrap()
            .status,
        401
    );
    assert_eq!(
        delete(&addr, &format!("/api/documents/{id}"), &[auth])
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        delete(&addr, &format!("/api/documents/{id}"), &[auth])
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        delete(&addr, "/api/documents/not-an-id", &[auth])
            .unwrap()
            .status,
        404
    );
    let answer = ask(&addr, "как создать резервную копию?");
    assert!(answer["sources"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["document_id"] != id.as_str()));
}

fn fake_llm_tables(fake: &FakeOllama) -> String {
    format!("[llm]\nprovider = \"ollama\"\nurl = \"{}\"\nmodel = \"llama3.2\"\nfirst_token_timeout = 5\n[rag]\ningest_docs_on_first_run = false\n", fake.url())
}

/// A server whose LLM is `fake`, with one document seeded (admin token "t").
fn seeded_server_with(fake: &FakeOllama, workers: usize) -> ServerProcess {
    let server = ServerProcess::start(&app_config(
        workers,
        "admin_token = \"t\"",
        &fake_llm_tables(fake),
    ));
    seed(&server.addr());
    server
}

fn seed(addr: &str) {
    http::add_document(
        addr,
        "Reload",
        "# Reload\n\nSend HUP to the master to reload the workers without downtime.",
    );
}

#[test]
fn answers_stream_from_ollama_with_sources_first_and_numbered_passages() {
    let fake = FakeOllama::with(FakeOptions {
        answer: Some("Send HUP [1].".into()),
        tokens: 4,
        ..FakeOptions::default()
    });
    let server = seeded_server_with(&fake, 1);
    let addr = server.addr();
    let response = post_json(
        &addr,
        "/api/ask/stream",
        &json!({ "question": "How do I reload?" }),
    )
    .unwrap();
    assert_eq!(response.status, 200);
    assert!(response
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    assert_eq!(response.header("x-accel-buffering"), Some("no"));
    let events = sse_events(&response.body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"sources"), "{names:?}");
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    assert!(
        names.iter().filter(|n| **n == "token").count() >= 2,
        "{names:?}"
    );
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "token")
        .map(|(_, d)| d["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "Send HUP [1].");
    assert_eq!(events.last().unwrap().1["mode"], "generated");
    assert!(events.last().unwrap().1["timings"]["first_token_ms"].is_number());
    // The prompt numbered the passage and asked for the question's language.
    let request = fake.last_chat_request().unwrap();
    let prompt = request.to_string();
    assert!(prompt.contains(r"[1] Reload\n"), "{prompt}");
    assert_eq!(
        prompt.matches("Reload").count(),
        1,
        "labelled once: {prompt}"
    );
    assert!(prompt.contains("Answer in English"), "{prompt}");
    // `[llm] repeat_penalty`'s default reaches Ollama's options; frequency_penalty (0) does not.
    assert_eq!(
        request.pointer("/options/repeat_penalty"),
        Some(&json!(1.1)),
        "{prompt}"
    );
    assert_eq!(
        request.pointer("/options/frequency_penalty"),
        None,
        "{prompt}"
    );
    assert_eq!(http::get(&addr, "/health").unwrap().json()["status"], "ok");
}

#[test]
fn an_unreachable_llm_degrades_to_a_labelled_extractive_answer() {
    let fake = FakeOllama::start();
    let tables = fake_llm_tables(&fake);
    drop(fake); // nothing listens there any more
    let server = ServerProcess::start(&app_config(1, "admin_token = \"t\"", &tables));
    let addr = server.addr();
    seed(&addr);
    let answer = ask(&addr, "How do I reload the workers?");
    assert_eq!(answer["mode"], "extractive");
    assert!(
        answer["answer"]
            .as_str()
            .unwrap()
            .starts_with("The language model is unavailable"),
        "{answer}"
    );
    assert!(
        answer["answer"].as_str().unwrap().contains("**HUP**")
            || answer["answer"].as_str().unwrap().contains("**reload**")
    );
    let health = http::get(&addr, "/health").unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(health.json()["status"], "degraded");
    assert_eq!(health.json()["llm"]["status"], "down");
}

#[test]
fn a_failure_mid_answer_is_reported_as_an_error_event() {
    let fake = FakeOllama::with(FakeOptions {
        tokens: 10,
        fail_after: Some(3),
        ..FakeOptions::default()
    });
    let server = seeded_server_with(&fake, 1);
    let response = post_json(
        &server.addr(),
        "/api/ask/stream",
        &json!({ "question": "reload?" }),
    )
    .unwrap();
    let events = sse_events(&response.body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.last(), Some(&"error"), "{names:?}");
    assert!(names.contains(&"token"));
    assert!(!names.contains(&"done"));
}

#[test]
fn a_client_that_disconnects_cancels_its_upstream_generation() {
    let fake = FakeOllama::with(FakeOptions {
        tokens: 50,
        answer_duration: Duration::from_secs(20),
        ..FakeOptions::default()
    });
    let server = seeded_server_with(&fake, 1);
    let question = json!({ "question": "reload?" });
    let mut stream =
        http::open_post_json(&server.addr(), "/api/ask/stream", &question, BOUND).unwrap();
    // Read until the first token has arrived, then hang up.
    http::read_until(&mut stream, "event: token").unwrap();
    drop(stream);
    assert!(
        fake.wait_until(BOUND, |c| c.chat_cancelled >= 1),
        "{:?}",
        fake.counters()
    );
    assert_eq!(fake.counters().chat_completed, 0);
}

#[test]
fn five_hundred_concurrent_streaming_questions_on_two_workers_all_complete() {
    let fake = FakeOllama::with(FakeOptions {
        tokens: 10,
        answer_duration: Duration::from_secs(2),
        ..FakeOptions::default()
    });
    let server = seeded_server_with(&fake, 2);
    let addr = server.addr();
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..500)
        .map(|i| {
            let (addr, done) = (addr.clone(), done.clone());
            std::thread::spawn(move || {
                let response = post_json(
                    &addr,
                    "/api/ask/stream",
                    &json!({ "question": format!("reload {i}?") }),
                )
                .map_err(|e| e.to_string())?;
                let events = sse_events(&response.body);
                match events.last() {
                    Some((name, _)) if name == "done" => {
                        done.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                    other => Err(format!("{} ended with {other:?}", response.status)),
                }
            })
        })
        .collect();
    let failures: Vec<String> = clients
        .into_iter()
        .filter_map(|c| c.join().unwrap().err())
        .collect();
    let elapsed = started.elapsed();
    eprintln!(
        "500 streaming answers (2 s each) on 2 workers: {elapsed:?}; fake saw {:?}",
        fake.counters()
    );
    assert!(
        failures.is_empty(),
        "{} failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert_eq!(done.load(Ordering::Relaxed), 500);
    assert!(
        fake.counters().max_concurrent_streams > 100,
        "{:?}",
        fake.counters()
    );
}

#[test]
fn a_cli_ingest_while_questions_run_fails_no_request_and_every_worker_finds_it() {
    let server = ServerProcess::start(&app_config(2, "", no_llm()));
    let addr = server.addr();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let askers: Vec<_> = (0..4)
        .map(|_| {
            let (addr, stop, ok, failed) = (addr.clone(), stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match post_json(
                        &addr,
                        "/api/ask",
                        &json!({ "question": "how do I reload?" }),
                    ) {
                        Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    assert!(wait_until(BOUND, || ok.load(Ordering::Relaxed) > 20));
    let out = Command::new(BIN)
        .args(["ingest", "--config"])
        .arg(&server.config_path)
        .arg(DOCS)
        .current_dir(server.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("16 inserted, 0 replaced, 0 unchanged, 0 failed"),
        "{stdout}"
    );
    let before = ok.load(Ordering::Relaxed);
    assert!(wait_until(BOUND, || ok.load(Ordering::Relaxed) > before + 20));
    stop.store(true, Ordering::Relaxed);
    for a in askers {
        a.join().unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0);
    let mut pids = HashSet::new();
    assert!(wait_until(BOUND, || {
        let answer = ask(&addr, "how do I reload the workers?");
        assert!(
            sources_of(&answer).iter().any(|s| s.ends_with("reload.md")),
            "{answer}"
        );
        pids.insert(
            http::get(&addr, "/health").unwrap().json()["pid"]
                .as_i64()
                .unwrap(),
        );
        pids.len() == 2
    }));
    // Ingesting the same folder again changes nothing.
    let again = Command::new(BIN)
        .args(["ingest", "--config"])
        .arg(&server.config_path)
        .arg(DOCS)
        .current_dir(server.dir.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stdout)
        .contains("0 inserted, 0 replaced, 16 unchanged, 0 failed"));
}

#[test]
fn a_real_llama_cpp_server_answers_end_to_end_over_the_openai_protocol() {
    let Some(llama) = LlamaServer::shared() else {
        return;
    };
    let tables = format!(
        "[llm]\nprovider = \"openai\"\nurl = \"{url}\"\nmodel = \"smollm2\"\nmax_tokens = 48\nfirst_token_timeout = 60\n[embed]\nprovider = \"openai\"\nurl = \"{url}\"\nmodel = \"smollm2\"\n[rag]\ningest_docs_on_first_run = false\n",
        url = llama.url()
    );
    let server = ServerProcess::start(&app_config(1, "admin_token = \"t\"", &tables));
    let addr = server.addr();
    seed(&addr);
    let response = post_json(
        &addr,
        "/api/ask/stream",
        &json!({ "question": "How do I reload the workers?" }),
    )
    .unwrap();
    let events = sse_events(&response.body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names.first(),
        Some(&"sources"),
        "{names:?} {}",
        server.logs()
    );
    assert_eq!(names.last(), Some(&"done"), "{names:?} {}", server.logs());
    assert_eq!(
        events.last().unwrap().1["mode"],
        "generated",
        "{}",
        response.body
    );
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "token")
        .map(|(_, d)| d["text"].as_str().unwrap())
        .collect();
    assert!(!text.trim().is_empty());
    assert_eq!(events[0].1["sources"][0]["title"], "Reload");
}

#[test]
fn a_pool_wide_cap_on_generations_queues_the_rest_and_tells_them_their_place() {
    let fake = FakeOllama::with(FakeOptions {
        tokens: 4,
        answer_duration: Duration::from_millis(1500),
        ..FakeOptions::default()
    });
    let tables = fake_llm_tables(&fake).replace(
        "first_token_timeout = 5\n",
        "first_token_timeout = 5\nmax_concurrent = 2\n",
    );
    let server = ServerProcess::start(&app_config(2, "admin_token = \"t\"", &tables));
    let addr = server.addr();
    seed(&addr);
    let clients: Vec<_> = (0..6)
        .map(|i| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                post_json(
                    &addr,
                    "/api/ask/stream",
                    &json!({ "question": format!("reload {i}?") }),
                )
                .unwrap()
            })
        })
        .collect();
    let responses: Vec<http::Response> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let mut queued_positions = Vec::new();
    for response in &responses {
        let events = sse_events(&response.body);
        assert_eq!(
            events.last().map(|(n, _)| n.as_str()),
            Some("done"),
            "{}",
            response.body
        );
        queued_positions.extend(
            events
                .iter()
                .filter(|(n, _)| n == "queued")
                .map(|(_, d)| d["position"].as_u64().unwrap()),
        );
    }
    let counters = fake.counters();
    assert_eq!(counters.chat_completed, 6, "{counters:?}");
    assert_eq!(
        counters.max_concurrent_streams, 2,
        "never more than max_concurrent at once: {counters:?}"
    );
    assert!(
        !queued_positions.is_empty(),
        "waiting answers were told their place"
    );
    assert!(
        queued_positions.iter().all(|p| (1..=6).contains(p)),
        "{queued_positions:?}"
    );
}

/// A server without an LLM whose `[rerank]` is `url`, with two documents that lexical search
/// ranks Reload first for "How do I reload the workers?".
fn reranked_server(url: &str) -> ServerProcess {
    let tables = format!(
        "[llm]\nprovider = \"none\"\n[rerank]\nurl = \"{url}\"\nmodel = \"bge-reranker\"\ntimeout = 5\n[rag]\ningest_docs_on_first_run = false\n"
    );
    let server = ServerProcess::start(&app_config(1, "admin_token = \"t\"", &tables));
    seed(&server.addr());
    http::add_document(
        &server.addr(),
        "Stop",
        "# Stop\n\nSend TERM to the master to stop the workers.",
    );
    server
}

fn source_titles(answer: &Value) -> Vec<String> {
    answer["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["title"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_reranker_reorders_the_fused_documents_over_its_wire_protocol() {
    let question = "How do I reload the workers?";
    let plain = ServerProcess::start(&app_config(1, "admin_token = \"t\"", no_llm()));
    seed(&plain.addr());
    http::add_document(
        &plain.addr(),
        "Stop",
        "# Stop\n\nSend TERM to the master to stop the workers.",
    );
    assert_eq!(
        source_titles(&ask(&plain.addr(), question)),
        ["Reload", "Stop"]
    );

    let fake = FakeRerank::start("TERM", 200);
    let server = reranked_server(&fake.url());
    let answer = ask(&server.addr(), question);
    assert_eq!(source_titles(&answer), ["Stop", "Reload"], "{answer}");
    let request = fake.last_request().expect("the reranker was asked");
    assert_eq!(request["query"], question);
    assert_eq!(request["model"], "bge-reranker");
    assert_eq!(
        request["documents"].as_array().unwrap().len(),
        2,
        "{request}"
    );
    assert!(
        request["documents"][0].as_str().unwrap().contains("HUP"),
        "{request}"
    );
}

#[test]
fn a_failing_reranker_keeps_the_fused_order() {
    let fake = FakeRerank::start("TERM", 500);
    let server = reranked_server(&fake.url());
    let answer = ask(&server.addr(), "How do I reload the workers?");
    assert!(fake.last_request().is_some(), "the reranker was asked");
    assert_eq!(source_titles(&answer), ["Reload", "Stop"], "{answer}");
}
