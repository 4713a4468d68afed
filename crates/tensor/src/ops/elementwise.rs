//! Elementwise ops: the residual add.

use crate::error::shape_err;
use crate::{Tensor, TensorError};

/// `a += b`, rounded to a's dtype.
pub fn add_inplace(a: &mut Tensor, b: &Tensor) -> Result<(), TensorError> {
    if a.shape() != b.shape() {
        return Err(shape_err(
            "add",
            format!("{:?} + {:?}", a.shape(), b.shape()),
        ));
    }
    #[cfg(feature = "cuda")]
    if let (crate::Storage::Cuda(x), crate::Storage::Cuda(y)) = (a.storage(), b.storage()) {
        return crate::cuda::add_inplace(x, y);
    }
    let mut v = a.to_f32_vec();
    let w = b.to_f32_vec();
    for (x, y) in v.iter_mut().zip(&w) {
        *x += y;
    }
    *a = Tensor::from_f32(a.shape().to_vec(), v, a.dtype())?;
    Ok(())
}
