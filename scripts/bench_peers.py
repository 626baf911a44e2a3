#!/usr/bin/env python3
"""Peers benchmark: embed the same texts as rag-ingest's own benchmark with other engines.

Usage:
    python bench_peers.py --corpus DIR --model MODEL_DIR [--threads 2] [--repeat 3]
                          [--engines st,ort-fp32,ort-int8] [--cache DIR]

DIR holds texts.json (a JSON list of strings) and reference.json (a JSON list of f32
reference vectors, one per text: mean-pooled, L2-normalised, texts truncated to 256 tokens).
MODEL_DIR is a sentence-transformers layout of all-MiniLM-L6-v2 (config.json, tokenizer.json,
model.safetensors, 1_Pooling/, sentence_bert_config.json).

Engines:
    st        sentence-transformers (PyTorch), max_seq_length 256, batch 32, normalised
    ort-fp32  ONNX Runtime on a torch.onnx export of the same BERT, tokenizers tokenizer,
              mean pooling + L2 normalisation in numpy
    ort-int8  the same runner on onnxruntime.quantization.quantize_dynamic (QInt8, per-tensor)
              of that export

The ONNX exports are made once into --cache (default $HOME/.cache/rag-ingest/peers), keyed by
the weights' SHA-256, and reused.

For each engine: one untimed warm-up over the first batch, then all texts are embedded
--repeat times in batches of 32 and the fastest repetition is kept (tokenisation included).
tokens = real tokens after truncation to 256, special tokens included (sum of the attention
mask); min_cosine = minimum over texts of the cosine to the reference vector.

Writes one JSON object per engine and line to stdout:
    {"engine": ..., "label": ..., "texts": N, "tokens": T, "seconds": S,
     "tokens_per_s": X, "min_cosine": C}
Progress goes to stderr. Exit status 1 when any engine failed (the others are still reported),
2 for bad arguments or inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

# Everything is local: never reach for the Hugging Face Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MAX_TOKENS = 256
BATCH = 32
OPSET = 17
ENGINES = ("st", "ort-fp32", "ort-int8")
PROG = "bench_peers"


class BenchError(Exception):
    """An expected failure, reported as one line instead of a traceback."""


def log(msg: str) -> None:
    print(f"{PROG}: {msg}", file=sys.stderr, flush=True)


def need(module: str, package: str | None = None):
    """Import a module, or fail with a message naming the pip package."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        pkg = package or module
        raise BenchError(
            f"Python package '{pkg}' is not importable ({e}); "
            f"install it (scripts/bench-peers.sh sets up a venv with the pinned versions)"
        ) from None


def version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


# --- inputs --------------------------------------------------------------------------------


def load_json(path: Path):
    if not path.is_file():
        raise BenchError(f"{path} is missing")
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise BenchError(f"{path} is not readable JSON: {e}") from None


def load_corpus(corpus: Path):
    np = need("numpy")
    texts = load_json(corpus / "texts.json")
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BenchError(f"{corpus / 'texts.json'} must be a non-empty JSON list of strings")
    ref = load_json(corpus / "reference.json")
    if not isinstance(ref, list) or len(ref) != len(texts):
        raise BenchError(
            f"{corpus / 'reference.json'} must be a JSON list of {len(texts)} vectors "
            f"(one per text in texts.json), got "
            f"{len(ref) if isinstance(ref, list) else type(ref).__name__}"
        )
    try:
        reference = np.asarray(ref, dtype=np.float32)
    except ValueError as e:
        raise BenchError(f"{corpus / 'reference.json'}: vectors of unequal length ({e})") from None
    if reference.ndim != 2:
        raise BenchError(f"{corpus / 'reference.json'}: expected a list of vectors")
    return texts, reference


def check_model_dir(model: Path) -> int:
    """Checks the files every engine needs; returns the embedding dimension."""
    if not model.is_dir():
        raise BenchError(f"model directory {model} does not exist")
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        if not (model / name).is_file():
            raise BenchError(f"{model / name} is missing (run scripts/fetch-model.sh)")
    config = load_json(model / "config.json")
    dim = config.get("hidden_size") if isinstance(config, dict) else None
    if not isinstance(dim, int):
        raise BenchError(f"{model / 'config.json'} has no integer hidden_size")
    return dim


# --- measuring -----------------------------------------------------------------------------


def batches(texts):
    for i in range(0, len(texts), BATCH):
        yield texts[i : i + BATCH]


