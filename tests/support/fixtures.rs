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
