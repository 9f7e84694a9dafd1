//! The one response body type: a full buffer, or an answer's events as server-sent events
//! (ragpool's own, or OpenAI's chunks: [`Wire`]).
//!
//! It also carries the request's [`RequestGuard`] once the service attaches it, so the access
//! line and the counters are written when the body ends or is dropped (a client that goes away
//! mid-stream), whichever comes first. No `Box<dyn Body>`: one enum, no allocation per request.
//! Not `Send`: a worker is one thread.

use std::convert::Infallible;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};
use tokio::sync::mpsc;

use super::service::RequestGuard;
use super::sources::PublicSources;
use crate::metrics::MetricCells;
use crate::rag::engine::Event;

pub struct Body {
    kind: Kind,
    /// Finishes the request (access line, counters) when the body ends or is dropped.
    guard: Option<RequestGuard>,
}

enum Kind {
    /// `None` once sent.
    Full(Option<Bytes>),
    /// Fed by the answer pipeline; when the client goes away hyper drops the body, the channel
    /// closes, and the pipeline drops its upstream generation.
    Events {
        events: mpsc::Receiver<Event>,
        /// Where to count tokens, stage timings and upstream errors (None: metrics off).
        metrics: Option<&'static MetricCells>,
        /// Sources are shown as the public may see them.
        public: Rc<PublicSources>,
        wire: Wire,
    },
}

/// How an answer's events are framed.
pub enum Wire {
    /// ragpool's own: `event: NAME` + `data: JSON` per event ([`super::sse`]).
    Events,
    /// OpenAI's `chat.completion.chunk`s, then `data: [DONE]` ([`super::openai`]).
    OpenAi(super::openai::ChunkStream),
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Body {
        Body {
            kind: Kind::Full(Some(bytes.into())),
            guard: None,
        }
    }

    pub fn events(
        events: mpsc::Receiver<Event>,
        metrics: Option<&'static MetricCells>,
        public: Rc<PublicSources>,
        wire: Wire,
    ) -> Body {
        Body {
            kind: Kind::Events {
                events,
                metrics,
                public,
                wire,
            },
            guard: None,
        }
    }

    pub(super) fn finish_with(mut self, guard: RequestGuard) -> Body {
        self.guard = Some(guard);
        self
    }
}

/// A full body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Body::full(bytes)
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Body::full(value.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let polled = match &mut this.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(Frame::data)),
            Kind::Events {
                events,
                metrics,
                public,
                wire,
            } => loop {
                let Poll::Ready(event) = events.poll_recv(cx) else {
                    break Poll::Pending;
                };
                let Some(mut event) = event else {
                    break Poll::Ready(None);
                };
                if let Some(cells) = metrics {
                    super::metrics::observe(cells, &event);
                }
                if let Event::Sources(sources) = &mut event {
                    public.apply(sources);
                }
                let data = match wire {
                    Wire::Events => Some(super::sse::encode(&event)),
                    Wire::OpenAi(chunks) => chunks.encode(&event),
                };
                // An event this wire does not show: take the next one.
                if let Some(data) = data {
                    break Poll::Ready(Some(Frame::data(data)));
                }
            },
        };
        match &polled {
            Poll::Ready(Some(frame)) => {
                if let (Some(data), Some(guard)) = (frame.data_ref(), this.guard.as_mut()) {
                    guard.add_bytes(data.len());
                }
            }
            Poll::Ready(None) => drop(this.guard.take()),
            Poll::Pending => {}
        }
        polled.map(|frame| frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        matches!(&self.kind, Kind::Full(bytes) if bytes.as_ref().is_none_or(Bytes::is_empty))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Events { .. } => SizeHint::default(),
        }
    }
}
