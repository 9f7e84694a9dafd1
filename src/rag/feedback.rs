//! Feedback on answers: a reader's thumbs up or down, with the question, the answer, how it
//! was made and the documents it cited, so an operator can see which questions the documents
//! fail (`ragpool feedback export`). Plain data and its checks; the stores keep it
//! ([`super::store::Store::add_feedback`]), the HTTP layer reads it from requests.

use serde::Serialize;

/// Longest question or answer kept with a vote, in characters (longer ones are cut): a vote
/// is a pointer for the operator, not an archive, and a client cannot fill the store with one.
pub const MAX_TEXT_CHARS: usize = 20_000;
/// Most source ids kept with a vote.
pub const MAX_SOURCE_IDS: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Vote {
    Up,
    Down,
}

impl Vote {
    pub fn parse(text: &str) -> Option<Vote> {
        match text {
            "up" => Some(Vote::Up),
            "down" => Some(Vote::Down),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Vote::Up => "up",
            Vote::Down => "down",
        }
    }
}

/// One vote as stored and exported (one JSON line each).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Feedback {
    /// 16 hex digits, unique per vote (see [`new_id`]).
    pub id: String,
    /// Unix seconds.
    pub created_at: i64,
    pub vote: Vote,
    pub question: String,
    pub answer: String,
    /// "generated" or "extractive", as the answer said.
    pub mode: String,
    /// The `document_id`s of the answer's sources, in their order.
    pub source_ids: Vec<String>,
}

/// A fresh vote id: the pid, a per-process counter and the clock in nanoseconds, hashed
/// (unique across the workers sharing a store; not a secret, so no RNG).
pub fn new_id() -> String {
    use sha2::{Digest, Sha256};
    use std::sync::atomic::{AtomicU64, Ordering};
    static VOTES: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = VOTES.fetch_add(1, Ordering::Relaxed);
    let digest = Sha256::digest(format!("vote/{}/{n}/{nanos}", std::process::id()));
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// `text` cut to [`MAX_TEXT_CHARS`].
pub fn bounded(text: &str) -> String {
    text.chars().take(MAX_TEXT_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_hex() {
        let (a, b) = (new_id(), new_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(Vote::parse("up"), Some(Vote::Up));
        assert_eq!(Vote::parse("UP"), None);
        assert_eq!(
            bounded(&"я".repeat(MAX_TEXT_CHARS + 5)).chars().count(),
            MAX_TEXT_CHARS
        );
    }
}
