//! The document store: documents, their chunks, a lexical index over Snowball stems and
//! optional dense vectors, behind one `enum Store { Embedded, Qdrant }` with one behaviour.
//!
//! # What every backend promises
//!
//! - Identity is `source`; the id is [`document_id`]`(source)`, so every process agrees on it.
//! - [`Store::upsert_document`]: same source and content hash -> `Unchanged`, nothing written;
//!   a new source -> `Inserted`; a new hash -> `Replaced`, and the old chunks are swapped for
//!   the new ones so that a reader sees the old version or the new one, never a mix, and an
//!   interrupted ingest leaves no partial document behind.
//! - Lexical search ranks chunks by BM25 over stems ([`Stems::stem_text`] at index time,
//!   [`Stems::query_stems`] at query time), so a word form finds its other forms.
//! - Dense search is a nearest-neighbour search (embedded: an int8 scan re-scored exactly;
//!   Qdrant: HNSW) whose scores are exact; the first embedding fixes the
//!   dimension and a later one of another size is refused ([`StoreError::DimensionMismatch`]).
//! - Scores are higher-is-better and comparable only within one result list.
//!
//! # Processes
//!
//! A `Store` is opened inside the process that uses it, after fork (in a worker, or in the
//! `ragpool ingest` CLI). It never opens anything before that and must never be carried across
//! a fork: the embedded store refuses to run in a process other than the one that opened it.
//! Every call is `async` and keeps the event loop free: SQLite work runs on the store's own
//! fixed pool of threads ([`pool`], `[store] threads`), Qdrant work is network I/O.
//!
//! [`document_id`]: crate::rag::document_id
//! [`Stems::stem_text`]: crate::rag::text::Stems::stem_text
//! [`Stems::query_stems`]: crate::rag::text::Stems::query_stems

pub mod embedded;
pub mod pool;
pub mod qdrant;
pub mod quantized;
#[cfg(test)]
mod suite;

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::{StoreBackend, StoreConfig};
use crate::rag::feedback::Feedback;
use crate::rag::{DocumentInfo, Hit, NewDocument, StoreStats, StoredDocument, UpsertOutcome};

/// Where documents live. Enum dispatch: one worker thread, two backends, no `dyn`.
pub enum Store {
    /// SQLite (WAL, FTS5, sqlite-vec) in `<path>/ragpool.sqlite3`.
    Embedded(embedded::EmbeddedStore),
    /// A Qdrant server over gRPC.
    Qdrant(qdrant::QdrantStore),
}

