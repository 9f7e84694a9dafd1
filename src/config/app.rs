//! The app's tables of `workers.toml`: `[store]`, `[embed]`, `[llm]`, `[rag]`, validated.
//!
//! Defaults need no set-up: an embedded store under `./data`, no embedding model (lexical
//! retrieval), Ollama at 127.0.0.1:11434 with an extractive answer whenever it is unreachable.
//! The keys, their defaults and ranges are declared in [`super::keys`]; this module turns their
//! checked values into the app's types and checks what spans keys (`chunk_overlap` < `chunk_size`).

use std::path::PathBuf;
use std::time::Duration;

use super::error::ConfigError;
use super::keys::*;
use super::sources::Values;

/// A language of documents and questions: the app's prompts and UI speak these two. Declared
/// here, on the config's floor, because `[embed] languages` names them; the app uses it as
/// `rag::text::Language`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    English,
    Russian,
}

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
    /// Qdrant gRPC URLs: one server, or nodes of one cluster (any of them serves every
    /// request; the next is tried when one does not answer).
    pub urls: Vec<String>,
    pub collection: String,
    pub api_key: Option<String>,
    pub distance: Distance,
    /// Embedded store: threads (each with one SQLite connection) per process; calls beyond
    /// them wait in line.
    pub threads: usize,
    /// For a collection ragpool creates: shards (0 = Qdrant's default, one per node),
    /// copies of each shard, and how many copies must apply a write before it succeeds.
    pub shard_number: usize,
    pub replication_factor: usize,
    pub write_consistency_factor: usize,
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
    /// Base URL, e.g. `http://127.0.0.1:11434`: the first of `urls`.
    pub url: String,
    /// Every embedding server, in config order: the same model on each (their vectors must
    /// agree), so a call may go to any of them.
    pub urls: Vec<String>,
    pub model: String,
    pub api_key: Option<String>,
    /// Expected vector size; 0 = take it from the first response. When set, it is also asked
    /// of the server (`dimensions`), so a model that can shorten its vectors does.
    pub dimensions: usize,
    pub timeout: Duration,
    /// Sent to Ollama with each request; `None` = the server's own default.
    pub keep_alive: Option<KeepAlive>,
    /// Question languages the model is trusted for; empty = every language.
    pub languages: Vec<Language>,
}

/// How long Ollama keeps a model loaded after a request (its `keep_alive`), so an idle
/// model's reload does not land on the next question.
#[derive(Debug, Clone, PartialEq)]
pub enum KeepAlive {
    /// Seconds; negative = keep it loaded.
    Seconds(i64),
    /// A Go duration as Ollama parses it: `"30m"`, `"1h30m"`, `"-1m"`.
    Duration(String),
}

impl KeepAlive {
    /// As Ollama reads it: a number of seconds or a duration string.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            KeepAlive::Seconds(s) => serde_json::Value::from(*s),
            KeepAlive::Duration(d) => serde_json::Value::from(d.as_str()),
        }
    }
}

/// The default `keep_alive`: longer than Ollama's 5 minutes, so a model stays warm between
/// the questions of a working day's quiet spells.
pub const KEEP_ALIVE: &str = "30m";

/// One LLM server of a pool: a `[[llm.backend]]` table, or one URL of `[llm] url`.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmBackend {
    /// Never [`Provider::None`]: a pool only holds servers.
    pub provider: Provider,
    /// Base URL without a trailing slash.
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    /// Answers it may generate at once across the pool (its `OLLAMA_NUM_PARALLEL`); 0 = no cap
    /// of its own (only `[llm] max_concurrent`).
    pub max_concurrent: usize,
}

/// Most backends of one pool: each has a fixed set of cells in the shared scoreboard.
pub const MAX_LLM_BACKENDS: usize = 16;

