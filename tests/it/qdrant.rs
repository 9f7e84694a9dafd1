//! ragpool on a REAL Qdrant (the shared Qdrant 1.19.0 binary, tests/it/support/qdrant.rs): the
//! app end to end with `[store] backend = "qdrant"`, each test with its own Qdrant on free
//! loopback ports, killed on drop. Skipped without the binary, a failure under
//! `RAGPOOL_REQUIRE_QDRANT=1` (CI).

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::http::{self, delete, post, post_json};
use crate::support::qdrant::QdrantNode;
use crate::support::{wait_until, ServerProcess, BIN};

const BOUND: Duration = Duration::from_secs(60);
const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs");
const AUTH: &str = "Authorization: Bearer t";

/// workers.toml for a server on Qdrant at `url` (no LLM: extractive answers), the given extra
/// `[rag]` and `[store]` lines.
pub fn qdrant_config(workers: usize, url: &str, store: &str, rag: &str) -> String {
    format!(
        "workers = {workers}\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\nadmin_token = \"t\"\n\
         [store]\nbackend = \"qdrant\"\nurl = \"{url}\"\ncollection = \"ragpool_it\"\n{store}\n\
         [llm]\nprovider = \"none\"\n[rag]\n{rag}\n"
    )
}

pub fn ask(addr: &str, question: &str) -> Value {
    let response = post_json(addr, "/api/ask", &json!({ "question": question })).unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()
}

