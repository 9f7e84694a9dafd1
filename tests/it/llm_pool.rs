//! A pool of LLM servers (`[[llm.backend]]`) through the real binary: several FAKE Ollama
//! servers (tests/it/support/fake_ollama.rs, at Ollama's wire protocol) behind one ragpool of
//! several workers. Proves the pool-wide admission in shared memory (each backend's
//! `max_concurrent` is a hard cap across workers, answers go where there is room, so the
//! split follows capacity), the circuit breaker (a failing or dead backend is ejected, costs at
//! most the answers in flight on it, and is taken back after a health probe once it returns),
//! and what `/status` and `/metrics` show per backend. Figures are printed for the report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::fake_ollama::{FakeOllama, FakeOptions};
use crate::support::http::{self, post_json, sse_events};
use crate::support::{free_port, wait_until, ServerProcess};

const BOUND: Duration = Duration::from_secs(60);

/// One `[[llm.backend]]` table.
fn backend(url: &str, max_concurrent: usize) -> String {
    format!("[[llm.backend]]\nurl = \"{url}\"\nmax_concurrent = {max_concurrent}\n")
}

fn pool_config(workers: usize, llm: &str, backends: &[String]) -> String {
    format!(
        "workers = {workers}\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\nadmin_token = \"t\"\n\
         [store]\npath = \"{{dir}}/data\"\n\
         [rag]\ningest_docs_on_first_run = false\n\
         [llm]\nprovider = \"ollama\"\nmodel = \"llama3.2\"\nfirst_token_timeout = 5\n\
         connect_timeout = 1\n{llm}\n{}",
        backends.concat()
    )
}

fn seed(addr: &str) {
    http::add_document(
        addr,
        "Reload",
        "# Reload\n\nSend HUP to the master to reload the workers without downtime.",
    );
}

/// How one streamed question ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// `done` with `mode = "generated"`.
    Generated,
    /// `done`, answered without the LLM.
    Extractive,
    /// An `error` event (the model failed mid-answer), or no clean end at all.
    Failed,
}

fn ask_stream(addr: &str, i: usize) -> Outcome {
    let Ok(response) = post_json(
        addr,
        "/api/ask/stream",
        &json!({ "question": format!("how do I reload the workers ({i})?") }),
    ) else {
        return Outcome::Failed;
    };
    let events = sse_events(&response.body);
    match events.last() {
        Some((name, data)) if name == "done" => match data["mode"].as_str() {
            Some("generated") => Outcome::Generated,
            _ => Outcome::Extractive,
        },
        _ => Outcome::Failed,
    }
}

fn status(addr: &str) -> Value {
    let response = http::get(addr, "/status").unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()
}

fn backend_status(addr: &str, index: usize) -> Value {
    status(addr)["llm_backends"][index].clone()
}

/// `count` questions from `clients` threads at once; the outcomes in order of completion.
fn ask_many(addr: &str, clients: usize, count: usize) -> Vec<Outcome> {
    let next = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let (addr, next) = (addr.to_string(), Arc::clone(&next));
            std::thread::spawn(move || {
                let mut outcomes = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst) as usize;
                    if i >= count {
                        return outcomes;
                    }
                    outcomes.push(ask_stream(&addr, i));
                }
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect()
}

fn count(outcomes: &[Outcome], which: Outcome) -> usize {
    outcomes.iter().filter(|o| **o == which).count()
}

fn slow(answer_ms: u64) -> FakeOptions {
    FakeOptions {
        tokens: 4,
        answer_duration: Duration::from_millis(answer_ms),
        ..FakeOptions::default()
    }
}

