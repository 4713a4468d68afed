//! The gated MLP's `silu(g) * u`, forward and backward, on f32 slices.

use rayon::prelude::*;

use super::silu;

pub fn silu_mul_forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    g.par_iter()
        .zip(u.par_iter())
        .map(|(&a, &b)| silu(a) * b)
        .collect()
}

/// Returns `(dg, du)` for `a = silu(g) * u` and upstream `da`.
pub fn silu_mul_backward(g: &[f32], u: &[f32], da: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dg = vec![0.0f32; g.len()];
    let mut du = vec![0.0f32; g.len()];
    dg.par_iter_mut()
        .zip(du.par_iter_mut())
        .enumerate()
        .for_each(|(i, (dgi, dui))| {
            let x = g[i];
            let s = 1.0 / (1.0 + (-x).exp());
            *dui = da[i] * x * s;
            *dgi = da[i] * u[i] * s * (1.0 + x * (1.0 - s));
        });
    (dg, du)
}
