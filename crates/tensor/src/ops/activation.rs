//! SiLU and the gated MLP's `silu(gate) * up`.

use rayon::prelude::*;

use crate::error::shape_err;
use crate::{Tensor, TensorError};

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `silu(gate) * up`, elementwise, in gate's dtype (each product rounded as HF rounds it).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor, TensorError> {
    if gate.shape() != up.shape() {
        return Err(shape_err(
            "silu_mul",
            format!("gate {:?} vs up {:?}", gate.shape(), up.shape()),
        ));
    }
    #[cfg(feature = "cuda")]
    if let (crate::Storage::Cuda(g), crate::Storage::Cuda(u)) = (gate.storage(), up.storage()) {
        let out = crate::cuda::silu_mul(g, u)?;
        return Tensor::new(gate.shape().to_vec(), crate::Storage::Cuda(out));
    }
    let dt = gate.dtype();
    let mut g = gate.to_f32_vec();
    let u = up.to_f32_vec();
    g.par_iter_mut()
        .zip(u.par_iter())
        .for_each(|(a, &b)| *a = dt.round(silu(*a)) * b);
    Tensor::from_f32(gate.shape().to_vec(), g, dt)
}

/// `silu(gate) * up` on fused gate/up outputs `gu` `[.., 2n]` (each row's gate features first), as
/// [`silu_mul`] on the two halves: `[.., n]`.
pub fn silu_mul_halves(gu: &Tensor) -> Result<Tensor, TensorError> {
    let two_n = *gu
        .shape()
        .last()
        .ok_or_else(|| shape_err("silu_mul_halves", "a scalar"))?;
    if two_n % 2 != 0 {
        return Err(shape_err(
            "silu_mul_halves",
            format!("{:?}: the last dimension is odd", gu.shape()),
        ));
    }
    let n = two_n / 2;
    let rows = gu.elem_count() / two_n.max(1);
    let mut shape = gu.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    #[cfg(feature = "cuda")]
    if let crate::Storage::Cuda(b) = gu.storage() {
        let out = crate::cuda::silu_mul_halves(b, rows, n)?;
        return Tensor::new(shape, crate::Storage::Cuda(out));
    }
    let dt = gu.dtype();
    let v = gu.to_f32_vec();
    let mut out = vec![0.0f32; rows * n];
    out.par_chunks_mut(n.max(1))
        .zip(v.par_chunks(two_n.max(1)))
        .for_each(|(o, row)| {
            let (g, u) = row.split_at(n);
            for ((o, &a), &b) in o.iter_mut().zip(g).zip(u) {
                *o = dt.round(silu(a)) * b;
            }
        });
    Tensor::from_f32(shape, out, dt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn halves_equal_the_split_op() {
        for dt in [DType::F32, DType::BF16] {
            let v: Vec<f32> = (0..24).map(|i| (i as f32 * 0.7).sin() * 3.0).collect();
            let gu = Tensor::from_f32(vec![2, 12], v.clone(), dt).unwrap();
            let gu_v = gu.to_f32_vec();
            let (mut g, mut u) = (Vec::new(), Vec::new());
            for row in gu_v.chunks(12) {
                g.extend_from_slice(&row[..6]);
                u.extend_from_slice(&row[6..]);
            }
            let g = Tensor::from_f32(vec![2, 6], g, dt).unwrap();
            let u = Tensor::from_f32(vec![2, 6], u, dt).unwrap();
            let want = silu_mul(&g, &u).unwrap();
            let got = silu_mul_halves(&gu).unwrap();
            assert_eq!(got.shape(), &[2, 6]);
            assert_eq!(got.to_f32_vec(), want.to_f32_vec());
        }
        let odd = Tensor::from_f32(vec![1, 3], vec![1.0; 3], DType::F32).unwrap();
        assert!(silu_mul_halves(&odd).is_err());
    }
}
