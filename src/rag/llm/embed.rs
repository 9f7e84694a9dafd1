//! Texts -> vectors through an embedding server: Ollama's `POST /api/embed` or OpenAI's
//! `POST /v1/embeddings`.
//!
//! Owns batching, the request and response shapes, and the vector-size check. Does not know
//! what the vectors are for (that is `store`'s business) and never retries: a failed batch is
//! the caller's error to handle.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::{request_error, status_error, Endpoint, LlmError, TimeoutKind};
use crate::config::app::{EmbedConfig, KeepAlive, Provider};

/// Inputs per request: small enough for any server's batch limit, big enough to amortise calls.
pub const EMBED_BATCH: usize = 32;

/// `[embed]` has no connect timeout of its own; this is it (capped by `[embed] timeout`).
const EMBED_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An embedding client for one model on one server (enum dispatch over the two protocols).
#[derive(Debug)]
pub enum Embedder {
    /// `POST {url}/api/embed {"model","input":[..]}` -> `{"embeddings":[[..]]}`.
    Ollama(EmbedClient),
    /// `POST {url}/v1/embeddings {"model","input":[..]}` -> `{"data":[{"embedding":[..],"index":i}]}`.
    OpenAi(EmbedClient),
}

/// What both protocols share.
#[derive(Debug)]
pub struct EmbedClient {
    endpoint: Endpoint,
    model: String,
    /// Bound on each request (one batch), from `[embed] timeout`.
    timeout: Duration,
    /// Vector size: from `[embed] dimensions`, or learned from the first response (0 = not
    /// yet known). Every later response must match it. Atomic only to keep `Embedder: Sync`.
    dimensions: AtomicUsize,
    /// `[embed] dimensions` when set: asked of the server (`dimensions`), so a model that can
    /// shorten its vectors (Ollama, OpenAI's text-embedding-3) does.
    requested_dimensions: Option<usize>,
    /// Sent to Ollama with each request.
    keep_alive: Option<KeepAlive>,
}

#[derive(Deserialize)]
struct OllamaEmbedResponse {
    embeddings: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct OpenAiEmbedResponse {
    data: Vec<OpenAiEmbedding>,
}

#[derive(Deserialize)]
struct OpenAiEmbedding {
    embedding: Vec<f32>,
    index: usize,
}

impl Embedder {
    /// The configured embedder, or `None` when `[embed] provider = "none"` (lexical retrieval).
    /// Connects lazily: an unreachable server is reported by the first [`Embedder::embed`].
    pub fn new(config: &EmbedConfig) -> Result<Option<Embedder>, LlmError> {
        Embedder::for_url(config, &config.url)
    }

    /// One embedder per server of `[embed] url` (all with the same model); empty when
    /// `provider = "none"`.
    pub fn pool(config: &EmbedConfig) -> Result<Vec<Embedder>, LlmError> {
        let mut pool = Vec::with_capacity(config.urls.len());
        for url in &config.urls {
            pool.extend(Embedder::for_url(config, url)?);
        }
        Ok(pool)
    }

    fn for_url(config: &EmbedConfig, url: &str) -> Result<Option<Embedder>, LlmError> {
        let client = |config: &EmbedConfig| -> Result<EmbedClient, LlmError> {
            Ok(EmbedClient {
                endpoint: Endpoint::new(
                    url,
                    config.api_key.as_deref(),
                    EMBED_CONNECT_TIMEOUT.min(config.timeout),
                )?,
                model: config.model.clone(),
                timeout: config.timeout,
                dimensions: AtomicUsize::new(config.dimensions),
                requested_dimensions: Some(config.dimensions).filter(|&d| d > 0),
                keep_alive: config.keep_alive.clone(),
            })
        };
        Ok(match config.provider {
            Provider::None => None,
            Provider::Ollama => Some(Embedder::Ollama(client(config)?)),
            Provider::OpenAi => Some(Embedder::OpenAi(client(config)?)),
        })
    }

    pub fn model(&self) -> &str {
        &self.client().model
    }

