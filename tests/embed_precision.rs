//! The reduced-precision ([`Precision::Bf16`]) forward pass against the f32 one on a real
//! corpus: the fixture documents chunked at several sizes (up to the 256-token limit) and
//! whole (truncated), plus short sentences. Run `scripts/fetch-model.sh` first.
//!
//! On a CPU without AVX-512 BF16 the tests print `SKIPPED: ...` and pass.

use std::path::PathBuf;

use rag_ingest::embed::{CandleEmbedder, EmbedError, Embedder, Precision};

#[path = "support/fixtures.rs"]
mod fixtures;

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2")
}

/// The bf16 embedder, or `None` (after a loud message) if this CPU cannot run it.
fn load_bf16(batch_size: usize) -> Option<CandleEmbedder> {
    let dir = model_dir();
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-model.sh first",
        dir.display()
    );
    match CandleEmbedder::load_with_precision(&dir, batch_size, Precision::Bf16) {
        Ok(embedder) => Some(embedder),
        Err(EmbedError::ModelLoad { reason, .. }) if reason.contains("CPU features") => {
            eprintln!("SKIPPED: {reason} (avx512bf16 not available)");
            None
        }
        Err(e) => panic!("load bf16: {e}"),
    }
}

/// Every fixture document chunked at 250, 160, 100, 60 and 30 tokens and whole (truncated to the
/// model's 256 tokens), 12 windows of 400 words of the documents (truncated to 256 tokens),
/// plus a few short sentences: over 100 texts of mixed lengths.
fn corpus(embedder: &CandleEmbedder) -> Vec<String> {
    let mut texts = fixtures::chunked_fixtures(embedder, &[250, 160, 100, 60, 30]);
    let words: Vec<String> = fixtures::fixture_documents()
        .iter()
        .flat_map(|(_, doc)| doc.split_whitespace().map(str::to_owned))
        .collect();
    for i in 0..12 {
        let window: Vec<&str> = words
            .iter()
            .cycle()
            .skip(i * 397 % words.len())
            .take(400)
            .map(String::as_str)
            .collect();
        texts.push(window.join(" "));
    }
    texts.extend(
        [
            "How do I reset my password?",
            "ok",
            "The meeting has been postponed until Friday.",
        ]
        .map(str::to_owned),
    );
    texts
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn bf16_vectors_match_f32_on_the_fixture_corpus() {
    let Some(bf16) = load_bf16(16) else {
        return;
    };
    let f32 = CandleEmbedder::load(&model_dir(), 16).expect("load f32");
    let texts = corpus(&f32);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let lengths: Vec<usize> = texts
        .iter()
        .map(|t| {
            f32.tokenizer()
                .encode(*t, true)
                .expect("tokenize")
                .len()
                .min(f32.max_input_tokens())
        })
        .collect();
    assert!(texts.len() >= 100, "only {} texts", texts.len());
    assert!(
        lengths
            .iter()
            .filter(|&&n| n == f32.max_input_tokens())
            .count()
            >= 8,
        "too few texts at the {}-token limit",
        f32.max_input_tokens()
    );
    assert!(lengths.iter().any(|&n| n < 32), "no short texts");

    let reference = f32.embed_blocking(&texts).expect("embed f32");
    let reduced = bf16.embed_blocking(&texts).expect("embed bf16");
    assert_eq!(reduced.len(), texts.len());
    let cosines: Vec<f64> = reference
        .iter()
        .zip(&reduced)
        .map(|(a, b)| cosine(a, b))
        .collect();
    let (worst, min) =
        cosines
            .iter()
            .copied()
            .enumerate()
            .fold(
                (0, f64::INFINITY),
                |best, (i, c)| if c < best.1 { (i, c) } else { best },
            );
    let mean = cosines.iter().sum::<f64>() / cosines.len() as f64;
    eprintln!(
        "bf16 vs f32 over {} texts ({} tokens): min cos {min:.6} (text {worst}, {} tokens), mean cos {mean:.6}",
        texts.len(),
        lengths.iter().sum::<usize>(),
        lengths[worst]
    );
    assert!(
        min >= 0.999,
        "min cosine {min} < 0.999 (text {worst}: {:?})",
        texts[worst]
    );
    for (i, v) in reduced.iter().enumerate() {
        assert_eq!(v.len(), bf16.fingerprint().dims);
        let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "text {i}: norm {norm}");
    }
}

