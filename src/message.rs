//! Document messages: wire schema v1 (a JSON body) and its validation.
//!
//! ```json
//! { "schema": 1, "op": "upsert", "tenant_id": "acme", "document_id": "handbook/retries.md",
//!   "version": 3, "content_type": "text/markdown", "content": "…", "metadata": {}, "request_id": "…" }
//! ```
//!
//! Binary content (a PDF) travels base64-encoded, with `"content_encoding": "base64"`; text
//! may too. Without `content_encoding`, `content` is the text itself, as it always was.
//! [`decode`] turns a delivery body into a [`Document`] or a [`Rejection`] whose
//! [`ErrorKind`] says exactly what was wrong. Every rejection is permanent: the message goes
//! to the dead-letter queue. Nothing in here panics on any input.

use std::collections::BTreeSet;

use std::borrow::Cow;

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::error::ErrorKind;
use crate::extract::{ContentKind, ContentTypeError};
use crate::tenant::{TenantError, TenantId};

/// The only wire-schema version this build speaks.
pub const SCHEMA_VERSION: u64 = 1;

/// Longest accepted `document_id`, in bytes.
pub const MAX_DOCUMENT_ID_BYTES: usize = 512;

/// What a message asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Insert or replace the document's chunks.
    Upsert,
    /// Remove every chunk of the document.
    Delete,
}

impl Op {
    /// The wire name (`upsert` or `delete`).
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Upsert => "upsert",
            Op::Delete => "delete",
        }
    }
}

/// How the wire field `content` holds the document's bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ContentEncoding {
    /// `content` is the text itself (no `content_encoding`, or `"identity"`).
    #[default]
    Identity,
    /// `content` is the bytes in standard base64 (`"content_encoding": "base64"`; padding
    /// optional, whitespace ignored). Needed for binary content types (`application/pdf`).
    Base64,
}

impl ContentEncoding {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ContentEncoding::Identity => "identity",
            ContentEncoding::Base64 => "base64",
        }
    }
}

/// A validated document message.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// Upsert or delete.
    pub op: Op,
    /// Owning tenant (allowed by the pipeline).
    pub tenant: TenantId,
    /// Producer's identifier of the document, unique per tenant.
    pub document_id: String,
    /// Optional monotonic version; an older version never overwrites a newer one.
    pub version: Option<u64>,
    /// MIME type of the content: `text/plain`, `text/markdown`, `text/html`,
    /// `application/pdf` or a source-code type (see [`ContentKind::from_content_type`]).
    pub content_type: String,
    /// The content as it travels: the text, or its bytes in base64 (see
    /// [`Document::content_encoding`]). Empty for deletes.
    pub content: String,
    /// How `content` holds the bytes.
    pub content_encoding: ContentEncoding,
    /// Free-form metadata stored with every chunk.
    pub metadata: Map<String, Value>,
    /// Correlation id for logs, if the producer set one.
    pub request_id: Option<String>,
}

impl Document {
    /// A new upsert of `content` with content type `text/plain`, no version and no metadata.
    pub fn upsert(
        tenant: TenantId,
        document_id: impl Into<String>,
        content: impl Into<String>,
    ) -> Self {
        Document {
            op: Op::Upsert,
            tenant,
            document_id: document_id.into(),
            version: None,
            content_type: "text/plain".into(),
            content: content.into(),
            content_encoding: ContentEncoding::Identity,
            metadata: Map::new(),
            request_id: None,
        }
    }

    /// A delete of `document_id`.
    pub fn delete(tenant: TenantId, document_id: impl Into<String>) -> Self {
        Document {
            op: Op::Delete,
            content: String::new(),
            ..Document::upsert(tenant, document_id, "")
        }
    }

    /// A new upsert of binary (or any) `bytes` of `content_type`, sent base64-encoded; no
    /// version, no metadata.
    pub fn upsert_bytes(
        tenant: TenantId,
        document_id: impl Into<String>,
        content_type: impl Into<String>,
        bytes: &[u8],
    ) -> Self {
        Document {
            content_type: content_type.into(),
            content_encoding: ContentEncoding::Base64,
            ..Document::upsert(
                tenant,
                document_id,
                base64::engine::general_purpose::STANDARD.encode(bytes),
            )
        }
    }

