//! AdamW (Loshchilov & Hutter): Adam with decoupled weight decay, as `torch.optim.AdamW` and
//! DeepSpeed's fused Adam (`adam_w_mode`) compute it, on one f32 shard of master weights.

/// Hyper-parameters (DeepSpeed's `optimizer.params`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub betas: (f32, f32),
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWParams {
    fn default() -> Self {
        AdamWParams {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// One update of `p` (master weights) with gradient `g` and moments `m`, `v`, at 1-based `step`:
/// `p -= lr * (wd * p + m_hat / (sqrt(v_hat) + eps))`.
pub fn adamw_update(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    lr: f32,
    step: u64,
    hp: &AdamWParams,
) {
    let (b1, b2) = hp.betas;
    let bc1 = 1.0 - (b1 as f64).powi(step as i32);
    let bc2 = 1.0 - (b2 as f64).powi(step as i32);
    let step_size = (lr as f64 / bc1) as f32;
    let bc2_sqrt = bc2.sqrt() as f32;
    let decay = 1.0 - lr * hp.weight_decay;
    for i in 0..p.len() {
        m[i] = b1 * m[i] + (1.0 - b1) * g[i];
        v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
        p[i] *= decay;
        p[i] -= step_size * m[i] / (v[i].sqrt() / bc2_sqrt + hp.eps);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_by_lr_against_the_gradient_sign() {
        let hp = AdamWParams {
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut p = vec![1.0, -1.0];
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        adamw_update(&mut p, &[0.5, -2.0], &mut m, &mut v, 0.1, 1, &hp);
        assert!(
            (p[0] - 0.9).abs() < 1e-6 && (p[1] + 0.9).abs() < 1e-6,
            "{p:?}"
        );
        // Decoupled decay: a zero gradient still shrinks the weight by lr * wd.
        let hp = AdamWParams::default();
        let mut p = vec![2.0];
        adamw_update(&mut p, &[0.0], &mut [0.0], &mut [0.0], 0.5, 1, &hp);
        assert!((p[0] - 2.0 * (1.0 - 0.5 * 0.01)).abs() < 1e-6);
    }
}
