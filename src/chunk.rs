//! Chunking: splitting a document into pieces that each fit the embedding model.
//!
//! [`Chunker`] sizes chunks in the embedding model's own tokens with `text-splitter`
//! (semantic boundaries: headings, paragraphs, sentences, words, graphemes), then checks every
//! chunk against the limit and hard-splits the rare chunk that is still too long.
//!
//! text-splitter measures many candidate chunks per chunk it emits. Tokenising each
//! candidate was most of the chunking time, so the document is tokenised once
//! ([`DocumentTokens`]) and a candidate's size is the number of the document's tokens it
//! overlaps. A token cut by a candidate's edge counts whole, so that size can only
//! over-estimate; the chunk finally emitted needs its exact count, which is what is checked
//! and reported. For a word-local tokenizer (BERT's normaliser, pre-tokenizer and WordPiece:
//! every token belongs to one word, and words are tokenised independently) a chunk whose
//! edges fall between words of the document tokenises on its own into exactly the document's
//! tokens inside it, so that count is taken from the document's tokenisation
//! ([`DocumentTokens::exact`]); any other chunk, or any other tokenizer, is tokenised on its
//! own. The check also catches what text-splitter itself does not
//! measure (sections of at most `max_tokens` bytes, assuming a token spans at least one byte,
//! which a tokenizer whose normaliser expands text — NFKC `ﷺ`, a `Replace` rule — can break;
//! BERT WordPiece never does).

use std::fmt;
use std::ops::Range;

use text_splitter::{ChunkConfig, ChunkSizer, CodeSplitter, MarkdownSplitter, TextSplitter};
use tokenizers::{PostProcessor, Tokenizer};

use crate::language::Language;

/// Bytes of a document tokenised at once by [`DocumentTokens`]: bounds the tokenizer's
/// transient memory (an `Encoding` holds ~90 bytes per token) for megabyte documents.
const TOKENIZE_SEGMENT_BYTES: usize = 16 * 1024;

/// How a document's text is structured, which decides where chunk boundaries go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChunkFormat {
    /// Plain text: split at blank lines, line breaks, sentences, words.
    Text,
    /// CommonMark/GFM: split at headings, blocks (paragraphs, code fences, lists), then as text.
    Markdown,
    /// Source code: split along the language's syntax tree (items, functions, blocks,
    /// statements), then as text.
    Code(Language),
}

impl ChunkFormat {
    /// The format for a MIME content type: `text/plain` is [`ChunkFormat::Text`],
    /// `text/markdown` and `text/x-markdown` are [`ChunkFormat::Markdown`]. Case-insensitive;
    /// parameters such as `; charset=utf-8` are ignored. `None` for anything else.
    pub fn from_content_type(ct: &str) -> Option<Self> {
        let essence = ct.split(';').next().unwrap_or_default().trim();
        if essence.eq_ignore_ascii_case("text/plain") {
            Some(Self::Text)
        } else if essence.eq_ignore_ascii_case("text/markdown")
            || essence.eq_ignore_ascii_case("text/x-markdown")
        {
            Some(Self::Markdown)
        } else {
            None
        }
    }
}

/// One piece of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Position in the document, counting from 0 without gaps.
    pub index: usize,
    /// The chunk's text, a slice of the document (leading and trailing whitespace trimmed).
    pub text: String,
    /// Where the text is in the document, in bytes: `&content[byte_range] == text`.
    pub byte_range: Range<usize>,
    /// Number of tokens of `text`, not counting the special tokens the model adds
    /// (`[CLS]`/`[SEP]` for BERT).
    pub tokens: usize,
}

