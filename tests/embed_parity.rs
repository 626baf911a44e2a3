//! The fast forward pass of [`CandleEmbedder`] against the reference, candle-transformers'
//! `BertModel` (padded batches, mean pooling, L2 normalisation), on a realistic corpus: the
//! fixture documents chunked like the pipeline does, short sentences and over-long inputs.
//! Run `scripts/fetch-model.sh` first.

use std::path::PathBuf;

use rag_ingest::embed::{CandleEmbedder, Embedder};

#[allow(dead_code)]
#[path = "support/fixtures.rs"]
mod fixtures;
#[path = "support/reference_bert.rs"]
mod reference_bert;

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2")
}

#[test]
fn fast_path_matches_candle_bert_model() {
    let dir = model_dir();
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-model.sh first",
        dir.display()
    );
    let embedder = CandleEmbedder::load(&dir, 16).expect("load");
    let texts = fixtures::parity_corpus(&embedder);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let reference = reference_bert::Reference::load(
        &dir,
        embedder.tokenizer(),
        embedder.max_input_tokens(),
        16,
    );

    let started = std::time::Instant::now();
    let fast = embedder.embed_blocking(&refs).expect("embed");
    let fast_time = started.elapsed();
    let expected = reference.embed(&refs);
    eprintln!(
        "fast path {fast_time:?}, reference {:?}",
        started.elapsed() - fast_time
    );
    assert_eq!(fast.len(), expected.len());

    let mut worst_cos = f32::INFINITY;
    let mut worst_diff = 0.0f32;
    for ((text, a), b) in texts.iter().zip(&fast).zip(&expected) {
        assert_eq!(a.len(), b.len());
        let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>()
            / (a.iter().map(|x| x * x).sum::<f32>().sqrt()
                * b.iter().map(|x| x * x).sum::<f32>().sqrt());
        let diff = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(cos >= 0.9999, "cosine {cos} for {text:.60?}");
        worst_cos = worst_cos.min(cos);
        worst_diff = worst_diff.max(diff);
    }
    eprintln!(
        "{} texts: min cosine {worst_cos}, max abs diff {worst_diff:e} (reference padding ratio {:.3})",
        texts.len(),
        reference.padding_ratio(&refs)
    );
    assert!(worst_diff < 1e-5, "max abs diff {worst_diff}");
}
