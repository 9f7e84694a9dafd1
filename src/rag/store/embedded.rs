//! The embedded store: one SQLite file, `<path>/ragpool.sqlite3`, shared at the same time by
//! every worker and by the `ragpool ingest` CLI. Owns the schema, the connections of this
//! process and the SQL; must never hold a connection across fork nor run SQLite on the
//! event loop.
//!
//! # Layout of the file
//!
//! - `meta(key, value)`: the embedding dimension and distance metric, once the first embedding
//!   fixed them; `first_run_done` once the first-run ingest of `docs_dir` ran.
//! - `documents(id PK, source UNIQUE, title, content_hash, chunks, updated_at)`.
//! - `chunks(id INTEGER PRIMARY KEY, document_id, position, text)`: `id` is the rowid of the
//!   chunk in both indexes below.
//! - `chunks_fts`: FTS5 over the chunk's Snowball *stems*, **contentless** with
//!   `contentless_delete=1`. The stems exist nowhere else (`chunks` keeps the original text,
//!   which is what a hit shows), so an external-content table would need a second, stemmed
//!   copy of every chunk in `chunks` only for FTS5 to read back; contentless keeps the stems
//!   once, inside the index. `contentless_delete=1` (SQLite >= 3.43) lets a replace delete
//!   index rows by rowid without re-supplying the old stems, so even a change of stemmer can
//!   never leave stale terms behind.
//! - `chunks_vec`: a sqlite-vec `vec0` table holding the full `f32` vectors, created with the
//!   first embedding. Its dimension and metric go to `meta`; a later embedding of another size
//!   is refused.
//! - `chunks_q8(id INTEGER PRIMARY KEY, q)`: the same vectors quantized to int8 (one byte a
//!   dimension, [`quantized`] owns the format), written in the same transaction as
//!   `chunks_vec`. `meta` counts the writes that touched vectors (`vectors_generation`) and the
//!   ones that deleted any (`vectors_epoch`), so a process can tell whether its in-memory copy
//!   is current.
//! - `chunks_f32(id INTEGER PRIMARY KEY, v)`: the full vectors again, as plain rows, for the
//!   exact re-scoring of a shortlist: a point lookup in `vec0` reads its vector through the
//!   overflow chain of a 1.5 MB chunk blob (~40 us each, 500 of them per question), here it
//!   is one B-tree page.
//! - Schema version 3 added both tables: opening a version 1 or 2 file fills them from
//!   `chunks_vec` in one transaction (documents, chunks and full vectors are left as they are).
//! - `feedback(id PK, created_at, vote, question, answer, mode, source_ids)`: readers' votes,
//!   created with the first one.
//!
//! # Dense search
//!
//! Exact brute force over `chunks_vec` costs 40-110 ms at 100k x 384 on one core and grows
//! linearly. Instead each process keeps `chunks_q8` in memory ([`QuantizedIndex`], ~390 bytes
//! a chunk at 384 dimensions), brought up to date at the start of a search from the search's
//! own snapshot (appending rows when nothing was deleted, reloading otherwise), scans it for
//! a shortlist of [`RESCORE_FACTOR`] x `k` and re-scores the shortlist exactly with the full
//! vectors from `chunks_f32`. Scores are the exact ones; the shortlist only bounds recall
//! (recall@10 against exact search in `benches/README.md`). A search whose snapshot is older
//! than the copy another thread just loaded runs exactly instead (sqlite-vec's KNN). The copy
//! is per process (a worker's own, built after fork): 4 workers at 100k x 384 hold ~39 MB each.
//!
//! # Many processes, one file
//!
//! - WAL: readers never block the writer nor each other, and each read sees one committed
//!   snapshot, so a replace (one transaction) is seen whole or not at all.
//! - `busy_timeout` (`BUSY_TIMEOUT`, 5 s): a writer waits for another instead of failing.
//! - Writes are `BEGIN IMMEDIATE`: the write lock is taken up front, so two writers never
//!   deadlock on a read-to-write upgrade (which `busy_timeout` cannot resolve).
//! - `synchronous=NORMAL`: never corrupt; the last commits may roll back on power loss.
//! - A passive checkpoint after every write plus `journal_size_limit` keep the `-wal` bounded
//!   without ever blocking a reader (autocheckpoint stays on as well).
//!
//! # The data directory remembers its store
//!
//! Next to the file, `ragpool.initialised` is written once the schema exists. From then on the
//! store is never silently re-created: a booting worker or `ragpool ingest` that finds the
//! marker but no file (or a file without ragpool's tables) refuses to open it
//! ([`StoreError::Lost`]), so a reload keeps the old generation instead of serving an empty
//! store, and connections never create the file (`SQLITE_OPEN_CREATE` is not used after the
//! first open). While serving, [`EmbeddedStore::probe`] (what `/health` asks) checks that the
//! path is still the file this process opened (not deleted, not replaced) and reads it through a
//! fresh connection, so corruption on disk is seen, not hidden by a connection's page cache.
//!
//! # Threads and fork
//!
//! Every call runs on the store's own fixed [`Pool`] of `[store] threads` threads, each with
//! one connection, so a 10-100 ms query never stalls a worker's event loop (and its
//! heartbeat), and 1,000 concurrent questions use those few threads and connections (the
//! rest wait in line) instead of a thread each. Connections are opened lazily, by the thread
//! that first needs one, in the process that calls; the store remembers the pid that opened
//! it and refuses to work in another one (a forked child must open its own).

use std::ffi::{c_char, c_int};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::time::Duration;

use rusqlite::{
    ffi, params, Connection, ErrorCode, OpenFlags, OptionalExtension, Row, TransactionBehavior,
};

use super::pool::{Pool, PoolError};
use super::quantized::{self, QuantizedIndex};
use super::{now_unix, validate_document, StoreError};
use crate::config::{Distance, StoreConfig};
use crate::rag::feedback::{Feedback, Vote};
use crate::rag::text::Stems;
use crate::rag::{
    document_id, ChunkText, DocumentInfo, Hit, NewDocument, StoreStats, StoredDocument,
    UpsertOutcome,
};