    /// The server's base URL (for logs).
    pub fn url(&self) -> String {
        self.client().endpoint.url("")
    }

    /// The vector size, once configured or seen.
    pub fn dimensions(&self) -> Option<usize> {
        Some(self.client().dimensions.load(Ordering::Relaxed)).filter(|&d| d > 0)
    }

    /// One vector per text, in order. Sends [`EMBED_BATCH`] texts per request; each request is
    /// bounded by `[embed] timeout`.
    pub async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, LlmError> {
        let mut vectors = Vec::with_capacity(texts.len());
        for batch in texts.chunks(EMBED_BATCH) {
            let batch_vectors = match self {
                Embedder::Ollama(client) => client.embed_ollama(batch).await?,
                Embedder::OpenAi(client) => client.embed_openai(batch).await?,
            };
            vectors.extend(batch_vectors);
        }
        Ok(vectors)
    }

    /// The vector of one text (a question, say).
    pub async fn embed_one(&self, text: &str) -> Result<Vec<f32>, LlmError> {
        let mut vectors = self.embed(&[text.to_string()]).await?;
        vectors.pop().ok_or_else(|| LlmError::Protocol {
            url: self.client().endpoint.url(""),
            reason: "no vector for one input".into(),
        })
    }

    /// Whether the configured model is there (see [`super::Generator::check_model`]),
    /// within `within`.
    pub async fn check_model(&self, within: Duration) -> Result<(), LlmError> {
        let c = self.client();
        let within = within.min(c.timeout);
        let exchange = async {
            match self {
                Embedder::Ollama(_) => {
                    super::models::ollama_has_model(&c.endpoint, &c.model, within).await
                }
                Embedder::OpenAi(_) => {
                    super::models::openai_has_model(&c.endpoint, &c.model, within).await
                }
            }
        };
        match tokio::time::timeout(within, exchange).await {
            Ok(result) => result,
            Err(_) => Err(LlmError::Timeout {
                url: c.endpoint.url(""),
                kind: TimeoutKind::Ping,
                after: within,
            }),
        }
    }

    fn client(&self) -> &EmbedClient {
        match self {
            Embedder::Ollama(client) | Embedder::OpenAi(client) => client,
        }
    }
}

impl EmbedClient {
    async fn embed_ollama(&self, batch: &[String]) -> Result<Vec<Vec<f32>>, LlmError> {
        let url = self.endpoint.url("/api/embed");
        let mut body = json!({ "model": self.model, "input": batch });
        if let Some(dimensions) = self.requested_dimensions {
            body["dimensions"] = json!(dimensions);
        }
        if let Some(keep_alive) = &self.keep_alive {
            body["keep_alive"] = keep_alive.to_json();
        }
        let response: OllamaEmbedResponse = self.post(&url, &body).await?;
        self.check(&url, batch.len(), response.embeddings)
    }

    async fn embed_openai(&self, batch: &[String]) -> Result<Vec<Vec<f32>>, LlmError> {
        let url = self.endpoint.url("/v1/embeddings");
        let mut body = json!({ "model": self.model, "input": batch });
        if let Some(dimensions) = self.requested_dimensions {
            body["dimensions"] = json!(dimensions);
        }
        let mut response: OpenAiEmbedResponse = self.post(&url, &body).await?;
        response.data.sort_by_key(|d| d.index);
        let in_order = response.data.iter().enumerate().all(|(i, d)| d.index == i);
        if !in_order {
            return Err(LlmError::Protocol {
                url,
                reason: "embedding indices are not 0..n".into(),
            });
        }
        let vectors = response.data.into_iter().map(|d| d.embedding).collect();
        self.check(&url, batch.len(), vectors)
    }