/// `[rerank]`: an optional reranking stage after fusion.
#[derive(Debug, Clone, PartialEq)]
pub struct RerankConfig {
    /// Base URL of a `/v1/rerank` server; `None` = no reranking.
    pub url: Option<String>,
    pub model: String,
    pub api_key: Option<String>,
    /// Fused documents handed to the reranker.
    pub candidates: usize,
    /// Bound on one rerank request.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LlmConfig {
    /// The first backend's (`[llm] provider`, or `None`: extractive answers only).
    pub provider: Provider,
    /// The first backend's URL, model and key: what a single-server setup reads.
    pub url: String,
    pub model: String,
    pub api_key: Option<String>,
    /// Every server answers may go to, in config order; empty when `provider = "none"`.
    pub backends: Vec<LlmBackend>,
    /// Consecutive failures of one backend that open its breaker, and how long it stays open
    /// before a health probe may close it.
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
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
    /// Whether a thinking model may think (Ollama's `think`). Off by default (`"think": false`
    /// is sent, which models that cannot think accept too); on, the reasoning is streamed to
    /// the page apart from the answer. Either way reasoning never counts as answer text.
    pub think: bool,
    pub keep_alive: Option<KeepAlive>,
    /// Repetition control, so a small model does not loop until `max_tokens`: Ollama's
    /// `repeat_penalty` (also read by llama.cpp's and vLLM's `/v1`); 1.0 = off, not sent.
    pub repeat_penalty: f64,
    /// Both APIs' `frequency_penalty`; 0 = off, not sent.
    pub frequency_penalty: f64,
    /// Both APIs' `stop` strings; empty = not sent.
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RagConfig {
    /// Target chunk size in characters.
    pub chunk_size: usize,
    pub chunk_overlap: usize,
    /// Passages retrieved per question (a request may ask for fewer or more, up to 50).
    pub top_k: usize,
    pub max_question_chars: usize,
    /// Most earlier turns a question may carry.
    pub max_history_turns: usize,
    /// Most characters of those turns together.
    pub max_history_chars: usize,
    /// Bound on the LLM call that rewrites a follow-up for retrieval.
    pub rewrite_timeout: Duration,
    /// Ingested once in a store's life, on the first `ragpool serve` with a fresh store.
    pub docs_dir: PathBuf,
    pub ingest_docs_on_first_run: bool,
    /// Wall-clock deadline of one HTML/PDF parse in its helper process.
    pub extract_timeout: Duration,
    /// CPU time a parse may use (`RLIMIT_CPU` of the helper).
    pub extract_cpu: Duration,
    /// Address space of the helper, bytes (`RLIMIT_AS`; configured in MiB).
    pub extract_memory: u64,
    /// Longest text extracted from one document, bytes (configured in MiB).
    pub extract_max_text: usize,
}

pub const OLLAMA_URL: &str = "http://127.0.0.1:11434";
pub const QDRANT_URL: &str = "http://127.0.0.1:6334";
pub const MAX_TOP_K: usize = 50;

fn provider(v: &Values, key: &Key) -> Provider {
    match v.text(key) {
        "ollama" => Provider::Ollama,
        "openai" => Provider::OpenAi,
        _ => Provider::None,
    }
}

/// `keep_alive`: `""` = not sent; a whole number = seconds (sent as a number, as Ollama reads
/// `-1`); else a Go duration (`"30m"`, `"1h30m"`).
fn keep_alive(v: &Values, key: &Key) -> Result<Option<KeepAlive>, ConfigError> {
    let text = v.text(key).trim();
    if text.is_empty() {
        return Ok(None);
    }
    if let Ok(seconds) = text.parse::<i64>() {
        return Ok(Some(KeepAlive::Seconds(seconds)));
    }
    if is_go_duration(text) {
        return Ok(Some(KeepAlive::Duration(text.to_string())));
    }
    Err(v.invalid(
        key,
        format!("\"{text}\" is not a duration like \"30m\" or \"1h\", nor seconds (\"-1\" = keep loaded)"),
    ))
}

/// `-?(number unit)+` with Go's units (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`).
fn is_go_duration(text: &str) -> bool {
    let mut rest = text.strip_prefix('-').unwrap_or(text);
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 || rest[..digits].parse::<f64>().is_err() {
            return false;
        }
        rest = &rest[digits..];
        match ["ns", "us", "µs", "ms", "s", "m", "h"]
            .iter()
            .find(|u| rest.starts_with(**u))
        {
            Some(unit) => rest = &rest[unit.len()..],
            None => return false,
        }
    }
    true
}