    /// How the content type's text is split (`None` if the type is unsupported). For text,
    /// Markdown and code that text is `content` itself; HTML and PDF must be extracted first
    /// ([`crate::extract::chunk_document`] does both).
    pub fn format(&self) -> Option<crate::chunk::ChunkFormat> {
        self.kind().ok().map(ContentKind::chunk_format)
    }

    /// What kind of content this is (which extractor and splitter it takes).
    ///
    /// Fails with `unsupported_content_type` or `unsupported_language`.
    pub fn kind(&self) -> Result<ContentKind, Rejection> {
        ContentKind::from_content_type(&self.content_type).map_err(|e| match e {
            ContentTypeError::Unsupported(_) => Rejection::new(
                ErrorKind::UnsupportedContentType,
                format!("{e}; use {}", ContentKind::SUPPORTED),
            ),
            ContentTypeError::UnknownLanguage(_) => {
                Rejection::new(ErrorKind::UnsupportedLanguage, e.to_string())
            }
        })
    }

    /// The document's bytes: `content` itself, or decoded from base64.
    ///
    /// Fails with `invalid_field` if `content` is not valid base64.
    pub fn bytes(&self) -> Result<Cow<'_, [u8]>, Rejection> {
        match self.content_encoding {
            ContentEncoding::Identity => Ok(Cow::Borrowed(self.content.as_bytes())),
            ContentEncoding::Base64 => decode_base64(&self.content).map(Cow::Owned),
        }
    }

    /// The document's text: `content` itself, or its base64 decoded as UTF-8.
    ///
    /// Fails with `invalid_field` (not base64) or `invalid_encoding` (not UTF-8).
    pub fn text(&self) -> Result<Cow<'_, str>, Rejection> {
        match self.bytes()? {
            Cow::Borrowed(_) => Ok(Cow::Borrowed(self.content.as_str())),
            Cow::Owned(bytes) => String::from_utf8(bytes).map(Cow::Owned).map_err(|e| {
                Rejection::new(
                    ErrorKind::InvalidEncoding,
                    format!("the base64 content is not valid UTF-8 ({e})"),
                )
            }),
        }
    }

    /// Checks the document exactly as a worker with `rules` will when it arrives: its wire
    /// body is decoded and validated. Producers call this to learn at once what the worker
    /// would send to the dead-letter queue.
    ///
    /// Fails with the [`Rejection`] the worker would record.
    pub fn check(&self, rules: &Rules) -> Result<(), Rejection> {
        decode(&self.to_wire(), rules).map(|_| ())
    }

    /// Serialises the document as a wire schema v1 JSON body.
    pub fn to_wire(&self) -> Vec<u8> {
        let mut body = Map::new();
        body.insert("schema".into(), Value::from(SCHEMA_VERSION));
        body.insert("op".into(), Value::from(self.op.as_str()));
        body.insert("tenant_id".into(), Value::from(self.tenant.as_str()));
        body.insert("document_id".into(), Value::from(self.document_id.as_str()));
        if let Some(v) = self.version {
            body.insert("version".into(), Value::from(v));
        }
        if self.op == Op::Upsert {
            body.insert(
                "content_type".into(),
                Value::from(self.content_type.as_str()),
            );
            body.insert("content".into(), Value::from(self.content.as_str()));
            if self.content_encoding != ContentEncoding::Identity {
                body.insert(
                    "content_encoding".into(),
                    Value::from(self.content_encoding.as_str()),
                );
            }
        }
        if !self.metadata.is_empty() {
            body.insert("metadata".into(), Value::Object(self.metadata.clone()));
        }
        if let Some(r) = &self.request_id {
            body.insert("request_id".into(), Value::from(r.as_str()));
        }
        Value::Object(body).to_string().into_bytes()
    }
}

/// Why a message was refused: a kind for machines, a reason for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {reason}")]
pub struct Rejection {
    /// The taxonomy kind (always permanent).
    pub kind: ErrorKind,
    /// A sentence saying what is wrong.
    pub reason: String,
}

impl Rejection {
    fn new(kind: ErrorKind, reason: impl Into<String>) -> Self {
        Rejection {
            kind,
            reason: reason.into(),
        }
    }
}

/// What a message is checked against.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Tenants whose documents are accepted.
    pub allowed_tenants: BTreeSet<TenantId>,
    /// Largest accepted content, in bytes.
    pub max_document_bytes: usize,
    /// Largest accepted metadata, in bytes as counted by [`metadata_size`].
    pub max_metadata_bytes: usize,
}

