//! End-to-end ingestion throughput through the real broker, compared with bare embedding
//! of the same chunks (criterion, release; needs RabbitMQ, panics if it is unreachable):
//!
//! ```text
//! cargo bench --bench pipeline
//! ```
//!
//! `end_to_end` (one run per sample): a fresh pipeline from `pipelines/docs.toml` (the
//! shipped chunking, batch size, prefetch and concurrency) with its own queues and Edge store;
//! the release `rag-ingest worker` binary is started and, once it logs `worker consuming`
//! (model loaded, store open), the clock starts, 256 Markdown documents of 2 to 5 fixture
//! documents each (a few chunks each) are published with the library's
//! [`Submitter`](rag_ingest::queue::Submitter) and the clock stops when the worker has
//! logged `document stored` 256 times. The worker is then stopped with SIGTERM; it must exit
//! cleanly having stored 256 documents and retried or dead-lettered none, and the store must
//! hold exactly each document's chunk count. The queues and the data directory are deleted.
//! The binary is what is measured (not the library in process) because it is the product:
//! same runtime, logging, embedder and store wiring; model load and start-up stay outside
//! the clock.
//!
//! `bare_embed/all_chunks`: the texts the worker embeds for those chunks (each chunk's text
//! with its context under the shipped `chunking.context = "headings"`:
//! [`process::embed_texts`]) embedded with `CandleEmbedder::embed_blocking`
//! (the pipeline's `embedder.precision`, as the worker loads it) in one call (full forward passes of `embedder.batch_size` × 256 tokens), the ceiling the
//! pipeline can reach. `bare_embed/per_document`: one call per document, each with its own
//! forward passes (what the pipeline would do without continuous batching).
//!
//! Criterion's throughput is documents/s for `end_to_end` and tokens/s for `bare_embed`; the
//! summary printed at the end gives docs/s, tokens/s (model tokens, `[CLS]`/`[SEP]`
//! included) and the ratio end-to-end / bare (target >= 90 %), from the medians of every run.
//!
//! `PIPELINE_ROUNDS=N` runs the three cases interleaved instead of criterion's groups (each
//! case's runs one after the other, minutes apart): N rounds of one end-to-end run, one bare
//! all-chunks run and one bare per-document run (after one more bare all-chunks run first),
//! for a host whose speed drifts from minute to minute, where a ratio of two medians taken
//! minutes apart measures the drift. It prints each round and, besides the summary, two
//! medians over rounds: end to end against the bare all-chunks run right after it, and
//! against the bare time interpolated (by the runs' midpoints) between the bare runs before
//! and after it, which cancels a drift linear over that minute. Each round also prints the
//! windows of its end-to-end run and of the bare all-chunks run after it in Unix seconds, so
//! that a `perf record -a -k CLOCK_REALTIME` taken around the bench can be cut to the clocked
//! runs (`perf script -F comm,tid,time,…`): CPU shares within a window do not move with the
//! host's speed as wall-clock times do.

use std::cell::RefCell;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use rag_ingest::embed::{CandleEmbedder, Embedder};
use rag_ingest::extract::ExtractLimits;
use rag_ingest::message::Document;
use rag_ingest::queue::Submitter;
use rag_ingest::store::EdgeStore;
use rag_ingest::{process, setup};

#[path = "support/mod.rs"]
mod support;

use support::{BenchPipeline, WorkerBinary, WorkerProcess};

/// Documents per run.
const DOCS: usize = 256;

/// What every run processes, and what the store must hold afterwards.
struct Workload {
    docs: Vec<Document>,
    /// Chunk count of each document.
    expected: Vec<usize>,
    /// What is embedded for every chunk (context and text), document by document.
    chunks: Vec<String>,
    /// Model tokens of all embedded texts, special tokens included.
    tokens: u64,
}

