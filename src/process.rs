//! The processing stage: one validated [`Document`] in, one [`Processed`] outcome (or a
//! [`Failure`]) out. Chunk → embed → store, with the document lifecycle rules:
//! - every write has an [`Order`]: the message's version (a message without a version takes
//!   the stored one: "last processed wins" among those) and the processing time as a
//!   tie-breaker (see [`write_order`]). Every point carries the order of the write that
//!   stored it;
//! - a message whose version is older than the stored version is skipped
//!   ([`Processed::Stale`]), never written; a delete leaves a tombstone in chunk 0's place, so
//!   an older upsert arriving later (from a retry tier, a DLQ replay, prefetch reordering) is
//!   recognised as stale too;
//! - an upsert whose content hash (and embedder) equals what is stored makes no embedding
//!   call. If its version and metadata are the stored ones too, nothing is written
//!   ([`Processed::Unchanged`]); otherwise the stored chunks are relabelled with the new
//!   version, metadata and order, vectors untouched (also [`Processed::Unchanged`]);
//! - otherwise the new chunks are written — chunk 0 last, because chunk 0 is how the stored
//!   revision is identified — with the store's conditional write: a stored point is only
//!   replaced by a write of a newer order. Then chunk 0 is read back: if this write leads,
//!   every point of an older write is deleted (readers never see the document vanish); if a
//!   newer write leads, this write's own leftovers are deleted and the outcome is
//!   [`Processed::Stale`].
//!
//! Both conditions (replace only older points, delete only points older than a write that
//! has stored its chunk 0) are checked by the store atomically for each point, so any number
//! of workers in any number of processes may process messages about one document at once:
//! every interleaving leaves exactly the chunks of the newest write. The worker still holds a
//! per-document lock within one process, which saves work but is not needed for correctness.
//!
//! This module knows nothing about AMQP: the queue layer turns outcomes into acks,
//! retries and dead letters.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::chunk::{Chunk, ChunkFormat, Chunker};
use crate::context::{self, ChunkContext, ContextMode, Contextualizer};
use crate::embed::Embedder;
use crate::error::{ErrorKind, Stage};
use crate::extract::{self, DocumentChunks, ExtractLimits};
use crate::message::{Document, Op};
use crate::sparse::{SparseEncoder, SparseVector};
use crate::store::{ChunkPayload, ChunkPoint, MAX_SEQ, Order, StoreError, VectorStore, point_id};
use crate::telemetry::emit;
use crate::telemetry::events::{
    ChunksEmbedded, StaleMessageSkipped, StoreCall, StoredVectorsUnreadable,
};

/// Re-exported from [`crate::error`], where the failure taxonomy lives.
pub use crate::error::Failure;

/// What processing did with a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    /// The document's chunks were embedded and written.
    Stored {
        /// Number of chunks written.
        chunks: usize,
        /// How many of them reused a stored vector (same text, same embedder) instead of
        /// being embedded.
        reused: usize,
    },
    /// The stored revision has the same content and embedder: nothing was embedded (the
    /// stored chunks' version and metadata were updated if the message's differ).
    Unchanged,
    /// The stored version is newer than the message's: nothing was written.
    Stale {
        /// The version in the store.
        stored: u64,
    },
    /// The document's chunks were deleted.
    Deleted,
    /// Nothing was written: before the first write, the caller's check
    /// ([`Pipeline::process_while`]) said the result was no longer wanted (the queue layer:
    /// the message's delivery can no longer be settled, and the broker hands the message to
    /// another worker). Never returned by [`Pipeline::process`].
    Abandoned,
}

impl Processed {
    /// A short label for logs and reports.
    pub fn label(&self) -> &'static str {
        match self {
            Processed::Stored { .. } => "stored",
            Processed::Unchanged => "unchanged",
            Processed::Stale { .. } => "stale",
            Processed::Deleted => "deleted",
            Processed::Abandoned => "abandoned",
        }
    }
}

