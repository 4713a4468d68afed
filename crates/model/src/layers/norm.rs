//! RMSNorm with a learned scale (replicated on every rank).

use tessera_tensor::{ops, DType, Tensor};

use crate::checkpoint::Checkpoint;
use crate::ModelError;

pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(
        ck: &Checkpoint,
        name: &str,
        hidden: usize,
        eps: f64,
        dtype: DType,
    ) -> Result<Self, ModelError> {
        Ok(RmsNorm {
            weight: ck.read_rows(name, &[hidden], 0, hidden, dtype)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        Ok(ops::rms_norm(x, &self.weight, self.eps)?)
    }

    /// `x += delta`, then the norm of the new `x` (one kernel on a GPU).
    pub fn forward_add(&self, x: &mut Tensor, delta: &Tensor) -> Result<Tensor, ModelError> {
        Ok(ops::add_rms_norm(x, delta, &self.weight, self.eps)?)
    }
}
