//! Pool metrics in shared memory: fixed arrays of atomic counters, one set per scoreboard slot
//! plus one "retired" set in the pool header into which the master folds a worker's counters
//! when it reaps it. So any worker can answer `/metrics` for the whole pool, and counts survive
//! restarts: they belong to the pool, not to a process (unlike Prometheus multiprocess files).
//!
//! Recording is three relaxed atomic adds per request on the worker's own slot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Routes, as labels. A fixed set keeps the label space (and the shared memory) bounded;
/// which request gets which label is the route table's ([`crate::http::routes`]).
pub const ROUTES: [&str; 11] = [
    "page",
    "health",
    "ask",
    "ask_stream",
    "documents",
    "feedback",
    "openai",
    "metrics",
    "status",
    "not_found",
    "other",
];

/// Statuses counted exactly; anything else is counted under its class ("2xx" ... "5xx").
pub const STATUSES: [&str; 25] = [
    "200", "201", "204", "304", "400", "401", "403", "404", "405", "408", "413", "414", "415",
    "422", "429", "431", "499", "500", "502", "503", "504", "2xx", "3xx", "4xx", "5xx",
];

/// Histogram bucket upper bounds, seconds (the last bucket is +Inf).
pub const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const BUCKET_CELLS: usize = BUCKETS.len() + 1;

/// RAG pipeline stages with their own histograms.
pub const STAGES: [&str; 4] = ["embed", "retrieve", "generate", "first_token"];
/// Upstreams whose errors are counted.
pub const BACKENDS: [&str; 4] = ["ollama", "openai", "embedded", "qdrant"];
/// Readers' votes on answers (`POST /api/feedback`).
pub const VOTES: [&str; 2] = ["up", "down"];
/// Why a worker was replaced.
pub const CAUSES: [&str; 6] = [
    "crash",
    "timeout",
    "max_requests",
    "memory",
    "reload",
    "scale_down",
];

/// Codes counted exactly, in the order of [`STATUSES`]; the four classes follow them.
const EXACT_CODES: [u16; 21] = [
    200, 201, 204, 304, 400, 401, 403, 404, 405, 408, 413, 414, 415, 422, 429, 431, 499, 500, 502,
    503, 504,
];

/// The [`STATUSES`] index of a code: a linear scan of 21 numbers, no allocation (hot path).
fn status_index(status: u16) -> usize {
    EXACT_CODES
        .iter()
        .position(|c| *c == status)
        .unwrap_or_else(|| {
            let class = usize::from((status / 100).clamp(2, 5)) - 2; // 2xx..5xx
            EXACT_CODES.len() + class
        })
}

fn bucket_index(d: Duration) -> usize {
    let secs = d.as_secs_f64();
    BUCKETS
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(BUCKETS.len())
}

/// A histogram's cells: per-bucket counts (not cumulative) and the sum in microseconds.
#[repr(C)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKET_CELLS],
    sum_us: AtomicU64,
}

impl Histogram {
    fn cells(&self) -> impl Iterator<Item = &AtomicU64> {
        self.buckets.iter().chain(std::iter::once(&self.sum_us))
    }

