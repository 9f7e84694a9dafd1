//! The one behaviour both stores promise, written once and run against each backend: the
//! embedded store always (a fresh temp dir per test), and a real Qdrant: the server named by
//! `RAGPOOL_TEST_QDRANT_URL` (a fresh collection per test, dropped afterwards; optional
//! `RAGPOOL_TEST_QDRANT_API_KEY`, and for a cluster `RAGPOOL_TEST_QDRANT_REPLICATION_FACTOR`
//! and `RAGPOOL_TEST_QDRANT_WRITE_CONSISTENCY_FACTOR`), else a Qdrant node of the test's own
//! (the shared Qdrant binary, see `tests/it/support/qdrant.rs`; skipped when there is none, a
//! failure under `RAGPOOL_REQUIRE_QDRANT=1`). Then what only the embedded store can show here:
//! several forked processes sharing one file, and a store refusing to cross a fork.
//!
//! Tests that use SQLite hold [`SQLITE_IN_USE`] for reading; the fork tests take it for
//! writing, so no other thread of this test binary is inside SQLite (holding one of its
//! global mutexes) at the instant of `fork`.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use tempfile::TempDir;

use super::{Store, StoreError};

#[path = "../../../tests/it/support/qdrant.rs"]
mod qdrant_server;
use crate::config::{Distance, StoreBackend, StoreConfig};
use crate::rag::text::Stems;
use crate::rag::{content_hash, document_id, NewChunk, NewDocument, UpsertOutcome};

/// Held for reading by every test that runs SQLite, for writing by the tests that fork.
static SQLITE_IN_USE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A store under test and what must live as long as it.
struct Backend {
    store: Store,
    /// The embedded store's directory, removed on drop.
    _dir: Option<TempDir>,
    /// The test's own Qdrant node, killed on drop.
    _qdrant: Option<qdrant_server::QdrantNode>,
}

impl Backend {
    async fn embedded() -> Backend {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&embedded_config(dir.path()))
            .await
            .expect("open the embedded store");
        Backend {
            store,
            _dir: Some(dir),
            _qdrant: None,
        }
    }

    /// `None` when there is no Qdrant to test against (and it is not required).
    async fn qdrant(test: &str) -> Option<Backend> {
        let external = std::env::var("RAGPOOL_TEST_QDRANT_URL")
            .ok()
            .filter(|url| !url.trim().is_empty());
        let (url, node) = match external {
            Some(url) => (url, None),
            None => {
                // On this thread, not a blocking-pool one: the node dies with the thread that
                // started it (PR_SET_PDEATHSIG), and this one lives as long as the test.
                let node = qdrant_server::QdrantNode::start()?;
                (node.url(), Some(node))
            }
        };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let config = StoreConfig {
            backend: StoreBackend::Qdrant,
            path: PathBuf::from("unused"),
            urls: vec![url],
            collection: format!("ragpool_test_{test}_{}_{nanos}", std::process::id()),
            api_key: std::env::var("RAGPOOL_TEST_QDRANT_API_KEY").ok(),
            distance: Distance::Cosine,
            threads: 2,
            shard_number: 0,
            replication_factor: env_count("RAGPOOL_TEST_QDRANT_REPLICATION_FACTOR"),
            write_consistency_factor: env_count("RAGPOOL_TEST_QDRANT_WRITE_CONSISTENCY_FACTOR"),
        };
        let store = Store::open(&config).await.expect("open the qdrant store");
        Some(Backend {
            store,
            _dir: None,
            _qdrant: node,
        })
    }

    async fn finish(self) {
        if let Store::Qdrant(store) = &self.store {
            if let Err(e) = store.drop_collection().await {
                eprintln!("could not drop the test collection: {e}");
            }
        }
    }
}

/// A count from the environment, 1 when unset: the collection layout for a run of the suite
/// against a cluster of yours (`RAGPOOL_TEST_QDRANT_URL`).
fn env_count(name: &str) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n >= 1)
        .unwrap_or(1)
}

fn embedded_config(dir: &Path) -> StoreConfig {
    StoreConfig {
        backend: StoreBackend::Embedded,
        path: dir.to_path_buf(),
        urls: vec![crate::config::app::QDRANT_URL.to_string()],
        collection: "ragpool".into(),
        api_key: None,
        distance: Distance::Cosine,
        threads: 2,
        shard_number: 0,
        replication_factor: 1,
        write_consistency_factor: 1,
    }
}

/// Runs each check against the embedded store, and against Qdrant when one is configured.
macro_rules! both_backends {
    ($($check:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test]
                async fn $check() {
                    let _sqlite = super::SQLITE_IN_USE.read().await;
                    let backend = super::Backend::embedded().await;
                    super::$check(&backend.store).await;
                }
            )*
        }
        mod qdrant {
            $(
                #[tokio::test]
                async fn $check() {
                    let Some(backend) = super::Backend::qdrant(stringify!($check)).await else {
                        return;
                    };
                    super::$check(&backend.store).await;
                    backend.finish().await;
                }
            )*
        }
    };
}

both_backends!(
    insert_unchanged_replace_delete,
    list_and_stats,
    lexical_search_finds_english_word_forms,
    lexical_search_finds_russian_word_forms,
    lexical_search_survives_query_syntax,
    dense_search_returns_nearest_in_order,
    dimension_mismatch_is_refused,
    invalid_documents_are_refused,
    replace_is_atomic_for_concurrent_readers,
    the_first_run_mark_outlives_every_document,
    get_document_reads_its_current_chunks,
    feedback_is_kept_apart_from_documents,
);

