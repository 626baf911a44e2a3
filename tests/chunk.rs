//! Chunker tests against the real all-MiniLM-L6-v2 tokenizer.

use std::path::PathBuf;

use rag_ingest::chunk::{Chunk, ChunkError, ChunkFormat, Chunker};
use tokenizers::Tokenizer;

/// all-MiniLM-L6-v2 reads 256 tokens, [CLS] and [SEP] included.
const MODEL_MAX: usize = 256;

fn tokenizer() -> Tokenizer {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2/tokenizer.json");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model.sh first",
        path.display()
    );
    let mut tokenizer = Tokenizer::from_file(&path)
        .unwrap_or_else(|e| panic!("cannot load {}: {e}", path.display()));
    // tokenizer.json truncates and pads to 128; count every real token instead.
    tokenizer.with_truncation(None).expect("disable truncation");
    tokenizer.with_padding(None);
    tokenizer
}

fn chunker(max_tokens: usize, overlap: usize) -> Chunker {
    Chunker::new(tokenizer(), max_tokens, overlap, MODEL_MAX).expect("valid chunker")
}

/// Token count of `text` as the model sees it: special tokens included.
fn model_tokens(tokenizer: &Tokenizer, text: &str) -> usize {
    tokenizer.encode(text, true).expect("tokenize").len()
}

/// The invariants every split must satisfy; returns the chunks for further checks.
fn check(chunker: &Chunker, content: &str, format: ChunkFormat, limit: usize) -> Vec<Chunk> {
    let tokenizer = tokenizer();
    let chunks = chunker.split(content, format);
    let mut previous_start = None;
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(chunk.index, i, "chunks are numbered in order");
        assert_eq!(
            &content[chunk.byte_range.clone()],
            chunk.text,
            "chunk {i}'s range slices back to its text"
        );
        assert!(!chunk.text.trim().is_empty(), "chunk {i} is not blank");
        let with_special = model_tokens(&tokenizer, &chunk.text);
        assert!(
            with_special <= MODEL_MAX,
            "chunk {i} has {with_special} tokens > {MODEL_MAX}"
        );
        assert_eq!(chunk.tokens + 2, with_special, "chunk {i}'s token count");
        assert!(
            chunk.tokens <= limit,
            "chunk {i} has {} tokens > {limit}",
            chunk.tokens
        );
        if let Some(start) = previous_start {
            assert!(chunk.byte_range.start > start, "chunk {i} moves forward");
        }
        previous_start = Some(chunk.byte_range.start);
    }
    chunks
}

fn prose(paragraphs: usize) -> String {
    (0..paragraphs)
        .map(|p| {
            format!(
                "Paragraph {p} talks about message queues, vector databases and embeddings. \
                 Each sentence adds a little more text so that chunks fill up. \
                 The worker reads a document, splits it and stores the vectors.\n\n"
            )
        })
        .collect()
}

#[test]
fn content_type_parsing() {
    use ChunkFormat::{Markdown, Text};
    assert_eq!(ChunkFormat::from_content_type("text/plain"), Some(Text));
    assert_eq!(
        ChunkFormat::from_content_type("text/plain; charset=utf-8"),
        Some(Text)
    );
    assert_eq!(ChunkFormat::from_content_type("TEXT/Plain"), Some(Text));
    assert_eq!(
        ChunkFormat::from_content_type("text/markdown"),
        Some(Markdown)
    );
    assert_eq!(
        ChunkFormat::from_content_type(" Text/Markdown ;charset=UTF-8"),
        Some(Markdown)
    );
    assert_eq!(
        ChunkFormat::from_content_type("text/x-markdown"),
        Some(Markdown)
    );
    assert_eq!(ChunkFormat::from_content_type("text/html"), None);
    assert_eq!(ChunkFormat::from_content_type("application/json"), None);
    assert_eq!(ChunkFormat::from_content_type("text/plainx"), None);
    assert_eq!(ChunkFormat::from_content_type(""), None);
}