/// One end-to-end run; returns the time from the first publish to the last stored document,
/// and the wall-clock time the clock started (for cutting the run's window out of a profile).
fn run_once(
    rt: &tokio::runtime::Runtime,
    binary: &WorkerBinary,
    work: &Workload,
    embedder: &CandleEmbedder,
) -> (Duration, SystemTime) {
    let pipeline = BenchPipeline::new("pipeline", |_| {});
    let mut worker = WorkerProcess::start(binary, &pipeline.file, &[]);
    worker.wait_for(&support::CONSUMING, 1, Duration::from_secs(120));
    let submitter = rt
        .block_on(Submitter::connect(&pipeline.config))
        .expect("the submitter connects");

    let (started, wall) = (Instant::now(), SystemTime::now());
    let results = rt.block_on(submitter.submit_all(&work.docs, |_, _| {}));
    for (doc, result) in work.docs.iter().zip(&results) {
        if let Err(e) = result {
            panic!(
                "BENCH FAILED: the broker did not confirm {}: {e}",
                doc.document_id
            );
        }
    }
    worker.wait_for(&support::STORED, work.docs.len(), Duration::from_secs(900));
    let elapsed = started.elapsed();

    rt.block_on(submitter.close());
    worker.signal("TERM");
    let (status, log) = worker.wait_exit_blocking(Duration::from_secs(60));
    support::check_clean_exit(status, &log, work.docs.len() as u64);
    let store = EdgeStore::open(
        pipeline.store_path(),
        &pipeline.config.store.collection,
        &setup::collection_fingerprint(embedder.fingerprint()),
    )
    .expect("the worker's store opens after it exited");
    let stored = rt
        .block_on(support::verify_stored(&[store], &work.docs, &work.expected))
        .unwrap_or_else(|e| panic!("BENCH FAILED: the store does not hold every chunk:\n{e}"));
    assert_eq!(stored, work.chunks.len(), "points stored");
    (elapsed, wall)
}