/// Everything that can go wrong in a store, worded for the operator reading the log.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the embedded store at {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the embedded store at {path} failed to {action}: {source}")]
    Sqlite {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error(
        "the embedded store at {path} has schema version {found}, newer than this ragpool \
         understands ({supported}); upgrade ragpool or move the file away"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("cannot register the sqlite-vec extension with SQLite (error code {0})")]
    VecExtension(i32),
    #[error(
        "the embedded store at {path} was opened in process {opened_in} and used in process \
         {used_in}: a store must be opened after fork, in the process that uses it"
    )]
    ForeignProcess {
        path: PathBuf,
        opened_in: u32,
        used_in: u32,
    },
    #[error("cannot set up a Qdrant client for {url}: {source}")]
    QdrantClient {
        url: String,
        #[source]
        source: Box<qdrant_client::QdrantError>,
    },
    #[error("Qdrant at {url} (collection {collection:?}) failed to {action}: {source}")]
    Qdrant {
        url: String,
        collection: String,
        action: &'static str,
        #[source]
        source: Box<qdrant_client::QdrantError>,
    },
    #[error("the Qdrant collection {collection:?} does not fit ragpool: {detail}")]
    Collection { collection: String, detail: String },
    #[error(
        "an embedding has {got} dimensions but the store holds {expected}-dimensional vectors \
         (changing the embedding model needs a fresh store)"
    )]
    DimensionMismatch { expected: usize, got: usize },
    #[error("cannot store document {document:?}: {detail}")]
    InvalidDocument { document: String, detail: String },
    #[error(
        "the embedded store {path} {what}, but {marker} says a store was created there; \
         restore the file from a backup, or remove {marker} to start with an empty store"
    )]
    Lost {
        path: PathBuf,
        marker: PathBuf,
        what: &'static str,
    },
    #[error("the embedded store {path} {what}")]
    Moved { path: PathBuf, what: &'static str },
    #[error("a store call did not finish: {0}")]
    Task(#[source] pool::PoolError),
}

impl Store {
    /// Opens the configured backend. Embedded: creates the directory, the file and the schema.
    /// Qdrant: builds the client without network I/O (the collection is created on first use),
    /// so a Qdrant that is down does not stop a worker from booting; [`Store::check`] tells.
    pub async fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let store = match config.backend {
            StoreBackend::Embedded => Store::Embedded(embedded::EmbeddedStore::open(config).await?),
            StoreBackend::Qdrant => Store::Qdrant(qdrant::QdrantStore::open(config)?),
        };
        log::info!("document store: {}", store.describe());
        Ok(store)
    }

    /// `"embedded"` or `"qdrant"`, for `/health` and logs.
    pub fn backend_name(&self) -> &'static str {
        match self {
            Store::Embedded(_) => "embedded",
            Store::Qdrant(_) => "qdrant",
        }
    }

    /// Where the data lives, for logs: a file path or a URL and collection.
    pub fn describe(&self) -> String {
        match self {
            Store::Embedded(s) => format!("embedded at {}", s.path().display()),
            Store::Qdrant(s) => format!("qdrant at {}, collection {:?}", s.url(), s.collection()),
        }
    }

    /// The content hash of the stored version of `source`, if any: lets ingest skip an
    /// unchanged document before spending time on embeddings.
    pub async fn document_hash(&self, source: &str) -> Result<Option<String>, StoreError> {
        match self {
            Store::Embedded(s) => s.document_hash(source).await,
            Store::Qdrant(s) => s.document_hash(source).await,
        }
    }

    /// Stores a document, replacing an earlier version of the same source atomically.
    pub async fn upsert_document(&self, doc: NewDocument) -> Result<UpsertOutcome, StoreError> {
        match self {
            Store::Embedded(s) => s.upsert_document(doc).await,
            Store::Qdrant(s) => s.upsert_document(doc).await,
        }
    }

    /// Every stored document, ordered by source.
    pub async fn list_documents(&self) -> Result<Vec<DocumentInfo>, StoreError> {
        match self {
            Store::Embedded(s) => s.list_documents().await,
            Store::Qdrant(s) => s.list_documents().await,
        }
    }

    /// One document and the text of its chunks (its committed version), `None` when there is
    /// no such document.
    pub async fn get_document(&self, id: &str) -> Result<Option<StoredDocument>, StoreError> {
        match self {
            Store::Embedded(s) => s.get_document(id).await,
            Store::Qdrant(s) => s.get_document(id).await,
        }
    }

    /// Keeps a reader's vote. Embedded: the `feedback` table of the same file. Qdrant: a
    /// payload-only point (`kind = "feedback"`) in the same collection, so every node and host
    /// sharing the documents shares the votes, and a search never sees them.
    pub async fn add_feedback(&self, feedback: Feedback) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.add_feedback(feedback).await,
            Store::Qdrant(s) => s.add_feedback(feedback).await,
        }
    }

    /// Every vote, oldest first.
    pub async fn list_feedback(&self) -> Result<Vec<Feedback>, StoreError> {
        let mut all = match self {
            Store::Embedded(s) => s.list_feedback().await?,
            Store::Qdrant(s) => s.list_feedback().await?,
        };
        all.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(all)
    }

    /// Removes a document and its chunks; `false` when there was no such document.
    pub async fn delete_document(&self, id: &str) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => s.delete_document(id).await,
            Store::Qdrant(s) => s.delete_document(id).await,
        }
    }

    /// The `k` chunks that best match the query's stems (BM25), best first. A query without
    /// any stem (empty, only punctuation or stop words) finds nothing.
    pub async fn lexical_search(&self, query: &str, k: usize) -> Result<Vec<Hit>, StoreError> {
        if k == 0 {
            return Ok(Vec::new());
        }
        match self {
            Store::Embedded(s) => s.lexical_search(query, k).await,
            Store::Qdrant(s) => s.lexical_search(query, k).await,
        }
    }

    /// The `k` chunks whose embeddings are nearest to `vector`, best first; empty when no
    /// vectors are stored yet.
    pub async fn dense_search(&self, vector: &[f32], k: usize) -> Result<Vec<Hit>, StoreError> {
        if k == 0 {
            return Ok(Vec::new());
        }
        match self {
            Store::Embedded(s) => s.dense_search(vector, k).await,
            Store::Qdrant(s) => s.dense_search(vector, k).await,
        }
    }

    /// How many documents and chunks are stored.
    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        match self {
            Store::Embedded(s) => s.stats().await,
            Store::Qdrant(s) => s.stats().await,
        }
    }

    /// What `/health` asks: counts, read so that a store file deleted, replaced or corrupted
    /// under a running worker is reported (embedded), or the server's answer (Qdrant).
    pub async fn probe(&self) -> Result<StoreStats, StoreError> {
        match self {
            Store::Embedded(s) => s.probe().await,
            Store::Qdrant(s) => s.stats().await,
        }
    }

    /// Whether the first-run ingest of `docs_dir` already ran in this store's life. Embedded:
    /// a mark in the file. Qdrant: the collection exists (documents created it; deleting them
    /// all leaves it).
    pub async fn first_run_done(&self) -> Result<bool, StoreError> {
        match self {
            Store::Embedded(s) => s.first_run_done().await,
            Store::Qdrant(s) => s.collection_exists().await,
        }
    }

    /// Records that the first-run ingest ran (Qdrant: its collection is the record).
    pub async fn mark_first_run_done(&self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.mark_first_run_done().await,
            Store::Qdrant(_) => Ok(()),
        }
    }

    /// A query through the store's own connection: the suite's check that a store is usable
    /// (after a fork, a reopen...). `/health` uses [`Store::probe`].
    #[cfg(test)]
    pub async fn check(&self) -> Result<(), StoreError> {
        match self {
            Store::Embedded(s) => s.check().await,
            Store::Qdrant(s) => s.check().await,
        }
    }
}

