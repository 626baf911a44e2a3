//! [`CandleEmbedder`]: a BERT-family sentence-transformers model run in process with candle.
//!
//! The model is loaded once (f32, CPU) and shared behind an [`Arc`]. Async callers go through
//! one dedicated OS thread that owns a handle to the model and serves requests in order:
//!
//! - inference is CPU-bound and already parallel inside candle's matrix multiplications, so
//!   running several batches at once (as `spawn_blocking` per call would) only oversubscribes
//!   the cores and makes every call slower; one thread gives a natural FIFO queue instead;
//! - continuous batching ([`batcher`]): requests are tokenised as they arrive and wait in one
//!   queue; each forward pass takes a full token budget from its front whenever that much is
//!   queued, mixing small documents and splitting long ones across passes, and each caller
//!   receives exactly its own vectors as soon as its last text is embedded; requests of
//!   live-lane messages queue ahead of bulk-lane ones ([`crate::lane`]);
//! - the tokio runtime never runs inference, and tokio's blocking pool stays free for file I/O;
//! - a request whose caller has gone away (its future was dropped) is skipped, and a panic
//!   inside inference is caught and reported as [`EmbedError::Inference`] without killing
//!   the thread.
//!
//! [`CandleEmbedder::embed_blocking`] runs the same code on the caller's thread (benches, tests).
//!
//! The forward pass is [`Bert`](bert::Bert), which packs the tokens of a pass without
//! padding; passes hold at most `batch_size × max_seq_length` tokens.

use std::fmt;
use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Instant;

use serde::Deserialize;
use tokenizers::{PostProcessor, Tokenizer, TruncationParams};
use tokio::sync::oneshot;

use super::{EmbedError, Embedder, Fingerprint, Precision};
use crate::lane::Lane;
use batcher::{Pending, Queue, TokenIds};
use bert::{Bert, Config, Int8Plan, Sequence, Site};

mod amx;
mod attention;
mod batcher;
mod bert;
mod bf16;
mod int8;
mod probe;
mod tile;

/// The text `precision = "int8"` runs through the f32 model at load time to learn the range
/// of each linear layer's inputs: prose, Markdown, code, logs, numbers and a little
/// non-English text; one sequence per paragraph, and the whole text as one more.
const CALIBRATION_TEXT: &str = include_str!("candle/calibration.txt");

const CONFIG_FILE: &str = "config.json";
const TOKENIZER_FILE: &str = "tokenizer.json";
const WEIGHTS_FILE: &str = "model.safetensors";
const POOLING_FILE: &str = "1_Pooling/config.json";
const SENTENCE_BERT_FILE: &str = "sentence_bert_config.json";

/// A sentence-transformers model (BERT architecture, mean pooling, L2-normalised output)
/// running on the CPU with candle.
///
/// Cloning is cheap: clones share the model and the embedding thread, which stops when the
/// last clone is dropped.
#[derive(Clone)]
pub struct CandleEmbedder {
    inner: Arc<Inner>,
    requests: mpsc::Sender<Request>,
    precision: Arc<PrecisionChoice>,
}

/// The precision a [`CandleEmbedder`] runs in.
#[derive(Debug, Clone, PartialEq)]
pub struct PrecisionChoice {
    /// What the configuration asked for.
    pub requested: Precision,
    /// What the forward pass computes in (never [`Precision::Auto`]).
    pub running: Precision,
    /// Why, in a sentence (the CPU features, the self-check's least cosine).
    pub reason: String,
    /// What attention's two products (scores and context) compute in: `"bf16"`, `"int16"`
    /// or `"f32"` (the f32 pass always; the others where a 16-bit format is faster than f32
    /// here, docs/configuration.md).
    pub attention: &'static str,
    /// The time of one AVX-512 BF16 `vdpbf16ps` over that of one f32 FMA, as measured in
    /// this process (`None`: the CPU has no AVX-512 BF16). At or above
    /// [`BF16_SLOW_RATIO`], bf16 on AVX-512 is slower than f32, and `auto` runs bf16 only on
    /// AMX.
    pub bf16_dot_ratio: Option<f64>,
}

/// See [`PrecisionChoice::bf16_dot_ratio`].
pub const BF16_SLOW_RATIO: f64 = probe::SLOW_RATIO;

/// Least cosine between the bf16 (or int16) and f32 vectors of [`SELF_CHECK_TEXTS`] for
/// `precision = "auto"` to run bf16 (or int16).
pub const AUTO_MIN_COSINE: f64 = 0.9999;

