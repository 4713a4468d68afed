//! The three GEMMs of a linear layer's training step on f32 slices, with HF's `[out, in]` weight
//! layout: forward `y = x W^T`, input gradient `dx = dy W`, weight gradient `dW += dy^T x`.

/// `y[m, n] = x[m, k] @ w[n, k]^T`.
pub fn linear_forward(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    let mut y = vec![0.0f32; m * n];
    // lhs[i, l] = x[i*k + l]; rhs[l, j] = w[j*k + l].
    gemm_strided(m, n, k, &mut y, n, false, x, 1, k, w, k, 1);
    y
}

/// `dx[m, k] = dy[m, n] @ w[n, k]`.
pub fn linear_backward_input(dy: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(dy.len(), m * n);
    assert_eq!(w.len(), n * k);
    let mut dx = vec![0.0f32; m * k];
    // dst[i, l]; lhs[i, j] = dy[i*n + j]; rhs[j, l] = w[j*k + l].
    gemm_strided(m, k, n, &mut dx, k, false, dy, 1, n, w, 1, k);
    dx
}

/// `dw[n, k] += dy[m, n]^T @ x[m, k]`.
pub fn linear_backward_weight(dy: &[f32], x: &[f32], m: usize, k: usize, n: usize, dw: &mut [f32]) {
    assert_eq!(dy.len(), m * n);
    assert_eq!(x.len(), m * k);
    assert_eq!(dw.len(), n * k);
    // dst[j, l]; lhs[j, i] = dy[i*n + j]; rhs[i, l] = x[i*k + l].
    gemm_strided(n, k, m, dw, k, true, dy, n, 1, x, 1, k);
}

/// `db[n] += sum over rows of dy[m, n]`.
pub fn bias_backward(dy: &[f32], n: usize, db: &mut [f32]) {
    for row in dy.chunks(n) {
        for (d, g) in db.iter_mut().zip(row) {
            *d += g;
        }
    }
}

/// `dst[m, n] (+)= lhs[m, k] @ rhs[k, n]` with row-major `dst` (row stride `dst_rs`) and the
/// operands given by (column stride, row stride).
#[allow(clippy::too_many_arguments)]
fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_cs: usize,
    lhs_rs: usize,
    rhs: &[f32],
    rhs_cs: usize,
    rhs_rs: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k >= 64 * 64 * 64 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let max_index = |cs: usize, rs: usize, r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    assert!(max_index(1, dst_rs, m, n) < dst.len());
    assert!(max_index(lhs_cs, lhs_rs, m, k) < lhs.len());
    assert!(max_index(rhs_cs, rhs_rs, k, n) < rhs.len());
    // SAFETY: the asserts above bound the largest index each operand is read or written at.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_gemms_match_loops() {
        let (m, k, n) = (5, 7, 3);
        let x: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let dy: Vec<f32> = (0..m * n).map(|i| (i as f32 * 0.53).sin()).collect();
        let y = linear_forward(&x, &w, m, k, n);
        let dx = linear_backward_input(&dy, &w, m, k, n);
        let mut dw = vec![1.0f32; n * k];
        linear_backward_weight(&dy, &x, m, k, n, &mut dw);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|l| x[i * k + l] * w[j * k + l]).sum();
                assert!((y[i * n + j] - want).abs() < 1e-5);
            }
            for l in 0..k {
                let want: f32 = (0..n).map(|j| dy[i * n + j] * w[j * k + l]).sum();
                assert!((dx[i * k + l] - want).abs() < 1e-5);
            }
        }
        for j in 0..n {
            for l in 0..k {
                let want: f32 = 1.0 + (0..m).map(|i| dy[i * n + j] * x[i * k + l]).sum::<f32>();
                assert!((dw[j * k + l] - want).abs() < 1e-5);
            }
        }
    }
}
