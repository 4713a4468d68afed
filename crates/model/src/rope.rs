//! Rotary inverse frequencies for a config's `rope_type`, as transformers computes them
//! (`modeling_rope_utils`): default, linear, Llama 3.1's wavelength-dependent scaling and YaRN,
//! and the softmax scale that carries YaRN's attention factor.

use std::f64::consts::PI;

use crate::{RopeConfig, RopeScaling};

/// `head_dim / 2` inverse frequencies.
pub fn inv_freq(rope: &RopeConfig, head_dim: usize) -> Vec<f32> {
    if let RopeScaling::Yarn { .. } = rope.scaling {
        return yarn_inv_freq(rope, head_dim);
    }
    let base: Vec<f64> = (0..head_dim / 2)
        .map(|i| {
            // transformers forms the exponent and the power in f32.
            let e = (2 * i) as f32 / head_dim as f32;
            1.0 / (rope.theta as f32).powf(e) as f64
        })
        .collect();
    let scaled: Vec<f64> = match rope.scaling {
        RopeScaling::Default => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        RopeScaling::Yarn { .. } => unreachable!("yarn returned above"),
    };
    scaled.into_iter().map(|f| f as f32).collect()
}

/// The factor transformers multiplies RoPE's cos and sin by (YaRN's attention factor; 1 for the
/// other kinds).
pub fn attention_scaling(rope: &RopeConfig) -> f64 {
    match rope.scaling {
        RopeScaling::Yarn {
            attention_factor, ..
        } => attention_factor,
        _ => 1.0,
    }
}

/// The attention softmax's scale: `1 / sqrt(head_dim)`, times the square of
/// [`attention_scaling`]. Scaling q's and k's cos and sin by `m` scales every q.k by `m^2`, so the
/// kernels rotate with plain cos/sin (the KV cache holds k unscaled) and the scale carries it.
pub fn softmax_scale(rope: &RopeConfig, head_dim: usize) -> f32 {
    let m = attention_scaling(rope);
    (m * m / (head_dim as f64).sqrt()) as f32
}

/// YaRN's frequencies in f32, operation for operation as transformers computes them
/// (`_compute_yarn_parameters`: the correction range in f64, the rest in f32 tensors).
fn yarn_inv_freq(rope: &RopeConfig, head_dim: usize) -> Vec<f32> {
    let RopeScaling::Yarn {
        factor,
        original_max_position_embeddings: old,
        beta_fast,
        beta_slow,
        truncate,
        ..
    } = rope.scaling
    else {
        unreachable!("called for yarn only")
    };
    let dim = head_dim as f64;
    let base = rope.theta;
    let correction_dim =
        |rotations: f64| dim * (old / (rotations * 2.0 * PI)).ln() / (2.0 * base.ln());
    let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
    if truncate {
        (low, high) = (low.floor(), high.ceil());
    }
    let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
    if low == high {
        high += 0.001;
    }
    let span = (high - low) as f32;
    (0..head_dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / head_dim as f32;
            let pos = (base as f32).powf(e);
            let extrapolation = 1.0 / pos;
            let interpolation = 1.0 / (factor as f32 * pos);
            let ramp = ((i as f32 - low as f32) / span).clamp(0.0, 1.0);
            let keep = 1.0 - ramp;
            interpolation * (1.0 - keep) + extrapolation * keep
        })
        .collect()
}