/// The database file inside the configured data directory.
pub const FILE_NAME: &str = "ragpool.sqlite3";
/// Written next to the file once its schema exists: "a store lives here".
pub const MARKER_NAME: &str = "ragpool.initialised";
/// How long a statement waits for another process's lock before reporting `SQLITE_BUSY`.
/// Writes are short (one document), so this is far above any legitimate wait.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The `-wal` file is truncated to this size after a checkpoint that emptied it.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;
/// `PRAGMA user_version` of the schema below (3: `chunks_q8`, `chunks_f32`, the counters).
const SCHEMA_VERSION: i64 = 3;
/// The first schema: older files (1 and 2, which lacked `chunks_f32`) are migrated on open.
const SCHEMA_VERSION_EXACT_ONLY: i64 = 1;
/// Dense search re-scores exactly this many times `k` quantized candidates.
pub const RESCORE_FACTOR: usize = 10;
/// The shortlist is never shorter than this, so a small `k` still gets a generous margin.
const MIN_SHORTLIST: usize = 100;
/// sqlite-vec's largest `k` (`SQLITE_VEC_VEC0_K_MAX`).
const VEC_K_MAX: usize = 4096;
/// Switching a fresh file to WAL needs an exclusive lock and does not go through the busy
/// handler, so it is retried this many times, [`WAL_SWITCH_BACKOFF`] apart.
const WAL_SWITCH_ATTEMPTS: u32 = 250;
const WAL_SWITCH_BACKOFF: Duration = Duration::from_millis(20);

const META_DIMENSIONS: &str = "embedding_dimensions";
const META_METRIC: &str = "embedding_metric";
const META_FIRST_RUN: &str = "first_run_done";
/// Bumped by every write that inserts or deletes vectors.
const META_GENERATION: &str = "vectors_generation";
/// Bumped by every write that deletes vectors: an in-memory copy of another epoch reloads.
const META_EPOCH: &str = "vectors_epoch";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS documents (
    id           TEXT PRIMARY KEY,
    source       TEXT NOT NULL UNIQUE,
    title        TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    chunks       INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id          INTEGER PRIMARY KEY,
    document_id TEXT NOT NULL REFERENCES documents (id),
    position    INTEGER NOT NULL,
    text        TEXT NOT NULL,
    UNIQUE (document_id, position)
);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5 (
    stems,
    content = '',
    contentless_delete = 1,
    tokenize = 'unicode61 remove_diacritics 0'
);
CREATE TABLE IF NOT EXISTS chunks_q8 (
    id INTEGER PRIMARY KEY,
    q  BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks_f32 (
    id INTEGER PRIMARY KEY,
    v  BLOB NOT NULL
);
";

/// Readers' votes on answers (see [`EmbeddedStore::add_feedback`]); `source_ids` is a JSON list.
const FEEDBACK_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS feedback (
    id         TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    vote       TEXT NOT NULL,
    question   TEXT NOT NULL,
    answer     TEXT NOT NULL,
    mode       TEXT NOT NULL,
    source_ids TEXT NOT NULL
);
";

/// BM25 over the stems; `bm25()` is lower-is-better, the caller negates it.
const LEXICAL_SQL: &str = "
SELECT c.document_id, d.title, d.source, c.position, c.text, bm25(chunks_fts) AS rank
FROM chunks_fts
JOIN chunks c ON c.id = chunks_fts.rowid
JOIN documents d ON d.id = c.document_id
WHERE chunks_fts MATCH ?1
ORDER BY rank
LIMIT ?2";

/// Exact KNN first (materialized, so the planner hands vec0 its `MATCH` and `k` untouched),
/// then the join for the text.
const DENSE_SQL: &str = "
WITH knn AS MATERIALIZED (
    SELECT rowid, distance FROM chunks_vec WHERE embedding MATCH ?1 AND k = ?2
)
SELECT c.document_id, d.title, d.source, c.position, c.text, knn.distance
FROM knn
JOIN chunks c ON c.id = knn.rowid
JOIN documents d ON d.id = c.document_id
ORDER BY knn.distance";

/// The full vectors of a shortlist, for exact re-scoring.
const VECTOR_SQL: &str = "SELECT v FROM chunks_f32 WHERE id = ?1";

/// What a hit shows, for one chunk id.
const HIT_SQL: &str = "
SELECT c.document_id, d.title, d.source, c.position, c.text
FROM chunks c
JOIN documents d ON d.id = c.document_id
WHERE c.id = ?1";

/// How `chunks_vec` measures distance. vec0 has no dot product: `distance = "dot"` is served
/// as cosine, which ranks the same for the unit-length vectors embedding models return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Cosine,
    L2,
}

impl Metric {
    fn from_config(distance: Distance) -> Metric {
        match distance {
            Distance::Cosine | Distance::Dot => Metric::Cosine,
            Distance::Euclid => Metric::L2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Metric::Cosine => "cosine",
            Metric::L2 => "l2",
        }
    }

    fn parse(name: &str) -> Option<Metric> {
        match name {
            "cosine" => Some(Metric::Cosine),
            "l2" => Some(Metric::L2),
            _ => None,
        }
    }

    /// A vec0 distance as a higher-is-better score: cosine similarity, or negated L2.
    fn score(self, distance: f64) -> f32 {
        match self {
            Metric::Cosine => (1.0 - distance) as f32,
            Metric::L2 => -distance as f32,
        }
    }

    /// vec0's distance between two vectors, computed here for re-scoring a shortlist.
    fn distance(self, a: &[f32], b: &[f32]) -> f64 {
        match self {
            Metric::Cosine => {
                let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
                for (&x, &y) in a.iter().zip(b) {
                    let (x, y) = (f64::from(x), f64::from(y));
                    dot += x * y;
                    na += x * x;
                    nb += y * y;
                }
                if na == 0.0 || nb == 0.0 {
                    1.0
                } else {
                    1.0 - dot / (na.sqrt() * nb.sqrt())
                }
            }
            Metric::L2 => a
                .iter()
                .zip(b)
                .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
                .sum::<f64>()
                .sqrt(),
        }
    }
}

/// What `meta` says about `chunks_vec`; absent until the first embedding.
#[derive(Debug, Clone, Copy)]
struct VecMeta {
    dimensions: usize,
    metric: Metric,
}

/// The embedded store of one process. Cheap to share by reference.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    /// The threads (and their connections) every call runs on.
    pool: Pool<Connection>,
}

