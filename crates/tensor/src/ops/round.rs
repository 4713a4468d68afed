//! Rounding f32 buffers to a storage dtype: how mixed precision is emulated on CPU, where every
//! kernel computes in f32 and its result is rounded to the activation dtype as a 16-bit GPU
//! kernel's output would be.

use rayon::prelude::*;

use crate::DType;

/// Rounds every element of `v` to the nearest value of `dt` (a no-op for f32).
pub fn round_slice(dt: DType, v: &mut [f32]) {
    if dt == DType::F32 {
        return;
    }
    v.par_chunks_mut(4096)
        .for_each(|c| c.iter_mut().for_each(|x| *x = dt.round(*x)));
}
