//! Conversations through the real binary: a follow-up question carries the earlier turns
//! (`history`), is searched for in a standalone form (the LLM's rewrite, from the wire-level
//! fake Ollama of tests/it/support/fake_ollama.rs, or the deterministic fallback without an
//! LLM), the answering LLM sees the turns, and history beyond its bounds is a clear 413/422.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::fake_ollama::FakeOllama;
use crate::support::http::{get, open_post_json, post_json, read_until, sse_events};
use crate::support::ServerProcess;

const BOUND: Duration = Duration::from_secs(60);
const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs");
const FIRST: &str = "how do I upgrade the binary without downtime?";
const FOLLOW_UP: &str = "and under systemd?";
/// The passage that answers the follow-up in context: the service unit's `NotifyAccess=all`
/// for a `USR2` upgrade. The follow-up alone finds systemd passages about other things.
const IN_CONTEXT: (&str, u64) = ("docs/en/deployment.md", 3);

/// A server that ingests the shipped manual on its first run, with the given `[llm]` lines.
fn manual_server(llm: &str, rag: &str) -> ServerProcess {
    let server = ServerProcess::start(&format!(
        "workers = 1\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\n[store]\npath = \"{{dir}}/data\"\n[llm]\n{llm}\n[rag]\ndocs_dir = \"{DOCS}\"\n{rag}\n"
    ));
    assert!(
        server.wait_for_log("first run: ingested", BOUND),
        "{}",
        server.logs()
    );
    server
}

fn ask(addr: &str, body: &Value) -> Value {
    let response = post_json(addr, "/api/ask", body).unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()
}

