#!/usr/bin/env bash
# Runs the whole test suite against the real RabbitMQ, the real all-MiniLM-L6-v2 model and
# Qdrant Edge: formatting and lint checks, one test build, then every test.
#
# The cargo target dir defaults to $HOME/.cache/rag-ingest/target so builds are reused
# across clones; set CARGO_TARGET_DIR to override.
set -euo pipefail

repo="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rag-ingest/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

scripts/ensure-rabbitmq.sh
scripts/fetch-model.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test --no-run"
cargo test --locked --no-run
echo "== cargo test"
set +e
cargo test --locked 2>&1 | tee "${CARGO_TARGET_DIR}/last-test-run.log"
status=${PIPESTATUS[0]}
set -e
echo "== summary"
grep -E '^test result:|Running ' "${CARGO_TARGET_DIR}/last-test-run.log" || true
exit "$status"
