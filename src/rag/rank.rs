//! Ranking: the chunk hits of each result list -> the documents to show, best first, each
//! with the passage (one chunk) that answers best. Pure functions, no I/O.
//!
//! Lists are deep ([`candidates`]: tens of chunks, not `k`), because a document's rank is
//! decided from all its chunks there:
//!
//! - **Per document.** A document's score in one list is its best chunk's score plus a
//!   decayed share of its next ones (`s1 + d s2 + d² s3 ...`; lexical [`LEXICAL_DECAY`]), so a
//!   long answer split into several chunks is not beaten by one chunk of another page, and one
//!   document never takes several of the `k` places (`k` counts documents). Dense lists use
//!   the best chunk alone ([`DENSE_DECAY`]): a cosine similarity has no zero (every chunk is
//!   somewhat like every question, e5's all sit near 0.8), so summing rewards long documents.
//! - **Same language first (lexical).** A chunk in the other script than the question's counts
//!   [`OTHER_LANGUAGE`] of its score: in a bilingual store, a translation shares the original's
//!   commands and option names, and the original should win for a question in its language.
//! - **Fusion.** Reciprocal rank fusion over the per-document ranks of every list, each list
//!   with its weight ([`Weighted`]): the engine gives the dense list no weight for a question
//!   whose language the embedding model was not declared for (`[embed] languages`).
//! - **The passage** of a document is its chunk with the best fused chunk score (the same
//!   weighted fusion over chunk ranks), so the text shown is still the best chunk.
//! - **Deterministic.** Every ordering breaks ties by document id, then chunk position; no
//!   hash-map order, so identical requests get identical rankings.
//!
//! The constants were chosen on the bilingual dev set (`benches/devset`, `benches/README.md`).

use std::cmp::Ordering;
use std::collections::BTreeMap;

use super::text::{script_of, Language};
use super::Hit;

/// Reciprocal rank fusion's damping constant (Cormack et al. use 60).
pub const RRF_K: f32 = 60.0;
/// Lexical lists: weight of a document's 2nd, 3rd... best chunk relative to the one before it
/// (BM25 is 0 for a chunk without a query term, so the sum measures more evidence).
pub const LEXICAL_DECAY: f32 = 0.1;
/// Dense lists: the best chunk alone (see the module doc).
pub const DENSE_DECAY: f32 = 0.0;
/// Share of its lexical score a chunk in the other language than the question's keeps.
pub const OTHER_LANGUAGE: f32 = 0.9;
/// Fewest chunks asked of each list, whatever `k`.
pub const MIN_CANDIDATES: usize = 50;
/// Chunks asked of each list per document wanted, above [`MIN_CANDIDATES`].
pub const CANDIDATES_PER_RESULT: usize = 4;

/// How many chunks to ask of each list for `k` documents.
pub fn candidates(k: usize) -> usize {
    (k * CANDIDATES_PER_RESULT).max(MIN_CANDIDATES)
}

/// One result list with its weight in the fusion (0 = ignored) and how its chunks add up
/// per document (`decay`, see the module doc).
pub struct Weighted {
    pub hits: Vec<Hit>,
    pub weight: f32,
    pub decay: f32,
}

/// Best first; ties by document id, then position: a total order, the same on every call.
fn by_score(a: &Hit, b: &Hit) -> Ordering {
    b.score
        .total_cmp(&a.score)
        .then_with(|| a.document_id.cmp(&b.document_id))
        .then(a.position.cmp(&b.position))
}

/// One list's documents, best first: each document's best chunk as its passage, with the
/// document's aggregated score.
pub fn documents(list: &[Hit], decay: f32) -> Vec<Hit> {
    let mut chunks: Vec<&Hit> = list.iter().collect();
    chunks.sort_by(|a, b| by_score(a, b));
    // document id -> (its best chunk, aggregated score, chunks seen).
    let mut docs: BTreeMap<&str, (&Hit, f32, i32)> = BTreeMap::new();
    for hit in chunks {
        docs.entry(hit.document_id.as_str())
            .and_modify(|(_, score, seen)| {
                *score += decay.powi(*seen) * hit.score.max(0.0);
                *seen += 1;
            })
            .or_insert((hit, hit.score, 1));
    }
    let mut out: Vec<Hit> = docs
        .into_values()
        .map(|(best, score, _)| Hit {
            score,
            ..best.clone()
        })
        .collect();
    out.sort_by(by_score);
    out
}

