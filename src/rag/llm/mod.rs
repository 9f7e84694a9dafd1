//! Clients for embedding and generation servers over two wire protocols: Ollama's native API
//! and the OpenAI-compatible one (llama.cpp, vLLM, LM Studio).
//!
//! Owns the HTTP side of the app's model calls: request shapes, incremental stream decoding,
//! timeouts, and one error type that tells "the model server is down" from everything else.
//! It must not decide what an error means to a user (that is `http`'s job) and knows nothing
//! about prompts or retrieval.
//!
//! # Layout
//!
//! - [`Embedder`] (`embed.rs`): texts in, vectors out, batched.
//! - [`Generator`] (`generate.rs`): chat messages in, a [`TokenStream`] of [`Chunk`]s out
//!   (answer, reasoning, how it finished); `check_model` for `/health`.
//! - [`Reranker`] (`rerank.rs`): a question and passages in, relevance scores out.
//! - `models.rs`: whether a server has the configured model (`/api/tags`, `/v1/models`).
//! - `lines.rs`: bytes -> lines across arbitrary chunk boundaries (CR, LF, CRLF).
//! - `ndjson.rs` / `sse.rs`: Ollama's NDJSON and OpenAI's server-sent events -> [`ChatEvent`]s.
//!
//! # After fork only
//!
//! Every client here is built inside a worker, after fork, and lives on that worker's tokio
//! `current_thread` runtime: streams are `!Send` on purpose. A `reqwest::Client` owns a
//! connection pool and may start a blocking thread for DNS; it must never be built in the
//! master or carried across a fork.

#[cfg(test)]
mod decode_tests;
mod embed;
mod generate;
mod lines;
mod models;
mod ndjson;
mod rerank;
mod sse;

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

use serde::Serialize;

pub use embed::Embedder;
pub use generate::Generator;
pub use rerank::Reranker;

/// The pieces of one generation, in order: [`Chunk::Reasoning`] and [`Chunk::Answer`] as they
/// come, then [`Chunk::Finished`] as the last item of a clean end; an `Err` is the last item
/// otherwise.
///
/// Dropping it drops the HTTP response and closes the connection, which is how a client that
/// went away cancels the upstream generation.
pub type TokenStream = Pin<Box<dyn futures_util::Stream<Item = Result<Chunk, LlmError>>>>;

/// One item of a [`TokenStream`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// A non-empty piece of the answer (`message.content`, `delta.content`).
    Answer(String),
    /// A non-empty piece of the model's reasoning before (or beside) the answer: Ollama's
    /// `message.thinking`, OpenAI-compatible servers' `delta.reasoning_content` (llama.cpp,
    /// vLLM, DeepSeek) or `delta.reasoning`. Never part of the answer.
    Reasoning(String),
    /// The server said the generation is complete, and why it stopped.
    Finished(Finish),
}

/// Why the server stopped generating (`done_reason` / `finish_reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// The model ended its answer (`"stop"`, or no reason given).
    Stop,
    /// The token budget ran out (`max_tokens` / `num_predict`): the answer is cut off.
    Length,
    /// Any other reason the server gave (`"content_filter"`, `"tool_calls"`, ...).
    Other(String),
}

impl Finish {
    /// From the wire: `None` (older servers say nothing) is a normal stop.
    pub(crate) fn from_reason(reason: Option<&str>) -> Finish {
        match reason {
            None | Some("") | Some("stop") | Some("eos") => Finish::Stop,
            Some("length") => Finish::Length,
            Some(other) => Finish::Other(other.to_string()),
        }
    }
}

/// Which bound ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    /// `[llm] first_token_timeout`: no token (nor response headers) in time.
    FirstToken,
    /// `[llm] timeout`: the whole generation took too long.
    Generation,
    /// `[embed] timeout`: one embedding request took too long.
    Embedding,
    /// `[llm] connect_timeout` used as the bound of a model check (a reachability probe).
    Ping,
    /// `[rerank] timeout`: one rerank request took too long.
    Rerank,
}

