//! Server-sent events: an answer's [`Event`]s framed as `text/event-stream`, straight from the
//! channel the pipeline writes to. When the client goes away hyper drops this body, the channel
//! closes, and the pipeline drops its upstream generation.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame};
use serde_json::json;
use tokio::sync::mpsc;

use crate::metrics::MetricCells;
use crate::rag::engine::Event;

/// The `event:` name and `data:` JSON of one event.
pub fn encode(event: &Event) -> Bytes {
    let (name, data) = match event {
        Event::Sources(sources) => ("sources", json!({ "sources": sources })),
        Event::Queued { position } => ("queued", json!({ "position": position })),
        Event::Token(text) => ("token", json!({ "text": text })),
        Event::Done { mode, timings, .. } => ("done", json!({ "mode": mode, "timings": timings })),
        Event::Error { message, .. } => ("error", json!({ "error": message })),
    };
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// A response body fed by the answer pipeline.
pub struct EventBody {
    events: mpsc::Receiver<Event>,
    /// Where to count tokens, stage timings and upstream errors (None: metrics off).
    metrics: Option<&'static MetricCells>,
}

impl EventBody {
    pub fn new(events: mpsc::Receiver<Event>, metrics: Option<&'static MetricCells>) -> EventBody {
        EventBody { events, metrics }
    }
}

impl HttpBody for EventBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let metrics = self.metrics;
        self.events.poll_recv(cx).map(|event| {
            event.map(|e| {
                if let Some(cells) = metrics {
                    super::metrics::observe(cells, &e);
                }
                Ok(Frame::data(encode(&e)))
            })
        })
    }
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
