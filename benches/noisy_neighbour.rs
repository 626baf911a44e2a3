//! Noisy neighbour: how long a tenant's live edit takes from submit to stored while another
//! tenant backfills (release; needs RabbitMQ):
//!
//! ```text
//! cargo bench --bench noisy_neighbour
//! ```
//!
//! One `rag-ingest worker` process with the shipped `pipelines/docs.toml` (its own queues
//! and Qdrant Edge directory). Tenant B (`acme`) submits one document per second on the live
//! lane; each edit's latency runs from just before its publish to the worker's log line
//! saying it was stored (the line's own timestamp; one machine, one clock).
//!
//! 1. **Idle**: [`IDLE_EDITS`] edits with nothing else queued.
//! 2. **Under backfill**: tenant A (`globex`) publishes [`BACKFILL`] documents on the bulk
//!    lane (`Submitter::with_lane(Lane::Bulk)`, what `submit --bulk` does), then B submits
//!    [`BACKFILL_EDITS`] edits while the backfill is processed. The bench checks that the
//!    backfill was still queued when the last edit was stored (else the phase did not
//!    measure what it says), then waits for the whole backfill.
//!
//! Reported: p50 and p99 (nearest rank) of each phase, and one forward pass of the model
//! (`embedder.batch_size` texts of 256 tokens, measured before the worker starts). The goal
//! (issue 19): p99 under the backfill ≤ 2 × idle p99 + one forward pass; the bench fails
//! (after printing every figure) if it is missed, if the worker retried or dead-lettered
//! anything, or if a message is missing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rag_ingest::embed::CandleEmbedder;
use rag_ingest::lane::Lane;
use rag_ingest::message::Document;
use rag_ingest::queue::{Submitter, Topology};
use rag_ingest::tenant::TenantId;
use serde_json::Value;

#[path = "support/mod.rs"]
mod support;

use support::{BenchPipeline, WorkerBinary, WorkerProcess};

/// Live edits with nothing else queued.
const IDLE_EDITS: usize = 30;
/// Documents of the backfill.
const BACKFILL: usize = 5_000;
/// Live edits during the backfill.
const BACKFILL_EDITS: usize = 90;
/// Time between two live edits.
const EDIT_EVERY: Duration = Duration::from_secs(1);

/// The `p`-th percentile (nearest rank) of `sorted`.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds of `d`, for printing.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The document id and log timestamp of every `message_settled` line of `log` with outcome
/// `stored`, and the lane it came from.
fn stored_at(log: &str) -> HashMap<String, (chrono::DateTime<chrono::Utc>, String)> {
    let mut out = HashMap::new();
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["fields"]["event"] != "message_settled" || v["fields"]["outcome"] != "stored" {
            continue;
        }
        let (Some(id), Some(ts)) = (v["span"]["document_id"].as_str(), v["timestamp"].as_str())
        else {
            continue;
        };
        let Ok(at) = chrono::DateTime::parse_from_rfc3339(ts) else {
            continue;
        };
        let lane = v["span"]["lane"].as_str().unwrap_or("").to_owned();
        out.insert(id.to_owned(), (at.with_timezone(&chrono::Utc), lane));
    }
    out
}

/// `n` live edits of tenant B named `<prefix>-NNN`.
fn edits(prefix: &str, n: usize) -> Vec<Document> {
    let acme = TenantId::new("acme").expect("tenant");
    support::realistic_docs(prefix, n)
        .into_iter()
        .map(|mut d| {
            d.tenant = acme.clone();
            d
        })
        .collect()
}

/// Submits `docs` one every [`EDIT_EVERY`] on the live lane; returns each one's publish time.
fn submit_paced(
    rt: &tokio::runtime::Runtime,
    submitter: &Submitter,
    docs: &[Document],
) -> Vec<(String, chrono::DateTime<chrono::Utc>)> {
    let mut sent = Vec::with_capacity(docs.len());
    let start = Instant::now();
    for (i, doc) in docs.iter().enumerate() {
        // The workload: one edit per second (pacing, not synchronisation).
        let due = start + EDIT_EVERY * u32::try_from(i).expect("few edits");
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let at = chrono::Utc::now();
        rt.block_on(submitter.submit(doc))
            .unwrap_or_else(|e| panic!("BENCH FAILED: {} not confirmed: {e}", doc.document_id));
        sent.push((doc.document_id.clone(), at));
    }
    sent
}

