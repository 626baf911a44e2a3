//! The failure taxonomy shared by every stage.
//!
//! Each failure that can end a message's processing has an [`ErrorKind`] (a stable, snake_case
//! name that appears in the `x-error-kind` header of dead-lettered messages, in logs and in
//! metrics) and a [`Stage`] (where it happened). A kind is either permanent (retrying cannot
//! help: the message goes to the dead-letter queue at once) or transient (retry later).
//! A [`Failure`] carries both with the reason; the stage errors (`EmbedError`, `StoreError`)
//! convert into one where they are defined, so this module depends on nothing else in the crate.

use std::fmt;

/// Stable names for every way processing a message can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// The body is not valid JSON, or not a JSON object.
    InvalidJson,
    /// A field has the wrong type or value, or a required field (other than tenant and
    /// document id) is missing.
    InvalidField,
    /// The `schema` field names a wire-schema version this worker does not speak.
    UnsupportedSchema,
    /// `tenant_id` is missing, empty or malformed.
    MissingTenant,
    /// `tenant_id` is well-formed but not allowed by the pipeline's config.
    UnknownTenant,
    /// `document_id` is missing, empty or too long.
    InvalidDocumentId,
    /// The document's content is empty (or only whitespace).
    EmptyContent,
    /// The message body or the content is not valid UTF-8.
    InvalidEncoding,
    /// `content_type` is not one the chunker understands.
    UnsupportedContentType,
    /// A source-code content type names a language without a grammar here
    /// (`text/x-code; language=cobol`).
    UnsupportedLanguage,
    /// The HTML cannot be converted safely (NUL characters, absurdly deep nesting).
    MalformedHtml,
    /// The PDF cannot be parsed (not a PDF, a broken page).
    PdfCorrupt,
    /// The PDF needs a user password to be opened.
    PdfEncrypted,
    /// No page of the PDF holds text (a scan without OCR).
    PdfNoText,
    /// The chunker failed on this content (a bug; the same input fails again).
    ChunkFailed,
    /// The content exceeds `limits.max_document_bytes`.
    ContentTooLarge,
    /// The embedder could not be reached, timed out, or failed in a way that may pass.
    EmbedderUnavailable,
    /// The embedder refused the input (it will refuse it again).
    EmbedderRejected,
    /// A remote embedding provider refused the credentials (HTTP 401/403): the API key is
    /// missing, wrong, expired or lacks access to the model.
    EmbedderAuth,
    /// The embedder returned vectors of another dimension than the collection's.
    DimensionMismatch,
    /// The vector store could not be reached or failed in a way that may pass.
    StoreUnavailable,
    /// The vector store refused the write (it will refuse it again).
    StoreRejected,
    /// The broker dead-lettered the message because it was redelivered too often (crash loop).
    DeliveryLimit,
}

impl ErrorKind {
    /// Every kind, in declaration order (used by docs checks and metrics).
    pub const ALL: [ErrorKind; 23] = [
        ErrorKind::InvalidJson,
        ErrorKind::InvalidField,
        ErrorKind::UnsupportedSchema,
        ErrorKind::MissingTenant,
        ErrorKind::UnknownTenant,
        ErrorKind::InvalidDocumentId,
        ErrorKind::EmptyContent,
        ErrorKind::InvalidEncoding,
        ErrorKind::UnsupportedContentType,
        ErrorKind::UnsupportedLanguage,
        ErrorKind::MalformedHtml,
        ErrorKind::PdfCorrupt,
        ErrorKind::PdfEncrypted,
        ErrorKind::PdfNoText,
        ErrorKind::ChunkFailed,
        ErrorKind::ContentTooLarge,
        ErrorKind::EmbedderUnavailable,
        ErrorKind::EmbedderRejected,
        ErrorKind::EmbedderAuth,
        ErrorKind::DimensionMismatch,
        ErrorKind::StoreUnavailable,
        ErrorKind::StoreRejected,
        ErrorKind::DeliveryLimit,
    ];

    /// The stable snake_case name used in headers, logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidJson => "invalid_json",
            ErrorKind::InvalidField => "invalid_field",
            ErrorKind::UnsupportedSchema => "unsupported_schema",
            ErrorKind::MissingTenant => "missing_tenant",
            ErrorKind::UnknownTenant => "unknown_tenant",
            ErrorKind::InvalidDocumentId => "invalid_document_id",
            ErrorKind::EmptyContent => "empty_content",
            ErrorKind::InvalidEncoding => "invalid_encoding",
            ErrorKind::UnsupportedContentType => "unsupported_content_type",
            ErrorKind::UnsupportedLanguage => "unsupported_language",
            ErrorKind::MalformedHtml => "malformed_html",
            ErrorKind::PdfCorrupt => "pdf_corrupt",
            ErrorKind::PdfEncrypted => "pdf_encrypted",
            ErrorKind::PdfNoText => "pdf_no_text",
            ErrorKind::ChunkFailed => "chunk_failed",
            ErrorKind::ContentTooLarge => "content_too_large",
            ErrorKind::EmbedderUnavailable => "embedder_unavailable",
            ErrorKind::EmbedderRejected => "embedder_rejected",
            ErrorKind::EmbedderAuth => "embedder_auth",
            ErrorKind::DimensionMismatch => "dimension_mismatch",
            ErrorKind::StoreUnavailable => "store_unavailable",
            ErrorKind::StoreRejected => "store_rejected",
            ErrorKind::DeliveryLimit => "delivery_limit",
        }
    }

    /// Parses a name produced by [`ErrorKind::as_str`]; `None` for anything else.
    pub fn parse(name: &str) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.as_str() == name)
    }

    /// True when retrying may succeed (outages, timeouts); false when the same input will
    /// always fail the same way.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorKind::EmbedderUnavailable | ErrorKind::StoreUnavailable
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The pipeline stage at which a failure happened (`x-error-stage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Decoding and validating the message.
    Decode,
    /// Extracting text from the content (HTML, PDF).
    Extract,
    /// Splitting the document into chunks.
    Chunk,
    /// Computing embeddings.
    Embed,
    /// Writing to or reading from the vector store.
    Store,
    /// The broker itself (delivery limit).
    Broker,
}

impl Stage {
    /// The stable lowercase name used in headers and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Decode => "decode",
            Stage::Extract => "extract",
            Stage::Chunk => "chunk",
            Stage::Embed => "embed",
            Stage::Store => "store",
            Stage::Broker => "broker",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A processing failure: what kind, at which stage, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} at {stage}: {reason}")]
pub struct Failure {
    /// Taxonomy kind; [`ErrorKind::is_transient`] decides between retry and DLQ.
    pub kind: ErrorKind,
    /// Where it happened.
    pub stage: Stage,
    /// Human-readable cause (never contains secrets).
    pub reason: String,
    /// The failure was a circuit breaker refusing the call: the dependency is known to be
    /// down, so the attempt says nothing about this message and is not counted.
    pub circuit_open: bool,
}

impl Failure {
    /// A failure of `kind` at `stage`.
    pub fn new(kind: ErrorKind, stage: Stage, reason: impl Into<String>) -> Self {
        Failure {
            kind,
            stage,
            reason: reason.into(),
            circuit_open: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for kind in ErrorKind::ALL {
            assert!(seen.insert(kind.as_str()), "duplicate name {kind}");
            assert_eq!(ErrorKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(ErrorKind::parse("nope"), None);
    }
}
