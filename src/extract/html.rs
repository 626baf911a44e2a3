//! HTML to Markdown: the page's main content, with headings, lists, code blocks and tables
//! kept, and scripts, styles, navigation, forms and footers dropped.
//!
//! The page is parsed by html5ever (through `htmd`) the way a browser parses it, so
//! unclosed or misnested tags are repaired rather than refused. The main content is the
//! first `<main>` element (or `role="main"`), else the first `<article>`, else the `<body>`.
//! What is refused as `malformed_html` is what no page needs and what would make the
//! conversion unsafe: NUL characters, and element nesting deeper than
//! [`MAX_DEPTH`] (the converter walks the tree recursively).

use std::rc::Rc;

use htmd::element_handler::{HandlerResult, Handlers};
use htmd::{Element, HtmlToMarkdown};
use markup5ever_rcdom::{Node, NodeData};

use crate::error::{ErrorKind, Failure, Stage};

/// Deepest element nesting accepted, as counted by [`nesting_depth`]. Real pages stay far
/// below 100.
pub const MAX_DEPTH: usize = 512;

/// Stack of the thread that converts a page: the tree walk is recursive, and a page at
/// [`MAX_DEPTH`] (each counted level may hold an implied element too) needs a few
/// megabytes, more than the blocking pool's threads have.
const CONVERT_STACK_BYTES: usize = 64 * 1024 * 1024;

/// Elements dropped with everything inside them.
const SKIPPED: &[&str] = &[
    "head", "script", "style", "noscript", "template", "nav", "footer", "aside", "form", "button",
    "select", "iframe", "svg", "canvas", "object", "embed",
];

/// A page converted to Markdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HtmlPage {
    /// The main content as Markdown.
    pub markdown: String,
    /// The page's `<title>`, else its first `<h1>` (whitespace collapsed), if any.
    pub title: Option<String>,
}

/// Converts `html`'s main content to Markdown.
///
/// Fails with `malformed_html` (NUL characters, nesting deeper than `max_depth`, or the
/// converter failing) or `empty_content` (no text in the main content).
pub fn to_markdown(html: &str, max_depth: usize) -> Result<HtmlPage, Failure> {
    check(html, max_depth)?;
    let source = html.to_owned();
    let converted = std::thread::Builder::new()
        .name("html-to-markdown".into())
        .stack_size(CONVERT_STACK_BYTES)
        .spawn(move || convert(&source))
        .map_err(|e| malformed(format!("cannot start the converter: {e}")))?
        .join()
        .map_err(|_| malformed("the HTML converter failed on this page"))??;
    if converted.markdown.trim().is_empty() {
        return Err(Failure::new(
            ErrorKind::EmptyContent,
            Stage::Extract,
            "the page's main content holds no text",
        ));
    }
    Ok(converted)
}

/// The checks made before a page is parsed: no NUL characters, nesting within `max_depth`
/// ([`nesting_depth`]).
///
/// Fails with `malformed_html`.
pub fn check(html: &str, max_depth: usize) -> Result<(), Failure> {
    if html.contains('\0') {
        return Err(malformed("the page contains NUL characters"));
    }
    let depth = nesting_depth(html);
    if depth > max_depth {
        return Err(malformed(format!(
            "elements are nested {depth} deep; at most {max_depth} are accepted"
        )));
    }
    Ok(())
}

fn malformed(reason: impl Into<String>) -> Failure {
    Failure::new(ErrorKind::MalformedHtml, Stage::Extract, reason)
}

/// Parses and converts on the current thread.
fn convert(html: &str) -> Result<HtmlPage, Failure> {
    let converter = HtmlToMarkdown::builder()
        .skip_tags(SKIPPED.to_vec())
        .add_handler(vec!["pre"], fenced_pre)
        .build();
    let tree = converter
        .html_to_tree(html)
        .map_err(|e| malformed(format!("cannot parse the page: {e}")))?;
    let title = first_element(&tree, &|n| is_element(n, "title"))
        .or_else(|| first_element(&tree, &|n| is_element(n, "h1")))
        .map(|n| collapse_whitespace(&text_of(&n)))
        .filter(|t| !t.is_empty());
    let main = first_element(&tree, &|n| is_element(n, "main") || has_role_main(n))
        .or_else(|| first_element(&tree, &|n| is_element(n, "article")))
        .unwrap_or_else(|| Rc::clone(&tree));
    let markdown = converter.tree_to_markdown(&main);
    // Dropping the document empties every node under it (rcdom's iterative `Drop`), `main`
    // included: the tree lives until the Markdown is written.
    drop(tree);
    Ok(HtmlPage { markdown, title })
}