/// Checks what both backends rely on: a source, at least one chunk, positions `0..n` in
/// order, and embeddings (where present) of one finite dimension, which it returns.
fn validate_document(doc: &NewDocument) -> Result<Option<usize>, StoreError> {
    let invalid = |detail: String| StoreError::InvalidDocument {
        document: doc.source.clone(),
        detail,
    };
    if doc.source.trim().is_empty() {
        return Err(invalid("the source is empty".into()));
    }
    if doc.chunks.is_empty() {
        return Err(invalid("it has no chunks".into()));
    }
    for (i, chunk) in doc.chunks.iter().enumerate() {
        if chunk.position != i {
            return Err(invalid(format!(
                "chunk {i} has position {}; positions must be 0..{} in order",
                chunk.position,
                doc.chunks.len()
            )));
        }
    }
    embedding_dimensions(doc)
}

/// The dimension of the document's embeddings, `None` when it has none; an error when they
/// disagree, are empty or hold NaN/infinity.
fn embedding_dimensions(doc: &NewDocument) -> Result<Option<usize>, StoreError> {
    let invalid = |detail: String| StoreError::InvalidDocument {
        document: doc.source.clone(),
        detail,
    };
    let mut dims = None;
    for chunk in &doc.chunks {
        let Some(embedding) = &chunk.embedding else {
            continue;
        };
        if embedding.is_empty() {
            return Err(invalid(format!(
                "the embedding of chunk {} is empty",
                chunk.position
            )));
        }
        if embedding.iter().any(|x| !x.is_finite()) {
            return Err(invalid(format!(
                "the embedding of chunk {} is not finite",
                chunk.position
            )));
        }
        match dims {
            None => dims = Some(embedding.len()),
            Some(d) if d != embedding.len() => {
                return Err(StoreError::DimensionMismatch {
                    expected: d,
                    got: embedding.len(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(dims)
}

/// Unix seconds now, for `updated_at`.
fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
