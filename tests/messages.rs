//! Every fixture under fixtures/messages/bad is rejected with the kind its name announces;
//! every fixture under fixtures/messages/good decodes. Nothing panics.

use std::path::Path;

use rag_ingest::error::ErrorKind;
use rag_ingest::message::{Rules, decode};
use rag_ingest::tenant::TenantId;

fn rules() -> Rules {
    Rules {
        allowed_tenants: ["acme", "globex"]
            .into_iter()
            .map(|t| TenantId::new(t).expect("valid"))
            .collect(),
        max_document_bytes: 4096,
        max_metadata_bytes: 16 * 1024,
    }
}

fn fixtures(sub: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/messages")
        .join(sub);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .expect("fixture dir")
        .map(|e| {
            let path = e.expect("entry").path();
            let name = path
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(&path).expect("readable"))
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_bad_fixture_is_rejected_with_its_own_kind() {
    let bad = fixtures("bad");
    assert!(
        bad.len() >= 10,
        "expected at least 10 bad fixtures, found {}",
        bad.len()
    );
    let mut kinds = std::collections::BTreeSet::new();
    for (name, body) in bad {
        let expected = name.split("--").next().expect("kind prefix");
        let expected = ErrorKind::parse(expected)
            .unwrap_or_else(|| panic!("{name}: {expected:?} is not an error kind"));
        let rejection = decode(&body, &rules()).expect_err(&name);
        assert_eq!(rejection.kind, expected, "{name}: {}", rejection.reason);
        assert!(!rejection.reason.is_empty(), "{name}: empty reason");
        assert!(
            !expected.is_transient(),
            "{name}: validation errors are permanent"
        );
        kinds.insert(expected);
    }
    assert!(
        kinds.len() >= 10,
        "only {} distinct kinds covered: {kinds:?}",
        kinds.len()
    );
}

#[test]
fn every_good_fixture_decodes() {
    let good = fixtures("good");
    assert!(!good.is_empty());
    for (name, body) in good {
        let doc = decode(&body, &rules()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!doc.document_id.is_empty(), "{name}");
    }
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap deterministic fuzz: every prefix and many byte mutations of each fixture.
    for (_, body) in fixtures("good").into_iter().chain(fixtures("bad")) {
        for end in 0..body.len() {
            let _ = decode(&body[..end], &rules());
        }
        let mut mutated = body.clone();
        for i in 0..mutated.len() {
            let original = mutated[i];
            for b in [0u8, b'"', b'{', b'}', b'\\', 0xff, 0xc3] {
                mutated[i] = b;
                let _ = decode(&mutated, &rules());
            }
            mutated[i] = original;
        }
    }
}
