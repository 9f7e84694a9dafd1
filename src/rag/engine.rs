//! One process's RAG pipeline: ingest (chunk, embed, store) and ask (retrieve, fuse, generate
//! or extract), streamed as [`Event`]s so the HTTP layer can send them as they happen.
//!
//! Built after fork inside a worker (or in the `ragpool ingest` CLI). Degrades instead of
//! failing: no embedding model -> lexical retrieval; no LLM, or an unreachable one ->
//! an extractive answer, labelled as such.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;

use super::answer::{self, ExtractiveReason};
use super::conversation::{self, HistoryLimits, Turn};
use super::ingest::{self, Extractor, IngestError, LoadedDocument};
use super::llm::{ChatMessage, Chunk, Embedder, Finish, Generator, LlmError, Reranker, Role};
use super::rank::{self, Weighted};
use super::store::{Store, StoreError};
use super::text::{detect_language, Language, Stems};
use super::{content_hash, document_id, Hit, NewChunk, NewDocument, StoreStats, UpsertOutcome};
use crate::config::{Config, Provider, MAX_TOP_K};

/// How long a reachability probe of the LLM is trusted, so `/health` does not hit Ollama per call.
const LLM_STATUS_TTL: Duration = Duration::from_secs(5);
/// How long a check of the embedding model is trusted.
const EMBED_STATUS_TTL: Duration = Duration::from_secs(5);
/// How long the count of documents waiting for vectors is reused (it lists the documents).
const PENDING_STATUS_TTL: Duration = Duration::from_secs(10);
/// Bound on the embedding model check behind /health.
const EMBED_CHECK_TIMEOUT: Duration = Duration::from_secs(2);
/// Marks a stored document's content hash when its chunks have no vectors because embedding
/// failed: lexical search finds it now, and its vectors are filled in later (on the next
/// start or by `ragpool ingest --reembed`). A re-ingest sees a different hash and redoes it.
const PENDING_VECTORS: &str = "pending-vectors:";
/// How long a store count is reused by /health.
const STORE_STATUS_TTL: Duration = Duration::from_secs(1);
/// The lexical list's weight in the fusion (chosen on the dev set, `benches/README.md`).
const LEXICAL_WEIGHT: f32 = 1.0;
/// The dense list's, for a question in a language the embedding model is declared for.
const DENSE_WEIGHT: f32 = 1.0;
/// Longest snippet shown with a source.
const SNIPPET_CHARS: usize = 280;

#[derive(Debug, thiserror::Error)]
pub enum RagError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("cannot set up the {what} client: {source}")]
    Client {
        what: &'static str,
        #[source]
        source: LlmError,
    },
    #[error("embedding failed: {0}")]
    Embed(#[source] LlmError),
    #[error("{0} has no text to index")]
    Empty(String),
    #[error("{0} could not be split into chunks (the splitter failed); nothing was stored")]
    Chunking(String),
}

/// A numbered source as the page shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Source {
    pub n: usize,
    pub document_id: String,
    pub title: String,
    pub source: String,
    pub position: usize,
    pub snippet: String,
    pub score: f32,
}

/// What became of one file of an ingest run ([`Rag::ingest_path`]).
#[derive(Debug)]
pub enum IngestStep {
    /// Inserted, replaced, or found unchanged.
    Stored {
        source: String,
        outcome: UpsertOutcome,
    },
    /// Loaded, then refused by the store or the embedder: nothing of it was stored.
    Failed { source: String, error: RagError },
    /// The file could not be read or parsed (the error names the file and the reason).
    Unloadable(IngestError),
}

impl IngestStep {
    /// Why this file was not stored, if it was not.
    pub fn error(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            IngestStep::Stored { .. } => None,
            IngestStep::Failed { error, .. } => Some(error),
            IngestStep::Unloadable(error) => Some(error),
        }
    }
}

/// The counts of an ingest run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IngestTally {
    pub inserted: usize,
    pub replaced: usize,
    pub unchanged: usize,
    pub failed: usize,
}

impl std::ops::AddAssign for IngestTally {
    fn add_assign(&mut self, other: IngestTally) {
        self.inserted += other.inserted;
        self.replaced += other.replaced;
        self.unchanged += other.unchanged;
        self.failed += other.failed;
    }
}

impl IngestTally {
    fn count(&mut self, step: &IngestStep) {
        match step {
            IngestStep::Stored { outcome, .. } => match outcome {
                UpsertOutcome::Inserted(_) => self.inserted += 1,
                UpsertOutcome::Replaced(_) => self.replaced += 1,
                UpsertOutcome::Unchanged(_) => self.unchanged += 1,
            },
            IngestStep::Failed { .. } | IngestStep::Unloadable(_) => self.failed += 1,
        }
    }

    /// Files that are in the store now, changed or not.
    pub fn stored(&self) -> usize {
        self.inserted + self.replaced + self.unchanged
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Generated,
    Extractive,
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Timings {
    pub embed_ms: f64,
    pub retrieve_ms: f64,
    pub generate_ms: f64,
    pub first_token_ms: Option<f64>,
    pub total_ms: f64,
}

/// What an answer stream says, in order: `Standalone` (only for a follow-up), `Sources`,
/// `Queued`*, `Reasoning`* (only with `[llm] think`), `Token`*, then `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A follow-up was searched for as this standalone question; `by` is "llm" (rewritten by
    /// the language model) or "fallback" (the follow-up plus the previous question's words).
    /// Only for a question with history, before `Sources`.
    Standalone {
        query: String,
        by: &'static str,
    },
    Sources(Vec<Source>),
    /// Waiting for the LLM: `position` 1 is next in line.
    Queued {
        position: u64,
    },
    /// A piece of the model's reasoning, shown apart from the answer; never answer text.
    Reasoning(String),
    Token(String),
    /// `upstream_error` names the LLM backend when it failed and the answer fell back;
    /// `truncated`: the model's token budget ran out, so the answer is cut off.
    Done {
        mode: Mode,
        timings: Timings,
        upstream_error: Option<&'static str>,
        truncated: bool,
    },
    /// The answer failed; `backend` is the upstream at fault ("embedded", "ollama", ...).
    Error {
        message: String,
        backend: &'static str,
    },
}

/// A complete answer, for `POST /api/ask`.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub answer: String,
    pub mode: Mode,
    /// The answer was cut off: the model's token budget (`[llm] max_tokens`) ran out.
    pub truncated: bool,
    /// The model's reasoning, when `[llm] think` is on and it thought.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reasoning: String,
    pub sources: Vec<Source>,
    /// What retrieval searched for, when the question came with history.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub standalone: Option<Standalone>,
    pub timings: Timings,
}