/// What the pool's threads need besides their connection: the file, the stemmer, the metric.
struct Shared {
    /// The database file: where connections open, and what errors name.
    path: PathBuf,
    /// Index-time and query-time stems; built once per process.
    stems: Stems,
    /// The metric `chunks_vec` gets if this process creates it (from `[store] distance`).
    metric: Metric,
    /// (device, inode) of the file when this process opened it: a probe that finds another
    /// file (or none) at the path says the store was deleted or replaced under the workers.
    identity: (u64, u64),
    /// This process's in-memory copy of `chunks_q8`, loaded by the first dense search. Scans
    /// share it (read lock); bringing it up to date takes the write lock.
    index: RwLock<Option<QuantizedIndex>>,
}

impl EmbeddedStore {
    /// Creates the directory, the file and the schema if needed, and switches the file to WAL.
    /// Safe to call from many processes at once.
    pub async fn open(config: &StoreConfig) -> Result<EmbeddedStore, StoreError> {
        register_sqlite_vec()?;
        let dir = config.path.clone();
        let path = dir.join(FILE_NAME);
        // A directory create is one syscall, like the stat that would check it: no thread hop.
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::CreateDir {
            path: dir.clone(),
            source,
        })?;
        let metric = Metric::from_config(config.distance);
        if config.distance == Distance::Dot {
            log::debug!("embedded store: distance \"dot\" is served as cosine");
        }
        let marker = dir.join(MARKER_NAME);
        let remembered = marker.exists();
        let present = std::fs::metadata(&path).is_ok_and(|m| m.len() > 0);
        if remembered && !present {
            return Err(StoreError::Lost {
                path,
                marker,
                what: "is missing (or empty)",
            });
        }
        if !path.exists() {
            // The one place the file is created; connections never create it.
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(StoreError::CreateDir {
                        path: path.clone(),
                        source,
                    })
                }
            }
        }
        let identity = file_identity(&path).map_err(|source| StoreError::CreateDir {
            path: path.clone(),
            source,
        })?;
        let shared = Arc::new(Shared {
            path,
            stems: Stems::default(),
            metric,
            identity,
            index: RwLock::new(None),
        });
        let store = EmbeddedStore {
            shared,
            pool: Pool::new("ragpool-store", config.threads),
        };
        store
            .run(move |shared, conn| {
                switch_to_wal(conn, &shared.path)?;
                create_schema(conn, &shared.path, remembered.then_some(marker.as_path()))?;
                if !remembered {
                    write_marker(&marker, &shared.path);
                }
                shared.warn_on_metric_change(conn);
                Ok(())
            })
            .await?;
        Ok(store)
    }

    /// What `/health` asks: the path still holds the file this process opened, and a fresh
    /// connection (no cached pages) can read it. Counts documents and chunks on the way.
    pub async fn probe(&self) -> Result<StoreStats, StoreError> {
        let shared = Arc::clone(&self.shared);
        // Not `run`: that opens the thread's connection first, which fails on a deleted file
        // with a vaguer message than the identity check gives.
        self.pool
            .run(move |_: &mut Option<Connection>| shared.probe())
            .await
            .map_err(|e| self.pool_error(e))?
    }

    /// Whether the first-run ingest of `docs_dir` already ran in this store's life.
    pub async fn first_run_done(&self) -> Result<bool, StoreError> {
        self.run(|shared, conn| {
            conn.query_row(
                "SELECT 1 FROM meta WHERE key = ?1",
                [META_FIRST_RUN],
                |_| Ok(()),
            )
            .optional()
            .map(|found| found.is_some())
            .map_err(shared.sql_error("read the first-run mark"))
        })
        .await
    }

    /// Records that the first-run ingest ran: it never runs again for this store.
    pub async fn mark_first_run_done(&self) -> Result<(), StoreError> {
        self.run(|shared, conn| {
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)",
                params![META_FIRST_RUN, super::now_unix()],
            )
            .map(|_| ())
            .map_err(shared.sql_error("write the first-run mark"))
        })
        .await
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub async fn document_hash(&self, source: &str) -> Result<Option<String>, StoreError> {
        let source = source.to_owned();
        self.run(move |shared, conn| {
            conn.prepare_cached("SELECT content_hash FROM documents WHERE source = ?1")
                .and_then(|mut stmt| stmt.query_row([&source], |row| row.get(0)).optional())
                .map_err(shared.sql_error("look up a document"))
        })
        .await
    }

    pub async fn upsert_document(&self, doc: NewDocument) -> Result<UpsertOutcome, StoreError> {
        self.run(move |shared, conn| shared.upsert_document(conn, doc))
            .await
    }

    pub async fn list_documents(&self) -> Result<Vec<DocumentInfo>, StoreError> {
        self.run(|shared, conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, source, title, content_hash, chunks, updated_at FROM documents ORDER BY source",
                )
                .map_err(shared.sql_error("list documents"))?;
            let rows = stmt
                .query_map([], |row| {
                    Ok(DocumentInfo {
                        id: row.get(0)?,
                        source: row.get(1)?,
                        title: row.get(2)?,
                        content_hash: row.get(3)?,
                        chunks: row.get::<_, i64>(4)?.max(0) as usize,
                        updated_at: row.get(5)?,
                    })
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(shared.sql_error("list documents"))?;
            Ok(rows)
        })
        .await
    }

    /// One read transaction, so the chunks are those of the version the row describes.
    pub async fn get_document(&self, id: &str) -> Result<Option<StoredDocument>, StoreError> {
        let id = id.to_owned();
        self.run(move |shared, conn| {
            let error = shared.sql_error("read a document");
            let tx = conn.transaction().map_err(error)?;
            let info = tx
                .prepare_cached(
                    "SELECT id, source, title, content_hash, chunks, updated_at FROM documents WHERE id = ?1",
                )
                .and_then(|mut stmt| {
                    stmt.query_row([&id], |row| {
                        Ok(DocumentInfo {
                            id: row.get(0)?,
                            source: row.get(1)?,
                            title: row.get(2)?,
                            content_hash: row.get(3)?,
                            chunks: row.get::<_, i64>(4)?.max(0) as usize,
                            updated_at: row.get(5)?,
                        })
                    })
                    .optional()
                })
                .map_err(shared.sql_error("read a document"))?;
            let Some(info) = info else {
                return Ok(None);
            };
            let chunks = tx
                .prepare_cached(
                    "SELECT position, text FROM chunks WHERE document_id = ?1 ORDER BY position",
                )
                .and_then(|mut stmt| {
                    stmt.query_map([&id], |row| {
                        Ok(ChunkText {
                            position: row.get::<_, i64>(0)?.max(0) as usize,
                            text: row.get(1)?,
                        })
                    })
                    .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                })
                .map_err(shared.sql_error("read a document's chunks"))?;
            Ok(Some(StoredDocument { info, chunks }))
        })
        .await
    }

    /// Into `feedback`, created here with the first vote (not in the versioned schema: a vote
    /// needs no migration, and a file without one is left as it was).
    pub async fn add_feedback(&self, feedback: Feedback) -> Result<(), StoreError> {
        self.run(move |shared, conn| {
            let error = shared.sql_error("store feedback");
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(error)?;
            tx.execute_batch(FEEDBACK_SCHEMA)
                .map_err(shared.sql_error("create the feedback table"))?;
            let source_ids = serde_json::to_string(&feedback.source_ids).unwrap_or_default();
            tx.execute(
                "INSERT INTO feedback (id, created_at, vote, question, answer, mode, source_ids) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    feedback.id,
                    feedback.created_at,
                    feedback.vote.name(),
                    feedback.question,
                    feedback.answer,
                    feedback.mode,
                    source_ids
                ],
            )
            .map_err(shared.sql_error("store feedback"))?;
            tx.commit().map_err(shared.sql_error("store feedback"))?;
            checkpoint(conn, &shared.path);
            Ok(())
        })
        .await
    }

    pub async fn list_feedback(&self) -> Result<Vec<Feedback>, StoreError> {
        self.run(|shared, conn| {
            let error = shared.sql_error("read feedback");
            let exists = conn
                .query_row(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'feedback'",
                    [],
                    |_| Ok(()),
                )
                .optional()
                .map_err(error)?
                .is_some();
            if !exists {
                return Ok(Vec::new());
            }
            let mut stmt = conn
                .prepare(
                    "SELECT id, created_at, vote, question, answer, mode, source_ids FROM feedback \
                     ORDER BY created_at, rowid",
                )
                .map_err(shared.sql_error("read feedback"))?;
            let rows = stmt
                .query_map([], |row| {
                    let vote: String = row.get(2)?;
                    let source_ids: String = row.get(6)?;
                    Ok(Feedback {
                        id: row.get(0)?,
                        created_at: row.get(1)?,
                        vote: Vote::parse(&vote).unwrap_or(Vote::Down),
                        question: row.get(3)?,
                        answer: row.get(4)?,
                        mode: row.get(5)?,
                        source_ids: serde_json::from_str(&source_ids).unwrap_or_default(),
                    })
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(shared.sql_error("read feedback"))?;
            Ok(rows)
        })
        .await
    }

    pub async fn delete_document(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.run(move |shared, conn| shared.delete_document(conn, &id))
            .await
    }

    pub async fn lexical_search(&self, query: &str, k: usize) -> Result<Vec<Hit>, StoreError> {
        // Stemming a question takes microseconds: no thread hop for a query without terms.
        let stems = self.shared.stems.query_stems(query);
        if stems.is_empty() {
            return Ok(Vec::new());
        }
        let fts_query = fts_query(&stems);
        let limit = i64::try_from(k).unwrap_or(i64::MAX);
        self.run(move |shared, conn| {
            let mut stmt = conn
                .prepare_cached(LEXICAL_SQL)
                .map_err(shared.sql_error("search the text index"))?;
            let hits = stmt
                .query_map(params![fts_query, limit], |row| {
                    hit_from_row(row, |rank| -rank as f32)
                })
                .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
                .map_err(shared.sql_error("search the text index"))?;
            Ok(hits)
        })
        .await
    }

    /// The `k` nearest chunks: a scan of the quantized copy for a shortlist, re-scored
    /// exactly (see "Dense search" in the module doc). Same results as
    /// [`EmbeddedStore::dense_search_exact`] up to the shortlist's recall.
    pub async fn dense_search(&self, vector: &[f32], k: usize) -> Result<Vec<Hit>, StoreError> {
        let query = vector.to_vec();
        let k = k.min(VEC_K_MAX);
        self.run(move |shared, conn| {
            let error = shared.sql_error("search the vector index");
            // One read transaction: the counters, the rows loaded into the copy, the full
            // vectors and the texts all come from the same snapshot.
            let tx = conn.transaction().map_err(error)?;
            let Some(meta) = read_vec_meta(&tx).map_err(error)? else {
                return Ok(Vec::new());
            };
            check_dimensions(meta, query.len())?;
            let shortlist_len = (k * RESCORE_FACTOR).max(MIN_SHORTLIST);
            let shortlist = shared
                .with_current_index(&tx, meta, |index| index.shortlist(&query, shortlist_len))?;
            let hits = match shortlist {
                Some(ids) => rescore(&tx, meta, &query, &ids, k).map_err(error)?,
                None => exact_search(&tx, meta, &query, k).map_err(error)?,
            };
            tx.commit().map_err(error)?;
            Ok(hits)
        })
        .await
    }

    /// Exact brute-force KNN over every full vector (sqlite-vec): the reference that the
    /// quantized path is measured against (`benches/retrieval_speed.rs`).
    pub async fn dense_search_exact(
        &self,
        vector: &[f32],
        k: usize,
    ) -> Result<Vec<Hit>, StoreError> {
        let query = vector.to_vec();
        let k = k.min(VEC_K_MAX);
        self.run(move |shared, conn| {
            let error = shared.sql_error("search the vector index");
            let Some(meta) = read_vec_meta(conn).map_err(error)? else {
                return Ok(Vec::new());
            };
            check_dimensions(meta, query.len())?;
            exact_search(conn, meta, &query, k).map_err(error)
        })
        .await
    }

    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        self.run(|shared, conn| count(conn).map_err(shared.sql_error("count documents")))
            .await
    }

    /// Takes a connection and reads a table: proves the file is there and readable.
    #[cfg(test)]
    pub async fn check(&self) -> Result<(), StoreError> {
        self.run(|shared, conn| {
            conn.query_row("SELECT count(*) FROM meta", [], |_| Ok(()))
                .map_err(shared.sql_error("answer a probe"))
        })
        .await
    }

    /// Runs `f` on the store's pool with that thread's connection (opened on first use).
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Shared, &mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        self.pool
            .run(move |slot: &mut Option<Connection>| {
                let conn = match slot {
                    Some(conn) => conn,
                    None => slot.insert(open_connection(&shared.path)?),
                };
                f(&shared, conn)
            })
            .await
            .map_err(|e| self.pool_error(e))?
    }

    fn pool_error(&self, e: PoolError) -> StoreError {
        match e {
            PoolError::ForeignProcess { owner, this } => StoreError::ForeignProcess {
                path: self.shared.path.clone(),
                opened_in: owner,
                used_in: this,
            },
            other => StoreError::Task(other),
        }
    }
}