#[test]
fn two_hundred_concurrent_questions_never_put_more_than_four_on_a_backend() {
    let fakes: Vec<FakeOllama> = (0..3).map(|_| FakeOllama::with(slow(150))).collect();
    let backends: Vec<String> = fakes.iter().map(|f| backend(&f.url(), 4)).collect();
    let server = ServerProcess::start(&pool_config(3, "", &backends));
    let addr = server.addr();
    seed(&addr);
    let outcomes = ask_many(&addr, 200, 200);
    assert_eq!(count(&outcomes, Outcome::Generated), 200, "{outcomes:?}");
    let per_backend: Vec<_> = fakes.iter().map(FakeOllama::counters).collect();
    for (i, c) in per_backend.iter().enumerate() {
        assert!(
            c.max_concurrent_streams <= 4,
            "backend {i} had {} at once: {c:?}",
            c.max_concurrent_streams
        );
        assert_eq!(
            c.max_concurrent_streams, 4,
            "backend {i} was used to its cap under this load: {c:?}"
        );
    }
    let completed: Vec<u64> = per_backend.iter().map(|c| c.chat_completed).collect();
    assert_eq!(completed.iter().sum::<u64>(), 200, "{completed:?}");
    let shown: Vec<u64> = (0..3)
        .map(|i| backend_status(&addr, i)["answers"].as_u64().unwrap())
        .collect();
    assert_eq!(shown, completed, "/status counts what each backend did");
    eprintln!(
        "llm pool, 200 concurrent questions, max_concurrent = 4 x 3 backends, 3 workers: \
         per backend answers {completed:?}, most at once {:?}",
        per_backend
            .iter()
            .map(|c| c.max_concurrent_streams)
            .collect::<Vec<_>>()
    );
}

#[test]
fn answers_are_split_by_capacity() {
    let caps = [1usize, 2, 5];
    let fakes: Vec<FakeOllama> = caps.iter().map(|_| FakeOllama::with(slow(300))).collect();
    let backends: Vec<String> = fakes
        .iter()
        .zip(caps)
        .map(|(f, cap)| backend(&f.url(), cap))
        .collect();
    let server = ServerProcess::start(&pool_config(2, "", &backends));
    let addr = server.addr();
    seed(&addr);
    // Always more questions waiting than places (8), so every backend runs at its cap.
    let outcomes = ask_many(&addr, 24, 160);
    assert_eq!(count(&outcomes, Outcome::Generated), 160, "{outcomes:?}");
    let completed: Vec<u64> = fakes.iter().map(|f| f.counters().chat_completed).collect();
    let total: usize = caps.iter().sum();
    for (i, (&done, cap)) in completed.iter().zip(caps).enumerate() {
        let expected = 160.0 * cap as f64 / total as f64;
        let ratio = done as f64 / expected;
        assert!(
            (0.6..=1.4).contains(&ratio),
            "backend {i} (max_concurrent {cap}) took {done} of 160, expected about {expected}: {completed:?}"
        );
        assert!(fakes[i].counters().max_concurrent_streams <= cap as u64);
    }
    eprintln!(
        "llm pool, split by capacity: max_concurrent {caps:?} took {completed:?} of 160 answers"
    );
}