impl Rules {
    /// What the workers of `config`'s pipeline accept: its allowed tenants and its
    /// `limits.max_document_bytes` / `limits.max_metadata_bytes`.
    pub fn from_config(config: &crate::config::PipelineConfig) -> Self {
        Rules {
            allowed_tenants: config.allowed_tenants(),
            max_document_bytes: config.limits.max_document_bytes,
            max_metadata_bytes: config.limits.max_metadata_bytes,
        }
    }
}

/// Bytes added to the compact JSON length for every key and value of a metadata object:
/// about what one takes in memory beyond its text (a `serde_json::Value` is 32 bytes, a map
/// entry more), so that many tiny values cannot take 16 times their JSON size.
pub const METADATA_BYTES_PER_VALUE: usize = 32;

/// The size of `metadata` as `limits.max_metadata_bytes` counts it: its compact JSON length
/// plus [`METADATA_BYTES_PER_VALUE`] for every key and every value (nested ones included).
/// Saturates instead of overflowing.
pub fn metadata_size(metadata: &Map<String, Value>) -> usize {
    fn values(value: &Value) -> usize {
        match value {
            Value::Array(items) => items.iter().map(values).fold(1, usize::saturating_add),
            Value::Object(map) => map
                .values()
                .map(|v| values(v).saturating_add(1))
                .fold(1, usize::saturating_add),
            _ => 1,
        }
    }
    let mut json = JsonLength(0);
    // Writing to a counter cannot fail; a failure would only under-count the text part.
    let _ = serde_json::to_writer(&mut json, metadata);
    let mut count = 0usize;
    for value in metadata.values() {
        count = count.saturating_add(values(value)).saturating_add(1);
    }
    json.0
        .saturating_add(count.saturating_mul(METADATA_BYTES_PER_VALUE))
}

/// An `io::Write` that only counts bytes.
struct JsonLength(usize);

