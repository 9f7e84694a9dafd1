//! The app's handlers: the chat page, `/health`, `/metrics`, `/status`, `/api/ask`,
//! `/api/ask/stream`, `/api/documents` (and `/api/documents/{id}`), dispatched on the [`Endpoint`] the route table chose.
//!
//! Input is checked here and every failure is an [`ApiError`] (400/401/403/404/405/408/413/
//! 415/422), so a bad request gets a clear JSON error, never a crash or a hang. What a public
//! answer shows is decided here too: `/health` details and document paths only where trusted.

use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::body::Wire;
use super::forwarded::Client;
use super::limits::read_body;
use super::routes::{BodyLimit, Endpoint, Route};
use super::sources::PublicSources;
use super::{full, json, ApiError, Body};
use crate::config::{Config, MAX_TOP_K};
use crate::rag::conversation::{self, Turn};
use crate::rag::engine::{Answer, Event, Mode, Rag, Standalone, Timings};
use crate::rag::ingest;
use crate::rag::llm::Role;
use crate::rag::UpsertOutcome;
use crate::scoreboard::{Scoreboard, Slot};

/// The chat page, embedded in the binary: no build step, no CDN.
const INDEX_HTML: &str = include_str!("../../assets/index.html");
/// Events buffered between the pipeline and a slow client.
const EVENT_BUFFER: usize = 64;

pub struct Api {
    pub rag: Rc<Rag>,
    pub admin_token: Option<String>,
    /// How document sources are shown in listings and answers.
    pub sources: Rc<PublicSources>,
    /// The pool's shared scoreboard: `/metrics` and `/status` read it, answers record into
    /// this worker's slot.
    pub board: &'static Scoreboard,
    pub slot: &'static Slot,
    pub config: Arc<Config>,
}

impl Api {
    /// The embedding servers `/metrics` and `/status` show (none when `[embed]` is off).
    fn embed_urls(&self) -> &[String] {
        match self.config.embed.provider {
            crate::config::Provider::None => &[],
            _ => &self.config.embed.urls,
        }
    }

