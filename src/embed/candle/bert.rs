//! A BERT encoder forward pass for CPU inference, written for speed on few cores.
//!
//! It computes the same function as candle-transformers' `BertModel` (post-layer-norm BERT,
//! exact erf GELU, absolute position embeddings) followed by mean pooling and L2
//! normalisation, with these differences in how:
//!
//! - no padding: the tokens of all sequences of a batch are packed into one matrix, so the
//!   linear layers only see real tokens, and attention runs per sequence over exactly its own
//!   tokens (what a padding mask of `f32::MIN` computes, without the masked work);
//! - the weights stay in candle's memory layout and are multiplied with gemm (candle's own
//!   matrix multiplication backend) called directly, with strides instead of copies: Q, K and
//!   V come from one fused matrix multiplication and attention reads them in place;
//! - `1/sqrt(head_dim)` is folded into the query weights and bias at load time;
//! - bias adds and residual connections are folded into the matrix multiplications (the
//!   destination starts as `bias + residual` and the product is accumulated into it);
//! - softmax, GELU and layer norm are vectorised loops (compiled for AVX2 + FMA when the CPU
//!   has them), with polynomial `exp` and `erf` accurate to about 1e-7;
//! - the two levels of parallelism are explicit: matrix multiplications of the linear layers
//!   use every thread, attention runs one (sequence, head) per task on rayon's pool;
//! - with [`Precision::Bf16`] the linear layers multiply bf16 weights (converted once at
//!   load) by bf16 activations with f32 accumulation ([`Bf16Weight`]); attention's two
//!   products run in bf16 or int16 where either is faster than f32 ([`reduced_attention`],
//!   also for int8); everything else (embeddings, softmax sums, GELU, layer norm,
//!   pooling) stays f32;
//! - with [`Precision::Int8`] the model loads in f32, runs the built-in calibration text
//!   once while recording each linear layer's largest input per channel ([`Bert::calibrate`]),
//!   then [`Bert::quantize`] turns the layers an [`Int8Plan`] names into int8 weights
//!   ([`Int8Weight`], smoothed with the calibration) and the others into bf16 (or f32 where
//!   the CPU has no AVX-512 BF16).

use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use gemm::Parallelism;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use super::Precision;
use super::attention::{self, ReducedAttention};
use super::bf16::{self, Bf16Weight};
use super::int8::{Int8Weight, Kernel, smoothing};
use super::probe::DotSpeed;
use super::tile::{self, RowsFn, Start, grown};

/// Rows per parallel task for the row-wise kernels (layer norm, GELU, bias copies).
const ROWS_PER_TASK: usize = 32;

/// The part of a Hugging Face BERT `config.json` the forward pass reads.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// Only `gelu` (exact, erf-based, as Hugging Face transformers computes it).
    pub hidden_act: String,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    /// Only `absolute` (the default).
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

/// One token sequence of a batch, as the tokenizer produced it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sequence<'a> {
    /// Token ids.
    pub ids: &'a [u32],
    /// Token type (segment) ids, as many as `ids`.
    pub type_ids: &'a [u32],
}

/// A BERT encoder with mean pooling, its weights in memory as `f32`.
pub(crate) struct Bert {
    hidden: usize,
    heads: usize,
    head_dim: usize,
    intermediate: usize,
    max_positions: usize,
    eps: f32,
    /// `vocab_size × hidden`.
    word_embeddings: Vec<f32>,
    /// `max_positions × hidden`.
    position_embeddings: Vec<f32>,
    /// `type_vocab_size × hidden`.
    token_type_embeddings: Vec<f32>,
    embeddings_norm: Norm,
    layers: Vec<Layer>,
    /// Attention's products in bf16 or int16 ([`reduced_attention`]: bf16 passes, and int8
    /// ones, whose plan asks for it, where it pays); else f32.
    reduced_attention: Option<ReducedAttention>,
    /// Activation buffers kept from the last call.
    buffers: Mutex<Option<Buffers>>,
}

/// Activations of one forward pass.
#[derive(Default)]
struct Buffers {
    /// Hidden states, `tokens × hidden`.
    x: Vec<f32>,
    /// Q, K and V, `tokens × 3·hidden`.
    qkv: Vec<f32>,
    /// Attention context, `tokens × hidden`.
    context: Vec<f32>,
    /// Hidden states after attention, `tokens × hidden`.
    attended: Vec<f32>,
    /// Feed-forward activations, `tokens × intermediate`.
    inter: Vec<f32>,
    /// Activations converted to bf16 pairs for a [`Bf16Weight`] (unused in f32).
    bf16: Vec<u32>,
}

/// [`grown`] to `len` elements (the new ones zeroed, so that their pages are touched now),
/// asking for the memory first: `false` if it cannot be allocated.
fn reserved<T: Copy + Default>(buffer: &mut Vec<T>, len: usize) -> bool {
    let more = len.saturating_sub(buffer.len());
    if buffer.try_reserve_exact(more).is_err() {
        return false;
    }
    grown(buffer, len);
    true
}

/// A linear layer `y = x Wᵀ + b`.
struct Linear {
    weight: Weight,
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
}

/// The weight matrix of a linear layer in the precision of the forward pass.
enum Weight {
    /// `out × in`, row-major (the safetensors layout).
    F32(Vec<f32>),
    /// Converted to bf16 and packed for the kernel.
    Bf16(Bf16Weight),
    /// Quantised to int8 per output channel and packed for the kernel, with the weight in
    /// the precision that sequences shorter than [`INT8_MIN_TOKENS`] use (bf16, or f32), if
    /// the plan keeps one ([`Int8Plan::short_fallback`]).
    Int8(Int8Weight, Option<Box<Weight>>),
}

/// Sequences shorter than this many tokens (special tokens included) skip the int8 layers
/// and use their bf16 (or f32) weights. int8 costs each token about cosine 0.998 on its own;
/// mean pooling averages that away over a long text but not over two or three tokens (the
/// empty text and "ok" fell to 0.9983 with int8 throughout). The short rows are few in an
/// ingestion batch, so this costs next to nothing there.
const INT8_MIN_TOKENS: usize = 16;