fn bench(c: &mut Criterion) {
    let rt = support::runtime();
    rt.block_on(support::require_broker());
    let binary = WorkerBinary::snapshot();

    // The pipeline's own settings decide the chunks and the embedder's batch size and
    // precision (`auto`: bf16 where the CPU has it), so that bare embedding runs the very
    // forward pass the worker runs.
    let config = BenchPipeline::new("pipeline-setup", |_| {}).config.clone();
    let embedder = CandleEmbedder::load_with_precision(
        &support::model_dir(),
        config.embedder.batch_size,
        config.embedder.precision,
    )
    .expect("the model loads (scripts/fetch-model.sh)");
    eprintln!(
        "pipeline: bare embedding runs {} ({})",
        embedder.precision().running.as_str(),
        embedder.precision().reason
    );
    let chunker = setup::chunker(&config, &embedder).expect("chunker");
    let docs = support::realistic_docs("pipeline", DOCS);
    let expected = support::expected_chunks(&chunker, &docs);
    // What the worker embeds: each chunk's text with its context where the pipeline's
    // `chunking.context` asks for one (the shipped pipeline: `headings`), so that bare
    // embedding does the very work the worker does.
    let contextualizer = setup::contextualizer_with(&config, embedder.tokenizer());
    let limits = ExtractLimits::from_config(&config);
    let per_doc: Vec<Vec<String>> = docs
        .iter()
        .map(|doc| {
            process::embed_texts(&chunker, &contextualizer, &limits, doc)
                .expect("the bench documents chunk")
        })
        .collect();
    let chunks: Vec<String> = per_doc.iter().flatten().cloned().collect();
    let tokens = {
        let refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        support::model_tokens(embedder.tokenizer(), &refs)
    };
    let bytes: usize = docs.iter().map(|d| d.content.len()).sum();
    eprintln!(
        "pipeline: {DOCS} documents ({bytes} bytes), {} chunks (max_tokens {}, overlap {}, \
         context {}), \
         {tokens} model tokens ([CLS]/[SEP] included); embedder.batch_size {}, \
         broker.prefetch {}, worker.concurrency {}; padding ratio 1.000 (packed forward \
         pass, no padding)",
        chunks.len(),
        config.chunking.max_tokens,
        config.chunking.overlap,
        config.chunking.context.as_str(),
        config.embedder.batch_size,
        config.broker.prefetch,
        config.worker.concurrency,
    );
    let work = Workload {
        docs,
        expected,
        chunks,
        tokens,
    };
    let chunk_refs: Vec<&str> = work.chunks.iter().map(String::as_str).collect();

    let end_to_end = RefCell::new(Vec::new());
    let bare_all = RefCell::new(Vec::new());
    let bare_per_doc = RefCell::new(Vec::new());
    let e2e_once = || {
        let (elapsed, wall) = run_once(&rt, &binary, &work, &embedder);
        end_to_end.borrow_mut().push(elapsed);
        (elapsed, wall)
    };
    let all_once = || {
        let started = Instant::now();
        let vectors = embedder.embed_blocking(&chunk_refs).expect("embed");
        let elapsed = started.elapsed();
        assert_eq!(vectors.len(), chunk_refs.len());
        bare_all.borrow_mut().push(elapsed);
        elapsed
    };
    let per_doc_once = || {
        let started = Instant::now();
        for texts in &per_doc {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            embedder.embed_blocking(&refs).expect("embed");
        }
        let elapsed = started.elapsed();
        bare_per_doc.borrow_mut().push(elapsed);
        elapsed
    };

    if let Some(rounds) = rounds() {
        // Bare all-chunks runs bracket every end-to-end run (one more before the first), and
        // each run's midpoint is kept: the bare time at an end-to-end run's midpoint is
        // interpolated between its two neighbours, which cancels a drift that is linear over
        // the minute they span.
        let midpoint = |started: Instant, elapsed: Duration| started + elapsed / 2;
        let timed_all = || {
            let (started, wall) = (Instant::now(), SystemTime::now());
            let elapsed = all_once();
            (midpoint(started, elapsed), elapsed, wall)
        };
        let mut before = timed_all();
        let mut same_round = Vec::with_capacity(rounds);
        let mut bracketed = Vec::with_capacity(rounds);
        for round in 1..=rounds {
            let started = Instant::now();
            let (e2e, wall) = e2e_once();
            let e2e_mid = midpoint(started, e2e);
            let after = timed_all();
            let doc = per_doc_once();
            let (all, bare_at_e2e) = (
                after.1,
                interpolated((before.0, before.1), (after.0, after.1), e2e_mid),
            );
            same_round.push(all.as_secs_f64() / e2e.as_secs_f64());
            bracketed.push(bare_at_e2e / e2e.as_secs_f64());
            eprintln!(
                "round {round}/{rounds}: end to end {:.3} s, bare all chunks {:.3} s (before \
                 it {:.3} s), bare per document {:.3} s: {:.1} % of bare after it, {:.1} % of \
                 bare interpolated between both; end-to-end window {}, bare all-chunks window \
                 {} (Unix seconds: `perf record -k CLOCK_REALTIME` timestamps)",
                e2e.as_secs_f64(),
                all.as_secs_f64(),
                before.1.as_secs_f64(),
                doc.as_secs_f64(),
                100.0 * same_round[same_round.len() - 1],
                100.0 * bracketed[bracketed.len() - 1],
                unix_window(wall, e2e),
                unix_window(after.2, after.1),
            );
            before = after;
        }
        summary(
            &work,
            &end_to_end.borrow(),
            &bare_all.borrow(),
            &bare_per_doc.borrow(),
        );
        for (what, ratios) in [
            ("bare all chunks right after it", &mut same_round),
            (
                "bare all chunks interpolated between the runs before and after it",
                &mut bracketed,
            ),
        ] {
            ratios.sort_by(f64::total_cmp);
            let listed: Vec<String> = ratios.iter().map(|r| format!("{:.1}", 100.0 * r)).collect();
            eprintln!(
                "  interleaved: median over {rounds} rounds of end-to-end / {what}: {:.1} % \
                 (rounds, sorted: {} %)",
                100.0 * median_of_sorted(ratios),
                listed.join(" · ")
            );
        }
        return;
    }

    let mut group = c.benchmark_group("pipeline");
    // One run per sample: each takes seconds, and criterion's minimum is 10 samples.
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_millis(1));
    group.measurement_time(Duration::from_millis(1));

    group.throughput(Throughput::Elements(DOCS as u64));
    group.bench_function("end_to_end", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| e2e_once().0).sum());
    });

    group.throughput(Throughput::Elements(work.tokens));
    group.bench_function("bare_embed/all_chunks", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| all_once()).sum());
    });
    group.bench_function("bare_embed/per_document", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| per_doc_once()).sum());
    });
    group.finish();

    summary(
        &work,
        &end_to_end.borrow(),
        &bare_all.borrow(),
        &bare_per_doc.borrow(),
    );
}

