//! Contextual chunk text (`chunking.context`): what is embedded for a chunk may carry the
//! document's title and the chunk's Markdown heading path, e.g.
//! `Handbook › Retries › Backoff`, so that a chunk that says "double it after each failure"
//! is found by a query about retry backoff. The stored `text` stays the chunk's own bytes;
//! the context is stored beside it ([`ChunkPayload::context`](crate::store::ChunkPayload)).
//!
//! The context is counted within the model's token limit: with
//! [`ContextMode::Headings`] the chunker cuts chunks [`Contextualizer::budget`] tokens
//! smaller than `chunking.max_tokens`, and a context longer than the budget keeps its last
//! headings (the most specific), then is cut at the budget.

use std::ops::Range;

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};
use serde::Deserialize;
use tokenizers::Tokenizer;

use crate::chunk::Chunk;

/// Separates the parts of a heading path.
pub const PATH_SEPARATOR: &str = " › ";
/// Separates the context from the chunk text in what is embedded.
pub const CONTEXT_SEPARATOR: &str = "\n\n";
/// The metadata field holding a document's title.
pub const TITLE_FIELD: &str = "title";

/// What is embedded with each chunk's text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ContextMode {
    /// The chunk's text alone.
    #[default]
    None,
    /// The document's `title` metadata and, for Markdown (and what is converted to it), the
    /// headings the chunk sits under, before the chunk's text.
    Headings,
}

impl ContextMode {
    /// The mode's name in the configuration: `none` or `headings`.
    pub fn as_str(self) -> &'static str {
        match self {
            ContextMode::None => "none",
            ContextMode::Headings => "headings",
        }
    }
}

/// Builds each chunk's context under one [`ContextMode`], within a token budget.
pub struct Contextualizer {
    mode: ContextMode,
    tokenizer: Option<Tokenizer>,
    budget: usize,
}

impl std::fmt::Debug for Contextualizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Contextualizer")
            .field("mode", &self.mode)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

impl Default for Contextualizer {
    /// No context ([`ContextMode::None`]).
    fn default() -> Self {
        Contextualizer {
            mode: ContextMode::None,
            tokenizer: None,
            budget: 0,
        }
    }
}

/// One chunk's context: the text and how many tokens it adds to what is embedded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkContext {
    /// The context, e.g. `Handbook › Retries`.
    pub text: String,
    /// Tokens of the context and its separator.
    pub tokens: usize,
}

impl Contextualizer {
    /// Tokens reserved for the context of a chunk of up to `max_tokens` tokens: an eighth of
    /// it, between 8 and 48 (32 for 256-token chunks).
    pub fn budget_for(mode: ContextMode, max_tokens: usize) -> usize {
        match mode {
            ContextMode::None => 0,
            ContextMode::Headings => (max_tokens / 8).clamp(8, 48),
        }
    }

    /// A contextualizer for `mode` whose contexts take at most
    /// [`budget_for`](Contextualizer::budget_for)`(mode, max_tokens)` tokens of `tokenizer`.
    pub fn new(mode: ContextMode, tokenizer: &Tokenizer, max_tokens: usize) -> Self {
        let mut tokenizer = tokenizer.clone();
        // Count every token; a failure to turn truncation off only makes counts smaller.
        let _ = tokenizer.with_truncation(None);
        tokenizer.with_padding(None);
        Contextualizer {
            mode,
            tokenizer: Some(tokenizer),
            budget: Self::budget_for(mode, max_tokens),
        }
    }

    /// The mode.
    pub fn mode(&self) -> ContextMode {
        self.mode
    }