/// The texts `precision = "auto"` embeds both ways at load time: short and long, prose,
/// code, numbers and non-English text.
pub const SELF_CHECK_TEXTS: [&str; 6] = [
    "How do I reset my password?",
    "ok",
    "The worker acknowledges a delivery only after the vector store has confirmed the write, \
     so a crash between the two redelivers the message and the deterministic point ids make \
     the second write overwrite the first instead of duplicating it.",
    "fn backoff(attempt: u32) -> Duration { Duration::from_millis(100 << attempt.min(10)) }",
    "Invoice 2024-0117: 3 × 19.99 EUR, VAT 21 %, total 72.56 EUR, due 2024-02-15.",
    "Die Wartung beginnt am Montag um 6 Uhr; während dieser Zeit ist der Dienst nicht erreichbar.",
];

/// Cosine similarity of two vectors (0 when either is zero).
/// The least cosine between `reference`'s and `other`'s vectors of [`SELF_CHECK_TEXTS`].
///
/// # Errors
///
/// [`EmbedError::Inference`] if either pass fails.
fn least_cosine(reference: &Inner, other: &Inner) -> Result<f64, EmbedError> {
    let expected = reference.embed(&SELF_CHECK_TEXTS)?;
    let got = other.embed(&SELF_CHECK_TEXTS)?;
    Ok(expected
        .iter()
        .zip(&got)
        .map(|(a, b)| cosine(a, b))
        .fold(f64::INFINITY, f64::min))
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// The loaded model; shared by the embedding thread and [`CandleEmbedder::embed_blocking`].
struct Inner {
    model: Bert,
    /// Tokenizer for inference: truncates to `max_seq_length`, never pads (the forward pass
    /// packs sequences without padding).
    inference_tokenizer: Tokenizer,
    /// The same tokenizer without truncation or padding, for counting tokens.
    plain_tokenizer: Tokenizer,
    fingerprint: Fingerprint,
    max_seq_length: usize,
    batch_size: usize,
    /// Forward passes run so far.
    forward_passes: AtomicU64,
}

/// One async embedding request for the embedding thread.
struct Request {
    texts: Vec<String>,
    reply: Reply,
    /// The lane of the message it serves: live requests are queued ahead of bulk ones.
    lane: Lane,
}

/// The part of `sentence_bert_config.json` this embedder reads.
#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

impl CandleEmbedder {
    /// Loads a Hugging Face sentence-transformers model directory: `config.json`,
    /// `tokenizer.json` and `model.safetensors` are required; `1_Pooling/config.json` and
    /// `sentence_bert_config.json` are read when present. Each forward pass takes up to
    /// `batch_size × max_seq_length` tokens (`batch_size` full-length texts, or more shorter
    /// ones); 0 is treated as 1.
    ///
    /// Inputs are truncated to `max_seq_length` tokens from `sentence_bert_config.json`
    /// (capped at, and defaulting to, `max_position_embeddings` from `config.json`).
    ///
    /// # Errors
    ///
    /// - [`EmbedError::ModelMissing`] naming the directory or required file that is absent;
    /// - [`EmbedError::ModelLoad`] if a file cannot be read or parsed, the weights do not
    ///   match the config, the pooling is not mean pooling, or the embedding thread cannot
    ///   be started.
    pub fn load(model_dir: &Path, batch_size: usize) -> Result<Self, EmbedError> {
        Self::load_with_precision(model_dir, batch_size, Precision::F32)
    }

    /// [`CandleEmbedder::load`], with the linear layers computed in `precision`
    /// ([`Precision::Auto`] resolves as [`CandleEmbedder::load_auto`] with
    /// [`AUTO_MIN_COSINE`]).
    ///
    /// # Errors
    ///
    /// Those of [`CandleEmbedder::load`], and [`EmbedError::ModelLoad`] naming the missing
    /// CPU features if this CPU cannot compute in `precision` (checked before anything is
    /// read; an explicit precision has no fallback).
    pub fn load_with_precision(
        model_dir: &Path,
        batch_size: usize,
        precision: Precision,
    ) -> Result<Self, EmbedError> {
        if precision == Precision::Auto {
            return Self::load_auto(model_dir, batch_size, AUTO_MIN_COSINE);
        }
        let inner = Inner::load(model_dir, batch_size.max(1), precision)?;
        let kernel = amx::Kernel::best();
        let speed = probe::DotSpeed::get();
        let reason = match precision {
            Precision::Int8 | Precision::Bf16 => {
                let mut reason = format!(
                    "set in the configuration; {} products on {}, attention in {}",
                    precision.as_str(),
                    kernel.name(),
                    inner.model.attention_precision()
                );
                if precision == Precision::Int8 {
                    let others = if bert::bf16_products_pay(kernel) {
                        "bf16"
                    } else {
                        "f32"
                    };
                    reason.push_str(&format!(", short sequences in {others}"));
                } else if !bert::bf16_products_pay(kernel)
                    && let Some(speed) = speed
                {
                    reason.push_str(&format!(
                        "; slower than f32 on this CPU (vdpbf16ps takes {:.1}x an f32 FMA)",
                        speed.ratio
                    ));
                }
                reason
            }
            Precision::Int16 => format!(
                "set in the configuration; int16 products on {}, attention in {}",
                bert::int16_kernel().name(),
                inner.model.attention_precision()
            ),
            Precision::F32 | Precision::Auto => "set in the configuration".to_owned(),
        };
        let choice = PrecisionChoice {
            requested: precision,
            running: precision,
            reason,
            attention: inner.model.attention_precision(),
            bf16_dot_ratio: speed.map(|s| s.ratio),
        };
        Self::start(model_dir, inner, choice)
    }

    /// What `precision = "auto"` loads: the bf16 forward pass if this CPU has AVX-512 BF16,
    /// bf16 is faster than f32 here (AMX tiles, or a fast `vdpbf16ps`:
    /// [`PrecisionChoice::bf16_dot_ratio`]) and, on [`SELF_CHECK_TEXTS`], every bf16 vector
    /// has cosine at least `min_cosine` to the f32 one; where bf16 does not run, the int16
    /// pass where int16 products pay (AVX-512 VNNI, or AVX2 without AVX-512:
    /// [`bert::int16_fast_kernel`]) if it passes the same check; else the f32
    /// forward pass. Both passes are loaded for the check; the one not chosen is dropped at
    /// once. [`CandleEmbedder::precision`] says which runs and why.
    ///
    /// # Errors
    ///
    /// Those of [`CandleEmbedder::load`], or [`EmbedError::Inference`] if the self-check
    /// cannot run.
    pub fn load_auto(
        model_dir: &Path,
        batch_size: usize,
        min_cosine: f64,
    ) -> Result<Self, EmbedError> {
        let batch_size = batch_size.max(1);
        let f32 = Inner::load(model_dir, batch_size, Precision::F32)?;
        if let Some(missing) = bf16::missing_features() {
            let why = format!("this CPU lacks {missing} for bf16");
            return Self::auto_without_bf16(model_dir, f32, min_cosine, why, None);
        }
        let kernel = amx::Kernel::best();
        let speed = probe::DotSpeed::get();
        let bf16_dot_ratio = speed.map(|s| s.ratio);
        if kernel != amx::Kernel::Amx && amx::in_cpu() {
            let why = "this CPU has AMX but this process may not use it (OS permission, or \
                       RAG_INGEST_AMX=0), and its AVX-512 BF16 path is slower than f32"
                .to_owned();
            return Self::auto_without_bf16(model_dir, f32, min_cosine, why, bf16_dot_ratio);
        }
        if !bert::bf16_products_pay(kernel) {
            // No AMX here (none, or hidden by a hypervisor) and a slow `vdpbf16ps`: bf16 on
            // AVX-512 would run at about half the f32 speed (docs/performance.md).
            let ratio = bf16_dot_ratio.unwrap_or(f64::NAN);
            let why = format!(
                "vdpbf16ps takes {ratio:.1}x an f32 FMA on this CPU (bf16 pays below \
                 {BF16_SLOW_RATIO}x) and no AMX is available: bf16 would be slower than f32"
            );
            return Self::auto_without_bf16(model_dir, f32, min_cosine, why, bf16_dot_ratio);
        }
        let bf16 = Inner::load(model_dir, batch_size, Precision::Bf16)?;
        let least = least_cosine(&f32, &bf16)?;
        let attention = bf16.model.attention_precision();
        let (inner, choice) = if least >= min_cosine {
            drop(f32);
            (
                bf16,
                PrecisionChoice {
                    requested: Precision::Auto,
                    running: Precision::Bf16,
                    reason: format!(
                        "AVX-512 BF16 present (products on {}{}, attention in {}); self-check \
                         min cosine {least:.6} >= {min_cosine}",
                        kernel.name(),
                        match (kernel, bf16_dot_ratio) {
                            (amx::Kernel::Avx512, Some(ratio)) => {
                                format!(", vdpbf16ps {ratio:.1}x an f32 FMA")
                            }
                            _ => String::new(),
                        },
                        attention
                    ),
                    attention,
                    bf16_dot_ratio,
                },
            )
        } else {
            drop(bf16);
            (
                f32,
                PrecisionChoice {
                    requested: Precision::Auto,
                    running: Precision::F32,
                    reason: format!(
                        "bf16 self-check min cosine {least:.6} < {min_cosine}: kept f32"
                    ),
                    attention: "f32",
                    bf16_dot_ratio,
                },
            )
        };
        Self::start(model_dir, inner, choice)
    }

    /// `auto` where bf16 does not run (`why`): int16 where it is the faster path
    /// ([`bert::int16_fast_kernel`]: AVX-512 VNNI, or AVX2 and FMA without AVX-512) and its
    /// vectors pass the self-check against `f32` (the loaded f32 pass), else `f32` itself,
    /// saying why.
    ///
    /// # Errors
    ///
    /// Those of loading the int16 pass, or [`EmbedError::Inference`] if the self-check
    /// cannot run.
    fn auto_without_bf16(
        model_dir: &Path,
        f32: Inner,
        min_cosine: f64,
        why: String,
        bf16_dot_ratio: Option<f64>,
    ) -> Result<Self, EmbedError> {
        let kept = |reason: String| PrecisionChoice {
            requested: Precision::Auto,
            running: Precision::F32,
            reason,
            attention: "f32",
            bf16_dot_ratio,
        };
        let kernel = match bert::int16_fast_kernel() {
            Ok(kernel) => kernel,
            Err(not) => return Self::start(model_dir, f32, kept(format!("{why}; {not}"))),
        };
        let int16 = Inner::load(model_dir, f32.batch_size, Precision::Int16)?;
        let least = least_cosine(&f32, &int16)?;
        if least >= min_cosine {
            drop(f32);
            let because = match kernel {
                amx::Kernel::Avx512 => "AVX-512 VNNI",
                amx::Kernel::Avx2 | amx::Kernel::Amx => "AVX2 without AVX-512",
            };
            let choice = PrecisionChoice {
                requested: Precision::Auto,
                running: Precision::Int16,
                reason: format!(
                    "{why}; {because}: int16 products on {}, attention in {}, self-check min \
                     cosine {least:.6} >= {min_cosine}",
                    kernel.name(),
                    int16.model.attention_precision()
                ),
                attention: int16.model.attention_precision(),
                bf16_dot_ratio,
            };
            Self::start(model_dir, int16, choice)
        } else {
            drop(int16);
            Self::start(
                model_dir,
                f32,
                kept(format!(
                    "{why}; int16 self-check min cosine {least:.6} < {min_cosine}: kept f32"
                )),
            )
        }
    }

    /// Starts the embedding thread over `inner` and reports the load.
    fn start(model_dir: &Path, inner: Inner, choice: PrecisionChoice) -> Result<Self, EmbedError> {
        // The largest pass: a full budget, or one text of the model's length.
        inner
            .model
            .reserve(inner.pass_budget().max(inner.max_seq_length));
        let inner = Arc::new(inner);
        let (requests, receiver) = mpsc::channel();
        let worker_inner = Arc::clone(&inner);
        thread::Builder::new()
            .name("rag-ingest-embed".to_owned())
            .spawn(move || serve(&worker_inner, &receiver))
            .map_err(|e| EmbedError::ModelLoad {
                path: model_dir.to_path_buf(),
                reason: format!("cannot start the embedding thread: {e}"),
            })?;
        crate::telemetry::emit(crate::telemetry::events::ModelLoaded {
            model: &inner.fingerprint.model,
            dims: inner.fingerprint.dims,
            max_seq_length: inner.max_seq_length,
            batch_size: inner.batch_size,
            precision: choice.running.as_str(),
            requested_precision: choice.requested.as_str(),
            precision_reason: &choice.reason,
            attention: choice.attention,
            dir: &model_dir.display().to_string(),
        });
        Ok(Self {
            inner,
            requests,
            precision: Arc::new(choice),
        })
    }

    /// Frees the forward pass's working buffers, which loading allocates for a full pass
    /// (up to `batch_size` × 256 tokens of activations, ≈ 150 MB at the defaults); the next
    /// pass allocates what it needs again. Meant for a model that may never run, such as
    /// the candle fallback behind a remote provider.
    pub fn release_buffers(&self) {
        self.inner.model.release();
    }

    /// Which precision the forward pass runs in, what was asked for, and why.
    pub fn precision(&self) -> &PrecisionChoice {
        &self.precision
    }

    /// Embeds `texts` synchronously on the caller's thread, returning one L2-normalised
    /// vector per text, in input order. Inputs longer than the model's maximum are truncated.
    /// Blocks for the whole forward pass: do not call from async code (use
    /// [`Embedder::embed`]).
    ///
    /// # Errors
    ///
    /// [`EmbedError::Tokenize`] if the tokenizer rejects an input, [`EmbedError::Inference`]
    /// if the forward pass fails.
    pub fn embed_blocking(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        self.inner.embed(texts)
    }

    /// Number of forward passes this model has run so far, across all clones (each pass
    /// packs up to `batch_size × max_seq_length` tokens, possibly from several requests).
    pub fn forward_passes(&self) -> u64 {
        self.inner.forward_passes.load(Ordering::Relaxed)
    }

    /// The model's tokenizer with truncation and padding turned off, so that it counts every
    /// token of its input (the chunker uses it to size chunks in model tokens).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.plain_tokenizer
    }
}

