//! The OpenAI-compatible API, so chat UIs that speak it (Open WebUI, LibreChat, AnythingLLM,
//! the `openai` client libraries) can use ragpool: `POST /v1/chat/completions` (one JSON
//! `chat.completion`, or with `"stream": true` SSE `data: {chat.completion.chunk}` lines ending
//! in `data: [DONE]`) and `GET /v1/models`. The one model, [`MODEL_ID`], is ragpool's RAG over
//! the store: the messages are the conversation (the last one the question, the earlier user
//! and assistant turns its history), the answer cites passages as `[n]`, and the sources travel
//! in an extra top-level `sources` field that OpenAI clients ignore.
//!
//! Owns the wire format only: reading a request into a question and turns, framing answers and
//! errors. The pipeline is the same [`crate::rag::engine::Rag::ask`] as `/api/ask`'s;
//! generation parameters a client sends (`temperature`, `max_tokens`, ...) are ignored, the
//! operator's `[llm]` settings apply. Optional bearer key: `openai_api_key`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use super::api::{bearer_token, constant_time_eq, require_json, Api};
use super::body::Wire;
use super::routes::BodyLimit;
use super::{json, ApiError, Body};
use crate::rag::conversation::{HistoryLimits, Turn};
use crate::rag::engine::{Answer, Event, Mode};
use crate::rag::llm::Role;

/// The id `/v1/models` lists and `/v1/chat/completions` answers as.
pub const MODEL_ID: &str = "ragpool";

/// A chat request, read.
#[derive(Debug, PartialEq)]
pub struct ChatRequest {
    /// The last message's text.
    pub question: String,
    /// The user and assistant turns before it: the most recent that fit the history limits.
    pub history: Vec<Turn>,
    pub stream: bool,
}

impl Api {
    /// `GET /v1/models`.
    pub(super) fn models(&self, request: &Request<Incoming>) -> Response<Body> {
        if let Err(e) = self.authorize_openai(request) {
            return e.into_openai_response();
        }
        json(
            StatusCode::OK,
            &json!({
                "object": "list",
                "data": [{ "id": MODEL_ID, "object": "model", "created": 0, "owned_by": "ragpool" }],
            }),
        )
    }

    /// `POST /v1/chat/completions`; every error in OpenAI's `{"error": {...}}` shape.
    pub(super) async fn chat_completions(
        &self,
        request: Request<Incoming>,
        limit: BodyLimit,
    ) -> Response<Body> {
        match self.try_chat_completions(request, limit).await {
            Ok(response) => response,
            Err(e) => e.into_openai_response(),
        }
    }

    async fn try_chat_completions(
        &self,
        request: Request<Incoming>,
        limit: BodyLimit,
    ) -> Result<Response<Body>, ApiError> {
        self.authorize_openai(&request)?;
        require_json(&request)?;
        let body = self.body(request, limit).await?;
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))?;
        let chat = read_chat(
            &value,
            self.rag.history_limits(),
            self.rag.max_question_chars(),
        )?;
        let top_k = self.rag.default_top_k();
        if chat.stream {
            let chunks = ChunkStream::new(completion_id(), unix_now());
            return Ok(self.stream_answer(
                chat.question,
                chat.history,
                top_k,
                Wire::OpenAi(chunks),
            ));
        }
        let answer = self
            .collect_answer(chat.question, chat.history, top_k)
            .await?;
        Ok(json(
            StatusCode::OK,
            &completion(&answer, &completion_id(), unix_now()),
        ))
    }

    fn authorize_openai(&self, request: &Request<Incoming>) -> Result<(), ApiError> {
        let Some(expected) = &self.config.openai_api_key else {
            return Ok(());
        };
        if constant_time_eq(bearer_token(request).as_bytes(), expected.as_bytes()) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "missing or wrong API key (send 'Authorization: Bearer <openai_api_key>')",
            ))
        }
    }
}

