//! Training: every layer's explicit forward (keeping activations) and backward, on f32 buffers
//! grouped into per-layer units ([`ParamLayout`]), and the driver that runs them in order
//! ([`TrainModel::forward_backward`]). Mixed precision is emulated by rounding weights and
//! activations to the compute dtype; gradients are computed in f32.

pub mod attention;
pub mod decoder;
pub mod embedding;
pub mod head;
pub mod init;
pub mod layout;
pub mod linear;
pub mod mlp;
pub mod model;

pub use init::{load_checkpoint, random_init};
pub use layout::{ParamEntry, ParamLayout, Unit, UnitKind};
pub use model::{BatchDims, FullParams, TrainModel, TrainOptions, UnitSource};

/// RMSNorm over rows of `w.len()` rounded as inference (`ops::rms_norm`) and transformers round
/// it: normalise in f32, round to `dt`, scale by the weight, round again. Returns the output and
/// each row's inverse RMS (for `ops::rms_norm_backward`, which treats the roundings as identity).
pub(crate) fn rms_norm_rounded(
    x: &[f32],
    w: &[f32],
    eps: f64,
    dt: tessera_tensor::DType,
) -> (Vec<f32>, Vec<f32>) {
    use tessera_tensor::ops;
    if dt == tessera_tensor::DType::F32 {
        return ops::rms_norm_forward(x, w, eps);
    }
    let ones = vec![1.0f32; w.len()];
    let (mut n, inv) = ops::rms_norm_forward(x, &ones, eps);
    ops::round_slice(dt, &mut n);
    for (a, g) in n.iter_mut().zip(w.iter().cycle()) {
        *a *= g;
    }
    ops::round_slice(dt, &mut n);
    (n, inv)
}

#[cfg(test)]
mod tests;
