//! [`EdgeStore`]: the [`VectorStore`] backed by an embedded Qdrant Edge shard (`qdrant-edge` 0.7.0).
//!
//! Facts about `qdrant-edge` 0.7.0 this module relies on (read from its source):
//! - Every `EdgeShard` call is synchronous and may do disk I/O, so each one runs on the
//!   blocking pool via [`tokio::task::spawn_blocking`].
//! - `EdgeShard::update` appends the operation to the WAL (an mmap that is *not* synced;
//!   `SerdeWal::write` documents that it does not guarantee durability) and applies it to the
//!   segments, so the change is visible to reads as soon as `update` returns. `EdgeShard::load`
//!   never replays the WAL: only flushed segments survive a crash. A write is therefore durable
//!   only after `EdgeShard::flush` (WAL flush + synchronous, forced flush of every segment:
//!   `msync` of each memory map, about 2 ms of CPU and several ms of I/O on this machine
//!   kind). Every write returns only after a flush that followed it. Writes are group
//!   commits: a writer queues its operations and, if no commit is running, becomes the
//!   committer: it applies every queued write in order and flushes once; writers arriving
//!   meanwhile wait, and one of them commits them all together next. Under load a flush
//!   therefore covers many writes instead of one each.
//! - `EdgeShard::flush` (also run by `EdgeShard`'s `Drop`) panics instead of returning an error:
//!   on I/O failure, and when the WAL or segment-holder lock is contended (`try_lock().expect`).
//!   All writes, flushes and optimizations are therefore serialised by one mutex; a panic
//!   while committing is caught and every write of that commit fails with
//!   [`StoreError::Unavailable`].
//! - The WAL directory is locked exclusively while a shard is open: a second [`EdgeStore`] on
//!   the same collection fails to open until the first one is dropped.
//! - Filters work on unindexed payload fields too (the plain segment checks payloads); the
//!   keyword indexes only make them faster. `EdgeShard::optimize` builds the HNSW index (new
//!   segments inherit the payload indexes); until then searches are exact brute-force scans.
//! - A set-payload operation merges top-level keys into the stored payload, and a `null`
//!   value *removes* the key (`utils::merge_map`); an absent `version` therefore reads back
//!   as `None`, and the `IsEmpty` condition matches both absent and `null` values.
//!
//! **Reads only see durable state.** A commit holds the shard exclusively from its first
//! update until its flush has ended, so no read ever observes applied-but-unflushed writes.
//! If the flush fails, the updates stay applied in memory but are not on disk, and the
//! writes fail: the shard is marked *unflushed*, and before any later read or write is served
//! the shard is flushed again. While that keeps failing (a persistent disk fault), every call
//! fails with [`StoreError::Unavailable`], so no "already stored" decision can rest on state
//! that a crash would lose.
//!
//! **Disk use follows the live data.** `qdrant-edge` 0.7.0 never truncates its WAL (its
//! `SerdeWal::ack` is not reachable through `EdgeShard`) and nothing runs its optimizers, so
//! a long-running worker's directory would grow with every write. [`EdgeMaintenance`] bounds
//! both, on the committing writer's blocking thread after its commit has been published:
//! - **WAL compaction.** WAL segment files are [`EdgeMaintenance::wal_segment_bytes`] long.
//!   Once the WAL directory holds more than [`EdgeMaintenance::wal_compact_bytes`], the shard
//!   (and more than a quarter of what the segments take, so that a large shard, slower to
//!   reload, is reloaded proportionally less often) the shard
//!   is closed (after a successful flush, so the WAL holds nothing that is not in the
//!   segments), every closed WAL segment but the newest is deleted, and the shard is loaded
//!   again. The newest closed segment is kept because the WAL's numbering continues from it:
//!   operation numbers are point versions, and a WAL restarting at 0 would make the segments
//!   ignore every later write as older. Reads and writes wait for the reopen (tens of
//!   milliseconds for a small shard); if it fails, the store fails every call with
//!   `Unavailable` until it is opened again.
//! - **Vacuum.** Every [`EdgeMaintenance::optimize_every_writes`] committed writes the
//!   shard's optimizers run (as [`EdgeStore::optimize`]): segments with more than 20 %
//!   deleted points (at least [`EdgeMaintenance::vacuum_min_points`] points) are rebuilt
//!   without them, small segments merged, large ones indexed. Writes wait; reads continue.
//!
//! There is no request size limit in process, but upserts are still split by [`BatchLimits`]
//! (payloads measured as JSON plus 4 bytes per vector value) so both stores behave the same;
//! all batches of one upsert are applied under one lock and flushed once.

use std::any::Any;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{
    Arc, Condvar, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard,
};

use qdrant_edge::external::ordered_float::OrderedFloat;
use qdrant_edge::{
    Condition, ConditionalInsertOperation, CountRequest, CreateIndex, DEFAULT_VECTOR_NAME,
    Distance, EdgeConfig, EdgeOptimizersConfig, EdgeShard, EdgeSparseVectorParams,
    EdgeVectorParams, FieldCondition, FieldIndexOperations, Filter, Fusion, IsEmptyCondition,
    JsonPath, KeywordIndexParams, Match, Modifier, NamedQuery, OperationError, Payload,
    PayloadFieldSchema, PayloadOps, PayloadSchemaParams, PointId, PointInsertOperations,
    PointOperations, PointStructPersisted, Prefetch, QueryEnum, QueryRequest, Range, ScoringQuery,
    ScrollRequest, SetPayloadOp, UpdateOperation, ValueVariants, VectorInternal, VectorPersisted,
    VectorStructPersisted, WalOptions, WithPayloadInterface, WithVector,
};
use tokio::runtime::{Handle, RuntimeFlavor};

use super::{
    BatchLimits, BranchRanks, ChunkPayload, ChunkPoint, MetadataValue, ORDER_FIELD, Order,
    OrderTerm, Revision, ScoredChunk, SearchMode, SearchRequest, StoreError, StoreFailure,
    StoredChunk, TOMBSTONE_FIELD, VectorStore, assign_ranks, check_owner, check_points_order,
    check_sparse, check_vector, check_version, hybrid_candidates, no_sparse_vectors, point_id,
    split_batches,
};
use crate::fingerprint::Fingerprint;
use crate::sparse::{SPARSE_VECTOR_NAME, SparseVector};
use crate::tenant::TenantId;

/// Name of the sidecar file (inside the collection directory) recording the [`Fingerprint`].
const FINGERPRINT_FILE: &str = "rag-ingest.json";
/// Temporary name the sidecar is written under before being renamed into place.
const FINGERPRINT_TMP_FILE: &str = "rag-ingest.json.tmp";
/// The shard's WAL directory (inside the collection directory), as `qdrant-edge` names it.
const WAL_DIR: &str = "wal";
/// The shard's segments directory (inside the collection directory), as `qdrant-edge` names
/// it.
const SEGMENTS_DIR: &str = "segments";
/// Prefix of a closed WAL segment file, followed by the index of its first entry.
const CLOSED_WAL_SEGMENT_PREFIX: &str = "closed-";

/// Payload fields with a keyword index, and whether each is the tenant key.
const KEYWORD_INDEXES: [(&str, bool); 3] = [
    ("tenant_id", true),
    ("document_id", false),
    ("content_sha256", false),
];

/// How an [`EdgeStore`] keeps its directory bounded by the live data (see the module
/// documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeMaintenance {
    /// Capacity of one WAL segment file (an entry larger than this gets a segment of its own
    /// size). Applies to segments created from the next open on. Default 256 KiB.
    pub wal_segment_bytes: usize,
    /// The WAL is compacted once its files take more than this many bytes on disk (and more
    /// than a quarter of the segments). Default 16 MiB: a compaction reloads the shard
    /// (tens of milliseconds of CPU and every file mapped again, even for a small shard), so
    /// it is paid once per 16 MiB of writes (about a thousand documents of a few chunks)
    /// for at most 16 MiB more on disk; a large shard is reloaded after a quarter of its
    /// size instead.
    pub wal_compact_bytes: u64,
    /// The optimizers run after this many committed writes (0: never on their own; use
    /// [`EdgeStore::optimize`]). Default 512.
    pub optimize_every_writes: u64,
    /// A segment is vacuumed only if it holds at least this many points (deleted ones
    /// included) and more than 20 % of them are deleted. Default 256.
    pub vacuum_min_points: usize,
}

