//! SiLU and the gated MLP's `silu(gate) * up`.

use rayon::prelude::*;

use crate::error::shape_err;
use crate::{Tensor, TensorError};

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `silu(gate) * up`, elementwise, in gate's dtype (each product rounded as HF rounds it).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor, TensorError> {
    if gate.shape() != up.shape() {
        return Err(shape_err(
            "silu_mul",
            format!("gate {:?} vs up {:?}", gate.shape(), up.shape()),
        ));
    }
    #[cfg(feature = "cuda")]
    if let (crate::Storage::Cuda(g), crate::Storage::Cuda(u)) = (gate.storage(), up.storage()) {
        let out = crate::cuda::silu_mul(g, u)?;
        return Tensor::new(gate.shape().to_vec(), crate::Storage::Cuda(out));
    }
    let dt = gate.dtype();
    let mut g = gate.to_f32_vec();
    let u = up.to_f32_vec();
    g.par_iter_mut()
        .zip(u.par_iter())
        .for_each(|(a, &b)| *a = dt.round(silu(*a)) * b);
    Tensor::from_f32(gate.shape().to_vec(), g, dt)
}
