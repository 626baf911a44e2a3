//! "Lose nothing", against the real RabbitMQ, the real model and Qdrant Edge: every message
//! submitted ends either stored exactly once or in the DLQ with its reason and its original
//! body — through bad input, transient and permanent store failures, unconfirmed publishes,
//! DLQ inspection and reprocessing.
//!
//! The soak test (`cargo test --test lose_nothing -- --ignored soak`) pushes 2,000 documents
//! through worker kills, in-process restarts, connection drops and injected store and
//! embedder errors, and prints one `submitted=… stored=… dead_lettered=… lost=0
//! duplicated=0` line.

mod common;
#[path = "support/fault_store.rs"]
mod fault_store;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use common::{
    TestPipeline, TestStore, embedder, eventually, expected_chunks, queue_len, rabbitmqctl,
    short_docs,
};
use fault_store::{Call, FaultStore, Hook, Op};
use rag_ingest::embed::{CandleEmbedder, EmbedError, Embedder, Fingerprint};
use rag_ingest::message::Document;
use rag_ingest::process::Pipeline;
use rag_ingest::queue::{
    DlqFilter, RunOptions, Submitter, Topology, Worker, WorkerError, WorkerReport, inspect_dlq,
    reprocess,
};
use rag_ingest::setup;
use rag_ingest::store::{EdgeStore, Store, StoreError, VectorStore};
use rag_ingest::tenant::TenantId;

/// Small retry delays so that every tier is exercised within a second.
const FAST: &str = "[retry]\nmax_attempts = 3\nin_process_retries = 1\nbackoff_min_ms = 5\nbackoff_max_ms = 10\ndelays_ms = [200, 400]\n[worker]\nshutdown_grace_secs = 10\nreconnect_give_up_secs = 30\n";

// ---------------------------------------------------------------------------------------
// Fault injection around the real components.
// ---------------------------------------------------------------------------------------

/// xorshift64*: deterministic for a seed, good enough to pick faults.
struct Rng(AtomicU64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(AtomicU64::new(seed.max(1)))
    }

    fn next(&self) -> u64 {
        let mut x = self.0.load(Ordering::Relaxed);
        loop {
            let mut y = x;
            y ^= y >> 12;
            y ^= y << 25;
            y ^= y >> 27;
            match self
                .0
                .compare_exchange_weak(x, y, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return y.wrapping_mul(0x2545_F491_4F6C_DD1D),
                Err(now) => x = now,
            }
        }
    }

    /// Uniform in `0..n`.
    fn below(&self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// True with probability `permille`/1000.
    fn chance(&self, permille: u32) -> bool {
        permille > 0 && self.below(1000) < u64::from(permille)
    }
}

/// Switchable faults around the real store (see [`FaultyStore`]).
struct Faults {
    /// This many upserts fail with `Unavailable`, then they work again.
    fail_next_upserts: AtomicU32,
    /// While set, every upsert fails with `Unavailable` (an outage).
    outage: AtomicBool,
    /// While set, every read of the stored revision fails with `Rejected` (permanent).
    reject: AtomicBool,
    /// Every call fails with `Unavailable` with this probability, in per mille.
    random_permille: AtomicU32,
    rng: Rng,
    /// Upsert calls, failed or not.
    upsert_calls: AtomicU32,
    /// Upserts that reached the real store.
    upserts_done: AtomicU64,
    /// Reads of the stored revision (one per processing attempt).
    reads: AtomicU32,
    /// Every upsert that reaches the real store first waits this long (a slow store).
    hold_upserts_ms: AtomicU64,
    /// Upserts under way (holding or writing) now, and the most ever at once.
    active_upserts: AtomicU32,
    max_active_upserts: AtomicU32,
    /// While set, the next read of the stored revision, once answered, is held (the switch
    /// is reset when used): `read_held` is set until the test sets `release_read`.
    hold_next_read: AtomicBool,
    read_held: AtomicBool,
    release_read: AtomicBool,
}

/// The real store (Edge or server) with switchable [`Faults`].
type FaultyStore = FaultStore<Store, Faults>;

/// `inner` with every fault switched off.
fn faulty_store(inner: impl Into<Store>) -> FaultyStore {
    let faults = Faults {
        fail_next_upserts: AtomicU32::new(0),
        outage: AtomicBool::new(false),
        reject: AtomicBool::new(false),
        random_permille: AtomicU32::new(0),
        rng: Rng::new(0x5eed),
        upsert_calls: AtomicU32::new(0),
        upserts_done: AtomicU64::new(0),
        reads: AtomicU32::new(0),
        hold_upserts_ms: AtomicU64::new(0),
        active_upserts: AtomicU32::new(0),
        max_active_upserts: AtomicU32::new(0),
        hold_next_read: AtomicBool::new(false),
        read_held: AtomicBool::new(false),
        release_read: AtomicBool::new(false),
    };
    FaultStore::new(Arc::new(inner.into()), faults)
}

impl Faults {
    fn random_fault(&self, op: &str) -> Result<(), StoreError> {
        if self
            .rng
            .chance(self.random_permille.load(Ordering::Relaxed))
        {
            return Err(StoreError::unavailable(format!(
                "injected random {op} fault"
            )));
        }
        Ok(())
    }

    /// The upsert faults; once they pass, the write is counted as under way (and held).
    async fn before_upsert(&self) -> Result<(), StoreError> {
        self.upsert_calls.fetch_add(1, Ordering::SeqCst);
        if self.outage.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        if self
            .fail_next_upserts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(StoreError::Unavailable("injected transient fault".into()));
        }
        self.random_fault("upsert")?;
        let active = self.active_upserts.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active_upserts.fetch_max(active, Ordering::SeqCst);
        let hold = self.hold_upserts_ms.load(Ordering::SeqCst);
        if hold > 0 {
            tokio::time::sleep(Duration::from_millis(hold)).await;
        }
        Ok(())
    }
}

impl Hook for Faults {
    async fn before(&self, call: Call<'_>) -> Result<(), StoreError> {
        match call.op {
            Op::Upsert | Op::UpsertNewer => self.before_upsert().await,
            Op::FirstChunk => {
                self.reads.fetch_add(1, Ordering::SeqCst);
                let document_id = call.document_id.unwrap_or_default();
                assert!(
                    !document_id.starts_with("poison"),
                    "injected panic: processing {document_id} crashes the message task"
                );
                if self.reject.load(Ordering::SeqCst) {
                    return Err(StoreError::Rejected("injected permanent rejection".into()));
                }
                self.random_fault("read")
            }
            Op::ChunkVectors => self.random_fault("read"),
            Op::DeleteOlder | Op::DeleteDocument => self.random_fault("delete"),
            Op::RelabelDocument => self.random_fault("relabel"),
            Op::PurgeTenant | Op::Search | Op::Count => Ok(()),
        }
    }