impl Shared {
    /// See [`EmbeddedStore::probe`].
    fn probe(&self) -> Result<StoreStats, StoreError> {
        match file_identity(&self.path) {
            Ok(identity) if identity == self.identity => {}
            Ok(_) => {
                return Err(StoreError::Moved {
                    path: self.path.clone(),
                    what: "was replaced by another file while serving (this process still \
                           uses the old one); reload (HUP) to open the new one",
                })
            }
            Err(_) => {
                return Err(StoreError::Moved {
                    path: self.path.clone(),
                    what: "was deleted while serving (writes go to the deleted copy); \
                           restore it from a backup and reload",
                })
            }
        }
        let fresh = open_connection(&self.path)?;
        count(&fresh).map_err(self.sql_error("answer a probe"))
    }

    fn sql_error(
        &self,
        action: &'static str,
    ) -> impl Fn(rusqlite::Error) -> StoreError + Copy + '_ {
        move |source| StoreError::Sqlite {
            path: self.path.clone(),
            action,
            source,
        }
    }

    /// One transaction: compare hashes, swap the chunks, commit. Readers (WAL snapshots) see
    /// the old version until the commit and the new one after it; a failure or a crash at any
    /// point rolls the whole transaction back.
    fn upsert_document(
        &self,
        conn: &mut Connection,
        doc: NewDocument,
    ) -> Result<UpsertOutcome, StoreError> {
        let dimensions = validate_document(&doc)?;
        let id = document_id(&doc.source);
        // Stems before the transaction: the write lock is held for SQLite work only.
        let stems: Vec<String> = doc
            .chunks
            .iter()
            .map(|chunk| self.stems.stem_text(&chunk.text))
            .collect();
        let error = self.sql_error("store a document");

        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(error)?;
        let stored_hash: Option<String> = tx
            .query_row(
                "SELECT content_hash FROM documents WHERE id = ?1",
                [&id],
                |row| row.get(0),
            )
            .optional()
            .map_err(error)?;
        if stored_hash.as_deref() == Some(doc.content_hash.as_str()) {
            // Dropping the transaction rolls it back: nothing was written.
            return Ok(UpsertOutcome::Unchanged(id));
        }
        let vec_meta = match (read_vec_meta(&tx).map_err(error)?, dimensions) {
            (Some(meta), Some(got)) if meta.dimensions != got => {
                return Err(StoreError::DimensionMismatch {
                    expected: meta.dimensions,
                    got,
                });
            }
            (None, Some(dimensions)) => {
                Some(create_vec_table(&tx, dimensions, self.metric).map_err(error)?)
            }
            (meta, _) => meta,
        };
        let mut vectors_deleted = 0;
        if stored_hash.is_some() {
            vectors_deleted = delete_chunks(&tx, &id, vec_meta.is_some()).map_err(error)?;
        }
        tx.execute(
            "INSERT INTO documents (id, source, title, content_hash, chunks, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (id) DO UPDATE SET
                 source = excluded.source, title = excluded.title,
                 content_hash = excluded.content_hash, chunks = excluded.chunks,
                 updated_at = excluded.updated_at",
            params![
                id,
                doc.source,
                doc.title,
                doc.content_hash,
                doc.chunks.len() as i64,
                now_unix()
            ],
        )
        .map_err(error)?;
        insert_chunks(&tx, &id, &doc, &stems, vec_meta).map_err(error)?;
        if vec_meta.is_some() {
            bump_vector_counters(&tx, vectors_deleted > 0).map_err(error)?;
        }
        tx.commit().map_err(error)?;
        checkpoint(conn, &self.path);

        log::debug!(
            "embedded store: stored {} ({} chunks)",
            doc.source,
            doc.chunks.len()
        );
        Ok(match stored_hash {
            Some(_) => UpsertOutcome::Replaced(id),
            None => UpsertOutcome::Inserted(id),
        })
    }

    fn delete_document(&self, conn: &mut Connection, id: &str) -> Result<bool, StoreError> {
        let error = self.sql_error("delete a document");
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(error)?;
        let exists = tx
            .query_row("SELECT 1 FROM documents WHERE id = ?1", [id], |_| Ok(()))
            .optional()
            .map_err(error)?
            .is_some();
        if !exists {
            return Ok(false);
        }
        let has_vectors = read_vec_meta(&tx).map_err(error)?.is_some();
        if delete_chunks(&tx, id, has_vectors).map_err(error)? > 0 {
            bump_vector_counters(&tx, true).map_err(error)?;
        }
        tx.execute("DELETE FROM documents WHERE id = ?1", [id])
            .map_err(error)?;
        tx.commit().map_err(error)?;
        checkpoint(conn, &self.path);
        Ok(true)
    }

    /// Runs `scan` on this process's quantized copy once it reflects the snapshot of `conn`'s
    /// open transaction: appends the rows written since (no delete since), or reloads it (a
    /// delete, another shape, or no copy yet). `None` when the copy is already newer than this
    /// snapshot (another thread loaded a later write) or a stored row is unreadable: the
    /// caller searches exactly instead.
    fn with_current_index<T>(
        &self,
        conn: &Connection,
        meta: VecMeta,
        scan: impl FnOnce(&QuantizedIndex) -> T,
    ) -> Result<Option<T>, StoreError> {
        let error = self.sql_error("load the quantized vectors");
        let (generation, epoch) = read_vec_counters(conn).map_err(error)?;
        let current = |index: &QuantizedIndex| {
            index.generation == generation
                && index.epoch == epoch
                && index.dimensions() == meta.dimensions
                && index.metric() == meta.metric
        };
        {
            let guard = self.index.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(index) = guard.as_ref().filter(|index| current(index)) {
                return Ok(Some(scan(index)));
            }
        }
        let mut guard = self.index.write().unwrap_or_else(PoisonError::into_inner);
        let appendable = |index: &QuantizedIndex| {
            index.epoch == epoch
                && index.generation < generation
                && index.dimensions() == meta.dimensions
                && index.metric() == meta.metric
        };
        let loaded = match guard.as_mut() {
            Some(index) if current(index) => Ok(()),
            Some(index) if index.generation > generation => return Ok(None),
            Some(index) if appendable(index) => {
                let loaded = load_quantized(conn, index).map_err(error)?;
                index.generation = generation;
                loaded
            }
            _ => {
                // Free the old copy before loading the new one: never two in memory.
                *guard = None;
                let mut index =
                    QuantizedIndex::new(meta.dimensions, meta.metric, generation, epoch);
                let loaded = load_quantized(conn, &mut index).map_err(error)?;
                log::debug!(
                    "embedded store: {} quantized vectors in memory ({} KiB)",
                    index.len(),
                    index.bytes() / 1024
                );
                *guard = Some(index);
                loaded
            }
        };
        if let Err(bad) = loaded {
            log::warn!(
                "embedded store {}: {bad}; searching exactly until it is rewritten",
                self.path.display()
            );
            *guard = None;
            return Ok(None);
        }
        Ok(guard.as_ref().map(scan))
    }

    /// The metric of an existing `chunks_vec` wins over the config; say so when they differ.
    fn warn_on_metric_change(&self, conn: &Connection) {
        if let Ok(Some(meta)) = read_vec_meta(conn) {
            if meta.metric != self.metric {
                log::warn!(
                    "embedded store {}: vectors were indexed with the {} metric; keeping it (config asks for {})",
                    self.path.display(),
                    meta.metric.name(),
                    self.metric.name()
                );
            }
        }
    }
}