impl fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutKind::FirstToken => "first token",
            TimeoutKind::Generation => "generation",
            TimeoutKind::Embedding => "embedding request",
            TimeoutKind::Ping => "ping",
            TimeoutKind::Rerank => "rerank request",
        })
    }
}

/// What went wrong talking to a model server. Messages name the URL for the error log; `http`
/// must not pass them on to clients.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    /// Nothing listening, refused, unroutable, or the TCP connect timed out.
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    /// A bound from config ran out.
    #[error("{kind} timed out after {after:?} ({url})")]
    Timeout {
        url: String,
        kind: TimeoutKind,
        after: Duration,
    },
    /// The server answered with a non-2xx status.
    #[error("{url} answered HTTP {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    /// The connection broke while a response was being read.
    #[error("connection to {url} broke: {reason}")]
    Transport { url: String, reason: String },
    /// A response we cannot read: bad JSON, a truncated stream, missing fields.
    #[error("malformed response from {url}: {reason}")]
    Protocol { url: String, reason: String },
    /// The server reported an error inside a 200 response (an `{"error": ...}` stream event).
    #[error("{url} reported an error: {message}")]
    Upstream { url: String, message: String },
    /// Vectors of the wrong size: the embedding model does not match `[embed] dimensions`.
    #[error("embedding model {model} returned {got}-dimensional vectors, expected {expected}")]
    Dimensions {
        model: String,
        expected: usize,
        got: usize,
    },
    /// Every LLM backend of the pool is ejected (its circuit breaker open) or was tried.
    #[error("no LLM backend can take the answer: every one is ejected or failed")]
    NoBackend,
    /// The client cannot be built from this configuration.
    #[error("cannot use {url}: {reason}")]
    Config { url: String, reason: String },
    /// The server runs but does not have the configured model (Ollama's 404 "model 'x' not
    /// found", a model missing from `/api/tags` or `/v1/models`). The message says what to do
    /// and is fit to show an operator: "model llama3.2 is not pulled: ollama pull llama3.2".
    #[error("{message}")]
    ModelMissing {
        url: String,
        model: String,
        message: String,
    },
}

impl LlmError {
    /// Whether this means "the model server is down or overloaded" (unreachable, too slow,
    /// 429 or 5xx, connection lost), as opposed to a misconfiguration (4xx: wrong model,
    /// bad key) or a server speaking a protocol we do not understand.
    pub fn is_unavailable(&self) -> bool {
        match self {
            LlmError::Connect { .. }
            | LlmError::Timeout { .. }
            | LlmError::Transport { .. }
            | LlmError::NoBackend => true,
            LlmError::Status { status, .. } => *status == 429 || *status >= 500,
            LlmError::Protocol { .. }
            | LlmError::Upstream { .. }
            | LlmError::Dimensions { .. }
            | LlmError::Config { .. }
            | LlmError::ModelMissing { .. } => false,
        }
    }

    /// An Ollama server without `model`.
    pub(crate) fn not_pulled(url: &str, model: &str) -> LlmError {
        LlmError::ModelMissing {
            url: url.to_string(),
            model: model.to_string(),
            message: format!("model {model} is not pulled: ollama pull {model}"),
        }
    }

    /// An OpenAI-compatible server that does not serve `model`; `served` are the ids it lists
    /// (empty when it only answered 404).
    pub(crate) fn not_served(url: &str, model: &str, served: &[String]) -> LlmError {
        let listed = if served.is_empty() {
            String::new()
        } else {
            format!(" (it serves {})", served.join(", "))
        };
        LlmError::ModelMissing {
            url: url.to_string(),
            model: model.to_string(),
            message: format!("model {model} is not served by {}{listed}", base_of(url)),
        }
    }

    /// The model this error says is missing, if it says so.
    pub fn missing_model(&self) -> Option<&str> {
        match self {
            LlmError::ModelMissing { model, .. } => Some(model),
            _ => None,
        }
    }
}

