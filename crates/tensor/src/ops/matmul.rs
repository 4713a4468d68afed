//! `y = x @ w^T (+ b)`: the linear layer's GEMM, with HF's `[out, in]` weight layout.
//!
//! For a few rows of `x` (decode) a GEMV streams each weight row once at its stored width, widening
//! 16-bit values in L1 (decode is bound by memory bandwidth). For many rows (prefill) f32 weights go
//! straight to the `gemm` crate (rayon-parallel) and 16-bit weights are widened once first.

use rayon::prelude::*;

use crate::error::shape_err;
use crate::{Storage, Tensor, TensorError};

/// Rows of `x` up to which the streaming GEMV is used.
const GEMV_MAX_ROWS: usize = 16;

/// `x[.., k] @ w[n, k]^T + bias[n]`, output in x's dtype with shape `[.., n]`.
pub fn matmul_t(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, TensorError> {
    let k = *x
        .shape()
        .last()
        .ok_or_else(|| shape_err("matmul", "x is a scalar"))?;
    if w.shape().len() != 2 || w.dim(1) != k {
        return Err(shape_err(
            "matmul",
            format!(
                "x {:?} @ w {:?}^T: inner sizes differ",
                x.shape(),
                w.shape()
            ),
        ));
    }
    let n = w.dim(0);
    let m = x.elem_count() / k.max(1);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = n;
    if let Some(b) = bias {
        if b.elem_count() != n {
            return Err(shape_err(
                "matmul",
                format!("bias of {} for {n} outputs", b.elem_count()),
            ));
        }
    }
    #[cfg(feature = "cuda")]
    if let (Storage::Cuda(xb), Storage::Cuda(wb)) = (x.storage(), w.storage()) {
        let b = match bias.map(|b| b.storage()) {
            Some(Storage::Cuda(bb)) => Some(bb),
            Some(_) => return Err(shape_err("matmul", "bias is not on the GPU")),
            None => None,
        };
        let y = crate::cuda::matmul_t(xb, m, k, wb, n, b)?;
        return Tensor::new(shape, Storage::Cuda(y));
    }
    let xf;
    let xs = match x.as_f32_slice() {
        Some(s) => s,
        None => {
            xf = x.to_f32_vec();
            &xf
        }
    };
    let mut out = vec![0.0f32; m * n];
    matmul_t_into(xs, m, k, w.storage(), n, &mut out);
    if let Some(b) = bias {
        let bf = b.to_f32_vec();
        out.par_chunks_mut(n.max(1)).for_each(|row| {
            for (o, b) in row.iter_mut().zip(&bf) {
                *o += b;
            }
        });
    }
    Tensor::from_f32(shape, out, x.dtype())
}

/// The gated MLP's first half on fused weights: `w` `[2n, k]` holds the gate rows, then the up
/// rows (`bias` likewise); returns `silu(x Wg^T + bg) * (x Wu^T + bu)`, `[.., n]`. On a GPU at
/// decode this is one pass over the weights.
pub fn matmul_t_gated(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor, TensorError> {
    if w.shape().len() != 2 || !w.dim(0).is_multiple_of(2) {
        return Err(shape_err(
            "matmul_gated",
            format!("w {:?}: not [2n, k]", w.shape()),
        ));
    }
    if let Some(b) = bias {
        if b.elem_count() != w.dim(0) {
            return Err(shape_err(
                "matmul_gated",
                format!("bias of {} for {} outputs", b.elem_count(), w.dim(0)),
            ));
        }
    }
    #[cfg(feature = "cuda")]
    if let (Storage::Cuda(xb), Storage::Cuda(wb)) = (x.storage(), w.storage()) {
        let k = w.dim(1);
        if x.shape().last() != Some(&k) {
            return Err(shape_err(
                "matmul_gated",
                format!("x {:?} @ w {:?}^T", x.shape(), w.shape()),
            ));
        }
        let b = match bias.map(|b| b.storage()) {
            Some(Storage::Cuda(bb)) => Some(bb),
            Some(_) => return Err(shape_err("matmul_gated", "bias is not on the GPU")),
            None => None,
        };
        let n = w.dim(0) / 2;
        let m = x.elem_count() / k.max(1);
        let mut shape = x.shape().to_vec();
        *shape.last_mut().unwrap() = n;
        let y = crate::cuda::matmul_t_gated(xb, m, k, wb, n, b)?;
        return Tensor::new(shape, Storage::Cuda(y));
    }
    super::silu_mul_halves(&matmul_t(x, w, bias)?)
}

/// The raw kernel: `out[m, n] = x[m, k] @ w[n, k]^T` with `w` in any stored dtype.
pub fn matmul_t_into(x: &[f32], m: usize, k: usize, w: &Storage, n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    assert_eq!(out.len(), m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    match w {
        _ if m <= GEMV_MAX_ROWS => gemv(x, m, k, w, n, out),
        Storage::F32(wf) => gemm_f32(x, m, k, wf, n, out),
        _ => {
            let mut wf = vec![0.0f32; n * k];
            wf.par_chunks_mut(k)
                .enumerate()
                .for_each(|(j, row)| w.read_f32(j * k, row));
            gemm_f32(x, m, k, &wf, n, out)
        }
    }
}

fn gemm_f32(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k >= 64 * 64 * 64 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the slices hold exactly m*k, n*k and m*n elements (asserted by the caller) and the
    // strides below address them row-major: dst[i,j] = out[i*n+j], lhs[i,l] = x[i*k+l],
    // rhs[l,j] = w[j*k+l] (w^T).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Output columns per parallel task in the GEMV.
const GEMV_BLOCK: usize = 16;
/// Weight elements widened at a time (stays in L1).
const K_CHUNK: usize = 512;

fn gemv(x: &[f32], m: usize, k: usize, w: &Storage, n: usize, out: &mut [f32]) {
    // Work on out^T [n, m] so that each task owns a contiguous block, then transpose.
    let mut out_t = vec![0.0f32; n * m];
    out_t
        .par_chunks_mut(GEMV_BLOCK * m)
        .enumerate()
        .for_each(|(blk, dst)| {
            let mut wbuf = [0.0f32; K_CHUNK];
            let j0 = blk * GEMV_BLOCK;
            for (jj, dst_row) in dst.chunks_mut(m).enumerate() {
                let j = j0 + jj;
                let mut acc = [0.0f32; GEMV_MAX_ROWS];
                let mut k0 = 0;
                while k0 < k {
                    let len = K_CHUNK.min(k - k0);
                    let wrow: &[f32] = match w {
                        Storage::F32(wf) => &wf[j * k + k0..j * k + k0 + len],
                        _ => {
                            w.read_f32(j * k + k0, &mut wbuf[..len]);
                            &wbuf[..len]
                        }
                    };
                    for (i, a) in acc.iter_mut().enumerate().take(m) {
                        *a += dot(&x[i * k + k0..i * k + k0 + len], wrow);
                    }
                    k0 += len;
                }
                dst_row.copy_from_slice(&acc[..m]);
            }
        });
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
}

/// Dot product with eight independent accumulators, which the compiler vectorises.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        let (aa, bb) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for l in 0..8 {
            lanes[l] += aa[l] * bb[l];
        }
    }
    let mut s: f32 = lanes.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;
    use rand::{Rng, SeedableRng};

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
        let mut o = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                o[i * n + j] = (0..k)
                    .map(|l| x[i * k + l] as f64 * w[j * k + l] as f64)
                    .sum();
            }
        }
        o
    }

    #[test]
    fn matches_f64_reference_for_every_path() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &(m, k, n) in &[(1, 3, 5), (3, 700, 33), (17, 129, 65), (40, 64, 48)] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let wv: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            for dt in [DType::F32, DType::BF16, DType::F16] {
                let w = Tensor::from_f32(vec![n, k], wv.clone(), dt).unwrap();
                let wr = w.to_f32_vec();
                let want = reference(&x, m, k, &wr, n);
                let xt = Tensor::from_f32(vec![m, k], x.clone(), DType::F32).unwrap();
                let got = matmul_t(&xt, &w, None).unwrap().to_f32_vec();
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-4 * (k as f64).sqrt(),
                        "{m}x{k}x{n} {dt}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn refuses_mismatched_shapes() {
        let x = Tensor::zeros(vec![2, 3], DType::F32);
        let w = Tensor::zeros(vec![4, 5], DType::F32);
        assert!(matmul_t(&x, &w, None).is_err());
    }
}
