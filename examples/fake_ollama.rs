//! A FAKE Ollama for the benchmarks (benches/ask_load.sh): not Ollama, and no model behind it.
//! It is the test suite's wire-level fake (tests/it/support/fake_ollama.rs, compiled in here
//! unchanged) as a process of its own, so ragpool, Gunicorn and the load generator all talk to
//! the same backend over real loopback sockets.
//!
//! ```text
//! cargo run --release --example fake_ollama -- [--tokens N] [--answer-ms MS] [--first-token-ms MS]
//! ```
//!
//! Prints `listening http://127.0.0.1:PORT` on standard output once it accepts, then serves
//! until it is killed. Models: `llama3.2` and `nomic-embed-text`.

use std::time::{Duration, Instant};

#[path = "../tests/it/support/fake_ollama.rs"]
#[allow(dead_code)]
mod fake_ollama;

/// What the fake module expects of its parent (the test suite's `support::wait_until`).
#[allow(dead_code)]
fn wait_until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn main() {
    let mut options = fake_ollama::FakeOptions {
        tokens: 100,
        answer_duration: Duration::from_millis(2970),
        first_token_delay: Duration::from_millis(30),
        ..fake_ollama::FakeOptions::default()
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().and_then(|v| v.parse::<u64>().ok());
        match (flag.as_str(), value) {
            ("--tokens", Some(n)) => options.tokens = n as usize,
            ("--answer-ms", Some(ms)) => options.answer_duration = Duration::from_millis(ms),
            ("--first-token-ms", Some(ms)) => options.first_token_delay = Duration::from_millis(ms),
            _ => {
                eprintln!("usage: fake_ollama [--tokens N] [--answer-ms MS] [--first-token-ms MS]");
                std::process::exit(2);
            }
        }
    }
    let fake = fake_ollama::FakeOllama::with(options);
    println!("listening {}", fake.url());
    loop {
        std::thread::park();
    }
}