impl Default for EdgeMaintenance {
    fn default() -> Self {
        EdgeMaintenance {
            wal_segment_bytes: 256 * 1024,
            wal_compact_bytes: 16 * 1024 * 1024,
            optimize_every_writes: 512,
            vacuum_min_points: 256,
        }
    }
}

/// A [`VectorStore`] kept in an embedded Qdrant Edge shard under `data_dir/<collection>/`.
///
/// Cosine distance, one unnamed dense vector of `fingerprint.dims` values per point and (when
/// the fingerprint names a sparse model) a sparse vector named
/// [`SPARSE_VECTOR_NAME`] with the `idf` modifier, the [`ChunkPayload`] fields at the top level of the point payload. Every write is flushed to
/// disk before the call returns, and no read observes a write that is not (see the module
/// documentation). Upserts are split by [`BatchLimits`] (the defaults unless
/// [`EdgeStore::with_batch_limits`] says otherwise). Dropping the store flushes the shard
/// once more; on a multi-threaded Tokio runtime that final flush runs under
/// [`tokio::task::block_in_place`], elsewhere it blocks the dropping thread.
pub struct EdgeStore {
    collection: String,
    dims: usize,
    /// Whether the collection holds keyword (sparse) vectors.
    sparse: bool,
    limits: BatchLimits,
    /// Always `Some` until [`Drop`] takes it.
    shared: Option<Arc<Shared>>,
}

/// The shard, the locks serialising its writes, and the group-commit queue (see the module
/// documentation).
struct Shared {
    /// The collection directory the shard lives in.
    dir: PathBuf,
    /// The configuration the shard is (re)loaded with.
    config: EdgeConfig,
    maintenance: EdgeMaintenance,
    /// The shard. Reads hold it shared; commits and WAL compactions exclusively (after
    /// taking [`Shared::exclusive`]).
    state: RwLock<State>,
    /// Held by whoever writes, flushes, optimizes or reopens the shard (taken before
    /// [`Shared::state`]).
    exclusive: Mutex<()>,
    commits: Mutex<Commits>,
    /// Signalled whenever a commit ends.
    committed: Condvar,
    /// Flushes run so far.
    flushes: AtomicU64,
    /// WAL compactions run so far.
    wal_compactions: AtomicU64,
    /// Optimizer runs so far (on their own and through [`EdgeStore::optimize`]).
    optimizations: AtomicU64,
    /// Committed writes since the optimizers last ran.
    writes_since_optimize: AtomicU64,
    /// Flushes still to fail on purpose (see [`EdgeStore::inject_flush_failures`]).
    injected_flush_failures: AtomicU32,
}

/// The shard and what is known about its durability, guarded by [`Shared::state`].
struct State {
    /// `Err` (why) once reloading the shard failed: every call fails until the store is
    /// opened again.
    shard: Result<EdgeShard, String>,
    /// Updates were applied and their flush failed: the shard may hold state that is not on
    /// disk. Nothing is read until a flush succeeds.
    unflushed: bool,
}

impl State {
    /// The shard, or [`StoreError::Unavailable`] if it could not be reloaded.
    fn shard(&self) -> Result<&EdgeShard, StoreError> {
        self.shard.as_ref().map_err(|reason| {
            StoreError::unavailable(format!(
                "the Qdrant Edge shard is closed after a failed reload ({reason}); restart the \
                 worker"
            ))
        })
    }
}

/// Group-commit bookkeeping, guarded by [`Shared::commits`].
#[derive(Default)]
struct Commits {
    /// Writes waiting for the next commit, oldest first, each with its ticket.
    queued: Vec<(u64, Vec<UpdateOperation>)>,
    /// Outcomes of committed writes whose writers have not collected them yet, by ticket.
    outcomes: HashMap<u64, Result<(), StoreError>>,
    /// Ticket of the next write.
    next_ticket: u64,
    /// A writer is committing.
    running: bool,
}

