//! RoPE on f32 slices, forward and backward. The rotation is orthogonal, so its backward is the
//! rotation by the opposite angle.

use rayon::prelude::*;

/// Rotates `x` (`[tokens, heads, head_dim]`, HF's rotate-half layout) in place; token `t` sits at
/// `positions[t]`. `inverse` rotates by the negative angle (the backward pass).
pub fn rope_rotate(
    x: &mut [f32],
    heads: usize,
    positions: &[usize],
    inv_freq: &[f32],
    inverse: bool,
) {
    let hd = 2 * inv_freq.len();
    let half = inv_freq.len();
    assert_eq!(x.len(), positions.len() * heads * hd);
    let sign = if inverse { -1.0f32 } else { 1.0 };
    x.par_chunks_mut(heads * hd)
        .zip(positions.par_iter())
        .for_each(|(tok, &pos)| {
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|&f| {
                    let a = (f as f64) * pos as f64;
                    (a.cos() as f32, sign * a.sin() as f32)
                })
                .unzip();
            for head in tok.chunks_mut(hd) {
                for i in 0..half {
                    let (a, b) = (head[i], head[i + half]);
                    head[i] = a * cos[i] - b * sin[i];
                    head[i + half] = b * cos[i] + a * sin[i];
                }
            }
        });
}
