//! The reference embedding path: candle-transformers' `BertModel` on batches padded to their
//! longest member (inputs sorted by length, `batch_size` texts per batch), mean pooling over
//! the attention mask, L2 normalisation. This is what `CandleEmbedder` ran before its own
//! forward pass; tests and benches compare against it.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Encoding, Tokenizer, TruncationParams};

/// candle-transformers' `BertModel` with its tokenizer.
pub struct Reference {
    model: BertModel,
    tokenizer: Tokenizer,
    batch_size: usize,
}

impl Reference {
    /// Loads the model in `dir`; `tokenizer` must not pad (e.g. `CandleEmbedder::tokenizer`),
    /// it is set to truncate at `max_tokens`.
    pub fn load(dir: &Path, tokenizer: &Tokenizer, max_tokens: usize, batch_size: usize) -> Self {
        let config: Config = serde_json::from_slice(
            &std::fs::read(dir.join("config.json")).expect("read config.json"),
        )
        .expect("parse config.json");
        // SAFETY: nobody modifies the model file while the test or bench runs.
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )
        }
        .expect("mmap weights");
        let model = BertModel::load(vb, &config).expect("load BertModel");
        let mut tokenizer = tokenizer.clone();
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                ..TruncationParams::default()
            }))
            .expect("truncation");
        Self {
            model,
            tokenizer,
            batch_size: batch_size.max(1),
        }
    }

    /// The batches the reference forms: encodings sorted by length, `batch_size` at a time.
    fn batches(&self, texts: &[&str]) -> (Vec<Encoding>, Vec<Vec<usize>>) {
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .expect("tokenize");
        let mut order: Vec<usize> = (0..encodings.len()).collect();
        order.sort_by_key(|&i| encodings[i].len());
        let batches = order
            .chunks(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        (encodings, batches)
    }

    /// Tokens the reference computes (batches padded to their longest member) divided by
    /// the real tokens of `texts`.
    pub fn padding_ratio(&self, texts: &[&str]) -> f64 {
        let (encodings, batches) = self.batches(texts);
        let real: usize = encodings.iter().map(Encoding::len).sum();
        let padded: usize = batches
            .iter()
            .map(|b| b.len() * b.iter().map(|&i| encodings[i].len()).max().unwrap_or(0))
            .sum();
        padded as f64 / real.max(1) as f64
    }

    /// One L2-normalised vector per text, in input order.
    pub fn embed(&self, texts: &[&str]) -> Vec<Vec<f32>> {
        let (encodings, batches) = self.batches(texts);
        let mut vectors = vec![Vec::new(); texts.len()];
        for indices in batches {
            let batch: Vec<&Encoding> = indices.iter().map(|&i| &encodings[i]).collect();
            let embedded = self.forward(&batch).expect("reference forward");
            for (&i, v) in indices.iter().zip(embedded) {
                vectors[i] = v;
            }
        }
        vectors
    }

    fn forward(&self, batch: &[&Encoding]) -> candle_core::Result<Vec<Vec<f32>>> {
        let rows = batch.len();
        let width = batch.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut ids = vec![0u32; rows * width];
        let mut type_ids = vec![0u32; rows * width];
        let mut mask = vec![0u32; rows * width];
        for (row, encoding) in batch.iter().enumerate() {
            let start = row * width;
            let len = encoding.len();
            ids[start..start + len].copy_from_slice(encoding.get_ids());
            type_ids[start..start + len].copy_from_slice(encoding.get_type_ids());
            mask[start..start + len].copy_from_slice(encoding.get_attention_mask());
        }
        let device = &self.model.device;
        let ids = Tensor::from_vec(ids, (rows, width), device)?;
        let type_ids = Tensor::from_vec(type_ids, (rows, width), device)?;
        let mask = Tensor::from_vec(mask, (rows, width), device)?;
        let hidden = self.model.forward(&ids, &type_ids, Some(&mask))?;
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
        let counts = mask.sum(1)?.clamp(1e-9, f64::MAX)?;
        let mean = summed.broadcast_div(&counts)?;
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
        mean.broadcast_div(&norms)?.to_vec2::<f32>()
    }
}