/// Registers sqlite-vec as an auto-extension, once per process, before any connection opens:
/// every connection opened afterwards has `vec0` and the `vec_*` functions.
fn register_sqlite_vec() -> Result<(), StoreError> {
    type EntryPoint = unsafe extern "C" fn(
        *mut ffi::sqlite3,
        *mut *mut c_char,
        *const ffi::sqlite3_api_routines,
    ) -> c_int;
    static REGISTERED: OnceLock<c_int> = OnceLock::new();
    let rc = *REGISTERED.get_or_init(|| {
        // SAFETY: `sqlite3_vec_init` is sqlite-vec's extension entry point, a C function with
        // exactly the `EntryPoint` signature (the crate declares it as `fn()` only to link it).
        // sqlite-vec is compiled with SQLITE_CORE against the bundled SQLite we link.
        unsafe {
            let entry = std::mem::transmute::<*const (), EntryPoint>(
                sqlite_vec::sqlite3_vec_init as *const (),
            );
            ffi::sqlite3_auto_extension(Some(entry))
        }
    });
    if rc == ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(StoreError::VecExtension(rc))
    }
}

/// Documents and chunks; one statement, one snapshot, so the two counts agree.
fn count(conn: &Connection) -> rusqlite::Result<StoreStats> {
    conn.query_row(
        "SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM chunks)",
        [],
        |row| {
            Ok(StoreStats {
                documents: row.get::<_, i64>(0)? as u64,
                chunks: row.get::<_, i64>(1)? as u64,
            })
        },
    )
}