/// The vectors of a document's chunks, in chunk order.
struct ChunkVectors {
    vectors: Vec<Vec<f32>>,
    /// How many chunks got a stored vector instead of being embedded.
    reused: usize,
}

/// A chunk ready to embed: its context, what is embedded, and its keyword vector.
struct PreparedChunk {
    chunk: Chunk,
    /// The chunk's page (1-based) in a PDF.
    page: Option<u32>,
    context: Option<ChunkContext>,
    /// The context and the text ([`context::embed_text`]): what the dense and the sparse
    /// vector are computed from.
    embed_text: String,
    sparse: SparseVector,
}

/// Chunks, embeds and stores documents with one embedder and one store.
pub struct Pipeline<E, S> {
    chunker: Arc<Chunker>,
    limits: ExtractLimits,
    context: Arc<Contextualizer>,
    sparse: Arc<SparseEncoder>,
    embedder: Arc<E>,
    store: Arc<S>,
}

impl<E, S> Clone for Pipeline<E, S> {
    fn clone(&self) -> Self {
        Pipeline {
            chunker: Arc::clone(&self.chunker),
            limits: self.limits,
            context: Arc::clone(&self.context),
            sparse: Arc::clone(&self.sparse),
            embedder: Arc::clone(&self.embedder),
            store: Arc::clone(&self.store),
        }
    }
}

/// Hex SHA-256 of `content`.
pub fn content_sha256(content: &str) -> String {
    hex::encode(Sha256::digest(content.as_bytes()))
}

impl<E: Embedder, S: VectorStore> Pipeline<E, S> {
    /// A pipeline over the given stages, embedding each chunk's text alone
    /// ([`ContextMode::None`]; see [`Pipeline::with_context`]) and giving every chunk a BM25
    /// keyword vector ([`SparseEncoder::bm25`]).
    pub fn new(chunker: Arc<Chunker>, embedder: Arc<E>, store: Arc<S>) -> Self {
        Pipeline {
            chunker,
            limits: ExtractLimits::default(),
            context: Arc::new(Contextualizer::default()),
            sparse: Arc::new(SparseEncoder::bm25()),
            embedder,
            store,
        }
    }

    /// This pipeline, embedding each chunk with the context `context` builds. The chunker
    /// must cut chunks [`Contextualizer::budget`] tokens below the model's limit (as
    /// [`crate::setup::pipeline`] builds it) so that context and chunk fit together.
    pub fn with_context(mut self, context: Contextualizer) -> Self {
        self.context = Arc::new(context);
        self
    }

    /// This pipeline, extracting HTML and PDF content within `limits` (default:
    /// [`ExtractLimits::default`]).
    pub fn with_extract_limits(mut self, limits: ExtractLimits) -> Self {
        self.limits = limits;
        self
    }

    /// What every point written by this pipeline records as its `embedder`: the embedder's
    /// [`Fingerprint::id`](crate::embed::Fingerprint::id), plus `|ctx=headings` when chunks
    /// are embedded with their context — so a change of either re-embeds a document at its
    /// next update instead of keeping vectors of another kind.
    pub fn embedded_with(&self) -> String {
        let id = self.embedder.fingerprint().id();
        match self.context.mode() {
            ContextMode::None => id,
            mode => format!("{id}|ctx={}", mode.as_str()),
        }
    }

    /// The store this pipeline writes to.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The embedder this pipeline uses.
    pub fn embedder(&self) -> &Arc<E> {
        &self.embedder
    }

    /// Applies `doc` to the store.
    ///
    /// Safe to run for the same document in any number of tasks or processes at once (see
    /// the module documentation): the store converges on the newest write.
    ///
    /// Fails with a [`Failure`] from the chunk, embed or store stage; transient kinds may
    /// be retried with the same document (every write is idempotent).
    pub async fn process(&self, doc: &Document) -> Result<Processed, Failure> {
        self.process_while(doc, || true).await
    }

