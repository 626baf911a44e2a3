//! [`CandleEmbedder`] tests against the real all-MiniLM-L6-v2 model in
//! `models/all-MiniLM-L6-v2` (run `scripts/fetch-model.sh` first).
//!
//! No reference vector from Python sentence-transformers is checked here: producing one
//! needs torch, which is not installed in the development environment. Instead
//! `matches_independent_reference` pins values from an independent float64 forward pass
//! written in plain Python straight from `model.safetensors` (same architecture, mean
//! pooling, L2 normalisation); it agreed with this crate to 1.7e-7 on all 384 values.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rag_ingest::embed::{CandleEmbedder, EmbedError, Embedder};

const DIMS: usize = 384;

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2")
}

/// The model, loaded once for all tests of this file.
fn embedder() -> &'static CandleEmbedder {
    static EMBEDDER: OnceLock<CandleEmbedder> = OnceLock::new();
    EMBEDDER.get_or_init(|| {
        let dir = model_dir();
        assert!(
            dir.join("model.safetensors").is_file(),
            "{} is missing: run scripts/fetch-model.sh first",
            dir.display()
        );
        CandleEmbedder::load(&dir, 8).unwrap_or_else(|e| panic!("cannot load the model: {e}"))
    })
}

fn embed_one(text: &str) -> Vec<f32> {
    let mut vectors = embedder().embed_blocking(&[text]).expect("embed");
    assert_eq!(vectors.len(), 1);
    vectors.remove(0)
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn norm(a: &[f32]) -> f32 {
    dot(a, a).sqrt()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn fingerprint_and_limits() {
    let embedder = embedder();
    let fingerprint = embedder.fingerprint();
    assert_eq!(fingerprint.model, "sentence-transformers/all-MiniLM-L6-v2");
    assert_eq!(fingerprint.dims, DIMS);
    assert_eq!(fingerprint.pooling, "mean");
    assert!(fingerprint.normalized);
    assert_eq!(
        fingerprint.id(),
        "sentence-transformers/all-MiniLM-L6-v2|384|mean|l2"
    );
    assert_eq!(embedder.max_input_tokens(), 256);
    // The exposed tokenizer counts everything (tokenizer.json itself truncates at 128).
    let long = "word ".repeat(1000);
    let encoding = embedder
        .tokenizer()
        .encode(long.as_str(), false)
        .expect("tokenize");
    assert_eq!(encoding.len(), 1000);
}

#[test]
fn vectors_have_384_dims_and_unit_length() {
    let texts = [
        "This is a test sentence.",
        "",
        "   ",
        "A much longer sentence that talks about queues, chunking, embeddings and vector stores.",
        "检索增强生成 👨‍👩‍👧‍👦 Café naïve",
    ];
    let vectors = embedder().embed_blocking(&texts).expect("embed");
    assert_eq!(vectors.len(), texts.len());
    for (text, vector) in texts.iter().zip(&vectors) {
        assert_eq!(vector.len(), DIMS, "{text:?}");
        assert!(vector.iter().all(|x| x.is_finite()), "{text:?}");
        let n = norm(vector);
        assert!((n - 1.0).abs() < 1e-4, "{text:?} has norm {n}");
    }
}

#[test]
fn empty_input_gives_empty_output() {
    assert!(embedder().embed_blocking(&[]).expect("embed").is_empty());
}

#[test]
fn matches_independent_reference() {
    let vector = embed_one("This is a test sentence.");
    let expected = [
        (0, 0.0842964),
        (1, 0.0579537),
        (2, 0.0044934),
        (3, 0.1058211),
        (4, 0.0070834),
        (5, -0.0178447),
        (6, -0.016888),
        (7, -0.0152283),
        (100, 0.0043779),
        (200, -0.0508884),
        (300, -0.0817733),
        (383, -0.0990471),
    ];
    for (i, value) in expected {
        assert!(
            (vector[i] - value).abs() < 1e-5,
            "value {i}: {} != {value}",
            vector[i]
        );
    }
}

#[test]
fn paraphrases_are_closer_than_unrelated_sentences() {
    let cases = [
        (
            "The cat is sleeping on the sofa.",
            "A kitten naps on the couch.",
            "The stock market fell sharply this morning.",
        ),
        (
            "How do I reset my password?",
            "What are the steps to change my forgotten password?",
            "The recipe needs two cups of flour.",
        ),
        (
            "The weather is lovely today.",
            "It is a beautiful sunny day.",
            "Compilers translate source code into machine code.",
        ),
        (
            "He bought a new car last week.",
            "Last week he purchased a new automobile.",
            "Penguins live in the southern hemisphere.",
        ),
        (
            "The meeting has been postponed until Friday.",
            "We moved the meeting to Friday.",
            "Photosynthesis converts light into chemical energy.",
        ),
    ];
    for (anchor, paraphrase, unrelated) in cases {
        let vectors = embedder()
            .embed_blocking(&[anchor, paraphrase, unrelated])
            .expect("embed");
        let close = dot(&vectors[0], &vectors[1]);
        let far = dot(&vectors[0], &vectors[2]);
        assert!(
            close > far,
            "cos({anchor:?}, {paraphrase:?}) = {close} <= cos(.., {unrelated:?}) = {far}"
        );
        assert!(close > 0.5, "paraphrase similarity {close} for {anchor:?}");
    }
}

#[test]
fn batch_equals_one_by_one() {
    let long = "Retrieval augmented generation splits documents into chunks. ".repeat(12);
    let texts = [
        "short",
        long.as_str(),
        "A medium length sentence about message brokers and retries.",
        "",
        "Another one.",
        "x y z",
        "A sentence with unusual tokens: 🦀 Rust, naïve café, 東京.",
        long.as_str(),
        "Eleven words here to make this one a bit longer than others.",
        "ok",
        "The final sentence of the batch, longer than most of the others in it.",
    ];
    // Mixed lengths in one forward pass (packed without padding).
    let batch = embedder().embed_blocking(&texts).expect("embed batch");
    assert_eq!(batch.len(), texts.len());
    for (text, vector) in texts.iter().zip(&batch) {
        let single = embed_one(text);
        let diff = max_abs_diff(vector, &single);
        assert!(diff < 1e-5, "{text:?}: batch differs by {diff}");
    }
}

#[test]
fn sub_batches_equal_one_by_one() {
    // Ten full-length texts exceed the budget of 8 × 256 tokens: two forward passes.
    let texts: Vec<String> = (0..10)
        .map(|i| format!("Text {i} talks about queues and vector stores. ").repeat(40))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let batch = embedder().embed_blocking(&refs).expect("embed batch");
    assert_eq!(batch.len(), texts.len());
    for (text, vector) in refs.iter().zip(&batch) {
        let diff = max_abs_diff(vector, &embed_one(text));
        assert!(diff < 1e-5, "batch differs by {diff}");
    }
}

#[test]
fn over_long_input_is_truncated() {
    let words: Vec<String> = (0..3000).map(|i| format!("word{}", i % 97)).collect();
    let long = words.join(" ");
    let vector = embed_one(&long);
    assert_eq!(vector.len(), DIMS);
    assert!((norm(&vector) - 1.0).abs() < 1e-4);
    // Everything after the first 256 tokens is ignored.
    let with_other_tail = format!("{long} completely different ending about oceans and whales");
    let other = embed_one(&with_other_tail);
    assert!(max_abs_diff(&vector, &other) < 1e-5);
}

#[test]
fn missing_model_dir_is_reported() {
    let err = CandleEmbedder::load(Path::new("/nonexistent/all-MiniLM-L6-v2"), 8)
        .expect_err("missing dir");
    assert!(
        matches!(&err, EmbedError::ModelMissing { path } if path == Path::new("/nonexistent/all-MiniLM-L6-v2")),
        "{err:?}"
    );
    assert!(err.to_string().contains("scripts/fetch-model.sh"), "{err}");
}

#[test]
fn missing_model_file_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        model_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .expect("copy");
    let err = CandleEmbedder::load(dir.path(), 8).expect_err("no tokenizer");
    assert!(
        matches!(&err, EmbedError::ModelMissing { path } if path.ends_with("tokenizer.json")),
        "{err:?}"
    );
    assert!(err.to_string().contains("scripts/fetch-model.sh"), "{err}");
}

/// A copy of the model directory (weights symlinked) in which `file` has `contents`.
fn model_with(file: &str, contents: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["config.json", "tokenizer.json", "sentence_bert_config.json"] {
        std::fs::copy(model_dir().join(name), dir.path().join(name)).expect("copy");
    }
    std::os::unix::fs::symlink(
        model_dir().join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .expect("symlink");
    let path = dir.path().join(file);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).expect("mkdir");
    }
    std::fs::write(path, contents).expect("write");
    dir
}