/// Compile-time check: the store is `Sync` and its futures `Send`, so a caller may share it or
/// spawn its calls on any runtime.
const _: fn(&Store, NewDocument) = |store, doc| {
    fn is_send<T: Send>(_: T) {}
    is_send(store);
    is_send(store.document_hash(""));
    is_send(store.upsert_document(doc));
    is_send(store.list_documents());
    is_send(store.delete_document(""));
    is_send(store.get_document(""));
    is_send(store.lexical_search("", 1));
    is_send(store.dense_search(&[], 1));
    is_send(store.stats());
    is_send(store.check());
};

// ----- documents -------------------------------------------------------------------------

fn doc(source: &str, title: &str, chunks: &[&str]) -> NewDocument {
    NewDocument {
        source: source.into(),
        title: title.into(),
        content_hash: content_hash(&chunks.join("\n")),
        chunks: chunks
            .iter()
            .enumerate()
            .map(|(position, text)| NewChunk {
                position,
                text: text.to_string(),
                embedding: None,
            })
            .collect(),
    }
}

fn embedded_doc(source: &str, chunks: &[(&str, &[f32])]) -> NewDocument {
    let texts: Vec<&str> = chunks.iter().map(|(text, _)| *text).collect();
    let mut doc = doc(source, source, &texts);
    for (chunk, (_, embedding)) in doc.chunks.iter_mut().zip(chunks) {
        chunk.embedding = Some(embedding.to_vec());
    }
    doc
}

/// Version `v` of the document the atomicity checks replace: `size` chunks, each naming `v`.
fn versioned_doc(source: &str, v: usize, size: usize) -> NewDocument {
    let texts: Vec<String> = (0..size)
        .map(|i| format!("atomicity probe version{v} chunk {i}"))
        .collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    doc(source, "Atomicity", &texts)
}

fn version_of(text: &str) -> Option<usize> {
    text.split_whitespace()
        .find_map(|word| word.strip_prefix("version")?.parse().ok())
}

/// Checks that hits for the versioned document come from one version, all of it. Returns the
/// version seen (`None`: the document was not there).
fn one_whole_version(hits: &[crate::rag::Hit], sizes: &[usize]) -> Result<Option<usize>, String> {
    let versions: BTreeSet<Option<usize>> = hits.iter().map(|hit| version_of(&hit.text)).collect();
    match versions.len() {
        0 => Ok(None),
        1 => {
            let v = versions
                .into_iter()
                .next()
                .flatten()
                .ok_or("a hit without a version")?;
            let expected = sizes
                .get(v)
                .copied()
                .ok_or(format!("unknown version {v}"))?;
            if hits.len() == expected {
                Ok(Some(v))
            } else {
                Err(format!(
                    "version {v} has {expected} chunks but a reader saw {}",
                    hits.len()
                ))
            }
        }
        _ => Err(format!("a reader saw a mix of versions {versions:?}")),
    }
}

// ----- the checks ------------------------------------------------------------------------

async fn insert_unchanged_replace_delete(store: &Store) {
    let id = document_id("guide/reload.md");
    let v1 = doc(
        "guide/reload.md",
        "Reload",
        &[
            "Send HUP to reload the configuration.",
            "Old workers drain.",
        ],
    );
    assert_eq!(store.document_hash("guide/reload.md").await.unwrap(), None);
    assert_eq!(
        store.upsert_document(v1.clone()).await.unwrap(),
        UpsertOutcome::Inserted(id.clone())
    );
    assert_eq!(
        store.document_hash("guide/reload.md").await.unwrap(),
        Some(v1.content_hash.clone())
    );
    assert_eq!(
        store.upsert_document(v1.clone()).await.unwrap(),
        UpsertOutcome::Unchanged(id.clone())
    );
    assert_eq!(
        store.stats().await.unwrap().chunks,
        2,
        "an unchanged document is not written twice"
    );

    let v2 = doc(
        "guide/reload.md",
        "Reload (new)",
        &[
            "Send HUP to reload.",
            "New workers boot first.",
            "Then the oldest retire.",
        ],
    );
    assert_eq!(
        store.upsert_document(v2.clone()).await.unwrap(),
        UpsertOutcome::Replaced(id.clone())
    );
    let listed = store.list_documents().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].chunks, listed[0].title.as_str()),
        (3, "Reload (new)")
    );
    assert_eq!(listed[0].content_hash, v2.content_hash);
    assert_eq!(
        store.document_hash("guide/reload.md").await.unwrap(),
        Some(v2.content_hash)
    );
    assert!(
        store.lexical_search("drain", 10).await.unwrap().is_empty(),
        "old chunks are gone"
    );
    let hits = store.lexical_search("oldest retire", 10).await.unwrap();
    assert_eq!(hits.len(), 1);
    assert_eq!(
        (hits[0].position, hits[0].title.as_str()),
        (2, "Reload (new)")
    );

    assert!(store.delete_document(&id).await.unwrap());
    assert!(
        !store.delete_document(&id).await.unwrap(),
        "deleting twice finds nothing the second time"
    );
    assert!(store.list_documents().await.unwrap().is_empty());
    assert_eq!(
        store.stats().await.unwrap(),
        crate::rag::StoreStats {
            documents: 0,
            chunks: 0
        }
    );
    assert!(store.lexical_search("reload", 10).await.unwrap().is_empty());
    assert_eq!(store.document_hash("guide/reload.md").await.unwrap(), None);
    // Deleted, it can come back.
    assert_eq!(
        store.upsert_document(v1).await.unwrap(),
        UpsertOutcome::Inserted(id)
    );
}

