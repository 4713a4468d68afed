//! Rotary inverse frequencies for a config's `rope_type`, as transformers computes them
//! (`modeling_rope_utils`): default, linear, and Llama 3.1's wavelength-dependent scaling.

use std::f64::consts::PI;

use crate::{RopeConfig, RopeScaling};

/// `head_dim / 2` inverse frequencies.
pub fn inv_freq(rope: &RopeConfig, head_dim: usize) -> Vec<f32> {
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
    };
    scaled.into_iter().map(|f| f as f32).collect()
}