/// (device, inode) of a file.
fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// Writes the marker atomically (temp file, rename); a failure is logged, not fatal: the
/// store works, it is only not protected against being re-created.
fn write_marker(marker: &Path, path: &Path) {
    let text = format!(
        "ragpool keeps its embedded store in {} (created or first seen at unix time {}).\n\
         While this file exists, ragpool refuses to start with that store missing or empty\n\
         instead of silently creating a new one. Remove it only to start over deliberately.\n",
        path.display(),
        now_unix()
    );
    let temp = marker.with_extension(format!("tmp.{}", std::process::id()));
    let written = std::fs::write(&temp, text).and_then(|()| std::fs::rename(&temp, marker));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        log::warn!("embedded store: cannot write {}: {e}", marker.display());
    }
}

/// A connection with this store's per-connection settings. Never creates the file: only
/// [`EmbeddedStore::open`] does, when the data directory has no store yet.
fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let error = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(error)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(error)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(error)?;
    // Both pragmas answer with a row, hence query_row.
    conn.query_row(
        &format!("PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}"),
        [],
        |_| Ok(()),
    )
    .map_err(error)?;
    Ok(conn)
}

/// Puts the file in WAL mode (persistent, so only the first process to open it really does).
fn switch_to_wal(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let error = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut attempt = 0;
    loop {
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .map_err(error)?;
        if mode.eq_ignore_ascii_case("wal") {
            return Ok(());
        }
        match conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get::<_, String>(0)) {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => return Ok(()),
            Ok(mode) => {
                return Err(error(rusqlite::Error::SqliteFailure(
                    ffi::Error::new(ffi::SQLITE_CANTOPEN),
                    Some(format!("WAL mode is unavailable (journal mode stays {mode:?}); is it a network filesystem?")),
                )))
            }
            Err(e) if is_busy(&e) && attempt < WAL_SWITCH_ATTEMPTS => {
                attempt += 1;
                std::thread::sleep(WAL_SWITCH_BACKOFF);
            }
            Err(e) => return Err(error(e)),
        }
    }
}

/// Creates the tables once; later opens only read `user_version` (no write lock, so a worker
/// booting during a long ingest does not wait for it). With a `marker` (a store lived here),
/// a file without the tables is refused instead of being set up afresh.
fn create_schema(
    conn: &mut Connection,
    path: &Path,
    marker: Option<&Path>,
) -> Result<(), StoreError> {
    let error = |source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    };
    let read_version =
        |conn: &Connection| conn.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0));
    let version = read_version(conn).map_err(error)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            path: path.to_path_buf(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    if version == SCHEMA_VERSION {
        return Ok(());
    }
    if let (Some(marker), true) = (marker, version < SCHEMA_VERSION_EXACT_ONLY) {
        return Err(StoreError::Lost {
            path: path.to_path_buf(),
            marker: marker.to_path_buf(),
            what: "has no ragpool tables (it was emptied or replaced)",
        });
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(error)?;
    // Another process may have won the race while this one waited for the lock.
    let version = read_version(&tx).map_err(error)?;
    if version < SCHEMA_VERSION {
        if version >= SCHEMA_VERSION_EXACT_ONLY {
            migrate_to_quantized(&tx, path).map_err(error)?;
        } else {
            tx.execute_batch(SCHEMA).map_err(error)?;
            log::info!("embedded store: created {}", path.display());
        }
        tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))
            .map_err(error)?;
    }
    tx.commit().map_err(error)
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked)
    )
}