    /// Tokens reserved for a chunk's context (0 without context).
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// The context of each of `chunks` (cut from `content`; `markdown` says whether headings
    /// are Markdown) for a document titled `title`: `None` for a chunk without one (no
    /// title, no heading above it, or [`ContextMode::None`]).
    pub fn contexts(
        &self,
        content: &str,
        markdown: bool,
        title: Option<&str>,
        chunks: &[Chunk],
    ) -> Vec<Option<ChunkContext>> {
        let Some(tokenizer) = self.tokenizer.as_ref().filter(|_| self.budget > 0) else {
            return vec![None; chunks.len()];
        };
        let title = title.map(str::trim).filter(|t| !t.is_empty());
        let headings = if markdown {
            headings(content)
        } else {
            Vec::new()
        };
        let mut cache: Option<(Vec<String>, Option<ChunkContext>)> = None;
        chunks
            .iter()
            .map(|chunk| {
                let mut path: Vec<String> = Vec::new();
                if let Some(title) = title {
                    path.push(title.to_owned());
                }
                for heading in path_at(&headings, chunk.byte_range.start) {
                    if path
                        .last()
                        .is_none_or(|last| !last.eq_ignore_ascii_case(heading))
                    {
                        path.push(heading.to_owned());
                    }
                }
                if let Some((cached_path, context)) = &cache
                    && *cached_path == path
                {
                    return context.clone();
                }
                let context = fit(tokenizer, &path, self.budget);
                cache = Some((path, context.clone()));
                context
            })
            .collect()
    }
}

/// What is embedded for a chunk: its context, a blank line, its text; the text alone without
/// a context.
pub fn embed_text(context: Option<&str>, text: &str) -> String {
    match context {
        Some(context) if !context.is_empty() => format!("{context}{CONTEXT_SEPARATOR}{text}"),
        _ => text.to_owned(),
    }
}

/// The document's title: its `title` metadata when that is a string.
pub fn title(metadata: &serde_json::Map<String, serde_json::Value>) -> Option<&str> {
    metadata
        .get(TITLE_FIELD)
        .and_then(serde_json::Value::as_str)
}

/// A heading: its level (1–6), its text, and where it starts in the document.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Heading {
    level: usize,
    text: String,
    start: usize,
}