    async fn after(&self, op: Op, ok: bool) -> Result<(), StoreError> {
        if op == Op::FirstChunk && self.hold_next_read.swap(false, Ordering::SeqCst) {
            self.read_held.store(true, Ordering::SeqCst);
            eventually(
                Duration::from_secs(120),
                "the test releases the read",
                || async { self.release_read.load(Ordering::SeqCst) },
            )
            .await;
            self.read_held.store(false, Ordering::SeqCst);
        }
        if matches!(op, Op::Upsert | Op::UpsertNewer) {
            self.active_upserts.fetch_sub(1, Ordering::SeqCst);
            if ok {
                self.upserts_done.fetch_add(1, Ordering::SeqCst);
            }
        }
        Ok(())
    }
}

/// The real model, failing transiently at random when asked to.
struct FaultyEmbedder {
    inner: Arc<CandleEmbedder>,
    random_permille: AtomicU32,
    rng: Rng,
}

impl Embedder for FaultyEmbedder {
    fn fingerprint(&self) -> &Fingerprint {
        self.inner.fingerprint()
    }

    fn max_input_tokens(&self) -> usize {
        self.inner.max_input_tokens()
    }

    fn embed(
        &self,
        texts: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Vec<f32>>, EmbedError>> + Send {
        let fail = self
            .rng
            .chance(self.random_permille.load(Ordering::Relaxed));
        let real = self.inner.embed(texts);
        async move {
            if fail {
                return Err(EmbedError::Inference("injected embedder fault".into()));
            }
            real.await
        }
    }
}

/// A pipeline over the real model and chunker and a [`FaultyStore`] around this test's store.
async fn faulty_pipeline(
    t: &TestPipeline,
) -> (Pipeline<CandleEmbedder, FaultyStore>, Arc<FaultyStore>) {
    let embedder = embedder();
    let chunker = setup::chunker(&t.config, &embedder).expect("chunker");
    let store = setup::open_vector_store(&t.config, embedder.fingerprint())
        .await
        .expect("store opens");
    let store = Arc::new(faulty_store(store));
    (
        Pipeline::new(Arc::new(chunker), embedder, Arc::clone(&store)),
        store,
    )
}

/// Runs a worker until the queues are drained (fails the test after a minute).
async fn run_until_idle<E: Embedder, S: VectorStore>(
    t: &TestPipeline,
    pipeline: &Pipeline<E, S>,
) -> WorkerReport {
    let (timeout, grace) = (Duration::from_secs(60), Duration::from_millis(300));
    common::drain(&t.config, pipeline.clone(), timeout, grace).await
}

/// Stops a worker of [`spawn_worker`] and returns its report (fails the test after a minute).
async fn stop_worker(
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<WorkerReport, WorkerError>>,
) -> WorkerReport {
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(60), handle)
        .await
        .expect("the worker stops")
        .expect("the worker task")
        .expect("the worker's report")
}

/// A worker running in the background until the returned sender fires (or is dropped).
fn spawn_worker<E: Embedder, S: VectorStore>(
    t: &TestPipeline,
    pipeline: &Pipeline<E, S>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<WorkerReport, WorkerError>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = Worker::new(t.config.clone(), pipeline.clone());
    let handle = tokio::spawn(async move {
        worker
            .run(RunOptions::default(), async {
                let _ = stopped.await;
            })
            .await
    });
    (stop, handle)
}

/// Asserts that every one of `docs` is stored once: points == its chunk count.
async fn assert_stored_once<S: VectorStore>(t: &TestPipeline, store: &S, docs: &[Document]) {
    for doc in docs {
        let points = store
            .count(&doc.tenant, Some(&doc.document_id))
            .await
            .expect("count");
        assert_eq!(
            points,
            expected_chunks(&t.config, doc),
            "{}/{}: points == chunks",
            doc.tenant,
            doc.document_id
        );
    }
}

/// Bodies of the DLQ in queue order, read with `inspect_dlq` (which must not remove them).
async fn dlq_bodies(t: &TestPipeline) -> Vec<String> {
    let (summary, entries) = inspect_dlq(&t.config, &DlqFilter::default())
        .await
        .expect("inspect the DLQ");
    assert_eq!(summary.total, entries.len());
    entries
        .into_iter()
        .map(|e| String::from_utf8_lossy(&e.body).into_owned())
        .collect()
}

fn tenant(name: &str) -> TenantId {
    TenantId::new(name).expect("tenant")
}

fn rfc3339(s: Option<&str>, what: &str) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_rfc3339(s.unwrap_or_else(|| panic!("{what} missing")))
        .unwrap_or_else(|e| panic!("{what} {s:?} is not RFC 3339: {e}"))
}

// ---------------------------------------------------------------------------------------
// Tests.
// ---------------------------------------------------------------------------------------

/// Good documents mixed with every bad kind: each good one stored once, each bad one in the
/// DLQ with all six failure headers, its original body byte for byte and its properties;
/// nothing left in the main or retry queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lose_nothing_bad_batch_every_bad_message_in_dlq_byte_for_byte() {
    let t = TestPipeline::new("ln-bad", FAST);
    let (pipeline, store) = faulty_pipeline(&t).await;
    let topology = Topology::new(&t.config);
    let mut good = short_docs("acme", "good", 6);
    good.extend(short_docs("globex", "good", 4));

    let bad: BTreeMap<String, Vec<u8>> = common::message_fixtures("bad");
    assert!(bad.len() >= 15, "fixtures present: {}", bad.len());

    // Interleave good and bad messages.
    let submitter = Submitter::connect(&t.config)
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672");
    let mut good_iter = good.iter();
    for (name, body) in &bad {
        if let Some(doc) = good_iter.next() {
            submitter.submit(doc).await.expect("good doc confirmed");
        }
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(
            "x-test-case".into(),
            lapin::types::AMQPValue::LongString(name.as_str().into()),
        );
        let props = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("bad-{name}").into())
            .with_correlation_id(format!("req-{name}").into())
            .with_headers(headers);
        submitter
            .submit_raw(body, props)
            .await
            .expect("bad message confirmed");
    }
    for doc in good_iter {
        submitter.submit(doc).await.expect("good doc confirmed");
    }
    submitter.close().await;

    let report = run_until_idle(&t, &pipeline).await;
    assert_eq!(report.stored as usize, good.len(), "{report:?}");
    assert_eq!(report.dead_lettered as usize, bad.len(), "{report:?}");
    assert_eq!(report.retried, 0, "{report:?}");
    assert_eq!(
        common::pending(&t.config).await,
        0,
        "main and retry queues empty"
    );
    assert_stored_once(&t, &*store, &good).await;
    let total: usize = good.iter().map(|d| expected_chunks(&t.config, d)).sum();
    let stored_total = store.count(&tenant("acme"), None).await.expect("count")
        + store.count(&tenant("globex"), None).await.expect("count");
    assert_eq!(stored_total, total, "no stray points");

    // Inspection: every header, kind named by the fixture.
    let (summary, entries) = inspect_dlq(&t.config, &DlqFilter::default())
        .await
        .expect("inspect");
    assert_eq!(summary.total, bad.len());
    let mut seen = BTreeMap::new();
    for e in &entries {
        let case = e.headers.get("x-test-case").expect("custom header kept");
        let body = &bad[case];
        assert_eq!(&e.body, body, "{case}: body byte for byte");
        let kind = case.split("--").next().expect("kind");
        assert_eq!(e.kind, kind, "{case}");
        assert_eq!(
            e.headers.get("x-error-kind").map(String::as_str),
            Some(kind)
        );
        assert!(
            e.error.as_deref().is_some_and(|r| !r.trim().is_empty()),
            "{case}: x-error"
        );
        assert_eq!(e.stage.as_deref(), Some("decode"), "{case}");
        assert_eq!(e.attempts, Some(1), "{case}");
        let first = rfc3339(e.first_failed_at.as_deref(), "x-first-failed-at");
        let last = rfc3339(e.last_failed_at.as_deref(), "x-last-failed-at");
        assert_eq!(first, last, "{case}: one failure");
        *seen.entry(case.clone()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), bad.len(), "each bad message exactly once");
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    assert_eq!(queue_len(&topology.dlq()).await as usize, bad.len());

    // The raw messages: properties kept too.
    let raw = common::take_all(&topology.dlq()).await;
    assert_eq!(raw.len(), bad.len());
    for (props, body) in &raw {
        let case = common::header(props, "x-test-case").expect("custom header");
        assert_eq!(body, &bad[&case]);
        assert_eq!(
            props.message_id().as_ref().map(|m| m.as_str().to_owned()),
            Some(format!("bad-{case}"))
        );
        assert_eq!(
            props
                .correlation_id()
                .as_ref()
                .map(|m| m.as_str().to_owned()),
            Some(format!("req-{case}"))
        );
        assert_eq!(*props.delivery_mode(), Some(2), "persistent");
        for h in [
            "x-error-kind",
            "x-error",
            "x-error-stage",
            "x-attempts",
            "x-first-failed-at",
            "x-last-failed-at",
        ] {
            assert!(common::header(props, h).is_some(), "{case}: {h}");
        }
    }
    t.delete_queues().await;
}