/// The Qdrant URLs: at least one, each http(s).
fn qdrant_urls(v: &Values) -> Result<Vec<String>, ConfigError> {
    let urls: Vec<&String> = v
        .list(&STORE_URL)
        .iter()
        .filter(|u| !u.trim().is_empty())
        .collect();
    if urls.is_empty() {
        return Err(v.invalid(&STORE_URL, "the list of Qdrant URLs is empty"));
    }
    urls.into_iter()
        .map(|u| {
            let u = u.trim();
            if u.starts_with("http://") || u.starts_with("https://") {
                Ok(u.trim_end_matches('/').to_string())
            } else {
                Err(v.invalid(
                    &STORE_URL,
                    format!("\"{u}\" must start with http:// or https://"),
                ))
            }
        })
        .collect()
}

pub(super) fn store(v: &Values) -> Result<StoreConfig, ConfigError> {
    let replication_factor = v.int(&STORE_REPLICATION_FACTOR) as usize;
    let write_consistency_factor = v.int(&STORE_WRITE_CONSISTENCY_FACTOR) as usize;
    if write_consistency_factor > replication_factor {
        return Err(v.invalid(
            &STORE_WRITE_CONSISTENCY_FACTOR,
            format!(
                "{write_consistency_factor} is more than replication_factor \
                 ({replication_factor}): no write could ever succeed"
            ),
        ));
    }
    Ok(StoreConfig {
        backend: match v.text(&STORE_BACKEND) {
            "qdrant" => StoreBackend::Qdrant,
            _ => StoreBackend::Embedded,
        },
        path: PathBuf::from(v.text_or_default(&STORE_PATH)),
        urls: qdrant_urls(v)?,
        collection: v.text_or_default(&STORE_COLLECTION),
        api_key: v.optional(&STORE_API_KEY),
        distance: match v.text(&STORE_DISTANCE) {
            "dot" => Distance::Dot,
            "euclid" => Distance::Euclid,
            _ => Distance::Cosine,
        },
        threads: match v.int(&STORE_THREADS) {
            0 => default_store_threads(),
            n => n as usize,
        },
        shard_number: v.int(&STORE_SHARD_NUMBER) as usize,
        replication_factor,
        write_consistency_factor,
    })
}

/// `[store] threads = 0`: one per CPU this process may use, at most 2 (SQLite queries are
/// short; more threads buy little on a small box and each costs a connection).
pub fn default_store_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 2)
}

pub(super) fn embed(v: &Values) -> Result<EmbedConfig, ConfigError> {
    let urls = v
        .list(&EMBED_URL)
        .iter()
        .filter(|u| !u.trim().is_empty())
        .map(|u| checked_url(v, &EMBED_URL, u))
        .collect::<Result<Vec<_>, _>>()?;
    if urls.is_empty() {
        return Err(v.invalid(&EMBED_URL, "the list of embedding servers is empty"));
    }
    if urls.len() > MAX_LLM_BACKENDS {
        return Err(v.invalid(
            &EMBED_URL,
            format!(
                "{} embedding servers; at most {MAX_LLM_BACKENDS}",
                urls.len()
            ),
        ));
    }
    Ok(EmbedConfig {
        provider: provider(v, &EMBED_PROVIDER),
        url: urls
            .first()
            .cloned()
            .unwrap_or_else(|| OLLAMA_URL.to_string()),
        urls,
        model: v.text_or_default(&EMBED_MODEL),
        api_key: v.optional(&EMBED_API_KEY),
        dimensions: v.int(&EMBED_DIMENSIONS) as usize,
        timeout: v.seconds(&EMBED_TIMEOUT),
        keep_alive: keep_alive(v, &EMBED_KEEP_ALIVE)?,
        languages: languages(v, &EMBED_LANGUAGES)?,
    })
}

/// One http(s) base URL, trimmed of its trailing slash.
fn checked_url(v: &Values, key: &Key, u: &str) -> Result<String, ConfigError> {
    let u = u.trim();
    if !(u.starts_with("http://") || u.starts_with("https://")) {
        return Err(v.invalid(key, format!("\"{u}\" must start with http:// or https://")));
    }
    Ok(u.trim_end_matches('/').to_string())
}

