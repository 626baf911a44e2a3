//! Programming languages whose source code is chunked along its syntax tree.
//!
//! A [`Language`] is named by a content type (`text/x-rust`, `text/x-python`,
//! `text/javascript`, `text/x-typescript`, `text/x-go`, or `text/x-code; language=<name>`),
//! by a file extension in `rag-ingest submit`, and brings the tree-sitter grammar that
//! text-splitter's `CodeSplitter` cuts the code with (functions, classes and blocks stay
//! whole where they fit a chunk).

use std::fmt;

/// A programming language with a built-in tree-sitter grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Language {
    /// Rust (`.rs`).
    Rust,
    /// Python (`.py`).
    Python,
    /// JavaScript, JSX included (`.js`, `.mjs`, `.cjs`, `.jsx`).
    JavaScript,
    /// TypeScript (`.ts`, `.mts`, `.cts`; declaration files too).
    TypeScript,
    /// Go (`.go`).
    Go,
}

impl Language {
    /// Every supported language.
    pub const ALL: [Language; 5] = [
        Language::Rust,
        Language::Python,
        Language::JavaScript,
        Language::TypeScript,
        Language::Go,
    ];

    /// The language's name, as `text/x-code; language=<name>` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Language::Rust => "rust",
            Language::Python => "python",
            Language::JavaScript => "javascript",
            Language::TypeScript => "typescript",
            Language::Go => "go",
        }
    }

    /// The language named `name` (case-insensitive; `rs`, `py`, `js`, `ts` and `golang` are
    /// accepted too), or `None`.
    pub fn from_name(name: &str) -> Option<Self> {
        let name = name.trim().to_ascii_lowercase();
        Language::ALL
            .into_iter()
            .find(|l| l.name() == name)
            .or(match name.as_str() {
                "rs" => Some(Language::Rust),
                "py" => Some(Language::Python),
                "js" | "jsx" => Some(Language::JavaScript),
                "ts" => Some(Language::TypeScript),
                "golang" => Some(Language::Go),
                _ => None,
            })
    }

    /// The content type `rag-ingest submit` gives files of this language.
    pub fn content_type(self) -> &'static str {
        match self {
            Language::Rust => "text/x-rust",
            Language::Python => "text/x-python",
            Language::JavaScript => "text/javascript",
            Language::TypeScript => "text/x-typescript",
            Language::Go => "text/x-go",
        }
    }

    /// The language of a MIME type essence (no parameters, any case): `text/x-rust`,
    /// `text/rust`; `text/x-python`, `application/x-python`, `text/x-script.python`;
    /// `text/javascript`, `application/javascript`, `text/x-javascript`; `text/x-typescript`,
    /// `application/typescript`, `text/typescript`; `text/x-go`, `text/x-golang`.
    pub fn from_mime(essence: &str) -> Option<Self> {
        let essence = essence.trim().to_ascii_lowercase();
        match essence.as_str() {
            "text/x-rust" | "text/rust" => Some(Language::Rust),
            "text/x-python" | "application/x-python" | "text/x-script.python" => {
                Some(Language::Python)
            }
            "text/javascript"
            | "application/javascript"
            | "text/x-javascript"
            | "application/x-javascript" => Some(Language::JavaScript),
            "text/x-typescript"
            | "application/typescript"
            | "text/typescript"
            | "application/x-typescript" => Some(Language::TypeScript),
            "text/x-go" | "text/x-golang" => Some(Language::Go),
            _ => None,
        }
    }

    /// The language of a file extension (without the dot, any case), or `None`.
    pub fn from_extension(ext: &str) -> Option<Self> {
        match ext.to_ascii_lowercase().as_str() {
            "rs" => Some(Language::Rust),
            "py" | "pyi" => Some(Language::Python),
            "js" | "mjs" | "cjs" | "jsx" => Some(Language::JavaScript),
            "ts" | "mts" | "cts" => Some(Language::TypeScript),
            "go" => Some(Language::Go),
            _ => None,
        }
    }

    /// The tree-sitter grammar the code is parsed with.
    pub fn grammar(self) -> tree_sitter::Language {
        match self {
            Language::Rust => tree_sitter_rust::LANGUAGE.into(),
            Language::Python => tree_sitter_python::LANGUAGE.into(),
            Language::JavaScript => tree_sitter_javascript::LANGUAGE.into(),
            Language::TypeScript => tree_sitter_typescript::LANGUAGE_TYPESCRIPT.into(),
            Language::Go => tree_sitter_go::LANGUAGE.into(),
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_content_types_and_extensions_round_trip() {
        for language in Language::ALL {
            assert_eq!(Language::from_name(language.name()), Some(language));
            assert_eq!(Language::from_mime(language.content_type()), Some(language));
        }
        assert_eq!(Language::from_name("Golang"), Some(Language::Go));
        assert_eq!(Language::from_name("cobol"), None);
        assert_eq!(Language::from_extension("PY"), Some(Language::Python));
        assert_eq!(Language::from_extension("tsx"), None);
        assert_eq!(Language::from_mime("text/plain"), None);
    }

    #[test]
    fn every_grammar_loads_into_a_parser() {
        for language in Language::ALL {
            let mut parser = tree_sitter::Parser::new();
            assert!(
                parser.set_language(&language.grammar()).is_ok(),
                "{language}: grammar incompatible with tree-sitter"
            );
        }
    }
}
