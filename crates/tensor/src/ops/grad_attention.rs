//! Causal attention for training, on f32 slices: `batch` independent sequences of `seq` tokens
//! each, grouped KV heads, optional sliding window. The forward keeps the softmax probabilities
//! (`[batch, heads, seq, seq]`, small at training sequence lengths) for the backward.

use rayon::prelude::*;

use super::{softmax_inplace, AttentionShape};

/// Sizes of one training attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainAttention {
    pub batch: usize,
    pub seq: usize,
    pub shape: AttentionShape,
    pub window: Option<usize>,
    pub scale: f32,
}

impl TrainAttention {
    fn visible(&self, i: usize) -> std::ops::Range<usize> {
        let lo = self.window.map_or(0, |w| (i + 1).saturating_sub(w));
        lo..i + 1
    }
}

/// `q`: `[batch*seq, heads, d]`, `k`, `v`: `[batch*seq, kv_heads, d]`. Returns the output
/// `[batch*seq, heads, d]` and the probabilities.
pub fn attention_forward(
    a: &TrainAttention,
    q: &[f32],
    k: &[f32],
    v: &[f32],
) -> (Vec<f32>, Vec<f32>) {
    let AttentionShape {
        num_heads: hq,
        num_kv_heads: hkv,
        head_dim: d,
    } = a.shape;
    let (b, t) = (a.batch, a.seq);
    assert_eq!(q.len(), b * t * hq * d);
    assert_eq!(k.len(), b * t * hkv * d);
    let group = hq / hkv;
    let mut probs = vec![0.0f32; b * hq * t * t];
    let outs: Vec<Vec<f32>> = probs
        .par_chunks_mut(t * t)
        .enumerate()
        .map(|(bh, p)| {
            let (bi, h) = (bh / hq, bh % hq);
            let kvh = h / group;
            let mut o = vec![0.0f32; t * d];
            for i in 0..t {
                let qi = &q[((bi * t + i) * hq + h) * d..][..d];
                let row = &mut p[i * t..(i + 1) * t];
                let vis = a.visible(i);
                for j in vis.clone() {
                    let kj = &k[((bi * t + j) * hkv + kvh) * d..][..d];
                    row[j] = qi.iter().zip(kj).map(|(x, y)| x * y).sum::<f32>() * a.scale;
                }
                softmax_inplace(&mut row[vis.clone()]);
                let oi = &mut o[i * d..(i + 1) * d];
                for j in vis {
                    let vj = &v[((bi * t + j) * hkv + kvh) * d..][..d];
                    for (x, y) in oi.iter_mut().zip(vj) {
                        *x += row[j] * y;
                    }
                }
            }
            o
        })
        .collect();
    let mut out = vec![0.0f32; b * t * hq * d];
    for (bh, o) in outs.iter().enumerate() {
        let (bi, h) = (bh / hq, bh % hq);
        for i in 0..t {
            out[((bi * t + i) * hq + h) * d..][..d].copy_from_slice(&o[i * d..(i + 1) * d]);
        }
    }
    (out, probs)
}

/// Returns `(dq, dk, dv)` for upstream `dout` (`[batch*seq, heads, d]`).
pub fn attention_backward(
    a: &TrainAttention,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    probs: &[f32],
    dout: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttentionShape {
        num_heads: hq,
        num_kv_heads: hkv,
        head_dim: d,
    } = a.shape;
    let (b, t) = (a.batch, a.seq);
    let group = hq / hkv;
    // One task per (sequence, kv head): it owns that head's dk, dv and its query heads' dq.
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..b * hkv)
        .into_par_iter()
        .map(|task| {
            let (bi, kvh) = (task / hkv, task % hkv);
            let mut dq = vec![0.0f32; group * t * d];
            let mut dk = vec![0.0f32; t * d];
            let mut dv = vec![0.0f32; t * d];
            let mut ds = vec![0.0f32; t];
            for g in 0..group {
                let h = kvh * group + g;
                let p = &probs[(bi * hq + h) * t * t..][..t * t];
                for i in 0..t {
                    let vis = a.visible(i);
                    let doi = &dout[((bi * t + i) * hq + h) * d..][..d];
                    let pi = &p[i * t..(i + 1) * t];
                    let mut sum = 0.0f32;
                    for j in vis.clone() {
                        let vj = &v[((bi * t + j) * hkv + kvh) * d..][..d];
                        let dp: f32 = doi.iter().zip(vj).map(|(x, y)| x * y).sum();
                        ds[j] = dp;
                        sum += pi[j] * dp;
                        for (o, &x) in dv[j * d..(j + 1) * d].iter_mut().zip(doi) {
                            *o += pi[j] * x;
                        }
                    }
                    let qi = &q[((bi * t + i) * hq + h) * d..][..d];
                    let dqi = &mut dq[(g * t + i) * d..][..d];
                    for j in vis {
                        let s = pi[j] * (ds[j] - sum) * a.scale;
                        let kj = &k[((bi * t + j) * hkv + kvh) * d..][..d];
                        for (o, &x) in dqi.iter_mut().zip(kj) {
                            *o += s * x;
                        }
                        for (o, &x) in dk[j * d..(j + 1) * d].iter_mut().zip(qi) {
                            *o += s * x;
                        }
                    }
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    for (task, (pq, pk, pv)) in parts.iter().enumerate() {
        let (bi, kvh) = (task / hkv, task % hkv);
        for i in 0..t {
            let kv_at = ((bi * t + i) * hkv + kvh) * d;
            dk[kv_at..kv_at + d].copy_from_slice(&pk[i * d..(i + 1) * d]);
            dv[kv_at..kv_at + d].copy_from_slice(&pv[i * d..(i + 1) * d]);
            for g in 0..group {
                let h = kvh * group + g;
                dq[((bi * t + i) * hq + h) * d..][..d].copy_from_slice(&pq[(g * t + i) * d..][..d]);
            }
        }
    }
    (dq, dk, dv)
}