async fn list_and_stats(store: &Store) {
    store
        .check()
        .await
        .expect("a fresh store answers the probe");
    assert!(store.list_documents().await.unwrap().is_empty());
    assert_eq!(
        store.stats().await.unwrap(),
        crate::rag::StoreStats {
            documents: 0,
            chunks: 0
        }
    );

    let b = doc("b.md", "Bee", &["one", "two", "three"]);
    let a = doc("a.md", "Ay", &["alpha", "beta"]);
    store.upsert_document(b.clone()).await.unwrap();
    store.upsert_document(a.clone()).await.unwrap();

    let listed = store.list_documents().await.unwrap();
    let sources: Vec<&str> = listed.iter().map(|d| d.source.as_str()).collect();
    assert_eq!(sources, ["a.md", "b.md"], "ordered by source");
    assert_eq!(listed[0].id, document_id("a.md"));
    assert_eq!(listed[0].title, "Ay");
    assert_eq!(listed[0].content_hash, a.content_hash);
    assert_eq!(listed[0].chunks, 2);
    assert_eq!(listed[1].chunks, 3);
    assert!(
        listed.iter().all(|d| d.updated_at > 1_600_000_000),
        "updated_at is unix seconds"
    );
    assert_eq!(
        store.stats().await.unwrap(),
        crate::rag::StoreStats {
            documents: 2,
            chunks: 5
        }
    );
    store.check().await.unwrap();
}

async fn lexical_search_finds_english_word_forms(store: &Store) {
    store
        .upsert_document(doc(
            "signals.md",
            "Signals",
            &[
                "The master catches signals.",
                "Reloading workers gracefully: send SIGHUP to the master.",
            ],
        ))
        .await
        .unwrap();
    store
        .upsert_document(doc(
            "upload.md",
            "Upload",
            &["Uploading documents through the web page."],
        ))
        .await
        .unwrap();

    // "reload"/"Reloading" and "worker"/"workers" meet only through their stems.
    let hits = store
        .lexical_search("How do I reload a worker?", 5)
        .await
        .unwrap();
    let top = hits.first().expect("a hit");
    assert_eq!((top.source.as_str(), top.position), ("signals.md", 1));
    assert_eq!(top.document_id, document_id("signals.md"));
    assert_eq!(top.title, "Signals");
    assert_eq!(
        top.text,
        "Reloading workers gracefully: send SIGHUP to the master."
    );
    assert!(
        top.score > 0.0,
        "higher is better, and a match scores above zero"
    );
    assert!(
        hits.windows(2).all(|w| w[0].score >= w[1].score),
        "best first"
    );
    assert!(
        hits.iter().all(|h| h.source == "signals.md"),
        "upload.md shares no stem with the question"
    );

    assert_eq!(
        store
            .lexical_search("signal master", 1)
            .await
            .unwrap()
            .len(),
        1,
        "k caps the hits"
    );
}

async fn lexical_search_finds_russian_word_forms(store: &Store) {
    // The forms differ in the text and the question but share Snowball stems.
    let stems = Stems::default();
    assert_eq!(stems.stem("перезагрузку"), stems.stem("Перезагрузка"));
    assert_eq!(stems.stem("воркера"), stems.stem("воркеров"));
    assert_eq!(stems.stem("сигналы"), stems.stem("сигналом"));

    store
        .upsert_document(doc(
            "ru/reload.md",
            "Перезагрузка",
            &[
                "Перезагрузка воркеров выполняется сигналом HUP.",
                "Мастер не останавливается.",
            ],
        ))
        .await
        .unwrap();
    store
        .upsert_document(doc(
            "ru/upload.md",
            "Загрузка",
            &["Документы загружаются через веб-страницу."],
        ))
        .await
        .unwrap();

    let hits = store
        .lexical_search("Как сделать перезагрузку воркера?", 5)
        .await
        .unwrap();
    let top = hits
        .first()
        .expect("a hit for another form of the same words");
    assert_eq!((top.source.as_str(), top.position), ("ru/reload.md", 0));
    let hits = store.lexical_search("сигналы", 5).await.unwrap();
    assert_eq!(
        hits.first().map(|h| h.source.as_str()),
        Some("ru/reload.md")
    );
    let hits = store.lexical_search("документов", 5).await.unwrap();
    assert_eq!(
        hits.first().map(|h| h.source.as_str()),
        Some("ru/upload.md")
    );
}

