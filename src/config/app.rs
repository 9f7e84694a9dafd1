//! The app's tables of `workers.toml`: `[store]`, `[embed]`, `[llm]`, `[rag]`, validated.
//!
//! Defaults need no set-up: an embedded store under `./data`, no embedding model (lexical
//! retrieval), Ollama at 127.0.0.1:11434 with an extractive answer whenever it is unreachable.

use std::path::PathBuf;
use std::time::Duration;

use super::raw::{RawEmbed, RawLlm, RawRag, RawSeconds, RawStore};

/// Which store holds documents and chunks.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreBackend {
    /// SQLite (WAL, FTS5, sqlite-vec) in one file under `path`.
    Embedded,
    /// A Qdrant server or cluster over gRPC.
    Qdrant,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Distance {
    Cosine,
    Dot,
    Euclid,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoreConfig {
    pub backend: StoreBackend,
    /// Data directory (embedded store file: `<path>/ragpool.sqlite3`).
    pub path: PathBuf,
    /// Qdrant gRPC URL.
    pub url: String,
    pub collection: String,
    pub api_key: Option<String>,
    pub distance: Distance,
}

/// The wire protocol of an embedding or generation server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Provider {
    /// None configured: lexical retrieval only / extractive answers only.
    None,
    /// Ollama's native API (`/api/embed`, `/api/chat`).
    Ollama,
    /// OpenAI-compatible (`/v1/embeddings`, `/v1/chat/completions`): llama.cpp, vLLM, LM Studio.
    OpenAi,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EmbedConfig {
    pub provider: Provider,
    /// Base URL, e.g. `http://127.0.0.1:11434`.
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    /// Expected vector size; 0 = take it from the first response.
    pub dimensions: usize,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlmConfig {
    pub provider: Provider,
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    /// Whole generation, first byte to last.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Until the first token arrives.
    pub first_token_timeout: Duration,
    pub temperature: f64,
    pub max_tokens: u32,
    /// Pool-wide cap on concurrent generations (0 = none), e.g. Ollama's OLLAMA_NUM_PARALLEL;
    /// the others wait in line and are told their place.
    pub max_concurrent: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RagConfig {
    /// Target chunk size in characters.
    pub chunk_size: usize,
    pub chunk_overlap: usize,
    /// Passages retrieved per question (a request may ask for fewer or more, up to 50).
    pub top_k: usize,
    pub max_question_chars: usize,
    /// Ingested on `ragpool serve` when the store is empty.
    pub docs_dir: PathBuf,
    pub ingest_docs_on_first_run: bool,
}

pub const OLLAMA_URL: &str = "http://127.0.0.1:11434";
pub const QDRANT_URL: &str = "http://127.0.0.1:6334";
pub const MAX_TOP_K: usize = 50;

/// A validation failure inside a table: (key within the table, message).
pub type TableError = (&'static str, String);

fn non_empty(v: Option<String>) -> Option<String> {
    v.filter(|s| !s.trim().is_empty())
}

fn secs(key: &'static str, v: Option<RawSeconds>, default: f64) -> Result<Duration, TableError> {
    let s = v.map(RawSeconds::as_f64).unwrap_or(default);
    if !s.is_finite() || s <= 0.0 || s > 86_400.0 {
        return Err((key, format!("{s} is not a sensible number of seconds")));
    }
    Ok(Duration::from_secs_f64(s))
}

fn int(
    key: &'static str,
    v: Option<i64>,
    default: usize,
    min: usize,
    max: usize,
) -> Result<usize, TableError> {
    let n = v.unwrap_or(default as i64);
    if n < min as i64 || n > max as i64 {
        return Err((key, format!("{n} is out of range {min}..={max}")));
    }
    Ok(n as usize)
}

fn provider(v: Option<String>, default: Provider) -> Result<Provider, TableError> {
    match v.as_deref().map(str::to_ascii_lowercase).as_deref() {
        None => Ok(default),
        Some("none" | "") => Ok(Provider::None),
        Some("ollama") => Ok(Provider::Ollama),
        Some("openai") => Ok(Provider::OpenAi),
        Some(other) => Err((
            "provider",
            format!("\"{other}\" is not one of \"none\", \"ollama\", \"openai\""),
        )),
    }
}

fn url(v: Option<String>, default: &str) -> Result<String, TableError> {
    let u = non_empty(v).unwrap_or_else(|| default.to_string());
    if !(u.starts_with("http://") || u.starts_with("https://")) {
        return Err((
            "url",
            format!("\"{u}\" must start with http:// or https://"),
        ));
    }
    Ok(u.trim_end_matches('/').to_string())
}

pub fn store(raw: RawStore) -> Result<StoreConfig, TableError> {
    let backend = match raw
        .backend
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("embedded") => StoreBackend::Embedded,
        Some("qdrant") => StoreBackend::Qdrant,
        Some(other) => {
            return Err((
                "backend",
                format!("\"{other}\" is not \"embedded\" or \"qdrant\""),
            ))
        }
    };
    let distance = match raw
        .distance
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("cosine") => Distance::Cosine,
        Some("dot") => Distance::Dot,
        Some("euclid") => Distance::Euclid,
        Some(other) => {
            return Err((
                "distance",
                format!("\"{other}\" is not cosine, dot or euclid"),
            ))
        }
    };
    Ok(StoreConfig {
        backend,
        path: PathBuf::from(non_empty(raw.path).unwrap_or_else(|| "data".into())),
        url: url(raw.url, QDRANT_URL)?,
        collection: non_empty(raw.collection).unwrap_or_else(|| "ragpool".into()),
        api_key: non_empty(raw.api_key),
        distance,
    })
}

pub fn embed(raw: RawEmbed) -> Result<EmbedConfig, TableError> {
    Ok(EmbedConfig {
        provider: provider(raw.provider, Provider::None)?,
        url: url(raw.url, OLLAMA_URL)?,
        model: non_empty(raw.model).unwrap_or_else(|| "nomic-embed-text".into()),
        api_key: non_empty(raw.api_key),
        dimensions: int("dimensions", raw.dimensions, 0, 0, 65_536)?,
        timeout: secs("timeout", raw.timeout, 30.0)?,
    })
}

pub fn llm(raw: RawLlm) -> Result<LlmConfig, TableError> {
    let temperature = raw.temperature.unwrap_or(0.2);
    if !(0.0..=2.0).contains(&temperature) {
        return Err((
            "temperature",
            format!("{temperature} is out of range 0..=2"),
        ));
    }
    Ok(LlmConfig {
        provider: provider(raw.provider, Provider::Ollama)?,
        url: url(raw.url, OLLAMA_URL)?,
        model: non_empty(raw.model).unwrap_or_else(|| "llama3.2".into()),
        api_key: non_empty(raw.api_key),
        timeout: secs("timeout", raw.timeout, 120.0)?,
        connect_timeout: secs("connect_timeout", raw.connect_timeout, 2.0)?,
        first_token_timeout: secs("first_token_timeout", raw.first_token_timeout, 60.0)?,
        temperature,
        max_tokens: int("max_tokens", raw.max_tokens, 512, 1, 1 << 20)? as u32,
        max_concurrent: int("max_concurrent", raw.max_concurrent, 0, 0, 100_000)?,
    })
}

pub fn rag(raw: RawRag) -> Result<RagConfig, TableError> {
    let chunk_size = int("chunk_size", raw.chunk_size, 800, 100, 100_000)?;
    let chunk_overlap = int("chunk_overlap", raw.chunk_overlap, 100, 0, 50_000)?;
    if chunk_overlap >= chunk_size {
        return Err((
            "chunk_overlap",
            format!("{chunk_overlap} must be smaller than chunk_size ({chunk_size})"),
        ));
    }
    Ok(RagConfig {
        chunk_size,
        chunk_overlap,
        top_k: int("top_k", raw.top_k, 5, 1, MAX_TOP_K)?,
        max_question_chars: int(
            "max_question_chars",
            raw.max_question_chars,
            2000,
            10,
            100_000,
        )?,
        docs_dir: PathBuf::from(non_empty(raw.docs_dir).unwrap_or_else(|| "docs".into())),
        ingest_docs_on_first_run: raw.ingest_docs_on_first_run.unwrap_or(true),
    })
}
