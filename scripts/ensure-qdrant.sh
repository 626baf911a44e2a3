#!/usr/bin/env bash
# Makes sure a Qdrant server answers on loopback for the test run, or says loudly that none can.
#
#   scripts/ensure-qdrant.sh start [--env-file FILE]   start (or reuse) the test server
#   scripts/ensure-qdrant.sh stop                      stop it and remove its storage
#   scripts/ensure-qdrant.sh find                      print the binary that would be used
#
# The binary is the first of: $QDRANT_BIN, `qdrant` on PATH, ../shared/bin/qdrant (next to this
# repository). No package registry ships the Qdrant server, so a machine may have none: then
# `start` prints a SKIPPED banner and exits 0, and the server tests print SKIPPED too.
#
# The server listens on 127.0.0.1 only, on ports RAG_INGEST_QDRANT_HTTP_PORT (default 16333)
# and RAG_INGEST_QDRANT_GRPC_PORT (default 16334): not Qdrant's usual 6333/6334, so a test run
# never writes into a developer's own server. Its storage is a fresh temporary directory; its
# state (pid, storage, log) lives in $RAG_INGEST_QDRANT_STATE (default
# ${CARGO_TARGET_DIR:-$HOME/.cache/rag-ingest/target}/qdrant-test). With --env-file, `start`
# writes `QDRANT_URL=…` and `QDRANT_BIN=…` lines there for the caller to source.
set -euo pipefail

repo="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
http_port="${RAG_INGEST_QDRANT_HTTP_PORT:-16333}"
grpc_port="${RAG_INGEST_QDRANT_GRPC_PORT:-16334}"
state="${RAG_INGEST_QDRANT_STATE:-${CARGO_TARGET_DIR:-$HOME/.cache/rag-ingest/target}/qdrant-test}"
ready_url="http://127.0.0.1:${http_port}/readyz"
grpc_url="http://127.0.0.1:${grpc_port}"

say() { echo "ensure-qdrant: $*"; }

# The server binary, or nothing.
find_bin() {
    if [[ -n "${QDRANT_BIN:-}" ]]; then
        if [[ -x "$QDRANT_BIN" ]]; then
            echo "$QDRANT_BIN"
            return
        fi
        say "QDRANT_BIN=$QDRANT_BIN is not an executable file; looking elsewhere" >&2
    fi
    if command -v qdrant >/dev/null 2>&1; then
        command -v qdrant
        return
    fi
    local shared="$repo/../shared/bin/qdrant"
    if [[ -x "$shared" ]]; then
        (cd "$(dirname "$shared")" && echo "$(pwd)/qdrant")
    fi
}

ready() { curl -sf --max-time 2 "$ready_url" >/dev/null 2>&1; }

running_pid() {
    local pid
    pid="$(cat "$state/pid" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        echo "$pid"
    fi
}

write_env() {
    local file="$1" bin="$2"
    [[ -n "$file" ]] || return 0
    {
        echo "QDRANT_URL=$grpc_url"
        echo "QDRANT_HTTP_URL=http://127.0.0.1:${http_port}"
        echo "QDRANT_BIN=$bin"
    } >"$file"
}

start() {
    local env_file=""
    while (($#)); do
        case "$1" in
        --env-file)
            env_file="${2:?--env-file needs a file}"
            shift 2
            ;;
        *)
            say "unknown argument $1" >&2
            exit 2
            ;;
        esac
    done
    [[ -z "$env_file" ]] || : >"$env_file"

    local bin
    bin="$(find_bin)"
    if [[ -z "$bin" ]]; then
        echo "################################################################################"
        echo "# SKIPPED: no Qdrant server binary (looked at \$QDRANT_BIN, qdrant on PATH and"
        echo "# ../shared/bin/qdrant). The Qdrant-server tests will print SKIPPED and pass;"
        echo "# only the embedded Qdrant Edge store is tested in this run."
        echo "################################################################################"
        return 0
    fi

    local pid
    pid="$(running_pid)"
    if [[ -n "$pid" ]] && ready; then
        say "reusing the test server (pid $pid) at $grpc_url"
        write_env "$env_file" "$bin"
        return 0
    fi
    if ready; then
        say "something else already answers on $ready_url; set RAG_INGEST_QDRANT_HTTP_PORT and" \
            "RAG_INGEST_QDRANT_GRPC_PORT to free ports" >&2
        exit 1
    fi

    mkdir -p "$state"
    rm -rf "$state/storage" "$state/snapshots"
    say "starting $bin ($("$bin" --version 2>/dev/null || echo 'version unknown'))"
    QDRANT__SERVICE__HOST=127.0.0.1 \
        QDRANT__SERVICE__HTTP_PORT="$http_port" \
        QDRANT__SERVICE__GRPC_PORT="$grpc_port" \
        QDRANT__STORAGE__STORAGE_PATH="$state/storage" \
        QDRANT__STORAGE__SNAPSHOTS_PATH="$state/snapshots" \
        QDRANT__TELEMETRY_DISABLED=true \
        QDRANT__LOG_LEVEL=WARN \
        setsid "$bin" >"$state/qdrant.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$state/pid"

    local deadline=$((SECONDS + 60))
    until ready; do
        if ! kill -0 "$pid" 2>/dev/null; then
            say "the server exited during start-up; its log ($state/qdrant.log) ends:" >&2
            tail -n 20 "$state/qdrant.log" >&2 || true
            exit 1
        fi
        if ((SECONDS > deadline)); then
            say "the server did not answer $ready_url within 60 s; log: $state/qdrant.log" >&2
            kill "$pid" 2>/dev/null || true
            exit 1
        fi
        sleep 0.2
    done
    say "Qdrant is ready at $grpc_url (gRPC; HTTP on port $http_port), pid $pid, storage $state/storage"
    write_env "$env_file" "$bin"
}

stop() {
    local pid
    pid="$(running_pid)"
    if [[ -z "$pid" ]]; then
        say "no test server running"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS > deadline)); then
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -rf "$state/storage" "$state/snapshots" "$state/pid"
    say "stopped the test server (pid $pid)"
}

case "${1:-start}" in
start)
    shift || true
    start "$@"
    ;;
stop) stop ;;
find)
    bin="$(find_bin)"
    [[ -n "$bin" ]] || exit 1
    echo "$bin"
    ;;
*)
    echo "usage: scripts/ensure-qdrant.sh start [--env-file FILE] | stop | find" >&2
    exit 2
    ;;
esac