/// Attention's products in 16 bits ([`ReducedAttention`]) for heads of `head_dim`, where
/// that is faster than f32:
///
/// - in bf16 on CPUs whose `vdpbf16ps` is fast ([`DotSpeed::pays`]) and whose linear layers
///   do not run on AMX (`kernel`; AMX cores are the ones with a slow `vdpbf16ps`,
///   docs/performance.md), unless `RAG_INGEST_BF16_ATTENTION=0`;
/// - else in int16 where [`int16_fast_kernel`] is AVX-512 (VNNI's `vpdpwssd`, as fast as an
///   f32 FMA with twice its multiply-adds), unless `RAG_INGEST_INT16_ATTENTION=0`.
///
/// `None` (f32 attention) elsewhere, for head sizes the kernels do not support, or with
/// both switches at `0` (to compare).
fn reduced_attention(head_dim: usize, kernel: Kernel) -> Option<ReducedAttention> {
    let off = |name: &str| std::env::var_os(name).is_some_and(|v| v == "0");
    if kernel != Kernel::Amx && DotSpeed::fast() {
        if off("RAG_INGEST_BF16_ATTENTION") {
            return None;
        }
        return ReducedAttention::bf16(head_dim).ok().flatten();
    }
    if off("RAG_INGEST_INT16_ATTENTION") || int16_fast_kernel() != Ok(Kernel::Avx512) {
        return None;
    }
    ReducedAttention::int16(head_dim).ok().flatten()
}

/// Whether bf16 linear layers are faster than f32 ones here: on AMX tiles (`kernel`), or on
/// AVX-512 where `vdpbf16ps` is fast ([`DotSpeed::pays`]).
pub(crate) fn bf16_products_pay(kernel: Kernel) -> bool {
    bf16::missing_features().is_none() && (kernel == Kernel::Amx || DotSpeed::fast())
}

/// The kernel on which int16 products are faster than f32 ones here, or why there is none:
///
/// - AVX-512 where the CPU has AVX-512 VNNI (`vpdpwssd`: 32 multiply-adds per instruction
///   against an f32 FMA's 16, issued as often as an FMA on every such CPU measured: Intel
///   Cascade Lake, Ice Lake and Emerald Rapids, docs/performance.md), unless
///   `RAG_INGEST_INT16_AVX512=0` turns that kernel off;
/// - AVX2 on a CPU with AVX2 and FMA but no AVX-512F (with AVX-512F and no VNNI, f32 runs
///   on 16-lane FMAs, as many multiply-adds per instruction as `vpmaddwd` on AVX2 does).
///
/// Decided from CPUID, not timed like bf16's `vdpbf16ps` ([`DotSpeed`]): no CPU with a slow
/// `vpdpwssd` is known, and the same timing, tried for it, read 0.6–1.5× an FMA from one
/// process to the next on a 2-vCPU guest whose other vCPU shares the core.
pub(crate) fn int16_fast_kernel() -> Result<Kernel, &'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512_off = std::env::var_os("RAG_INGEST_INT16_AVX512").is_some_and(|v| v == "0");
        if super::int8::vnni_missing().is_none() {
            if avx512_off {
                Err(
                    "RAG_INGEST_INT16_AVX512=0 turns the AVX-512 int16 kernel off, and AVX2's is \
                     slower than f32 on AVX-512",
                )
            } else {
                Ok(Kernel::Avx512)
            }
        } else if std::arch::is_x86_feature_detected!("avx512f") {
            Err("no AVX-512 VNNI for int16, and AVX2's int16 kernel is slower than f32 on AVX-512")
        } else if super::int8::avx2_missing().is_none() {
            Ok(Kernel::Avx2)
        } else {
            Err("no AVX2 and FMA for int16")
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Err("int16 needs x86_64")
    }
}

/// The kernel of `precision = "int16"` here: [`int16_fast_kernel`]'s, else AVX2 (which
/// fails to load, naming the missing features, where the CPU lacks AVX2 and FMA). Both
/// kernels give bit-identical products.
pub(crate) fn int16_kernel() -> Kernel {
    int16_fast_kernel().unwrap_or(Kernel::Avx2)
}

/// The four linear layers of an encoder layer, as the calibration and the int8 plan name
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Site {
    /// Q, K and V (input: the hidden states).
    Qkv,
    /// The attention output projection (input: the attention context).
    AttentionOutput,
    /// The feed-forward up projection (input: the hidden states after attention).
    Intermediate,
    /// The feed-forward down projection (input: GELU's output).
    Output,
}

impl Site {
    /// All four, in the order of a layer's forward pass.
    pub(crate) const ALL: [Site; 4] = [
        Site::Qkv,
        Site::AttentionOutput,
        Site::Intermediate,
        Site::Output,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// Which linear layers [`Bert::quantize`] turns into int8, and how hard it smooths.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Int8Plan {
    /// The sites computed in int8 (the rest in bf16 where [`bf16_products_pay`], else f32).
    pub sites: Vec<Site>,
    /// SmoothQuant migration strength in `[0, 1]` of each site (in [`Site::ALL`] order); 0
    /// turns smoothing off.
    pub alpha: [f32; 4],
    /// An input channel whose calibration maximum exceeds this many times the median
    /// channel's is computed in f32 (0: none).
    pub outlier_ratio: f32,
    /// At most this many outlier channels per layer (the largest).
    pub max_outliers: usize,
    /// The kernel of the int8 products (AMX where available, same results as VNNI; AVX2
    /// where the CPU has no AVX-512 VNNI).
    pub kernel: Kernel,
    /// Attention's two products (scores and context) in bf16 or int16 where either pays
    /// ([`reduced_attention`]).
    pub attention: bool,
    /// The weights' levels: [`INT8_LEVELS`](super::int8::INT8_LEVELS), or wider
    /// ([`INT16_LEVELS`](super::int8::INT16_LEVELS)) for the AVX2 and AVX-512 kernels with
    /// i16 activations.
    pub weight_levels: i16,
    /// Whether sequences under [`INT8_MIN_TOKENS`] use a bf16/f32 copy of each weight
    /// (int8's error is too large for them; int16's is not, and the copy costs memory).
    pub short_fallback: bool,
}

/// The input channels of `maxima` (calibration maxima) above `ratio` × their median, the
/// largest first, at most `limit`.
fn outlier_channels(maxima: &[f32], ratio: f32, limit: usize) -> Vec<usize> {
    if ratio <= 0.0 || maxima.is_empty() {
        return Vec::new();
    }
    let mut sorted = maxima.to_vec();
    sorted.sort_by(f32::total_cmp);
    let median = sorted[sorted.len() / 2];
    let mut channels: Vec<usize> = (0..maxima.len())
        .filter(|&j| maxima[j] > ratio * median)
        .collect();
    channels.sort_by(|&a, &b| maxima[b].total_cmp(&maxima[a]));
    channels.truncate(limit);
    channels
}

/// The largest absolute input seen per channel by each linear layer of each encoder layer.
pub(crate) struct Calibration {
    /// `layers × 4` (in [`Site::ALL`] order), each as long as the layer's inputs.
    maxima: Vec<[Vec<f32>; 4]>,
}

/// Layer norm parameters.
struct Norm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
}