#[test]
fn invalid_model_files_are_load_errors() {
    let cases = [
        ("config.json", "{ not json"),
        ("tokenizer.json", "{}"),
        ("sentence_bert_config.json", "[1, 2]"),
        (
            "1_Pooling/config.json",
            r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#,
        ),
        (
            "1_Pooling/config.json",
            r#"{"word_embedding_dimension": 768, "pooling_mode_mean_tokens": true}"#,
        ),
    ];
    for (file, contents) in cases {
        let dir = model_with(file, contents);
        let err = CandleEmbedder::load(dir.path(), 8).expect_err(file);
        assert!(
            matches!(&err, EmbedError::ModelLoad { path, .. } if path.ends_with(file)),
            "{file}: {err:?}"
        );
    }
    // Truncated weights (the header announces more bytes than there are).
    let dir = model_with("sentence_bert_config.json", r#"{"max_seq_length": 256}"#);
    std::fs::remove_file(dir.path().join("model.safetensors")).expect("rm");
    std::fs::write(
        dir.path().join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":",
    )
    .expect("write");
    let err = CandleEmbedder::load(dir.path(), 8).expect_err("broken weights");
    assert!(matches!(&err, EmbedError::ModelLoad { .. }), "{err:?}");
    // Mean pooling spelled out is accepted.
    let dir = model_with(
        "1_Pooling/config.json",
        r#"{"word_embedding_dimension": 384, "pooling_mode_mean_tokens": true, "pooling_mode_cls_token": false}"#,
    );
    CandleEmbedder::load(dir.path(), 8).expect("mean pooling loads");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_embed_matches_blocking() {
    let embedder = embedder().clone();
    assert!(embedder.embed(Vec::new()).await.expect("empty").is_empty());
    let texts: Vec<String> = (0..20)
        .map(|i| format!("Document number {i} is about {}", "ingestion ".repeat(i)))
        .collect();
    let (first, second) = tokio::join!(
        embedder.embed(texts[..10].to_vec()),
        embedder.embed(texts[10..].to_vec())
    );
    let vectors: Vec<Vec<f32>> = first
        .expect("first")
        .into_iter()
        .chain(second.expect("second"))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let expected = embedder.embed_blocking(&refs).expect("blocking");
    assert_eq!(vectors.len(), expected.len());
    for (a, b) in vectors.iter().zip(&expected) {
        assert!(max_abs_diff(a, b) < 1e-5);
    }
    // From spawned tasks too.
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let embedder = embedder.clone();
            tokio::spawn(async move { embedder.embed(vec![format!("task {i}")]).await })
        })
        .collect();
    for handle in handles {
        let vectors = handle.await.expect("join").expect("embed");
        assert_eq!(vectors.len(), 1);
        assert_eq!(vectors[0].len(), DIMS);
    }
}

