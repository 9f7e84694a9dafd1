//! The int8 copy of the embedded store's vectors that dense search scans: one byte per
//! dimension plus 8 bytes per chunk, kept in this process's memory, scanned in full for a
//! shortlist that the embedded store then re-scores exactly with the full `f32` vectors.
//!
//! Owns the quantization (the blob format of the `chunks_q8` table), the in-memory layout and
//! the shortlist scan. Knows no SQL: [`super::embedded`] loads and refreshes an index from the
//! file, and decides the final order by exact re-scoring, so quantization error can only cost
//! recall (a true neighbour missing from the shortlist), never a wrong score.
//!
//! # Quantization
//!
//! A vector (unit-normalised first for the cosine metric) is scaled by its own largest
//! magnitude so its components use the whole `-127..=127` range; the code keeps `1/scale` and,
//! for L2, the squared norm of the original. The approximate dot product of two vectors is then
//! `dot_i32(codes) * inv_scale_a * inv_scale_b`, which ranks a shortlist ten times the size of
//! the answer with a recall@10 near 1 against exact search (`benches/README.md`).
//!
//! # Blob format (`chunks_q8.q`)
//!
//! `inv_scale: f32 LE`, `norm2: f32 LE`, then `dimensions` bytes of `i8` codes.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::embedded::Metric;

/// Bytes before the codes in a blob: `inv_scale` and `norm2`.
const HEADER: usize = 8;

/// The quantized form of one vector, as stored in `chunks_q8.q`.
pub fn encode(vector: &[f32], metric: Metric) -> Vec<u8> {
    let norm2: f32 = vector.iter().map(|x| x * x).sum();
    let (codes, inv_scale) = quantize(vector, metric, norm2);
    let stored_norm2 = match metric {
        Metric::Cosine => 1.0,
        Metric::L2 => norm2,
    };
    let mut blob = Vec::with_capacity(HEADER + codes.len());
    blob.extend_from_slice(&inv_scale.to_le_bytes());
    blob.extend_from_slice(&stored_norm2.to_le_bytes());
    blob.extend(codes.iter().map(|&c| c as u8));
    blob
}

/// Codes in `-127..=127` and the factor that maps them back (`x ~ code * inv_scale`).
fn quantize(vector: &[f32], metric: Metric, norm2: f32) -> (Vec<i8>, f32) {
    let unit = match metric {
        Metric::Cosine if norm2 > 0.0 => 1.0 / norm2.sqrt(),
        _ => 1.0,
    };
    let largest = vector.iter().fold(0.0f32, |m, x| m.max((x * unit).abs()));
    if largest == 0.0 || !largest.is_finite() {
        return (vec![0; vector.len()], 0.0);
    }
    let scale = 127.0 / largest;
    let codes = vector
        .iter()
        .map(|x| (x * unit * scale).round().clamp(-127.0, 127.0) as i8)
        .collect();
    (codes, 1.0 / scale)
}

/// Why a stored blob cannot join the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a quantized vector has {got} bytes, expected {expected}")]
pub struct BadBlob {
    pub expected: usize,
    pub got: usize,
}

/// Every quantized vector of a store, in one flat allocation, with the store counters it
/// reflects. Rows are in insertion order; ids are chunk rowids.
pub struct QuantizedIndex {
    /// Dimensions of every vector (the store's).
    dimensions: usize,
    /// How scores are computed (the store's metric).
    metric: Metric,
    /// The store's `vectors_generation` this index reflects: any write of vectors bumps it.
    pub generation: i64,
    /// The store's `vectors_epoch` this index reflects: a delete of vectors bumps it, and only
    /// an index of the same epoch can be brought up to date by appending newer rows.
    pub epoch: i64,
    /// The largest chunk id loaded: appends since have larger ids (rowids only grow while
    /// nothing is deleted).
    pub max_id: i64,
    /// Chunk rowid of each row.
    ids: Vec<i64>,
    /// `1/scale` of each row.
    inv_scales: Vec<f32>,
    /// Squared norm of each row's original vector (L2 only; 1 for cosine).
    norms2: Vec<f32>,
    /// `dimensions` codes per row, rows back to back.
    codes: Vec<i8>,
}

