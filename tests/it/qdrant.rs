//! ragpool on a REAL Qdrant (the shared Qdrant 1.19.0 binary, tests/it/support/qdrant.rs): the
//! app end to end with `[store] backend = "qdrant"`, each test with its own Qdrant on free
//! loopback ports, killed on drop. Skipped without the binary, a failure under
//! `RAGPOOL_REQUIRE_QDRANT=1` (CI).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::fake_ollama::{FakeOllama, FakeOptions};
use crate::support::http::{self, delete, post, post_json, Response};
use crate::support::nginx::{get_from, require_nginx, send_from, NginxSite, Upstream};
use crate::support::qdrant::{QdrantCluster, QdrantNode};
use crate::support::{wait_until, ServerProcess, BIN};

const BOUND: Duration = Duration::from_secs(60);
const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs");
const AUTH: &str = "Authorization: Bearer t";

/// workers.toml for a server on the Qdrant nodes at `urls` (no LLM: extractive answers), the
/// given extra `[store]` and `[rag]` lines.
pub fn qdrant_config(workers: usize, urls: &[String], store: &str, rag: &str) -> String {
    let url = urls
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "workers = {workers}\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\nadmin_token = \"t\"\n\
         [store]\nbackend = \"qdrant\"\nurl = [{url}]\ncollection = \"ragpool_it\"\n{store}\n\
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
        &[node.url()],
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

/// Questions from `clients` threads until stopped, counting answers and keeping failures.
struct Askers {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Askers {
    fn start(addr: &str, clients: usize) -> Askers {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (addr, stop, ok, failures) = (
                    addr.to_string(),
                    Arc::clone(&stop),
                    Arc::clone(&ok),
                    Arc::clone(&failures),
                );
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(600);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let question = json!({ "question": "how do I reload the workers?" });
                        match post_json(&addr, "/api/ask", &question) {
                            Ok(r) if r.status == 200 && !sources_of(&r.json()).is_empty() => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => failures
                                .lock()
                                .unwrap()
                                .push(format!("{} {}", r.status, r.body)),
                            Err(e) => failures.lock().unwrap().push(e.to_string()),
                        }
                    }
                })
            })
            .collect();
        Askers {
            stop,
            ok,
            failures,
            threads,
        }
    }

    fn answered(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `more` further questions were answered.
    fn wait_for_more(&self, more: u64) -> bool {
        let target = self.answered() + more;
        wait_until(BOUND, || self.answered() >= target)
    }

    /// Stops the threads; the answered count and the failures.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

/// The collection's replica states on `node` (`GET /collections/{c}/cluster`): each local and
/// remote shard replica's state, e.g. "Active", "Dead", "Partial".
fn replica_states(node: &QdrantNode) -> Vec<String> {
    let Ok((200, body)) = node.rest("GET", "/collections/ragpool_it/cluster", None) else {
        return Vec::new();
    };
    let json: Value = serde_json::from_str(&body).unwrap_or_default();
    ["local_shards", "remote_shards"]
        .iter()
        .flat_map(|key| json["result"][key].as_array().cloned().unwrap_or_default())
        .filter_map(|shard| shard["state"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn answers_go_on_while_a_qdrant_cluster_node_is_killed_and_restarted() {
    const CLIENTS: usize = 4;
    let Some(mut cluster) = QdrantCluster::start(3) else {
        return;
    };
    let server = ServerProcess::start(&qdrant_config(
        2,
        &cluster.urls(),
        "shard_number = 3\nreplication_factor = 2\nwrite_consistency_factor = 1",
        &format!("docs_dir = \"{DOCS}\""),
    ));
    let addr = server.addr();
    assert!(
        server.wait_for_log("first run: ingested", BOUND),
        "{}",
        server.logs()
    );
    // The collection ragpool created: 3 shards, 2 copies each, spread over the 3 nodes.
    let (status, body) = cluster.nodes[1]
        .rest("GET", "/collections/ragpool_it", None)
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    let params = &info["result"]["config"]["params"];
    assert_eq!(
        (
            params["shard_number"].as_u64(),
            params["replication_factor"].as_u64(),
            params["write_consistency_factor"].as_u64()
        ),
        (Some(3), Some(2), Some(1)),
        "{info}"
    );
    let replicas: usize = cluster
        .nodes
        .iter()
        .map(|node| {
            let (_, body) = node
                .rest("GET", "/collections/ragpool_it/cluster", None)
                .unwrap();
            let json: Value = serde_json::from_str(&body).unwrap();
            json["result"]["local_shards"]
                .as_array()
                .map_or(0, Vec::len)
        })
        .sum();
    assert_eq!(replicas, 6, "3 shards x 2 replicas over the nodes");

    let askers = Askers::start(&addr, CLIENTS);
    assert!(askers.wait_for_more(50), "answers before the kill");
    // SIGKILL the node ragpool talks to first (the first URL).
    let before_kill = askers.answered();
    cluster.nodes[0].kill();
    assert!(askers.wait_for_more(100), "answers while a node is down");
    let during_outage = askers.answered() - before_kill;

    // Ingest while the node is down: all of it or a clear error, never a part.
    let text =
        "# Outage drill\n\nDuring the drill the zeppelin hangar doors open within nine seconds.";
    let body = json!({ "title": "Outage drill", "text": text }).to_string();
    let r = post(
        &addr,
        "/api/documents",
        "application/json",
        body.as_bytes(),
        &[AUTH],
    )
    .unwrap();
    let ingested_in_outage = r.status == 201;
    if ingested_in_outage {
        assert_eq!(
            r.json()["documents"][0]["outcome"],
            "inserted",
            "{}",
            r.body
        );
    } else {
        assert!(r.status >= 500, "{} {}", r.status, r.body);
        assert!(
            r.json()["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{}",
            r.body
        );
    }
    let drill = ask(&addr, "zeppelin hangar doors");
    let listed = http::get(&addr, "/api/documents").unwrap().json();
    let in_list = listed["documents"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["title"] == "Outage drill");
    assert_eq!(
        (
            sources_of(&drill).contains(&"Outage drill".to_string()),
            in_list
        ),
        (ingested_in_outage, ingested_in_outage),
        "the document is whole or absent: {drill}"
    );

    // Back: the node rejoins and its replicas recover; answers never stopped.
    cluster.nodes[0]
        .restart()
        .expect("the killed node restarts");
    assert!(
        wait_until(BOUND, || {
            let states = replica_states(&cluster.nodes[0]);
            states.len() == 6 && states.iter().all(|s| s == "Active")
        }),
        "the replicas recovered: {:?}",
        replica_states(&cluster.nodes[0])
    );
    assert!(askers.wait_for_more(50), "answers after the restart");
    let (answered, failures) = askers.finish();
    eprintln!(
        "cluster kill: {answered} answered ({during_outage} with a node down), {} failed; \
         ingest during the outage: {}",
        failures.len(),
        if ingested_in_outage {
            "stored"
        } else {
            "refused"
        }
    );
    assert!(failures.is_empty(), "failed questions: {failures:?}");

    // A document ingested now is found (through whichever node answers).
    let (outcome, _) = upload(
        &addr,
        "After the drill",
        "The quokka enclosure is inspected monthly.",
    );
    assert_eq!(outcome, "inserted");
    assert!(sources_of(&ask(&addr, "quokka enclosure")).contains(&"After the drill".to_string()));

    // Two of the three nodes down: some shards have no copy left. An ingest of a document of
    // many chunks then fails with a clear error, and once the nodes are back nothing of it
    // shows (or, had it succeeded, all of it).
    cluster.nodes[1].kill();
    cluster.nodes[2].kill();
    let paragraphs: Vec<String> = (0..40)
        .map(|i| {
            format!(
                "Blimp mooring step {i}: the ground crew checks line {i} twice before the mast."
            )
        })
        .collect();
    let text = format!("# Blimp mooring\n\n{}", paragraphs.join("\n\n"));
    let body = json!({ "title": "Blimp mooring", "text": text }).to_string();
    let started = Instant::now();
    let r = post(
        &addr,
        "/api/documents",
        "application/json",
        body.as_bytes(),
        &[AUTH],
    );
    let stored = match &r {
        Ok(r) if r.status == 201 => true,
        Ok(r) => {
            assert!(r.status >= 500, "{} {}", r.status, r.body);
            let error = r.json()["error"].as_str().unwrap_or_default().to_string();
            assert!(!error.is_empty() && !error.contains("tonic"), "{}", r.body);
            eprintln!(
                "ingest with 2 of 3 nodes down: {} after {:?}: {error}",
                r.status,
                started.elapsed()
            );
            false
        }
        Err(e) => panic!("the ingest got no answer: {e}"),
    };
    for node in &mut cluster.nodes[1..] {
        node.restart().expect("the killed node restarts");
    }
    assert!(
        wait_until(BOUND, || {
            let states = replica_states(&cluster.nodes[0]);
            states.len() == 6 && states.iter().all(|s| s == "Active")
        }),
        "the replicas recovered: {:?}",
        replica_states(&cluster.nodes[0])
    );
    let listed = http::get(&addr, "/api/documents").unwrap().json();
    let in_list = listed["documents"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["title"] == "Blimp mooring");
    let answer = ask(&addr, "blimp mooring ground crew mast");
    let shown = sources_of(&answer).contains(&"Blimp mooring".to_string());
    assert_eq!(
        (in_list, shown),
        (stored, stored),
        "whole or absent: {answer}"
    );
}

/// `POST /api/ask` through nginx from the loopback address `source` (nginx rate-limits per
/// client address).
fn ask_from(source: Ipv4Addr, addr: &str, question: &str) -> std::io::Result<Response> {
    let body = json!({ "question": question }).to_string();
    let raw = format!(
        "POST /api/ask HTTP/1.1\r\nHost: rag.example.test\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    send_from(source, addr, raw.as_bytes())
}

/// `config` with an LLM: the fake Ollama `fake` instead of `provider = "none"`.
fn with_llm(config: &str, fake: &FakeOllama) -> String {
    config.replace(
        "[llm]\nprovider = \"none\"\n",
        &format!(
            "[llm]\nprovider = \"ollama\"\nurl = \"{}\"\nmodel = \"llama3.2\"\n",
            fake.url()
        ),
    )
}

#[test]
fn two_ragpool_nodes_on_a_qdrant_cluster_behind_nginx_share_documents_and_survive_a_node_loss() {
    const CLIENTS: u8 = 6;
    // The shipped site allows 2 questions/s per client address (burst 10): each client asks
    // a little slower than that, so every refusal would be a real failure, not a 429.
    const PACE: Duration = Duration::from_millis(600);
    let Some(nginx_binary) = require_nginx() else {
        return;
    };
    // As deploy/compose.yaml: three Qdrant nodes, every shard on two of them.
    let Some(cluster) = QdrantCluster::start(3) else {
        return;
    };
    let config = qdrant_config(
        2,
        &cluster.urls(),
        "shard_number = 3\nreplication_factor = 2\nwrite_consistency_factor = 1",
        "ingest_docs_on_first_run = false",
    );
    // Each node its own (fake) LLM, answering slowly, so questions are in flight on node A
    // when it dies, and its LLM counts them.
    let slow = || {
        FakeOllama::with(FakeOptions {
            tokens: 6,
            answer_duration: Duration::from_millis(1500),
            ..FakeOptions::default()
        })
    };
    let (llm_a, llm_b) = (slow(), slow());
    let node_a = ServerProcess::start(&with_llm(&config, &llm_a));
    let node_b = ServerProcess::start(&with_llm(&config, &llm_b));
    let (addr_a, addr_b) = (node_a.addr(), node_b.addr());

    // Ingested through node A, found through node B at once: they share the store.
    let (outcome, id) = upload(
        &addr_a,
        "Hangar",
        "# Hangar\n\nThe zeppelin hangar doors open within nine seconds of the alarm.",
    );
    assert_eq!(outcome, "inserted");
    let found = ask(&addr_b, "zeppelin hangar doors");
    assert_eq!(found["sources"][0]["document_id"], id.as_str(), "{found}");
    let listed = http::get(&addr_b, "/api/documents").unwrap().json();
    assert_eq!(listed["documents"][0]["id"], id.as_str(), "{listed}");

    // The shipped nginx site with both nodes as servers of its one upstream.
    let nginx = NginxSite::prepare(
        &nginx_binary,
        Upstream::TcpServers(&[addr_a.clone(), addr_b.clone()]),
    )
    .start();
    let front = nginx.addr().to_string();
    let workers_a = node_a.workers();
    let workers_b = node_b.workers();
    let mut seen = HashSet::new();
    assert!(
        wait_until(BOUND, || {
            if let Ok(r) = get_from(Ipv4Addr::new(127, 0, 0, 2), &front, "/health", &[]) {
                if let Some(pid) = r.json()["pid"].as_i64() {
                    seen.insert(pid as i32);
                }
            }
            seen.iter().any(|p| workers_a.contains(p)) && seen.iter().any(|p| workers_b.contains(p))
        }),
        "nginx reaches workers of both nodes: {seen:?}"
    );

    // Questions through nginx from several clients; then node A is SIGKILLed (master and
    // workers, the whole process group) in the middle of them.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (front, stop, ok, failures) = (
                front.clone(),
                Arc::clone(&stop),
                Arc::clone(&ok),
                Arc::clone(&failures),
            );
            std::thread::spawn(move || {
                let source = Ipv4Addr::new(127, 0, 1, 10 + i);
                let deadline = Instant::now() + Duration::from_secs(300);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let sent = Instant::now();
                    match ask_from(source, &front, "zeppelin hangar doors") {
                        Ok(r) if r.status == 200 && r.body.contains("zeppelin") => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{} {}", r.status, r.body)),
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                    std::thread::sleep(PACE.saturating_sub(sent.elapsed()));
                }
            })
        })
        .collect();
    let answered = || ok.load(Ordering::Relaxed);
    assert!(
        wait_until(BOUND, || answered() >= 30),
        "answers before the kill"
    );
    // The moment of the kill: node A busy with answers (its LLM streaming them).
    assert!(
        llm_a.wait_until(BOUND, |c| c.active_streams >= 2),
        "answers in flight on node A: {:?}",
        llm_a.counters()
    );
    // Requests node A is serving (its own /status not counted), read just before the kill.
    let status_a = http::get(&addr_a, "/status").unwrap().json();
    let in_flight_a = status_a["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["in_flight"].as_u64().unwrap())
        .sum::<u64>()
        - 1;
    let before_kill = answered();
    drop(node_a);
    assert!(
        wait_until(BOUND, || answered() >= before_kill + 30),
        "answers after node A is gone"
    );
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    eprintln!(
        "two nodes: {} answered through nginx ({} after node A was killed), {} failed, \
         {in_flight_a} in flight on node A at the kill: {failures:?}",
        answered(),
        answered() - before_kill,
        failures.len()
    );
    // At most the questions in flight on node A when it died (one more may have reached it
    // between the count and the kill); each client has one question out at a time.
    assert!(
        failures.len() as u64 <= (in_flight_a + 1).min(CLIENTS as u64),
        "more failures than questions in flight on node A ({in_flight_a}): {failures:?}"
    );
    // Node B alone serves everything now, including a new document.
    let (outcome, _) = upload(
        &addr_b,
        "Quokka",
        "The quokka enclosure is inspected monthly.",
    );
    assert_eq!(outcome, "inserted");
    let r = ask_from(Ipv4Addr::new(127, 0, 0, 3), &front, "quokka enclosure").unwrap();
    assert!(
        r.status == 200 && r.body.contains("quokka"),
        "{} {}",
        r.status,
        r.body
    );
}