impl fmt::Debug for CandleEmbedder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CandleEmbedder")
            .field("fingerprint", &self.inner.fingerprint)
            .field("max_seq_length", &self.inner.max_seq_length)
            .field("batch_size", &self.inner.batch_size)
            .field("precision", &self.precision.running)
            .finish_non_exhaustive()
    }
}

impl Embedder for CandleEmbedder {
    fn fingerprint(&self) -> &Fingerprint {
        &self.inner.fingerprint
    }

    fn max_input_tokens(&self) -> usize {
        self.inner.max_seq_length
    }

    fn embed(
        &self,
        texts: Vec<String>,
    ) -> impl Future<Output = Result<Vec<Vec<f32>>, EmbedError>> + Send {
        let requests = self.requests.clone();
        let lane = crate::lane::current();
        async move {
            if texts.is_empty() {
                return Ok(Vec::new());
            }
            let (reply, response) = oneshot::channel();
            requests
                .send(Request { texts, reply, lane })
                .map_err(|_| EmbedError::WorkerGone)?;
            response.await.map_err(|_| EmbedError::WorkerGone)?
        }
    }
}

/// Texts tokenised per tokenizer call: enough to use every core, few enough that their
/// transient `Encoding`s stay a few MiB.
const TOKENIZE_BATCH: usize = 256;