async fn lexical_search_survives_query_syntax(store: &Store) {
    store
        .upsert_document(doc(
            "hup.md",
            "HUP",
            &["HUP is the signal that reloads the configuration."],
        ))
        .await
        .unwrap();
    let hits = store
        .lexical_search(r#"what's "HUP" (signal)?"#, 5)
        .await
        .unwrap();
    assert_eq!(hits.first().map(|h| h.source.as_str()), Some("hup.md"));
    for query in [
        "\"",
        "'",
        "(",
        "col:umn*",
        "-hup",
        "^hup",
        "NEAR(hup signal, 2)",
        "hup AND OR NOT signal",
        "a + b * c",
        "{hup}",
        "hup\u{0}signal",
    ] {
        if let Err(e) = store.lexical_search(query, 5).await {
            panic!("query {query:?} failed: {e}");
        }
    }
    for query in ["", "   ", "?!.,;:", "the and of", "как и что"] {
        assert!(
            store.lexical_search(query, 5).await.unwrap().is_empty(),
            "{query:?} has no stems"
        );
    }
    assert!(
        store.lexical_search("hup", 0).await.unwrap().is_empty(),
        "k = 0"
    );
}

async fn dense_search_returns_nearest_in_order(store: &Store) {
    store
        .upsert_document(doc("plain.md", "Plain", &["no vectors here"]))
        .await
        .unwrap();
    assert!(
        store
            .dense_search(&[1.0, 0.0, 0.0], 5)
            .await
            .unwrap()
            .is_empty(),
        "no vectors stored yet"
    );

    store
        .upsert_document(embedded_doc(
            "vectors.md",
            &[
                ("far", &[0.0, 0.0, 1.0]),
                ("exact", &[1.0, 0.0, 0.0]),
                ("side", &[0.2, 1.0, 0.0]),
            ],
        ))
        .await
        .unwrap();
    store
        .upsert_document(embedded_doc("near.md", &[("near", &[0.9, 0.1, 0.0])]))
        .await
        .unwrap();

    let hits = store.dense_search(&[1.0, 0.0, 0.0], 3).await.unwrap();
    let texts: Vec<&str> = hits.iter().map(|h| h.text.as_str()).collect();
    assert_eq!(texts, ["exact", "near", "side"]);
    assert!(
        hits.windows(2).all(|w| w[0].score > w[1].score),
        "higher is better: {hits:?}"
    );
    assert_eq!(
        (hits[0].source.as_str(), hits[0].position),
        ("vectors.md", 1)
    );
    assert_eq!(hits[1].document_id, document_id("near.md"));
    assert_eq!(
        store
            .dense_search(&[1.0, 0.0, 0.0], 10)
            .await
            .unwrap()
            .len(),
        4,
        "only chunks with vectors"
    );
    assert!(
        store
            .dense_search(&[1.0, 0.0, 0.0], 0)
            .await
            .unwrap()
            .is_empty(),
        "k = 0"
    );

    // A replace swaps the vectors with the text.
    store
        .upsert_document(embedded_doc("near.md", &[("moved", &[0.0, 0.0, 1.0])]))
        .await
        .unwrap();
    let hits = store.dense_search(&[0.0, 0.0, 1.0], 2).await.unwrap();
    let texts: BTreeSet<&str> = hits.iter().map(|h| h.text.as_str()).collect();
    assert_eq!(texts, BTreeSet::from(["far", "moved"]));
    assert!(store
        .dense_search(&[1.0, 0.0, 0.0], 10)
        .await
        .unwrap()
        .iter()
        .all(|h| h.text != "near"));
}

async fn dimension_mismatch_is_refused(store: &Store) {
    store
        .upsert_document(embedded_doc("three.md", &[("three", &[1.0, 0.0, 0.0])]))
        .await
        .unwrap();
    let four = embedded_doc("four.md", &[("four", &[1.0, 0.0, 0.0, 0.0])]);
    match store.upsert_document(four).await {
        Err(StoreError::DimensionMismatch {
            expected: 3,
            got: 4,
        }) => {}
        other => panic!("expected a dimension mismatch, got {other:?}"),
    }
    let sources: Vec<String> = store
        .list_documents()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.source)
        .collect();
    assert_eq!(
        sources,
        ["three.md"],
        "the refused document left nothing behind"
    );
    match store.dense_search(&[1.0, 0.0], 3).await {
        Err(StoreError::DimensionMismatch {
            expected: 3,
            got: 2,
        }) => {}
        other => panic!("expected a dimension mismatch, got {other:?}"),
    }
    let message = StoreError::DimensionMismatch {
        expected: 3,
        got: 4,
    }
    .to_string();
    assert!(
        message.contains("4 dimensions") && message.contains("3-dimensional"),
        "{message}"
    );
}

async fn invalid_documents_are_refused(store: &Store) {
    let mut no_chunks = doc("empty.md", "Empty", &[]);
    no_chunks.chunks.clear();
    let mut shuffled = doc("shuffled.md", "Shuffled", &["a", "b"]);
    shuffled.chunks[0].position = 1;
    let blank_source = doc("  ", "Blank", &["text"]);
    let mut not_finite = embedded_doc("nan.md", &[("nan", &[1.0, 0.0])]);
    not_finite.chunks[0].embedding = Some(vec![f32::NAN, 0.0]);
    let mixed = embedded_doc("mixed.md", &[("a", &[1.0, 0.0]), ("b", &[1.0, 0.0, 0.0])]);

    for bad in [no_chunks, shuffled, blank_source, not_finite] {
        let source = bad.source.clone();
        match store.upsert_document(bad).await {
            Err(StoreError::InvalidDocument { .. }) => {}
            other => panic!("{source:?}: expected InvalidDocument, got {other:?}"),
        }
    }
    assert!(matches!(
        store.upsert_document(mixed).await,
        Err(StoreError::DimensionMismatch {
            expected: 2,
            got: 3
        })
    ));
    assert!(store.list_documents().await.unwrap().is_empty());
}