    /// Posts `body` and decodes a JSON answer, all within `[embed] timeout`.
    async fn post<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        body: &serde_json::Value,
    ) -> Result<T, LlmError> {
        let exchange = async {
            let response = self
                .endpoint
                .post_json(url, body)
                .send()
                .await
                .map_err(|e| request_error(url, e))?;
            if !response.status().is_success() {
                return Err(self.missing_or(status_error(url, response, self.timeout).await));
            }
            let bytes = response.bytes().await.map_err(|e| request_error(url, e))?;
            serde_json::from_slice(&bytes).map_err(|e| LlmError::Protocol {
                url: url.to_string(),
                reason: format!("unexpected embedding response ({e})"),
            })
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(LlmError::Timeout {
                    url: url.to_string(),
                    kind: TimeoutKind::Embedding,
                    after: self.timeout,
                })
            })
    }

    /// A 404 that says the model is missing becomes [`LlmError::ModelMissing`].
    fn missing_or(&self, error: LlmError) -> LlmError {
        match &error {
            LlmError::Status {
                url,
                status,
                message,
            } if super::says_model_missing(*status, message) => {
                if url.ends_with("/api/embed") {
                    LlmError::not_pulled(url, &self.model)
                } else {
                    LlmError::not_served(url, &self.model, &[])
                }
            }
            _ => error,
        }
    }

    /// One vector per input, all of the expected size.
    fn check(
        &self,
        url: &str,
        inputs: usize,
        vectors: Vec<Vec<f32>>,
    ) -> Result<Vec<Vec<f32>>, LlmError> {
        if vectors.len() != inputs {
            return Err(LlmError::Protocol {
                url: url.to_string(),
                reason: format!("{} vectors for {inputs} inputs", vectors.len()),
            });
        }
        for vector in &vectors {
            let expected = match self.dimensions.load(Ordering::Relaxed) {
                0 => {
                    self.dimensions.store(vector.len(), Ordering::Relaxed);
                    log::info!(
                        "embedding model {} gives {}-dimensional vectors",
                        self.model,
                        vector.len()
                    );
                    vector.len()
                }
                known => known,
            };
            if vector.len() != expected || expected == 0 {
                return Err(LlmError::Dimensions {
                    model: self.model.clone(),
                    expected,
                    got: vector.len(),
                });
            }
        }
        Ok(vectors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(provider: Provider) -> EmbedConfig {
        EmbedConfig {
            provider,
            url: "http://127.0.0.1:9".into(),
            urls: vec!["http://127.0.0.1:9".into()],
            model: "m".into(),
            api_key: None,
            dimensions: 3,
            timeout: Duration::from_secs(1),
            keep_alive: None,
            languages: Vec::new(),
        }
    }

    #[test]
    fn provider_none_means_no_embedder() {
        assert!(Embedder::new(&config(Provider::None))
            .expect("config")
            .is_none());
        let embedder = Embedder::new(&config(Provider::OpenAi))
            .expect("config")
            .expect("some");
        assert_eq!(embedder.model(), "m");
        assert_eq!(embedder.dimensions(), Some(3));
    }

    #[test]
    fn wrong_size_or_count_is_refused() {
        let Some(Embedder::Ollama(client)) =
            Embedder::new(&config(Provider::Ollama)).expect("config")
        else {
            panic!("an Ollama embedder");
        };
        assert!(client.check("u", 1, vec![vec![0.0; 3]]).is_ok());
        let err = client
            .check("u", 1, vec![vec![0.0; 4]])
            .expect_err("4 != 3");
        assert!(
            matches!(
                err,
                LlmError::Dimensions {
                    expected: 3,
                    got: 4,
                    ..
                }
            ),
            "{err}"
        );
        assert!(matches!(
            client.check("u", 2, vec![vec![0.0; 3]]),
            Err(LlmError::Protocol { .. })
        ));
    }

    #[test]
    fn dimensions_are_learned_from_the_first_response() {
        let mut c = config(Provider::Ollama);
        c.dimensions = 0;
        let Some(Embedder::Ollama(client)) = Embedder::new(&c).expect("config") else {
            panic!("an Ollama embedder");
        };
        assert!(client
            .check("u", 2, vec![vec![0.0; 5], vec![0.0; 5]])
            .is_ok());
        assert!(client.check("u", 1, vec![vec![0.0; 6]]).is_err());
        assert!(
            client.check("u", 1, vec![vec![]]).is_err(),
            "a 0-dimensional answer is refused"
        );
    }
}