/// The standalone form of a follow-up, for `POST /api/ask`.
#[derive(Debug, Clone, Serialize)]
pub struct Standalone {
    pub query: String,
    pub by: &'static str,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ComponentHealth {
    /// "ok", "down" or "none" (not configured).
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The configured model, for the LLM and the embedder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

impl ComponentHealth {
    fn of(result: Result<(), String>, model: Option<&str>) -> ComponentHealth {
        let (status, detail) = match result {
            Ok(()) => ("ok", None),
            Err(e) => ("down", Some(e)),
        };
        ComponentHealth {
            status,
            detail,
            model: model.map(str::to_string),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Health {
    pub store: ComponentHealth,
    pub store_backend: &'static str,
    pub stats: Option<StoreStats>,
    pub llm: ComponentHealth,
    pub embed: ComponentHealth,
    /// Documents stored for lexical search whose vectors are still to be filled in (embedding
    /// failed when they were ingested); `None` without an embedding model or when unknown.
    pub pending_vectors: Option<u64>,
}

/// Which result lists a retrieval draws on: answers use both; the retrieval bench compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lists {
    /// Lexical, plus dense when an embedding model is configured and answers.
    Both,
    Lexical,
    /// Dense only (nothing without an embedding model).
    Dense,
}

pub struct Rag {
    store: Store,
    /// Parses uploads and files: HTML and PDF in a sandboxed helper process.
    extractor: Extractor,
    /// The embedding servers (`[embed] url`, one model), in config order; empty = none.
    embedders: Vec<Embedder>,
    /// Routes embedding calls over `embedders` with a breaker each, when the caller set one.
    embed_gate: Option<Box<dyn GenerationGate>>,
    /// `[embed] languages`: the question languages the dense list is trusted for (empty: all).
    embed_languages: Vec<Language>,
    /// `[rerank]`: reorders the best passages of the first `rerank_candidates` documents.
    reranker: Option<Reranker>,
    rerank_candidates: usize,
    /// The LLM servers answers go to (`[[llm.backend]]`), in config order; empty = none.
    generators: Vec<Generator>,
    stems: Stems,
    config: crate::config::RagConfig,
    /// "ollama", "openai" or "none": the label of LLM errors in metrics.
    llm_backend: &'static str,
    /// `[llm] think`: reasoning is streamed to the client (else it is only waited through).
    think: bool,
    /// The pool-wide cap on concurrent generations, when the caller set one.
    gate: Option<Box<dyn GenerationGate>>,
    /// The last store count for /health: when, and what it said.
    store_probe: TtlCache<Result<StoreStats, String>>,
    /// The last LLM probe: when, and whether the server has the model.
    llm_probe: TtlCache<Result<(), String>>,
    /// The last embedding model check.
    embed_probe: TtlCache<Result<(), String>>,
    /// Documents stored without vectors (embedding failed), for /health and /metrics.
    pending_probe: TtlCache<Option<u64>>,
}

impl Rag {
    pub async fn open(config: &Config) -> Result<Rag, RagError> {
        let store = Store::open(&config.store).await?;
        let embedders = Embedder::pool(&config.embed).map_err(|source| RagError::Client {
            what: "embedding",
            source,
        })?;
        let generators = Generator::pool(&config.llm).map_err(|source| RagError::Client {
            what: "LLM",
            source,
        })?;
        let reranker = Reranker::new(&config.rerank).map_err(|source| RagError::Client {
            what: "reranking",
            source,
        })?;
        Ok(Rag {
            store,
            extractor: Extractor::sandboxed(extract_limits(&config.rag)),
            embedders,
            embed_gate: None,
            embed_languages: config.embed.languages.clone(),
            reranker,
            rerank_candidates: config.rerank.candidates,
            generators,
            stems: Stems::default(),
            config: config.rag.clone(),
            llm_backend: match config.llm.provider {
                Provider::Ollama => "ollama",
                Provider::OpenAi => "openai",
                Provider::None => "none",
            },
            think: config.llm.think,
            llm_probe: TtlCache::new(LLM_STATUS_TTL),
            store_probe: TtlCache::new(STORE_STATUS_TTL),
            embed_probe: TtlCache::new(EMBED_STATUS_TTL),
            pending_probe: TtlCache::new(PENDING_STATUS_TTL),
            gate: None,
        })
    }

    /// Routes generations through a gate shared by the pool: caps, backend choice, breakers.
    pub fn set_gate(&mut self, gate: Box<dyn GenerationGate>) {
        self.gate = Some(gate);
    }

    /// Routes embedding calls over the embedding servers, a breaker each (no line, no caps).
    pub fn set_embed_gate(&mut self, gate: Box<dyn GenerationGate>) {
        self.embed_gate = Some(gate);
    }

    /// Vectors from the least busy embedding server with a closed breaker; a server that is
    /// down or lacks the model is counted against its breaker and the call moves to another
    /// (an embedding is idempotent). Other errors (wrong vector size) end the call.
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, LlmError> {
        let mut tried: u64 = 0;
        let mut last_error = None;
        loop {
            let index = match &self.embed_gate {
                None => (0..self.embedders.len()).find(|i| tried & (1 << i) == 0),
                Some(gate) => gate.try_take(tried),
            };
            let Some(index) = index else { break };
            tried |= 1 << index;
            let _place = Admission {
                gate: self.embed_gate.as_deref(),
                index,
            };
            let embedder = &self.embedders[index];
            match embedder.embed(texts).await {
                Ok(vectors) => {
                    if let Some(gate) = &self.embed_gate {
                        gate.record(index, true);
                    }
                    return Ok(vectors);
                }
                Err(e) if e.is_unavailable() || e.missing_model().is_some() => {
                    log::warn!("embedding server {index} failed: {e}");
                    if let Some(gate) = &self.embed_gate {
                        if gate.record(index, false) {
                            log::warn!(
                                "embedding server {index} ({}) ejected: its breaker is open",
                                embedder.url()
                            );
                        }
                    }
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or(LlmError::NoBackend))
    }

    /// Runs for the worker's life: every [`PROBE_INTERVAL`], each backend whose breaker is
    /// open and cooled down (claimed by one worker of the pool) gets a health probe, its model
    /// check; when it passes, answers may try the backend again (one at a time until one
    /// succeeds). Without a gate there is no breaker and this returns at once.
    pub async fn run_backend_probes(self: std::rc::Rc<Self>) {
        if self.gate.is_none() && self.embed_gate.is_none() {
            return;
        }
        loop {
            tokio::time::sleep(PROBE_INTERVAL).await;
            if let Some(gate) = &self.embed_gate {
                for (index, embedder) in self.embedders.iter().enumerate() {
                    if !gate.claim_probe(index) {
                        continue;
                    }
                    match embedder.check_model(EMBED_CHECK_TIMEOUT).await {
                        Ok(()) => {
                            log::info!(
                                "embedding server {index} ({}) answers its health probe: on trial",
                                embedder.url()
                            );
                            gate.probe_passed(index);
                        }
                        Err(e) => {
                            log::info!("embedding server {index} still ejected: {e}");
                            gate.record(index, false);
                        }
                    }
                }
            }
            let Some(gate) = &self.gate else { continue };
            for (index, generator) in self.generators.iter().enumerate() {
                if !gate.claim_probe(index) {
                    continue;
                }
                match generator.check_model().await {
                    Ok(()) => {
                        log::info!(
                            "LLM backend {index} ({}) answers its health probe: on trial",
                            generator.url()
                        );
                        gate.probe_passed(index);
                    }
                    Err(e) => {
                        log::info!("LLM backend {index} still ejected: {e}");
                        gate.record(index, false);
                    }
                }
            }
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// How this process parses documents (for `ragpool ingest`, which walks folders itself).
    pub fn extractor(&self) -> &Extractor {
        &self.extractor
    }

    /// Parses an upload off the event loop (HTML and PDF in the sandbox): a bad or hostile file
    /// is an [`IngestError`] naming what went wrong, never a dead or bloated worker.
    pub async fn load_upload(
        &self,
        name: String,
        bytes: bytes::Bytes,
        content_type: Option<String>,
    ) -> Result<LoadedDocument, IngestError> {
        let extractor = self.extractor.clone();
        let shown = name.clone();
        tokio::task::spawn_blocking(move || {
            extractor.load_bytes(&name, &bytes, content_type.as_deref())
        })
        .await
        .unwrap_or_else(|_| {
            Err(IngestError::Malformed {
                name: shown,
                format: ingest::Format::Text,
                reason: "the parsing task failed".into(),
            })
        })
    }

    /// Loads a file or folder off the event loop; one result per file.
    pub async fn load_path(
        &self,
        path: std::path::PathBuf,
    ) -> Result<Vec<Result<LoadedDocument, IngestError>>, IngestError> {
        let extractor = self.extractor.clone();
        let shown = path.display().to_string();
        tokio::task::spawn_blocking(move || extractor.load_path(&path))
            .await
            .unwrap_or_else(|e| {
                Err(IngestError::Unreadable {
                    name: shown,
                    source: std::io::Error::other(e.to_string()),
                })
            })
    }

    pub fn max_question_chars(&self) -> usize {
        self.config.max_question_chars
    }

    pub fn history_limits(&self) -> HistoryLimits {
        HistoryLimits {
            turns: self.config.max_history_turns,
            chars: self.config.max_history_chars,
        }
    }

    pub fn default_top_k(&self) -> usize {
        self.config.top_k
    }

    // ----- ingest --------------------------------------------------------------------------

    /// The one ingest loop, for `ragpool ingest` and the first-run ingest alike: every file
    /// under `path` (a file or a folder) is loaded and stored in turn, and `each` hears what
    /// became of it. A bad file is a step of its own, never the end of the folder. Err only
    /// when `path` itself cannot be read.
    pub async fn ingest_path(
        &self,
        path: std::path::PathBuf,
        mut each: impl FnMut(&IngestStep),
    ) -> Result<IngestTally, IngestError> {
        let mut tally = IngestTally::default();
        for file in self.load_path(path).await? {
            let step = match file {
                Ok(doc) => {
                    let source = doc.source.clone();
                    match self.ingest(doc).await {
                        Ok(outcome) => IngestStep::Stored { source, outcome },
                        Err(error) => IngestStep::Failed { source, error },
                    }
                }
                Err(error) => IngestStep::Unloadable(error),
            };
            tally.count(&step);
            each(&step);
        }
        Ok(tally)
    }

    /// Chunks, embeds and stores one document; an unchanged one costs one hash lookup.
    pub async fn ingest(&self, doc: LoadedDocument) -> Result<UpsertOutcome, RagError> {
        let hash = content_hash(&doc.text);
        let stored = self.store.document_hash(&doc.source).await?;
        let unchanged = match stored.as_deref() {
            Some(h) if h == hash => true,
            // Stored without vectors: unchanged only while there is no model to fill them in.
            Some(h) => self.embedders.is_empty() && h.strip_prefix(PENDING_VECTORS) == Some(&hash),
            None => false,
        };
        if unchanged {
            return Ok(UpsertOutcome::Unchanged(document_id(&doc.source)));
        }
        // Chunking a large document is CPU work: off the event loop, so the heartbeat keeps beating.
        let (doc, pieces) = {
            let config = self.config.clone();
            let name = doc.source.clone();
            tokio::task::spawn_blocking(move || {
                let pieces = ingest::chunk(&doc, &config);
                (doc, pieces)
            })
            .await
            .map_err(|_| RagError::Chunking(name))?
        };
        if pieces.is_empty() {
            return Err(RagError::Empty(doc.source));
        }
        let (embeddings, content_hash) = match self.embedders.is_empty() {
            true => (None, hash),
            false => match self.embed(&pieces).await {
                Ok(vectors) => (Some(vectors), hash),
                // Still stored for lexical search; the vectors are filled in later.
                Err(e) => {
                    log::warn!(
                        "{}: stored without vectors (lexical search only until they are filled in): embedding failed: {e}",
                        doc.source
                    );
                    self.pending_probe.clear();
                    (None, format!("{PENDING_VECTORS}{hash}"))
                }
            },
        };
        let chunks = pieces
            .into_iter()
            .enumerate()
            .map(|(position, text)| NewChunk {
                position,
                text,
                embedding: embeddings.as_ref().and_then(|e| e.get(position).cloned()),
            })
            .collect();
        let outcome = self
            .store
            .upsert_document(NewDocument {
                source: doc.source,
                title: doc.title,
                content_hash,
                chunks,
            })
            .await?;
        Ok(outcome)
    }

    /// Documents stored without vectors, waiting for them (0 without an embedding model).
    pub async fn pending_vectors(&self) -> Result<u64, RagError> {
        if self.embedders.is_empty() {
            return Ok(0);
        }
        let documents = self.store.list_documents().await?;
        Ok(documents
            .iter()
            .filter(|d| d.content_hash.starts_with(PENDING_VECTORS))
            .count() as u64)
    }

    /// [`Rag::pending_vectors`] at most once per [`PENDING_STATUS_TTL`] (it lists every
    /// document), for `/health` and `/metrics`; `None` without an embedding model.
    pub async fn pending_vectors_cached(&self) -> Option<u64> {
        self.embedders.first()?;
        self.pending_probe
            .get_or_refresh(|| async { self.pending_vectors().await.ok() })
            .await
    }

    /// Fills in the vectors of documents stored without them, re-reading each from its file:
    /// (filled, still waiting). A document that is not a readable file (an HTTP upload) waits
    /// until it is uploaded again. Nothing to do without an embedding model.
    pub async fn fill_missing_vectors(&self) -> Result<(usize, usize), RagError> {
        if self.embedders.is_empty() {
            return Ok((0, 0));
        }
        let pending: Vec<String> = self
            .store
            .list_documents()
            .await?
            .into_iter()
            .filter(|d| d.content_hash.starts_with(PENDING_VECTORS))
            .map(|d| d.source)
            .collect();
        let (mut filled, mut waiting) = (0, 0);
        for source in pending {
            let path = std::path::PathBuf::from(&source);
            let files = match path.is_file() {
                true => Some(self.load_path(path).await),
                false => None,
            };
            let loaded = match files {
                Some(Ok(mut files)) if files.len() == 1 => files.remove(0).map_err(RagError::from),
                _ => {
                    log::warn!(
                        "{source}: still without vectors: not a readable file (upload it again)"
                    );
                    waiting += 1;
                    continue;
                }
            };
            let stored = match loaded {
                Ok(doc) => self.ingest(doc).await,
                Err(e) => Err(e),
            };
            match stored {
                Ok(_) if self.is_pending(&source).await => waiting += 1,
                Ok(_) => filled += 1,
                Err(e) => {
                    log::warn!("{source}: still without vectors: {e}");
                    waiting += 1;
                }
            }
        }
        self.pending_probe.clear();
        Ok((filled, waiting))
    }

    async fn is_pending(&self, source: &str) -> bool {
        matches!(self.store.document_hash(source).await, Ok(Some(h)) if h.starts_with(PENDING_VECTORS))
    }

    // ----- ask -----------------------------------------------------------------------------

    /// Retrieves passages: lexical always, dense too when an embedding model answers; fused.
    pub async fn retrieve(
        &self,
        question: &str,
        k: usize,
        timings: &mut Timings,
    ) -> Result<Vec<Hit>, RagError> {
        self.retrieve_lists(question, k, Lists::Both, timings).await
    }

    /// [`Rag::retrieve`] from the chosen lists only (the retrieval bench compares them).
    pub async fn retrieve_lists(
        &self,
        question: &str,
        k: usize,
        use_lists: Lists,
        timings: &mut Timings,
    ) -> Result<Vec<Hit>, RagError> {
        let k = k.clamp(1, MAX_TOP_K);
        let started = Instant::now();
        // With a reranker, fusion hands it more documents than are kept.
        let fused_k = match &self.reranker {
            Some(_) => k.max(self.rerank_candidates),
            None => k,
        };
        let depth = rank::candidates(fused_k);
        let language = detect_language(question);
        let mut lists = Vec::new();
        if use_lists != Lists::Dense {
            let mut hits = self.store.lexical_search(question, depth).await?;
            rank::prefer_language(&mut hits, language);
            lists.push(Weighted {
                hits,
                weight: LEXICAL_WEIGHT,
                decay: rank::LEXICAL_DECAY,
            });
        }
        if !self.embedders.is_empty() && use_lists != Lists::Lexical {
            let embed_started = Instant::now();
            match self.embed(&[question.to_string()]).await {
                Ok(mut vectors) if !vectors.is_empty() => {
                    timings.embed_ms = ms(embed_started.elapsed());
                    let vector = vectors.swap_remove(0);
                    let hits = self.store.dense_search(&vector, depth).await?;
                    lists.push(Weighted {
                        hits,
                        weight: self.dense_weight(language, use_lists),
                        decay: rank::DENSE_DECAY,
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    log::warn!("embedding the question failed, using lexical retrieval only: {e}")
                }
            }
        }
        let mut hits = match lists.len() {
            0 => Vec::new(),
            1 => rank::rank_one(&lists[0], fused_k),
            _ => rank::fuse(&lists, fused_k),
        };
        if let Some(reranker) = &self.reranker {
            self.rerank(reranker, question, &mut hits).await;
        }
        hits.truncate(k);
        timings.retrieve_ms = ms(started.elapsed());
        Ok(hits)
    }

    /// Reorders `hits` by the reranker's scores (ties keep the fused order); on any failure
    /// the fused order stays, logged: a reranker that is down costs quality, never an answer.
    async fn rerank(&self, reranker: &Reranker, question: &str, hits: &mut Vec<Hit>) {
        if hits.len() < 2 {
            return;
        }
        let passages: Vec<String> = hits.iter().map(|h| h.text.clone()).collect();
        match reranker.scores(question, &passages).await {
            Ok(scores) => {
                let mut scored: Vec<(usize, f32, Hit)> = hits
                    .drain(..)
                    .zip(scores)
                    .enumerate()
                    .map(|(i, (hit, score))| (i, score, hit))
                    .collect();
                scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                hits.extend(
                    scored
                        .into_iter()
                        .map(|(_, score, hit)| Hit { score, ..hit }),
                );
            }
            Err(e) => log::warn!("reranking failed, keeping the fused order: {e}"),
        }
    }

    /// The dense list's weight in the fusion: full for a language the embedding model was
    /// declared for (`[embed] languages`, empty = every language), none for another.
    fn dense_weight(&self, language: Language, use_lists: Lists) -> f32 {
        let trusted = self.embed_languages.is_empty() || self.embed_languages.contains(&language);
        match (trusted, use_lists) {
            // Asked for alone (the bench), it is what it is.
            (_, Lists::Dense) => 1.0,
            (true, _) => DENSE_WEIGHT,
            (false, _) => 0.0,
        }
    }

    /// Answers a question, sending events into `events`. Stops early (dropping the upstream
    /// generation) as soon as the receiver goes away.
    /// `history`: the earlier turns (already within [`Rag::history_limits`]); with them the
    /// question is searched for in a standalone form and the LLM sees the turns.
    pub async fn ask(
        &self,
        question: &str,
        history: &[Turn],
        top_k: usize,
        events: mpsc::Sender<Event>,
    ) {
        let mut upstream_error = None;
        let started = Instant::now();
        let mut timings = Timings::default();
        let language = detect_language(question);
        let query = if history.is_empty() {
            question.to_string()
        } else {
            let Some((query, by)) = self.standalone(question, history, &events).await else {
                return;
            };
            let event = Event::Standalone {
                query: query.clone(),
                by,
            };
            if events.send(event).await.is_err() {
                return;
            }
            query
        };
        let hits = match self.retrieve(&query, top_k, &mut timings).await {
            Ok(hits) => hits,
            Err(e) => {
                log::error!("retrieval failed: {e}");
                let _ = events
                    .send(Event::Error {
                        message: "the document store is unavailable".into(),
                        backend: self.store.backend_name(),
                    })
                    .await;
                return;
            }
        };
        if events
            .send(Event::Sources(self.sources(&hits)))
            .await
            .is_err()
        {
            return;
        }
        let generate_started = Instant::now();
        let mut truncated = false;
        let mode = match self.generators.first() {
            None => {
                let text = answer::extractive_answer(
                    question,
                    &hits,
                    &self.stems,
                    ExtractiveReason::NoLlm,
                    language,
                );
                let _ = events.send(Event::Token(text)).await;
                Mode::Extractive
            }
            Some(_) if hits.is_empty() => {
                // Nothing to ground an answer on: say so without spending an LLM call.
                let text = answer::nothing_found(language).to_string();
                let _ = events.send(Event::Token(text)).await;
                Mode::Extractive
            }
            Some(generator) => match self
                .generate(
                    question,
                    history,
                    &hits,
                    &events,
                    &mut timings,
                    generate_started,
                )
                .await
            {
                Generation::Finished { cut_off } => {
                    truncated = cut_off;
                    Mode::Generated
                }
                Generation::ReceiverGone => return,
                Generation::FailedMidStream(message) => {
                    let backend = self.llm_backend;
                    let _ = events.send(Event::Error { message, backend }).await;
                    return;
                }
                Generation::Unavailable(e) => {
                    log::warn!("LLM unavailable, answering extractively: {e}");
                    upstream_error = Some(self.llm_backend);
                    let why = match e.missing_model() {
                        Some(model) => ExtractiveReason::ModelMissing {
                            model: model.to_string(),
                            pull: matches!(generator, Generator::Ollama(_)),
                        },
                        None => ExtractiveReason::LlmDown,
                    };
                    // What /health shows until its next model check: only what a failed
                    // answer says for sure about the server (not a one-off timeout).
                    if matches!(e, LlmError::ModelMissing { .. } | LlmError::Connect { .. }) {
                        self.note_llm(Err(e.to_string()));
                    }
                    let text =
                        answer::extractive_answer(question, &hits, &self.stems, why, language);
                    let _ = events.send(Event::Token(text)).await;
                    Mode::Extractive
                }
            },
        };
        timings.generate_ms = ms(generate_started.elapsed());
        timings.total_ms = ms(started.elapsed());
        let _ = events
            .send(Event::Done {
                mode,
                timings,
                upstream_error,
                truncated,
            })
            .await;
    }

    /// One answer from the pool: a place on a backend (waiting in line while all are full),
    /// then its stream. A backend that fails before anything was sent to the client costs
    /// nothing but time: the answer is tried on another one not tried yet. Once a token went
    /// out it cannot be taken back, so a failure after that ends the answer.
    async fn generate(
        &self,
        question: &str,
        history: &[Turn],
        hits: &[Hit],
        events: &mpsc::Sender<Event>,
        timings: &mut Timings,
        started: Instant,
    ) -> Generation {
        let language = detect_language(question);
        let mut messages = vec![ChatMessage {
            role: Role::System,
            content: answer::system_prompt(language),
        }];
        messages.extend(conversation::history_messages(history));
        messages.push(ChatMessage {
            role: Role::User,
            content: answer::user_prompt(question, hits, language),
        });
        let mut tried: u64 = 0;
        let mut last_error = None;
        loop {
            let admission = match &self.gate {
                None => match (0..self.generators.len()).find(|i| tried & (1 << i) == 0) {
                    Some(index) => Admission { gate: None, index },
                    None => break,
                },
                Some(gate) => match wait_in_line(gate.as_ref(), events, tried).await {
                    Line::Admitted(admission) => admission,
                    Line::Unavailable => break,
                    Line::ClientGone => return Generation::ReceiverGone,
                },
            };
            let index = admission.index;
            tried |= 1 << index;
            let generator = &self.generators[index];
            let attempt = self
                .generate_on(generator, &messages, events, timings, started)
                .await;
            if let Some(gate) = &self.gate {
                match &attempt {
                    Attempt::Retry(_) | Attempt::Done(Generation::FailedMidStream(_), false) => {
                        if gate.record(index, false) {
                            log::warn!(
                                "LLM backend {index} ({}) ejected: its breaker is open",
                                generator.url()
                            );
                        }
                    }
                    Attempt::Done(Generation::ReceiverGone, _) => {}
                    Attempt::Done(_, _) => {
                        gate.record(index, true);
                    }
                }
            }
            match attempt {
                Attempt::Done(generation, _) => return generation,
                Attempt::Retry(e) => {
                    log::warn!("LLM backend {index} failed before the first token: {e}");
                    last_error = Some(e);
                }
            }
            drop(admission);
        }
        Generation::Unavailable(last_error.unwrap_or(LlmError::NoBackend))
    }

    /// One try of an answer on one backend.
    async fn generate_on(
        &self,
        generator: &Generator,
        messages: &[ChatMessage],
        events: &mpsc::Sender<Event>,
        timings: &mut Timings,
        started: Instant,
    ) -> Attempt {
        let mut tokens = tokio::select! {
            stream = generator.stream(messages) => match stream {
                Ok(tokens) => tokens,
                Err(e) => return Attempt::Retry(e),
            },
            _ = events.closed() => return Attempt::Done(Generation::ReceiverGone, true),
        };
        // The first token of any kind stops the first-token clock (the client's bound is met
        // by reasoning too); only answer text makes an answer.
        let mut first_seen = false;
        let mut answered = false;
        let mut reasoned = false;
        // Whether anything of this answer reached the client: then it cannot move elsewhere.
        let mut sent = false;
        loop {
            let next = tokio::select! {
                next = tokens.next() => next,
                // The client went away: dropping `tokens` closes the upstream connection.
                _ = events.closed() => return Attempt::Done(Generation::ReceiverGone, true),
            };
            let event = match next {
                // A clean end always says how it finished first; treat a bare end alike.
                None => Chunk::Finished(Finish::Stop),
                Some(Ok(chunk)) => chunk,
                Some(Err(e)) if !sent => return Attempt::Retry(e),
                Some(Err(e)) => {
                    log::warn!("LLM failed mid-answer: {e}");
                    return Attempt::Done(
                        Generation::FailedMidStream(
                            "the language model stopped in the middle of the answer; please ask again"
                                .into(),
                        ),
                        false,
                    );
                }
            };
            if !first_seen && !matches!(event, Chunk::Finished(_)) {
                first_seen = true;
                timings.first_token_ms = Some(ms(started.elapsed()));
                self.note_llm(Ok(()));
            }
            match event {
                Chunk::Reasoning(text) => {
                    reasoned = true;
                    if self.think {
                        sent = true;
                        if events.send(Event::Reasoning(text)).await.is_err() {
                            return Attempt::Done(Generation::ReceiverGone, true);
                        }
                    }
                }
                Chunk::Answer(token) => {
                    answered = true;
                    sent = true;
                    if events.send(Event::Token(token)).await.is_err() {
                        return Attempt::Done(Generation::ReceiverGone, true);
                    }
                }
                Chunk::Finished(finish) if !answered => {
                    let message = no_answer_message(&finish, reasoned, generator.max_tokens());
                    log::warn!("LLM ended without an answer ({finish:?}): {message}");
                    return Attempt::Done(Generation::FailedMidStream(message), true);
                }
                Chunk::Finished(finish) => {
                    if finish == Finish::Length {
                        log::info!("answer cut off at max_tokens = {}", generator.max_tokens());
                    }
                    return Attempt::Done(
                        Generation::Finished {
                            cut_off: finish == Finish::Length,
                        },
                        true,
                    );
                }
            }
        }
    }

    /// The follow-up as a standalone question: the LLM's rewrite when it answers within
    /// `[rag] rewrite_timeout`, else [`conversation::fallback_standalone`]; `None` when the
    /// client went away meanwhile (the rewrite call is dropped with it).
    ///
    /// The rewrite does not wait in the pool's line for a generation (`[llm] max_concurrent`):
    /// it is capped at [`conversation::REWRITE_MAX_TOKENS`] and bounded by the timeout, and
    /// queueing it would put a follow-up in line twice. With a pool it takes a free place on a
    /// backend if there is one right now (so no backend's `max_concurrent` is ever exceeded),
    /// else the fallback is used.
    async fn standalone(
        &self,
        question: &str,
        history: &[Turn],
        events: &mpsc::Sender<Event>,
    ) -> Option<(String, &'static str)> {
        let place = match &self.gate {
            None => self.generators.first().map(|_| Admission {
                gate: None,
                index: 0,
            }),
            Some(gate) => gate.try_take(0).map(|index| Admission {
                gate: Some(gate.as_ref()),
                index,
            }),
        };
        if let Some(place) = &place {
            let generator = &self.generators[place.index];
            let messages = conversation::rewrite_messages(question, history);
            let call = async {
                let mut tokens = generator
                    .stream_short(&messages, conversation::REWRITE_MAX_TOKENS)
                    .await?;
                let mut reply = String::new();
                while let Some(chunk) = tokens.next().await {
                    match chunk? {
                        Chunk::Answer(text) => reply.push_str(&text),
                        Chunk::Reasoning(_) => {}
                        Chunk::Finished(_) => break,
                    }
                }
                Ok::<String, LlmError>(reply)
            };
            let timeout = self.config.rewrite_timeout;
            let outcome = tokio::select! {
                outcome = tokio::time::timeout(timeout, call) => outcome,
                _ = events.closed() => return None,
            };
            match outcome {
                Ok(Ok(reply)) => match conversation::clean_rewrite(&reply) {
                    Some(query) => return Some((query, "llm")),
                    None => log::info!("the LLM's rewrite of a follow-up was unusable"),
                },
                Ok(Err(e)) => log::info!("rewriting a follow-up failed, using the fallback: {e}"),
                Err(_) => {
                    log::info!("rewriting a follow-up took over {timeout:?}, using the fallback")
                }
            }
        }
        Some((
            conversation::fallback_standalone(question, history),
            "fallback",
        ))
    }

    fn sources(&self, hits: &[Hit]) -> Vec<Source> {
        hits.iter()
            .enumerate()
            .map(|(i, hit)| Source {
                n: i + 1,
                document_id: hit.document_id.clone(),
                title: hit.title.clone(),
                source: hit.source.clone(),
                position: hit.position,
                snippet: snippet(&hit.text),
                score: hit.score,
            })
            .collect()
    }

    // ----- health --------------------------------------------------------------------------

    fn note_llm(&self, result: Result<(), String>) {
        self.llm_probe.put(result);
    }

    pub async fn health(&self) -> Health {
        // Monitoring polls /health often: count the store at most once per STORE_STATUS_TTL.
        let counted = self
            .store_probe
            .get_or_refresh(|| async { self.store.probe().await.map_err(|e| e.to_string()) })
            .await;
        let stats = counted.as_ref().ok().copied();
        let store = ComponentHealth::of(counted.map(|_| ()), None);
        let llm = match self.generators.first() {
            None => ComponentHealth {
                status: "none",
                detail: Some("no LLM configured: answers are extractive".into()),
                model: None,
            },
            Some(generator) => {
                let result = self
                    .llm_probe
                    .get_or_refresh(|| async {
                        // Up while any backend of the pool is: the first that answers.
                        let mut first_error = None;
                        for generator in &self.generators {
                            match generator.check_model().await {
                                Ok(()) => return Ok(()),
                                Err(e) => {
                                    first_error.get_or_insert_with(|| e.to_string());
                                }
                            }
                        }
                        Err(first_error.unwrap_or_default())
                    })
                    .await;
                ComponentHealth::of(result, Some(generator.model()))
            }
        };
        let (embed, pending_vectors) = match self.embedders.first() {
            None => (
                ComponentHealth {
                    status: "none",
                    detail: Some("no embedding model configured: lexical retrieval only".into()),
                    model: None,
                },
                None,
            ),
            Some(embedder) => {
                let result = self
                    .embed_probe
                    .get_or_refresh(|| async {
                        // Up while any server of the pool is: the first that answers.
                        let mut first_error = None;
                        for embedder in &self.embedders {
                            match embedder.check_model(EMBED_CHECK_TIMEOUT).await {
                                Ok(()) => return Ok(()),
                                Err(e) => {
                                    first_error.get_or_insert_with(|| e.to_string());
                                }
                            }
                        }
                        Err(first_error.unwrap_or_default())
                    })
                    .await;
                let pending = self.pending_vectors_cached().await;
                (ComponentHealth::of(result, Some(embedder.model())), pending)
            }
        };
        Health {
            store,
            store_backend: self.store.backend_name(),
            stats,
            llm,
            embed,
            pending_vectors,
        }
    }
}

/// A value reused for `ttl` after it was taken, so frequent `/health` polls do not each reach
/// the store or the LLM. One process, one thread: a `RefCell`, never borrowed across an await.
struct TtlCache<T> {
    ttl: Duration,
    last: RefCell<Option<(Instant, T)>>,
}

impl<T: Clone> TtlCache<T> {
    fn new(ttl: Duration) -> TtlCache<T> {
        TtlCache {
            ttl,
            last: RefCell::new(None),
        }
    }

    fn put(&self, value: T) {
        *self.last.borrow_mut() = Some((Instant::now(), value));
    }

    /// Forgets the value: the next read refreshes it.
    fn clear(&self) {
        *self.last.borrow_mut() = None;
    }

    fn fresh(&self) -> Option<T> {
        let last = self.last.borrow();
        last.as_ref()
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, value)| value.clone())
    }

    /// The cached value while fresh, else what `refresh` yields now (then cached).
    async fn get_or_refresh<F: std::future::Future<Output = T>>(
        &self,
        refresh: impl FnOnce() -> F,
    ) -> T {
        if let Some(value) = self.fresh() {
            return value;
        }
        let value = refresh().await;
        self.put(value.clone());
        value
    }
}

/// Where generations may run, shared with other processes (the pool's), provided by the
/// caller: caps, the choice of backend and each backend's circuit breaker. The engine only
/// waits in line, reports its place, says how each try went, and releases when done.
pub trait GenerationGate {
    /// Joins the line; returns a ticket.
    fn enqueue(&self) -> u64;
    /// A place on a backend not in `tried` (a bit per backend index), if one is free now.
    fn try_admit(&self, tried: u64) -> Admit;
    /// A free place now, without waiting in line (then `release` it), for a short call.
    fn try_take(&self, tried: u64) -> Option<usize>;
    /// The ticket's place in line, 1 = next.
    fn position(&self, ticket: u64) -> u64;
    /// Leaves the line without starting.
    fn abandon(&self);
    /// Gives back the place on `backend`.
    fn release(&self, backend: usize);
    /// How a try on `backend` went; true when this failure ejected it (opened its breaker).
    fn record(&self, backend: usize, ok: bool) -> bool;
    /// Whether this process should health-probe the ejected `backend` now.
    fn claim_probe(&self, backend: usize) -> bool;
    /// The health probe of `backend` passed: answers may try it again.
    fn probe_passed(&self, backend: usize);
}

/// What a [`GenerationGate`] says to an answer asking for a place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Generate on this backend.
    Backend(usize),
    /// All usable backends are busy: wait.
    Full,
    /// None can take it (ejected, or tried already): answer without the LLM.
    Unavailable,
}

/// How often a waiting answer checks for a free place.
const GATE_POLL: Duration = Duration::from_millis(50);
/// How often a worker looks for ejected backends due for a health probe.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// A place on backend `index`, given back when the try ends, however it ends.
struct Admission<'a> {
    gate: Option<&'a dyn GenerationGate>,
    index: usize,
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if let Some(gate) = self.gate {
            gate.release(self.index);
        }
    }
}

/// How waiting in line ended.
enum Line<'a> {
    Admitted(Admission<'a>),
    /// No backend can take the answer.
    Unavailable,
    /// The client left first.
    ClientGone,
}

/// Waits for a place on a backend not in `tried`, telling the client its position.
async fn wait_in_line<'a>(
    gate: &'a dyn GenerationGate,
    events: &mpsc::Sender<Event>,
    tried: u64,
) -> Line<'a> {
    let ticket = gate.enqueue();
    let mut told = 0;
    loop {
        match gate.try_admit(tried) {
            Admit::Backend(index) => {
                return Line::Admitted(Admission {
                    gate: Some(gate),
                    index,
                })
            }
            Admit::Unavailable => {
                gate.abandon();
                return Line::Unavailable;
            }
            Admit::Full => {}
        }
        let position = gate.position(ticket);
        if position != told {
            told = position;
            if events.send(Event::Queued { position }).await.is_err() {
                gate.abandon();
                return Line::ClientGone;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(GATE_POLL) => {}
            _ = events.closed() => {
                gate.abandon();
                return Line::ClientGone;
            }
        }
    }
}

/// One try on one backend: done (and whether the backend did its part), or failed before
/// anything reached the client, so another backend may try.
enum Attempt {
    Done(Generation, bool),
    Retry(LlmError),
}

enum Generation {
    /// An answer; `cut_off` when the token budget ran out.
    Finished {
        cut_off: bool,
    },
    ReceiverGone,
    FailedMidStream(String),
    Unavailable(LlmError),
}

/// What the user reads when the model ended cleanly without a word of answer.
fn no_answer_message(finish: &Finish, reasoned: bool, max_tokens: u32) -> String {
    match (finish, reasoned) {
        (Finish::Length, true) => format!(
            "the language model spent its whole budget of {max_tokens} tokens thinking and gave \
             no answer; please ask again (the operator can raise [llm] max_tokens or set [llm] think = false)"
        ),
        (Finish::Length, false) => format!(
            "the language model's budget of {max_tokens} tokens ran out before it answered; \
             please ask again (the operator can raise [llm] max_tokens)"
        ),
        (Finish::Other(reason), _) => format!(
            "the language model stopped without an answer ({reason}); please ask again"
        ),
        (Finish::Stop, _) => "the language model gave an empty answer; please ask again".into(),
    }
}

fn snippet(text: &str) -> String {
    // A chunk often starts with its Markdown heading; the title is shown beside it anyway.
    let text = text.trim().trim_start_matches('#').trim_start();
    if text.chars().count() <= SNIPPET_CHARS {
        return text.to_string();
    }
    text.chars().take(SNIPPET_CHARS).collect::<String>() + "…"
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 10.0).round() / 10.0
}

/// The sandbox's limits from `[rag] extract_*`; the stack is a fixed 8 MiB (what a thread gets
/// by default, and far more than any sane document's nesting needs).
pub fn extract_limits(config: &crate::config::RagConfig) -> ingest::Limits {
    ingest::Limits {
        memory: config.extract_memory,
        cpu: config.extract_cpu,
        timeout: config.extract_timeout,
        max_text: config.extract_max_text,
        ..ingest::Limits::default()
    }
}

impl Rag {
    /// On a fresh install, ingests the operator's manual from `docs_dir` so the first question
    /// already has answers. Once in a store's life: the store records that it ran, so deleting
    /// the documents does not bring them back. One process does it: the one that takes the lock.
    ///
    /// On a later start, the same process fills in the vectors of documents stored without
    /// them (see [`Rag::fill_missing_vectors`]).
    pub async fn ingest_docs_on_first_run(&self, config: &Config) {
        if self.ingest_manual_if_empty(config).await {
            return;
        }
        if !matches!(self.pending_vectors().await, Ok(n) if n > 0) {
            return;
        }
        let Some(_lock) = FirstRunLock::try_take(&config.store.path) else {
            return;
        };
        match self.fill_missing_vectors().await {
            Ok((filled, waiting)) => log::info!(
                "start: filled in the vectors of {filled} documents ({waiting} still without)"
            ),
            Err(e) => log::warn!("start: cannot fill in missing vectors: {e}"),
        }
    }

