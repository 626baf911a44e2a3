//! PDF to text, page by page, with `pdf-extract` over `lopdf`.
//!
//! A PDF protected by a user password is refused (`pdf_encrypted`); one with only an owner
//! password (printing or copying restricted) opens with the empty password as in any
//! viewer. A PDF whose pages hold no text — a scan — is `pdf_no_text`: it needs OCR, which
//! this worker does not do. Anything the parser cannot read, including its own panics on
//! broken fonts or streams, is `pdf_corrupt` naming the page.

use std::panic::{AssertUnwindSafe, catch_unwind};

use lopdf::Document;

use crate::error::{ErrorKind, Failure, Stage};

fn failure(kind: ErrorKind, reason: impl Into<String>) -> Failure {
    Failure::new(kind, Stage::Extract, reason)
}

/// The text of every page of the PDF `bytes`, in page order (a page without text gives an
/// empty string).
///
/// Fails with `pdf_corrupt` (not a PDF, or a page that cannot be read), `pdf_encrypted`
/// (a user password is needed), `content_too_large` (more than `max_pages` pages) or
/// `pdf_no_text` (no page has text).
pub fn pages(bytes: &[u8], max_pages: usize) -> Result<Vec<String>, Failure> {
    let doc = open(bytes, max_pages)?;
    let numbers: Vec<u32> = doc.get_pages().into_keys().collect();
    let mut texts = Vec::with_capacity(numbers.len());
    for number in numbers {
        let mut text = String::new();
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut output = pdf_extract::PlainTextOutput::new(&mut text);
            pdf_extract::output_doc_page(&doc, &mut output, number)
        }));
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(failure(
                    ErrorKind::PdfCorrupt,
                    format!("cannot read page {number}: {e}"),
                ));
            }
            Err(_) => {
                return Err(failure(
                    ErrorKind::PdfCorrupt,
                    format!("the PDF parser failed on page {number}"),
                ));
            }
        }
        texts.push(text);
    }
    if texts.iter().all(|t| t.trim().is_empty()) {
        return Err(failure(
            ErrorKind::PdfNoText,
            format!(
                "none of the PDF's {} page(s) holds text (a scanned document needs OCR first)",
                texts.len()
            ),
        ));
    }
    Ok(texts)
}

/// The PDF `bytes`, parsed (and decrypted with the empty password where that opens it),
/// with at most `max_pages` pages.
///
/// Fails with `pdf_corrupt`, `pdf_encrypted` or `content_too_large`.
pub fn open(bytes: &[u8], max_pages: usize) -> Result<Document, Failure> {
    if !bytes.starts_with(b"%PDF-") && !bytes.windows(5).take(1024).any(|w| w == b"%PDF-") {
        return Err(failure(
            ErrorKind::PdfCorrupt,
            "the content is not a PDF (no %PDF- header)",
        ));
    }
    let loaded = catch_unwind(|| Document::load_mem(bytes));
    let doc = match loaded {
        Ok(Ok(doc)) => doc,
        Ok(Err(
            e @ (lopdf::Error::InvalidPassword
            | lopdf::Error::Decryption(_)
            | lopdf::Error::AlreadyEncrypted),
        )) => {
            return Err(failure(
                ErrorKind::PdfEncrypted,
                format!("the PDF is encrypted and cannot be opened without its password ({e})"),
            ));
        }
        Ok(Err(e)) => {
            return Err(failure(
                ErrorKind::PdfCorrupt,
                format!("cannot parse the PDF: {e}"),
            ));
        }
        Err(_) => {
            return Err(failure(
                ErrorKind::PdfCorrupt,
                "the PDF parser failed on this file",
            ));
        }
    };
    if doc.is_encrypted() {
        return Err(failure(
            ErrorKind::PdfEncrypted,
            "the PDF is encrypted with a user password; send it decrypted",
        ));
    }
    let count = doc.get_pages().len();
    if count > max_pages {
        return Err(failure(
            ErrorKind::ContentTooLarge,
            format!("the PDF has {count} pages; limits.max_pdf_pages is {max_pages}"),
        ));
    }
    if count == 0 {
        return Err(failure(ErrorKind::PdfCorrupt, "the PDF has no pages"));
    }
    Ok(doc)
}