on_both_stores!(
    /// Transient store failures: one is absorbed by the in-process retry; three take a
    /// delayed-retry round trip. Both documents end stored once.
    lose_nothing_transient_store_failures_are_retried_then_stored
);
async fn lose_nothing_transient_store_failures_are_retried_then_stored(kind: TestStore) {
    let t = TestPipeline::on(kind, "ln-transient", FAST);
    let (pipeline, store) = faulty_pipeline(&t).await;
    let docs = short_docs("acme", "flaky", 2);

    // 1 failure: the in-process retry absorbs it.
    store.fail_next_upserts.store(1, Ordering::SeqCst);
    common::submit(&t.config, &docs[..1]).await;
    let report = run_until_idle(&t, &pipeline).await;
    assert_eq!((report.stored, report.retried), (1, 0), "{report:?}");
    assert_eq!(store.upsert_calls.load(Ordering::SeqCst), 2);

    // 3 failures: attempt 1 fails twice (in process), goes to the 200 ms tier, attempt 2
    // fails once and then succeeds.
    store.upsert_calls.store(0, Ordering::SeqCst);
    store.fail_next_upserts.store(3, Ordering::SeqCst);
    common::submit(&t.config, &docs[1..]).await;
    let report = run_until_idle(&t, &pipeline).await;
    assert_eq!(
        (report.stored, report.retried, report.dead_lettered),
        (1, 1, 0),
        "{report:?}"
    );
    assert_eq!(store.upsert_calls.load(Ordering::SeqCst), 4);

    assert_stored_once(&t, &*store, &docs).await;
    let topology = Topology::new(&t.config);
    assert_eq!(common::pending(&t.config).await, 0);
    assert_eq!(queue_len(&topology.dlq()).await, 0);
    t.delete_queues().await;
}

/// `worker.max_inflight_bytes` bounds the message bytes processed at once. Over a slow store
/// (each write held 300 ms) and with `worker.concurrency = 8`: at the default budget the
/// writes of several documents overlap (the control: the store sees concurrency); with a
/// budget of 1 byte, below any one document, documents are taken one at a time, so no two
/// writes ever overlap — and every document is still stored, none retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lose_nothing_inflight_byte_budget_bounds_the_documents_processed_at_once() {
    for (budget, overlap) in [("", true), ("max_inflight_bytes = 1", false)] {
        let config = format!(
            "[worker]\nconcurrency = 8\n{budget}\nshutdown_grace_secs = 10\nreconnect_give_up_secs = 30\n"
        );
        let t = TestPipeline::new("ln-budget", &config);
        let (pipeline, store) = faulty_pipeline(&t).await;
        store.hold_upserts_ms.store(300, Ordering::SeqCst);
        let docs = short_docs("acme", "budget", 6);
        common::submit(&t.config, &docs).await;
        let report = run_until_idle(&t, &pipeline).await;
        assert_eq!(
            (report.stored, report.retried, report.dead_lettered),
            (6, 0, 0),
            "{budget:?}: {report:?}"
        );
        let most = store.max_active_upserts.load(Ordering::SeqCst);
        if overlap {
            assert!(
                most >= 2,
                "default budget: writes overlap, at most {most} at once"
            );
        } else {
            assert_eq!(most, 1, "budget below one document: one write at a time");
        }
        assert_stored_once(&t, &*store, &docs).await;
        t.delete_queues().await;
    }
}

