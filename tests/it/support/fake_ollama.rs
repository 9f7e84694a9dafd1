//! A FAKE Ollama for tests: not Ollama, and no model behind it. It speaks Ollama's native wire
//! protocol at the HTTP level on `127.0.0.1:0` (`POST /api/chat` streaming NDJSON or a single
//! JSON, `POST /api/embed`, `POST /api/embeddings`, `GET /api/version`, `GET /api/tags`), so
//! the real client code runs against real sockets, with answers, timing and failures that a
//! test controls.
//!
//! Knobs are set at start ([`FakeOptions`]) and can be changed while it runs (`set_*`, backed by
//! atomics). Counters ([`Counters`]) say what the clients did, including cancellations: a chat
//! stream whose client went away before the end (a failed write, or the socket closing while
//! the fake waits between tokens).
//!
//! It runs on its own multi-thread tokio runtime in a background thread (so it serves 500+
//! concurrent streams and outlives no test: it stops on drop), with a hand-written HTTP/1.1
//! server: keep-alive, `Content-Length` request bodies, chunked streaming responses. Loopback
//! only.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Requests with longer heads or bodies are refused (a test bug, not a load pattern).
const MAX_HEAD_BYTES: usize = 64 * 1024;
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// `fail_after` value meaning "never".
const NEVER: usize = usize::MAX;

/// How an injected mid-stream failure looks on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// An `{"error":"..."}` line, the end of the chunked body, then the connection closes
    /// (what Ollama does when a runner dies mid-answer).
    ErrorLine,
    /// The connection closes in the middle of the chunked body, without another byte.
    Close,
}

/// The fake's behaviour at start. Every field can be changed later through `set_*`, except
/// `dimensions` and `models`.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// The answer text; `None` = "Answer" followed by the passage markers (`[1]`, `[2]`, ...)
    /// found in the request's messages, e.g. "Answer [1] [3]", or "Answer (no passages)".
    pub answer: Option<String>,
    /// The answer is split into this many tokens of (nearly) equal length in characters (fewer
    /// if the answer is shorter); 0 = an empty answer (just the final `"done": true`).
    pub tokens: usize,
    /// Time from the first token to the last; tokens are spaced evenly over it.
    pub answer_duration: Duration,
    /// Time from the request to the first token (response headers go out at once, as Ollama's).
    pub first_token_delay: Duration,
    /// Fail a chat after this many tokens (0 = before the first); `None` = never.
    pub fail_after: Option<usize>,
    pub fail_mode: FailMode,
    /// Read every request and never answer (until the client goes away).
    pub hang: bool,
    /// When not 0 or 200, every request gets this status and `{"error":"..."}`.
    pub status: u16,
    /// Size of `/api/embed` vectors.
    pub dimensions: usize,
    /// What `/api/tags` lists.
    pub models: Vec<String>,
}

