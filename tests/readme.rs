//! The README and `docs/` match the code: the README starts with the two commands CI and a
//! newcomer run, every error kind is documented in `docs/errors.md`, every config field in
//! `docs/configuration.md` (and commented in `pipelines/docs.toml`), every doc is linked from
//! the README, and every relative link (file and `#anchor`) resolves.

use std::path::{Path, PathBuf};

use rag_ingest::error::ErrorKind;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).expect(rel)
}

#[test]
fn the_readme_starts_with_the_demo_and_test_commands() {
    let readme = read("README.md");
    let block = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a ```sh block");
    let commands: Vec<&str> = block
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .collect();
    assert_eq!(commands, ["scripts/demo.sh", "scripts/test.sh"], "{block}");
    // No other code block comes before it.
    let first_fence = readme.find("```").expect("a code block");
    assert_eq!(first_fence, readme.find("```sh\n").expect("the sh block"));
    // CI runs exactly the README's test command.
    let ci = read(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == "exec scripts/test.sh"),
        "{ci}"
    );
}

#[test]
fn every_error_kind_is_in_docs_errors() {
    let errors = read("docs/errors.md");
    let missing: Vec<&str> = ErrorKind::ALL
        .iter()
        .map(|k| k.as_str())
        .filter(|k| !errors.contains(&format!("| `{k}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "error kinds missing from the table in docs/errors.md: {missing:?}"
    );
}

fn keys(prefix: &str, value: &toml::Value, out: &mut Vec<String>) {
    if let toml::Value::Table(table) = value {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            if v.is_table() {
                keys(&key, v, out);
            } else {
                out.push(key);
            }
        }
    }
}

#[test]
fn every_config_field_is_in_docs_configuration_and_commented_in_docs_toml() {
    let reference = read("docs/configuration.md");
    let text = read("pipelines/docs.toml");
    let value: toml::Value = toml::from_str(&text).expect("docs.toml parses");
    let mut fields = Vec::new();
    keys("", &value, &mut fields);
    assert!(fields.len() > 15, "{fields:?}");
    let missing: Vec<&String> = fields
        .iter()
        .filter(|f| !reference.contains(&format!("| `{f}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "config fields missing from docs/configuration.md: {missing:?}"
    );

    // Every field line in docs.toml is preceded by a comment line.
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with('[') {
            continue;
        }
        let commented = lines[..i]
            .iter()
            .rev()
            .take_while(|l| !l.trim().is_empty() && !l.trim().starts_with('['))
            .any(|l| l.trim().starts_with('#'));
        assert!(commented, "docs.toml line {} has no comment: {t}", i + 1);
    }
}

/// The Markdown files checked for links: the README and everything under `docs/`.
fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The lines of `text` outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut in_fence = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_fence = !in_fence;
        } else if !in_fence {
            out.push(line);
        }
    }
    out
}

/// GitHub's anchors for the headings of `text`: lower case, punctuation dropped, spaces as
/// hyphens, `-1`, `-2`… appended to repeated ones.
fn anchors(text: &str) -> Vec<String> {
    let mut seen: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for line in prose(text) {
        let Some(heading) = line.strip_prefix('#') else {
            continue;
        };
        let heading = heading.trim_start_matches('#').trim();
        let slug: String = heading
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let repeats = seen.iter().filter(|s| **s == slug).count();
        out.push(if repeats == 0 {
            slug.clone()
        } else {
            format!("{slug}-{repeats}")
        });
        seen.push(slug);
    }
    out
}

/// The targets of the inline links `[text](target)` of `text`, outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in prose(text) {
        let mut rest = line;
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

#[test]
fn every_relative_link_resolves_and_every_doc_is_linked_from_the_readme() {
    let mut broken = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).expect("markdown file");
        let dir = file.parent().expect("a directory");
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match link.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            let Ok(target_text) = std::fs::read_to_string(&target) else {
                broken.push(format!("{}: {link} (no such file)", file.display()));
                continue;
            };
            if let Some(anchor) = anchor
                && !anchors(&target_text).iter().any(|a| a == anchor)
            {
                broken.push(format!("{}: {link} (no such heading)", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {broken:#?}");

    let readme_links = links(&read("README.md"));
    let unlinked: Vec<String> = markdown_files()
        .iter()
        .skip(1)
        .filter_map(|p| p.file_name()?.to_str().map(|n| format!("docs/{n}")))
        .filter(|doc| {
            !readme_links
                .iter()
                .any(|l| l.split('#').next() == Some(doc.as_str()))
        })
        .collect();
    assert!(
        unlinked.is_empty(),
        "docs not linked from the README: {unlinked:?}"
    );
}

/// The metric families and log events documented in `docs/operations.md` are exactly those
/// the code emits: every name in `telemetry::names::ALL` and every `event = "…"` of
/// `src/telemetry/events.rs` has a row, and every documented `rag_ingest_*` family exists.
#[test]
fn every_metric_and_log_event_is_in_docs_operations_and_nothing_else() {
    let ops = read("docs/operations.md");
    let rows: Vec<&str> = ops.lines().filter(|l| l.starts_with("| `")).collect();
    let row_names: Vec<&str> = rows
        .iter()
        .filter_map(|r| r.strip_prefix("| `")?.split(['`', '{']).next())
        .collect();
    let families = rag_ingest::telemetry::names::ALL;
    let missing: Vec<&str> = families
        .iter()
        .copied()
        .filter(|name| !row_names.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics missing from docs/operations.md: {missing:?}"
    );
    let unknown: Vec<&str> = row_names
        .iter()
        .copied()
        .filter(|n| n.starts_with("rag_ingest_") && !families.contains(n))
        .collect();
    assert!(
        unknown.is_empty(),
        "documented metrics the code lacks: {unknown:?}"
    );

    let source = read("src/telemetry/events.rs");
    let events: Vec<&str> = source
        .split("event = \"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .collect();
    assert!(events.len() > 20, "{events:?}");
    let undocumented: Vec<&str> = events
        .iter()
        .copied()
        .filter(|e| !row_names.contains(e))
        .collect();
    assert!(
        undocumented.is_empty(),
        "log events missing from docs/operations.md: {undocumented:?}"
    );
}
