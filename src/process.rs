//! The processing stage: one validated [`Document`] in, one [`Processed`] outcome (or a
//! [`Failure`]) out. Chunk → embed → store, with the document lifecycle rules:
//! - an upsert older than the stored version is skipped, never written;
//! - an upsert whose content (and embedder) equals what is stored makes no embedding call;
//! - new chunks are written first, then the document's stale chunks (other content hash) are
//!   deleted, so readers never see the document vanish;
//! - a delete removes every chunk of that tenant's document and nothing else.
//!
//! This module knows nothing about AMQP: the queue layer turns outcomes into acks,
//! retries and dead letters.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::chunk::{ChunkFormat, Chunker};
use crate::embed::{EmbedError, Embedder};
use crate::error::{ErrorKind, Stage};
use crate::message::{Document, Op};
use crate::store::{ChunkPayload, ChunkPoint, StoreError, VectorStore, point_id};

/// A processing failure: what kind, at which stage, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} at {stage}: {reason}")]
pub struct Failure {
    /// Taxonomy kind; [`ErrorKind::is_transient`] decides between retry and DLQ.
    pub kind: ErrorKind,
    /// Where it happened.
    pub stage: Stage,
    /// Human-readable cause (never contains secrets).
    pub reason: String,
}

impl Failure {
    /// A failure of `kind` at `stage`.
    pub fn new(kind: ErrorKind, stage: Stage, reason: impl Into<String>) -> Self {
        Failure {
            kind,
            stage,
            reason: reason.into(),
        }
    }
}

impl From<EmbedError> for Failure {
    fn from(e: EmbedError) -> Self {
        Failure::new(e.kind(), Stage::Embed, e.to_string())
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::new(e.kind(), Stage::Store, e.to_string())
    }
}

/// What processing did with a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Processed {
    /// The document's chunks were embedded and written.
    Stored {
        /// Number of chunks written.
        chunks: usize,
    },
    /// The stored revision has the same content and embedder: nothing was embedded or written.
    Unchanged,
    /// The stored version is newer than the message's: nothing was written.
    Stale {
        /// The version in the store.
        stored: u64,
    },
    /// The document's chunks were deleted.
    Deleted,
}

impl Processed {
    /// A short label for logs and reports.
    pub fn label(&self) -> &'static str {
        match self {
            Processed::Stored { .. } => "stored",
            Processed::Unchanged => "unchanged",
            Processed::Stale { .. } => "stale",
            Processed::Deleted => "deleted",
        }
    }
}

/// Chunks, embeds and stores documents with one embedder and one store.
pub struct Pipeline<E, S> {
    chunker: Arc<Chunker>,
    embedder: Arc<E>,
    store: Arc<S>,
}

impl<E, S> Clone for Pipeline<E, S> {
    fn clone(&self) -> Self {
        Pipeline {
            chunker: Arc::clone(&self.chunker),
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
    /// A pipeline over the given stages.
    pub fn new(chunker: Arc<Chunker>, embedder: Arc<E>, store: Arc<S>) -> Self {
        Pipeline {
            chunker,
            embedder,
            store,
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
    /// Fails with a [`Failure`] from the chunk, embed or store stage; transient kinds may
    /// be retried with the same document (every write is idempotent).
    pub async fn process(&self, doc: &Document) -> Result<Processed, Failure> {
        let stored = self
            .store
            .first_chunk(&doc.tenant, &doc.document_id)
            .await?;
        if let (Some(stored_version), Some(version)) =
            (stored.as_ref().and_then(|p| p.version), doc.version)
            && version < stored_version
        {
            return Ok(Processed::Stale {
                stored: stored_version,
            });
        }
        match doc.op {
            Op::Delete => {
                self.store
                    .delete_document(&doc.tenant, &doc.document_id, None)
                    .await?;
                Ok(Processed::Deleted)
            }
            Op::Upsert => self.upsert(doc, stored).await,
        }
    }

    async fn upsert(
        &self,
        doc: &Document,
        stored: Option<ChunkPayload>,
    ) -> Result<Processed, Failure> {
        let sha = content_sha256(&doc.content);
        let fingerprint = self.embedder.fingerprint().id();
        if let Some(stored) = stored
            && stored.content_sha256 == sha
            && stored.embedder == fingerprint
            && stored.version == doc.version
            && stored.metadata == doc.metadata
        {
            // A redelivery after a crash between "upsert" and "delete stale" lands here:
            // finish that cleanup (idempotent, usually deletes nothing).
            self.store
                .delete_document(&doc.tenant, &doc.document_id, Some(&sha))
                .await?;
            return Ok(Processed::Unchanged);
        }

        let format = doc.format().ok_or_else(|| {
            Failure::new(
                ErrorKind::UnsupportedContentType,
                Stage::Chunk,
                format!("content type {:?} is not supported", doc.content_type),
            )
        })?;
        let chunks = self.chunk(doc.content.clone(), format).await?;
        if chunks.is_empty() {
            return Err(Failure::new(
                ErrorKind::EmptyContent,
                Stage::Chunk,
                "the content produced no chunks",
            ));
        }
        let texts: Vec<String> = chunks.iter().map(|c| c.text.clone()).collect();
        let vectors = self.embedder.embed(texts).await?;
        let dims = self.embedder.fingerprint().dims;
        if vectors.len() != chunks.len() {
            return Err(Failure::new(
                ErrorKind::EmbedderRejected,
                Stage::Embed,
                format!(
                    "embedder returned {} vectors for {} chunks",
                    vectors.len(),
                    chunks.len()
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

        let chunk_count = chunks.len();
        let ingested_at = chrono::Utc::now().to_rfc3339();
        let points = chunks
            .into_iter()
            .zip(vectors)
            .map(|(chunk, vector)| ChunkPoint {
                id: point_id(&doc.tenant, &doc.document_id, chunk.index),
                vector,
                payload: ChunkPayload {
                    tenant_id: doc.tenant.as_str().to_string(),
                    document_id: doc.document_id.clone(),
                    version: doc.version,
                    chunk_index: chunk.index,
                    chunk_count,
                    text: chunk.text,
                    byte_start: chunk.byte_range.start,
                    byte_end: chunk.byte_range.end,
                    content_sha256: sha.clone(),
                    metadata: doc.metadata.clone(),
                    embedder: fingerprint.clone(),
                    ingested_at: ingested_at.clone(),
                },
            })
            .collect();
        self.store.upsert(points).await?;
        self.store
            .delete_document(&doc.tenant, &doc.document_id, Some(&sha))
            .await?;
        Ok(Processed::Stored {
            chunks: chunk_count,
        })
    }

    async fn chunk(
        &self,
        content: String,
        format: ChunkFormat,
    ) -> Result<Vec<crate::chunk::Chunk>, Failure> {
        let chunker = Arc::clone(&self.chunker);
        tokio::task::spawn_blocking(move || chunker.split(&content, format))
            .await
            .map_err(|e| {
                Failure::new(
                    ErrorKind::ChunkFailed,
                    Stage::Chunk,
                    format!("chunking failed: {e}"),
                )
            })
    }
}
