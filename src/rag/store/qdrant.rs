//! The Qdrant store: one collection on a Qdrant server or cluster (gRPC), shared by every
//! worker on every host and by the CLI. Owns the collection's layout and the requests; assumes
//! nothing about local disks, and does no network I/O until first used.
//!
//! # Collection layout
//!
//! One point per chunk, plus one *head* point per document:
//! - named dense vector `dense`, sized by the first embedding (the collection is created on
//!   first write; a collection created before any embedding gets the vector added later);
//! - sparse vector `lexical` with the IDF modifier: indices are a stable 32-bit hash (FNV-1a)
//!   of each stem, values the stem's frequency in the chunk; Qdrant's IDF x TF ranks like BM25
//!   without length normalisation;
//! - payload: `kind` (`chunk` | `head` | `feedback`, a reader's vote, payload only), `document_id`, `source`, `title`, `content_hash`,
//!   `chunks`, `updated_at`, and for chunks `text` and `position`; keyword indexes on
//!   `document_id`, `kind` and `content_hash`.
//!
//! # Replacing a document without transactions
//!
//! Qdrant has no multi-point transaction, but a single point is written atomically, so the
//! document's head point is the commit record:
//! 1. the new version's chunks are written in batches of `UPSERT_BATCH` (64); their ids derive
//!    from (document id, content hash, position), so they never overwrite the old version's;
//! 2. the head point (id derived from the document id) is overwritten with the new hash: the
//!    switch, in one write;
//! 3. the replaced version's chunks are deleted, and any other version's chunks older than
//!    `STALE_AFTER` (an hour; left by an interrupted ingest).
//!
//! Each commit also gives the head a fresh `version` token (unique per write, so a document
//! changed A -> B -> A still counts as changed twice). A search reads in four steps:
//! 1. the nearest chunks of every version (over-fetched) name the candidate documents;
//! 2. their heads are read: the committed version of each;
//! 3. the search is run again, filtered to exactly those (document, content hash) pairs: every
//!    chunk of a committed version was written before its head, so all of it is there;
//! 4. the heads are read again: if none moved, no committed version was garbage-collected
//!    during step 3 (a version is deleted only after its head moved away), so the result is
//!    one whole version per document. If one moved, the search starts over after a short,
//!    growing pause (a bounded number of times; a reader racing a writer that never pauses
//!    gets the last result, still one version per document).
//!
//! So a reader sees the old version or the new one, whole, never a mix and never nothing;
//! chunks of an interrupted ingest are never visible and are removed by a later upsert of that
//! source. Two processes ingesting the same source at once do not delete each other's new
//! chunks: each deletes only the version its own head replaced (and uncommitted versions once
//! they are old).
//! `list_documents`, `document_hash` and `stats` read the head points.
//!
//! # A cluster
//!
//! `[store] url` may list several nodes of one Qdrant cluster. Each request goes to the node
//! that answered last and moves on to the next while a node does not answer (down,
//! unreachable, or failing inside the cluster): every request ragpool sends is safe to repeat
//! (point ids are derived, deletes go by filter, the head is one point). A collection ragpool
//! creates gets `shard_number`, `replication_factor` and `write_consistency_factor` from
//! `[store]`; with 3 nodes, `replication_factor = 2` and `write_consistency_factor = 1`, a
//! killed node costs no answer and ingest goes on (its replicas are marked dead and recover
//! when it returns). A write is acknowledged once `write_consistency_factor` replicas applied
//! it, so a read served by a slower replica right after may still miss it; the snapshot
//! above holds per replica, and `write_consistency_factor = replication_factor` makes it hold
//! across replicas at the price of refused writes while a replica is down.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use qdrant_client::qdrant::with_payload_selector::SelectorOptions;
use qdrant_client::qdrant::PayloadIncludeSelector;
use qdrant_client::qdrant::{
    vectors_config, Condition, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder,
    CreateVectorNameRequestBuilder, DeletePointsBuilder, DenseVectorCreationConfigBuilder,
    FieldType, Filter, GetPointsBuilder, Modifier, NamedVectors, PointId, PointStruct, Query,
    QueryPointsBuilder, ScoredPoint, ScrollPointsBuilder, SparseVectorParamsBuilder,
    SparseVectorsConfigBuilder, UpsertPointsBuilder, Value, Vector, VectorInput,
    VectorParamsBuilder, VectorParamsMap, VectorsConfig,
};
use qdrant_client::qdrant::{CountPointsBuilder, Distance as QdrantDistance, Range};
use qdrant_client::{Payload, Qdrant, QdrantError};
use sha2::{Digest, Sha256};

use super::{now_unix, validate_document, StoreError};
use crate::config::{Distance, StoreConfig};
use crate::rag::feedback::{Feedback, Vote};
use crate::rag::text::Stems;
use crate::rag::{
    document_id, ChunkText, DocumentInfo, Hit, NewChunk, NewDocument, StoreStats, StoredDocument,
    UpsertOutcome,
};

/// The named dense vector.
const DENSE: &str = "dense";
/// The named sparse vector over stems.
const LEXICAL: &str = "lexical";
/// Points per upsert request.
const UPSERT_BATCH: usize = 64;
/// Points per scroll page when listing documents.
const SCROLL_PAGE: u32 = 512;
/// Whole request, including a batch upsert waiting for the write to be applied.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a search starts over because a head moved under it (see the module doc), and
/// the pause before a new try, times the tries so far (plus jitter, so a reader does not stay
/// in step with a writer).
const READ_ATTEMPTS: u32 = 16;
const READ_BACKOFF: Duration = Duration::from_millis(2);
/// Chunks of a version that was never committed are garbage once this old (an ingest that
/// takes longer than this while another ingest of the same source runs may lose its chunks).
const STALE_AFTER: Duration = Duration::from_secs(3600);