/// The pool: the `[[llm.backend]]` tables when there are any (each inheriting what it leaves
/// out from `[llm]`), else one backend per `[llm] url`.
fn llm_backends(v: &Values) -> Result<Vec<LlmBackend>, ConfigError> {
    let provider = provider(v, &LLM_PROVIDER);
    let model = v.text_or_default(&LLM_MODEL);
    let api_key = v.optional(&LLM_API_KEY);
    let tables: Vec<&Values> = v.array(LLM_BACKEND_URL.table).collect();
    let backends: Vec<LlmBackend> = if tables.is_empty() {
        if provider == Provider::None {
            return Ok(Vec::new());
        }
        let urls: Vec<&String> = v
            .list(&LLM_URL)
            .iter()
            .filter(|u| !u.trim().is_empty())
            .collect();
        if urls.is_empty() {
            return Err(v.invalid(&LLM_URL, "the list of LLM servers is empty"));
        }
        urls.into_iter()
            .map(|u| {
                Ok(LlmBackend {
                    provider,
                    url: checked_url(v, &LLM_URL, u)?,
                    model: model.clone(),
                    api_key: api_key.clone(),
                    max_concurrent: 0,
                })
            })
            .collect::<Result<_, ConfigError>>()?
    } else {
        let mut backends = Vec::with_capacity(tables.len());
        for t in tables {
            let Some(u) = t.optional(&LLM_BACKEND_URL) else {
                return Err(t.invalid(&LLM_BACKEND_URL, "every [[llm.backend]] needs a url"));
            };
            let provider = match t.text(&LLM_BACKEND_PROVIDER) {
                "ollama" => Provider::Ollama,
                "openai" => Provider::OpenAi,
                _ if provider == Provider::None => Provider::Ollama,
                _ => provider,
            };
            backends.push(LlmBackend {
                provider,
                url: checked_url(t, &LLM_BACKEND_URL, &u)?,
                model: t
                    .optional(&LLM_BACKEND_MODEL)
                    .unwrap_or_else(|| model.clone()),
                api_key: t.optional(&LLM_BACKEND_API_KEY).or_else(|| api_key.clone()),
                max_concurrent: t.int(&LLM_BACKEND_MAX_CONCURRENT) as usize,
            });
        }
        backends
    };
    if backends.len() > MAX_LLM_BACKENDS {
        return Err(v.invalid(
            &LLM_URL,
            format!(
                "{} LLM servers; a pool takes at most {MAX_LLM_BACKENDS}",
                backends.len()
            ),
        ));
    }
    Ok(backends)
}

/// `["en", "ru"]` -> languages; anything else is refused, naming what is known.
fn languages(v: &Values, key: &Key) -> Result<Vec<Language>, ConfigError> {
    let mut out = Vec::new();
    for name in v.list(key) {
        let language = match name.trim().to_lowercase().as_str() {
            "en" | "english" => Language::English,
            "ru" | "russian" => Language::Russian,
            other => {
                return Err(v.invalid(
                    key,
                    format!("{other:?} is not a language ragpool knows (\"en\", \"ru\")"),
                ))
            }
        };
        if !out.contains(&language) {
            out.push(language);
        }
    }
    Ok(out)
}

pub(super) fn llm(v: &Values) -> Result<LlmConfig, ConfigError> {
    let backends = llm_backends(v)?;
    let first = backends.first();
    Ok(LlmConfig {
        provider: first.map_or(Provider::None, |b| b.provider),
        url: match first {
            Some(b) => b.url.clone(),
            None => checked_url(
                v,
                &LLM_URL,
                v.list(&LLM_URL).first().map_or(OLLAMA_URL, |u| u),
            )?,
        },
        model: first.map_or_else(|| v.text_or_default(&LLM_MODEL), |b| b.model.clone()),
        api_key: first.map_or_else(|| v.optional(&LLM_API_KEY), |b| b.api_key.clone()),
        breaker_failures: v.int(&LLM_BREAKER_FAILURES) as u32,
        breaker_cooldown: v.seconds(&LLM_BREAKER_COOLDOWN),
        backends,
        timeout: v.seconds(&LLM_TIMEOUT),
        connect_timeout: v.seconds(&LLM_CONNECT_TIMEOUT),
        first_token_timeout: v.seconds(&LLM_FIRST_TOKEN_TIMEOUT),
        temperature: v.float(&LLM_TEMPERATURE),
        max_tokens: v.int(&LLM_MAX_TOKENS) as u32,
        max_concurrent: v.int(&LLM_MAX_CONCURRENT) as usize,
        think: v.flag(&LLM_THINK),
        keep_alive: keep_alive(v, &LLM_KEEP_ALIVE)?,
        repeat_penalty: v.float(&LLM_REPEAT_PENALTY),
        frequency_penalty: v.float(&LLM_FREQUENCY_PENALTY),
        stop: v
            .list(&LLM_STOP)
            .iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect(),
    })
}