/// Waits until the worker logged every one of `ids` as stored; panics after `timeout`.
fn wait_stored(worker: &mut WorkerProcess, ids: &[String], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let stored = stored_at(&worker.log());
        if ids.iter().all(|id| stored.contains_key(id)) {
            return;
        }
        if let Some(status) = worker.exited() {
            panic!(
                "BENCH FAILED: the worker exited ({status}):\n{}",
                worker.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "BENCH FAILED: {} of {} edits stored within {timeout:?}",
            ids.iter().filter(|id| stored.contains_key(*id)).count(),
            ids.len()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Latencies (publish → stored) of `sent`, sorted; panics if one was not stored on the live
/// lane.
fn latencies(log: &str, sent: &[(String, chrono::DateTime<chrono::Utc>)]) -> Vec<Duration> {
    let stored = stored_at(log);
    let mut out: Vec<Duration> = sent
        .iter()
        .map(|(id, at)| {
            let (done, lane) = stored
                .get(id)
                .unwrap_or_else(|| panic!("BENCH FAILED: {id} was not stored"));
            assert_eq!(lane, "live", "BENCH FAILED: {id} came from the {lane} lane");
            (*done - *at).to_std().unwrap_or(Duration::ZERO)
        })
        .collect();
    out.sort();
    out
}

/// One forward pass of the shipped model: `batch_size` texts of 256 tokens (the median of
/// three, after a warm-up).
fn forward_pass(batch_size: usize) -> Duration {
    let embedder =
        CandleEmbedder::load(&support::model_dir(), batch_size).expect("the model loads");
    let text = support::fixtures()
        .iter()
        .map(|f| f.text.as_str())
        .collect::<Vec<_>>()
        .join(" ");
    // Long enough to be truncated to the model's 256 tokens.
    let texts: Vec<&str> = (0..batch_size).map(|_| text.as_str()).collect();
    let _ = embedder.embed_blocking(&texts).expect("warm-up");
    let mut runs: Vec<Duration> = (0..3)
        .map(|_| {
            let started = Instant::now();
            embedder.embed_blocking(&texts).expect("forward pass");
            started.elapsed()
        })
        .collect();
    runs.sort();
    runs[1]
}

fn main() {
    let rt = support::runtime();
    rt.block_on(support::require_broker());
    let binary = WorkerBinary::snapshot();
    let pipeline = BenchPipeline::new("noisy", |_| {});
    let config = &pipeline.config;
    let pass = forward_pass(config.embedder.batch_size);
    eprintln!(
        "noisy_neighbour: one forward pass ({} × 256 tokens) {:.0} ms; worker.concurrency {}, \
         bulk_concurrency {}, prefetch {}",
        config.embedder.batch_size,
        ms(pass),
        config.worker.concurrency,
        config.worker.bulk_slots(),
        config.broker.prefetch
    );

    let mut worker = WorkerProcess::start(&binary, &pipeline.file, &[]);
    worker.wait_for(&support::CONSUMING, 2, Duration::from_secs(120));
    let live = rt
        .block_on(Submitter::connect(config))
        .expect("the submitter connects");

    // 1. Idle.
    let idle_docs = edits("idle", IDLE_EDITS);
    let idle_sent = submit_paced(&rt, &live, &idle_docs);
    let ids: Vec<String> = idle_sent.iter().map(|(id, _)| id.clone()).collect();
    wait_stored(&mut worker, &ids, Duration::from_secs(60));
    let idle = latencies(&worker.log(), &idle_sent);

    // 2. Under a backfill.
    let globex = TenantId::new("globex").expect("tenant");
    let backfill: Vec<Document> = support::realistic_docs("backfill", BACKFILL)
        .into_iter()
        .map(|mut d| {
            d.tenant = globex.clone();
            d.version = Some(1);
            d
        })
        .collect();
    let bulk = rt
        .block_on(Submitter::connect(config))
        .expect("the bulk submitter connects")
        .with_lane(Lane::Bulk);
    let published = Instant::now();
    for (doc, result) in backfill
        .iter()
        .zip(rt.block_on(bulk.submit_all(&backfill, |_, _| {})))
    {
        if let Err(e) = result {
            panic!("BENCH FAILED: {} not confirmed: {e}", doc.document_id);
        }
    }
    eprintln!(
        "noisy_neighbour: {BACKFILL} backfill documents published on the bulk lane in {:.1} s",
        published.elapsed().as_secs_f64()
    );
    let busy_docs = edits("busy", BACKFILL_EDITS);
    let busy_sent = submit_paced(&rt, &live, &busy_docs);
    let ids: Vec<String> = busy_sent.iter().map(|(id, _)| id.clone()).collect();
    wait_stored(&mut worker, &ids, Duration::from_secs(120));
    let probe = rt.block_on(support::QueueProbe::connect());
    let bulk_left = rt.block_on(probe.ready(&Topology::new(config).lane_queue(Lane::Bulk)));
    let busy = latencies(&worker.log(), &busy_sent);
    let backfill_stored_then = stored_at(&worker.log())
        .values()
        .filter(|(_, lane)| lane == "bulk")
        .count();

    // The whole backfill.
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let done = stored_at(&worker.log())
            .values()
            .filter(|(_, lane)| lane == "bulk")
            .count();
        if done >= BACKFILL {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "BENCH FAILED: {done} of {BACKFILL} backfill documents stored within 30 minutes"
        );
        if let Some(status) = worker.exited() {
            panic!("BENCH FAILED: the worker exited ({status})");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let backfill_secs = published.elapsed().as_secs_f64();
    rt.block_on(probe.close());
    rt.block_on(live.close());
    rt.block_on(bulk.close());
    worker.signal("TERM");
    let (status, log) = worker.wait_exit_blocking(Duration::from_secs(120));
    support::check_clean_exit(
        status,
        &log,
        (IDLE_EDITS + BACKFILL_EDITS + BACKFILL) as u64,
    );

    let (idle_p50, idle_p99) = (percentile(&idle, 50.0), percentile(&idle, 99.0));
    let (busy_p50, busy_p99) = (percentile(&busy, 50.0), percentile(&busy, 99.0));
    let goal = idle_p99 * 2 + pass;
    eprintln!(
        "noisy_neighbour: tenant B submit→stored, idle ({IDLE_EDITS} edits): p50 {:.0} ms, \
         p99 {:.0} ms",
        ms(idle_p50),
        ms(idle_p99)
    );
    eprintln!(
        "noisy_neighbour: tenant B submit→stored under tenant A's {BACKFILL}-document backfill \
         ({BACKFILL_EDITS} edits; {backfill_stored_then} backfill documents stored and \
         {bulk_left} still queued when the last edit was stored): p50 {:.0} ms, p99 {:.0} ms",
        ms(busy_p50),
        ms(busy_p99)
    );
    eprintln!(
        "noisy_neighbour: backfill of {BACKFILL} documents done in {backfill_secs:.1} s \
         ({:.1} docs/s, live edits included)",
        BACKFILL as f64 / backfill_secs
    );
    let met = busy_p99 <= goal;
    eprintln!(
        "noisy_neighbour: goal p99 under backfill ≤ 2 × idle p99 + one forward pass = {:.0} ms: \
         {}",
        ms(goal),
        if met { "MET" } else { "MISSED" }
    );
    assert!(
        bulk_left > 0,
        "BENCH FAILED: the backfill was over before the last edit was stored; the edits were \
         not measured under load"
    );
    assert!(met, "BENCH FAILED: the latency goal was missed");
}