    fn observe(&self, d: Duration) {
        self.buckets[bucket_index(d)].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

/// One set of counters. `repr(C)` atomics only: valid when zeroed.
#[repr(C)]
pub struct MetricCells {
    requests: [[AtomicU64; STATUSES.len()]; ROUTES.len()],
    durations: [Histogram; ROUTES.len()],
    stages: [Histogram; STAGES.len()],
    tokens: AtomicU64,
    upstream_errors: [AtomicU64; BACKENDS.len()],
    /// Generated answers cut off at the token budget.
    truncated: AtomicU64,
    /// Votes stored, by [`VOTES`].
    feedback: [AtomicU64; VOTES.len()],
}

impl MetricCells {
    pub fn record_request(&self, route: usize, status: u16, duration: Duration) {
        self.requests[route][status_index(status)].fetch_add(1, Ordering::Relaxed);
        self.durations[route].observe(duration);
    }

    pub fn record_stage(&self, stage: &str, duration: Duration) {
        if let Some(i) = STAGES.iter().position(|s| *s == stage) {
            self.stages[i].observe(duration);
        }
    }

    pub fn add_tokens(&self, n: u64) {
        self.tokens.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_truncated(&self, n: u64) {
        self.truncated.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_feedback(&self, vote: &str) {
        if let Some(i) = VOTES.iter().position(|v| *v == vote) {
            self.feedback[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn upstream_error(&self, backend: &str) {
        if let Some(i) = BACKENDS.iter().position(|b| *b == backend) {
            self.upstream_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Every cell as one flat list, in a fixed order (for folding, resetting, summing).
    fn cells(&self) -> impl Iterator<Item = &AtomicU64> {
        self.requests
            .iter()
            .flatten()
            .chain(self.durations.iter().flat_map(Histogram::cells))
            .chain(self.stages.iter().flat_map(Histogram::cells))
            .chain(std::iter::once(&self.tokens))
            .chain(self.upstream_errors.iter())
            .chain(std::iter::once(&self.truncated))
            .chain(self.feedback.iter())
    }

    /// Master: adds these counters into `total` (a dead worker's into the pool's).
    pub fn fold_into(&self, total: &MetricCells) {
        for (from, to) in self.cells().zip(total.cells()) {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Master: zeroes the counters (a slot about to get a new worker).
    pub fn reset(&self) {
        for cell in self.cells() {
            cell.store(0, Ordering::Relaxed);
        }
    }

    /// Adds these counters into a plain snapshot.
    pub fn add_to(&self, snapshot: &mut Snapshot) {
        if snapshot.values.is_empty() {
            snapshot.values = vec![0; self.cells().count()];
        }
        for (value, cell) in snapshot.values.iter_mut().zip(self.cells()) {
            *value += cell.load(Ordering::Relaxed);
        }
    }
}

/// A plain copy of summed counters, laid out as [`MetricCells::cells`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    values: Vec<u64>,
}

const REQUEST_CELLS: usize = ROUTES.len() * STATUSES.len();
const HISTOGRAM_CELLS: usize = BUCKET_CELLS + 1;

impl Snapshot {
    pub fn requests(&self, route: usize, status: usize) -> u64 {
        self.values
            .get(route * STATUSES.len() + status)
            .copied()
            .unwrap_or(0)
    }

    fn histogram(&self, index: usize) -> (&[u64], u64) {
        let start = REQUEST_CELLS + index * HISTOGRAM_CELLS;
        match self.values.get(start..start + HISTOGRAM_CELLS) {
            Some(cells) => (&cells[..BUCKET_CELLS], cells[BUCKET_CELLS]),
            None => (&[], 0),
        }
    }

    /// (non-cumulative bucket counts, sum in µs) of a route's request durations.
    pub fn duration(&self, route: usize) -> (&[u64], u64) {
        self.histogram(route)
    }

    pub fn stage(&self, stage: usize) -> (&[u64], u64) {
        self.histogram(ROUTES.len() + stage)
    }

    pub fn tokens(&self) -> u64 {
        self.values
            .get(REQUEST_CELLS + (ROUTES.len() + STAGES.len()) * HISTOGRAM_CELLS)
            .copied()
            .unwrap_or(0)
    }

    pub fn upstream_errors(&self, backend: usize) -> u64 {
        let start = REQUEST_CELLS + (ROUTES.len() + STAGES.len()) * HISTOGRAM_CELLS + 1;
        self.values.get(start + backend).copied().unwrap_or(0)
    }

    pub fn truncated(&self) -> u64 {
        let start =
            REQUEST_CELLS + (ROUTES.len() + STAGES.len()) * HISTOGRAM_CELLS + 1 + BACKENDS.len();
        self.values.get(start).copied().unwrap_or(0)
    }

    pub fn feedback(&self, vote: usize) -> u64 {
        let start =
            REQUEST_CELLS + (ROUTES.len() + STAGES.len()) * HISTOGRAM_CELLS + 2 + BACKENDS.len();
        self.values.get(start + vote).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route_of(label: &str) -> usize {
        ROUTES.iter().position(|r| *r == label).unwrap()
    }

    fn zeroed() -> Box<MetricCells> {
        // SAFETY: MetricCells is repr(C) atomics, for which all-zero bytes are valid.
        unsafe { Box::new(std::mem::zeroed()) }
    }

    #[test]
    fn record_fold_and_read_back() {
        let worker = zeroed();
        worker.record_request(route_of("health"), 200, Duration::from_micros(300));
        worker.record_request(route_of("health"), 200, Duration::from_millis(30));
        worker.record_request(route_of("ask"), 418, Duration::from_secs(3));
        worker.record_stage("generate", Duration::from_secs(2));
        worker.add_tokens(7);
        worker.upstream_error("ollama");
        worker.add_truncated(1);
        let pool = zeroed();
        worker.fold_into(&pool);
        worker.fold_into(&pool);
        worker.reset();
        let mut snapshot = Snapshot::default();
        pool.add_to(&mut snapshot);
        worker.add_to(&mut snapshot);
        let health = route_of("health");
        assert_eq!(snapshot.requests(health, status_index(200)), 4);
        assert_eq!(snapshot.requests(route_of("ask"), status_index(499)), 0);
        assert_eq!(
            snapshot.requests(
                route_of("ask"),
                STATUSES.iter().position(|s| *s == "4xx").unwrap()
            ),
            2
        );
        let (buckets, sum) = snapshot.duration(health);
        assert_eq!(buckets[0], 2, "300 µs <= 1 ms");
        assert_eq!(buckets[4], 2, "30 ms <= 50 ms");
        assert_eq!(sum, 2 * 30_300);
        assert_eq!(snapshot.stage(2).0[9], 2, "2 s <= 2.5 s");
        assert_eq!(snapshot.tokens(), 14);
        assert_eq!(snapshot.upstream_errors(0), 2);
        assert_eq!(snapshot.truncated(), 2);
    }

    #[test]
    fn status_indexes_match_their_labels() {
        for (i, label) in STATUSES.iter().enumerate().take(EXACT_CODES.len()) {
            assert_eq!(status_index(label.parse().unwrap()), i);
        }
        assert_eq!(STATUSES[status_index(418)], "4xx");
        assert_eq!(STATUSES[status_index(299)], "2xx");
        assert_eq!(
            STATUSES[status_index(101)],
            "2xx",
            "1xx are not answered to requests here"
        );
        assert_eq!(STATUSES[status_index(599)], "5xx");
    }
}
