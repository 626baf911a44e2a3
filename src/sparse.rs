//! Keyword vectors: every chunk gets a BM25 sparse vector beside its dense embedding, so a
//! search can match exact terms (an error code, a function name) that a dense model blurs.
//!
//! The vectors come from qdrant-edge's BM25 implementation (`EdgeBm25`, the same tokenizer
//! pipeline — lowercasing, English stop words, Snowball stemming — and the same murmur3 term
//! ids as a Qdrant server's `qdrant/bm25` inference), so both stores hold identical sparse
//! vectors. A document's vector carries only the term-frequency part of BM25; the inverse
//! document frequency is applied by the store at query time (the sparse vector is declared
//! with the `idf` modifier), so adding documents never requires re-encoding old ones.
//!
//! [`SparseModel`] names the model and its parameters; its [`id`](SparseModel::id) is recorded
//! in the collection fingerprint, so a collection written with other parameters is refused
//! instead of silently mixing incompatible vectors.

use std::fmt;

use qdrant_edge::bm25_embed::{EdgeBm25, EdgeBm25Config};

/// Name of the sparse vector in both stores' collections (the dense vector is the unnamed
/// default vector).
pub const SPARSE_VECTOR_NAME: &str = "bm25";

/// A sparse vector: parallel term ids and weights (ids unique).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseVector {
    /// Term ids (murmur3 hashes of the processed terms).
    pub indices: Vec<u32>,
    /// The weight of each term.
    pub values: Vec<f32>,
}

impl SparseVector {
    /// Whether the vector has no terms (a text made only of stop words or punctuation): such a
    /// chunk matches no keyword query.
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// Number of terms.
    pub fn len(&self) -> usize {
        self.indices.len()
    }
}

/// The BM25 parameters of the sparse vectors of a collection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SparseModel {
    /// Term-frequency saturation (`k1`).
    pub k: f64,
    /// Length normalisation, 0 (none) to 1 (full).
    pub b: f64,
    /// The average text length, in terms after stop-word removal, that `b` normalises to.
    pub avg_len: f64,
}

impl SparseModel {
    /// The model every collection is created with: k = 1.2, b = 0.75 (the usual BM25 values)
    /// and an average length of 128 terms — a chunk of up to 256 model tokens holds about
    /// 150 words, of which stop words are about a third.
    pub const BM25: SparseModel = SparseModel {
        k: 1.2,
        b: 0.75,
        avg_len: 128.0,
    };

    /// The form recorded in a collection's fingerprint, e.g.
    /// `qdrant/bm25|k=1.2|b=0.75|avg_len=128|english`.
    pub fn id(&self) -> String {
        format!(
            "qdrant/bm25|k={}|b={}|avg_len={}|english",
            self.k, self.b, self.avg_len
        )
    }
}

impl Default for SparseModel {
    fn default() -> Self {
        SparseModel::BM25
    }
}

/// A sparse model's parameters are out of range.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid BM25 parameters: {0}")]
pub struct SparseModelError(String);

/// Turns text into BM25 sparse vectors with one [`SparseModel`].
pub struct SparseEncoder {
    model: SparseModel,
    bm25: EdgeBm25,
}

impl fmt::Debug for SparseEncoder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SparseEncoder")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl SparseEncoder {
    /// An encoder for `model`.
    ///
    /// Fails with [`SparseModelError`] if `k` is negative, `b` is outside 0..=1 or `avg_len`
    /// is not positive (or any of them is not finite).
    pub fn new(model: SparseModel) -> Result<Self, SparseModelError> {
        let not_nan = |name: &str, value: f64| {
            qdrant_edge::external::ordered_float::NotNan::new(value)
                .map_err(|_| SparseModelError(format!("{name} is not a number")))
        };
        let config = EdgeBm25Config {
            k: not_nan("k", model.k)?,
            b: not_nan("b", model.b)?,
            avg_len: not_nan("avg_len", model.avg_len)?,
            ..EdgeBm25Config::default()
        };
        let bm25 = EdgeBm25::new(config).map_err(|e| SparseModelError(e.to_string()))?;
        Ok(SparseEncoder { model, bm25 })
    }

    /// The encoder of [`SparseModel::BM25`], the model every collection is created with.
    pub fn bm25() -> Self {
        // The built-in parameters are valid (`tests::bm25_builds` checks it).
        SparseEncoder::new(SparseModel::BM25).expect("the built-in BM25 parameters are valid")
    }

    /// The model this encoder implements.
    pub fn model(&self) -> SparseModel {
        self.model
    }

    /// The vector stored for a chunk whose embedded text is `text`: each term's BM25
    /// term-frequency weight, length-normalised.
    pub fn document(&self, text: &str) -> SparseVector {
        convert(self.bm25.embed_document(text))
    }

    /// The vector of a query: weight 1 per distinct term (the store multiplies in the
    /// inverse document frequency).
    pub fn query(&self, text: &str) -> SparseVector {
        convert(self.bm25.embed_query(text))
    }
}

fn convert(vector: qdrant_edge::SparseVector) -> SparseVector {
    SparseVector {
        indices: vector.indices,
        values: vector.values,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoder() -> SparseEncoder {
        match SparseEncoder::new(SparseModel::BM25) {
            Ok(encoder) => encoder,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn documents_and_queries_share_term_ids() {
        let encoder = encoder();
        let doc = encoder.document("The retry backoff doubles after error E4012.");
        let query = encoder.query("error e4012");
        assert_eq!(doc.indices.len(), doc.values.len());
        assert!(!query.is_empty());
        for term in &query.indices {
            assert!(
                doc.indices.contains(term),
                "query term {term} not in the document"
            );
        }
    }

    #[test]
    fn bm25_builds() {
        assert_eq!(SparseEncoder::bm25().model(), SparseModel::BM25);
    }

    #[test]
    fn stop_words_alone_give_an_empty_vector() {
        assert!(encoder().document("the and of to").is_empty());
    }

    #[test]
    fn bad_parameters_are_refused() {
        for model in [
            SparseModel {
                k: -1.0,
                ..SparseModel::BM25
            },
            SparseModel {
                b: 2.0,
                ..SparseModel::BM25
            },
            SparseModel {
                avg_len: 0.0,
                ..SparseModel::BM25
            },
            SparseModel {
                k: f64::NAN,
                ..SparseModel::BM25
            },
        ] {
            assert!(SparseEncoder::new(model).is_err(), "{model:?} accepted");
        }
    }

    #[test]
    fn the_id_names_every_parameter() {
        assert_eq!(
            SparseModel::BM25.id(),
            "qdrant/bm25|k=1.2|b=0.75|avg_len=128|english"
        );
    }
}