/// Locks `mutex`. A poisoned lock only means a panic was caught while it was held; every
/// structure it guards is left consistent at each step, so carrying on is safe.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Takes `rwlock` shared (see [`lock`] about poisoning).
fn read_lock<T>(rwlock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    rwlock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Takes `rwlock` exclusively (see [`lock`] about poisoning).
fn write_lock<T>(rwlock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    rwlock.write().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Applies `operation`, then returns once it is durable (see [`Shared::write_all`]).
    fn write(&self, operation: UpdateOperation) -> Result<(), StoreError> {
        self.write_all(vec![operation])
    }

    /// Queues `operations` to be applied in order, then returns once a flush has covered
    /// them: either this writer commits the queue itself, or it waits for the writer that
    /// does (group commit). A committing writer then runs the maintenance that has become
    /// due (see the module documentation) before returning.
    ///
    /// Stops at the first failing operation (the operations before it stay applied and are
    /// flushed) and fails with [`StoreError::Rejected`] or [`StoreError::Unavailable`] as
    /// mapped by [`map_op_err`]; if the flush fails (or applying panics), every write of
    /// that commit fails with `Unavailable`.
    fn write_all(&self, operations: Vec<UpdateOperation>) -> Result<(), StoreError> {
        let mut commits = lock(&self.commits);
        let ticket = commits.next_ticket;
        commits.next_ticket += 1;
        commits.queued.push((ticket, operations));
        loop {
            if let Some(outcome) = commits.outcomes.remove(&ticket) {
                return outcome;
            }
            if commits.running {
                commits = self
                    .committed
                    .wait(commits)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            commits.running = true;
            let writes = std::mem::take(&mut commits.queued);
            drop(commits);
            let outcomes = self.commit(writes);
            let committed = outcomes.iter().filter(|(_, o)| o.is_ok()).count();
            commits = lock(&self.commits);
            commits.outcomes.extend(outcomes);
            commits.running = false;
            self.committed.notify_all();
            drop(commits);
            self.maintain(committed as u64);
            commits = lock(&self.commits);
        }
    }

    /// Applies `writes` in order and flushes once, holding the shard exclusively; returns
    /// each write's outcome by ticket.
    fn commit(
        &self,
        writes: Vec<(u64, Vec<UpdateOperation>)>,
    ) -> Vec<(u64, Result<(), StoreError>)> {
        let tickets: Vec<u64> = writes.iter().map(|(ticket, _)| *ticket).collect();
        let fail_all = |reason: String| -> Vec<(u64, Result<(), StoreError>)> {
            tickets
                .iter()
                .map(|ticket| (*ticket, Err(StoreError::unavailable(reason.clone()))))
                .collect()
        };
        let _exclusive = lock(&self.exclusive);
        let mut state = write_lock(&self.state);
        // An earlier commit's flush failed: its updates are applied but maybe not on disk.
        // This commit's flush covers them too, so the flag is only cleared by its success.
        let shard = match state.shard() {
            Ok(shard) => shard,
            Err(e) => return fail_all(e.to_string()),
        };
        let applied = panic::catch_unwind(AssertUnwindSafe(|| {
            writes
                .into_iter()
                .map(|(ticket, operations)| {
                    let outcome = operations
                        .into_iter()
                        .try_for_each(|operation| shard.update(operation).map(drop))
                        .map_err(map_op_err);
                    (ticket, outcome)
                })
                .collect::<Vec<_>>()
        }));
        let flushed = self.flush(shard);
        match (applied, flushed) {
            (Ok(applied), Ok(())) => {
                state.unflushed = false;
                applied
            }
            (Err(panic), _) => {
                state.unflushed = true;
                fail_all(format!(
                    "writing to the Qdrant Edge shard panicked: {}",
                    panic_message(panic.as_ref())
                ))
            }
            (Ok(_), Err(reason)) => {
                state.unflushed = true;
                fail_all(format!(
                    "flushing the Qdrant Edge shard failed, the writes are not durable: \
                     {reason}"
                ))
            }
        }
    }

    /// Flushes `shard` (the caller holds [`Shared::exclusive`] and the shard exclusively, or
    /// shared when nothing is applied meanwhile); fails with why if it fails.
    fn flush(&self, shard: &EdgeShard) -> Result<(), String> {
        let injected = self
            .injected_flush_failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok();
        if injected {
            return Err("injected flush failure".to_owned());
        }
        panic::catch_unwind(AssertUnwindSafe(|| shard.flush()))
            .map_err(|panic| panic_message(panic.as_ref()).to_owned())?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Runs `f` on the shard once it holds nothing that is not on disk: if a flush failed,
    /// flushes again first, and fails with [`StoreError::Unavailable`] while that fails.
    fn read<T>(
        &self,
        f: impl FnOnce(&EdgeShard) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        loop {
            {
                let state = read_lock(&self.state);
                if !state.unflushed {
                    return f(state.shard()?);
                }
            }
            self.reflush()?;
        }
    }

    /// If the last flush failed, flushes again; fails with [`StoreError::Unavailable`] if
    /// that fails too.
    fn reflush(&self) -> Result<(), StoreError> {
        let _exclusive = lock(&self.exclusive);
        let mut state = write_lock(&self.state);
        if !state.unflushed {
            return Ok(());
        }
        self.flush(state.shard()?).map_err(|reason| {
            StoreError::unavailable(format!(
                "an earlier flush of the Qdrant Edge shard failed, and flushing again failed \
                 too ({reason}): nothing is read until writes are durable"
            ))
        })?;
        state.unflushed = false;
        Ok(())
    }

    /// Runs the shard's optimizers, then flushes (the caller holds [`Shared::exclusive`]);
    /// reads go on meanwhile.
    fn optimize_locked(&self) -> Result<(), StoreError> {
        let outcome = {
            let state = read_lock(&self.state);
            let shard = state.shard()?;
            if state.unflushed {
                Err(StoreError::unavailable(
                    "an earlier flush failed; not optimizing until a flush succeeds",
                ))
            } else {
                self.optimizations.fetch_add(1, Ordering::Relaxed);
                let optimized = match panic::catch_unwind(AssertUnwindSafe(|| shard.optimize())) {
                    Ok(result) => result.map(drop).map_err(map_op_err),
                    Err(panic) => Err(StoreError::unavailable(format!(
                        "optimizing the Qdrant Edge shard panicked: {}",
                        panic_message(panic.as_ref())
                    ))),
                };
                optimized.and_then(|()| {
                    self.flush(shard).map_err(|reason| {
                        StoreError::unavailable(format!(
                            "flushing the Qdrant Edge shard after optimizing failed: {reason}"
                        ))
                    })
                })
            }
        };
        if let Err(StoreError::Unavailable(_)) = &outcome {
            // Whatever the optimizer changed may not be on disk either.
            write_lock(&self.state).unflushed = true;
        }
        outcome
    }

    /// After `writes` committed writes: runs the optimizers every
    /// [`EdgeMaintenance::optimize_every_writes`] writes, and compacts the WAL once it is
    /// larger than [`EdgeMaintenance::wal_compact_bytes`]. Failures are logged; a failed
    /// flush or reload shows in the next call's outcome.
    fn maintain(&self, writes: u64) {
        let every = self.maintenance.optimize_every_writes;
        if every > 0 && writes > 0 {
            let since = self
                .writes_since_optimize
                .fetch_add(writes, Ordering::Relaxed)
                .saturating_add(writes);
            if since >= every {
                self.writes_since_optimize.store(0, Ordering::Relaxed);
                let _exclusive = lock(&self.exclusive);
                if let Err(e) = self.optimize_locked() {
                    self.maintenance_failed("optimize", &e);
                }
            }
        }
        match self.wal_wants_compaction() {
            Ok(false) => {}
            Ok(true) => {
                if let Err(e) = self.compact_wal() {
                    self.maintenance_failed("compact_wal", &e);
                }
            }
            Err(e) => {
                self.maintenance_failed("measure_wal", &e);
            }
        }
    }

    /// Reports a failed maintenance `task` of this shard ([`crate::telemetry::events::EdgeMaintenanceFailed`]).
    fn maintenance_failed(&self, task: &'static str, error: &dyn std::fmt::Display) {
        crate::telemetry::emit(crate::telemetry::events::EdgeMaintenanceFailed {
            task,
            dir: &self.dir.display().to_string(),
            error: &error.to_string(),
        });
    }

    /// Whether the WAL takes more than [`EdgeMaintenance::wal_compact_bytes`] on disk and
    /// more than a quarter of what the segments take (so a large shard, slower to reload,
    /// is reloaded proportionally less often).
    fn wal_wants_compaction(&self) -> io::Result<bool> {
        let wal = disk_usage(&self.dir.join(WAL_DIR))?;
        if wal <= self.maintenance.wal_compact_bytes {
            return Ok(false);
        }
        let segments = disk_usage(&self.dir.join(SEGMENTS_DIR))?;
        Ok(wal > segments / 4)
    }

    /// Closes the shard, deletes every closed WAL segment but the newest, and loads the
    /// shard again (see the module documentation). Does nothing while the last flush has
    /// failed (the WAL may then hold writes the segments lack on disk). If the reload fails,
    /// the shard stays closed and every later call fails with `Unavailable`.
    fn compact_wal(&self) -> Result<(), StoreError> {
        let _exclusive = lock(&self.exclusive);
        let mut state = write_lock(&self.state);
        if state.unflushed || state.shard.is_err() {
            return Ok(());
        }
        let shard = std::mem::replace(&mut state.shard, Err("being reloaded".to_owned()));
        // Everything applied is flushed, so closing it loses nothing; its `Drop` flushes once
        // more and releases the WAL's directory lock and memory maps.
        if let Err(panic) = panic::catch_unwind(AssertUnwindSafe(move || drop(shard))) {
            self.maintenance_failed("close_for_compaction", &panic_message(panic.as_ref()));
        }
        let reloaded = remove_old_wal_segments(&self.dir.join(WAL_DIR)).and_then(|()| {
            panic::catch_unwind(AssertUnwindSafe(|| {
                EdgeShard::load(&self.dir, Some(self.config.clone())).map_err(map_op_err)
            }))
            .unwrap_or_else(|panic| {
                Err(StoreError::unavailable(format!(
                    "loading the Qdrant Edge shard panicked: {}",
                    panic_message(panic.as_ref())
                )))
            })
        });
        self.wal_compactions.fetch_add(1, Ordering::Relaxed);
        match reloaded {
            Ok(shard) => {
                state.shard = Ok(shard);
                Ok(())
            }
            Err(e) => {
                state.shard = Err(e.to_string());
                Err(e)
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        let shard = std::mem::replace(&mut state.shard, Err("closed".to_owned()));
        // `EdgeShard`'s `Drop` flushes and panics if that fails: report it instead.
        if let Err(panic) = panic::catch_unwind(AssertUnwindSafe(move || drop(shard))) {
            self.maintenance_failed("final_flush", &panic_message(panic.as_ref()));
        }
    }
}

/// Bytes the files under `dir` take on disk (allocated blocks, so preallocated but unwritten
/// parts of sparse files do not count), recursively; symbolic links are not followed.
///
/// Fails if a directory or file cannot be examined.
pub fn disk_usage(dir: &Path) -> io::Result<u64> {
    let mut total = 0u64;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let metadata = entry.metadata()?;
            if metadata.is_dir() {
                pending.push(entry.path());
            } else {
                total = total.saturating_add(allocated_bytes(&metadata));
            }
        }
    }
    Ok(total)
}

/// Bytes allocated on disk for a file.
#[cfg(unix)]
fn allocated_bytes(metadata: &fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    metadata.blocks().saturating_mul(512)
}

/// Bytes allocated on disk for a file (its length where blocks are not reported).
#[cfg(not(unix))]
fn allocated_bytes(metadata: &fs::Metadata) -> u64 {
    metadata.len()
}

/// Deletes every `closed-<start>` WAL segment file in `wal` except the one with the highest
/// start index, oldest first (so an interruption leaves a contiguous WAL), then syncs the
/// directory. Only for a WAL no shard has open.
fn remove_old_wal_segments(wal: &Path) -> Result<(), StoreError> {
    let mut closed: Vec<(u64, PathBuf)> = Vec::new();
    let entries = fs::read_dir(wal).map_err(|e| io_error("cannot list", wal, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("cannot list", wal, e))?;
        let name = entry.file_name();
        let start = name
            .to_str()
            .and_then(|name| name.strip_prefix(CLOSED_WAL_SEGMENT_PREFIX))
            .and_then(|start| start.parse::<u64>().ok());
        if let Some(start) = start {
            closed.push((start, entry.path()));
        }
    }
    closed.sort();
    closed.pop();
    if closed.is_empty() {
        return Ok(());
    }
    for (_, path) in &closed {
        fs::remove_file(path).map_err(|e| io_error("cannot delete", path, e))?;
    }
    sync_dir(wal)
}

/// The message of a caught panic, if it has one.
fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

impl EdgeStore {
    /// Opens the collection `collection` under `data_dir` (the shard lives in
    /// `data_dir/<collection>/`), creating it if missing: cosine distance, dimension
    /// `fingerprint.dims`, keyword payload indexes on `tenant_id` (the tenant key),
    /// `document_id` and `content_sha256`. A new collection records `fingerprint` in
    /// `data_dir/<collection>/rag-ingest.json` before the shard is created. Maintenance as
    /// [`EdgeMaintenance::default`].
    ///
    /// Blocks on disk I/O: call it before serving or from a blocking context.
    ///
    /// Fails with [`StoreError::FingerprintMismatch`] if the collection was created with another
    /// fingerprint; [`StoreError::Rejected`] if `collection` is not a plain directory name
    /// (`[A-Za-z0-9_.-]`, not `.`/`..`), `fingerprint.dims` is 0, the sidecar cannot be parsed,
    /// or the directory holds data that is not a rag-ingest collection; and
    /// [`StoreError::Unavailable`] on I/O errors or if the shard cannot be loaded (for instance
    /// because another store has it open).
    pub fn open(
        data_dir: &Path,
        collection: &str,
        fingerprint: &Fingerprint,
    ) -> Result<Self, StoreError> {
        Self::open_with_maintenance(
            data_dir,
            collection,
            fingerprint,
            EdgeMaintenance::default(),
        )
    }

    /// [`EdgeStore::open`] with the given maintenance settings.
    ///
    /// Fails as [`EdgeStore::open`] does.
    pub fn open_with_maintenance(
        data_dir: &Path,
        collection: &str,
        fingerprint: &Fingerprint,
        maintenance: EdgeMaintenance,
    ) -> Result<Self, StoreError> {
        if fingerprint.dims == 0 {
            return Err(StoreError::rejected(
                "embedder fingerprint has 0 dimensions",
            ));
        }
        let dir = collection_dir(data_dir, collection)?;
        fs::create_dir_all(&dir).map_err(|e| io_error("cannot create", &dir, e))?;

        let mut config = EdgeConfig::builder().vector(
            DEFAULT_VECTOR_NAME,
            EdgeVectorParams::builder(fingerprint.dims, Distance::Cosine).build(),
        );
        if fingerprint.sparse.is_some() {
            config = config.sparse_vector(
                SPARSE_VECTOR_NAME,
                EdgeSparseVectorParams::builder()
                    .modifier(Modifier::Idf)
                    .build(),
            );
        }
        let config = config
            .optimizers(EdgeOptimizersConfig {
                vacuum_min_vector_number: Some(maintenance.vacuum_min_points),
                ..EdgeOptimizersConfig::default()
            })
            .wal_options(WalOptions {
                segment_capacity: maintenance.wal_segment_bytes.max(4096),
                ..WalOptions::default()
            })
            .build();

        let shard = match read_fingerprint(&dir)? {
            Some(stored) if stored != *fingerprint => {
                return Err(StoreError::mismatch(collection, &stored, fingerprint));
            }
            // Created earlier (possibly interrupted before the shard was complete): `load`
            // with an explicit config creates whatever is missing and checks the segments.
            Some(_) => EdgeShard::load(&dir, Some(config.clone())).map_err(map_op_err)?,
            None => {
                ensure_no_foreign_data(&dir)?;
                write_fingerprint(&dir, fingerprint)?;
                EdgeShard::new(&dir, config.clone()).map_err(map_op_err)?
            }
        };

        let shared = Shared {
            dir,
            config,
            maintenance,
            state: RwLock::new(State {
                shard: Ok(shard),
                unflushed: false,
            }),
            exclusive: Mutex::new(()),
            commits: Mutex::new(Commits::default()),
            committed: Condvar::new(),
            flushes: AtomicU64::new(0),
            wal_compactions: AtomicU64::new(0),
            optimizations: AtomicU64::new(0),
            writes_since_optimize: AtomicU64::new(0),
            injected_flush_failures: AtomicU32::new(0),
        };
        // Idempotent: an index that already exists is left as it is.
        for (field, is_tenant) in KEYWORD_INDEXES {
            shared.write(keyword_index(field, is_tenant)?)?;
        }

        Ok(Self {
            collection: collection.to_owned(),
            dims: fingerprint.dims,
            sparse: fingerprint.sparse.is_some(),
            limits: BatchLimits::default(),
            shared: Some(Arc::new(shared)),
        })
    }

    /// This store, splitting upserts by `limits` instead of the defaults (a cap of 0 counts
    /// as 1).
    pub fn with_batch_limits(mut self, limits: BatchLimits) -> Self {
        self.limits = BatchLimits {
            max_points: limits.max_points.max(1),
            max_bytes: limits.max_bytes.max(1),
        };
        self
    }

    /// The write caps this store splits upserts by.
    pub fn batch_limits(&self) -> BatchLimits {
        self.limits
    }

    /// Flushes this store has run so far (concurrent writes share them, see the module
    /// documentation).
    pub fn flushes(&self) -> u64 {
        self.counter(|shared| &shared.flushes)
    }

    /// WAL compactions this store has run so far (see [`EdgeMaintenance`]).
    pub fn wal_compactions(&self) -> u64 {
        self.counter(|shared| &shared.wal_compactions)
    }

    /// Optimizer runs so far, on their own (see [`EdgeMaintenance`]) and through
    /// [`EdgeStore::optimize`].
    pub fn optimizations(&self) -> u64 {
        self.counter(|shared| &shared.optimizations)
    }

    fn counter(&self, which: impl Fn(&Shared) -> &AtomicU64) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |shared| which(shared).load(Ordering::Relaxed))
    }

    /// Fault injection for tests: the next `count` flushes fail as a disk fault would, after
    /// their writes were applied to the shard in memory and before anything reached disk.
    /// Not part of the API: no configuration or message can reach it.
    #[doc(hidden)]
    pub fn inject_flush_failures(&self, count: u32) {
        if let Some(shared) = &self.shared {
            shared
                .injected_flush_failures
                .store(count, Ordering::Relaxed);
        }
    }

    /// The fingerprint recorded for the collection `collection` under `data_dir`, `None` if the
    /// collection does not exist (has no `rag-ingest.json`).
    ///
    /// Blocks on disk I/O. Fails with [`StoreError::Rejected`] if `collection` is not a plain
    /// directory name or the sidecar cannot be parsed, [`StoreError::Unavailable`] if it cannot
    /// be read.
    pub fn recorded_fingerprint(
        data_dir: &Path,
        collection: &str,
    ) -> Result<Option<Fingerprint>, StoreError> {
        read_fingerprint(&collection_dir(data_dir, collection)?)
    }

    /// The collection this store writes to.
    pub fn collection(&self) -> &str {
        &self.collection
    }

    /// Up to `limit` points (every tenant, tombstones included) in id order from `from` on:
    /// see [`Store::scroll`](super::Store::scroll).
    ///
    /// Fails with [`StoreError::Rejected`] if a payload is not a [`ChunkPayload`] or a point
    /// has no dense vector, [`StoreError::Unavailable`] if the read fails.
    pub async fn scroll(
        &self,
        from: Option<uuid::Uuid>,
        limit: usize,
    ) -> Result<super::PointPage, StoreError> {
        let request = ScrollRequest {
            offset: from.map(PointId::Uuid),
            limit: Some(limit.max(1)),
            filter: None,
            with_payload: Some(WithPayloadInterface::Bool(true)),
            with_vector: WithVector::Bool(true),
            order_by: None,
        };
        self.read(move |shard| {
            let (records, next) = shard.scroll(request).map_err(map_op_err)?;
            let mut points = Vec::with_capacity(records.len());
            for record in records {
                let PointId::Uuid(id) = record.id else {
                    return Err(StoreError::rejected(format!(
                        "point {} does not have a UUID id",
                        record.id
                    )));
                };
                let payload = decode_payload(&record.id, record.payload)?;
                let vector = dense_vector(record.vector.map(VectorStructPersisted::from))
                    .ok_or_else(|| {
                        StoreError::rejected(format!("point {} has no dense vector", record.id))
                    })?;
                points.push(super::StoredPoint {
                    id,
                    payload,
                    vector,
                });
            }
            let next = match next {
                Some(PointId::Uuid(id)) => Some(id),
                Some(other) => {
                    return Err(StoreError::rejected(format!(
                        "point {other} does not have a UUID id"
                    )));
                }
                None => None,
            };
            Ok(super::PointPage { points, next })
        })
        .await
    }

    /// Runs the shard's optimizers until they have nothing left to do: builds the HNSW index
    /// (and merges or vacuums segments) — useful after bulk loads. Writes wait until it ends;
    /// searches keep working.
    ///
    /// Fails with [`StoreError::Unavailable`] if an earlier flush failed and flushing again
    /// fails, or an optimizer or the flush afterwards fails.
    pub async fn optimize(&self) -> Result<(), StoreError> {
        self.run(|shared| {
            shared.reflush()?;
            let _exclusive = lock(&shared.exclusive);
            shared.optimize_locked()
        })
        .await
    }

    /// `points` checked and encoded, split into write batches by [`BatchLimits`].
    ///
    /// Fails with [`StoreError::Dimension`] on a vector of the wrong length and
    /// [`StoreError::Rejected`] on a non-finite vector, a version above
    /// [`MAX_VERSION`](super::MAX_VERSION), a payload that cannot be encoded or a point larger
    /// than the byte cap (nothing is written then).
    fn batches(
        &self,
        points: Vec<ChunkPoint>,
    ) -> Result<Vec<Vec<PointStructPersisted>>, StoreError> {
        let mut persisted = Vec::with_capacity(points.len());
        for point in points {
            check_vector(self.dims, &point.vector)?;
            check_version(point.payload.version)?;
            let payload = encode_payload(&point.payload)?;
            let sparse = match point.sparse {
                Some(sparse) if self.sparse => {
                    check_sparse(&sparse)?;
                    Some(sparse)
                }
                _ => None,
            };
            let size = point_size(
                point.vector.len(),
                sparse.as_ref().map_or(0, SparseVector::len),
                &payload,
            );
            let vector = match sparse {
                Some(sparse) => VectorStructPersisted::Named(HashMap::from([
                    (
                        DEFAULT_VECTOR_NAME.to_owned(),
                        VectorPersisted::Dense(point.vector),
                    ),
                    (
                        SPARSE_VECTOR_NAME.to_owned(),
                        VectorPersisted::Sparse(edge_sparse(sparse)),
                    ),
                ])),
                None => VectorStructPersisted::Single(point.vector),
            };
            persisted.push((
                size,
                PointStructPersisted {
                    id: PointId::Uuid(point.id),
                    vector,
                    payload: Some(payload),
                },
            ));
        }
        Ok(split_batches(persisted, 0, self.limits, |(size, _)| *size)?
            .into_iter()
            .map(|batch| batch.into_iter().map(|(_, point)| point).collect())
            .collect())
    }

    /// Runs `f` on the blocking pool; a panic or cancelled task becomes
    /// [`StoreError::Unavailable`]. Failures name this store's collection.
    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Shared) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = self
            .shared
            .clone()
            .ok_or_else(|| StoreError::unavailable("vector store is closed"))?;
        let collection = &self.collection;
        tokio::task::spawn_blocking(move || f(&shared))
            .await
            .map_err(|e| {
                StoreError::Unavailable(StoreFailure::caused_by(
                    "vector store operation",
                    collection,
                    format!("the blocking task failed: {e}"),
                    e,
                ))
            })?
            .map_err(|e| e.during("", collection))
    }

    /// Runs `f` on the shard on the blocking pool once it holds only durable state (see
    /// [`Shared::read`]).
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&EdgeShard) -> Result<T, StoreError> + Send + 'static,
    {
        self.run(move |shared| shared.read(f)).await
    }
}

