//! Chat messages -> a stream of tokens through a generation server: Ollama's `POST /api/chat`
//! (NDJSON) or OpenAI's `POST /v1/chat/completions` (server-sent events); `check_model` for
//! `/health`.
//!
//! Owns the request shapes and the three bounds of a generation: connecting
//! (`connect_timeout`, reqwest's), the first token (`first_token_timeout`, which also covers
//! waiting for response headers; a token of reasoning counts, so a long think is bounded by
//! `timeout`, not starved by the first-token bound) and the whole answer (`timeout`). Also the
//! model check behind `/health`. Does not build prompts, never retries, and holds no
//! concurrency cap.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::json;
use tokio::time::Instant;

use super::ndjson::NdjsonDecoder;
use super::sse::SseDecoder;
use super::{
    request_error, status_error, ChatEvent, ChatMessage, Chunk, Endpoint, LlmError, TimeoutKind,
    TokenStream,
};
use crate::config::app::{KeepAlive, LlmBackend, LlmConfig, Provider};

/// A generation client for one model on one server (enum dispatch over the two protocols).
#[derive(Debug)]
pub enum Generator {
    /// `POST {url}/api/chat`, NDJSON lines; model check = `GET {url}/api/tags`.
    Ollama(ChatClient),
    /// `POST {url}/v1/chat/completions`, SSE; model check = `GET {url}/v1/models`.
    OpenAi(ChatClient),
}

/// What both protocols share.
#[derive(Debug)]
pub struct ChatClient {
    endpoint: Endpoint,
    model: String,
    /// `[llm] timeout`: the whole generation, from sending the request to the last token.
    timeout: Duration,
    /// `[llm] connect_timeout`: TCP connect, and the whole of a model check.
    connect_timeout: Duration,
    /// `[llm] first_token_timeout`: from sending the request to the first non-empty token.
    first_token_timeout: Duration,
    temperature: f64,
    max_tokens: u32,
    /// `[llm] think`: sent as `"think": false` when off; left out when on (Ollama then thinks
    /// if the model can, and a model that cannot is not refused).
    think: bool,
    keep_alive: Option<KeepAlive>,
    /// `[llm] repeat_penalty`, `frequency_penalty`, `stop`: see [`sampling`].
    repeat_penalty: f64,
    frequency_penalty: f64,
    stop: Vec<String>,
}

/// Adds the repetition control and stop strings to a request's sampling settings (Ollama's
/// `options`, or the OpenAI body itself, where llama.cpp and vLLM read `repeat_penalty` too):
/// only what is switched on, so a server that does not know a setting never sees it.
fn sampling(c: &ChatClient, into: &mut serde_json::Value) {
    if (c.repeat_penalty - 1.0).abs() > f64::EPSILON {
        into["repeat_penalty"] = json!(c.repeat_penalty);
    }
    if c.frequency_penalty != 0.0 {
        into["frequency_penalty"] = json!(c.frequency_penalty);
    }
    if !c.stop.is_empty() {
        into["stop"] = json!(c.stop);
    }
}

impl Generator {
    /// The configured generator, or `None` when `[llm] provider = "none"` (extractive answers
    /// only). Connects lazily: use [`Generator::check_model`] to probe.
    /// The one server of `[llm]`'s own `provider`, `url`, `model` and `api_key` (the first
    /// backend of a pool); see [`Generator::pool`] for all of them.
    pub fn new(config: &LlmConfig) -> Result<Option<Generator>, LlmError> {
        if config.provider == Provider::None {
            return Ok(None);
        }
        let first = LlmBackend {
            provider: config.provider,
            url: config.url.clone(),
            model: config.model.clone(),
            api_key: config.api_key.clone(),
            max_concurrent: 0,
        };
        Generator::for_backend(config, &first).map(Some)
    }

    /// Every backend of the pool (`[[llm.backend]]`, or `[llm] url`), in config order; empty
    /// when `provider = "none"`.
    pub fn pool(config: &LlmConfig) -> Result<Vec<Generator>, LlmError> {
        config
            .backends
            .iter()
            .map(|backend| Generator::for_backend(config, backend))
            .collect()
    }