/// The vectors of one request's texts, in order, or why they could not be computed.
type Embedded = Result<Vec<Vec<f32>>, EmbedError>;

/// How the embedding thread answers one request.
type Reply = oneshot::Sender<Embedded>;

/// The embedding thread: serves requests until every [`CandleEmbedder`] clone is dropped.
///
/// Requests are tokenised as they arrive and queued ([`Queue`]); each forward pass takes up
/// to `batch_size × max_seq_length` tokens from the front of the queue, whichever requests
/// they belong to, and each caller is answered with exactly its own vectors as soon as its
/// last text is embedded. The thread blocks only when nothing is queued.
fn serve(inner: &Inner, requests: &mpsc::Receiver<Request>) {
    let mut queue = Queue::new(inner.pass_budget());
    loop {
        if queue.is_empty() {
            let Ok(first) = requests.recv() else {
                return;
            };
            inner.admit(&mut queue, vec![first]);
        }
        inner.admit(&mut queue, requests.try_iter().collect());
        // A caller that stopped waiting gets no CPU spent on an answer nobody reads.
        queue.retain(|request| !request.reply.is_closed());
        for (failed, error) in inner.run_pass(&mut queue) {
            // A send error only means the caller went away meanwhile.
            let _ = failed.reply.send(Err(error));
        }
        for done in queue.take_complete() {
            let _ = done.reply.send(Ok(done.vectors));
        }
    }
}

