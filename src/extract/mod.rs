//! Content types: from a document's bytes to the text that is chunked.
//!
//! | content type | extraction | chunked as |
//! |---|---|---|
//! | `text/plain` | the text | text |
//! | `text/markdown`, `text/x-markdown` | the text | Markdown |
//! | `text/html`, `application/xhtml+xml` | main content to Markdown ([`html`]) | Markdown |
//! | `application/pdf` (base64) | text per page ([`pdf`]) | text, page by page |
//! | source code ([`Language`]) | the text | along the syntax tree |
//!
//! [`chunk_document`] runs extraction and chunking together (both are CPU work for the
//! blocking pool); its chunks' byte ranges index the extracted text, and each PDF chunk
//! knows its page. Every failure is a [`Failure`] with its own [`ErrorKind`](crate::error::ErrorKind) at
//! [`Stage::Extract`]; nothing here panics on any input (the PDF parser's own panics are
//! caught and reported as `pdf_corrupt`).

pub mod html;
pub mod pdf;

use std::fmt;

use crate::chunk::{Chunk, ChunkFormat, Chunker};
use crate::error::{Failure, Stage};
use crate::language::Language;
use crate::message::Document;

/// What a document's content is, which decides how it is extracted and split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentKind {
    /// `text/plain`.
    Text,
    /// `text/markdown` (or `text/x-markdown`).
    Markdown,
    /// `text/html` (or `application/xhtml+xml`).
    Html,
    /// `application/pdf`: binary, sent base64-encoded.
    Pdf,
    /// Source code in a [`Language`].
    Code(Language),
}

/// Why a content type is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentTypeError {
    /// Not a content type this build reads.
    #[error("content type {0:?} is not supported")]
    Unsupported(String),
    /// A source-code content type naming a language without a grammar here.
    #[error(
        "language {0:?} is not supported; supported languages: rust, python, javascript, typescript, go"
    )]
    UnknownLanguage(String),
}

impl ContentKind {
    /// The supported content types, for error messages.
    pub const SUPPORTED: &'static str = "text/plain, text/markdown, text/html, application/pdf \
         (base64), or source code (text/x-rust, text/x-python, text/javascript, \
         text/x-typescript, text/x-go, text/x-code; language=<name>)";

    /// The kind of a MIME content type (case-insensitive; parameters such as
    /// `; charset=utf-8` are ignored, except `language=` of `text/x-code`/`text/x-source`).
    ///
    /// Fails with [`ContentTypeError::Unsupported`], or [`ContentTypeError::UnknownLanguage`]
    /// for `text/x-code` without a known `language` parameter.
    pub fn from_content_type(content_type: &str) -> Result<Self, ContentTypeError> {
        let mut parts = content_type.split(';');
        let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        match essence.as_str() {
            "text/plain" => return Ok(ContentKind::Text),
            "text/markdown" | "text/x-markdown" => return Ok(ContentKind::Markdown),
            "text/html" | "application/xhtml+xml" => return Ok(ContentKind::Html),
            "application/pdf" | "application/x-pdf" => return Ok(ContentKind::Pdf),
            "text/x-code" | "text/x-source" => {
                let language = parts
                    .filter_map(|p| p.split_once('='))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("language"))
                    .map(|(_, v)| v.trim().trim_matches('"').to_string())
                    .unwrap_or_default();
                return Language::from_name(&language)
                    .map(ContentKind::Code)
                    .ok_or(ContentTypeError::UnknownLanguage(language));
            }
            _ => {}
        }
        Language::from_mime(&essence)
            .map(ContentKind::Code)
            .ok_or_else(|| ContentTypeError::Unsupported(content_type.to_string()))
    }

    /// The content type for a file name's extension (`.md`, `.markdown`, `.txt`, `.text`,
    /// `.html`, `.htm`, `.xhtml`, `.pdf`, and the source extensions of [`Language`]), or
    /// `None`.
    pub fn content_type_for_extension(ext: &str) -> Option<&'static str> {
        match ext.to_ascii_lowercase().as_str() {
            "md" | "markdown" => Some("text/markdown"),
            "txt" | "text" => Some("text/plain"),
            "html" | "htm" | "xhtml" => Some("text/html"),
            "pdf" => Some("application/pdf"),
            other => Language::from_extension(other).map(Language::content_type),
        }
    }

    /// The extensions [`ContentKind::content_type_for_extension`] knows, for messages.
    pub const EXTENSIONS: &'static str = ".md, .markdown, .txt, .text, .html, .htm, .xhtml, .pdf, .rs, .py, .pyi, .js, .mjs, .cjs, .jsx, .ts, .mts, .cts, .go";

    /// The content is binary and must travel base64-encoded.
    pub fn is_binary(self) -> bool {
        self == ContentKind::Pdf
    }

    /// How the extracted text is split.
    pub fn chunk_format(self) -> ChunkFormat {
        match self {
            ContentKind::Text | ContentKind::Pdf => ChunkFormat::Text,
            ContentKind::Markdown | ContentKind::Html => ChunkFormat::Markdown,
            ContentKind::Code(language) => ChunkFormat::Code(language),
        }
    }
}