    /// The client of one backend, with `[llm]`'s bounds and sampling.
    pub fn for_backend(config: &LlmConfig, backend: &LlmBackend) -> Result<Generator, LlmError> {
        let client = |config: &LlmConfig| -> Result<ChatClient, LlmError> {
            Ok(ChatClient {
                endpoint: Endpoint::new(
                    &backend.url,
                    backend.api_key.as_deref(),
                    config.connect_timeout,
                )?,
                model: backend.model.clone(),
                timeout: config.timeout,
                connect_timeout: config.connect_timeout,
                first_token_timeout: config.first_token_timeout,
                temperature: config.temperature,
                max_tokens: config.max_tokens,
                think: config.think,
                keep_alive: config.keep_alive.clone(),
                repeat_penalty: config.repeat_penalty,
                frequency_penalty: config.frequency_penalty,
                stop: config.stop.clone(),
            })
        };
        Ok(match backend.provider {
            Provider::OpenAi => Generator::OpenAi(client(config)?),
            Provider::Ollama | Provider::None => Generator::Ollama(client(config)?),
        })
    }

    /// The server's base URL (for logs and `/status`).
    pub fn url(&self) -> String {
        self.client().endpoint.url("")
    }

    pub fn model(&self) -> &str {
        &self.client().model
    }

    pub fn max_tokens(&self) -> u32 {
        self.client().max_tokens
    }

    /// Starts a generation. Returns once the server accepted it (a 2xx with headers), within
    /// `first_token_timeout`; the pieces follow on the stream, which ends cleanly only after
    /// the server said it is done ([`Chunk::Finished`]). A server without the model is
    /// [`LlmError::ModelMissing`].
    pub async fn stream(&self, messages: &[ChatMessage]) -> Result<TokenStream, LlmError> {
        let client = self.client();
        self.start(messages, client.max_tokens, client.think).await
    }

    /// A short side call (rewriting a follow-up for retrieval): at most `max_tokens` (and never
    /// more than `[llm] max_tokens`), and without thinking, so a reasoning model does not spend
    /// the budget before the one line asked for.
    pub async fn stream_short(
        &self,
        messages: &[ChatMessage],
        max_tokens: u32,
    ) -> Result<TokenStream, LlmError> {
        let client = self.client();
        self.start(messages, max_tokens.min(client.max_tokens), false)
            .await
    }

