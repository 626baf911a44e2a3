//! The fixture corpus (`fixtures/docs/{acme,globex}/*`), shared by the embedding tests and
//! benches that need real text.

use std::path::{Path, PathBuf};

use rag_ingest::chunk::{ChunkFormat, Chunker};
use rag_ingest::embed::{CandleEmbedder, Embedder};

/// Every fixture document with its chunk format (Markdown for `.md`, else plain text), tenant
/// `acme` first, each tenant's files in name order.
pub fn fixture_documents() -> Vec<(ChunkFormat, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/docs");
    let mut documents = Vec::new();
    for tenant in ["acme", "globex"] {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(root.join(tenant))
            .expect("fixture dir")
            .map(|e| e.expect("entry").path())
            .collect();
        paths.sort();
        for path in paths {
            let format = if path.extension().is_some_and(|e| e == "md") {
                ChunkFormat::Markdown
            } else {
                ChunkFormat::Text
            };
            documents.push((format, std::fs::read_to_string(&path).expect("fixture")));
        }
    }
    documents
}

/// Every fixture document chunked at each of `sizes` tokens (overlap a tenth), followed by the
/// document whole, document by document.
pub fn chunked_fixtures(embedder: &CandleEmbedder, sizes: &[usize]) -> Vec<String> {
    let chunkers: Vec<Chunker> = sizes
        .iter()
        .map(|&max_tokens| {
            Chunker::new(
                embedder.tokenizer().clone(),
                max_tokens,
                max_tokens / 10,
                embedder.max_input_tokens(),
            )
            .expect("chunker")
        })
        .collect();
    let mut texts = Vec::new();
    for (format, doc) in fixture_documents() {
        for chunker in &chunkers {
            texts.extend(chunker.split(&doc, format).into_iter().map(|c| c.text));
        }
        texts.push(doc);
    }
    texts
}

/// The parity corpus: every fixture document whole (truncated) and chunked at two sizes,
/// plus short, empty, non-Latin and over-long texts.
pub fn parity_corpus(embedder: &CandleEmbedder) -> Vec<String> {
    let mut texts = chunked_fixtures(embedder, &[240, 48]);
    texts.extend(
        [
            "This is a test sentence.",
            "",
            "ok",
            "How do I reset my password?",
            "检索增强生成 👨‍👩‍👧‍👦 Café naïve",
            "The meeting has been postponed until Friday.",
            "Retries back off exponentially, up to five attempts.",
        ]
        .map(str::to_owned),
    );
    let words: Vec<String> = (0..3000).map(|i| format!("word{}", i % 97)).collect();
    texts.push(words.join(" "));
    texts.push("Volcanoes erupt when magma rises through the crust. ".repeat(80));
    texts
}

/// The precision corpus: every fixture document chunked at 250, 160, 100, 60 and 30 tokens
/// and whole (truncated to the model's 256 tokens), 12 windows of 400 words of the documents
/// (truncated to 256 tokens), plus a few short sentences: over 100 texts of mixed lengths.
pub fn precision_corpus(embedder: &CandleEmbedder) -> Vec<String> {
    let mut texts = chunked_fixtures(embedder, &[250, 160, 100, 60, 30]);
    let words: Vec<String> = fixture_documents()
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

/// Cosine similarity of two vectors, in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}