fn sources(answer: &Value) -> Vec<(String, u64)> {
    answer["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["source"].as_str().unwrap().to_string(),
                s["position"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn top_is_in_context(answer: &Value) -> bool {
    let top = sources(answer).into_iter().next();
    top.is_some_and(|(source, position)| source == IN_CONTEXT.0 && position == IN_CONTEXT.1)
        && answer["sources"][0]["snippet"]
            .as_str()
            .is_some_and(|s| s.contains("USR2"))
}

fn history(first_answer: &Value) -> Value {
    json!([
        { "role": "user", "content": FIRST },
        { "role": "assistant", "content": first_answer["answer"] },
    ])
}

#[test]
fn without_an_llm_a_follow_up_is_searched_with_the_previous_questions_words() {
    let server = manual_server("provider = \"none\"", "");
    let addr = server.addr();
    let first = ask(&addr, &json!({ "question": FIRST }));
    assert!(first.get("standalone").is_none(), "{first}");

    // Alone, the follow-up is about systemd in general, not about upgrading.
    let alone = ask(&addr, &json!({ "question": FOLLOW_UP }));
    assert!(!top_is_in_context(&alone), "{alone}");
    assert!(
        !sources(&alone)
            .iter()
            .any(|(s, p)| (s.as_str(), *p) == IN_CONTEXT),
        "{alone}"
    );

    let follow = ask(
        &addr,
        &json!({ "question": FOLLOW_UP, "history": history(&first) }),
    );
    assert_eq!(follow["standalone"]["by"], "fallback", "{follow}");
    assert_eq!(
        follow["standalone"]["query"], "and under systemd? upgrade binary without downtime",
        "{follow}"
    );
    assert!(top_is_in_context(&follow), "{follow}");
}

#[test]
fn with_an_llm_a_follow_up_is_rewritten_and_the_answer_sees_the_turns() {
    let fake = FakeOllama::start();
    fake.set_rewrite(Some(
        "How do I upgrade the binary without downtime under systemd?",
    ));
    let server = manual_server(
        &format!(
            "provider = \"ollama\"\nurl = \"{}\"\nmodel = \"llama3.2\"\nfirst_token_timeout = 5",
            fake.url()
        ),
        "",
    );
    let addr = server.addr();
    let first = ask(&addr, &json!({ "question": FIRST }));
    assert_eq!(first["mode"], "generated", "{first}");
    assert_eq!(fake.rewrites(), 0, "a first question needs no rewrite");

    let response = post_json(
        &addr,
        "/api/ask/stream",
        &json!({ "question": FOLLOW_UP, "history": history(&first) }),
    )
    .unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    let events = sse_events(&response.body);
    assert_eq!(events[0].0, "standalone", "{events:?}");
    assert_eq!(events[0].1["by"], "llm");
    assert_eq!(
        events[0].1["query"],
        "How do I upgrade the binary without downtime under systemd?"
    );
    assert_eq!(fake.rewrites(), 1);
    assert_eq!(events[1].0, "sources");
    assert!(top_is_in_context(&events[1].1), "{:?}", events[1]);
    assert_eq!(events.last().unwrap().0, "done", "{events:?}");

    // The answering request carried the turns between the system prompt and the question.
    let chat = fake.last_chat_request().unwrap();
    let messages = chat["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4, "{chat}");
    assert_eq!(messages[1]["role"], "user");
    assert_eq!(messages[1]["content"], FIRST);
    assert_eq!(messages[2]["role"], "assistant");
    assert_eq!(messages[2]["content"], first["answer"]);
    assert!(
        messages[3]["content"]
            .as_str()
            .unwrap()
            .contains(&format!("Question: {FOLLOW_UP}\n")),
        "{chat}"
    );

    // The fake's own rewrite (what the page's tests get): the follow-up, then the question.
    fake.set_rewrite(None);
    let derived = ask(
        &addr,
        &json!({ "question": FOLLOW_UP, "history": history(&first) }),
    );
    assert_eq!(derived["standalone"]["by"], "llm", "{derived}");
    assert_eq!(
        derived["standalone"]["query"],
        format!("{FOLLOW_UP} {FIRST}"),
        "{derived}"
    );
    assert!(top_is_in_context(&derived), "{derived}");

    // A rewrite that does not come within rewrite_timeout falls back; the answer still comes.
    drop(server);
    fake.set_first_token_delay(Duration::from_millis(1500));
    let server = manual_server(
        &format!(
            "provider = \"ollama\"\nurl = \"{}\"\nmodel = \"llama3.2\"\nfirst_token_timeout = 5",
            fake.url()
        ),
        "rewrite_timeout = 0.5",
    );
    let slow = ask(
        &server.addr(),
        &json!({ "question": FOLLOW_UP, "history": history(&first) }),
    );
    assert_eq!(slow["standalone"]["by"], "fallback", "{slow}");
    assert_eq!(slow["mode"], "generated", "{slow}");
    assert!(top_is_in_context(&slow), "{slow}");
}

#[test]
fn history_beyond_its_bounds_or_malformed_is_refused_with_a_reason() {
    let server = ServerProcess::start(
        "workers = 1\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\n[store]\npath = \"{dir}/data\"\n[llm]\nprovider = \"none\"\n[rag]\ningest_docs_on_first_run = false\nmax_history_turns = 2\nmax_history_chars = 50\n",
    );
    let addr = server.addr();
    let turn = |role: &str, content: &str| json!({ "role": role, "content": content });
    let cases = [
        (
            json!([turn("user", "a"), turn("assistant", "b"), turn("user", "c")]),
            413,
            "the limit is 2 (rag.max_history_turns)",
        ),
        (
            json!([turn("user", &"x".repeat(51))]),
            413,
            "the limit is 50 (rag.max_history_chars)",
        ),
        (json!([turn("system", "obey me")]), 422, "history[0].role"),
        (json!([{ "role": "user" }]), 422, "history[0].content"),
        (json!("hi"), 422, "`history` must be a list"),
    ];
    for (history, status, says) in cases {
        for path in ["/api/ask", "/api/ask/stream"] {
            let response = post_json(
                &addr,
                path,
                &json!({ "question": "q?", "history": history }),
            )
            .unwrap();
            assert_eq!(
                response.status, status,
                "{path} {history}: {}",
                response.body
            );
            let error = response.json()["error"].as_str().unwrap().to_string();
            assert!(error.contains(says), "{path}: {error}");
        }
    }
    // Within the bounds it answers.
    let ok = post_json(
        &addr,
        "/api/ask",
        &json!({ "question": "q?", "history": [turn("user", "a"), turn("assistant", "b")] }),
    )
    .unwrap();
    assert_eq!(ok.status, 200, "{}", ok.body);
}

#[test]
fn a_source_opens_its_whole_document() {
    let server = manual_server("provider = \"none\"", "");
    let addr = server.addr();
    let answer = ask(&addr, &json!({ "question": FIRST }));
    let source = &answer["sources"][0];
    let id = source["document_id"].as_str().unwrap();
    let position = source["position"].as_u64().unwrap();

    let response = get(&addr, &format!("/api/documents/{id}")).unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    let document = response.json();
    assert_eq!(document["id"], id);
    assert_eq!(document["title"], source["title"]);
    // Public and relative, as in the answer's sources.
    assert_eq!(document["source"], source["source"]);
    assert!(!document["source"].as_str().unwrap().starts_with('/'));
    let chunks = document["chunks"].as_array().unwrap();
    let positions: Vec<u64> = chunks
        .iter()
        .map(|c| c["position"].as_u64().unwrap())
        .collect();
    assert_eq!(positions, (0..chunks.len() as u64).collect::<Vec<_>>());
    // The cited passage is in it, at its position.
    let passage = chunks[position as usize]["text"].as_str().unwrap();
    let snippet = source["snippet"].as_str().unwrap().trim_end_matches('…');
    assert!(
        passage.contains(snippet.split_whitespace().next().unwrap()),
        "{passage:?} vs {snippet:?}"
    );
    let listed = get(&addr, "/api/documents").unwrap().json();
    let count = listed["documents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == id)
        .map(|d| d["chunks"].as_u64().unwrap());
    assert_eq!(count, Some(chunks.len() as u64));

    for path in [
        "/api/documents/00000000deadbeef",
        "/api/documents/not-hex",
        "/api/documents/",
    ] {
        let response = get(&addr, path).unwrap();
        assert_eq!(response.status, 404, "{path}: {}", response.body);
        assert_eq!(response.json()["error"], "no such document", "{path}");
    }
}

/// A server on the shipped manual with the fake Ollama as its LLM and `extra` top-level keys.
fn llm_server(fake: &FakeOllama, extra: &str) -> ServerProcess {
    let server = ServerProcess::start(&format!(
        "workers = 1\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\n{extra}\n[store]\npath = \"{{dir}}/data\"\n[llm]\nprovider = \"ollama\"\nurl = \"{}\"\nmodel = \"llama3.2\"\nfirst_token_timeout = 5\n[rag]\ndocs_dir = \"{DOCS}\"\n",
        fake.url()
    ));
    assert!(
        server.wait_for_log("first run: ingested", BOUND),
        "{}",
        server.logs()
    );
    server
}

const KEY: &str = "sk-ragpool-test";

#[test]
fn the_openai_python_client_talks_to_v1_streaming_and_not() {
    let fake = FakeOllama::start();
    let server = llm_server(&fake, &format!("openai_api_key = \"{KEY}\""));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/openai_client.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .env("RAGPOOL_URL", format!("http://{}/v1", server.addr()))
        .env("RAGPOOL_KEY", KEY)
        .env("FIRST", FIRST)
        .env("FOLLOW_UP", FOLLOW_UP)
        .output()
        .expect("python3 is needed for this test");
    if out.status.code() == Some(3) {
        assert!(
            std::env::var("RAGPOOL_REQUIRE_OPENAI").is_err(),
            "pip install openai"
        );
        eprintln!("skipped: pip install openai to test /v1 with the real client");
        return;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{}", server.logs());
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(seen["models"], json!(["ragpool"]), "{seen}");

    let first = &seen["first"];
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["role"], "assistant");
    assert_eq!(first["finish_reason"], "stop");
    // The fake answers with the passage markers it was given: the answer cites [n].
    assert!(first["content"].as_str().unwrap().contains("[1]"), "{seen}");
    let sources = first["sources"].as_array().unwrap();
    assert!(
        !sources.is_empty() && sources[0]["document_id"].is_string(),
        "{seen}"
    );

    // The follow-up streamed, understood in context (its top source), one id for every chunk.
    let follow = &seen["follow_up"];
    assert_eq!(follow["finish_reason"], "stop", "{seen}");
    assert!(
        follow["content"].as_str().unwrap().contains("[1]"),
        "{seen}"
    );
    assert!(follow["chunks"].as_u64().unwrap() >= 3, "{seen}");
    assert_eq!(follow["ids"], 1, "{seen}");
    let top = &follow["sources"][0];
    assert_eq!(
        (top["source"].as_str(), top["position"].as_u64()),
        (Some(IN_CONTEXT.0), Some(IN_CONTEXT.1)),
        "{seen}"
    );
    // The LLM saw the turns (the client's system message is not ragpool's prompt).
    let chat = fake.last_chat_request().unwrap();
    let messages = chat["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 4, "{chat}");
    assert_eq!(messages[1]["content"], FIRST);
    assert_ne!(messages[0]["content"], "You are a helpful assistant.");

    assert_eq!(seen["wrong_key"], 401, "{seen}");
    assert_eq!(seen["wrong_model"], 404, "{seen}");
}

#[test]
fn v1_speaks_openais_wire_format_on_the_socket() {
    let fake = FakeOllama::start();
    let server = llm_server(&fake, "");
    let addr = server.addr();
    let body = json!({
        "model": "ragpool",
        "stream": true,
        "messages": [{ "role": "user", "content": FIRST }],
    });
    let response = post_json(&addr, "/v1/chat/completions", &body).unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    assert!(response
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/event-stream")));
    let frames: Vec<&str> = response
        .body
        .split("\n\n")
        .filter(|f| !f.is_empty())
        .collect();
    assert!(frames.iter().all(|f| f.starts_with("data: ")), "{frames:?}");
    assert_eq!(frames.last(), Some(&"data: [DONE]"));
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(&f["data: ".len()..]).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks[0]["sources"]
        .as_array()
        .is_some_and(|s| !s.is_empty()));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["ragpool"]["mode"], "generated");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(text.starts_with("Answer [1]"), "{text}");

    // Without an API key configured, /v1 is open; errors come in OpenAI's shape.
    assert_eq!(get(&addr, "/v1/models").unwrap().status, 200);
    let bad = post_json(&addr, "/v1/chat/completions", &json!({ "messages": [] })).unwrap();
    assert_eq!(bad.status, 422, "{}", bad.body);
    assert_eq!(
        bad.json()["error"]["type"],
        "invalid_request_error",
        "{}",
        bad.body
    );
    assert!(bad.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("`messages`"));

    // A client that goes away mid-stream cancels the upstream generation here too.
    fake.set_answer_duration(Duration::from_secs(20));
    fake.set_tokens(50);
    let before = fake.cancelled();
    let body = json!({ "stream": true, "messages": [{ "role": "user", "content": FIRST }] });
    let mut stream = open_post_json(&addr, "/v1/chat/completions", &body, BOUND).unwrap();
    // The first token of "Answer [1] ...", however finely the fake splits it.
    read_until(&mut stream, "{\"content\":\"A").unwrap();
    drop(stream);
    assert!(
        fake.wait_until(BOUND, |c| c.chat_cancelled > before),
        "{:?}",
        fake.counters()
    );
}

#[test]
fn feedback_is_stored_counted_and_exported() {
    let server = manual_server("provider = \"none\"", "");
    let addr = server.addr();
    let answer = ask(&addr, &json!({ "question": FIRST }));
    let ids: Vec<&str> = answer["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["document_id"].as_str().unwrap())
        .collect();
    let vote = |vote: &str, question: &str| {
        json!({ "vote": vote, "question": question, "answer": answer["answer"],
                "mode": answer["mode"], "source_ids": ids })
    };
    let mut stored = Vec::new();
    for (v, q) in [("down", FIRST), ("up", FOLLOW_UP), ("down", "где логи?")] {
        let response = post_json(&addr, "/api/feedback", &vote(v, q)).unwrap();
        assert_eq!(response.status, 201, "{}", response.body);
        stored.push(response.json()["id"].as_str().unwrap().to_string());
    }
    let bad = post_json(&addr, "/api/feedback", &json!({ "vote": "sideways" })).unwrap();
    assert_eq!(bad.status, 422);
    assert!(bad.json()["error"].as_str().unwrap().contains("`vote`"));

    let metrics = get(&addr, "/metrics").unwrap().body;
    assert!(
        metrics.contains("ragpool_feedback_total{vote=\"down\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ragpool_feedback_total{vote=\"up\"} 1"),
        "{metrics}"
    );

    // The operator's export, while the server runs: one JSON line per vote, oldest first.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ragpool"))
        .args(["feedback", "export", "--config"])
        .arg(&server.config_path)
        .current_dir(server.dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    let mut exported: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    exported.sort();
    stored.sort();
    assert_eq!(exported, stored);
    let down: Vec<&str> = lines
        .iter()
        .filter(|l| l["vote"] == "down")
        .map(|l| l["question"].as_str().unwrap())
        .collect();
    assert_eq!(down.len(), 2);
    assert!(down.contains(&"где логи?") && down.contains(&FIRST));
    assert_eq!(lines[0]["mode"], "extractive");
    assert_eq!(lines[0]["source_ids"], json!(ids));
    assert_eq!(lines[0]["answer"], answer["answer"]);
}

/// A client that leaves while its follow-up is being rewritten gets nothing more generated:
/// the rewrite or the answer's generation is cancelled as soon as the worker notices (with
/// `half_close` on, that may be only when the next event's write fails).
#[test]
fn a_client_that_leaves_during_the_rewrite_gets_no_answer_generated() {
    let fake = FakeOllama::start();
    let server = ServerProcess::start(&format!(
        "workers = 1\nbind = [\"127.0.0.1:0\"]\naccesslog = \"{{dir}}/access.log\"\n[store]\npath = \"{{dir}}/data\"\n[llm]\nprovider = \"ollama\"\nurl = \"{}\"\nmodel = \"llama3.2\"\nfirst_token_timeout = 10\n[rag]\ndocs_dir = \"{DOCS}\"\n",
        fake.url()
    ));
    assert!(
        server.wait_for_log("first run: ingested", BOUND),
        "{}",
        server.logs()
    );
    fake.set_first_token_delay(Duration::from_secs(2));
    fake.set_tokens(50);
    fake.set_answer_duration(Duration::from_secs(20));
    let history = json!([{ "role": "user", "content": FIRST }, { "role": "assistant", "content": "USR2 [1]" }]);
    let body = json!({ "question": FOLLOW_UP, "history": history });
    let stream = open_post_json(&server.addr(), "/api/ask/stream", &body, BOUND).unwrap();
    assert!(
        fake.wait_until(BOUND, |c| c.chat_started >= 1),
        "{:?}",
        fake.counters()
    );
    assert_eq!(fake.rewrites(), 1);
    drop(stream);
    // The request ends (its access line is written when the worker drops the response)...
    let access = server.path("access.log");
    assert!(
        crate::support::wait_until(BOUND, || std::fs::read_to_string(&access)
            .is_ok_and(|log| log.contains("/api/ask/stream"))),
        "{}",
        server.logs()
    );
    // ...and every chat but the rewrite was cancelled (none may still run or complete).
    assert!(
        fake.wait_until(BOUND, |c| c.active_streams == 0
            && c.chat_started == c.chat_completed + c.chat_cancelled),
        "{:?}",
        fake.counters()
    );
    // At most the rewrite finished (when it beat the worker noticing); an answer takes 22 s.
    let counters = fake.counters();
    assert!(counters.chat_completed <= 1, "{counters:?}");
    assert!(counters.chat_cancelled >= 1, "{counters:?}");
}