impl QuantizedIndex {
    /// An empty index for vectors of this shape, at the given store counters.
    pub fn new(dimensions: usize, metric: Metric, generation: i64, epoch: i64) -> QuantizedIndex {
        QuantizedIndex {
            dimensions,
            metric,
            generation,
            epoch,
            max_id: i64::MIN,
            ids: Vec::new(),
            inv_scales: Vec::new(),
            norms2: Vec::new(),
            codes: Vec::new(),
        }
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Heap bytes held (for logs).
    pub fn bytes(&self) -> usize {
        self.codes.capacity() + self.ids.capacity() * 8 + self.inv_scales.capacity() * 4 * 2
    }

    /// Adds one stored blob (see the module doc) under chunk id `id`.
    pub fn push(&mut self, id: i64, blob: &[u8]) -> Result<(), BadBlob> {
        let expected = HEADER + self.dimensions;
        if blob.len() != expected {
            return Err(BadBlob {
                expected,
                got: blob.len(),
            });
        }
        let f32_at =
            |at: usize| f32::from_le_bytes([blob[at], blob[at + 1], blob[at + 2], blob[at + 3]]);
        self.ids.push(id);
        self.inv_scales.push(f32_at(0));
        self.norms2.push(f32_at(4));
        self.codes.extend(blob[HEADER..].iter().map(|&b| b as i8));
        self.max_id = self.max_id.max(id);
        Ok(())
    }

    /// The ids of (at most) the `m` rows whose approximate score against `query` is best,
    /// in no particular order. `query` must have [`QuantizedIndex::dimensions`] components.
    pub fn shortlist(&self, query: &[f32], m: usize) -> Vec<i64> {
        if m == 0 || self.dimensions == 0 || query.len() != self.dimensions {
            return Vec::new();
        }
        if m >= self.ids.len() {
            return self.ids.clone();
        }
        let norm2: f32 = query.iter().map(|x| x * x).sum();
        let (q, q_inv_scale) = quantize(query, self.metric, norm2);
        // Keeps the m best seen so far; its top is the worst of them (a min-heap on score).
        let mut best: BinaryHeap<Worst> = BinaryHeap::with_capacity(m + 1);
        for (row, codes) in self.codes.chunks_exact(self.dimensions).enumerate() {
            let dot = dot_i8(&q, codes) as f32 * self.inv_scales[row];
            let score = match self.metric {
                // Cosine similarity up to the query's (constant) factor.
                Metric::Cosine => dot,
                // -(|d|^2 - 2 q.d), i.e. -|q - d|^2 up to the constant |q|^2.
                Metric::L2 => 2.0 * dot * q_inv_scale - self.norms2[row],
            };
            if best.len() < m {
                best.push(Worst { score, row });
            } else if best.peek().is_some_and(|w| score > w.score) {
                best.pop();
                best.push(Worst { score, row });
            }
        }
        best.into_iter().map(|w| self.ids[w.row]).collect()
    }
}

/// A shortlist entry ordered so that `BinaryHeap`'s top is the lowest score.
struct Worst {
    score: f32,
    row: usize,
}

impl PartialEq for Worst {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Worst {}

impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        other.score.total_cmp(&self.score)
    }
}