/// Reads `{model?, messages: [{role, content}], stream?}`. The last message must be the
/// user's; `system`/`developer` messages are dropped (ragpool's own prompt grounds the
/// answer), as are `tool` messages and assistant tool calls without text. Clients send the
/// whole conversation every time, so instead of refusing a long one the oldest turns are
/// dropped to fit `limits`.
pub fn read_chat(
    value: &Value,
    limits: HistoryLimits,
    max_question_chars: usize,
) -> Result<ChatRequest, ApiError> {
    let invalid = |what: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, what);
    match value.get("model") {
        None | Some(Value::Null) => {}
        Some(Value::String(model)) if model == MODEL_ID => {}
        Some(model) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("the model {model} does not exist; the one model here is \"{MODEL_ID}\""),
            ))
        }
    }
    let stream = match value.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => *stream,
        Some(_) => return Err(invalid("`stream` must be true or false".into())),
    };
    let messages = value
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| invalid("`messages` must be a non-empty list".into()))?;
    let mut turns = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        let role = match message.get("role").and_then(Value::as_str) {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some("system" | "developer" | "tool" | "function") => continue,
            _ => {
                return Err(invalid(format!(
                    "`messages[{i}].role` must be system, developer, user, assistant or tool"
                )))
            }
        };
        let content = text_of(message.get("content")).ok_or_else(|| {
            invalid(format!(
                "`messages[{i}].content` must be a string or a list of text parts"
            ))
        })?;
        if content.trim().is_empty() {
            continue;
        }
        turns.push(Turn { role, content });
    }
    let question = match turns.pop() {
        Some(Turn {
            role: Role::User,
            content,
        }) => content.trim().to_string(),
        _ => {
            return Err(invalid(
                "the last message must be the user's question".into(),
            ))
        }
    };
    let chars = question.chars().count();
    if chars > max_question_chars {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the question is {chars} characters; the limit is {max_question_chars}"),
        ));
    }
    Ok(ChatRequest {
        question,
        history: most_recent(turns, limits),
        stream,
    })
}

/// A message's text: a string, or the `text` of its `{"type": "text"}` parts (images and
/// other parts are not for a text model); `None` for anything else. `null` is no text.
fn text_of(content: Option<&Value>) -> Option<String> {
    match content {
        None | Some(Value::Null) => Some(String::new()),
        Some(Value::String(text)) => Some(text.clone()),
        Some(Value::Array(parts)) => {
            let texts: Vec<&str> = parts
                .iter()
                .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect();
            Some(texts.join("\n"))
        }
        Some(_) => None,
    }
}

/// The latest turns within `limits`, oldest first.
fn most_recent(turns: Vec<Turn>, limits: HistoryLimits) -> Vec<Turn> {
    let mut chars = 0;
    let mut keep = 0;
    for turn in turns.iter().rev() {
        let len = turn.content.chars().count();
        if keep == limits.turns || chars + len > limits.chars {
            break;
        }
        chars += len;
        keep += 1;
    }
    let skip = turns.len() - keep;
    turns.into_iter().skip(skip).collect()
}

/// A whole answer as a `chat.completion`.
pub fn completion(answer: &Answer, id: &str, created: u64) -> Value {
    let mut message = json!({ "role": "assistant", "content": answer.answer });
    if !answer.reasoning.is_empty() {
        message["reasoning_content"] = json!(answer.reasoning);
    }
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": MODEL_ID,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": finish_reason(answer.truncated),
            "logprobs": null,
        }],
        "sources": answer.sources,
        "ragpool": { "mode": answer.mode, "standalone": answer.standalone },
    })
}

fn finish_reason(truncated: bool) -> &'static str {
    if truncated {
        "length"
    } else {
        "stop"
    }
}

/// Frames one answer's events as `chat.completion.chunk`s: the first (when the sources are
/// known) gives the role and carries `sources`, then one per token (`reasoning_content` for
/// reasoning), then one with `finish_reason`, then `data: [DONE]`. A failure is a
/// `data: {"error": {...}}` line, which OpenAI clients raise as an error.
pub struct ChunkStream {
    /// `chatcmpl-...`, the same in every chunk of the answer.
    id: String,
    created: u64,
}

impl ChunkStream {
    pub fn new(id: String, created: u64) -> ChunkStream {
        ChunkStream { id, created }
    }

    /// The bytes for one event; `None` for events OpenAI's format has no place for.
    pub fn encode(&mut self, event: &Event) -> Option<Bytes> {
        let data = match event {
            Event::Standalone { .. } | Event::Queued { .. } => return None,
            Event::Sources(sources) => {
                let mut chunk = self.chunk(json!({ "role": "assistant", "content": "" }), None);
                chunk["sources"] = json!(sources);
                chunk
            }
            Event::Reasoning(text) => self.chunk(json!({ "reasoning_content": text }), None),
            Event::Token(text) => self.chunk(json!({ "content": text }), None),
            Event::Done {
                mode, truncated, ..
            } => {
                let mut chunk = self.chunk(json!({}), Some(finish_reason(*truncated)));
                chunk["ragpool"] = json!({ "mode": mode_name(*mode) });
                return Some(Bytes::from(format!("data: {chunk}\n\ndata: [DONE]\n\n")));
            }
            Event::Error { message, .. } => {
                json!({ "error": { "message": message, "type": "upstream_error", "param": null, "code": null } })
            }
        };
        Some(Bytes::from(format!("data: {data}\n\n")))
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": MODEL_ID,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish, "logprobs": null }],
        })
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Generated => "generated",
        Mode::Extractive => "extractive",
    }
}

