//! Rotary position embedding in HF's "rotate half" layout: the first and second halves of each head
//! are the two coordinates of each rotated pair.

use rayon::prelude::*;

use super::AttentionShape;
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
            // HF's f32 inverse frequencies times the position, the product taken in f64 (HF
            // rounds it to f32 first: its angle may differ by half an f32 ulp, ~5e-4 rad at
            // position 8k; this one is the closer to exact).
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

/// A step's attention inputs from the fused projection `qkv` `[rows, (hq + 2 hkv) hd]` (each row:
/// its q heads, k heads, v heads) of `batch` sequences in lockstep, row r being token r / batch of
/// sequence r % batch, at positions `start..`. Returns q `[rows / batch, batch hq, hd]` rotated;
/// writes k rotated and v into caches laid out `[position, batch, hkv, hd]`. On a GPU this is one
/// kernel.
#[allow(clippy::too_many_arguments)]
pub fn qkv_rope_append(
    qkv: &Tensor,
    batch: usize,
    shape: AttentionShape,
    k_cache: &mut crate::Storage,
    v_cache: &mut crate::Storage,
    start: usize,
    inv_freq: &[f32],
) -> Result<Tensor, TensorError> {
    let AttentionShape {
        num_heads: hq,
        num_kv_heads: hkv,
        head_dim: hd,
    } = shape;
    let width = (hq + 2 * hkv) * hd;
    let rows = qkv.elem_count() / width.max(1);
    let row = batch * hkv * hd;
    if qkv.shape().last() != Some(&width)
        || batch == 0
        || !rows.is_multiple_of(batch)
        || hd != 2 * inv_freq.len()
    {
        return Err(shape_err(
            "qkv_rope_append",
            format!(
                "qkv {:?} for {batch} sequences of {hq} + 2 x {hkv} heads of {hd}, {} frequencies",
                qkv.shape(),
                inv_freq.len()
            ),
        ));
    }
    let t = rows / batch;
    if k_cache.len() < (start + t) * row || v_cache.len() < (start + t) * row {
        return Err(shape_err(
            "qkv_rope_append",
            "the positions do not fit the caches",
        ));
    }
    #[cfg(feature = "cuda")]
    if let (crate::Storage::Cuda(b), crate::Storage::Cuda(kc), crate::Storage::Cuda(vc)) =
        (qkv.storage(), &*k_cache, &*v_cache)
    {
        let q = crate::cuda::qkv_rope_append(b, kc, vc, rows, batch, hq, hkv, hd, start, inv_freq)?;
        return Tensor::new(vec![t, batch * hq, hd], crate::Storage::Cuda(q));
    }
    let dt = qkv.dtype();
    let all = qkv.to_f32_vec();
    let (mut q, mut k, mut v) = (
        Vec::with_capacity(rows * hq * hd),
        Vec::with_capacity(rows * hkv * hd),
        Vec::with_capacity(rows * hkv * hd),
    );
    for r in all.chunks(width) {
        q.extend_from_slice(&r[..hq * hd]);
        k.extend_from_slice(&r[hq * hd..(hq + hkv) * hd]);
        v.extend_from_slice(&r[(hq + hkv) * hd..]);
    }
    let mut q = Tensor::from_f32(vec![t, batch * hq, hd], q, dt)?;
    let mut k = Tensor::from_f32(vec![t, batch * hkv, hd], k, dt)?;
    let positions: Vec<usize> = (start..start + t).collect();
    apply_rope(&mut q, &positions, inv_freq)?;
    apply_rope(&mut k, &positions, inv_freq)?;
    k_cache.copy_from(start * row, k.storage())?;
    v_cache.copy_from(
        start * row,
        Tensor::from_f32(vec![v.len()], v, dt)?.storage(),
    )?;
    Ok(q)
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

    #[test]
    fn fused_qkv_equals_rope_on_the_split_heads() {
        // 2 sequences in lockstep, 2 q heads over 1 kv head of 4, at position 3 of a 5-position cache.
        let shape = AttentionShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
        };
        let inv = [1.0, 0.1];
        let qkv: Vec<f32> = (0..2 * 16).map(|i| (i as f32 * 0.31).cos()).collect();
        let t = Tensor::from_f32(vec![2, 16], qkv.clone(), DType::F32).unwrap();
        let mut kc = crate::Storage::F32(vec![0.0; 5 * 2 * 4]);
        let mut vc = crate::Storage::F32(vec![0.0; 5 * 2 * 4]);
        let q = qkv_rope_append(&t, 2, shape, &mut kc, &mut vc, 3, &inv).unwrap();
        assert_eq!(q.shape(), &[1, 4, 4]);
        let pick = |r: usize, lo: usize, hi: usize| qkv[r * 16 + lo..r * 16 + hi].to_vec();
        let mut want_q = Tensor::from_f32(
            vec![1, 4, 4],
            [pick(0, 0, 8), pick(1, 0, 8)].concat(),
            DType::F32,
        )
        .unwrap();
        apply_rope(&mut want_q, &[3], &inv).unwrap();
        assert_eq!(q.to_f32_vec(), want_q.to_f32_vec());
        let mut want_k = Tensor::from_f32(
            vec![1, 2, 4],
            [pick(0, 8, 12), pick(1, 8, 12)].concat(),
            DType::F32,
        )
        .unwrap();
        apply_rope(&mut want_k, &[3], &inv).unwrap();
        let f32s = |s: &crate::Storage| match s {
            crate::Storage::F32(v) => v.clone(),
            _ => unreachable!("f32 caches"),
        };
        assert_eq!(f32s(&kc)[24..32], want_k.to_f32_vec()[..]);
        assert_eq!(
            f32s(&vc)[24..32],
            [pick(0, 12, 16), pick(1, 12, 16)].concat()[..]
        );
        assert!(f32s(&kc)[..24].iter().all(|&x| x == 0.0));
        // A cache too short for the position is refused.
        assert!(qkv_rope_append(&t, 2, shape, &mut kc, &mut vc, 5, &inv).is_err());
    }
}
