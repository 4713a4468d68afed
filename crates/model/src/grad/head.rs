//! The LM head with its loss: final RMSNorm, `logits = x W^T`, cross-entropy against the next
//! tokens. Forward and backward run fused, so the `[tokens, vocab]` logits live once.

use tessera_tensor::{ops, DType};

pub struct HeadParams<'a> {
    pub norm: &'a [f32],
    /// `[vocab, hidden]`: `lm_head.weight`, or the embedding table when tied.
    pub weight: &'a [f32],
    pub vocab: usize,
    pub eps: f64,
}

/// Output of the head's fused forward and backward.
pub struct HeadOut {
    /// Summed negative log-likelihood over the tokens (unscaled).
    pub loss_sum: f64,
    pub dx: Vec<f32>,
}

impl HeadParams<'_> {
    /// `grad_scale` multiplies the gradient of the summed loss (1/tokens for a mean, times the
    /// loss scale in fp16). Adds into `dnorm` and `dweight`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &self,
        x: &[f32],
        targets: &[u32],
        grad_scale: f32,
        dt: DType,
        dnorm: &mut [f32],
        dweight: &mut [f32],
    ) -> HeadOut {
        let h = self.norm.len();
        let (xn, r) = super::rms_norm_rounded(x, self.norm, self.eps, dt);
        let m = targets.len();
        let mut logits = ops::linear_forward(&xn, self.weight, m, h, self.vocab);
        ops::round_slice(dt, &mut logits);
        let loss_sum = ops::cross_entropy_fused(&mut logits, targets, self.vocab, grad_scale);
        let dlogits = logits;
        ops::linear_backward_weight(&dlogits, &xn, m, h, self.vocab, dweight);
        let dxn = ops::linear_backward_input(&dlogits, self.weight, m, h, self.vocab);
        let dx = ops::rms_norm_backward(x, self.norm, &r, &dxn, dnorm);
        HeadOut { loss_sum, dx }
    }

    /// Logits `[tokens, vocab]` only (evaluation).
    pub fn logits(&self, x: &[f32], dt: DType) -> Vec<f32> {
        let h = self.norm.len();
        let (xn, _) = super::rms_norm_rounded(x, self.norm, self.eps, dt);
        let mut logits = ops::linear_forward(&xn, self.weight, x.len() / h, h, self.vocab);
        ops::round_slice(dt, &mut logits);
        logits
    }
}
