//! Retrieval speed of the embedded store at 10k / 100k / 1M synthetic chunks (#11): p50/p99 of
//! lexical, dense (quantized shortlist + exact re-scoring) and hybrid top-10, exact
//! brute-force dense for comparison, and recall@10 of the quantized path against exact.
//!
//! "Top-10" is measured twice: a plain `k = 10` search of each list, and the way `ask`
//! retrieves 10 documents (each list asked for [`rank::candidates`]`(10)` chunks, then
//! [`rank::fuse`]), which is what a question costs.
//!
//! Run with `bash benches/retrieval_speed.sh` (or `cargo bench --bench retrieval_speed`);
//! knobs are environment variables:
//!
//! - `RETRIEVAL_SIZES` (`10000,100000`): store sizes in chunks; add `1000000` for 1M.
//! - `RETRIEVAL_DIMS` (384), `RETRIEVAL_QUERIES` (300): timed queries per kind and size.
//! - `RETRIEVAL_EXACT_QUERIES` (100): queries also run exactly (recall and exact latency).
//! - `RETRIEVAL_DATA` (`target/retrieval-speed`): where stores are built once and reused.
//!
//! One store thread (`[store] threads = 1`) and a current-thread runtime: one core's worth.
//! The synthetic corpus: documents of 100 chunks, each document a topic (a random unit
//! centre) and each chunk its centre plus noise, normalised, like embeddings of one text; the
//! text is 40 words drawn Zipf-like from a 20,000-word vocabulary. Queries are a point near a
//! random document's centre and three words of rank 50 or rarer (log-uniform). Seeded.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ragpool::rag::rank::{self, Weighted};
use ragpool::rag::store::Store;
use ragpool::rag::{NewChunk, NewDocument};

const CHUNKS_PER_DOC: usize = 100;
const WORDS_PER_CHUNK: usize = 40;
const VOCABULARY: usize = 20_000;
const K: usize = 10;
/// Noise per component around a document's centre (unit centre, 384 dims: cos ~0.8).
const NOISE: f32 = 0.75;
/// Rarest-first rank below which words never appear in a question (see `query_word`).
const QUERY_MIN_RANK: usize = 50;

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    fn gauss(&mut self) -> f32 {
        let (u, v) = (self.unit().max(1e-12), self.unit());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }

    /// A word index, Zipf-like (log-uniform rank).
    fn word(&mut self) -> usize {
        ((VOCABULARY as f64).powf(self.unit()) as usize).min(VOCABULARY) - 1
    }

    /// A question's word: log-uniform over ranks from [`QUERY_MIN_RANK`] on, as questions
    /// name content words rather than the corpus's commonest ones (which stop-word removal
    /// drops from real questions).
    fn query_word(&mut self) -> usize {
        let (lo, hi) = ((QUERY_MIN_RANK as f64).ln(), (VOCABULARY as f64).ln());
        ((lo + (hi - lo) * self.unit()).exp() as usize).clamp(QUERY_MIN_RANK, VOCABULARY) - 1
    }
}

fn normalise(mut v: Vec<f32>) -> Vec<f32> {
    let n = v
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= n);
    v
}

/// Pseudo-words made of letters only, so the stemmer keeps them apart.
fn word_text(i: usize) -> String {
    let mut i = i + 1;
    let mut s = String::from("w");
    while i > 0 {
        s.push((b'a' + (i % 26) as u8) as char);
        i /= 26;
    }
    s
}

fn centre(seed: u64, dims: usize) -> Vec<f32> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    normalise((0..dims).map(|_| rng.gauss()).collect())
}

fn near(rng: &mut Rng, centre: &[f32]) -> Vec<f32> {
    let sigma = NOISE / (centre.len() as f32).sqrt();
    normalise(centre.iter().map(|c| c + sigma * rng.gauss()).collect())
}

