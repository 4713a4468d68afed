//! Rotary position embedding in HF's "rotate half" layout: the first and second halves of each head
//! are the two coordinates of each rotated pair.

use rayon::prelude::*;

use crate::error::shape_err;
use crate::{Tensor, TensorError};

/// Rotates `x` of shape `[tokens, heads, head_dim]` in place; token `t` sits at `positions[t]`.
/// `inv_freq` has `head_dim / 2` entries.
pub fn apply_rope(
    x: &mut Tensor,
    positions: &[usize],
    inv_freq: &[f32],
) -> Result<(), TensorError> {
    let s = x.shape().to_vec();
    if s.len() != 3 || s[0] != positions.len() || s[2] != 2 * inv_freq.len() {
        return Err(shape_err(
            "rope",
            format!(
                "x {s:?}, {} positions, {} frequencies",
                positions.len(),
                inv_freq.len()
            ),
        ));
    }
    let (heads, hd) = (s[1], s[2]);
    #[cfg(feature = "cuda")]
    if let crate::Storage::Cuda(b) = x.storage() {
        // Positions are consecutive here (a prefill chunk or one decode step).
        let start = positions.first().copied().unwrap_or(0);
        if positions.iter().enumerate().any(|(i, &p)| p != start + i) {
            return Err(shape_err(
                "rope",
                "the CUDA kernel takes consecutive positions",
            ));
        }
        return crate::cuda::rope(b, s[0], heads, hd, start, inv_freq);
    }
    let half = hd / 2;
    let dt = x.dtype();
    let mut v = x.to_f32_vec();
    v.par_chunks_mut(heads * hd)
        .zip(positions.par_iter())
        .for_each(|(tok, &pos)| {
            // Angles as HF forms them: f32 inverse frequencies times the position.
            let (cos, sin): (Vec<f32>, Vec<f32>) = inv_freq
                .iter()
                .map(|&f| {
                    let a = (f as f64) * pos as f64;
                    (a.cos() as f32, a.sin() as f32)
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
    *x = Tensor::from_f32(s, v, dt)?;
    Ok(())
}

/// A step's attention inputs: RoPE on `q` `[t, hq, hd]` in place, then K (rotated) and V appended
/// to caches whose positions hold `hkv * hd` elements, at `positions` (consecutive from the first).
/// On a GPU this is one kernel instead of four.
pub fn rope_append(
    q: &mut Tensor,
    k: &Tensor,
    v: &Tensor,
    k_cache: &mut crate::Storage,
    v_cache: &mut crate::Storage,
    positions: &[usize],
    inv_freq: &[f32],
) -> Result<(), TensorError> {
    let (qs, ks) = (q.shape().to_vec(), k.shape().to_vec());
    if ks.len() != 3
        || qs.len() != 3
        || qs[0] != ks[0]
        || qs[2] != ks[2]
        || v.elem_count() != k.elem_count()
    {
        return Err(shape_err(
            "rope_append",
            format!("q {qs:?}, k {ks:?}, v {:?}", v.shape()),
        ));
    }
    let row = ks[1] * ks[2];
    let start = positions.first().copied().unwrap_or(0);
    if positions.iter().enumerate().any(|(i, &p)| p != start + i)
        || k_cache.len() < (start + ks[0]) * row
        || v_cache.len() < (start + ks[0]) * row
    {
        return Err(shape_err(
            "rope_append",
            "positions must be consecutive and fit the caches",
        ));
    }
    #[cfg(feature = "cuda")]
    if let (
        crate::Storage::Cuda(qb),
        crate::Storage::Cuda(kb),
        crate::Storage::Cuda(vb),
        crate::Storage::Cuda(kc),
        crate::Storage::Cuda(vc),
    ) = (q.storage(), k.storage(), v.storage(), &*k_cache, &*v_cache)
    {
        return crate::cuda::rope_append(
            qb, kb, vb, kc, vc, qs[0], qs[1], ks[1], qs[2], start, inv_freq,
        );
    }
    apply_rope(q, positions, inv_freq)?;
    let mut k = k.clone();
    apply_rope(&mut k, positions, inv_freq)?;
    k_cache.copy_from(start * row, k.storage())?;
    v_cache.copy_from(start * row, v.storage())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn rotation_keeps_norm_and_position_zero_is_identity() {
        let v: Vec<f32> = (0..2 * 3 * 4).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut x = Tensor::from_f32(vec![2, 3, 4], v.clone(), DType::F32).unwrap();
        apply_rope(&mut x, &[0, 5], &[1.0, 0.01]).unwrap();
        let y = x.to_f32_vec();
        assert_eq!(&y[..12], &v[..12]);
        let n0: f32 = v[12..].iter().map(|a| a * a).sum();
        let n1: f32 = y[12..].iter().map(|a| a * a).sum();
        assert!((n0 - n1).abs() < 1e-5);
        assert_ne!(&y[12..], &v[12..]);
    }
}