/// Payload keys.
mod field {
    pub const KIND: &str = "kind";
    pub const DOCUMENT_ID: &str = "document_id";
    pub const SOURCE: &str = "source";
    pub const TITLE: &str = "title";
    pub const CONTENT_HASH: &str = "content_hash";
    pub const CHUNKS: &str = "chunks";
    pub const UPDATED_AT: &str = "updated_at";
    pub const TEXT: &str = "text";
    pub const POSITION: &str = "position";
    /// Heads only: unique per commit, so a reader can tell that its snapshot held.
    pub const VERSION: &str = "version";
}
const KIND_CHUNK: &str = "chunk";
const KIND_HEAD: &str = "head";
/// A reader's vote on an answer (payload only).
const KIND_FEEDBACK: &str = "feedback";

/// How a collection this process creates is spread over a cluster.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// 0: Qdrant's default (one shard per node at creation).
    shard_number: u32,
    replication_factor: u32,
    write_consistency_factor: u32,
}

/// What this store needs to know about the collection.
#[derive(Debug, Clone, Copy)]
struct Shape {
    /// The dense vector, once a collection has one.
    dense: Option<Dense>,
}

#[derive(Debug, Clone, Copy)]
struct Dense {
    size: usize,
    /// Euclid and Manhattan scores are distances: negated to become higher-is-better.
    lower_is_better: bool,
}

/// One Qdrant node this process may talk to.
struct Node {
    url: String,
    /// gRPC client; connects lazily on the first request.
    client: Qdrant,
}

/// The Qdrant store of one process.
pub struct QdrantStore {
    /// The configured nodes (one server, or nodes of one cluster: any serves every request).
    nodes: Vec<Node>,
    /// The node that answered last: requests start there and move on to the next node when
    /// it does not answer (see [`QdrantStore::call`]).
    preferred: AtomicUsize,
    /// Every URL, for logs and for an error no node could answer.
    url: String,
    collection: String,
    /// For a dense vector this process creates.
    distance: Distance,
    /// Shards and replicas of a collection this process creates.
    layout: Layout,
    /// Index-time and query-time stems.
    stems: Stems,
    /// The collection's shape once seen, so a search costs no extra round trip. `None` until
    /// the collection exists (another process may create it at any time, so absence is not
    /// cached).
    shape: Mutex<Option<Shape>>,
}

