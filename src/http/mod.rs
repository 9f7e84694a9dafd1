//! The HTTP boundary between the pool and the app.
//!
//! A worker hands hyper one [`service::service`] per connection; that service owns the whole
//! request path (client address, limits, overload, routing from the one table in [`routes`],
//! access log and metrics) and calls [`App::handle`] for the app's answer. Nothing here knows
//! about processes or sockets. Errors become status codes in exactly one place,
//! [`ApiError::into_response`] ([`error`]), and bodies never carry internal details; every
//! response body is one type, [`Body`].

pub mod access_log;
pub mod api;
pub mod body;
pub mod error;
pub mod feedback;
pub mod forwarded;
pub mod limits;
pub mod metrics;
pub mod openai;
pub mod routes;
pub mod service;
pub mod sources;
pub mod sse;

use std::rc::Rc;

use hyper::body::Incoming;
use hyper::{Request, Response};

pub use body::{full, json, Body};
pub use error::ApiError;
use routes::Route;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot load the app: {0}")]
    Load(#[from] crate::rag::engine::RagError),
}

/// The application every worker serves. Built after fork, inside the worker's runtime.
pub struct App {
    api: api::Api,
}

impl App {
    pub async fn load(
        config: &std::sync::Arc<Config>,
        board: &'static crate::scoreboard::Scoreboard,
        slot: &'static crate::scoreboard::Slot,
    ) -> Result<App, AppError> {
        let mut rag = crate::rag::engine::Rag::open(config).await?;
        if !config.llm.backends.is_empty() {
            use crate::scoreboard::{BackendLimit, BreakerPolicy, LlmGate};
            let limits = config
                .llm
                .backends
                .iter()
                .map(|b| BackendLimit {
                    max_concurrent: b.max_concurrent as u64,
                })
                .collect();
            let breaker = BreakerPolicy {
                failures: u64::from(config.llm.breaker_failures),
                cooldown_ms: config.llm.breaker_cooldown.as_millis() as u64,
            };
            let gate = LlmGate::new(board, slot, config.llm.max_concurrent, limits, breaker);
            rag.set_gate(Box::new(gate));
        }
        if config.embed.provider != crate::config::Provider::None {
            let breaker = crate::scoreboard::BreakerPolicy {
                failures: u64::from(config.llm.breaker_failures),
                cooldown_ms: config.llm.breaker_cooldown.as_millis() as u64,
            };
            let count = config.embed.urls.len();
            let gate = crate::scoreboard::LlmGate::embedding(board, slot, count, breaker);
            rag.set_embed_gate(Box::new(gate));
        }
        let rag = Rc::new(rag);
        tokio::task::spawn_local(Rc::clone(&rag).run_backend_probes());
        Ok(App {
            api: api::Api {
                sources: Rc::new(sources::PublicSources::new(&config.rag.docs_dir)),
                rag,
                admin_token: config.admin_token.clone(),
                board,
                slot,
                config: std::sync::Arc::clone(config),
            },
        })
    }

    pub fn rag(&self) -> &Rc<crate::rag::engine::Rag> {
        &self.api.rag
    }

    /// The app's answer to a request that passed the head limits.
    pub async fn handle(
        &self,
        request: Request<Incoming>,
        route: Route,
        client: forwarded::Client,
    ) -> Response<Body> {
        match self.api.route(request, route, client).await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        }
    }
}

// The scoreboard maps cells for as many LLM backends as a config may list.
const _: () = assert!(crate::config::app::MAX_LLM_BACKENDS == crate::scoreboard::MAX_LLM_BACKENDS);

impl crate::rag::engine::GenerationGate for crate::scoreboard::LlmGate {
    fn enqueue(&self) -> u64 {
        crate::scoreboard::LlmGate::enqueue(self)
    }
    fn try_admit(&self, tried: u64) -> crate::rag::engine::Admit {
        use crate::rag::engine::Admit as A;
        use crate::scoreboard::Admit as S;
        match crate::scoreboard::LlmGate::try_admit(self, tried) {
            S::Backend(index) => A::Backend(index),
            S::Full => A::Full,
            S::Unavailable => A::Unavailable,
        }
    }
    fn try_take(&self, tried: u64) -> Option<usize> {
        match crate::scoreboard::LlmGate::try_take(self, tried) {
            crate::scoreboard::Admit::Backend(index) => Some(index),
            _ => None,
        }
    }
    fn position(&self, ticket: u64) -> u64 {
        crate::scoreboard::LlmGate::position(self, ticket)
    }
    fn abandon(&self) {
        crate::scoreboard::LlmGate::abandon(self)
    }
    fn release(&self, backend: usize) {
        crate::scoreboard::LlmGate::release(self, backend)
    }
    fn record(&self, backend: usize, ok: bool) -> bool {
        match ok {
            true => {
                self.record_success(backend);
                false
            }
            false => self.record_failure(backend),
        }
    }
    fn claim_probe(&self, backend: usize) -> bool {
        crate::scoreboard::LlmGate::claim_probe(self, backend)
    }
    fn probe_passed(&self, backend: usize) {
        crate::scoreboard::LlmGate::probe_passed(self, backend)
    }
}
