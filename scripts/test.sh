#!/usr/bin/env bash
# Runs the whole test suite against the real RabbitMQ, Redis, the real all-MiniLM-L6-v2 model,
# Qdrant Edge and (where a binary is found, see scripts/ensure-qdrant.sh) a real Qdrant server:
# formatting and lint checks, one test build, then every test.
#
# The cargo target dir defaults to $HOME/.cache/rag-ingest/target so builds are reused
# across clones; set CARGO_TARGET_DIR to override.
set -euo pipefail

repo="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rag-ingest/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

scripts/ensure-rabbitmq.sh
scripts/ensure-redis.sh
scripts/fetch-model.sh
# The Qdrant server of the store tests (QDRANT_URL) where a binary is found; stopped on exit.
# Without one, ensure-qdrant prints a SKIPPED banner and the server tests print SKIPPED.
qdrant_env="$(mktemp)"
trap 'scripts/ensure-qdrant.sh stop; rm -f "$qdrant_env"' EXIT
scripts/ensure-qdrant.sh start --env-file "$qdrant_env"
set -a
# shellcheck disable=SC1090
. "$qdrant_env"
set +a

# The reduced-precision kernels need CPU features; their tests pass without running where the
# CPU lacks them. Say so up front and in the summary, so a green run on such a machine is not
# read as "bf16/int8 checked".
cpu_banner() {
    local flags missing=()
    flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
    [[ "$flags" == *" avx512_bf16 "* ]] || missing+=(" bf16 (needs avx512_bf16)")
    [[ "$flags" == *" avx512_vnni "* || ( "$flags" == *" avx2 "* && "$flags" == *" fma "* ) ]] ||
        missing+=(" int8 (needs avx512_vnni, or avx2 and fma)")
    [[ "$flags" == *" amx_tile "* ]] || missing+=(" the AMX kernels (need amx_tile)")
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "################################################################################"
        local IFS=","
        echo "# SKIPPED on this CPU:${missing[*]}."
        echo "# Their tests print SKIPPED and pass without running; f32 (the reference) is tested."
        echo "################################################################################"
    fi
}
cpu_banner

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --locked --all-targets -- -D warnings
echo "== cargo test --no-run"
cargo test --locked --no-run
# Every broker await in the tests has its own deadline; this limit is the last line of
# defence so that a hang anywhere fails the run loudly instead of using up CI's time.
limit="${RAG_INGEST_TEST_TIMEOUT:-40m}"
echo "== cargo test (limit ${limit})"
set +e
timeout --kill-after=60s "$limit" cargo test --locked --no-fail-fast 2>&1 | tee "${CARGO_TARGET_DIR}/last-test-run.log"
status=${PIPESTATUS[0]}
set -e
echo "== summary"
grep -E '^test result:|Running ' "${CARGO_TARGET_DIR}/last-test-run.log" || true
cpu_banner
if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    echo "FAILED: the tests did not finish within ${limit}; the last 'Running' line above names" \
        "the test binary that hung ('has been running for over 60 seconds' names the test)" >&2
fi
exit "$status"