#[test]
fn a_failing_and_a_refusing_backend_are_ejected_then_taken_back_when_they_recover() {
    // A: slow and healthy. B: fails after its first token (the answer cannot move: a token
    // was sent). C: nothing listening (refused: the answer moves to another backend).
    let a = FakeOllama::with(slow(100));
    let b = FakeOllama::with(FakeOptions {
        fail_after: Some(1),
        ..slow(100)
    });
    let c_port = free_port();
    let c_url = format!("http://127.0.0.1:{c_port}");
    let backends = [
        backend(&a.url(), 4),
        backend(&b.url(), 4),
        backend(&c_url, 4),
    ];
    let server = ServerProcess::start(&pool_config(
        2,
        "breaker_failures = 3\nbreaker_cooldown = 1\n",
        &backends,
    ));
    let addr = server.addr();
    seed(&addr);

    // One question at a time: at most one answer is ever in flight on B.
    let outcomes = ask_many(&addr, 1, 40);
    let failed = count(&outcomes, Outcome::Failed);
    let b_state = backend_status(&addr, 1);
    let c_state = backend_status(&addr, 2);
    assert_eq!(
        count(&outcomes, Outcome::Extractive),
        0,
        "a healthy backend was always there: {outcomes:?}"
    );
    assert_eq!(
        failed as u64,
        b.counters().chat_failed,
        "only B's failures (each an answer in flight on it) cost answers; C cost none"
    );
    assert!(
        b_state["ejections"].as_u64().unwrap() >= 1 && c_state["ejections"].as_u64().unwrap() >= 1,
        "{b_state} {c_state}"
    );
    // Ejected: B costs at most its first breaker_failures, then one trial per cool-down.
    let ejections = b_state["ejections"].as_u64().unwrap();
    assert!(
        failed as u64 <= 3 + ejections,
        "{failed} failed with {ejections} ejections"
    );
    assert_eq!(
        b_state["errors"].as_u64().unwrap(),
        failed as u64,
        "{b_state}"
    );
    assert!(c_state["errors"].as_u64().unwrap() >= 3, "{c_state}");
    assert!(
        c_state["errors"].as_u64() >= c_state["answers"].as_u64(),
        "every try on C failed (and its probes): {c_state}"
    );
    let metrics = http::get(&addr, "/metrics").unwrap().body;
    let c_up = format!("ragpool_llm_backend_up{{backend=\"2\",url=\"{c_url}\"}} 0");
    assert!(metrics.contains(&c_up), "{metrics}");
    assert!(
        metrics.contains("ragpool_llm_backend_errors_total{backend=\"1\""),
        "{metrics}"
    );
    eprintln!(
        "llm pool, failing backends: 40 questions in sequence, {failed} failed (all mid-stream on \
         the failing backend B, {ejections} ejections of it), 0 cost by the refusing backend C \
         ({} refused tries moved elsewhere); A {} answers, B {} completed",
        c_state["errors"],
        a.counters().chat_completed,
        b.counters().chat_completed
    );

    // Both recover: B stops failing, C comes up. After a cool-down and a health probe each is
    // on trial, then closed, and takes answers again.
    b.set_fail_after(None);
    let c = FakeOllama::on_port(slow(100), c_port);
    let before = (b.counters().chat_completed, c.counters().chat_completed);
    let recovered = wait_until(BOUND, || {
        ask_many(&addr, 4, 8);
        backend_status(&addr, 1)["state"] == "closed"
            && backend_status(&addr, 2)["state"] == "closed"
            && b.counters().chat_completed > before.0
            && c.counters().chat_completed > before.1
    });
    assert!(recovered, "{}", status(&addr)["llm_backends"]);
    let after = ask_many(&addr, 6, 60);
    assert_eq!(count(&after, Outcome::Generated), 60, "{after:?}");
    let split: Vec<u64> = [&a, &b, &c]
        .iter()
        .map(|f| f.counters().chat_completed)
        .collect();
    eprintln!("llm pool, after recovery: answers per backend so far A, B, C = {split:?}");
    // `ragpool status` reads a config naming the bound address, as an operator's would.
    let cli_config = server.path("status.toml");
    std::fs::write(&cli_config, format!("bind = [\"{addr}\"]\n")).unwrap();
    let text = std::process::Command::new(crate::support::BIN)
        .args(["status", "--config"])
        .arg(&cli_config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("EJECTED") && text.contains(&c_url),
        "ragpool status shows the pool: {text}"
    );
}