impl Default for FakeOptions {
    fn default() -> FakeOptions {
        FakeOptions {
            answer: None,
            tokens: 8,
            answer_duration: Duration::ZERO,
            first_token_delay: Duration::ZERO,
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
    /// `/api/chat` requests received (including failed and hung ones).
    pub chat_started: u64,
    /// Chats answered to the end (`"done": true` written).
    pub chat_completed: u64,
    /// Chats whose client went away before the end.
    pub chat_cancelled: u64,
    /// Chats failed on purpose (`fail_after` or `status`).
    pub chat_failed: u64,
    /// `/api/embed` and `/api/embeddings` requests, and the texts in them.
    pub embed_requests: u64,
    pub embed_inputs: u64,
    /// `/api/version` and `/api/tags` requests.
    pub probes: u64,
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
    tokens: AtomicUsize,
    answer_duration_us: AtomicU64,
    first_token_delay_us: AtomicU64,
    fail_after: AtomicUsize,
    fail_close: AtomicBool,
    hang: AtomicBool,
    status: AtomicU16,
    dimensions: usize,
    models: Vec<String>,
    /// The JSON body of the latest `/api/chat` request, and its `Authorization` header.
    last_chat: Mutex<Option<Value>>,
    last_authorization: Mutex<Option<String>>,
    connections: AtomicU64,
    chat_started: AtomicU64,
    chat_completed: AtomicU64,
    chat_cancelled: AtomicU64,
    chat_failed: AtomicU64,
    embed_requests: AtomicU64,
    embed_inputs: AtomicU64,
    probes: AtomicU64,
    active_streams: AtomicU64,
    max_concurrent_streams: AtomicU64,
}

impl FakeOllama {
    /// Starts with [`FakeOptions::default`]: an instant 8-token answer, 64-dim vectors.
    pub fn start() -> FakeOllama {
        FakeOllama::with(FakeOptions::default())
    }

    pub fn with(options: FakeOptions) -> FakeOllama {
        let state = Arc::new(State {
            answer: Mutex::new(options.answer),
            tokens: AtomicUsize::new(options.tokens),
            answer_duration_us: AtomicU64::new(micros(options.answer_duration)),
            first_token_delay_us: AtomicU64::new(micros(options.first_token_delay)),
            fail_after: AtomicUsize::new(options.fail_after.unwrap_or(NEVER)),
            fail_close: AtomicBool::new(options.fail_mode == FailMode::Close),
            hang: AtomicBool::new(options.hang),
            status: AtomicU16::new(options.status),
            dimensions: options.dimensions.max(1),
            models: options.models,
            last_chat: Mutex::new(None),
            last_authorization: Mutex::new(None),
            connections: AtomicU64::new(0),
            chat_started: AtomicU64::new(0),
            chat_completed: AtomicU64::new(0),
            chat_cancelled: AtomicU64::new(0),
            chat_failed: AtomicU64::new(0),
            embed_requests: AtomicU64::new(0),
            embed_inputs: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            active_streams: AtomicU64::new(0),
            max_concurrent_streams: AtomicU64::new(0),
        });
        // Bound here, synchronously, with a deep backlog: hundreds of clients may connect at once.
        let listener = bind_loopback().expect("fake ollama: bind 127.0.0.1:0");
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

    pub fn counters(&self) -> Counters {
        let s = &self.state;
        let get = |c: &AtomicU64| c.load(Ordering::SeqCst);
        Counters {
            connections: get(&s.connections),
            chat_started: get(&s.chat_started),
            chat_completed: get(&s.chat_completed),
            chat_cancelled: get(&s.chat_cancelled),
            chat_failed: get(&s.chat_failed),
            embed_requests: get(&s.embed_requests),
            embed_inputs: get(&s.embed_inputs),
            probes: get(&s.probes),
            active_streams: get(&s.active_streams),
            max_concurrent_streams: get(&s.max_concurrent_streams),
        }
    }

    /// The JSON body of the latest `/api/chat` request.
    pub fn last_chat_request(&self) -> Option<Value> {
        lock(&self.state.last_chat).clone()
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
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        vector[0] = 1.0;
    } else {
        vector.iter_mut().for_each(|x| *x /= norm);
    }
    vector
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

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn bind_loopback() -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    let addr: SocketAddr = ([127, 0, 0, 1], 0).into();
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
                    tokio::spawn(serve_connection(stream, Arc::clone(&state)));
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

struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn keep_alive(&self) -> bool {
        !self
            .header("connection")
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
    }
}

/// One client connection: `buf` holds bytes read but not yet parsed.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// What to do with the connection after a response.
enum Next {
    KeepAlive,
    Close,
}

impl Next {
    fn after(keep_alive: bool) -> Next {
        if keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        }
    }
}

async fn serve_connection(stream: TcpStream, state: Arc<State>) {
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
    };
    loop {
        let request = match conn.read_request().await {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) => {
                let _ = conn
                    .respond_json(400, &json!({ "error": format!("fake ollama: {e}") }), false)
                    .await;
                return;
            }
        };
        match handle(&mut conn, &state, request).await {
            Ok(Next::KeepAlive) => continue,
            Ok(Next::Close) | Err(_) => return,
        }
    }
}