    /// The first-run ingest; true when it ran (this process took the lock on an empty store).
    async fn ingest_manual_if_empty(&self, config: &Config) -> bool {
        let docs = &self.config.docs_dir;
        if !self.config.ingest_docs_on_first_run || !docs.is_dir() {
            return false;
        }
        if !self.first_run_pending().await {
            return false;
        }
        let Some(_lock) = FirstRunLock::try_take(&config.store.path) else {
            return false;
        };
        // Another process may have finished while we waited for nothing: look again.
        if !self.first_run_pending().await {
            return false;
        }
        let tally = match self
            .ingest_path(docs.clone(), |step| {
                if let Some(error) = step.error() {
                    log::warn!("first run: {error}");
                }
            })
            .await
        {
            Ok(tally) => tally,
            Err(e) => {
                log::warn!("first run: cannot read {}: {e}", docs.display());
                return false;
            }
        };
        let (stored, failed) = (tally.stored(), tally.failed);
        if let Err(e) = self.store.mark_first_run_done().await {
            log::warn!("first run: cannot record that it ran (it may run again): {e}");
        }
        log::info!(
            "first run: ingested {stored} documents from {} ({failed} failed)",
            docs.display()
        );
        true
    }

    /// True only for a store whose first run never happened: not marked done, and empty. A
    /// store from before the mark existed that holds documents is marked done here, so
    /// deleting them all later never brings the manual back.
    async fn first_run_pending(&self) -> bool {
        match self.store.first_run_done().await {
            Ok(true) => return false,
            Ok(false) => {}
            Err(e) => {
                log::warn!("first run: cannot read the store's first-run mark: {e}");
                return false;
            }
        }
        match self.store.stats().await {
            Ok(stats) if stats.documents == 0 => true,
            Ok(_) => {
                if let Err(e) = self.store.mark_first_run_done().await {
                    log::warn!("first run: cannot record that the store is in use: {e}");
                }
                false
            }
            Err(e) => {
                log::warn!("first run: cannot count the stored documents: {e}");
                false
            }
        }
    }
}

/// An exclusive, non-blocking `flock` on `<data dir>/.first-run.lock`, held (by owning the file)
/// until dropped.
struct FirstRunLock(#[allow(dead_code)] std::fs::File);

impl FirstRunLock {
    fn try_take(dir: &std::path::Path) -> Option<FirstRunLock> {
        use std::os::fd::AsRawFd;
        std::fs::create_dir_all(dir).ok()?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".first-run.lock"))
            .ok()?;
        // SAFETY: flock on an fd we own; no memory is involved.
        let taken = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        taken.then_some(FirstRunLock(file))
    }
}
