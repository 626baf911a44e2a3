//! Peak memory of a worker with a full prefetch window of large documents (plain `main`,
//! release; needs RabbitMQ, panics if it is unreachable):
//!
//! ```text
//! cargo bench --bench memory
//! ```
//!
//! A fresh pipeline from `pipelines/docs.toml` (its chunking, batch size, concurrency and
//! `limits.max_document_bytes` of 1 MiB) with `broker.prefetch = 64`, its own queues and Edge
//! store. 80 documents of exactly 1 MiB of text each are published first; then the release
//! `rag-ingest worker` binary is started. Every 100 ms the bench reads the worker's `VmHWM`
//! (peak resident set, kept by the kernel) and `VmRSS` from `/proc/<pid>/status` and the
//! main queue's ready count (passive declare): `80 - ready - stored` deliveries are in the
//! worker's hands, and the window is full when that reaches 64. It stops once the window
//! has been full and the first `worker.concurrency` documents (the first wave processed at
//! once, with the window full) are stored, or after 3 minutes, whichever comes first: 1 MiB
//! documents take about half a minute each to embed, and the high-water mark keeps rising
//! while the first wave is chunked, embedded and written. Then it sends SIGTERM and waits
//! for the worker to exit. A progress line is printed every 15 s. Queues and the data
//! directory are deleted.
//!
//! Prints `peak RSS: X MiB (target <= 1024 MiB)`; exits non-zero if the prefetch window never
//! filled (the figure would then not be the peak asked about).

use std::time::{Duration, Instant};

use rag_ingest::queue::Submitter;

#[path = "support/mod.rs"]
mod support;

use support::{BenchPipeline, QueueProbe, WorkerBinary, WorkerProcess};

/// Documents published.
const DOCS: usize = 80;
/// Size of each document's content.
const DOC_BYTES: usize = 1024 * 1024;
/// Prefetch window of the worker.
const PREFETCH: u32 = 64;
/// Longest the worker is observed.
const MAX_OBSERVE: Duration = Duration::from_secs(180);
/// How often memory and the queue are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How often a progress line is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(15);
/// Target for the peak resident set.
const TARGET_MIB: f64 = 1024.0;