#[test]
fn invalid_sizes_are_rejected() {
    assert!(matches!(
        Chunker::new(tokenizer(), 0, 0, MODEL_MAX),
        Err(ChunkError::ZeroMaxTokens)
    ));
    assert!(matches!(
        Chunker::new(tokenizer(), 100, 100, MODEL_MAX),
        Err(ChunkError::OverlapTooLarge { .. })
    ));
    assert!(matches!(
        Chunker::new(tokenizer(), 100, 150, MODEL_MAX),
        Err(ChunkError::OverlapTooLarge { .. })
    ));
    // 255 + [CLS] + [SEP] = 257 > 256.
    let err = Chunker::new(tokenizer(), 255, 0, MODEL_MAX).expect_err("too large");
    assert!(matches!(
        err,
        ChunkError::ExceedsModelLimit {
            max_tokens: 255,
            special_tokens: 2,
            model_max_tokens: 256
        }
    ));
    assert!(err.to_string().contains("256"), "{err}");
    // The largest valid size.
    assert!(Chunker::new(tokenizer(), 254, 0, MODEL_MAX).is_ok());
}

#[test]
fn empty_and_blank_documents_give_no_chunks() {
    let chunker = chunker(64, 0);
    for format in [ChunkFormat::Text, ChunkFormat::Markdown] {
        assert!(chunker.split("", format).is_empty());
        assert!(chunker.split(" \n\t\r\n  \u{3000}", format).is_empty());
    }
}

#[test]
fn small_document_is_one_chunk() {
    let chunker = chunker(254, 0);
    let content = "A short note about ingestion.";
    for format in [ChunkFormat::Text, ChunkFormat::Markdown] {
        let chunks = check(&chunker, content, format, 254);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].byte_range, 0..content.len());
        assert_eq!(chunks[0].text, content);
        assert_eq!(chunks[0].index, 0);
    }
}

#[test]
fn long_prose_is_split_within_limits() {
    let chunker = chunker(100, 0);
    let content = prose(40);
    let chunks = check(&chunker, &content, ChunkFormat::Text, 100);
    assert!(chunks.len() > 5, "{} chunks", chunks.len());
    // Without overlap, chunks don't overlap and cover all the words.
    for pair in chunks.windows(2) {
        assert!(pair[0].byte_range.end <= pair[1].byte_range.start);
    }
    let words: usize = chunks
        .iter()
        .map(|c| c.text.split_whitespace().count())
        .sum();
    assert_eq!(words, content.split_whitespace().count());
}

#[test]
fn overlap_produces_overlapping_ranges() {
    let chunker = chunker(60, 20);
    // text-splitter overlaps by whole units of the level it splits at: use one long
    // paragraph of short sentences so that chunks are made of sentences.
    let content: String = (0..60)
        .map(|i| format!("Sentence number {i} is short. "))
        .collect();
    let chunks = check(&chunker, &content, ChunkFormat::Text, 60);
    assert!(chunks.len() > 3, "{} chunks", chunks.len());
    let overlapping = chunks
        .windows(2)
        .filter(|pair| pair[1].byte_range.start < pair[0].byte_range.end)
        .count();
    assert!(
        overlapping > 0,
        "no consecutive chunks overlap: {:?}",
        chunks
            .iter()
            .map(|c| c.byte_range.clone())
            .collect::<Vec<_>>()
    );
}

#[test]
fn cjk_text() {
    let chunker = chunker(50, 0);
    let sentence = "检索增强生成将文档切分成块，然后为每个块计算向量。日本語の文章も同じように処理されます。한국어 문장도 마찬가지입니다. ";
    let content = sentence.repeat(30);
    let chunks = check(&chunker, &content, ChunkFormat::Text, 50);
    assert!(chunks.len() > 5, "{} chunks", chunks.len());
    // The same text without any spaces or punctuation between sentences.
    let dense: String = content.chars().filter(|c| !c.is_whitespace()).collect();
    let chunks = check(&chunker, &dense, ChunkFormat::Text, 50);
    assert!(chunks.len() > 5, "{} chunks", chunks.len());
}