    /// `client` is who sent the request (see [`super::forwarded`]), for the internal endpoints.
    pub async fn route(
        &self,
        request: Request<Incoming>,
        route: Route,
        client: Client,
    ) -> Result<Response<Body>, ApiError> {
        let endpoint = match route.endpoint {
            Ok(endpoint) => endpoint,
            Err(true) => {
                return Err(ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method not allowed for this path",
                ))
            }
            Err(false) => return Err(ApiError::not_found()),
        };
        match endpoint {
            Endpoint::Page => Ok(page()),
            Endpoint::Health => {
                let detailed = client.is_local() || self.bearer_matches(&request);
                Ok(self.health(detailed).await)
            }
            Endpoint::Metrics => {
                self.authorize_internal(&request, client)?;
                let stats = self.rag.store().stats().await.ok();
                let pending = self.rag.pending_vectors_cached().await;
                let mut response = Response::new(full(super::metrics::prometheus(
                    self.board,
                    &self.config.llm.backends,
                    self.embed_urls(),
                    stats,
                    pending,
                )));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                Ok(response)
            }
            Endpoint::Status => {
                self.authorize_internal(&request, client)?;
                Ok(json(
                    StatusCode::OK,
                    &super::metrics::status(
                        self.board,
                        &self.config.llm.backends,
                        self.embed_urls(),
                        self.config.path.as_deref(),
                    ),
                ))
            }
            Endpoint::Ask => self.ask(request, route.body).await,
            Endpoint::AskStream => self.ask_stream(request, route.body).await,
            Endpoint::ListDocuments => self.list_documents().await,
            Endpoint::Upload => self.upload(request, route.body).await,
            Endpoint::GetDocument => {
                let id = &request.uri().path()["/api/documents/".len()..];
                self.get_document(id).await
            }
            Endpoint::Feedback => self.feedback(request, route.body).await,
            Endpoint::ChatCompletions => Ok(self.chat_completions(request, route.body).await),
            Endpoint::Models => Ok(self.models(&request)),
            Endpoint::Delete => {
                let id = request.uri().path()["/api/documents/".len()..].to_string();
                self.delete_document(&request, &id).await
            }
        }
    }

    /// The whole body within the route's limit and `body_timeout`.
    pub(super) async fn body(
        &self,
        request: Request<Incoming>,
        limit: BodyLimit,
    ) -> Result<Bytes, ApiError> {
        read_body(
            request.into_body(),
            limit.bytes(&self.config.limits),
            self.config.body_timeout,
        )
        .await
    }

    /// Anyone sees ok/degraded/down per component; `detailed` (a local client or the admin
    /// token) also sees counts, backends and the reasons, which may name internal hosts.
    async fn health(&self, detailed: bool) -> Response<Body> {
        let health = self.rag.health().await;
        let mut down = Vec::new();
        if health.store.status != "ok" {
            down.push("store");
        }
        if health.llm.status != "ok" {
            down.push("llm");
        }
        if health.embed.status == "down" {
            down.push("embed");
        }
        let status = if down.is_empty() { "ok" } else { "degraded" };
        let code = if health.store.status == "ok" {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        if !detailed {
            return json(
                code,
                &json!({
                    "status": status,
                    "degraded": down,
                    "pid": std::process::id(),
                    "store": { "status": health.store.status },
                    "llm": { "status": health.llm.status },
                    "embed": { "status": health.embed.status },
                }),
            );
        }
        json(
            code,
            &json!({
                "status": status,
                "degraded": down,
                "pid": std::process::id(),
                "store": { "backend": health.store_backend, "status": health.store.status,
                           "detail": health.store.detail, "documents": health.stats.map(|s| s.documents),
                           "chunks": health.stats.map(|s| s.chunks),
                           "pending_vectors": health.pending_vectors },
                "llm": health.llm,
                "embed": health.embed,
            }),
        )
    }

    async fn ask(
        &self,
        request: Request<Incoming>,
        limit: BodyLimit,
    ) -> Result<Response<Body>, ApiError> {
        let Question {
            question,
            history,
            top_k,
        } = self.read_question(request, limit).await?;
        let answer = self.collect_answer(question, history, top_k).await?;
        Ok(json(
            StatusCode::OK,
            &serde_json::to_value(&answer).unwrap_or(Value::Null),
        ))
    }

    /// Runs the pipeline to the end and gathers its events into one [`Answer`] (sources shown
    /// as the public may see them); an upstream failure mid-answer is a 502.
    pub(super) async fn collect_answer(
        &self,
        question: String,
        history: Vec<Turn>,
        top_k: usize,
    ) -> Result<Answer, ApiError> {
        let (tx, mut rx) = mpsc::channel(EVENT_BUFFER);
        let rag = Rc::clone(&self.rag);
        tokio::task::spawn_local(async move { rag.ask(&question, &history, top_k, tx).await });
        let mut answer = Answer {
            answer: String::new(),
            mode: Mode::Extractive,
            truncated: false,
            reasoning: String::new(),
            sources: Vec::new(),
            standalone: None,
            timings: Timings::default(),
        };
        while let Some(event) = rx.recv().await {
            if self.config.metrics {
                super::metrics::observe(&self.slot.metrics, &event);
            }
            match event {
                Event::Sources(mut sources) => {
                    self.sources.apply(&mut sources);
                    answer.sources = sources;
                }
                Event::Queued { .. } => {}
                Event::Standalone { query, by } => {
                    answer.standalone = Some(Standalone { query, by });
                }
                Event::Reasoning(text) => answer.reasoning.push_str(&text),
                Event::Token(text) => answer.answer.push_str(&text),
                Event::Done {
                    mode,
                    timings,
                    truncated,
                    ..
                } => {
                    answer.mode = mode;
                    answer.timings = timings;
                    answer.truncated = truncated;
                }
                Event::Error { message, .. } => {
                    return Err(ApiError::new(StatusCode::BAD_GATEWAY, message))
                }
            }
        }
        Ok(answer)
    }

    /// Starts the pipeline and streams its events as `wire` frames them.
    pub(super) fn stream_answer(
        &self,
        question: String,
        history: Vec<Turn>,
        top_k: usize,
        wire: Wire,
    ) -> Response<Body> {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let rag = Rc::clone(&self.rag);
        tokio::task::spawn_local(async move { rag.ask(&question, &history, top_k, tx).await });
        let metrics = self.config.metrics.then_some(&self.slot.metrics);
        let mut response = Response::new(Body::events(rx, metrics, Rc::clone(&self.sources), wire));
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        // nginx: pass tokens through as they come.
        headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
        response
    }

    async fn ask_stream(
        &self,
        request: Request<Incoming>,
        limit: BodyLimit,
    ) -> Result<Response<Body>, ApiError> {
        let Question {
            question,
            history,
            top_k,
        } = self.read_question(request, limit).await?;
        Ok(self.stream_answer(question, history, top_k, Wire::Events))
    }

    /// `{question, history?, top_k?}` as JSON; every way it can be wrong has its status.
    async fn read_question(
        &self,
        request: Request<Incoming>,
        limit: BodyLimit,
    ) -> Result<Question, ApiError> {
        require_json(&request)?;
        let body = self.body(request, limit).await?;
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))?;
        let question = value
            .get("question")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "`question` must be a string",
                )
            })?
            .trim()
            .to_string();
        if question.is_empty() {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "`question` is empty",
            ));
        }
        let chars = question.chars().count();
        let limit = self.rag.max_question_chars();
        if chars > limit {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("`question` is {chars} characters; the limit is {limit}"),
            ));
        }
        let top_k = match value.get("top_k") {
            None | Some(Value::Null) => self.rag.default_top_k(),
            Some(v) => v
                .as_u64()
                .filter(|k| (1..=MAX_TOP_K as u64).contains(k))
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        format!("`top_k` must be an integer from 1 to {MAX_TOP_K}"),
                    )
                })? as usize,
        };
        let history = read_history(value.get("history"))?;
        conversation::check_limits(&history, self.rag.history_limits())
            .map_err(|e| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, e.to_string()))?;
        Ok(Question {
            question,
            history,
            top_k,
        })
    }

    async fn list_documents(&self) -> Result<Response<Body>, ApiError> {
        let mut documents = self.rag.store().list_documents().await?;
        for document in &mut documents {
            document.source = self.sources.show(&document.source);
        }
        Ok(json(StatusCode::OK, &json!({ "documents": documents })))
    }

    async fn upload(
        &self,
        request: Request<Incoming>,
        limit: BodyLimit,
    ) -> Result<Response<Body>, ApiError> {
        self.authorize(&request)?;
        let content_type = header(&request, CONTENT_TYPE).unwrap_or_default();
        let mut documents = Vec::new();
        if content_type.starts_with("application/json") {
            let body = self.body(request, limit).await?;
            let value: Value = serde_json::from_slice(&body).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}"))
            })?;
            let field = |name: &str| {
                value
                    .get(name)
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .unwrap_or_default()
                    .to_string()
            };
            let (title, text) = (field("title"), field("text"));
            if title.is_empty() || text.is_empty() {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "`title` and `text` must be non-empty strings",
                ));
            }
            documents.push(ingest::from_text(&title, &text)?);
        } else if content_type.starts_with("multipart/form-data") {
            let boundary = multer::parse_boundary(&content_type).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, format!("bad multipart body: {e}"))
            })?;
            let body = self.body(request, limit).await?;
            let stream =
                futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(body) });
            let mut multipart = multer::Multipart::new(stream, boundary);
            while let Some(field) = multipart.next_field().await.map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, format!("bad multipart body: {e}"))
            })? {
                let Some(name) = field.file_name().map(str::to_string) else {
                    continue;
                };
                let field_type = field.content_type().map(|m| m.to_string());
                let bytes = field.bytes().await.map_err(|e| {
                    ApiError::new(StatusCode::BAD_REQUEST, format!("bad multipart body: {e}"))
                })?;
                // Off the event loop; HTML and PDF in a sandboxed helper process.
                let loaded = self.rag.load_upload(name, bytes, field_type).await;
                documents.push(loaded?);
            }
            if documents.is_empty() {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "no file in the multipart body",
                ));
            }
        } else {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send application/json {\"title\", \"text\"} or multipart/form-data with files",
            ));
        }
        let mut results = Vec::new();
        for document in documents {
            let title = document.title.clone();
            let outcome = self.rag.ingest(document).await?;
            let (id, what) = match &outcome {
                UpsertOutcome::Inserted(id) => (id, "inserted"),
                UpsertOutcome::Replaced(id) => (id, "replaced"),
                UpsertOutcome::Unchanged(id) => (id, "unchanged"),
            };
            results.push(json!({ "id": id, "title": title, "outcome": what }));
        }
        Ok(json(StatusCode::CREATED, &json!({ "documents": results })))
    }

    /// `{id, title, source, chunks: [{position, text}]}`, the source shown as in listings.
    async fn get_document(&self, id: &str) -> Result<Response<Body>, ApiError> {
        if !is_document_id(id) {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "no such document"));
        }
        let Some(document) = self.rag.store().get_document(id).await? else {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "no such document"));
        };
        Ok(json(
            StatusCode::OK,
            &json!({
                "id": document.info.id,
                "title": document.info.title,
                "source": self.sources.show(&document.info.source),
                "chunks": document.chunks,
            }),
        ))
    }

    async fn delete_document(
        &self,
        request: &Request<Incoming>,
        id: &str,
    ) -> Result<Response<Body>, ApiError> {
        self.authorize(request)?;
        if !is_document_id(id) {
            return Err(ApiError::new(StatusCode::NOT_FOUND, "no such document"));
        }
        match self.rag.store().delete_document(id).await? {
            true => Ok(json(StatusCode::OK, &json!({ "deleted": id }))),
            false => Err(ApiError::new(StatusCode::NOT_FOUND, "no such document")),
        }
    }

    /// `/metrics` and `/status`: clients on this machine (loopback, unix socket, or a trusted
    /// proxy saying so), or anyone with the admin token.
    fn authorize_internal(
        &self,
        request: &Request<Incoming>,
        client: Client,
    ) -> Result<(), ApiError> {
        // A forwarded address is only believed from a trusted proxy, so a loopback one means
        // the proxy itself says the client is on this machine.
        if client.is_local() || self.bearer_matches(request) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "internal endpoint: ask from the server itself, or send the admin token",
            ))
        }
    }

    fn bearer_matches(&self, request: &Request<Incoming>) -> bool {
        let Some(expected) = &self.admin_token else {
            return false;
        };
        constant_time_eq(bearer_token(request).as_bytes(), expected.as_bytes())
    }

    fn authorize(&self, request: &Request<Incoming>) -> Result<(), ApiError> {
        let Some(expected) = &self.admin_token else {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "document changes over HTTP are disabled: set admin_token in workers.toml and send \
                 'Authorization: Bearer <token>' (or use `ragpool ingest` on the server)",
            ));
        };
        if constant_time_eq(bearer_token(request).as_bytes(), expected.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong admin token",
            ))
        }
    }
}