impl Drop for EdgeStore {
    fn drop(&mut self) {
        // Dropping the last `EdgeShard` flushes it (blocking I/O). Keep that off the async
        // worker threads where Tokio allows it.
        let Some(shared) = self.shared.take() else {
            return;
        };
        let multi_thread = Handle::try_current()
            .is_ok_and(|handle| handle.runtime_flavor() == RuntimeFlavor::MultiThread);
        if multi_thread {
            tokio::task::block_in_place(move || drop(shared));
        } else {
            drop(shared);
        }
    }
}

impl VectorStore for EdgeStore {
    /// Upserts `points` in batches (see [`BatchLimits`]) under one lock and flushes the shard
    /// once (see the module documentation).
    ///
    /// Fails with [`StoreError::Dimension`] if a vector has the wrong length,
    /// [`StoreError::Rejected`] if a vector holds NaN/infinity, a version is above
    /// [`MAX_VERSION`](super::MAX_VERSION), a payload cannot be encoded or one point is larger
    /// than the byte cap (in all these cases nothing is written), [`StoreError::Unavailable`]
    /// if the write or the flush fails.
    async fn upsert(&self, points: Vec<ChunkPoint>) -> Result<(), StoreError> {
        if points.is_empty() {
            return Ok(());
        }
        let operations = self
            .batches(points)?
            .into_iter()
            .map(|batch| {
                UpdateOperation::PointOperation(PointOperations::UpsertPoints(
                    PointInsertOperations::PointsList(batch),
                ))
            })
            .collect();
        self.run(move |shared| shared.write_all(operations)).await
    }