/// One encoder layer.
struct Layer {
    /// Q, K and V stacked (`3·hidden × hidden`); Q pre-scaled by `1/sqrt(head_dim)`.
    qkv: Linear,
    attention_output: Linear,
    attention_norm: Norm,
    intermediate: Linear,
    output: Linear,
    output_norm: Norm,
}

impl Bert {
    /// Loads the weights of a BERT model from a safetensors file (tensor names as exported
    /// by Hugging Face `BertModel`, optionally prefixed with `bert.`), the linear layers'
    /// in `precision`.
    ///
    /// # Errors
    ///
    /// A message if the file cannot be read, a tensor is missing or has the wrong shape, the
    /// config asks for something this implementation does not do (activation other than
    /// exact GELU, heads not dividing the hidden size), or the CPU cannot run `precision`.
    pub(crate) fn load(path: &Path, config: &Config, precision: Precision) -> Result<Self, String> {
        if config.hidden_act != "gelu" {
            return Err(format!(
                "unsupported hidden_act {:?}: only exact (erf) \"gelu\" is implemented",
                config.hidden_act
            ));
        }
        if let Some(kind) = config
            .position_embedding_type
            .as_deref()
            .filter(|&kind| kind != "absolute")
        {
            return Err(format!(
                "unsupported position_embedding_type {kind:?}: only \"absolute\" is implemented"
            ));
        }
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        if heads == 0 || hidden == 0 || !hidden.is_multiple_of(heads) {
            return Err(format!(
                "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
            ));
        }
        let head_dim = hidden / heads;
        let intermediate = config.intermediate_size;

        let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        // SAFETY: the file is memory-mapped only while the weights are copied out (the map
        // is dropped at the end of this function); like every mmap user we rely on nobody
        // truncating model.safetensors during those moments.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| e.to_string())?;
        // Checks the header, and that every tensor's bytes match its shape and dtype.
        let tensors = SafeTensors::deserialize(&map).map_err(|e| e.to_string())?;
        // Exports of `BertModel` name tensors `embeddings.*`; exports of BERT pre-training
        // heads (`BertForMaskedLM`, ...) prefix them with `bert.`.
        let prefix = if tensors
            .tensor("bert.embeddings.word_embeddings.weight")
            .is_ok()
        {
            "bert."
        } else {
            ""
        };
        // A tensor of exactly `shape`, converted to f32 (from f16/bf16 exports too).
        let tensor = |shape: &[usize], name: &str| -> Result<Vec<f32>, String> {
            let name = format!("{prefix}{name}");
            let view = tensors.tensor(&name).map_err(|e| format!("{name}: {e}"))?;
            if view.shape() != shape {
                return Err(format!(
                    "{name}: shape {:?}, expected {shape:?}",
                    view.shape()
                ));
            }
            to_f32(view.dtype(), view.data()).map_err(|e| format!("{name}: {e}"))
        };
        let get = |(rows, columns): (usize, usize), name: &str| tensor(&[rows, columns], name);
        let get1 = |size: usize, name: &str| tensor(&[size], name);
        let norm = |prefix: &str| -> Result<Norm, String> {
            Ok(Norm {
                gamma: get1(hidden, &format!("{prefix}.LayerNorm.weight"))?,
                beta: get1(hidden, &format!("{prefix}.LayerNorm.bias"))?,
            })
        };
        let linear = |name: &str, outputs: usize, inputs: usize| -> Result<Linear, String> {
            Linear::new(
                get((outputs, inputs), &format!("{name}.weight"))?,
                get1(outputs, &format!("{name}.bias"))?,
                inputs,
                precision,
            )
        };

        let scale = 1.0 / (head_dim as f32).sqrt();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let (mut weights, mut biases) = (Vec::new(), Vec::new());
            for part in ["query", "key", "value"] {
                let name = format!("{p}.attention.self.{part}");
                weights.push(get((hidden, hidden), &format!("{name}.weight"))?);
                biases.push(get1(hidden, &format!("{name}.bias"))?);
            }
            weights[0].iter_mut().for_each(|w| *w *= scale);
            biases[0].iter_mut().for_each(|b| *b *= scale);
            let qkv = Linear::new(weights.concat(), biases.concat(), hidden, precision)?;
            layers.push(Layer {
                qkv,
                attention_output: linear(&format!("{p}.attention.output.dense"), hidden, hidden)?,
                attention_norm: norm(&format!("{p}.attention.output"))?,
                intermediate: linear(&format!("{p}.intermediate.dense"), intermediate, hidden)?,
                output: linear(&format!("{p}.output.dense"), hidden, intermediate)?,
                output_norm: norm(&format!("{p}.output"))?,
            });
        }
        Ok(Self {
            hidden,
            heads,
            head_dim,
            intermediate,
            max_positions: config.max_position_embeddings,
            eps: config.layer_norm_eps as f32,
            word_embeddings: get(
                (config.vocab_size, hidden),
                "embeddings.word_embeddings.weight",
            )?,
            position_embeddings: get(
                (config.max_position_embeddings, hidden),
                "embeddings.position_embeddings.weight",
            )?,
            token_type_embeddings: get(
                (config.type_vocab_size, hidden),
                "embeddings.token_type_embeddings.weight",
            )?,
            embeddings_norm: norm("embeddings")?,
            layers,
            reduced_attention: match precision {
                Precision::Bf16 => reduced_attention(head_dim, Kernel::best()),
                Precision::F32 | Precision::Auto | Precision::Int8 | Precision::Int16 => None,
            },
            buffers: Mutex::new(None),
        })
    }

    /// What attention's products compute in: `"bf16"`, `"int16"` or `"f32"` (for logs and
    /// `doctor`).
    pub(crate) fn attention_precision(&self) -> &'static str {
        self.reduced_attention
            .as_ref()
            .map_or("f32", ReducedAttention::name)
    }

    /// Frees the pass buffers (those [`reserve`](Bert::reserve) made or passes grew); the
    /// next pass allocates what it needs again. For a model that may never run, such as a
    /// fallback embedder.
    pub(crate) fn release(&self) {
        if let Ok(mut cached) = self.buffers.lock() {
            *cached = None;
        }
    }

    /// Allocates the activation buffers a forward pass of `tokens` tokens needs (the
    /// largest pass the caller will run) and touches their memory now, so that later passes
    /// up to that size neither allocate nor take page faults: a worker pays them while it
    /// loads instead of on its first documents, and its resident set reaches its working
    /// size at start (a memory limit too small for a full pass shows there, not under
    /// load). The products' activation scratch is sized for the widest layer input, rows
    /// rounded up as the AMX kernels read them. Sizes saturate; if the memory cannot be
    /// allocated, nothing is reserved (the passes allocate as before).
    pub(crate) fn reserve(&self, tokens: usize) {
        let Ok(mut cached) = self.buffers.lock() else {
            return;
        };
        let buffers = cached.get_or_insert_with(Buffers::default);
        let reduced = self
            .layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.attention_output, &l.intermediate, &l.output])
            .any(|linear| !matches!(linear.weight, Weight::F32(_)));
        let widest = self.hidden.max(self.intermediate);
        let h = |width: usize| tokens.saturating_mul(width);
        let ok = reserved(&mut buffers.x, h(self.hidden))
            && reserved(&mut buffers.qkv, h(self.hidden.saturating_mul(3)))
            && reserved(&mut buffers.context, h(self.hidden))
            && reserved(&mut buffers.attended, h(self.hidden))
            && reserved(&mut buffers.inter, h(self.intermediate))
            && (!reduced
                || reserved(
                    &mut buffers.bf16,
                    tokens
                        .saturating_add(tile::MC)
                        .saturating_mul(widest.div_ceil(2).saturating_add(tile::MC)),
                ));
        if !ok {
            *cached = None;
        }
    }

    /// Mean-pooled, L2-normalised embeddings of `sequences`, in order.
    ///
    /// # Errors
    ///
    /// A message if a sequence is longer than the position embeddings, its type ids do not
    /// match its ids, or a token id is outside the vocabulary.
    pub(crate) fn embed(&self, sequences: &[Sequence<'_>]) -> Result<Vec<Vec<f32>>, String> {
        self.forward(sequences, None)
    }

    /// Runs `sequences` through the model (which should be in f32) and records the largest
    /// absolute input of every linear layer per input channel.
    ///
    /// # Errors
    ///
    /// As [`Bert::embed`].
    pub(crate) fn calibrate(&self, sequences: &[Sequence<'_>]) -> Result<Calibration, String> {
        let mut maxima: Vec<[Vec<f32>; 4]> = self
            .layers
            .iter()
            .map(|layer| {
                [
                    &layer.qkv,
                    &layer.attention_output,
                    &layer.intermediate,
                    &layer.output,
                ]
                .map(|linear| vec![0f32; linear.inputs])
            })
            .collect();
        let mut observe = |layer: usize, site: Site, input: &[f32]| {
            let Some(max) = maxima.get_mut(layer).map(|m| &mut m[site.index()]) else {
                return;
            };
            let width = max.len().max(1);
            for row in input.chunks_exact(width) {
                for (m, v) in max.iter_mut().zip(row) {
                    *m = m.max(v.abs());
                }
            }
        };
        self.forward(sequences, Some(&mut observe))?;
        Ok(Calibration { maxima })
    }

    /// Converts the f32 linear layers that `plan` names to int8 (smoothed with
    /// `calibration`), and the other f32 ones to bf16 where bf16 is faster than f32
    /// ([`bf16_products_pay`]).
    ///
    /// # Errors
    ///
    /// A message naming the missing CPU features if this CPU cannot run `plan.kernel`.
    pub(crate) fn quantize(
        &mut self,
        calibration: &Calibration,
        plan: &Int8Plan,
    ) -> Result<(), String> {
        let others = if bf16_products_pay(plan.kernel) {
            Precision::Bf16
        } else {
            Precision::F32
        };
        for (layer, maxima) in self.layers.iter_mut().zip(&calibration.maxima) {
            let linears = [
                &mut layer.qkv,
                &mut layer.attention_output,
                &mut layer.intermediate,
                &mut layer.output,
            ];
            for (site, linear) in Site::ALL.into_iter().zip(linears) {
                let Weight::F32(weight) = &linear.weight else {
                    continue;
                };
                linear.weight = if plan.sites.contains(&site) {
                    let alpha = plan.alpha[site.index()];
                    let smooth = (alpha > 0.0)
                        .then(|| smoothing(&maxima[site.index()], weight, linear.outputs, alpha));
                    let outliers = outlier_channels(
                        &maxima[site.index()],
                        plan.outlier_ratio,
                        plan.max_outliers,
                    );
                    let fallback =
                        match (plan.short_fallback, others) {
                            (false, _) => None,
                            (true, Precision::Bf16) => Some(Box::new(Weight::Bf16(
                                Bf16Weight::new(weight, linear.outputs, linear.inputs)?,
                            ))),
                            (true, _) => Some(Box::new(Weight::F32(weight.clone()))),
                        };
                    Weight::Int8(
                        Int8Weight::new(
                            weight,
                            linear.outputs,
                            linear.inputs,
                            smooth.as_deref(),
                            &outliers,
                            plan.kernel,
                            plan.weight_levels,
                        )?,
                        fallback,
                    )
                } else if others == Precision::Bf16 {
                    Weight::Bf16(Bf16Weight::new(weight, linear.outputs, linear.inputs)?)
                } else {
                    continue;
                };
            }
        }
        self.reduced_attention = if plan.attention {
            reduced_attention(self.head_dim, plan.kernel)
        } else {
            None
        };
        Ok(())
    }

    /// The forward pass of [`Bert::embed`], calling `observe` with the input of every linear
    /// layer (encoder layer index, site, `tokens × inputs`) before it runs.
    #[allow(clippy::type_complexity)]
    fn forward(
        &self,
        sequences: &[Sequence<'_>],
        mut observe: Option<&mut dyn FnMut(usize, Site, &[f32])>,
    ) -> Result<Vec<Vec<f32>>, String> {
        let mut starts = Vec::with_capacity(sequences.len() + 1);
        starts.push(0);
        for s in sequences {
            if s.ids.len() > self.max_positions {
                return Err(format!(
                    "sequence of {} tokens is longer than the model's {} positions",
                    s.ids.len(),
                    self.max_positions
                ));
            }
            if s.type_ids.len() != s.ids.len() {
                return Err("token type ids and token ids differ in length".to_owned());
            }
            starts.push(starts[starts.len() - 1] + s.ids.len());
        }
        let tokens = starts[starts.len() - 1];
        let h = self.hidden;

        // Buffers of an earlier call, if any (a concurrent call allocates its own): reusing
        // them saves the page faults of fresh allocations. Every element is written before
        // it is read, so old contents do not matter.
        let mut buffers = self
            .buffers
            .lock()
            .ok()
            .and_then(|mut cached| cached.take())
            .unwrap_or_default();
        let Buffers {
            x,
            qkv,
            context,
            attended,
            inter,
            bf16,
        } = &mut buffers;
        let x = grown(x, tokens * h);
        let qkv = grown(qkv, tokens * 3 * h);
        let context = grown(context, tokens * h);
        let attended = grown(attended, tokens * h);
        let inter = grown(inter, tokens * self.intermediate);
        self.embeddings(sequences, x)?;
        // The rows of sequences too short for int8 (ignored by f32 and bf16 weights).
        let short: Vec<Range<usize>> = starts
            .windows(2)
            .filter(|w| w[1] - w[0] < INT8_MIN_TOKENS)
            .map(|w| w[0]..w[1])
            .collect();
        for (index, layer) in self.layers.iter().enumerate() {
            let mut seen = |site: Site, input: &[f32]| {
                if let Some(observe) = observe.as_mut() {
                    observe(index, site, input);
                }
            };
            // Q, K, V for every token.
            seen(Site::Qkv, x);
            layer.qkv.forward(x, qkv, None, bf16, &short, None);
            self.attention(qkv, &starts, context);
            // attended = LayerNorm(x + context Woᵀ + bo)
            seen(Site::AttentionOutput, context);
            let attention_norm =
                |rows: &mut [f32]| layer_norm_rows_serial(rows, &layer.attention_norm, self.eps);
            layer.attention_output.forward(
                context,
                attended,
                Some(x),
                bf16,
                &short,
                Some(&attention_norm),
            );
            // x = LayerNorm(attended + GELU(attended Wiᵀ + bi) Woᵀ + bo)
            seen(Site::Intermediate, attended);
            layer
                .intermediate
                .forward(attended, inter, None, bf16, &short, Some(&gelu_serial));
            seen(Site::Output, inter);
            let output_norm =
                |rows: &mut [f32]| layer_norm_rows_serial(rows, &layer.output_norm, self.eps);
            layer
                .output
                .forward(inter, x, Some(attended), bf16, &short, Some(&output_norm));
        }
        let vectors = starts
            .windows(2)
            .map(|w| mean_pool_normalised(&x[w[0] * h..w[1] * h], h))
            .collect();
        if let Ok(mut cached) = self.buffers.lock() {
            *cached = Some(buffers);
        }
        Ok(vectors)
    }

    /// Word + token type + position embeddings, layer-normalised, into `x`
    /// (`tokens × hidden`).
    fn embeddings(&self, sequences: &[Sequence<'_>], x: &mut [f32]) -> Result<(), String> {
        let h = self.hidden;
        let vocab = self.word_embeddings.len() / h;
        let types = self.token_type_embeddings.len() / h;
        let mut rows = Vec::with_capacity(x.len() / h);
        for s in sequences {
            for (position, (&id, &type_id)) in s.ids.iter().zip(s.type_ids).enumerate() {
                let (id, type_id) = (id as usize, type_id as usize);
                if id >= vocab || type_id >= types {
                    return Err(format!("token id {id} / type id {type_id} out of range"));
                }
                rows.push((id, type_id, position));
            }
        }
        x.par_chunks_mut(ROWS_PER_TASK * h)
            .zip(rows.par_chunks(ROWS_PER_TASK))
            .for_each(|(out, rows)| {
                for (out, &(id, type_id, position)) in out.chunks_exact_mut(h).zip(rows) {
                    let word = &self.word_embeddings[id * h..(id + 1) * h];
                    let kind = &self.token_type_embeddings[type_id * h..(type_id + 1) * h];
                    let pos = &self.position_embeddings[position * h..(position + 1) * h];
                    for (((o, w), k), p) in out.iter_mut().zip(word).zip(kind).zip(pos) {
                        *o = (w + k) + p;
                    }
                }
                layer_norm_rows_serial(out, &self.embeddings_norm, self.eps);
            });
        Ok(())
    }

    /// Multi-head self-attention of each sequence over its own tokens: reads Q, K and V from
    /// `qkv` (`tokens × 3·hidden`), writes the per-head contexts side by side into `context`
    /// (`tokens × hidden`).
    fn attention(&self, qkv: &[f32], starts: &[usize], context: &mut [f32]) {
        let (h, d) = (self.hidden, self.head_dim);
        let mut per_sequence = Vec::with_capacity(starts.len().saturating_sub(1));
        let mut rest = context;
        for w in starts.windows(2) {
            let (this, tail) = std::mem::take(&mut rest).split_at_mut((w[1] - w[0]) * h);
            per_sequence.push((w[0], w[1] - w[0], this));
            rest = tail;
        }
        let reduced = self.reduced_attention;
        let stride = 3 * h;
        per_sequence.into_par_iter().for_each_init(
            attention::Packed::default,
            |packed, (start, len, out)| {
                // Every head gathered in one pass over the sequence's rows in order.
                let packed = reduced.map(|reduced| {
                    reduced.pack(
                        &qkv[start * stride..(start + len) * stride],
                        self.heads,
                        len,
                        packed,
                    )
                });
                let heads: Vec<Vec<f32>> = (0..self.heads)
                    .into_par_iter()
                    .map_init(
                        || (Vec::new(), attention::Scratch::default()),
                        |(scores, scratch), head| match packed {
                            Some(packed) => {
                                let mut values = vec![0.0; len * d];
                                packed.head(head, scratch, &mut values);
                                values
                            }
                            None => attention_head(qkv, h, d, start, len, head, scores),
                        },
                    )
                    .collect();
                for (head, values) in heads.iter().enumerate() {
                    for (row, v) in out.chunks_exact_mut(h).zip(values.chunks_exact(d)) {
                        row[head * d..(head + 1) * d].copy_from_slice(v);
                    }
                }
            },
        );
    }
}

/// One head of one sequence: `softmax(Q Kᵀ) V` (`len × head_dim`, row-major), with Q already
/// scaled. `scores` is scratch space. The rows of `P V` are divided by the softmax sums
/// after the product ([`exp_rows`]): `len × head_dim` multiplications instead of
/// `len × len`.
fn attention_head(
    qkv: &[f32],
    hidden: usize,
    d: usize,
    start: usize,
    len: usize,
    head: usize,
    scores: &mut Vec<f32>,
) -> Vec<f32> {
    let stride = 3 * hidden;
    let base = start * stride + head * d;
    // The product overwrites the scores (`accumulate` is false): stale values do not matter.
    let scores = grown(scores, len * len + len);
    let (scores, inverse_sums) = scores.split_at_mut(len * len);
    // scores (len × len) = Q (len × d) · Kᵀ (d × len)
    matmul(
        Dst {
            data: scores,
            offset: 0,
            rs: len,
        },
        Src {
            data: qkv,
            offset: base,
            rs: stride,
            cs: 1,
        },
        Src {
            data: qkv,
            offset: base + hidden,
            rs: 1,
            cs: stride,
        },
        (len, len, d),
        false,
        Parallelism::None,
    );
    exp_rows(scores, len, inverse_sums);
    let mut out = vec![0.0; len * d];
    // out (len × d) = P (len × len) · V (len × d)
    matmul(
        Dst {
            data: &mut out,
            offset: 0,
            rs: d,
        },
        Src {
            data: scores,
            offset: 0,
            rs: len,
            cs: 1,
        },
        Src {
            data: qkv,
            offset: base + 2 * hidden,
            rs: stride,
            cs: 1,
        },
        (len, d, len),
        false,
        Parallelism::None,
    );
    for (row, &inverse) in out.chunks_exact_mut(d).zip(inverse_sums.iter()) {
        for v in row {
            *v *= inverse;
        }
    }
    out
}

impl Linear {
    /// A layer of `inputs` inputs with `weight` (`bias.len() × inputs`, row-major), its
    /// weight stored in `precision`.
    ///
    /// # Errors
    ///
    /// A message if the CPU cannot run `precision`.
    fn new(
        weight: Vec<f32>,
        bias: Vec<f32>,
        inputs: usize,
        precision: Precision,
    ) -> Result<Self, String> {
        let outputs = bias.len();
        let weight = match precision {
            // `Auto` is resolved to F32, Bf16 or Int16 before a model is built; were it not,
            // f32 is the precision that is always right. `Int8` and `Int16` load in f32 and
            // are quantised after calibration ([`Bert::quantize`]).
            Precision::F32 | Precision::Auto | Precision::Int8 | Precision::Int16 => {
                Weight::F32(weight)
            }
            Precision::Bf16 => Weight::Bf16(Bf16Weight::new(&weight, outputs, inputs)?),
        };
        Ok(Self {
            weight,
            bias,
            inputs,
            outputs,
        })
    }

    /// `out = x Wᵀ + b (+ residual)` for every row of `x` (`rows × inputs`); `out` is
    /// `rows × outputs`, then `activation` of every output if given. `scratch` is space for
    /// the bf16 and int8 kernels. With int8 weights, the rows in `short` (the tokens of short
    /// sequences) use the fallback weight.
    fn forward(
        &self,
        x: &[f32],
        out: &mut [f32],
        residual: Option<&[f32]>,
        scratch: &mut Vec<u32>,
        short: &[Range<usize>],
        activation: Option<RowsFn<'_>>,
    ) {
        let rows = x.len() / self.inputs;
        let start = Start {
            bias: &self.bias,
            residual,
            then: activation,
        };
        match &self.weight {
            Weight::Int8(int8, Some(fallback)) if !short.is_empty() => {
                let (k, n) = (self.inputs, self.outputs);
                let short_rows: usize = short.iter().map(ExactSizeIterator::len).sum();
                if short_rows == rows {
                    self.multiply_into(fallback, x, out, scratch, Some(start));
                    return;
                }
                int8.matmul(x, out, scratch, Some(start));
                // The short rows again, gathered, with the fallback weight; then put back.
                let mut xs = Vec::with_capacity(short_rows * k);
                let mut os = Vec::with_capacity(short_rows * n);
                for range in short {
                    xs.extend_from_slice(&x[range.start * k..range.end * k]);
                    match residual {
                        Some(residual) => {
                            let rows = &residual[range.start * n..range.end * n];
                            for row in rows.chunks_exact(n) {
                                os.extend(row.iter().zip(&self.bias).map(|(r, b)| r + b));
                            }
                        }
                        None => {
                            for _ in range.clone() {
                                os.extend_from_slice(&self.bias);
                            }
                        }
                    }
                }
                // `os` already holds bias (+ residual).
                self.multiply_into(fallback, &xs, &mut os, scratch, None);
                if let Some(activation) = activation {
                    activation(&mut os);
                }
                let mut done = 0;
                for range in short {
                    let len = range.len() * n;
                    out[range.start * n..range.end * n].copy_from_slice(&os[done..done + len]);
                    done += len;
                }
            }
            weight => self.multiply_into(weight, x, out, scratch, Some(start)),
        }
    }

    /// `out = b (+ residual)`, every row.
    fn start(&self, out: &mut [f32], residual: Option<&[f32]>) {
        let n = self.outputs;
        match residual {
            Some(residual) => out
                .par_chunks_mut(ROWS_PER_TASK * n)
                .zip(residual.par_chunks(ROWS_PER_TASK * n))
                .for_each(|(out, residual)| {
                    for (out, residual) in out.chunks_exact_mut(n).zip(residual.chunks_exact(n)) {
                        for ((o, r), b) in out.iter_mut().zip(residual).zip(&self.bias) {
                            *o = r + b;
                        }
                    }
                }),
            None => out.par_chunks_mut(ROWS_PER_TASK * n).for_each(|out| {
                for out in out.chunks_exact_mut(n) {
                    out.copy_from_slice(&self.bias);
                }
            }),
        }
    }

    /// `out += x weightᵀ`, or with `start` `out = start + x weightᵀ`; `weight` is this
    /// layer's or its int8 fallback. The bf16 and int8 kernels write the start block by
    /// block; for f32 it is a pass of its own first.
    fn multiply_into(
        &self,
        weight: &Weight,
        x: &[f32],
        out: &mut [f32],
        scratch: &mut Vec<u32>,
        start: Option<Start<'_>>,
    ) {
        let rows = x.len() / self.inputs;
        let n = self.outputs;
        match weight {
            Weight::F32(weight) => {
                if let Some(start) = start {
                    self.start(out, start.residual);
                }
                matmul(
                    Dst {
                        data: out,
                        offset: 0,
                        rs: n,
                    },
                    Src {
                        data: x,
                        offset: 0,
                        rs: self.inputs,
                        cs: 1,
                    },
                    Src {
                        data: weight,
                        offset: 0,
                        rs: 1,
                        cs: self.inputs,
                    },
                    (rows, n, self.inputs),
                    true,
                    Parallelism::Rayon(rayon::current_num_threads()),
                );
                if let Some(then) = start.and_then(|s| s.then) {
                    out.par_chunks_mut(ROWS_PER_TASK * n).for_each(then);
                }
            }
            Weight::Bf16(weight) => weight.matmul(x, out, scratch, start),
            Weight::Int8(weight, _) => weight.matmul(x, out, scratch, start),
        }
    }
}

/// Little-endian tensor bytes of `dtype` as f32 values.
///
/// # Errors
///
/// A message if `dtype` is not a float type (f32, f16, bf16).
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, String> {
    match dtype {
        Dtype::F32 => Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()),
        Dtype::F16 => Ok(bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()),
        Dtype::BF16 => Ok(bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()),
        other => Err(format!(
            "dtype {other:?}: only f32, f16 and bf16 weights are read"
        )),
    }
}

/// A row-major destination matrix inside `data`, starting at `offset`, rows `rs` apart.
struct Dst<'a> {
    data: &'a mut [f32],
    offset: usize,
    rs: usize,
}

/// A source matrix inside `data`, starting at `offset`, rows `rs` and columns `cs` apart.
struct Src<'a> {
    data: &'a [f32],
    offset: usize,
    rs: usize,
    cs: usize,
}