/// `http://host:port` of a URL, for messages.
fn base_of(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    match url[after_scheme..].find('/') {
        Some(i) => &url[..after_scheme + i],
        None => url,
    }
}

/// A model name as Ollama resolves it: lower case, the default registry and namespace left
/// out, `:latest` when no tag is given (`llama3.2` is `llama3.2:latest` in `/api/tags`).
pub(crate) fn ollama_model_name(name: &str) -> String {
    let name = name.trim().to_ascii_lowercase();
    let name = name.strip_prefix("registry.ollama.ai/").unwrap_or(&name);
    let name = name.strip_prefix("library/").unwrap_or(name);
    let last = name.rsplit('/').next().unwrap_or_default();
    if last.contains(':') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

/// Whether a 404's message is a server saying it has no such model (Ollama: "model 'x' not
/// found"; OpenAI: "The model `x` does not exist", code `model_not_found`; vLLM: "The model
/// `x` does not exist.").
pub(crate) fn says_model_missing(status: u16, message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    status == 404
        && m.contains("model")
        && (m.contains("not found") || m.contains("does not exist"))
}

/// One configured model server, probed (for `ragpool check --online`).
#[derive(Debug)]
pub struct ModelProbe {
    /// `"llm"` or `"embed"`: the table it comes from.
    pub table: &'static str,
    pub url: String,
    pub model: String,
    /// Reachable and has the model, or why not.
    pub result: Result<(), LlmError>,
}

/// Probes the configured generation and embedding servers: does each answer, and does it have
/// its model? A provider of `"none"` is left out. Each probe is bounded like `/health`'s.
pub async fn probe_models(
    llm: &crate::config::app::LlmConfig,
    embed: &crate::config::app::EmbedConfig,
) -> Vec<ModelProbe> {
    let mut probes = Vec::new();
    // Every backend of the pool, one after the other.
    for backend in &llm.backends {
        let result = match Generator::for_backend(llm, backend) {
            Ok(generator) => generator.check_model().await,
            Err(e) => Err(e),
        };
        probes.push(ModelProbe {
            table: "llm",
            url: backend.url.clone(),
            model: backend.model.clone(),
            result,
        });
    }
    match Embedder::new(embed) {
        Ok(None) => {}
        Ok(Some(embedder)) => probes.push(ModelProbe {
            table: "embed",
            url: embed.url.clone(),
            model: embed.model.clone(),
            result: embedder.check_model(embed.timeout).await,
        }),
        Err(e) => probes.push(ModelProbe {
            table: "embed",
            url: embed.url.clone(),
            model: embed.model.clone(),
            result: Err(e),
        }),
    }
    probes
}

/// Who says a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One message of a chat; serialises as both protocols expect (`{"role","content"}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

impl ChatMessage {
    pub fn system(content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: Role::System,
            content: content.into(),
        }
    }

    pub fn user(content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: Role::User,
            content: content.into(),
        }
    }

    pub fn assistant(content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// One decoded event of a streaming chat response, whatever the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ChatEvent {
    /// A non-empty piece of the answer.
    Token(String),
    /// A non-empty piece of reasoning (thinking).
    Reasoning(String),
    /// The server said the answer is complete (`"done": true` or `data: [DONE]`), with the
    /// reason it gave (`done_reason`, or the last `finish_reason`).
    Done(Finish),
}

/// Why a stream decoder gave up; turned into an [`LlmError`] (with the URL) by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DecodeError {
    /// Bytes that are not the protocol: maps to [`LlmError::Protocol`].
    Malformed(String),
    /// An error object from the server: maps to [`LlmError::Upstream`].
    Upstream(String),
}

impl DecodeError {
    fn into_llm(self, url: &str) -> LlmError {
        match self {
            DecodeError::Malformed(reason) => LlmError::Protocol {
                url: url.to_string(),
                reason,
            },
            DecodeError::Upstream(message) => LlmError::Upstream {
                url: url.to_string(),
                message,
            },
        }
    }
}

