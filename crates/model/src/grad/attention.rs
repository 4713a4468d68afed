//! Self-attention's training forward and backward: q/k/v projections, Qwen3's per-head q/k norms
//! where the model has them, RoPE, causal attention with grouped KV heads, o_proj. The forward keeps what the backward needs in [`AttentionActs`].

use tessera_tensor::ops::{self, AttentionShape, TrainAttention};
use tessera_tensor::DType;

use super::linear::LinearParams;
use super::BatchDims;

pub struct AttentionParams<'a> {
    pub q: LinearParams<'a>,
    pub k: LinearParams<'a>,
    pub v: LinearParams<'a>,
    pub o: LinearParams<'a>,
    pub shape: AttentionShape,
    pub window: Option<usize>,
    pub inv_freq: &'a [f32],
    /// The softmax scale, YaRN's attention factor included (`rope::softmax_scale`).
    pub scale: f32,
    /// Qwen3's q and k norm weights (`head_dim` each) and their epsilon.
    pub qk_norm: Option<(&'a [f32], &'a [f32], f64)>,
}

/// Saved for the backward: rotated q and k, v, the probabilities, the pre-o_proj output; with
/// q/k norms, q and k before them and their inverse RMS a head (empty otherwise).
pub struct AttentionActs {
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub q_pre: Vec<f32>,
    pub k_pre: Vec<f32>,
    pub q_inv: Vec<f32>,
    pub k_inv: Vec<f32>,
    pub v: Vec<f32>,
    pub probs: Vec<f32>,
    pub att: Vec<f32>,
}

/// Gradient slices of one attention block (biases when the model has them).
pub struct AttentionGrads<'a> {
    pub q: (&'a mut [f32], Option<&'a mut [f32]>),
    pub k: (&'a mut [f32], Option<&'a mut [f32]>),
    pub v: (&'a mut [f32], Option<&'a mut [f32]>),
    pub o: (&'a mut [f32], Option<&'a mut [f32]>),
    /// The q and k norm weights' gradients, where the model has them.
    pub qk_norm: Option<(&'a mut [f32], &'a mut [f32])>,
}

impl AttentionParams<'_> {
    fn call(&self, dims: BatchDims) -> TrainAttention {
        TrainAttention {
            batch: dims.batch,
            seq: dims.seq,
            shape: self.shape,
            window: self.window,
            scale: self.scale,
        }
    }

    /// `xn`: the normed input `[batch*seq, hidden]`.
    pub fn forward(&self, xn: &[f32], dims: BatchDims, dt: DType) -> (Vec<f32>, AttentionActs) {
        let positions = dims.positions();
        let mut q = self.q.forward(xn, dt);
        let mut k = self.k.forward(xn, dt);
        let v = self.v.forward(xn, dt);
        let (mut q_pre, mut k_pre, mut q_inv, mut k_inv) = (vec![], vec![], vec![], vec![]);
        if let Some((qw, kw, eps)) = self.qk_norm {
            // Rows of head_dim, every head by the same weight, rounded as inference and
            // transformers' Qwen3RMSNorm round them: normalise, round, scale, round.
            let (qn, qi) = super::rms_norm_rounded(&q, qw, eps, dt);
            let (kn, ki) = super::rms_norm_rounded(&k, kw, eps, dt);
            (q_pre, k_pre) = (std::mem::replace(&mut q, qn), std::mem::replace(&mut k, kn));
            (q_inv, k_inv) = (qi, ki);
        }
        ops::rope_rotate(
            &mut q,
            self.shape.num_heads,
            &positions,
            self.inv_freq,
            false,
        );
        ops::rope_rotate(
            &mut k,
            self.shape.num_kv_heads,
            &positions,
            self.inv_freq,
            false,
        );
        ops::round_slice(dt, &mut q);
        ops::round_slice(dt, &mut k);
        let (mut att, probs) = ops::attention_forward(&self.call(dims), &q, &k, &v);
        ops::round_slice(dt, &mut att);
        let out = self.o.forward(&att, dt);
        (
            out,
            AttentionActs {
                q,
                k,
                q_pre,
                k_pre,
                q_inv,
                k_inv,
                v,
                probs,
                att,
            },
        )
    }

    /// Returns `d xn`; adds into the weight gradients.
    pub fn backward(
        &self,
        xn: &[f32],
        acts: &AttentionActs,
        dout: &[f32],
        dims: BatchDims,
        g: AttentionGrads<'_>,
    ) -> Vec<f32> {
        let datt = self.o.backward(&acts.att, dout, g.o.0, g.o.1);
        let (mut dq, mut dk, dv) = ops::attention_backward(
            &self.call(dims),
            &acts.q,
            &acts.k,
            &acts.v,
            &acts.probs,
            &datt,
        );
        let positions = dims.positions();
        ops::rope_rotate(
            &mut dq,
            self.shape.num_heads,
            &positions,
            self.inv_freq,
            true,
        );
        ops::rope_rotate(
            &mut dk,
            self.shape.num_kv_heads,
            &positions,
            self.inv_freq,
            true,
        );
        if let (Some((qw, kw, _)), Some((dqw, dkw))) = (self.qk_norm, g.qk_norm) {
            dq = ops::rms_norm_backward(&acts.q_pre, qw, &acts.q_inv, &dq, dqw);
            dk = ops::rms_norm_backward(&acts.k_pre, kw, &acts.k_inv, &dk, dkw);
        }
        let mut dxn = self.q.backward(xn, &dq, g.q.0, g.q.1);
        for (d, e) in dxn.iter_mut().zip(self.k.backward(xn, &dk, g.k.0, g.k.1)) {
            *d += e;
        }
        for (d, e) in dxn.iter_mut().zip(self.v.backward(xn, &dv, g.v.0, g.v.1)) {
            *d += e;
        }
        dxn
    }
}
