//! "Is the configured model there?" for the generation and embedding clients: Ollama's model
//! list (`GET /api/tags`, then `POST /api/show` for a name the list does not spell the same
//! way) and OpenAI's (`GET /v1/models`).
//!
//! Owns only these lookups and their answer shapes; the bound on the whole exchange and the
//! caching of results are the callers'.

use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::{ollama_model_name, request_error, status_error, Endpoint, LlmError};

#[derive(Deserialize)]
struct OllamaTags {
    #[serde(default)]
    models: Vec<OllamaModel>,
}

#[derive(Deserialize)]
struct OllamaModel {
    #[serde(default)]
    name: String,
    #[serde(default)]
    model: String,
}

#[derive(Deserialize)]
struct OpenAiModels {
    #[serde(default)]
    data: Vec<OpenAiModel>,
}

#[derive(Deserialize)]
struct OpenAiModel {
    id: String,
}

/// Ok when Ollama at `endpoint` has `model`; [`LlmError::ModelMissing`] when it does not.
pub(crate) async fn ollama_has_model(
    endpoint: &Endpoint,
    model: &str,
    within: Duration,
) -> Result<(), LlmError> {
    let url = endpoint.url("/api/tags");
    let tags: OllamaTags = get_json(endpoint, &url, within).await?;
    let wanted = ollama_model_name(model);
    let listed = tags
        .models
        .iter()
        .any(|m| ollama_model_name(&m.name) == wanted || ollama_model_name(&m.model) == wanted);
    if listed {
        return Ok(());
    }
    // Not under that spelling: ask Ollama to resolve the name itself.
    let url = endpoint.url("/api/show");
    let response = endpoint
        .post_json(&url, &json!({ "model": model }))
        .send()
        .await
        .map_err(|e| request_error(&url, e))?;
    match response.status().as_u16() {
        200..=299 => {
            response.bytes().await.map_err(|e| request_error(&url, e))?;
            Ok(())
        }
        404 => Err(LlmError::not_pulled(&url, model)),
        _ => Err(status_error(&url, response, within).await),
    }
}

/// Ok when the OpenAI-compatible server at `endpoint` lists `model` in `/v1/models`.
pub(crate) async fn openai_has_model(
    endpoint: &Endpoint,
    model: &str,
    within: Duration,
) -> Result<(), LlmError> {
    let url = endpoint.url("/v1/models");
    let models: OpenAiModels = get_json(endpoint, &url, within).await?;
    let served: Vec<String> = models.data.into_iter().map(|m| m.id).collect();
    if served.iter().any(|id| id.eq_ignore_ascii_case(model)) {
        Ok(())
    } else {
        Err(LlmError::not_served(&url, model, &served))
    }
}

async fn get_json<T: serde::de::DeserializeOwned>(
    endpoint: &Endpoint,
    url: &str,
    within: Duration,
) -> Result<T, LlmError> {
    let response = endpoint
        .get(url)
        .send()
        .await
        .map_err(|e| request_error(url, e))?;
    if !response.status().is_success() {
        return Err(status_error(url, response, within).await);
    }
    let bytes = response.bytes().await.map_err(|e| request_error(url, e))?;
    serde_json::from_slice(&bytes).map_err(|e| LlmError::Protocol {
        url: url.to_string(),
        reason: format!("unexpected model list ({e})"),
    })
}

#[cfg(test)]
mod tests {
    use super::super::{ollama_model_name, says_model_missing};

    #[test]
    fn ollama_names_resolve_as_ollama_does() {
        assert_eq!(ollama_model_name("llama3.2"), "llama3.2:latest");
        assert_eq!(ollama_model_name("Llama3.2:latest"), "llama3.2:latest");
        assert_eq!(
            ollama_model_name("registry.ollama.ai/library/qwen3:8b"),
            "qwen3:8b"
        );
        assert_eq!(
            ollama_model_name("hf.co/bartowski/Qwen3-8B-GGUF"),
            "hf.co/bartowski/qwen3-8b-gguf:latest"
        );
        assert_eq!(ollama_model_name("me/m:q4"), "me/m:q4");
    }

    #[test]
    fn missing_model_messages_are_recognised() {
        assert!(says_model_missing(404, "model 'llama3.2' not found"));
        assert!(says_model_missing(
            404,
            "The model `gpt-5` does not exist or you do not have access to it."
        ));
        assert!(!says_model_missing(404, "404 page not found"));
        assert!(!says_model_missing(500, "model 'x' not found"));
    }
}
