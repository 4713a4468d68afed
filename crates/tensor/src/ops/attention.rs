//! Causal scaled-dot-product attention with grouped KV heads over a KV cache, with an optional
//! sliding window (Mistral): query at position `p` sees keys `j` with `j <= p` and `p - j < window`.

use rayon::prelude::*;

use super::softmax_inplace;
use crate::error::shape_err;
use crate::{Storage, Tensor, TensorError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads (of this rank).
    pub num_heads: usize,
    /// KV heads (of this rank); `num_heads` must be a multiple.
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// `q`: `[tokens, num_heads, head_dim]`; `k`, `v`: caches laid out `[positions, num_kv_heads,
/// head_dim]` of which the first `kv_len` positions are valid; `q_pos[t]`: the position of query
/// `t`. Returns `[tokens, num_heads, head_dim]` in q's dtype.
#[allow(clippy::too_many_arguments)]
pub fn causal_attention(
    q: &Tensor,
    k: &Storage,
    v: &Storage,
    kv_len: usize,
    shape: AttentionShape,
    q_pos: &[usize],
    window: Option<usize>,
    scale: f32,
) -> Result<Tensor, TensorError> {
    let AttentionShape {
        num_heads: hq,
        num_kv_heads: hkv,
        head_dim: hd,
    } = shape;
    let t = q_pos.len();
    if window == Some(0) {
        return Err(shape_err(
            "attention",
            "a window of 0 positions sees nothing",
        ));
    }
    if q.shape() != [t, hq, hd] || hkv == 0 || hq % hkv != 0 {
        return Err(shape_err(
            "attention",
            format!(
                "q {:?} for {t} positions, {hq} heads / {hkv} kv heads of {hd}",
                q.shape()
            ),
        ));
    }
    let row = hkv * hd;
    if k.len() < kv_len * row || v.len() < kv_len * row {
        return Err(shape_err(
            "attention",
            format!(
                "cache holds {} positions, {kv_len} asked",
                k.len() / row.max(1)
            ),
        ));
    }
    if let Some(&p) = q_pos.iter().max() {
        if p >= kv_len {
            return Err(shape_err(
                "attention",
                format!("query at position {p} but only {kv_len} keys"),
            ));
        }
    }
    #[cfg(feature = "cuda")]
    if let (Storage::Cuda(qb), Storage::Cuda(kb), Storage::Cuda(vb)) = (q.storage(), k, v) {
        let start = q_pos.first().copied().unwrap_or(0);
        if q_pos.iter().enumerate().any(|(i, &p)| p != start + i) || start + t != kv_len {
            return Err(shape_err(
                "attention",
                "the CUDA kernel takes the queries at the end of the cache, in order",
            ));
        }
        let out = crate::cuda::attention(qb, kb, vb, t, hq, hkv, hd, start, window, scale)?;
        return Tensor::new(vec![t, hq, hd], Storage::Cuda(out));
    }
    let group = hq / hkv;
    let mut kf = vec![0.0f32; kv_len * row];
    let mut vf = vec![0.0f32; kv_len * row];
    k.read_f32(0, &mut kf);
    v.read_f32(0, &mut vf);
    let qf = q.to_f32_vec();
    let mut out = vec![0.0f32; t * hq * hd];
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
        let (ti, h) = (idx / hq, idx % hq);
        let kvh = h / group;
        let p = q_pos[ti];
        let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
        let qv = &qf[idx * hd..(idx + 1) * hd];
        let mut scores: Vec<f32> = (lo..=p)
            .map(|j| {
                let kj = &kf[j * row + kvh * hd..j * row + (kvh + 1) * hd];
                qv.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale
            })
            .collect();
        softmax_inplace(&mut scores);
        for (s, j) in scores.iter().zip(lo..=p) {
            let vj = &vf[j * row + kvh * hd..j * row + (kvh + 1) * hd];
            for (a, b) in o.iter_mut().zip(vj) {
                *a += s * b;
            }
        }
    });
    Tensor::from_f32(vec![t, hq, hd], out, q.dtype())
}