impl fmt::Display for ContentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentKind::Text => f.write_str("text"),
            ContentKind::Markdown => f.write_str("markdown"),
            ContentKind::Html => f.write_str("html"),
            ContentKind::Pdf => f.write_str("pdf"),
            ContentKind::Code(language) => write!(f, "code ({language})"),
        }
    }
}

/// Bounds on what extraction may take on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtractLimits {
    /// Most pages of a PDF (`limits.max_pdf_pages`); more is `content_too_large`.
    pub max_pdf_pages: usize,
    /// Deepest element nesting of an HTML document; deeper is `malformed_html`.
    pub max_html_depth: usize,
}

impl Default for ExtractLimits {
    fn default() -> Self {
        ExtractLimits {
            max_pdf_pages: 2_000,
            max_html_depth: html::MAX_DEPTH,
        }
    }
}

impl ExtractLimits {
    /// The limits of `config`'s pipeline (`limits.max_pdf_pages`).
    pub fn from_config(config: &crate::config::PipelineConfig) -> Self {
        ExtractLimits {
            max_pdf_pages: config.limits.max_pdf_pages,
            ..ExtractLimits::default()
        }
    }
}

/// A document's chunks, with what they were cut from.
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentChunks {
    /// The kind of content.
    pub kind: ContentKind,
    /// The extracted text: what the chunks' byte ranges index (the content itself for text,
    /// Markdown and code; the Markdown of an HTML page; a PDF's pages, separated by blank
    /// lines).
    pub text: String,
    /// The document's title found in the content (an HTML `<title>` or first `<h1>`), used
    /// as the context title when the metadata has none.
    pub title: Option<String>,
    /// The chunks, numbered from 0.
    pub chunks: Vec<Chunk>,
    /// For each chunk, its page (1-based) in a PDF; `None` for other content.
    pub pages: Vec<Option<u32>>,
}

/// Extracts `doc`'s text and splits it with `chunker`. A PDF is split page by page, so no
/// chunk spans two pages.
///
/// Fails with the decode kinds for content that is not what its content type says
/// (`unsupported_content_type`, `unsupported_language`, `invalid_field`,
/// `invalid_encoding`), `malformed_html`, `pdf_corrupt`, `pdf_encrypted`, `pdf_no_text`, or
/// `content_too_large` (more PDF pages than [`ExtractLimits::max_pdf_pages`]).
pub fn chunk_document(
    chunker: &Chunker,
    doc: &Document,
    limits: &ExtractLimits,
) -> Result<DocumentChunks, Failure> {
    let kind = doc.kind().map_err(extract_failure)?;
    let format = kind.chunk_format();
    let (text, title) = match kind {
        ContentKind::Text | ContentKind::Markdown | ContentKind::Code(_) => {
            (doc.text().map_err(extract_failure)?.into_owned(), None)
        }
        ContentKind::Html => {
            let source = doc.text().map_err(extract_failure)?;
            let page = html::to_markdown(&source, limits.max_html_depth)?;
            (page.markdown, page.title)
        }
        ContentKind::Pdf => {
            let bytes = doc.bytes().map_err(extract_failure)?;
            let texts = pdf::pages(&bytes, limits.max_pdf_pages)?;
            return Ok(chunk_pages(chunker, &texts));
        }
    };
    let chunks = chunker.split(&text, format);
    let pages = vec![None; chunks.len()];
    Ok(DocumentChunks {
        kind,
        text,
        title,
        chunks,
        pages,
    })
}