    /// Like [`process`](Pipeline::process), but asks `wanted` before reading, before
    /// embedding and right before the first write (the upsert of new chunks, a tombstone, a
    /// relabelling), and stops there, writing nothing and returning
    /// [`Processed::Abandoned`], once it answers `false`. The queue layer passes "the
    /// delivery can still be settled": a message whose broker connection was lost is
    /// redelivered, perhaps to another worker that stores it and then newer messages about
    /// the same document; a write of this attempt landing after those would take the place
    /// of newer content (a message without a version takes the order of its processing
    /// time) or leave chunks that no settling removes. The check is a snapshot: a loss the
    /// client has not noticed yet, or one right after the check, does not stop the write.
    ///
    /// Cleanup deletes (points older than the stored head) are not writes of this message's
    /// content and run regardless.
    ///
    /// Fails like [`process`](Pipeline::process).
    pub async fn process_while(
        &self,
        doc: &Document,
        wanted: impl Fn() -> bool + Send + Sync,
    ) -> Result<Processed, Failure> {
        let wanted: &(dyn Fn() -> bool + Send + Sync) = &wanted;
        if !wanted() {
            return Ok(Processed::Abandoned);
        }
        let stored = timed(
            "read_head",
            self.store.first_chunk(&doc.tenant, &doc.document_id),
        )
        .await?;
        if let (Some(head), Some(version)) = (stored.as_ref(), doc.version) {
            let head_order = head.effective_order();
            if version < head_order.version {
                emit(StaleMessageSkipped {
                    version,
                    stored_version: head_order.version,
                });
                // Leftovers of an interrupted older write — this message's own earlier
                // attempt, typically — are removed on the way. Always with a delete, not
                // only when a count finds some: a write is ordered after every write the
                // store has accepted before it, so a request of the earlier attempt that
                // was still on its way (its worker killed or cut off mid-write) lands
                // before this delete and is removed by it; a count would not see it yet.
                if head.order.is_some() {
                    timed(
                        "delete",
                        self.store
                            .delete_older(&doc.tenant, &doc.document_id, head_order),
                    )
                    .await?;
                }
                return Ok(Processed::Stale {
                    stored: head_order.version,
                });
            }
        }
        let stored_order = stored.as_ref().map(ChunkPayload::effective_order);
        match doc.op {
            Op::Delete => {
                if !wanted() {
                    return Ok(Processed::Abandoned);
                }
                self.delete(doc, write_order(doc.version, stored_order))
                    .await
            }
            Op::Upsert => {
                let stored = stored.filter(|head| !head.tombstone);
                self.upsert(doc, stored, stored_order, wanted).await
            }
        }
    }

    /// Deletes `doc`'s chunks with the write `order`: a tombstone takes chunk 0's place (so
    /// an older upsert arriving later is recognised as stale), then every older point goes.
    async fn delete(&self, doc: &Document, order: Order) -> Result<Processed, Failure> {
        let dims = self.embedder.fingerprint().dims;
        let mut vector = vec![0.0; dims];
        if let Some(first) = vector.first_mut() {
            *first = 1.0;
        }
        let tombstone = ChunkPoint {
            id: point_id(&doc.tenant, &doc.document_id, 0),
            vector,
            sparse: None,
            payload: ChunkPayload::tombstone(
                &doc.tenant,
                &doc.document_id,
                doc.version,
                order,
                &self.embedded_with(),
            ),
        };
        timed("upsert", self.store.upsert_newer(vec![tombstone], order)).await?;
        Ok(match self.settle(doc, order, 0).await? {
            Some(newer) => Processed::Stale {
                stored: newer.version,
            },
            None => Processed::Deleted,
        })
    }