impl Src<'_> {
    /// Whether a `rows × cols` matrix with these strides fits in `data`.
    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || self.offset + (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `dst (m × n) = [dst +] lhs (m × k) · rhs (k × n)`.
///
/// # Panics
///
/// If a matrix does not fit in its slice (a bug in this module, never caused by input).
fn matmul(
    dst: Dst<'_>,
    lhs: Src<'_>,
    rhs: Src<'_>,
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    parallelism: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let dst_fits = dst.offset + (m - 1) * dst.rs + n <= dst.data.len();
    assert!(
        dst_fits && lhs.fits(m, k) && rhs.fits(k, n),
        "matrix out of bounds"
    );
    let as_stride = |s: usize| isize::try_from(s).unwrap_or(isize::MAX);
    // SAFETY: the assertion above keeps every element gemm touches inside its slice; `dst`
    // is borrowed mutably, so it cannot alias `lhs` or `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr().add(dst.offset),
            1,
            as_stride(dst.rs),
            accumulate,
            lhs.data.as_ptr().add(lhs.offset),
            as_stride(lhs.cs),
            as_stride(lhs.rs),
            rhs.data.as_ptr().add(rhs.offset),
            as_stride(rhs.cs),
            as_stride(rhs.rs),
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Mean of the rows of `x` (`rows × hidden`), L2-normalised; the clamps follow
/// sentence-transformers (mean over at least 1e-9 tokens) and `torch.nn.functional.normalize`.
fn mean_pool_normalised(x: &[f32], hidden: usize) -> Vec<f32> {
    let rows = x.len() / hidden;
    let mut sum = vec![0.0f32; hidden];
    for row in x.chunks_exact(hidden) {
        for (s, v) in sum.iter_mut().zip(row) {
            *s += v;
        }
    }
    let count = (rows as f32).max(1e-9);
    let mean: Vec<f32> = sum.iter().map(|s| s / count).collect();
    let norm = mean.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
    mean.iter().map(|v| v / norm).collect()
}

/// Compiles `$body` (an `#[inline(always)]` function) a second time with AVX2 and FMA enabled
/// and picks that copy at run time when the CPU supports them.
macro_rules! simd_kernel {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) = $body:ident) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports AVX-512F (and so AVX2 and FMA), checked just
                    // above.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

simd_kernel! {
    /// The unnormalised softmax of each `width`-long row of `x`, in place: `e^(v − max)`,
    /// with `1 / Σ` of row `r` in `inverse_sums[r]`. Scaling a product of the rows (as
    /// [`attention_head`] does with `P V`) by it instead of the rows themselves saves a pass
    /// over the scores.
    fn exp_rows(x: &mut [f32], width: usize, inverse_sums: &mut [f32]) = exp_rows_body
}

simd_kernel! {
    /// Layer norm of each row of `x` (as long as `norm.gamma`), in place, single-threaded.
    fn layer_norm_rows_serial(x: &mut [f32], norm: &Norm, eps: f32) = layer_norm_rows_body
}

simd_kernel! {
    /// Exact (erf) GELU of every element of `x`, in place, single-threaded.
    fn gelu_serial(x: &mut [f32]) = gelu_body
}

/// Lanes of the vectorised reductions: independent accumulators the compiler keeps in one
/// (or two) SIMD registers.
const LANES: usize = 16;

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

#[inline(always)]
fn exp_rows_body(x: &mut [f32], width: usize, inverse_sums: &mut [f32]) {
    if width == 0 {
        return;
    }
    for (row, inverse) in x.chunks_exact_mut(width).zip(inverse_sums) {
        let m = max(row);
        // One pass: the exponentials and their sum (in `sum`'s order of additions).
        let mut acc = [0.0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
                *v = exp(*v - m);
                *a += *v;
            }
        }
        let mut tail = 0.0f32;
        for v in chunks.into_remainder() {
            *v = exp(*v - m);
            tail += *v;
        }
        *inverse = 1.0 / (acc.iter().sum::<f32>() + tail);
    }
}