/// While one task replaces a document again and again (chunk counts differ per version),
/// readers on other connections only ever see one whole version.
async fn replace_is_atomic_for_concurrent_readers(store: &Store) {
    const SOURCE: &str = "atomic.md";
    const MAX_READS: usize = 10_000;
    let sizes = [40, 65, 25, 80, 33, 72, 50, 61];
    store
        .upsert_document(versioned_doc(SOURCE, 0, sizes[0]))
        .await
        .unwrap();

    let done = Cell::new(false);
    let writer = async {
        for (v, &size) in sizes.iter().enumerate().skip(1) {
            let outcome = store
                .upsert_document(versioned_doc(SOURCE, v, size))
                .await
                .unwrap();
            assert!(matches!(outcome, UpsertOutcome::Replaced(_)));
        }
        done.set(true);
    };
    let reader = || async {
        let mut reads = 0;
        let mut seen = BTreeSet::new();
        while !done.get() && reads < MAX_READS {
            let hits = store.lexical_search("atomicity probe", 200).await.unwrap();
            match one_whole_version(&hits, &sizes) {
                Ok(v) => seen.insert(v),
                Err(e) => panic!("{e}"),
            };
            reads += 1;
        }
        (reads, seen)
    };
    let ((), (reads_a, seen_a), (reads_b, seen_b)) = tokio::join!(writer, reader(), reader());
    assert!(reads_a > 0 && reads_b > 0, "the readers ran");
    assert!(
        !seen_a.contains(&None) && !seen_b.contains(&None),
        "the document never vanished"
    );
    let last = sizes.len() - 1;
    let hits = store.lexical_search("atomicity probe", 200).await.unwrap();
    assert_eq!(one_whole_version(&hits, &sizes), Ok(Some(last)));
    assert_eq!(store.stats().await.unwrap().chunks, sizes[last] as u64);
}

/// A fresh store has had no first run; once marked (Qdrant: once it holds anything) it has,
/// and deleting every document does not undo that.
async fn the_first_run_mark_outlives_every_document(store: &Store) {
    assert!(!store.first_run_done().await.unwrap());
    let id = match store
        .upsert_document(doc("manual.md", "Manual", &["how to reload"]))
        .await
        .unwrap()
    {
        UpsertOutcome::Inserted(id) => id,
        other => panic!("{other:?}"),
    };
    store.mark_first_run_done().await.unwrap();
    assert!(store.first_run_done().await.unwrap());
    assert!(store.delete_document(&id).await.unwrap());
    assert_eq!(store.stats().await.unwrap().documents, 0);
    assert!(store.first_run_done().await.unwrap());
}

/// A document reads back whole, chunks by position, as its latest version; an unknown or
/// deleted one is `None`.
async fn get_document_reads_its_current_chunks(store: &Store) {
    assert_eq!(store.get_document("00000000deadbeef").await.unwrap(), None);
    let id = document_id("guide/reload.md");
    let v1 = doc("guide/reload.md", "Reload", &["one", "two", "three"]);
    store.upsert_document(v1).await.unwrap();
    let v2 = doc("guide/reload.md", "Reloading", &["uno", "dos"]);
    store.upsert_document(v2).await.unwrap();
    let got = store.get_document(&id).await.unwrap().expect("stored");
    assert_eq!(got.info.id, id);
    assert_eq!(got.info.title, "Reloading");
    assert_eq!(got.info.source, "guide/reload.md");
    let chunks: Vec<(usize, &str)> = got
        .chunks
        .iter()
        .map(|c| (c.position, c.text.as_str()))
        .collect();
    assert_eq!(chunks, [(0, "uno"), (1, "dos")]);
    assert!(store.delete_document(&id).await.unwrap());
    assert_eq!(store.get_document(&id).await.unwrap(), None);
}

/// Votes read back oldest first with every field, and are never documents or search hits.
async fn feedback_is_kept_apart_from_documents(store: &Store) {
    use crate::rag::feedback::{new_id, Feedback, Vote};
    assert_eq!(store.list_feedback().await.unwrap(), []);
    store
        .upsert_document(doc(
            "guide/reload.md",
            "Reload",
            &["how to reload the workers"],
        ))
        .await
        .unwrap();
    let vote = |created_at, vote, question: &str| Feedback {
        id: new_id(),
        created_at,
        vote,
        question: question.into(),
        answer: "Send HUP [1].".into(),
        mode: "generated".into(),
        source_ids: vec![document_id("guide/reload.md")],
    };
    let later = vote(20, Vote::Down, "как перезагрузить воркеры?");
    let earlier = vote(10, Vote::Up, "how to reload the workers?");
    store.add_feedback(later.clone()).await.unwrap();
    store.add_feedback(earlier.clone()).await.unwrap();
    assert_eq!(store.list_feedback().await.unwrap(), [earlier, later]);
    assert_eq!(store.stats().await.unwrap().documents, 1);
    assert_eq!(store.list_documents().await.unwrap().len(), 1);
    let hits = store.lexical_search("reload workers", 10).await.unwrap();
    assert_eq!(hits.len(), 1, "{hits:?}");
}

// ----- the embedded store only -----------------------------------------------------------