async fn handle(conn: &mut Conn, state: &State, request: Request) -> std::io::Result<Next> {
    let is_chat = request.method == "POST" && request.path == "/api/chat";
    if is_chat {
        state.chat_started.fetch_add(1, Ordering::SeqCst);
        *lock(&state.last_authorization) = request.header("authorization").map(str::to_string);
        if let Ok(body) = serde_json::from_slice::<Value>(&request.body) {
            *lock(&state.last_chat) = Some(body);
        }
    }
    if state.hang.load(Ordering::SeqCst) {
        // Never answer; notice when the client gives up.
        conn.wait_for_close().await;
        if is_chat {
            state.chat_cancelled.fetch_add(1, Ordering::SeqCst);
        }
        return Ok(Next::Close);
    }
    let keep_alive = request.keep_alive();
    let status = state.status.load(Ordering::SeqCst);
    if status != 0 && status != 200 {
        if is_chat {
            state.chat_failed.fetch_add(1, Ordering::SeqCst);
        }
        let body = json!({ "error": format!("fake ollama: injected HTTP status {status}") });
        conn.respond_json(status, &body, keep_alive).await?;
        return Ok(Next::after(keep_alive));
    }
    match (request.method.as_str(), request.path.as_str()) {
        ("POST", "/api/chat") => chat(conn, state, &request, keep_alive).await,
        ("POST", "/api/embed") | ("POST", "/api/embeddings") => {
            embed(conn, state, &request, keep_alive).await
        }
        ("GET", "/api/version") => {
            state.probes.fetch_add(1, Ordering::SeqCst);
            conn.respond_json(200, &json!({ "version": "0.0.0-fake" }), keep_alive)
                .await?;
            Ok(Next::after(keep_alive))
        }
        ("GET", "/api/tags") => {
            state.probes.fetch_add(1, Ordering::SeqCst);
            let models: Vec<Value> = state
                .models
                .iter()
                .map(|name| {
                    json!({
                        "name": name, "model": name, "modified_at": "2024-01-01T00:00:00Z",
                        "size": 0, "digest": "fake",
                        "details": { "format": "gguf", "family": "fake" },
                    })
                })
                .collect();
            conn.respond_json(200, &json!({ "models": models }), keep_alive)
                .await?;
            Ok(Next::after(keep_alive))
        }
        ("GET", "/") => {
            conn.respond(
                200,
                "text/plain; charset=utf-8",
                b"Ollama is running",
                keep_alive,
            )
            .await?;
            Ok(Next::after(keep_alive))
        }
        _ => {
            conn.respond(404, "text/plain", b"404 page not found", keep_alive)
                .await?;
            Ok(Next::after(keep_alive))
        }
    }
}