/// Invalid chunk sizes given to [`Chunker::new`].
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// `max_tokens` is 0.
    #[error("chunk size must be at least 1 token")]
    ZeroMaxTokens,
    /// The overlap is not smaller than the chunk size.
    #[error("chunk overlap ({overlap} tokens) must be smaller than the chunk size ({max_tokens})")]
    OverlapTooLarge {
        /// Requested overlap.
        overlap: usize,
        /// Requested chunk size.
        max_tokens: usize,
    },
    /// A chunk plus the model's special tokens would not fit the model's input.
    #[error(
        "chunk size {max_tokens} + {special_tokens} special tokens exceeds the model's limit of {model_max_tokens} tokens"
    )]
    ExceedsModelLimit {
        /// Requested chunk size.
        max_tokens: usize,
        /// Special tokens the tokenizer adds to every input.
        special_tokens: usize,
        /// Most tokens the model reads, special tokens included.
        model_max_tokens: usize,
    },
    /// The tokenizer's truncation could not be turned off.
    #[error("cannot configure the tokenizer: {0}")]
    Tokenizer(String),
}

/// Splits documents into chunks of at most a fixed number of model tokens.
///
/// Built once per pipeline (the tokenizer is configured once); `Send + Sync`, so share it
/// with an [`Arc`](std::sync::Arc) across tasks.
pub struct Chunker {
    tokenizer: Tokenizer,
    max_tokens: usize,
    overlap: usize,
    model_max_tokens: usize,
}

impl Chunker {
    /// A chunker producing chunks of at most `max_tokens` tokens (counted with `tokenizer`,
    /// WITHOUT special tokens), consecutive chunks sharing up to `overlap` tokens.
    /// `model_max_tokens` is the embedder's maximum input including special tokens
    /// (`[CLS]`/`[SEP]`, 2 for BERT, as the tokenizer's post-processor reports).
    ///
    /// Truncation and padding configured in `tokenizer` are turned off, so sizes count every
    /// token.
    ///
    /// # Errors
    ///
    /// [`ChunkError`] if `max_tokens` is 0, `overlap >= max_tokens`, or `max_tokens` plus the
    /// special tokens exceeds `model_max_tokens`.
    pub fn new(
        mut tokenizer: Tokenizer,
        max_tokens: usize,
        overlap: usize,
        model_max_tokens: usize,
    ) -> Result<Self, ChunkError> {
        if max_tokens == 0 {
            return Err(ChunkError::ZeroMaxTokens);
        }
        if overlap >= max_tokens {
            return Err(ChunkError::OverlapTooLarge {
                overlap,
                max_tokens,
            });
        }
        let special_tokens = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if max_tokens.saturating_add(special_tokens) > model_max_tokens {
            return Err(ChunkError::ExceedsModelLimit {
                max_tokens,
                special_tokens,
                model_max_tokens,
            });
        }
        tokenizer
            .with_truncation(None)
            .map_err(|e| ChunkError::Tokenizer(e.to_string()))?;
        tokenizer.with_padding(None);
        Ok(Self {
            tokenizer,
            max_tokens,
            overlap,
            model_max_tokens,
        })
    }

    /// Splits `content` into chunks numbered from 0 in document order. Empty or
    /// whitespace-only content gives no chunks. Every chunk's `byte_range` slices `content`
    /// back to its `text`, and no chunk has more than `max_tokens` tokens (so, with the
    /// special tokens, it fits the model) — unless a single character alone tokenises into
    /// more, which no BERT WordPiece tokenizer does.
    pub fn split(&self, content: &str, format: ChunkFormat) -> Vec<Chunk> {
        if content.trim().is_empty() {
            return Vec::new();
        }
        let sizer = DocumentTokens::new(&self.tokenizer, content);
        let config = ChunkConfig::new(self.max_tokens)
            .with_sizer(&sizer)
            .with_overlap(self.overlap);
        let pieces: Vec<(usize, &str)> = match (config, format) {
            (Ok(config), ChunkFormat::Text) => {
                TextSplitter::new(config).chunk_indices(content).collect()
            }
            (Ok(config), ChunkFormat::Markdown) => MarkdownSplitter::new(config)
                .chunk_indices(content)
                .collect(),
            (Ok(config), ChunkFormat::Code(language)) => {
                match CodeSplitter::new(language.grammar(), config) {
                    Ok(splitter) => splitter.chunk_indices(content).collect(),
                    // Only a grammar built for another tree-sitter ABI is refused (a unit
                    // test loads every grammar); the code is then split as plain text.
                    Err(_) => match ChunkConfig::new(self.max_tokens)
                        .with_sizer(&sizer)
                        .with_overlap(self.overlap)
                    {
                        Ok(config) => TextSplitter::new(config).chunk_indices(content).collect(),
                        Err(_) => vec![(0, content)],
                    },
                }
            }
            // `new` checked `overlap < max_tokens`, all text-splitter asks; were it to refuse
            // anyway, the whole document is cut by the token limit alone.
            (Err(_), _) => vec![(0, content)],
        };
        let mut chunks = Vec::with_capacity(pieces.len());
        for (offset, text) in pieces {
            let tokens = sizer
                .exact(offset..offset + text.len())
                .unwrap_or_else(|| self.count(text));
            if tokens <= self.max_tokens {
                self.push(&mut chunks, content, offset..offset + text.len(), tokens);
            } else {
                self.hard_split(&mut chunks, content, offset..offset + text.len());
            }
        }
        chunks
    }