/// Once a store lived in a directory, it is never re-created there behind the operator's
/// back: a missing, emptied or foreign file is an error that names the marker.
#[tokio::test]
async fn embedded_store_is_not_recreated_where_one_existed() {
    let _sqlite = SQLITE_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let config = embedded_config(dir.path());
    let file = dir.path().join(super::embedded::FILE_NAME);
    let marker = dir.path().join(super::embedded::MARKER_NAME);
    {
        let store = Store::open(&config).await.unwrap();
        store
            .upsert_document(doc("a.md", "A", &["alpha"]))
            .await
            .unwrap();
    }
    assert!(marker.is_file());
    // Reopening an intact store is fine.
    Store::open(&config).await.unwrap().check().await.unwrap();

    let refused = |e: StoreError, what: &str| {
        let text = e.to_string();
        assert!(matches!(e, StoreError::Lost { .. }), "{text}");
        assert!(
            text.contains(what) && text.contains("ragpool.initialised"),
            "{text}"
        );
    };
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("ragpool.sqlite3{suffix}")));
    }
    std::fs::remove_file(&file).unwrap();
    refused(Store::open(&config).await.err().unwrap(), "is missing");
    assert!(
        !file.exists(),
        "a refused open must not leave a new file behind"
    );
    std::fs::write(&file, b"").unwrap();
    refused(
        Store::open(&config).await.err().unwrap(),
        "is missing (or empty)",
    );
    // A valid SQLite file that is not ragpool's.
    std::fs::remove_file(&file).unwrap();
    rusqlite::Connection::open(&file)
        .unwrap()
        .execute_batch("CREATE TABLE other (x); INSERT INTO other VALUES (1);")
        .unwrap();
    refused(
        Store::open(&config).await.err().unwrap(),
        "has no ragpool tables",
    );
    // Removing the marker is the deliberate way to start over.
    std::fs::remove_file(&file).unwrap();
    std::fs::remove_file(&marker).unwrap();
    let fresh = Store::open(&config).await.unwrap();
    assert_eq!(fresh.stats().await.unwrap().documents, 0);
}

/// Deterministic pseudo-random vectors for the quantized-path checks (xorshift).
fn pseudo_vectors(seed: u64, count: usize, dims: usize) -> Vec<Vec<f32>> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    };
    (0..count)
        .map(|_| (0..dims).map(|_| next()).collect())
        .collect()
}

fn embedded_of(store: &Store) -> &super::embedded::EmbeddedStore {
    match store {
        Store::Embedded(s) => s,
        Store::Qdrant(_) => unreachable!("an embedded config"),
    }
}

/// With more vectors than the shortlist, the quantized search agrees with exact search: the
/// same chunks (recall), in the same order, with the exact scores.
#[tokio::test]
async fn embedded_quantized_search_matches_exact_search() {
    let _sqlite = SQLITE_IN_USE.read().await;
    const DIMS: usize = 24;
    let backend = Backend::embedded().await;
    let store = &backend.store;
    let vectors = pseudo_vectors(7, 1200, DIMS);
    for (d, group) in vectors.chunks(100).enumerate() {
        let texts: Vec<String> = (0..group.len()).map(|i| format!("d{d} c{i}")).collect();
        let chunks: Vec<(&str, &[f32])> = texts
            .iter()
            .zip(group)
            .map(|(t, v)| (t.as_str(), v.as_slice()))
            .collect();
        store
            .upsert_document(embedded_doc(&format!("q{d}.md"), &chunks))
            .await
            .unwrap();
    }
    let (mut found, mut wanted) = (0, 0);
    for query in pseudo_vectors(99, 30, DIMS) {
        let exact = embedded_of(store)
            .dense_search_exact(&query, 5)
            .await
            .unwrap();
        let quick = store.dense_search(&query, 5).await.unwrap();
        assert_eq!(exact.len(), 5);
        assert_eq!(quick.len(), 5);
        assert!(
            quick.windows(2).all(|w| w[0].score >= w[1].score),
            "{quick:?}"
        );
        for hit in &exact {
            wanted += 1;
            if let Some(same) = quick.iter().find(|h| h.text == hit.text) {
                found += 1;
                assert!((same.score - hit.score).abs() < 1e-4, "{same:?} vs {hit:?}");
            }
        }
    }
    assert!(
        found as f64 >= 0.95 * wanted as f64,
        "recall {found}/{wanted}"
    );
}

/// Each process keeps its own quantized copy: one store sees what another (its own pool, its
/// own copy, as in another worker) appends, replaces and deletes, at its next search.
#[tokio::test]
async fn embedded_dense_search_sees_other_processes_writes() {
    let _sqlite = SQLITE_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let config = embedded_config(dir.path());
    let reader = Store::open(&config).await.unwrap();
    let writer = Store::open(&config).await.unwrap();
    let texts =
        |hits: Vec<crate::rag::Hit>| -> Vec<String> { hits.into_iter().map(|h| h.text).collect() };
    writer
        .upsert_document(embedded_doc("a.md", &[("x", &[1.0, 0.0, 0.0])]))
        .await
        .unwrap();
    assert_eq!(
        texts(reader.dense_search(&[0.0, 1.0, 0.0], 1).await.unwrap()),
        ["x"]
    );
    // An append: the copy grows.
    writer
        .upsert_document(embedded_doc("b.md", &[("y", &[0.0, 1.0, 0.0])]))
        .await
        .unwrap();
    assert_eq!(
        texts(reader.dense_search(&[0.0, 1.0, 0.0], 1).await.unwrap()),
        ["y"]
    );
    // A replace (a delete and an insert): the copy is reloaded.
    writer
        .upsert_document(embedded_doc("b.md", &[("z", &[0.0, 0.0, 1.0])]))
        .await
        .unwrap();
    assert_eq!(
        texts(reader.dense_search(&[0.0, 0.0, 1.0], 2).await.unwrap()),
        ["z", "x"]
    );
    // A delete.
    assert!(writer.delete_document(&document_id("b.md")).await.unwrap());
    assert_eq!(
        texts(reader.dense_search(&[0.0, 0.0, 1.0], 2).await.unwrap()),
        ["x"]
    );
}

