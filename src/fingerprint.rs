//! What identifies a vector space ([`Fingerprint`]) and the arithmetic an in-process model
//! runs with ([`Precision`]).
//!
//! These types are shared by the configuration, the embedders and the stores; they live here,
//! depending on nothing else in the crate, so that none of those modules has to import another
//! just for them. `crate::embed` re-exports both.

use serde::{Deserialize, Serialize};

/// Identifies a vector space: two embedders with equal fingerprints produce comparable vectors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// Model identity, e.g. `sentence-transformers/all-MiniLM-L6-v2`.
    pub model: String,
    /// Vector dimension.
    pub dims: usize,
    /// Pooling strategy, e.g. `mean`.
    pub pooling: String,
    /// Whether vectors are L2-normalised.
    pub normalized: bool,
    /// The keyword (sparse) model stored beside the dense vectors, as
    /// [`SparseModel::id`](crate::sparse::SparseModel::id) names it; `None` for an embedder's
    /// own fingerprint and for a collection written before hybrid search (dense vectors only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sparse: Option<String>,
}

impl Fingerprint {
    /// A compact one-line form of the dense vector space, e.g.
    /// `sentence-transformers/all-MiniLM-L6-v2|384|mean|l2`, stored in every point's payload.
    /// The sparse model is not part of it (a collection has one sparse model, checked when
    /// it is opened).
    pub fn id(&self) -> String {
        format!(
            "{}|{}|{}|{}",
            self.model,
            self.dims,
            self.pooling,
            if self.normalized { "l2" } else { "raw" }
        )
    }

    /// This fingerprint with the sparse model `sparse` (its
    /// [`id`](crate::sparse::SparseModel::id)): what a collection holding dense and sparse
    /// vectors records.
    pub fn with_sparse(mut self, sparse: impl Into<String>) -> Self {
        self.sparse = Some(sparse.into());
        self
    }
}

/// The arithmetic of the linear layers (Q/K/V, attention output, feed-forward), which
/// hold about 90 % of the model's floating-point operations; embeddings, attention,
/// softmax, GELU, layer norm and pooling always run in f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The default: [`Precision::Bf16`] where the CPU has AVX-512 BF16 (and bf16 is the
    /// faster path there), else [`Precision::Int16`] on a CPU with AVX-512 VNNI (whose
    /// `vpdpwssd` issues as fast as an f32 FMA) or with AVX2 and no AVX-512, in either
    /// case only if the model passes a fidelity self-check at load time (a few built-in
    /// sentences embedded both ways, every cosine ≥ 0.9999 to f32); else [`Precision::F32`].
    /// Resolved once, when the model loads. All precisions share one vector space: the
    /// collection fingerprint does not change.
    #[default]
    Auto,
    /// f32 weights and activations: the reference vectors.
    F32,
    /// bf16 weights (converted once at load) times bf16 activations, accumulated in f32
    /// with AVX-512 BF16 (`vdpbf16ps`): faster, with vectors within cosine 0.999 of
    /// [`Precision::F32`]'s. Needs a CPU with the `avx512f` and `avx512bf16` features.
    Bf16,
    /// int8 weights (per output channel) times u8 activations (per token), accumulated in
    /// i32 with AVX-512 VNNI (`vpdpbusd`), after a load-time calibration that moves the range
    /// of outlier channels into the weights; the layers that lose too much in int8 stay in
    /// bf16. The fastest, with vectors within cosine 0.999 of [`Precision::F32`]'s; not
    /// chosen by [`Precision::Auto`]. Needs `avx512f`, `avx512bw` and `avx512vnni`, or else
    /// `avx2` and `fma` (the same int8 weights times i16 activations, `vpmaddwd`).
    Int8,
    /// 12-bit integer weights (per output channel) times 16-bit integer activations (per
    /// token, as many levels as exact i32 sums allow), with AVX-512 VNNI (`vpdpwssd`) where
    /// it is fast, else AVX2 (`vpmaddwd`), bit-identical either way: vectors within cosine
    /// 0.9999 of [`Precision::F32`]'s, as bf16's are, and ≈ 1.4× f32 on a CPU without
    /// AVX-512 or without a fast bf16. [`Precision::Auto`] runs it on such CPUs. Needs `avx2`
    /// and `fma`.
    Int16,
}

impl Precision {
    /// The configuration name (`auto`, `f32`, `bf16`, `int8`, `int16`).
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
            Precision::Int16 => "int16",
        }
    }
}
