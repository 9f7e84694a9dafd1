//! Passages -> relevance scores through a reranking server: `POST /v1/rerank
//! {"model", "query", "documents": [..], "top_n"}`, the API llama.cpp's server (`--reranking`),
//! vLLM, Infinity and Jina serve, answered by `{"results": [{"index", "relevance_score"}]}`.
//! TEI's bare list `[{"index", "score"}]` is read as well.
//!
//! Owns the request and response shapes and their checks; what the scores are used for is the
//! engine's business. Never retries: a failure is the caller's to handle (it keeps the fused
//! order).

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::{request_error, status_error, Endpoint, LlmError, TimeoutKind};
use crate::config::RerankConfig;

/// `[rerank]` has no connect timeout of its own; this is it (capped by `[rerank] timeout`).
const RERANK_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A client for one reranking model on one server.
#[derive(Debug)]
pub struct Reranker {
    endpoint: Endpoint,
    model: String,
    /// Bound on each request, from `[rerank] timeout`.
    timeout: Duration,
}

/// Either shape: `{"results": [..]}` or a bare list.
#[derive(Deserialize)]
#[serde(untagged)]
enum RerankResponse {
    Wrapped { results: Vec<RerankResult> },
    Bare(Vec<RerankResult>),
}

#[derive(Deserialize)]
struct RerankResult {
    index: usize,
    #[serde(alias = "score")]
    relevance_score: f32,
}

impl Reranker {
    /// The configured reranker, or `None` when `[rerank] url` is empty.
    pub fn new(config: &RerankConfig) -> Result<Option<Reranker>, LlmError> {
        let Some(url) = &config.url else {
            return Ok(None);
        };
        Ok(Some(Reranker {
            endpoint: Endpoint::new(
                url,
                config.api_key.as_deref(),
                RERANK_CONNECT_TIMEOUT.min(config.timeout),
            )?,
            model: config.model.clone(),
            timeout: config.timeout,
        }))
    }

    /// One score per passage, in the passages' order (higher = more relevant). A passage the
    /// server left out of its answer gets `f32::NEG_INFINITY`, so it sorts last.
    pub async fn scores(&self, query: &str, passages: &[String]) -> Result<Vec<f32>, LlmError> {
        let url = self.endpoint.url("/v1/rerank");
        let body = json!({
            "model": self.model,
            "query": query,
            "documents": passages,
            "top_n": passages.len(),
        });
        let exchange = async {
            let response = self
                .endpoint
                .post_json(&url, &body)
                .send()
                .await
                .map_err(|e| request_error(&url, e))?;
            if !response.status().is_success() {
                return Err(status_error(&url, response, self.timeout).await);
            }
            let bytes = response.bytes().await.map_err(|e| request_error(&url, e))?;
            let decoded: RerankResponse =
                serde_json::from_slice(&bytes).map_err(|e| LlmError::Protocol {
                    url: url.clone(),
                    reason: format!("unexpected rerank response ({e})"),
                })?;
            scores_in_order(&url, decoded, passages.len())
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(LlmError::Timeout {
                    url: url.clone(),
                    kind: TimeoutKind::Rerank,
                    after: self.timeout,
                })
            })
    }
}

/// The results as one score per passage; an index out of range or a NaN is a protocol error.
fn scores_in_order(url: &str, response: RerankResponse, n: usize) -> Result<Vec<f32>, LlmError> {
    let results = match response {
        RerankResponse::Wrapped { results } | RerankResponse::Bare(results) => results,
    };
    let mut scores = vec![f32::NEG_INFINITY; n];
    for result in results {
        if result.index >= n || result.relevance_score.is_nan() {
            return Err(LlmError::Protocol {
                url: url.to_string(),
                reason: format!(
                    "rerank result index {} (of {n}) or score {} is invalid",
                    result.index, result.relevance_score
                ),
            });
        }
        scores[result.index] = result.relevance_score;
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_response_shapes_give_scores_in_passage_order() {
        let wrapped: RerankResponse = serde_json::from_str(
            r#"{"model":"m","results":[{"index":1,"relevance_score":0.9},{"index":0,"relevance_score":0.1}]}"#,
        )
        .unwrap();
        assert_eq!(
            scores_in_order("u", wrapped, 3).unwrap(),
            vec![0.1, 0.9, f32::NEG_INFINITY]
        );
        let bare: RerankResponse =
            serde_json::from_str(r#"[{"index":0,"score":2.5},{"index":1,"score":-1.0}]"#).unwrap();
        assert_eq!(scores_in_order("u", bare, 2).unwrap(), vec![2.5, -1.0]);
        let out_of_range: RerankResponse =
            serde_json::from_str(r#"{"results":[{"index":5,"relevance_score":1.0}]}"#).unwrap();
        assert!(scores_in_order("u", out_of_range, 2).is_err());
    }
}