/// A broker connection lost while a message is being written: the write runs to its end
/// (the message is redelivered and stored again, idempotently) instead of being abandoned
/// midway. An abandoned write is a request that may still land after the redelivered copy
/// has settled the document, leaving an older revision's chunks behind (found by the
/// chaos soak). Failed on the old code: the session aborted its tasks, so the held upsert
/// never ended (`active_upserts` stayed 1, "the held write ended" timed out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lose_nothing_a_lost_connection_lets_running_writes_finish() {
    let t = TestPipeline::new("ln-lost-write", FAST);
    let (pipeline, store) = faulty_pipeline(&t).await;
    store.hold_upserts_ms.store(2_000, Ordering::SeqCst);
    let docs = short_docs("acme", "lost-write", 1);
    common::submit(&t.config, &docs).await;
    let (stop, handle) = spawn_worker(&t, &pipeline);
    eventually(Duration::from_secs(60), "a write under way", || async {
        store.active_upserts.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(
        common::close_worker_connections(&t.config.name) > 0,
        "the worker's connection was closed"
    );
    // The held write ends (the redelivered copy then finds the document stored).
    eventually(Duration::from_secs(60), "the held write ended", || async {
        store.upserts_done.load(Ordering::SeqCst) >= 1
            && store.active_upserts.load(Ordering::SeqCst) == 0
    })
    .await;
    eventually(
        Duration::from_secs(60),
        "the worker reconnected",
        || async { common::worker_connections(&t.config.name).len() == 1 },
    )
    .await;
    eventually(Duration::from_secs(30), "the queues drained", || async {
        common::pending(&t.config).await == 0
    })
    .await;
    let report = stop_worker(stop, handle).await;
    assert_eq!(
        store.active_upserts.load(Ordering::SeqCst),
        0,
        "a write was abandoned midway: {report:?}"
    );
    assert!(report.reconnects >= 1, "{report:?}");
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert_stored_once(&t, &*store, &docs).await;
    t.delete_queues().await;
}

/// A broker connection lost while a message is processed, before it writes: the message
/// writes nothing (outcome `abandoned`). Here worker 1 holds message A (no version) when its
/// connection is closed; worker 2 gets the redelivered A and stores it, then B (no version,
/// submitted later) is stored. Had worker 1 gone on to write A, its write — ordered by its
/// later processing time — would have replaced B. Failed on the old code: worker 1 wrote A
/// after its connection was gone (`upsert_calls` 1) and A's content was left in place of B's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lose_nothing_a_message_whose_connection_is_lost_before_its_write_writes_nothing() {
    let t = TestPipeline::new("ln-lost-before-write", FAST);
    let (pipeline, store) = faulty_pipeline(&t).await;
    let tenant = TenantId::new("acme").expect("tenant");
    let a = Document::upsert(
        tenant.clone(),
        "lost-before-write",
        (0..12)
            .map(|i| {
                format!("Sentence {i} of the first text tells about harbour {i} and its lanterns.")
            })
            .collect::<Vec<_>>()
            .join(" "),
    );
    let b = Document::upsert(tenant, "lost-before-write", "The second text is short.");
    assert!(expected_chunks(&t.config, &a) > expected_chunks(&t.config, &b));
    let model = embedder();
    let healthy = Pipeline::new(
        Arc::new(setup::chunker(&t.config, &model).expect("chunker")),
        model,
        Arc::clone(&store.inner),
    );

    store.hold_next_read.store(true, Ordering::SeqCst);
    common::submit(&t.config, std::slice::from_ref(&a)).await;
    let (stop_1, worker_1) = spawn_worker(&t, &pipeline);
    eventually(Duration::from_secs(60), "A's read is held", || async {
        store.read_held.load(Ordering::SeqCst)
    })
    .await;
    assert!(
        common::close_worker_connections(&t.config.name) > 0,
        "worker 1's connection was closed"
    );
    // Worker 1 waits for its running message before it reconnects; worker 2 gets A.
    let (stop_2, worker_2) = spawn_worker(&t, &healthy);
    let sha = |doc: &Document| rag_ingest::process::content_sha256(&doc.content);
    eventually(Duration::from_secs(60), "worker 2 stored A", || async {
        store
            .inner
            .first_chunk(&a.tenant, &a.document_id)
            .await
            .ok()
            .flatten()
            .is_some_and(|head| head.content_sha256 == sha(&a))
    })
    .await;
    let stored = healthy.process(&b).await.expect("B is stored");
    assert!(
        matches!(stored, rag_ingest::process::Processed::Stored { .. }),
        "{stored:?}"
    );
    store.release_read.store(true, Ordering::SeqCst);
    eventually(
        Duration::from_secs(60),
        "worker 1's message ended",
        || async { !store.read_held.load(Ordering::SeqCst) },
    )
    .await;
    eventually(Duration::from_secs(60), "worker 1 reconnected", || async {
        common::worker_connections(&t.config.name).len() == 2
    })
    .await;
    eventually(Duration::from_secs(30), "the queues drained", || async {
        common::pending(&t.config).await == 0
    })
    .await;
    let reports = [
        stop_worker(stop_1, worker_1).await,
        stop_worker(stop_2, worker_2).await,
    ];
    assert_eq!(
        store.upsert_calls.load(Ordering::SeqCst),
        0,
        "worker 1 wrote A after its connection was lost: {reports:?}"
    );
    assert_eq!(
        reports.iter().map(|r| r.dead_lettered).sum::<u64>(),
        0,
        "{reports:?}"
    );
    let head = store
        .inner
        .first_chunk(&b.tenant, &b.document_id)
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(head.content_sha256, sha(&b), "B, the newest, is stored");
    assert_stored_once(&t, &*store, std::slice::from_ref(&b)).await;
    t.delete_queues().await;
}

on_both_stores!(
    /// A store outage outlasting every attempt: the message is dead-lettered after exactly
    /// `max_attempts` (kind store_unavailable, stage store, x-attempts = 3, first failure before
    /// the last, body intact). Once the store is back, `reprocess` + a worker run store it and
    /// the DLQ is empty.
    lose_nothing_store_outage_dead_letters_then_reprocess_stores
);
async fn lose_nothing_store_outage_dead_letters_then_reprocess_stores(kind: TestStore) {
    let t = TestPipeline::on(kind, "ln-outage", FAST);
    let (pipeline, store) = faulty_pipeline(&t).await;
    let topology = Topology::new(&t.config);
    let docs = short_docs("globex", "outage", 1);

    store.outage.store(true, Ordering::SeqCst);
    common::submit(&t.config, &docs).await;
    let report = run_until_idle(&t, &pipeline).await;
    assert_eq!(
        (report.stored, report.retried, report.dead_lettered),
        (0, 2, 1),
        "{report:?}"
    );
    // 3 attempts × (1 try + 1 in-process retry).
    assert_eq!(store.upsert_calls.load(Ordering::SeqCst), 6);
    assert_eq!(common::pending(&t.config).await, 0);

    let (_, entries) = inspect_dlq(&t.config, &DlqFilter::default())
        .await
        .expect("inspect");
    assert_eq!(entries.len(), 1);
    let e = &entries[0];
    assert_eq!(e.kind, "store_unavailable");
    assert_eq!(e.stage.as_deref(), Some("store"));
    assert_eq!(e.attempts, Some(u64::from(t.config.retry.max_attempts)));
    assert!(
        e.error
            .as_deref()
            .is_some_and(|r| r.contains("injected outage")),
        "{e:?}"
    );
    assert_eq!(e.tenant.as_deref(), Some("globex"));
    assert_eq!(e.body, docs[0].to_wire(), "body byte for byte");
    let first = rfc3339(e.first_failed_at.as_deref(), "x-first-failed-at");
    let last = rfc3339(e.last_failed_at.as_deref(), "x-last-failed-at");
    assert!(
        last - first >= chrono::Duration::milliseconds(500),
        "failures spread over the 200 + 400 ms tiers: {first} .. {last}"
    );

    // The store is back: replay and drain.
    store.outage.store(false, Ordering::SeqCst);
    let moved = reprocess(&t.config, &DlqFilter::default(), false, |_| {})
        .await
        .expect("reprocess");
    assert_eq!((moved.moved.total, moved.kept), (1, 0));
    assert_eq!(queue_len(&topology.dlq()).await, 0);
    let report = run_until_idle(&t, &pipeline).await;
    assert_eq!((report.stored, report.dead_lettered), (1, 0), "{report:?}");
    assert_stored_once(&t, &*store, &docs).await;
    assert_eq!(queue_len(&topology.dlq()).await, 0);
    assert_eq!(common::pending(&t.config).await, 0);
    t.delete_queues().await;
}

