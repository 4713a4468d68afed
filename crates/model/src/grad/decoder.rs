//! One decoder layer's training forward and backward:
//! `h = x + attn(norm1(x)); y = h + mlp(norm2(h))`, over one unit buffer of the layer's weights.

use tessera_tensor::ops::{self, AttentionShape};
use tessera_tensor::DType;

use super::attention::{AttentionActs, AttentionGrads, AttentionParams};
use super::layout::Unit;
use super::linear::LinearParams;
use super::mlp::{MlpActs, MlpGrads, MlpParams};
use super::BatchDims;
use crate::ModelConfig;

pub struct DecoderParams<'a> {
    pub input_norm: &'a [f32],
    pub post_norm: &'a [f32],
    pub attn: AttentionParams<'a>,
    pub mlp: MlpParams<'a>,
    pub eps: f64,
}

/// Everything the backward needs; with recomputation only `x` is kept and the rest is rebuilt.
pub struct DecoderActs {
    pub x: Vec<f32>,
    pub xn1: Vec<f32>,
    pub r1: Vec<f32>,
    pub attn: AttentionActs,
    pub h: Vec<f32>,
    pub xn2: Vec<f32>,
    pub r2: Vec<f32>,
    pub mlp: MlpActs,
}

impl<'a> DecoderParams<'a> {
    /// Views layer `layer`'s weights in `buf`, its unit's buffer.
    pub fn new(
        cfg: &ModelConfig,
        layer: usize,
        unit: &Unit,
        buf: &'a [f32],
        inv_freq: &'a [f32],
    ) -> Self {
        let s = |n: &str| {
            unit.slice(buf, n)
                .unwrap_or_else(|| panic!("layout has {n}"))
        };
        let o = |n: &str| unit.slice(buf, n);
        let (h, d, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * d, cfg.num_kv_heads * d);
        let lin =
            |w: &'a [f32], b: Option<&'a [f32]>, n: usize, k: usize| LinearParams { w, b, n, k };
        DecoderParams {
            input_norm: s("input_layernorm.weight"),
            post_norm: s("post_attention_layernorm.weight"),
            attn: AttentionParams {
                q: lin(s("q_proj.weight"), o("q_proj.bias"), qd, h),
                k: lin(s("k_proj.weight"), o("k_proj.bias"), kvd, h),
                v: lin(s("v_proj.weight"), o("v_proj.bias"), kvd, h),
                o: lin(s("o_proj.weight"), o("o_proj.bias"), h, qd),
                shape: AttentionShape {
                    num_heads: cfg.num_heads,
                    num_kv_heads: cfg.num_kv_heads,
                    head_dim: d,
                },
                window: cfg.sliding_window[layer],
                inv_freq,
                scale: crate::rope::softmax_scale(&cfg.rope, d),
                qk_norm: cfg.qk_norm.then(|| {
                    (
                        s("self_attn.q_norm.weight"),
                        s("self_attn.k_norm.weight"),
                        cfg.rms_norm_eps,
                    )
                }),
            },
            mlp: MlpParams {
                gate: lin(s("gate_proj.weight"), o("gate_proj.bias"), i, h),
                up: lin(s("up_proj.weight"), o("up_proj.bias"), i, h),
                down: lin(s("down_proj.weight"), o("down_proj.bias"), h, i),
            },
            eps: cfg.rms_norm_eps,
        }
    }

    pub fn forward(&self, x: Vec<f32>, dims: BatchDims, dt: DType) -> (Vec<f32>, DecoderActs) {
        let (xn1, r1) = super::rms_norm_rounded(&x, self.input_norm, self.eps, dt);
        let (a, attn) = self.attn.forward(&xn1, dims, dt);
        let mut h: Vec<f32> = x.iter().zip(&a).map(|(p, q)| p + q).collect();
        ops::round_slice(dt, &mut h);
        let (xn2, r2) = super::rms_norm_rounded(&h, self.post_norm, self.eps, dt);
        let (m, mlp) = self.mlp.forward(&xn2, dt);
        let mut y: Vec<f32> = h.iter().zip(&m).map(|(p, q)| p + q).collect();
        ops::round_slice(dt, &mut y);
        let acts = DecoderActs {
            x,
            xn1,
            r1,
            attn,
            h,
            xn2,
            r2,
            mlp,
        };
        (y, acts)
    }

    /// Returns `dx`; adds into `grads`, the layer's gradient unit buffer.
    pub fn backward(
        &self,
        unit: &Unit,
        acts: &DecoderActs,
        dy: &[f32],
        dims: BatchDims,
        grads: &mut [f32],
    ) -> Vec<f32> {
        let mut g = unit.split_mut(grads);
        let mut take = |suffix: &str| -> Option<&mut [f32]> {
            let i = g.iter().position(|(n, _)| n.ends_with(suffix))?;
            Some(g.swap_remove(i).1)
        };
        let q_norm = take("self_attn.q_norm.weight");
        let qk_norm = q_norm.zip(take("self_attn.k_norm.weight"));
        let mut pair = |n: &str| {
            let w = take(&format!("{n}.weight")).expect("layout has every weight");
            (w, take(&format!("{n}.bias")))
        };
        let mg = MlpGrads {
            gate: pair("gate_proj"),
            up: pair("up_proj"),
            down: pair("down_proj"),
        };
        let ag = AttentionGrads {
            q: pair("q_proj"),
            k: pair("k_proj"),
            v: pair("v_proj"),
            o: pair("o_proj"),
            qk_norm,
        };
        let dnorm1 = take("input_layernorm.weight").expect("layout has input_layernorm");
        let dnorm2 = take("post_attention_layernorm.weight").expect("layout has post norm");

        let dxn2 = self.mlp.backward(&acts.xn2, &acts.mlp, dy, mg);
        let mut dh = ops::rms_norm_backward(&acts.h, self.post_norm, &acts.r2, &dxn2, dnorm2);
        for (a, b) in dh.iter_mut().zip(dy) {
            *a += b;
        }
        let dxn1 = self.attn.backward(&acts.xn1, &acts.attn, &dh, dims, ag);
        let mut dx = ops::rms_norm_backward(&acts.x, self.input_norm, &acts.r1, &dxn1, dnorm1);
        for (a, b) in dx.iter_mut().zip(&dh) {
            *a += b;
        }
        dx
    }
}