/// A store written by the first schema (vectors in vec0 only) is migrated on open: its
/// quantized and plain full-vector tables are built from vec0 and nothing else changes.
#[tokio::test]
async fn embedded_store_of_schema_1_is_migrated_without_losing_anything() {
    let _sqlite = SQLITE_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let config = embedded_config(dir.path());
    let vectors = pseudo_vectors(3, 300, 8);
    {
        let store = Store::open(&config).await.unwrap();
        store
            .upsert_document(doc("plain.md", "Plain", &["no vectors here"]))
            .await
            .unwrap();
        let texts: Vec<String> = (0..vectors.len()).map(|i| format!("v{i}")).collect();
        let chunks: Vec<(&str, &[f32])> = texts
            .iter()
            .zip(&vectors)
            .map(|(t, v)| (t.as_str(), v.as_slice()))
            .collect();
        store
            .upsert_document(embedded_doc("vectors.md", &chunks))
            .await
            .unwrap();
    }
    // Back to schema 1 exactly: no quantized table, no counters.
    let file = dir.path().join(super::embedded::FILE_NAME);
    rusqlite::Connection::open(&file)
        .unwrap()
        .execute_batch(
            "DROP TABLE chunks_q8;
             DROP TABLE chunks_f32;
             DELETE FROM meta WHERE key IN ('vectors_generation', 'vectors_epoch');
             PRAGMA user_version = 1;",
        )
        .unwrap();

    let store = Store::open(&config).await.unwrap();
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.documents, stats.chunks), (2, 301));
    let conn = rusqlite::Connection::open(&file).unwrap();
    let (version, quantized): (i64, i64) = conn
        .query_row(
            "SELECT (SELECT user_version FROM pragma_user_version), (SELECT count(*) FROM chunks_q8)",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    assert_eq!((version, quantized), (3, 300));
    for (i, query) in vectors.iter().enumerate().step_by(37) {
        let hits = store.dense_search(query, 1).await.unwrap();
        assert_eq!(hits[0].text, format!("v{i}"), "{hits:?}");
    }
    assert_eq!(
        store.lexical_search("vectors", 5).await.unwrap()[0].text,
        "no vectors here"
    );
}

/// `/health`'s probe sees the file deleted, replaced or corrupted under an open store, which
/// keeps answering from its open connections and cached pages.
#[tokio::test]
async fn embedded_probe_sees_the_file_deleted_replaced_or_corrupted() {
    let _sqlite = SQLITE_IN_USE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let config = embedded_config(dir.path());
    let file = dir.path().join(super::embedded::FILE_NAME);
    let store = Store::open(&config).await.unwrap();
    store
        .upsert_document(doc("a.md", "A", &["alpha"]))
        .await
        .unwrap();
    assert_eq!(store.probe().await.unwrap().documents, 1);

    // Corrupted in place (same inode): the header is garbage.
    let original = std::fs::read(&file).unwrap();
    let mut garbage = original.clone();
    garbage[..100].fill(0x5a);
    std::fs::write(&file, &garbage).unwrap();
    let e = store.probe().await.unwrap_err().to_string();
    assert!(
        e.contains("not a database") || e.contains("malformed"),
        "{e}"
    );
    std::fs::write(&file, &original).unwrap();
    assert_eq!(store.probe().await.unwrap().documents, 1);

    // Replaced by another file (a restore with `mv`): this process still has the old one.
    let copy = dir.path().join("copy");
    std::fs::write(&copy, &original).unwrap();
    std::fs::rename(&copy, &file).unwrap();
    let e = store.probe().await.unwrap_err().to_string();
    assert!(e.contains("was replaced"), "{e}");

    std::fs::remove_file(&file).unwrap();
    let e = store.probe().await.unwrap_err().to_string();
    assert!(e.contains("was deleted while serving"), "{e}");
    assert!(!file.exists(), "the probe must not create the file again");
}

#[tokio::test]
async fn embedded_file_is_in_wal_mode() {
    let _sqlite = SQLITE_IN_USE.read().await;
    let backend = Backend::embedded().await;
    let Store::Embedded(store) = &backend.store else {
        unreachable!()
    };
    assert_eq!(
        store.path().file_name().and_then(|n| n.to_str()),
        Some(super::embedded::FILE_NAME)
    );
    let conn = rusqlite::Connection::open(store.path()).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |row| row.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    // A second open of the same directory (another process's view) finds the schema there.
    let again = Store::open(&embedded_config(backend._dir.as_ref().unwrap().path()))
        .await
        .unwrap();
    again.check().await.unwrap();
}

/// Exit codes of a forked reader besides its error count (0..=99).
const CHILD_NO_RUNTIME: i32 = 100;
const CHILD_CANNOT_OPEN: i32 = 101;
const CHILD_NEVER_SAW_FINAL: i32 = 102;
const CHILD_PANICKED: i32 = 103;
/// How long a child may read, and the parent wait, before the test fails.
const MULTIPROCESS_DEADLINE: Duration = Duration::from_secs(90);