impl Inner {
    fn load(dir: &Path, batch_size: usize, precision: Precision) -> Result<Self, EmbedError> {
        let missing = match precision {
            Precision::Bf16 => bf16::missing_features(),
            Precision::Int8 => int8::missing_features(),
            Precision::Int16 => int8::avx2_missing(),
            Precision::F32 | Precision::Auto => None,
        };
        if let Some(missing) = missing {
            return Err(load_error(
                dir,
                format!(
                    "precision {} needs CPU features this CPU lacks: {missing}",
                    precision.as_str()
                ),
            ));
        }
        if !dir.is_dir() {
            return Err(EmbedError::ModelMissing {
                path: dir.to_path_buf(),
            });
        }
        let config_path = required_file(dir, CONFIG_FILE)?;
        let tokenizer_path = required_file(dir, TOKENIZER_FILE)?;
        let weights_path = required_file(dir, WEIGHTS_FILE)?;

        let config: Config = read_json(&config_path)?;
        let max_seq_length = read_max_seq_length(dir, &config)?;
        check_pooling(dir, config.hidden_size)?;

        let mut plain_tokenizer =
            Tokenizer::from_file(&tokenizer_path).map_err(|e| load_error(&tokenizer_path, e))?;
        // tokenizer.json may carry its own truncation/padding (all-MiniLM-L6-v2: 128, fixed).
        plain_tokenizer
            .with_truncation(None)
            .map_err(|e| load_error(&tokenizer_path, e))?;
        plain_tokenizer.with_padding(None);
        let vocab = plain_tokenizer.get_vocab_size(true);
        if vocab > config.vocab_size {
            return Err(load_error(
                &tokenizer_path,
                format!(
                    "tokenizer has {vocab} tokens but the model only {}",
                    config.vocab_size
                ),
            ));
        }
        let special = plain_tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if max_seq_length <= special {
            return Err(load_error(
                &dir.join(SENTENCE_BERT_FILE),
                format!(
                    "max_seq_length {max_seq_length} leaves no room besides {special} special tokens"
                ),
            ));
        }
        let mut inference_tokenizer = plain_tokenizer.clone();
        inference_tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_seq_length,
                ..TruncationParams::default()
            }))
            .map_err(|e| load_error(&tokenizer_path, e))?;

        let model = Bert::load(&weights_path, &config, precision)
            .map_err(|e| load_error(&weights_path, e))?;
        let fingerprint = Fingerprint {
            model: model_id(dir),
            dims: config.hidden_size,
            pooling: "mean".to_owned(),
            normalized: true,
            sparse: None,
        };
        let mut inner = Self {
            model,
            inference_tokenizer,
            plain_tokenizer,
            fingerprint,
            max_seq_length,
            batch_size,
            forward_passes: AtomicU64::new(0),
        };
        let plan = match precision {
            Precision::Int8 => Some(int8_plan()),
            Precision::Int16 => Some(int16_plan()),
            Precision::F32 | Precision::Bf16 | Precision::Auto => None,
        };
        if let Some(plan) = plan {
            inner
                .quantize(&plan)
                .map_err(|e| load_error(&weights_path, e))?;
        }
        Ok(inner)
    }

    /// Calibrates the (f32) model on [`CALIBRATION_TEXT`] and quantises it as `plan` says.
    fn quantize(&mut self, plan: &Int8Plan) -> Result<(), String> {
        let mut texts: Vec<&str> = CALIBRATION_TEXT
            .split("\n\n")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        texts.push(CALIBRATION_TEXT);
        let tokenized = self.tokenize(&texts).map_err(|e| e.to_string())?;
        let sequences: Vec<Sequence<'_>> = tokenized
            .iter()
            .map(|t| Sequence {
                ids: &t.ids,
                type_ids: &t.type_ids,
            })
            .collect();
        let calibration = self.model.calibrate(&sequences)?;
        self.model.quantize(&calibration, plan)
    }

    /// Most tokens one forward pass takes.
    fn pass_budget(&self) -> usize {
        self.batch_size.saturating_mul(self.max_seq_length)
    }

    /// Embeds `texts` on this thread in forward passes of at most [`Inner::pass_budget`]
    /// tokens and returns the vectors in input order.
    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut queue = Queue::new(self.pass_budget());
        queue.push(Pending::new(self.tokenize(texts)?, ()));
        loop {
            if let Some(done) = queue.take_complete().pop() {
                return Ok(done.vectors);
            }
            if let Some((_, error)) = self.run_pass(&mut queue).pop() {
                return Err(error);
            }
        }
    }

    /// Tokenises the texts of the `arrived` requests together (see [`Inner::tokenize`]) and
    /// queues each request; a request the tokenizer rejects is answered with the error at
    /// once.
    fn admit(&self, queue: &mut Queue<Reply>, arrived: Vec<Request>) {
        if arrived.is_empty() {
            return;
        }
        let all: Vec<&str> = arrived
            .iter()
            .flat_map(|request| request.texts.iter().map(String::as_str))
            .collect();
        if let Ok(tokenized) = self.tokenize(&all) {
            let mut tokenized = tokenized.into_iter();
            for Request { texts, reply, lane } in arrived {
                queue.push(
                    Pending::new(tokenized.by_ref().take(texts.len()).collect(), reply)
                        .in_lane(lane),
                );
            }
            return;
        }
        // Some text was rejected: find out whose, so that only its own request fails.
        for Request { texts, reply, lane } in arrived {
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            match self.tokenize(&texts) {
                Ok(tokenized) => queue.push(Pending::new(tokenized, reply).in_lane(lane)),
                Err(error) => {
                    let _ = reply.send(Err(error));
                }
            }
        }
    }

    /// The token ids of each text as the model reads them: special tokens added, truncated
    /// to `max_seq_length`. Texts are tokenised [`TOKENIZE_BATCH`] at a time, so the
    /// tokenizer's full `Encoding`s (tens of bytes per token) exist for one slice at once,
    /// however many texts are queued. A panic inside the tokenizer is reported as an error.
    fn tokenize(&self, texts: &[&str]) -> Result<Vec<TokenIds>, EmbedError> {
        let mut tokenized = Vec::with_capacity(texts.len());
        for slice in texts.chunks(TOKENIZE_BATCH) {
            let encodings = panic::catch_unwind(AssertUnwindSafe(|| {
                self.inference_tokenizer.encode_batch(slice.to_vec(), true)
            }))
            .map_err(|_| EmbedError::Tokenize("the tokenizer panicked".to_owned()))?
            .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
            tokenized.extend(encodings.iter().map(|encoding| TokenIds {
                ids: encoding.get_ids().to_vec(),
                type_ids: encoding.get_type_ids().to_vec(),
            }));
        }
        Ok(tokenized)
    }

    /// Runs the next forward pass of `queue` and gives each text in it its vector. If the
    /// pass fails and it held texts of several requests, each request's share runs alone;
    /// the requests whose share still fails leave the queue and are returned with the
    /// error, so a bad input fails only its own request.
    fn run_pass<R>(&self, queue: &mut Queue<R>) -> Vec<(Pending<R>, EmbedError)> {
        let pass = queue.next_pass();
        let mut shares: Vec<(usize, Embedded)> = Vec::new();
        match self.forward(&sequences(queue, &pass)) {
            Ok(vectors) => {
                let mut vectors = vectors.into_iter();
                for (index, range) in &pass {
                    shares.push((*index, Ok(vectors.by_ref().take(range.len()).collect())));
                }
            }
            Err(error) if pass.len() == 1 => shares.push((pass[0].0, Err(error))),
            Err(_) => {
                for share in &pass {
                    let alone = std::slice::from_ref(share);
                    shares.push((share.0, self.forward(&sequences(queue, alone))));
                }
            }
        }
        let mut failed = Vec::new();
        // From the back, so that removing a request leaves the earlier indexes valid.
        for (index, result) in shares.into_iter().rev() {
            match result {
                Ok(vectors) => {
                    if let Some(request) = queue.get_mut(index) {
                        request.vectors.extend(vectors);
                    }
                }
                Err(error) => failed.extend(queue.remove(index).map(|request| (request, error))),
            }
        }
        failed.reverse();
        failed
    }

    /// One forward pass over `sequences`, one vector each; a panic inside the model is
    /// reported as [`EmbedError::Inference`].
    fn forward(&self, sequences: &[Sequence<'_>]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if sequences.is_empty() {
            return Ok(Vec::new());
        }
        self.forward_passes.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let embedded = panic::catch_unwind(AssertUnwindSafe(|| self.model.embed(sequences)))
            .unwrap_or_else(|_| Err("inference panicked".to_owned()))
            .map_err(EmbedError::Inference)?;
        crate::telemetry::emit(crate::telemetry::events::ForwardPassRun {
            texts: sequences.len(),
            tokens: sequences.iter().map(|s| s.ids.len()).sum(),
            elapsed: started.elapsed(),
        });
        if embedded.len() != sequences.len() {
            return Err(EmbedError::Inference(format!(
                "model returned {} vectors for {} inputs",
                embedded.len(),
                sequences.len()
            )));
        }
        Ok(embedded)
    }
}

