//! `/metrics` (Prometheus text format 0.0.4) and `/status` (JSON), both for the whole pool,
//! read from the shared scoreboard by whichever worker the request lands on. Recording of
//! answer events (tokens, stage timings, upstream errors) happens here too.

use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::config::app::LlmBackend;
use crate::metrics::{MetricCells, BACKENDS, BUCKETS, CAUSES, ROUTES, STAGES, STATUSES, VOTES};
use crate::rag::engine::Event;
use crate::rag::StoreStats;
use crate::scoreboard::{unix_ms, BackendView, BreakerState, Scoreboard, SlotState, WorkerView};

/// Counts what an answer event says about the RAG path.
pub fn observe(cells: &MetricCells, event: &Event) {
    match event {
        Event::Token(_) => cells.add_tokens(1),
        Event::Done {
            timings,
            upstream_error,
            truncated,
            ..
        } => {
            if *truncated {
                cells.add_truncated(1);
            }
            let ms = |v: f64| std::time::Duration::from_secs_f64(v.max(0.0) / 1000.0);
            if timings.embed_ms > 0.0 {
                cells.record_stage("embed", ms(timings.embed_ms));
            }
            cells.record_stage("retrieve", ms(timings.retrieve_ms));
            cells.record_stage("generate", ms(timings.generate_ms));
            if let Some(first) = timings.first_token_ms {
                cells.record_stage("first_token", ms(first));
            }
            if let Some(backend) = upstream_error {
                cells.upstream_error(backend);
            }
        }
        Event::Error { backend, .. } => cells.upstream_error(backend),
        Event::Sources(_)
        | Event::Standalone { .. }
        | Event::Queued { .. }
        | Event::Reasoning(_) => {}
    }
}

fn state_name(state: SlotState) -> &'static str {
    match state {
        SlotState::Free => "free",
        SlotState::Booting => "booting",
        SlotState::Ready => "ready",
        SlotState::Draining => "draining",
    }
}