/// `reprocess` with a tenant filter and `dry_run` changes nothing; without `dry_run` it
/// moves exactly that tenant's messages, leaves the others in their order, and counts
/// before and after add up at every step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lose_nothing_reprocess_filters_and_dry_run_move_only_what_they_say() {
    let t = TestPipeline::new("ln-replay", FAST);
    let (pipeline, store) = faulty_pipeline(&t).await;
    let topology = Topology::new(&t.config);
    let acme = short_docs("acme", "a", 4);
    let globex = short_docs("globex", "b", 3);
    let all: Vec<Document> = acme.iter().chain(&globex).cloned().collect();

    store.reject.store(true, Ordering::SeqCst);
    common::submit(&t.config, &all).await;
    let report = run_until_idle(&t, &pipeline).await;
    assert_eq!(report.dead_lettered, 7, "{report:?}");
    let before = dlq_bodies(&t).await;
    assert_eq!(before.len(), 7);
    let is_acme = |b: &String| acme.iter().any(|d| d.to_wire() == b.as_bytes());

    // Dry run: nothing moves, nothing is reordered.
    let only_acme = DlqFilter {
        tenant: Some("acme".into()),
        ..DlqFilter::default()
    };
    let dry = reprocess(&t.config, &only_acme, true, |_| {})
        .await
        .expect("dry run");
    assert_eq!((dry.moved.total, dry.kept), (4, 3));
    assert_eq!(dry.moved.by_tenant.get("acme"), Some(&4));
    assert_eq!(queue_len(&topology.dlq()).await, 7);
    assert_eq!(queue_len(&topology.main_queue()).await, 0);
    assert_eq!(dlq_bodies(&t).await, before, "dry run reorders nothing");

    // Tenant acme only.
    let moved = reprocess(&t.config, &only_acme, false, |_| {})
        .await
        .expect("reprocess acme");
    assert_eq!((moved.moved.total, moved.kept), (4, 3));
    assert_eq!(queue_len(&topology.dlq()).await, 3);
    assert_eq!(queue_len(&topology.main_queue()).await, 4);
    let kept: Vec<String> = before.iter().filter(|b| !is_acme(b)).cloned().collect();
    assert_eq!(dlq_bodies(&t).await, kept, "globex's stay, in order");

    store.reject.store(false, Ordering::SeqCst);
    let report = run_until_idle(&t, &pipeline).await;
    assert_eq!((report.stored, report.dead_lettered), (4, 0), "{report:?}");
    assert_stored_once(&t, &*store, &acme).await;
    assert_eq!(
        store.count(&tenant("globex"), None).await.expect("count"),
        0
    );
    assert_eq!(
        queue_len(&topology.dlq()).await,
        3,
        "4 stored + 3 kept == 7"
    );

    // Kind filter with a limit, then the rest by document.
    let two = reprocess(
        &t.config,
        &DlqFilter {
            kind: Some("store_rejected".into()),
            limit: Some(2),
            ..DlqFilter::default()
        },
        false,
        |_| {},
    )
    .await
    .expect("reprocess 2");
    assert_eq!((two.moved.total, two.kept), (2, 1));
    assert_eq!(queue_len(&topology.dlq()).await, 1);
    let none = reprocess(
        &t.config,
        &DlqFilter {
            kind: Some("invalid_json".into()),
            ..DlqFilter::default()
        },
        false,
        |_| {},
    )
    .await
    .expect("reprocess nothing");
    assert_eq!((none.moved.total, none.kept), (0, 1));
    let (_, left) = inspect_dlq(&t.config, &DlqFilter::default())
        .await
        .expect("inspect");
    let left_id = left[0].document_id.clone().expect("document id");
    let last = reprocess(
        &t.config,
        &DlqFilter {
            document: Some(left_id),
            ..DlqFilter::default()
        },
        false,
        |_| {},
    )
    .await
    .expect("reprocess by document");
    assert_eq!((last.moved.total, last.kept), (1, 0), "{last:?}");
    let report = run_until_idle(&t, &pipeline).await;
    assert_eq!(report.stored, 3, "{report:?}");
    assert_stored_once(&t, &*store, &all).await;
    assert_eq!(queue_len(&topology.dlq()).await, 0);
    t.delete_queues().await;
}

/// `inspect_dlq` (what `dlq list` and `dlq show` use) neither loses nor reorders anything,
/// however often it runs and whatever its filter; the binary's `dlq list`/`dlq show` too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lose_nothing_dlq_inspection_keeps_every_message_in_order() {
    let t = TestPipeline::new("ln-inspect", FAST);
    let topology = Topology::new(&t.config);
    Submitter::connect(&t.config)
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672")
        .close()
        .await;
    let (conn, ch) = common::confirm_channel().await;
    let mut original = Vec::new();
    for i in 0..30 {
        let tenant = if i % 3 == 0 { "globex" } else { "acme" };
        let body = format!(
            r#"{{"schema":1,"tenant_id":"{tenant}","document_id":"seq-{i:02}","content":"x"}}"#
        );
        let mut headers = lapin::types::FieldTable::default();
        for (k, v) in [
            ("x-tenant-id", tenant),
            (
                "x-error-kind",
                if i % 2 == 0 {
                    "store_rejected"
                } else {
                    "invalid_field"
                },
            ),
        ] {
            headers.insert(k.into(), lapin::types::AMQPValue::LongString(v.into()));
        }
        common::publish_to_queue(
            &ch,
            &topology.dlq(),
            body.as_bytes(),
            lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await;
        original.push(body);
    }
    let _ = conn.close(200, "bye".into()).await;

    for round in 0..3 {
        assert_eq!(dlq_bodies(&t).await, original, "round {round}");
    }
    // `dlq list` reads summaries only.
    let (summary, entries) = inspect_dlq(
        &t.config,
        &DlqFilter {
            limit: Some(0),
            ..DlqFilter::default()
        },
    )
    .await
    .expect("list");
    assert_eq!(summary.total, 30);
    assert!(entries.is_empty());
    assert_eq!(summary.by_kind.get("store_rejected"), Some(&15));
    assert_eq!(summary.by_tenant.get("globex"), Some(&10));
    // A filtered, limited `dlq show`.
    let (_, some) = inspect_dlq(
        &t.config,
        &DlqFilter {
            tenant: Some("globex".into()),
            limit: Some(4),
            ..DlqFilter::default()
        },
    )
    .await
    .expect("show");
    let ids: Vec<String> = some
        .iter()
        .map(|e| e.document_id.clone().expect("id"))
        .collect();
    assert_eq!(ids, ["seq-00", "seq-03", "seq-06", "seq-09"]);

    // The binary's `dlq list` and `dlq show`.
    let file = common::write_pipeline_file(&t);
    let bin = || std::process::Command::new(env!("CARGO_BIN_EXE_rag-ingest"));
    let out = common::run_ok(bin().args(["dlq", "list", "--pipeline"]).arg(&file));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("30 message(s)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let show = [
        "dlq",
        "show",
        "--tenant",
        "acme",
        "--limit",
        "3",
        "--pipeline",
    ];
    let out = common::run_ok(bin().args(show).arg(&file));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 message(s) shown"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(dlq_bodies(&t).await, original, "after the binary");

    // Finally take them out for real: same sequence.
    let raw: Vec<String> = common::take_all(&topology.dlq())
        .await
        .into_iter()
        .map(|(_, b)| String::from_utf8_lossy(&b).into_owned())
        .collect();
    assert_eq!(raw, original);
    t.delete_queues().await;
}