fn read_vec_meta(conn: &Connection) -> rusqlite::Result<Option<VecMeta>> {
    let mut stmt = conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?;
    let dimensions: Option<i64> = stmt
        .query_row([META_DIMENSIONS], |row| row.get(0))
        .optional()?;
    let Some(dimensions) = dimensions else {
        return Ok(None);
    };
    let metric: Option<String> = stmt.query_row([META_METRIC], |row| row.get(0)).optional()?;
    // vec0's own default, should the row ever be missing.
    let metric = metric
        .as_deref()
        .and_then(Metric::parse)
        .unwrap_or(Metric::L2);
    Ok(Some(VecMeta {
        dimensions: dimensions.max(0) as usize,
        metric,
    }))
}

/// Creates `chunks_vec` for this dimension and records it, inside the caller's transaction.
fn create_vec_table(
    conn: &Connection,
    dimensions: usize,
    metric: Metric,
) -> rusqlite::Result<VecMeta> {
    conn.execute_batch(&format!(
        "CREATE VIRTUAL TABLE chunks_vec USING vec0 (embedding float[{dimensions}] distance_metric={})",
        metric.name()
    ))?;
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2), (?3, ?4)",
        params![
            META_DIMENSIONS,
            dimensions as i64,
            META_METRIC,
            metric.name()
        ],
    )?;
    log::info!(
        "embedded store: vectors are {dimensions}-dimensional ({} distance)",
        metric.name()
    );
    Ok(VecMeta { dimensions, metric })
}

/// Removes a document's chunks from `chunks` and every index (rowid by rowid, which the
/// virtual tables resolve as point lookups); returns how many vectors went with them.
fn delete_chunks(conn: &Connection, id: &str, has_vectors: bool) -> rusqlite::Result<usize> {
    let rowids: Vec<i64> = conn
        .prepare_cached("SELECT id FROM chunks WHERE document_id = ?1")?
        .query_map([id], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    let mut delete_fts = conn.prepare_cached("DELETE FROM chunks_fts WHERE rowid = ?1")?;
    let mut delete_vec = match has_vectors {
        true => Some((
            conn.prepare_cached("DELETE FROM chunks_vec WHERE rowid = ?1")?,
            conn.prepare_cached("DELETE FROM chunks_q8 WHERE id = ?1")?,
            conn.prepare_cached("DELETE FROM chunks_f32 WHERE id = ?1")?,
        )),
        false => None,
    };
    let mut vectors = 0;
    for rowid in &rowids {
        delete_fts.execute([rowid])?;
        if let Some((vec0, quantized, full)) = delete_vec.as_mut() {
            vec0.execute([rowid])?;
            vectors += quantized.execute([rowid])?;
            full.execute([rowid])?;
        }
    }
    conn.execute("DELETE FROM chunks WHERE document_id = ?1", [id])?;
    Ok(vectors)
}

fn insert_chunks(
    conn: &Connection,
    id: &str,
    doc: &NewDocument,
    stems: &[String],
    vec_meta: Option<VecMeta>,
) -> rusqlite::Result<()> {
    let mut insert_chunk = conn
        .prepare_cached("INSERT INTO chunks (document_id, position, text) VALUES (?1, ?2, ?3)")?;
    let mut insert_fts =
        conn.prepare_cached("INSERT INTO chunks_fts (rowid, stems) VALUES (?1, ?2)")?;
    let mut insert_vec = match vec_meta {
        Some(meta) => Some((
            conn.prepare_cached("INSERT INTO chunks_vec (rowid, embedding) VALUES (?1, ?2)")?,
            conn.prepare_cached("INSERT INTO chunks_q8 (id, q) VALUES (?1, ?2)")?,
            conn.prepare_cached("INSERT INTO chunks_f32 (id, v) VALUES (?1, ?2)")?,
            meta.metric,
        )),
        None => None,
    };
    for (chunk, stems) in doc.chunks.iter().zip(stems) {
        let rowid = insert_chunk.insert(params![id, chunk.position as i64, chunk.text])?;
        insert_fts.execute(params![rowid, stems])?;
        if let (Some((vec0, quantized, full, metric)), Some(embedding)) =
            (insert_vec.as_mut(), &chunk.embedding)
        {
            let blob = f32_blob(embedding);
            vec0.execute(params![rowid, blob])?;
            quantized.execute(params![rowid, quantized::encode(embedding, *metric)])?;
            full.execute(params![rowid, blob])?;
        }
    }
    Ok(())
}

/// Records, inside the caller's write transaction, that vectors changed (`deleted`: some
/// were removed), so every process's quantized copy sees it is behind.
fn bump_vector_counters(conn: &Connection, deleted: bool) -> rusqlite::Result<()> {
    let mut bump = conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES (?1, 1)
         ON CONFLICT (key) DO UPDATE SET value = value + 1",
    )?;
    bump.execute([META_GENERATION])?;
    if deleted {
        bump.execute([META_EPOCH])?;
    }
    Ok(())
}

/// `(vectors_generation, vectors_epoch)`, 0 while absent.
fn read_vec_counters(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    let mut stmt = conn.prepare_cached("SELECT value FROM meta WHERE key = ?1")?;
    let mut read = |key: &str| -> rusqlite::Result<i64> {
        Ok(stmt
            .query_row([key], |row| row.get::<_, i64>(0))
            .optional()?
            .unwrap_or(0))
    };
    Ok((read(META_GENERATION)?, read(META_EPOCH)?))
}

/// Appends to `index` the `chunks_q8` rows newer than its `max_id` (all of them for an empty
/// index). The inner error is a row that does not fit the index.
fn load_quantized(
    conn: &Connection,
    index: &mut QuantizedIndex,
) -> rusqlite::Result<Result<(), quantized::BadBlob>> {
    let mut stmt = conn.prepare_cached("SELECT id, q FROM chunks_q8 WHERE id > ?1 ORDER BY id")?;
    let mut rows = stmt.query([index.max_id])?;
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        let blob = row.get_ref(1)?.as_blob()?;
        if let Err(bad) = index.push(id, blob) {
            return Ok(Err(bad));
        }
    }
    Ok(Ok(()))
}

