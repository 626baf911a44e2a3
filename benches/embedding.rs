//! Embedding throughput in tokens per second (real tokens, special tokens included) on
//! deterministic corpora built from the fixture documents:
//!
//! - `long256`: 32 texts truncated to the model's 256 tokens (the conditions of the
//!   `embedding` rows in `docs/performance-history.md`), candle-transformers' `BertModel`
//!   (`reference`) vs `CandleEmbedder` (`fast`), and `CandleEmbedder` with
//!   `Precision::Bf16` (`fast_bf16`, on CPUs with AVX-512 BF16);
//! - `chunks`: 64 KiB of the fixture documents chunked like the pipeline does (at most 200
//!   tokens, mixed lengths);
//! - `short`: 256 single sentences of 10 to 20 tokens, at several batch sizes;
//! - `tokenize`: tokenisation alone.
//!
//! The padding ratio (tokens computed / real tokens) of each case is printed once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rag_ingest::chunk::{ChunkFormat, Chunker};
use rag_ingest::embed::{CandleEmbedder, Embedder, Precision};
use tokenizers::{Tokenizer, TruncationParams};

// Only the fixture documents are used here, not the chunked corpus.
#[allow(dead_code)]
#[path = "../tests/support/fixtures.rs"]
mod fixtures;
#[path = "../tests/support/reference_bert.rs"]
mod reference_bert;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2")
}

/// The fixture documents (Markdown and plain text) concatenated, in a fixed order.
fn fixture_text() -> String {
    let mut text = String::new();
    for (_, document) in fixtures::fixture_documents() {
        text.push_str(&document);
        text.push_str("\n\n");
    }
    text
}

/// `count` texts of well over 256 tokens, each starting at a different word of the corpus.
fn long_texts(corpus: &str, count: usize) -> Vec<String> {
    let words: Vec<&str> = corpus.split_whitespace().collect();
    (0..count)
        .map(|i| {
            let start = (i * 97) % words.len();
            words
                .iter()
                .cycle()
                .skip(start)
                .take(400)
                .copied()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// `count` sentences of the corpus that are 10 to 20 tokens long.
fn short_texts(corpus: &str, tokenizer: &Tokenizer, count: usize) -> Vec<String> {
    let sentences: Vec<String> = corpus
        .split(['.', '\n', '?', '!'])
        .map(str::trim)
        .filter(|s| {
            let n = tokenizer.encode(*s, true).expect("tokenize").len();
            (10..=20).contains(&n)
        })
        .map(str::to_owned)
        .collect();
    sentences.iter().cycle().take(count).cloned().collect()
}

/// Real tokens of `texts` after truncation to `max_tokens`, special tokens included.
fn real_tokens(tokenizer: &Tokenizer, texts: &[&str], max_tokens: usize) -> u64 {
    let mut tokenizer = tokenizer.clone();
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            ..TruncationParams::default()
        }))
        .expect("truncation");
    let encodings = tokenizer
        .encode_batch(texts.to_vec(), true)
        .expect("tokenize");
    encodings.iter().map(|e| e.len() as u64).sum()
}

fn bench(c: &mut Criterion) {
    let dir = model_dir();
    let embedder = CandleEmbedder::load(&dir, 32).expect("run scripts/fetch-model.sh first");
    let bf16 = CandleEmbedder::load_with_precision(&dir, 32, Precision::Bf16)
        .inspect_err(|e| eprintln!("SKIPPED: fast_bf16 cases: {e}"))
        .ok();
    let tokenizer = embedder.tokenizer().clone();
    let max_tokens = embedder.max_input_tokens();
    let corpus = fixture_text();

    let long = long_texts(&corpus, 32);
    let long: Vec<&str> = long.iter().map(String::as_str).collect();
    let chunker = Chunker::new(tokenizer.clone(), 200, 20, max_tokens).expect("chunker");
    // About 64 KiB: the fixture documents repeated, as in the chunking bench.
    let mut document = String::new();
    while document.len() < 64 * 1024 {
        document.push_str(&corpus);
    }
    let chunks: Vec<String> = chunker
        .split(&document, ChunkFormat::Markdown)
        .into_iter()
        .map(|c| c.text)
        .collect();
    let chunks: Vec<&str> = chunks.iter().map(String::as_str).collect();
    let short = short_texts(&corpus, &tokenizer, 256);
    let short: Vec<&str> = short.iter().map(String::as_str).collect();

    let mut group = c.benchmark_group("embedding");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(10));

    let reference = reference_bert::Reference::load(&dir, &tokenizer, max_tokens, 32);
    for (name, texts) in [("long256", &long), ("chunks", &chunks)] {
        let tokens = real_tokens(&tokenizer, texts, max_tokens);
        eprintln!(
            "{name}: {} texts, {tokens} real tokens; padding ratio: reference {:.3}, fast 1.000 (packed)",
            texts.len(),
            reference.padding_ratio(texts)
        );
        group.throughput(Throughput::Elements(tokens));
        group.bench_function(BenchmarkId::new("reference", name), |b| {
            b.iter(|| reference.embed(texts));
        });
        group.bench_function(BenchmarkId::new("fast", name), |b| {
            b.iter(|| embedder.embed_blocking(texts).expect("embed"));
        });
        if let Some(bf16) = bf16.as_ref().filter(|_| name == "long256") {
            group.bench_function(BenchmarkId::new("fast_bf16", name), |b| {
                b.iter(|| bf16.embed_blocking(texts).expect("embed"));
            });
        }
    }

    let tokens = real_tokens(&tokenizer, &short, max_tokens);
    for batch_size in [8, 32, 64] {
        let reference = reference_bert::Reference::load(&dir, &tokenizer, max_tokens, batch_size);
        let fast = CandleEmbedder::load(&dir, batch_size).expect("load");
        eprintln!(
            "short/{batch_size}: {} texts, {tokens} real tokens; padding ratio: reference {:.3}, fast 1.000 (packed)",
            short.len(),
            reference.padding_ratio(&short)
        );
        group.throughput(Throughput::Elements(tokens));
        group.bench_function(BenchmarkId::new("reference_short", batch_size), |b| {
            b.iter(|| reference.embed(&short));
        });
        group.bench_function(BenchmarkId::new("fast_short", batch_size), |b| {
            b.iter(|| fast.embed_blocking(&short).expect("embed"));
        });
    }

    let tokens: u64 = tokenizer
        .encode_batch(chunks.clone(), true)
        .expect("tokenize")
        .iter()
        .map(|e| e.len() as u64)
        .sum();
    group.throughput(Throughput::Elements(tokens));
    group.bench_function("tokenize/chunks", |b| {
        b.iter(|| {
            tokenizer
                .encode_batch(chunks.clone(), true)
                .expect("tokenize")
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
