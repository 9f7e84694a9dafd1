//! The RAG app: documents in, answers with sources out. Knows nothing about processes.
//!
//! # Layout
//!
//! - [`text`]: words, Snowball stems (Russian and English), language detection.
//! - [`ingest`]: loading files (Markdown, text, HTML, PDF) and splitting them into chunks.
//! - [`store`]: `enum Store { Embedded, Qdrant }`, one behaviour, one test suite.
//! - [`llm`]: embeddings and streaming generation over Ollama's and OpenAI's wire protocols.
//! - [`rank`]: chunk hits -> distinct documents, weighted fusion, tie-breaks (pure functions).
//! - [`answer`]: the prompt and the extractive fallback (pure functions).
//! - [`conversation`]: earlier turns, their bounds, the standalone form of a follow-up.
//! - [`feedback`]: readers' votes on answers (kept by the store).
//! - [`engine`]: [`engine::Rag`], the pipeline tying them together for one process.
//!
//! Everything here is built inside a worker, after fork: connections, clients and runtimes
//! are never inherited.

pub mod answer;
pub mod conversation;
pub mod engine;
pub mod feedback;
pub mod ingest;
pub mod llm;
pub mod rank;
pub mod store;
pub mod text;

use serde::Serialize;

/// A document ready to be stored: its text already split into chunks.
#[derive(Debug, Clone)]
pub struct NewDocument {
    /// Stable identity: the file path for ingested files, or the title for uploads. Re-ingesting
    /// the same source replaces the earlier version.
    pub source: String,
    pub title: String,
    /// Hex SHA-256 of the full text: an unchanged document is not re-ingested.
    pub content_hash: String,
    pub chunks: Vec<NewChunk>,
}

#[derive(Debug, Clone)]
pub struct NewChunk {
    /// 0-based position of the chunk in its document.
    pub position: usize,
    pub text: String,
    /// Dense vector, when an embedding model is configured.
    pub embedding: Option<Vec<f32>>,
}

/// What a store says about one stored document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DocumentInfo {
    /// Derived from `source` ([`document_id`]), so every process and store agrees on it.
    pub id: String,
    pub source: String,
    pub title: String,
    pub content_hash: String,
    pub chunks: usize,
    /// Unix seconds when this version was stored.
    pub updated_at: i64,
}

/// A stored document with the text of its chunks, for the read-only document view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredDocument {
    pub info: DocumentInfo,
    /// Every chunk, by position (neighbours share `[rag] chunk_overlap` characters).
    pub chunks: Vec<ChunkText>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkText {
    pub position: usize,
    pub text: String,
}

/// One retrieved passage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    pub document_id: String,
    pub title: String,
    pub source: String,
    pub position: usize,
    pub text: String,
    /// Higher is better; comparable only within one result list.
    pub score: f32,
}

/// What storing a document did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", content = "id", rename_all = "lowercase")]
pub enum UpsertOutcome {
    /// Same source, same content hash: nothing written.
    Unchanged(String),
    Inserted(String),
    /// Same source, new content: old chunks replaced atomically.
    Replaced(String),
}

/// Documents and chunks in a store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StoreStats {
    pub documents: u64,
    pub chunks: u64,
}

/// The id of the document with this source: the first 16 hex digits of its SHA-256.
pub fn document_id(source: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(source.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of a text.
pub fn content_hash(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