fn check_dimensions(meta: VecMeta, got: usize) -> Result<(), StoreError> {
    if got == meta.dimensions {
        Ok(())
    } else {
        Err(StoreError::DimensionMismatch {
            expected: meta.dimensions,
            got,
        })
    }
}

/// The `k` best of `ids` by the exact distance between `query` and their full vectors, as
/// hits, best first (ties by chunk id). Ids no longer in this snapshot are skipped.
fn rescore(
    conn: &Connection,
    meta: VecMeta,
    query: &[f32],
    ids: &[i64],
    k: usize,
) -> rusqlite::Result<Vec<Hit>> {
    let mut vector = conn.prepare_cached(VECTOR_SQL)?;
    let mut scored = Vec::with_capacity(ids.len());
    for &id in ids {
        let Some(distance) = vector
            .query_row([id], |row| {
                let blob = row.get_ref(0)?.as_blob()?;
                Ok(meta.metric.distance(query, &f32s(blob)))
            })
            .optional()?
        else {
            continue;
        };
        scored.push((distance, id));
    }
    scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    scored.truncate(k);
    let mut hit = conn.prepare_cached(HIT_SQL)?;
    let mut hits = Vec::with_capacity(scored.len());
    for (distance, id) in scored {
        let found = hit
            .query_row([id], |row| {
                Ok(Hit {
                    document_id: row.get(0)?,
                    title: row.get(1)?,
                    source: row.get(2)?,
                    position: row.get::<_, i64>(3)?.max(0) as usize,
                    text: row.get(4)?,
                    score: meta.metric.score(distance),
                })
            })
            .optional()?;
        hits.extend(found);
    }
    Ok(hits)
}

/// Exact KNN over `chunks_vec` (sqlite-vec's brute force).
fn exact_search(
    conn: &Connection,
    meta: VecMeta,
    query: &[f32],
    k: usize,
) -> rusqlite::Result<Vec<Hit>> {
    let mut stmt = conn.prepare_cached(DENSE_SQL)?;
    let hits = stmt
        .query_map(params![f32_blob(query), k as i64], |row| {
            hit_from_row(row, |distance| meta.metric.score(distance))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(hits)
}

/// A vec0 blob (little-endian `f32`s) as numbers.
fn f32s(blob: &[u8]) -> Vec<f32> {
    blob.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Version 1 or 2 -> 3, inside the caller's write transaction: `chunks_q8` and `chunks_f32`
/// (re)filled from `chunks_vec`. Nothing else is touched, so documents and their vectors
/// stay as they were.
fn migrate_to_quantized(conn: &Connection, path: &Path) -> rusqlite::Result<()> {
    conn.execute_batch(SCHEMA)?;
    let Some(meta) = read_vec_meta(conn)? else {
        return Ok(());
    };
    let mut vectors = conn.prepare("SELECT rowid, embedding FROM chunks_vec")?;
    let mut insert = conn.prepare("INSERT OR REPLACE INTO chunks_q8 (id, q) VALUES (?1, ?2)")?;
    let mut insert_full =
        conn.prepare("INSERT OR REPLACE INTO chunks_f32 (id, v) VALUES (?1, ?2)")?;
    let mut rows = vectors.query([])?;
    let mut count = 0u64;
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        let blob = row.get_ref(1)?.as_blob()?;
        insert.execute(params![id, quantized::encode(&f32s(blob), meta.metric)])?;
        insert_full.execute(params![id, blob])?;
        count += 1;
    }
    bump_vector_counters(conn, true)?;
    log::info!(
        "embedded store {}: quantized {count} stored vectors for fast dense search (schema -> 3)",
        path.display()
    );
    Ok(())
}

/// Copies committed pages back into the database without waiting for anyone; with
/// `journal_size_limit` this keeps the `-wal` file small. Failure is harmless (autocheckpoint
/// and the next write try again).
fn checkpoint(conn: &Connection, path: &Path) {
    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((
            row.get::<_, i64>(0)?,
            row.get::<_, i64>(1)?,
            row.get::<_, i64>(2)?,
        ))
    });
    match result {
        Ok((busy, wal_pages, checkpointed)) => {
            log::trace!(
                "embedded store: checkpoint busy={busy} wal={wal_pages} done={checkpointed}"
            )
        }
        Err(e) => log::debug!(
            "embedded store {}: passive checkpoint failed: {e}",
            path.display()
        ),
    }
}

/// Every stem quoted (so `'`, `"`, `(`, `:`, `*`, `-`, `AND`... are words, never syntax) and
/// OR-ed: a chunk matching any stem is a candidate, BM25 ranks those matching more higher.
fn fts_query(stems: &[String]) -> String {
    stems
        .iter()
        .map(|stem| format!("\"{}\"", stem.replace('"', "\"\"")))
        .collect::<Vec<_>>()
        .join(" OR ")
}

/// A vector as vec0 takes it: little-endian `f32`s.
fn f32_blob(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A hit from `(document_id, title, source, position, text, raw score)`.
fn hit_from_row(row: &Row<'_>, score: impl Fn(f64) -> f32) -> rusqlite::Result<Hit> {
    Ok(Hit {
        document_id: row.get(0)?,
        title: row.get(1)?,
        source: row.get(2)?,
        position: row.get::<_, i64>(3)?.max(0) as usize,
        text: row.get(4)?,
        score: score(row.get(5)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fts_query_quotes_every_stem() {
        let stems = vec!["what".to_string(), "a\"b".to_string(), "hup".to_string()];
        assert_eq!(fts_query(&stems), r#""what" OR "a""b" OR "hup""#);
    }

    #[test]
    fn scores_are_higher_is_better() {
        assert!(Metric::Cosine.score(0.1) > Metric::Cosine.score(0.5));
        assert!(Metric::L2.score(0.1) > Metric::L2.score(0.5));
        assert_eq!(Metric::from_config(Distance::Dot), Metric::Cosine);
        assert_eq!(Metric::parse(Metric::L2.name()), Some(Metric::L2));
    }
}