/// At most this much of an error body is read, and this many characters of it are kept.
const ERROR_BODY_MAX_BYTES: usize = 64 * 1024;
const ERROR_MESSAGE_MAX_CHARS: usize = 300;

/// A server and the one HTTP client used to talk to it.
pub(crate) struct Endpoint {
    /// One per Embedder/Generator: owns the keep-alive pool for this server.
    client: reqwest::Client,
    /// Base URL without a trailing slash (validated by `config`).
    base: String,
    api_key: Option<String>,
}

/// Never prints the API key.
impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("base", &self.base)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Builds the client. No proxy lookups: model servers are reached directly. Only the
    /// connect timeout is reqwest's; every other bound is enforced by the caller, so that it
    /// comes back as a [`LlmError::Timeout`] naming the bound.
    pub(crate) fn new(
        base: &str,
        api_key: Option<&str>,
        connect_timeout: Duration,
    ) -> Result<Endpoint, LlmError> {
        if base.starts_with("https://") {
            // reqwest is built without a TLS stack (default-features = false).
            return Err(LlmError::Config {
                url: base.to_string(),
                reason: "https is not supported by this build; put the model server on http or behind a local proxy"
                    .into(),
            });
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(connect_timeout)
            .user_agent(concat!("ragpool/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| LlmError::Config {
                url: base.to_string(),
                reason: error_chain(&e),
            })?;
        Ok(Endpoint {
            client,
            base: base.trim_end_matches('/').to_string(),
            api_key: api_key.map(str::to_string),
        })
    }

    /// `base + path`; for OpenAI paths (`/v1/...`) a base that already ends in `/v1` is not
    /// doubled, since users often paste `http://host:8080/v1`.
    pub(crate) fn url(&self, path: &str) -> String {
        match path.strip_prefix("/v1") {
            Some(rest) if self.base.ends_with("/v1") => format!("{}{rest}", self.base),
            _ => format!("{}{path}", self.base),
        }
    }

    pub(crate) fn get(&self, url: &str) -> reqwest::RequestBuilder {
        self.authorize(self.client.get(url))
    }

    pub(crate) fn post_json<T: Serialize + ?Sized>(
        &self,
        url: &str,
        body: &T,
    ) -> reqwest::RequestBuilder {
        self.authorize(self.client.post(url).json(body))
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }
}

/// Classifies a reqwest error from sending a request or reading a body.
pub(crate) fn request_error(url: &str, error: reqwest::Error) -> LlmError {
    if error.is_connect() {
        LlmError::Connect {
            url: url.to_string(),
            reason: error_chain(&error),
        }
    } else if error.is_decode() {
        LlmError::Protocol {
            url: url.to_string(),
            reason: error_chain(&error),
        }
    } else {
        LlmError::Transport {
            url: url.to_string(),
            reason: error_chain(&error),
        }
    }
}

/// The causes of an error, innermost last, without reqwest's top line (which repeats the URL).
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|p: &String| p.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    if parts.is_empty() {
        error.to_string()
    } else {
        parts.join(": ")
    }
}

/// Turns a non-2xx response into [`LlmError::Status`], keeping a short upstream message
/// (`{"error":"..."}` as Ollama says it, `{"error":{"message":"..."}}` as OpenAI does, or the
/// start of the body). Reading the body is bounded by `within`.
pub(crate) async fn status_error(
    url: &str,
    response: reqwest::Response,
    within: Duration,
) -> LlmError {
    let status = response.status();
    let body = read_bounded(response, ERROR_BODY_MAX_BYTES, within).await;
    LlmError::Status {
        url: url.to_string(),
        status: status.as_u16(),
        message: upstream_message(&body)
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_string()),
    }
}

