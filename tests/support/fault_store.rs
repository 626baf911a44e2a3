//! A [`VectorStore`] around a real one, for injecting faults: every operation is passed on to
//! the inner store, with a [`Hook`] called before (it may fail the call, wait, or change the
//! points of a write) and after (it may wait, or turn a success into a failure). Each test
//! writes only the hook it needs; the delegation of every method is written here, once.

use std::future::Future;
use std::sync::Arc;

use rag_ingest::store::{
    ChunkPayload, ChunkPoint, Order, Revision, ScoredChunk, SearchRequest, StoreError, StoredChunk,
    VectorStore,
};
use rag_ingest::tenant::TenantId;

/// The store operation a [`Hook`] is called for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Upsert,
    UpsertNewer,
    DeleteOlder,
    FirstChunk,
    ChunkVectors,
    DeleteDocument,
    RelabelDocument,
    PurgeTenant,
    Search,
    Count,
}

/// One call on its way to the inner store.
pub struct Call<'a> {
    /// The operation.
    #[allow(dead_code)]
    pub op: Op,
    /// The document the call is about, where it names one.
    #[allow(dead_code)] // not every hook looks at it
    pub document_id: Option<&'a str>,
    /// The points of a write (`Upsert`, `UpsertNewer`), which the hook may change.
    #[allow(dead_code)] // not every hook looks at them
    pub points: Option<&'a mut Vec<ChunkPoint>>,
}

/// What a [`FaultStore`] does around each operation. Both methods do nothing by default.
pub trait Hook: Send + Sync + 'static {
    /// Called before `call` reaches the inner store; an error is returned in place of the
    /// store's answer (the store is not called).
    fn before(&self, call: Call<'_>) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = call;
        async { Ok(()) }
    }

    /// Called once the inner store answered `op` (`ok`: it succeeded); an error replaces a
    /// successful answer (what the store did stays done). A failed answer is returned as it
    /// is.
    fn after(&self, op: Op, ok: bool) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (op, ok);
        async { Ok(()) }
    }
}

/// A hook shared with the test that switches it.
impl<H: Hook> Hook for Arc<H> {
    fn before(&self, call: Call<'_>) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).before(call)
    }

    fn after(&self, op: Op, ok: bool) -> impl Future<Output = Result<(), StoreError>> + Send {
        (**self).after(op, ok)
    }
}

/// The inner store `S` with `hook` around every operation. Derefs to the hook, so that a
/// test sets and reads its switches and counters through the store.
pub struct FaultStore<S, H> {
    /// The real store.
    pub inner: Arc<S>,
    /// What happens around each operation.
    pub hook: H,
}

impl<S, H> FaultStore<S, H> {
    /// `inner` with `hook` around it.
    pub fn new(inner: Arc<S>, hook: H) -> Self {
        FaultStore { inner, hook }
    }
}

impl<S, H> std::ops::Deref for FaultStore<S, H> {
    type Target = H;

    fn deref(&self) -> &H {
        &self.hook
    }
}

impl<S: VectorStore, H: Hook> FaultStore<S, H> {
    /// The hook's `before` for `op` on `document_id`.
    async fn before(&self, op: Op, document_id: Option<&str>) -> Result<(), StoreError> {
        let call = Call {
            op,
            document_id,
            points: None,
        };
        self.hook.before(call).await
    }

    /// The hook's `before` for a write of `points`.
    async fn before_write(&self, op: Op, points: &mut Vec<ChunkPoint>) -> Result<(), StoreError> {
        let call = Call {
            op,
            document_id: None,
            points: Some(points),
        };
        self.hook.before(call).await
    }

    /// The hook's `after` for `op`, then `answer` (or the hook's error).
    async fn after<T>(&self, op: Op, answer: Result<T, StoreError>) -> Result<T, StoreError> {
        let after = self.hook.after(op, answer.is_ok()).await;
        let value = answer?;
        after.map(|()| value)
    }
}

impl<S: VectorStore, H: Hook> VectorStore for FaultStore<S, H> {
    async fn upsert(&self, mut points: Vec<ChunkPoint>) -> Result<(), StoreError> {
        self.before_write(Op::Upsert, &mut points).await?;
        let answer = self.inner.upsert(points).await;
        self.after(Op::Upsert, answer).await
    }

    async fn upsert_newer(
        &self,
        mut points: Vec<ChunkPoint>,
        order: Order,
    ) -> Result<(), StoreError> {
        self.before_write(Op::UpsertNewer, &mut points).await?;
        let answer = self.inner.upsert_newer(points, order).await;
        self.after(Op::UpsertNewer, answer).await
    }

    async fn delete_older(
        &self,
        tenant: &TenantId,
        document_id: &str,
        order: Order,
    ) -> Result<(), StoreError> {
        self.before(Op::DeleteOlder, Some(document_id)).await?;
        let answer = self.inner.delete_older(tenant, document_id, order).await;
        self.after(Op::DeleteOlder, answer).await
    }

    async fn first_chunk(
        &self,
        tenant: &TenantId,
        document_id: &str,
    ) -> Result<Option<ChunkPayload>, StoreError> {
        self.before(Op::FirstChunk, Some(document_id)).await?;
        let answer = self.inner.first_chunk(tenant, document_id).await;
        self.after(Op::FirstChunk, answer).await
    }

    async fn chunk_vectors(
        &self,
        tenant: &TenantId,
        document_id: &str,
        chunk_count: usize,
    ) -> Result<Vec<StoredChunk>, StoreError> {
        self.before(Op::ChunkVectors, Some(document_id)).await?;
        let answer = (self.inner)
            .chunk_vectors(tenant, document_id, chunk_count)
            .await;
        self.after(Op::ChunkVectors, answer).await
    }

    async fn delete_document(
        &self,
        tenant: &TenantId,
        document_id: &str,
        keep: Option<&Revision>,
    ) -> Result<(), StoreError> {
        self.before(Op::DeleteDocument, Some(document_id)).await?;
        let answer = self.inner.delete_document(tenant, document_id, keep).await;
        self.after(Op::DeleteDocument, answer).await
    }

    async fn relabel_document(
        &self,
        tenant: &TenantId,
        document_id: &str,
        revision: &Revision,
        version: Option<u64>,
        metadata: &serde_json::Map<String, serde_json::Value>,
        order: Order,
    ) -> Result<(), StoreError> {
        self.before(Op::RelabelDocument, Some(document_id)).await?;
        let answer = (self.inner)
            .relabel_document(tenant, document_id, revision, version, metadata, order)
            .await;
        self.after(Op::RelabelDocument, answer).await
    }

    async fn purge_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        self.before(Op::PurgeTenant, None).await?;
        let answer = self.inner.purge_tenant(tenant).await;
        self.after(Op::PurgeTenant, answer).await
    }

    async fn search(&self, request: SearchRequest) -> Result<Vec<ScoredChunk>, StoreError> {
        self.before(Op::Search, None).await?;
        let answer = self.inner.search(request).await;
        self.after(Op::Search, answer).await
    }

    async fn count(
        &self,
        tenant: &TenantId,
        document_id: Option<&str>,
    ) -> Result<usize, StoreError> {
        self.before(Op::Count, document_id).await?;
        let answer = self.inner.count(tenant, document_id).await;
        self.after(Op::Count, answer).await
    }
}