    async fn start(
        &self,
        messages: &[ChatMessage],
        max_tokens: u32,
        think: bool,
    ) -> Result<TokenStream, LlmError> {
        let client = self.client();
        let (url, body, decoder) = match self {
            Generator::Ollama(c) => {
                let mut options =
                    json!({ "temperature": c.temperature, "num_predict": max_tokens });
                sampling(c, &mut options);
                let mut body = json!({
                    "model": c.model,
                    "messages": messages,
                    "stream": true,
                    "options": options,
                });
                if !think {
                    body["think"] = json!(false);
                }
                if let Some(keep_alive) = &c.keep_alive {
                    body["keep_alive"] = keep_alive.to_json();
                }
                (
                    c.endpoint.url("/api/chat"),
                    body,
                    Decoder::Ndjson(NdjsonDecoder::default()),
                )
            }
            Generator::OpenAi(c) => {
                let mut body = json!({
                    "model": c.model,
                    "messages": messages,
                    "stream": true,
                    "temperature": c.temperature,
                    "max_tokens": max_tokens,
                });
                sampling(c, &mut body);
                (
                    c.endpoint.url("/v1/chat/completions"),
                    body,
                    Decoder::Sse(SseDecoder::default()),
                )
            }
        };
        let started = Instant::now();
        let deadlines = Deadlines {
            first_token: started + client.first_token_timeout,
            generation: started + client.timeout,
            first_token_timeout: client.first_token_timeout,
            generation_timeout: client.timeout,
        };
        let (until, kind, after) = deadlines.next(false);
        let request = client.endpoint.post_json(&url, &body).send();
        let response = match tokio::time::timeout_at(until, request).await {
            Err(_) => return Err(LlmError::Timeout { url, kind, after }),
            Ok(Err(e)) => return Err(request_error(&url, e)),
            Ok(Ok(response)) => response,
        };
        if !response.status().is_success() {
            let within = until
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(100));
            return Err(self.missing_or(status_error(&url, response, within).await));
        }
        log::debug!(
            "generation started: {url} model {} ({} messages)",
            client.model,
            messages.len()
        );
        let pump = Pump {
            url,
            body: Box::pin(response.bytes_stream()),
            decoder,
            ready: VecDeque::new(),
            events: Vec::new(),
            deadlines,
            got_first_token: false,
            done: false,
            failed: None,
            started,
            tokens: 0,
            reasoning: 0,
        };
        let tokens = futures_util::stream::unfold(Some(pump), |pump| async move {
            let mut pump = pump?;
            match pump.next_chunk().await {
                Some(Ok(chunk)) => Some((Ok(chunk), Some(pump))),
                // An error is the last item: the state (and with it the response) is dropped.
                Some(Err(e)) => Some((Err(e), None)),
                None => None,
            }
        });
        Ok(Box::pin(tokens))
    }

    /// Whether the configured model is there: Ollama's `GET /api/tags` (then `POST /api/show`
    /// if the list does not name it, since Ollama resolves names its own way), or the ids of
    /// OpenAI's `GET /v1/models`. Bounded by `connect_timeout` (a [`TimeoutKind::Ping`]).
    pub async fn check_model(&self) -> Result<(), LlmError> {
        let c = self.client();
        let exchange = async {
            match self {
                Generator::Ollama(_) => {
                    super::models::ollama_has_model(&c.endpoint, &c.model, c.connect_timeout).await
                }
                Generator::OpenAi(_) => {
                    super::models::openai_has_model(&c.endpoint, &c.model, c.connect_timeout).await
                }
            }
        };
        match tokio::time::timeout(c.connect_timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(LlmError::Timeout {
                url: c.endpoint.url(""),
                kind: TimeoutKind::Ping,
                after: c.connect_timeout,
            }),
        }
    }

    /// A 404 that says the model is missing becomes [`LlmError::ModelMissing`].
    fn missing_or(&self, error: LlmError) -> LlmError {
        let c = self.client();
        match &error {
            LlmError::Status {
                url,
                status,
                message,
            } if super::says_model_missing(*status, message) => match self {
                Generator::Ollama(_) => LlmError::not_pulled(url, &c.model),
                Generator::OpenAi(_) => LlmError::not_served(url, &c.model, &[]),
            },
            _ => error,
        }
    }

    fn client(&self) -> &ChatClient {
        match self {
            Generator::Ollama(client) | Generator::OpenAi(client) => client,
        }
    }
}

/// The bounds of one generation, as instants.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    first_token: Instant,
    generation: Instant,
    first_token_timeout: Duration,
    generation_timeout: Duration,
}

impl Deadlines {
    /// The deadline in force, which bound it is, and that bound's length.
    fn next(&self, got_first_token: bool) -> (Instant, TimeoutKind, Duration) {
        if !got_first_token && self.first_token < self.generation {
            (
                self.first_token,
                TimeoutKind::FirstToken,
                self.first_token_timeout,
            )
        } else {
            (
                self.generation,
                TimeoutKind::Generation,
                self.generation_timeout,
            )
        }
    }
}

#[derive(Debug)]
enum Decoder {
    Ndjson(NdjsonDecoder),
    Sse(SseDecoder),
}

impl Decoder {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<ChatEvent>) -> Result<(), super::DecodeError> {
        match self {
            Decoder::Ndjson(d) => d.feed(chunk, out),
            Decoder::Sse(d) => d.feed(chunk, out),
        }
    }

    fn finish(&mut self, out: &mut Vec<ChatEvent>) -> Result<(), super::DecodeError> {
        match self {
            Decoder::Ndjson(d) => d.finish(out),
            Decoder::Sse(d) => d.finish(out),
        }
    }
}

