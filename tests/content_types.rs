//! Content types on real-world fixtures (fixtures/docs/content, see its README): HTML to
//! Markdown, PDF page by page, source code along its syntax tree; every unreadable fixture
//! (fixtures/messages/unreadable) fails with the kind its name announces; and a property
//! test runs every parser on mutated input (nothing panics, every failure has a kind).
//!
//! Against the real all-MiniLM-L6-v2 tokenizer; no broker, no model weights.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use rag_ingest::chunk::{ChunkFormat, Chunker};
use rag_ingest::error::{ErrorKind, Stage};
use rag_ingest::extract::{ContentKind, DocumentChunks, ExtractLimits, chunk_document, pdf};
use rag_ingest::language::Language;
use rag_ingest::message::{Document, Rules, decode};
use rag_ingest::tenant::TenantId;
use tokenizers::Tokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chunker(max_tokens: usize) -> Chunker {
    let path = root().join("models/all-MiniLM-L6-v2/tokenizer.json");
    assert!(
        path.is_file(),
        "{} is missing: run scripts/fetch-model.sh first",
        path.display()
    );
    let tokenizer = Tokenizer::from_file(&path).expect("tokenizer");
    Chunker::new(tokenizer, max_tokens, 0, 256).expect("chunker")
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(root().join("fixtures/docs/content").join(name)).expect("fixture")
}

fn tenant() -> TenantId {
    TenantId::new("acme").expect("valid")
}

/// The upsert of fixture `name` as `rag-ingest submit` builds it (content type from the
/// extension; binary content in base64).
fn document(name: &str) -> Document {
    let ext = Path::new(name)
        .extension()
        .and_then(|e| e.to_str())
        .expect("extension");
    let content_type = ContentKind::content_type_for_extension(ext).expect("known extension");
    let bytes = fixture(name);
    if ContentKind::from_content_type(content_type)
        .expect("supported")
        .is_binary()
    {
        Document::upsert_bytes(tenant(), name, content_type, &bytes)
    } else {
        let mut doc = Document::upsert(tenant(), name, String::from_utf8(bytes).expect("utf-8"));
        doc.content_type = content_type.into();
        doc
    }
}

/// Every chunk slices the extracted text back to its own text, in order, numbered 0..n.
fn check_chunks(chunks: &DocumentChunks) {
    assert!(!chunks.chunks.is_empty());
    assert_eq!(chunks.chunks.len(), chunks.pages.len());
    let mut previous = 0;
    for (i, chunk) in chunks.chunks.iter().enumerate() {
        assert_eq!(chunk.index, i);
        assert_eq!(
            chunks.text.get(chunk.byte_range.clone()),
            Some(chunk.text.as_str()),
            "chunk {i}'s byte range does not slice its text"
        );
        assert!(chunk.byte_range.start >= previous, "chunks out of order");
        previous = chunk.byte_range.start;
    }
}

#[test]
fn html_keeps_the_main_content_with_its_structure_and_drops_the_chrome() {
    let doc = document("qemu-nbd.html");
    let chunks = chunk_document(&chunker(128), &doc, &ExtractLimits::default()).expect("html");
    check_chunks(&chunks);
    assert_eq!(chunks.kind, ContentKind::Html);
    let md = &chunks.text;
    // Headings, a code block, a definition list's option names: all kept as Markdown.
    assert!(
        md.lines()
            .any(|l| l.starts_with("# ") && l.contains("QEMU Disk Network Block Device Server")),
        "no top heading:\n{}",
        &md[..md.len().min(2000)]
    );
    assert!(
        md.lines().any(|l| l.starts_with("## ")),
        "no section headings"
    );
    assert!(md.contains("```"), "no code block");
    assert!(md.contains("--read-only"), "options lost");
    // Scripts, styles and the Sphinx navigation sidebar are not content.
    let html = String::from_utf8(fixture("qemu-nbd.html")).expect("utf-8");
    assert!(
        html.contains("<script") && html.contains("wy-nav-side"),
        "fixture changed"
    );
    for chrome in [
        "documentation_options",
        "function(",
        "Search docs",
        "wy-nav",
    ] {
        assert!(!md.contains(chrome), "{chrome:?} is not main content");
    }
    let title = chunks.title.as_deref().unwrap_or_default();
    assert!(
        title.starts_with("QEMU Disk Network Block Device Server — QEMU"),
        "the <title> is the document's title: {title:?}"
    );
}

#[test]
fn a_pdf_is_read_page_by_page_and_every_chunk_knows_its_page() {
    let doc = document("shared-mime-info-spec.pdf");
    let bytes = fixture("shared-mime-info-spec.pdf");
    let pages = pdf::pages(&bytes, 2_000).expect("pages");
    assert!(pages.len() >= 10, "{} pages", pages.len());
    assert!(pages[0].contains("Shared MIME-info Database"));
    let chunks = chunk_document(&chunker(128), &doc, &ExtractLimits::default()).expect("pdf");
    check_chunks(&chunks);
    let page_of: Vec<u32> = chunks.pages.iter().map(|p| p.expect("a page")).collect();
    assert!(
        page_of.windows(2).all(|w| w[0] <= w[1]),
        "pages out of order"
    );
    for (number, text) in (1u32..).zip(&pages) {
        let on_page: Vec<&str> = chunks
            .chunks
            .iter()
            .zip(&page_of)
            .filter(|(_, p)| **p == number)
            .map(|(c, _)| c.text.as_str())
            .collect();
        // Every page with text has chunks, and each of them is that page's text.
        assert_eq!(on_page.is_empty(), text.trim().is_empty(), "page {number}");
        for chunk in on_page {
            assert!(
                text.contains(chunk),
                "a chunk of page {number} is not on it"
            );
        }
    }
}

