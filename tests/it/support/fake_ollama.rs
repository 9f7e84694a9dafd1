//! A FAKE Ollama for tests: not Ollama, and no model behind it. It speaks Ollama's native wire
//! protocol on `127.0.0.1:0` with hyper's HTTP/1.1 server (`POST /api/chat` streaming NDJSON or
//! one JSON, `POST /api/embed`, `POST /api/embeddings`, `POST /api/show`, `GET /api/tags`,
//! `GET /api/version`), so the real client code runs against real sockets, with answers,
//! timing and failures that a test controls.
//!
//! Faithful where ragpool's behaviour depends on it (read against Ollama's `server/routes.go`
//! and `api/types.go`):
//! - a streaming chat commits its status and headers only with the first NDJSON line, as
//!   gin's `c.Stream` does: an error before any output is a real HTTP status with
//!   `{"error": ...}`, one after is an `{"error": ...}` line;
//! - models are looked up by name (`llama3.2` is `llama3.2:latest`); an unknown one is
//!   404 `{"error":"model 'X' not found"}` on `/api/chat`, `/api/embed` and `/api/show`;
//! - a thinking model (see [`FakeOptions::thinking`]) thinks unless the request says
//!   `"think": false`: `message.thinking` chunks with `content: ""`, then the answer;
//!   `"think": true` to a model that cannot think is a 400;
//! - `options.num_predict` counts thinking and answer tokens alike; running out ends the stream
//!   with `done_reason: "length"` and the last piece of text on that final line;
//! - `/api/embed` honours `dimensions` (truncates, then re-normalises).
//!
//! A query-rewrite request (ragpool's system prompt asking for a "standalone question") is
//! answered with the text set by `set_rewrite`, else derived from the prompt (the last message,
//! then the previous user turn), and counted apart (`rewrites`).
//!
//! Knobs are set at start ([`FakeOptions`]) and can be changed while it runs (`set_*`). Counters
//! ([`Counters`]) say what the clients did, including cancellations: a chat whose client went
//! away before the end (hyper drops the handler or the body when the connection closes).
//!
//! It runs on its own multi-thread tokio runtime in a background thread (so it serves 500+
//! concurrent streams) and stops on drop. Loopback only.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Request bodies larger than this are refused (a test bug, not a load pattern).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// `fail_after` value meaning "never".
const NEVER: usize = usize::MAX;
const CREATED_AT: &str = "2024-01-01T00:00:00Z";

/// How an injected mid-stream failure looks on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// An `{"error":"..."}` line, then the end of the body (what Ollama does when a runner
    /// dies mid-answer). Before any output it is an HTTP 500 instead, as in Ollama.
    ErrorLine,
    /// The connection closes in the middle of the chunked body, without another byte.
    Close,
}

/// The fake's behaviour at start. Most fields can be changed later through `set_*`.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// The answer text; `None` = "Answer" followed by the passage markers (`[1]`, `[2]`, ...)
    /// found in the request's messages, e.g. "Answer [1] [3]", or "Answer (no passages)".
    pub answer: Option<String>,
    /// The answer is split into this many tokens of (nearly) equal length in characters (fewer
    /// if the answer is shorter); 0 = an empty answer (just the final `"done": true`).
    pub tokens: usize,
    /// Time from the first answer token to the last; tokens are spaced evenly over it.
    pub answer_duration: Duration,
    /// Time from the request to the first line of output (thinking or answer). The status and
    /// headers go out with that line, as Ollama's do (model load time is inside it).
    pub first_token_delay: Duration,
    /// The chat models think: this reasoning streams in `message.thinking` before the answer
    /// (unless the request says `"think": false`). `None` = the models cannot think.
    pub thinking: Option<String>,
    /// Thinking tokens (split like the answer).
    pub thinking_tokens: usize,
    /// Time the thinking takes, from its first token to the first answer token.
    pub thinking_duration: Duration,
    /// Fail a chat after this many answer tokens (0 = before the first); `None` = never.
    pub fail_after: Option<usize>,
    pub fail_mode: FailMode,
    /// Read every request and never answer (until the client goes away).
    pub hang: bool,
    /// When not 0 or 200, every request gets this status and `{"error":"..."}`.
    pub status: u16,
    /// Size of `/api/embed` vectors (before any requested `dimensions`).
    pub dimensions: usize,
    /// The models pulled: what `/api/tags` lists and the only names the other endpoints know.
    /// A name without a tag means `:latest`. Names containing "embed" are embedding models.
    pub models: Vec<String>,
}