/// The state behind a [`TokenStream`]: the response body, the decoder, and pieces decoded but
/// not yet handed out (one network chunk may hold several).
struct Pump {
    url: String,
    /// Dropping it closes the connection: the upstream sees the client go away.
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>>>>,
    decoder: Decoder,
    ready: VecDeque<Chunk>,
    /// Scratch space for one chunk's events.
    events: Vec<ChatEvent>,
    deadlines: Deadlines,
    /// A first token of any kind (reasoning or answer) arrived: `first_token_timeout` is met.
    got_first_token: bool,
    /// The server said the answer is complete (and [`Chunk::Finished`] is queued).
    done: bool,
    /// An error to hand out once the tokens decoded before it are gone.
    failed: Option<LlmError>,
    started: Instant,
    /// Answer and reasoning pieces handed out, for the log.
    tokens: usize,
    reasoning: usize,
}

impl Pump {
    async fn next_chunk(&mut self) -> Option<Result<Chunk, LlmError>> {
        loop {
            if let Some(chunk) = self.ready.pop_front() {
                match &chunk {
                    Chunk::Answer(_) => self.tokens += 1,
                    Chunk::Reasoning(_) => self.reasoning += 1,
                    Chunk::Finished(finish) => log::debug!(
                        "generation done ({finish:?}): {} answer and {} reasoning pieces in {:?} from {}",
                        self.tokens,
                        self.reasoning,
                        self.started.elapsed(),
                        self.url
                    ),
                }
                return Some(Ok(chunk));
            }
            if let Some(e) = self.failed.take() {
                return Some(Err(e));
            }
            if self.done {
                return None;
            }
            let (until, kind, after) = self.deadlines.next(self.got_first_token);
            let chunk = match tokio::time::timeout_at(until, self.body.next()).await {
                Err(_) => {
                    return Some(Err(LlmError::Timeout {
                        url: self.url.clone(),
                        kind,
                        after,
                    }));
                }
                Ok(Some(Err(e))) => return Some(Err(request_error(&self.url, e))),
                Ok(Some(Ok(chunk))) => Some(chunk),
                Ok(None) => None,
            };
            let decoded = match &chunk {
                Some(bytes) => self.decoder.feed(bytes, &mut self.events),
                None => self.decoder.finish(&mut self.events),
            };
            // Pieces decoded before an error are still handed out, then the error.
            for event in self.events.drain(..) {
                match event {
                    ChatEvent::Token(token) => {
                        self.got_first_token = true;
                        self.ready.push_back(Chunk::Answer(token));
                    }
                    ChatEvent::Reasoning(text) => {
                        self.got_first_token = true;
                        self.ready.push_back(Chunk::Reasoning(text));
                    }
                    ChatEvent::Done(finish) => {
                        self.done = true;
                        self.ready.push_back(Chunk::Finished(finish));
                    }
                }
            }
            if let Err(e) = decoded {
                self.failed = Some(e.into_llm(&self.url));
            } else if chunk.is_none() && !self.done {
                self.failed = Some(LlmError::Protocol {
                    url: self.url.clone(),
                    reason: format!(
                        "the stream ended before the server said it was done (after {} pieces)",
                        self.tokens + self.reasoning + self.ready.len()
                    ),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(repeat_penalty: f64, frequency_penalty: f64, stop: &[&str]) -> ChatClient {
        ChatClient {
            endpoint: Endpoint::new("http://127.0.0.1:9", None, Duration::from_secs(1))
                .expect("endpoint"),
            model: "m".into(),
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            first_token_timeout: Duration::from_secs(1),
            temperature: 0.2,
            max_tokens: 8,
            think: false,
            keep_alive: None,
            repeat_penalty,
            frequency_penalty,
            stop: stop.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn repetition_control_and_stop_are_sent_only_when_on() {
        let mut body = json!({});
        sampling(&client(1.15, 0.4, &["<|im_end|>"]), &mut body);
        assert_eq!(
            body,
            json!({"repeat_penalty": 1.15, "frequency_penalty": 0.4, "stop": ["<|im_end|>"]})
        );
        let mut off = json!({});
        sampling(&client(1.0, 0.0, &[]), &mut off);
        assert_eq!(off, json!({}));
    }
}
