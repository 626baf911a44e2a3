#!/usr/bin/env bash
# A 3-node RabbitMQ cluster on loopback, for failover tests (tests/cluster_rabbitmq.rs) and
# trying out a multi-URL broker.url: three nodes of scripts/rabbitmq-node.sh with distinct
# names and ports and one Erlang cookie, joined with `rabbitmqctl join_cluster`. The
# machine's rabbit@localhost on 5672 is not touched. Quorum queues declared once the cluster
# is up get a replica on every node (RabbitMQ's default initial group size is the cluster size).
#
#   rabbitmq-cluster.sh start DIR [PREFIX]
#       Starts PREFIX-1/2/3@localhost (PREFIX defaults to rag-cluster) with their state in DIR.
#       AMQP ports: $RABBITMQ_CLUSTER_PORTS (three, space-separated; default "5701 5702 5703"),
#       distribution ports: $RABBITMQ_CLUSTER_DIST_PORTS (default "25701 25702 25703").
#       Prints the broker.url list (RAG_INGEST_AMQP_URL=amqp://…,amqp://…,amqp://…) and writes
#       it, with the node names and ports, to DIR/cluster.env.
#   rabbitmq-cluster.sh stop DIR        stops every node
#   rabbitmq-cluster.sh kill DIR N      SIGKILLs node N (1..3): a crash
#   rabbitmq-cluster.sh ctl DIR N ARGS… rabbitmqctl against node N
#   rabbitmq-cluster.sh status DIR      cluster status as node 1 (or the first live node) sees it
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
node=$here/rabbitmq-node.sh

usage() {
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

die() {
    echo "rabbitmq-cluster: $*" >&2
    exit 1
}

load() {
    local dir=$1
    [[ -f $dir/cluster.env ]] || die "no cluster state in $dir (start it first)"
    # shellcheck disable=SC1091
    . "$dir/cluster.env"
}

start() {
    local dir=$1 prefix=${2:-rag-cluster}
    read -r -a ports <<<"${RABBITMQ_CLUSTER_PORTS:-5701 5702 5703}"
    read -r -a dist <<<"${RABBITMQ_CLUSTER_DIST_PORTS:-25701 25702 25703}"
    [[ ${#ports[@]} -eq 3 && ${#dist[@]} -eq 3 ]] || die "need three AMQP and three distribution ports"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    RABBITMQ_NODE_COOKIE=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
    export RABBITMQ_NODE_COOKIE
    local urls=() i
    {
        echo "PREFIX=$prefix"
        for i in 1 2 3; do
            echo "NAME_$i=$prefix-$i"
            echo "DIR_$i=$dir/node-$i"
            echo "PORT_$i=${ports[i - 1]}"
            urls+=("amqp://guest:guest@127.0.0.1:${ports[i - 1]}/%2f")
        done
        echo "URLS=$(IFS=,; echo "${urls[*]}")"
    } >"$dir/cluster.env"
    # Start the three nodes at once (each takes several seconds to boot).
    local pids=()
    for i in 1 2 3; do
        "$node" start "$prefix-$i" "$dir/node-$i" "${ports[i - 1]}" "${dist[i - 1]}" \
            >"$dir/start-$i.log" 2>&1 &
        pids+=($!)
    done
    local failed=0
    for i in 1 2 3; do
        if ! wait "${pids[i - 1]}"; then
            failed=1
            cat "$dir/start-$i.log" >&2
        fi
    done
    if ((failed)); then
        stop "$dir"
        die "a node did not start"
    fi
    for i in 2 3; do
        "$node" ctl "$prefix-$i" "$dir/node-$i" -q stop_app
        "$node" ctl "$prefix-$i" "$dir/node-$i" -q join_cluster "$prefix-1@localhost"
        "$node" ctl "$prefix-$i" "$dir/node-$i" -q start_app
    done
    "$node" ctl "$prefix-1" "$dir/node-1" -q await_online_nodes 3 --timeout 60 >/dev/null
    echo "rabbitmq-cluster: $prefix-1/2/3@localhost clustered on AMQP ports ${ports[*]}"
    echo "RAG_INGEST_AMQP_URL=$(IFS=,; echo "${urls[*]}")"
}

stop() {
    local dir=$1 i
    load "$dir"
    for i in 1 2 3; do
        local name_var=NAME_$i dir_var=DIR_$i
        [[ -d ${!dir_var} ]] && "$node" stop "${!name_var}" "${!dir_var}" &
    done
    wait
}

kill_one() {
    local dir=$1 i=$2
    load "$dir"
    [[ $i =~ ^[123]$ ]] || die "node number must be 1, 2 or 3"
    local name_var=NAME_$i dir_var=DIR_$i
    "$node" kill "${!name_var}" "${!dir_var}"
}

ctl() {
    local dir=$1 i=$2
    shift 2
    load "$dir"
    [[ $i =~ ^[123]$ ]] || die "node number must be 1, 2 or 3"
    local name_var=NAME_$i dir_var=DIR_$i
    "$node" ctl "${!name_var}" "${!dir_var}" "$@"
}

status() {
    local dir=$1 i
    for i in 1 2 3; do
        ctl "$dir" "$i" cluster_status 2>/dev/null && return 0
    done
    die "no node answers"
}

cmd=${1:-}
shift || true
case $cmd in
start) [[ $# -ge 1 && $# -le 2 ]] || usage; start "$@" ;;
stop) [[ $# -eq 1 ]] || usage; stop "$1" ;;
kill) [[ $# -eq 2 ]] || usage; kill_one "$@" ;;
ctl) [[ $# -ge 3 ]] || usage; ctl "$@" ;;
status) [[ $# -eq 1 ]] || usage; status "$1" ;;
*) usage ;;
esac