/// The Markdown headings of `content` (ATX and setext, not those in code blocks), in order.
fn headings(content: &str) -> Vec<Heading> {
    let mut found = Vec::new();
    let mut current: Option<(usize, Range<usize>, String)> = None;
    for (event, range) in Parser::new_ext(content, Options::empty()).into_offset_iter() {
        match event {
            Event::Start(Tag::Heading { level, .. }) => {
                current = Some((level as usize, range, String::new()));
            }
            Event::Text(text) | Event::Code(text) => {
                if let Some((_, _, heading)) = current.as_mut() {
                    heading.push_str(&text);
                }
            }
            Event::SoftBreak | Event::HardBreak => {
                if let Some((_, _, heading)) = current.as_mut() {
                    heading.push(' ');
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                if let Some((level, range, text)) = current.take() {
                    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
                    if !text.is_empty() {
                        found.push(Heading {
                            level,
                            text,
                            start: range.start,
                        });
                    }
                }
            }
            _ => {}
        }
    }
    found
}

/// The heading path in force at byte `at`: of the headings starting before `at`, the last of
/// each level, dropping deeper ones when a shallower heading follows them. A heading that
/// starts exactly at `at` is the chunk's own first line and is left out.
fn path_at(headings: &[Heading], at: usize) -> Vec<&str> {
    let mut stack: Vec<&Heading> = Vec::new();
    for heading in headings.iter().take_while(|h| h.start < at) {
        while stack.last().is_some_and(|top| top.level >= heading.level) {
            stack.pop();
        }
        stack.push(heading);
    }
    stack.into_iter().map(|h| h.text.as_str()).collect()
}

/// `path` joined, within `budget` tokens (separator included): the title and the deepest
/// headings are kept, middle headings dropped first (replaced by `…`), and a context still
/// too long is cut at the budget. `None` for an empty path.
fn fit(tokenizer: &Tokenizer, path: &[String], budget: usize) -> Option<ChunkContext> {
    if path.is_empty() {
        return None;
    }
    let count = |text: &str| {
        tokenizer
            .encode(format!("{text}{CONTEXT_SEPARATOR}"), false)
            .map(|e| e.get_ids().len())
            .unwrap_or(usize::MAX)
    };
    let mut parts: Vec<&str> = path.iter().map(String::as_str).collect();
    let mut dropped = false;
    let mut text;
    loop {
        let mut shown = parts.clone();
        if dropped {
            shown.insert(1, "…");
        }
        text = shown.join(PATH_SEPARATOR);
        let tokens = count(&text);
        if tokens <= budget {
            return Some(ChunkContext { text, tokens });
        }
        if parts.len() <= 2 {
            break;
        }
        parts.remove(1);
        dropped = true;
    }
    // Still too long: cut the joined text at the last token that fits.
    let encoding = tokenizer.encode(text.as_str(), false).ok()?;
    let separator = count("").min(budget);
    let keep = budget.saturating_sub(separator);
    let end = encoding
        .get_offsets()
        .get(..keep)?
        .last()
        .map(|&(_, end)| end)?;
    let text = text.get(..end)?.trim_end().to_owned();
    if text.is_empty() {
        return None;
    }
    let tokens = count(&text);
    (tokens <= budget).then_some(ChunkContext { text, tokens })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heading_texts(content: &str, at: usize) -> Vec<String> {
        path_at(&headings(content), at)
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn the_path_follows_heading_levels() {
        let doc = "# Handbook\n\nIntro.\n\n## Retries\n\n### Backoff\n\nDouble it.\n\n## Limits\n\nTen.\n";
        let at = |needle: &str| doc.find(needle).map_or(0, |i| i);
        assert_eq!(heading_texts(doc, at("Intro")), ["Handbook"]);
        assert_eq!(
            heading_texts(doc, at("Double")),
            ["Handbook", "Retries", "Backoff"]
        );
        assert_eq!(heading_texts(doc, at("Ten")), ["Handbook", "Limits"]);
        // A chunk starting with a heading does not repeat it in its context.
        assert_eq!(heading_texts(doc, at("## Retries")), ["Handbook"]);
    }

    #[test]
    fn headings_in_code_blocks_and_setext_headings() {
        let doc = "Guide\n=====\n\n```\n# not a heading\n```\n\nSetup\n-----\n\nBody text.\n";
        let at = doc.find("Body").map_or(0, |i| i);
        assert_eq!(heading_texts(doc, at), ["Guide", "Setup"]);
    }

    #[test]
    fn embed_text_puts_the_context_first() {
        assert_eq!(embed_text(Some("A › B"), "text"), "A › B\n\ntext");
        assert_eq!(embed_text(None, "text"), "text");
        assert_eq!(embed_text(Some(""), "text"), "text");
    }

    #[test]
    fn long_paths_keep_the_title_and_the_deepest_headings_within_the_budget() {
        // As `Contextualizer::new` configures it: every token counts.
        let tokenizer = crate::chunk::tests::tokenizer();
        let path: Vec<String> = ["Operations handbook"]
            .into_iter()
            .map(str::to_owned)
            .chain((1..=12).map(|i| format!("Section number {i} about retries")))
            .collect();
        let context = fit(&tokenizer, &path, 24).expect("a context");
        assert!(context.tokens <= 24, "{context:?}");
        assert!(
            context.text.starts_with("Operations handbook › …"),
            "{context:?}"
        );
        assert!(
            context.text.ends_with("Section number 12 about retries"),
            "{context:?}"
        );
        // A single part longer than the budget is cut at it.
        let long = vec!["word ".repeat(100)];
        let cut = fit(&tokenizer, &long, 16).expect("a context");
        assert!(cut.tokens <= 16 && !cut.text.is_empty(), "{cut:?}");
    }

    #[test]
    fn budgets_scale_with_the_chunk_size() {
        assert_eq!(Contextualizer::budget_for(ContextMode::None, 256), 0);
        assert_eq!(Contextualizer::budget_for(ContextMode::Headings, 256), 32);
        assert_eq!(Contextualizer::budget_for(ContextMode::Headings, 16), 8);
        assert_eq!(Contextualizer::budget_for(ContextMode::Headings, 4096), 48);
    }
}