/// A PDF's chunks: each page with text split on its own (no chunk spans two pages), the
/// pages joined by blank lines into the document's text.
fn chunk_pages(chunker: &Chunker, texts: &[String]) -> DocumentChunks {
    let mut text = String::new();
    let mut chunks = Vec::new();
    let mut pages = Vec::new();
    for (number, page) in (1u32..).zip(texts) {
        let page = page.trim();
        if page.is_empty() {
            continue;
        }
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        let offset = text.len();
        text.push_str(page);
        for mut chunk in chunker.split(page, ChunkFormat::Text) {
            chunk.index = chunks.len();
            chunk.byte_range = chunk.byte_range.start + offset..chunk.byte_range.end + offset;
            chunks.push(chunk);
            pages.push(Some(number));
        }
    }
    DocumentChunks {
        kind: ContentKind::Pdf,
        text,
        title: None,
        chunks,
        pages,
    }
}

/// The cheap checks of [`chunk_document`], for producers (`rag-ingest submit`) to refuse
/// at once what a worker would dead-letter: an HTML page's NUL characters and nesting; a
/// PDF's parse, encryption and page count (its pages' text is not read).
///
/// Fails with the kinds [`chunk_document`] gives for these problems.
pub fn preflight(doc: &Document, limits: &ExtractLimits) -> Result<(), Failure> {
    match doc.kind().map_err(extract_failure)? {
        ContentKind::Html => {
            html::check(&doc.text().map_err(extract_failure)?, limits.max_html_depth)
        }
        ContentKind::Pdf => {
            pdf::open(&doc.bytes().map_err(extract_failure)?, limits.max_pdf_pages).map(|_| ())
        }
        ContentKind::Text | ContentKind::Markdown | ContentKind::Code(_) => Ok(()),
    }
}

/// A decode-time rejection found while extracting (the message skipped decoding's checks,
/// e.g. a document built in-process): same kind, stage `extract`.
fn extract_failure(rejection: crate::message::Rejection) -> Failure {
    Failure::new(rejection.kind, Stage::Extract, rejection.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_name_their_kind() {
        let kind = |ct: &str| ContentKind::from_content_type(ct);
        assert_eq!(kind("text/plain; charset=utf-8"), Ok(ContentKind::Text));
        assert_eq!(kind("Text/Markdown"), Ok(ContentKind::Markdown));
        assert_eq!(kind("text/html;charset=UTF-8"), Ok(ContentKind::Html));
        assert_eq!(kind("application/pdf"), Ok(ContentKind::Pdf));
        assert_eq!(kind("text/x-rust"), Ok(ContentKind::Code(Language::Rust)));
        assert_eq!(
            kind("text/x-code; language=\"Go\""),
            Ok(ContentKind::Code(Language::Go))
        );
        assert_eq!(
            kind("text/x-code; language=cobol"),
            Err(ContentTypeError::UnknownLanguage("cobol".into()))
        );
        assert_eq!(
            kind("text/x-code"),
            Err(ContentTypeError::UnknownLanguage(String::new()))
        );
        assert!(matches!(
            kind("application/msword"),
            Err(ContentTypeError::Unsupported(_))
        ));
        assert!(matches!(kind(""), Err(ContentTypeError::Unsupported(_))));
    }

    #[test]
    fn extensions_name_content_types_of_their_kind() {
        for ext in ContentKind::EXTENSIONS.split(", ") {
            let ext = ext.trim_start_matches('.');
            let ct = ContentKind::content_type_for_extension(ext)
                .unwrap_or_else(|| panic!("{ext} has no content type"));
            assert!(ContentKind::from_content_type(ct).is_ok(), "{ext}: {ct}");
        }
        assert_eq!(
            ContentKind::content_type_for_extension("HTM"),
            Some("text/html")
        );
        assert_eq!(ContentKind::content_type_for_extension("docx"), None);
    }
}