    /// Upserts like [`EdgeStore::upsert`] with the condition "the stored point is older than
    /// `order`" (qdrant-edge's conditional upsert: new points are inserted, existing ones
    /// replaced only where the condition holds), checked under the shard's update lock.
    ///
    /// Fails like [`EdgeStore::upsert`], and with [`StoreError::Rejected`] if `order` is out
    /// of range or a payload does not carry it.
    async fn upsert_newer(&self, points: Vec<ChunkPoint>, order: Order) -> Result<(), StoreError> {
        if points.is_empty() {
            return Ok(());
        }
        check_points_order(&points, order)?;
        let condition = older_filter(order)?;
        let operations = self
            .batches(points)?
            .into_iter()
            .map(|batch| {
                UpdateOperation::PointOperation(PointOperations::UpsertPointsConditional(
                    ConditionalInsertOperation {
                        points_op: PointInsertOperations::PointsList(batch),
                        condition: condition.clone(),
                        update_mode: None,
                    },
                ))
            })
            .collect();
        self.run(move |shared| shared.write_all(operations)).await
    }

    /// Deletes by filter: `tenant_id == tenant AND document_id == document_id AND (order
    /// older than `order`)`, then flushes.
    ///
    /// Fails with [`StoreError::Rejected`] if `order` is out of range,
    /// [`StoreError::Unavailable`] if the delete or the flush fails.
    async fn delete_older(
        &self,
        tenant: &TenantId,
        document_id: &str,
        order: Order,
    ) -> Result<(), StoreError> {
        order.check()?;
        let mut filter = scope_filter(tenant, Some(document_id))?;
        if let Some(must) = filter.must.as_mut() {
            must.push(Condition::Filter(older_filter(order)?));
        }
        let operation =
            UpdateOperation::PointOperation(PointOperations::DeletePointsByFilter(filter));
        self.run(move |shared| shared.write(operation)).await
    }