    /// Number of tokens of `text` without special tokens.
    fn count(&self, text: &str) -> usize {
        count_tokens(&self.tokenizer, text)
    }

    /// Appends `content[range]` trimmed, unless it is only whitespace.
    fn push(&self, chunks: &mut Vec<Chunk>, content: &str, range: Range<usize>, tokens: usize) {
        let Some(range) = trimmed(content, range) else {
            return;
        };
        chunks.push(Chunk {
            index: chunks.len(),
            text: content[range.clone()].to_owned(),
            byte_range: range,
            tokens,
        });
    }

    /// Cuts an over-long piece into consecutive pieces of at most `max_tokens` tokens,
    /// ignoring semantic boundaries (last resort).
    fn hard_split(&self, chunks: &mut Vec<Chunk>, content: &str, range: Range<usize>) {
        let mut start = range.start;
        while let Some(rest) = trimmed(content, start..range.end) {
            let text = &content[rest.clone()];
            let tokens = self.count(text);
            if tokens <= self.max_tokens {
                self.push(chunks, content, rest, tokens);
                return;
            }
            let cut = self.cut_point(text);
            let piece = rest.start..rest.start + cut;
            let piece_tokens = self.count(&content[piece.clone()]);
            self.push(chunks, content, piece, piece_tokens);
            start = rest.start + cut;
        }
    }

    /// A byte index `0 < cut <= text.len()` on a char boundary such that `text[..cut]` has at
    /// most `max_tokens` tokens (or is a single character). `text` has more than
    /// `max_tokens` tokens.
    ///
    /// Bisects over char boundaries, keeping `text[..lo]` fitting and `text[..hi]` not. The
    /// pieces text-splitter over-fills are short (it only skips measuring sections of at most
    /// `max_tokens` bytes), so this takes a handful of tokenizer calls.
    fn cut_point(&self, text: &str) -> usize {
        let mut lo = text.chars().next().map_or(text.len(), char::len_utf8);
        let mut hi = text.len();
        if self.count(&text[..lo]) > self.max_tokens {
            return lo;
        }
        loop {
            let mut mid = text.floor_char_boundary(lo + (hi - lo) / 2);
            if mid <= lo {
                mid = text.ceil_char_boundary(lo + 1);
            }
            if mid >= hi {
                return lo;
            }
            if self.count(&text[..mid]) <= self.max_tokens {
                lo = mid;
            } else {
                hi = mid;
            }
        }
    }
}

impl fmt::Debug for Chunker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunker")
            .field("max_tokens", &self.max_tokens)
            .field("overlap", &self.overlap)
            .field("model_max_tokens", &self.model_max_tokens)
            .finish_non_exhaustive()
    }
}