/// `reprocess` while a worker keeps failing the replayed messages back into the DLQ: each
/// message present when it started is moved exactly once, and it terminates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lose_nothing_reprocess_alongside_a_running_worker_moves_each_message_once() {
    let t = TestPipeline::new("ln-bounce", FAST);
    let (pipeline, store) = faulty_pipeline(&t).await;
    let topology = Topology::new(&t.config);
    let docs = short_docs("acme", "bounce", 40);
    store.reject.store(true, Ordering::SeqCst);
    common::submit(&t.config, &docs).await;
    let (stop, worker) = spawn_worker(&t, &pipeline);
    let dlq = topology.dlq();
    eventually(
        Duration::from_secs(30),
        "40 messages in the DLQ",
        || async { queue_len(&dlq).await == 40 },
    )
    .await;

    let report = tokio::time::timeout(
        Duration::from_secs(30),
        reprocess(&t.config, &DlqFilter::default(), false, |_| {}),
    )
    .await
    .expect("reprocess terminates while the worker bounces messages back")
    .expect("reprocess");
    assert_eq!(
        report.moved.total, 40,
        "each message moved exactly once: {:?}",
        report.moved
    );

    eventually(
        Duration::from_secs(30),
        "all 40 back in the DLQ",
        || async { queue_len(&dlq).await == 40 },
    )
    .await;
    let _ = stop.send(());
    let report = worker.await.expect("join").expect("worker");
    assert_eq!(report.dead_lettered, 80, "{report:?}");
    assert_eq!(common::pending(&t.config).await, 0);
    t.delete_queues().await;
}