/// The exposition. `store` is None when the store could not be counted; `pending_vectors`
/// (documents stored without vectors, waiting for them) when it could not be listed.
pub fn prometheus(
    board: &Scoreboard,
    llm: &[LlmBackend],
    embed: &[String],
    store: Option<StoreStats>,
    pending_vectors: Option<u64>,
) -> String {
    let (totals, workers) = board.snapshot();
    let header = board.header();
    let info = header.info();
    let mut out = String::with_capacity(16 * 1024);
    let family = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };

    family(
        &mut out,
        "ragpool_http_requests_total",
        "counter",
        "HTTP requests answered by the pool, by route and status.",
    );
    for (r, route) in ROUTES.iter().enumerate() {
        for (s, status) in STATUSES.iter().enumerate() {
            let n = totals.requests(r, s);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "ragpool_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
    }
    family(
        &mut out,
        "ragpool_http_request_duration_seconds",
        "histogram",
        "Time from request head to the end of the response body.",
    );
    for (r, route) in ROUTES.iter().enumerate() {
        histogram(
            &mut out,
            "ragpool_http_request_duration_seconds",
            &format!("route=\"{route}\""),
            totals.duration(r),
        );
    }
    family(
        &mut out,
        "ragpool_http_requests_in_flight",
        "gauge",
        "Requests being answered now.",
    );
    let _ = writeln!(
        out,
        "ragpool_http_requests_in_flight {}",
        workers.iter().map(|w| w.in_flight).sum::<u64>()
    );
    family(
        &mut out,
        "ragpool_connections",
        "gauge",
        "Client connections open now.",
    );
    let _ = writeln!(
        out,
        "ragpool_connections {}",
        workers.iter().map(|w| w.connections).sum::<u64>()
    );

    family(
        &mut out,
        "ragpool_worker_restarts_total",
        "counter",
        "Workers replaced, by cause.",
    );
    for (c, cause) in CAUSES.iter().enumerate() {
        let _ = writeln!(
            out,
            "ragpool_worker_restarts_total{{cause=\"{cause}\"}} {}",
            header.restarts(c)
        );
    }
    family(
        &mut out,
        "ragpool_generation",
        "gauge",
        "The serving generation (incremented by each successful reload).",
    );
    let _ = writeln!(out, "ragpool_generation {}", info.generation);
    family(
        &mut out,
        "ragpool_workers_up",
        "gauge",
        "Workers serving now.",
    );
    let ready: Vec<&WorkerView> = workers
        .iter()
        .filter(|w| w.state == SlotState::Ready)
        .collect();
    let _ = writeln!(out, "ragpool_workers_up {}", ready.len());
    family(
        &mut out,
        "ragpool_last_reload_timestamp_seconds",
        "gauge",
        "When the last reload ended (0: none yet).",
    );
    let _ = writeln!(
        out,
        "ragpool_last_reload_timestamp_seconds {}",
        info.last_reload_unix_ms as f64 / 1000.0
    );
    family(
        &mut out,
        "ragpool_last_reload_success",
        "gauge",
        "1 if the last reload succeeded, 0 if it failed or none happened.",
    );
    let _ = writeln!(
        out,
        "ragpool_last_reload_success {}",
        u8::from(info.last_reload_ok == Some(true))
    );
    family(
        &mut out,
        "ragpool_worker_resident_memory_bytes",
        "gauge",
        "Resident memory of each worker.",
    );
    for w in &workers {
        let _ = writeln!(
            out,
            "ragpool_worker_resident_memory_bytes{{pid=\"{}\",slot=\"{}\"}} {}",
            w.pid, w.slot, w.rss_bytes
        );
    }

    family(
        &mut out,
        "ragpool_rag_stage_duration_seconds",
        "histogram",
        "RAG pipeline stages: embed, retrieve, generate, first_token.",
    );
    for (s, stage) in STAGES.iter().enumerate() {
        histogram(
            &mut out,
            "ragpool_rag_stage_duration_seconds",
            &format!("stage=\"{stage}\""),
            totals.stage(s),
        );
    }
    family(
        &mut out,
        "ragpool_rag_tokens_streamed_total",
        "counter",
        "Answer tokens streamed to clients.",
    );
    let _ = writeln!(out, "ragpool_rag_tokens_streamed_total {}", totals.tokens());
    family(
        &mut out,
        "ragpool_rag_answers_truncated_total",
        "counter",
        "Generated answers cut off because the model's token budget (max_tokens) ran out.",
    );
    let _ = writeln!(
        out,
        "ragpool_rag_answers_truncated_total {}",
        totals.truncated()
    );
    family(
        &mut out,
        "ragpool_upstream_errors_total",
        "counter",
        "Failed calls to upstreams, by backend.",
    );
    for (b, backend) in BACKENDS.iter().enumerate() {
        let _ = writeln!(
            out,
            "ragpool_upstream_errors_total{{backend=\"{backend}\"}} {}",
            totals.upstream_errors(b)
        );
    }
    llm_backends(&mut out, board, llm);
    embed_backends(&mut out, board, embed);
    family(
        &mut out,
        "ragpool_feedback_total",
        "counter",
        "Readers' votes on answers stored, by vote.",
    );
    for (v, vote) in VOTES.iter().enumerate() {
        let _ = writeln!(
            out,
            "ragpool_feedback_total{{vote=\"{vote}\"}} {}",
            totals.feedback(v)
        );
    }
    if let Some(stats) = store {
        family(
            &mut out,
            "ragpool_store_documents",
            "gauge",
            "Documents in the store.",
        );
        let _ = writeln!(out, "ragpool_store_documents {}", stats.documents);
        family(
            &mut out,
            "ragpool_store_chunks",
            "gauge",
            "Chunks in the store.",
        );
        let _ = writeln!(out, "ragpool_store_chunks {}", stats.chunks);
    }
    if let Some(pending) = pending_vectors {
        family(
            &mut out,
            "ragpool_store_documents_pending_vectors",
            "gauge",
            "Documents stored for lexical search whose vectors are still to be filled in.",
        );
        let _ = writeln!(out, "ragpool_store_documents_pending_vectors {pending}");
    }
    out
}

/// Per LLM backend of the pool: answers running, admitted and failed, and its breaker.
fn llm_backends(out: &mut String, board: &Scoreboard, llm: &[LlmBackend]) {
    let urls: Vec<&str> = llm.iter().map(|b| b.url.as_str()).collect();
    let views: Vec<BackendView> = (0..llm.len()).map(|i| board.backend(i)).collect();
    backend_families(out, "llm", "LLM backend", "Answers", &urls, &views);
}

/// Per embedding server: calls running, made and failed, and its breaker.
fn embed_backends(out: &mut String, board: &Scoreboard, embed: &[String]) {
    let urls: Vec<&str> = embed.iter().map(String::as_str).collect();
    let views: Vec<BackendView> = (0..embed.len()).map(|i| board.embed_backend(i)).collect();
    backend_families(out, "embed", "embedding server", "Calls", &urls, &views);
}