/// Sizes slices of one document from a single tokenisation of it: a slice's size is the
/// number of the document's tokens whose byte span overlaps the slice, so a token cut by the
/// slice's edge counts whole. Anything that is not a slice of the document (or a document
/// the tokenizer refused) is tokenised on its own with [`count_tokens`].
///
/// The document is tokenised in segments of about [`TOKENIZE_SEGMENT_BYTES`] cut after a
/// line break or other whitespace, where a BERT pre-tokenizer splits anyway.
struct DocumentTokens<'a> {
    tokenizer: &'a Tokenizer,
    document: &'a str,
    /// Byte offset in `document` where each token starts, ascending; `None` if the
    /// tokenizer failed on some segment.
    starts: Option<Vec<usize>>,
    /// Byte offset in `document` where each token ends, ascending.
    ends: Vec<usize>,
    /// For [`exact`](Self::exact): whether each token begins another word than the token
    /// before it (both words known; the first token: `true`). `None` unless the tokenizer is
    /// word-local ([`word_local`]) and the tokens follow each other without overlapping (so
    /// that `starts[i]` and `ends[i]` are the same token's). One byte per token.
    new_word: Option<Vec<bool>>,
    /// Where one segment ends and the next begins, inside the document, ascending.
    cuts: Vec<usize>,
}

impl<'a> DocumentTokens<'a> {
    fn new(tokenizer: &'a Tokenizer, document: &'a str) -> Self {
        let mut starts = Vec::new();
        let mut ends = Vec::new();
        let mut new_word = word_local(tokenizer).then(Vec::new);
        let mut cuts = Vec::new();
        // Word numbers continue from one segment to the next.
        let (mut first_word, mut last_word): (u64, Option<u64>) = (0, None);
        let mut ok = true;
        let mut at = 0;
        while ok && at < document.len() {
            if at > 0 {
                cuts.push(at);
            }
            let end = segment_end(document, at);
            match tokenizer.encode(&document[at..end], false) {
                Ok(encoding) => {
                    let mut next_first = first_word;
                    for (&(start, stop), &word) in
                        encoding.get_offsets().iter().zip(encoding.get_word_ids())
                    {
                        let (start, stop) = (at + start, at + stop);
                        let word = word.map(|w| first_word.saturating_add(u64::from(w)));
                        if let Some(w) = word {
                            next_first = next_first.max(w.saturating_add(1));
                        }
                        if let Some(flags) = &mut new_word {
                            // Exact counts need the tokens in order, none overlapping the
                            // next (WordPiece's are); else they are not given.
                            if start > stop || ends.last().is_some_and(|&e| e > start) {
                                new_word = None;
                            } else {
                                flags.push(match (last_word, word) {
                                    _ if flags.is_empty() => true,
                                    (Some(a), Some(b)) => a != b,
                                    _ => false,
                                });
                            }
                        }
                        last_word = word;
                        starts.push(start);
                        ends.push(stop);
                    }
                    first_word = next_first;
                }
                Err(_) => ok = false,
            }
            at = end;
        }
        // Counting by binary search needs each list sorted; for WordPiece they already are
        // (and where `new_word` is kept, sorting them moves nothing).
        starts.sort_unstable();
        ends.sort_unstable();
        Self {
            tokenizer,
            document,
            starts: ok.then_some(starts),
            ends,
            new_word: new_word.filter(|_| ok),
            cuts,
        }
    }

    /// The exact token count of `document[range]` tokenised on its own, when the document's
    /// tokenisation gives it: the tokenizer is word-local, `range` lies within one segment,
    /// and neither edge cuts a token or separates two tokens of one word. Then the slice
    /// holds whole words only, and it tokenises into exactly the document's tokens inside
    /// it. `None` otherwise (tokenise the slice instead).
    fn exact(&self, range: Range<usize>) -> Option<usize> {
        let (Some(starts), Some(new_word)) = (&self.starts, &self.new_word) else {
            return None;
        };
        let next_cut = self.cuts.partition_point(|&c| c <= range.start);
        if range.start > range.end
            || range.end > self.document.len()
            || self.cuts.get(next_cut).is_some_and(|&c| c < range.end)
        {
            return None;
        }
        let between_words = |i: usize, at: usize| {
            // The token before `at` ends by it, and the one from it on starts another word.
            i.checked_sub(1)
                .is_none_or(|before| self.ends.get(before).is_some_and(|&e| e <= at))
                && new_word.get(i).is_none_or(|&new| new)
        };
        let first = starts.partition_point(|&s| s < range.start);
        let past = starts.partition_point(|&s| s < range.end);
        (between_words(first, range.start) && between_words(past, range.end)).then(|| past - first)
    }

