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
    v.par_chunks_mut(h.max(1))
        .for_each(|row| norm_row(row, &w, eps, dt));
    Tensor::from_f32(x.shape().to_vec(), v, dt)
}

/// One row normalised in place, rounded as HF rounds it: normalise in f32, round to `dt`, scale
/// by the weight (the caller rounds the result when it stores it in `dt`).
fn norm_row(row: &mut [f32], w: &[f32], eps: f64, dt: crate::DType) {
    let ms = row.iter().map(|&a| (a as f64) * (a as f64)).sum::<f64>() / row.len() as f64;
    let inv = (1.0 / (ms + eps).sqrt()) as f32;
    for (a, &g) in row.iter_mut().zip(w) {
        *a = g * dt.round(*a * inv);
    }
}

/// Qwen3's RMSNorm of each q and k head, before RoPE: `qkv` holds rows of `heads` heads of
/// `head_dim` (this rank's q heads, then its k heads, then its v heads, per sequence of a
/// lockstep batch); the first `q_heads` of each row are normalised with `q_weight`, the next
/// `k_heads` with `k_weight` (rounded as [`rms_norm`]), the rest are copied.
pub fn head_rms_norm(
    qkv: &Tensor,
    (q_heads, k_heads): (usize, usize),
    head_dim: usize,
    q_weight: &Tensor,
    k_weight: &Tensor,
    eps: f64,
) -> Result<Tensor, TensorError> {
    let width = *qkv.shape().last().unwrap_or(&0);
    if head_dim == 0
        || !width.is_multiple_of(head_dim)
        || width / head_dim < q_heads + k_heads
        || q_weight.elem_count() != head_dim
        || k_weight.elem_count() != head_dim
    {
        return Err(shape_err(
            "head_rms_norm",
            format!(
                "rows of {width} for {q_heads} + {k_heads} heads of {head_dim}, weights of {} and {}",
                q_weight.elem_count(),
                k_weight.elem_count()
            ),
        ));
    }
    #[cfg(feature = "cuda")]
    if let (crate::Storage::Cuda(xb), crate::Storage::Cuda(qb), crate::Storage::Cuda(kb)) =
        (qkv.storage(), q_weight.storage(), k_weight.storage())
    {
        let (heads, rows) = (width / head_dim, qkv.elem_count() / width.max(1));
        let y = crate::cuda::head_rms_norm(
            xb,
            qb,
            kb,
            rows,
            (q_heads, k_heads, heads),
            head_dim,
            eps as f32,
        )?;
        return Tensor::new(qkv.shape().to_vec(), crate::Storage::Cuda(y));
    }
    let dt = qkv.dtype();
    let (qw, kw) = (q_weight.to_f32_vec(), k_weight.to_f32_vec());
    let mut v = qkv.to_f32_vec();
    v.par_chunks_mut(width.max(1)).for_each(|row| {
        for (h, x) in row.chunks_mut(head_dim).enumerate().take(q_heads + k_heads) {
            norm_row(x, if h < q_heads { &qw } else { &kw }, eps, dt);
        }
    });
    Tensor::from_f32(qkv.shape().to_vec(), v, dt)
}

