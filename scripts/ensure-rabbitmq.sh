#!/usr/bin/env bash
# Makes sure RabbitMQ answers on 127.0.0.1:5672: installs Debian's rabbitmq-server if it is
# missing, starts it if it is stopped, and waits until it accepts connections.
set -euo pipefail

port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if port_open; then
    echo "ensure-rabbitmq: RabbitMQ is up on 127.0.0.1:5672"
    exit 0
fi

sudo_cmd=()
[[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)

if ! command -v rabbitmq-server >/dev/null 2>&1; then
    echo "ensure-rabbitmq: installing rabbitmq-server"
    "${sudo_cmd[@]}" apt-get update
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y rabbitmq-server
fi

if ! port_open; then
    echo "ensure-rabbitmq: starting RabbitMQ"
    "${sudo_cmd[@]}" rabbitmq-server -detached || true
fi

deadline=$((SECONDS + 120))
until port_open; do
    if ((SECONDS > deadline)); then
        echo "ensure-rabbitmq: RabbitMQ did not start listening on 127.0.0.1:5672 within 120 s" >&2
        exit 1
    fi
    sleep 1
done
"${sudo_cmd[@]}" rabbitmqctl await_startup >/dev/null 2>&1 || true
echo "ensure-rabbitmq: RabbitMQ is up on 127.0.0.1:5672"