/// What `precision = "int8"` does: every linear layer in int8, smoothed with SmoothQuant's
/// α = 0.5, input channels over 3 × the median channel's calibration maximum (at most 16 per
/// layer) in f32. Chosen by measurement on the `engines` bench texts (min cosine to f32):
/// without outlier channels 0.99901, α 0.3 / 0.7 worse than 0.5, ratio 6 → 0.99927, 3 →
/// 0.99945; keeping any one site in bf16 costs more speed than it buys fidelity
/// (docs/performance.md).
fn int8_plan() -> Int8Plan {
    Int8Plan {
        sites: Site::ALL.to_vec(),
        alpha: [0.5; 4],
        outlier_ratio: 3.0,
        max_outliers: 16,
        kernel: amx::Kernel::best(),
        attention: true,
        weight_levels: int8::INT8_LEVELS,
        short_fallback: true,
    }
}

/// What `precision = "int16"` does: every linear layer on the int16 kernel
/// ([`bert::int16_kernel`]: AVX-512 VNNI's `vpdpwssd`, else AVX2) with 12-bit
/// weights ([`int8::INT16_LEVELS`]), no smoothing (it would move range into the weights,
/// the coarser side here), input channels over 3 × the median channel's calibration
/// maximum (at most 16 per layer) in f32, no separate weights for short sequences, and
/// attention in f32 (int16 attention measured no faster for this pass, within noise, and
/// cost fidelity: min cosine 0.999981 against 0.999987, docs/performance.md). Chosen by
/// measurement on the `engines` bench texts (min cosine to f32, machine Z): ±2047 weights
/// 0.999985 (0.999968 without the f32 channels), ±511 0.999969, int8's ±127 0.999553
/// (docs/performance.md).
fn int16_plan() -> Int8Plan {
    Int8Plan {
        sites: Site::ALL.to_vec(),
        alpha: [0.0; 4],
        outlier_ratio: 3.0,
        max_outliers: 16,
        kernel: bert::int16_kernel(),
        attention: false,
        weight_levels: int8::INT16_LEVELS,
        short_fallback: false,
    }
}