pub fn sources_of(answer: &Value) -> Vec<String> {
    answer["sources"]
        .as_array()
        .map(|sources| {
            sources
                .iter()
                .filter_map(|s| s["source"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The extractive answer and every source's snippet: all the text a reader was shown.
fn texts_of(answer: &Value) -> String {
    let mut texts = vec![answer["answer"].as_str().unwrap_or_default()];
    if let Some(sources) = answer["sources"].as_array() {
        texts.extend(sources.iter().filter_map(|s| s["snippet"].as_str()));
    }
    texts.join("\n")
}

/// Posts `{title, text}`; the outcome (`inserted`, `replaced`, `unchanged`) and the id.
pub fn upload(addr: &str, title: &str, text: &str) -> (String, String) {
    let body = json!({ "title": title, "text": text }).to_string();
    let r = post(
        addr,
        "/api/documents",
        "application/json",
        body.as_bytes(),
        &[AUTH],
    )
    .unwrap();
    assert_eq!(r.status, 201, "{}", r.body);
    let doc = &r.json()["documents"][0];
    (
        doc["outcome"].as_str().unwrap_or_default().to_string(),
        doc["id"].as_str().unwrap_or_default().to_string(),
    )
}

/// How many points of `kind` (`head` or `chunk`) the collection holds, asked over REST.
fn count_points(node: &QdrantNode, kind: &str) -> u64 {
    let body = json!({ "exact": true, "filter": { "must": [ { "key": "kind", "match": { "value": kind } } ] } });
    let (status, body) = node
        .rest(
            "POST",
            "/collections/ragpool_it/points/count",
            Some(&body.to_string()),
        )
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let json: Value = serde_json::from_str(&body).unwrap();
    json["result"]["count"].as_u64().unwrap()
}

#[test]
fn a_server_on_qdrant_ingests_answers_replaces_and_deletes() {
    let Some(mut node) = QdrantNode::start() else {
        return;
    };
    let server = ServerProcess::start(&qdrant_config(
        2,
        &node.url(),
        "",
        &format!("docs_dir = \"{DOCS}\""),
    ));
    let addr = server.addr();
    // First run: the manual goes into the (new) collection.
    assert!(
        server.wait_for_log("first run: ingested", BOUND),
        "{}",
        server.logs()
    );
    let health = http::get(&addr, "/health").unwrap().json();
    assert_eq!(health["store"]["backend"], "qdrant", "{health}");
    assert_eq!(health["store"]["status"], "ok", "{health}");
    let answer = ask(&addr, "how do I reload the workers?");
    assert!(
        sources_of(&answer)
            .iter()
            .any(|s| s.ends_with("docs/en/reload.md")),
        "{answer}"
    );
    assert!(sources_of(&ask(&addr, "как перезагрузить воркеры?"))
        .iter()
        .any(|s| s.ends_with("docs/ru/reload.md")));
    let manual = http::get(&addr, "/api/documents").unwrap().json()["documents"]
        .as_array()
        .unwrap()
        .len() as u64;
    assert!(manual >= 10, "the manual was listed: {manual}");
    assert_eq!(count_points(&node, "head"), manual, "one head per document");

    // The CLI writes to the same collection: the manual is already there.
    let again = Command::new(BIN)
        .args(["ingest", "--config"])
        .arg(&server.config_path)
        .arg(DOCS)
        .current_dir(server.dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.status.success()
            && stdout.contains(&format!(
                "0 inserted, 0 replaced, {manual} unchanged, 0 failed"
            )),
        "{stdout}\n{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // Ingest through HTTP: found from both workers.
    let (outcome, id) = upload(
        &addr,
        "Backups",
        "# Backups\n\nThe nightly backup runs backup.sh at 02:00.",
    );
    assert_eq!(outcome, "inserted");
    let mut pids = HashSet::new();
    assert!(wait_until(BOUND, || {
        let answer = ask(&addr, "when does the nightly backup run?");
        assert_eq!(answer["sources"][0]["document_id"], id.as_str(), "{answer}");
        pids.insert(http::get(&addr, "/health").unwrap().json()["pid"].as_i64());
        pids.len() == 2
    }));
    assert_eq!(
        upload(
            &addr,
            "Backups",
            "# Backups\n\nThe nightly backup runs backup.sh at 02:00."
        )
        .0,
        "unchanged"
    );

    // Replace: the new text only, the old chunks gone from the collection.
    let chunks_before = count_points(&node, "chunk");
    let (outcome, same_id) = upload(
        &addr,
        "Backups",
        "# Backups\n\nSnapshots are taken hourly by snapper; the nightly job is retired.",
    );
    assert_eq!(
        (outcome.as_str(), same_id.as_str()),
        ("replaced", id.as_str())
    );
    let answer = ask(&addr, "how often are snapshots taken?");
    assert_eq!(answer["sources"][0]["document_id"], id.as_str(), "{answer}");
    assert!(texts_of(&answer).contains("snapper"), "{answer}");
    assert!(!texts_of(&answer).contains("02:00"), "{answer}");
    assert!(
        !texts_of(&ask(&addr, "backup.sh at 02:00")).contains("02:00"),
        "the old version is not found"
    );
    assert_eq!(
        count_points(&node, "chunk"),
        chunks_before,
        "one chunk replaced by one"
    );

    // Delete: gone from answers, the list and the collection.
    assert_eq!(
        delete(&addr, &format!("/api/documents/{id}"), &[AUTH])
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        delete(&addr, &format!("/api/documents/{id}"), &[AUTH])
            .unwrap()
            .status,
        404
    );
    assert!(ask(&addr, "how often are snapshots taken?")["sources"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["document_id"] != id.as_str()));
    assert_eq!(count_points(&node, "head"), manual);
    assert_eq!(count_points(&node, "chunk"), chunks_before - 1);

    // Qdrant down: /health says so (503), a question is a clear 5xx, never a crash; back up,
    // everything answers again without a restart of ragpool.
    let workers = server.workers();
    node.kill();
    assert!(wait_until(BOUND, || {
        http::get(&addr, "/health").map(|r| r.status).ok() == Some(503)
    }));
    let down = post_json(
        &addr,
        "/api/ask",
        &json!({ "question": "how do I reload?" }),
    )
    .unwrap();
    assert!(down.status >= 500, "{} {}", down.status, down.body);
    assert!(
        !down.body.contains("tonic"),
        "no internals in the body: {}",
        down.body
    );
    node.restart().expect("Qdrant restarts on its storage");
    assert!(wait_until(BOUND, || {
        http::get(&addr, "/health").map(|r| r.status).ok() == Some(200)
    }));
    assert!(sources_of(&ask(&addr, "how do I reload the workers?"))
        .iter()
        .any(|s| s.ends_with("docs/en/reload.md")));
    assert_eq!(server.workers(), workers, "no worker died of the outage");
}
