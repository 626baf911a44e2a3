//! Embedding speed and fidelity of every precision of the candle forward pass, side by side
//! in one run, on the texts `scripts/bench-peers.sh` also gives to sentence-transformers and
//! ONNX Runtime:
//!
//! ```text
//! cargo bench --bench engines                 # rag-ingest's precisions only
//! scripts/bench-peers.sh                      # the same, then the peers, and the ratios
//! ```
//!
//! The texts: `ENGINES_TEXTS` (default 512) windows of 400 words of the fixture documents,
//! each starting at a different word, so each is truncated at the model's 256 tokens (the
//! conditions of the PERFORMANCE table). For each of `f32`, `bf16`, `int8`, `int16` and
//! `auto` (those this CPU runs): load, one untimed pass of 32 texts, then embed all texts in
//! passes of 32 texts `ENGINES_REPEAT` times (default 3) and keep the fastest. Reported: real tokens per
//! second (special tokens included, after truncation) and the least and mean cosine of each
//! vector to the f32 one of the same text.
//!
//! `ENGINES=bf16,int8` measures only those besides f32 (the reference is always measured;
//! naming `f32` makes it an engine too, so that `ENGINES=f32,int16 ENGINES_ROUNDS=5`
//! interleaves it with the others and reports each relative to it).
//! `ENGINES_ROUNDS=N` measures those engines interleaved instead, for a machine whose speed
//! drifts: each pass of 32 texts by every engine in turn, N times over the texts; reported
//! are each engine's best and median round and the median over rounds of its speed relative
//! to the first engine (`ENGINES=bf16,int8`: int8 / bf16), and the table's figures are the
//! median rounds.
//! With `ENGINES_OUT=DIR` it also writes `DIR/texts.json` (the texts), `DIR/reference.json`
//! (their f32 vectors) and `DIR/rag-ingest.jsonl` (one JSON object per engine: `engine`,
//! `label`, `texts`, `tokens`, `seconds`, `tokens_per_s`, `min_cosine`, `mean_cosine`), the
//! inputs and first half of the peers comparison.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rag_ingest::embed::{CandleEmbedder, EmbedError, Embedder, Precision};
use tokenizers::TruncationParams;

#[allow(dead_code)]
#[path = "../tests/support/fixtures.rs"]
mod fixtures;

/// Texts per call, as the pipeline batches them.
const BATCH: usize = 32;

fn model_dir() -> PathBuf {
    std::env::var_os("RAG_INGEST_MODEL_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2"),
        PathBuf::from,
    )
}

fn env_count(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a count")),
        Err(_) => default,
    }
}

