//! Reading a `rag-ingest worker` process's log, shared by the tests and the benches.

/// `name=<n>` from the worker's final `worker stopped: …` line; panics (with the log) if the
/// line or the count is missing.
pub fn final_count(log: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("worker stopped:"))
        .unwrap_or_else(|| panic!("no `worker stopped` line in the worker log:\n{log}"));
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {name}= in {line:?}"))
}
