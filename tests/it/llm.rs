//! The model clients (`ragpool::rag::llm`) called directly, on a tokio `current_thread` runtime
//! as in a worker: Ollama's protocol against the fake Ollama, OpenAI's against a real
//! llama.cpp server (skipped when not installed, unless `RAGPOOL_REQUIRE_LLAMA=1`). Then the
//! same cases through the real binary, as a user and a monitor see them: thinking models, cut
//! off answers, models that are not pulled (the SSE events, `/api/ask`, `/health`, `/metrics`,
//! `ragpool check --online`, `ragpool ingest --reembed`).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use ragpool::config::app::{EmbedConfig, KeepAlive, LlmBackend, LlmConfig, Provider};
use ragpool::rag::llm::{
    ChatMessage, Chunk, Embedder, Finish, Generator, LlmError, TimeoutKind, TokenStream,
};

use crate::support::fake_ollama::{
    fake_embedding, split_tokens, FailMode, FakeOllama, FakeOptions,
};
use crate::support::free_port;
use crate::support::http::{self, post_json, sse_events};
use crate::support::llama::LlamaServer;
use crate::support::{wait_until, ServerProcess, BIN};

fn llm_config(provider: Provider, url: &str) -> LlmConfig {
    LlmConfig {
        provider,
        url: url.to_string(),
        model: "llama3.2".into(),
        api_key: None,
        backends: vec![LlmBackend {
            provider,
            url: url.to_string(),
            model: "llama3.2".into(),
            api_key: None,
            max_concurrent: 0,
        }],
        breaker_failures: 3,
        breaker_cooldown: Duration::from_secs(5),
        timeout: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(1),
        first_token_timeout: Duration::from_secs(10),
        temperature: 0.0,
        max_tokens: 64,
        max_concurrent: 0,
        think: false,
        repeat_penalty: 1.1,
        frequency_penalty: 0.0,
        stop: Vec::new(),
        keep_alive: Some(KeepAlive::Duration("30m".into())),
    }
}

fn embed_config(provider: Provider, url: &str) -> EmbedConfig {
    EmbedConfig {
        provider,
        url: url.to_string(),
        urls: vec![url.to_string()],
        model: "nomic-embed-text".into(),
        api_key: None,
        dimensions: 0,
        timeout: Duration::from_secs(20),
        keep_alive: None,
        languages: Vec::new(),
    }
}

fn generator(config: &LlmConfig) -> Generator {
    Generator::new(config)
        .expect("valid config")
        .expect("a provider")
}

fn embedder(config: &EmbedConfig) -> Embedder {
    Embedder::new(config)
        .expect("valid config")
        .expect("a provider")
}

fn question() -> Vec<ChatMessage> {
    vec![
        ChatMessage::system(
            "Answer from the passages; cite them as [n].\n[1] Cats purr.\n[3] Dogs bark.",
        ),
        ChatMessage::user("What do cats do?"),
    ]
}

/// What one generation gave, in the order the stream said it.
#[derive(Debug, Default)]
struct Generated {
    answer: Vec<String>,
    reasoning: Vec<String>,
    /// How a clean end finished (the last item before the end).
    finish: Option<Finish>,
    /// The error that ended the stream, if one did (then `finish` is `None`).
    error: Option<LlmError>,
    /// Reasoning that came after answer text (a stream should not interleave them).
    interleaved: bool,
}

async fn run(mut stream: TokenStream) -> Generated {
    let mut out = Generated::default();
    while let Some(item) = stream.next().await {
        assert!(out.finish.is_none(), "Finished is the last item: {item:?}");
        match item {
            Ok(Chunk::Answer(token)) => out.answer.push(token),
            Ok(Chunk::Reasoning(text)) => {
                out.interleaved |= !out.answer.is_empty();
                out.reasoning.push(text);
            }
            Ok(Chunk::Finished(finish)) => out.finish = Some(finish),
            Err(e) => {
                assert!(stream.next().await.is_none(), "an error is the last item");
                out.error = Some(e);
                return out;
            }
        }
    }
    assert!(out.finish.is_some(), "a clean end says how it finished");
    out
}

/// Every answer token, and the error that ended the stream if one did.
async fn collect(stream: TokenStream) -> (Vec<String>, Option<LlmError>) {
    let generated = run(stream).await;
    (generated.answer, generated.error)
}

#[tokio::test]
async fn ollama_streams_every_token_in_order() {
    let answer = "Кошки мурлыкают [1], а собаки лают.";
    let fake = FakeOllama::with(FakeOptions {
        answer: Some(answer.into()),
        tokens: 12,
        answer_duration: Duration::from_millis(200),
        ..FakeOptions::default()
    });
    let mut config = llm_config(Provider::Ollama, &fake.url());
    config.api_key = Some("secret".into());
    config.max_tokens = 77;
    let generator = generator(&config);
    assert_eq!(generator.model(), "llama3.2");

    let (tokens, error) =
        collect(generator.stream(&question()).await.expect("stream starts")).await;
    assert!(error.is_none(), "clean end: {error:?}");
    assert_eq!(tokens, split_tokens(answer, 12));
    assert_eq!(tokens.concat(), answer);

    // The fake counts a completion just after its last write, so the client may be first.
    assert!(
        fake.wait_for(Duration::from_secs(5), |c| c.chat_completed == 1)
            .await,
        "{:?}",
        fake.counters()
    );
    let counters = fake.counters();
    assert_eq!((counters.chat_started, counters.chat_cancelled), (1, 0));
    let request = fake.last_chat_request().expect("the fake saw the request");
    assert_eq!(request["model"], "llama3.2");
    assert_eq!(request["stream"], true);
    assert_eq!(request["options"]["num_predict"], 77);
    assert_eq!(request["options"]["temperature"], 0.0);
    assert_eq!(request["messages"][0]["role"], "system");
    assert_eq!(request["messages"][1]["content"], "What do cats do?");
    assert_eq!(fake.last_authorization().as_deref(), Some("Bearer secret"));
}

