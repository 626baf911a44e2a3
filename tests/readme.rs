//! The README documents every error kind and every config field that exist in the code.

use std::path::Path;

use rag_ingest::error::ErrorKind;

fn read(rel: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).expect(rel)
}

#[test]
fn every_error_kind_is_in_the_readme() {
    let readme = read("README.md");
    let missing: Vec<&str> = ErrorKind::ALL
        .iter()
        .map(|k| k.as_str())
        .filter(|k| !readme.contains(&format!("| `{k}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "error kinds missing from the README's table: {missing:?}"
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
fn every_config_field_is_in_the_readme_and_commented_in_docs_toml() {
    let readme = read("README.md");
    let text = read("pipelines/docs.toml");
    let value: toml::Value = toml::from_str(&text).expect("docs.toml parses");
    let mut fields = Vec::new();
    keys("", &value, &mut fields);
    assert!(fields.len() > 15, "{fields:?}");
    let missing: Vec<&String> = fields
        .iter()
        .filter(|f| !readme.contains(&format!("| `{f}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "config fields missing from the README's reference: {missing:?}"
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