/// `chatcmpl-` and 24 hex digits, unique per process and call (no RNG needed: not a secret).
fn completion_id() -> String {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let n = CALLS.fetch_add(1, Ordering::Relaxed);
    format!(
        "chatcmpl-{:08x}{:016x}",
        std::process::id() ^ (n as u32),
        nanos
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rag::engine::Timings;

    const LIMITS: HistoryLimits = HistoryLimits {
        turns: 3,
        chars: 20,
    };

    fn read(value: Value) -> Result<ChatRequest, ApiError> {
        read_chat(&value, LIMITS, 100)
    }

    #[test]
    fn the_last_user_message_is_the_question_and_the_rest_its_history() {
        let chat = read(json!({
            "model": "ragpool",
            "stream": true,
            "messages": [
                { "role": "system", "content": "You are helpful." },
                { "role": "user", "content": "reload?" },
                { "role": "assistant", "content": [{ "type": "text", "text": "HUP [1]" }] },
                { "role": "user", "content": "  and systemd?  " },
            ],
        }))
        .unwrap();
        assert_eq!(chat.question, "and systemd?");
        assert!(chat.stream);
        let turns: Vec<(Role, &str)> = chat
            .history
            .iter()
            .map(|t| (t.role, t.content.as_str()))
            .collect();
        assert_eq!(
            turns,
            [(Role::User, "reload?"), (Role::Assistant, "HUP [1]")]
        );
    }

    #[test]
    fn a_long_conversation_keeps_its_latest_turns() {
        let messages: Vec<Value> = (0..10)
            .map(|i| {
                let role = if i % 2 == 0 { "user" } else { "assistant" };
                json!({ "role": role, "content": format!("turn {i}") })
            })
            .chain([json!({ "role": "user", "content": "last" })])
            .collect();
        let chat = read(json!({ "messages": messages })).unwrap();
        let kept: Vec<&str> = chat.history.iter().map(|t| t.content.as_str()).collect();
        // The turn limit (3 turns of 6 characters fit in 20).
        assert_eq!(kept, ["turn 7", "turn 8", "turn 9"]);
        let tight = read_chat(
            &json!({ "messages": messages }),
            HistoryLimits {
                turns: 10,
                chars: 13,
            },
            100,
        )
        .unwrap();
        assert_eq!(tight.history.len(), 2);
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let status = |v: Value| read(v).unwrap_err().status;
        assert_eq!(status(json!({})), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(
            status(json!({ "messages": [] })),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status(json!({ "messages": [{ "role": "assistant", "content": "hi" }] })),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            status(json!({ "model": "gpt-4o", "messages": [{ "role": "user", "content": "hi" }] })),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(json!({ "messages": [{ "role": "user", "content": "x".repeat(101) }] })),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            status(json!({ "messages": [{ "role": "user", "content": 7 }] })),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }

    #[test]
    fn an_answer_streams_as_chunks_then_done() {
        let mut chunks = ChunkStream::new("chatcmpl-1".into(), 7);
        assert_eq!(
            chunks.encode(&Event::Queued { position: 1 }),
            None,
            "no place for it"
        );
        let sources = chunks.encode(&Event::Sources(Vec::new())).unwrap();
        let first: Value = serde_json::from_slice(&sources[6..sources.len() - 2]).unwrap();
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first["sources"], json!([]));
        let token = chunks.encode(&Event::Token("Hi [1]".into())).unwrap();
        assert!(token.starts_with(b"data: {"));
        assert!(String::from_utf8_lossy(&token).contains(r#""delta":{"content":"Hi [1]"}"#));
        let done = chunks
            .encode(&Event::Done {
                mode: Mode::Generated,
                timings: Timings::default(),
                upstream_error: None,
                truncated: true,
            })
            .unwrap();
        let done = String::from_utf8_lossy(&done);
        assert!(done.contains(r#""finish_reason":"length""#), "{done}");
        assert!(done.ends_with("data: [DONE]\n\n"), "{done}");
        let error = chunks
            .encode(&Event::Error {
                message: "down".into(),
                backend: "ollama",
            })
            .unwrap();
        assert!(error.starts_with(br#"data: {"error":{"#));
    }
}