/// One decode step's attention straight from the fused projection `qkv` `[batch, (hq + 2 hkv) hd]`
/// of `batch` sequences in lockstep at position `start` (`shape`: one sequence's heads): RoPE on q
/// and k, k and v appended to the caches (`[position, batch, hkv, hd]`), then attention over
/// positions `..=start`. Returns `[1, batch hq, hd]`, exactly what [`super::qkv_rope_append`]
/// followed by [`causal_attention`] return; on a GPU it is one kernel instead of two.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    qkv: &Tensor,
    batch: usize,
    shape: AttentionShape,
    k_cache: &mut Storage,
    v_cache: &mut Storage,
    start: usize,
    inv_freq: &[f32],
    window: Option<usize>,
    scale: f32,
) -> Result<Tensor, TensorError> {
    let AttentionShape {
        num_heads: hq,
        num_kv_heads: hkv,
        head_dim: hd,
    } = shape;
    if window == Some(0) {
        return Err(shape_err(
            "decode_attention",
            "a window of 0 positions sees nothing",
        ));
    }
    let flat = AttentionShape {
        num_heads: batch * hq,
        num_kv_heads: batch * hkv,
        head_dim: hd,
    };
    #[cfg(feature = "cuda")]
    if let (Storage::Cuda(b), Storage::Cuda(kc), Storage::Cuda(vc)) =
        (qkv.storage(), &*k_cache, &*v_cache)
    {
        let width = (hq + 2 * hkv) * hd;
        let row = batch * hkv * hd;
        if qkv.shape() != [batch, width]
            || hkv == 0
            || hq % hkv != 0
            || hd != 2 * inv_freq.len()
            || k_cache.len() < (start + 1) * row
            || v_cache.len() < (start + 1) * row
        {
            return Err(shape_err(
                "decode_attention",
                format!(
                    "qkv {:?} for {batch} sequences of {hq} + 2 x {hkv} heads of {hd} at position {start}",
                    qkv.shape()
                ),
            ));
        }
        let out = crate::cuda::decode_attention(
            b, kc, vc, batch, hq, hkv, hd, start, inv_freq, window, scale,
        )?;
        return Tensor::new(vec![1, batch * hq, hd], Storage::Cuda(out));
    }
    let q = super::qkv_rope_append(qkv, batch, shape, k_cache, v_cache, start, inv_freq)?;
    causal_attention(
        &q,
        k_cache,
        v_cache,
        start + 1,
        flat,
        &[start],
        window,
        scale,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    #[test]
    fn single_key_returns_its_value_and_window_limits_keys() {
        // 1 kv head shared by 2 query heads, head_dim 2, 3 positions.
        let k = Storage::F32(vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        let v = Storage::F32(vec![10.0, 0.0, 0.0, 20.0, 5.0, 5.0]);
        let shape = AttentionShape {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 2,
        };
        let q = Tensor::from_f32(vec![1, 2, 2], vec![1.0, 0.0, 0.0, 1.0], DType::F32).unwrap();
        let o = causal_attention(&q, &k, &v, 3, shape, &[0], None, 1.0).unwrap();
        assert_eq!(o.to_f32_vec(), vec![10.0, 0.0, 10.0, 0.0]);
        // Window 1 at position 2: only key 2.
        let o = causal_attention(&q, &k, &v, 3, shape, &[2], Some(1), 1.0).unwrap();
        assert_eq!(o.to_f32_vec(), vec![5.0, 5.0, 5.0, 5.0]);
        assert!(causal_attention(&q, &k, &v, 3, shape, &[3], None, 1.0).is_err());
        assert!(causal_attention(&q, &k, &v, 3, shape, &[2], Some(0), 1.0).is_err());
    }
}