def min_cosine(vectors, reference) -> float:
    np = need("numpy")
    v = np.asarray(vectors, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    if v.shape != r.shape:
        raise BenchError(f"engine produced vectors of shape {v.shape}, reference is {r.shape}")
    dots = (v * r).sum(axis=1)
    norms = np.linalg.norm(v, axis=1) * np.linalg.norm(r, axis=1)
    return float((dots / np.maximum(norms, 1e-12)).min())


def measure(engine: str, label: str, embed_all, warm_up, texts, tokens: int, reference, repeat: int):
    """embed_all(texts) -> (N, D) array; warm_up() embeds the first batch untimed."""
    log(f"{engine}: warm-up on the first batch")
    warm_up()
    best = None
    vectors = None
    for i in range(repeat):
        t0 = time.perf_counter()
        out = embed_all(texts)
        dt = time.perf_counter() - t0
        log(f"{engine}: repetition {i + 1}/{repeat}: {dt:.3f} s ({tokens / dt:,.0f} tokens/s)")
        if best is None or dt < best:
            best, vectors = dt, out
    return {
        "engine": engine,
        "label": label,
        "texts": len(texts),
        "tokens": int(tokens),
        "seconds": round(best, 6),
        "tokens_per_s": round(tokens / best, 3),
        "min_cosine": round(min_cosine(vectors, reference), 6),
    }


# --- sentence-transformers -----------------------------------------------------------------


def run_st(args, texts, reference):
    torch = need("torch")
    st = need("sentence_transformers", "sentence-transformers")
    torch.set_num_threads(args.threads)
    log(f"st: loading {args.model}")
    try:
        model = st.SentenceTransformer(str(args.model), device="cpu", local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any load failure is reported as one line
        raise BenchError(f"sentence-transformers could not load {args.model}: {e}") from None
    model.max_seq_length = MAX_TOKENS
    model.eval()

    # Real tokens after truncation, as sentence-transformers itself tokenises them.
    tokenize = getattr(model, "preprocess", None) or model.tokenize  # tokenize: before 6.x
    tokens = 0
    for b in batches(texts):
        tokens += int(tokenize(b)["attention_mask"].sum())

    def embed(xs):
        return model.encode(
            xs,
            batch_size=BATCH,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    label = (
        f"sentence-transformers {version('sentence-transformers')} / torch {version('torch')}"
        f" ({args.threads} threads)"
    )
    with torch.inference_mode():
        return measure(
            "st", label, embed, lambda: embed(texts[:BATCH]), texts, tokens, reference, args.repeat
        )


# --- ONNX export and quantisation ----------------------------------------------------------


def weights_key(model: Path) -> str:
    h = hashlib.sha256()
    with (model / "model.safetensors").open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def export_fp32(args) -> Path:
    cache = args.cache / f"all-MiniLM-L6-v2-{weights_key(args.model)}"
    out = cache / f"model-fp32-opset{OPSET}.onnx"
    if out.is_file():
        log(f"ort: reusing ONNX export {out}")
        return out
    torch = need("torch")
    transformers = need("transformers")
    need("onnx")
    cache.mkdir(parents=True, exist_ok=True)
    log(f"ort: exporting {args.model} to {out} (torch.onnx.export, opset {OPSET})")
    try:
        model = transformers.AutoModel.from_pretrained(
            str(args.model), local_files_only=True, attn_implementation="eager"
        )
    except Exception as e:  # noqa: BLE001
        raise BenchError(f"transformers could not load {args.model}: {e}") from None
    model.eval()
    model.config.return_dict = False

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return out[0]

    ids = torch.ones((2, 16), dtype=torch.long)
    dyn = {0: "batch", 1: "sequence"}
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                Encoder(model),
                (ids, torch.ones_like(ids), torch.zeros_like(ids)),
                str(tmp),
                input_names=["input_ids", "attention_mask", "token_type_ids"],
                output_names=["last_hidden_state"],
                dynamic_axes={
                    "input_ids": dyn,
                    "attention_mask": dyn,
                    "token_type_ids": dyn,
                    "last_hidden_state": dyn,
                },
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        os.replace(tmp, out)
    except Exception as e:  # noqa: BLE001
        tmp.unlink(missing_ok=True)
        raise BenchError(f"ONNX export failed: {type(e).__name__}: {e}") from None
    return out


def quantize_int8(args, fp32: Path) -> Path:
    out = fp32.with_name(fp32.name.replace("-fp32-", "-int8-"))
    if out.is_file():
        log(f"ort: reusing quantised model {out}")
        return out
    q = need("onnxruntime.quantization", "onnxruntime")
    log(f"ort: quantize_dynamic (QInt8 weights, per-tensor) -> {out}")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic's "consider pre-processing" advice
    try:
        q.quantize_dynamic(str(fp32), str(tmp), weight_type=q.QuantType.QInt8)
        os.replace(tmp, out)
    except Exception as e:  # noqa: BLE001
        tmp.unlink(missing_ok=True)
        raise BenchError(f"quantize_dynamic failed: {type(e).__name__}: {e}") from None
    finally:
        root.setLevel(level)
    return out


# --- ONNX Runtime runner -------------------------------------------------------------------


def run_ort(engine: str, onnx_path: Path, args, texts, reference):
    ort = need("onnxruntime")
    np = need("numpy")
    tokenizers = need("tokenizers")

    tok = tokenizers.Tokenizer.from_file(str(args.model / "tokenizer.json"))
    # tokenizer.json ships truncation at 128 and fixed padding to 128: override both.
    tok.enable_truncation(max_length=MAX_TOKENS)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]", length=None)

    if hasattr(ort, "disable_telemetry_events"):
        ort.disable_telemetry_events()
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        raise BenchError(f"onnxruntime could not load {onnx_path}: {e}") from None
    wanted = {i.name for i in sess.get_inputs()}

    def encode(batch):
        enc = tok.encode_batch(batch)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        types = np.array([e.type_ids for e in enc], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {k: v for k, v in feeds.items() if k in wanted}, mask

    def embed_batch(batch):
        feeds, mask = encode(batch)
        hidden = sess.run(None, feeds)[0]  # (B, T, 384)
        m = mask[:, :, None].astype(hidden.dtype)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.maximum(norms, 1e-12)

    def embed(xs):
        return np.concatenate([embed_batch(b) for b in batches(xs)], axis=0)

    tokens = sum(int(encode(b)[1].sum()) for b in batches(texts))
    kind = "fp32" if engine == "ort-fp32" else "int8 quantize_dynamic QInt8 per-tensor"
    label = (
        f"onnxruntime {version('onnxruntime')} {kind} / torch {version('torch')} "
        f"ONNX export opset {OPSET} ({args.threads} threads)"
    )
    return measure(
        engine, label, embed, lambda: embed(texts[:BATCH]), texts, tokens, reference, args.repeat
    )


# --- main ----------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog=PROG, description="Measure peer embedding engines on rag-ingest's benchmark texts."
    )
    p.add_argument("--corpus", required=True, type=Path, help="dir with texts.json, reference.json")
    p.add_argument("--model", required=True, type=Path, help="sentence-transformers model dir")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: " + ",".join(ENGINES))
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("HOME", ".")) / ".cache" / "rag-ingest" / "peers",
        help="where ONNX exports are kept (default: $HOME/.cache/rag-ingest/peers)",
    )
    args = p.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        p.error(f"unknown engine(s) {','.join(unknown) or '(none)'}; choose from {','.join(ENGINES)}")
    if args.threads < 1 or args.repeat < 1:
        p.error("--threads and --repeat must be at least 1")
    args.engines = engines
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        dim = check_model_dir(args.model)
        texts, reference = load_corpus(args.corpus)
        if reference.shape[1] != dim:
            raise BenchError(
                f"{args.corpus / 'reference.json'} has vectors of dimension {reference.shape[1]}, "
                f"the model in {args.model} embeds into {dim}"
            )
    except BenchError as e:
        log(f"error: {e}")
        return 2
    log(f"{len(texts)} texts, reference dim {reference.shape[1]}, engines {','.join(args.engines)}")

    failed = []
    fp32 = None
    for engine in args.engines:
        try:
            if engine == "st":
                result = run_st(args, texts, reference)
            else:
                if fp32 is None:
                    fp32 = export_fp32(args)
                path = fp32 if engine == "ort-fp32" else quantize_int8(args, fp32)
                result = run_ort(engine, path, args, texts, reference)
        except BenchError as e:
            log(f"{engine}: error: {e}")
            failed.append(engine)
            continue
        log(
            f"{engine}: {result['tokens']} tokens in {result['seconds']:.3f} s = "
            f"{result['tokens_per_s']:,.0f} tokens/s, min cosine {result['min_cosine']:.6f}"
        )
        print(json.dumps(result), flush=True)
    if failed:
        log(f"failed: {','.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