/// Reads up to `max` bytes of a body; whatever arrived if time runs out or the body breaks.
async fn read_bounded(mut response: reqwest::Response, max: usize, within: Duration) -> Vec<u8> {
    let mut body = Vec::new();
    let read = async {
        while body.len() < max {
            match response.chunk().await {
                Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
    };
    let _ = tokio::time::timeout(within, read).await;
    body.truncate(max);
    body
}

/// The human part of an error body, on one line and short.
pub(crate) fn upstream_message(body: &[u8]) -> Option<String> {
    let text = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(json) => json_error_message(&json)?,
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    };
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.is_empty() {
        return None;
    }
    Some(match one_line.char_indices().nth(ERROR_MESSAGE_MAX_CHARS) {
        Some((cut, _)) => format!("{}...", &one_line[..cut]),
        None => one_line,
    })
}

/// `{"error":"..."}`, `{"error":{"message":"..."}}`, `{"message":"..."}`, else the JSON itself.
pub(crate) fn json_error_message(json: &serde_json::Value) -> Option<String> {
    let error = json.get("error").unwrap_or(json);
    if let Some(text) = error.as_str() {
        return Some(text.to_string());
    }
    if let Some(text) = error.get("message").and_then(|m| m.as_str()) {
        return Some(text.to_string());
    }
    if error.is_null() {
        return None;
    }
    Some(error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_message_reads_both_error_shapes() {
        assert_eq!(
            upstream_message(br#"{"error":"model \"x\" not found"}"#).as_deref(),
            Some("model \"x\" not found")
        );
        assert_eq!(
            upstream_message(
                br#"{"error":{"code":400,"message":"bad\n input","type":"invalid_request_error"}}"#
            )
            .as_deref(),
            Some("bad input")
        );
        assert_eq!(
            upstream_message(b"  plain text\r\n").as_deref(),
            Some("plain text")
        );
        assert_eq!(upstream_message(b"").as_deref(), None);
        let long = "ж".repeat(1000);
        let message = upstream_message(long.as_bytes()).unwrap_or_default();
        assert_eq!(message.chars().count(), ERROR_MESSAGE_MAX_CHARS + 3);
    }

    #[test]
    fn openai_base_with_v1_is_not_doubled() {
        let plain =
            Endpoint::new("http://127.0.0.1:8080", None, Duration::from_secs(1)).expect("endpoint");
        assert_eq!(plain.url("/v1/models"), "http://127.0.0.1:8080/v1/models");
        assert_eq!(plain.url("/api/chat"), "http://127.0.0.1:8080/api/chat");
        let v1 = Endpoint::new("http://127.0.0.1:8080/v1/", None, Duration::from_secs(1))
            .expect("endpoint");
        assert_eq!(v1.url("/v1/models"), "http://127.0.0.1:8080/v1/models");
    }

    #[test]
    fn debug_output_hides_the_api_key() {
        let endpoint = Endpoint::new(
            "http://127.0.0.1:1",
            Some("sk-secret"),
            Duration::from_secs(1),
        )
        .expect("endpoint");
        let debug = format!("{endpoint:?}");
        assert!(
            !debug.contains("sk-secret") && debug.contains("redacted"),
            "{debug}"
        );
    }

    #[test]
    fn https_is_refused_up_front() {
        let err = Endpoint::new("https://example.invalid", None, Duration::from_secs(1))
            .expect_err("no TLS");
        assert!(matches!(err, LlmError::Config { .. }), "{err}");
    }

    #[test]
    fn unavailable_means_down_not_misconfigured() {
        let status = |status| LlmError::Status {
            url: "u".into(),
            status,
            message: String::new(),
        };
        assert!(status(503).is_unavailable());
        assert!(status(429).is_unavailable());
        assert!(!status(404).is_unavailable());
        assert!(LlmError::Connect {
            url: "u".into(),
            reason: "refused".into()
        }
        .is_unavailable());
        assert!(!LlmError::Protocol {
            url: "u".into(),
            reason: "truncated".into()
        }
        .is_unavailable());
    }
}
