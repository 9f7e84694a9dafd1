//! Conversations: the previous turns a client sends with a follow-up question, their bounds,
//! and the standalone form of the follow-up that retrieval searches for.
//!
//! The server keeps no conversation state: the client sends the turns every time, so any
//! worker can answer any turn. Pure functions only (no I/O): the LLM call that rewrites a
//! follow-up is made by [`super::engine`], which falls back to [`fallback_standalone`] when
//! there is no LLM, or it fails, times out or says nothing usable.

use super::llm::{ChatMessage, Role};
use super::text::{is_stop_word, words};

/// One earlier turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    /// `Role::User` or `Role::Assistant` (never `System`: a client cannot set the prompt).
    pub role: Role,
    pub content: String,
}

/// How much history one request may carry (`[rag] max_history_turns`, `max_history_chars`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    pub turns: usize,
    pub chars: usize,
}

/// Why a history is refused; the message is safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error("`history` has {given} turns; the limit is {limit} (rag.max_history_turns)")]
    TooManyTurns { given: usize, limit: usize },
    #[error("`history` has {given} characters; the limit is {limit} (rag.max_history_chars)")]
    TooManyChars { given: usize, limit: usize },
}

/// Checks `history` against `limits`.
pub fn check_limits(history: &[Turn], limits: HistoryLimits) -> Result<(), HistoryError> {
    if history.len() > limits.turns {
        return Err(HistoryError::TooManyTurns {
            given: history.len(),
            limit: limits.turns,
        });
    }
    let chars: usize = history.iter().map(|t| t.content.chars().count()).sum();
    if chars > limits.chars {
        return Err(HistoryError::TooManyChars {
            given: chars,
            limit: limits.chars,
        });
    }
    Ok(())
}

/// Most words taken from the previous question into a fallback query.
const FALLBACK_TERMS: usize = 8;
/// Longest standalone question accepted from the LLM, in characters (a longer reply is an
/// answer, not a question).
const MAX_REWRITE_CHARS: usize = 400;

/// The follow-up plus the salient words (not stop words, not already in it) of the last user
/// turn: "and under systemd?" after "how do I reload the workers?" searches for
/// "and under systemd? reload workers".
pub fn fallback_standalone(question: &str, history: &[Turn]) -> String {
    let Some(previous) = history.iter().rev().find(|t| t.role == Role::User) else {
        return question.to_string();
    };
    let present: Vec<String> = words(question).map(|(_, w)| w.to_lowercase()).collect();
    let mut added: Vec<String> = Vec::new();
    for (_, word) in words(&previous.content) {
        let lower = word.to_lowercase();
        if is_stop_word(&lower) || present.contains(&lower) || added.contains(&lower) {
            continue;
        }
        added.push(lower);
        if added.len() == FALLBACK_TERMS {
            break;
        }
    }
    if added.is_empty() {
        return question.to_string();
    }
    format!("{} {}", question.trim(), added.join(" "))
}

/// Token budget of the rewrite call: one short question.
pub const REWRITE_MAX_TOKENS: u32 = 96;

/// The system prompt of the rewrite call. The fake Ollama of the tests recognises a rewrite
/// request by the words "standalone question".
pub const REWRITE_PROMPT: &str =
    "Rewrite the user's last message as a standalone question that can be \
     understood without the conversation, in the language of that message. Reply with the \
     standalone question only, no explanation.";

/// The messages of the short LLM call that rewrites a follow-up.
pub fn rewrite_messages(question: &str, history: &[Turn]) -> Vec<ChatMessage> {
    let mut conversation = String::new();
    for turn in history {
        let who = if turn.role == Role::User {
            "User"
        } else {
            "Assistant"
        };
        conversation.push_str(who);
        conversation.push_str(": ");
        conversation.push_str(turn.content.trim());
        conversation.push('\n');
    }
    vec![
        ChatMessage::system(REWRITE_PROMPT),
        ChatMessage::user(format!(
            "Conversation:\n{conversation}\nLast message: {}\n\nStandalone question:",
            question.trim()
        )),
    ]
}

/// The LLM's reply as a query, or `None` when it is empty or too long to be a question.
pub fn clean_rewrite(reply: &str) -> Option<String> {
    let line = reply.trim().lines().next().unwrap_or("").trim();
    let line = line
        .trim_start_matches("Standalone question:")
        .trim()
        .trim_matches('"')
        .trim();
    let chars = line.chars().count();
    (chars > 0 && chars <= MAX_REWRITE_CHARS).then(|| line.to_string())
}

/// The turns the answering LLM sees, as chat messages, oldest first.
pub fn history_messages(history: &[Turn]) -> Vec<ChatMessage> {
    history
        .iter()
        .map(|t| ChatMessage {
            role: t.role,
            content: t.content.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> Turn {
        Turn {
            role: Role::User,
            content: text.into(),
        }
    }

    fn assistant(text: &str) -> Turn {
        Turn {
            role: Role::Assistant,
            content: text.into(),
        }
    }

    #[test]
    fn the_fallback_adds_the_previous_questions_salient_words() {
        let history = [
            user("how do I reload the workers?"),
            assistant("Send HUP to the master [1]."),
        ];
        assert_eq!(
            fallback_standalone("and under systemd?", &history),
            "and under systemd? reload workers"
        );
        assert_eq!(fallback_standalone("hi", &[]), "hi");
        let ru = [user("как перезагрузить воркеры?")];
        assert_eq!(
            fallback_standalone("а под systemd?", &ru),
            "а под systemd? перезагрузить воркеры"
        );
    }

    #[test]
    fn limits_count_turns_and_characters() {
        let limits = HistoryLimits {
            turns: 2,
            chars: 10,
        };
        assert_eq!(check_limits(&[user("12345")], limits), Ok(()));
        assert_eq!(
            check_limits(&[user("1"), user("2"), user("3")], limits),
            Err(HistoryError::TooManyTurns { given: 3, limit: 2 })
        );
        assert_eq!(
            check_limits(&[user("привет"), user("мир!!")], limits),
            Err(HistoryError::TooManyChars {
                given: 11,
                limit: 10
            })
        );
    }

    #[test]
    fn a_rewrite_is_one_short_line() {
        assert_eq!(
            clean_rewrite("\"How do I reload under systemd?\"\n"),
            Some("How do I reload under systemd?".into())
        );
        assert_eq!(clean_rewrite("  "), None);
        assert_eq!(clean_rewrite(&"x".repeat(500)), None);
        let messages = rewrite_messages("and under systemd?", &[user("reload?")]);
        assert!(messages[0].content.contains("standalone question"));
        assert!(messages[1].content.contains("User: reload?"));
        assert!(messages[1]
            .content
            .contains("Last message: and under systemd?"));
    }
}