/// On a single-threaded runtime, other tasks keep running while a large batch is embedded.
#[tokio::test(flavor = "current_thread")]
async fn async_embed_does_not_block_the_runtime() {
    static TICKS: AtomicUsize = AtomicUsize::new(0);
    let ticker = tokio::spawn(async {
        loop {
            tokio::time::sleep(Duration::from_millis(1)).await;
            TICKS.fetch_add(1, Ordering::Relaxed);
        }
    });
    let texts: Vec<String> = (0..64)
        .map(|i| {
            format!(
                "Sentence {i}: {}",
                "a reasonably long filler phrase ".repeat(8)
            )
        })
        .collect();
    let started = std::time::Instant::now();
    let vectors = embedder().embed(texts).await.expect("embed");
    let elapsed = started.elapsed();
    ticker.abort();
    assert_eq!(vectors.len(), 64);
    let ticks = TICKS.load(Ordering::Relaxed);
    assert!(
        elapsed < Duration::from_millis(20) || ticks >= 5,
        "only {ticks} ticks during {elapsed:?} of embedding"
    );
}

/// Requests that queue up while the embedding thread is busy share forward passes, and each
/// caller still gets exactly its own vectors, equal to embedding its texts alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_share_forward_passes() {
    // Its own model instance, so that other tests do not add forward passes meanwhile.
    let embedder = CandleEmbedder::load(&model_dir(), 8).expect("load");
    let long: Vec<String> = (0..16)
        .map(|i| {
            format!(
                "Report {i}: {}",
                "the ingestion queue drains slowly ".repeat(60)
            )
        })
        .collect();
    let small: Vec<Vec<String>> = (0..12)
        .map(|i| vec![format!("Small document {i} about topic number {}.", i * 7)])
        .collect();
    let expected: Vec<Vec<f32>> = small.iter().map(|texts| embed_one(&texts[0])).collect();

    // Every request is sent while the thread runs another pass, so all of them queue up.
    let (busy, before) = occupy(&embedder).await;
    let handles: Vec<_> = std::iter::once(long.clone())
        .chain(small.iter().cloned())
        .map(|texts| {
            let embedder = embedder.clone();
            tokio::spawn(async move { embedder.embed(texts).await })
        })
        .collect();
    let mut results = Vec::new();
    for handle in handles {
        results.push(handle.await.expect("join").expect("embed"));
    }
    busy.await.expect("join").expect("busy");
    // Not counting the pass that kept the thread busy.
    let passes = embedder.forward_passes() - before - 1;

    assert_eq!(results[0].len(), long.len());
    for (got, want) in results[1..].iter().zip(&expected) {
        assert_eq!(got.len(), 1, "each caller gets exactly its own vectors");
        assert!(
            dot(&got[0], want) > 0.99999,
            "vectors differ from embedding alone"
        );
    }
    // Alone: 2 passes for the long texts (16 × 256 tokens, 8 × 256 per pass) + 12 passes.
    // Batched: 4,096 + about 150 tokens in passes of 2,048 tokens, every pass but the last
    // full: 3.
    assert!(
        passes <= 3,
        "{passes} forward passes for 13 requests: queued requests did not fill passes"
    );
}

