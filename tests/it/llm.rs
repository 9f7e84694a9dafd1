//! The model clients (`ragpool::rag::llm`) called directly, on a tokio `current_thread` runtime
//! as in a worker: Ollama's protocol against the fake Ollama, OpenAI's against a real
//! llama.cpp server (skipped when not installed, unless `RAGPOOL_REQUIRE_LLAMA=1`).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use ragpool::config::app::{EmbedConfig, KeepAlive, LlmConfig, Provider};
use ragpool::rag::llm::{
    ChatMessage, Chunk, Embedder, Finish, Generator, LlmError, TimeoutKind, TokenStream,
};

use crate::support::fake_ollama::{
    fake_embedding, split_tokens, FailMode, FakeOllama, FakeOptions,
};
use crate::support::free_port;
use crate::support::llama::LlamaServer;

fn llm_config(provider: Provider, url: &str) -> LlmConfig {
    LlmConfig {
        provider,
        url: url.to_string(),
        model: "llama3.2".into(),
        api_key: None,
        timeout: Duration::from_secs(20),
        connect_timeout: Duration::from_secs(1),
        first_token_timeout: Duration::from_secs(10),
        temperature: 0.0,
        max_tokens: 64,
        max_concurrent: 0,
        think: false,
        keep_alive: Some(KeepAlive::Duration("30m".into())),
    }
}

fn embed_config(provider: Provider, url: &str) -> EmbedConfig {
    EmbedConfig {
        provider,
        url: url.to_string(),
        model: "nomic-embed-text".into(),
        api_key: None,
        dimensions: 0,
        timeout: Duration::from_secs(20),
        keep_alive: None,
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
    let error = generator.ping().await.expect_err("hung");
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

    let error = generator.ping().await.expect_err("nothing listens");
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
        generator.ping().await,
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
    generator.ping().await.expect("healthy again");
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
    let generator = generator(&llm_config(Provider::OpenAi, &server.url()));
    generator
        .ping()
        .await
        .expect("llama.cpp answers /v1/models");
    // A base URL ending in /v1, as users paste it, works too.
    let generator = generator_v1(&server.url());
    generator.ping().await.expect("no /v1/v1");
}

fn generator_v1(url: &str) -> Generator {
    generator(&llm_config(Provider::OpenAi, &format!("{url}/v1")))
}

#[tokio::test]
async fn openai_ping_on_a_closed_port_fails() {
    let generator = generator(&llm_config(
        Provider::OpenAi,
        &format!("http://127.0.0.1:{}", free_port()),
    ));
    let started = Instant::now();
    let error = generator.ping().await.expect_err("nothing listens");
    assert!(matches!(error, LlmError::Connect { .. }), "{error:?}");
    assert!(error.is_unavailable());
    assert!(started.elapsed() < Duration::from_secs(1));
}