fn text(rng: &mut Rng, words: usize) -> String {
    (0..words)
        .map(|_| word_text(rng.word()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn config(dir: &Path) -> ragpool::config::StoreConfig {
    let toml = format!(
        "[store]\npath = {:?}\nthreads = 1\n[rag]\ningest_docs_on_first_run = false\n",
        dir.display().to_string()
    );
    ragpool::config::from_toml_str(&toml, &dir.join("bench.toml"))
        .expect("the bench config is valid")
        .store
}

async fn build(store: &Store, chunks: usize, dims: usize) {
    let have = store.stats().await.expect("stats").chunks as usize;
    if have == chunks {
        eprintln!("  reusing {chunks} chunks");
        return;
    }
    assert_eq!(have, 0, "a partial store: remove it and run again");
    let started = Instant::now();
    let docs = chunks.div_ceil(CHUNKS_PER_DOC);
    for d in 0..docs {
        let mut rng = Rng((d as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
        let c = centre(d as u64, dims);
        let n = CHUNKS_PER_DOC.min(chunks - d * CHUNKS_PER_DOC);
        let doc = NewDocument {
            source: format!("synthetic/{d}.md"),
            title: format!("Synthetic {d}"),
            content_hash: format!("{d}"),
            chunks: (0..n)
                .map(|position| NewChunk {
                    position,
                    text: text(&mut rng, WORDS_PER_CHUNK),
                    embedding: Some(near(&mut rng, &c)),
                })
                .collect(),
        };
        store.upsert_document(doc).await.expect("upsert");
        if d % 500 == 499 {
            eprintln!(
                "  {} chunks in {:.0?}",
                (d + 1) * CHUNKS_PER_DOC,
                started.elapsed()
            );
        }
    }
    eprintln!("  built {chunks} chunks in {:.1?}", started.elapsed());
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

fn summary(name: &str, chunks: usize, mut times: Vec<Duration>) {
    times.sort();
    println!(
        "| {chunks} | {name} | {} | {:.2} | {:.2} |",
        times.len(),
        percentile(&times, 0.50),
        percentile(&times, 0.99)
    );
}

async fn measure(chunks: usize, dims: usize, queries: usize, exact_queries: usize, data: &Path) {
    let dir = data.join(format!("n{chunks}-d{dims}"));
    eprintln!(
        "store of {chunks} chunks x {dims} dims in {}",
        dir.display()
    );
    let store = Store::open(&config(&dir)).await.expect("open");
    build(&store, chunks, dims).await;
    let Store::Embedded(embedded) = &store else {
        unreachable!("the bench config is embedded")
    };

    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let docs = chunks.div_ceil(CHUNKS_PER_DOC) as u64;
    let qs: Vec<(String, Vec<f32>)> = (0..queries.max(exact_queries))
        .map(|_| {
            let c = centre(rng.next_u64() % docs, dims);
            let words: Vec<String> = (0..3).map(|_| word_text(rng.query_word())).collect();
            (words.join(" "), near(&mut rng, &c))
        })
        .collect();

    // The first dense search loads the quantized copy: timed on its own, not in the p99.
    let started = Instant::now();
    embedded.dense_search(&qs[0].1, K).await.expect("dense");
    eprintln!(
        "  first dense search (loads the int8 copy): {:.1?}",
        started.elapsed()
    );

    let depth = rank::candidates(K);
    let (mut lexical, mut dense, mut hybrid) = (vec![], vec![], vec![]);
    let (mut lexical_deep, mut dense_deep, mut hybrid_deep, mut exact) =
        (vec![], vec![], vec![], vec![]);
    for (words, vector) in qs.iter().take(queries) {
        for (k, lexical, dense, hybrid) in [
            (K, &mut lexical, &mut dense, &mut hybrid),
            (depth, &mut lexical_deep, &mut dense_deep, &mut hybrid_deep),
        ] {
            let t = Instant::now();
            std::hint::black_box(store.lexical_search(words, k).await.expect("lexical"));
            lexical.push(t.elapsed());
            let t = Instant::now();
            std::hint::black_box(store.dense_search(vector, k).await.expect("dense"));
            dense.push(t.elapsed());
            let t = Instant::now();
            let l = store.lexical_search(words, k).await.expect("lexical");
            let d = store.dense_search(vector, k).await.expect("dense");
            let lists = [
                Weighted {
                    hits: l,
                    weight: 1.0,
                },
                Weighted {
                    hits: d,
                    weight: 1.0,
                },
            ];
            std::hint::black_box(rank::fuse(&lists, K));
            hybrid.push(t.elapsed());
        }
    }
    let (mut found, mut wanted) = (0usize, 0usize);
    for (_, vector) in qs.iter().take(exact_queries) {
        let t = Instant::now();
        let truth = embedded.dense_search_exact(vector, K).await.expect("exact");
        exact.push(t.elapsed());
        let got = store.dense_search(vector, K).await.expect("dense");
        let key = |h: &ragpool::rag::Hit| (h.document_id.clone(), h.position);
        let got: Vec<_> = got.iter().map(key).collect();
        wanted += truth.len();
        found += truth.iter().filter(|h| got.contains(&key(h))).count();
    }
    summary("lexical, k=10", chunks, lexical);
    summary("dense (int8 + re-score), k=10", chunks, dense);
    summary("hybrid (lexical + dense + fuse), k=10", chunks, hybrid);
    let d = depth;
    summary(
        &format!("lexical, k={d} (ask's depth)"),
        chunks,
        lexical_deep,
    );
    summary(
        &format!("dense (int8 + re-score), k={d}"),
        chunks,
        dense_deep,
    );
    summary(
        &format!("hybrid as ask: 2 x k={d} + fuse to 10"),
        chunks,
        hybrid_deep,
    );
    summary("dense exact (sqlite-vec), k=10", chunks, exact);
    println!(
        "| {chunks} | recall@{K} int8 vs exact | {exact_queries} | {:.4} | |",
        found as f64 / wanted.max(1) as f64
    );
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes `--bench`; this harness takes no arguments.
    let sizes: Vec<usize> = std::env::var("RETRIEVAL_SIZES")
        .unwrap_or_else(|_| "10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let dims = env_or("RETRIEVAL_DIMS", 384);
    let queries = env_or("RETRIEVAL_QUERIES", 300);
    let exact_queries = env_or("RETRIEVAL_EXACT_QUERIES", 100);
    let data = std::env::var("RETRIEVAL_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/retrieval-speed")
        });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("| chunks | search (top-{K}) | queries | p50 ms | p99 ms |");
    println!("|---:|---|---:|---:|---:|");
    for chunks in sizes {
        runtime.block_on(measure(chunks, dims, queries, exact_queries, &data));
    }
}