/// Starts a request of one full pass (8 × 256 tokens) and returns once its forward pass has
/// begun, with the pass count before it: requests sent now queue up behind it.
async fn occupy(
    embedder: &CandleEmbedder,
) -> (
    tokio::task::JoinHandle<Result<Vec<Vec<f32>>, EmbedError>>,
    u64,
) {
    let before = embedder.forward_passes();
    let busy = tokio::spawn({
        let embedder = embedder.clone();
        async move { embedder.embed(full_length_texts("Busy", 8)).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while embedder.forward_passes() == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the busy pass never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (busy, before)
}

/// Texts of `count` × 256 tokens (the model's maximum), `tag` making each request's distinct.
fn full_length_texts(tag: &str, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            format!(
                "{tag} {i}: {}",
                "the ingestion queue drains slowly ".repeat(60)
            )
        })
        .collect()
}

/// A request is answered as soon as its own texts are embedded, even when it was queued
/// together with a longer one that still needs more forward passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_answered_after_its_own_pass() {
    // Its own model instance: forward passes are counted. Passes hold 8 × 256 tokens.
    let embedder = CandleEmbedder::load(&model_dir(), 8).expect("load");
    let short = vec!["A short document queued first.".to_owned()];
    let long = full_length_texts("Long", 24);

    // The thread is busy with another pass while both requests queue up.
    let (busy, before) = occupy(&embedder).await;

    let short_call = embedder.embed(short.clone());
    let long_call = embedder.embed(long.clone());
    tokio::pin!(short_call, long_call);
    let (mut short_answered, mut long_answered) = (None, None);
    while short_answered.is_none() || long_answered.is_none() {
        // `biased`: the first poll sends the short request before the long one.
        tokio::select! {
            biased;
            vectors = &mut short_call, if short_answered.is_none() => {
                assert_eq!(vectors.expect("short").len(), short.len());
                short_answered = Some(embedder.forward_passes() - before);
            }
            vectors = &mut long_call, if long_answered.is_none() => {
                assert_eq!(vectors.expect("long").len(), long.len());
                long_answered = Some(embedder.forward_passes() - before);
            }
        }
    }
    busy.await.expect("join").expect("busy");
    let (short_answered, long_answered) = (short_answered.unwrap(), long_answered.unwrap());
    // Pass 1 is the busy one; the short request shares pass 2 with the long one, which needs
    // three more.
    assert!(
        short_answered < long_answered,
        "the short request was answered after {short_answered} passes, the long one after \
         {long_answered}: the short one waited for the long one"
    );
}
