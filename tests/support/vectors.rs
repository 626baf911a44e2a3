//! Synthetic embeddings for the store tests and benches that do not run the model.

use rag_ingest::embed::Fingerprint;

/// Vector dimension of all-MiniLM-L6-v2.
pub const DIMS: usize = 384;

/// The fingerprint of the synthetic vectors ([`DIMS`] values, normalised).
#[allow(dead_code)] // tests/store_contract.rs uses the real model's
pub fn fingerprint() -> Fingerprint {
    Fingerprint {
        model: "test/synthetic".to_owned(),
        dims: DIMS,
        pooling: "mean".to_owned(),
        normalized: true,
        sparse: None,
    }
}

/// A deterministic pseudo-random unit vector of [`DIMS`] values (splitmix64 from `seed`).
pub fn unit_vector(seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut v: Vec<f32> = (0..DIMS)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            // Uniform in [-1, 1).
            (z >> 11) as f32 / (1u64 << 52) as f32 - 1.0
        })
        .collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}