    /// Where `chunk` is in the document, if it is a slice of it.
    fn range_of(&self, chunk: &str) -> Option<Range<usize>> {
        let start = chunk
            .as_ptr()
            .addr()
            .checked_sub(self.document.as_ptr().addr())?;
        let end = start.checked_add(chunk.len())?;
        (end <= self.document.len()).then_some(start..end)
    }
}

impl ChunkSizer for DocumentTokens<'_> {
    fn size(&self, chunk: &str) -> usize {
        match (&self.starts, self.range_of(chunk)) {
            (Some(starts), Some(range)) => {
                // Tokens starting before the slice ends, minus those ending before it starts
                // (a subset of the former, as every token starts no later than it ends).
                let begun = starts.partition_point(|&s| s < range.end);
                let over = self.ends.partition_point(|&e| e <= range.start);
                begun.saturating_sub(over)
            }
            _ => count_tokens(self.tokenizer, chunk),
        }
    }
}

/// Whether `tokenizer` is word-local: its normaliser works character by character (BERT's,
/// or none), its pre-tokenizer splits words at whitespace and punctuation (BERT's), and its
/// model tokenises each word on its own (WordPiece). A slice of a text that starts and ends
/// between words then tokenises into exactly the text's tokens inside it. Other tokenizers
/// (byte-level BPE, whose tokens carry the space before a word; Metaspace; sequences of
/// rules) are not assumed to be.
fn word_local(tokenizer: &Tokenizer) -> bool {
    use tokenizers::{ModelWrapper, NormalizerWrapper, PreTokenizerWrapper};
    matches!(tokenizer.get_model(), ModelWrapper::WordPiece(_))
        && matches!(
            tokenizer.get_pre_tokenizer(),
            Some(PreTokenizerWrapper::BertPreTokenizer(_))
        )
        && matches!(
            tokenizer.get_normalizer(),
            None | Some(NormalizerWrapper::BertNormalizer(_))
        )
}

/// The end of the segment of `document` starting at `at`: the whole rest if it is short,
/// else just after the last line break (or, failing that, whitespace) in the next
/// [`TOKENIZE_SEGMENT_BYTES`], else at the last char boundary there (never empty: a char
/// is at most 4 bytes).
fn segment_end(document: &str, at: usize) -> usize {
    let limit = at + TOKENIZE_SEGMENT_BYTES;
    if limit >= document.len() {
        return document.len();
    }
    let window = &document[at..document.floor_char_boundary(limit)];
    let cut = window
        .rfind('\n')
        .or_else(|| window.rfind(char::is_whitespace))
        .map_or(window.len(), |i| {
            i + window[i..].chars().next().map_or(1, char::len_utf8)
        });
    at + cut
}

/// Number of tokens of `text` without special tokens. Never fails: if the tokenizer does,
/// the byte length stands in (an over-estimate for WordPiece, so chunks only get smaller).
fn count_tokens(tokenizer: &Tokenizer, text: &str) -> usize {
    tokenizer
        .encode_fast(text, false)
        .map_or(text.len(), |encoding| encoding.len())
}