    /// Retrieves point [`point_id`]`(tenant, document_id, 0)`.
    ///
    /// Fails with [`StoreError::Rejected`] if its payload is not a [`ChunkPayload`] or belongs to
    /// another tenant or document (never returned), [`StoreError::Unavailable`] if the read
    /// fails.
    async fn first_chunk(
        &self,
        tenant: &TenantId,
        document_id: &str,
    ) -> Result<Option<ChunkPayload>, StoreError> {
        let id = PointId::Uuid(point_id(tenant, document_id, 0));
        let tenant = tenant.as_str().to_owned();
        let document_id = document_id.to_owned();
        self.read(move |shard| {
            let records = shard
                .retrieve(
                    &[id],
                    Some(WithPayloadInterface::Bool(true)),
                    Some(WithVector::Bool(false)),
                )
                .map_err(map_op_err)?;
            let Some(record) = records.into_iter().next() else {
                return Ok(None);
            };
            let payload = decode_payload(&record.id, record.payload)?;
            check_owner(&payload, &tenant, &document_id, &record.id)?;
            Ok(Some(payload))
        })
        .await
    }

    /// Retrieves points [`point_id`]`(tenant, document_id, i)` for `i` in `0..chunk_count`
    /// with payloads and vectors.
    ///
    /// Fails with [`StoreError::Rejected`] if a payload is not a [`ChunkPayload`] of that
    /// tenant and document or a point has no dense vector, [`StoreError::Unavailable`] if the
    /// read fails.
    async fn chunk_vectors(
        &self,
        tenant: &TenantId,
        document_id: &str,
        chunk_count: usize,
    ) -> Result<Vec<StoredChunk>, StoreError> {
        let ids: Vec<PointId> = (0..chunk_count)
            .map(|index| PointId::Uuid(point_id(tenant, document_id, index)))
            .collect();
        let tenant = tenant.as_str().to_owned();
        let document_id = document_id.to_owned();
        self.read(move |shard| {
            let records = shard
                .retrieve(
                    &ids,
                    Some(WithPayloadInterface::Bool(true)),
                    Some(WithVector::Bool(true)),
                )
                .map_err(map_op_err)?;
            let mut chunks = Vec::with_capacity(records.len());
            for record in records {
                let payload = decode_payload(&record.id, record.payload)?;
                check_owner(&payload, &tenant, &document_id, &record.id)?;
                if payload.tombstone {
                    continue;
                }
                chunks.push(
                    match dense_vector(record.vector.map(VectorStructPersisted::from)) {
                        Some(vector) => StoredChunk { payload, vector },
                        None => {
                            return Err(StoreError::rejected(format!(
                                "point {} has no dense vector",
                                record.id
                            )));
                        }
                    },
                );
            }
            Ok(chunks)
        })
        .await
    }

    /// Deletes by filter: `tenant_id == tenant AND document_id == document_id AND NOT
    /// (the point belongs to keep)` (the last condition only when `keep` is given), then
    /// flushes.
    ///
    /// Fails with [`StoreError::Rejected`] if `keep.version` is above
    /// [`MAX_VERSION`](super::MAX_VERSION), [`StoreError::Unavailable`] if the delete or the
    /// flush fails.
    async fn delete_document(
        &self,
        tenant: &TenantId,
        document_id: &str,
        keep: Option<&Revision>,
    ) -> Result<(), StoreError> {
        let mut filter = scope_filter(tenant, Some(document_id))?;
        if let Some(keep) = keep {
            filter.must_not = Some(vec![Condition::Filter(revision_filter(keep, true)?)]);
        }
        let operation =
            UpdateOperation::PointOperation(PointOperations::DeletePointsByFilter(filter));
        self.run(move |shared| shared.write(operation)).await
    }

    /// Sets the payload keys `version`, `metadata` and `order` on the points matching
    /// `tenant_id == tenant AND document_id == document_id AND content_sha256 ==
    /// revision.content_sha256 AND chunk_count == revision.chunk_count AND (order older than
    /// `order`)`, then flushes. A `None` version removes the key
    /// (read back as `None`).
    ///
    /// Fails with [`StoreError::Rejected`] if `version` is above
    /// [`MAX_VERSION`](super::MAX_VERSION), [`StoreError::Unavailable`] if the write or the
    /// flush fails.
    async fn relabel_document(
        &self,
        tenant: &TenantId,
        document_id: &str,
        revision: &Revision,
        version: Option<u64>,
        metadata: &serde_json::Map<String, serde_json::Value>,
        order: Order,
    ) -> Result<(), StoreError> {
        check_version(version)?;
        order.check()?;
        let mut filter = scope_filter(tenant, Some(document_id))?;
        if let Some(must) = filter.must.as_mut() {
            must.push(Condition::Filter(revision_filter(revision, false)?));
            must.push(Condition::Filter(older_filter(order)?));
        }
        let mut payload = serde_json::Map::new();
        payload.insert("version".to_owned(), serde_json::json!(version));
        payload.insert(
            "metadata".to_owned(),
            serde_json::Value::Object(metadata.clone()),
        );
        payload.insert(ORDER_FIELD.to_owned(), encode_order(order)?);
        let operation = UpdateOperation::PayloadOperation(PayloadOps::SetPayload(SetPayloadOp {
            payload: Payload(payload),
            points: None,
            filter: Some(filter),
            key: None,
        }));
        self.run(move |shared| shared.write(operation)).await
    }

    /// Deletes by the filter `tenant_id == tenant`, then flushes.
    ///
    /// Fails with [`StoreError::Unavailable`] if the delete or the flush fails.
    async fn purge_tenant(&self, tenant: &TenantId) -> Result<(), StoreError> {
        let filter = scope_filter(tenant, None)?;
        let operation =
            UpdateOperation::PointOperation(PointOperations::DeletePointsByFilter(filter));
        self.run(move |shared| shared.write(operation)).await
    }