/// The model's view of the texts `pass` takes from `queue`, in order.
fn sequences<'q, R>(queue: &'q Queue<R>, pass: &[(usize, Range<usize>)]) -> Vec<Sequence<'q>> {
    pass.iter()
        .filter_map(|(index, range)| queue.get(*index).and_then(|r| r.texts.get(range.clone())))
        .flatten()
        .map(|text| Sequence {
            ids: &text.ids,
            type_ids: &text.type_ids,
        })
        .collect()
}

/// `dir/name` if it is a file, else [`EmbedError::ModelMissing`] naming it.
fn required_file(dir: &Path, name: &str) -> Result<PathBuf, EmbedError> {
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(EmbedError::ModelMissing { path })
    }
}

fn load_error(path: &Path, reason: impl fmt::Display) -> EmbedError {
    EmbedError::ModelLoad {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, EmbedError> {
    let bytes = std::fs::read(path).map_err(|e| load_error(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| load_error(path, e))
}

/// `max_seq_length` from `sentence_bert_config.json`, capped at the position embeddings.
fn read_max_seq_length(dir: &Path, config: &Config) -> Result<usize, EmbedError> {
    let path = dir.join(SENTENCE_BERT_FILE);
    let configured = if path.exists() {
        read_json::<SentenceBertConfig>(&path)?.max_seq_length
    } else {
        None
    };
    Ok(configured.map_or(config.max_position_embeddings, |n| {
        n.min(config.max_position_embeddings)
    }))
}

/// Accepts only mean pooling (the default when `1_Pooling/config.json` is absent).
fn check_pooling(dir: &Path, hidden_size: usize) -> Result<(), EmbedError> {
    let path = dir.join(POOLING_FILE);
    if !path.exists() {
        return Ok(());
    }
    let pooling: serde_json::Map<String, serde_json::Value> = read_json(&path)?;
    if let Some(dims) = pooling.get("word_embedding_dimension")
        && dims.as_u64() != Some(hidden_size as u64)
    {
        return Err(load_error(
            &path,
            format!("word_embedding_dimension {dims} differs from hidden_size {hidden_size}"),
        ));
    }
    let enabled: Vec<&str> = pooling
        .iter()
        .filter(|(key, value)| key.starts_with("pooling_mode_") && value.as_bool() == Some(true))
        .map(|(key, _)| key.as_str())
        .collect();
    if enabled != ["pooling_mode_mean_tokens"] {
        return Err(load_error(
            &path,
            format!("only mean pooling is supported, the model enables {enabled:?}"),
        ));
    }
    Ok(())
}

/// `sentence-transformers/<directory name>`, the usual Hugging Face id of such a model.
fn model_id(dir: &Path) -> String {
    let resolved = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let name = resolved
        .file_name()
        .map_or_else(|| "unknown".into(), |n| n.to_string_lossy());
    format!("sentence-transformers/{name}")
}
