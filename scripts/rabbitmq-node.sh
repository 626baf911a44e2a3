#!/usr/bin/env bash
# Runs an extra RabbitMQ node of its own on loopback, next to (and never touching) the
# machine's rabbit@localhost on 5672: its own node name, AMQP and distribution ports, data,
# logs, config and Erlang cookie, all under one directory. Used by tests/broker_tls.rs (a
# TLS listener with a self-signed certificate) and scripts/rabbitmq-cluster.sh (three nodes).
#
#   rabbitmq-node.sh certs DIR
#       Writes a self-signed CA (ca.pem, ca.key) and a server certificate signed by it
#       (server.pem, server.key; SAN 127.0.0.1 and localhost) into DIR, with the openssl CLI.
#   rabbitmq-node.sh start NAME DIR AMQP_PORT DIST_PORT [TLS_PORT CERT_DIR]
#       Starts node NAME@localhost with its state in DIR, AMQP on 127.0.0.1:AMQP_PORT, Erlang
#       distribution on 127.0.0.1:DIST_PORT and, with TLS_PORT, an amqps listener on
#       127.0.0.1:TLS_PORT using CERT_DIR's ca.pem/server.pem/server.key. Waits until the node
#       accepts AMQP connections (at most RABBITMQ_NODE_START_TIMEOUT seconds, default 90).
#       The Erlang cookie is $RABBITMQ_NODE_COOKIE, else one generated into DIR.
#   rabbitmq-node.sh stop NAME DIR      stops the node (SIGTERM, then SIGKILL after 20 s)
#   rabbitmq-node.sh kill NAME DIR      SIGKILL: a crash, for fault tests
#   rabbitmq-node.sh ctl NAME DIR ARGS… rabbitmqctl -n NAME@localhost ARGS… with the node's cookie
#
# Runs Debian's rabbitmq-server scripts from RABBITMQ_SBIN (default /usr/lib/rabbitmq/bin)
# directly, as the calling user, so every file it writes stays under DIR.
set -euo pipefail

sbin=${RABBITMQ_SBIN:-/usr/lib/rabbitmq/bin}

