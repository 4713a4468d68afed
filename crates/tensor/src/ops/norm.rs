//! RMSNorm: `x / sqrt(mean(x^2) + eps) * weight`, rounded like HF (normalise in f32, round to the
//! activation dtype, then scale by the weight).

use rayon::prelude::*;

use crate::error::shape_err;
use crate::{Tensor, TensorError};

pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor, TensorError> {
    let h = *x
        .shape()
        .last()
        .ok_or_else(|| shape_err("rms_norm", "x is a scalar"))?;
    if weight.elem_count() != h {
        return Err(shape_err(
            "rms_norm",
            format!("weight of {} for rows of {h}", weight.elem_count()),
        ));
    }
    #[cfg(feature = "cuda")]
    if let (crate::Storage::Cuda(xb), crate::Storage::Cuda(wb)) = (x.storage(), weight.storage()) {
        let y = crate::cuda::rms_norm(xb, wb, x.elem_count() / h, h, eps as f32)?;
        return Tensor::new(x.shape().to_vec(), crate::Storage::Cuda(y));
    }
    let dt = x.dtype();
    let w = weight.to_f32_vec();
    let mut v = x.to_f32_vec();
    v.par_chunks_mut(h.max(1)).for_each(|row| {
        let ms = row.iter().map(|&a| (a as f64) * (a as f64)).sum::<f64>() / h as f64;
        let inv = (1.0 / (ms + eps).sqrt()) as f32;
        for (a, &g) in row.iter_mut().zip(&w) {
            *a = g * dt.round(*a * inv);
        }
    });
    Tensor::from_f32(x.shape().to_vec(), v, dt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn normalises_rows() {
        let x = Tensor::from_f32(vec![2, 2], vec![3.0, 4.0, 1.0, -1.0], DType::F32).unwrap();
        let w = Tensor::from_f32(vec![2], vec![1.0, 2.0], DType::F32).unwrap();
        let y = rms_norm(&x, &w, 0.0).unwrap().to_f32_vec();
        let r = (12.5f32).sqrt();
        let want = [3.0 / r, 8.0 / r, 1.0, -2.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