#[test]
fn emoji_and_zwj_sequences() {
    let chunker = chunker(32, 0);
    // Family (ZWJ), rainbow flag (ZWJ + VS16), skin tones, regional indicators, keycaps.
    let unit = "Team 👨‍👩‍👧‍👦 shipped 🏳️‍🌈 release 👍🏽🎉 in 🇩🇪🇯🇵 at 1️⃣ o'clock! ";
    let content = unit.repeat(40);
    let chunks = check(&chunker, &content, ChunkFormat::Text, 32);
    assert!(chunks.len() > 3);
    // Only emoji, no spaces at all.
    let emoji = "👨‍👩‍👧‍👦🏳️‍🌈👍🏽🇩🇪🧑🏿‍🚀".repeat(200);
    check(&chunker, &emoji, ChunkFormat::Text, 32);
    check(&chunker, &emoji, ChunkFormat::Markdown, 32);
}

#[test]
fn combining_marks() {
    let chunker = chunker(32, 0);
    // Decomposed accents, stacked marks ("Zalgo"), Devanagari and Hebrew points.
    let content = "Cafe\u{301} nai\u{308}ve re\u{301}sume\u{301} \
                   Z\u{335}\u{31b}\u{33d}a\u{337}\u{34c}l\u{334}\u{35d}g\u{336}o\u{338} \
                   हिन्दी नमस्ते בְּרֵאשִׁית "
        .repeat(50);
    check(&chunker, &content, ChunkFormat::Text, 32);
    // One grapheme cluster with thousands of combining marks.
    let mut cluster = String::from("a");
    cluster.extend(std::iter::repeat_n('\u{301}', 3000));
    let content = format!("before {cluster} after");
    let chunks = check(&chunker, &content, ChunkFormat::Text, 32);
    assert!(!chunks.is_empty());
}

#[test]
fn huge_line_without_spaces() {
    let chunker = chunker(128, 16);
    // Letters only: WordPiece turns words over 100 chars into one [UNK].
    let letters = "abcdefghij".repeat(2_000);
    let chunks = check(&chunker, &letters, ChunkFormat::Text, 128);
    assert!(!chunks.is_empty());
    // Many tokens and no whitespace: punctuation, digits, base64-like noise.
    let noisy: String = (0..20_000)
        .map(|i| match i % 7 {
            0 => '/',
            1 => 'x',
            2 => '9',
            3 => '+',
            4 => 'Q',
            5 => '=',
            _ => '.',
        })
        .collect();
    for format in [ChunkFormat::Text, ChunkFormat::Markdown] {
        let chunks = check(&chunker, &noisy, format, 128);
        assert!(chunks.len() > 20, "{} chunks", chunks.len());
        // Together the chunks cover the whole line.
        assert_eq!(chunks[0].byte_range.start, 0);
        assert_eq!(chunks.last().map(|c| c.byte_range.end), Some(noisy.len()));
    }
}

#[test]
fn markdown_with_empty_sections() {
    let chunker = chunker(40, 0);
    let content = "# Title\n\n## Empty section\n\n## Another empty one\n\n### Deeper\n\n\
                   ## Filled\n\nSome text under a heading.\n\n#\n\n##   \n\n---\n\n> \n\n- \n- item\n";
    let chunks = check(&chunker, content, ChunkFormat::Markdown, 40);
    assert!(!chunks.is_empty());
    assert!(
        chunks
            .iter()
            .any(|c| c.text.contains("Some text under a heading."))
    );
    // A heading-only document.
    let chunks = check(&chunker, "# Only a heading\n", ChunkFormat::Markdown, 40);
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].text, "# Only a heading");
}

#[test]
fn markdown_code_fences() {
    let chunker = chunker(64, 0);
    let code =
        "fn main() {\n    let x = vec![1, 2, 3];\n    println!(\"{:?}\", x);\n}\n".repeat(20);
    let content = format!(
        "# Example\n\nSome intro text.\n\n```rust\n{code}```\n\nAfter the fence.\n\n\
         ~~~\nunterminated tilde fence with text\n\n## Next\n\n```\n"
    );
    let chunks = check(&chunker, &content, ChunkFormat::Markdown, 64);
    assert!(chunks.len() > 3, "{} chunks", chunks.len());
    assert!(chunks.iter().any(|c| c.text.contains("After the fence.")));
    // A small fenced block stays in one chunk with its fences.
    let small = "Intro.\n\n```python\nprint('hi')\n```\n";
    let chunks = check(&chunker, small, ChunkFormat::Markdown, 64);
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].byte_range, 0..small.trim_end().len());
}

