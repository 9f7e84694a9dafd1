//! `POST /api/feedback`: a reader's vote on an answer, `{vote: "up"|"down", question, answer,
//! mode: "generated"|"extractive", source_ids: [...]}` -> 201 `{id}`. Checked here (422 naming
//! the field), kept by the store ([`crate::rag::store::Store::add_feedback`]), counted in
//! `/metrics` (`ragpool_feedback_total{vote}`). Public like `/api/ask`: the page has no login.

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use super::api::{require_json, Api};
use super::routes::BodyLimit;
use super::{json, ApiError, Body};
use crate::rag::feedback::{bounded, new_id, Feedback, Vote, MAX_SOURCE_IDS};

impl Api {
    pub(super) async fn feedback(
        &self,
        request: Request<Incoming>,
        limit: BodyLimit,
    ) -> Result<Response<Body>, ApiError> {
        require_json(&request)?;
        let body = self.body(request, limit).await?;
        let value: Value = serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))?;
        let feedback = read_feedback(&value)?;
        let (id, vote) = (feedback.id.clone(), feedback.vote);
        self.rag.store().add_feedback(feedback).await?;
        if self.config.metrics {
            self.slot.metrics.add_feedback(vote.name());
        }
        Ok(json(StatusCode::CREATED, &json!({ "id": id })))
    }
}

fn read_feedback(value: &Value) -> Result<Feedback, ApiError> {
    let invalid = |what: &str| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, what);
    let text = |name: &str| value.get(name).and_then(Value::as_str);
    let vote = text("vote")
        .and_then(Vote::parse)
        .ok_or_else(|| invalid("`vote` must be \"up\" or \"down\""))?;
    let question = text("question")
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .ok_or_else(|| invalid("`question` must be a non-empty string"))?;
    let answer = text("answer").ok_or_else(|| invalid("`answer` must be a string"))?;
    let mode = text("mode")
        .filter(|m| matches!(*m, "generated" | "extractive"))
        .ok_or_else(|| invalid("`mode` must be \"generated\" or \"extractive\""))?;
    let source_ids = match value.get("source_ids") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(ids)) if ids.len() <= MAX_SOURCE_IDS => ids
            .iter()
            .map(|id| {
                id.as_str()
                    .filter(|id| {
                        !id.is_empty()
                            && id.len() <= 64
                            && id.chars().all(|c| c.is_ascii_hexdigit())
                    })
                    .map(str::to_string)
            })
            .collect::<Option<Vec<String>>>()
            .ok_or_else(|| invalid("`source_ids` must be document ids (hex strings)"))?,
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("`source_ids` must be a list of at most {MAX_SOURCE_IDS} document ids"),
            ))
        }
    };
    Ok(Feedback {
        id: new_id(),
        created_at: unix_now(),
        vote,
        question: bounded(question),
        answer: bounded(answer),
        mode: mode.to_string(),
        source_ids,
    })
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vote_is_checked_field_by_field() {
        let good = json!({ "vote": "down", "question": " q? ", "answer": "a", "mode": "extractive",
                           "source_ids": ["66ab4545f53b9b9e"] });
        let feedback = read_feedback(&good).unwrap();
        assert_eq!(feedback.vote, Vote::Down);
        assert_eq!(feedback.question, "q?");
        assert_eq!(feedback.source_ids, ["66ab4545f53b9b9e"]);
        for (field, bad, says) in [
            ("vote", json!("meh"), "`vote`"),
            ("question", json!(""), "`question`"),
            ("answer", json!(null), "`answer`"),
            ("mode", json!("guessed"), "`mode`"),
            ("source_ids", json!(["../etc"]), "`source_ids`"),
            ("source_ids", json!("abc"), "`source_ids`"),
        ] {
            let mut value = good.clone();
            value[field] = bad;
            let error = read_feedback(&value).unwrap_err();
            assert_eq!(error.status, StatusCode::UNPROCESSABLE_ENTITY);
            assert!(error.message.contains(says), "{}", error.message);
        }
    }
}