#[inline(always)]
fn layer_norm_rows_body(x: &mut [f32], norm: &Norm, eps: f32) {
    let h = norm.gamma.len();
    if h == 0 {
        return;
    }
    let n = h as f32;
    for row in x.chunks_exact_mut(h) {
        let mean = sum(row) / n;
        for v in row.iter_mut() {
            *v -= mean;
        }
        let mut acc = [0.0f32; LANES];
        let chunks = row.chunks_exact(LANES);
        let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        for c in chunks {
            for (a, v) in acc.iter_mut().zip(c) {
                *a += v * v;
            }
        }
        let var = (acc.iter().sum::<f32>() + tail) / n;
        let inv_std = 1.0 / (var + eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(&norm.gamma).zip(&norm.beta) {
            *v = *v * inv_std * g + b;
        }
    }
}

#[inline(always)]
fn gelu_body(x: &mut [f32]) {
    for v in x.iter_mut() {
        *v = (erf(*v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * *v;
    }
}

/// `e^x` for `x ≤ 0` (softmax inputs after subtracting the row maximum), relative error
/// about 1e-7; branch-free so that loops over it vectorise (Cephes' `expf` polynomial). The
/// Horner steps are `mul_add`s: one FMA each in the AVX2/AVX-512 copies of
/// [`simd_kernel!`] (a multiply and an add, twice the instructions, without them).
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = x.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
    let r = n.mul_add(2.121_944_4e-4, n.mul_add(-0.693_359_4, x));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    // n is an integer in [-126, 0], so n + 127 fits the exponent field; adding 2^23 puts it
    // in the low mantissa bits, from where the shift moves it into the exponent (this stays
    // vectorised, unlike a saturating `as i32` cast).
    let biased = (n + 127.0 + 8_388_608.0).to_bits() << 23;
    y * f32::from_bits(biased)
}

/// `erf(x)`, absolute error below 1e-7: the rational approximation of Eigen's and XLA's
/// `erf` for `f32` (odd degree-13 numerator over even degree-8 denominator on [-4, 4]),
/// Horner steps as `mul_add`s like [`exp`]'s.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10f32;
    p = p.mul_add(x2, 2.770_681_4e-8);
    p = p.mul_add(x2, -2.101_024e-6);
    p = p.mul_add(x2, -5.692_506_4e-5);
    p = p.mul_add(x2, -7.349_906_3e-4);
    p = p.mul_add(x2, -2.9546e-3);
    p = p.mul_add(x2, -1.609_603_3e-2);
    let p = p * x;
    let mut q = -1.456_607_2e-5f32;
    q = q.mul_add(x2, -2.133_740_6e-4);
    q = q.mul_add(x2, -1.682_827e-3);
    q = q.mul_add(x2, -7.373_329e-3);
    q = q.mul_add(x2, -1.426_474e-2);
    p / q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_buffers_serve_passes_up_to_their_size_without_allocating() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-MiniLM-L6-v2");
        let config: Config = serde_json::from_slice(
            &std::fs::read(dir.join("config.json"))
                .expect("the model's config.json (scripts/fetch-model.sh installs it)"),
        )
        .expect("config.json parses");
        let ids: Vec<Vec<u32>> = [5u32, 40, 200]
            .iter()
            .map(|&n| (0..n).map(|i| 1_000 + 7 * i).collect())
            .collect();
        let type_ids: Vec<Vec<u32>> = ids.iter().map(|s| vec![0; s.len()]).collect();
        let sequences: Vec<Sequence<'_>> = ids
            .iter()
            .zip(&type_ids)
            .map(|(ids, type_ids)| Sequence { ids, type_ids })
            .collect();
        let tokens: usize = ids.iter().map(Vec::len).sum();
        let mut precisions = vec![Precision::F32];
        if super::super::bf16::missing_features().is_none() {
            precisions.push(Precision::Bf16);
        }
        let addresses = |model: &Bert| {
            let cached = model.buffers.lock().expect("not poisoned");
            let b = cached.as_ref().expect("buffers are cached");
            [
                b.x.as_ptr().addr(),
                b.qkv.as_ptr().addr(),
                b.context.as_ptr().addr(),
                b.attended.as_ptr().addr(),
                b.inter.as_ptr().addr(),
                b.bf16.as_ptr().addr(),
            ]
        };
        for precision in precisions {
            let load =
                || Bert::load(&dir.join("model.safetensors"), &config, precision).expect("loads");
            let want = load().embed(&sequences).expect("embeds");
            let model = load();
            model.reserve(tokens);
            let reserved = addresses(&model);
            let got = model.embed(&sequences).expect("embeds");
            assert_eq!(
                addresses(&model),
                reserved,
                "{precision:?}: a pass within the reserved size allocated a buffer again"
            );
            assert_eq!(got, want, "{precision:?}: reserving changed the vectors");
            model.release();
            assert!(
                model.buffers.lock().expect("not poisoned").is_none(),
                "{precision:?}: released buffers are freed"
            );
            let again = model.embed(&sequences).expect("embeds after a release");
            assert_eq!(again, want, "{precision:?}: releasing changed the vectors");
        }
    }

    #[test]
    fn exp_is_accurate() {
        for i in 0..=20_000 {
            let x = -(i as f32) * 4e-3;
            let (got, want) = (exp(x), f64::from(x).exp());
            assert!(
                (f64::from(got) / want - 1.0).abs() < 3e-7,
                "exp({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn erf_is_accurate() {
        // Reference values of erf (from a float64 implementation).
        let cases = [
            (0.0, 0.0),
            (0.1, 0.112_462_916_018_284_9),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (1.5, 0.966_105_146_475_310_7),
            (2.0, 0.995_322_265_018_952_7),
            (3.0, 0.999_977_909_503_001_4),
            (5.0, 1.0),
        ];
        for (x, want) in cases {
            for (x, want) in [(x, want), (-x, -want)] {
                let got = f64::from(erf(x as f32));
                assert!((got - want).abs() < 2e-7, "erf({x}) = {got}, want {want}");
            }
        }
    }

    #[test]
    fn exp_rows_times_the_inverse_sum_is_the_softmax() {
        let mut x: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let want: Vec<f64> = {
            let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let e: Vec<f64> = x.iter().map(|&v| f64::from(v - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        let mut inverse = [0.0f32; 1];
        exp_rows(&mut x, 40, &mut inverse);
        for (got, want) in x.iter().zip(want) {
            assert!((f64::from(*got * inverse[0]) - want).abs() < 1e-7);
        }
    }
}