    /// Nearest-neighbour query restricted to `tenant_id == request.tenant` and the metadata
    /// conditions, with the score threshold, with payloads.
    ///
    /// Fails with [`StoreError::Dimension`] if the vector has the wrong length,
    /// [`StoreError::Rejected`] if it holds NaN/infinity, the request is invalid (see
    /// [`SearchRequest::validate`]) or a hit's payload is not a [`ChunkPayload`] of the tenant,
    /// [`StoreError::Unavailable`] if the query fails.
    async fn search(&self, request: SearchRequest) -> Result<Vec<ScoredChunk>, StoreError> {
        if request.mode.uses_dense() {
            check_vector(self.dims, &request.vector)?;
        }
        request.validate()?;
        if request.mode.uses_sparse() && !self.sparse {
            return Err(no_sparse_vectors(&self.collection));
        }
        if request.top_k == 0 {
            return Ok(Vec::new());
        }
        let mut filter = scope_filter(&request.tenant, None)?;
        if let Some(must) = filter.must.as_mut() {
            for (key, value) in &request.filter.metadata {
                must.push(metadata_match(key, value)?);
            }
        }
        filter.must_not = Some(vec![not_tombstone()?]);
        let min_score = request.min_score;
        let mode = request.mode;
        let fusion = request.fusion;
        let top_k = request.top_k;
        let dense = NamedQuery::default_dense(request.vector);
        let sparse = request.sparse.map(|sparse| {
            NamedQuery::new(
                VectorInternal::Sparse(edge_sparse(sparse)),
                SPARSE_VECTOR_NAME,
            )
        });
        let tenant = request.tenant.as_str().to_owned();
        self.read(move |shard| {
            let query = |query: ScoringQuery, limit: usize, threshold: Option<f32>| QueryRequest {
                prefetches: Vec::new(),
                query: Some(query),
                filter: Some(filter.clone()),
                score_threshold: threshold.map(OrderedFloat),
                limit,
                offset: 0,
                params: None,
                with_vector: WithVector::Bool(false),
                with_payload: WithPayloadInterface::Bool(true),
            };
            let nearest =
                |named: NamedQuery<VectorInternal>| ScoringQuery::Vector(QueryEnum::Nearest(named));
            let hits = match (mode, sparse) {
                (SearchMode::Dense, _) => {
                    let hits = shard
                        .query(query(nearest(dense), top_k, min_score))
                        .map_err(map_op_err)?;
                    ranked(hits, &tenant, min_score, |rank| BranchRanks {
                        dense: Some(rank),
                        sparse: None,
                    })?
                }
                (SearchMode::Sparse, Some(sparse)) => {
                    let hits = shard
                        .query(query(nearest(sparse), top_k, min_score))
                        .map_err(map_op_err)?;
                    ranked(hits, &tenant, min_score, |rank| BranchRanks {
                        dense: None,
                        sparse: Some(rank),
                    })?
                }
                (SearchMode::Hybrid, Some(sparse)) => {
                    let candidates = hybrid_candidates(top_k);
                    let branch = |named: NamedQuery<VectorInternal>| Prefetch {
                        prefetches: Vec::new(),
                        query: Some(nearest(named)),
                        limit: candidates,
                        params: None,
                        filter: Some(filter.clone()),
                        score_threshold: None,
                    };
                    let fused = QueryRequest {
                        prefetches: vec![branch(dense.clone()), branch(sparse.clone())],
                        ..query(
                            ScoringQuery::Fusion(match fusion {
                                super::Fusion::Rrf { k } => Fusion::Rrf {
                                    k: k as usize,
                                    weights: None,
                                },
                                super::Fusion::Dbsf => Fusion::Dbsf,
                            }),
                            top_k,
                            min_score,
                        )
                    };
                    let hits = shard.query(fused).map_err(map_op_err)?;
                    let ids = |query: QueryRequest| -> Result<Vec<PointId>, StoreError> {
                        Ok(shard
                            .query(QueryRequest {
                                with_payload: WithPayloadInterface::Bool(false),
                                ..query
                            })
                            .map_err(map_op_err)?
                            .into_iter()
                            .map(|hit| hit.id)
                            .collect())
                    };
                    let dense_ids = ids(query(nearest(dense), candidates, None))?;
                    let sparse_ids = ids(query(nearest(sparse), candidates, None))?;
                    let mut hits: Vec<(PointId, ScoredChunk)> = hits
                        .into_iter()
                        .filter(|hit| !min_score.is_some_and(|min| hit.score < min))
                        .map(|hit| Ok((hit.id, scored(hit, &tenant)?)))
                        .collect::<Result<_, StoreError>>()?;
                    assign_ranks(&mut hits, &dense_ids, &sparse_ids);
                    hits.into_iter().map(|(_, hit)| hit).collect()
                }
                (_, None) => {
                    return Err(StoreError::rejected(
                        "a keyword search needs a sparse vector",
                    ));
                }
            };
            Ok(hits)
        })
        .await
    }

    /// Exact count with the filter `tenant_id == tenant` (and `document_id == document_id`),
    /// tombstones left out.
    ///
    /// Fails with [`StoreError::Unavailable`] if the count fails.
    async fn count(
        &self,
        tenant: &TenantId,
        document_id: Option<&str>,
    ) -> Result<usize, StoreError> {
        let mut filter = scope_filter(tenant, document_id)?;
        filter.must_not = Some(vec![not_tombstone()?]);
        let request = CountRequest {
            filter: Some(filter),
            exact: true,
        };
        self.read(move |shard| shard.count(request).map_err(map_op_err))
            .await
    }
}

/// Bytes a point counts for against [`BatchLimits::max_bytes`]: 4 per dense vector value, 8
/// per sparse term (id and weight), the payload as JSON, and 64 for ids and framing.
fn point_size(dims: usize, sparse_terms: usize, payload: &Payload) -> usize {
    let json = serde_json::to_vec(&payload.0).map(|v| v.len()).unwrap_or(0);
    dims * 4 + sparse_terms * 8 + json + 64
}

/// The dense (default) vector of a stored point's vectors, if it has one.
fn dense_vector(vectors: Option<VectorStructPersisted>) -> Option<Vec<f32>> {
    match vectors? {
        VectorStructPersisted::Single(vector) => Some(vector),
        VectorStructPersisted::Named(mut named) => match named.remove(DEFAULT_VECTOR_NAME)? {
            VectorPersisted::Dense(vector) => Some(vector),
            _ => None,
        },
        VectorStructPersisted::MultiDense(_) => None,
    }
}

/// `sparse` as Qdrant Edge's type.
fn edge_sparse(sparse: SparseVector) -> qdrant_edge::SparseVector {
    qdrant_edge::SparseVector {
        indices: sparse.indices,
        values: sparse.values,
    }
}

/// A search hit as a [`ScoredChunk`] (ranks unset).
///
/// Fails with [`StoreError::Rejected`] if its payload is not a [`ChunkPayload`] of `tenant`.
fn scored(hit: qdrant_edge::ScoredPoint, tenant: &str) -> Result<ScoredChunk, StoreError> {
    let payload = decode_payload(&hit.id, hit.payload)?;
    if payload.tenant_id != tenant {
        return Err(StoreError::rejected(format!(
            "search for tenant {tenant} matched point {} of another tenant",
            hit.id
        )));
    }
    Ok(ScoredChunk {
        score: hit.score,
        ranks: BranchRanks::default(),
        payload,
    })
}

/// The hits of a one-branch search, best first, with `ranks(rank)` (rank counting from 1);
/// hits under `min_score` are left out.
///
/// Fails like [`scored`].
fn ranked(
    hits: Vec<qdrant_edge::ScoredPoint>,
    tenant: &str,
    min_score: Option<f32>,
    ranks: impl Fn(usize) -> BranchRanks,
) -> Result<Vec<ScoredChunk>, StoreError> {
    let mut chunks = Vec::with_capacity(hits.len());
    for hit in hits {
        if min_score.is_some_and(|min| hit.score < min) {
            continue;
        }
        let mut chunk = scored(hit, tenant)?;
        chunk.ranks = ranks(chunks.len() + 1);
        chunks.push(chunk);
    }
    Ok(chunks)
}

/// The filter "belongs to `revision`": same content hash and chunk count, and (when
/// `with_version`) the same version, or no version when `revision.version` is `None`.
fn revision_filter(revision: &Revision, with_version: bool) -> Result<Filter, StoreError> {
    check_version(revision.version)?;
    let mut must = vec![
        keyword_match("content_sha256", &revision.content_sha256)?,
        integer_match("chunk_count", revision.chunk_count)?,
    ];
    if with_version {
        must.push(match revision.version {
            Some(v) => integer_match("version", v)?,
            None => Condition::IsEmpty(IsEmptyCondition::from(json_path("version")?)),
        });
    }
    Ok(Filter {
        should: None,
        min_should: None,
        must: Some(must),
        must_not: None,
    })
}

/// The filter "the point's order is older than `order`" (see [`Order::older_terms`]).
fn older_filter(order: Order) -> Result<Filter, StoreError> {
    let mut should = Vec::new();
    for conjunction in order.older_terms() {
        let mut must = Vec::with_capacity(conjunction.len());
        for term in conjunction {
            must.push(match term {
                OrderTerm::Less(field, value) => Condition::Field(FieldCondition::new_range(
                    json_path(field)?,
                    Range {
                        lt: Some(OrderedFloat(value as f64)),
                        gt: None,
                        gte: None,
                        lte: None,
                    },
                )),
                OrderTerm::Equal(field, value) => integer_match(field, value)?,
                OrderTerm::Missing => {
                    Condition::IsEmpty(IsEmptyCondition::from(json_path(ORDER_FIELD)?))
                }
            });
        }
        should.push(Condition::Filter(Filter {
            should: None,
            min_should: None,
            must: Some(must),
            must_not: None,
        }));
    }
    Ok(Filter {
        should: Some(should),
        min_should: None,
        must: None,
        must_not: None,
    })
}

/// The condition "is a tombstone" (for `must_not`).
fn not_tombstone() -> Result<Condition, StoreError> {
    Ok(Condition::Field(FieldCondition::new_match(
        json_path(TOMBSTONE_FIELD)?,
        Match::new_value(ValueVariants::Bool(true)),
    )))
}

/// `order` as stored in a payload.
fn encode_order(order: Order) -> Result<serde_json::Value, StoreError> {
    serde_json::to_value(order)
        .map_err(|e| StoreError::rejected(format!("cannot encode write order: {e}")))
}

