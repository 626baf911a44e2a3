#!/usr/bin/env bash
# Makes sure Redis answers on 127.0.0.1:6379 (the shared state of tenant budgets and the
# shared provider rate limit, tests/fairness.rs): installs Debian's redis-server if it is
# missing, starts it if it is stopped (in memory only: no snapshot, no append-only file),
# and waits until it answers PING.
set -euo pipefail

port_open() { (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; }

if port_open; then
    echo "ensure-redis: Redis is up on 127.0.0.1:6379"
    exit 0
fi

sudo_cmd=()
[[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)

if ! command -v redis-server >/dev/null 2>&1; then
    echo "ensure-redis: installing redis-server"
    "${sudo_cmd[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y redis-server
fi

if ! port_open; then
    echo "ensure-redis: starting Redis"
    redis-server --bind 127.0.0.1 --port 6379 --daemonize yes --save "" --appendonly no \
        --logfile "${TMPDIR:-/tmp}/rag-ingest-redis.log"
fi

deadline=$((SECONDS + 60))
until port_open; do
    if ((SECONDS > deadline)); then
        echo "ensure-redis: Redis did not start listening on 127.0.0.1:6379 within 60 s" >&2
        exit 1
    fi
    sleep 1
done
echo "ensure-redis: Redis is up on 127.0.0.1:6379"