impl std::io::Write for JsonLength {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 = self.0.saturating_add(buf.len());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The tenant named by a message body, if it can be read at all (used to label rejections).
pub fn peek_tenant(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    value.get("tenant_id")?.as_str().map(str::to_owned)
}

/// Decodes and validates a wire schema v1 body.
///
/// Fails with a [`Rejection`] naming the first problem found: `invalid_encoding` (not UTF-8),
/// `invalid_json` (not JSON, not an object), `invalid_field` (a field of the wrong type,
/// unknown `op`, missing `content` or `schema`, `metadata` over
/// [`Rules::max_metadata_bytes`]),
/// `unsupported_schema`, `missing_tenant`, `unknown_tenant`, `invalid_document_id`,
/// `empty_content`, `unsupported_content_type`, `unsupported_language` or
/// `content_too_large`. Binary content (a PDF) is checked here only for its encoding and
/// size: whether it can be read is found out when it is processed (`pdf_corrupt`, …).
pub fn decode(body: &[u8], rules: &Rules) -> Result<Document, Rejection> {
    let obj = parse_object(body, rules)?;
    check_schema(&obj)?;
    let op = field_op(&obj)?;
    let tenant = field_tenant(&obj, rules)?;
    let document_id = field_document_id(&obj)?;
    let version = field_version(&obj)?;
    let metadata = field_metadata(&obj, rules)?;
    let request_id = optional_string(&obj, "request_id")?;
    let content_type =
        optional_string(&obj, "content_type")?.unwrap_or_else(|| "text/plain".to_string());
    let content = field_content(&obj, op)?;
    let content_encoding = field_content_encoding(&obj)?;
    let doc = Document {
        op,
        tenant,
        document_id,
        version,
        content_type,
        content,
        content_encoding,
        metadata,
        request_id,
    };
    if op == Op::Upsert {
        check_upsert(&doc, rules)?;
    }
    Ok(doc)
}

/// The body as a JSON object, within the size any acceptable document can have.
fn parse_object(body: &[u8], rules: &Rules) -> Result<Map<String, Value>, Rejection> {
    // A JSON-escaped body can be up to 6 bytes per content byte; refuse anything that
    // cannot possibly hold an acceptable document before parsing it.
    let body_cap = rules
        .max_document_bytes
        .saturating_add(rules.max_metadata_bytes)
        .saturating_mul(6)
        .saturating_add(64 * 1024);
    if body.len() > body_cap {
        return Err(Rejection::new(
            ErrorKind::ContentTooLarge,
            format!(
                "message body is {} bytes; content may be at most {} bytes",
                body.len(),
                rules.max_document_bytes
            ),
        ));
    }
    let text = std::str::from_utf8(body).map_err(|e| {
        Rejection::new(
            ErrorKind::InvalidEncoding,
            format!("message body is not valid UTF-8 ({e})"),
        )
    })?;
    let value: Value = serde_json::from_str(text).map_err(|e| {
        Rejection::new(
            ErrorKind::InvalidJson,
            format!("body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(obj) = value else {
        return Err(Rejection::new(
            ErrorKind::InvalidJson,
            "body must be a JSON object",
        ));
    };
    Ok(obj)
}

/// Checks field `schema` is the supported version.
fn check_schema(obj: &Map<String, Value>) -> Result<(), Rejection> {
    match obj.get("schema") {
        None => {
            return Err(Rejection::new(
                ErrorKind::InvalidField,
                "missing field `schema` (expected 1)",
            ));
        }
        Some(Value::Number(n)) if n.as_u64() == Some(SCHEMA_VERSION) => {}
        Some(Value::Number(n)) => {
            return Err(Rejection::new(
                ErrorKind::UnsupportedSchema,
                format!("schema {n} is not supported; this worker speaks schema {SCHEMA_VERSION}"),
            ));
        }
        Some(other) => return Err(wrong_type("schema", "an integer", other)),
    }
    Ok(())
}

/// Field `op` (default upsert).
fn field_op(obj: &Map<String, Value>) -> Result<Op, Rejection> {
    Ok(match obj.get("op") {
        None | Some(Value::Null) => Op::Upsert,
        Some(Value::String(s)) if s == "upsert" => Op::Upsert,
        Some(Value::String(s)) if s == "delete" => Op::Delete,
        Some(Value::String(s)) => {
            return Err(Rejection::new(
                ErrorKind::InvalidField,
                format!("field `op` is {s:?}; expected \"upsert\" or \"delete\""),
            ));
        }
        Some(other) => return Err(wrong_type("op", "a string", other)),
    })
}

/// Field `tenant_id`, which must be one of the pipeline's allowed tenants.
fn field_tenant(obj: &Map<String, Value>, rules: &Rules) -> Result<TenantId, Rejection> {
    let tenant = match obj.get("tenant_id") {
        None | Some(Value::Null) => {
            return Err(Rejection::new(
                ErrorKind::MissingTenant,
                "missing field `tenant_id`",
            ));
        }
        Some(Value::String(s)) => TenantId::new(s.clone()).map_err(|e| match e {
            TenantError::Empty => {
                Rejection::new(ErrorKind::MissingTenant, "field `tenant_id` is empty")
            }
            other => Rejection::new(
                ErrorKind::MissingTenant,
                format!("field `tenant_id`: {other}"),
            ),
        })?,
        Some(other) => return Err(wrong_type("tenant_id", "a string", other)),
    };
    if !rules.allowed_tenants.contains(&tenant) {
        return Err(Rejection::new(
            ErrorKind::UnknownTenant,
            format!("tenant {tenant:?} is not in this pipeline's tenants.allowed"),
        ));
    }
    Ok(tenant)
}

/// Field `document_id`: non-blank, at most [`MAX_DOCUMENT_ID_BYTES`].
fn field_document_id(obj: &Map<String, Value>) -> Result<String, Rejection> {
    Ok(match obj.get("document_id") {
        None | Some(Value::Null) => {
            return Err(Rejection::new(
                ErrorKind::InvalidDocumentId,
                "missing field `document_id`",
            ));
        }
        Some(Value::String(s)) if s.trim().is_empty() => {
            return Err(Rejection::new(
                ErrorKind::InvalidDocumentId,
                "field `document_id` is empty",
            ));
        }
        Some(Value::String(s)) if s.len() > MAX_DOCUMENT_ID_BYTES => {
            return Err(Rejection::new(
                ErrorKind::InvalidDocumentId,
                format!(
                    "field `document_id` is {} bytes; the limit is {MAX_DOCUMENT_ID_BYTES}",
                    s.len()
                ),
            ));
        }
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(wrong_type("document_id", "a string", other)),
    })
}

/// Field `version`: a non-negative integer up to the stores' maximum.
fn field_version(obj: &Map<String, Value>) -> Result<Option<u64>, Rejection> {
    Ok(match obj.get("version") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if n.as_u64().is_some() => match n.as_u64() {
            // The stores keep versions as signed 64-bit integers: refuse a larger one here,
            // before anything is embedded, instead of failing the write afterwards.
            Some(v) if v > crate::store::MAX_VERSION => {
                return Err(Rejection::new(
                    ErrorKind::InvalidField,
                    format!(
                        "field `version` must be at most {}, got {v}",
                        crate::store::MAX_VERSION
                    ),
                ));
            }
            v => v,
        },
        Some(other) => return Err(wrong_type("version", "a non-negative integer", other)),
    })
}

/// Field `metadata`: an object within [`Rules::max_metadata_bytes`].
fn field_metadata(
    obj: &Map<String, Value>,
    rules: &Rules,
) -> Result<Map<String, Value>, Rejection> {
    Ok(match obj.get("metadata") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => {
            let size = metadata_size(m);
            if size > rules.max_metadata_bytes {
                return Err(Rejection::new(
                    ErrorKind::InvalidField,
                    format!(
                        "field `metadata` is {size} bytes (compact JSON plus \
                         {METADATA_BYTES_PER_VALUE} per key and value); the limit is {} \
                         (limits.max_metadata_bytes): it is stored with every chunk",
                        rules.max_metadata_bytes
                    ),
                ));
            }
            m.clone()
        }
        Some(other) => return Err(wrong_type("metadata", "an object", other)),
    })
}

/// Field `content` (required for an upsert).
fn field_content(obj: &Map<String, Value>, op: Op) -> Result<String, Rejection> {
    Ok(match (op, obj.get("content")) {
        (Op::Delete, None | Some(Value::Null)) => String::new(),
        (Op::Upsert, None | Some(Value::Null)) => {
            return Err(Rejection::new(
                ErrorKind::InvalidField,
                "missing field `content`",
            ));
        }
        (_, Some(Value::String(s))) => s.clone(),
        (_, Some(other)) => return Err(wrong_type("content", "a string", other)),
    })
}

/// Optional string field `name`.
fn optional_string(obj: &Map<String, Value>, name: &str) -> Result<Option<String>, Rejection> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(wrong_type(name, "a string", other)),
    }
}