impl Default for FakeOptions {
    fn default() -> FakeOptions {
        FakeOptions {
            answer: None,
            tokens: 8,
            answer_duration: Duration::ZERO,
            first_token_delay: Duration::ZERO,
            thinking: None,
            thinking_tokens: 8,
            thinking_duration: Duration::ZERO,
            fail_after: None,
            fail_mode: FailMode::ErrorLine,
            hang: false,
            status: 0,
            dimensions: 64,
            models: vec!["llama3.2:latest".into(), "nomic-embed-text:latest".into()],
        }
    }
}

/// What the fake has seen so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// TCP connections accepted.
    pub connections: u64,
    /// `/api/chat` requests received (including failed, refused and hung ones).
    pub chat_started: u64,
    /// Chats answered to the end (the `"done": true` line handed to the connection).
    pub chat_completed: u64,
    /// Chats whose client went away before the end.
    pub chat_cancelled: u64,
    /// Chats failed on purpose (`fail_after` or `status`).
    pub chat_failed: u64,
    /// Chats refused: unknown model, or `think` asked of a model that cannot.
    pub chat_refused: u64,
    /// `/api/embed` and `/api/embeddings` requests, and the texts in them.
    pub embed_requests: u64,
    pub embed_inputs: u64,
    /// `/api/version`, `/api/tags` and `/api/show` requests.
    pub probes: u64,
    /// `/api/tags` and `/api/show` requests alone (model checks).
    pub model_checks: u64,
    /// Streaming chats in progress now, and the most ever at once.
    pub active_streams: u64,
    pub max_concurrent_streams: u64,
}

/// A running fake Ollama; stops on drop.
pub struct FakeOllama {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Knobs and counters shared by every connection.
struct State {
    answer: Mutex<Option<String>>,
    /// The answer to a query-rewrite request (a system message asking for a "standalone
    /// question"); `None`: a derived one (see `derived_rewrite`). Set with `set_rewrite`.
    rewrite: Mutex<Option<String>>,
    /// Rewrite requests seen.
    rewrites: AtomicU64,
    tokens: AtomicUsize,
    answer_duration_us: AtomicU64,
    first_token_delay_us: AtomicU64,
    thinking: Mutex<Option<String>>,
    thinking_tokens: AtomicUsize,
    thinking_duration_us: AtomicU64,
    fail_after: AtomicUsize,
    fail_close: AtomicBool,
    hang: AtomicBool,
    status: AtomicU16,
    dimensions: usize,
    models: Mutex<Vec<String>>,
    /// The JSON bodies of the latest `/api/chat` and `/api/embed` requests, and the chat's
    /// `Authorization` header.
    last_chat: Mutex<Option<Value>>,
    last_embed: Mutex<Option<Value>>,
    last_authorization: Mutex<Option<String>>,
    connections: AtomicU64,
    chat_started: AtomicU64,
    chat_completed: AtomicU64,
    chat_cancelled: AtomicU64,
    chat_failed: AtomicU64,
    chat_refused: AtomicU64,
    embed_requests: AtomicU64,
    embed_inputs: AtomicU64,
    probes: AtomicU64,
    model_checks: AtomicU64,
    active_streams: AtomicU64,
    max_concurrent_streams: AtomicU64,
}

impl FakeOllama {
    /// Starts with [`FakeOptions::default`]: an instant 8-token answer, 64-dim vectors.
    pub fn start() -> FakeOllama {
        FakeOllama::with(FakeOptions::default())
    }

    pub fn with(options: FakeOptions) -> FakeOllama {
        FakeOllama::on_port(options, 0)
    }