/// Lowers the lexical score of chunks written in the other language than the question's.
pub fn prefer_language(list: &mut [Hit], language: Language) {
    for hit in list.iter_mut() {
        if script_of(&hit.text).is_some_and(|script| script != language) && hit.score > 0.0 {
            hit.score *= OTHER_LANGUAGE;
        }
    }
}

/// The top `k` documents of one list (see the module doc).
pub fn rank_one(list: &Weighted, k: usize) -> Vec<Hit> {
    let mut docs = documents(&list.hits, list.decay);
    docs.truncate(k);
    docs
}

/// Weighted reciprocal rank fusion of several lists into the top `k` documents, each with its
/// best passage by fused chunk score; a hit's `score` is its document's fused score.
pub fn fuse(lists: &[Weighted], k: usize) -> Vec<Hit> {
    // document id -> fused score; (document id, position) -> (fused chunk score, the hit).
    let mut doc_scores: BTreeMap<String, f32> = BTreeMap::new();
    let mut chunk_scores: BTreeMap<(String, usize), (f32, &Hit)> = BTreeMap::new();
    for list in lists.iter().filter(|l| l.weight > 0.0) {
        for (rank, doc) in documents(&list.hits, list.decay).iter().enumerate() {
            *doc_scores.entry(doc.document_id.clone()).or_default() +=
                list.weight / (RRF_K + rank as f32 + 1.0);
        }
        let mut chunks: Vec<&Hit> = list.hits.iter().collect();
        chunks.sort_by(|a, b| by_score(a, b));
        for (rank, hit) in chunks.into_iter().enumerate() {
            let add = list.weight / (RRF_K + rank as f32 + 1.0);
            chunk_scores
                .entry((hit.document_id.clone(), hit.position))
                .and_modify(|(score, _)| *score += add)
                .or_insert((add, hit));
        }
    }
    // Each document's passage: its chunk with the best fused chunk score (ties: first position).
    let mut passages: BTreeMap<&str, (f32, &Hit)> = BTreeMap::new();
    for ((document, _), (score, hit)) in &chunk_scores {
        let best = passages.entry(document.as_str()).or_insert((*score, hit));
        if *score > best.0 {
            *best = (*score, hit);
        }
    }
    let mut out: Vec<Hit> = passages
        .into_iter()
        .filter_map(|(document, (_, hit))| {
            let score = *doc_scores.get(document)?;
            Some(Hit {
                score,
                ..(*hit).clone()
            })
        })
        .collect();
    out.sort_by(by_score);
    out.truncate(k);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(doc: &str, position: usize, score: f32) -> Hit {
        Hit {
            document_id: doc.into(),
            title: format!("Title {doc}"),
            source: format!("{doc}.md"),
            position,
            text: format!("text of {doc} {position}"),
            score,
        }
    }

    fn lexical(hits: &[Hit]) -> Weighted {
        Weighted {
            hits: hits.to_vec(),
            weight: 1.0,
            decay: LEXICAL_DECAY,
        }
    }

    #[test]
    fn dense_documents_are_their_best_chunk() {
        let list = vec![
            hit("one", 0, 0.84),
            hit("long", 0, 0.83),
            hit("long", 1, 0.82),
        ];
        let dense = Weighted {
            hits: list,
            weight: 1.0,
            decay: DENSE_DECAY,
        };
        assert_eq!(rank_one(&dense, 1)[0].document_id, "one");
    }

    fn ids(hits: &[Hit]) -> Vec<(&str, usize)> {
        hits.iter()
            .map(|h| (h.document_id.as_str(), h.position))
            .collect()
    }

    #[test]
    fn documents_are_distinct_and_keep_their_best_chunk() {
        let list = vec![
            hit("a", 3, 9.0),
            hit("a", 1, 8.0),
            hit("a", 2, 7.0),
            hit("b", 0, 6.0),
            hit("c", 5, 5.0),
        ];
        let top = rank_one(&lexical(&list), 2);
        assert_eq!(ids(&top), vec![("a", 3), ("b", 0)]);
    }

    #[test]
    fn a_document_with_several_good_chunks_beats_one_slightly_better_chunk() {
        let list = vec![
            hit("one", 0, 10.0),
            hit("long", 0, 9.5),
            hit("long", 1, 9.0),
        ];
        let top = rank_one(&lexical(&list), 2);
        assert_eq!(top[0].document_id, "long");
        assert!((top[0].score - (9.5 + 0.9)).abs() < 1e-4);
    }

    #[test]
    fn fusion_prefers_documents_both_lists_found_and_respects_weights() {
        let lexical = vec![hit("a", 0, 3.0), hit("b", 0, 2.0), hit("c", 0, 1.0)];
        let dense = vec![hit("c", 1, 0.9), hit("d", 0, 0.8)];
        let fused = fuse(
            &[
                Weighted {
                    hits: lexical.clone(),
                    weight: 1.0,
                    decay: LEXICAL_DECAY,
                },
                Weighted {
                    hits: dense.clone(),
                    weight: 1.0,
                    decay: LEXICAL_DECAY,
                },
            ],
            3,
        );
        assert_eq!(fused[0].document_id, "c");
        assert_eq!(fused.len(), 3);
        // With no weight, the dense list changes nothing: lexical's order, document by document.
        let lexical_only = fuse(
            &[
                Weighted {
                    hits: lexical.clone(),
                    weight: 1.0,
                    decay: LEXICAL_DECAY,
                },
                Weighted {
                    hits: dense,
                    weight: 0.0,
                    decay: LEXICAL_DECAY,
                },
            ],
            3,
        );
        assert_eq!(ids(&lexical_only), vec![("a", 0), ("b", 0), ("c", 0)]);
    }

    #[test]
    fn fused_passage_is_the_chunk_both_lists_rank_best() {
        let lexical = vec![hit("a", 0, 3.0), hit("a", 4, 2.0)];
        let dense = vec![hit("a", 4, 0.9), hit("a", 0, 0.1)];
        let fused = fuse(
            &[
                Weighted {
                    hits: lexical,
                    weight: 1.0,
                    decay: LEXICAL_DECAY,
                },
                Weighted {
                    hits: dense,
                    weight: 2.0,
                    decay: LEXICAL_DECAY,
                },
            ],
            1,
        );
        assert_eq!(ids(&fused), vec![("a", 4)]);
    }

    #[test]
    fn identical_inputs_in_any_order_give_one_ranking() {
        // Every score ties: the order is decided by document id and position alone.
        let list: Vec<Hit> = ["q", "c", "x", "a", "m"]
            .iter()
            .enumerate()
            .map(|(i, d)| hit(d, i, 1.0))
            .collect();
        let mut reversed = list.clone();
        reversed.reverse();
        let weighted = |hits: Vec<Hit>| {
            vec![
                Weighted {
                    hits: hits.clone(),
                    weight: 1.0,
                    decay: LEXICAL_DECAY,
                },
                Weighted {
                    hits,
                    weight: 0.5,
                    decay: LEXICAL_DECAY,
                },
            ]
        };
        let first = fuse(&weighted(list.clone()), 5);
        for _ in 0..20 {
            assert_eq!(fuse(&weighted(list.clone()), 5), first);
        }
        assert_eq!(
            rank_one(&lexical(&list), 5),
            rank_one(&lexical(&reversed), 5)
        );
        let ranked = rank_one(&lexical(&list), 5);
        let order: Vec<&str> = ranked.iter().map(|h| h.document_id.as_str()).collect();
        assert_eq!(order, vec!["a", "c", "m", "q", "x"]);
    }

    #[test]
    fn other_language_chunks_are_lowered() {
        let mut list = vec![
            Hit {
                text: "Вывести список файлов каталога".into(),
                ..hit("ru", 0, 10.0)
            },
            Hit {
                text: "List directory contents".into(),
                ..hit("en", 0, 9.5)
            },
        ];
        prefer_language(&mut list, Language::English);
        assert_eq!(rank_one(&lexical(&list), 1)[0].document_id, "en");
        assert_eq!(list[1].score, 9.5);
    }
}
