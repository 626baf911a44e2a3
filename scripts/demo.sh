#!/usr/bin/env bash
# The main job end to end on the embedded defaults: RabbitMQ on 127.0.0.1:5672, Qdrant Edge
# under data/, all-MiniLM-L6-v2 under models/. Submits the sample documents of two tenants,
# runs the worker until the queue is drained, and prints a search for each tenant.
set -euo pipefail

repo="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rag-ingest/target}"

scripts/ensure-rabbitmq.sh
scripts/fetch-model.sh
cargo build --locked --quiet --bin rag-ingest
bin="$CARGO_TARGET_DIR/debug/rag-ingest"
pipeline=pipelines/docs.toml

"$bin" submit --pipeline "$pipeline" --tenant acme fixtures/docs/acme
"$bin" submit --pipeline "$pipeline" --tenant globex fixtures/docs/globex
"$bin" worker --pipeline "$pipeline" --exit-when-idle
echo
echo "search (tenant acme): how do I get money back for a taxi ride?"
"$bin" search --pipeline "$pipeline" --tenant acme --top-k 3 "how do I get money back for a taxi ride?"
echo
echo "search (tenant globex): why do volcanoes erupt?"
"$bin" search --pipeline "$pipeline" --tenant globex --top-k 3 "why do volcanoes erupt?"
