//! Chunking throughput (MB/s) on a realistic corpus: the fixture documents repeated into
//! Markdown and plain-text documents of about 64 KiB, split with the real model's tokenizer.

use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rag_ingest::chunk::{ChunkFormat, Chunker};
use rag_ingest::embed::{CandleEmbedder, Embedder};

fn corpus(ext: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/docs");
    let mut text = String::new();
    for tenant in ["acme", "globex"] {
        let mut entries: Vec<_> = std::fs::read_dir(root.join(tenant))
            .expect("fixture dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .collect();
        entries.sort();
        for p in entries {
            text.push_str(&std::fs::read_to_string(p).expect("fixture"));
            text.push_str("\n\n");
        }
    }
    let mut doc = String::new();
    while doc.len() < 64 * 1024 {
        doc.push_str(&text);
    }
    doc
}

fn bench(c: &mut Criterion) {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
    let embedder = CandleEmbedder::load(&model, 32).expect("run scripts/fetch-model.sh first");
    let chunker = Chunker::new(
        embedder.tokenizer().clone(),
        200,
        20,
        embedder.max_input_tokens(),
    )
    .expect("chunker");
    let mut group = c.benchmark_group("chunking");
    for (name, ext, format) in [
        ("markdown", "md", ChunkFormat::Markdown),
        ("text", "txt", ChunkFormat::Text),
    ] {
        let doc = corpus(ext);
        group.throughput(Throughput::Bytes(doc.len() as u64));
        group.bench_function(name, |b| b.iter(|| chunker.split(&doc, format)));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