/// Every `<pre>` becomes a fenced code block of its text, whitespace kept (htmd fences only
/// `<pre><code>`; Sphinx, man pages and many generators write bare `<pre>` with highlighting
/// `<span>`s). The language of a `<code class="language-x">` inside is the fence's info.
fn fenced_pre(_: &dyn Handlers, element: Element) -> Option<HandlerResult> {
    let text = text_of(element.node);
    let text = text.trim_matches('\n');
    if text.trim().is_empty() {
        return None;
    }
    let language = first_element(element.node, &|n| is_element(n, "code"))
        .and_then(|code| match &code.data {
            NodeData::Element { attrs, .. } => attrs.borrow().iter().find_map(|a| {
                (&*a.name.local == "class")
                    .then(|| {
                        a.value
                            .split_whitespace()
                            .find_map(|c| c.strip_prefix("language-").map(str::to_owned))
                    })
                    .flatten()
            }),
            _ => None,
        })
        .unwrap_or_default();
    // A fence longer than any run of backticks in the code.
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest.max(2) + 1);
    Some(format!("\n\n{fence}{language}\n{text}\n{fence}\n\n").into())
}

/// Whether `node` is an element named `name`.
fn is_element(node: &Node, name: &str) -> bool {
    matches!(&node.data, NodeData::Element { name: n, .. } if &*n.local == name)
}

/// Whether `node` is an element with `role="main"`.
fn has_role_main(node: &Node) -> bool {
    match &node.data {
        NodeData::Element { attrs, .. } => attrs
            .borrow()
            .iter()
            .any(|a| &*a.name.local == "role" && a.value.trim().eq_ignore_ascii_case("main")),
        _ => false,
    }
}

/// The first node in document order (iteratively, depth first) for which `pick` holds.
fn first_element(root: &Rc<Node>, pick: &dyn Fn(&Node) -> bool) -> Option<Rc<Node>> {
    let mut stack = vec![Rc::clone(root)];
    while let Some(node) = stack.pop() {
        if pick(&node) {
            return Some(node);
        }
        stack.extend(node.children.borrow().iter().rev().cloned());
    }
    None
}

/// The text under `node`, concatenated (iteratively).
fn text_of(node: &Rc<Node>) -> String {
    let mut out = String::new();
    let mut stack = vec![Rc::clone(node)];
    while let Some(node) = stack.pop() {
        if let NodeData::Text { contents } = &node.data {
            out.push_str(&contents.borrow());
        }
        stack.extend(node.children.borrow().iter().rev().cloned());
    }
    out
}

fn collapse_whitespace(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Elements that never have content (`<br>`, `<img>`, …).
const VOID: &[&str] = &[
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source",
    "track", "wbr",
];

/// Elements a parser closes by itself when a sibling starts (`<p>`, `<li>`, …): not
/// counted, so a page that never closes them is not mistaken for a deep one.
const SELF_CLOSING_SIBLINGS: &[&str] = &[
    "p", "li", "dt", "dd", "tr", "td", "th", "option", "optgroup", "thead", "tbody", "tfoot", "rt",
    "rp", "colgroup", "caption",
];

/// An upper estimate of how deep `html`'s elements nest: the most start tags open at once,
/// counting neither void elements, self-closed tags (`<x/>`), nor elements that close when
/// a sibling starts; comments and the contents of `<script>`/`<style>` are skipped. Linear
/// in the input, allocation-free.
pub fn nesting_depth(html: &str) -> usize {
    let bytes = html.as_bytes();
    let (mut depth, mut deepest, mut i) = (0usize, 0usize, 0usize);
    while let Some(offset) = bytes.get(i..).and_then(|rest| memchr(b'<', rest)) {
        i += offset + 1;
        let rest = bytes.get(i..).unwrap_or_default();
        if rest.starts_with(b"!--") {
            i = find(bytes, i, b"-->").map_or(bytes.len(), |end| end + 3);
            continue;
        }
        let closing = rest.first() == Some(&b'/');
        let name_start = i + usize::from(closing);
        let name_len = bytes
            .get(name_start..)
            .unwrap_or_default()
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric() || **b == b'-' || **b == b':')
            .count();
        if name_len == 0 {
            continue;
        }
        let name = html
            .get(name_start..name_start + name_len)
            .unwrap_or_default()
            .to_ascii_lowercase();
        let tag_end = find(bytes, name_start + name_len, b">").unwrap_or(bytes.len());
        let self_closed = tag_end > 0 && bytes.get(tag_end - 1) == Some(&b'/');
        i = tag_end;
        if VOID.contains(&name.as_str()) || SELF_CLOSING_SIBLINGS.contains(&name.as_str()) {
            continue;
        }
        if closing {
            depth = depth.saturating_sub(1);
        } else if !self_closed {
            depth += 1;
            deepest = deepest.max(depth);
            if name == "script" || name == "style" {
                let close = format!("</{name}");
                i = find_ignore_case(bytes, i, close.as_bytes()).unwrap_or(bytes.len());
            }
        }
    }
    deepest
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|b| *b == needle)
}