/// The checks of an upsert's content: supported content type, encoding, size, not blank.
fn check_upsert(doc: &Document, rules: &Rules) -> Result<(), Rejection> {
    let kind = doc.kind()?;
    if kind.is_binary() && doc.content_encoding == ContentEncoding::Identity {
        return Err(Rejection::new(
            ErrorKind::InvalidField,
            format!(
                "{} content is binary: send it base64-encoded with \"content_encoding\": \"base64\"",
                doc.content_type
            ),
        ));
    }
    // Identity content is checked before anything is copied; base64 after decoding (it is
    // at most 4/3 of the decoded size, and the body cap bounds it).
    let size = match doc.content_encoding {
        ContentEncoding::Identity => doc.content.len(),
        ContentEncoding::Base64 => base64_decoded_len(&doc.content),
    };
    if size > rules.max_document_bytes {
        return Err(too_large(size, rules));
    }
    let blank = if kind.is_binary() {
        doc.bytes()?.is_empty()
    } else {
        doc.text()?.trim().is_empty()
    };
    if blank {
        return Err(Rejection::new(
            ErrorKind::EmptyContent,
            "field `content` is empty",
        ));
    }
    Ok(())
}

fn too_large(size: usize, rules: &Rules) -> Rejection {
    Rejection::new(
        ErrorKind::ContentTooLarge,
        format!(
            "content is {size} bytes; limits.max_document_bytes is {}",
            rules.max_document_bytes
        ),
    )
}

/// The optional `content_encoding` field.
fn field_content_encoding(obj: &Map<String, Value>) -> Result<ContentEncoding, Rejection> {
    match optional_string(obj, "content_encoding")?.as_deref() {
        None | Some("identity") => Ok(ContentEncoding::Identity),
        Some("base64") => Ok(ContentEncoding::Base64),
        Some(other) => Err(Rejection::new(
            ErrorKind::InvalidField,
            format!("field `content_encoding` is {other:?}; expected \"base64\" or \"identity\""),
        )),
    }
}

