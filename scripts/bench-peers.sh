#!/usr/bin/env bash
# Peers benchmark: measures other embedding engines on exactly the texts rag-ingest's own
# embedding benchmark uses, in one run on one machine, and prints a Markdown table of
# tokens/s relative to sentence-transformers plus each engine's min cosine to the f32
# reference embeddings.
#
# Usage: scripts/bench-peers.sh [CORPUS_DIR]
#   CORPUS_DIR  default: $CARGO_TARGET_DIR/peers, or <repo>/target/peers
#               It ends up holding texts.json, reference.json, rag-ingest.jsonl (Rust side)
#               and peers.jsonl (Python side), one JSON object per line:
#               {"engine", "label", "texts", "tokens", "seconds", "tokens_per_s", "min_cosine"}
#
# Environment:
#   RAG_INGEST_MODEL_DIR      model directory (default: <repo>/models/all-MiniLM-L6-v2)
#   RAG_INGEST_PEERS_VENV     Python venv for the peers (default: $HOME/.cache/rag-ingest/peers-venv)
#   RAG_INGEST_PEERS_CACHE    ONNX export cache (default: $HOME/.cache/rag-ingest/peers)
#   RAG_INGEST_PEERS_THREADS  threads per engine (default: 2)
#   RAG_INGEST_PEERS_REPEAT   timed repetitions, best kept (default: 3)
#   RAG_INGEST_PEERS_ENGINES  comma-separated subset of st,ort-fp32,ort-int8 (default: all)
#   PYTHON                    interpreter used to create the venv (default: python3)
#
# The venv is created and filled on first use (several minutes; torch from PyPI brings the
# CUDA libraries, GBs, unless the CPU-only wheel index is reachable); later runs skip pip as
# long as the marker file records the same pins.
set -euo pipefail

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd -- "$script_dir/.." && pwd)"
corpus="${1:-${CARGO_TARGET_DIR:-$repo_root/target}/peers}"
model_dir="${RAG_INGEST_MODEL_DIR:-$repo_root/models/all-MiniLM-L6-v2}"
venv="${RAG_INGEST_PEERS_VENV:-$HOME/.cache/rag-ingest/peers-venv}"
cache="${RAG_INGEST_PEERS_CACHE:-$HOME/.cache/rag-ingest/peers}"
threads="${RAG_INGEST_PEERS_THREADS:-2}"
repeat="${RAG_INGEST_PEERS_REPEAT:-3}"
engines="${RAG_INGEST_PEERS_ENGINES:-st,ort-fp32,ort-int8}"
python="${PYTHON:-python3}"