#[test]
fn a_pdf_with_only_an_owner_password_opens_as_in_any_viewer() {
    let doc = document("owner-password-only.pdf");
    let chunks = chunk_document(&chunker(128), &doc, &ExtractLimits::default()).expect("opens");
    check_chunks(&chunks);
    assert!(chunks.text.contains("Shared MIME-info Database"));
    let limits = ExtractLimits {
        max_pdf_pages: 1,
        ..ExtractLimits::default()
    };
    let err = chunk_document(&chunker(128), &doc, &limits).expect_err("2 pages > 1");
    assert_eq!(err.kind, ErrorKind::ContentTooLarge);
}

/// Byte ranges of the function-like nodes of `source` in `language`.
fn functions(language: Language, source: &str) -> Vec<std::ops::Range<usize>> {
    const KINDS: &[&str] = &[
        "function_item",
        "function_definition",
        "function_declaration",
        "method_declaration",
        "method_definition",
        "method_signature",
        "class_declaration",
        "interface_declaration",
        "type_declaration",
        "struct_item",
    ];
    let mut parser = tree_sitter::Parser::new();
    parser.set_language(&language.grammar()).expect("grammar");
    let tree = parser.parse(source, None).expect("parse");
    let mut out = Vec::new();
    let mut cursor = tree.walk();
    let mut stack = vec![tree.root_node()];
    while let Some(node) = stack.pop() {
        if KINDS.contains(&node.kind()) {
            out.push(node.byte_range());
        }
        stack.extend(node.children(&mut cursor));
    }
    out
}

#[test]
fn source_code_is_cut_along_its_syntax_tree() {
    let max_tokens = 192;
    let chunker = chunker(max_tokens);
    let tokenizer = {
        let path = root().join("models/all-MiniLM-L6-v2/tokenizer.json");
        let mut t = Tokenizer::from_file(path).expect("tokenizer");
        t.with_truncation(None).expect("no truncation");
        t.with_padding(None);
        t
    };
    let mut totals = (0usize, 0usize);
    for (name, language) in [
        ("semver_eval.rs", Language::Rust),
        ("textwrap.py", Language::Python),
        ("zod_util.js", Language::JavaScript),
        ("zod_error.d.ts", Language::TypeScript),
        ("persistent_https_client.go", Language::Go),
    ] {
        let doc = document(name);
        assert_eq!(doc.kind(), Ok(ContentKind::Code(language)), "{name}");
        let chunks = chunk_document(&chunker, &doc, &ExtractLimits::default()).expect(name);
        check_chunks(&chunks);
        let fits = |r: &std::ops::Range<usize>| {
            tokenizer
                .encode(&chunks.text[r.clone()], false)
                .expect("tokenize")
                .len()
                <= max_tokens
        };
        let whole = |r: &std::ops::Range<usize>| {
            chunks
                .chunks
                .iter()
                .any(|c| c.byte_range.start <= r.start && r.end <= c.byte_range.end)
        };
        let candidates: Vec<_> = functions(language, &chunks.text)
            .into_iter()
            .filter(fits)
            .collect();
        assert!(!candidates.is_empty(), "{name}: no function fits a chunk");
        let split: Vec<_> = candidates.iter().filter(|r| !whole(r)).collect();
        assert!(
            split.is_empty(),
            "{name}: {} of {} functions that fit one chunk were cut: {:?}",
            split.len(),
            candidates.len(),
            split
                .iter()
                .map(|r| chunks.text[(*r).clone()].lines().next().unwrap_or_default())
                .collect::<Vec<_>>()
        );
        // Plain-text splitting of the same code does cut some of them: the syntax tree is
        // what keeps them whole.
        let text_chunks = chunker.split(&chunks.text, ChunkFormat::Text);
        let text_whole = candidates
            .iter()
            .filter(|r| {
                text_chunks
                    .iter()
                    .any(|c| c.byte_range.start <= r.start && r.end <= c.byte_range.end)
            })
            .count();
        eprintln!(
            "{name}: all {} functions that fit a chunk whole as code, {text_whole} as text",
            candidates.len()
        );
        totals.0 += candidates.len();
        totals.1 += text_whole;
    }
    assert!(
        totals.1 < totals.0,
        "plain-text splitting kept every function whole too: the fixtures do not show the difference"
    );
}

