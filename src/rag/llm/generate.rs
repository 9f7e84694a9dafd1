//! Chat messages -> a stream of tokens through a generation server: Ollama's `POST /api/chat`
//! (NDJSON) or OpenAI's `POST /v1/chat/completions` (server-sent events); `ping` for `/health`.
//!
//! Owns the request shapes and the three bounds of a generation: connecting
//! (`connect_timeout`, reqwest's), the first token (`first_token_timeout`, which also covers
//! waiting for response headers) and the whole answer (`timeout`). Does not build prompts,
//! never retries, and holds no concurrency cap.

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
    request_error, status_error, ChatEvent, ChatMessage, Endpoint, LlmError, TimeoutKind,
    TokenStream,
};
use crate::config::app::{LlmConfig, Provider};

/// A generation client for one model on one server (enum dispatch over the two protocols).
#[derive(Debug)]
pub enum Generator {
    /// `POST {url}/api/chat`, NDJSON lines; ping = `GET {url}/api/version`.
    Ollama(ChatClient),
    /// `POST {url}/v1/chat/completions`, SSE; ping = `GET {url}/v1/models`.
    OpenAi(ChatClient),
}

/// What both protocols share.
#[derive(Debug)]
pub struct ChatClient {
    endpoint: Endpoint,
    model: String,
    /// `[llm] timeout`: the whole generation, from sending the request to the last token.
    timeout: Duration,
    /// `[llm] connect_timeout`: TCP connect, and the whole of a ping.
    connect_timeout: Duration,
    /// `[llm] first_token_timeout`: from sending the request to the first non-empty token.
    first_token_timeout: Duration,
    temperature: f64,
    max_tokens: u32,
}

impl Generator {
    /// The configured generator, or `None` when `[llm] provider = "none"` (extractive answers
    /// only). Connects lazily: use [`Generator::ping`] to probe.
    pub fn new(config: &LlmConfig) -> Result<Option<Generator>, LlmError> {
        let client = |config: &LlmConfig| -> Result<ChatClient, LlmError> {
            Ok(ChatClient {
                endpoint: Endpoint::new(
                    &config.url,
                    config.api_key.as_deref(),
                    config.connect_timeout,
                )?,
                model: config.model.clone(),
                timeout: config.timeout,
                connect_timeout: config.connect_timeout,
                first_token_timeout: config.first_token_timeout,
                temperature: config.temperature,
                max_tokens: config.max_tokens,
            })
        };
        Ok(match config.provider {
            Provider::None => None,
            Provider::Ollama => Some(Generator::Ollama(client(config)?)),
            Provider::OpenAi => Some(Generator::OpenAi(client(config)?)),
        })
    }

    pub fn model(&self) -> &str {
        &self.client().model
    }

    /// Starts a generation. Returns once the server accepted it (a 2xx with headers), within
    /// `first_token_timeout`; the tokens follow on the stream, which ends cleanly only after
    /// the server said it is done.
    pub async fn stream(&self, messages: &[ChatMessage]) -> Result<TokenStream, LlmError> {
        let client = self.client();
        let (url, body, decoder) = match self {
            Generator::Ollama(c) => (
                c.endpoint.url("/api/chat"),
                json!({
                    "model": c.model,
                    "messages": messages,
                    "stream": true,
                    "options": { "temperature": c.temperature, "num_predict": c.max_tokens },
                }),
                Decoder::Ndjson(NdjsonDecoder::default()),
            ),
            Generator::OpenAi(c) => (
                c.endpoint.url("/v1/chat/completions"),
                json!({
                    "model": c.model,
                    "messages": messages,
                    "stream": true,
                    "temperature": c.temperature,
                    "max_tokens": c.max_tokens,
                }),
                Decoder::Sse(SseDecoder::default()),
            ),
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
            return Err(status_error(&url, response, within).await);
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
        };
        let tokens = futures_util::stream::unfold(Some(pump), |pump| async move {
            let mut pump = pump?;
            match pump.next_token().await {
                Some(Ok(token)) => Some((Ok(token), Some(pump))),
                // An error is the last item: the state (and with it the response) is dropped.
                Some(Err(e)) => Some((Err(e), None)),
                None => None,
            }
        });
        Ok(Box::pin(tokens))
    }

    /// A cheap reachability probe for `/health`: `GET /api/version` (Ollama) or `GET /v1/models`
    /// (OpenAI), the whole exchange bounded by `connect_timeout`.
    pub async fn ping(&self) -> Result<(), LlmError> {
        let client = self.client();
        let url = match self {
            Generator::Ollama(c) => c.endpoint.url("/api/version"),
            Generator::OpenAi(c) => c.endpoint.url("/v1/models"),
        };
        let exchange = async {
            let response = client
                .endpoint
                .get(&url)
                .send()
                .await
                .map_err(|e| request_error(&url, e))?;
            if !response.status().is_success() {
                return Err(status_error(&url, response, client.connect_timeout).await);
            }
            // Read the (small) body so the connection goes back to the pool.
            response.bytes().await.map_err(|e| request_error(&url, e))?;
            Ok(())
        };
        match tokio::time::timeout(client.connect_timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(LlmError::Timeout {
                url,
                kind: TimeoutKind::Ping,
                after: client.connect_timeout,
            }),
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

/// The state behind a [`TokenStream`]: the response body, the decoder, and tokens decoded but
/// not yet handed out (one chunk may hold several).
struct Pump {
    url: String,
    /// Dropping it closes the connection: the upstream sees the client go away.
    body: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>>>>,
    decoder: Decoder,
    ready: VecDeque<String>,
    /// Scratch space for one chunk's events.
    events: Vec<ChatEvent>,
    deadlines: Deadlines,
    got_first_token: bool,
    /// The server said the answer is complete.
    done: bool,
    /// An error to hand out once the tokens decoded before it are gone.
    failed: Option<LlmError>,
    started: Instant,
    tokens: usize,
}

impl Pump {
    async fn next_token(&mut self) -> Option<Result<String, LlmError>> {
        loop {
            if let Some(token) = self.ready.pop_front() {
                self.tokens += 1;
                return Some(Ok(token));
            }
            if let Some(e) = self.failed.take() {
                return Some(Err(e));
            }
            if self.done {
                log::debug!(
                    "generation done: {} tokens in {:?} from {}",
                    self.tokens,
                    self.started.elapsed(),
                    self.url
                );
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
            // Tokens decoded before an error are still handed out, then the error.
            for event in self.events.drain(..) {
                match event {
                    ChatEvent::Token(token) => {
                        self.got_first_token = true;
                        self.ready.push_back(token);
                    }
                    ChatEvent::Done => self.done = true,
                }
            }
            if let Err(e) = decoded {
                self.failed = Some(e.into_llm(&self.url));
            } else if chunk.is_none() && !self.done {
                self.failed = Some(LlmError::Protocol {
                    url: self.url.clone(),
                    reason: format!(
                        "the stream ended before the server said it was done (after {} tokens)",
                        self.tokens + self.ready.len()
                    ),
                });
            }
        }
    }
}
