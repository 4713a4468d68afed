//! Embedding lookup, vocab-parallel: a rank holds rows `vocab_start..vocab_start + rows` of the
//! table and writes zeros for tokens outside them (the all-reduce that follows fills those in).

use crate::error::shape_err;
use crate::{DType, Tensor, TensorError};

pub fn embedding(
    table: &Tensor,
    tokens: &[u32],
    vocab_start: usize,
    out_dtype: DType,
) -> Result<Tensor, TensorError> {
    if table.shape().len() != 2 {
        return Err(shape_err("embedding", format!("table {:?}", table.shape())));
    }
    let (rows, h) = (table.dim(0), table.dim(1));
    #[cfg(feature = "cuda")]
    if let crate::Storage::Cuda(b) = table.storage() {
        if out_dtype != table.dtype() {
            return Err(shape_err(
                "embedding",
                "the CUDA kernel keeps the table's dtype",
            ));
        }
        let out = crate::cuda::embedding(b, rows, h, tokens, vocab_start)?;
        return Tensor::new(vec![tokens.len(), h], crate::Storage::Cuda(out));
    }
    let mut out = vec![0.0f32; tokens.len() * h];
    for (t, &tok) in tokens.iter().enumerate() {
        let tok = tok as usize;
        if tok >= vocab_start && tok < vocab_start + rows {
            table
                .storage()
                .read_f32((tok - vocab_start) * h, &mut out[t * h..(t + 1) * h]);
        }
    }
    Tensor::from_f32(vec![tokens.len(), h], out, out_dtype)
}