impl QdrantStore {
    /// Builds a client per node; no request is sent (see [`QdrantStore::check`]).
    pub fn open(config: &StoreConfig) -> Result<QdrantStore, StoreError> {
        let nodes = config
            .urls
            .iter()
            .map(|url| {
                let client = Qdrant::from_url(url)
                    .api_key(config.api_key.clone())
                    .timeout(REQUEST_TIMEOUT)
                    .connect_timeout(CONNECT_TIMEOUT)
                    // The compatibility check would block in a thread of its own and print to
                    // stdout.
                    .skip_compatibility_check()
                    .build()
                    .map_err(|source| StoreError::QdrantClient {
                        url: url.clone(),
                        source: Box::new(source),
                    })?;
                Ok(Node {
                    url: url.clone(),
                    client,
                })
            })
            .collect::<Result<Vec<Node>, StoreError>>()?;
        Ok(QdrantStore {
            nodes,
            preferred: AtomicUsize::new(0),
            url: config.urls.join(", "),
            collection: config.collection.clone(),
            distance: config.distance,
            layout: Layout {
                shard_number: config.shard_number as u32,
                replication_factor: config.replication_factor as u32,
                write_consistency_factor: config.write_consistency_factor as u32,
            },
            stems: Stems::default(),
            shape: Mutex::new(None),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn collection(&self) -> &str {
        &self.collection
    }

    pub async fn document_hash(&self, source: &str) -> Result<Option<String>, StoreError> {
        if self.known_shape().await?.is_none() {
            return Ok(None);
        }
        let id = document_id(source);
        Ok(self
            .heads(std::slice::from_ref(&id))
            .await?
            .remove(&id)
            .map(|head| head.info.content_hash))
    }

    pub async fn upsert_document(&self, doc: NewDocument) -> Result<UpsertOutcome, StoreError> {
        let dimensions = validate_document(&doc)?;
        let id = document_id(&doc.source);
        self.prepare_for_write(dimensions).await?;
        let previous = self.heads(std::slice::from_ref(&id)).await?.remove(&id);
        if previous
            .as_ref()
            .is_some_and(|head| head.info.content_hash == doc.content_hash)
        {
            return Ok(UpsertOutcome::Unchanged(id));
        }
        let updated_at = now_unix();

        // 1. The new version's chunks: invisible until the head names their hash.
        for batch in doc.chunks.chunks(UPSERT_BATCH) {
            let points: Vec<PointStruct> = batch
                .iter()
                .map(|chunk| self.chunk_point(&id, &doc, chunk, updated_at))
                .collect();
            let request = UpsertPointsBuilder::new(&self.collection, points).wait(true);
            self.call("write chunks", |c| c.upsert_points(request.clone()))
                .await?;
        }
        // 2. The switch: one point, written atomically.
        let head = vec![head_point(&id, &doc, updated_at)];
        let request = UpsertPointsBuilder::new(&self.collection, head).wait(true);
        self.call("commit a document", |c| c.upsert_points(request.clone()))
            .await?;
        // 3. Garbage, already invisible (a failure here costs space, not correctness): the
        //    replaced version's chunks, and those of versions never committed (an interrupted
        //    ingest) once older than STALE_AFTER. A version another process is writing right
        //    now is younger than that, so a concurrent ingest of the same source never loses
        //    the chunks its head is about to name.
        let replaced = previous
            .as_ref()
            .map(|head| head.info.content_hash.as_str());
        if let Err(e) = self
            .delete_stale_chunks(&id, &doc.content_hash, replaced, updated_at)
            .await
        {
            log::warn!(
                "{e} (stale chunks of {} stay until its next ingest)",
                doc.source
            );
        }

        log::debug!(
            "qdrant store: stored {} ({} chunks)",
            doc.source,
            doc.chunks.len()
        );
        Ok(match previous {
            Some(_) => UpsertOutcome::Replaced(id),
            None => UpsertOutcome::Inserted(id),
        })
    }

    /// Every point `filter` matches, page by page (`SCROLL_PAGE`), as `read` makes of its
    /// payload; a point `read` cannot make sense of is left out.
    async fn scroll_payloads<T>(
        &self,
        filter: Filter,
        what: &'static str,
        read: impl Fn(&HashMap<String, Value>) -> Option<T>,
    ) -> Result<Vec<T>, StoreError> {
        let mut found = Vec::new();
        let mut offset: Option<PointId> = None;
        loop {
            let mut request = ScrollPointsBuilder::new(&self.collection)
                .filter(filter.clone())
                .limit(SCROLL_PAGE)
                .with_payload(true)
                .with_vectors(false);
            if let Some(offset) = offset.take() {
                request = request.offset(offset);
            }
            let request = request.build();
            let page = self.call(what, |c| c.scroll(request.clone())).await?;
            found.extend(page.result.iter().filter_map(|point| read(&point.payload)));
            match page.next_page_offset {
                Some(next) => offset = Some(next),
                None => break,
            }
        }
        Ok(found)
    }

    pub async fn list_documents(&self) -> Result<Vec<DocumentInfo>, StoreError> {
        if self.known_shape().await?.is_none() {
            return Ok(Vec::new());
        }
        let mut documents = self
            .scroll_payloads(
                Filter::must([kind_is(KIND_HEAD)]),
                "list documents",
                document_of,
            )
            .await?;
        documents.sort_by(|a, b| a.source.cmp(&b.source));
        Ok(documents)
    }

    /// The head names the committed version; its chunks are read by (document, hash), all
    /// of them written before the head. A replace racing this read may delete them after the
    /// head was read: then the head is read again and the read starts over (bounded).
    pub async fn get_document(&self, id: &str) -> Result<Option<StoredDocument>, StoreError> {
        if self.known_shape().await?.is_none() {
            return Ok(None);
        }
        let mut last = None;
        for attempt in 1..=READ_ATTEMPTS {
            let Some(head) = self.heads(&[id.to_string()]).await?.remove(id) else {
                return Ok(None);
            };
            let filter = Filter::must([
                kind_is(KIND_CHUNK),
                document_is(id),
                hash_is(&head.info.content_hash),
            ]);
            let mut chunks = self
                .scroll_payloads(filter, "read a document", |payload| {
                    Some(ChunkText {
                        position: integer_of(payload, field::POSITION)?.max(0) as usize,
                        text: text_of(payload, field::TEXT)?,
                    })
                })
                .await?;
            chunks.sort_by_key(|c| c.position);
            let whole = chunks.len() == head.info.chunks;
            last = Some(StoredDocument {
                info: head.info,
                chunks,
            });
            if whole {
                break;
            }
            tokio::time::sleep(READ_BACKOFF * attempt + jitter(READ_BACKOFF)).await;
        }
        Ok(last)
    }

    /// A payload-only point of kind `feedback` (an empty sparse vector, as heads have), in the
    /// same collection: shared by every node and host, invisible to searches (they filter on
    /// `kind = chunk`) and to document counts.
    pub async fn add_feedback(&self, feedback: Feedback) -> Result<(), StoreError> {
        self.prepare_for_write(None).await?;
        let vectors = NamedVectors::default().add_vector(
            LEXICAL,
            Vector::new_sparse(Vec::<u32>::new(), Vec::<f32>::new()),
        );
        let mut payload = Payload::new();
        payload.insert(field::KIND, KIND_FEEDBACK);
        payload.insert("feedback_id", feedback.id.clone());
        payload.insert("created_at", feedback.created_at);
        payload.insert("vote", feedback.vote.name());
        payload.insert("question", feedback.question);
        payload.insert("answer", feedback.answer);
        payload.insert("mode", feedback.mode);
        payload.insert(
            "source_ids",
            serde_json::to_string(&feedback.source_ids).unwrap_or_default(),
        );
        let point = PointStruct::new(
            uuid_of(&format!("feedback/{}", feedback.id)),
            vectors,
            payload,
        );
        let request = UpsertPointsBuilder::new(&self.collection, vec![point]).wait(true);
        self.call("store feedback", |c| c.upsert_points(request.clone()))
            .await?;
        Ok(())
    }

    pub async fn list_feedback(&self) -> Result<Vec<Feedback>, StoreError> {
        if self.known_shape().await?.is_none() {
            return Ok(Vec::new());
        }
        let filter = Filter::must([kind_is(KIND_FEEDBACK)]);
        let mut votes = self
            .scroll_payloads(filter, "read feedback", |p| {
                Some(Feedback {
                    id: text_of(p, "feedback_id")?,
                    created_at: integer_of(p, "created_at")?,
                    vote: Vote::parse(&text_of(p, "vote")?)?,
                    question: text_of(p, "question")?,
                    answer: text_of(p, "answer")?,
                    mode: text_of(p, "mode")?,
                    source_ids: serde_json::from_str(&text_of(p, "source_ids")?).ok()?,
                })
            })
            .await?;
        // Scrolled in point-id order; the export is oldest first (within one second, in no
        // particular order: the cluster has no insertion order to give).
        votes.sort_by_key(|vote| vote.created_at);
        Ok(votes)
    }

    pub async fn delete_document(&self, id: &str) -> Result<bool, StoreError> {
        if self.known_shape().await?.is_none() {
            return Ok(false);
        }
        let existed = self.heads(&[id.to_string()]).await?.contains_key(id);
        // The head first: the document disappears in one write; its chunks become garbage.
        let request = DeletePointsBuilder::new(&self.collection)
            .points(Filter::must([document_is(id), kind_is(KIND_HEAD)]))
            .wait(true)
            .build();
        self.call("delete a document", |c| c.delete_points(request.clone()))
            .await?;
        let chunks = Filter::must([document_is(id), kind_is(KIND_CHUNK)]);
        if let Err(e) = self.delete_points(chunks).await {
            log::warn!("{e} (the chunks of deleted document {id} stay, invisible)");
        }
        Ok(existed)
    }

    /// The `k` chunks nearest to `query` in the named vector that belong to their document's
    /// committed version, read as one snapshot per document (the module doc's four steps).
    async fn committed_hits(
        &self,
        query: Query,
        using: &str,
        k: usize,
        action: &'static str,
        score: impl Fn(f32) -> f32,
    ) -> Result<Vec<Hit>, StoreError> {
        let mut last = Vec::new();
        for attempt in 1..=READ_ATTEMPTS {
            // 1. Candidates: chunks of any version, only their document ids.
            let candidates = self
                .query_chunks(
                    query.clone(),
                    using,
                    Filter::must([kind_is(KIND_CHUNK)]),
                    overfetch(k),
                    SelectorOptions::Include(PayloadIncludeSelector {
                        fields: vec![field::DOCUMENT_ID.to_string()],
                    }),
                    action,
                )
                .await?;
            let mut ids: Vec<String> = candidates
                .iter()
                .filter_map(|point| text_of(&point.payload, field::DOCUMENT_ID))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            // 2. The committed version of each.
            let heads = self.heads(&ids).await?;
            // 3. Only chunks of those versions (none at all when no candidate has a head:
            //    uncommitted or deleted; step 4 tells whether that held).
            last = if heads.is_empty() {
                Vec::new()
            } else {
                self.committed_chunks(&query, using, &heads, k, action, &score)
                    .await?
            };
            // 4. The snapshot held if no head moved meanwhile.
            let again = self.heads(&ids).await?;
            let moved = heads.len() != again.len()
                || heads
                    .iter()
                    .any(|(id, head)| again.get(id).map(|h| &h.version) != Some(&head.version));
            if !moved {
                return Ok(last);
            }
            tokio::time::sleep(READ_BACKOFF * attempt + jitter(READ_BACKOFF)).await;
        }
        log::debug!(
            "qdrant store: documents kept changing during a search; {} hits from the last try",
            last.len()
        );
        Ok(last)
    }

    /// The `k` nearest chunks of exactly the versions the `heads` name, as hits.
    async fn committed_chunks(
        &self,
        query: &Query,
        using: &str,
        heads: &HashMap<String, Head>,
        k: usize,
        action: &'static str,
        score: impl Fn(f32) -> f32,
    ) -> Result<Vec<Hit>, StoreError> {
        let committed = Filter {
            must: vec![kind_is(KIND_CHUNK)],
            should: heads
                .values()
                .map(|head| {
                    Condition::from(Filter::must([
                        document_is(&head.info.id),
                        hash_is(&head.info.content_hash),
                    ]))
                })
                .collect(),
            ..Default::default()
        };
        let points = self
            .query_chunks(
                query.clone(),
                using,
                committed,
                k as u64,
                true.into(),
                action,
            )
            .await?;
        Ok(points
            .iter()
            .filter_map(|point| chunk_hit(&point.payload, score(point.score)))
            .filter(|(hit, hash)| {
                heads
                    .get(&hit.document_id)
                    .is_some_and(|head| &head.info.content_hash == hash)
            })
            .map(|(hit, _)| hit)
            .collect())
    }

    async fn query_chunks(
        &self,
        query: Query,
        using: &str,
        filter: Filter,
        limit: u64,
        payload: SelectorOptions,
        action: &'static str,
    ) -> Result<Vec<ScoredPoint>, StoreError> {
        let request = QueryPointsBuilder::new(&self.collection)
            .query(query)
            .using(using)
            .filter(filter)
            .limit(limit)
            .with_payload(payload)
            .build();
        Ok(self
            .call(action, |c| c.query(request.clone()))
            .await?
            .result)
    }

    pub async fn lexical_search(&self, query: &str, k: usize) -> Result<Vec<Hit>, StoreError> {
        let stems = self.stems.query_stems(query);
        if stems.is_empty() || self.known_shape().await?.is_none() {
            return Ok(Vec::new());
        }
        let mut indices: Vec<u32> = stems.iter().map(|stem| stem_index(stem)).collect();
        indices.sort_unstable();
        indices.dedup();
        let values = vec![1.0; indices.len()];
        let nearest = Query::new_nearest(VectorInput::new_sparse(indices, values));
        self.committed_hits(nearest, LEXICAL, k, "search the lexical index", |score| {
            score
        })
        .await
    }

    pub async fn dense_search(&self, vector: &[f32], k: usize) -> Result<Vec<Hit>, StoreError> {
        let Some(mut shape) = self.known_shape().await? else {
            return Ok(Vec::new());
        };
        if shape.dense.is_none() {
            // Another process may have added the vector since this one looked.
            shape = self.fetch_shape().await?.unwrap_or(shape);
        }
        let Some(dense) = shape.dense else {
            return Ok(Vec::new());
        };
        if vector.len() != dense.size {
            return Err(StoreError::DimensionMismatch {
                expected: dense.size,
                got: vector.len(),
            });
        }
        let nearest = Query::new_nearest(vector.to_vec());
        let sign = if dense.lower_is_better { -1.0 } else { 1.0 };
        self.committed_hits(nearest, DENSE, k, "search the vector index", |score| {
            sign * score
        })
        .await
    }

    /// Documents = head points. Chunks = chunk points, which while a document is being
    /// replaced briefly include both versions.
    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        if self.known_shape().await?.is_none() {
            return Ok(StoreStats::default());
        }
        Ok(StoreStats {
            documents: self.count(kind_is(KIND_HEAD)).await?,
            chunks: self.count(kind_is(KIND_CHUNK)).await?,
        })
    }

    /// Whether the collection exists (the first-run mark for this backend).
    pub async fn collection_exists(&self) -> Result<bool, StoreError> {
        Ok(self.fetch_shape().await?.is_some())
    }

    #[cfg(test)]
    pub async fn check(&self) -> Result<(), StoreError> {
        self.call("answer a health check", |c| c.health_check())
            .await?;
        Ok(())
    }

    /// Removes the collection: for tests, which each use one of their own.
    #[cfg(test)]
    pub(super) async fn drop_collection(&self) -> Result<(), StoreError> {
        self.call("delete the collection", |c| {
            c.delete_collection(self.collection.as_str())
        })
        .await?;
        Ok(())
    }

    // ----- reading helpers ---------------------------------------------------------------

    /// The head points of these documents, by document id (absent ones are simply missing).
    async fn heads(&self, ids: &[String]) -> Result<HashMap<String, Head>, StoreError> {
        let point_ids: Vec<PointId> = ids
            .iter()
            .map(|id| PointId::from(head_point_id(id)))
            .collect();
        let request = GetPointsBuilder::new(&self.collection, point_ids)
            .with_payload(true)
            .with_vectors(false)
            .build();
        let response = self
            .call("read document heads", |c| c.get_points(request.clone()))
            .await?;
        Ok(response
            .result
            .iter()
            .filter_map(|point| head_of(&point.payload))
            .map(|head| (head.info.id.clone(), head))
            .collect())
    }

    async fn count(&self, condition: Condition) -> Result<u64, StoreError> {
        let request = CountPointsBuilder::new(&self.collection)
            .filter(Filter::must([condition]))
            .exact(true)
            .build();
        let response = self
            .call("count points", |c| c.count(request.clone()))
            .await?;
        Ok(response.result.map(|r| r.count).unwrap_or(0))
    }

    // ----- writing helpers ---------------------------------------------------------------

    /// Deletes the document's chunks that are not of version `current` and either belong to
    /// the `replaced` version or were written over [`STALE_AFTER`] before `now`.
    async fn delete_stale_chunks(
        &self,
        id: &str,
        current: &str,
        replaced: Option<&str>,
        now: i64,
    ) -> Result<(), StoreError> {
        let cutoff = now.saturating_sub(STALE_AFTER.as_secs() as i64);
        let mut stale = vec![Condition::range(
            field::UPDATED_AT,
            Range {
                lt: Some(cutoff as f64),
                ..Default::default()
            },
        )];
        if let Some(hash) = replaced.filter(|hash| *hash != current) {
            stale.push(Condition::matches(field::CONTENT_HASH, hash.to_string()));
        }
        let filter = Filter {
            must: vec![document_is(id), kind_is(KIND_CHUNK)],
            must_not: vec![Condition::matches(field::CONTENT_HASH, current.to_string())],
            should: stale,
            ..Default::default()
        };
        self.delete_points(filter).await
    }

    async fn delete_points(&self, filter: Filter) -> Result<(), StoreError> {
        let request = DeletePointsBuilder::new(&self.collection)
            .points(filter)
            .wait(true)
            .build();
        self.call("delete chunks", |c| c.delete_points(request.clone()))
            .await?;
        Ok(())
    }

    fn chunk_point(
        &self,
        id: &str,
        doc: &NewDocument,
        chunk: &NewChunk,
        updated_at: i64,
    ) -> PointStruct {
        let mut vectors = NamedVectors::default()
            .add_vector(LEXICAL, sparse_vector(&self.stems.stem_text(&chunk.text)));
        if let Some(embedding) = &chunk.embedding {
            vectors = vectors.add_vector(DENSE, embedding.clone());
        }
        let mut payload = document_payload(id, doc, KIND_CHUNK, updated_at);
        payload.insert(field::TEXT, chunk.text.clone());
        payload.insert(field::POSITION, chunk.position as i64);
        PointStruct::new(
            chunk_point_id(id, &doc.content_hash, chunk.position),
            vectors,
            payload,
        )
    }

    /// Creates the collection if needed and makes sure it can take vectors of `dimensions`.
    async fn prepare_for_write(&self, dimensions: Option<usize>) -> Result<Shape, StoreError> {
        let mut shape = match self.known_shape().await? {
            Some(shape) => shape,
            None => self.create_collection(dimensions).await?,
        };
        let Some(got) = dimensions else {
            return Ok(shape);
        };
        for refreshed in [false, true] {
            match shape.dense {
                Some(dense) if dense.size == got => return Ok(shape),
                Some(dense) => {
                    return Err(StoreError::DimensionMismatch {
                        expected: dense.size,
                        got,
                    })
                }
                // The cached shape may predate another process adding the vector.
                None if !refreshed => shape = self.fetch_shape().await?.unwrap_or(shape),
                None => {}
            }
        }
        self.add_dense_vector(got).await
    }

    async fn create_collection(&self, dimensions: Option<usize>) -> Result<Shape, StoreError> {
        let mut dense = HashMap::new();
        if let Some(size) = dimensions {
            dense.insert(
                DENSE.to_string(),
                VectorParamsBuilder::new(size as u64, self.qdrant_distance()).build(),
            );
        }
        // An explicit (possibly empty) map of named vectors: sparse-only is a valid collection.
        let vectors = VectorsConfig {
            config: Some(vectors_config::Config::ParamsMap(VectorParamsMap {
                map: dense,
            })),
        };
        let mut sparse = SparseVectorsConfigBuilder::default();
        sparse.add_named_vector_params(
            LEXICAL,
            SparseVectorParamsBuilder::default().modifier(Modifier::Idf),
        );
        let mut request = CreateCollectionBuilder::new(&self.collection)
            .vectors_config(vectors)
            .sparse_vectors_config(sparse)
            .replication_factor(self.layout.replication_factor)
            .write_consistency_factor(self.layout.write_consistency_factor);
        if self.layout.shard_number > 0 {
            request = request.shard_number(self.layout.shard_number);
        }
        let request = request.build();
        if let Err(e) = self
            .call("create the collection", |c| {
                c.create_collection(request.clone())
            })
            .await
        {
            // Another process may have created it first; then it is there now.
            return match self.fetch_shape().await {
                Ok(Some(shape)) => Ok(shape),
                _ => Err(e),
            };
        }
        log::info!(
            "qdrant store: created collection {:?} at {} ({:?})",
            self.collection,
            self.url,
            self.layout
        );
        for (name, kind) in [
            (field::DOCUMENT_ID, FieldType::Keyword),
            (field::KIND, FieldType::Keyword),
            (field::CONTENT_HASH, FieldType::Keyword),
        ] {
            let request =
                CreateFieldIndexCollectionBuilder::new(&self.collection, name, kind).wait(true);
            self.call("create a payload index", |c| {
                c.create_field_index(request.clone())
            })
            .await?;
        }
        let shape = Shape {
            dense: dimensions.map(|size| Dense {
                size,
                lower_is_better: self.lower_is_better(),
            }),
        };
        self.remember(Some(shape));
        Ok(shape)
    }

    /// Adds the dense vector to a collection created before any embedding was stored.
    async fn add_dense_vector(&self, size: usize) -> Result<Shape, StoreError> {
        let request = CreateVectorNameRequestBuilder::new(
            &self.collection,
            DENSE,
            DenseVectorCreationConfigBuilder::new(size as u64, self.qdrant_distance()),
        )
        .wait(true)
        .build();
        if let Err(e) = self
            .call("add the dense vector", |c| {
                c.create_vector_name(request.clone())
            })
            .await
        {
            return Err(StoreError::Collection {
                collection: self.collection.clone(),
                detail: format!(
                    "it has no dense vector (its first documents had no embeddings) and adding a \
                     {size}-dimensional one failed ({e}); delete the collection and ingest again"
                ),
            });
        }
        log::info!(
            "qdrant store: added {size}-dimensional vector {DENSE:?} to {:?}",
            self.collection
        );
        let shape = Shape {
            dense: Some(Dense {
                size,
                lower_is_better: self.lower_is_better(),
            }),
        };
        self.remember(Some(shape));
        Ok(shape)
    }

    // ----- the collection's shape --------------------------------------------------------

    async fn known_shape(&self) -> Result<Option<Shape>, StoreError> {
        let cached = *self.shape.lock().unwrap_or_else(PoisonError::into_inner);
        match cached {
            Some(shape) => Ok(Some(shape)),
            None => self.fetch_shape().await,
        }
    }

    /// Asks the server; `None` when the collection does not exist.
    async fn fetch_shape(&self) -> Result<Option<Shape>, StoreError> {
        let exists = self
            .call("look up the collection", |c| {
                c.collection_exists(self.collection.as_str())
            })
            .await?;
        if !exists {
            self.remember(None);
            return Ok(None);
        }
        let info = self
            .call("read the collection", |c| {
                c.collection_info(self.collection.as_str())
            })
            .await?;
        let shape = shape_of(&self.collection, info.result)?;
        self.remember(Some(shape));
        Ok(Some(shape))
    }

    fn remember(&self, shape: Option<Shape>) {
        *self.shape.lock().unwrap_or_else(PoisonError::into_inner) = shape;
    }

    fn qdrant_distance(&self) -> QdrantDistance {
        match self.distance {
            Distance::Cosine => QdrantDistance::Cosine,
            Distance::Dot => QdrantDistance::Dot,
            Distance::Euclid => QdrantDistance::Euclid,
        }
    }

    fn lower_is_better(&self) -> bool {
        self.distance == Distance::Euclid
    }

    /// Runs one request, starting at the preferred node and moving on to the next while a
    /// node does not answer (down, unreachable, or failing inside the cluster). Every request
    /// ragpool sends is safe to repeat: points have derived ids, deletes are by filter, and
    /// creating what exists is handled by the caller.
    async fn call<'a, T, Fut>(
        &'a self,
        action: &'static str,
        request: impl Fn(&'a Qdrant) -> Fut,
    ) -> Result<T, StoreError>
    where
        Fut: Future<Output = Result<T, QdrantError>>,
    {
        let count = self.nodes.len();
        let first = self.preferred.load(Ordering::Relaxed) % count;
        let mut failed = Vec::new();
        for step in 0..count {
            let index = (first + step) % count;
            let node = &self.nodes[index];
            match request(&node.client).await {
                Ok(value) => {
                    if step > 0 {
                        self.preferred.store(index, Ordering::Relaxed);
                        log::warn!(
                            "qdrant store: {} did not answer ({}); now using {}",
                            failed.join(", "),
                            action,
                            node.url
                        );
                    }
                    return Ok(value);
                }
                Err(e) if step + 1 < count && is_unanswered(&e) => {
                    log::debug!("qdrant store: {} failed to {action}: {e}", node.url);
                    failed.push(node.url.as_str());
                }
                Err(e) => {
                    return Err(StoreError::Qdrant {
                        url: if failed.is_empty() {
                            node.url.clone()
                        } else {
                            self.url.clone()
                        },
                        collection: self.collection.clone(),
                        action,
                        source: Box::new(e),
                    })
                }
            }
        }
        unreachable!("a store has at least one node and the last one returns")
    }
}

/// Whether another node may answer where this one failed: the node is down or unreachable
/// (the client reports a refused connection as `Internal`), timed out, or failed inside the
/// cluster. A refusal of the request itself (invalid, not found, exists) is final.
fn is_unanswered(error: &QdrantError) -> bool {
    // gRPC status codes (the standard numbering, as tonic's `Code` discriminants).
    const CANCELLED: i32 = 1;
    const UNKNOWN: i32 = 2;
    const DEADLINE_EXCEEDED: i32 = 4;
    const ABORTED: i32 = 10;
    const INTERNAL: i32 = 13;
    const UNAVAILABLE: i32 = 14;
    match error {
        QdrantError::ResponseError { status } => matches!(
            status.code() as i32,
            CANCELLED | UNKNOWN | DEADLINE_EXCEEDED | ABORTED | INTERNAL | UNAVAILABLE
        ),
        QdrantError::ResourceExhaustedError { .. } => true,
        _ => false,
    }
}

/// Reads the collection's vectors; refuses a collection ragpool could not have created.
fn shape_of(
    collection: &str,
    info: Option<qdrant_client::qdrant::CollectionInfo>,
) -> Result<Shape, StoreError> {
    let unfit = |detail: &str| StoreError::Collection {
        collection: collection.to_string(),
        detail: detail.to_string(),
    };
    let params = info
        .and_then(|info| info.config)
        .and_then(|config| config.params)
        .ok_or_else(|| unfit("the server returned no collection parameters"))?;
    if !params
        .sparse_vectors_config
        .as_ref()
        .is_some_and(|sparse| sparse.map.contains_key(LEXICAL))
    {
        return Err(unfit(
            "it has no sparse vector named \"lexical\"; let ragpool create its collection \
             (choose another [store] collection or delete this one)",
        ));
    }
    let dense = match params.vectors_config.and_then(|vectors| vectors.config) {
        None => None,
        Some(vectors_config::Config::ParamsMap(map)) => map.map.get(DENSE).map(|params| Dense {
            size: params.size as usize,
            lower_is_better: params.distance == QdrantDistance::Euclid as i32
                || params.distance == QdrantDistance::Manhattan as i32,
        }),
        Some(vectors_config::Config::Params(_)) => {
            return Err(unfit(
                "it has an unnamed dense vector; ragpool needs one named \"dense\"",
            ))
        }
    };
    Ok(Shape { dense })
}

/// The head point: the document's current version, the commit record of a replace.
fn head_point(id: &str, doc: &NewDocument, updated_at: i64) -> PointStruct {
    // An empty sparse vector: never a search result, and valid in every collection shape.
    let vectors = NamedVectors::default().add_vector(
        LEXICAL,
        Vector::new_sparse(Vec::<u32>::new(), Vec::<f32>::new()),
    );
    let mut payload = document_payload(id, doc, KIND_HEAD, updated_at);
    payload.insert(field::VERSION, commit_token(id));
    PointStruct::new(head_point_id(id), vectors, payload)
}

/// A head as read back: the document and the commit that wrote it.
struct Head {
    info: DocumentInfo,
    /// The head's `version`; heads written before ragpool had one use hash@time.
    version: String,
}

fn head_of(payload: &HashMap<String, Value>) -> Option<Head> {
    let info = document_of(payload)?;
    let version = text_of(payload, field::VERSION)
        .unwrap_or_else(|| format!("{}@{}", info.content_hash, info.updated_at));
    Some(Head { info, version })
}

/// Up to `max`, from the clock's nanoseconds: enough to break lock-step, no RNG needed.
fn jitter(max: Duration) -> Duration {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    Duration::from_nanos(u64::from(nanos) % (max.as_nanos() as u64).max(1))
}

/// A token no other commit has: the document, this process, a per-process counter and the
/// clock, hashed.
fn commit_token(id: &str) -> String {
    static COMMITS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let n = COMMITS.fetch_add(1, Ordering::Relaxed);
    uuid_of(&format!("commit/{id}/{}/{n}/{nanos}", std::process::id()))
}

/// What chunks and heads share.
fn document_payload(id: &str, doc: &NewDocument, kind: &str, updated_at: i64) -> Payload {
    let mut payload = Payload::new();
    payload.insert(field::KIND, kind);
    payload.insert(field::DOCUMENT_ID, id);
    payload.insert(field::SOURCE, doc.source.clone());
    payload.insert(field::TITLE, doc.title.clone());
    payload.insert(field::CONTENT_HASH, doc.content_hash.clone());
    payload.insert(field::CHUNKS, doc.chunks.len() as i64);
    payload.insert(field::UPDATED_AT, updated_at);
    payload
}

fn document_of(payload: &HashMap<String, Value>) -> Option<DocumentInfo> {
    Some(DocumentInfo {
        id: text_of(payload, field::DOCUMENT_ID)?,
        source: text_of(payload, field::SOURCE)?,
        title: text_of(payload, field::TITLE)?,
        content_hash: text_of(payload, field::CONTENT_HASH)?,
        chunks: integer_of(payload, field::CHUNKS)?.max(0) as usize,
        updated_at: integer_of(payload, field::UPDATED_AT)?,
    })
}

/// A hit and the content hash of the version its chunk belongs to.
fn chunk_hit(payload: &HashMap<String, Value>, score: f32) -> Option<(Hit, String)> {
    let hit = Hit {
        document_id: text_of(payload, field::DOCUMENT_ID)?,
        title: text_of(payload, field::TITLE)?,
        source: text_of(payload, field::SOURCE)?,
        position: integer_of(payload, field::POSITION)?.max(0) as usize,
        text: text_of(payload, field::TEXT)?,
        score,
    };
    Some((hit, text_of(payload, field::CONTENT_HASH)?))
}

fn text_of(payload: &HashMap<String, Value>, key: &str) -> Option<String> {
    payload.get(key)?.as_str().cloned()
}

fn integer_of(payload: &HashMap<String, Value>, key: &str) -> Option<i64> {
    payload.get(key)?.as_integer()
}

fn kind_is(kind: &str) -> Condition {
    Condition::matches(field::KIND, kind.to_string())
}

fn document_is(id: &str) -> Condition {
    Condition::matches(field::DOCUMENT_ID, id.to_string())
}

fn hash_is(hash: &str) -> Condition {
    Condition::matches(field::CONTENT_HASH, hash.to_string())
}

/// Search a little deeper than asked for candidates, to make up for chunks of versions that are
/// not (or no longer) committed.
fn overfetch(k: usize) -> u64 {
    k.saturating_add(k.max(8)) as u64
}

/// Term frequencies of a chunk's stems, keyed by [`stem_index`].
fn sparse_vector(stems: &str) -> Vector {
    let mut frequencies: BTreeMap<u32, f32> = BTreeMap::new();
    for stem in stems.split_whitespace() {
        *frequencies.entry(stem_index(stem)).or_default() += 1.0;
    }
    let (indices, values): (Vec<u32>, Vec<f32>) = frequencies.into_iter().unzip();
    Vector::new_sparse(indices, values)
}

/// A stem's sparse dimension: 32-bit FNV-1a, stable across processes, hosts and versions
/// (unlike `std`'s randomly seeded hasher).
fn stem_index(stem: &str) -> u32 {
    stem.bytes().fold(0x811c_9dc5_u32, |hash, byte| {
        (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193)
    })
}

fn chunk_point_id(id: &str, content_hash: &str, position: usize) -> String {
    uuid_of(&format!("chunk/{id}/{content_hash}/{position}"))
}

fn head_point_id(id: &str) -> String {
    uuid_of(&format!("head/{id}"))
}

/// A UUID (version 8, "custom") made of the first 128 bits of the key's SHA-256.
fn uuid_of(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_ids_are_stable_uuids() {
        let a = chunk_point_id("0123456789abcdef", "hash", 3);
        assert_eq!(a, chunk_point_id("0123456789abcdef", "hash", 3));
        assert_ne!(a, chunk_point_id("0123456789abcdef", "other", 3));
        assert_ne!(a, head_point_id("0123456789abcdef"));
        let groups: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(groups, vec![8, 4, 4, 4, 12]);
        assert_eq!(&a[14..15], "8", "version 8");
    }

    #[test]
    fn stem_index_is_fnv1a() {
        // Reference values of 32-bit FNV-1a.
        assert_eq!(stem_index(""), 0x811c_9dc5);
        assert_eq!(stem_index("a"), 0xe40c_292c);
        assert_eq!(stem_index("foobar"), 0xbf9c_f968);
    }

    #[test]
    fn sparse_vector_counts_term_frequencies() {
        let vector = sparse_vector("worker reload worker");
        let expected = Vector::new_sparse(
            {
                let mut i = vec![stem_index("reload"), stem_index("worker")];
                i.sort_unstable();
                i
            },
            if stem_index("reload") < stem_index("worker") {
                vec![1.0, 2.0]
            } else {
                vec![2.0, 1.0]
            },
        );
        assert_eq!(vector, expected);
    }
}