/// `ragpool_{prefix}_backend_*`, one series per backend, labelled with its index and URL.
fn backend_families(
    out: &mut String,
    prefix: &str,
    what: &str,
    unit: &str,
    urls: &[&str],
    views: &[BackendView],
) {
    let families: [(&str, &str, String, fn(&BackendView) -> u64); 5] = [
        (
            "in_flight",
            "gauge",
            format!("{unit} running on each {what} now (pool-wide)."),
            |b| b.active,
        ),
        (
            "answers_total",
            "counter",
            format!("{unit} sent to each {what}."),
            |b| b.admitted,
        ),
        (
            "errors_total",
            "counter",
            format!("{unit} that failed on each {what} (and failed health probes)."),
            |b| b.failures,
        ),
        (
            "ejections_total",
            "counter",
            format!("Times each {what}'s circuit breaker opened."),
            |b| b.opened,
        ),
        (
            "up",
            "gauge",
            format!("1 while the {what}'s circuit breaker is closed, 0 while open or half-open."),
            |b| u64::from(b.state == BreakerState::Closed),
        ),
    ];
    for (suffix, kind, help, value) in families {
        let name = format!("ragpool_{prefix}_backend_{suffix}");
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (i, (url, view)) in urls.iter().zip(views).enumerate() {
            let _ = writeln!(
                out,
                "{name}{{backend=\"{i}\",url=\"{}\"}} {}",
                label(url),
                value(view)
            );
        }
    }
    let name = format!("ragpool_{prefix}_backend_state");
    let _ = writeln!(
        out,
        "# HELP {name} Each {what}'s breaker: 1 for its current state.\n# TYPE {name} gauge"
    );
    for (i, (url, view)) in urls.iter().zip(views).enumerate() {
        for state in [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ] {
            let _ = writeln!(
                out,
                "{name}{{backend=\"{i}\",url=\"{}\",state=\"{}\"}} {}",
                label(url),
                state.name(),
                u8::from(view.state == state)
            );
        }
    }
}

/// A label value escaped as the text format wants (`\`, `"`, newline).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `/status`'s `llm_backends`: one object per backend of the pool.
fn llm_status(board: &Scoreboard, llm: &[LlmBackend]) -> Vec<Value> {
    llm.iter()
        .enumerate()
        .map(|(i, backend)| {
            let view = board.backend(i);
            json!({
                "backend": i,
                "url": backend.url,
                "model": backend.model,
                "max_concurrent": backend.max_concurrent,
                "in_flight": view.active,
                "answers": view.admitted,
                "errors": view.failures,
                "ejections": view.opened,
                "state": view.state.name(),
            })
        })
        .collect()
}

fn histogram(out: &mut String, name: &str, labels: &str, (buckets, sum_us): (&[u64], u64)) {
    let mut cumulative = 0;
    for (i, count) in buckets.iter().enumerate() {
        cumulative += count;
        let le = BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
    }
    let _ = writeln!(out, "{name}_sum{{{labels}}} {}", sum_us as f64 / 1e6);
    let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
}

/// `/status`: mod_status for the pool.
pub fn status(
    board: &Scoreboard,
    llm: &[LlmBackend],
    embed: &[String],
    config_path: Option<&std::path::Path>,
) -> Value {
    let (totals, workers) = board.snapshot();
    let info = board.header().info();
    let now = unix_ms();
    let requests: u64 = (0..ROUTES.len())
        .flat_map(|r| (0..STATUSES.len()).map(move |s| (r, s)))
        .map(|(r, s)| totals.requests(r, s))
        .sum();
    json!({
        "master_pid": info.master_pid,
        "uptime_seconds": now.saturating_sub(info.started_unix_ms) as f64 / 1000.0,
        "config_path": config_path.map(|p| p.display().to_string()),
        "config_loaded_unix": info.config_loaded_unix_ms as f64 / 1000.0,
        "generation": info.generation,
        "last_reload": match info.last_reload_ok {
            None => Value::Null,
            Some(ok) => json!({ "ok": ok, "unix": info.last_reload_unix_ms as f64 / 1000.0 }),
        },
        "requests_total": requests,
        "workers": workers.iter().map(|w| json!({
            "pid": w.pid,
            "slot": w.slot,
            "generation": w.generation,
            "state": state_name(w.state),
            "age_seconds": w.age_ms as f64 / 1000.0,
            "requests": w.requests,
            "in_flight": w.in_flight,
            "connections": w.connections,
            "last_heartbeat_seconds_ago": w.heartbeat_ms_ago as f64 / 1000.0,
            "rss_bytes": w.rss_bytes,
        })).collect::<Vec<_>>(),
        "llm_backends": llm_status(board, llm),
        "embed_backends": embed.iter().enumerate().map(|(i, url)| {
            let view = board.embed_backend(i);
            json!({
                "backend": i,
                "url": url,
                "in_flight": view.active,
                "calls": view.admitted,
                "errors": view.failures,
                "ejections": view.opened,
                "state": view.state.name(),
            })
        }).collect::<Vec<_>>(),
    })
}