usage() {
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

die() {
    echo "rabbitmq-node: $*" >&2
    exit 1
}

# Environment for the node's own scripts (server and rabbitmqctl): everything points into DIR,
# so /etc/rabbitmq/rabbitmq-env.conf (which names rabbit@localhost) is not read.
node_env() {
    local name=$1 dir=$2
    export HOME="$dir/home"
    export RABBITMQ_NODENAME="$name@localhost"
    export RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf"
    export RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins"
    export RABBITMQ_MNESIA_BASE="$dir/mnesia"
    export RABBITMQ_LOG_BASE="$dir/log"
    export RABBITMQ_PID_FILE="$dir/node.pid"
    export ERL_EPMD_ADDRESS=127.0.0.1
}

ctl() {
    local name=$1 dir=$2
    shift 2
    [[ -d $dir/home ]] || die "no node state in $dir"
    (node_env "$name" "$dir" && exec "$sbin/rabbitmqctl" -n "$name@localhost" "$@")
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

node_pid() {
    local dir=$1
    [[ -s $dir/node.pid ]] && cat "$dir/node.pid"
}

certs() {
    local dir=$1
    mkdir -p "$dir"
    command -v openssl >/dev/null || die "the openssl CLI is needed to make test certificates"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=rag-ingest test CA $RANDOM" -keyout "$dir/ca.key" -out "$dir/ca.pem" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj "/CN=localhost" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
    printf '%s\n' "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
        "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth" \
        >"$dir/server.ext"
    openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
        -CAcreateserial -days 2 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
    chmod 644 "$dir"/*.key
    echo "rabbitmq-node: CA $dir/ca.pem, server certificate $dir/server.pem (127.0.0.1, localhost)"
}

start() {
    local name=$1 dir=$2 port=$3 dist_port=$4 tls_port=${5:-} cert_dir=${6:-}
    [[ -n $tls_port && -z $cert_dir ]] && die "TLS_PORT needs CERT_DIR"
    [[ -x $sbin/rabbitmq-server ]] || die "no $sbin/rabbitmq-server (apt-get install rabbitmq-server)"
    port_open "$port" && die "port $port is already in use"
    mkdir -p "$dir/home" "$dir/mnesia" "$dir/log"
    dir=$(cd "$dir" && pwd)
    local cookie=$dir/home/.erlang.cookie
    if [[ -n ${RABBITMQ_NODE_COOKIE:-} ]]; then
        rm -f "$cookie"
        printf '%s' "$RABBITMQ_NODE_COOKIE" >"$cookie"
    elif [[ ! -s $cookie ]]; then
        head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$cookie"
    fi
    chmod 400 "$cookie"
    : >"$dir/rabbitmq-env.conf"
    echo '[].' >"$dir/enabled_plugins"
    {
        echo "listeners.tcp.1 = 127.0.0.1:$port"
        echo "log.file.level = info"
        echo "log.console = false"
        if [[ -n $tls_port ]]; then
            cert_dir=$(cd "$cert_dir" && pwd)
            echo "listeners.ssl.1 = 127.0.0.1:$tls_port"
            echo "ssl_options.cacertfile = $cert_dir/ca.pem"
            echo "ssl_options.certfile = $cert_dir/server.pem"
            echo "ssl_options.keyfile = $cert_dir/server.key"
            echo "ssl_options.verify = verify_none"
            echo "ssl_options.fail_if_no_peer_cert = false"
        fi
    } >"$dir/rabbitmq.conf"
    rm -f "$dir/node.pid"
    (
        node_env "$name" "$dir"
        export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
        export RABBITMQ_NODE_PORT=$port
        export RABBITMQ_DIST_PORT=$dist_port
        export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
        cd "$dir"
        exec setsid "$sbin/rabbitmq-server" </dev/null >"$dir/log/console.log" 2>&1
    ) &
    local launcher=$!
    echo "$launcher" >"$dir/launcher.pid"
    local deadline=$((SECONDS + ${RABBITMQ_NODE_START_TIMEOUT:-90}))
    until port_open "$port" && { [[ -z $tls_port ]] || port_open "$tls_port"; }; do
        if ! kill -0 "$launcher" 2>/dev/null; then
            tail -n 30 "$dir/log/console.log" >&2 || true
            die "node $name@localhost exited during start (logs in $dir/log)"
        fi
        if ((SECONDS > deadline)); then
            tail -n 30 "$dir/log/console.log" >&2 || true
            stop "$name" "$dir" || true
            die "node $name@localhost did not listen on $port within ${RABBITMQ_NODE_START_TIMEOUT:-90} s"
        fi
        sleep 0.2
    done
    # An open port is not a booted node: AMQP connections can still be aborted while the
    # node finishes booting. Wait for the boot to complete too.
    local left=$((deadline - SECONDS))
    ((left > 5)) || left=5
    if ! ctl "$name" "$dir" await_startup --timeout "$left" >/dev/null 2>&1; then
        tail -n 30 "$dir/log/console.log" >&2 || true
        stop "$name" "$dir" || true
        die "node $name@localhost listened on $port but did not finish booting within ${RABBITMQ_NODE_START_TIMEOUT:-90} s"
    fi
    echo "rabbitmq-node: $name@localhost up: amqp://127.0.0.1:$port${tls_port:+, amqps://127.0.0.1:$tls_port}, dist $dist_port, state in $dir"
}

# Signals the node's beam process (from its pid file) and, failing that, the launcher.
signal_node() {
    local sig=$1 dir=$2 pid
    pid=$(node_pid "$dir" || true)
    [[ -z $pid && -s $dir/launcher.pid ]] && pid=$(cat "$dir/launcher.pid")
    [[ -n $pid ]] || return 1
    kill "-$sig" "$pid" 2>/dev/null || return 1
    echo "$pid"
}

stop() {
    local name=$1 dir=$2 pid
    pid=$(signal_node TERM "$dir") || {
        echo "rabbitmq-node: $name@localhost is not running"
        return 0
    }
    local deadline=$((SECONDS + 20))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS > deadline)); then
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$dir/node.pid" "$dir/launcher.pid"
    echo "rabbitmq-node: $name@localhost stopped"
}

kill_node() {
    local name=$1 dir=$2 pid
    pid=$(signal_node KILL "$dir") || die "$name@localhost is not running"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    rm -f "$dir/node.pid" "$dir/launcher.pid"
    echo "rabbitmq-node: $name@localhost killed (SIGKILL, pid $pid)"
}

cmd=${1:-}
shift || true
case $cmd in
certs) [[ $# -eq 1 ]] || usage; certs "$1" ;;
start) [[ $# -eq 4 || $# -eq 6 ]] || usage; start "$@" ;;
stop) [[ $# -eq 2 ]] || usage; stop "$@" ;;
kill) [[ $# -eq 2 ]] || usage; kill_node "$@" ;;
ctl) [[ $# -ge 3 ]] || usage; ctl "$@" ;;
*) usage ;;
esac