/// `x += delta` (rounded to x's dtype), then [`rms_norm`] of the new `x`: a decoder layer's
/// residual add and the norm after it, one kernel on a GPU.
pub fn add_rms_norm(
    x: &mut Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<Tensor, TensorError> {
    let h = *x
        .shape()
        .last()
        .ok_or_else(|| shape_err("add_rms_norm", "x is a scalar"))?;
    if x.shape() != delta.shape() || weight.elem_count() != h {
        return Err(shape_err(
            "add_rms_norm",
            format!(
                "x {:?} + {:?}, weight of {}",
                x.shape(),
                delta.shape(),
                weight.elem_count()
            ),
        ));
    }
    #[cfg(feature = "cuda")]
    if let (crate::Storage::Cuda(xb), crate::Storage::Cuda(db), crate::Storage::Cuda(wb)) =
        (x.storage(), delta.storage(), weight.storage())
    {
        let rows = x.elem_count() / h.max(1);
        let y = crate::cuda::add_rms_norm(xb, db, wb, rows, h, eps as f32)?;
        return Tensor::new(x.shape().to_vec(), crate::Storage::Cuda(y));
    }
    super::add_inplace(x, delta)?;
    rms_norm(x, weight, eps)
}

/// A decoder layer's norm and the projection after it: `x += delta` when given, then
/// `rms_norm(x) W^T (+ bias)` (gated: the gated MLP's `silu(g) * u` over `W[2n, k]`, as
/// [`super::matmul_t_gated`]). On a GPU one bf16 row without bias takes a single kernel (the
/// norm computed by every block of the GEMV, the weights streaming meanwhile), which replaces `x`
/// by the new residual; otherwise the ops run one after another.
pub fn norm_matmul_t(
    x: &mut Tensor,
    delta: Option<&Tensor>,
    norm_weight: &Tensor,
    eps: f64,
    w: &Tensor,
    bias: Option<&Tensor>,
    gated: bool,
) -> Result<Tensor, TensorError> {
    #[cfg(feature = "cuda")]
    if let Some(y) = fused_norm_gemv(x, delta, norm_weight, eps, w, bias, gated)? {
        return Ok(y);
    }
    let xn = match delta {
        Some(d) => add_rms_norm(x, d, norm_weight, eps)?,
        None => rms_norm(x, norm_weight, eps)?,
    };
    if gated {
        super::matmul_t_gated(&xn, w, bias)
    } else {
        super::matmul_t(&xn, w, bias)
    }
}

/// The fused kernel of [`norm_matmul_t`] when every operand is on a GPU and the shape fits it.
#[cfg(feature = "cuda")]
fn fused_norm_gemv(
    x: &mut Tensor,
    delta: Option<&Tensor>,
    norm_weight: &Tensor,
    eps: f64,
    w: &Tensor,
    bias: Option<&Tensor>,
    gated: bool,
) -> Result<Option<Tensor>, TensorError> {
    use crate::Storage::Cuda;
    let (Cuda(xb), Cuda(nb), Cuda(wb)) = (x.storage(), norm_weight.storage(), w.storage()) else {
        return Ok(None);
    };
    let db = match delta.map(|d| d.storage()) {
        None => None,
        Some(Cuda(d)) => Some(d),
        Some(_) => return Ok(None),
    };
    let k = x.shape().last().copied().unwrap_or(0);
    let rows = w.shape().first().copied().unwrap_or(0);
    let n = if gated { rows / 2 } else { rows };
    let shapes_ok = bias.is_none()
        && x.elem_count() == k
        && w.shape() == [rows, k]
        && (!gated || rows.is_multiple_of(2))
        && norm_weight.elem_count() == k
        && delta.is_none_or(|d| d.shape() == x.shape());
    if !shapes_ok || !crate::cuda::norm_gemv_fits(xb, k) {
        return Ok(None);
    }
    let (y, xo) = crate::cuda::norm_gemv(xb, db, (nb, eps as f32), wb, n, k, gated)?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    if let Some(xo) = xo {
        *x = Tensor::new(x.shape().to_vec(), Cuda(xo))?;
    }
    Tensor::new(shape, Cuda(y)).map(Some)
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

    /// Each q head by the q weight, each k head by the k weight, v copied; rows independent;
    /// shapes that do not hold the heads are errors.
    #[test]
    fn head_norm_normalises_q_and_k_heads_only() {
        let row = [3.0, 4.0, 1.0, -1.0, 6.0, 8.0, 5.0, 7.0];
        let x = Tensor::from_f32(vec![2, 8], [row, row].concat(), DType::F32).unwrap();
        let q = Tensor::from_f32(vec![2], vec![1.0, 2.0], DType::F32).unwrap();
        let k = Tensor::from_f32(vec![2], vec![-1.0, 0.5], DType::F32).unwrap();
        // Heads of 2: q, q, k, v.
        let y = head_rms_norm(&x, (2, 1), 2, &q, &k, 0.0)
            .unwrap()
            .to_f32_vec();
        let (r, s) = (12.5f32.sqrt(), 50f32.sqrt());
        let want = [3.0 / r, 8.0 / r, 1.0, -2.0, -6.0 / s, 4.0 / s, 5.0, 7.0];
        for (i, (a, b)) in y.iter().zip(want.iter().chain(&want)).enumerate() {
            assert!((a - b).abs() < 1e-6, "{i}: {a} vs {b}");
        }
        assert!(head_rms_norm(&x, (3, 2), 2, &q, &k, 0.0).is_err());
        assert!(head_rms_norm(&x, (1, 1), 3, &q, &k, 0.0).is_err());
        assert!(head_rms_norm(&x, (1, 1), 4, &q, &k, 0.0).is_err());
    }

    #[test]
    fn add_then_norm_equals_the_two_ops() {
        let v = |s: u32| {
            (0..12)
                .map(|i| ((i * s) as f32 * 0.61).sin())
                .collect::<Vec<_>>()
        };
        for dt in [DType::F32, DType::BF16] {
            let x = Tensor::from_f32(vec![3, 4], v(3), dt).unwrap();
            let d = Tensor::from_f32(vec![3, 4], v(5), dt).unwrap();
            let w = Tensor::from_f32(vec![4], vec![0.5, 1.0, 1.5, -2.0], dt).unwrap();
            let mut fused = x.clone();
            let y = add_rms_norm(&mut fused, &d, &w, 1e-5).unwrap();
            let mut sum = x.clone();
            crate::ops::add_inplace(&mut sum, &d).unwrap();
            assert_eq!(fused.to_f32_vec(), sum.to_f32_vec());
            assert_eq!(
                y.to_f32_vec(),
                rms_norm(&sum, &w, 1e-5).unwrap().to_f32_vec()
            );
            assert_ne!(fused.to_f32_vec(), x.to_f32_vec());
        }
        let mut x = Tensor::from_f32(vec![2, 2], vec![1.0; 4], DType::F32).unwrap();
        let d = Tensor::from_f32(vec![4], vec![1.0; 4], DType::F32).unwrap();
        let w = Tensor::from_f32(vec![2], vec![1.0; 2], DType::F32).unwrap();
        assert!(add_rms_norm(&mut x, &d, &w, 1e-5).is_err());
    }
}