/// `start–end` of a run that started at `wall` and took `elapsed`, in Unix seconds with
/// microseconds (what `perf script` prints for a `perf record -k CLOCK_REALTIME` profile).
fn unix_window(wall: SystemTime, elapsed: Duration) -> String {
    let start = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
    let end = start + elapsed;
    format!("{:.6}–{:.6}", start.as_secs_f64(), end.as_secs_f64())
}

/// `PIPELINE_ROUNDS`, if set to a positive number.
///
/// # Panics
///
/// If it is set to anything else (a bench's misconfiguration should stop it, not be
/// ignored).
fn rounds() -> Option<usize> {
    let value = std::env::var("PIPELINE_ROUNDS").ok()?;
    match value.parse::<usize>() {
        Ok(rounds) if rounds > 0 => Some(rounds),
        _ => panic!("PIPELINE_ROUNDS={value:?}: expected a positive number of rounds"),
    }
}

/// The bare all-chunks time, in seconds, at instant `at`, interpolated linearly between
/// two runs given as (midpoint, duration); the earlier run's if both have one midpoint.
fn interpolated((t0, d0): (Instant, Duration), (t1, d1): (Instant, Duration), at: Instant) -> f64 {
    let span = t1.saturating_duration_since(t0).as_secs_f64();
    if span <= 0.0 {
        return d0.as_secs_f64();
    }
    let share = at.saturating_duration_since(t0).as_secs_f64() / span;
    d0.as_secs_f64() + (d1.as_secs_f64() - d0.as_secs_f64()) * share.clamp(0.0, 1.0)
}

/// The median of sorted `values` (the mean of the middle two for an even count); 0 if empty.
fn median_of_sorted(values: &[f64]) -> f64 {
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Prints the medians as docs/s, tokens/s and the end-to-end / bare ratio.
fn summary(work: &Workload, end_to_end: &[Duration], bare_all: &[Duration], bare_doc: &[Duration]) {
    let (Some(e2e), Some(all), Some(doc)) = (
        support::median(end_to_end),
        support::median(bare_all),
        support::median(bare_doc),
    ) else {
        // `cargo bench -- <filter>` ran only some cases.
        eprintln!("pipeline summary: not every case ran; no ratio");
        return;
    };
    let tokens = work.tokens as f64;
    let docs = work.docs.len() as f64;
    let range = |runs: &[Duration]| {
        let min = runs.iter().min().copied().unwrap_or_default();
        let max = runs.iter().max().copied().unwrap_or_default();
        format!("{:.2}–{:.2} s", min.as_secs_f64(), max.as_secs_f64())
    };
    eprintln!(
        "\npipeline summary ({} documents, {} chunks, {} tokens; medians over all runs):",
        work.docs.len(),
        work.chunks.len(),
        work.tokens
    );
    eprintln!(
        "  end to end:            {:.3} s ({} runs, {}): {:.2} docs/s, {:.0} tokens/s",
        e2e.as_secs_f64(),
        end_to_end.len(),
        range(end_to_end),
        docs / e2e.as_secs_f64(),
        tokens / e2e.as_secs_f64()
    );
    eprintln!(
        "  bare, all chunks:      {:.3} s ({} runs, {}): {:.0} tokens/s",
        all.as_secs_f64(),
        bare_all.len(),
        range(bare_all),
        tokens / all.as_secs_f64()
    );
    eprintln!(
        "  bare, per document:    {:.3} s ({} runs, {}): {:.0} tokens/s",
        doc.as_secs_f64(),
        bare_doc.len(),
        range(bare_doc),
        tokens / doc.as_secs_f64()
    );
    eprintln!(
        "  ratio end-to-end / bare (all chunks): {:.1} % (target >= 90 %); / bare (per \
         document): {:.1} %",
        100.0 * all.as_secs_f64() / e2e.as_secs_f64(),
        100.0 * doc.as_secs_f64() / e2e.as_secs_f64()
    );
    eprintln!("  padding ratio: 1.000 (packed, no padding)");
}

criterion_group!(benches, bench);
criterion_main!(benches);