/// The condition `metadata.<key> == value`.
fn metadata_match(key: &str, value: &MetadataValue) -> Result<Condition, StoreError> {
    super::validate_metadata_key(key).map_err(StoreError::rejected)?;
    let value = match value {
        MetadataValue::String(s) => ValueVariants::String(s.clone()),
        MetadataValue::Integer(i) => ValueVariants::Integer(*i),
        MetadataValue::Bool(b) => ValueVariants::Bool(*b),
    };
    Ok(Condition::Field(FieldCondition::new_match(
        json_path(&format!("metadata.{key}"))?,
        Match::new_value(value),
    )))
}

/// The condition `field == value` on an integer payload field.
fn integer_match(field: &str, value: impl TryInto<i64>) -> Result<Condition, StoreError> {
    let value = value.try_into().map_err(|_| {
        StoreError::rejected(format!("{field} is too large to compare in a filter"))
    })?;
    Ok(Condition::Field(FieldCondition::new_match(
        json_path(field)?,
        Match::new_value(ValueVariants::Integer(value)),
    )))
}

/// `data_dir/<collection>`, after checking that `collection` is a plain directory name.
fn collection_dir(data_dir: &Path, collection: &str) -> Result<PathBuf, StoreError> {
    let plain = !collection.is_empty()
        && collection != "."
        && collection != ".."
        && collection
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !plain {
        return Err(StoreError::rejected(format!(
            "collection name {collection:?} may only contain letters, digits, '_', '.' and '-' \
             (and may not be empty, '.' or '..')"
        )));
    }
    Ok(data_dir.join(collection))
}

/// The fingerprint in `dir`'s sidecar, `None` if there is none.
fn read_fingerprint(dir: &Path) -> Result<Option<Fingerprint>, StoreError> {
    let path = dir.join(FINGERPRINT_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("cannot read", &path, e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        StoreError::rejected(format!(
            "{} is not a valid embedder fingerprint: {e}",
            path.display()
        ))
    })
}

/// Fails with [`StoreError::Rejected`] if `dir` (which has no sidecar) holds anything but a
/// leftover temporary sidecar: it is not ours to overwrite.
fn ensure_no_foreign_data(dir: &Path) -> Result<(), StoreError> {
    let entries = fs::read_dir(dir).map_err(|e| io_error("cannot list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("cannot list", dir, e))?;
        if entry.file_name() != FINGERPRINT_TMP_FILE {
            return Err(StoreError::rejected(format!(
                "{} is not empty but has no {FINGERPRINT_FILE}: it is not a rag-ingest \
                 collection; use another collection name or data directory",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Writes `fingerprint` to `dir`'s sidecar atomically (temporary file, fsync, rename, fsync of
/// the directory).
fn write_fingerprint(dir: &Path, fingerprint: &Fingerprint) -> Result<(), StoreError> {
    let json = serde_json::to_vec_pretty(fingerprint).map_err(|e| {
        StoreError::rejected(format!("cannot encode the embedder fingerprint: {e}"))
    })?;
    let tmp = dir.join(FINGERPRINT_TMP_FILE);
    let path = dir.join(FINGERPRINT_FILE);
    let mut file = File::create(&tmp).map_err(|e| io_error("cannot create", &tmp, e))?;
    file.write_all(&json)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error("cannot write", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| io_error("cannot create", &path, e))?;
    sync_dir(dir)
}

/// Makes the directory entries of `dir` durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("cannot sync", dir, e))
}

/// Directories cannot be opened for syncing on this platform; the rename is all we can do.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), StoreError> {
    Ok(())
}

/// A failed file operation (`action`, e.g. `cannot read`, on `path`) as
/// [`StoreError::Unavailable`], keeping the I/O error as its source.
fn io_error(action: &str, path: &Path, e: io::Error) -> StoreError {
    StoreError::Unavailable(StoreFailure {
        reason: format!("{action} {}: {e}", path.display()),
        source: Some(e.into()),
        ..StoreFailure::new("")
    })
}

/// The operation creating a keyword index on `field`.
fn keyword_index(field: &str, is_tenant: bool) -> Result<UpdateOperation, StoreError> {
    let params = KeywordIndexParams {
        is_tenant: Some(is_tenant),
        ..KeywordIndexParams::default()
    };
    Ok(UpdateOperation::FieldIndexOperation(
        FieldIndexOperations::CreateIndex(CreateIndex {
            field_name: json_path(field)?,
            field_schema: Some(PayloadFieldSchema::FieldParams(
                PayloadSchemaParams::Keyword(params),
            )),
        }),
    ))
}

/// The filter `tenant_id == tenant` (AND `document_id == document_id` when given).
fn scope_filter(tenant: &TenantId, document_id: Option<&str>) -> Result<Filter, StoreError> {
    let mut must = vec![keyword_match("tenant_id", tenant.as_str())?];
    if let Some(document_id) = document_id {
        must.push(keyword_match("document_id", document_id)?);
    }
    Ok(Filter {
        should: None,
        min_should: None,
        must: Some(must),
        must_not: None,
    })
}

/// The condition `field == value` on a keyword payload field.
fn keyword_match(field: &str, value: &str) -> Result<Condition, StoreError> {
    Ok(Condition::Field(FieldCondition::new_match(
        json_path(field)?,
        Match::new_value(ValueVariants::String(value.to_owned())),
    )))
}

fn json_path(field: &str) -> Result<JsonPath, StoreError> {
    JsonPath::try_from(field)
        .map_err(|()| StoreError::rejected(format!("invalid payload field path {field:?}")))
}

/// `payload` as a point payload (its fields at the top level).
fn encode_payload(payload: &ChunkPayload) -> Result<Payload, StoreError> {
    match serde_json::to_value(payload) {
        Ok(serde_json::Value::Object(map)) => Ok(Payload(map)),
        Ok(other) => Err(StoreError::rejected(format!(
            "chunk payload encoded to a JSON {other} instead of an object"
        ))),
        Err(e) => Err(StoreError::rejected(format!(
            "cannot encode chunk payload: {e}"
        ))),
    }
}

/// The [`ChunkPayload`] stored in point `id`; [`StoreError::Rejected`] if it has none or it
/// does not deserialize.
fn decode_payload(id: &PointId, payload: Option<Payload>) -> Result<ChunkPayload, StoreError> {
    let payload =
        payload.ok_or_else(|| StoreError::rejected(format!("point {id} has no payload")))?;
    serde_json::from_value(serde_json::Value::Object(payload.0)).map_err(|e| {
        StoreError::rejected(format!(
            "point {id} does not hold a rag-ingest chunk payload: {e}"
        ))
    })
}

/// Transient failures (I/O, corruption, timeouts) become [`StoreError::Unavailable`], everything
/// else (invalid requests) [`StoreError::Rejected`]; the engine's error is kept as the source.
fn map_op_err(e: OperationError) -> StoreError {
    let failure = |e: OperationError| StoreFailure {
        reason: e.to_string(),
        source: Some(e.into()),
        ..StoreFailure::new("")
    };
    match e {
        OperationError::ServiceError { .. }
        | OperationError::InconsistentStorage { .. }
        | OperationError::OutOfMemory { .. }
        | OperationError::Cancelled { .. }
        | OperationError::Timeout { .. } => StoreError::Unavailable(failure(e)),
        OperationError::WrongVectorDimension {
            expected_dim,
            received_dim,
        } => StoreError::Dimension {
            expected: expected_dim,
            got: received_dim,
        },
        OperationError::VectorNameNotExists { .. }
        | OperationError::PointIdError { .. }
        | OperationError::TypeError { .. }
        | OperationError::TypeInferenceError { .. }
        | OperationError::ValidationError { .. }
        | OperationError::WrongSparse
        | OperationError::WrongMulti
        | OperationError::MissingRangeIndexForOrderBy { .. }
        | OperationError::MissingMapIndexForFacet { .. }
        | OperationError::VariableTypeError { .. }
        | OperationError::NonFiniteNumber { .. } => StoreError::Rejected(failure(e)),
    }
}
