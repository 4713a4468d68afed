//! Cross-entropy over logits, forward and backward fused (as llm.c does): the logits are turned
//! into their gradient in place, so only one `[tokens, vocab]` buffer ever lives.

use rayon::prelude::*;

/// For `logits` `[targets.len(), vocab]`: returns the summed negative log-likelihood (f64) and
/// overwrites `logits` with `d(scale * sum nll)/d logits = scale * (softmax - onehot)`.
pub fn cross_entropy_fused(logits: &mut [f32], targets: &[u32], vocab: usize, scale: f32) -> f64 {
    assert_eq!(logits.len(), targets.len() * vocab);
    logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter())
        .map(|(row, &tgt)| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            let lse = max + sum.ln();
            let nll = lse - row[tgt as usize] as f64;
            for x in row.iter_mut() {
                *x = ((*x as f64 - lse).exp() as f32) * scale;
            }
            row[tgt as usize] -= scale;
            nll
        })
        .collect::<Vec<f64>>()
        .iter()
        .sum()
}