#[tokio::test]
async fn fake_derives_its_answer_from_the_passages_it_saw() {
    let fake = FakeOllama::start();
    let generator = generator(&llm_config(Provider::Ollama, &fake.url()));
    let (tokens, error) =
        collect(generator.stream(&question()).await.expect("stream starts")).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(tokens.concat(), "Answer [1] [3]");
    assert_eq!(tokens.len(), 8);
}

#[tokio::test]
async fn mid_stream_failure_is_an_error_after_the_first_tokens() {
    let fake = FakeOllama::with(FakeOptions {
        fail_after: Some(3),
        ..FakeOptions::default()
    });
    let generator = generator(&llm_config(Provider::Ollama, &fake.url()));

    // An {"error": ...} line.
    let (tokens, error) =
        collect(generator.stream(&question()).await.expect("stream starts")).await;
    assert_eq!(tokens.len(), 3);
    match error {
        Some(LlmError::Upstream { message, .. }) => {
            assert!(message.contains("injected failure"), "{message}")
        }
        other => panic!("expected Upstream, got {other:?}"),
    }

    // The connection just closing mid-body.
    fake.set_fail_mode(FailMode::Close);
    let (tokens, error) =
        collect(generator.stream(&question()).await.expect("stream starts")).await;
    assert_eq!(tokens.len(), 3);
    let error = error.expect("an error after 3 tokens");
    assert!(
        matches!(
            error,
            LlmError::Transport { .. } | LlmError::Protocol { .. }
        ),
        "{error:?}"
    );

    // Before any output nothing is committed yet: Ollama answers with a real status.
    fake.set_fail_mode(FailMode::ErrorLine);
    fake.set_fail_after(Some(0));
    let error = generator.stream(&question()).await.err().expect("a 500");
    match &error {
        LlmError::Status {
            status: 500,
            message,
            ..
        } => assert!(message.contains("injected failure"), "{message}"),
        other => panic!("expected Status 500, got {other:?}"),
    }
    assert!(error.is_unavailable());
    assert_eq!(fake.counters().chat_failed, 3);
}