async fn chat(
    conn: &mut Conn,
    state: &State,
    request: &Request,
    keep_alive: bool,
) -> std::io::Result<Next> {
    let Ok(body) = serde_json::from_slice::<Value>(&request.body) else {
        conn.respond_json(
            400,
            &json!({ "error": "fake ollama: invalid JSON" }),
            keep_alive,
        )
        .await?;
        return Ok(Next::Close);
    };
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let answer = lock(&state.answer)
        .clone()
        .unwrap_or_else(|| derived_answer(body.get("messages")));
    let tokens = split_tokens(&answer, state.tokens.load(Ordering::SeqCst));
    let first_token_delay =
        Duration::from_micros(state.first_token_delay_us.load(Ordering::SeqCst));
    let duration = Duration::from_micros(state.answer_duration_us.load(Ordering::SeqCst));
    let fail_after = state.fail_after.load(Ordering::SeqCst);
    let started = Instant::now();

    if body.get("stream").and_then(Value::as_bool) == Some(false) {
        if !conn
            .sleep_watching(started + first_token_delay + duration)
            .await
        {
            state.chat_cancelled.fetch_add(1, Ordering::SeqCst);
            return Ok(Next::Close);
        }
        if fail_after <= tokens.len() {
            state.chat_failed.fetch_add(1, Ordering::SeqCst);
            let error = json!({ "error": "fake ollama: injected failure" });
            conn.respond_json(500, &error, keep_alive).await?;
            return Ok(Next::after(keep_alive));
        }
        let reply = json!({
            "model": model, "created_at": "2024-01-01T00:00:00Z",
            "message": { "role": "assistant", "content": answer },
            "done_reason": "stop", "done": true, "eval_count": tokens.len(),
        });
        conn.respond_json(200, &reply, keep_alive).await?;
        state.chat_completed.fetch_add(1, Ordering::SeqCst);
        return Ok(Next::after(keep_alive));
    }

    let _active = ActiveStream::enter(state);
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n";
    if conn.stream.write_all(head.as_bytes()).await.is_err() {
        state.chat_cancelled.fetch_add(1, Ordering::SeqCst);
        return Ok(Next::Close);
    }
    let gap = if tokens.len() > 1 {
        duration / (tokens.len() as u32 - 1)
    } else {
        Duration::ZERO
    };
    for i in 0..=tokens.len() {
        if i == fail_after {
            state.chat_failed.fetch_add(1, Ordering::SeqCst);
            if !state.fail_close.load(Ordering::SeqCst) {
                let line =
                    json!({ "error": format!("fake ollama: injected failure after {i} tokens") });
                let _ = conn.write_chunk(format!("{line}\n").as_bytes()).await;
                let _ = conn.stream.write_all(b"0\r\n\r\n").await;
            }
            return Ok(Next::Close);
        }
        let Some(token) = tokens.get(i) else { break };
        if !conn
            .sleep_watching(started + first_token_delay + gap * i as u32)
            .await
        {
            state.chat_cancelled.fetch_add(1, Ordering::SeqCst);
            return Ok(Next::Close);
        }
        let line = json!({
            "model": model, "created_at": "2024-01-01T00:00:00Z",
            "message": { "role": "assistant", "content": token }, "done": false,
        });
        if conn
            .write_chunk(format!("{line}\n").as_bytes())
            .await
            .is_err()
        {
            state.chat_cancelled.fetch_add(1, Ordering::SeqCst);
            return Ok(Next::Close);
        }
    }
    let done = json!({
        "model": model, "created_at": "2024-01-01T00:00:00Z",
        "message": { "role": "assistant", "content": "" },
        "done_reason": "stop", "done": true,
        "total_duration": micros(started.elapsed()) * 1000, "eval_count": tokens.len(),
    });
    // The last line and the end of the body in one write: a client that closes as soon as it
    // reads `"done": true` must not make a completed answer look cancelled.
    let line = format!("{done}\n");
    let last = format!("{:x}\r\n{line}\r\n0\r\n\r\n", line.len()).into_bytes();
    if conn.stream.write_all(&last).await.is_err() {
        state.chat_cancelled.fetch_add(1, Ordering::SeqCst);
        return Ok(Next::Close);
    }
    state.chat_completed.fetch_add(1, Ordering::SeqCst);
    Ok(Next::after(keep_alive))
}