log() { echo "bench-peers: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Exact versions verified to install and run together (Python 3.11, Linux x86_64).
torch_pin="torch==2.15.0"
other_pins=(
    "numpy==2.4.6"
    "sentence-transformers==6.2.0"
    "transformers==5.24.0"
    "tokenizers==0.23.3"
    "onnx==1.23.2"
    "onnxruntime==1.32.0"
)
cpu_index="https://download.pytorch.org/whl/cpu"

# --- venv -------------------------------------------------------------------------------
ensure_venv() {
    local marker="$venv/.rag-ingest-peers-pins"
    local want
    want="$(printf '%s\n' "$torch_pin" "${other_pins[@]}")"
    if [[ -x "$venv/bin/python" && -f "$marker" ]] \
        && [[ "$(grep -v '^#' "$marker")" == "$want" ]]; then
        log "venv $venv already has the pins ($(grep '^# torch from' "$marker" | sed 's/^# //'))"
        return
    fi
    command -v "$python" >/dev/null 2>&1 || die "$python not found (needed to create the venv); set PYTHON"
    if [[ ! -x "$venv/bin/python" ]]; then
        log "creating venv $venv"
        mkdir -p "$(dirname -- "$venv")"
        "$python" -m venv "$venv" || die "could not create venv $venv (is the venv module installed?)"
    fi
    rm -f -- "$marker"
    local pip=("$venv/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
    local torch_source
    local start=$SECONDS
    log "installing $torch_pin: trying the CPU-only wheel index first ($cpu_index)"
    if "${pip[@]}" --retries 1 --timeout 20 --index-url "$cpu_index" "$torch_pin" >&2; then
        torch_source="the CPU-only wheel index ($cpu_index)"
    else
        log "CPU-only index unreachable or without $torch_pin; falling back to PyPI (brings the CUDA libraries, GBs)"
        "${pip[@]}" "$torch_pin" >&2 || die "pip could not install $torch_pin"
        torch_source="PyPI (CUDA build, run on CPU)"
    fi
    log "torch installed from $torch_source"
    log "installing ${other_pins[*]}"
    "${pip[@]}" "$torch_pin" "${other_pins[@]}" >&2 || die "pip could not install ${other_pins[*]}"
    { echo "# torch from $torch_source"; echo "$want"; } >"$marker"
    log "venv ready in $((SECONDS - start)) s ($(du -sh -- "$venv" 2>/dev/null | cut -f1))"
}

# --- model ------------------------------------------------------------------------------
for f in config.json tokenizer.json model.safetensors; do
    if [[ ! -s "$model_dir/$f" ]]; then
        if [[ -z "${RAG_INGEST_MODEL_DIR:-}" ]]; then
            "$script_dir/fetch-model.sh" >&2
            break
        fi
        die "$model_dir/$f is missing (set RAG_INGEST_MODEL_DIR or run scripts/fetch-model.sh)"
    fi
done

mkdir -p -- "$corpus"

# rag-ingest's side: the `engines` bench (release build) measures f32, bf16, int8 and auto on
# its texts and writes texts.json, reference.json (the f32 vectors) and rag-ingest.jsonl.
# The venv is readied first so that the install does not sit between the two halves.
ensure_venv
log "rag-ingest: cargo bench --bench engines (a release build on first use)"
(cd -- "$repo_root" && ENGINES_OUT="$corpus" ENGINES_REPEAT="$repeat" \
    cargo bench --locked --bench engines) >&2 || die "the engines bench failed"

for f in texts.json reference.json; do
    [[ -s "$corpus/$f" ]] || die "$corpus/$f is missing (the Rust side writes it)"
done

log "running peers ($engines) on $corpus with $threads threads, best of $repeat"
"$venv/bin/python" "$script_dir/bench_peers.py" \
    --corpus "$corpus" --model "$model_dir" --cache "$cache" \
    --threads "$threads" --repeat "$repeat" --engines "$engines" \
    >"$corpus/peers.jsonl.tmp"
mv -- "$corpus/peers.jsonl.tmp" "$corpus/peers.jsonl"
log "wrote $corpus/peers.jsonl"

# --- summary ----------------------------------------------------------------------------
"$venv/bin/python" - "$corpus/rag-ingest.jsonl" "$corpus/peers.jsonl" <<'PY'
import json, os, sys

rows = []
for path in sys.argv[1:]:
    if not os.path.exists(path):
        print(f"bench-peers: note: {path} not found, left out of the table", file=sys.stderr)
        continue
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"bench-peers: error: {path}:{n}: not JSON ({e})")

st = next((r for r in rows if r.get("engine") == "st"), None)
base = st["tokens_per_s"] if st and st.get("tokens_per_s") else None
print("| engine | tokens/s | × sentence-transformers | min cosine to f32 reference |")
print("| --- | ---: | ---: | ---: |")
for r in rows:
    tps = r.get("tokens_per_s")
    ratio = f"{tps / base:.2f}×" if base and tps is not None else "n/a"
    cos = r.get("min_cosine")
    name = r.get("engine", "?")
    if r.get("label"):
        name = f"{name} ({r['label']})"
    tps_s = f"{tps:,.0f}" if tps is not None else "n/a"
    cos_s = f"{cos:.6f}" if cos is not None else "n/a"
    print(f"| {name} | {tps_s} | {ratio} | {cos_s} |")
PY