    /// Upserts `doc`; `stored` is the stored chunk 0 (not a tombstone) and `stored_order` the
    /// order chunk 0 had (tombstone or not). The write's order is taken just before writing,
    /// so among messages without a version the last one processed wins.
    async fn upsert(
        &self,
        doc: &Document,
        stored: Option<ChunkPayload>,
        stored_order: Option<Order>,
        wanted: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<Processed, Failure> {
        let sha = content_sha256(&doc.content);
        let fingerprint = self.embedded_with();
        // The stored revision's chunk count, when its vectors come from this embedder.
        let stored_chunks = stored
            .as_ref()
            .filter(|stored| stored.embedder == fingerprint)
            .map(|stored| stored.chunk_count);
        // With contexts, the title is part of what is embedded: a new title re-embeds.
        let same_title = self.context.mode() == ContextMode::None
            || stored.as_ref().is_some_and(|stored| {
                context::title(&stored.metadata) == context::title(&doc.metadata)
            });
        if let Some(stored) = stored
            && stored.content_sha256 == sha
            && stored.embedder == fingerprint
            && same_title
        {
            let order = write_order(doc.version, stored_order);
            return self.keep_unchanged(doc, stored, order, wanted).await;
        }

        let extracted = self.extract_and_chunk(doc).await?;
        if extracted.chunks.is_empty() {
            return Err(Failure::new(
                ErrorKind::EmptyContent,
                Stage::Chunk,
                "the content produced no chunks",
            ));
        }
        let chunks = self.prepare(doc, extracted).await?;
        if !wanted() {
            return Ok(Processed::Abandoned);
        }
        let reusable = match stored_chunks {
            Some(count) => self.reusable_vectors(doc, count, &fingerprint).await?,
            None => HashMap::new(),
        };
        let vectors = self.embed_new(doc, &chunks, reusable).await?;
        if !wanted() {
            return Ok(Processed::Abandoned);
        }

        let order = write_order(doc.version, stored_order);
        let chunk_count = chunks.len();
        let reused = vectors.reused;
        let ingested_at = chrono::Utc::now().to_rfc3339();
        let mut points: Vec<ChunkPoint> = chunks
            .into_iter()
            .zip(vectors.vectors)
            .map(|(prepared, vector)| ChunkPoint {
                id: point_id(&doc.tenant, &doc.document_id, prepared.chunk.index),
                vector,
                sparse: Some(prepared.sparse),
                payload: ChunkPayload {
                    tenant_id: doc.tenant.as_str().to_string(),
                    document_id: doc.document_id.clone(),
                    version: doc.version,
                    chunk_index: prepared.chunk.index,
                    chunk_count,
                    byte_start: prepared.chunk.byte_range.start,
                    byte_end: prepared.chunk.byte_range.end,
                    text: prepared.chunk.text,
                    content_sha256: sha.clone(),
                    metadata: doc.metadata.clone(),
                    embedder: fingerprint.clone(),
                    ingested_at: ingested_at.clone(),
                    order: Some(order),
                    tombstone: false,
                    context: prepared.context.map(|c| c.text),
                    page: prepared.page,
                },
            })
            .collect();
        // Chunk 0 identifies the stored revision: write it last (stores write in order).
        points.rotate_left(1);
        timed("upsert", self.store.upsert_newer(points, order)).await?;
        Ok(match self.settle(doc, order, chunk_count).await? {
            Some(newer) => Processed::Stale {
                stored: newer.version,
            },
            None => Processed::Stored {
                chunks: chunk_count,
                reused,
            },
        })
    }

    /// The vectors of `doc`'s stored chunks (the first `chunk_count`), by chunk text, when
    /// they were embedded by `fingerprint`. A stored payload that cannot be read back is
    /// logged and ignored (its text is embedded again); an unavailable store fails.
    async fn reusable_vectors(
        &self,
        doc: &Document,
        chunk_count: usize,
        fingerprint: &str,
    ) -> Result<HashMap<String, Vec<f32>>, Failure> {
        match timed(
            "read_vectors",
            self.store
                .chunk_vectors(&doc.tenant, &doc.document_id, chunk_count),
        )
        .await
        {
            Ok(stored) => Ok(stored
                .into_iter()
                .filter(|chunk| chunk.payload.embedder == fingerprint)
                .map(|chunk| {
                    let text =
                        context::embed_text(chunk.payload.context.as_deref(), &chunk.payload.text);
                    (text, chunk.vector)
                })
                .collect()),
            Err(e @ StoreError::Unavailable(_)) => Err(e.into()),
            Err(e) => {
                emit(StoredVectorsUnreadable { error: &e });
                Ok(HashMap::new())
            }
        }
    }

    /// One vector per chunk, in chunk order: `known` vectors for embedded texts (context and
    /// chunk text) found there, the embedder's for the others (each distinct text embedded
    /// once).
    ///
    /// Fails with the embedder's failure, or [`ErrorKind::EmbedderRejected`] /
    /// [`ErrorKind::DimensionMismatch`] if it returns the wrong number or size of vectors.
    async fn embed_new(
        &self,
        doc: &Document,
        chunks: &[PreparedChunk],
        mut known: HashMap<String, Vec<f32>>,
    ) -> Result<ChunkVectors, Failure> {
        let reused = chunks
            .iter()
            .filter(|chunk| known.contains_key(&chunk.embed_text))
            .count();
        let mut texts: Vec<String> = Vec::new();
        let mut distinct = HashSet::new();
        let mut tokens = 0u64;
        for prepared in chunks {
            if !known.contains_key(&prepared.embed_text)
                && distinct.insert(prepared.embed_text.as_str())
            {
                texts.push(prepared.embed_text.clone());
                let context_tokens = prepared.context.as_ref().map_or(0, |c| c.tokens);
                tokens += (prepared.chunk.tokens + context_tokens) as u64;
            }
        }
        let embedded = texts.len();
        if texts.is_empty() {
            emit(ChunksEmbedded {
                tenant: doc.tenant.as_str(),
                provider: "",
                tokens: 0,
                chunks: 0,
                reused,
                elapsed: None,
            });
        } else {
            let started = Instant::now();
            let (vectors, usage) = self.embedder.embed_with_usage(texts.clone()).await?;
            if usage.prompt_tokens > 0 {
                tokens = usage.prompt_tokens;
            }
            emit(ChunksEmbedded {
                tenant: doc.tenant.as_str(),
                provider: &usage.provider,
                tokens,
                chunks: embedded,
                reused,
                elapsed: Some(started.elapsed()),
            });
            self.check_vectors(&vectors, embedded)?;
            known.extend(texts.into_iter().zip(vectors));
        }
        let vectors = chunks
            .iter()
            .map(|prepared| {
                known.get(&prepared.embed_text).cloned().ok_or_else(|| {
                    Failure::new(
                        ErrorKind::EmbedderRejected,
                        Stage::Embed,
                        format!("no vector for chunk {}", prepared.chunk.index),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(ChunkVectors { vectors, reused })
    }

    /// Checks that the embedder returned `expected` vectors of the fingerprint's dimensions.
    fn check_vectors(&self, vectors: &[Vec<f32>], expected: usize) -> Result<(), Failure> {
        let dims = self.embedder.fingerprint().dims;
        if vectors.len() != expected {
            return Err(Failure::new(
                ErrorKind::EmbedderRejected,
                Stage::Embed,
                format!(
                    "embedder returned {} vectors for {expected} chunks",
                    vectors.len()
                ),
            ));
        }
        if let Some(bad) = vectors.iter().find(|v| v.len() != dims) {
            return Err(Failure::new(
                ErrorKind::DimensionMismatch,
                Stage::Embed,
                format!(
                    "embedder returned {} dimensions, expected {dims}",
                    bad.len()
                ),
            ));
        }
        Ok(())
    }

    /// The stored revision (`stored` is its chunk 0) has `doc`'s content and embedder: records
    /// `doc`'s version, metadata and `order` if the version or metadata differ or the revision
    /// has no write order yet (no embedding; only on points older than `order`), then removes
    /// points of older writes (left by a crash or a concurrent older write). Writes nothing
    /// when the stored revision is `doc`'s exactly and complete.
    async fn keep_unchanged(
        &self,
        doc: &Document,
        stored: ChunkPayload,
        order: Order,
        wanted: &(dyn Fn() -> bool + Send + Sync),
    ) -> Result<Processed, Failure> {
        // A revision written before write orders existed is relabelled too: it gets `order`,
        // and the settle below removes whatever is older by order (a count, then a delete of
        // the other revisions, would ignore orders and could remove a newer concurrent write).
        let relabel = stored.version != doc.version
            || stored.metadata != doc.metadata
            || stored.order.is_none();
        let settled = if relabel {
            if !wanted() {
                return Ok(Processed::Abandoned);
            }
            timed(
                "relabel",
                self.store.relabel_document(
                    &doc.tenant,
                    &doc.document_id,
                    &stored.revision(),
                    doc.version,
                    &doc.metadata,
                    order,
                ),
            )
            .await?;
            self.settle(doc, order, stored.chunk_count).await?
        } else {
            self.settle(doc, stored.effective_order(), stored.chunk_count)
                .await?
        };
        Ok(match settled {
            Some(newer) => Processed::Stale {
                stored: newer.version,
            },
            None => Processed::Unchanged,
        })
    }

    /// Brings `doc`'s points in line with the write that leads after a write of `order` with
    /// `chunk_count` chunks (0 for a tombstone): reads chunk 0 to learn which write leads,
    /// then deletes every point older than the leader. Returns `None` when `order` leads (the
    /// delete is skipped when the document holds exactly `chunk_count` chunks, so a write
    /// that did not shrink the document costs one count, not a delete), or the newer order
    /// that leads instead (this write lost: its own leftovers are deleted).
    ///
    /// Deletes only ever remove points older than a write that has stored its chunk 0, so
    /// whatever other writers do meanwhile, no point of the newest write is deleted.
    ///
    /// Fails with [`ErrorKind::StoreUnavailable`] if chunk 0 is older than `order` right
    /// after being written (a conditional write that did not apply; the message is retried),
    /// or with the store's failure.
    async fn settle(
        &self,
        doc: &Document,
        order: Order,
        chunk_count: usize,
    ) -> Result<Option<Order>, Failure> {
        let head = timed(
            "read_head",
            self.store.first_chunk(&doc.tenant, &doc.document_id),
        )
        .await?;
        let Some(head) = head else {
            // Purged meanwhile (`purge_tenant`): nothing left to clean up.
            return Ok(None);
        };
        let leader = head.effective_order();
        if head.order.is_none() || leader < order {
            return Err(Failure::new(
                ErrorKind::StoreUnavailable,
                Stage::Store,
                format!(
                    "chunk 0 of the document holds write order {leader:?}, older than the \
                     write {order:?} that just stored it; retrying"
                ),
            ));
        }
        if leader > order {
            timed(
                "delete",
                self.store
                    .delete_older(&doc.tenant, &doc.document_id, leader),
            )
            .await?;
            return Ok(Some(leader));
        }
        let count = timed(
            "count",
            self.store.count(&doc.tenant, Some(&doc.document_id)),
        )
        .await?;
        if count != chunk_count {
            timed(
                "delete",
                self.store
                    .delete_older(&doc.tenant, &doc.document_id, order),
            )
            .await?;
        }
        Ok(None)
    }

    /// Each chunk's context (from `doc`'s title — or the title found in the content — and,
    /// for Markdown and HTML, the headings above it), the text to embed and its keyword
    /// vector, on the blocking pool (tokenising and stemming take CPU time).
    async fn prepare(
        &self,
        doc: &Document,
        extracted: DocumentChunks,
    ) -> Result<Vec<PreparedChunk>, Failure> {
        let contextualizer = Arc::clone(&self.context);
        let sparse = Arc::clone(&self.sparse);
        let metadata_title = context::title(&doc.metadata).map(str::to_owned);
        tokio::task::spawn_blocking(move || {
            contextualize(&contextualizer, metadata_title, extracted)
                .into_iter()
                .map(|(chunk, page, context, embed_text)| {
                    let sparse = sparse.document(&embed_text);
                    PreparedChunk {
                        chunk,
                        page,
                        context,
                        embed_text,
                        sparse,
                    }
                })
                .collect()
        })
        .await
        .map_err(|e| {
            Failure::new(
                ErrorKind::ChunkFailed,
                Stage::Chunk,
                format!("preparing the chunks failed: {e}"),
            )
        })
    }

    /// Extracts `doc`'s text (HTML, PDF) and chunks it, on the blocking pool
    /// ([`extract::chunk_document`]).
    async fn extract_and_chunk(&self, doc: &Document) -> Result<DocumentChunks, Failure> {
        let chunker = Arc::clone(&self.chunker);
        let limits = self.limits;
        let doc = doc.clone();
        tokio::task::spawn_blocking(move || extract::chunk_document(&chunker, &doc, &limits))
            .await
            .map_err(|e| {
                Failure::new(
                    ErrorKind::ChunkFailed,
                    Stage::Chunk,
                    format!("chunking failed: {e}"),
                )
            })?
    }
}

/// Each chunk of `extracted` with its page, its context (titled `metadata_title`, else the
/// title found in the content) and the text embedded for it ([`context::embed_text`]).
fn contextualize(
    contextualizer: &Contextualizer,
    metadata_title: Option<String>,
    extracted: DocumentChunks,
) -> Vec<(Chunk, Option<u32>, Option<ChunkContext>, String)> {
    let title = metadata_title.or(extracted.title);
    let markdown = extracted.kind.chunk_format() == ChunkFormat::Markdown;
    let contexts = contextualizer.contexts(
        &extracted.text,
        markdown,
        title.as_deref(),
        &extracted.chunks,
    );
    extracted
        .chunks
        .into_iter()
        .zip(extracted.pages)
        .zip(contexts)
        .map(|((chunk, page), context)| {
            let embed_text =
                context::embed_text(context.as_ref().map(|c| c.text.as_str()), &chunk.text);
            (chunk, page, context, embed_text)
        })
        .collect()
}

/// The texts a pipeline of `chunker`, `contextualizer` and `limits` embeds for a new
/// revision of `doc`, in chunk order: each chunk's context and text, as
/// [`Pipeline::process`] sends them to the embedder (which embeds a repeated text once).
/// For benches and tools that must embed exactly the pipeline's work. Blocks while it
/// extracts and chunks.
///
/// # Errors
///
/// As [`extract::chunk_document`]: content that cannot be extracted.
pub fn embed_texts(
    chunker: &Chunker,
    contextualizer: &Contextualizer,
    limits: &ExtractLimits,
    doc: &Document,
) -> Result<Vec<String>, Failure> {
    let extracted = extract::chunk_document(chunker, doc, limits)?;
    let metadata_title = context::title(&doc.metadata).map(str::to_owned);
    Ok(contextualize(contextualizer, metadata_title, extracted)
        .into_iter()
        .map(|(_, _, _, embed_text)| embed_text)
        .collect())
}

/// The order of a write of a message with `version` when the store holds `stored` (the
/// effective order of chunk 0): the message's version, or the stored one for a message
/// without a version; `seq` is now in microseconds, and at least one more than the stored
/// `seq` when the versions are equal, so a later-processed message of the same version
/// always orders after what it read, whatever the clocks of other workers say.
pub fn write_order(version: Option<u64>, stored: Option<Order>) -> Order {
    let version = version.or(stored.map(|s| s.version)).unwrap_or(0);
    let now = chrono::Utc::now().timestamp_micros();
    let mut seq = u64::try_from(now).unwrap_or(0);
    if let Some(stored) = stored
        && stored.version == version
    {
        seq = seq.max(stored.seq.saturating_add(1));
    }
    Order {
        version,
        seq: seq.min(MAX_SEQ),
    }
}

/// Runs the store call `call`, recording its duration as `op` ([`StoreCall`]).
async fn timed<T, E>(op: &'static str, call: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    let started = Instant::now();
    let result = call.await;
    emit(StoreCall {
        op,
        elapsed: started.elapsed(),
        ok: result.is_ok(),
    });
    result
}