/// The position of `needle` in `bytes` at or after `from`.
fn find(bytes: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    bytes
        .get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn find_ignore_case(bytes: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    bytes
        .get(from..)?
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
        .map(|p| p + from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_main_content_as_markdown_and_drops_the_chrome() {
        let page = to_markdown(
            r#"<!doctype html><html><head><title> Retry  guide </title>
            <style>body{color:red}</style><script>var secret = 1;</script></head>
            <body><nav><a href="/">Home</a> | <a href="/x">Sitemap</a></nav>
            <main><h1>Retries</h1><p>Use <b>backoff</b>.</p>
            <h2>Limits</h2><ul><li>one</li><li>two</li></ul>
            <pre><code class="language-rust">fn main() {}</code></pre>
            <table><tr><th>kind</th><th>retry</th></tr><tr><td>timeout</td><td>yes</td></tr></table>
            </main><footer>© Example</footer></body></html>"#,
            MAX_DEPTH,
        )
        .expect("converts");
        let md = &page.markdown;
        assert_eq!(page.title.as_deref(), Some("Retry guide"));
        assert!(md.contains("# Retries"), "{md}");
        assert!(md.contains("## Limits"), "{md}");
        assert!(md.contains("**backoff**"), "{md}");
        assert!(md.contains("one") && md.contains("two"), "{md}");
        assert!(md.contains("```") && md.contains("fn main() {}"), "{md}");
        assert!(md.contains("timeout") && md.contains('|'), "{md}");
        for dropped in ["secret", "color:red", "Sitemap", "©"] {
            assert!(!md.contains(dropped), "{dropped} kept: {md}");
        }
    }

    #[test]
    fn unclosed_tags_are_repaired_not_refused() {
        let page = to_markdown("<p>one<p>two<ul><li>a<li>b</ul><div><b>bold", MAX_DEPTH)
            .expect("a browser would show it");
        assert!(page.markdown.contains("two"), "{}", page.markdown);
    }

    #[test]
    fn deep_nesting_and_nul_characters_are_malformed() {
        let deep = format!("{}x{}", "<div>".repeat(100_000), "</div>".repeat(100_000));
        let err = to_markdown(&deep, MAX_DEPTH).expect_err("too deep");
        assert_eq!(err.kind, ErrorKind::MalformedHtml);
        let err = to_markdown("<p>a\0b</p>", MAX_DEPTH).expect_err("NUL");
        assert_eq!(err.kind, ErrorKind::MalformedHtml);
        let err = to_markdown("<script>only()</script>", MAX_DEPTH).expect_err("no text");
        assert_eq!(err.kind, ErrorKind::EmptyContent);
    }

    #[test]
    fn nesting_depth_counts_open_elements_only() {
        assert_eq!(nesting_depth("<div><div></div></div>"), 2);
        assert_eq!(nesting_depth("<p>a<p>b<p>c<br><img src=x>"), 0);
        assert_eq!(nesting_depth("<div/><div/><!-- <div><div> -->"), 0);
        assert_eq!(nesting_depth("<script>'<div><div>'</script>"), 1);
        assert_eq!(nesting_depth("a < b and <"), 0);
    }

    #[test]
    fn a_page_at_the_depth_limit_converts() {
        let depth = MAX_DEPTH;
        let page = format!(
            "{}deep text{}",
            "<div><ul><li>".repeat(depth / 2),
            "</li></ul></div>".repeat(depth / 2)
        );
        assert!(nesting_depth(&page) <= MAX_DEPTH);
        let converted = to_markdown(&page, MAX_DEPTH).expect("within the limit");
        assert!(converted.markdown.contains("deep text"));
    }
}