pub(super) fn rerank(v: &Values) -> Result<RerankConfig, ConfigError> {
    let url = match v.text(&RERANK_URL).trim() {
        "" => None,
        u => Some(checked_url(v, &RERANK_URL, u)?),
    };
    Ok(RerankConfig {
        url,
        model: v.text_or_default(&RERANK_MODEL),
        api_key: v.optional(&RERANK_API_KEY),
        candidates: v.int(&RERANK_CANDIDATES) as usize,
        timeout: v.seconds(&RERANK_TIMEOUT),
    })
}

pub(super) fn rag(v: &Values) -> Result<RagConfig, ConfigError> {
    let chunk_size = v.int(&RAG_CHUNK_SIZE) as usize;
    let chunk_overlap = v.int(&RAG_CHUNK_OVERLAP) as usize;
    if chunk_overlap >= chunk_size {
        return Err(v.invalid(
            &RAG_CHUNK_OVERLAP,
            format!("{chunk_overlap} must be smaller than chunk_size ({chunk_size})"),
        ));
    }
    Ok(RagConfig {
        chunk_size,
        chunk_overlap,
        top_k: v.int(&RAG_TOP_K) as usize,
        max_question_chars: v.int(&RAG_MAX_QUESTION_CHARS) as usize,
        max_history_turns: v.int(&RAG_MAX_HISTORY_TURNS) as usize,
        max_history_chars: v.int(&RAG_MAX_HISTORY_CHARS) as usize,
        rewrite_timeout: v.seconds(&RAG_REWRITE_TIMEOUT),
        docs_dir: PathBuf::from(v.text_or_default(&RAG_DOCS_DIR)),
        ingest_docs_on_first_run: v.flag(&RAG_INGEST_DOCS_ON_FIRST_RUN),
        extract_timeout: v.seconds(&RAG_EXTRACT_TIMEOUT),
        extract_cpu: v.seconds(&RAG_EXTRACT_CPU),
        extract_memory: v.int(&RAG_EXTRACT_MEMORY) as u64 * 1024 * 1024,
        extract_max_text: v.int(&RAG_EXTRACT_MAX_TEXT) as usize * 1024 * 1024,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(doc: &str) -> Result<crate::config::Config, ConfigError> {
        crate::config::from_toml_str(doc, std::path::Path::new("workers.toml"))
    }

    #[test]
    fn think_is_off_and_keep_alive_is_30m_unless_set() {
        let c = parse("workers = 1\n").expect("valid");
        assert!(!c.llm.think);
        assert_eq!(c.llm.keep_alive, Some(KeepAlive::Duration("30m".into())));
        assert_eq!(c.embed.keep_alive, Some(KeepAlive::Duration("30m".into())));
        let c = parse("[llm]\nthink = true\nkeep_alive = \"-1\"\n[embed]\nkeep_alive = \"\"\n")
            .expect("valid");
        assert!(c.llm.think);
        assert_eq!(c.llm.keep_alive, Some(KeepAlive::Seconds(-1)));
        assert_eq!(c.embed.keep_alive, None);
        let err = parse("[llm]\nkeep_alive = \"forever\"\n").expect_err("not a duration");
        let text = err.to_string();
        assert!(
            text.contains("workers.toml:2") && text.contains("keep_alive"),
            "{text}"
        );
    }

    #[test]
    fn keep_alive_durations_are_go_durations() {
        for ok in ["30m", "1h30m", "-1m", "1.5h", "500ms", "0s"] {
            assert!(is_go_duration(ok), "{ok}");
        }
        for bad in ["forever", "30 m", "m", "1d", "-", "", "5"] {
            assert!(!is_go_duration(bad), "{bad}");
        }
    }
}