/// The integer dot product; written so that the compiler vectorises it (`pmaddwd`).
fn dot_i8(a: &[i8], b: &[i8]) -> i32 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| i16::from(x) as i32 * i16::from(y) as i32)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so the tests need no crate.
    struct Rng(u64);

    impl Rng {
        fn next_f32(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }

        fn vector(&mut self, dims: usize) -> Vec<f32> {
            (0..dims).map(|_| self.next_f32()).collect()
        }
    }

    fn exact_top(vectors: &[Vec<f32>], query: &[f32], metric: Metric, k: usize) -> Vec<usize> {
        let score = |v: &[f32]| -> f32 {
            match metric {
                Metric::Cosine => {
                    let dot: f32 = v.iter().zip(query).map(|(a, b)| a * b).sum();
                    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                    dot / n
                }
                Metric::L2 => -v
                    .iter()
                    .zip(query)
                    .map(|(a, b)| (a - b) * (a - b))
                    .sum::<f32>(),
            }
        };
        let mut order: Vec<usize> = (0..vectors.len()).collect();
        order.sort_by(|&a, &b| score(&vectors[b]).total_cmp(&score(&vectors[a])));
        order.truncate(k);
        order
    }

    /// Clustered vectors (like embeddings: many near a few topics), the true top 10 of each
    /// query must be inside its shortlist of 100 for nearly every query.
    #[test]
    fn shortlist_of_ten_times_k_holds_the_exact_top_k() {
        const DIMS: usize = 64;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let centers: Vec<Vec<f32>> = (0..20).map(|_| rng.vector(DIMS)).collect();
        let near = |rng: &mut Rng, c: &[f32]| -> Vec<f32> {
            c.iter().map(|x| x + 0.6 * rng.next_f32()).collect()
        };
        let vectors: Vec<Vec<f32>> = (0..3000)
            .map(|i| near(&mut rng, &centers[i % centers.len()]))
            .collect();
        for metric in [Metric::Cosine, Metric::L2] {
            let mut index = QuantizedIndex::new(DIMS, metric, 0, 0);
            for (i, v) in vectors.iter().enumerate() {
                index.push(i as i64 + 1, &encode(v, metric)).unwrap();
            }
            let (mut found, mut wanted) = (0, 0);
            for q in 0..50 {
                let query = near(&mut rng, &centers[q % centers.len()]);
                let shortlist = index.shortlist(&query, 100);
                assert_eq!(shortlist.len(), 100);
                for row in exact_top(&vectors, &query, metric, 10) {
                    wanted += 1;
                    found += usize::from(shortlist.contains(&(row as i64 + 1)));
                }
            }
            let recall = found as f64 / wanted as f64;
            assert!(recall >= 0.98, "{metric:?}: recall {recall}");
        }
    }

    #[test]
    fn a_small_index_shortlists_everything_and_odd_blobs_are_refused() {
        let mut index = QuantizedIndex::new(3, Metric::Cosine, 4, 1);
        index
            .push(7, &encode(&[1.0, 0.0, 0.0], Metric::Cosine))
            .unwrap();
        index
            .push(9, &encode(&[0.0, 0.0, 0.0], Metric::Cosine))
            .unwrap();
        let mut all = index.shortlist(&[0.0, 1.0, 0.0], 100);
        all.sort();
        assert_eq!(all, [7, 9]);
        assert_eq!(index.max_id, 9);
        assert!(
            index.shortlist(&[1.0, 0.0], 100).is_empty(),
            "wrong dimension"
        );
        assert_eq!(
            index.push(10, &[0; 5]),
            Err(BadBlob {
                expected: 11,
                got: 5
            })
        );
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn codes_use_the_whole_range_and_round_trip() {
        let v = [0.02f32, -0.05, 0.01, 0.0];
        let blob = encode(&v, Metric::L2);
        let inv = f32::from_le_bytes(blob[0..4].try_into().unwrap());
        let norm2 = f32::from_le_bytes(blob[4..8].try_into().unwrap());
        assert_eq!(blob[HEADER + 1] as i8, -127);
        assert!((norm2 - (0.0004 + 0.0025 + 0.0001)).abs() < 1e-7);
        for (i, x) in v.iter().enumerate() {
            let back = blob[HEADER + i] as i8 as f32 * inv;
            assert!((back - x).abs() <= inv / 2.0 + 1e-7, "{back} vs {x}");
        }
    }
}