/// `field` (e.g. `VmHWM`) of `/proc/<pid>/status` in KiB; `None` once the process is gone.
fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.trim().strip_suffix("kB")?.trim().parse().ok()
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    let rt = support::runtime();
    rt.block_on(support::require_broker());
    let binary = WorkerBinary::snapshot();

    let pipeline = BenchPipeline::new("memory", |t| {
        support::set(t, "broker.prefetch", i64::from(PREFETCH));
        // SIGTERM must not wait for 1 MiB documents to finish embedding.
        support::set(t, "worker.shutdown_grace_secs", 5);
    });
    let config = &pipeline.config;
    assert!(
        config.limits.max_document_bytes >= DOC_BYTES,
        "pipelines/docs.toml's limits.max_document_bytes ({}) must admit {DOC_BYTES}-byte \
         documents",
        config.limits.max_document_bytes
    );
    let docs = support::large_docs("memory", DOCS, DOC_BYTES);
    let queue = pipeline.main_queue();

    let published = Instant::now();
    rt.block_on(async {
        let submitter = Submitter::connect(config)
            .await
            .expect("the submitter connects");
        for (doc, result) in docs
            .iter()
            .zip(submitter.submit_all(&docs, |_, _| {}).await)
        {
            if let Err(e) = result {
                panic!(
                    "BENCH FAILED: the broker did not confirm {}: {e}",
                    doc.document_id
                );
            }
        }
        submitter.close().await;
    });
    drop(docs);
    eprintln!(
        "memory: published {DOCS} documents of {DOC_BYTES} bytes in {:.1} s to {queue}; \
         broker.prefetch {}, worker.concurrency {}, chunking {}/{} tokens, embedder.batch_size {}",
        published.elapsed().as_secs_f64(),
        config.broker.prefetch,
        config.worker.concurrency,
        config.chunking.max_tokens,
        config.chunking.overlap,
        config.embedder.batch_size,
    );

    let probe = rt.block_on(QueueProbe::connect());
    let mut worker = WorkerProcess::start(&binary, &pipeline.file, &[]);
    let pid = worker.id();
    let started = Instant::now();
    let mut peak_kib = 0;
    let mut rss_kib = 0;
    let mut max_in_flight = 0;
    let mut window_full_after = None;
    let mut peak_at = Duration::ZERO;
    let mut next_progress = PROGRESS_EVERY;
    let first_wave = pipeline.config.worker.concurrency;
    let stop_reason = loop {
        if let Some(status) = worker.exited() {
            panic!(
                "BENCH FAILED: the worker exited early ({status}); log:\n{}",
                worker.log()
            );
        }
        if let Some(hwm) = proc_status_kib(pid, "VmHWM") {
            if hwm > peak_kib {
                peak_kib = hwm;
                peak_at = started.elapsed();
            }
            rss_kib = proc_status_kib(pid, "VmRSS").unwrap_or(rss_kib);
        }
        let ready = rt.block_on(probe.ready(&queue)) as usize;
        let stored = worker.count(&support::STORED);
        let in_flight = DOCS.saturating_sub(ready + stored);
        max_in_flight = max_in_flight.max(in_flight);
        if window_full_after.is_none() && in_flight >= PREFETCH as usize {
            window_full_after = Some(started.elapsed());
            eprintln!(
                "memory: prefetch window full ({in_flight} deliveries in flight, {ready} ready) \
                 after {:.1} s; RSS {:.0} MiB",
                started.elapsed().as_secs_f64(),
                mib(rss_kib)
            );
        }
        if started.elapsed() >= next_progress {
            next_progress += PROGRESS_EVERY;
            eprintln!(
                "memory: {:5.1} s: RSS {:.0} MiB, high-water mark {:.0} MiB, {in_flight} in \
                 flight, {ready} ready, {stored} stored",
                started.elapsed().as_secs_f64(),
                mib(rss_kib),
                mib(peak_kib)
            );
        }
        if window_full_after.is_some() && stored >= first_wave {
            break format!("{stored} documents stored");
        }
        if started.elapsed() >= MAX_OBSERVE {
            break format!(
                "{} s passed ({stored} documents stored)",
                MAX_OBSERVE.as_secs()
            );
        }
        std::thread::sleep(SAMPLE_EVERY);
    };
    // The high-water mark once more, just before stopping.
    peak_kib = peak_kib.max(proc_status_kib(pid, "VmHWM").unwrap_or(0));
    let observed = started.elapsed();
    rt.block_on(probe.close());

    worker.signal("TERM");
    let (status, log) = worker.wait_exit_blocking(Duration::from_secs(60));
    let stored = support::final_count(&log, "stored");
    eprintln!(
        "memory: stopped after {:.1} s ({stop_reason}); worker exited with {status}",
        observed.as_secs_f64()
    );
    eprintln!(
        "memory: most deliveries in flight {max_in_flight} (prefetch {PREFETCH}); window full \
         after {}; documents stored {stored}; RSS at stop {:.0} MiB; high-water mark last \
         rose at {:.1} s",
        window_full_after.map_or("never".to_owned(), |d| format!("{:.1} s", d.as_secs_f64())),
        mib(rss_kib),
        peak_at.as_secs_f64()
    );
    let peak = mib(peak_kib);
    println!(
        "peak RSS: {peak:.0} MiB (target <= {TARGET_MIB:.0} MiB){}",
        if peak <= TARGET_MIB {
            ""
        } else {
            " — OVER TARGET"
        }
    );
    drop(pipeline);
    if window_full_after.is_none() {
        eprintln!(
            "BENCH FAILED: the prefetch window never filled ({max_in_flight} of {PREFETCH} \
             deliveries in flight at most): the figure above is not the full-window peak"
        );
        std::process::exit(1);
    }
}