/// The unreadable fixtures, decoded as a worker with a 1 MiB document limit would.
fn unreadable() -> Vec<(String, Document)> {
    let rules = Rules {
        allowed_tenants: [tenant()].into(),
        max_document_bytes: 1 << 20,
        max_metadata_bytes: 16 * 1024,
    };
    let dir = root().join("fixtures/messages/unreadable");
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixture dir")
        .map(|e| {
            let path = e.expect("entry").path();
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            let body = std::fs::read(&path).expect("readable");
            let doc = decode(&body, &rules).unwrap_or_else(|e| panic!("{name} must decode: {e}"));
            (name, doc)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn every_unreadable_fixture_fails_extraction_with_its_own_kind() {
    let fixtures = unreadable();
    let kinds: std::collections::BTreeSet<_> = fixtures
        .iter()
        .map(|(name, _)| name.split("--").next().unwrap_or_default().to_string())
        .collect();
    for kind in [
        "malformed_html",
        "pdf_corrupt",
        "pdf_encrypted",
        "pdf_no_text",
    ] {
        assert!(kinds.contains(kind), "no unreadable fixture for {kind}");
    }
    let chunker = chunker(128);
    for (name, doc) in fixtures {
        let expected = ErrorKind::parse(name.split("--").next().unwrap_or_default())
            .unwrap_or_else(|| panic!("{name}: not an error kind"));
        let err = chunk_document(&chunker, &doc, &ExtractLimits::default()).expect_err(&name);
        assert_eq!(err.kind, expected, "{name}: {}", err.reason);
        assert_eq!(err.stage, Stage::Extract, "{name}");
        assert!(
            !err.kind.is_transient(),
            "{name}: unreadable content is permanent"
        );
        // What `submit` checks before publishing finds the same problem where it looks.
        if let Err(pre) = rag_ingest::extract::preflight(&doc, &ExtractLimits::default()) {
            assert_eq!(pre.kind, expected, "{name}: preflight");
        }
    }
}

/// Kinds a parser may fail with on mutated input.
const EXTRACT_KINDS: &[ErrorKind] = &[
    ErrorKind::MalformedHtml,
    ErrorKind::PdfCorrupt,
    ErrorKind::PdfEncrypted,
    ErrorKind::PdfNoText,
    ErrorKind::EmptyContent,
    ErrorKind::InvalidEncoding,
    ErrorKind::ContentTooLarge,
];

/// `bytes` with `edits` applied: each (position, byte, op) overwrites, inserts or deletes
/// at `position` (modulo the length), and `cut` truncates to a share of the length.
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8, u8)], cut: Option<u8>) -> Vec<u8> {
    for &(at, byte, op) in edits {
        if bytes.is_empty() {
            bytes.push(byte);
            continue;
        }
        let at = at % bytes.len();
        match op % 3 {
            0 => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            _ => {
                bytes.remove(at);
            }
        }
    }
    if let Some(share) = cut {
        let keep = bytes.len() * usize::from(share) / 255;
        bytes.truncate(keep);
    }
    bytes
}

/// Runs extraction and chunking on `doc`: it returns chunks or fails with an extraction
/// kind, and never panics.
fn survives(chunker: &Chunker, doc: &Document) -> Result<(), TestCaseError> {
    match chunk_document(chunker, doc, &ExtractLimits::default()) {
        Ok(chunks) => {
            for chunk in &chunks.chunks {
                prop_assert_eq!(
                    chunks.text.get(chunk.byte_range.clone()),
                    Some(chunk.text.as_str())
                );
            }
        }
        Err(e) => prop_assert!(
            EXTRACT_KINDS.contains(&e.kind),
            "unexpected kind {:?}: {}",
            e.kind,
            e.reason
        ),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn mutated_pdfs_never_panic(
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..24),
        cut in prop::option::of(any::<u8>()),
    ) {
        let bytes = mutate(fixture("owner-password-only.pdf"), &edits, cut);
        let doc = Document::upsert_bytes(tenant(), "fuzz.pdf", "application/pdf", &bytes);
        survives(&chunker(128), &doc)?;
    }

    #[test]
    fn mutated_html_and_code_never_panic(
        which in 0usize..6,
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..48),
        cut in prop::option::of(any::<u8>()),
    ) {
        let (name, content_type) = [
            ("qemu-nbd.html", "text/html"),
            ("semver_eval.rs", "text/x-rust"),
            ("textwrap.py", "text/x-python"),
            ("zod_util.js", "text/javascript"),
            ("zod_error.d.ts", "text/x-typescript"),
            ("persistent_https_client.go", "text/x-go"),
        ][which];
        let bytes = mutate(fixture(name), &edits, cut);
        // Through base64, so that mutations may also break UTF-8 (invalid_encoding).
        let doc = Document::upsert_bytes(tenant(), name, content_type, &bytes);
        survives(&chunker(128), &doc)?;
    }

    #[test]
    fn arbitrary_markup_never_panics(html in "(<[a-z]{1,6}( [a-z]{1,4}=\"[^\"]{0,8}\")?>|</[a-z]{1,6}>|<!--|-->|[^<]{0,12}|&[a-z#0-9]{1,6};){0,200}") {
        let mut doc = Document::upsert(tenant(), "fuzz.html", html);
        doc.content_type = "text/html".into();
        survives(&chunker(128), &doc)?;
    }
}
