//! The route table: every path the app answers, its metrics label, its body limit, and which
//! method does what. Routing ([`Route::of`]) and the `route` label of `/metrics` are both read
//! from [`TABLE`], so a new endpoint is one line here. Decided on the borrowed method and path
//! alone (no allocation). Handlers live in [`super::api`]; nothing here reads a body.

use hyper::Method;

use crate::config::RequestLimits;
use crate::metrics::ROUTES as LABELS;

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Page,
    Health,
    Metrics,
    Status,
    Ask,
    AskStream,
    ListDocuments,
    Upload,
    /// `GET /api/documents/{id}`: the read-only document view (public, like the listing).
    GetDocument,
    Delete,
    /// `POST /api/feedback`: a vote on an answer.
    Feedback,
    /// `POST /v1/chat/completions` and `GET /v1/models`: the OpenAI-compatible API.
    ChatCompletions,
    Models,
}

/// Which limit a route's request body has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLimit {
    /// `max_body_size`: document uploads (and everything that has no body to speak of).
    Upload,
    /// `json_body_limit`: a JSON question.
    Json,
}

impl BodyLimit {
    pub fn bytes(self, limits: &RequestLimits) -> (u64, &'static str) {
        match self {
            BodyLimit::Upload => (limits.body, "max_body_size"),
            BodyLimit::Json => (limits.json_body.min(limits.body), "json_body_limit"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verb {
    Get,
    Head,
    Post,
    Delete,
}

#[derive(Debug, Clone, Copy)]
enum PathMatch {
    Exact(&'static str),
    /// The path starts with this (the rest is the handler's).
    Under(&'static str),
}

struct Entry {
    path: PathMatch,
    /// The `route` label in `/metrics`: one of [`crate::metrics::ROUTES`].
    label: &'static str,
    methods: &'static [(Verb, Endpoint)],
    body: BodyLimit,
}

use Endpoint as E;
use Verb::{Delete, Get, Head, Post};

/// The app's routes.
const TABLE: &[Entry] = &[
    Entry {
        path: PathMatch::Exact("/"),
        label: "page",
        methods: &[(Get, E::Page), (Head, E::Page)],
        body: BodyLimit::Upload,
    },
    Entry {
        path: PathMatch::Exact("/health"),
        label: "health",
        methods: &[(Get, E::Health), (Head, E::Health)],
        body: BodyLimit::Upload,
    },
    Entry {
        path: PathMatch::Exact("/metrics"),
        label: "metrics",
        methods: &[(Get, E::Metrics)],
        body: BodyLimit::Upload,
    },
    Entry {
        path: PathMatch::Exact("/status"),
        label: "status",
        methods: &[(Get, E::Status)],
        body: BodyLimit::Upload,
    },
    Entry {
        path: PathMatch::Exact("/api/ask"),
        label: "ask",
        methods: &[(Post, E::Ask)],
        body: BodyLimit::Json,
    },
    Entry {
        path: PathMatch::Exact("/api/ask/stream"),
        label: "ask_stream",
        methods: &[(Post, E::AskStream)],
        body: BodyLimit::Json,
    },
    Entry {
        path: PathMatch::Exact("/api/documents"),
        label: "documents",
        methods: &[(Get, E::ListDocuments), (Post, E::Upload)],
        body: BodyLimit::Upload,
    },
    Entry {
        path: PathMatch::Under("/api/documents/"),
        label: "documents",
        methods: &[(Get, E::GetDocument), (Delete, E::Delete)],
        body: BodyLimit::Upload,
    },
    Entry {
        path: PathMatch::Exact("/api/feedback"),
        label: "feedback",
        methods: &[(Post, E::Feedback)],
        body: BodyLimit::Json,
    },
    Entry {
        path: PathMatch::Exact("/v1/chat/completions"),
        label: "openai",
        methods: &[(Post, E::ChatCompletions)],
        body: BodyLimit::Json,
    },
    Entry {
        path: PathMatch::Exact("/v1/models"),
        label: "openai",
        methods: &[(Get, E::Models)],
        body: BodyLimit::Upload,
    },
];

/// Label of a path no entry matches: under `/api/` it is an API 404, else anything else.
const API_PREFIX: &str = "/api/";

/// Where a request goes, and how it is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// `Err(true)`: the path exists but not with this method (405); `Err(false)`: 404.
    pub endpoint: Result<Endpoint, bool>,
    /// Index into [`crate::metrics::ROUTES`].
    pub label: usize,
    pub body: BodyLimit,
}

impl Route {
    pub fn of(method: &Method, path: &str) -> Route {
        let verb = match *method {
            Method::GET => Some(Get),
            Method::HEAD => Some(Head),
            Method::POST => Some(Post),
            Method::DELETE => Some(Delete),
            _ => None,
        };
        for entry in TABLE {
            let matched = match entry.path {
                PathMatch::Exact(p) => path == p,
                PathMatch::Under(p) => path.starts_with(p),
            };
            if !matched {
                continue;
            }
            let endpoint = entry
                .methods
                .iter()
                .find(|(v, _)| Some(*v) == verb)
                .map(|(_, e)| *e)
                // A document id with the wrong method is not a resource we know: 404, as before.
                .ok_or(matches!(entry.path, PathMatch::Exact(_)));
            return Route {
                endpoint,
                label: label_index(entry.label),
                body: entry.body,
            };
        }
        let label = if path.starts_with(API_PREFIX) {
            "not_found"
        } else {
            "other"
        };
        Route {
            endpoint: Err(false),
            label: label_index(label),
            body: BodyLimit::Upload,
        }
    }
}

fn label_index(label: &str) -> usize {
    LABELS
        .iter()
        .position(|l| *l == label)
        .unwrap_or(LABELS.len() - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_is_a_metrics_label() {
        for entry in TABLE {
            assert!(LABELS.contains(&entry.label), "{}", entry.label);
        }
        assert!(LABELS.contains(&"not_found") && LABELS.contains(&"other"));
    }

    #[test]
    fn routes_and_labels_come_from_one_table() {
        let label = |m: &Method, p: &str| LABELS[Route::of(m, p).label];
        assert_eq!(Route::of(&Method::GET, "/").endpoint, Ok(E::Page));
        assert_eq!(Route::of(&Method::HEAD, "/health").endpoint, Ok(E::Health));
        assert_eq!(Route::of(&Method::POST, "/api/ask").endpoint, Ok(E::Ask));
        assert_eq!(Route::of(&Method::POST, "/api/ask").body, BodyLimit::Json);
        assert_eq!(Route::of(&Method::GET, "/api/ask").endpoint, Err(true));
        assert_eq!(
            Route::of(&Method::DELETE, "/api/documents/ab12").endpoint,
            Ok(E::Delete)
        );
        assert_eq!(
            Route::of(&Method::GET, "/api/documents/ab12").endpoint,
            Ok(E::GetDocument)
        );
        assert_eq!(
            Route::of(&Method::POST, "/api/documents/ab12").endpoint,
            Err(false)
        );
        assert_eq!(label(&Method::GET, "/api/documents/ab12"), "documents");
        assert_eq!(label(&Method::POST, "/api/ask/stream"), "ask_stream");
        assert_eq!(
            Route::of(&Method::POST, "/v1/chat/completions").endpoint,
            Ok(E::ChatCompletions)
        );
        assert_eq!(
            Route::of(&Method::GET, "/v1/models").endpoint,
            Ok(E::Models)
        );
        assert_eq!(label(&Method::GET, "/v1/models"), "openai");
        assert_eq!(
            Route::of(&Method::POST, "/api/feedback").body,
            BodyLimit::Json
        );
        assert_eq!(label(&Method::GET, "/api/nope"), "not_found");
        assert_eq!(label(&Method::GET, "/nope"), "other");
        assert_eq!(label(&Method::PUT, "/health"), "health");
    }
}