/// `count` texts of 400 words of the fixture documents, each starting at a different word.
fn texts(count: usize) -> Vec<String> {
    let words: Vec<String> = fixtures::fixture_documents()
        .iter()
        .flat_map(|(_, doc)| doc.split_whitespace().map(str::to_owned))
        .collect();
    (0..count)
        .map(|i| {
            words
                .iter()
                .cycle()
                .skip(i * 97 % words.len())
                .take(400)
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// One engine's figures.
struct Figures {
    engine: String,
    label: String,
    seconds: f64,
    min_cosine: f64,
    mean_cosine: f64,
}

/// Embeds `texts` with `embedder` (warm-up, then the fastest of `repeat` runs); returns the
/// seconds and the vectors.
fn measure(embedder: &CandleEmbedder, texts: &[&str], repeat: usize) -> (f64, Vec<Vec<f32>>) {
    let warm = &texts[..texts.len().min(BATCH)];
    embedder.embed_blocking(warm).expect("warm-up");
    let mut best = Duration::MAX;
    let mut vectors = Vec::new();
    for _ in 0..repeat.max(1) {
        let start = Instant::now();
        let mut out = Vec::with_capacity(texts.len());
        for batch in texts.chunks(BATCH) {
            out.extend(embedder.embed_blocking(batch).expect("embed"));
        }
        best = best.min(start.elapsed());
        vectors = out;
    }
    (best.as_secs_f64(), vectors)
}

/// Embeds `texts` with every engine in turn, one pass of [`BATCH`] texts each (the engine
/// going first rotating from pass to pass), `rounds` times over the texts: where the
/// machine's speed drifts (a shared host), every engine meets the same conditions. Returns
/// each engine's seconds per round and its vectors.
fn measure_interleaved(
    embedders: &[&CandleEmbedder],
    texts: &[&str],
    rounds: usize,
) -> (Vec<Vec<f64>>, Vec<Vec<Vec<f32>>>) {
    let warm = &texts[..texts.len().min(BATCH)];
    for embedder in embedders {
        embedder.embed_blocking(warm).expect("warm-up");
    }
    let mut seconds = vec![Vec::with_capacity(rounds); embedders.len()];
    let mut vectors = vec![Vec::new(); embedders.len()];
    for _ in 0..rounds {
        let mut round = vec![0.0; embedders.len()];
        for v in &mut vectors {
            v.clear();
        }
        for (pass, batch) in texts.chunks(BATCH).enumerate() {
            for turn in 0..embedders.len() {
                let i = (pass + turn) % embedders.len();
                let start = Instant::now();
                let out = embedders[i].embed_blocking(batch).expect("embed");
                round[i] += start.elapsed().as_secs_f64();
                vectors[i].extend(out);
            }
        }
        for (seconds, round) in seconds.iter_mut().zip(round) {
            seconds.push(round);
        }
    }
    (seconds, vectors)
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[mid],
        _ => (sorted[mid - 1] + sorted[mid]) / 2.0,
    }
}

/// Prints the interleaved rounds: each engine's best and median round, and the median over
/// rounds of its speed relative to the first engine (its ratio in the same conditions).
fn report_interleaved(
    engines: &[(&str, String, CandleEmbedder)],
    seconds: &[Vec<f64>],
    tokens: usize,
) {
    let Some(first) = seconds.first() else {
        return;
    };
    let first_name = engines.first().map_or("", |(name, _, _)| *name);
    println!(
        "interleaved, {} rounds: {:<20} {:>10} {:>10} {:>12}",
        first.len(),
        "engine",
        "best",
        "median",
        format!("× {first_name}")
    );
    for ((name, _, _), rounds) in engines.iter().zip(seconds) {
        let ratios: Vec<f64> = first.iter().zip(rounds).map(|(a, b)| a / b).collect();
        let best = rounds.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "interleaved, {} rounds: {:<20} {:>10.0} {:>10.0} {:>12.3}",
            first.len(),
            name,
            tokens as f64 / best,
            tokens as f64 / median(rounds),
            median(&ratios)
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let dir = model_dir();
    let count = env_count("ENGINES_TEXTS", 512);
    let repeat = env_count("ENGINES_REPEAT", 3);
    let rounds = env_count("ENGINES_ROUNDS", 0);
    let out = std::env::var_os("ENGINES_OUT").map(PathBuf::from);
    let only: Option<Vec<String>> = std::env::var("ENGINES")
        .ok()
        .map(|v| v.split(',').map(str::to_owned).collect());

    let f32 = CandleEmbedder::load(&dir, BATCH).expect("run scripts/fetch-model.sh first");
    let texts = texts(count);
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut tokenizer = f32.tokenizer().clone();
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: f32.max_input_tokens(),
            ..TruncationParams::default()
        }))
        .expect("truncation");
    let tokens: usize = tokenizer
        .encode_batch(texts.clone(), true)
        .expect("tokenize")
        .iter()
        .map(tokenizers::Encoding::len)
        .sum();
    eprintln!(
        "engines: {} texts, {tokens} tokens, passes of {BATCH} texts, best of {repeat}, {} threads",
        texts.len(),
        rayon::current_num_threads()
    );

    let (seconds, reference) = measure(&f32, &texts, repeat);
    drop(f32);
    let mut figures = vec![Figures {
        engine: "f32".to_owned(),
        label: "rag-ingest f32".to_owned(),
        seconds,
        min_cosine: 1.0,
        mean_cosine: 1.0,
    }];
    let mut engines = Vec::new();
    for precision in [
        Precision::F32,
        Precision::Bf16,
        Precision::Int8,
        Precision::Int16,
        Precision::Auto,
    ] {
        let name = precision.as_str();
        let named = only
            .as_ref()
            .is_some_and(|only| only.iter().any(|o| o == name));
        // f32 is an engine too only where named (to interleave it with the others).
        if !named && (only.is_some() || precision == Precision::F32) {
            continue;
        }
        let embedder = match CandleEmbedder::load_with_precision(&dir, BATCH, precision) {
            Ok(embedder) => embedder,
            Err(EmbedError::ModelLoad { reason, .. }) if reason.contains("CPU features") => {
                eprintln!("SKIPPED: {name}: {reason}");
                continue;
            }
            Err(e) => panic!("load {name}: {e}"),
        };
        // Why this precision runs as it does (kernel, attention, auto's choice).
        eprintln!("{name}: {}", embedder.precision().reason);
        let label = match precision {
            Precision::Auto => format!(
                "rag-ingest auto (runs {})",
                embedder.precision().running.as_str()
            ),
            Precision::F32 => "rag-ingest f32 (as an engine)".to_owned(),
            _ => format!("rag-ingest {name}"),
        };
        engines.push((name, label, embedder));
    }
    let measured: Vec<(f64, Vec<Vec<f32>>)> = match rounds {
        0 => engines
            .iter()
            .map(|(_, _, embedder)| measure(embedder, &texts, repeat))
            .collect(),
        rounds => {
            let embedders: Vec<&CandleEmbedder> = engines.iter().map(|(_, _, e)| e).collect();
            let (seconds, vectors) = measure_interleaved(&embedders, &texts, rounds);
            report_interleaved(&engines, &seconds, tokens);
            seconds.iter().map(|s| median(s)).zip(vectors).collect()
        }
    };
    for ((name, label, _), (seconds, vectors)) in engines.iter().zip(measured) {
        let cosines: Vec<f64> = reference
            .iter()
            .zip(&vectors)
            .map(|(a, b)| fixtures::cosine(a, b))
            .collect();
        figures.push(Figures {
            // Distinct from the reference's "f32" in `ENGINES_OUT`.
            engine: if *name == "f32" {
                "f32-engine".to_owned()
            } else {
                (*name).to_owned()
            },
            label: label.clone(),
            seconds,
            min_cosine: cosines.iter().copied().fold(f64::INFINITY, f64::min),
            mean_cosine: cosines.iter().sum::<f64>() / cosines.len().max(1) as f64,
        });
    }

    let f32_rate = tokens as f64 / figures[0].seconds;
    println!(
        "{:<32} {:>10} {:>8} {:>10} {:>10}",
        "engine", "tokens/s", "× f32", "min cos", "mean cos"
    );
    let mut lines = String::new();
    for f in &figures {
        let rate = tokens as f64 / f.seconds;
        println!(
            "{:<32} {:>10.0} {:>8.2} {:>10.6} {:>10.6}",
            f.label,
            rate,
            rate / f32_rate,
            f.min_cosine,
            f.mean_cosine
        );
        lines.push_str(
            &serde_json::json!({
                "engine": format!("rag-ingest-{}", f.engine),
                "label": f.label,
                "texts": texts.len(),
                "tokens": tokens,
                "seconds": f.seconds,
                "tokens_per_s": rate,
                "min_cosine": f.min_cosine,
                "mean_cosine": f.mean_cosine,
            })
            .to_string(),
        );
        lines.push('\n');
    }
    if let Some(out) = out {
        std::fs::create_dir_all(&out).expect("create ENGINES_OUT");
        let write = |name: &str, contents: String| {
            let path = out.join(name);
            std::fs::write(&path, contents)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        };
        write("texts.json", serde_json::to_string(&texts).expect("json"));
        write(
            "reference.json",
            serde_json::to_string(&reference).expect("json"),
        );
        write("rag-ingest.jsonl", lines);
        eprintln!(
            "engines: wrote texts, reference vectors and figures to {}",
            out.display()
        );
    }
}