/// A question as the client sent it, checked.
struct Question {
    question: String,
    /// Earlier turns, oldest first (empty for a first question).
    history: Vec<Turn>,
    top_k: usize,
}

/// `history: [{role: "user"|"assistant", content}]`; absent or null is no history.
fn read_history(value: Option<&Value>) -> Result<Vec<Turn>, ApiError> {
    let invalid = |what: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, what);
    let turns = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(turns)) => turns,
        Some(_) => {
            return Err(invalid(
                "`history` must be a list of {role, content} turns".into(),
            ))
        }
    };
    let mut history = Vec::with_capacity(turns.len());
    for (i, turn) in turns.iter().enumerate() {
        let role = match turn.get("role").and_then(Value::as_str) {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            _ => {
                return Err(invalid(format!(
                    "`history[{i}].role` must be \"user\" or \"assistant\""
                )))
            }
        };
        let content = turn
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid(format!("`history[{i}].content` must be a string")))?;
        history.push(Turn {
            role,
            content: content.to_string(),
        });
    }
    Ok(history)
}

/// A document id is hex ([`crate::rag::document_id`]); anything else is no document we have.
fn is_document_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_hexdigit())
}

/// The chat page. Its own `<meta>` Content-Security-Policy pins its one script; what a `<meta>`
/// policy cannot say travels as headers: no other site may frame it (clickjacking), no content
/// sniffing, no full URL (a question in it) sent on as a referrer.
fn page() -> Response<Body> {
    let mut response = Response::new(full(INDEX_HTML));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static("frame-ancestors 'none'"),
    );
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    response
}

fn header(request: &Request<Incoming>, name: hyper::header::HeaderName) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

pub(super) fn require_json(request: &Request<Incoming>) -> Result<(), ApiError> {
    let content_type = header(request, CONTENT_TYPE).unwrap_or_default();
    if content_type
        .to_ascii_lowercase()
        .starts_with("application/json")
    {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the question as application/json",
        ))
    }
}

/// The token of `Authorization: Bearer <token>`; the scheme name is case-insensitive
/// (RFC 7235 section 2.1). Empty when absent or another scheme.
pub(super) fn bearer_token<B>(request: &Request<B>) -> &str {
    let given = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .trim_start();
    match given.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
        _ => "",
    }
}

pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        let with = |value: &str| {
            Request::get("/")
                .header(AUTHORIZATION, value)
                .body(())
                .unwrap()
        };
        for value in ["Bearer ops", "bearer ops", "BEARER  ops ", "BeArEr ops"] {
            assert_eq!(bearer_token(&with(value)), "ops", "{value:?}");
        }
        for value in ["Basic ops", "Bearerops", "ops", ""] {
            assert_eq!(bearer_token(&with(value)), "", "{value:?}");
        }
    }
}