#[test]
fn bf16_vectors_do_not_depend_on_the_batch() {
    let Some(bf16) = load_bf16(8) else {
        return;
    };
    let texts = corpus(&bf16);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let together = bf16.embed_blocking(&texts).expect("embed batch");
    // Alone, and in a batch with other neighbours (the texts reversed).
    let reversed: Vec<&str> = texts.iter().rev().copied().collect();
    let mut apart = bf16.embed_blocking(&reversed).expect("embed reversed");
    apart.reverse();
    for (i, text) in texts.iter().enumerate().step_by(7) {
        let alone = bf16.embed_blocking(&[text]).expect("embed alone");
        for (other, what) in [(&alone[0], "alone"), (&apart[i], "in another batch")] {
            let c = cosine(&together[i], other);
            assert!(
                c >= 0.9999,
                "text {i} {what}: cos {c} with the batched vector"
            );
        }
    }
}

/// `auto` runs bf16 where the CPU has AVX-512 BF16 (the self-check passes on this model),
/// with exactly the vectors of an explicit bf16 model; elsewhere it runs f32, saying why.
#[test]
fn auto_runs_bf16_where_the_cpu_has_it_and_says_why() {
    let dir = model_dir();
    let auto = CandleEmbedder::load_with_precision(&dir, 8, Precision::Auto).expect("load auto");
    let choice = auto.precision().clone();
    assert_eq!(choice.requested, Precision::Auto);
    let texts = [
        "retries with exponential backoff",
        "ok",
        "Die Wartung beginnt am Montag.",
    ];
    match load_bf16(8) {
        Some(bf16) => {
            assert_eq!(choice.running, Precision::Bf16, "{}", choice.reason);
            assert!(choice.reason.contains("self-check"), "{}", choice.reason);
            assert_eq!(
                auto.embed_blocking(&texts).expect("auto"),
                bf16.embed_blocking(&texts).expect("bf16"),
                "auto's bf16 is the bf16 forward pass"
            );
        }
        None => {
            assert_eq!(choice.running, Precision::F32, "{}", choice.reason);
            assert!(choice.reason.contains("lacks"), "{}", choice.reason);
        }
    }
}

/// A self-check that bf16 cannot pass keeps f32: the vectors are exactly the reference ones.
#[test]
fn auto_keeps_f32_when_the_self_check_fails() {
    let dir = model_dir();
    // No cosine exceeds 1: a threshold above it fails on any CPU.
    let strict = CandleEmbedder::load_auto(&dir, 8, 1.5).expect("load");
    let choice = strict.precision().clone();
    assert_eq!(choice.running, Precision::F32, "{}", choice.reason);
    let f32 = CandleEmbedder::load(&dir, 8).expect("f32");
    let texts = rag_ingest::embed::SELF_CHECK_TEXTS;
    assert_eq!(
        strict.embed_blocking(&texts).expect("auto"),
        f32.embed_blocking(&texts).expect("f32")
    );
    // And the real threshold holds on the self-check texts wherever bf16 runs.
    if let Some(bf16) = load_bf16(8) {
        let a = f32.embed_blocking(&texts).expect("f32");
        let b = bf16.embed_blocking(&texts).expect("bf16");
        let least = a
            .iter()
            .zip(&b)
            .map(|(x, y)| cosine(x, y))
            .fold(f64::INFINITY, f64::min);
        assert!(
            least >= rag_ingest::embed::AUTO_MIN_COSINE,
            "least cosine {least}"
        );
    }
}