#[test]
fn a_backend_that_dies_costs_at_most_its_answers_in_flight() {
    let a = FakeOllama::with(slow(800));
    let b = FakeOllama::with(slow(800));
    let b_port = b.addr().port();
    let backends = [backend(&a.url(), 4), backend(&b.url(), 4)];
    let server = ServerProcess::start(&pool_config(
        2,
        "breaker_failures = 2\nbreaker_cooldown = 1\n",
        &backends,
    ));
    let addr = server.addr();
    seed(&addr);

    let load = {
        let addr = addr.clone();
        std::thread::spawn(move || ask_many(&addr, 6, 60))
    };
    assert!(
        b.wait_until(BOUND, |c| c.active_streams >= 2 && c.chat_completed >= 2),
        "B is busy: {:?}",
        b.counters()
    );
    let in_flight = b.counters().active_streams;
    drop(b); // SIGKILL-like for a server: every connection cut, nothing listening after.
    let outcomes = load.join().unwrap();
    let failed = count(&outcomes, Outcome::Failed);
    // In flight on it at the kill: what was counted just before, at most its cap of 4 (one
    // more could start between the count and the kill).
    assert!(
        failed <= 4,
        "{failed} answers failed, more than the dead backend's max_concurrent"
    );
    assert!(
        failed >= 1,
        "the answers cut mid-stream are reported as failed"
    );
    assert_eq!(count(&outcomes, Outcome::Extractive), 0, "{outcomes:?}");
    assert_eq!(backend_status(&addr, 1)["state"], "open");

    let b = FakeOllama::on_port(slow(100), b_port);
    let back = wait_until(BOUND, || {
        ask_many(&addr, 2, 4);
        b.counters().chat_completed > 0 && backend_status(&addr, 1)["state"] == "closed"
    });
    assert!(back, "{}", status(&addr)["llm_backends"]);
    eprintln!(
        "llm pool, a backend killed under load (6 clients, 60 questions): {failed} failed, \
         {in_flight} were in flight on it; {} generated; it took answers again after it returned",
        count(&outcomes, Outcome::Generated)
    );
}

#[test]
fn embedding_calls_move_off_a_dead_embedding_server_and_come_back_to_it() {
    let e1 = FakeOllama::start();
    let e2 = FakeOllama::start();
    let e1_port = e1.addr().port();
    let config = format!(
        "workers = 2\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\nadmin_token = \"t\"\n\
         [store]\npath = \"{{dir}}/data\"\n\
         [rag]\ningest_docs_on_first_run = false\n\
         [llm]\nprovider = \"none\"\nbreaker_failures = 2\nbreaker_cooldown = 1\n\
         [embed]\nprovider = \"ollama\"\nmodel = \"nomic-embed-text\"\nurl = [\"{}\", \"{}\"]\n",
        e1.url(),
        e2.url()
    );
    let server = ServerProcess::start(&config);
    let addr = server.addr();
    seed(&addr);
    for i in 0..10 {
        assert_eq!(ask_stream(&addr, i), Outcome::Extractive);
    }
    let (c1, c2) = (e1.counters(), e2.counters());
    assert!(
        c1.embed_requests >= 3 && c2.embed_requests >= 3,
        "both servers embed: {c1:?} {c2:?}"
    );

    drop(e1);
    let before = e2.counters().embed_requests;
    for i in 0..20 {
        assert_eq!(ask_stream(&addr, i), Outcome::Extractive);
    }
    http::add_document(
        &addr,
        "Drain",
        "# Drain\n\nTERM drains the workers gracefully.",
    );
    assert!(
        e2.counters().embed_requests >= before + 21,
        "every question and the upload embedded on the live server: {:?}",
        e2.counters()
    );
    let health = http::get(&addr, "/health").unwrap().json();
    assert_eq!(health["store"]["pending_vectors"], 0, "{health}");
    let dead = status(&addr)["embed_backends"][0].clone();
    assert_eq!(dead["state"], "open", "{dead}");
    let errors = dead["errors"].as_u64().unwrap();
    assert!(errors >= 2, "{dead}");

    let e1 = FakeOllama::on_port(FakeOptions::default(), e1_port);
    let back = wait_until(BOUND, || {
        ask_stream(&addr, 0);
        e1.counters().embed_requests > 0 && status(&addr)["embed_backends"][0]["state"] == "closed"
    });
    assert!(back, "{}", status(&addr)["embed_backends"]);
    let metrics = http::get(&addr, "/metrics").unwrap().body;
    assert!(
        metrics.contains("ragpool_embed_backend_ejections_total{backend=\"0\""),
        "{metrics}"
    );
    eprintln!(
        "embed pool: one of two embedding servers killed: 21 calls after it, 0 without vectors \
         ({errors} failed tries moved to the other); it took calls again once back"
    );
}
