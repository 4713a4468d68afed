//! RMSNorm forward (keeping `1/rms` per row) and backward, on f32 slices.
//!
//! `y = w * x * r`, `r = 1/sqrt(mean(x^2) + eps)`;
//! `dx = r * (w*dy) - x * r^3 / h * sum(w*dy*x)`, `dw += sum over rows of dy * x * r`.

use rayon::prelude::*;

/// Returns `(y, inv_rms)` for rows of `h`.
pub fn rms_norm_forward(x: &[f32], w: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
    let h = w.len();
    let mut y = vec![0.0f32; x.len()];
    let mut inv = vec![0.0f32; x.len() / h];
    y.par_chunks_mut(h)
        .zip(inv.par_iter_mut())
        .zip(x.par_chunks(h))
        .for_each(|((yr, r), xr)| {
            let ms = xr.iter().map(|&a| (a as f64) * (a as f64)).sum::<f64>() / h as f64;
            *r = (1.0 / (ms + eps).sqrt()) as f32;
            for ((o, &a), &g) in yr.iter_mut().zip(xr).zip(w) {
                *o = g * (a * *r);
            }
        });
    (y, inv)
}

/// Returns `dx`; adds the weight gradient into `dw`.
pub fn rms_norm_backward(
    x: &[f32],
    w: &[f32],
    inv_rms: &[f32],
    dy: &[f32],
    dw: &mut [f32],
) -> Vec<f32> {
    let h = w.len();
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(h)
        .zip(x.par_chunks(h))
        .zip(dy.par_chunks(h))
        .zip(inv_rms.par_iter())
        .for_each(|(((dxr, xr), dyr), &r)| {
            let dot: f64 = xr
                .iter()
                .zip(dyr)
                .zip(w)
                .map(|((&a, &g), &ww)| (a * g * ww) as f64)
                .sum();
            let c = (dot as f32) * r * r * r / h as f32;
            for (((o, &a), &g), &ww) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
                *o = r * ww * g - a * c;
            }
        });
    // Rows in a fixed order, so the sum is the same however rayon splits the work above.
    for ((xr, dyr), &r) in x.chunks(h).zip(dy.chunks(h)).zip(inv_rms) {
        for ((d, &a), &g) in dw.iter_mut().zip(xr).zip(dyr) {
            *d += g * a * r;
        }
    }
    dx
}