#[test]
fn long_markdown_document() {
    let chunker = chunker(200, 30);
    let mut content = String::new();
    for section in 0..15 {
        content.push_str(&format!("## Section {section}\n\n"));
        content.push_str(&prose(3));
        content.push_str("- a list item\n- another item with **bold** and `code`\n\n");
        content.push_str("| a | b |\n|---|---|\n| 1 | 2 |\n\n");
    }
    let chunks = check(&chunker, &content, ChunkFormat::Markdown, 200);
    assert!(chunks.len() > 5);
}

#[test]
fn grapheme_longer_than_the_limit_is_split() {
    let chunker = chunker(16, 0);
    // One extended grapheme cluster each (consonant + spacing marks, Hangul leading jamo +
    // vowel) that WordPiece turns into one token per code point: it has to be cut inside
    // the grapheme.
    let devanagari = format!("क{}", "ा".repeat(60));
    let hangul = format!("{}ᅡ", "ᄀ".repeat(60));
    for cluster in [&devanagari, &hangul] {
        let content = format!("intro words {cluster} outro words");
        for format in [ChunkFormat::Text, ChunkFormat::Markdown] {
            let chunks = check(&chunker, &content, format, 16);
            assert!(chunks.len() >= 4, "{} chunks", chunks.len());
            // Nothing is lost: the chunks tile the content apart from whitespace.
            let joined: String = chunks.iter().map(|c| c.text.as_str()).collect();
            let expected: String = content.chars().filter(|c| !c.is_whitespace()).collect();
            assert_eq!(
                joined
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .collect::<String>(),
                expected
            );
        }
    }
}

/// The BERT tokenizer behind a normaliser that expands `ж` (2 bytes) into five words, so
/// a text has more tokens than bytes (as NFKC expansions like `ﷺ` can cause).
fn expanding_tokenizer() -> Tokenizer {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2/tokenizer.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read tokenizer.json"))
            .expect("parse tokenizer.json");
    let bert = json["normalizer"].take();
    json["normalizer"] = serde_json::json!({
        "type": "Sequence",
        "normalizers": [
            {"type": "Replace", "pattern": {"String": "ж"}, "content": " one two three four five "},
            bert,
        ],
    });
    Tokenizer::from_bytes(serde_json::to_vec(&json).expect("serialize")).expect("load tokenizer")
}

#[test]
fn over_long_splitter_output_is_hard_split() {
    let mut tokenizer = expanding_tokenizer();
    tokenizer.with_truncation(None).expect("disable truncation");
    tokenizer.with_padding(None);
    assert_eq!(tokenizer.encode("ж", false).expect("encode").len(), 5);
    let chunker = Chunker::new(tokenizer.clone(), 16, 0, MODEL_MAX).expect("chunker");
    // text-splitter assumes a 16-byte word has at most 16 tokens; this one has 40.
    let content = "жжжжжжжж жжжжжжжж. Then some normal words follow here.";
    for format in [ChunkFormat::Text, ChunkFormat::Markdown] {
        let chunks = chunker.split(content, format);
        assert!(chunks.len() >= 6, "{chunks:?}");
        for (i, chunk) in chunks.iter().enumerate() {
            assert_eq!(chunk.index, i);
            assert_eq!(&content[chunk.byte_range.clone()], chunk.text);
            let tokens = tokenizer
                .encode(chunk.text.as_str(), true)
                .expect("encode")
                .len();
            assert!(
                tokens <= 18,
                "chunk {i} {:?} has {tokens} tokens",
                chunk.text
            );
            assert_eq!(chunk.tokens + 2, tokens);
        }
        let joined: String = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(
            joined.replace(' ', ""),
            content.replace(' ', ""),
            "nothing is lost"
        );
    }
}