async fn embed(
    conn: &mut Conn,
    state: &State,
    request: &Request,
    keep_alive: bool,
) -> std::io::Result<Next> {
    state.embed_requests.fetch_add(1, Ordering::SeqCst);
    let body = serde_json::from_slice::<Value>(&request.body).unwrap_or(Value::Null);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let legacy = request.path == "/api/embeddings";
    let inputs: Option<Vec<String>> = match body.get(if legacy { "prompt" } else { "input" }) {
        Some(Value::String(text)) => Some(vec![text.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => None,
    };
    let Some(inputs) = inputs else {
        let error =
            json!({ "error": "fake ollama: \"input\" must be a string or an array of strings" });
        conn.respond_json(400, &error, keep_alive).await?;
        return Ok(Next::after(keep_alive));
    };
    state
        .embed_inputs
        .fetch_add(inputs.len() as u64, Ordering::SeqCst);
    let vectors: Vec<Vec<f32>> = inputs
        .iter()
        .map(|t| fake_embedding(t, state.dimensions))
        .collect();
    let reply = if legacy {
        json!({ "embedding": vectors.first().cloned().unwrap_or_default() })
    } else {
        json!({ "model": model, "embeddings": vectors, "prompt_eval_count": inputs.len() })
    };
    conn.respond_json(200, &reply, keep_alive).await?;
    Ok(Next::after(keep_alive))
}

/// "Answer" and the passage markers (`[N]`) seen in the messages, in order, without repeats.
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
struct ActiveStream<'a>(&'a State);

impl<'a> ActiveStream<'a> {
    fn enter(state: &'a State) -> ActiveStream<'a> {
        let now = state.active_streams.fetch_add(1, Ordering::SeqCst) + 1;
        state
            .max_concurrent_streams
            .fetch_max(now, Ordering::SeqCst);
        ActiveStream(state)
    }
}

impl Drop for ActiveStream<'_> {
    fn drop(&mut self) {
        self.0.active_streams.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Conn {
    /// The next request, or `None` if the client closed the connection between requests.
    async fn read_request(&mut self) -> std::io::Result<Option<Request>> {
        use std::io::{Error, ErrorKind};
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            if self.buf.len() > MAX_HEAD_BYTES {
                return Err(Error::new(ErrorKind::InvalidData, "request head too large"));
            }
            if self.read_more().await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed mid-request",
                ));
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or("").split_whitespace();
        let method = request_line.next().unwrap_or("").to_string();
        let path = request_line.next().unwrap_or("").to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| {
                v.parse()
                    .map_err(|_| Error::new(ErrorKind::InvalidData, "bad content-length"))
            })
            .transpose()?
            .unwrap_or(0);
        if length > MAX_BODY_BYTES {
            return Err(Error::new(ErrorKind::InvalidData, "request body too large"));
        }
        let body_start = head_end + 4;
        while self.buf.len() < body_start + length {
            if self.read_more().await? == 0 {
                return Err(Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed mid-body",
                ));
            }
        }
        let body = self.buf[body_start..body_start + length].to_vec();
        self.buf.drain(..body_start + length);
        Ok(Some(Request {
            method,
            path,
            headers,
            body,
        }))
    }

    async fn read_more(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Sleeps until `until`, returning early with `false` if the client closes the connection.
    async fn sleep_watching(&mut self, until: Instant) -> bool {
        loop {
            if Instant::now() >= until {
                return true;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return true,
                read = self.read_more() => match read {
                    Ok(0) | Err(_) => return false,
                    Ok(_) => {} // a pipelined request: kept in buf
                },
            }
        }
    }

    /// Waits until the client closes the connection (reading and discarding).
    async fn wait_for_close(&mut self) {
        loop {
            match self.read_more().await {
                Ok(0) | Err(_) => return,
                Ok(_) => self.buf.clear(),
            }
        }
    }

    async fn write_chunk(&mut self, data: &[u8]) -> std::io::Result<()> {
        let mut frame = format!("{:x}\r\n", data.len()).into_bytes();
        frame.extend_from_slice(data);
        frame.extend_from_slice(b"\r\n");
        self.stream.write_all(&frame).await?;
        self.stream.flush().await
    }

    async fn respond_json(
        &mut self,
        status: u16,
        body: &Value,
        keep_alive: bool,
    ) -> std::io::Result<()> {
        let body = body.to_string();
        self.respond(
            status,
            "application/json; charset=utf-8",
            body.as_bytes(),
            keep_alive,
        )
        .await
    }

    async fn respond(
        &mut self,
        status: u16,
        content_type: &str,
        body: &[u8],
        keep_alive: bool,
    ) -> std::io::Result<()> {
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let mut response = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
            reason(status),
            body.len()
        )
        .into_bytes();
        response.extend_from_slice(body);
        self.stream.write_all(&response).await?;
        self.stream.flush().await
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}