#[tokio::test]
async fn hung_server_hits_the_first_token_timeout() {
    let fake = FakeOllama::with(FakeOptions {
        hang: true,
        ..FakeOptions::default()
    });
    let mut config = llm_config(Provider::Ollama, &fake.url());
    config.first_token_timeout = Duration::from_millis(400);
    config.connect_timeout = Duration::from_millis(300);
    let generator = generator(&config);

    // No response headers at all.
    let started = Instant::now();
    let error = generator
        .stream(&question())
        .await
        .err()
        .expect("a timeout");
    let elapsed = started.elapsed();
    assert!(
        matches!(
            error,
            LlmError::Timeout {
                kind: TimeoutKind::FirstToken,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.is_unavailable());
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(2),
        "{elapsed:?}"
    );
    assert!(
        fake.wait_for(Duration::from_secs(5), |c| c.chat_cancelled == 1)
            .await,
        "the fake saw the client give up: {:?}",
        fake.counters()
    );

    // A slow first line: Ollama sends no headers before it, so the start itself times out.
    fake.set_hang(false);
    fake.set_first_token_delay(Duration::from_secs(5));
    let started = Instant::now();
    let error = generator
        .stream(&question())
        .await
        .err()
        .expect("no first line in time");
    assert!(
        matches!(
            error,
            LlmError::Timeout {
                kind: TimeoutKind::FirstToken,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // A ping is bounded by connect_timeout.
    fake.set_hang(true);
    let started = Instant::now();
    let error = generator.check_model().await.expect_err("hung");
    assert!(
        matches!(
            error,
            LlmError::Timeout {
                kind: TimeoutKind::Ping,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn slow_generation_hits_the_total_timeout() {
    let fake = FakeOllama::with(FakeOptions {
        tokens: 20,
        answer: Some("one two three four five six seven eight nine ten".into()),
        answer_duration: Duration::from_secs(4),
        ..FakeOptions::default()
    });
    let mut config = llm_config(Provider::Ollama, &fake.url());
    config.timeout = Duration::from_millis(600);
    let generator = generator(&config);
    let started = Instant::now();
    let (tokens, error) =
        collect(generator.stream(&question()).await.expect("stream starts")).await;
    assert!(!tokens.is_empty() && tokens.len() < 20, "{tokens:?}");
    assert!(
        matches!(
            error,
            Some(LlmError::Timeout {
                kind: TimeoutKind::Generation,
                ..
            })
        ),
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn unreachable_server_is_a_quick_connect_error() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let generator = generator(&llm_config(Provider::Ollama, &url));
    let started = Instant::now();
    let error = generator
        .stream(&question())
        .await
        .err()
        .expect("nothing listens");
    assert!(matches!(error, LlmError::Connect { .. }), "{error:?}");
    assert!(error.is_unavailable());
    assert!(error.to_string().contains(&url), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    let error = generator.check_model().await.expect_err("nothing listens");
    assert!(matches!(error, LlmError::Connect { .. }), "{error:?}");
    let error = embedder(&embed_config(Provider::Ollama, &url))
        .embed(&["x".to_string()])
        .await
        .expect_err("nothing listens");
    assert!(matches!(error, LlmError::Connect { .. }), "{error:?}");
}

#[tokio::test]
async fn dropping_the_stream_cancels_the_upstream_generation() {
    let fake = FakeOllama::with(FakeOptions {
        tokens: 40,
        answer: Some("x".repeat(40)),
        answer_duration: Duration::from_secs(8),
        ..FakeOptions::default()
    });
    let generator = generator(&llm_config(Provider::Ollama, &fake.url()));
    let mut stream = generator.stream(&question()).await.expect("stream starts");
    for _ in 0..2 {
        assert!(matches!(stream.next().await, Some(Ok(_))));
    }
    drop(stream);
    assert!(
        fake.wait_for(Duration::from_secs(5), |c| c.chat_cancelled == 1
            && c.active_streams == 0)
            .await,
        "the fake saw the client go away: {:?}",
        fake.counters()
    );
    assert_eq!(fake.counters().chat_completed, 0);
}

#[tokio::test]
async fn http_errors_carry_status_and_upstream_message() {
    let fake = FakeOllama::with(FakeOptions {
        status: 503,
        ..FakeOptions::default()
    });
    let generator = generator(&llm_config(Provider::Ollama, &fake.url()));
    let error = generator.stream(&question()).await.err().expect("503");
    match &error {
        LlmError::Status {
            status: 503,
            message,
            ..
        } => assert!(message.contains("injected HTTP status 503")),
        other => panic!("expected Status 503, got {other:?}"),
    }
    assert!(error.is_unavailable());
    assert!(matches!(
        generator.check_model().await,
        Err(LlmError::Status { status: 503, .. })
    ));

    fake.set_status(404);
    let error = generator.stream(&question()).await.err().expect("404");
    assert!(
        matches!(error, LlmError::Status { status: 404, .. }),
        "{error:?}"
    );
    assert!(
        !error.is_unavailable(),
        "a 404 is a misconfiguration, not an outage"
    );

    fake.set_status(0);
    generator.check_model().await.expect("healthy again");
    assert!(fake.counters().probes >= 1);
}

#[tokio::test]
async fn ollama_embeddings_have_the_fakes_dimension() {
    let fake = FakeOllama::with(FakeOptions {
        dimensions: 48,
        ..FakeOptions::default()
    });
    let embedder = embedder(&embed_config(Provider::Ollama, &fake.url()));
    assert_eq!(embedder.dimensions(), None);
    // 70 texts = 3 requests (32 + 32 + 6).
    let texts: Vec<String> = (0..70)
        .map(|i| format!("passage number {i} about cats"))
        .collect();
    let vectors = embedder.embed(&texts).await.expect("embeddings");
    assert_eq!(vectors.len(), 70);
    assert!(vectors.iter().all(|v| v.len() == 48));
    assert_eq!(vectors[5], fake_embedding(&texts[5], 48), "in input order");
    assert_eq!(embedder.dimensions(), Some(48));
    let counters = fake.counters();
    assert_eq!((counters.embed_requests, counters.embed_inputs), (3, 70));

    let cosine = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let cats = embedder.embed_one("кошки мурлыкают").await.expect("one");
    let near = embedder.embed_one("кошка мурлычет").await.expect("one");
    let far = embedder
        .embed_one("quarterly tax report")
        .await
        .expect("one");
    assert!(cosine(&cats, &near) > cosine(&cats, &far));

    assert!(embedder.embed(&[]).await.expect("nothing to do").is_empty());

    let mut config = embed_config(Provider::Ollama, &fake.url());
    config.dimensions = 768;
    let error = embedder_err(&config).await;
    assert!(
        matches!(
            error,
            LlmError::Dimensions {
                expected: 768,
                got: 48,
                ..
            }
        ),
        "{error:?}"
    );
}

async fn embedder_err(config: &EmbedConfig) -> LlmError {
    embedder(config)
        .embed(&["x".to_string()])
        .await
        .expect_err("an error")
}

#[tokio::test]
async fn fake_serves_500_concurrent_streams() {
    const STREAMS: usize = 500;
    let fake = FakeOllama::with(FakeOptions {
        tokens: 4,
        answer: Some("a b c d".into()),
        answer_duration: Duration::from_millis(1500),
        ..FakeOptions::default()
    });
    let generator = generator(&llm_config(Provider::Ollama, &fake.url()));
    let started = Instant::now();
    let runs = (0..STREAMS).map(|_| async {
        let stream = generator.stream(&question()).await?;
        let (tokens, error) = collect(stream).await;
        match error {
            Some(e) => Err(e),
            None => Ok(tokens.concat()),
        }
    });
    let answers = futures_util::future::join_all(runs).await;
    let failures: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "{} failed, first: {:?}",
        failures.len(),
        failures.first()
    );
    assert!(answers.iter().all(|a| a.as_deref().ok() == Some("a b c d")));
    assert!(
        fake.wait_for(Duration::from_secs(5), |c| c.chat_completed
            == STREAMS as u64)
            .await,
        "{:?}",
        fake.counters()
    );
    let counters = fake.counters();
    assert!(
        counters.max_concurrent_streams >= STREAMS as u64 * 9 / 10,
        "streams overlapped: {counters:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
}

// ---- a real llama.cpp server, OpenAI protocol ----

#[tokio::test]
async fn openai_stream_from_llama_cpp_ends_cleanly() {
    let Some(server) = LlamaServer::shared() else {
        return;
    };
    let mut config = llm_config(Provider::OpenAi, &server.url());
    config.model = "smollm2".into();
    config.max_tokens = 24;
    let generator = generator(&config);
    let messages = vec![
        ChatMessage::system("You are a helpful assistant. Answer briefly."),
        ChatMessage::user("What is the capital of France?"),
    ];
    let started = Instant::now();
    let (tokens, error) = collect(generator.stream(&messages).await.expect("stream starts")).await;
    assert!(error.is_none(), "ended with [DONE]: {error:?}");
    assert!(!tokens.concat().trim().is_empty(), "a non-empty answer");
    assert!(
        tokens.len() <= 24,
        "max_tokens is honoured: {}",
        tokens.len()
    );
    eprintln!(
        "llama.cpp: {} tokens in {:?}: {:?}",
        tokens.len(),
        started.elapsed(),
        tokens.concat()
    );
}

#[tokio::test]
async fn openai_embeddings_from_llama_cpp() {
    let Some(server) = LlamaServer::shared() else {
        return;
    };
    let mut config = embed_config(Provider::OpenAi, &server.url());
    config.model = "smollm2".into();
    config.dimensions = 576;
    let embedder = embedder(&config);
    let vectors = embedder
        .embed(&["Cats purr.".to_string(), "Собаки лают.".to_string()])
        .await
        .expect("embeddings");
    assert_eq!(vectors.len(), 2);
    assert!(vectors.iter().all(|v| v.len() == 576));
    assert_ne!(vectors[0], vectors[1]);
    for v in &vectors {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "L2-normalised: {norm}");
    }
}

#[tokio::test]
async fn openai_ping_llama_cpp() {
    let Some(server) = LlamaServer::shared() else {
        return;
    };
    let mut config = llm_config(Provider::OpenAi, &server.url());
    config.model = "smollm2".into();
    let generator = generator(&config);
    generator
        .check_model()
        .await
        .expect("llama.cpp answers /v1/models");
    // A base URL ending in /v1, as users paste it, works too.
    let generator = generator_v1(&server.url());
    generator.check_model().await.expect("no /v1/v1");
}

fn generator_v1(url: &str) -> Generator {
    let mut config = llm_config(Provider::OpenAi, &format!("{url}/v1"));
    config.model = "smollm2".into();
    generator(&config)
}

#[tokio::test]
async fn openai_ping_on_a_closed_port_fails() {
    let generator = generator(&llm_config(
        Provider::OpenAi,
        &format!("http://127.0.0.1:{}", free_port()),
    ));
    let started = Instant::now();
    let error = generator.check_model().await.expect_err("nothing listens");
    assert!(matches!(error, LlmError::Connect { .. }), "{error:?}");
    assert!(error.is_unavailable());
    assert!(started.elapsed() < Duration::from_secs(1));
}

// ---- thinking models, cut-off answers, models not pulled (the faithful fake) ----

const THOUGHT: &str = "The user asks about cats. Passage [1] says cats purr. So: purring.";

#[tokio::test]
async fn thinking_is_off_by_default_and_keep_alive_is_sent() {
    let fake = FakeOllama::with(FakeOptions {
        answer: Some("Cats purr [1].".into()),
        thinking: Some(THOUGHT.into()),
        ..FakeOptions::default()
    });
    let generated = run(generator(&llm_config(Provider::Ollama, &fake.url()))
        .stream(&question())
        .await
        .expect("stream starts"))
    .await;
    assert!(generated.error.is_none(), "{:?}", generated.error);
    assert_eq!(generated.answer.concat(), "Cats purr [1].");
    assert!(generated.reasoning.is_empty(), "{:?}", generated.reasoning);
    assert_eq!(generated.finish, Some(Finish::Stop));
    let request = fake.last_chat_request().expect("seen");
    assert_eq!(request["think"], false, "{request}");
    assert_eq!(request["keep_alive"], "30m", "{request}");
}

/// Ollama's qwen3 may think for 70 s before the first word of the answer, with
/// `first_token_timeout` at 60 s. The same shape in real time, scaled down: a 3 s think
/// against a 1 s first-token bound (its first thinking token comes at once, as Ollama's
/// does, so the bound is met by reasoning), inside a 20 s total bound.
#[tokio::test]
async fn a_think_longer_than_first_token_timeout_still_answers() {
    let fake = FakeOllama::with(FakeOptions {
        answer: Some("Cats purr [1].".into()),
        tokens: 4,
        thinking: Some(THOUGHT.into()),
        thinking_tokens: 12,
        thinking_duration: Duration::from_secs(3),
        ..FakeOptions::default()
    });
    let mut config = llm_config(Provider::Ollama, &fake.url());
    config.think = true;
    config.first_token_timeout = Duration::from_secs(1);
    config.timeout = Duration::from_secs(20);
    let started = Instant::now();
    let generated = run(generator(&config)
        .stream(&question())
        .await
        .expect("stream starts"))
    .await;
    let elapsed = started.elapsed();
    assert!(generated.error.is_none(), "{:?}", generated.error);
    assert_eq!(generated.reasoning.concat(), THOUGHT);
    assert_eq!(generated.reasoning.len(), 12);
    assert_eq!(generated.answer.concat(), "Cats purr [1].");
    assert!(!generated.interleaved, "reasoning first, then the answer");
    assert_eq!(generated.finish, Some(Finish::Stop));
    assert!(
        elapsed >= Duration::from_millis(2700),
        "the think took its time: {elapsed:?}"
    );
    let request = fake.last_chat_request().expect("seen");
    assert!(
        request.get("think").is_none(),
        "think = true leaves the field out, so a model that cannot think is not refused: {request}"
    );
}

#[tokio::test]
async fn a_think_that_uses_up_max_tokens_ends_with_length_and_no_answer() {
    let fake = FakeOllama::with(FakeOptions {
        answer: Some("Cats purr [1].".into()),
        thinking: Some(THOUGHT.repeat(4)),
        thinking_tokens: 40,
        ..FakeOptions::default()
    });
    let mut config = llm_config(Provider::Ollama, &fake.url());
    config.think = true;
    config.max_tokens = 10;
    let generated = run(generator(&config)
        .stream(&question())
        .await
        .expect("stream starts"))
    .await;
    assert!(generated.error.is_none(), "{:?}", generated.error);
    assert!(generated.answer.is_empty(), "{:?}", generated.answer);
    assert_eq!(generated.reasoning.len(), 10, "num_predict counts thinking");
    assert_eq!(generated.finish, Some(Finish::Length));
    assert_eq!(
        fake.last_chat_request().expect("seen")["options"]["num_predict"],
        10
    );
}

#[tokio::test]
async fn a_cut_off_answer_ends_with_length_and_keeps_its_last_piece() {
    let answer = "Cats purr when they are content, and sometimes when hurt [1].";
    let fake = FakeOllama::with(FakeOptions {
        answer: Some(answer.into()),
        tokens: 12,
        ..FakeOptions::default()
    });
    let mut config = llm_config(Provider::Ollama, &fake.url());
    config.max_tokens = 5;
    let generated = run(generator(&config)
        .stream(&question())
        .await
        .expect("stream starts"))
    .await;
    assert!(generated.error.is_none(), "{:?}", generated.error);
    // The fifth piece rides on the final `done_reason: "length"` line.
    assert_eq!(generated.answer, split_tokens(answer, 12)[..5].to_vec());
    assert_eq!(generated.finish, Some(Finish::Length));
}

#[tokio::test]
async fn a_model_that_is_not_pulled_is_named_not_an_outage() {
    let fake = FakeOllama::start();
    let mut config = llm_config(Provider::Ollama, &fake.url());
    config.model = "qwen3".into();
    let missing = generator(&config);
    let error = missing.stream(&question()).await.err().expect("a 404");
    assert!(matches!(error, LlmError::ModelMissing { .. }), "{error:?}");
    assert_eq!(
        error.to_string(),
        "model qwen3 is not pulled: ollama pull qwen3"
    );
    assert!(!error.is_unavailable(), "the server is up");
    assert_eq!(fake.counters().chat_refused, 1);

    let error = missing.check_model().await.expect_err("not listed");
    assert_eq!(
        error.to_string(),
        "model qwen3 is not pulled: ollama pull qwen3"
    );
    generator(&llm_config(Provider::Ollama, &fake.url()))
        .check_model()
        .await
        .expect("llama3.2 is llama3.2:latest");
    fake.set_models(&["qwen3:latest", "nomic-embed-text:latest"]);
    missing.check_model().await.expect("pulled now");

    let mut embed = embed_config(Provider::Ollama, &fake.url());
    embed.model = "bge-m3".into();
    let error = embedder_err(&embed).await;
    assert_eq!(
        error.to_string(),
        "model bge-m3 is not pulled: ollama pull bge-m3"
    );
    let error = embedder(&embed)
        .check_model(Duration::from_secs(2))
        .await
        .expect_err("not listed");
    assert!(matches!(error, LlmError::ModelMissing { .. }), "{error:?}");
    embedder(&embed_config(Provider::Ollama, &fake.url()))
        .check_model(Duration::from_secs(2))
        .await
        .expect("nomic-embed-text is pulled");
}

#[tokio::test]
async fn configured_dimensions_and_keep_alive_are_sent_to_ollama() {
    let fake = FakeOllama::with(FakeOptions {
        dimensions: 64,
        ..FakeOptions::default()
    });
    let mut config = embed_config(Provider::Ollama, &fake.url());
    config.dimensions = 16;
    config.keep_alive = Some(KeepAlive::Seconds(-1));
    let vectors = embedder(&config)
        .embed(&["cats purr".to_string()])
        .await
        .expect("shortened vectors, not a size error");
    assert_eq!(vectors[0].len(), 16);
    let norm = vectors[0].iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "re-normalised: {norm}");
    let request = fake.last_embed_request().expect("seen");
    assert_eq!(
        (request["dimensions"].clone(), request["keep_alive"].clone()),
        (16.into(), (-1).into())
    );
}

#[tokio::test]
async fn openai_finish_reason_length_from_llama_cpp() {
    let Some(server) = LlamaServer::shared() else {
        return;
    };
    let mut config = llm_config(Provider::OpenAi, &server.url());
    config.model = "smollm2".into();
    config.max_tokens = 4;
    let messages = vec![
        ChatMessage::system("You are a helpful assistant."),
        ChatMessage::user("Write a long story about a cat who learns to purr."),
    ];
    let generated = run(generator(&config)
        .stream(&messages)
        .await
        .expect("stream starts"))
    .await;
    assert!(generated.error.is_none(), "{:?}", generated.error);
    assert!(!generated.answer.concat().is_empty());
    assert!(generated.answer.len() <= 4, "{:?}", generated.answer);
    assert_eq!(
        generated.finish,
        Some(Finish::Length),
        "4 tokens cannot finish a long story: {:?}",
        generated.answer
    );
    eprintln!(
        "llama.cpp cut off after 4 tokens: {:?}",
        generated.answer.concat()
    );
}

#[tokio::test]
async fn openai_model_check_against_llama_cpp() {
    let Some(server) = LlamaServer::shared() else {
        return;
    };
    let mut config = llm_config(Provider::OpenAi, &server.url());
    config.model = "smollm2".into();
    generator(&config)
        .check_model()
        .await
        .expect("llama.cpp lists its alias");
    config.model = "llama3.2".into();
    let error = generator(&config)
        .check_model()
        .await
        .expect_err("not served");
    let text = error.to_string();
    assert!(
        text.starts_with("model llama3.2 is not served by http://127.0.0.1:")
            && text.contains("smollm2"),
        "{text}"
    );
}

// ---- the same, through the real binary ----

const BOUND: Duration = Duration::from_secs(30);
const DOCS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs");

/// One worker, data under the test dir, the LLM at `fake`, then `extra` lines of `[llm]` and
/// any further tables.
fn server_with(fake: &FakeOllama, llm_extra: &str, tables: &str) -> ServerProcess {
    let config = format!(
        "workers = 1\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\nadmin_token = \"t\"\n\
         [store]\npath = \"{{dir}}/data\"\n\
         [llm]\nprovider = \"ollama\"\nurl = \"{}\"\nmodel = \"llama3.2\"\n{llm_extra}\n{tables}\n",
        fake.url()
    );
    ServerProcess::start(&config)
}

fn no_first_run() -> &'static str {
    "[rag]\ningest_docs_on_first_run = false\n"
}

fn seeded(server: &ServerProcess) -> String {
    let addr = server.addr();
    http::add_document(
        &addr,
        "Reload",
        "# Reload\n\nSend HUP to the master to reload the workers without downtime.",
    );
    addr
}

/// The stream's events, and the text of the events named `name`, joined.
fn stream(addr: &str, question: &str) -> Vec<(String, serde_json::Value)> {
    let response = post_json(
        addr,
        "/api/ask/stream",
        &serde_json::json!({ "question": question }),
    )
    .expect("a response");
    assert_eq!(response.status, 200, "{}", response.body);
    sse_events(&response.body)
}

fn text_of(events: &[(String, serde_json::Value)], name: &str) -> String {
    events
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, d)| d["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn health(addr: &str) -> serde_json::Value {
    http::get(addr, "/health").expect("/health").json()
}

#[test]
fn through_the_server_a_long_think_streams_as_reasoning_and_then_answers() {
    let fake = FakeOllama::with(FakeOptions {
        answer: Some("Send HUP [1].".into()),
        tokens: 4,
        thinking: Some(THOUGHT.into()),
        thinking_tokens: 12,
        thinking_duration: Duration::from_secs(3),
        ..FakeOptions::default()
    });
    // The 70-second think against first_token_timeout = 60, scaled: 3 s against 1 s.
    let server = server_with(
        &fake,
        "think = true\nfirst_token_timeout = 1\ntimeout = 20",
        no_first_run(),
    );
    let addr = seeded(&server);
    let events = stream(&addr, "How do I reload?");
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let first_token = names.iter().position(|n| *n == "token");
    let last_reasoning = names.iter().rposition(|n| *n == "reasoning");
    assert!(
        matches!((last_reasoning, first_token), (Some(r), Some(t)) if r < t),
        "reasoning, then the answer: {names:?}"
    );
    assert_eq!(text_of(&events, "reasoning"), THOUGHT);
    assert_eq!(text_of(&events, "token"), "Send HUP [1].");
    let done = &events.last().expect("events").1;
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    assert_eq!(
        (done["mode"].clone(), done["truncated"].clone()),
        ("generated".into(), false.into())
    );

    // The JSON API keeps the reasoning apart from the answer.
    let answer = post_json(
        &addr,
        "/api/ask",
        &serde_json::json!({ "question": "reload?" }),
    )
    .expect("answer")
    .json();
    assert_eq!(answer["answer"], "Send HUP [1].");
    assert_eq!(answer["reasoning"], THOUGHT);

    // think = false (the default): no reasoning reaches anyone, and the fake was told so.
    let quiet = server_with(&fake, "first_token_timeout = 1", no_first_run());
    let addr = seeded(&quiet);
    let events = stream(&addr, "How do I reload?");
    assert!(!events.iter().any(|(n, _)| n == "reasoning"), "{events:?}");
    assert_eq!(text_of(&events, "token"), "Send HUP [1].");
    assert_eq!(fake.last_chat_request().expect("seen")["think"], false);
}

#[test]
fn through_the_server_a_think_that_uses_up_max_tokens_is_an_error_the_user_reads() {
    let fake = FakeOllama::with(FakeOptions {
        thinking: Some(THOUGHT.repeat(4)),
        thinking_tokens: 40,
        ..FakeOptions::default()
    });
    let server = server_with(&fake, "think = true\nmax_tokens = 6", no_first_run());
    let addr = seeded(&server);
    let events = stream(&addr, "How do I reload?");
    let (name, data) = events.last().expect("events");
    assert_eq!(name, "error", "not an empty 'generated' answer: {events:?}");
    let message = data["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("spent its whole budget of 6 tokens thinking"),
        "{message}"
    );
    assert!(!events.iter().any(|(n, _)| n == "token" || n == "done"));
    let response = post_json(
        &addr,
        "/api/ask",
        &serde_json::json!({ "question": "reload?" }),
    )
    .expect("answer");
    assert_eq!(response.status, 502, "{}", response.body);
    assert!(response.body.contains("thinking"), "{}", response.body);
}

#[test]
fn through_the_server_a_cut_off_answer_is_marked_in_the_stream_the_api_and_metrics() {
    let fake = FakeOllama::with(FakeOptions {
        answer: Some("Send HUP to the master process to reload [1].".into()),
        tokens: 8,
        ..FakeOptions::default()
    });
    let server = server_with(&fake, "max_tokens = 3", no_first_run());
    let addr = seeded(&server);
    let events = stream(&addr, "How do I reload?");
    let done = &events.last().expect("events").1;
    assert_eq!(done["truncated"], true, "{events:?}");
    assert_eq!(done["mode"], "generated");
    assert_eq!(
        text_of(&events, "token"),
        split_tokens("Send HUP to the master process to reload [1].", 8)[..3].concat()
    );
    let answer = post_json(
        &addr,
        "/api/ask",
        &serde_json::json!({ "question": "reload?" }),
    )
    .expect("answer")
    .json();
    assert_eq!(answer["truncated"], true, "{answer}");
    let metrics = http::get(&addr, "/metrics").expect("/metrics").body;
    assert!(
        metrics.contains("ragpool_rag_answers_truncated_total 2"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("truncated"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn through_the_server_a_chat_model_not_pulled_is_named_in_the_answer_and_in_health() {
    let fake = FakeOllama::start();
    let config = format!(
        "workers = 1\nbind = [\"127.0.0.1:0\"]\naccesslog = \"\"\nadmin_token = \"t\"\n\
         [store]\npath = \"{{dir}}/data\"\n\
         [llm]\nprovider = \"ollama\"\nurl = \"{}\"\nmodel = \"qwen3\"\n{}",
        fake.url(),
        no_first_run()
    );
    let server = ServerProcess::start(&config);
    let addr = seeded(&server);
    let answer = post_json(
        &addr,
        "/api/ask",
        &serde_json::json!({ "question": "How do I reload?" }),
    )
    .expect("answer")
    .json();
    assert_eq!(answer["mode"], "extractive", "{answer}");
    let text = answer["answer"].as_str().unwrap_or_default();
    assert!(
        text.starts_with(
            "The language model qwen3 is not available on its server (it is not pulled: ollama pull qwen3)"
        ),
        "{text}"
    );
    let status = health(&addr);
    assert_eq!(status["status"], "degraded", "{status}");
    assert_eq!(status["llm"]["status"], "down", "{status}");
    assert_eq!(
        status["llm"]["detail"],
        "model qwen3 is not pulled: ollama pull qwen3"
    );
    assert_eq!(status["llm"]["model"], "qwen3");

    // Cached: a burst of polls reaches Ollama's model list at most once more.
    let before = fake.counters().model_checks;
    for _ in 0..20 {
        health(&addr);
    }
    assert!(
        fake.counters().model_checks <= before + 1,
        "{:?}",
        fake.counters()
    );

    // `ollama pull qwen3`: /health sees it once its cache expires.
    fake.set_models(&["qwen3:latest"]);
    assert!(
        wait_until(BOUND, || health(&addr)["status"] == "ok"),
        "{}",
        health(&addr)
    );
}

#[test]
fn through_the_server_an_embedding_model_not_pulled_on_first_run_still_stores_the_manual() {
    let fake = FakeOllama::start();
    let tables = format!(
        "[embed]\nprovider = \"ollama\"\nurl = \"{}\"\nmodel = \"bge-m3\"\n[rag]\ndocs_dir = \"{DOCS}\"\n",
        fake.url()
    );
    let server = server_with(&fake, "", &tables);
    let addr = server.addr();
    assert!(
        server.wait_for_log("first run: ingested", BOUND),
        "{}",
        server.logs()
    );
    let status = health(&addr);
    let documents = status["store"]["documents"].as_u64().unwrap_or_default();
    assert!(documents >= 10, "the manual is stored: {status}");
    assert_eq!(status["store"]["pending_vectors"], documents, "{status}");
    assert_eq!(status["embed"]["status"], "down", "{status}");
    assert_eq!(
        status["embed"]["detail"],
        "model bge-m3 is not pulled: ollama pull bge-m3"
    );
    assert!(
        status["degraded"]
            .as_array()
            .is_some_and(|d| d.contains(&"embed".into())),
        "{status}"
    );
    // Keyword search finds the manual meanwhile.
    let answer = post_json(
        &addr,
        "/api/ask",
        &serde_json::json!({ "question": "How do I reload the workers?" }),
    )
    .expect("answer")
    .json();
    assert!(
        answer["sources"].as_array().is_some_and(|s| !s.is_empty()),
        "{answer}"
    );
    let metrics = http::get(&addr, "/metrics").expect("/metrics").body;
    assert!(
        metrics.contains(&format!(
            "ragpool_store_documents_pending_vectors {documents}"
        )),
        "{metrics}"
    );

    // `ragpool check --online` names the problem and fails.
    let check = |expect_ok: bool| {
        let out = std::process::Command::new(BIN)
            .args(["check", "--online", "--config"])
            .arg(&server.config_path)
            .current_dir(server.dir.path())
            .output()
            .expect("ragpool check");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.success(), expect_ok, "{stderr}");
        stderr
    };
    let stderr = check(false);
    assert!(
        stderr.contains(&format!(
            "[embed] bge-m3 at {}: model bge-m3 is not pulled: ollama pull bge-m3",
            fake.url()
        )) && stderr.contains(&format!("[llm] llama3.2 at {}: ok", fake.url())),
        "{stderr}"
    );

    // `ollama pull bge-m3`, then fill in the vectors.
    fake.set_models(&["llama3.2:latest", "bge-m3:latest"]);
    check(true);
    let out = std::process::Command::new(BIN)
        .args(["ingest", "--reembed", "--config"])
        .arg(&server.config_path)
        .current_dir(server.dir.path())
        .output()
        .expect("ragpool ingest --reembed");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "vectors filled in for {documents} documents, 0 still without"
        )),
        "{stdout}"
    );
    assert!(
        wait_until(BOUND, || {
            let status = health(&addr);
            status["store"]["pending_vectors"] == 0 && status["status"] == "ok"
        }),
        "{}",
        health(&addr)
    );
}

#[test]
fn on_the_page_reasoning_is_collapsed_apart_from_the_answer_and_a_cut_answer_says_so() {
    use crate::support::webdriver::Browser;
    let Some(browser) = Browser::start(390, 844) else {
        return;
    };
    let answer = "Send HUP to the master to reload the workers [1].";
    let fake = FakeOllama::with(FakeOptions {
        answer: Some(answer.into()),
        tokens: 8,
        answer_duration: Duration::from_secs(1),
        thinking: Some(THOUGHT.into()),
        thinking_tokens: 6,
        thinking_duration: Duration::from_secs(2),
        ..FakeOptions::default()
    });
    // 6 thinking tokens + 3 of the answer: the budget runs out mid-answer.
    let server = server_with(&fake, "think = true\nmax_tokens = 9", no_first_run());
    let addr = seeded(&server);
    browser.goto(&format!("http://{addr}/"));
    let find = |css: &str| {
        let mut found = None;
        assert!(
            wait_until(BOUND, || {
                found = browser.find(css);
                found.is_some()
            }),
            "no {css}"
        );
        found.expect("found")
    };
    let question = find("#question");
    browser.send_keys(&question, "How do I reload the workers?");
    browser.click(&find("#send"));
    let card = find("#log .a");
    assert!(
        wait_until(BOUND, || browser.attribute(&card, "data-state").as_deref()
            == Some("thinking")),
        "the card says the model is thinking: {:?}",
        browser.attribute(&card, "data-state")
    );
    assert_eq!(
        browser.find_in(&card, ".status").map(|s| browser.text(&s)),
        Some("The model is thinking…".to_string())
    );
    assert!(
        wait_until(BOUND, || browser.attribute(&card, "data-state").as_deref()
            == Some("done")),
        "{:?}",
        browser.text(&card)
    );
    let reasoning = browser
        .find_in(&card, "details.reasoning")
        .expect("a reasoning block");
    assert_eq!(browser.property(&reasoning, "open"), false, "collapsed");
    assert_eq!(
        browser
            .find_in(&reasoning, "summary")
            .map(|s| browser.text(&s)),
        Some("Reasoning".to_string())
    );
    assert_eq!(
        browser.property(&reasoning, "textContent"),
        format!("Reasoning{THOUGHT}")
    );
    let shown = browser.find_in(&card, ".answer").map(|a| browser.text(&a));
    assert_eq!(
        shown,
        Some(split_tokens(answer, 8)[..3].concat()),
        "no reasoning in the answer"
    );
    assert_eq!(
        browser.find_in(&card, ".cut").map(|c| browser.text(&c)),
        Some("The answer was cut off: the model reached its length limit.".to_string())
    );
}