/// The broker refuses (nacks) the dead-letter publish: the source delivery must not be
/// acked. While the DLQ refuses, the message is redelivered again and again and stays in the
/// main queue; once the DLQ accepts again it is dead-lettered with its body — never lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lose_nothing_unconfirmed_dlq_publish_keeps_the_source_message() {
    let mut t = TestPipeline::new("ln-nack", FAST);
    // Keep the broker's crash-loop guard out of the way: every redelivery here is wanted.
    t.config.broker.delivery_limit = 1000;
    let (pipeline, store) = faulty_pipeline(&t).await;
    let topology = Topology::new(&t.config);
    let docs = short_docs("acme", "nacked", 1);

    // A full DLQ: one message in it, a policy limiting it to 0 that rejects publishes.
    Submitter::connect(&t.config)
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672")
        .close()
        .await;
    let (conn, ch) = common::confirm_channel().await;
    common::publish_to_queue(
        &ch,
        &topology.dlq(),
        b"filler",
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await;
    let _ = conn.close(200, "bye".into()).await;
    let policy = format!("{}-full", t.config.name);
    let pattern = format!("^{}$", regex_escape(&topology.dlq()));
    rabbitmqctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        "--priority",
        "100",
        &policy,
        &pattern,
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
    ]);

    store.reject.store(true, Ordering::SeqCst);
    common::submit(&t.config, &docs).await;
    let (stop, worker) = spawn_worker(&t, &pipeline);
    let reads = || store.reads.load(Ordering::SeqCst);
    let refused = tokio::time::timeout(Duration::from_secs(30), async {
        while reads() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let dlq_while_full = queue_len(&topology.dlq()).await;
    rabbitmqctl(&["clear_policy", &policy]);
    assert!(
        refused.is_ok(),
        "the message was delivered 3 times while the DLQ refused it (reads: {})",
        reads()
    );
    assert_eq!(dlq_while_full, 1, "only the filler while the DLQ refused");

    let dlq = topology.dlq();
    eventually(
        Duration::from_secs(30),
        "the message in the DLQ",
        || async { queue_len(&dlq).await == 2 },
    )
    .await;
    let _ = stop.send(());
    let report = worker.await.expect("join").expect("worker");
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert!(report.reconnects >= 2, "{report:?}");
    assert_eq!(common::pending(&t.config).await, 0);
    let raw = common::take_all(&topology.dlq()).await;
    assert_eq!(raw.len(), 2);
    assert_eq!(raw[0].1, b"filler");
    assert_eq!(raw[1].1, docs[0].to_wire(), "body byte for byte");
    assert_eq!(
        common::header(&raw[1].0, "x-error-kind").as_deref(),
        Some("store_rejected")
    );
    t.delete_queues().await;
}

/// A poison message (its processing panics) does not stall the worker: the delivery is
/// handed back with its panic count, the worker keeps storing the other documents, and after
/// `delivery_limit` panics the worker dead-letters the poison message (kind delivery_limit,
/// body intact).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lose_nothing_poison_message_is_dead_lettered_by_the_delivery_limit() {
    let t = TestPipeline::new("ln-poison", FAST);
    let (pipeline, store) = faulty_pipeline(&t).await;
    let topology = Topology::new(&t.config);
    let poison = short_docs("acme", "poison", 1);
    let good = short_docs("globex", "fine", 5);
    common::submit(&t.config, &poison).await;
    common::submit(&t.config, &good).await;
    let (stop, worker) = spawn_worker(&t, &pipeline);
    let dlq = topology.dlq();
    let reached = tokio::time::timeout(Duration::from_secs(30), async {
        while queue_len(&dlq).await == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let main = topology.main_queue();
    eventually(
        Duration::from_secs(30),
        "the good documents done",
        || async { queue_len(&main).await == 0 && store.upserts_done.load(Ordering::SeqCst) >= 5 },
    )
    .await;
    let _ = stop.send(());
    let report = worker.await.expect("join").expect("worker");
    assert!(
        reached.is_ok(),
        "the poison message reached the DLQ while the worker ran ({} deliveries): {report:?}",
        store.reads.load(Ordering::SeqCst)
    );
    assert_eq!((report.stored, report.dead_lettered), (5, 0), "{report:?}");
    assert_stored_once(&t, &*store, &good).await;
    let raw = common::take_all(&dlq).await;
    assert_eq!(raw.len(), 1);
    assert_eq!(raw[0].1, poison[0].to_wire(), "body byte for byte");
    // The worker gives up after `delivery_limit` panics, counted in its own `x-panics`
    // header (RabbitMQ 4.3+ no longer counts a requeueing nack toward the broker's limit).
    assert_eq!(
        common::header(&raw[0].0, "x-error-kind").as_deref(),
        Some("delivery_limit")
    );
    assert_eq!(
        common::header(&raw[0].0, "x-panics").as_deref(),
        Some(t.config.broker.delivery_limit.to_string().as_str())
    );
    assert_eq!(common::pending(&t.config).await, 0);
    t.delete_queues().await;
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Soak.
// ---------------------------------------------------------------------------------------

const SOAK: &str = "[retry]\nmax_attempts = 5\nin_process_retries = 2\nbackoff_min_ms = 5\nbackoff_max_ms = 20\ndelays_ms = [200, 500, 1000]\n[worker]\nshutdown_grace_secs = 10\nreconnect_give_up_secs = 60\n";

/// One submitted message and how to recognise it again (its `message_id`).
struct Submitted {
    message_id: String,
    /// `None` for a bad message.
    doc: Option<Document>,
    body: Vec<u8>,
}

/// 2,000 messages (`SOAK_DOCS` to change): 98% short documents of two tenants, 2% bad
/// messages taken from the fixtures, interleaved.
fn soak_messages(n: usize) -> Vec<Submitted> {
    let mut bad: Vec<Vec<u8>> = common::message_fixtures("bad").into_values().collect();
    bad.sort();
    const WORDS: [&str; 16] = [
        "kiln", "ferry", "prism", "sable", "tulip", "cedar", "ripple", "oxide", "plume", "gale",
        "dune", "fjord", "nectar", "quill", "basalt", "heron",
    ];
    (0..n)
        .map(|i| {
            if i % 50 == 49 {
                let body = bad[(i / 50) % bad.len()].clone();
                return Submitted {
                    message_id: format!("soak-bad-{i}"),
                    doc: None,
                    body,
                };
            }
            let owner = if i % 3 == 0 { "globex" } else { "acme" };
            let w = |k: usize| WORDS[(i * 7 + k * 5) % WORDS.len()];
            let mut text = format!(
                "Soak record {i}: the {} crossed the {} while the {} watched the {}.",
                w(0),
                w(1),
                w(2),
                w(3)
            );
            if i % 10 == 0 {
                for s in 0..6 {
                    text.push_str(&format!(
                        " Paragraph {s} of record {i} adds a {} beside a {} and a {}.",
                        w(s + 4),
                        w(s + 5),
                        w(s + 6)
                    ));
                }
            }
            let doc = Document::upsert(tenant(owner), format!("soak-{i}"), text);
            let message_id = Submitter::properties(&doc)
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
                .expect("message id");
            Submitted {
                message_id,
                body: doc.to_wire(),
                doc: Some(doc),
            }
        })
        .collect()
}

/// Submits `messages` with confirms (bad ones raw, with their own message id).
async fn soak_submit(config: &rag_ingest::config::PipelineConfig, messages: &[Submitted]) {
    let submitter = Submitter::connect(config)
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672");
    let docs: Vec<Document> = messages.iter().filter_map(|m| m.doc.clone()).collect();
    let results = submitter.submit_all(&docs, |_, _| {}).await;
    assert!(results.iter().all(Result::is_ok), "documents confirmed");
    for m in messages.iter().filter(|m| m.doc.is_none()) {
        submitter
            .submit_raw(
                &m.body,
                lapin::BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_message_id(m.message_id.as_str().into()),
            )
            .await
            .expect("bad message confirmed");
    }
    submitter.close().await;
}

/// Ready messages in the main and retry queues, read in real time (passive declares on one
/// channel; `rabbitmqctl list_queues` lags by its statistics interval). Messages a worker
/// holds unacknowledged are not counted.
#[derive(Clone)]
struct Backlog {
    channel: lapin::Channel,
    queues: Vec<String>,
    _conn: Arc<lapin::Connection>,
}

impl Backlog {
    /// The pipeline's queues must exist (declare them first).
    async fn new(config: &rag_ingest::config::PipelineConfig) -> Self {
        let (conn, channel) = common::confirm_channel().await;
        let topology = Topology::new(config);
        let mut queues = vec![topology.main_queue()];
        queues.extend(topology.retry_queues());
        Backlog {
            channel,
            queues,
            _conn: Arc::new(conn),
        }
    }

    async fn ready(&self) -> u64 {
        let mut total = 0;
        for q in &self.queues {
            let declared = self
                .channel
                .queue_declare(
                    q.as_str().into(),
                    lapin::options::QueueDeclareOptions::durable().passive(),
                    lapin::types::FieldTable::default(),
                )
                .await
                .expect("passive declare");
            total += u64::from(declared.message_count());
        }
        total
    }
}

/// Opens the store once the previous worker (process or in-process) has let go of it.
async fn soak_open_store(t: &TestPipeline) -> EdgeStore {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match setup::open_store(&t.config, embedder().fingerprint()) {
            Ok(store) => return store,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the store stays locked: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Counters of one soak run.
#[derive(Default, Debug)]
struct SoakFaults {
    kills: u32,
    sigterms: u32,
    in_process_stops: u32,
    aborts: u32,
    connection_drops: u32,
}

/// One round with the real binary: run until `target` more messages were settled, then
/// SIGKILL, SIGTERM, or drop its connection and carry on to a SIGTERM/SIGKILL later.
async fn soak_binary_round(
    t: &TestPipeline,
    file: &Path,
    backlog: &Backlog,
    rng: &Rng,
    faults: &mut SoakFaults,
) {
    // Make sure the store is free (an aborted in-process worker may still be flushing).
    drop(soak_open_store(t).await);
    let mut worker = common::WorkerProcess::start(file, false);
    let settled =
        |w: &common::WorkerProcess| w.count(&common::SETTLED) + w.count(&common::DEAD_LETTERED);
    let mut drop_first = rng.below(100) < 25;
    loop {
        let target = settled(&worker) + 20 + rng.below(120) as usize;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while settled(&worker) < target && backlog.ready().await > 0 {
            assert!(
                worker.exited().is_none(),
                "the worker died by itself:\n{}",
                worker.log()
            );
            assert!(
                std::time::Instant::now() < deadline,
                "no progress in 2 minutes:\n{}",
                worker.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if drop_first && backlog.ready().await > 0 {
            drop_first = false;
            if common::close_worker_connections(&t.config.name) > 0 {
                faults.connection_drops += 1;
            }
            continue;
        }
        break;
    }
    if rng.below(100) < 60 {
        worker.signal("KILL");
        faults.kills += 1;
        let (status, log) = worker.wait_exit(Duration::from_secs(20)).await;
        assert!(!status.success(), "killed:\n{log}");
    } else {
        worker.signal("TERM");
        faults.sigterms += 1;
        let (status, log) = worker.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(status.code(), Some(0), "SIGTERM exits 0:\n{log}");
    }
}

/// One round in process, with random transient store and embedder faults: run until
/// `target` more documents were written, then stop gracefully, abort the worker's task (a
/// crash without a goodbye), or drop its connection and carry on.
async fn soak_in_process_round(
    t: &TestPipeline,
    backlog: &Backlog,
    rng: &Rng,
    faults: &mut SoakFaults,
) {
    let store = Arc::new(faulty_store(soak_open_store(t).await));
    store.random_permille.store(30, Ordering::SeqCst);
    let embed = Arc::new(FaultyEmbedder {
        inner: embedder(),
        random_permille: AtomicU32::new(30),
        rng: Rng::new(rng.next()),
    });
    let chunker = setup::chunker(&t.config, &embedder()).expect("chunker");
    let pipeline = Pipeline::new(Arc::new(chunker), embed, Arc::clone(&store));
    let (stop, handle) = spawn_worker(t, &pipeline);
    drop(pipeline);
    let mut drop_first = rng.below(100) < 30;
    loop {
        let target = store.upserts_done.load(Ordering::SeqCst) + 20 + rng.below(120);
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while store.upserts_done.load(Ordering::SeqCst) < target && backlog.ready().await > 0 {
            assert!(
                !handle.is_finished(),
                "the in-process worker stopped by itself"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "no progress in 2 minutes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if drop_first && backlog.ready().await > 0 {
            drop_first = false;
            if common::close_worker_connections(&t.config.name) > 0 {
                faults.connection_drops += 1;
            }
            continue;
        }
        break;
    }
    if rng.below(100) < 50 {
        handle.abort();
        let _ = handle.await;
        drop(stop);
        faults.aborts += 1;
    } else {
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("graceful stop within the grace period")
            .expect("join")
            .expect("worker");
        faults.in_process_stops += 1;
    }
    drop(store);
}

/// 2,000 messages through random faults: SIGKILL/SIGTERM of the worker process, in-process
/// worker stops and aborts, connection drops, transient store and embedder errors, and 2%
/// bad messages. At the end every good document is stored exactly once (points == chunks)
/// or, if the broker's crash-loop guard fired, in the DLQ; every bad message is in the DLQ
/// exactly once; nothing else exists anywhere.
///
/// `SOAK_DOCS` changes the number of messages, `SOAK_SEED` replays a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak test (minutes): cargo test --test lose_nothing -- --ignored soak"]
async fn lose_nothing_soak_random_faults() {
    let n: usize = std::env::var("SOAK_DOCS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("soak: {n} messages, SOAK_SEED={seed}");
    let rng = Rng::new(seed);
    let t = TestPipeline::new("ln-soak", SOAK);
    let file = common::write_pipeline_file(&t);
    let started = std::time::Instant::now();
    let messages = soak_messages(n);
    Submitter::connect(&t.config)
        .await
        .expect("RabbitMQ must be running on 127.0.0.1:5672")
        .close()
        .await;
    let backlog = Backlog::new(&t.config).await;

    // Submit in four waves while the workers run.
    let waves: Vec<Vec<Submitted>> = {
        let mut waves = vec![Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for (i, m) in messages.iter().enumerate() {
            waves[i * 4 / n].push(Submitted {
                message_id: m.message_id.clone(),
                doc: m.doc.clone(),
                body: m.body.clone(),
            });
        }
        waves
    };
    let config = t.config.clone();
    let paced = backlog.clone();
    let submitter = tokio::spawn(async move {
        for (i, wave) in waves.iter().enumerate() {
            if i > 0 {
                // Pace the waves by the backlog, so that submits overlap with faults.
                while paced.ready().await > 300 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            soak_submit(&config, wave).await;
        }
    });

    let mut faults = SoakFaults::default();
    let mut rounds = 0;
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(40 * 60),
            "soak still running after 40 minutes ({faults:?})"
        );
        let submitted_all = submitter.is_finished();
        let ready = backlog.ready().await;
        if submitted_all && ready == 0 {
            break;
        }
        if ready == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        rounds += 1;
        if rng.below(100) < 45 {
            soak_binary_round(&t, &file, &backlog, &rng, &mut faults).await;
        } else {
            soak_in_process_round(&t, &backlog, &rng, &mut faults).await;
        }
    }
    submitter.await.expect("every message submitted");

    // A last clean run picks up whatever the last killed worker held; then nothing may be
    // left anywhere.
    let (pipeline, store) = faulty_pipeline_with(soak_open_store(&t).await, &t);
    let _ = run_until_idle(&t, &pipeline).await;
    let topology = Topology::new(&t.config);
    assert_eq!(backlog.ready().await, 0, "main and retry queues empty");

    // Account for every message.
    let dlq = common::take_all(&topology.dlq()).await;
    let mut in_dlq: HashMap<String, usize> = HashMap::new();
    for (props, _) in &dlq {
        let id = props
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_owned())
            .unwrap_or_default();
        *in_dlq.entry(id).or_default() += 1;
    }
    let (mut stored, mut dead, mut lost, mut duplicated) = (0usize, 0usize, 0usize, 0usize);
    let mut problems = Vec::new();
    let mut expected_points: HashMap<String, usize> = HashMap::new();
    for m in &messages {
        let dl = in_dlq.remove(&m.message_id).unwrap_or(0);
        if dl > 1 {
            duplicated += 1;
            problems.push(format!("{} is {dl} times in the DLQ", m.message_id));
        }
        match &m.doc {
            None => {
                if dl == 0 {
                    lost += 1;
                    problems.push(format!("bad message {} is not in the DLQ", m.message_id));
                } else {
                    dead += 1;
                }
            }
            Some(doc) => {
                let points = store
                    .count(&doc.tenant, Some(&doc.document_id))
                    .await
                    .expect("count");
                let want = expected_chunks(&t.config, doc);
                if points == want {
                    stored += 1;
                    *expected_points.entry(doc.tenant.to_string()).or_default() += want;
                    if dl > 0 {
                        duplicated += 1;
                        problems.push(format!("{} stored and dead-lettered", doc.document_id));
                    }
                } else if points == 0 && dl > 0 {
                    dead += 1;
                    problems.push(format!(
                        "note: good document {} dead-lettered (crash-loop guard)",
                        doc.document_id
                    ));
                } else if points > want {
                    duplicated += 1;
                    problems.push(format!(
                        "{}: {points} points, {want} chunks",
                        doc.document_id
                    ));
                } else {
                    lost += 1;
                    problems.push(format!(
                        "{}: {points} points, {want} chunks",
                        doc.document_id
                    ));
                }
            }
        }
    }
    for (id, k) in &in_dlq {
        duplicated += k;
        problems.push(format!("unknown message {id:?} in the DLQ ({k}×)"));
    }
    for tenant_name in ["acme", "globex"] {
        let total = store
            .count(&tenant(tenant_name), None)
            .await
            .expect("count");
        let want = expected_points.get(tenant_name).copied().unwrap_or(0);
        if total != want {
            duplicated += total.saturating_sub(want);
            problems.push(format!("{tenant_name}: {total} points, {want} expected"));
        }
    }

    println!(
        "submitted={} stored={stored} dead_lettered={dead} lost={lost} duplicated={duplicated}",
        messages.len()
    );
    eprintln!(
        "soak: {rounds} rounds, {faults:?}, {:.0} s, seed {seed}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(stored + dead, messages.len(), "{problems:#?}");
    assert_eq!((lost, duplicated), (0, 0), "{problems:#?}");
    t.delete_queues().await;
}

/// Like [`faulty_pipeline`], over an already opened store.
fn faulty_pipeline_with(
    store: EdgeStore,
    t: &TestPipeline,
) -> (Pipeline<CandleEmbedder, FaultyStore>, Arc<FaultyStore>) {
    let embedder = embedder();
    let chunker = setup::chunker(&t.config, &embedder).expect("chunker");
    let store = Arc::new(faulty_store(store));
    (
        Pipeline::new(Arc::new(chunker), embedder, Arc::clone(&store)),
        store,
    )
}