/// `range` without leading and trailing whitespace; `None` if nothing is left.
fn trimmed(content: &str, range: Range<usize>) -> Option<Range<usize>> {
    let text = &content[range.clone()];
    let start = range.start + (text.len() - text.trim_start().len());
    let end = range.end - (text.len() - text.trim_end().len());
    (start < end).then_some(start..end)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The model's tokenizer, every token counted (no padding, no truncation); for this
    /// crate's unit tests.
    pub(crate) fn tokenizer() -> Tokenizer {
        let mut tokenizer = Tokenizer::from_file(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/all-MiniLM-L6-v2/tokenizer.json"
        ))
        .expect("the model's tokenizer (scripts/fetch-model.sh installs it)");
        // As `Chunker::new` configures it: every token counts.
        tokenizer.with_padding(None);
        tokenizer.with_truncation(None).expect("no truncation");
        tokenizer
    }

    /// Text where words meet in every way BERT's tokenizer treats specially: punctuation,
    /// removed control and zero-width characters gluing words, accents (precomposed and
    /// combining), CJK, an added token written out, words longer than WordPiece's 100
    /// characters, and runs of whitespace.
    fn tricky(len: usize, seed: u64) -> String {
        const PIECES: &[&str] = &[
            "retry",
            "unbelievable",
            "Qdrant",
            " ",
            "  ",
            "\n",
            "\n\n",
            "\t",
            ".",
            ",",
            "-",
            "(",
            ")",
            "x\u{1}y",
            "ab\u{200b}cd",
            "zw\u{200d}j",
            "café",
            "cafe\u{301}",
            "\u{301}",
            "東京都",
            "[MASK]",
            "[SEP]x",
            "naïve",
            "1,234.5",
            "https://example.com/a_b",
            "ﬁ",
            "Ⅻ",
            "🙂",
        ];
        let mut state = seed;
        let mut text = String::new();
        while text.len() < len {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let pick = (state >> 33) as usize;
            if pick.is_multiple_of(97) {
                text.push_str(&"w".repeat(120));
            } else {
                text.push_str(PIECES[pick % PIECES.len()]);
            }
        }
        text
    }

    #[test]
    fn exact_counts_equal_tokenising_the_slice_on_its_own() {
        let tokenizer = tokenizer();
        assert!(word_local(&tokenizer), "BERT's tokenizer is word-local");
        let mut checked = 0;
        for seed in 0..6 {
            let text = tricky(600, seed);
            let doc = DocumentTokens::new(&tokenizer, &text);
            let bounds: Vec<usize> = (0..=text.len())
                .filter(|&i| text.is_char_boundary(i))
                .collect();
            for (a, &start) in bounds.iter().enumerate() {
                for &end in bounds[a..].iter().step_by(7) {
                    if let Some(count) = doc.exact(start..end) {
                        assert_eq!(
                            count,
                            count_tokens(&tokenizer, &text[start..end]),
                            "{:?}",
                            &text[start..end]
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(checked > 1_000, "only {checked} slices had an exact count");
    }

    #[test]
    fn slices_cutting_a_word_or_a_segment_are_not_given_an_exact_count() {
        let tokenizer = tokenizer();
        let text = "unbelievable retries, again.";
        let doc = DocumentTokens::new(&tokenizer, text);
        assert_eq!(
            doc.exact(0..text.len()),
            Some(count_tokens(&tokenizer, text))
        );
        assert_eq!(
            doc.exact(0..12),
            Some(count_tokens(&tokenizer, "unbelievable"))
        );
        // Inside a word, at a boundary between two of its tokens, and inside a token.
        assert_eq!(doc.exact(2..12), None);
        assert_eq!(doc.exact(0..5), None);
        // Words glued by a removed control character are one word.
        let glued = "ab\u{1}cd ef";
        let doc = DocumentTokens::new(&tokenizer, glued);
        assert_eq!(doc.exact(3..glued.len()), None);
        assert_eq!(
            doc.exact(5..glued.len()),
            Some(count_tokens(&tokenizer, " ef"))
        );
        // A slice across a segment cut is tokenised on its own.
        let long = "word ".repeat(TOKENIZE_SEGMENT_BYTES / 5 + 100);
        let doc = DocumentTokens::new(&tokenizer, &long);
        let cut = doc.cuts[0];
        assert_eq!(doc.exact(cut - 10..cut + 10), None);
        assert_eq!(doc.exact(cut..cut + 10), Some(2));
    }
}