/// Three forked processes open their own store on the file and read while the parent
/// ingests: no errors (in particular no `SQLITE_BUSY`), and never a half-replaced document.
#[test]
fn embedded_store_is_shared_by_forked_processes() {
    const READERS: usize = 3;
    let sizes: Vec<usize> = (0..24).map(|v| 20 + (v * 37) % 60).collect();
    let _no_sqlite_elsewhere = SQLITE_IN_USE.blocking_write();
    let dir = tempfile::tempdir().unwrap();
    let config = embedded_config(dir.path());

    let mut children = Vec::new();
    for _ in 0..READERS {
        // SAFETY: no other thread of this process is inside SQLite (SQLITE_IN_USE is held for
        // writing) and this thread has opened nothing yet; the child only builds a fresh
        // runtime and store, and always ends in `_exit`, never returning into the harness.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let code = std::panic::catch_unwind(|| read_until_final_version(&config, &sizes))
                    .unwrap_or(CHILD_PANICKED);
                // SAFETY: ends the child without running the parent's destructors or atexit
                // handlers (the temp dir belongs to the parent).
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => children.push(child),
        }
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ingest = runtime.block_on(async {
        let store = Store::open(&config).await?;
        for (v, &size) in sizes.iter().enumerate() {
            store
                .upsert_document(versioned_doc("shared.md", v, size))
                .await?;
            store
                .upsert_document(doc(
                    &format!("other-{v}.md"),
                    "Other",
                    &["filler text", "more filler"],
                ))
                .await?;
        }
        Ok::<_, StoreError>(())
    });
    let statuses = wait_for_children(&children, Instant::now() + MULTIPROCESS_DEADLINE);
    ingest.expect("the parent's ingest saw no error");
    for status in statuses {
        match status {
            WaitStatus::Exited(_, 0) => {}
            WaitStatus::Exited(pid, code) => panic!("reader {pid} failed with exit code {code}"),
            other => panic!("reader ended with {other:?}"),
        }
    }
}

/// A forked child's view: open a store, read until the final version shows, exit with the
/// number of errors seen.
fn read_until_final_version(config: &StoreConfig, sizes: &[usize]) -> i32 {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return CHILD_NO_RUNTIME;
    };
    runtime.block_on(async {
        let store = match Store::open(config).await {
            Ok(store) => store,
            Err(e) => {
                eprintln!("reader {}: {e}", std::process::id());
                return CHILD_CANNOT_OPEN;
            }
        };
        let final_version = sizes.len() - 1;
        let deadline = Instant::now() + MULTIPROCESS_DEADLINE;
        let mut errors = 0;
        let mut seen_any = false;
        while Instant::now() < deadline {
            let hits = match store.lexical_search("atomicity probe", 200).await {
                Ok(hits) => hits,
                Err(e) => {
                    eprintln!("reader {}: {e}", std::process::id());
                    errors += 1;
                    continue;
                }
            };
            let seen = match one_whole_version(&hits, sizes) {
                Ok(None) if seen_any => {
                    eprintln!(
                        "reader {}: the document vanished during a replace",
                        std::process::id()
                    );
                    errors += 1;
                    None
                }
                Ok(seen) => seen,
                Err(e) => {
                    eprintln!("reader {}: {e}", std::process::id());
                    errors += 1;
                    None
                }
            };
            seen_any |= seen.is_some();
            for result in [
                store.stats().await.map(drop),
                store.list_documents().await.map(drop),
            ] {
                if let Err(e) = result {
                    eprintln!("reader {}: {e}", std::process::id());
                    errors += 1;
                }
            }
            if seen == Some(final_version) {
                return errors.min(99);
            }
        }
        CHILD_NEVER_SAW_FINAL
    })
}

/// Reaps the children, killing any still running at the deadline.
fn wait_for_children(children: &[Pid], deadline: Instant) -> Vec<WaitStatus> {
    let mut statuses = Vec::new();
    let mut pending = children.to_vec();
    while !pending.is_empty() {
        pending.retain(|&pid| match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => true,
            Ok(status) => {
                statuses.push(status);
                false
            }
            Err(e) => panic!("waitpid {pid}: {e}"),
        });
        if Instant::now() > deadline {
            for &pid in &pending {
                let _ = kill(pid, Signal::SIGKILL);
                let _ = waitpid(pid, None);
            }
            panic!("readers {pending:?} did not finish in {MULTIPROCESS_DEADLINE:?}");
        }
        if !pending.is_empty() {
            // A polling interval, not synchronisation: the loop ends on the children's exits.
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    statuses
}

/// A store opened before fork refuses to run in the child (it must open its own).
#[test]
fn embedded_store_refuses_a_forked_copy() {
    let _no_sqlite_elsewhere = SQLITE_IN_USE.blocking_write();
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = runtime
        .block_on(Store::open(&embedded_config(dir.path())))
        .unwrap();
    runtime.block_on(store.check()).unwrap();
    // Quiesce: the runtime's blocking threads must not be inside SQLite at fork.
    drop(runtime);

    // SAFETY: as in `embedded_store_is_shared_by_forked_processes`; the child only builds a
    // runtime, calls the store (which must refuse before touching SQLite) and `_exit`s.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return CHILD_NO_RUNTIME;
                };
                match runtime.block_on(store.stats()) {
                    Err(StoreError::ForeignProcess { .. }) => 0,
                    _ => 1,
                }
            }))
            .unwrap_or(CHILD_PANICKED);
            // SAFETY: see above.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            let statuses = wait_for_children(&[child], Instant::now() + MULTIPROCESS_DEADLINE);
            assert!(
                matches!(statuses[..], [WaitStatus::Exited(_, 0)]),
                "{statuses:?}"
            );
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime
                .block_on(store.check())
                .expect("the parent's store still works");
        }
    }
}
