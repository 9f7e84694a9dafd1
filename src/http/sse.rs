//! Server-sent events: how one answer [`Event`] is framed as `text/event-stream`. The body
//! that streams them is [`super::body::Body`]; this module only knows the wire format.

use bytes::Bytes;
use serde_json::json;

use crate::rag::engine::Event;

/// The `event:` name and `data:` JSON of one event.
pub fn encode(event: &Event) -> Bytes {
    let (name, data) = match event {
        Event::Standalone { query, by } => ("standalone", json!({ "query": query, "by": by })),
        Event::Sources(sources) => ("sources", json!({ "sources": sources })),
        Event::Queued { position } => ("queued", json!({ "position": position })),
        Event::Reasoning(text) => ("reasoning", json!({ "text": text })),
        Event::Token(text) => ("token", json!({ "text": text })),
        Event::Done {
            mode,
            timings,
            truncated,
            ..
        } => (
            "done",
            json!({ "mode": mode, "truncated": truncated, "timings": timings }),
        ),
        Event::Error { message, .. } => ("error", json!({ "error": message })),
    };
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_framed_as_sse() {
        let token = encode(&Event::Token("при\"вет\n".into()));
        assert_eq!(
            &token[..],
            "event: token\ndata: {\"text\":\"при\\\"вет\\n\"}\n\n".as_bytes()
        );
        let error = encode(&Event::Error {
            message: "down".into(),
            backend: "ollama",
        });
        assert!(error.starts_with(b"event: error\ndata: {\"error\":\"down\"}"));
    }
}