    /// Like [`FakeOllama::with`], on a given loopback port (0 = any): a test brings a backend
    /// it killed (dropped) back at the same URL.
    pub fn on_port(options: FakeOptions, port: u16) -> FakeOllama {
        let state = Arc::new(State {
            answer: Mutex::new(options.answer),
            rewrite: Mutex::new(None),
            rewrites: AtomicU64::new(0),
            tokens: AtomicUsize::new(options.tokens),
            answer_duration_us: AtomicU64::new(micros(options.answer_duration)),
            first_token_delay_us: AtomicU64::new(micros(options.first_token_delay)),
            thinking: Mutex::new(options.thinking),
            thinking_tokens: AtomicUsize::new(options.thinking_tokens),
            thinking_duration_us: AtomicU64::new(micros(options.thinking_duration)),
            fail_after: AtomicUsize::new(options.fail_after.unwrap_or(NEVER)),
            fail_close: AtomicBool::new(options.fail_mode == FailMode::Close),
            hang: AtomicBool::new(options.hang),
            status: AtomicU16::new(options.status),
            dimensions: options.dimensions.max(1),
            models: Mutex::new(options.models),
            last_chat: Mutex::new(None),
            last_embed: Mutex::new(None),
            last_authorization: Mutex::new(None),
            connections: AtomicU64::new(0),
            chat_started: AtomicU64::new(0),
            chat_completed: AtomicU64::new(0),
            chat_cancelled: AtomicU64::new(0),
            chat_failed: AtomicU64::new(0),
            chat_refused: AtomicU64::new(0),
            embed_requests: AtomicU64::new(0),
            embed_inputs: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            model_checks: AtomicU64::new(0),
            active_streams: AtomicU64::new(0),
            max_concurrent_streams: AtomicU64::new(0),
        });
        // Bound here, synchronously, with a deep backlog: hundreds of clients may connect at once.
        let listener = bind_loopback(port).expect("fake ollama: bind 127.0.0.1");
        let addr = listener.local_addr().expect("fake ollama: local addr");
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shared = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("fake-ollama".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("fake-ollama-rt")
                    .enable_all()
                    .build()
                    .expect("fake ollama: runtime");
                runtime.block_on(accept_connections(listener, shared, stopped));
                // Drops every connection task, hung ones included.
                runtime.shutdown_timeout(Duration::from_secs(2));
            })
            .expect("fake ollama: thread");
        FakeOllama {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`, the base URL for `[llm] url` / `[embed] url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn dimensions(&self) -> usize {
        self.state.dimensions
    }

    pub fn set_answer(&self, answer: Option<&str>) {
        *lock(&self.state.answer) = answer.map(str::to_string);
    }

    /// What a query-rewrite request (its system message asks for a "standalone question")
    /// is answered; `None` = the last message followed by the previous user turn (never the
    /// answer set with [`FakeOllama::set_answer`]).
    pub fn set_rewrite(&self, rewrite: Option<&str>) {
        *lock(&self.state.rewrite) = rewrite.map(str::to_string);
    }

    /// Chats whose client went away before the end (e.g. a Stop in the page), as in
    /// [`Counters::chat_cancelled`].
    pub fn cancelled(&self) -> u64 {
        self.counters().chat_cancelled
    }

    /// Query-rewrite requests seen so far.
    pub fn rewrites(&self) -> u64 {
        self.state.rewrites.load(Ordering::SeqCst)
    }

    pub fn set_tokens(&self, tokens: usize) {
        self.state.tokens.store(tokens, Ordering::SeqCst);
    }

    pub fn set_answer_duration(&self, duration: Duration) {
        self.state
            .answer_duration_us
            .store(micros(duration), Ordering::SeqCst);
    }

    pub fn set_first_token_delay(&self, delay: Duration) {
        self.state
            .first_token_delay_us
            .store(micros(delay), Ordering::SeqCst);
    }

    /// `None`: the models cannot think (a request asking them to is refused with 400).
    pub fn set_thinking(&self, thinking: Option<&str>) {
        *lock(&self.state.thinking) = thinking.map(str::to_string);
    }

    pub fn set_thinking_duration(&self, duration: Duration) {
        self.state
            .thinking_duration_us
            .store(micros(duration), Ordering::SeqCst);
    }

    pub fn set_fail_after(&self, tokens: Option<usize>) {
        self.state
            .fail_after
            .store(tokens.unwrap_or(NEVER), Ordering::SeqCst);
    }

    pub fn set_fail_mode(&self, mode: FailMode) {
        self.state
            .fail_close
            .store(mode == FailMode::Close, Ordering::SeqCst);
    }

    pub fn set_hang(&self, hang: bool) {
        self.state.hang.store(hang, Ordering::SeqCst);
    }

    /// 0 (or 200) = answer normally.
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Replaces the pulled models (`ollama pull` / `ollama rm`).
    pub fn set_models(&self, models: &[&str]) {
        *lock(&self.state.models) = models.iter().map(|m| m.to_string()).collect();
    }

    pub fn counters(&self) -> Counters {
        let s = &self.state;
        let get = |c: &AtomicU64| c.load(Ordering::SeqCst);
        Counters {
            connections: get(&s.connections),
            chat_started: get(&s.chat_started),
            chat_completed: get(&s.chat_completed),
            chat_cancelled: get(&s.chat_cancelled),
            chat_failed: get(&s.chat_failed),
            chat_refused: get(&s.chat_refused),
            embed_requests: get(&s.embed_requests),
            embed_inputs: get(&s.embed_inputs),
            probes: get(&s.probes),
            model_checks: get(&s.model_checks),
            active_streams: get(&s.active_streams),
            max_concurrent_streams: get(&s.max_concurrent_streams),
        }
    }

    /// The JSON body of the latest `/api/chat` request.
    pub fn last_chat_request(&self) -> Option<Value> {
        lock(&self.state.last_chat).clone()
    }

    /// The JSON body of the latest `/api/embed` request.
    pub fn last_embed_request(&self) -> Option<Value> {
        lock(&self.state.last_embed).clone()
    }

    /// The `Authorization` header of the latest `/api/chat` request.
    pub fn last_authorization(&self) -> Option<String> {
        lock(&self.state.last_authorization).clone()
    }

    /// Blocks (polling every 20 ms) until `cond` holds on the counters or `within` passes. For
    /// tests that drive another process; inside an async test use [`FakeOllama::wait_for`].
    pub fn wait_until(&self, within: Duration, mut cond: impl FnMut(&Counters) -> bool) -> bool {
        super::wait_until(within, || cond(&self.counters()))
    }

    /// Like [`FakeOllama::wait_until`], but yields to the caller's runtime while it waits (so
    /// that runtime can, say, close the connection whose closing is awaited).
    pub async fn wait_for(
        &self,
        within: Duration,
        mut cond: impl FnMut(&Counters) -> bool,
    ) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if cond(&self.counters()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for FakeOllama {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The vector the fake gives `text`: character trigrams of the lower-cased text (padded with a
/// space at each end) hashed (FNV-1a) into `dimensions` signed buckets, L2-normalised. Texts
/// sharing many trigrams are near; the same text always gets the same vector.
pub fn fake_embedding(text: &str, dimensions: usize) -> Vec<f32> {
    let dimensions = dimensions.max(1);
    let mut vector = vec![0f32; dimensions];
    let chars: Vec<char> = std::iter::once(' ')
        .chain(text.chars().flat_map(char::to_lowercase))
        .chain(std::iter::once(' '))
        .collect();
    for trigram in chars.windows(3) {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for c in trigram {
            let mut utf8 = [0u8; 4];
            for byte in c.encode_utf8(&mut utf8).bytes() {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        let bucket = (hash % dimensions as u64) as usize;
        vector[bucket] += if hash >> 63 == 0 { 1.0 } else { -1.0 };
    }
    normalise(&mut vector);
    vector
}

fn normalise(vector: &mut [f32]) {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        if let Some(first) = vector.first_mut() {
            *first = 1.0;
        }
    } else {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
}

/// The answer split into at most `tokens` pieces of (nearly) equal length in characters.
pub fn split_tokens(answer: &str, tokens: usize) -> Vec<String> {
    let chars: Vec<char> = answer.chars().collect();
    let n = tokens.min(chars.len());
    (0..n)
        .map(|i| {
            chars[i * chars.len() / n..(i + 1) * chars.len() / n]
                .iter()
                .collect()
        })
        .collect()
}

/// A model name as Ollama resolves it: lower case, the default registry and namespace left
/// out, `:latest` when no tag is given.
pub fn canonical_model(name: &str) -> String {
    let name = name.trim().to_ascii_lowercase();
    let name = name
        .strip_prefix("registry.ollama.ai/")
        .unwrap_or(&name)
        .to_string();
    let name = name.strip_prefix("library/").unwrap_or(&name).to_string();
    let last = name.rsplit('/').next().unwrap_or_default();
    if last.contains(':') {
        name
    } else {
        format!("{name}:latest")
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn bind_loopback(port: u16) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    // A port given again after a stop may still have connections in TIME_WAIT.
    socket.set_reuse_address(true)?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

async fn accept_connections(
    listener: std::net::TcpListener,
    state: Arc<State>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("fake ollama: cannot listen: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    state.connections.fetch_add(1, Ordering::SeqCst);
                    let _ = stream.set_nodelay(true);
                    let state = Arc::clone(&state);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let state = Arc::clone(&state);
                            async move { Ok::<_, Infallible>(handle(state, request).await) }
                        });
                        // A client that goes away mid-response is an error here: expected.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off, never give up.
                    eprintln!("fake ollama: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
}

/// A response body: a whole one, or lines fed by a task through a channel.
enum FakeBody {
    Whole(Option<Bytes>),
    /// An `Err` aborts the connection mid-body (hyper closes it without the last chunk).
    Lines(mpsc::Receiver<Result<Bytes, std::io::Error>>),
}

impl Body for FakeBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut *self {
            FakeBody::Whole(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            FakeBody::Lines(lines) => lines
                .poll_recv(cx)
                .map(|line| line.map(|r| r.map(Frame::data))),
        }
    }
}

fn respond(status: u16, content_type: &'static str, body: impl Into<Bytes>) -> Response<FakeBody> {
    let mut response = Response::new(FakeBody::Whole(Some(body.into())));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// JSON as gin's `c.JSON` writes it.
fn respond_json(status: u16, body: &Value) -> Response<FakeBody> {
    respond(status, "application/json; charset=utf-8", body.to_string())
}

fn not_found(model: &str) -> Response<FakeBody> {
    respond_json(
        404,
        &json!({ "error": format!("model '{model}' not found") }),
    )
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Response<FakeBody> {
    let (parts, body) = request.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return respond_json(400, &json!({ "error": format!("fake ollama: {e}") })),
    };
    let json_body = serde_json::from_slice::<Value>(&body).ok();
    let path = parts.uri.path().to_string();
    let is_chat = parts.method == Method::POST && path == "/api/chat";
    // Counts a chat as cancelled if hyper drops this future (the client went away) before
    // the chat is answered or handed to its streaming task.
    let mut pending = Pending::new(&state, is_chat);
    if is_chat {
        state.chat_started.fetch_add(1, Ordering::SeqCst);
        *lock(&state.last_authorization) = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if let Some(body) = &json_body {
            *lock(&state.last_chat) = Some(body.clone());
        }
    }
    if state.hang.load(Ordering::SeqCst) {
        // Never answer; `pending` notices when the client gives up.
        std::future::pending::<()>().await;
    }
    let status = state.status.load(Ordering::SeqCst);
    if status != 0 && status != 200 {
        pending.disarm();
        if is_chat {
            state.chat_failed.fetch_add(1, Ordering::SeqCst);
        }
        let body = json!({ "error": format!("fake ollama: injected HTTP status {status}") });
        return respond_json(status, &body);
    }
    let response = match (&parts.method, path.as_str()) {
        (&Method::POST, "/api/chat") => match json_body {
            Some(body) => chat(&state, body, &mut pending).await,
            None => respond_json(
                400,
                &json!({ "error": "invalid character in request body" }),
            ),
        },
        (&Method::POST, "/api/embed") | (&Method::POST, "/api/embeddings") => embed(
            &state,
            json_body.unwrap_or(Value::Null),
            path == "/api/embeddings",
        ),
        (&Method::POST, "/api/show") => {
            state.probes.fetch_add(1, Ordering::SeqCst);
            state.model_checks.fetch_add(1, Ordering::SeqCst);
            show(&state, json_body.unwrap_or(Value::Null))
        }
        (&Method::GET, "/api/version") => {
            state.probes.fetch_add(1, Ordering::SeqCst);
            respond_json(200, &json!({ "version": "0.0.0-fake" }))
        }
        (&Method::GET, "/api/tags") => {
            state.probes.fetch_add(1, Ordering::SeqCst);
            state.model_checks.fetch_add(1, Ordering::SeqCst);
            tags(&state)
        }
        (&Method::GET | &Method::HEAD, "/") => {
            respond(200, "text/plain; charset=utf-8", "Ollama is running")
        }
        _ => respond(404, "text/plain", "404 page not found"),
    };
    pending.disarm();
    response
}

/// Counts a chat as cancelled when dropped armed.
struct Pending {
    state: Arc<State>,
    armed: bool,
}

impl Pending {
    fn new(state: &Arc<State>, is_chat: bool) -> Pending {
        Pending {
            state: Arc::clone(state),
            armed: is_chat,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.armed {
            self.state.chat_cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// The pulled model that `requested` names, if any.
fn find_model(state: &State, requested: &str) -> Option<String> {
    let wanted = canonical_model(requested);
    lock(&state.models)
        .iter()
        .find(|m| canonical_model(m) == wanted)
        .cloned()
}

fn is_embedding_model(name: &str) -> bool {
    name.to_ascii_lowercase().contains("embed")
}

fn tags(state: &State) -> Response<FakeBody> {
    let models: Vec<Value> = lock(&state.models)
        .iter()
        .map(|name| {
            let name = canonical_model(name);
            json!({
                "name": name, "model": name, "modified_at": CREATED_AT,
                "size": 0, "digest": "fake",
                "details": { "format": "gguf", "family": "fake", "parameter_size": "0B",
                             "quantization_level": "Q4_0" },
            })
        })
        .collect();
    respond_json(200, &json!({ "models": models }))
}

fn show(state: &State, body: Value) -> Response<FakeBody> {
    let requested = body
        .get("model")
        .or_else(|| body.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if requested.is_empty() {
        return respond_json(400, &json!({ "error": "model is required" }));
    }
    let Some(model) = find_model(state, requested) else {
        return not_found(requested);
    };
    let capabilities: Vec<&str> = if is_embedding_model(&model) {
        vec!["embedding"]
    } else if lock(&state.thinking).is_some() {
        vec!["completion", "thinking"]
    } else {
        vec!["completion"]
    };
    respond_json(
        200,
        &json!({
            "modelfile": "", "parameters": "", "template": "{{ .Prompt }}",
            "details": { "format": "gguf", "family": "fake" },
            "model_info": {}, "capabilities": capabilities, "modified_at": CREATED_AT,
        }),
    )
}

/// One line of a chat stream, with the time it is due.
struct Line {
    at: Instant,
    kind: LineKind,
}

enum LineKind {
    Thinking(String),
    Content(String),
    /// `"done": true` with this reason, carrying the last piece of text when cut short.
    Done {
        reason: &'static str,
        thinking: String,
        content: String,
    },
    /// The injected failure.
    Fail(String),
}

async fn chat(state: &Arc<State>, body: Value, pending: &mut Pending) -> Response<FakeBody> {
    let requested = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if requested.is_empty() {
        state.chat_refused.fetch_add(1, Ordering::SeqCst);
        return respond_json(400, &json!({ "error": "model is required" }));
    }
    if find_model(state, &requested).is_none() {
        state.chat_refused.fetch_add(1, Ordering::SeqCst);
        return not_found(&requested);
    }
    // `think`: absent means "think if the model can"; false means not; true (or a level)
    // asked of a model that cannot think is refused.
    let think_field = body.get("think").filter(|v| !v.is_null());
    let asked_to_think = match think_field {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(_) => Some(true),
    };
    let thinking_text = lock(&state.thinking).clone();
    if thinking_text.is_none() && asked_to_think == Some(true) {
        state.chat_refused.fetch_add(1, Ordering::SeqCst);
        return respond_json(
            400,
            &json!({ "error": format!("\"{requested}\" does not support thinking") }),
        );
    }
    let thinks = thinking_text.is_some() && asked_to_think != Some(false);

    let is_rewrite = body
        .pointer("/messages/0/content")
        .and_then(Value::as_str)
        .is_some_and(|system| system.contains("standalone question"));
    if is_rewrite {
        state.rewrites.fetch_add(1, Ordering::SeqCst);
    }
    // A rewrite never gets the answer set with `set_answer` (a test faking a hostile answer
    // still gets a usable query): the one set with `set_rewrite`, else a derived one.
    let answer = if is_rewrite {
        lock(&state.rewrite)
            .clone()
            .unwrap_or_else(|| derived_rewrite(body.get("messages")))
    } else {
        lock(&state.answer)
            .clone()
            .unwrap_or_else(|| derived_answer(body.get("messages")))
    };
    let content = split_tokens(&answer, state.tokens.load(Ordering::SeqCst));
    let thinking = match (&thinking_text, thinks) {
        (Some(text), true) => split_tokens(text, state.thinking_tokens.load(Ordering::SeqCst)),
        _ => Vec::new(),
    };
    let started = Instant::now();
    let first = started + Duration::from_micros(state.first_token_delay_us.load(Ordering::SeqCst));
    let think_for = if thinking.is_empty() {
        Duration::ZERO
    } else {
        Duration::from_micros(state.thinking_duration_us.load(Ordering::SeqCst))
    };
    let answer_for = Duration::from_micros(state.answer_duration_us.load(Ordering::SeqCst));
    let limit = body
        .pointer("/options/num_predict")
        .and_then(Value::as_i64)
        .filter(|n| *n > 0)
        .map(|n| n as usize)
        .unwrap_or(NEVER);
    let lines = plan_lines(PlanInput {
        thinking,
        content,
        first,
        think_for,
        answer_for,
        limit,
        fail_after: state.fail_after.load(Ordering::SeqCst),
    });

    if body.get("stream").and_then(Value::as_bool) == Some(false) {
        return chat_whole(state, &requested, lines, pending).await;
    }

    let active = ActiveStream::enter(state);
    let mut lines = lines.into_iter();
    let Some(first_line) = lines.next() else {
        pending.disarm();
        return respond_json(500, &json!({ "error": "fake ollama: nothing to send" }));
    };
    // Nothing is committed (status, headers) until the first line is ready, as in Ollama.
    tokio::time::sleep_until(first_line.at).await;
    if let LineKind::Fail(message) = &first_line.kind {
        pending.disarm();
        state.chat_failed.fetch_add(1, Ordering::SeqCst);
        // Before any output, either fail mode is an error status, as in Ollama.
        return respond_json(500, &json!({ "error": message }));
    }
    let (tx, rx) = mpsc::channel(1);
    let first_bytes = encode_line(&requested, &first_line.kind, started);
    let finished_at_first = matches!(first_line.kind, LineKind::Done { .. });
    if tx.send(Ok(first_bytes)).await.is_err() {
        return respond_json(500, &json!({ "error": "fake ollama: channel" }));
    }
    pending.disarm();
    let task_state = Arc::clone(state);
    if finished_at_first {
        state.chat_completed.fetch_add(1, Ordering::SeqCst);
        drop(active);
    } else {
        let rest: Vec<Line> = lines.collect();
        tokio::spawn(stream_lines(
            task_state, requested, rest, tx, active, started,
        ));
    }
    let mut response = Response::new(FakeBody::Lines(rx));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// Writes the rest of a stream, each line at its time; counts how it ended.
async fn stream_lines(
    state: Arc<State>,
    model: String,
    lines: Vec<Line>,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    _active: ActiveStream,
    started: Instant,
) {
    for line in lines {
        tokio::select! {
            _ = tokio::time::sleep_until(line.at) => {}
            _ = tx.closed() => {
                state.chat_cancelled.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
        if let LineKind::Fail(_) = &line.kind {
            state.chat_failed.fetch_add(1, Ordering::SeqCst);
            let end = if state.fail_close.load(Ordering::SeqCst) {
                Err(std::io::Error::other("fake ollama: connection cut"))
            } else {
                Ok(encode_line(&model, &line.kind, started))
            };
            let _ = tx.send(end).await;
            return;
        }
        let done = matches!(line.kind, LineKind::Done { .. });
        if tx
            .send(Ok(encode_line(&model, &line.kind, started)))
            .await
            .is_err()
        {
            state.chat_cancelled.fetch_add(1, Ordering::SeqCst);
            return;
        }
        if done {
            state.chat_completed.fetch_add(1, Ordering::SeqCst);
            return;
        }
    }
}

/// `"stream": false`: one JSON object once everything is "generated".
async fn chat_whole(
    state: &State,
    model: &str,
    lines: Vec<Line>,
    pending: &mut Pending,
) -> Response<FakeBody> {
    let (mut thinking, mut content) = (String::new(), String::new());
    let mut reason = "stop";
    for line in lines {
        tokio::time::sleep_until(line.at).await;
        match line.kind {
            LineKind::Thinking(t) => thinking.push_str(&t),
            LineKind::Content(c) => content.push_str(&c),
            LineKind::Done {
                reason: r,
                thinking: t,
                content: c,
            } => {
                thinking.push_str(&t);
                content.push_str(&c);
                reason = r;
            }
            LineKind::Fail(message) => {
                pending.disarm();
                state.chat_failed.fetch_add(1, Ordering::SeqCst);
                return respond_json(500, &json!({ "error": message }));
            }
        }
    }
    pending.disarm();
    state.chat_completed.fetch_add(1, Ordering::SeqCst);
    let mut message = json!({ "role": "assistant", "content": content });
    if !thinking.is_empty() {
        message["thinking"] = Value::String(thinking);
    }
    respond_json(
        200,
        &json!({
            "model": model, "created_at": CREATED_AT, "message": message,
            "done_reason": reason, "done": true,
        }),
    )
}

struct PlanInput {
    thinking: Vec<String>,
    content: Vec<String>,
    first: Instant,
    think_for: Duration,
    answer_for: Duration,
    /// `num_predict`: thinking and answer tokens together.
    limit: usize,
    /// Fail after this many answer tokens.
    fail_after: usize,
}

/// The lines of one chat and when each is due: thinking tokens spread over `think_for` from
/// `first`, then answer tokens spread over `answer_for`, then `done` — or a failure, or a
/// cut at `limit` tokens whose last piece rides on the `done_reason: "length"` line.
fn plan_lines(p: PlanInput) -> Vec<Line> {
    let think_gap = match p.thinking.len() {
        0 => Duration::ZERO,
        n => p.think_for / n as u32,
    };
    let answer_gap = match p.content.len() {
        0 | 1 => Duration::ZERO,
        n => p.answer_for / (n as u32 - 1),
    };
    let answer_start = p.first + p.think_for;
    let mut lines = Vec::new();
    let mut emitted = 0;
    for (i, token) in p.thinking.into_iter().enumerate() {
        let at = p.first + think_gap * i as u32;
        emitted += 1;
        if emitted == p.limit {
            lines.push(Line {
                at,
                kind: LineKind::Done {
                    reason: "length",
                    thinking: token,
                    content: String::new(),
                },
            });
            return lines;
        }
        lines.push(Line {
            at,
            kind: LineKind::Thinking(token),
        });
    }
    let content_len = p.content.len();
    for (j, token) in p.content.into_iter().enumerate() {
        let at = answer_start + answer_gap * j as u32;
        if j == p.fail_after {
            lines.push(Line {
                at,
                kind: LineKind::Fail(format!("fake ollama: injected failure after {j} tokens")),
            });
            return lines;
        }
        emitted += 1;
        if emitted == p.limit && j + 1 < content_len {
            lines.push(Line {
                at,
                kind: LineKind::Done {
                    reason: "length",
                    thinking: String::new(),
                    content: token,
                },
            });
            return lines;
        }
        lines.push(Line {
            at,
            kind: LineKind::Content(token),
        });
    }
    let end = lines.last().map_or(answer_start, |l| l.at);
    if content_len == p.fail_after {
        lines.push(Line {
            at: end,
            kind: LineKind::Fail(format!(
                "fake ollama: injected failure after {content_len} tokens"
            )),
        });
        return lines;
    }
    lines.push(Line {
        at: end,
        kind: LineKind::Done {
            reason: "stop",
            thinking: String::new(),
            content: String::new(),
        },
    });
    lines
}

/// One NDJSON line of `/api/chat`, shaped like Ollama's `api.ChatResponse`.
fn encode_line(model: &str, kind: &LineKind, started: Instant) -> Bytes {
    let message = |thinking: &str, content: &str| {
        let mut m = json!({ "role": "assistant", "content": content });
        if !thinking.is_empty() {
            m["thinking"] = Value::String(thinking.to_string());
        }
        m
    };
    let value = match kind {
        LineKind::Thinking(t) => json!({
            "model": model, "created_at": CREATED_AT, "message": message(t, ""), "done": false,
        }),
        LineKind::Content(c) => json!({
            "model": model, "created_at": CREATED_AT, "message": message("", c), "done": false,
        }),
        LineKind::Done {
            reason,
            thinking,
            content,
        } => json!({
            "model": model, "created_at": CREATED_AT, "message": message(thinking, content),
            "done": true, "done_reason": reason,
            "total_duration": micros(started.elapsed()) * 1000,
        }),
        LineKind::Fail(message) => json!({ "error": message }),
    };
    Bytes::from(format!("{value}\n"))
}

fn embed(state: &State, body: Value, legacy: bool) -> Response<FakeBody> {
    state.embed_requests.fetch_add(1, Ordering::SeqCst);
    if !legacy {
        *lock(&state.last_embed) = Some(body.clone());
    }
    let requested = body.get("model").and_then(Value::as_str).unwrap_or("");
    if find_model(state, requested).is_none() {
        return not_found(requested);
    }
    let inputs: Option<Vec<String>> = match body.get(if legacy { "prompt" } else { "input" }) {
        Some(Value::String(text)) if text.is_empty() => Some(Vec::new()),
        Some(Value::String(text)) => Some(vec![text.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect(),
        None | Some(Value::Null) => Some(Vec::new()),
        _ => None,
    };
    let Some(inputs) = inputs else {
        return respond_json(400, &json!({ "error": "invalid input type" }));
    };
    state
        .embed_inputs
        .fetch_add(inputs.len() as u64, Ordering::SeqCst);
    let dimensions = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .filter(|d| *d > 0)
        .map(|d| d as usize);
    let vectors: Vec<Vec<f32>> = inputs
        .iter()
        .map(|t| {
            let mut v = fake_embedding(t, state.dimensions);
            if let Some(d) = dimensions.filter(|d| *d < v.len()) {
                v.truncate(d);
                normalise(&mut v);
            }
            v
        })
        .collect();
    let reply = if legacy {
        json!({ "embedding": vectors.first().cloned().unwrap_or_default() })
    } else {
        json!({ "model": requested, "embeddings": vectors, "prompt_eval_count": inputs.len() })
    };
    respond_json(200, &reply)
}

/// "Answer" and the passage markers (`[N]`) seen in the messages, in order, without repeats.
/// What the fake "rewrites" a follow-up to when no rewrite was set: the last message followed
/// by the conversation's last user turn, read from ragpool's rewrite prompt
/// ("Conversation:\nUser: ...\n...\nLast message: ..."). Deterministic, and good enough for
/// retrieval to find what the conversation is about.
fn derived_rewrite(messages: Option<&Value>) -> String {
    let prompt = messages
        .and_then(Value::as_array)
        .and_then(|m| m.last())
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let last_user = prompt
        .lines()
        .filter_map(|line| line.strip_prefix("User: "))
        .last()
        .unwrap_or("");
    let last_message = prompt
        .lines()
        .find_map(|line| line.strip_prefix("Last message: "))
        .unwrap_or("");
    format!("{last_message} {last_user}").trim().to_string()
}

fn derived_answer(messages: Option<&Value>) -> String {
    let mut cited = BTreeSet::new();
    for message in messages.and_then(Value::as_array).into_iter().flatten() {
        let content = message.get("content").and_then(Value::as_str).unwrap_or("");
        for (i, _) in content.match_indices('[') {
            let rest = &content[i + 1..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if !digits.is_empty() && rest[digits.len()..].starts_with(']') {
                if let Ok(n) = digits.parse::<u32>() {
                    cited.insert(n);
                }
            }
        }
    }
    if cited.is_empty() {
        return "Answer (no passages)".into();
    }
    let markers: Vec<String> = cited.iter().map(|n| format!("[{n}]")).collect();
    format!("Answer {}", markers.join(" "))
}

/// Counts a streaming chat as active while alive.
struct ActiveStream(Arc<State>);

impl ActiveStream {
    fn enter(state: &Arc<State>) -> ActiveStream {
        let now = state.active_streams.fetch_add(1, Ordering::SeqCst) + 1;
        state
            .max_concurrent_streams
            .fetch_max(now, Ordering::SeqCst);
        ActiveStream(Arc::clone(state))
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.active_streams.fetch_sub(1, Ordering::SeqCst);
    }
}