/// Bytes `text` decodes to as base64 (whitespace ignored, padding optional); an upper bound
/// when `text` is not valid base64.
fn base64_decoded_len(text: &str) -> usize {
    let symbols = text
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b'=')
        .count();
    symbols / 4 * 3 + (symbols % 4).saturating_sub(1)
}

/// Standard base64 with optional padding, ASCII whitespace (line breaks) ignored.
fn decode_base64(text: &str) -> Result<Vec<u8>, Rejection> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: Cow<'_, str> = if text.bytes().any(|b| b.is_ascii_whitespace()) {
        Cow::Owned(text.split_ascii_whitespace().collect())
    } else {
        Cow::Borrowed(text)
    };
    LENIENT.decode(compact.as_bytes()).map_err(|e| {
        Rejection::new(
            ErrorKind::InvalidField,
            format!("field `content` is not valid base64 ({e})"),
        )
    })
}

fn wrong_type(field: &str, expected: &str, got: &Value) -> Rejection {
    let got = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    Rejection::new(
        ErrorKind::InvalidField,
        format!("field `{field}` must be {expected}, got {got}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            allowed_tenants: [TenantId::new("acme").expect("valid")].into(),
            max_document_bytes: 100,
            max_metadata_bytes: 200,
        }
    }

    #[test]
    fn metadata_size_counts_json_and_every_key_and_value() {
        let meta = |json: &str| match serde_json::from_str::<Value>(json) {
            Ok(Value::Object(m)) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(metadata_size(&Map::new()), 2);
        // {"a":"b"}: 9 bytes, one key, one value.
        assert_eq!(metadata_size(&meta(r#"{"a":"b"}"#)), 9 + 2 * 32);
        // {"a":[1,2]}: 11 bytes, the key, the array and its two items.
        assert_eq!(metadata_size(&meta(r#"{"a":[1,2]}"#)), 11 + 4 * 32);
        // {"a":{"b":1}}: 13 bytes, two keys, the object and its value.
        assert_eq!(metadata_size(&meta(r#"{"a":{"b":1}}"#)), 13 + 4 * 32);
    }

    #[test]
    fn oversize_metadata_is_an_invalid_field_naming_it() {
        let body = |meta: &str| {
            format!(
                r#"{{"schema":1,"tenant_id":"acme","document_id":"d","content":"x","metadata":{meta}}}"#
            )
        };
        // 200 bytes as counted is accepted, 201 is not.
        let fits = format!(r#"{{"t":"{}"}}"#, "x".repeat(200 - 2 * 32 - 8));
        let doc = decode(body(&fits).as_bytes(), &rules()).expect("at the limit");
        assert_eq!(metadata_size(&doc.metadata), 200);
        let over = format!(r#"{{"t":"{}"}}"#, "x".repeat(200 - 2 * 32 - 7));
        let err = decode(body(&over).as_bytes(), &rules()).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidField);
        assert!(err.reason.contains("`metadata`"), "{err}");
        assert!(err.reason.contains("limits.max_metadata_bytes"), "{err}");
        // Many tiny values are counted by what they take in memory, not by their JSON.
        let tiny = format!("{{\"t\":[{}]}}", ["0"; 8].join(","));
        let err = decode(body(&tiny).as_bytes(), &rules()).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidField, "{err}");
    }

    #[test]
    fn round_trips_through_the_wire() {
        let mut doc = Document::upsert(TenantId::new("acme").expect("valid"), "a.md", "héllo 世界");
        doc.version = Some(7);
        doc.content_type = "text/markdown".into();
        doc.metadata.insert("title".into(), Value::from("T"));
        doc.request_id = Some("r1".into());
        assert_eq!(decode(&doc.to_wire(), &rules()), Ok(doc));
        let del = Document::delete(TenantId::new("acme").expect("valid"), "a.md");
        assert_eq!(decode(&del.to_wire(), &rules()), Ok(del));
    }

    #[test]
    fn op_defaults_to_upsert_and_content_type_to_plain_text() {
        let doc = decode(
            br#"{"schema":1,"tenant_id":"acme","document_id":"d","content":"x"}"#,
            &rules(),
        )
        .expect("valid");
        assert_eq!(doc.op, Op::Upsert);
        assert_eq!(doc.content_type, "text/plain");
    }

    #[test]
    fn versions_the_store_cannot_hold_are_invalid_fields_at_decode() {
        let max = crate::store::MAX_VERSION;
        let body = |v: u64| {
            format!(
                r#"{{"schema":1,"tenant_id":"acme","document_id":"d","content":"x","version":{v}}}"#
            )
        };
        let doc = decode(body(max).as_bytes(), &rules()).expect("MAX_VERSION is valid");
        assert_eq!(doc.version, Some(max));
        for v in [max + 1, u64::MAX] {
            let err = decode(body(v).as_bytes(), &rules()).expect_err("above MAX_VERSION");
            assert_eq!(err.kind, ErrorKind::InvalidField, "{v}");
            assert!(err.reason.contains("`version`"), "{}", err.reason);
        }
    }

    #[test]
    fn wrong_types_name_the_field() {
        let err = decode(
            br#"{"schema":1,"tenant_id":"acme","document_id":"d","content":"x","version":"3"}"#,
            &rules(),
        )
        .expect_err("invalid");
        assert_eq!(err.kind, ErrorKind::InvalidField);
        assert!(err.reason.contains("`version`"), "{}", err.reason);
    }

    #[test]
    fn binary_content_travels_as_base64_and_is_checked_at_decode() {
        let tenant = TenantId::new("acme").expect("valid");
        let pdf = Document::upsert_bytes(tenant.clone(), "a.pdf", "application/pdf", b"%PDF\xff");
        let back = decode(&pdf.to_wire(), &rules()).expect("valid");
        assert_eq!(back.content_encoding, ContentEncoding::Base64);
        assert_eq!(back.bytes().expect("base64").as_ref(), b"%PDF\xff");
        // Whitespace (MIME line breaks) and missing padding are accepted.
        let wrapped = r#"{"schema":1,"tenant_id":"acme","document_id":"d","content_type":"text/plain","content_encoding":"base64","content":"aGVs\nbG8"}"#;
        let doc = decode(wrapped.as_bytes(), &rules()).expect("valid");
        assert_eq!(doc.text().expect("utf-8"), "hello");
        let body = |ct: &str, enc: &str, content: &str| {
            format!(
                r#"{{"schema":1,"tenant_id":"acme","document_id":"d","content_type":"{ct}"{enc},"content":"{content}"}}"#
            )
        };
        let b64 = r#","content_encoding":"base64""#;
        for (case, body, kind) in [
            (
                "pdf as text",
                body("application/pdf", "", "%PDF-1.7"),
                ErrorKind::InvalidField,
            ),
            (
                "not base64",
                body("application/pdf", b64, "%%%"),
                ErrorKind::InvalidField,
            ),
            (
                "bad encoding name",
                body("text/plain", r#","content_encoding":"gzip""#, "x"),
                ErrorKind::InvalidField,
            ),
            (
                "text not utf-8",
                body("text/plain", b64, "/w=="),
                ErrorKind::InvalidEncoding,
            ),
            (
                "empty pdf",
                body("application/pdf", b64, ""),
                ErrorKind::EmptyContent,
            ),
            (
                "too large",
                body("application/pdf", b64, &"A".repeat(140)),
                ErrorKind::ContentTooLarge,
            ),
            (
                "unknown language",
                body("text/x-code; language=cobol", "", "x"),
                ErrorKind::UnsupportedLanguage,
            ),
            (
                "docx",
                body("application/msword", "", "x"),
                ErrorKind::UnsupportedContentType,
            ),
        ] {
            let err = decode(body.as_bytes(), &rules()).expect_err(case);
            assert_eq!(err.kind, kind, "{case}: {err}");
        }
    }

    #[test]
    fn decoded_length_matches_the_decoder() {
        for n in 0..20usize {
            let bytes = vec![7u8; n];
            let text = base64::engine::general_purpose::STANDARD.encode(&bytes);
            assert_eq!(base64_decoded_len(&text), n, "{text}");
            assert_eq!(base64_decoded_len(text.trim_end_matches('=')), n);
        }
    }

    #[test]
    fn peek_tenant_reads_what_it_can() {
        assert_eq!(peek_tenant(br#"{"tenant_id":"x"}"#), Some("x".into()));
        assert_eq!(peek_tenant(b"\xff"), None);
    }
}
