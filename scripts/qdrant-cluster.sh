#!/usr/bin/env bash
# A 3-peer Qdrant cluster on loopback, for trying replication and peer failures on one machine.
#
#   scripts/qdrant-cluster.sh start    start the three peers (or reuse a running cluster)
#   scripts/qdrant-cluster.sh status   show each peer and the cluster's view of its peers
#   scripts/qdrant-cluster.sh stop     stop the peers and remove their storage
#
# The binary is the first of: $QDRANT_BIN, `qdrant` on PATH, ../shared/bin/qdrant (next to this
# repository); without one, `start` prints a SKIPPED banner and exits 0.
#
# Peer i (0, 1, 2) listens on 127.0.0.1 only: REST on BASE+3i, gRPC on BASE+3i+1 and the
# peer-to-peer (Raft and shard transfer) port on BASE+3i+2, BASE being
# RAG_INGEST_QDRANT_CLUSTER_BASE_PORT (default 17330, so 17330-17338). Peer 0 starts the
# cluster (`--uri http://127.0.0.1:<its p2p port>`); peers 1 and 2 join it (`--bootstrap` peer 0's
# p2p URL, `--uri` their own). Each has its own storage under $RAG_INGEST_QDRANT_CLUSTER_STATE
# (default ${CARGO_TARGET_DIR:-$HOME/.cache/rag-ingest/target}/qdrant-cluster/peer<i>), with its
# pid and log next to it.
#
# Point a pipeline at any peer's gRPC port (store.qdrant.url) and create the collection with a
# replication factor, e.g. in [store.qdrant]: replication_factor = 3, write_consistency_factor = 2.
# Kill a peer to see the others carry on: kill -KILL "$(cat "$state/peer1/pid")".
set -euo pipefail

repo="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
base="${RAG_INGEST_QDRANT_CLUSTER_BASE_PORT:-17330}"
state="${RAG_INGEST_QDRANT_CLUSTER_STATE:-${CARGO_TARGET_DIR:-$HOME/.cache/rag-ingest/target}/qdrant-cluster}"
peers=3

say() { echo "qdrant-cluster: $*"; }

http_port() { echo $((base + 3 * $1)); }
grpc_port() { echo $((base + 3 * $1 + 1)); }
p2p_port() { echo $((base + 3 * $1 + 2)); }

# The server binary, or nothing (same lookup as scripts/ensure-qdrant.sh).
find_bin() {
    if [[ -n "${QDRANT_BIN:-}" && -x "${QDRANT_BIN}" ]]; then
        echo "$QDRANT_BIN"
        return
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

ready() { curl -sf --max-time 2 "http://127.0.0.1:$(http_port "$1")/readyz" >/dev/null 2>&1; }

running_pid() {
    local pid
    pid="$(cat "$state/peer$1/pid" 2>/dev/null || true)"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        echo "$pid"
    fi
}

# Peers the cluster (as peer $1 sees it) knows.
known_peers() {
    curl -sf --max-time 2 "http://127.0.0.1:$(http_port "$1")/cluster" 2>/dev/null |
        python3 -c 'import json,sys; print(len(json.load(sys.stdin)["result"]["peers"]))' 2>/dev/null ||
        echo 0
}

start_peer() {
    local i="$1" bin="$2" dir="$state/peer$1"
    local args=(--uri "http://127.0.0.1:$(p2p_port "$i")")
    if ((i > 0)); then
        args+=(--bootstrap "http://127.0.0.1:$(p2p_port 0)")
    fi
    mkdir -p "$dir"
    QDRANT__SERVICE__HOST=127.0.0.1 \
        QDRANT__SERVICE__HTTP_PORT="$(http_port "$i")" \
        QDRANT__SERVICE__GRPC_PORT="$(grpc_port "$i")" \
        QDRANT__CLUSTER__ENABLED=true \
        QDRANT__CLUSTER__P2P__PORT="$(p2p_port "$i")" \
        QDRANT__STORAGE__STORAGE_PATH="$dir/storage" \
        QDRANT__STORAGE__SNAPSHOTS_PATH="$dir/snapshots" \
        QDRANT__TELEMETRY_DISABLED=true \
        QDRANT__LOG_LEVEL=WARN \
        setsid "$bin" "${args[@]}" >>"$dir/qdrant.log" 2>&1 </dev/null &
    echo $! >"$dir/pid"
}

wait_for() {
    local what="$1" deadline=$((SECONDS + 60))
    shift
    until "$@"; do
        if ((SECONDS > deadline)); then
            say "$what did not happen within 60 s; logs under $state/peer*/qdrant.log" >&2
            exit 1
        fi
        sleep 0.2
    done
}

all_joined() { [[ "$(known_peers 0)" == "$peers" ]]; }

start() {
    local bin
    bin="$(find_bin)"
    if [[ -z "$bin" ]]; then
        echo "################################################################################"
        echo "# SKIPPED: no Qdrant server binary (looked at \$QDRANT_BIN, qdrant on PATH and"
        echo "# ../shared/bin/qdrant); no cluster started."
        echo "################################################################################"
        return 0
    fi
    local i
    for ((i = 0; i < peers; i++)); do
        if [[ -z "$(running_pid "$i")" ]] && ready "$i"; then
            say "something else answers on port $(http_port "$i"); set" \
                "RAG_INGEST_QDRANT_CLUSTER_BASE_PORT to a free range" >&2
            exit 1
        fi
    done
    say "starting $peers peers of $bin ($("$bin" --version 2>/dev/null || echo 'version unknown'))"
    for ((i = 0; i < peers; i++)); do
        if [[ -n "$(running_pid "$i")" ]]; then
            say "peer $i already running (pid $(running_pid "$i"))"
        else
            if [[ -z "$(running_pid 0)" || "$i" == 0 ]]; then
                rm -rf "$state/peer$i/storage" "$state/peer$i/snapshots"
            fi
            start_peer "$i" "$bin"
        fi
        # The first peer must be up before the others bootstrap from it.
        wait_for "peer $i ready" ready "$i"
    done
    wait_for "all $peers peers in the cluster" all_joined
    for ((i = 0; i < peers; i++)); do
        say "peer $i: gRPC http://127.0.0.1:$(grpc_port "$i"), REST http://127.0.0.1:$(http_port "$i"), p2p $(p2p_port "$i"), pid $(running_pid "$i")"
    done
    say "ready: $peers peers"
}

status() {
    local i
    for ((i = 0; i < peers; i++)); do
        local pid
        pid="$(running_pid "$i")"
        if [[ -n "$pid" ]]; then
            say "peer $i: pid $pid, $(ready "$i" && echo ready || echo 'not ready'), sees $(known_peers "$i") peers"
        else
            say "peer $i: not running"
        fi
    done
}

stop() {
    local i pid
    for ((i = 0; i < peers; i++)); do
        pid="$(running_pid "$i")"
        if [[ -n "$pid" ]]; then
            kill -TERM "$pid" 2>/dev/null || true
        fi
    done
    for ((i = 0; i < peers; i++)); do
        pid="$(cat "$state/peer$i/pid" 2>/dev/null || true)"
        local deadline=$((SECONDS + 30))
        while [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS > deadline)); then
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.2
        done
        rm -rf "$state/peer$i/storage" "$state/peer$i/snapshots" "$state/peer$i/pid"
    done
    say "stopped"
}

case "${1:-}" in
start) start ;;
stop) stop ;;
status) status ;;
*)
    echo "usage: scripts/qdrant-cluster.sh start | status | stop" >&2
    exit 2
    ;;
esac
